"""Time and memory of the retrieval metrics: ours, the bare similarity matmul, IRRA's formula.

Each method runs in a fresh process on the same seeded inputs (L2-normalised features, pids with
several gallery items per identity). Memory is the peak resident set size during the call minus
the resident size just before it ("above the interpreter", inputs already allocated).

    python tools/benchmark_metrics.py            # 10k x 10k, 512-d, 1000 ids; then 5k x 200k (ours)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.metrics import retrieval_metrics  # noqa: E402


def make_inputs(num_queries: int, num_gallery: int, dim: int, num_ids: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(num_queries, dim, generator=gen), dim=1)
    gallery = F.normalize(torch.randn(num_gallery, dim, generator=gen), dim=1)
    query_pids = torch.randint(0, num_ids, (num_queries,), generator=gen)
    gallery_pids = torch.arange(num_gallery) % num_ids
    return queries, gallery, query_pids, gallery_pids


def irra_formula(queries, gallery, query_pids, gallery_pids, max_rank: int = 10) -> dict[str, float]:
    """IRRA's rank(): full argsort of the similarity, matches matrix, cumulative sums, a loop per query."""
    similarity = queries @ gallery.t()
    order = torch.argsort(similarity, dim=1, descending=True)
    matches = gallery_pids[order].eq(query_pids.view(-1, 1))
    cmc = matches[:, :max_rank].cumsum(1).clamp(max=1).float().mean(0) * 100
    hits = matches.cumsum(1)
    inp = [hits[i][row.nonzero()[-1]] / (row.nonzero()[-1] + 1.0) for i, row in enumerate(matches)]
    precision = torch.stack([hits[:, i] / (i + 1.0) for i in range(hits.shape[1])], 1) * matches
    ap = precision.sum(1) / matches.sum(1)
    return {"R1": float(cmc[0]), "R5": float(cmc[4]), "R10": float(cmc[9]),
            "mAP": float(ap.mean() * 100), "mINP": float(torch.cat(inp).mean() * 100)}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(method: str, num_queries: int, num_gallery: int, dim: int, num_ids: int) -> dict:
    """Run one method in this process; returns seconds, peak MB above the pre-call RSS, peak RSS MB."""
    inputs = make_inputs(num_queries, num_gallery, dim, num_ids)
    if method == "ours":  # compile (or load from cache) the kernels outside the timing
        retrieval_metrics(*make_inputs(64, 64, 8, 8))
    fn = {"ours": retrieval_metrics, "irra": irra_formula,
          "matmul": lambda q, g, *_: q @ g.t()}[method]
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS counter
    before = _rss_kb("VmRSS")
    start = time.perf_counter()
    result = fn(*inputs)
    seconds = time.perf_counter() - start
    peak = _rss_kb("VmHWM")
    metrics = result if isinstance(result, dict) else None
    return {"method": method, "seconds": seconds, "peak_above_mb": (peak - before) / 1024,
            "peak_rss_mb": peak / 1024, "metrics": metrics}


def measure(method: str, *shape: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, *map(str, shape)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ids", type=int, default=1_000)
    parser.add_argument("--large_gallery", type=int, default=200_000, help="0 skips the large case")
    parser.add_argument("--large_queries", type=int, default=5_000)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], *map(int, args.child[1:]))))
        return
    shape = (args.queries, args.gallery, args.dim, args.ids)
    rows = {m: measure(m, *shape) for m in ("ours", "matmul", "irra")}
    print(f"{args.queries} queries x {args.gallery} gallery, {args.dim}-d, {args.ids} ids")
    print("| method | seconds | peak MB above interpreter | vs matmul time | vs IRRA memory |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.3f} | {row['peak_above_mb']:.0f} | "
              f"{row['seconds'] / rows['matmul']['seconds']:.2f}x | "
              f"{row['peak_above_mb'] / rows['irra']['peak_above_mb']:.3f} |")
    ours, irra = rows["ours"]["metrics"], rows["irra"]["metrics"]
    print("max |ours - IRRA| over R1/R5/R10/mAP/mINP:", max(abs(ours[k] - irra[k]) for k in irra))
    if args.large_gallery:
        big = measure("ours", args.large_queries, args.large_gallery, args.dim, args.ids)
        print(f"ours, {args.large_queries} queries x {args.large_gallery} gallery: {big['seconds']:.1f} s, "
              f"peak RSS {big['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()

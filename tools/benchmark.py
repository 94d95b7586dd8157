"""Throughput and memory of a config: training samples/s, peak memory, evaluation features/s and
data-loader images/s, printed as one JSON object (compare runs by diffing them).

    python tools/benchmark.py --config_file configs/demo.yaml --steps 20
    python tools/benchmark.py --config_file configs/demo.yaml --pretrain_choice none --vision_width 768 \\
        --vision_layers 12 --text_width 512 --text_layers 12 --embed_dim 512 --img_size 384 128 \\
        --vision_patch_size 16 --stride_size 16 --text_length 77 --batch_size 8 --steps 3

Training is timed on batches already loaded (the model alone, through the training loop's own
``TrainStep``), after ``--warmup`` steps; evaluation features/s time the evaluator's per-batch
encoding (the heads' feature sets and re-ranking caches included), ``eval_seconds`` a whole
``Evaluator.eval`` on the test split; the loader is timed on its own (``--image_cache`` builds/uses
the decoded-image cache).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import build_dataset  # noqa: E402
from datasets.build import build_eval_loaders, build_train_loader  # noqa: E402
from gallery.files import ImageFile  # noqa: E402
from gallery.index import SearchIndex, update_index  # noqa: E402
from gallery.searcher import Searcher  # noqa: E402
from model.build import build_model, configure_heads  # noqa: E402
from model.run import TrainedRun  # noqa: E402
from processor.evaluation import Evaluator  # noqa: E402
from processor.train_step import TrainStep  # noqa: E402
from solver.build import build_optimizer  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.iotools import resolve_device, set_seed  # noqa: E402
from utils.options import build_parser, resolve  # noqa: E402
from utils.simple_tokenizer import SimpleTokenizer  # noqa: E402


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, count: int, sync) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser(__doc__)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--loader_batches", type=int, default=10)
    parser.add_argument("--search_gallery", type=int, default=100_000,
                        help="rows of the (tiled) index that search queries are timed on; 0: no search figures")
    parser.add_argument("--search_queries", type=int, default=50, help="test captions searched one at a time")
    parser.add_argument("--search_index_images", type=int, default=64, help="test images indexed by search.py's "
                        "indexer to time it")
    args = parser.parse_args(argv)
    steps, warmup, loader_batches, search_gallery, search_queries, search_index_images = (
        vars(args).pop(k) for k in ("steps", "warmup", "loader_batches", "search_gallery", "search_queries",
                                    "search_index_images"))
    cfg = resolve(args)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    tokenizer = SimpleTokenizer()
    dataset = build_dataset(cfg.dataset_name, cfg.root_dir, cfg.annotation_format)
    configure_heads(cfg, dataset, tokenizer)
    model = build_model(cfg, dataset.num_classes).to(device)
    model.encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    loader = build_train_loader(cfg, dataset, tokenizer, model.required_fields(), torch.Generator())

    start = time.perf_counter()
    batches = [batch for batch in islice(iter(loader), loader_batches)]
    loader_seconds = time.perf_counter() - start
    images_loaded = sum(len(b["pids"]) for b in batches)

    train_step = TrainStep(model, build_optimizer(cfg, model), device, cfg.amp, max_nonfinite=steps + warmup + 1)
    model.train()
    state = {"i": 0}

    def step() -> None:
        batch = dict(batches[state["i"] % len(batches)])
        batch.pop("replaced")
        state["i"] += 1
        train_step(batch)

    timed(step, warmup, sync)
    step_times = timed(step, steps, sync)
    batch_size = len(batches[0]["pids"])

    img_loader, txt_loader = build_eval_loaders(cfg, dataset, tokenizer, "test")
    model.eval()
    images = [images.to(device) for _, _, images, _ in img_loader]
    texts = [ids.to(device) for _, _, ids in txt_loader]
    retrieval = model.retrieval
    image_seconds = sum(timed(lambda: [retrieval.encode_gallery(model.encoder, x) for x in images], 1, sync))
    text_seconds = sum(timed(lambda: [retrieval.encode_queries(model.encoder, x) for x in texts], 1, sync))
    evaluator = Evaluator(img_loader, txt_loader, pair_batch=cfg.test_batch_size)
    eval_seconds = sum(timed(lambda: evaluator.eval(model, device), 1, sync))
    result = {
        "config": {k: getattr(cfg, k) for k in ("dataset_name", "loss_names", "batch_size", "img_size", "amp",
                                                 "vision_width", "vision_layers", "text_width", "text_layers",
                                                 "pretrain_choice", "num_workers")},
        "device": str(device), "threads": torch.get_num_threads(),
        "train_step_seconds_median": statistics.median(step_times),
        "train_samples_per_second": batch_size / statistics.median(step_times),
        "peak_memory_mb": peak_memory_mb(device),
        "eval_image_features_per_second": sum(len(x) for x in images) / image_seconds,
        "eval_text_features_per_second": sum(len(x) for x in texts) / text_seconds,
        "eval_seconds": eval_seconds,
        "loader_images_per_second": images_loaded / loader_seconds,
    }
    if search_gallery:
        result.update(search_figures(cfg, model, dataset, device, search_gallery, search_queries, search_index_images))
    print(json.dumps(result, indent=1))
    return result


def search_figures(cfg, model, dataset, device: torch.device, gallery: int, queries: int, index_images: int) -> dict:
    """search.py's indexing throughput on ``index_images`` test images, and its query latency (tokenise,
    encode one sentence, score, top 10) over ``gallery`` rows made by repeating their features. A run
    that re-ranks is timed on the indexed images alone (its cache would not fit repeated)."""
    run = TrainedRun(Path("benchmark"), cfg, model.eval(), Path("benchmark"), "benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, path in enumerate(dataset.test.img_paths[:index_images]):
            (folder / f"{i:06d}{Path(path).suffix}").symlink_to(Path(path).resolve())
        report = update_index(run, folder, Path(tmp) / "index.pt", device, cfg.test_batch_size, cfg.num_workers,
                              cfg.amp, save_every=float("inf"))
        index = SearchIndex.load(Path(tmp) / "index.pt")
    if model.retrieval.reranker is None:
        rows = torch.arange(gallery) % len(index)
        index.files = [ImageFile(f"{i:07d}.jpg", 0, 0) for i in range(gallery)]
        index.features = index.features[rows].contiguous()
    searcher = Searcher(run, index, device)
    captions = dataset.test.captions[:queries]
    searcher.search(captions[:1])  # warm-up
    timings = []
    for caption in captions:
        searcher.search([caption], 10)
        timings.append(searcher.timing)
    median = {stage: statistics.median(t[stage] for t in timings) for stage in timings[0]}
    totals = sorted(t["total"] for t in timings)
    return {"search_index_images_per_second": report.images_per_second, "search_gallery_rows": len(index),
            "search_query_ms_p50": median["total"], "search_query_ms_p90": totals[int(0.9 * (len(totals) - 1))],
            "search_query_ms_p50_by_stage": {k: v for k, v in median.items() if k != "total"}}


if __name__ == "__main__":
    sys.exit(run_cli(main))

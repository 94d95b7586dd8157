"""Search your own images with a sentence, using a trained run.

    python search.py index --config_file RUN/configs.yaml --images DIR --index INDEX
    python search.py query --index INDEX "a woman in a red coat" [--topk 10] [--json] [--sheet OUT.png]
    python search.py serve --index INDEX [--host 127.0.0.1] [--port 7860]

``index`` embeds every image under DIR (recursive; jpg, jpeg, png, bmp, webp) with the run's model
as its evaluation does (feature sets, re-ranking cache); re-running it embeds only new or changed
files and continues an interrupted run. ``query`` and ``serve`` load the run that made the index
(``--config_file`` to point at a moved run; an index of another model is refused). Logs go to
stderr, results to stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from gallery.index import AMP_DTYPES, SearchIndex, update_index
from gallery.searcher import Hit, Searcher
from gallery.server import MAX_K, serve
from model.run import load_trained_run, run_config_file
from utils.errors import UserError, run_cli
from utils.iotools import resolve_device
from utils.visualize import retrieval_grid

logger = logging.getLogger("tbps.search")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="embed the images of a folder into an index file")
    index.add_argument("--config_file", required=True, help="the run's configs.yaml or directory (its best.pth is used)")
    index.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    index.add_argument("--index", required=True, type=Path, help="index file to create or update")
    index.add_argument("--batch_size", type=int, default=64)
    index.add_argument("--num_workers", type=int, default=2, help="image-reading processes")
    index.add_argument("--amp", choices=sorted(AMP_DTYPES), default="off", help="mixed precision for the images")
    index.add_argument("--save_every", type=float, default=60.0, metavar="SECONDS",
                       help="write what is embedded so far this often (an interrupted run continues from it)")

    for name, text in (("query", "print the best images for sentences"), ("serve", "serve a search page")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--index", required=True, type=Path)
        sub.add_argument("--config_file", help="the run that made the index, if it moved")
        sub.add_argument("--topk", type=int, default=10, help=f"results per sentence (1..{MAX_K} when serving)")
        if name == "query":
            sub.add_argument("sentences", nargs="*", help="sentences to search for")
            sub.add_argument("--queries", type=Path, help="a file of sentences, one per line")
            sub.add_argument("--json", action="store_true", help='print [{"rank", "score", "path"}, ...]')
            sub.add_argument("--sheet", type=Path, help="also draw the results into this PNG")
        else:
            sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
            sub.add_argument("--port", type=int, default=7860)
    for sub in commands.choices.values():
        sub.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    device = resolve_device(args.device)
    if args.command == "index":
        return run_index(args, device)
    searcher = open_searcher(args.index, args.config_file, device)
    if args.command == "serve":
        if not 1 <= args.topk <= MAX_K:
            raise UserError(f"--topk must be from 1 to {MAX_K}")
        return serve(searcher, args.host, args.port, args.topk)
    return run_query(args, searcher)


def run_index(args, device: torch.device):
    run = load_trained_run(args.config_file)
    report = update_index(run, args.images, args.index, device, args.batch_size, args.num_workers, args.amp,
                          args.save_every)
    print(f"{args.index}: {report.files} images ({report.kept} unchanged, {report.embedded} embedded, "
          f"{report.removed} removed, {len(report.unreadable)} unreadable); "
          f"{report.images_per_second:.1f} images/s on {device}")
    return report


def open_searcher(index_path: Path, config_file: str | None, device: torch.device) -> Searcher:
    index = SearchIndex.load(index_path)
    config = run_config_file(config_file or index.run.config_file)
    if not config.is_file():
        raise UserError(f"the run that made {index_path} is not at {config} any more; give its --config_file")
    return Searcher(load_trained_run(config), index, device)


def run_query(args, searcher: Searcher) -> list[list[Hit]]:
    sentences = list(args.sentences)
    if args.queries:
        if not args.queries.is_file():
            raise UserError(f"queries file not found: {args.queries}")
        sentences += [line for line in args.queries.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not sentences:
        raise UserError("give sentences to search for, or --queries FILE")
    if args.topk < 1:
        raise UserError("--topk must be at least 1")
    results = searcher.search(sentences, args.topk)
    logger.info("%d sentences searched in %.0f ms (%s)", len(sentences), searcher.timing["total"],
                ", ".join(f"{k} {v:.1f}" for k, v in searcher.timing.items() if k != "total"))
    if args.json:
        rows = [[{"rank": h.rank, "score": round(h.score, 6), "path": h.path} for h in hits] for hits in results]
        print(json.dumps(rows[0] if len(rows) == 1 else [{"query": s, "results": r} for s, r in zip(sentences, rows)],
                         indent=1, ensure_ascii=False))
    else:
        for sentence, hits in zip(sentences, results):
            print(f"\n{sentence}")
            print(f"{'rank':>4}  {'score':>7}  path")
            for hit in hits:
                print(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.path}")
    if args.sheet:
        sheet = retrieval_grid(sentences, None, [[h.path for h in hits] for hits in results], None, args.topk,
                               labels=[[f"{h.rank}: {h.score:.3f}" for h in hits] for hits in results])
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.sheet)
        logger.info("contact sheet written to %s", args.sheet)
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))

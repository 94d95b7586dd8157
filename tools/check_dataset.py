"""Check a dataset before training on it: split sizes beside the published ones, malformed records,
missing or unreadable images, empty or duplicate captions, identities shared between splits.

    python tools/check_dataset.py --dataset_name CUHK-PEDES --root_dir data [--annotation_format tbps]

Prints the split table and one line per problem; exits 1 when there is an error (the dataset cannot
be used as it is), 0 otherwise (warnings included).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prettytable import PrettyTable  # noqa: E402

from datasets.bases import DATASETS, FORMATS, SPLITS  # noqa: E402
from datasets.checks import DatasetReport, inspect_dataset  # noqa: E402

SHOWN = 50  # lines per kind before "... and N more"


def split_table(name: str, report: DatasetReport) -> PrettyTable:
    published = DATASETS[name].published_counts
    table = PrettyTable(["split", "ids", "images", "captions", "published (ids / images / captions)"])
    for split in SPLITS:
        ids, images, captions = report.counts.get(split, (0, 0, 0))
        paper = published.get(split)
        table.add_row([split, ids, images, captions, " / ".join(f"{n:,}" for n in paper) if paper else "-"])
    return table


def print_lines(kind: str, lines: list[str]) -> None:
    for line in lines[:SHOWN]:
        print(f"{kind}: {line}")
    if len(lines) > SHOWN:
        print(f"{kind}: ... and {len(lines) - SHOWN} more")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", required=True, choices=sorted(DATASETS))
    parser.add_argument("--root_dir", default="data")
    parser.add_argument("--annotation_format", default="raw", choices=FORMATS)
    parser.add_argument("--text_length", type=int, default=77, help="caption tokens of the model (SOT, EOT included)")
    args = parser.parse_args(argv)
    report = inspect_dataset(args.dataset_name, args.root_dir, args.annotation_format, args.text_length)
    if report.counts:
        print(split_table(args.dataset_name, report))
    print_lines("error", report.errors)
    print_lines("warning", report.warnings)
    print(f"{args.dataset_name} at {Path(args.root_dir) / DATASETS[args.dataset_name].folder}: "
          f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())

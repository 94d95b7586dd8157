"""Gather the images of one split of a benchmark into a folder (symbolic links, or copies with
``--copy``), keeping their relative paths: a folder ``search.py index`` can embed.

    python tools/split_images.py --dataset_name CUHK-PEDES --root_dir data --split test --out data/test_images
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import build_dataset  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="CUHK-PEDES")
    parser.add_argument("--root_dir", default="data")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    args = parser.parse_args(argv)
    dataset = build_dataset(args.dataset_name, args.root_dir)
    paths = getattr(dataset, args.split).img_paths
    written = 0
    for path in map(Path, paths):
        target = args.out / path.relative_to(dataset.img_dir)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if args.copy:
            shutil.copy2(path, target)
        else:
            target.symlink_to(path.resolve())
        written += 1
    if not paths:
        raise UserError(f"the {args.split} split of {args.dataset_name} under {args.root_dir} has no image")
    print(f"{len(paths)} {args.split} images of {args.dataset_name} in {args.out} ({written} new)")
    return written


if __name__ == "__main__":
    sys.exit(run_cli(main))

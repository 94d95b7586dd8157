"""Generate the synthetic toy dataset in a benchmark's published format (CUHK-PEDES by default).

Usage: python tools/generate_toy_data.py --root_dir data [--seed 0] [--num_train_ids 1000]
       [--dataset_name ICFG-PEDES]   (ICFG-PEDES has no val split: --num_val_ids defaults to 0 there)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

from datasets.bases import DATASETS  # noqa: E402
from datasets.toy import generate_toy_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root_dir", default="data", help="writes <root_dir>/<dataset_name>")
    parser.add_argument("--dataset_name", default="CUHK-PEDES",
                        choices=("CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "UFine6926"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train_ids", type=int, default=1000)
    parser.add_argument("--num_val_ids", type=int, help="default 50 (0 for ICFG-PEDES)")
    parser.add_argument("--num_test_ids", type=int, default=100)
    parser.add_argument("--images_per_id", type=int, default=2)
    parser.add_argument("--captions_per_image", type=int, default=2)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=48)
    args = parser.parse_args()
    if args.num_val_ids is None:
        args.num_val_ids = 0 if args.dataset_name == "ICFG-PEDES" else 50

    start = time.perf_counter()
    out = generate_toy_dataset(
        args.root_dir,
        num_train_ids=args.num_train_ids,
        num_val_ids=args.num_val_ids,
        num_test_ids=args.num_test_ids,
        images_per_id=args.images_per_id,
        captions_per_image=args.captions_per_image,
        image_size=(args.height, args.width),
        seed=args.seed,
        dataset_name=args.dataset_name,
    )
    annos = json.loads((out / DATASETS[args.dataset_name].annotation_files[0]).read_text())
    print(f"toy dataset at {out} ({time.perf_counter() - start:.1f}s)")
    for split in ("train", "val", "test"):
        recs = [a for a in annos if a["split"] == split]
        ids = Counter(a["id"] for a in recs)
        caps = sum(len(a["captions"]) for a in recs)
        print(f"  {split:5s}: {len(ids)} ids, {len(recs)} images, {caps} captions")


if __name__ == "__main__":
    main()

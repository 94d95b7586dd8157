"""Zero-shot retrieval numbers equal those of the published IRRA code on the same files.

The reference numbers below were produced by running anosorae/IRRA at commit cfc2378 (its own
model building, checkpoint loading with position-embedding resize, tokenizer, test transforms,
data loaders and ``utils/metrics.py``), in fp32 on CPU, on exactly the files this module writes:
a random-weight CLIP in OpenAI's format (``conftest.openai_state_dict(seed=0)``; both the state
dict and the TorchScript archive give the same numbers) and the three benchmark formats below.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import test as test_entry

from conftest import make_openai_checkpoint

COLOURS = ("red", "blue", "black", "white", "green", "grey", "yellow", "pink")
GARMENTS = ("shirt", "jacket", "coat", "dress", "sweater")
LOWER = ("pants", "shorts", "skirt", "jeans")


def _caption(rng: np.random.Generator) -> str:
    return (f"a person in a {rng.choice(COLOURS)} {rng.choice(GARMENTS)} and "
            f"{rng.choice(COLOURS)} {rng.choice(LOWER)}, carrying a {rng.choice(COLOURS)} bag.")


def write_parity_benchmarks(root: Path, seed: int = 0) -> None:
    """CUHK-PEDES, ICFG-PEDES and RSTPReid, 4 train and 15 test identities each, PNG images."""
    rng = np.random.default_rng(seed)
    layouts = {  # name: (json name, path field, captions per image, train id offset)
        "CUHK-PEDES": ("reid_raw.json", "file_path", 2, 1),
        "ICFG-PEDES": ("ICFG-PEDES.json", "file_path", 1, 0),
        "RSTPReid": ("data_captions.json", "img_path", 2, 0),
    }
    for name, (json_name, field, ncap, offset) in layouts.items():
        entries = []
        ids = [("train", offset + i) for i in range(4)] + [("test", 100 + i) for i in range(15)]
        for split, pid in ids:
            for k in range(int(rng.integers(1, 4))):
                rel = f"{split}/{pid:04d}_{k}.png"
                path = root / name / "imgs" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, size=(64, 32, 3), dtype=np.uint8)).save(path)
                entries.append({"split": split, "captions": [_caption(rng) for _ in range(ncap)],
                                field: rel, "id": pid})
        (root / name / json_name).write_text(json.dumps(entries))


# IRRA cfc2378, fp32, CPU, img_size 384x128, stride 16 (percentages).
IRRA_REFERENCE = {
    "CUHK-PEDES": {
        "t2i": {"R1": 6.6667, "R5": 30.0, "R10": 53.3333, "mAP": 17.5899, "mINP": 13.5408},
        "i2t": {"R1": 10.0, "R5": 36.6667, "R10": 50.0, "mAP": 14.0212, "mINP": 9.219},
    },
    "ICFG-PEDES": {
        "t2i": {"R1": 8.5714, "R5": 37.1429, "R10": 68.5714, "mAP": 15.4591, "mINP": 10.5985},
        "i2t": {"R1": 8.5714, "R5": 34.2857, "R10": 60.0, "mAP": 16.3646, "mINP": 10.0246},
    },
    "RSTPReid": {
        "t2i": {"R1": 10.0, "R5": 33.3333, "R10": 53.3333, "mAP": 17.9259, "mINP": 14.273},
        "i2t": {"R1": 10.0, "R5": 36.6667, "R10": 56.6667, "mAP": 13.6766, "mINP": 9.6577},
    },
}


@pytest.mark.parametrize("fmt", ["state_dict", "jit"])
@pytest.mark.parametrize("dataset", ["CUHK-PEDES", "ICFG-PEDES", "RSTPReid"])
def test_zero_shot_matches_irra(tmp_path, dataset, fmt):
    write_parity_benchmarks(tmp_path / "data")
    ckpt = tmp_path / f"clip_{fmt}.pt"
    make_openai_checkpoint(ckpt, fmt=fmt, seed=0)
    results = test_entry.main(["--zero_shot", "--dataset_name", dataset, "--root_dir", str(tmp_path / "data"),
                               "--pretrain_choice", str(ckpt), "--output_dir", str(tmp_path / "out"),
                               "--num_workers", "0", "--test_batch_size", "64"])
    for task, reference in IRRA_REFERENCE[dataset].items():
        for key, value in reference.items():
            assert results[task][key] == pytest.approx(value, abs=1e-3), (task, key)

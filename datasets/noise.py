"""Noisy correspondences for training under noise (RDE: Qin et al., CVPR 2024, Sec. 4.2; code
QinYang79/RDE @ b3fd396, datasets/bases.py inject_noisy_correspondence).

A share ``noisy_rate`` of the training records get the caption of another record of that share:
with ``RandomState(noise_seed)`` the record indices are permuted, the first int(rate x N) chosen,
and those chosen indices shuffled again among themselves. Only the caption moves; the image, its
pid and image id stay. With ``noise_seed`` 1 this is exactly RDE's generator (its published
``noiseindex/*.npy`` files are this permutation), independent of the training seed; a file of RDE's
format may be given instead (``noisy_file``), validated, never written. Validation and test splits
are never touched. ``is_clean[i]`` (the record kept its own caption) is kept for analysis.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from utils.settings import PROBABILITY, Setting, declare

from .bases import DatasetError

logger = logging.getLogger(__name__)

SETTINGS = (
    Setting("noisy_rate", 0.0, "share of training pairs whose caption is swapped with another's (RDE's noise)",
            **PROBABILITY),
    Setting("noisy_file", "", "RDE noise-index file (.npy, a permutation of the training records) instead of "
            "generating one"),
    Setting("noise_seed", 1, "seed of the noise generator (1: RDE's published files), independent of seed"),
)
declare("noisy correspondence", SETTINGS)

Record = tuple[int, int, str, str]


def noise_permutation(count: int, rate: float, seed: int = 1) -> np.ndarray:
    """Entry i: the record whose caption record i receives (RDE's two shuffles of RandomState(seed))."""
    rng = np.random.RandomState(seed)
    order = np.arange(count)
    rng.shuffle(order)
    chosen = order[:int(rate * count)]
    shuffled = np.array(chosen)
    rng.shuffle(shuffled)
    permutation = np.arange(count)
    permutation[chosen] = shuffled
    return permutation


def load_noise_file(path: str | Path, count: int) -> np.ndarray:
    """RDE's noise-index file, checked: int64, ``count`` entries, a permutation of 0..count-1."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"noisy_file not found: {path}")
    try:
        permutation = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read noisy_file {path}: {err}") from None
    if permutation.ndim != 1 or len(permutation) != count or not np.issubdtype(permutation.dtype, np.integer):
        raise DatasetError(f"noisy_file {path} must hold {count} integer indices (one per training caption), "
                           f"got shape {permutation.shape} of {permutation.dtype}")
    if not np.array_equal(np.sort(permutation), np.arange(count)):
        raise DatasetError(f"noisy_file {path} is not a permutation of the {count} training records")
    digest = hashlib.sha256(permutation.astype("<i8").tobytes()).hexdigest()[:12]
    logger.info("noise indices from %s (sha256 %s)", path, digest)
    return permutation


def inject_noise(records: list[Record], rate: float, seed: int = 1, noisy_file: str = ""
                 ) -> tuple[list[Record], list[bool]]:
    """The records with captions moved as RDE does, and whether each kept its own caption."""
    if not noisy_file and rate <= 0:
        return records, [True] * len(records)
    permutation = load_noise_file(noisy_file, len(records)) if noisy_file else \
        noise_permutation(len(records), rate, seed)
    noisy = [(pid, image_id, path, records[int(source)][3])
             for (pid, image_id, path, _), source in zip(records, permutation)]
    is_clean = (permutation == np.arange(len(records))).tolist()
    logger.info("noisy correspondences: %d of %d training pairs have another pair's caption (rate %.2f)",
                len(records) - sum(is_clean), len(records), rate)
    return noisy, is_clean

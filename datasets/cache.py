"""Decoded-image cache: the resized RGB images of a split in one memory-mapped uint8 file.

Decoding JPEG/PNG and resizing every epoch costs CPU time that the GPUs wait on. The cache is
built once (resizing exactly as the PIL pipeline does), reused while its fingerprint (annotation
file, image list, size) matches, and read with zero copies; augmentations then run on tensors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.iotools import write_json

from .bases import DatasetError

logger = logging.getLogger(__name__)


def fingerprint(annotation_file: Path, paths: list[str], size: tuple[int, int]) -> str:
    digest = hashlib.sha256(annotation_file.read_bytes())
    digest.update(json.dumps([list(size), paths]).encode())
    return digest.hexdigest()


class DecodedImageCache:
    """``cache[i]``: image ``i`` of ``paths`` as a uint8 [3, H, W] tensor, or None if unreadable."""

    def __init__(self, paths: list[str], size: tuple[int, int], cache_file: Path, annotation_file: Path):
        self.size = tuple(size)
        self.file = Path(cache_file)
        meta_file = self.file.with_suffix(".json")
        key = fingerprint(Path(annotation_file), paths, self.size)
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if meta.get("fingerprint") != key or not self.file.is_file():
            try:
                meta = self._build(paths, key)
                write_json(meta, meta_file)
            except OSError as err:  # e.g. a read-only dataset folder
                raise DatasetError(f"cannot write the image cache {self.file}: {err.strerror or err}; give "
                                   "--cache_dir a writable folder") from None
        self.bad = set(meta["bad"])
        height, width = self.size
        self.array = np.memmap(self.file, dtype=np.uint8, mode="r", shape=(len(paths), height, width, 3))

    def _build(self, paths: list[str], key: str) -> dict:
        height, width = self.size
        logger.info("building the decoded-image cache %s (%d images, %dx%d)", self.file, len(paths), height, width)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.file.with_suffix(".part")
        out = np.memmap(partial, dtype=np.uint8, mode="w+", shape=(len(paths), height, width, 3))
        bad = []
        for index, path in enumerate(paths):
            try:
                with Image.open(path) as image:
                    out[index] = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))
            except (OSError, ValueError) as err:
                logger.warning("cannot read image %s: %s", path, err)
                bad.append(index)
        out.flush()
        del out
        os.replace(partial, self.file)
        return {"fingerprint": key, "count": len(paths), "size": [height, width], "bad": bad}

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        if index in self.bad:
            return None
        return torch.from_numpy(np.array(self.array[index])).permute(2, 0, 1)

"""The image files under a folder, each with the signature that tells whether it changed."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageFile:
    path: str       # relative to the indexed folder, '/'-separated
    size: int       # bytes
    mtime_ns: int   # modification time

    @property
    def signature(self) -> tuple[str, int, int]:
        return self.path, self.size, self.mtime_ns


def scan_images(root: Path) -> list[ImageFile]:
    """Every image under ``root`` (recursive, suffix in IMAGE_SUFFIXES, any case), sorted by path.
    Symbolic links to files are followed; links to folders are not (no cycles)."""
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in names:
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:  # a dangling link or a file removed while scanning
                continue
            found.append(ImageFile(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(found, key=lambda f: f.path)

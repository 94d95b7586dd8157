"""Logging set-up, seeding, device choice and atomic file writes."""
from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import WriteError, interrupts_deferred


FORMAT = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")


def setup_logger(save_dir: str | Path | None, filename: str, append: bool = False,
                 quiet: bool = False, defer: bool = False) -> logging.Logger:
    """Root logger to stdout and ``save_dir/filename`` (overwritten unless ``append``); ``quiet``
    (DDP ranks other than 0) keeps warnings only. With ``defer`` nothing is written yet: the lines
    are kept until ``open_log_file`` (so a command that fails its checks leaves no file behind)."""
    root = logging.getLogger()
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    for handler in [h for h in root.handlers if getattr(h, "tbps", False)]:  # ours from a previous run
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if defer:
        handlers.append(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    elif save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(save_dir) / filename, mode="a" if append else "w"))
    for handler in handlers:
        handler.setFormatter(FORMAT)
        handler.tbps = True
        root.addHandler(handler)
    return logging.getLogger("tbps")


def open_log_file(path: str | Path, append: bool = False) -> None:
    """Start writing the log to ``path``, beginning with the lines a deferred ``setup_logger`` kept."""
    root = logging.getLogger()
    target = logging.FileHandler(path, mode="a" if append else "w")
    target.setFormatter(FORMAT)
    target.tbps = True
    for handler in [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        handler.setTarget(target)
        handler.flush()
        root.removeHandler(handler)
        handler.close()
    root.addHandler(target)


def log_to_file(text: str) -> None:
    """Write ``text`` as an ERROR line into the log file only (the console shows it another way)."""
    record = logging.LogRecord("tbps", logging.ERROR, __file__, 0, text, None, None)
    previous, logging.raiseExceptions = logging.raiseExceptions, False  # a full disk: no logging traceback
    try:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and getattr(handler, "tbps", False):
                handler.handle(record)
    finally:
        logging.raiseExceptions = previous


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def configure_determinism(enabled: bool) -> None:
    """PyTorch's deterministic algorithms (errors on ops that have none) and no cuDNN autotuning."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = enabled


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``; an
    interruption (Ctrl-C, SIGTERM) during the write takes effect once the file is complete."""
    with interrupts_deferred():
        _write_and_rename(path, write)


def _write_and_rename(path: Path, write) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions of a new file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failed write of its zip archive as a RuntimeError of its writer
        if isinstance(err, OSError) or (isinstance(err, RuntimeError) and "inline_container" in str(err)):
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
            raise WriteError(f"cannot write {path} ({reason}; {free_megabytes(path.parent)} MB free there); "
                             f"the previous {path.name}, if any, is unchanged") from None
        raise


def free_megabytes(folder: Path) -> int | str:
    """Free space where ``folder`` (or its nearest existing parent) lives; '?' when unknown."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    try:
        return shutil.disk_usage(existing).free // 2**20
    except (OSError, TypeError):
        return "?"


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_text(text: str, path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_json(obj: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_torch_file(path: str | Path, what: str, error: type[Exception]) -> Any:
    """``torch.load`` of tensors and plain containers onto the CPU; a missing or unreadable file
    raises ``error`` with one line naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise error(f"cannot read {what} {path} ({type(err).__name__})") from None

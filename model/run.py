"""A trained run as ``train.py`` leaves it (``configs.yaml`` + ``best.pth``), loaded for inference."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from utils.iotools import file_sha256
from utils.options import build_parser, resolve

from .build import TBPSModel, build_model
from .clip_loading import CheckpointError, load_strict


@dataclass
class TrainedRun:
    config_file: Path        # the run's configs.yaml (resolved)
    cfg: SimpleNamespace
    model: TBPSModel         # on the CPU, eval mode
    checkpoint: Path
    checkpoint_sha256: str   # identifies the weights, whatever the paths

    @property
    def name(self) -> str:
        return f"{self.cfg.name} ({self.config_file.parent})"


def load_run_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Strict load of one of our checkpoints; a mismatch names the missing/unexpected keys."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__})") from None
    load_strict(model, state, path)


def load_trained_run(config_file: str | Path) -> TrainedRun:
    """The model of ``RUN/configs.yaml`` with the weights of ``RUN/best.pth``."""
    config_file = Path(config_file).resolve()
    cfg = resolve(build_parser("").parse_args(["--config_file", str(config_file)]))
    checkpoint = config_file.parent / "best.pth"
    model = build_model(cfg, cfg.num_classes, load_weights=False)
    load_run_checkpoint(model, checkpoint)
    return TrainedRun(config_file, cfg, model.eval(), checkpoint, file_sha256(checkpoint))

"""A trained run as ``train.py`` leaves it (``configs.yaml`` + ``best.pth``), loaded for inference."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from utils.iotools import file_sha256, read_torch_file
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


def load_run_checkpoint(model: torch.nn.Module, path: Path) -> int | None:
    """Strict load of one of our checkpoints (a mismatch names the missing/unexpected keys); returns
    the epoch it was saved after (None when it does not say, e.g. an imported run)."""
    checkpoint = _checkpoint(path)
    load_strict(model, checkpoint["model"], path)
    return checkpoint.get("epoch")


def _checkpoint(path: Path) -> dict:
    checkpoint = read_torch_file(path, "checkpoint", CheckpointError)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path} is not a checkpoint of ours (no 'model' state dict)")
    return checkpoint


def initialise_from_run(model: TBPSModel, run_dir: str | Path) -> list[str]:
    """Load ``RUN_DIR/best.pth`` into ``model`` to start training from it (e.g. an imported run):
    every encoder tensor must fit; head tensors load where our model has the same name and shape,
    the others are reported. Returns the report lines."""
    path = Path(run_dir) / "best.pth"
    state = _checkpoint(path)["model"]
    own = model.state_dict()
    encoder = [k for k in own if k.startswith("encoder.")]
    misfit = [k for k in encoder if k not in state or state[k].shape != own[k].shape]
    if misfit:
        raise CheckpointError(f"init_from {path}: the encoder does not fit ({len(misfit)} tensors, e.g. {misfit[0]})")
    loaded = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loaded, strict=False)
    report = [f"initialised {len(loaded)} of {len(own)} tensors from {path}"]
    fresh = sorted({k.split(".")[1] for k in own if k.startswith("heads.") and k not in loaded})
    ignored = sorted({".".join(k.split(".")[:2]) for k in state if k not in loaded})
    if fresh:
        report.append(f"heads starting fresh: {', '.join(fresh)}")
    if ignored:
        report.append(f"left out of {path.name} (not in this model, or another shape): {', '.join(ignored)}")
    return report


def run_architecture(run_dir: str | Path) -> dict:
    """The encoder architecture (``clip`` section) of a run's configs.yaml."""
    config = Path(run_dir) / "configs.yaml"
    if not config.is_file():
        raise CheckpointError(f"init_from: no configs.yaml in {run_dir}")
    arch = getattr(read_run_config(config), "clip", None)
    if not arch:
        raise CheckpointError(f"init_from: {config} does not describe its encoder (no clip section)")
    return arch


def read_run_config(config_file: str | Path) -> SimpleNamespace:
    """A run's ``configs.yaml``, resolved (every key checked, defaults filled in)."""
    return resolve(build_parser("").parse_args(["--config_file", str(config_file)]))


def run_config_file(path: str | Path) -> Path:
    """A run's ``configs.yaml``, given that file or the run directory."""
    path = Path(path)
    return path / "configs.yaml" if path.is_dir() else path


def load_trained_run(config_file: str | Path) -> TrainedRun:
    """The model of ``RUN/configs.yaml`` (or ``RUN``) with the weights of ``RUN/best.pth``."""
    config_file = run_config_file(config_file).resolve()
    cfg = read_run_config(config_file)
    checkpoint = config_file.parent / "best.pth"
    model = build_model(cfg, cfg.num_classes, load_weights=False)
    load_run_checkpoint(model, checkpoint)
    return TrainedRun(config_file, cfg, model.eval(), checkpoint, file_sha256(checkpoint))

"""Training state for exact resume: model, optimizer, scheduler, best score and every RNG."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .comm import get_rank, get_world_size, is_distributed
from .errors import UserError
from .iotools import save_checkpoint


logger = logging.getLogger(__name__)


class ResumeError(UserError):
    """No checkpoint to resume from, or one that does not fit the run."""


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Python, numpy, torch (CPU, CUDA) and the data loader's generator (sampler and worker seeds)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": generator.get_state()}


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["loader"])


def gather_rng_states(generator: torch.Generator) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective call under DDP)."""
    state = rng_state(generator)
    if not is_distributed():
        return [state]
    states: list = [None] * get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def save_training_state(path: Path, model, optimizer, scheduler, epoch: int, best: dict,
                        rng_states: list[dict[str, Any]], scaler: torch.amp.GradScaler,
                        head_states: dict[str, dict] | None = None) -> None:
    """Atomically write everything needed to continue after ``epoch`` (``last.pth``), including the
    heads' per-epoch state (``Head.training_state``)."""
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "best": best, "rng": rng_states, "heads": head_states or {}}, path)


def state_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    """'' when ``state`` fits ``model`` exactly, else the missing, unexpected and mis-shaped keys
    (the first few of each, with both shapes) in one line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if own[k].shape != state[k].shape]
    parts = [f"{label} {items[:3]}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
             for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if items]
    return "; ".join(parts)


def load_training_state(path: Path, model, optimizer, scheduler,
                        generator: torch.Generator) -> tuple[int, dict, dict]:
    """Restore a ``last.pth`` (the heads' per-epoch state too); returns (last completed epoch, best
    results so far, grad-scaler state)."""
    if not path.is_file():
        raise ResumeError(f"cannot resume: no checkpoint at {path} (train without --resume, or pass "
                          f"--resume_ckpt_file PATH)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        mismatch = state_mismatch(model, state["model"])
        if mismatch:
            raise ResumeError(f"cannot resume from {path}: its model does not match this config: {mismatch}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for name, head_state in state.get("heads", {}).items():
            model.heads[name].load_training_state(head_state)
    except ResumeError:
        raise
    except Exception as err:  # unpickling and state-dict mismatches come in many types
        first = str(err).splitlines()[0].split(". ")[0]  # torch's advice after the first sentence is noise here
        raise ResumeError(f"cannot resume from {path}: {first} (a damaged or incomplete file?)") from None
    if len(state["rng"]) == get_world_size():
        set_rng_state(state["rng"][get_rank()], generator)
    else:  # a different number of processes: the weights continue, the random streams restart
        logger.warning("%s was saved by %d processes, this run has %d: RNG states not restored",
                       path, len(state["rng"]), get_world_size())
    return state["epoch"], state["best"], state["scaler"]

"""One training step, shared by the training loop and ``tools/benchmark.py`` (no copy that can drift):
autocast, loss scaling, gradient accumulation (DDP ``no_sync`` on every micro-batch but the last),
the non-finite guard and the optimizer step."""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

from utils.comm import all_ranks_true
from utils.errors import UserError

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(UserError):
    """Too many consecutive non-finite losses."""


@dataclass
class StepOutcome:
    outputs: dict[str, float]  # every value the heads report
    total: float               # the summed ``*_loss`` terms
    finite: bool               # False: the step was skipped (no gradient kept, no update)


def move_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TrainStep:
    """``step(batch, update)``: forward under autocast (``amp`` bf16/fp16; a GradScaler for fp16), the
    backward of the summed ``*_loss`` terms divided by ``accum_steps``, and, when ``update``, the
    optimizer step. A loss that is not finite on any process skips the step on every process and
    drops the gradients accumulated so far; ``max_nonfinite`` in a row raise ``TrainingDiverged``.
    ``model`` may be DDP-wrapped: gradients are all-reduced only on the micro-batch that updates."""

    def __init__(self, model, optimizer, device: torch.device, amp: str = "off", accum_steps: int = 1,
                 max_nonfinite: int = 10):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.amp_dtype = AMP_DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.accum_steps, self.max_nonfinite = accum_steps, max_nonfinite
        self.nonfinite_in_a_row = 0

    def __call__(self, batch: dict[str, torch.Tensor], update: bool = True, where: str = "") -> StepOutcome:
        batch = move_to(batch, self.device)
        no_sync = self.model.no_sync if hasattr(self.model, "no_sync") and not update else contextlib.nullcontext
        with no_sync():
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                outputs = self.model(batch)
                total = sum(v for k, v in outputs.items() if k.endswith("_loss"))
            if not all_ranks_true(bool(torch.isfinite(total)), self.device):  # every process skips together
                self.optimizer.zero_grad(set_to_none=True)  # drops a partial accumulation too
                self._non_finite(outputs, batch["image_ids"], where)
                return StepOutcome({k: v.item() for k, v in outputs.items()}, total.item(), False)
            self.nonfinite_in_a_row = 0
            self.scaler.scale(total / self.accum_steps).backward()
        if update:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome({k: v.item() for k, v in outputs.items()}, total.item(), True)

    def _non_finite(self, outputs, image_ids: torch.Tensor, where: str) -> None:
        self.nonfinite_in_a_row += 1
        bad = {k: v.item() for k, v in outputs.items() if k.endswith("_loss") and not math.isfinite(v.item())}
        logger.warning("%s: non-finite loss %s, step skipped; image ids %s", where, bad, image_ids.tolist())
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise TrainingDiverged(f"{self.nonfinite_in_a_row} consecutive non-finite losses at {where}; "
                                   "training stopped, state saved to last.pth")

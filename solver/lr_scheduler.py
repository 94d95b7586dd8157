"""Learning-rate schedule with warmup, per epoch (IRRA's LRSchedulerWithWarmup) or per optimizer
step (TBPS-CLIP's ``cosine_scheduler``)."""
from __future__ import annotations

import math
from bisect import bisect_right

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupScheduler(LRScheduler):
    """Stepped once per epoch, after the epoch (``steps_per_epoch`` 1; ``last_epoch`` k = epoch - 1), or
    after every optimizer step (``steps_per_epoch`` S; k = the steps done). W = warmup_epochs x S,
    T = total_epochs x S.

    Warmup (k < W): factor = w + (1 - w) k / W per epoch, as IRRA, or w + (1 - w) k / (W - 1) per
    step, TBPS-CLIP's linspace from w x base to base with both ends included ('linear'); w
    ('constant'). Then 'cosine': target + (base - target)(1 + cos(pi (k - W) / (T - W))) / 2, or 'step'
    (multistep, milestones in epochs): base * gamma^(number of milestones <= k / S).
    """

    def __init__(self, optimizer: Optimizer, mode: str = "cosine", total_epochs: int = 60,
                 warmup_epochs: int = 5, warmup_factor: float = 0.1, warmup_method: str = "linear",
                 milestones: tuple[int, ...] = (20, 50), gamma: float = 0.1, target_lr: float = 0.0,
                 last_epoch: int = -1, steps_per_epoch: int = 1):
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must increase, got {milestones}")
        self.mode, self.steps_per_epoch = mode, steps_per_epoch
        self.total_steps = total_epochs * steps_per_epoch
        self.warmup_steps, self.warmup_factor, self.warmup_method = warmup_epochs * steps_per_epoch, warmup_factor, \
            warmup_method
        self.milestones, self.gamma = list(milestones), gamma
        self.target_lr = target_lr
        super().__init__(optimizer, last_epoch)

    def _warmup(self, k: int) -> float:
        if self.warmup_method == "constant":
            return self.warmup_factor
        span = self.warmup_steps if self.steps_per_epoch == 1 else self.warmup_steps - 1
        alpha = k / max(1, span)
        return self.warmup_factor * (1 - alpha) + alpha

    def lr_at(self, base_lr: float, k: int) -> float:
        if k < self.warmup_steps:
            return base_lr * self._warmup(k)
        if self.mode == "step":
            return base_lr * self.gamma ** bisect_right(self.milestones, k // self.steps_per_epoch)
        progress = (k - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.target_lr + (base_lr - self.target_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        """Take only the progress (steps taken) from a checkpoint; the schedule itself (base lrs,
        warmup, horizon) stays this config's. A resumed run with a larger ``num_epoch`` or another
        ``lr`` thus follows the new schedule from where it stopped; torch's default restores every
        attribute, so the old horizon stayed and past it the cosine climbed back up. With the same
        config the result is the same as torch's (exact resume)."""
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict.get("_step_count", self.last_epoch + 1)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

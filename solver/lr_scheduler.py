"""Per-epoch learning-rate schedule with warmup (IRRA's LRSchedulerWithWarmup)."""
from __future__ import annotations

import math
from bisect import bisect_right

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupScheduler(LRScheduler):
    """Stepped once per epoch, after the epoch; ``last_epoch`` k = epoch - 1.

    Warmup (k < warmup_epochs): factor = w + (1 - w) k / warmup_epochs ('linear') or w ('constant').
    Then 'cosine': target + (base - target)(1 + cos(pi (k - warmup) / (total - warmup))) / 2,
    or 'step' (multistep): base * gamma^(number of milestones <= k).
    """

    def __init__(self, optimizer: Optimizer, mode: str = "cosine", total_epochs: int = 60,
                 warmup_epochs: int = 5, warmup_factor: float = 0.1, warmup_method: str = "linear",
                 milestones: tuple[int, ...] = (20, 50), gamma: float = 0.1, target_lr: float = 0.0,
                 last_epoch: int = -1):
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must increase, got {milestones}")
        self.mode, self.total_epochs = mode, total_epochs
        self.warmup_epochs, self.warmup_factor, self.warmup_method = warmup_epochs, warmup_factor, warmup_method
        self.milestones, self.gamma = list(milestones), gamma
        self.target_lr = target_lr
        super().__init__(optimizer, last_epoch)

    def _warmup(self, k: int) -> float:
        if self.warmup_method == "constant":
            return self.warmup_factor
        alpha = k / self.warmup_epochs
        return self.warmup_factor * (1 - alpha) + alpha

    def lr_at(self, base_lr: float, k: int) -> float:
        if k < self.warmup_epochs:
            return base_lr * self._warmup(k)
        if self.mode == "step":
            return base_lr * self.gamma ** bisect_right(self.milestones, k)
        progress = (k - self.warmup_epochs) / max(1, self.total_epochs - self.warmup_epochs)
        return self.target_lr + (base_lr - self.target_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

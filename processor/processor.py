"""Training loop: epochs, logging, evaluation, checkpoints (``best.pth``, ``last.pth``)."""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.checkpoint import gather_rng_states, save_training_state
from utils.comm import all_ranks_true, barrier, is_main_process
from utils.errors import UserError
from utils.iotools import save_checkpoint, write_json
from utils.metrics import Evaluator, results_table

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """Too many consecutive non-finite losses."""


class AverageMeter:
    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(1, self.count)


def move_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class EpochTrainer:
    """One epoch at a time: autocast (``amp`` bf16/fp16, a GradScaler for fp16), gradient
    accumulation over ``accum_steps`` batches, and steps with a non-finite loss skipped (the run
    stops after ``max_nonfinite_steps`` in a row)."""

    def __init__(self, model, optimizer, device, log_period: int, max_nonfinite_steps: int,
                 amp: str = "off", accum_steps: int = 1):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.log_period, self.max_nonfinite_steps = log_period, max_nonfinite_steps
        self.amp_dtype = AMP_DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.accum_steps = accum_steps
        self.nonfinite_in_a_row = 0

    def run(self, loader, epoch: int) -> dict[str, float]:
        """Returns the epoch average of every value the heads report, plus skip counts."""
        self.model.train()
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        meters: dict[str, AverageMeter] = defaultdict(AverageMeter)
        skipped_images = nonfinite = 0
        progress = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                        disable=not is_main_process())
        self.optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(progress, start=1):
            skipped_images += int(batch.pop("skipped", 0))
            if batch["images"].shape[0] == 0:
                continue
            batch = move_to(batch, self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                outputs = self.model(batch)
                total = sum(v for k, v in outputs.items() if k.endswith("_loss"))
            if not all_ranks_true(bool(torch.isfinite(total)), self.device):  # every rank skips together
                nonfinite += 1
                self.optimizer.zero_grad(set_to_none=True)  # drops a partial accumulation too
                self._non_finite(outputs, batch["image_ids"], epoch, step)
                continue
            self.nonfinite_in_a_row = 0
            self.scaler.scale(total / self.accum_steps).backward()
            if step % self.accum_steps == 0 or step == len(loader):
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            n = batch["images"].shape[0]
            meters["loss"].update(total.item(), n)
            for key, value in outputs.items():
                meters[key].update(value.item(), n)
            progress.set_postfix(loss=f"{meters['loss'].avg:.4f}")
            if step % self.log_period == 0:
                logger.info("epoch %d [%d/%d] %s", epoch, step, len(loader),
                            ", ".join(f"{k}: {m.avg:.4f}" for k, m in meters.items()))
        if skipped_images:
            logger.warning("epoch %d: skipped %d unreadable training images", epoch, skipped_images)
        stats = {k: m.avg for k, m in meters.items()}
        stats.update(skipped_images=skipped_images, nonfinite_steps=nonfinite)
        return stats

    def _non_finite(self, outputs, image_ids: torch.Tensor, epoch: int, step: int) -> None:
        self.nonfinite_in_a_row += 1
        bad = {k: v.item() for k, v in outputs.items() if k.endswith("_loss") and not math.isfinite(v.item())}
        logger.warning("epoch %d step %d: non-finite loss %s, step skipped; image ids %s",
                       epoch, step, bad, image_ids.tolist())
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise TrainingDiverged(f"{self.nonfinite_in_a_row} consecutive non-finite losses at epoch {epoch} "
                                   f"step {step}; training stopped, state saved to last.pth")


def do_train(cfg, model, train_loader, evaluator: Evaluator, optimizer, scheduler, run_dir: Path,
             device: torch.device, generator: torch.Generator, start_epoch: int = 1,
             best: dict | None = None, scaler_state: dict | None = None) -> dict:
    """Train epochs ``start_epoch..num_epoch``, evaluating every ``eval_period`` and at the end.

    After every epoch ``last.pth`` holds the full training state (exact resume); ``best.pth`` and
    ``results.json`` follow the best t2i R1. All files are written atomically. Under DDP ``model``
    is the wrapped model; only rank 0 evaluates, logs to TensorBoard and writes files.
    """
    main = is_main_process()
    bare = getattr(model, "module", model)  # the model without its DDP wrapper
    writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch) if main else None
    trainer = EpochTrainer(model, optimizer, device, cfg.log_period, cfg.max_nonfinite_steps, cfg.amp,
                           cfg.accum_steps)
    if scaler_state:
        trainer.scaler.load_state_dict(scaler_state)
    best = best or {}
    logger.info("training epochs %d..%d, %d iterations each", start_epoch, cfg.num_epoch, len(train_loader))
    for epoch in range(start_epoch, cfg.num_epoch + 1):
        start = time.time()
        try:
            stats = trainer.run(train_loader, epoch)
        except TrainingDiverged:  # keep the weights of the last finite step for inspection
            rng_states = gather_rng_states(generator)
            if main:
                save_training_state(run_dir / "last.pth", bare, optimizer, scheduler, epoch - 1, best, rng_states,
                                    trainer.scaler)
                writer.close()
            raise
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if main:
            for key, value in stats.items():
                writer.add_scalar(f"train/{key}", value, epoch)
            writer.add_scalar("train/lr", lr, epoch)
            writer.add_scalar("train/temperature", cfg.temperature, epoch)
            logger.info("epoch %d done in %.1fs, lr %.2e, %s", epoch, time.time() - start, lr,
                        ", ".join(f"{k}: {v:.4f}" for k, v in stats.items()))
        if main and (epoch % cfg.eval_period == 0 or epoch == cfg.num_epoch):
            results = evaluator.eval(bare, device)
            logger.info("validation (%s) at epoch %d:\n%s", cfg.val_dataset, epoch, results_table(results))
            for task, metrics in results.items():
                for key, value in metrics.items():
                    writer.add_scalar(f"eval/{task}_{key}", value, epoch)
            if not best or results["t2i"]["R1"] > best["t2i"]["R1"]:
                best = {**results, "epoch": epoch}
                save_checkpoint({"model": bare.state_dict(), "epoch": epoch, "results": results},
                                run_dir / "best.pth")
                write_json(best, run_dir / "results.json")
        rng_states = gather_rng_states(generator)
        if main:
            save_training_state(run_dir / "last.pth", bare, optimizer, scheduler, epoch, best, rng_states,
                                trainer.scaler)
        barrier()  # the other ranks wait for evaluation and checkpoints
    if main:
        writer.close()
        logger.info("best t2i R1 %.3f at epoch %d", best["t2i"]["R1"], best["epoch"])
    return best

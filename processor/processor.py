"""Training loop (epochs, logging, evaluation, checkpoints) and inference."""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.iotools import save_checkpoint, write_json
from utils.metrics import Evaluator, results_table

logger = logging.getLogger(__name__)


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


def train_one_epoch(model, loader, optimizer, device, epoch: int, log_period: int) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch average of every value the heads report."""
    model.train()
    meters: dict[str, AverageMeter] = defaultdict(AverageMeter)
    progress = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
    for step, batch in enumerate(progress, start=1):
        batch = move_to(batch, device)
        outputs = model(batch)
        total = sum(v for k, v in outputs.items() if k.endswith("_loss"))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        n = batch["images"].shape[0]
        meters["loss"].update(total.item(), n)
        for key, value in outputs.items():
            meters[key].update(value.item(), n)
        progress.set_postfix(loss=f"{meters['loss'].avg:.4f}")
        if step % log_period == 0:
            logger.info("epoch %d [%d/%d] %s", epoch, step, len(loader),
                        ", ".join(f"{k}: {m.avg:.4f}" for k, m in meters.items()))
    return {k: m.avg for k, m in meters.items()}


def do_train(cfg, model, train_loader, evaluator: Evaluator, optimizer, scheduler,
             run_dir: Path, device: torch.device) -> dict:
    """Train ``cfg.num_epoch`` epochs, evaluating every ``eval_period`` and at the end; keep the
    best t2i R1 in ``best.pth`` and its metrics in ``results.json``."""
    writer = SummaryWriter(log_dir=str(run_dir))
    best: dict = {}
    logger.info("start training: %d epochs, %d iterations each", cfg.num_epoch, len(train_loader))
    for epoch in range(1, cfg.num_epoch + 1):
        start = time.time()
        stats = train_one_epoch(model, train_loader, optimizer, device, epoch, cfg.log_period)
        lr = scheduler.get_last_lr()[0]
        for key, value in stats.items():
            writer.add_scalar(f"train/{key}", value, epoch)
        writer.add_scalar("train/lr", lr, epoch)
        writer.add_scalar("train/temperature", cfg.temperature, epoch)
        scheduler.step()
        logger.info("epoch %d done in %.1fs, lr %.2e, %s", epoch, time.time() - start, lr,
                    ", ".join(f"{k}: {v:.4f}" for k, v in stats.items()))
        if epoch % cfg.eval_period and epoch != cfg.num_epoch:
            continue
        results = evaluator.eval(model, device)
        logger.info("validation (%s) at epoch %d:\n%s", cfg.val_dataset, epoch, results_table(results))
        for task, metrics in results.items():
            for key, value in metrics.items():
                writer.add_scalar(f"eval/{task}_{key}", value, epoch)
        if not best or results["t2i"]["R1"] > best["t2i"]["R1"]:
            best = {**results, "epoch": epoch}
            save_checkpoint({"model": model.state_dict(), "epoch": epoch, "results": results},
                            run_dir / "best.pth")
            write_json(best, run_dir / "results.json")
    writer.close()
    logger.info("best t2i R1 %.3f at epoch %d", best["t2i"]["R1"], best["epoch"])
    return best

"""Training loop: epochs, the heads' per-epoch hooks, logging, evaluation, checkpoints."""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets.batch_mix import BatchMix
from utils.checkpoint import gather_rng_states, save_training_state
from utils.comm import all_gather_rows, all_reduce_sum, barrier, get_world_size, is_main_process
from utils.errors import ConfigError
from utils.iotools import save_checkpoint, write_json
from utils.metrics import results_table
from utils.options import parse_select_metric

from .evaluation import Evaluation, Evaluator
from .train_step import TrainingDiverged, TrainStep, move_to

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


class TrainingSetPass:
    """The ``EpochContext`` a head's ``before_epoch`` gets: a no-gradient pass over the training loader
    (eval mode) whose per-sample outputs are gathered from every process by the batch's ``index``."""

    def __init__(self, model, loader, device: torch.device, epoch: int, amp_dtype: torch.dtype | None):
        self.model, self.loader, self.device, self.epoch, self.amp_dtype = model, loader, device, epoch, amp_dtype
        self.num_samples = len(loader.dataset)

    @torch.no_grad()
    def per_sample(self, fn: Callable) -> dict[str, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        index, values = [], defaultdict(list)
        for batch in tqdm(self.loader, desc=f"epoch {self.epoch} pass", leave=False, disable=not is_main_process()):
            batch.pop("replaced")
            if "index" not in batch:
                raise ConfigError("a per-sample pass needs the batch field 'index': add it to the head's batch_fields")
            batch = move_to(batch, self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = fn(batch, self.model.encode(batch), self.model.encoder)
            index.append(batch["index"])
            for key, value in out.items():
                values[key].append(value.float())
        self.model.train(was_training)
        rows = all_gather_rows(torch.cat(index)).cpu()
        result = {}
        for key, parts in values.items():
            full = torch.full((self.num_samples,), float("nan"))
            full[rows] = all_gather_rows(torch.cat(parts)).cpu()
            result[key] = full
        return result


class EpochTrainer:
    """One epoch at a time through ``TrainStep``: accumulation over ``accum_steps`` batches, steps
    with a non-finite loss skipped (the run stops after ``max_nonfinite_steps`` in a row)."""

    def __init__(self, model, optimizer, device, log_period: int, max_nonfinite_steps: int,
                 amp: str = "off", accum_steps: int = 1, step_scheduler=None, mix: BatchMix | None = None):
        self.step = TrainStep(model, optimizer, device, amp, accum_steps, max_nonfinite_steps)
        self.model, self.log_period, self.accum_steps = model, log_period, accum_steps
        self.step_scheduler = step_scheduler  # stepped after every optimizer step (lr_schedule_unit iteration)
        self.heads = getattr(model, "module", model).heads
        self.mix = mix  # MixGen / ConcatGen on the loaded batch (each process its own, as upstream)

    def run(self, loader, epoch: int) -> dict[str, float]:
        """Returns the epoch average of every value the heads report, plus replacement and skip counts."""
        self.model.train()
        meters: dict[str, AverageMeter] = defaultdict(AverageMeter)
        replaced = nonfinite = mixed = 0
        progress = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                        disable=not is_main_process())
        self.step.optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(progress, start=1):
            replaced += int(batch.pop("replaced").sum())
            if self.mix is not None:
                mixed += self.mix(batch)
            update = step % self.accum_steps == 0 or step == len(loader)
            for head in self.heads.values():
                head.on_step(epoch, step - 1, len(loader))
            outcome = self.step(batch, update, where=f"epoch {epoch} step {step}")
            if update and self.step_scheduler is not None:  # a skipped step still advances the schedule
                self.step_scheduler.step()
            if not outcome.finite:
                nonfinite += 1
                continue
            n = batch["images"].shape[0]
            meters["loss"].update(outcome.total, n)
            for key, value in outcome.outputs.items():
                meters[key].update(value, n)
            progress.set_postfix(loss=f"{meters['loss'].avg:.4f}")
            if step % self.log_period == 0:
                logger.info("epoch %d [%d/%d] %s", epoch, step, len(loader),
                            ", ".join(f"{k}: {m.avg:.4f}" for k, m in meters.items()))
        replaced = all_reduce_sum(replaced, self.step.device)  # every process's loader
        if replaced:
            logger.warning("epoch %d: replaced %d samples whose image could not be read", epoch, replaced)
        stats = {k: m.avg for k, m in meters.items()}
        stats.update(replaced_samples=replaced, nonfinite_steps=nonfinite)
        if self.mix is not None:
            stats["mixed_batches"] = mixed
        return stats


def head_states(model) -> dict[str, dict]:
    return {name: state for name, head in model.heads.items() if (state := head.training_state())}


def is_better(results: dict, best: dict, select: tuple[str, str]) -> bool:
    block, metric = select
    return not best or results[block][metric] > best[block][metric]


def metric_blocks(results: dict) -> dict[str, dict[str, float]]:
    """The metric blocks (``t2i``, ``i2t``, ...) of a results dict, without its other keys."""
    return {k: v for k, v in results.items() if isinstance(v, dict) and "R1" in v}


def selection_record(cfg, best: dict) -> dict:
    """How the reported checkpoint was chosen: split, metric, epoch, value, protocol."""
    block, metric = parse_select_metric(cfg.select_metric)
    protocol = "published: epoch selected on the test split" if cfg.val_dataset == "test" else \
        "validation: epoch selected on held-out data, test evaluated only at the selected and the last epoch"
    return {"split": cfg.val_dataset, "metric": cfg.select_metric, "epoch": best["epoch"],
            "value": best[block][metric], "protocol": protocol}


def run_report(cfg, selected: dict, test: Evaluation, best: dict, last: dict) -> dict:
    """``results.json``: the test metrics at the selected checkpoint (``selected``, metric blocks),
    what they were computed on (``test``: split, queries, exclusions, skipped images), how the
    checkpoint was selected, and the test metrics at the last epoch (``last``, with its epoch)."""
    provenance = {k: v for k, v in test.report().items() if k not in test.results}
    return {**metric_blocks(selected), "epoch": best["epoch"], "checkpoint": "best.pth", **provenance,
            "selection": selection_record(cfg, best), "last": last}


def load_selected(bare, run_dir: Path) -> None:
    """Every process loads ``best.pth`` (rank 0 wrote it before the last barrier)."""
    state = torch.load(run_dir / "best.pth", map_location="cpu", weights_only=False)  # our own file
    bare.load_state_dict(state["model"])


def do_train(cfg, model, train_loader, evaluator: Evaluator, optimizer, scheduler, run_dir: Path,
             device: torch.device, generator: torch.Generator, start_epoch: int = 1,
             best: dict | None = None, scaler_state: dict | None = None,
             test_evaluator: Evaluator | None = None) -> dict:
    """Train epochs ``start_epoch..num_epoch``, evaluating ``evaluator`` (the selection split) every
    ``eval_period`` and at the end; returns what ``results.json`` holds (``run_report``).

    Before each epoch every head's ``before_epoch`` runs. After every epoch ``last.pth`` holds the
    full training state (exact resume, heads' per-epoch state included); ``best.pth`` follows
    ``select_metric`` on the selection split. Selecting on the test split (the published protocol),
    ``results.json`` is rewritten after every evaluation. Selecting on val, ``test_evaluator`` runs
    once training ends, on the last and on the selected weights, and ``results.json`` is written
    then. All files are written atomically. Under DDP ``model`` is the wrapped model; every process
    evaluates its share; rank 0 logs and writes files.
    """
    main = is_main_process()
    bare = getattr(model, "module", model)  # the model without its DDP wrapper
    writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch) if main else None
    per_step = cfg.lr_schedule_unit == "iteration"
    trainer = EpochTrainer(model, optimizer, device, cfg.log_period, cfg.max_nonfinite_steps, cfg.amp,
                           cfg.accum_steps, scheduler if per_step else None,
                           BatchMix.from_config(cfg) if cfg.mixgen != "off" else None)
    if scaler_state:
        trainer.step.scaler.load_state_dict(scaler_state)
    select = parse_select_metric(cfg.select_metric)
    best = best or {}
    on_test = cfg.val_dataset == "test"
    latest: Evaluation | None = None  # the selection split's last evaluation (test protocol: the test split)
    logger.info("training epochs %d..%d, %d iterations each, %d process(es)", start_epoch, cfg.num_epoch,
                len(train_loader), get_world_size())

    def save_last(epoch: int) -> None:
        rng_states = gather_rng_states(generator)
        if main:
            save_training_state(run_dir / "last.pth", bare, optimizer, scheduler, epoch, best, rng_states,
                                trainer.step.scaler, head_states(bare))

    try:  # the TensorBoard file is closed however training ends (error, Ctrl-C)
        for epoch in range(start_epoch, cfg.num_epoch + 1):
            start = time.time()
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            context = TrainingSetPass(bare, train_loader, device, epoch, trainer.step.amp_dtype)
            epoch_stats: dict[str, float] = {}
            for head in bare.heads.values():
                epoch_stats.update(head.before_epoch(context) or {})
            try:
                stats = {**epoch_stats, **trainer.run(train_loader, epoch)}
            except TrainingDiverged:  # keep the weights of the last finite step for inspection
                save_last(epoch - 1)
                raise
            lr = scheduler.get_last_lr()[0]
            if not per_step:
                scheduler.step()
            if main:
                for key, value in stats.items():
                    writer.add_scalar(f"train/{key}", value, epoch)
                writer.add_scalar("train/lr", lr, epoch)
                writer.add_scalar("train/temperature", cfg.temperature, epoch)
                logger.info("epoch %d done in %.1fs, lr %.2e, %s", epoch, time.time() - start, lr,
                            ", ".join(f"{k}: {v:.4f}" for k, v in stats.items()))
            if epoch % cfg.eval_period == 0 or epoch == cfg.num_epoch:
                latest = evaluator.eval(bare, device)  # every process: its share, the same numbers
                results = latest.results
                if is_better(results, best, select):
                    best = {**results, "epoch": epoch}
                if main:
                    label = "test split, published protocol" if on_test else "val split"
                    logger.info("selection evaluation (%s) at epoch %d:\n%s", label, epoch, results_table(results))
                    for task, metrics in results.items():
                        for key, value in metrics.items():
                            writer.add_scalar(f"{'test' if on_test else 'val'}/{task}_{key}", value, epoch)
                    if best["epoch"] == epoch:
                        save_checkpoint({"model": bare.state_dict(), "epoch": epoch, "results": results,
                                         "selection_split": cfg.val_dataset}, run_dir / "best.pth")
                    if on_test:
                        write_json(run_report(cfg, best, latest, best, {"epoch": epoch, **results}),
                                   run_dir / "results.json")
            save_last(epoch)
            barrier()
    finally:
        if main:
            writer.close()
    if main:
        logger.info("selected %s %.3f (%s split) at epoch %d", cfg.select_metric, best[select[0]][select[1]],
                    cfg.val_dataset, best["epoch"])
    if on_test and latest is not None:
        return run_report(cfg, best, latest, best, {"epoch": cfg.num_epoch, **latest.results})
    return final_test(cfg, bare, best, test_evaluator or evaluator, run_dir, device)


def final_test(cfg, bare, best: dict, test_evaluator: Evaluator, run_dir: Path, device: torch.device) -> dict:
    """After training: the test split at the last epoch's weights and at the selected ones (one
    evaluation when they are the same epoch); writes ``results.json``. ``bare`` ends with the
    selected weights."""
    last = test_evaluator.eval(bare, device)
    selected = last
    if best["epoch"] != cfg.num_epoch:
        load_selected(bare, run_dir)
        selected = test_evaluator.eval(bare, device)
    report = run_report(cfg, selected.results, selected, best, {"epoch": cfg.num_epoch, **last.results})
    if is_main_process():
        logger.info("test at the selected epoch %d:\n%s", best["epoch"], results_table(selected.results))
        logger.info("test at the last epoch %d:\n%s", cfg.num_epoch, results_table(last.results))
        write_json(report, run_dir / "results.json")
    return report

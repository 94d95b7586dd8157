"""Train a text-to-image person retrieval model: ``python train.py --config_file configs/demo.yaml``.

``--resume`` continues the run in ``--output_dir`` from its ``last.pth`` exactly as if it had not
stopped; ``--resume_ckpt_file PATH`` continues from a given file. Nothing is written into the run
directory before the config, the data, the model and the checkpoint to resume have been checked; a
directory that already holds a run is refused unless ``--resume`` or ``--overwrite`` says what to do.
Ctrl-C or SIGTERM stop with the command that continues the run.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from datasets import build_dataset
from datasets.bases import choose_val_ids
from datasets.build import build_eval_loaders, build_train_loader
from datasets.captions import clean_dataset_captions
from datasets.checks import check_gallery, check_training_images, report_long_captions
from model.build import build_model, configure_heads
from model.run import initialise_from_run, run_architecture
from processor.evaluation import Evaluator
from processor.processor import do_train, metric_blocks
from solver.build import build_lr_scheduler, build_optimizer
from utils.checkpoint import load_training_state
from utils.errors import ConfigError, Interrupted, UserError, WriteError, run_cli, sigterm_as_interrupt
from utils.comm import get_rank, get_world_size, init_distributed
from utils.iotools import configure_determinism, log_to_file, open_log_file, set_seed, setup_logger
from utils.metrics import results_table
from utils.options import build_parser, check_select_metric, resolve, save_config
from utils.simple_tokenizer import SimpleTokenizer


RUN_FILES = ("configs.yaml", "train_log.txt", "last.pth", "best.pth", "results.json")


def run_directory(cfg) -> Path:
    """``--output_dir`` is the run directory itself; otherwise logs/<dataset>/<time>_<name>."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.resume and not cfg.resume_ckpt_file:
        raise ConfigError("--resume needs --output_dir RUN_DIR (the run to continue)")
    return Path("logs") / cfg.dataset_name / f"{time.strftime('%Y%m%d_%H%M%S')}_{cfg.name}"


def run_files(run_dir: Path) -> list[str]:
    """The files of a run in ``run_dir`` (TensorBoard events included)."""
    if not run_dir.is_dir():
        return []
    return [name for name in RUN_FILES if (run_dir / name).exists()] + \
        sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))


def continues(cfg) -> bool:
    """Whether the command continues a run (``--resume`` or ``--resume_ckpt_file``)."""
    return bool(cfg.resume or cfg.resume_ckpt_file)


def check_run_directory(run_dir: Path, cfg) -> None:
    """Refuse, before anything is written, a run directory that cannot take this command."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file, not a directory")
    existing = run_files(run_dir)
    if existing and not continues(cfg) and not cfg.overwrite:
        if "last.pth" not in existing:  # nothing to resume (interrupted before the first save, or imported)
            raise ConfigError(f"{run_dir} already holds a run without last.pth to resume ({', '.join(existing[:4])}); "
                              "start over with --overwrite, or choose another --output_dir")
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(existing[:4])}); continue it with --resume, "
                          "or start over with --overwrite")
    parent = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run directory {run_dir}: {parent} is not writable")


def saved_epoch(path: Path) -> int:
    """The epoch a ``last.pth`` holds (0: none); memory-mapped, so only that number is read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["epoch"])  # our own file
    except Exception:  # missing, or cut short by the interruption itself
        return 0


def finished_run_report(run_dir: Path, cfg) -> dict | None:
    """The results of the run that ``--resume`` points at when it has trained all ``num_epoch`` epochs
    and written ``results.json``; None when there is training (or its final test) left to do."""
    results = run_dir / "results.json"
    if not continues(cfg) or not results.is_file():
        return None
    if saved_epoch(Path(cfg.resume_ckpt_file or run_dir / "last.pth")) < cfg.num_epoch:
        return None
    return json.loads(results.read_text())


def what_is_saved(argv: list[str], run_dir: Path, advice: str = "") -> tuple[int, str]:
    """(the epoch ``last.pth`` holds, 0 if none; a sentence saying so with the command that goes on)."""
    saved = saved_epoch(run_dir / "last.pth")
    if saved:
        return saved, f"last.pth holds epoch {saved}; {advice}continue with: {continue_command(argv, run_dir)}"
    return 0, f"nothing was saved yet; {advice}start again with: {continue_command(argv, run_dir, '--overwrite')}"


def continue_command(argv: list[str], run_dir: Path, flag: str = "--resume") -> str:
    """The command that resumes this run (``flag`` --resume) or starts it again (--overwrite)."""
    args = list(argv)
    if "--output_dir" not in args:
        args += ["--output_dir", str(run_dir)]
    if flag not in args:
        args.append(flag)
    return shlex.join(["python", "train.py", *args])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = resolve(build_parser(__doc__).parse_args(argv))
    run_dir = run_directory(cfg)
    check_run_directory(run_dir, cfg)
    device = init_distributed(cfg.device)
    rank, world_size = get_rank(), get_world_size()
    cfg.output_dir = str(run_dir)
    finished = finished_run_report(run_dir, cfg)
    if finished is not None:  # resuming a run that is done: nothing to train, nothing rewritten
        if rank == 0:
            print(f"{run_dir} has trained all {cfg.num_epoch} epoch(s); results.json is unchanged (a larger "
                  "--num_epoch trains on)")
        return finished
    logger = setup_logger(None, "train_log.txt", quiet=rank != 0, defer=rank == 0)  # the file once checked
    set_seed(cfg.seed)  # the same initial weights on every rank
    configure_determinism(cfg.deterministic)
    tokenizer = SimpleTokenizer()
    dataset = build_dataset(cfg.dataset_name, cfg.root_dir, cfg.annotation_format)
    if cfg.val_ids_from_train or cfg.val_ids:
        carve_val_split(cfg, dataset)
    if cfg.caption_clean == "tbps":
        clean_dataset_captions(dataset, cfg.caption_max_words)
    eval_splits = sorted({cfg.val_dataset, "test"}, reverse=True)  # selection split first
    check_training_images(dataset, cfg.max_unreadable_train)
    for split in eval_splits:
        check_gallery(dataset, split, cfg.skip_bad_images)
    report_long_captions(dataset, ["train", *eval_splits], tokenizer, cfg.text_length)
    configure_heads(cfg, dataset, tokenizer)
    if cfg.init_from:  # the encoder of that run, not pretrain_choice
        cfg.clip = run_architecture(cfg.init_from)
    model = build_model(cfg, dataset.num_classes, load_weights=not cfg.init_from)
    if cfg.init_from:
        for line in initialise_from_run(model, cfg.init_from):
            logger.info(line)
    model = model.to(device)
    model.encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.compile:
        model.encoder.compile_towers()
    if rank:
        set_seed(cfg.seed + rank)  # then a random stream of its own per rank
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    check_select_metric(cfg.select_metric, model.retrieval.blocks())
    train_loader = build_train_loader(cfg, dataset, tokenizer, model.required_fields(), generator,
                                      rank, world_size)
    evaluators = {split: Evaluator(*build_eval_loaders(cfg, dataset, tokenizer, split, rank, world_size),
                                   cfg.skip_bad_images, pair_batch=cfg.test_batch_size, split=split)
                  for split in eval_splits}
    cfg.num_classes = dataset.num_classes
    cfg.clip = model.encoder.config.to_dict()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer, -(-len(train_loader) // cfg.accum_steps))
    start_epoch, best, scaler_state = 1, None, None
    continuing = continues(cfg)
    if continuing:
        checkpoint = Path(cfg.resume_ckpt_file or run_dir / "last.pth")
        done, best, scaler_state = load_training_state(checkpoint, model, optimizer, scheduler, generator)
        start_epoch = done + 1
    if rank == 0:  # every check passed: now the run directory is written
        start_run_directory(run_dir, cfg, continuing)
    if continuing:
        logger.info("resumed from %s after epoch %d", checkpoint, done)
    logger.info("run directory: %s, %d process(es), global batch %d", run_dir, world_size, cfg.batch_size)
    logger.info("total params: %.2fM", sum(p.numel() for p in model.parameters()) / 1e6)
    trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world_size > 1 else model
    try:
        with sigterm_as_interrupt():
            report = do_train(cfg, trained, train_loader, evaluators[cfg.val_dataset], optimizer, scheduler, run_dir,
                              device, generator, start_epoch, best, scaler_state, evaluators["test"])
    except KeyboardInterrupt:
        saved, where = what_is_saved(argv, run_dir)
        log_to_file(f"interrupted: {where}")
        raise Interrupted(f"interrupted in epoch {saved + 1}: {where}") from None
    except WriteError as err:  # e.g. the disk filled up: say what is still saved and how to go on
        _, where = what_is_saved(argv, run_dir, "make room, then ")
        log_to_file(f"error: {err}; {where}")
        raise WriteError(f"{err}; {where}") from None
    except UserError as err:
        log_to_file(f"error: {err}")
        raise
    if rank == 0:
        print(f"test at epoch {report['epoch']} (selected on {report['selection']['split']}):")
        print(results_table(metric_blocks(report)))
    return report


def carve_val_split(cfg, dataset) -> None:
    """A val split from training identities (``val_ids``, or ``val_ids_from_train`` drawn ones), which
    ``configs.yaml`` then records; selection moves to it."""
    if not cfg.val_ids:
        cfg.val_ids = choose_val_ids(dataset, cfg.val_ids_from_train, cfg.val_ids_seed)
    elif cfg.val_ids_from_train and cfg.val_ids_from_train != len(cfg.val_ids):
        raise ConfigError(f"val_ids lists {len(cfg.val_ids)} identities but val_ids_from_train is "
                          f"{cfg.val_ids_from_train}; give one of them")
    dataset.carve_val(cfg.val_ids)
    if cfg.val_dataset != "val":
        logging.getLogger("tbps").info("val_ids_from_train: the epoch is selected on the carved val split")
        cfg.val_dataset = "val"


def start_run_directory(run_dir: Path, cfg, continuing: bool) -> None:
    """Create (or, with --overwrite, clear) the run directory, write configs.yaml and start the log;
    a resumed run logs the settings that differ from those it was started with."""
    if cfg.overwrite and not continuing:
        for name in run_files(run_dir):
            (run_dir / name).unlink()
    changed = changed_settings(run_dir / "configs.yaml", cfg) if continuing else []
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "configs.yaml")
    open_log_file(run_dir / "train_log.txt", append=continuing)
    if changed:
        logging.getLogger("tbps").warning("resumed with settings that differ from the run's configs.yaml (which "
                                          "now records the new ones): %s", ", ".join(changed))


def changed_settings(saved: Path, cfg) -> list[str]:
    """``key: old -> new`` for each setting of ``cfg`` that differs from the config file ``saved``."""
    if not saved.is_file():
        return []
    try:
        before = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    ignored = {"resume", "resume_ckpt_file", "overwrite"}
    return [f"{key}: {before.get(key)!r} -> {value!r}" for key, value in sorted(vars(cfg).items())
            if key not in ignored and before.get(key) != value]


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Train a text-to-image person retrieval model: ``python train.py --config_file configs/demo.yaml``.

``--resume`` continues the run in ``--output_dir`` from its ``last.pth`` exactly as if it had not
stopped; ``--resume_ckpt_file PATH`` continues from a given file.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from datasets import build_dataset
from datasets.build import build_eval_loaders, build_train_loader
from model.build import build_model, configure_heads
from model.run import initialise_from_run, run_architecture
from processor.evaluation import Evaluator
from processor.processor import do_train
from solver.build import build_lr_scheduler, build_optimizer
from utils.checkpoint import load_training_state
from utils.errors import ConfigError, run_cli
from utils.comm import get_rank, get_world_size, init_distributed
from utils.iotools import configure_determinism, set_seed, setup_logger
from utils.metrics import results_table
from utils.options import build_parser, check_select_metric, resolve, save_config
from utils.simple_tokenizer import SimpleTokenizer


def run_directory(cfg) -> Path:
    """``--output_dir`` is the run directory itself; otherwise logs/<dataset>/<time>_<name>."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.resume and not cfg.resume_ckpt_file:
        raise ConfigError("--resume needs --output_dir RUN_DIR (the run to continue)")
    return Path("logs") / cfg.dataset_name / f"{time.strftime('%Y%m%d_%H%M%S')}_{cfg.name}"


def main(argv: list[str] | None = None) -> dict:
    cfg = resolve(build_parser(__doc__).parse_args(argv))
    device = init_distributed(cfg.device)
    rank, world_size = get_rank(), get_world_size()
    run_dir = run_directory(cfg)
    cfg.output_dir = str(run_dir)
    logger = setup_logger(run_dir if rank == 0 else None, "train_log.txt",
                          append=cfg.resume or bool(cfg.resume_ckpt_file), quiet=rank != 0)
    set_seed(cfg.seed)  # the same initial weights on every rank
    configure_determinism(cfg.deterministic)
    tokenizer = SimpleTokenizer()
    dataset = build_dataset(cfg.dataset_name, cfg.root_dir)
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
    img_loader, txt_loader = build_eval_loaders(cfg, dataset, tokenizer, cfg.val_dataset, rank, world_size)
    cfg.num_classes = dataset.num_classes
    cfg.clip = model.encoder.config.to_dict()
    if rank == 0:
        save_config(cfg, run_dir / "configs.yaml")
    logger.info("run directory: %s, %d process(es), global batch %d", run_dir, world_size, cfg.batch_size)
    logger.info("total params: %.2fM", sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    start_epoch, best, scaler_state = 1, None, None
    if cfg.resume or cfg.resume_ckpt_file:
        checkpoint = Path(cfg.resume_ckpt_file or run_dir / "last.pth")
        done, best, scaler_state = load_training_state(checkpoint, model, optimizer, scheduler, generator)
        start_epoch = done + 1
        logger.info("resumed from %s after epoch %d", checkpoint, done)
    evaluator = Evaluator(img_loader, txt_loader, cfg.skip_bad_images, pair_batch=cfg.test_batch_size)
    trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world_size > 1 else model
    best = do_train(cfg, trained, train_loader, evaluator, optimizer, scheduler, run_dir, device, generator,
                    start_epoch, best, scaler_state)
    if rank == 0:
        print(results_table({k: v for k, v in best.items() if k != "epoch"}))
    return best


if __name__ == "__main__":
    sys.exit(run_cli(main))

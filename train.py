"""Train a text-to-image person retrieval model: ``python train.py --config_file configs/demo.yaml``.

``--resume`` continues the run in ``--output_dir`` from its ``last.pth`` exactly as if it had not
stopped; ``--resume_ckpt_file PATH`` continues from a given file.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from datasets import build_dataset
from datasets.build import build_eval_loaders, build_train_loader
from model.build import build_model
from processor.processor import do_train
from solver.build import build_lr_scheduler, build_optimizer
from utils.checkpoint import load_training_state
from utils.errors import ConfigError, run_cli
from utils.iotools import configure_determinism, resolve_device, set_seed, setup_logger
from utils.metrics import Evaluator, results_table
from utils.options import build_parser, resolve, save_config
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
    run_dir = run_directory(cfg)
    cfg.output_dir = str(run_dir)
    logger = setup_logger(run_dir, "train_log.txt", append=cfg.resume or bool(cfg.resume_ckpt_file))
    set_seed(cfg.seed)
    configure_determinism(cfg.deterministic)
    device = resolve_device(cfg.device)
    tokenizer = SimpleTokenizer()
    dataset = build_dataset(cfg.dataset_name, cfg.root_dir)
    model = build_model(cfg, dataset.num_classes).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = build_train_loader(cfg, dataset, tokenizer, model.required_batch_keys(), generator)
    img_loader, txt_loader = build_eval_loaders(cfg, dataset, tokenizer, cfg.val_dataset)
    cfg.num_classes = dataset.num_classes
    cfg.clip = model.encoder.config.to_dict()
    save_config(cfg, run_dir / "configs.yaml")
    logger.info("run directory: %s", run_dir)
    logger.info("total params: %.2fM", sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    start_epoch, best = 1, None
    if cfg.resume or cfg.resume_ckpt_file:
        checkpoint = Path(cfg.resume_ckpt_file or run_dir / "last.pth")
        done, best = load_training_state(checkpoint, model, optimizer, scheduler, generator)
        start_epoch = done + 1
        logger.info("resumed from %s after epoch %d", checkpoint, done)
    evaluator = Evaluator(img_loader, txt_loader, skip_bad_images=cfg.skip_bad_images)
    best = do_train(cfg, model, train_loader, evaluator, optimizer, scheduler, run_dir, device, generator,
                    start_epoch, best)
    print(results_table({k: v for k, v in best.items() if k != "epoch"}))
    return best


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Evaluate a trained run (``--config_file RUN_DIR/configs.yaml``, loads ``best.pth``) or, with
``--zero_shot``, the pretrained CLIP as is (``--pretrain_choice CKPT --output_dir OUT``)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from datasets import build_dataset
from datasets.build import build_eval_loaders
from model.build import TBPSModel, build_encoder, build_model
from model.clip_loading import CheckpointError, load_strict
from utils.errors import ConfigError, UserError
from utils.iotools import resolve_device, setup_logger, write_json
from utils.metrics import Evaluator, results_table
from utils.options import build_parser, resolve, save_config
from utils.simple_tokenizer import SimpleTokenizer


def load_run_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Strict load of one of our checkpoints; a mismatch names the missing/unexpected keys."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    load_strict(model, state, path)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser(__doc__)
    parser.add_argument("--zero_shot", action="store_true",
                        help="evaluate the pretrained CLIP given by --pretrain_choice, without training")
    args = parser.parse_args(argv)
    zero_shot = getattr(args, "zero_shot", False)
    vars(args).pop("zero_shot", None)
    cfg = resolve(args)
    if zero_shot:
        if not cfg.output_dir:
            raise ConfigError("--zero_shot needs --output_dir")
        out_dir = Path(cfg.output_dir)
    else:
        if not getattr(args, "config_file", ""):
            raise ConfigError("give --config_file RUN_DIR/configs.yaml (or --zero_shot)")
        run_dir = Path(args.config_file).parent
        out_dir = Path(getattr(args, "output_dir", "") or run_dir)
    logger = setup_logger(out_dir, "test_log.txt")
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset_name, cfg.root_dir)
    img_loader, txt_loader = build_eval_loaders(cfg, dataset, SimpleTokenizer(), "test")
    if zero_shot:
        model = TBPSModel(build_encoder(cfg), {})
        save_config(cfg, out_dir / "configs.yaml")
    else:
        model = build_model(cfg, cfg.num_classes, load_weights=False)
        load_run_checkpoint(model, run_dir / "best.pth")
    results = Evaluator(img_loader, txt_loader).eval(model.to(device), device)
    logger.info("test results:\n%s", results_table(results))
    write_json(results, out_dir / "results.json")
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")

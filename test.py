"""Evaluate a trained run (``--config_file RUN_DIR/configs.yaml``, loads ``best.pth``) or, with
``--zero_shot``, the pretrained CLIP as is (``--pretrain_choice CKPT --output_dir OUT``)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from datasets import build_dataset
from datasets.build import build_eval_loaders
from model.build import TBPSModel, build_encoder, build_model
from model.clip_loading import CheckpointError, load_strict
from utils.errors import ConfigError, run_cli
from utils.iotools import resolve_device, setup_logger, write_json
from utils.metrics import Evaluator, extract_features, results_table
from utils.options import build_parser, resolve, save_config
from utils.simple_tokenizer import SimpleTokenizer
from utils.visualize import retrieval_grid


def load_run_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Strict load of one of our checkpoints; a mismatch names the missing/unexpected keys."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__})") from None
    load_strict(model, state, path)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser(__doc__)
    parser.add_argument("--zero_shot", action="store_true",
                        help="evaluate the pretrained CLIP given by --pretrain_choice, without training")
    parser.add_argument("--save_features", action="store_true",
                        help="write query/gallery features and pids to OUTPUT/features.pt")
    parser.add_argument("--visualize", type=int, metavar="N",
                        help="write OUTPUT/retrieval.png: N queries with their top-10 gallery images")
    args = parser.parse_args(argv)
    zero_shot = vars(args).pop("zero_shot", False)
    save_features = vars(args).pop("save_features", False)
    visualize = vars(args).pop("visualize", 0)
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
        if out_dir.resolve() != run_dir.resolve():  # the results elsewhere still describe themselves
            save_config(cfg, out_dir / "configs.yaml")
    features = extract_features(model.to(device), img_loader, txt_loader, device, cfg.skip_bad_images)
    results = Evaluator(img_loader, txt_loader).eval(model, device, features)
    logger.info("test results:\n%s", results_table(results))
    write_json(results, out_dir / "results.json")
    if save_features:
        torch.save({k: v.cpu() for k, v in features.items()}, out_dir / "features.pt")
        logger.info("features written to %s", out_dir / "features.pt")
    if visualize:
        write_visualization(dataset.test, features, visualize, out_dir / "retrieval.png")
    return results


def write_visualization(split, features: dict[str, torch.Tensor], num_queries: int, path: Path) -> None:
    """``num_queries`` queries spread evenly over the test captions, with their top-10 images."""
    queries = torch.linspace(0, len(split.captions) - 1, min(num_queries, len(split.captions))).long()
    similarity = features["text_feats"][queries] @ features["image_feats"].t()
    grid = retrieval_grid([split.captions[i] for i in queries], features["text_pids"][queries].cpu(),
                          similarity.cpu(), split.img_paths, features["image_pids"].cpu())
    grid.save(path)
    logging.getLogger("tbps").info("retrieval picture written to %s", path)


if __name__ == "__main__":
    sys.exit(run_cli(main))

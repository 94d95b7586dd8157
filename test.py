"""Evaluate a trained run (``--config_file RUN_DIR/configs.yaml`` or ``RUN_DIR``, loads ``best.pth``) or, with
``--zero_shot``, the pretrained CLIP as is (``--pretrain_choice CKPT --output_dir OUT``).

Writes ``test_results.json`` (never training's ``results.json``): every block's metrics, the split,
the checkpoint and its epoch, the queries left out for having no match and the skipped images.

Works under ``torchrun`` too: every process encodes and ranks its share, rank 0 writes the files."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from datasets import DatasetError, build_dataset
from datasets.build import build_eval_loaders, read_image
from datasets.captions import clean_dataset_captions
from datasets.transforms import NORMALIZATION, transforms_from_config
from model.build import TBPSModel, build_encoder, build_model
from model.heads import parse_loss_names
from model.heads.tir import patchify, to_grayscale, unpatchify
from model.run import load_run_checkpoint, run_config_file
from processor.evaluation import Evaluation, Evaluator
from utils.comm import get_rank, get_world_size, init_distributed
from utils.errors import ConfigError, run_cli
from utils.iotools import setup_logger, write_json
from utils.metrics import results_table
from utils.options import build_parser, resolve, save_config
from utils.simple_tokenizer import SimpleTokenizer, tokenize
from utils.visualize import restoration_grid, retrieval_grid


def count(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    """Evaluates and returns what ``test_results.json`` holds."""
    parser = build_parser(__doc__)
    parser.add_argument("--zero_shot", action="store_true",
                        help="evaluate the pretrained CLIP given by --pretrain_choice, without training")
    parser.add_argument("--save_features", action="store_true",
                        help="write query/gallery features and pids to OUTPUT/features.pt")
    parser.add_argument("--visualize", type=count, metavar="N",
                        help="write OUTPUT/retrieval.png: N queries with their top-10 gallery images")
    parser.add_argument("--visualize_tir", type=count, metavar="N",
                        help="write OUTPUT/restoration.png: N test captions with the tir head's restoration")
    args = parser.parse_args(argv)
    if getattr(args, "config_file", ""):
        args.config_file = str(run_config_file(args.config_file))
    zero_shot = vars(args).pop("zero_shot", False)
    save_features = vars(args).pop("save_features", False)
    visualize = vars(args).pop("visualize", 0)
    visualize_tir = vars(args).pop("visualize_tir", 0)
    cfg = resolve(args)
    if visualize_tir and (zero_shot or "tir" not in parse_loss_names(cfg.loss_names)):
        raise ConfigError("--visualize_tir needs a run trained with the tir head (its loss_names has no 'tir')")
    if zero_shot:
        if not cfg.output_dir:
            raise ConfigError("--zero_shot needs --output_dir")
        out_dir = Path(cfg.output_dir)
    else:
        if not getattr(args, "config_file", ""):
            raise ConfigError("give --config_file RUN_DIR/configs.yaml (or --zero_shot)")
        run_dir = Path(args.config_file).parent
        if not hasattr(cfg, "num_classes") or not getattr(cfg, "clip", None):
            raise ConfigError(f"{args.config_file} is not the configs.yaml of a trained run (train.py writes "
                              "num_classes and clip into it); give RUN_DIR/configs.yaml, or --zero_shot")
        if not (run_dir / "best.pth").is_file():
            raise ConfigError(f"no best.pth beside {args.config_file}: that run has not finished an evaluation yet")
        out_dir = Path(getattr(args, "output_dir", "") or run_dir)
    device = init_distributed(cfg.device)
    main_process = get_rank() == 0
    logger = setup_logger(out_dir if main_process else None, "test_log.txt", quiet=not main_process)
    dataset = build_dataset(cfg.dataset_name, cfg.root_dir, cfg.annotation_format)
    if cfg.caption_clean == "tbps":
        clean_dataset_captions(dataset, cfg.caption_max_words)
    img_loader, txt_loader = build_eval_loaders(cfg, dataset, SimpleTokenizer(), "test", get_rank(), get_world_size())
    if zero_shot:
        model = TBPSModel(build_encoder(cfg), {})
        source = {"checkpoint": cfg.pretrain_choice, "epoch": 0}
    else:
        model = build_model(cfg, cfg.num_classes, load_weights=False)
        source = {"checkpoint": str(run_dir / "best.pth"), "epoch": load_run_checkpoint(model, run_dir / "best.pth")}
    if main_process and (zero_shot or out_dir.resolve() != run_dir.resolve()):
        save_config(cfg, out_dir / "configs.yaml")  # the results elsewhere still describe themselves
    evaluation = Evaluator(img_loader, txt_loader, cfg.skip_bad_images, pair_batch=cfg.test_batch_size,
                           split="test").eval(model.to(device), device)
    results = {**evaluation.report(), **source}
    if not main_process:
        return results
    logger.info("test results (epoch %s of %s):\n%s", source["epoch"], source["checkpoint"],
                results_table(evaluation.results))
    write_json(results, out_dir / "test_results.json")
    if save_features:
        torch.save(evaluation.features(), out_dir / "features.pt")
        logger.info("features written to %s", out_dir / "features.pt")
    if visualize:
        write_visualization(dataset.test, evaluation, visualize, out_dir / "retrieval.png")
    if visualize_tir:
        write_restorations(model, cfg, dataset.test, visualize_tir, out_dir / "restoration.png", device)
    return results


def write_visualization(split, evaluation: Evaluation, num_queries: int, path: Path, top: int = 10) -> None:
    """``num_queries`` queries spread evenly over the test captions, with their first ``top``
    images in the final ranking (after re-ranking, when the model re-ranks)."""
    queries = torch.linspace(0, len(split.captions) - 1, min(num_queries, len(split.captions))).long().tolist()
    rankings = [evaluation.ranking(q, top) for q in queries]
    gallery = evaluation.image.index.tolist()  # gallery position -> dataset image
    grid = retrieval_grid([split.captions[evaluation.text.index[q]] for q in queries],
                          [int(evaluation.text.pids[q]) for q in queries],
                          [[split.img_paths[gallery[g]] for g in ranking] for ranking in rankings],
                          [[int(evaluation.image.pids[g]) for g in ranking] for ranking in rankings], top)
    grid.save(path)
    logging.getLogger("tbps").info("retrieval picture written to %s", path)


@torch.no_grad()
def write_restorations(model: TBPSModel, cfg, split, num_captions: int, path: Path, device: torch.device) -> None:
    """``num_captions`` test captions spread over the split, each with the first image of its
    identity: original, the masked grayscale input of the tir head, and its restoration."""
    head = model.heads["tir"]
    chosen = torch.linspace(0, len(split.captions) - 1, min(num_captions, len(split.captions))).long().tolist()
    captions = [split.captions[i] for i in chosen]
    paths = [split.img_paths[split.image_pids.index(split.caption_pids[i])] for i in chosen]
    transform = transforms_from_config(cfg, is_train=False)
    images = []
    for image_path in paths:
        image = read_image(image_path)
        if image is None:
            raise DatasetError(f"cannot read image {image_path}")
        images.append(transform(image))
    tokenizer = SimpleTokenizer()
    batch = {"images": torch.stack(images).to(device),
             "caption_ids": torch.stack([tokenize(c, tokenizer, cfg.text_length) for c in captions]).to(device)}
    torch.manual_seed(cfg.seed)  # the same masks every time
    model.eval()
    pred, ids_restore = head.restore(batch, model.encode(batch), model.encoder)
    patches = patchify(batch["images"].float(), head.patch)
    if head.norm_pix:  # predictions are per-patch standardised: use each patch's own statistics
        pred = pred * (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt() + patches.mean(dim=-1, keepdim=True)
    visible = unpatchify((ids_restore < head.keep - 1).unsqueeze(-1).expand_as(patches).float(),
                         head.grid, head.patch)  # 1 on the pixels of the patches the encoder saw
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in NORMALIZATION[cfg.normalization])
    original, restored = (x * std + mean for x in (batch["images"], unpatchify(pred, head.grid, head.patch)))
    seen = original
    if head.gray:  # one normalised luma value per pixel: shown as a neutral gray
        seen = (to_grayscale(batch["images"].float()) * std.mean() + mean.mean())
    restoration_grid(captions, original, seen * visible, restored).save(path)  # dropped patches black
    logging.getLogger("tbps").info("restoration picture written to %s", path)


if __name__ == "__main__":
    sys.exit(run_cli(main))

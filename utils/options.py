"""Configuration: defaults < YAML file (``--config_file``) < command-line flags.

Every key is also a flag of the same name (IRRA's names, e.g. ``--loss_names``, ``--MLM``). The
keys are ``Setting``s declared next to the code that reads them: the core options below, each
head's ``settings`` (``model/heads/``), the batch-field builders and caption augmentations
(``datasets/``). Unknown keys are an error that suggests the closest known key. A YAML file may
name another one to start from with ``_base_`` (a path relative to the file).
"""
from __future__ import annotations

import argparse
import copy
import difflib
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

import datasets.batch_mix  # noqa: F401  (declares the batch pair-augmentation settings)
import datasets.captions  # noqa: F401  (declares the caption augmentation settings)
import datasets.fields  # noqa: F401  (declares the batch-field settings)
import datasets.noise  # noqa: F401  (declares the noise-injection settings)
from model.heads import HEADS, parse_loss_names, with_required

from .errors import ConfigError
from .iotools import write_text
from .settings import PROBABILITY, Setting, declare, declared

S = Setting
CORE = (
    # run
    S("name", "baseline", "run name (the method column of tools/collect_results.py)"),
    S("output_dir", "", "the run directory itself; empty: logs/<dataset>/<time>_<name>"),
    S("log_period", 100, "log the running losses every this many steps", low=1),
    S("eval_period", 1, "evaluate every this many epochs (and after the last)", low=1),
    S("val_dataset", "test", "split that selects the epoch of best.pth: val (held out; test is evaluated only at "
      "the selected and the last epoch) or test (the published protocol)", choices=("test", "val")),
    S("val_ids_from_train", 0, "for datasets without a val split (ICFG-PEDES): move this many training identities "
      "into one (implies val_dataset val)", low=0),
    S("val_ids_seed", 0, "seed of the draw of val_ids_from_train (independent of seed)"),
    S("val_ids", [], "the training identities moved into val (written by train.py; given, they are used as is)",
      item=int),
    S("select_metric", "t2i.R1", "block.metric of the evaluation results that chooses best.pth "
      "(blocks: t2i, i2t, t2i_rerank, t2i_<feature set>; metrics: R1, R5, R10, mAP, mINP)"),
    S("resume", False, "continue from RUN_DIR/last.pth (output_dir is the run directory)"),
    S("resume_ckpt_file", "", "continue from this file instead"),
    S("overwrite", False, "start a new run in an output_dir that holds one, deleting that run's files"),
    S("init_from", "", "start training from another run of ours (RUN_DIR: its encoder and the heads it has; "
      "e.g. one made by tools/import_run.py), not from pretrain_choice"),
    S("seed", 1, "seeds Python, NumPy, torch and the data loader"),
    S("deterministic", False, "torch.use_deterministic_algorithms"),
    S("max_nonfinite_steps", 10, "consecutive non-finite losses that stop the run", low=1),
    S("max_unreadable_train", 0.01, "share of unreadable training images tolerated (their samples are replaced "
      "by others of the same identity); more stops the run before training", **PROBABILITY),
    S("skip_bad_images", False, "evaluation leaves unreadable gallery images out instead of stopping"),
    S("device", "auto", "auto (cuda if available), cpu, cuda, cuda:N"),
    S("amp", "off", "autocast precision; weights stay fp32 (fp16 adds a GradScaler)", choices=("off", "bf16", "fp16")),
    S("accum_steps", 1, "batches per optimizer step (contrastive heads see one batch each)", low=1),
    S("grad_checkpointing", False, "recompute encoder activations in backward (less memory)"),
    S("compile", False, "torch.compile the encoder towers"),
    # model
    S("pretrain_choice", "ViT-B/16", "OpenAI CLIP name or checkpoint path, open_clip:MODEL[:TAG], open_clip:PATH, "
      "hf:PATH (a Hugging Face CLIPModel folder), or 'none' (from scratch)"),
    S("clip_activation", "auto", "MLP activation of the loaded CLIP: auto (what its source says; exact GELU "
      "for a bare open_clip file), quick_gelu, gelu", choices=("auto", "quick_gelu", "gelu")),
    S("temperature", 0.02, "softmax temperature of the contrastive heads (logit scale 1/temperature)", above=0.0),
    S("img_size", [384, 128], "image height and width"),
    S("stride_size", 16, "patch stride of the ViT (equal to the patch size: no overlap)", low=1),
    S("text_length", 77, "caption tokens, SOT and EOT included", low=3),
    S("vocab_size", 49408, "text vocabulary size (from scratch)", low=1),
    S("embed_dim", 512, "joint embedding width (from scratch; else the checkpoint's)", low=1),
    S("vision_width", 768, "ViT width (from scratch)", low=1),
    S("vision_layers", 12, "ViT blocks (from scratch)", low=1),
    S("vision_patch_size", 16, "ViT patch size (from scratch)", low=1),
    S("text_width", 512, "text Transformer width (from scratch)", low=1),
    S("text_layers", 12, "text Transformer blocks (from scratch)", low=1),
    S("loss_names", "sdm+id+mlm", "training heads joined by '+' (see the README's heads table)"),
    S("text_attn_dropout", 0.0, "dropout on the text blocks' attention probabilities in training (TBPS-CLIP: "
      "0.05)", **PROBABILITY),
    S("freeze_patch_embed", False, "never train the ViT patch embedding visual.conv1 (TBPS-CLIP)"),
    # evaluation
    S("rerank_k", 128, "first-stage candidates per query that a re-ranking head re-scores", low=1),
    # data
    S("dataset_name", "CUHK-PEDES", "benchmark: CUHK-PEDES, ICFG-PEDES, RSTPReid, UFine6926"),
    S("annotation_format", "raw", "raw: the benchmark's published annotation file; tbps: TBPS-CLIP's "
      "train_reid.json + test_reid.json (optional captions_bt, no val split)", choices=("raw", "tbps")),
    S("root_dir", "./data", "folder holding the benchmark folders"),
    S("sampler", "random", "random; identity (P x K); idrannum (SEN: 1..K per identity)",
      choices=("random", "identity", "idrannum")),
    S("num_instance", 4, "K: captions per identity of the identity samplers", low=1),
    S("batch_size", 128, "global training batch (all processes together)", low=1),
    S("test_batch_size", 512, "evaluation batch (images, captions, or re-ranked pairs)", low=1),
    S("num_workers", 8, "data loader worker processes", low=0),
    S("img_aug", False, "pad + random crop + random erasing on training images"),
    S("drop_last", False, "leave out the last incomplete training batch (random and distributed samplers)"),
    S("image_cache", False, "decode + resize images once into a memory-mapped uint8 file per split"),
    S("cache_dir", "", "where the image cache lives (default <root_dir>/<dataset>/.cache)"),
    S("erase_value", "zero", "RandomErasing fill: 'zero' or 'clip_mean' (IRRA: mean after Normalize)",
      choices=("zero", "clip_mean")),
    # solver
    S("optimizer", "Adam", "optimizer", choices=("Adam", "AdamW", "SGD")),
    S("lr", 1e-5, "base learning rate", above=0.0),
    S("bias_lr_factor", 2.0, "lr factor of biases", low=0.0),
    S("lr_factor", 5.0, "lr factor of new cross-modal modules and classifiers", low=0.0),
    S("momentum", 0.9, "SGD momentum", low=0.0),
    S("weight_decay", 4e-5, "weight decay of weights", low=0.0),
    S("weight_decay_bias", 0.0, "weight decay of biases", low=0.0),
    S("alpha", 0.9, "Adam beta1", **PROBABILITY),
    S("beta", 0.999, "Adam beta2", **PROBABILITY),
    S("optimizer_eps", 1e-3, "Adam eps (IRRA hard-codes 1e-3)", low=0.0),
    S("num_epoch", 60, "training epochs", low=1),
    S("lrscheduler", "cosine", "lr schedule after warm-up", choices=("cosine", "step")),
    S("milestones", [20, 50], "epochs of the step schedule's decays"),
    S("gamma", 0.1, "decay factor of the step schedule", low=0.0),
    S("warmup_factor", 0.1, "lr factor at the start of warm-up", low=0.0),
    S("warmup_epochs", 5, "warm-up epochs", low=0),
    S("warmup_method", "linear", "warm-up shape", choices=("linear", "constant")),
    S("target_lr", 0.0, "final lr of the cosine schedule", low=0.0),
    S("lr_schedule_unit", "epoch", "epoch: the lr changes after each epoch (IRRA); iteration: after every "
      "optimizer step, warm-up over warmup_epochs x steps from warmup_factor x lr to lr, both ends included "
      "(TBPS-CLIP)", choices=("epoch", "iteration")),
    S("no_decay_1d", False, "every parameter with fewer than 2 dimensions (LayerNorm weights, class "
      "embedding, logit scale, biases) gets weight_decay_bias and lr x bias_lr_factor (TBPS-CLIP)"),
)
declare("core", CORE)

# Keys written by the program into a run's configs.yaml, accepted when it is read back.
RUN_KEYS = ("num_classes", "clip", "training")
METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def all_settings() -> dict[str, Setting]:
    """Every declared key: core, caption augmentations, batch fields and every registered head."""
    return {s.key: s for group in declared().values() for s in group}


def defaults() -> dict[str, Any]:
    return {key: copy.deepcopy(s.default) for key, s in all_settings().items()}


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, list(all_settings()), n=1)
    return f"; did you mean '{match[0]}'?" if match else ""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config (following ``_base_``), checking every key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    settings = all_settings()
    merged: dict[str, Any] = {}
    base = data.pop("_base_", None)
    if base:
        merged.update(load_yaml(path.parent / base))
    for key, value in data.items():
        if key in RUN_KEYS:
            merged[key] = value
        elif key not in settings:
            raise ConfigError(f"unknown config key '{key}' in {path}{_closest(key)}")
        else:
            merged[key] = settings[key].coerce(value)
    return merged


class ConfigParser(argparse.ArgumentParser):
    """argparse without abbreviated flags (``--batch`` is not ``--batch_size``); a bad command line is
    a ConfigError: one line, the closest key suggested for an unknown flag."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flag = unknown.group(1)
            match = difflib.get_close_matches(flag.lstrip("-").split("=")[0], list(all_settings()), n=1)
            raise ConfigError(f"unknown flag {flag}" + (f"; did you mean --{match[0]}?" if match else ""))
        raise ConfigError(message)


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = ConfigParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config_file", default="", help="YAML config (a run's configs.yaml works too)")
    for owner, group in declared().items():
        section = parser.add_argument_group(owner)
        for s in group:
            if isinstance(s.default, bool):
                section.add_argument(f"--{s.key}", action=argparse.BooleanOptionalAction, help=s.describe())
            elif isinstance(s.default, list):
                section.add_argument(f"--{s.key}", nargs="*", type=s.item_type, help=s.describe())
            else:
                section.add_argument(f"--{s.key}", type=type(s.default), choices=s.choices, help=s.describe())
    return parser


def parse_select_metric(value: str) -> tuple[str, str]:
    """'t2i.R1' -> ('t2i', 'R1'); the metric must be one the evaluation reports."""
    block, _, metric = value.rpartition(".")
    if not block or metric not in METRICS:
        raise ConfigError(f"select_metric '{value}' must be <block>.<metric> with metric one of "
                          f"{', '.join(METRICS)} (e.g. t2i.R1, t2i_rerank.R1)")
    return block, metric


def check_select_metric(value: str, blocks: list[str]) -> None:
    """The block named by ``select_metric`` is one the model's evaluation reports."""
    block, _ = parse_select_metric(value)
    if block not in blocks:
        raise ConfigError(f"select_metric '{value}': this model's evaluation reports the blocks "
                          f"{', '.join(blocks)}, not '{block}'")


def check_batch_fields(loss_names: str) -> None:
    """Every batch field a chosen head needs has a builder (else a ConfigError naming the head)."""
    from datasets.fields import FIELD_BUILDERS
    for name in with_required(parse_loss_names(loss_names)):
        head = HEADS[name]
        for key in head.text_fields:
            if key not in head.batch_fields:
                raise ConfigError(f"head '{name}' encodes the text field '{key}' without asking for it in batch_fields")
        for key in head.batch_fields:
            if key not in FIELD_BUILDERS:
                raise ConfigError(f"head '{name}' needs the batch field '{key}', which no field builder "
                                  f"provides; known fields: {', '.join(sorted(FIELD_BUILDERS))}")


def resolve(args: argparse.Namespace) -> SimpleNamespace:
    """Merge defaults, the YAML file and the flags given on the command line."""
    settings = all_settings()
    values = defaults()
    flags = vars(args).copy()
    config_file = flags.pop("config_file", "")
    if config_file:
        values.update(load_yaml(config_file))
    values.update({k: settings[k].coerce(v) if k in settings else v for k, v in flags.items()})
    if len(values["img_size"]) != 2:
        raise ConfigError(f"img_size needs two values (height width), got {values['img_size']}")
    parse_select_metric(values["select_metric"])
    check_batch_fields(values["loss_names"])
    return SimpleNamespace(**values)


def save_config(cfg: SimpleNamespace, path: str | Path) -> None:
    """The resolved config as YAML, written atomically (never a half-written file)."""
    write_text(yaml.safe_dump(vars(cfg), sort_keys=True), path)

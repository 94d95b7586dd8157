"""Configuration: defaults < YAML file (``--config_file``) < command-line flags.

Every key is also a flag of the same name (IRRA's names, e.g. ``--loss_names``, ``--MLM``).
Unknown YAML keys are an error that suggests the closest known key. A YAML file may name
another one to start from with ``_base_`` (a path relative to the file).
"""
from __future__ import annotations

import argparse
import copy
import difflib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from .errors import ConfigError

DEFAULTS: dict[str, Any] = {
    # run
    "name": "baseline",
    "output_dir": "",          # the run directory itself; empty: logs/<dataset>/<time>_<name>
    "log_period": 100,
    "eval_period": 1,
    "val_dataset": "test",     # split used for per-epoch evaluation and model selection
    "resume": False,           # continue from RUN_DIR/last.pth (output_dir is the run directory)
    "resume_ckpt_file": "",    # continue from this file instead
    "seed": 1,
    "deterministic": False,    # torch.use_deterministic_algorithms
    "max_nonfinite_steps": 10, # consecutive non-finite losses that stop the run
    "skip_bad_images": False,  # evaluation leaves unreadable gallery images out instead of stopping
    "device": "auto",          # auto (cuda if available), cpu, cuda, cuda:N
    "amp": "off",              # autocast: off, bf16, fp16 (with a GradScaler); weights stay fp32
    "accum_steps": 1,          # batches per optimizer step (contrastive heads see one batch each)
    "grad_checkpointing": False,  # recompute encoder activations in backward (less memory)
    "compile": False,          # torch.compile the encoder towers
    # model
    "pretrain_choice": "ViT-B/16",  # OpenAI name, checkpoint path, or 'none' (from scratch)
    "temperature": 0.02,
    "img_size": [384, 128],
    "stride_size": 16,
    "text_length": 77,
    "vocab_size": 49408,
    # architecture when pretrain_choice is 'none' (from the checkpoint's shapes otherwise)
    "embed_dim": 512,
    "vision_width": 768,
    "vision_layers": 12,
    "vision_patch_size": 16,
    "text_width": 512,
    "text_layers": 12,
    # heads
    "loss_names": "sdm+id+mlm",
    "sdm_loss_weight": 1.0,
    "itc_loss_weight": 1.0,
    "cmpm_loss_weight": 1.0,
    "id_loss_weight": 1.0,
    "mlm_loss_weight": 1.0,
    "cmt_depth": 4,            # IRRA's cross-modal transformer depth (MLM head)
    "cmt_loss_weight": 10.0,   # UIT's cross-modal triplet loss (SEN's run_SEN.sh)
    "cmt_margin": 0.05,
    # UIT's text-guided image restoration head (tir); defaults are SEN's released recipe
    "tir_loss_weight": 10.0,
    "tir_mask_ratio": 0.7,     # encoder keeps int((1 + patches) * (1 - ratio)) tokens, CLS included
    "tir_depth": 4,            # decoder self-attention blocks
    "tir_gray": True,          # the masked pass sees the grayscale image (the target stays colour)
    "tir_norm_pix": False,     # normalise each target patch (MAE's norm_pix_loss; SEN: off)
    "tir_mask_exact": False,   # supervise every dropped patch (SEN leaves one out: off-by-one quirk)
    "tir_residual": False,     # residual around the text cross-attention (SEN: none)
    "tir_text_pad_mask": False,  # cross-attention ignores text padding after EOT (SEN: attends to it)
    # data
    "dataset_name": "CUHK-PEDES",
    "root_dir": "./data",
    "sampler": "random",       # random, identity (P x K), idrannum (SEN: 1..K per identity)
    "num_instance": 4,
    "batch_size": 128,
    "test_batch_size": 512,
    "num_workers": 8,
    "img_aug": False,
    "image_cache": False,     # decode + resize images once into a memory-mapped uint8 file per split
    "cache_dir": "",          # where (default <root_dir>/<dataset>/.cache)
    "erase_value": "zero",    # RandomErasing fill: 'zero' or 'clip_mean' (IRRA: mean after Normalize)
    "MLM": False,             # build masked captions even if no head asks for them
    "mlm_prob": 0.15,                     # share of content tokens selected for MLM
    "masked_token_rate": 0.8,             # selected tokens replaced by <|mask|>
    "masked_token_unchanged_rate": 0.1,   # selected tokens left unchanged (the rest: random id)
    "global_sees_masked_caption": False,  # IRRA's aliasing: SDM/ID see the masked caption
    "text_prune_prob": 0.0,               # UIT: caption pruned to key words with this probability
    "text_prune_mode": "pos_approx",      # offline stand-in for SEN's POS filter, or attribute_only
    "text_mask_corruption": False,        # SEN's in-place MLM corruption of the training caption
    "corruption_key_prob": 0.3,           # its selection rate for key-word (noun/adjective) pieces
    "corruption_other_prob": 0.05,        # ... and for every other piece
    # solver
    "optimizer": "Adam",
    "lr": 1e-5,
    "bias_lr_factor": 2.0,
    "lr_factor": 5.0,
    "momentum": 0.9,
    "weight_decay": 4e-5,
    "weight_decay_bias": 0.0,
    "alpha": 0.9,
    "beta": 0.999,
    "optimizer_eps": 1e-3,    # IRRA hard-codes Adam eps 1e-3
    "num_epoch": 60,
    "lrscheduler": "cosine",
    "milestones": [20, 50],
    "gamma": 0.1,
    "warmup_factor": 0.1,
    "warmup_epochs": 5,
    "warmup_method": "linear",
    "target_lr": 0.0,
}

CHOICES = {
    "sampler": ("random", "identity", "idrannum"),
    "text_prune_mode": ("pos_approx", "attribute_only"),
    "optimizer": ("Adam", "AdamW", "SGD"),
    "lrscheduler": ("cosine", "step"),
    "warmup_method": ("linear", "constant"),
    "erase_value": ("zero", "clip_mean"),
    "val_dataset": ("test", "val"),
    "amp": ("off", "bf16", "fp16"),
}
PROBABILITIES = ("mlm_prob", "masked_token_rate", "masked_token_unchanged_rate", "text_prune_prob",
                 "corruption_key_prob", "corruption_other_prob", "tir_mask_ratio")
# Keys written by the program into a run's configs.yaml, accepted when it is read back.
RUN_KEYS = ("num_classes", "clip", "training")


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, list(DEFAULTS), n=1)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(key: str, value: Any) -> Any:
    default = DEFAULTS[key]
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
        elif isinstance(default, int):
            if isinstance(value, bool) or float(value) != int(value):
                raise TypeError
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        elif isinstance(default, list):
            value = [type(default[0])(v) for v in value]
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' expects {type(default).__name__}, got {value!r}") from None
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' is '{value}'; valid: {', '.join(CHOICES[key])}")
    return value


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
    merged: dict[str, Any] = {}
    base = data.pop("_base_", None)
    if base:
        merged.update(load_yaml(path.parent / base))
    for key, value in data.items():
        if key in RUN_KEYS:
            merged[key] = value
        elif key not in DEFAULTS:
            raise ConfigError(f"unknown config key '{key}' in {path}{_closest(key)}")
        else:
            merged[key] = _coerce(key, value)
    return merged


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config_file", default="", help="YAML config (a run's configs.yaml works too)")
    for key, default in DEFAULTS.items():
        if isinstance(default, bool):
            parser.add_argument(f"--{key}", action=argparse.BooleanOptionalAction)
        elif isinstance(default, list):
            parser.add_argument(f"--{key}", nargs="+", type=type(default[0]))
        else:
            parser.add_argument(f"--{key}", type=type(default), choices=CHOICES.get(key))
    return parser


def resolve(args: argparse.Namespace) -> SimpleNamespace:
    """Merge defaults, the YAML file and the flags given on the command line."""
    values = copy.deepcopy(DEFAULTS)
    flags = vars(args).copy()
    config_file = flags.pop("config_file", "")
    if config_file:
        values.update(load_yaml(config_file))
    values.update({k: _coerce(k, v) if k in DEFAULTS else v for k, v in flags.items()})
    if values["accum_steps"] < 1:
        raise ConfigError(f"accum_steps must be at least 1, got {values['accum_steps']}")
    if len(values["img_size"]) != 2:
        raise ConfigError(f"img_size needs two values (height width), got {values['img_size']}")
    for key in PROBABILITIES:
        if not 0.0 <= values[key] <= 1.0:
            raise ConfigError(f"{key} is a probability (0 to 1), got {values[key]}")
    return SimpleNamespace(**values)


def save_config(cfg: SimpleNamespace, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(vars(cfg), f, sort_keys=True)

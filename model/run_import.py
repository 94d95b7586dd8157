"""Runs trained with IRRA's, SEN's, RDE's or TBPS-CLIP's code, turned into runs of ours.

A run directory of those codebases holds ``configs.yaml`` (``yaml.dump(vars(args))``) and
``best.pth`` (``{"model": state_dict, "optimizer", "scheduler", ...}``, IRRA's Checkpointer, fp16
where IRRA's ``convert_weights`` cast). Every tensor of the model goes through an explicit map:
``base_model.`` to our encoder, their head modules to our heads of the same design; modules we do
not have (SEN's ``fuse`` head) and modules that the code builds but never uses (SEN's
``cross_attn_TextImage``, RDE's ``linear`` of the image side, ...) are listed and left out; any
other tensor, or a shape that does not fit, stops the import with its name.

Key maps: IRRA anosorae/IRRA @ cfc2378 (model/build.py), SEN Delong-liu-bupt/SEN (model/build.py),
RDE QinYang79/RDE @ b3fd396 (model/build.py, model/CrossEmbeddingLayer_tse.py), TBPS-CLIP
Flame-Chasers/TBPS-CLIP @ ba090bc (model/tbps_model.py; its ``checkpoint_best.pth`` holds
``{"model": ...}`` and no run config: ours comes from configs/tbps_clip/, full or simplified by
whether the SimCLR MLP is there).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from utils.errors import UserError
from utils.iotools import read_torch_file
from utils.options import build_parser, resolve

from .build import build_model
from .clip_loading import CheckpointError, infer_config, load_strict

SOURCES = ("irra", "sen", "rde", "tbps")
TBPS_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tbps_clip"


class RunImportError(UserError):
    """A run of another codebase that cannot be imported as it is."""


Rule = tuple[str, str]  # (regex over their key, our key template with \\1.. groups); "" drops the key


@dataclass(frozen=True)
class SourceFormat:
    rules: tuple[Rule, ...]                     # first match wins
    dropped: dict[str, str]                     # their key prefix -> why it is left out
    loss_map: dict[str, str]                    # their loss token -> our head ("" = we lack it)
    config_map: dict[str, str] = field(default_factory=dict)  # their option -> our setting
    handled: frozenset[str] = frozenset()       # their options read by the source's own rules below


_ENCODER: Rule = (r"base_model\.(.+)", r"encoder.\1")
_ID: Rule = (r"classifier\.(weight|bias)", r"heads.id.classifier.\1")
_IRRA_MLM = (r"(cross_attn|cross_modal_transformer|ln_pre_t|ln_pre_i|ln_post|mlm_head)\.(.+)", r"heads.mlm.\1.\2")
_SEN_MLM = (r"cross_attn_mlm\.(.+)", r"heads.mlm.cross_attn.\1"), \
    (r"cross_modal_transformer_mlm\.(.+)", r"heads.mlm.cross_modal_transformer.\1"), \
    (r"(ln_pre_t|ln_pre_i|ln_post|mlm_head)\.(.+)", r"heads.mlm.\1.\2")
_SEN_TIR = (r"(decoder_embed|decoder_pred|norm_1|norm_2|norm_4|norm_6|norm_7)\.(.+)", r"heads.tir.\1.\2"), \
    (r"mask_token", "heads.tir.mask_token"), \
    (r"cross_attn_Text\.(.+)", r"heads.tir.cross_attn.\1"), \
    (r"cross_modal_transformer_mae\.(.+)", r"heads.tir.decoder.\1")
_RDE_TSE = tuple((rf"{theirs}\.{src}", rf"heads.tse.{ours}.{dst}")
                 for theirs, ours, fc in (("visul_emb_layer", "image", "fc"), ("texual_emb_layer", "text", "linear"))
                 for src, dst in ((rf"{fc}\.(weight|bias)", r"fc.\1"), (r"mlp\.layers\.0\.(.+)", r"mlp.0.\1"),
                                  (r"mlp\.bns\.0\.(.+)", r"mlp.1.\1"), (r"mlp\.layers\.1\.(.+)", r"mlp.3.\1")))

FORMATS = {
    "irra": SourceFormat((_ENCODER, _ID, _IRRA_MLM), {},
                         {"itc": "itc", "sdm": "sdm", "cmpm": "cmpm", "id": "id", "mlm": "mlm"}),
    "sen": SourceFormat(
        (_ENCODER, _ID, *_SEN_MLM, *_SEN_TIR),
        {"decoder_pos_embed": "SEN's fixed sin-cos table; ours is computed, not stored",
         "cross_attn_TextImage.": "built by SEN but never used", "cross_attn_Image.": "built by SEN but never used",
         "norm_3.": "built by SEN but never used", "norm_5.": "built by SEN but never used",
         "fuse_head.": "SEN's fuse head: not implemented here", "norm_image.": "SEN's fuse head: not implemented here",
         "norm_text.": "SEN's fuse head: not implemented here"},
        {"itc": "itc", "sdm": "sdm", "cmpm": "cmpm", "id": "id", "mlm": "mlm", "mae": "tir", "tri": "cmt", "fuse": ""},
        {"mae_loss_weight": "tir_loss_weight", "tri_loss_weight": "cmt_loss_weight", "mask_ratio": "tir_mask_ratio"},
        frozenset({"need_MAE"})),  # implied by 'mae' in loss_names
    "rde": SourceFormat(
        (_ENCODER, _ID, *_RDE_TSE),
        {"visul_emb_layer.linear.": "built by RDE but never used", "visul_emb_layer.mlp.bns.1.":
         "built by RDE but never used", "texual_emb_layer.mlp.bns.1.": "built by RDE but never used"},
        {}, {"select_ratio": "tse_ratio"}, frozenset({"tau", "margin", "txt_aug", "noisy_file"})),
    "tbps": SourceFormat(
        ((r"visual\.(.+)", r"encoder.visual.\1"), (r"encode_text\.(.+)", r"encoder.\1"),
         (r"logit_scale", "heads.logit_scale.theta"), (r"simclr_mlp\.0\.(weight|bias)", r"heads.ssi.mlp.fc1.\1"),
         (r"simclr_mlp\.2\.(weight|bias)", r"heads.ssi.mlp.fc2.\1")),
        {prefix: "TBPS-CLIP's MLM variant (off in its recipes, crashing when on) is not ported"
         for prefix in ("cross_attn.", "cross_modal_transformer.", "ln_pre_t.", "ln_pre_i.", "ln_post.", "mlm_head.")}
        | {"classifier.": "TBPS-CLIP's ID variant (off in its recipes, crashing when on) is not ported"},
        {}),
}
# Options of theirs that describe their process, not the run.
_NOT_CARRIED = {"local_rank", "output_dir", "resume", "resume_ckpt_file", "training", "distributed", "loss_names",
                "pretrain_choice"}


@dataclass
class ImportReport:
    source: str
    loss_names: str
    mapped: int                                     # tensors carried over
    dropped: dict[str, str]                         # their key -> why it is left out
    unused_options: list[str]                       # their options with no counterpart here
    notes: list[str] = field(default_factory=list)


def import_run(source: str, src_dir: Path, out_dir: Path, dataset_name: str = "CUHK-PEDES"
               ) -> tuple[SimpleNamespace, dict[str, torch.Tensor], ImportReport]:
    """(our config, our state dict, report) of the run in ``src_dir`` written by ``source``'s code
    (``dataset_name``: for TBPS-CLIP, whose checkpoints do not say)."""
    if source not in FORMATS:
        raise RunImportError(f"unknown source '{source}'; known: {', '.join(SOURCES)}")
    if source == "tbps":
        return import_tbps_checkpoint(src_dir, out_dir, dataset_name)
    theirs = read_their_config(src_dir / "configs.yaml")
    state = read_their_weights(src_dir / "best.pth")
    fmt = FORMATS[source]
    mapped, dropped = map_keys(state, fmt)
    notes: list[str] = []
    loss_names = _loss_names(source, fmt, theirs, notes)
    cfg, unused = _our_config(source, fmt, theirs, loss_names, mapped, out_dir)
    model = build_model(cfg, cfg.num_classes, load_weights=False)
    try:
        load_strict(model, mapped, src_dir / "best.pth")
    except CheckpointError as err:
        raise RunImportError(f"{source} run {src_dir}: {err}") from None
    if source == "rde":
        bn = mapped.get("heads.tse.image.mlp.1.num_batches_tracked")
        cfg.tse_bn_frozen = bn is not None and int(bn) == 0  # RDE's published runs froze them (its issue #8)
        notes.append(f"tse_bn_frozen {cfg.tse_bn_frozen}: the TSE BatchNorms tracked {int(bn or 0)} batches")
    return cfg, model.state_dict(), ImportReport(source, loss_names, len(mapped), dropped, unused, notes)


def import_tbps_checkpoint(src: Path, out_dir: Path, dataset_name: str
                           ) -> tuple[SimpleNamespace, dict[str, torch.Tensor], ImportReport]:
    """A TBPS-CLIP ``checkpoint_best.pth`` (or the folder holding it) as a run of our TBPS-CLIP config."""
    path = src / "checkpoint_best.pth" if src.is_dir() else src
    mapped, dropped = map_keys(read_their_weights(path), FORMATS["tbps"])
    full = "heads.ssi.mlp.fc1.weight" in mapped
    recipe = TBPS_CONFIGS / ("base.yaml" if full else "simplified.yaml")
    cfg = resolve(build_parser("").parse_args(["--config_file", str(recipe), "--dataset_name", dataset_name]))
    cfg.name, cfg.output_dir, cfg.num_classes = f"{cfg.name}_imported", str(out_dir), 0
    encoder = {k[len("encoder."):]: v for k, v in mapped.items() if k.startswith("encoder.")}
    try:
        clip = infer_config(encoder, tuple(cfg.img_size), cfg.stride_size)
    except CheckpointError as err:
        raise RunImportError(f"tbps checkpoint {path}: {err}") from None
    cfg.clip, cfg.text_length, cfg.vocab_size = clip.to_dict(), clip.context_length, clip.vocab_size
    if full:
        cfg.ssi_hidden = int(mapped["heads.ssi.mlp.fc1.weight"].shape[0])
    if "heads.logit_scale.theta" not in mapped:
        raise RunImportError(f"{path} holds no logit_scale: not a TBPS-CLIP checkpoint")
    model = build_model(cfg, 0, load_weights=False)
    try:
        load_strict(model, mapped, path)
    except CheckpointError as err:
        raise RunImportError(f"tbps checkpoint {path}: {err}") from None
    notes = [f"{'full' if full else 'simplified'} recipe ({recipe.name}: the SimCLR MLP is "
             f"{'there' if full else 'absent'}); logit scale {float(mapped['heads.logit_scale.theta'].exp()):.2f}"]
    return cfg, model.state_dict(), ImportReport("tbps", cfg.loss_names, len(mapped), dropped, [], notes)


def read_their_config(path: Path) -> dict:
    """``yaml.dump(vars(args))`` of argparse options; tuples are tagged ``!!python/tuple``."""
    if not path.is_file():
        raise RunImportError(f"no configs.yaml in {path.parent} (a run directory of that code holds one)")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: list(loader.construct_sequence(node)))
    try:
        config = yaml.load(path.read_text(), Loader=Loader)
    except yaml.YAMLError as err:
        raise RunImportError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict) or "loss_names" not in config:
        raise RunImportError(f"{path} is not a run config of that code (no loss_names)")
    return config


def read_their_weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = read_torch_file(path, "checkpoint", RunImportError)
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise RunImportError(f"{path} has no 'model' state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def map_keys(state: dict[str, torch.Tensor], fmt: SourceFormat) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our name for every tensor (fp32 for floating point), and the ones left out with the reason."""
    mapped: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    for key, value in state.items():
        reason = next((why for prefix, why in fmt.dropped.items() if key.startswith(prefix)), None)
        if key in ("base_model.logit_scale", "logit_scale") and not any(re.fullmatch(p, key) for p, _ in fmt.rules):
            reason = "the logit scale is a setting here (temperature)"
        if reason is not None:
            dropped[key] = reason
            continue
        for pattern, template in fmt.rules:
            if match := re.fullmatch(pattern, key):
                mapped[match.expand(template)] = value.float() if value.is_floating_point() else value
                break
        else:
            raise RunImportError(f"tensor {key} {tuple(value.shape)} has no counterpart in our model")
    return mapped, dropped


def _loss_names(source: str, fmt: SourceFormat, theirs: dict, notes: list[str]) -> str:
    their_names = str(theirs["loss_names"])
    if source == "rde":  # RDE picks its loss by substring (model/build.py); the rest of the string is a label
        kind = "trl" if "TRL" in their_names and "TAL" not in their_names else "tal"
        if not any(k in their_names for k in ("TAL", "TRL")):
            notes.append(f"RDE loss '{their_names}' (InfoNCE/SDM) is not offered here: tal for fine-tuning")
        return f"{kind}+tse"
    heads = []
    for token in (t.strip() for t in their_names.split("+") if t.strip()):
        if token not in fmt.loss_map:
            raise RunImportError(f"{source} loss '{token}' (loss_names '{their_names}') is unknown to the importer")
        if fmt.loss_map[token]:
            heads.append(fmt.loss_map[token])
        else:
            notes.append(f"{source} head '{token}' is not implemented here: its weights are left out")
    return "+".join(heads)


def _our_config(source: str, fmt: SourceFormat, theirs: dict, loss_names: str, mapped: dict[str, torch.Tensor],
                out_dir: Path) -> tuple[SimpleNamespace, list[str]]:
    cfg = resolve(build_parser("").parse_args([]))
    known, unused = vars(cfg), []
    for key, value in theirs.items():
        ours = fmt.config_map.get(key, key)
        if key in _NOT_CARRIED or key in fmt.handled:
            continue
        if ours not in known:
            unused.append(key)
            continue
        setattr(cfg, ours, _cast(value, known[ours]))
    if source == "rde":
        cfg.tal_tau = cfg.trl_tau = float(theirs.get("tau", cfg.tal_tau))
        cfg.tal_margin = cfg.trl_margin = float(theirs.get("margin", cfg.tal_margin))
        cfg.tse_loss = loss_names.split("+")[0]
        cfg.txt_aug_prob = 0.2 if theirs.get("txt_aug") else 0.0
    cfg.loss_names, cfg.MLM = loss_names, "mlm" in loss_names.split("+")
    cfg.global_sees_masked_caption = cfg.MLM  # IRRA and SEN let the global losses see the masked caption
    cfg.name, cfg.output_dir = f"{theirs.get('name', source)}_{source}", str(out_dir)
    cfg.pretrain_choice = str(theirs.get("pretrain_choice", "ViT-B/16"))
    encoder = {k[len("encoder."):]: v for k, v in mapped.items() if k.startswith("encoder.")}
    try:
        clip = infer_config(encoder, tuple(cfg.img_size), cfg.stride_size)
    except CheckpointError as err:
        raise RunImportError(f"{source} run: {err}") from None
    cfg.clip = clip.to_dict()
    cfg.text_length, cfg.vocab_size = clip.context_length, clip.vocab_size
    cfg.num_classes = int(mapped["heads.id.classifier.weight"].shape[0]) if "heads.id.classifier.weight" in mapped \
        else int(theirs.get("num_classes", 0) or 0)
    cfg.cmt_depth = _blocks(mapped, "heads.mlm.cross_modal_transformer.") or cfg.cmt_depth
    cfg.tir_depth = _blocks(mapped, "heads.tir.decoder.") or cfg.tir_depth
    if "heads.tse.image.fc.weight" in mapped:
        cfg.tse_embed_dim = int(mapped["heads.tse.image.fc.weight"].shape[0])
    return cfg, sorted(unused)


def _blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[1] for k in state if k.startswith(prefix + "resblocks.")})


def _cast(value, default):
    """Their option value in the type of our setting (argparse left some as strings)."""
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if isinstance(default, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, (list, tuple)):
        return list(value)
    return value

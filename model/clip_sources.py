"""CLIP weights from open_clip and Hugging Face, as OpenAI-named state dicts for ``clip_loading``.

- ``open_clip:MODEL[:TAG]``: open_clip's own download of a pretrained tag (the first listed for
  MODEL when TAG is left out), ``open_clip:PATH``: a checkpoint file open_clip wrote. open_clip's
  ViT state dicts already use OpenAI's names. Its configs say whether the model uses QuickGELU; a
  bare file does not, so it is taken as open_clip's default for ViT-B-16 / ViT-L-14 (exact GELU)
  unless ``clip_activation`` says otherwise.
- ``hf:PATH``: a ``transformers`` ``CLIPModel`` directory (``config.json`` and
  ``model.safetensors`` or ``pytorch_model.bin``); its names are mapped to OpenAI's and its
  q/k/v projections packed into ``in_proj_*``, its activation and head counts read from the config.

Only ViT CLIPs of OpenAI's layout are accepted (pre-LN blocks, CLS pooling, projection without
bias); anything else is reported by the first key or setting that does not fit.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .clip_loading import CheckpointError, ClipWeights, openai_weights, read_state_dict

OPEN_CLIP = "open_clip:"
HF = "hf:"


def clip_weights(choice: str) -> ClipWeights:
    """The weights ``pretrain_choice`` names: ``open_clip:...``, ``hf:PATH``, or OpenAI's name or file."""
    if choice.startswith(OPEN_CLIP):
        return read_open_clip(choice[len(OPEN_CLIP):])
    if choice.startswith(HF):
        return read_hf_clip(choice[len(HF):])
    return openai_weights(choice)


# ---------------------------------------------------------------- open_clip
def read_open_clip(spec: str) -> ClipWeights:
    """``MODEL[:TAG]`` (downloaded through open_clip) or a checkpoint ``PATH``."""
    if Path(spec).is_file():
        return ClipWeights(read_state_dict(spec), spec)
    name, _, tag = spec.partition(":")
    try:
        import open_clip
    except ImportError:
        raise CheckpointError(f"'{OPEN_CLIP}{spec}' needs open_clip (pip install open_clip_torch), or give a "
                              "checkpoint file: open_clip:PATH") from None
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise CheckpointError(f"{spec} is neither a file nor an open_clip model name (e.g. ViT-B-16, ViT-L-14)")
    _check_open_clip_layout(name, model_cfg)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags:
        raise CheckpointError(f"open_clip has no pretrained weights for {name}")
    tag = tag or tags[0]
    if tag not in tags:
        raise CheckpointError(f"open_clip has no tag '{tag}' for {name}; it has {', '.join(tags)}")
    pretrained = open_clip.get_pretrained_cfg(name, tag)
    try:
        path = open_clip.download_pretrained(pretrained)
    except Exception as err:  # network errors come from several libraries
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot download open_clip {name} ({tag}): {reason}; offline? download it "
                              f"elsewhere and pass --pretrain_choice {OPEN_CLIP}PATH") from None
    if not path:
        raise CheckpointError(f"open_clip gives no download for {name} ({tag})")
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    return ClipWeights(read_state_dict(path), f"open_clip {name} ({tag}, {path})",
                       bool(model_cfg.get("quick_gelu") or pretrained.get("quick_gelu")),
                       vision["width"] // vision.get("head_width", 64), text.get("heads", 8))


# What open_clip configs may say and still describe OpenAI's layout (setting: its OpenAI-layout value).
_OPEN_CLIP_LAYOUT = {
    "model": {"custom_text": False, "multimodal_cfg": None},
    "vision_cfg": {"timm_model_name": None, "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                   "final_ln_after_pool": False, "pool_type": "tok", "mlp_ratio": 4.0, "pos_embed_type": "learnable"},
    "text_cfg": {"hf_model_name": None, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
                 "pool_type": "argmax", "proj_bias": False, "mlp_ratio": 4.0, "vocab_size": 49408},
}


def _check_open_clip_layout(name: str, model_cfg: dict) -> None:
    for section, expected in _OPEN_CLIP_LAYOUT.items():
        values = model_cfg if section == "model" else model_cfg[section]
        for key, value in expected.items():
            if values.get(key, value) != value:
                raise CheckpointError(f"open_clip {name} has {key} = {values[key]!r}: not OpenAI's CLIP layout, "
                                      "which is the only one our encoder implements")


# ---------------------------------------------------------------- Hugging Face transformers
_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
_HF_TOP = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_HF_IGNORED = ("logit_scale", "vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
_HF_LAYER = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}


def read_hf_clip(path: str) -> ClipWeights:
    """A ``CLIPModel`` directory saved by ``transformers`` (``save_pretrained``)."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{HF}{path}: no config.json (expected a Hugging Face CLIPModel directory)")
    config = json.loads(config_file.read_text())
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    activation = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(activation) != 1 or not activation <= set(_ACTIVATIONS):
        raise CheckpointError(f"{HF}{path}: activation {sorted(activation)} is not supported (quick_gelu or gelu, "
                              "the same in both towers)")
    for tower in (vision, text):
        if tower.get("layer_norm_eps", 1e-5) != 1e-5:
            raise CheckpointError(f"{HF}{path}: layer_norm_eps {tower['layer_norm_eps']} is not CLIP's 1e-5")
    state = _hf_to_openai(_read_hf_tensors(folder), f"{HF}{path}")
    return ClipWeights(state, f"{HF}{path}", _ACTIVATIONS[activation.pop()],
                       vision.get("num_attention_heads", 12), text.get("num_attention_heads", 8))


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        from safetensors.torch import load_file
        state: dict[str, torch.Tensor] = {}
        for file in safetensors:
            state.update(load_file(file))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return read_state_dict(folder / "pytorch_model.bin")
    raise CheckpointError(f"{HF}{folder}: no model.safetensors or pytorch_model.bin")


def _hf_to_openai(hf: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key in _HF_IGNORED:
            continue
        if key in _HF_TOP:
            state[_HF_TOP[key]] = value
        elif key in ("visual_projection.weight", "text_projection.weight"):
            state["visual.proj" if key.startswith("visual") else "text_projection"] = value.t().contiguous()
        elif match := _HF_LAYER.fullmatch(key):
            tower, layer, module, kind = match.groups()
            prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, kind), {})[module[-6]] = value
            elif module in _HF_BLOCK:
                state[f"{prefix}{_HF_BLOCK[module]}.{kind}"] = value
            else:
                raise CheckpointError(f"{origin}: tensor {key} has no place in a CLIP encoder")
        else:
            raise CheckpointError(f"{origin}: tensor {key} has no place in a CLIP encoder")
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{origin}: {prefix} lacks some of the q/k/v projections")
        state[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return state

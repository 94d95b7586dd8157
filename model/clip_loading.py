"""Load OpenAI CLIP checkpoints: download by name (SHA-256 checked) or read a local file.

A checkpoint is a TorchScript archive (OpenAI's releases) or a plain state dict, optionally
wrapped as ``{'state_dict': ...}`` / ``{'model': ...}`` and prefixed with ``module.``. The
architecture is inferred from tensor shapes; the visual position embedding is resized to the
requested image size and stride (bilinear, CLS row kept).
"""
from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.checkpoint import state_mismatch
from utils.errors import UserError
from utils.iotools import file_sha256

from .clip import CLIPConfig, CLIPEncoder

logger = logging.getLogger(__name__)

_OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"
OPENAI_MODELS = {
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
}
# Entries of OpenAI's archives that are not weights of our encoder.
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "logit_scale")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be found, downloaded, read or matched to the model."""


def download_openai_checkpoint(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of OpenAI's ``name`` checkpoint in ``~/.cache/clip``, downloading it if needed."""
    sha, file_name = OPENAI_MODELS[name]
    url = _OPENAI_URL.format(sha=sha, file=file_name)
    cache = Path(cache_dir or Path.home() / ".cache" / "clip")
    target = cache / file_name
    if target.is_file() and file_sha256(target) == sha:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    logger.info("downloading %s from %s", name, url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot download CLIP {name} from {url} ({err}); offline? Put the file at {target} "
            f"or pass --pretrain_choice PATH") from None
    if file_sha256(partial) != sha:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"downloaded CLIP {name} does not match its SHA-256 {sha}")
    os.replace(partial, target)
    return target


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a TorchScript archive or a (wrapped) state dict, without ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # OpenAI's releases are TorchScript; the deprecation is not the user's
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            raise CheckpointError(f"cannot read checkpoint {path}: not a TorchScript archive or a "
                                  f"torch.save file of tensors ({type(err).__name__})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


SHAPE_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "text_projection",
              "ln_final.weight", "positional_embedding", "token_embedding.weight")


def infer_config(state: dict[str, torch.Tensor], image_size: tuple[int, int],
                 stride_size: int) -> CLIPConfig:
    """The ViT CLIP architecture described by a state dict's shapes."""
    if "visual.proj" not in state:
        raise CheckpointError("not a ViT CLIP checkpoint (no 'visual.proj'); ResNet CLIP is not supported")
    missing = [k for k in SHAPE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"CLIP checkpoint lacks {', '.join(missing)}")
    text_blocks = {k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}
    return CLIPConfig(
        embed_dim=state["text_projection"].shape[1],
        vision_width=state["visual.conv1.weight"].shape[0],
        vision_layers=sum(1 for k in state if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")),
        vision_patch_size=state["visual.conv1.weight"].shape[-1],
        image_size=tuple(image_size),
        stride_size=stride_size,
        text_width=state["ln_final.weight"].shape[0],
        text_layers=len(text_blocks),
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
    )


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a [1 + g*g, W] position embedding to [1 + rows*cols, W] (bilinear, CLS kept)."""
    cls, patches = pos_embed[:1], pos_embed[1:].float()
    side = int(patches.shape[0] ** 0.5)
    if side * side != patches.shape[0]:
        raise CheckpointError(f"position embedding of {patches.shape[0]} patches is not a square grid")
    width = patches.shape[1]
    image = patches.reshape(1, side, side, width).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=grid, mode="bilinear", align_corners=False)
    patches = image.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)
    return torch.cat([cls, patches.to(pos_embed.dtype)], dim=0)


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``load_state_dict`` that names missing, unexpected and mis-shaped keys in one error."""
    mismatch = state_mismatch(model, state)
    if mismatch:
        raise CheckpointError(f"{path} does not match the model: {mismatch}")
    model.load_state_dict(state)


@dataclass
class ClipWeights:
    """A CLIP state dict in OpenAI's key names and what its source says about the architecture."""
    state: dict[str, torch.Tensor]
    origin: str                      # where the weights came from, for messages
    quick_gelu: bool | None = None   # None: the source does not say
    vision_heads: int = 0            # 0: width // 64
    text_heads: int = 0


def openai_weights(choice: str) -> ClipWeights:
    """An OpenAI model name (downloaded once, SHA-256 checked) or a checkpoint path."""
    path = download_openai_checkpoint(choice) if choice in OPENAI_MODELS else Path(choice)
    return ClipWeights(read_state_dict(path), str(path), quick_gelu=True)


def build_clip_encoder(weights: ClipWeights, image_size: tuple[int, int] = (384, 128), stride_size: int = 16,
                       text_length: int = 77, activation: str = "auto") -> CLIPEncoder:
    """A ``CLIPEncoder`` holding ``weights`` (fp32), position embeddings resized to ``image_size``.
    ``activation``: ``auto`` (what the source says; exact GELU when it says nothing), ``quick_gelu``
    or ``gelu``."""
    state = {k: v for k, v in weights.state.items() if k not in IGNORED_KEYS}
    try:
        cfg = infer_config(state, image_size, stride_size)
    except CheckpointError as err:
        raise CheckpointError(f"{weights.origin}: {err}") from None
    if text_length != cfg.context_length:
        raise CheckpointError(
            f"text_length {text_length} differs from the context length {cfg.context_length} of {weights.origin}")
    quick_gelu = weights.quick_gelu if activation == "auto" else activation == "quick_gelu"
    if quick_gelu is None:
        logger.info("%s does not say which activation it uses: exact GELU (open_clip's default; set "
                    "clip_activation quick_gelu for weights derived from OpenAI's)", weights.origin)
        quick_gelu = False
    cfg = replace(cfg, quick_gelu=quick_gelu, vision_heads=weights.vision_heads, text_heads=weights.text_heads)
    for tower in ("vision", "text"):
        width = cfg.vision_width if tower == "vision" else cfg.text_width
        if width % cfg.heads(tower):
            raise CheckpointError(f"{weights.origin}: {tower} width {width} is not divisible by "
                                  f"{cfg.heads(tower)} heads")
    model = CLIPEncoder(cfg)
    key = "visual.positional_embedding"
    if state[key].shape != model.visual.positional_embedding.shape:
        state[key] = resize_pos_embed(state[key], cfg.grid_size)
    load_strict(model, {k: v.float() for k, v in state.items()}, weights.origin)
    logger.info("loaded CLIP from %s (%s)", weights.origin, cfg)
    return model


def load_openai_clip(choice: str, image_size: tuple[int, int] = (384, 128), stride_size: int = 16,
                     text_length: int = 77) -> CLIPEncoder:
    """Build a ``CLIPEncoder`` from an OpenAI model name or checkpoint path (fp32 weights)."""
    return build_clip_encoder(openai_weights(choice), image_size, stride_size, text_length)

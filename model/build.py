"""The trainable model: the CLIP dual encoder plus the heads named in ``loss_names``."""
from __future__ import annotations

import torch
from torch import nn

from utils.errors import ConfigError

from .clip import CLIPConfig, CLIPEncoder
from .clip_loading import build_clip_encoder
from .clip_sources import clip_weights
from .heads import HEADS, Batch, EncoderOutput, Head, parse_loss_names, with_required
from .retrieval import RetrievalDefinition

SCRATCH = "none"  # pretrain_choice that builds the encoder from the size keys, randomly initialised


class TBPSModel(nn.Module):
    """Encoder + ``ModuleDict`` of heads: one module, one state dict (``encoder.*``, ``heads.<name>.*``).

    ``retrieval`` is what the model ranks with, as its heads define it (``model/retrieval.py``)."""

    def __init__(self, encoder: CLIPEncoder, heads: dict[str, Head]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.retrieval = RetrievalDefinition(dict(self.heads))

    def encode(self, batch: Batch) -> EncoderOutput:
        fields = dict.fromkeys(key for head in self.heads.values() for key in head.text_fields)
        attention = self.retrieval.needs_attention
        return EncoderOutput(self.encoder.image_output(batch["images"], attention),
                             self.encoder.text_output(batch["caption_ids"], attention),
                             {key: self.encoder.text_output(batch[key]) for key in fields})

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.encode(batch)
        results: dict[str, torch.Tensor] = {}
        for head in self.heads.values():
            results.update(head(batch, out, self.encoder))
        return results

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Global image features for retrieval, [B, E] fp32."""
        return self.encoder.image_global(self.encoder.encode_image(images))

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Global text features for retrieval, [B, E] fp32."""
        return self.encoder.text_global(self.encoder.encode_text(text_ids), text_ids)

    def required_fields(self) -> set[str]:
        """Batch fields the heads need besides images, caption_ids, pids and image_ids."""
        return {key for head in self.heads.values() for key in head.batch_fields}


def encoder_config_from(cfg) -> CLIPConfig:
    """Architecture given by the config's size keys (training from scratch)."""
    return CLIPConfig(embed_dim=cfg.embed_dim, vision_width=cfg.vision_width,
                      vision_layers=cfg.vision_layers, vision_patch_size=cfg.vision_patch_size,
                      image_size=tuple(cfg.img_size), stride_size=cfg.stride_size,
                      text_width=cfg.text_width, text_layers=cfg.text_layers,
                      context_length=cfg.text_length, vocab_size=cfg.vocab_size)


def build_encoder(cfg, load_weights: bool = True) -> CLIPEncoder:
    """CLIP from ``pretrain_choice`` (OpenAI name or checkpoint path, ``open_clip:...``, ``hf:PATH``)
    or from scratch (``none``), with the training options ``text_attn_dropout`` and
    ``freeze_patch_embed``.

    With ``load_weights=False`` the architecture is rebuilt from the saved ``clip`` section of a
    run config, so a trained run is evaluated without reading the pretrained checkpoint again.
    """
    if not load_weights and getattr(cfg, "clip", None):
        arch = dict(cfg.clip)
        arch["image_size"] = tuple(arch["image_size"])
        encoder = CLIPEncoder(CLIPConfig(**arch))
    elif cfg.pretrain_choice == SCRATCH:
        encoder = CLIPEncoder(encoder_config_from(cfg))
    else:
        weights = clip_weights(cfg.pretrain_choice)
        encoder = build_clip_encoder(weights, tuple(cfg.img_size), cfg.stride_size, cfg.text_length,
                                     cfg.clip_activation)
        if "logit_scale" in weights.state:  # the encoder ignores it; a learnable-scale head may start from it
            encoder.pretrained_logit_scale = float(weights.state["logit_scale"])
    encoder.set_text_attn_dropout(cfg.text_attn_dropout)
    if cfg.freeze_patch_embed:
        encoder.freeze_patch_embedding()
    return encoder


def configure_heads(cfg, dataset, tokenizer) -> None:
    """Let every head of ``loss_names`` fill the config values it derives from the training split."""
    for name in with_required(parse_loss_names(cfg.loss_names)):
        HEADS[name].configure(cfg, dataset, tokenizer)


def build_model(cfg, num_classes: int, load_weights: bool = True) -> TBPSModel:
    """The encoder and the heads of ``loss_names`` (with the heads they require)."""
    names = with_required(parse_loss_names(cfg.loss_names))
    for name in names:
        if HEADS[name].whole_batch and cfg.accum_steps != 1:
            raise ConfigError(f"head '{name}' needs the whole batch in one step: set accum_steps 1 (got "
                              f"{cfg.accum_steps}); the batch_size is the global batch")
    encoder = build_encoder(cfg, load_weights)
    heads = {name: HEADS[name].from_config(cfg, encoder.config, num_classes) for name in names}
    for head in heads.values():
        head.bind(heads, encoder)
    return TBPSModel(encoder, heads)

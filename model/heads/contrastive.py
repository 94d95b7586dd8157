"""Heads whose loss compares each sample with the rest of the batch: SDM, ITC, CMPM.

Under DDP they see the global batch: features and pids of every rank are gathered (gradients flow
back to each rank's part), so the loss and gradients equal one process on the whole batch.
"""
from __future__ import annotations

import torch

from utils.comm import all_gather_no_grad, all_gather_with_grad

from utils.settings import Setting

from ..objectives import cmpm_loss, itc_loss, sdm_loss
from .base import Batch, EncoderOutput, Head
from .registry import register_head


def global_batch(batch: Batch, out: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image features, text features, pids) of the whole batch across processes."""
    return (all_gather_with_grad(out.image.global_feature), all_gather_with_grad(out.text.global_feature),
            all_gather_no_grad(batch["pids"]))


def loss_weight(name: str, default: float = 1.0, extra: str = "") -> Setting:
    """The ``<name>_loss_weight`` setting every head has."""
    return Setting(f"{name}_loss_weight", default, f"weight of the {name} loss{extra}", low=0.0)


class ScaledContrastiveHead(Head):
    """A contrastive head with the fixed logit scale 1/temperature and weight ``<name>_loss_weight``."""

    def __init__(self, logit_scale: float, weight: float = 1.0):
        super().__init__(weight)
        self.logit_scale = logit_scale

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(1.0 / cfg.temperature, getattr(cfg, f"{cls.name}_loss_weight"))


@register_head
class SDMHead(ScaledContrastiveHead):
    """Similarity Distribution Matching (IRRA)."""
    name = "sdm"
    method = "IRRA"
    summary = ("similarity distribution matching: KL to the same-identity distribution, both directions "
               "(logit scale 1/`temperature`)")
    settings = (loss_weight("sdm"),)

    def forward(self, batch, out, encoder):
        image, text, pids = global_batch(batch, out)
        return {"sdm_loss": self.weight * sdm_loss(image, text, pids, self.logit_scale)}


@register_head
class ITCHead(ScaledContrastiveHead):
    """Image-text contrastive InfoNCE with diagonal targets."""
    name = "itc"
    method = "CLIP / IRRA"
    summary = "image-text InfoNCE with diagonal targets (logit scale 1/`temperature`)"
    settings = (loss_weight("itc"),)

    def forward(self, batch, out, encoder):
        image, text, _ = global_batch(batch, out)
        return {"itc_loss": self.weight * itc_loss(image, text, self.logit_scale)}


@register_head
class CMPMHead(Head):
    """Cross-Modal Projection Matching (no scale)."""
    name = "cmpm"
    method = "IRRA"
    summary = "cross-modal projection matching"
    settings = (loss_weight("cmpm"),)

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.cmpm_loss_weight)

    def forward(self, batch, out, encoder):
        image, text, pids = global_batch(batch, out)
        return {"cmpm_loss": self.weight * cmpm_loss(image, text, pids)}

"""Heads whose loss compares each sample with the rest of the batch: SDM, ITC, CMPM."""
from __future__ import annotations

from ..objectives import cmpm_loss, itc_loss, sdm_loss
from .base import Head
from .registry import register_head


@register_head
class SDMHead(Head):
    """Similarity Distribution Matching (IRRA), fixed logit scale 1/temperature."""
    name = "sdm"

    def __init__(self, logit_scale: float, weight: float = 1.0):
        super().__init__(weight)
        self.logit_scale = logit_scale

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(1.0 / cfg.temperature, cfg.sdm_loss_weight)

    def forward(self, batch, out, encoder):
        loss = sdm_loss(out.image_global, out.text_global, batch["pids"], self.logit_scale)
        return {"sdm_loss": self.weight * loss}


@register_head
class ITCHead(Head):
    """Image-text contrastive InfoNCE with diagonal targets."""
    name = "itc"

    def __init__(self, logit_scale: float, weight: float = 1.0):
        super().__init__(weight)
        self.logit_scale = logit_scale

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(1.0 / cfg.temperature, cfg.itc_loss_weight)

    def forward(self, batch, out, encoder):
        return {"itc_loss": self.weight * itc_loss(out.image_global, out.text_global, self.logit_scale)}


@register_head
class CMPMHead(Head):
    """Cross-Modal Projection Matching (no scale)."""
    name = "cmpm"

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.cmpm_loss_weight)

    def forward(self, batch, out, encoder):
        return {"cmpm_loss": self.weight * cmpm_loss(out.image_global, out.text_global, batch["pids"])}

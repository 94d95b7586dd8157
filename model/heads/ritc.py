"""R-ITC (TBPS-CLIP §3.3, Eq. 4): the reversed KL divergence KL(P || Q + eps) of the predicted
image-text distributions to the identity targets, with the learnable logit scale."""
from __future__ import annotations

from utils.settings import Setting

from ..objectives import reversed_itc
from .contrastive import loss_weight
from .registry import register_head
from .tbps_common import ScaledHead, normalised_batch


@register_head
class RITCHead(ScaledHead):
    name = "ritc"
    method = "TBPS-CLIP"
    summary = "reversed-KL ITC: KL(P ‖ Q + ε), directions averaged (learnable scale, ε 0.01)"
    settings = (loss_weight("ritc"),
                Setting("ritc_eps", 0.01, "ε added to the identity targets (TBPS-CLIP: 1e-2; SDM: 1e-8)", above=0.0))

    def __init__(self, weight: float, eps: float):
        super().__init__(weight)
        self.eps = eps

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.ritc_loss_weight, cfg.ritc_eps)

    def forward(self, batch, out, encoder):
        image, text, targets = normalised_batch(batch, out)
        return {"ritc_loss": self.weight * reversed_itc(image, text, targets, self.scale(), self.eps)}

"""C-ITC (TBPS-CLIP §3.3, Eqs. 5-7, in its code's CyCLIP form): in-modal and cross-modal
similarity consistency over the global batch."""
from __future__ import annotations

from utils.settings import Setting

from ..objectives import cyclic_itc
from .base import Head
from .contrastive import loss_weight
from .registry import register_head
from .tbps_common import normalised_batch


@register_head
class CITCHead(Head):
    """Means over all N^2 pairs with lambda 0.25 each, as the code (the paper's (1/N) sum sum without
    lambda is 4N times larger); the logit scale cancels, so this head needs none."""
    name = "citc"
    method = "TBPS-CLIP"
    whole_batch = True
    summary = "cyclic ITC: in-modal and cross-modal similarity consistency (λ 0.25 + 0.25)"
    settings = (loss_weight("citc", 0.1, " (TBPS-CLIP: 0.1)"),
                Setting("citc_lambda_in", 0.25, "weight of the in-modal term (u_i.u_j vs v_i.v_j)", low=0.0),
                Setting("citc_lambda_cross", 0.25, "weight of the cross-modal term (u_i.v_j vs v_i.u_j)", low=0.0))

    def __init__(self, weight: float, lambda_in: float, lambda_cross: float):
        super().__init__(weight)
        self.lambda_in, self.lambda_cross = lambda_in, lambda_cross

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.citc_loss_weight, cfg.citc_lambda_in, cfg.citc_lambda_cross)

    def forward(self, batch, out, encoder):
        image, text, _ = normalised_batch(batch, out)
        return {"citc_loss": self.weight * cyclic_itc(image, text, self.lambda_in, self.lambda_cross)}

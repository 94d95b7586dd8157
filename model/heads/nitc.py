"""N-ITC (TBPS-CLIP §3.3, code ``calc_contrastive``): image-text InfoNCE against identity targets
softened by the model's own predictions, with the learnable logit scale."""
from __future__ import annotations

from utils.settings import PROBABILITY, Setting

from ..objectives import soft_label_itc
from .contrastive import loss_weight
from .registry import register_head
from .tbps_common import SoftLabelHead, normalised_batch, soft_text


@register_head
class NITCHead(SoftLabelHead):
    """Targets alpha x softmax(s x u^s v^s.T) + (1 - alpha) x Q; u^s is the detached image feature (the
    vision tower is deterministic), v^s a second no-grad text pass (``soft_text``)."""
    name = "nitc"
    method = "TBPS-CLIP"
    summary = "identity-normalised ITC with soft labels from a no-grad pass, ratio ramped over epoch 1"
    settings = (loss_weight("nitc", extra=" (TBPS-CLIP full recipe: 0.5, with mvsi 0.5; simplified: 1.0)"),
                Setting("nitc_softlabel_ratio", 0.5, "alpha, the soft-label share of the nitc and mvsi targets "
                        "(reached after epoch 1)", **PROBABILITY))

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.nitc_loss_weight, cfg.nitc_softlabel_ratio)

    def forward(self, batch, out, encoder):
        image, text, targets = normalised_batch(batch, out)
        loss = soft_label_itc(image, text, image.detach(), soft_text(batch, out, encoder), targets, self.alpha,
                              self.scale())
        return {"nitc_loss": self.weight * loss, "nitc_alpha": loss.new_tensor(self.alpha)}

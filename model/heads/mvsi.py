"""MVS-I (TBPS-CLIP §3.3 "Multi-View Supervision"): N-ITC between a second augmented view of each
image and the same texts, targets and soft-label ratio as ``nitc``."""
from __future__ import annotations

import torch.nn.functional as F

from utils.comm import all_gather_with_grad

from ..objectives import soft_label_itc
from .contrastive import loss_weight
from .registry import register_head
from .tbps_common import SoftLabelHead, normalised_batch, soft_text


@register_head
class MVSIHead(SoftLabelHead):
    """Upstream averages it with N-ITC (``nitc_loss`` = (N-ITC(I, T) + N-ITC(I~, T)) / 2): the full
    recipe's weights 0.5 + 0.5 give the same sum, logged as two terms."""
    name = "mvsi"
    method = "TBPS-CLIP"
    summary = "N-ITC on a second augmented view of each image (`images_view2`)"
    settings = (loss_weight("mvsi", extra=" (TBPS-CLIP full recipe: 0.5)"),)
    batch_fields = ("images_view2",)

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.mvsi_loss_weight, cfg.nitc_softlabel_ratio)

    def forward(self, batch, out, encoder):
        _, text, targets = normalised_batch(batch, out)
        view = F.normalize(all_gather_with_grad(encoder.image_output(batch["images_view2"]).global_feature), dim=-1)
        loss = soft_label_itc(view, text, view.detach(), soft_text(batch, out, encoder), targets, self.alpha,
                              self.scale())
        return {"mvsi_loss": self.weight * loss}

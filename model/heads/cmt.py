"""CMT: the cross-modal triplet loss of UIT (SEN code), hardest negatives from the global batch."""
from __future__ import annotations

from ..objectives import cmt_loss
from utils.settings import Setting

from .base import Head
from .contrastive import global_batch, loss_weight
from .registry import register_head


@register_head
class CMTHead(Head):
    name = "cmt"
    method = "UIT"
    summary = ("cross-modal triplet, hardest other-identity negatives (not IRRA's `cmt_depth`, "
               "which sizes the mlm head)")
    settings = (
        Setting("cmt_margin", 0.05, "margin of the cmt (UIT cross-modal triplet) head", low=0.0),
        loss_weight("cmt", 10.0, " (UIT cross-modal triplet; SEN's run_SEN.sh: 10)"),
    )

    def __init__(self, margin: float = 0.05, weight: float = 1.0):
        super().__init__(weight)
        self.margin = margin

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.cmt_margin, cfg.cmt_loss_weight)

    def forward(self, batch, out, encoder):
        image, text, pids = global_batch(batch, out)
        return {"cmt_loss": self.weight * cmt_loss(image, text, pids, self.margin)}

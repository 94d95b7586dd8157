"""ID loss: one classifier over identities shared by the image and text global features."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..objectives import accuracy
from .base import Head
from .contrastive import loss_weight
from .registry import register_head


@register_head
class IDHead(Head):
    name = "id"
    method = "IRRA"
    summary = "identity classifier shared by the image and text global features"
    settings = (loss_weight("id"),)
    param_roles = {"classifier": "classifier"}

    def __init__(self, embed_dim: int, num_classes: int, weight: float = 1.0):
        super().__init__(weight)
        self.classifier = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(encoder_cfg.embed_dim, num_classes, cfg.id_loss_weight)

    def forward(self, batch, out, encoder):
        pids = batch["pids"]
        image_logits = self.classifier(out.image.global_feature)
        text_logits = self.classifier(out.text.global_feature)
        loss = (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2
        return {"id_loss": self.weight * loss,
                "img_acc": accuracy(image_logits, pids),
                "txt_acc": accuracy(text_logits, pids)}

"""SS-I (TBPS-CLIP §3.3, Eq. 3): SimCLR on two strongly augmented views of each image, through a
small MLP on the image global feature."""
from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import nn

from utils.comm import all_gather_with_grad
from utils.errors import ConfigError
from utils.settings import Setting

from ..objectives import simclr_loss
from .base import Head
from .contrastive import loss_weight
from .registry import register_head


@register_head
class SSIHead(Head):
    """z = normalize(MLP(CLS feature)) of the two ``images_ss`` views; NT-Xent over the global batch
    with temperature ``ssi_temperature``. The MLP (embed -> hidden -> embed, ReLU) is trained with
    the encoder's lr and weight decay."""
    name = "ssi"
    method = "TBPS-CLIP"
    whole_batch = True
    summary = "SimCLR image self-supervision on two views (`images_ss`) through an MLP, τ 0.1"
    settings = (loss_weight("ssi", 0.4, " (TBPS-CLIP: 0.4)"),
                Setting("ssi_temperature", 0.1, "NT-Xent temperature of ssi (TBPS-CLIP: 0.1)", above=0.0),
                Setting("ssi_hidden", 128, "hidden width of the ssi MLP (TBPS-CLIP: 128)", low=1))
    batch_fields = ("images_ss",)

    def __init__(self, embed_dim: int, hidden: int = 128, temperature: float = 0.1, weight: float = 0.4):
        super().__init__(weight)
        self.temperature = temperature
        self.mlp = nn.Sequential(OrderedDict([("fc1", nn.Linear(embed_dim, hidden)), ("relu", nn.ReLU()),
                                              ("fc2", nn.Linear(hidden, embed_dim))]))

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        if cfg.image_cache:
            raise ConfigError("head 'ssi' crops its views from the original images: it cannot use image_cache "
                              "(whose images are already resized)")
        return cls(encoder_cfg.embed_dim, cfg.ssi_hidden, cfg.ssi_temperature, cfg.ssi_loss_weight)

    def forward(self, batch, out, encoder):
        views = batch["images_ss"]  # [B, 2, 3, H, W]
        features = encoder.image_output(views.flatten(0, 1)).global_feature.view(len(views), 2, -1)
        z = F.normalize(self.mlp(features), dim=-1)
        z_a, z_b = all_gather_with_grad(z[:, 0].contiguous()), all_gather_with_grad(z[:, 1].contiguous())
        return {"ssi_loss": self.weight * simclr_loss(z_a, z_b, self.temperature)}

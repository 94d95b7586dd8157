"""The head interface: one module per training objective, chosen by a ``--loss_names`` token.

A head receives the batch, the encoder's output for it and the encoder itself (for extra passes
through its public methods) and returns a dict: ``<name>_loss`` entries are already weighted and
summed by the processor; other entries (accuracies) are logged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..clip import CLIPConfig, CLIPEncoder

Batch = dict[str, torch.Tensor]


@dataclass
class EncoderOutput:
    """One pass of the dual encoder over a training batch."""
    image_tokens: torch.Tensor  # [B, 1+N, E], token 0 = CLS
    text_tokens: torch.Tensor   # [B, L, E]
    image_global: torch.Tensor  # [B, E] fp32, CLS
    text_global: torch.Tensor   # [B, E] fp32, EOT


class Head(nn.Module):
    """Base class of training heads."""
    name: ClassVar[str]
    # Extra batch keys this head needs from the dataset (beyond images, caption_ids, pids, image_ids).
    batch_keys: ClassVar[tuple[str, ...]] = ()
    # Optimizer role of child modules ('cross' or 'classifier'); other parameters are 'base'.
    param_roles: ClassVar[dict[str, str]] = {}

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    @classmethod
    def from_config(cls, cfg, encoder_cfg: CLIPConfig, num_classes: int) -> "Head":
        """Build from the run config, the encoder's architecture and the number of train ids."""
        raise NotImplementedError

    def forward(self, batch: Batch, out: EncoderOutput, encoder: CLIPEncoder) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def role_of(self, param_name: str) -> str:
        return self.param_roles.get(param_name.split(".")[0], "base")

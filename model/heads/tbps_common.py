"""What TBPS-CLIP's heads share (Cao et al., "An Empirical Study of CLIP for Text-based Person
Search", AAAI 2024; code Flame-Chasers/TBPS-CLIP @ ba090bc, model/tbps_model.py): the learnable
logit scale (its own head, required by nitc, mvsi, ritc and citc), the normalised global batch, the
soft-label text pass computed once per step, and the soft-label ratio with its ramp over epoch 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.comm import all_gather_no_grad
from utils.settings import Setting

from ..objectives import identity_targets
from .base import Batch, EncoderOutput, Head
from .contrastive import global_batch
from .registry import register_head

CLIP_INIT_SCALE = 1 / 0.07  # CLIP's initial logit scale, used when the weights carry none


@register_head
class LogitScaleHead(Head):
    """The learnable logit scale s = min(exp theta, max). The clamp acts on the value only: the
    gradient is that of exp theta (TBPS-CLIP clamps ``.data``), so theta may drift above ln max.
    It starts from the checkpoint's ``logit_scale`` (OpenAI: ln 100), as TBPS-CLIP's loader does."""
    name = "logit_scale"
    method = "TBPS-CLIP"
    summary = "learnable logit scale shared by nitc, mvsi, ritc, citc: min(exp θ, max), straight-through"
    settings = (
        Setting("logit_scale_init", 0.0, "initial logit scale; 0: the pretrained checkpoint's (OpenAI: 100), "
                "or 1/0.07 without one", low=0.0),
        Setting("logit_scale_max", 100.0, "the value of the logit scale is clamped here (TBPS-CLIP: 100)", above=0.0),
    )

    def __init__(self, init: float = 0.0, max_value: float = 100.0):
        super().__init__(0.0)
        self.from_checkpoint = init == 0
        self.theta = nn.Parameter(torch.tensor(math.log(init or CLIP_INIT_SCALE)))
        self.max_value = max_value

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.logit_scale_init, cfg.logit_scale_max)

    def bind(self, heads, encoder) -> None:
        if self.from_checkpoint and encoder.pretrained_logit_scale is not None:
            with torch.no_grad():
                self.theta.fill_(encoder.pretrained_logit_scale)

    def value(self) -> torch.Tensor:
        scale = self.theta.exp()
        return scale - (scale - scale.clamp(max=self.max_value)).detach()

    def forward(self, batch, out, encoder):
        return {"logit_scale": self.value().detach()}


class ScaledHead(Head):
    """A head using the shared learnable logit scale (over the whole batch)."""
    requires = ("logit_scale",)
    whole_batch = True

    def bind(self, heads, encoder) -> None:
        self._scale = {"head": heads["logit_scale"]}  # a plain dict: its parameter stays registered there once

    def scale(self) -> torch.Tensor:
        return self._scale["head"].value()


def normalised_batch(batch: Batch, out: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, v, Q): the global batch's L2-normalised image and text features (with gradients) and the
    row-normalised same-identity targets; gathered once per step for all of TBPS-CLIP's heads."""
    if "normalised_batch" not in out.cache:
        image, text, pids = global_batch(batch, out)
        out.cache["normalised_batch"] = F.normalize(image, dim=-1), F.normalize(text, dim=-1), identity_targets(pids)
    return out.cache["normalised_batch"]


def soft_text(batch: Batch, out: EncoderOutput, encoder) -> torch.Tensor:
    """v^s: the normalised text features of a second pass over the same ids without gradient, in
    the model's mode (train: a new attention-dropout draw), gathered; computed once per step and
    shared by nitc and mvsi. Without text dropout that pass equals the first, so the first's
    features are reused (the same numbers, one text pass less)."""
    if "soft_text" not in out.cache:
        if encoder.training and encoder.text_attn_dropout > 0:
            with torch.no_grad():
                features = encoder.text_output(batch["caption_ids"]).global_feature
            out.cache["soft_text"] = all_gather_no_grad(F.normalize(features, dim=-1))
        else:
            out.cache["soft_text"] = normalised_batch(batch, out)[1].detach()
    return out.cache["soft_text"]


class SoftLabelHead(ScaledHead):
    """N-ITC's soft-label ratio alpha: ratio x min(1, step / steps) in the first epoch (0-based step),
    the ratio afterwards (TBPS-CLIP main.py)."""

    def __init__(self, weight: float, ratio: float):
        super().__init__(weight)
        self.ratio = ratio
        self.alpha = ratio

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.alpha = self.ratio * min(1.0, step / steps_per_epoch) if epoch == 1 else self.ratio

"""Pair augmentations on a training batch (TBPS-CLIP's optional MixGen and ConcatGen; MixGen: Hao
et al., 2022). With probability ``mixgen_prob`` per batch, the first ``num = int(mixgen_ratio x B)``
samples are paired with samples num..2num-1: sample i's caption becomes caption i followed by caption
i+num, its image the mix (MixGen: lambda x image i + (1 - lambda) x image i+num) or the side-by-side
concatenation (ConcatGen: each resized to half the width). Identities and every other field stay.

Off in both TBPS-CLIP recipes (the paper measured MixGen 63.87 and ConcatGen 64.13 R1 against 64.34
without, ViT-B/32). Differences from upstream (TBPS-CLIP main.py, model/mixgen.py): captions are joined
as token ids after the caption augmentations (upstream joins the strings before back-translation and
deletion); ConcatGen resizes to half of ``img_size`` and does not normalise a second time (upstream
hard-codes 224 x 112 and normalises the already normalised halves again).
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from utils.settings import PROBABILITY, Setting, declare

declare("batch pair augmentation", (
    Setting("mixgen", "off", "pair augmentation of training batches (TBPS-CLIP's optional MixGen / ConcatGen)",
            choices=("off", "mixgen", "concatgen")),
    Setting("mixgen_prob", 0.1, "probability that a batch is mixed (TBPS-CLIP: 0.1)", **PROBABILITY),
    Setting("mixgen_ratio", 0.1, "share of the batch that receives a partner (TBPS-CLIP: 0.1)", low=0.0, high=0.5),
    Setting("mixgen_lambda", 0.5, "MixGen's image weight of the sample itself", **PROBABILITY),
))


def join_captions(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """SOT + the words of ``first`` + the words of ``second`` + EOT, cut to the same length keeping EOT
    last (the ids of the two sentences joined by a space: CLIP's BPE encodes word by word)."""
    end_first, end_second = int(first.argmax()), int(second.argmax())
    eot = first[end_first]
    ids = torch.cat([first[:end_first], second[1:end_second]])[:len(first) - 1]
    out = torch.zeros_like(first)
    out[:len(ids)] = ids
    out[len(ids)] = eot
    return out


def side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Two [3, H, W] images, each resized to half the width, next to each other: [3, H, W]."""
    height, width = left.shape[-2:]
    halves = [F.interpolate(image[None], size=(height, w), mode="bilinear", antialias=True, align_corners=False)[0]
              for image, w in ((left, width // 2), (right, width - width // 2))]
    return torch.cat(halves, dim=-1)


class BatchMix:
    """Applies ``mixgen`` to a batch dict in place (CPU tensors, before the training step)."""

    def __init__(self, mode: str = "off", prob: float = 0.1, ratio: float = 0.1, lam: float = 0.5,
                 rng: random.Random | None = None):
        self.mode, self.prob, self.ratio, self.lam = mode, prob, ratio, lam
        self.rng = rng or random  # the global Python RNG: saved in last.pth, so a resumed run draws the same

    @classmethod
    def from_config(cls, cfg) -> "BatchMix":
        return cls(cfg.mixgen, cfg.mixgen_prob, cfg.mixgen_ratio, cfg.mixgen_lambda)

    def __call__(self, batch: dict[str, torch.Tensor]) -> bool:
        """True if the batch was mixed."""
        if self.mode == "off" or self.rng.random() >= self.prob:
            return False
        num = int(self.ratio * len(batch["images"]))
        images, ids = batch["images"], batch["caption_ids"]
        for i in range(num):
            if self.mode == "mixgen":
                images[i] = self.lam * images[i] + (1 - self.lam) * images[i + num]
            else:
                images[i] = side_by_side(images[i], images[i + num])
            ids[i] = join_captions(ids[i], ids[i + num])
        return num > 0

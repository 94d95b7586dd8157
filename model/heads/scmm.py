"""SCMM heads: Sew calibration loss (``sew``) and Masked Caption Modeling (``mcm``).

SCMM (Wei et al., "SCMM: Calibrating Cross-modal Representations for Text-Based Person Search",
arXiv 2304.02278) publishes no code, and its method section could not be read: these heads are
**our reconstruction** from its abstracts (caption quality drives adaptive margins, bidirectional
constraints that compress same-identity features; a training-only cross-modal decoder predicts
masked caption words), not the paper's method. Runs should be called "SCMM-style (reconstructed)".

- ``sew``: caption quality q_j = clamp((n_j - len_low) / (len_high - len_low), 0, 1) from the
  caption's BPE token count n_j (SOT and EOT excluded, at most 75), with len_low / len_high the
  training split's 5th / 95th percentiles (computed once, written into the run's config); margin
  m_j = margin_low + (margin_high - margin_low) q_j in cosine units; logits Z = s (S - P m), the
  margin of caption j subtracted from its positive pairs (same identity) only; the loss averages,
  over both directions, minus the mean log-softmax of each anchor's positives. Global batch under
  DDP.
- ``mcm``: IRRA's cross-modal MLM decoder (one cross-attention without residual, then blocks, a
  vocabulary classifier) on a masked *copy* of the caption (``mcm_ids``; the caption the other
  heads see stays clean). Training only: evaluation never runs it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from utils.comm import all_gather_no_grad
from utils.errors import ConfigError
from utils.settings import Setting

from ..objectives import identity_labels
from .base import Head
from .contrastive import global_batch, loss_weight
from .mlm import MLMHead
from .registry import register_head

MAX_TOKENS = 75  # CLIP's 77 positions minus SOT and EOT


def token_counts(ids: torch.Tensor) -> torch.Tensor:
    """BPE tokens strictly between SOT and EOT per caption (EOT is the largest id): [B]."""
    return (ids.argmax(dim=-1) - 1).clamp(0, MAX_TOKENS)


def caption_margins(counts: torch.Tensor, len_low: float, len_high: float, margin_low: float, margin_high: float,
                    constant: bool = False) -> torch.Tensor:
    """m_j = margin_low + (margin_high - margin_low) q_j, q_j the clamped position of n_j between the
    length bounds (q = 0.5 for every caption when ``constant``). No gradient."""
    quality = torch.full(counts.shape, 0.5, dtype=torch.float64) if constant else \
        ((counts.double() - len_low) / (len_high - len_low)).clamp(0, 1)
    return (margin_low + (margin_high - margin_low) * quality).to(torch.float32)


def sew_loss_from_sim(sims: torch.Tensor, pids: torch.Tensor, margins: torch.Tensor, scale: float,
                      positive_mode: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_sew, L_i2t, L_t2i) from the image x caption cosine matrix ``sims`` [B, B], the identities and
    each caption's margin [B]. ``mean``: minus the mean log-softmax over the anchor's positives
    (supervised-contrastive, minimum log|P|); ``sum``: minus the log of their summed softmax."""
    positives = identity_labels(pids).to(sims.dtype)
    logits = scale * (sims - positives * margins.to(sims.dtype)[None, :])

    def direction(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        log_prob = F.log_softmax(z, dim=1)
        if positive_mode == "sum":
            return -torch.logsumexp(log_prob.masked_fill(p == 0, float("-inf")), dim=1).mean()
        return -((log_prob * p).sum(dim=1) / p.sum(dim=1)).mean()

    i2t, t2i = direction(logits, positives), direction(logits.t(), positives.t())
    return (i2t + t2i) / 2, i2t, t2i


@register_head
class SewHead(Head):
    name = "sew"
    method = "SCMM (our reconstruction)"
    summary = ("Sew calibration: multi-positive image-text softmax with per-caption margins that grow with "
               "the caption's token count")
    settings = (
        loss_weight("sew"),
        Setting("sew_margin_low", 0.05, "sew margin of the least informative captions (cosine units)"),
        Setting("sew_margin_high", 0.20, "sew margin of the most informative captions (below margin_low: "
                "the direction is inverted)"),
        Setting("sew_quality", "length", "sew caption quality: length (token count) or constant (q = 0.5)",
                choices=("length", "constant")),
        Setting("sew_len_low", -1.0, "token count of quality 0 (negative: the training split's 5th "
                "percentile, written into the run's config)"),
        Setting("sew_len_high", -1.0, "token count of quality 1 (negative: the training split's 95th percentile)"),
        Setting("sew_positive_mode", "mean", "sew positives: mean (mean log-probability) or sum (log of "
                "their summed probability)", choices=("mean", "sum")),
    )

    def __init__(self, logit_scale: float, len_low: float, len_high: float, margin_low: float = 0.05,
                 margin_high: float = 0.20, constant: bool = False, positive_mode: str = "mean", weight: float = 1.0):
        super().__init__(weight)
        if len_high <= len_low:
            raise ConfigError(f"sew needs sew_len_high > sew_len_low, got sew_len_low {len_low} and "
                              f"sew_len_high {len_high}")
        self.logit_scale, self.len_low, self.len_high = logit_scale, len_low, len_high
        self.margin_low, self.margin_high, self.constant = margin_low, margin_high, constant
        self.positive_mode = positive_mode

    @classmethod
    def configure(cls, cfg, dataset, tokenizer) -> None:
        """Fill ``auto`` (negative) length bounds with the training captions' 5th / 95th percentiles."""
        if cfg.sew_len_low >= 0 and cfg.sew_len_high >= 0:
            return
        counts = np.minimum([len(tokenizer.encode(caption)) for *_, caption in dataset.train], MAX_TOKENS)
        low, high = np.percentile(counts, [5, 95])
        if cfg.sew_len_low < 0:
            cfg.sew_len_low = float(low)
        if cfg.sew_len_high < 0:
            cfg.sew_len_high = float(high)

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        if cfg.sew_len_low < 0 or cfg.sew_len_high < 0:
            raise ConfigError("sew_len_low / sew_len_high are still 'auto': the training split sets them "
                              "(train.py does), or give both")
        return cls(1.0 / cfg.temperature, cfg.sew_len_low, cfg.sew_len_high, cfg.sew_margin_low,
                   cfg.sew_margin_high, cfg.sew_quality == "constant", cfg.sew_positive_mode, cfg.sew_loss_weight)

    def forward(self, batch, out, encoder):
        image, text, pids = global_batch(batch, out)
        counts = token_counts(all_gather_no_grad(batch["caption_ids"]))
        margins = caption_margins(counts, self.len_low, self.len_high, self.margin_low, self.margin_high,
                                  self.constant).to(image.device)
        sims = F.normalize(image.float(), dim=1) @ F.normalize(text.float(), dim=1).t()
        loss, _, _ = sew_loss_from_sim(sims, pids, margins, self.logit_scale, self.positive_mode)
        same = identity_labels(pids).bool()
        return {"sew_loss": self.weight * loss, "sew_margin_mean": margins.mean(),
                "sew_pos_cos_mean": sims.detach()[same].mean(), "sew_neg_cos_mean": sims.detach()[~same].mean()
                if (~same).any() else sims.new_zeros(())}


@register_head
class MCMHead(MLMHead):
    """IRRA's implicit-relation-reasoning decoder on the ``mcm_ids`` copy of the caption."""
    name = "mcm"
    method = "SCMM (our reconstruction)"
    summary = ("masked caption modelling: IRRA's cross-modal MLM decoder on a masked copy of the caption "
               "(training only)")
    settings = (
        loss_weight("mcm"),
        Setting("mcm_depth", 4, "self-attention blocks of the mcm decoder after its cross-attention", low=1),
    )
    batch_fields = ("mcm_ids", "mcm_labels")

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(encoder_cfg.embed_dim, encoder_cfg.vocab_size, cfg.mcm_depth, cfg.mcm_loss_weight)

    def bind(self, heads, encoder):
        if "mlm" in heads:
            raise ConfigError("mcm and mlm are the same decoder on two masked captions: use one of them")

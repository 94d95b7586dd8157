"""RDE's heads (Qin et al., "Noisy-Correspondence Learning for Text-to-Image Person
Re-identification", CVPR 2024, Sec. 3; code QinYang79/RDE @ b3fd396): training that survives
image-text pairs whose caption describes someone else.

- ``tal`` / ``trl``: the triplet alignment loss (TAL: alpha-weighted positives, a tau-log-sum-exp
  over the negatives) or RDE's triplet ranking loss (TRL: the hardest negative), per sample on the
  global features (BGE), weighted by the clean/noisy division and **summed**;
- ``tse``: the token-selection embedding: the most attended image patches (the last ViT block's
  CLS row) and caption tokens (the last text block's EOT row), L2-normalised, FC + MLP, max-pooled
  to 1024-d; its own TAL/TRL term, and a retrieval feature set averaged with the global cosine;
- ``ccd``: confident consensus division, before every epoch: per-sample losses of every branch
  over the training set, min-max normalised, a two-component Gaussian mixture per branch, clean by
  posterior > 0.5, consensus of the branches. Required by the three heads above.

Differences from RDE's code, deliberate: TAL is a masked log-sum-exp in fp32 (the same values
while tau > 0.0121) and rows without a negative give 0 (RDE: NaN gradient); losses on the global
batch under DDP; the GMM and the coin flips of disagreeing samples use seeds from (seed, epoch)
(RDE: global generators); valid caption tokens are SOT..EOT from the EOT index (RDE: ids != 0);
the unused ``linear`` and second BatchNorm of RDE's layers are not created; ``tse_bn_frozen``
keeps the TSE BatchNorms at their initial statistics, as RDE's published runs (its issue #8:
training ran in eval mode), without putting anything else in eval mode.
"""
from __future__ import annotations

import logging
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.comm import all_gather_no_grad, all_gather_with_grad, get_rank
from utils.settings import PROBABILITY, Setting

from ..clip import ImageOutput, TextOutput
from ..objectives import identity_labels
from .base import GLOBAL, Head, ParamRule
from .contrastive import loss_weight
from .registry import register_head

logger = logging.getLogger(__name__)

LOG_SUM_CAP = math.log(1e36)  # RDE clamps the negatives' exp-sum at 1e36 (binds only for tau < 0.0121)


# ---------------------------------------------------------------- per-sample losses
def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """exp(S / tau) overflows fp16: the losses run in fp32 (or float64 when given)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _positive_mean(sims: torch.Tensor, positives: torch.Tensor, tau: float) -> torch.Tensor:
    """Sum over positives of softmax(S / tau) over the positives (detached) times S."""
    alpha = F.softmax((sims / tau).masked_fill(~positives, float("-inf")), dim=1).detach()
    return (alpha * sims).sum(dim=1)


def tal_per_sample(sims: torch.Tensor, pids: torch.Tensor, tau: float = 0.015, margin: float = 0.1) -> torch.Tensor:
    """TAL of each pair [B] from the caption x image cosines ``sims`` (RDE objectives.py
    compute_TAL_per): for the caption row and the image column,
    [m - sum_pos alpha S + tau log sum_neg exp(S / tau)]_+ ; summed. At least fp32."""
    sims = at_least_fp32(sims)
    positives = identity_labels(pids).bool()
    has_negative = (~positives).any(dim=1)
    total = sims.new_zeros(len(sims))
    for s in (sims, sims.t()):
        negative_logits = (s / tau).masked_fill(positives, float("-inf"))
        negative_logits = torch.where(has_negative[:, None], negative_logits, torch.zeros_like(s))  # no NaN grads
        soft_max = tau * torch.logsumexp(negative_logits, dim=1).clamp(max=LOG_SUM_CAP)
        term = (margin - _positive_mean(s, positives, tau) + soft_max).clamp(min=0)
        total = total + torch.where(has_negative, term, torch.zeros_like(term))
    return total


def trl_per_sample(sims: torch.Tensor, pids: torch.Tensor, tau: float = 0.015, margin: float = 0.1) -> torch.Tensor:
    """RDE's TRL (compute_TRL_per): the same positives, the hardest negative as max over
    (1 - same identity) x S, so a batch whose negatives all have cosine < 0 uses 0 [RDE's quirk]."""
    sims = at_least_fp32(sims)
    positives = identity_labels(pids).bool()
    total = sims.new_zeros(len(sims))
    for s in (sims, sims.t()):
        hardest = (s * (~positives).float()).max(dim=1).values
        total = total + (margin + hardest - _positive_mean(s, positives, tau)).clamp(min=0)
    return total


PER_SAMPLE = {"tal": tal_per_sample, "trl": trl_per_sample}


# ---------------------------------------------------------------- token selection embedding
class TokenEmbedding(nn.Module):
    """Selected tokens [B, k, D] -> [B, E]: L2-normalised, FC(x) + MLP(x) (Linear, BatchNorm over
    all B*k tokens, ReLU, Linear), max over the first ``lengths`` tokens (all without lengths)."""

    def __init__(self, width: int, embed_dim: int = 1024):
        super().__init__()
        self.fc = nn.Linear(width, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(width, embed_dim // 2), nn.BatchNorm1d(embed_dim // 2), nn.ReLU(),
                                 nn.Linear(embed_dim // 2, embed_dim))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = tokens.to(self.fc.weight.dtype)  # fp32 under autocast (RDE casts its layers to fp16)
        x = x / (x.norm(dim=-1, keepdim=True) + 1e-8)
        batch, count, width = x.shape
        out = self.mlp(x.reshape(batch * count, width)).view(batch, count, -1) + self.fc(x)
        if lengths is not None:  # selected padding sorts last and is never pooled
            valid = torch.arange(count, device=x.device)[None, :] < lengths[:, None]
            out = out.masked_fill(~valid[..., None], float("-inf"))
        return out.max(dim=1).values


def select_image_tokens(image: ImageOutput, ratio: float) -> torch.Tensor:
    """The int(ratio * patches) patch tokens most attended by CLS in the last ViT block, [B, k, E]."""
    attention = image.attention.clone()
    attention[:, 0] = -1  # never CLS
    k = int((attention.shape[1] - 1) * ratio)
    index = attention.topk(k, dim=1).indices
    return image.tokens.gather(1, index[..., None].expand(-1, -1, image.tokens.shape[-1]))


def select_text_tokens(text: TextOutput, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The int(ratio * (L - 2)) caption tokens most attended by EOT in the last text block (SOT and
    EOT excluded, padding at 0, so it sorts after the words), [B, k, E], and the number of words
    among them (min(words, k)) to pool over."""
    ids, attention = text.ids, text.attention.clone()
    eot = ids.argmax(dim=1)
    rows = torch.arange(len(ids), device=ids.device)
    valid = torch.arange(ids.shape[1], device=ids.device)[None, :] <= eot[:, None]
    attention[rows, eot] = -1
    attention[:, 0] = -1
    attention = attention * valid
    k = int((ids.shape[1] - 2) * ratio)
    index = attention.topk(k, dim=1).indices
    tokens = text.tokens.gather(1, index[..., None].expand(-1, -1, text.tokens.shape[-1]))
    return tokens, (eot - 1).clamp(min=0, max=k)


# ---------------------------------------------------------------- heads
class WeightedPairHead(Head):
    """A per-sample pair loss on the global batch, weighted by ``ccd``'s division and summed."""
    requires = ("ccd",)
    batch_fields = ("index",)
    loss_kind: str = "tal"

    def __init__(self, tau: float, margin: float, weight: float = 1.0):
        super().__init__(weight)
        self.tau, self.margin = tau, margin
        self.peers: dict = {}

    def bind(self, heads, encoder):
        self.peers = {"ccd": heads["ccd"]}

    def pair_features(self, batch, out) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, caption) features of this branch for the local batch."""
        return out.image.global_feature, out.text.global_feature

    def global_losses(self, batch, out) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses of the global batch [G] and the global sample indices."""
        image, text = (all_gather_with_grad(x) for x in self.pair_features(batch, out))
        pids, index = all_gather_no_grad(batch["pids"]), all_gather_no_grad(batch["index"])
        sims = F.normalize(text.float(), dim=1) @ F.normalize(image.float(), dim=1).t()
        return PER_SAMPLE[self.loss_kind](sims, pids, self.tau, self.margin), index

    def per_sample_loss(self, batch, out, encoder) -> torch.Tensor:
        """This process's samples' losses [B] (for the clean/noisy division)."""
        losses, _ = self.global_losses(batch, out)
        local = len(batch["pids"])
        return losses[get_rank() * local:(get_rank() + 1) * local]

    def forward(self, batch, out, encoder):
        losses, index = self.global_losses(batch, out)
        weights = self.peers["ccd"].weights_for(index).to(losses.device)
        return {f"{self.name}_loss": self.weight * (weights * losses).sum()}


def _pair_settings(name: str) -> tuple[Setting, ...]:
    return (loss_weight(name),
            Setting(f"{name}_tau", 0.015, f"temperature of {name}'s positive weights and soft maximum (RDE: 0.015)",
                    low=1e-4),
            Setting(f"{name}_margin", 0.1, f"margin of {name} (RDE: 0.1)", low=0.0))


class GlobalPairHead(WeightedPairHead):
    """The pair loss ``loss_kind`` on the global features, with its own ``<name>_tau``/``_margin``."""
    method = "RDE"

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(*(getattr(cfg, f"{cls.name}_{key}") for key in ("tau", "margin", "loss_weight")))


def _global_pair_head(kind: str, summary: str) -> type[GlobalPairHead]:
    """The registered head ``kind`` (its loss, settings and table row)."""
    attributes = {"name": kind, "loss_kind": kind, "summary": summary, "settings": _pair_settings(kind),
                  "__doc__": f"{kind.upper()} on the global features (RDE's BGE branch)."}
    return register_head(type(f"{kind.upper()}Head", (GlobalPairHead,), attributes))


TALHead = _global_pair_head(
    "tal", "triplet alignment loss on the global features, per sample, weighted by the `ccd` division, summed")
TRLHead = _global_pair_head(
    "trl", "RDE's triplet ranking loss (hardest negative) on the global features, weighted by `ccd`, summed")


@register_head
class TSEHead(WeightedPairHead):
    name = "tse"
    method = "RDE"
    summary = ("token-selection embedding: most attended patches and words, embedded and max-pooled; its own "
               "`tse_loss` term; retrieval averages its cosine with the global one")
    settings = (
        loss_weight("tse"),
        Setting("tse_loss", "tal", "loss of the TSE branch (its tau and margin: those of that head)",
                choices=("tal", "trl")),
        Setting("tse_ratio", 0.3, "share of patches / caption tokens selected (RDE: 0.3)", **PROBABILITY),
        Setting("tse_embed_dim", 1024, "width of the TSE embedding (RDE: 1024)", low=2),
        Setting("tse_lr", 1e-3, "lr of the TSE layers, weights and biases (RDE: 1e-3, absolute)", low=0.0),
        Setting("tse_bn_frozen", True, "keep the TSE BatchNorms at their initial statistics, as RDE's "
                "published runs (which trained in eval mode); off: batch statistics"),
    )
    needs_attention = True

    def __init__(self, width: int, embed_dim: int = 1024, ratio: float = 0.3, loss_kind: str = "tal",
                 tau: float = 0.015, margin: float = 0.1, lr: float = 1e-3, bn_frozen: bool = True,
                 weight: float = 1.0):
        super().__init__(tau, margin, weight)
        self.loss_kind, self.ratio, self.lr, self.bn_frozen = loss_kind, ratio, lr, bn_frozen
        self.image = TokenEmbedding(width, embed_dim)
        self.text = TokenEmbedding(width, embed_dim)
        self.train(True)

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        tau, margin = (cfg.tal_tau, cfg.tal_margin) if cfg.tse_loss == "tal" else (cfg.trl_tau, cfg.trl_margin)
        return cls(encoder_cfg.embed_dim, cfg.tse_embed_dim, cfg.tse_ratio, cfg.tse_loss, tau, margin, cfg.tse_lr,
                   cfg.tse_bn_frozen, cfg.tse_loss_weight)

    def train(self, mode: bool = True) -> "TSEHead":
        super().train(mode)
        if self.bn_frozen:  # RDE's numbers: BatchNorm as a fixed affine map with mean 0, variance 1
            for module in self.modules():
                if isinstance(module, nn.BatchNorm1d):
                    module.eval()
        return self

    def param_rule(self, param_name, param):
        return ParamRule(lr=self.lr)  # weight decay as the recipe: weights (BN scale too), not biases

    def image_features(self, image: ImageOutput) -> torch.Tensor:
        return self.image(select_image_tokens(image, self.ratio))

    def text_features(self, text: TextOutput) -> torch.Tensor:
        return self.text(*select_text_tokens(text, self.ratio))

    def pair_features(self, batch, out):
        return self.image_features(out.image), self.text_features(out.text)

    def retrieval_weights(self):
        return {GLOBAL: 0.5, "tse": 0.5}  # RDE ranks by the mean of the two cosines

    def query_features(self, text):
        return {"tse": self.text_features(text)}

    def gallery_features(self, image):
        return {"tse": self.image_features(image)}


@register_head
class CCDHead(Head):
    """Confident consensus division (RDE processor.py get_loss / split_prob and its do_train)."""
    name = "ccd"
    method = "RDE"
    summary = ("before every epoch: per-sample losses of `tal`/`trl`/`tse`, a 2-component GMM per branch, "
               "consensus: the weights of those heads (required by them)")
    settings = (
        Setting("ccd", True, "divide clean / noisy pairs before every epoch (off: every weight is 1)"),
        Setting("ccd_gmm", "auto", "GMM fit: full (100 iterations, tol 1e-4), fast (10, tol 1e-2), auto (RDE: full "
                "when noisy_rate > 0.4 or on RSTPReid)", choices=("auto", "fast", "full")),
        Setting("ccd_threshold", 0.5, "clean when the posterior of the low-loss component exceeds this",
                **PROBABILITY),
        Setting("ccd_min_noisy_frac", 0.01, "when nothing is noisy, this share with the lowest posteriors is "
                "(RDE: 1/100)", **PROBABILITY),
        Setting("ccd_disagree", "flip", "branches that disagree: flip (RDE's coin, seeded), drop (weight 0), "
                "keep (weight 1)", choices=("flip", "drop", "keep")),
    )
    batch_fields = ("index", "is_clean")

    def __init__(self, enabled: bool = True, gmm: str = "fast", threshold: float = 0.5, min_noisy_frac: float = 0.01,
                 disagree: str = "flip", seed: int = 0):
        super().__init__()
        self.enabled, self.gmm, self.threshold = enabled, gmm, threshold
        self.min_noisy_frac, self.disagree, self.seed = min_noisy_frac, disagree, seed
        self.weights: torch.Tensor | None = None  # per training sample, this epoch; None: all 1
        self.branches: dict[str, WeightedPairHead] = {}

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        gmm = cfg.ccd_gmm
        if gmm == "auto":
            gmm = "full" if cfg.noisy_rate > 0.4 or cfg.dataset_name == "RSTPReid" else "fast"
        return cls(cfg.ccd, gmm, cfg.ccd_threshold, cfg.ccd_min_noisy_frac, cfg.ccd_disagree, cfg.seed)

    def bind(self, heads, encoder):
        self.branches = {name: head for name, head in heads.items() if isinstance(head, WeightedPairHead)}

    def forward(self, batch, out, encoder):
        return {}

    def weights_for(self, index: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return torch.ones(len(index))
        return self.weights[index.cpu()]

    def before_epoch(self, context):
        if not self.enabled or not self.branches:
            self.weights = None
            return {}

        def losses(batch, out, encoder):
            values = {name: head.per_sample_loss(batch, out, encoder) for name, head in self.branches.items()}
            return {**values, "is_clean": batch["is_clean"].float()}

        values = context.per_sample(losses)
        seen = ~values["is_clean"].isnan()
        random_state = self.seed * 1000 + context.epoch
        logger.info("epoch %d division over the branches %s", context.epoch, ", ".join(self.branches))
        clean = [clean_division(values[name][seen].numpy(), self.gmm, self.threshold, self.min_noisy_frac,
                                random_state) for name in self.branches]
        label = consensus(np.stack(clean), self.disagree, torch.Generator().manual_seed(random_state))
        self.weights = torch.ones(context.num_samples)
        self.weights[seen] = torch.from_numpy(label).float()
        stats = division_stats(label, clean, values["is_clean"][seen].numpy())
        logger.info("epoch %d clean/noisy division: %s", context.epoch,
                    ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
        return stats

    def training_state(self):
        return {"weights": self.weights}

    def load_training_state(self, state):
        self.weights = state["weights"]


# ---------------------------------------------------------------- the division
GMM_SETTINGS = {"fast": dict(max_iter=10, tol=1e-2, reg_covar=5e-4),
                "full": dict(max_iter=100, tol=1e-4, reg_covar=1e-6)}


def gaussian_mixture_class():
    """scikit-learn's GaussianMixture, imported on first use (scikit-learn is slow to import). Its
    first import draws from Python's global RNG, which the caption augmentations use: the state is
    put back, so a run does not depend on whether scikit-learn was imported before."""
    state = random.getstate()
    from sklearn.mixture import GaussianMixture
    random.setstate(state)
    return GaussianMixture


def clean_posterior(losses: np.ndarray, gmm: str, random_state: int) -> np.ndarray:
    """Posterior of the low-mean component of a 2-component GMM on the min-max normalised losses."""
    GaussianMixture = gaussian_mixture_class()
    span = losses.max() - losses.min()
    normalised = ((losses - losses.min()) / (span if span > 0 else 1.0)).astype(np.float32).reshape(-1, 1)
    mixture = GaussianMixture(n_components=2, random_state=random_state, **GMM_SETTINGS[gmm]).fit(normalised)
    clean = mixture.means_.argmin()
    logger.info("GMM (%s): clean mean %.4f weight %.3f, noisy mean %.4f weight %.3f, %d iterations", gmm,
                mixture.means_[clean, 0], mixture.weights_[clean], mixture.means_[1 - clean, 0],
                mixture.weights_[1 - clean], mixture.n_iter_)
    return mixture.predict_proba(normalised)[:, clean]


def split_by_posterior(posterior: np.ndarray, threshold: float = 0.5, min_noisy_frac: float = 0.01) -> np.ndarray:
    """Clean (1) where posterior > threshold; if that leaves nothing noisy, the threshold becomes the
    posterior at rank int(N * min_noisy_frac) (RDE's 1/100 fallback, from NCR)."""
    if posterior.min() > threshold:
        threshold = np.sort(posterior)[int(len(posterior) * min_noisy_frac)]
    return (posterior > threshold).astype(np.int64)


def clean_division(losses: np.ndarray, gmm: str, threshold: float, min_noisy_frac: float,
                   random_state: int) -> np.ndarray:
    return split_by_posterior(clean_posterior(losses, gmm, random_state), threshold, min_noisy_frac)


def consensus(clean: np.ndarray, disagree: str, generator: torch.Generator) -> np.ndarray:
    """Weight 1 where every branch says clean, 0 where none does; disagreements: a coin drawn in
    ascending index order (flip), 0 (drop) or 1 (keep)."""
    votes = clean.sum(axis=0)
    label = (votes == len(clean)).astype(np.int64)
    split = (votes > 0) & (votes < len(clean))
    if disagree == "flip":
        label[split] = torch.randint(0, 2, (int(split.sum()),), generator=generator).numpy()
    elif disagree == "keep":
        label[split] = 1
    return label


def division_stats(label: np.ndarray, clean: list[np.ndarray], is_clean: np.ndarray) -> dict[str, float]:
    """Sizes of the division and its precision / recall against the known clean pairs."""
    votes = np.stack(clean).sum(axis=0)
    stats = {"ccd_clean": float((votes == len(clean)).sum()), "ccd_noisy": float((votes == 0).sum()),
             "ccd_uncertain": float(((votes > 0) & (votes < len(clean))).sum()), "ccd_weight_mean": float(label.mean())}
    truly_noisy, called_noisy = is_clean == 0, label == 0
    if truly_noisy.any():
        hits = float((truly_noisy & called_noisy).sum())
        stats["ccd_noisy_recall"] = hits / float(truly_noisy.sum())
        stats["ccd_noisy_precision"] = hits / max(float(called_noisy.sum()), 1.0)
    kept = label == 1
    stats["ccd_clean_precision"] = float((kept & (is_clean == 1)).sum()) / max(float(kept.sum()), 1.0)
    stats["ccd_clean_recall"] = float((kept & (is_clean == 1)).sum()) / max(float((is_clean == 1).sum()), 1.0)
    return stats


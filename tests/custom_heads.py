"""Heads defined only in the test suite: they take part in retrieval and keep per-epoch state
through the head interface alone (no framework file knows them).

- ``test_mean``: adds the feature set ``mean`` (mean of the caption's tokens SOT+1..EOT / mean of
  the image's patch tokens), combined with the global cosine by the weights in its settings.
- ``test_rerank``: re-scores each query's top ``rerank_k`` from cached tokens (caption token means
  against each gallery image's max-pooled patch tokens) and combines the two stages with the
  whole-matrix ranges, as APTM's re-ranking does.
- ``test_epoch``: before every epoch, a pass over the training set keeps a running average of each
  sample's image-text cosine; its loss weights each sample by whether it is above the median.
- ``test_shared`` / ``test_user``: a module shared through a head of its own; its user requires it,
  binds to it and reads an extra caption field that the model encodes once (``text_fields``).

``registered()`` registers them for the duration of a ``with`` block; ``register_all()`` for good
(torchrun workers).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from model.heads import GLOBAL, Head, register_head, unregister_head
from utils.settings import Setting


def caption_mean(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of each caption's tokens after SOT up to EOT inclusive, [B, E] (fp32)."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    valid = ((positions >= 1) & (positions <= ids.argmax(dim=1, keepdim=True))).float()
    return (tokens.float() * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)


def patch_mean(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 1:].float().mean(1)


def pair_score(query_tokens: torch.Tensor, query_ids: torch.Tensor, gallery_tokens: torch.Tensor) -> torch.Tensor:
    """The re-ranker's score of n pairs: cosine of the caption mean and the max-pooled patches."""
    pooled = gallery_tokens[:, 1:].float().amax(1)
    return F.cosine_similarity(caption_mean(query_tokens, query_ids), pooled, dim=1)


class MeanSetHead(Head):
    name = "test_mean"
    summary = "test head: a second feature set"
    settings = (Setting("test_mean_weight", 1.0, "weight of the mean feature set", low=0.0),
                Setting("test_global_weight", 1.0, "weight of the global feature set", low=0.0))

    def __init__(self, weight: float, global_weight: float):
        super().__init__()
        self.set_weight, self.global_weight = weight, global_weight

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.test_mean_weight, cfg.test_global_weight)

    def forward(self, batch, out, encoder):
        return {}

    def retrieval_weights(self):
        return {GLOBAL: self.global_weight, "mean": self.set_weight}

    def query_features(self, text):
        return {"mean": caption_mean(text.tokens, text.ids)}

    def gallery_features(self, image):
        return {"mean": patch_mean(image.tokens)}


class RerankHead(Head):
    name = "test_rerank"
    summary = "test head: a re-ranking stage"
    settings = (Setting("test_first_stage_weight", 0.5, "weight of the normalised first stage", low=0.0),)

    def __init__(self, rerank_k: int, first_weight: float):
        super().__init__()
        self.rerank_k, self.first_weight = rerank_k, first_weight
        self.calls = 0

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.rerank_k, cfg.test_first_stage_weight)

    def forward(self, batch, out, encoder):
        return {}

    def rerank_query_cache(self, text):
        return {"tokens": text.tokens, "ids": text.ids}

    def rerank_gallery_cache(self, image):
        return {"tokens": image.tokens}

    def rerank_score(self, query, gallery):
        self.calls += 1
        assert query["tokens"].dtype == gallery["tokens"].dtype == torch.float16  # kept in half precision
        return pair_score(query["tokens"], query["ids"], gallery["tokens"])

    def rerank_combine(self, second, first, stats):
        return combine(second, first, stats, self.first_weight)


def combine(second, first, stats, first_weight: float) -> torch.Tensor:
    """Each stage min-max normalised over the whole evaluation, then a weighted sum."""
    return ((second - stats.second_min) / (stats.second_max - stats.second_min)
            + first_weight * (first - stats.first_min) / (stats.first_max - stats.first_min))


class EpochStateHead(Head):
    name = "test_epoch"
    summary = "test head: per-epoch per-sample state"
    batch_fields = ("index",)

    def __init__(self):
        super().__init__()
        self.average: torch.Tensor | None = None  # running mean of each sample's cosine over epochs
        self.passes = 0

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls()

    def before_epoch(self, context):
        cosine = context.per_sample(lambda batch, out, encoder: {"cos": F.cosine_similarity(
            out.image.global_feature, out.text.global_feature, dim=1)})["cos"]
        self.passes += 1
        self.average = cosine if self.average is None else self.average + (cosine - self.average) / self.passes

    def forward(self, batch, out, encoder):
        weights = (self.average[batch["index"].cpu()] >= self.average.nanmedian()).float().to(batch["images"].device)
        cosine = F.cosine_similarity(out.image.global_feature, out.text.global_feature, dim=1)
        return {"test_epoch_loss": (weights * (1 - cosine)).mean()}

    def training_state(self):
        return {"average": self.average, "passes": self.passes}

    def load_training_state(self, state):
        self.average, self.passes = state["average"], state["passes"]


class SharedHead(Head):
    name = "test_shared"
    summary = "test head: a module other heads share"

    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(encoder_cfg.embed_dim)

    def forward(self, batch, out, encoder):
        return {}


class UserHead(Head):
    name = "test_user"
    summary = "test head: uses test_shared and the masked caption's encoding"
    requires = ("test_shared",)
    batch_fields = ("mlm_ids", "mlm_labels")
    text_fields = ("mlm_ids",)

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls()

    def bind(self, heads, encoder):
        self.peers = {"shared": heads["test_shared"]}

    def forward(self, batch, out, encoder):
        masked = self.peers["shared"].proj(out.texts["mlm_ids"].global_feature)
        return {"test_user_loss": (1 - F.cosine_similarity(masked, out.image.global_feature, dim=1)).mean()}


HEAD_CLASSES = (MeanSetHead, RerankHead, EpochStateHead, SharedHead, UserHead)


def register_all() -> None:
    for cls in HEAD_CLASSES:
        register_head(cls)


@contextlib.contextmanager
def registered():
    register_all()
    try:
        yield
    finally:
        for cls in HEAD_CLASSES:
            unregister_head(cls.name)

"""What a model ranks with, as its heads define it: weighted feature sets and an optional re-ranker.

The first stage ranks the gallery by ``sum_s w_s cos_s(query, item)`` over the feature sets ``s``:
the encoder's global features (``global``: CLS vs EOT, weight 1 unless a head says otherwise) and
every set a head adds (``Head.retrieval_weights``). The weighted sum is one dot product of
concatenated features, each set L2-normalised and scaled by sqrt(w_s), so the chunked metrics
engine ranks it exactly without a query x gallery matrix. At most one head re-ranks each query's
top ``rerank_k`` (``Head.rerank_k``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils.errors import ConfigError

from .clip import CLIPEncoder, ImageOutput, TextOutput
from .heads import GLOBAL, Head

CACHE_DTYPE = torch.float16  # re-ranking caches are kept in half precision
Features = dict[str, torch.Tensor]


class RetrievalDefinition:
    """The feature sets, their weights and the re-ranking head of a set of heads."""

    def __init__(self, heads: dict[str, Head]):
        self.heads = heads
        self.weights: dict[str, float] = {GLOBAL: 1.0}
        owners: dict[str, str] = {}
        for name, head in heads.items():
            for feature_set, weight in head.retrieval_weights().items():
                if weight < 0 or not math.isfinite(weight):
                    raise ConfigError(f"head '{name}' gives feature set '{feature_set}' the weight {weight}; "
                                      "weights must be finite and >= 0")
                if feature_set in owners and (feature_set != GLOBAL or self.weights[GLOBAL] != weight):
                    raise ConfigError(f"heads '{owners[feature_set]}' and '{name}' both set the retrieval "
                                      f"weight of feature set '{feature_set}'")
                owners[feature_set] = name
                self.weights[feature_set] = weight
        if not any(self.weights.values()):
            raise ConfigError("every retrieval feature set has weight 0")
        rerankers = [name for name, head in heads.items() if head.rerank_k > 0]
        if len(rerankers) > 1:
            raise ConfigError(f"heads {', '.join(rerankers)} all re-rank; at most one head may")
        self.reranker: Head | None = heads[rerankers[0]] if rerankers else None
        self.needs_attention = any(head.needs_attention for head in heads.values())

    @property
    def feature_sets(self) -> list[str]:
        return list(self.weights)

    def blocks(self) -> list[str]:
        """Result blocks an evaluation reports: ``t2i`` (first stage), ``t2i_<set>`` per feature set
        when there are several, ``t2i_rerank`` with a re-ranker, and ``i2t``."""
        blocks = ["t2i"]
        if len(self.weights) > 1:
            blocks += [f"t2i_{feature_set}" for feature_set in self.weights]
        if self.reranker is not None:
            blocks.append("t2i_rerank")
        return blocks + ["i2t"]

    @torch.no_grad()
    def encode_queries(self, encoder: CLIPEncoder, ids: torch.Tensor) -> tuple[Features, Features]:
        """(fp32 features per set, re-ranking cache) of a batch of captions, from one text pass."""
        return self._collect(encoder.text_output(ids, self.needs_attention), "query_features", "rerank_query_cache")

    @torch.no_grad()
    def encode_gallery(self, encoder: CLIPEncoder, images: torch.Tensor) -> tuple[Features, Features]:
        """(fp32 features per set, re-ranking cache) of a batch of images, from one image pass."""
        return self._collect(encoder.image_output(images, self.needs_attention), "gallery_features",
                             "rerank_gallery_cache")

    def _collect(self, output: ImageOutput | TextOutput, features_method: str, cache_method: str
                 ) -> tuple[Features, Features]:
        features = {GLOBAL: output.global_feature}
        for head in self.heads.values():
            features.update(getattr(head, features_method)(output))
        cache = getattr(self.reranker, cache_method)(output) if self.reranker is not None else {}
        return _float(features), _half(cache)

    def combine(self, normalised: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenation of the L2-normalised sets scaled by sqrt(weight): its dot products are the
        first-stage scores. Sets of weight 0 are left out."""
        parts = [normalised[s] if w == 1.0 else normalised[s] * math.sqrt(w)
                 for s, w in self.weights.items() if w > 0]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def normalise(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: F.normalize(value, dim=1) for name, value in features.items()}


def _float(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.float() for name, value in features.items()}


def _half(cache: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.to(CACHE_DTYPE) if value.is_floating_point() else value for name, value in cache.items()}

"""Rank an index's images for sentences, as the run's evaluation ranks a test gallery.

The first stage is the dot product of the query's combined features with the index rows (the
evaluation's score); ties go to the lower row (the evaluation's order). A run with a re-ranking
head re-scores each query's first-stage top ``rerank_k`` with the index's gallery cache. One
difference from an evaluation: a re-ranker that normalises by score ranges (APTM's ``aptm``
mode) gets the ranges of this query alone, where an evaluation takes them over all its queries.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from model.heads import GLOBAL
from model.retrieval import normalise
from model.run import TrainedRun
from utils.errors import UserError
from utils.metrics import RerankStats
from datasets.captions import pre_caption
from utils.simple_tokenizer import SimpleTokenizer, pad_ids

from .index import SearchIndex

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000


class QueryError(UserError):
    """A sentence that cannot be searched: empty or too long."""


@dataclass(frozen=True)
class Hit:
    rank: int      # 1-based
    score: float   # the final score (first stage, or the re-ranker's)
    path: str
    row: int       # the index row


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best columns of each row of ``scores`` [B, N] and their scores, best first, ties
    to the lower column (a stable descending sort's first k, without sorting all N)."""
    k = min(k, scores.shape[1])
    indices, values = [], []
    for row in scores:
        threshold = row.topk(k).values[-1]
        candidates = torch.nonzero(row >= threshold).squeeze(1)  # ascending columns, ties included
        best = candidates[torch.sort(row[candidates], descending=True, stable=True).indices[:k]]
        indices.append(best)
        values.append(row[best])
    return torch.stack(indices), torch.stack(values)


class Searcher:
    """A run's model and an index it made, loaded once; ``search`` ranks the index for sentences."""

    def __init__(self, run: TrainedRun, index: SearchIndex, device: torch.device = torch.device("cpu")):
        index.check_made_by(run)
        if not len(index):
            raise UserError(f"the index of {index.root} holds no image")
        self.run, self.index, self.device = run, index, device
        self.model = run.model.to(device).eval()
        self.retrieval = run.model.retrieval
        self.features = index.features.to(device)
        self.tokenizer = SimpleTokenizer()
        self.text_length = run.cfg.text_length
        # Only the EOT output is used: the causal text encoder can stop there (same features, less work).
        self.stop_at_eot = list(self.retrieval.weights) == [GLOBAL] and self.retrieval.reranker is None
        self.timing: dict[str, float] = {}  # milliseconds of the last search, by stage

    def token_ids(self, sentence: str, strict: bool = False) -> torch.Tensor:
        """The sentence's ids; too long for the model: an error (``strict``) or cut, as in training."""
        text = sentence.strip()
        if getattr(self.run.cfg, "caption_clean", "none") == "tbps":  # as the run's test queries were
            text = pre_caption(text, self.run.cfg.caption_max_words)
        if not text:
            raise QueryError("empty query")
        if len(text) > MAX_QUERY_CHARS:
            raise QueryError(f"query of {len(text)} characters; at most {MAX_QUERY_CHARS}")
        bpe = self.tokenizer.encode(text)
        if len(bpe) > self.text_length - 2:
            message = f"query of {len(bpe)} tokens; the model reads at most {self.text_length - 2}"
            if strict:
                raise QueryError(message)
            logger.warning("%s: the rest of '%s...' is ignored", message, text[:40])
        return pad_ids(bpe, self.tokenizer, self.text_length)

    @torch.no_grad()
    def search(self, sentences: list[str], k: int = 10, strict: bool = False) -> list[list[Hit]]:
        """The top ``k`` images of each sentence, best first."""
        started = time.perf_counter()
        ids = torch.stack([self.token_ids(s, strict) for s in sentences]).to(self.device)
        if self.stop_at_eot:
            ids = ids[:, :int(ids.argmax(dim=1).max()) + 1]
        tokenized = time.perf_counter()
        features, cache = self.retrieval.encode_queries(self.model.encoder, ids)
        query = self.retrieval.combine(normalise(features))
        encoded = time.perf_counter()
        scores = query @ self.features.t()
        reranker = self.retrieval.reranker
        width = max(k, reranker.rerank_k) if reranker is not None else k
        rows, values = top_k(scores, width)
        scored = time.perf_counter()
        if reranker is not None:
            rows, values = self._rerank(reranker, cache, scores, rows, values)
        done = time.perf_counter()
        self.timing = {"tokenize": 1e3 * (tokenized - started), "encode": 1e3 * (encoded - tokenized),
                       "score_top_k": 1e3 * (scored - encoded), "rerank": 1e3 * (done - scored),
                       "total": 1e3 * (done - started)}
        return [[Hit(rank + 1, float(score), str(self.index.path(int(row))), int(row))
                 for rank, (row, score) in enumerate(zip(r[:k].tolist(), v[:k].tolist()))]
                for r, v in zip(rows, values)]

    def _rerank(self, head, cache: dict[str, torch.Tensor], scores: torch.Tensor, rows: torch.Tensor,
                values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's first-stage top ``rerank_k`` re-ordered by the head (ties keep the first-stage
        order); the rest keep their first-stage order."""
        k = min(head.rerank_k, rows.shape[1])
        out_rows, out_values = [], []
        for q in range(len(rows)):
            top = rows[q, :k]
            query_rows = {key: value[q:q + 1].expand(k, *value.shape[1:]).to(self.device)
                          for key, value in cache.items()}
            gallery_rows = {key: value[top.cpu()].to(self.device) for key, value in self.index.cache.items()}
            second = head.rerank_score(query_rows, gallery_rows).float()[None]
            stats = RerankStats(float(scores[q].min()), float(scores[q].max()), float(second.min()),
                                float(second.max()))
            final = head.rerank_combine(second, values[q:q + 1, :k], stats)[0]
            order = torch.sort(final, descending=True, stable=True).indices
            out_rows.append(torch.cat([top[order], rows[q, k:]]))
            out_values.append(torch.cat([final[order], values[q, k:]]))
        return torch.stack(out_rows), torch.stack(out_values)

"""Retrieval metrics with IRRA's definitions (CMC Rank-k, mAP, mINP), exact and memory-bounded.

For each query the gallery is ranked by descending score; equal scores are ordered by gallery
index, lower first (a stable sort; IRRA's unstable argsort leaves them arbitrary). With |P| true
matches at 1-based ranks r_1 < ... < r_|P|:
  CMC@k = 1[r_1 <= k],  AP = (1/|P|) sum_m m / r_m,  INP = |P| / r_|P|   (percentages, averaged).
The rank of a match is one plus the number of gallery items ranked before it, so the engine
never sorts: scores are computed from the features one query chunk at a time and each chunk is
reduced to the ranks of its matches (a [Q, P] table). The metrics are a function of that table
alone (one float64 sum over all queries), so any split of the queries into chunks or processes
gives the same numbers. Queries whose identity has no gallery item are excluded and counted. Runs on the
features' device.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from prettytable import PrettyTable

from .rank_kernels import count_ranked_before

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 26  # scores held at once (256 MB in fp32)
TOPK = (1, 5, 10)


@dataclass(frozen=True)
class RerankStats:
    """Ranges over every query of an evaluation: the first-stage scores of the whole query x gallery
    matrix and the second-stage scores of every re-scored pair (some re-rankers normalise by them)."""
    first_min: float
    first_max: float
    second_min: float
    second_max: float


@dataclass
class ReRanker:
    """Second stage: re-scores the first-stage top ``k`` gallery items of each query.

    ``score(query_index [c], gallery_index [c, k]) -> [c, k]``; ``combine(second [Q, k], first [Q, k],
    stats) -> [Q, k]`` turns them into the final scores (default: the second-stage scores). Higher
    is better; the re-scored items are re-ordered among themselves (ties keep the first-stage
    order) and items beyond the top k keep their first-stage rank.
    """
    k: int
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    combine: Callable[[torch.Tensor, torch.Tensor, RerankStats], torch.Tensor] | None = None


def _match_table(query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery indices of each query's true matches, [Q, P] (padded), and their number, [Q]."""
    gallery_pids, query_pids = gallery_pids.cpu(), query_pids.cpu()
    order = torch.argsort(gallery_pids, stable=True)
    ids, counts = torch.unique_consecutive(gallery_pids[order], return_counts=True)
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slots = (starts[:, None] + torch.arange(width)).clamp(max=len(order) - 1)
    table = order[slots]
    where = torch.searchsorted(ids, query_pids.contiguous()).clamp(max=len(ids) - 1)
    found = ids[where] == query_pids
    return table[where], torch.where(found, counts[where], 0)


def count_before_torch(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Items ranked before each match (score higher, or equal with a lower gallery index), on any
    device: one vectorised pass per match column. ``positions`` [c, P] gallery indices."""
    thresholds = scores.gather(1, positions)
    columns = torch.arange(scores.shape[1], device=scores.device)
    counts = [(scores > thresholds[:, k:k + 1]).sum(1)
              + ((scores == thresholds[:, k:k + 1]) & (columns < positions[:, k:k + 1])).sum(1)
              for k in range(positions.shape[1])]
    return torch.stack(counts, dim=1)


def _count_before(scores: torch.Tensor, positions: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
    """``count_before_torch``, with the compiled kernels on CPU (entries beyond ``num`` unused)."""
    if scores.device.type != "cpu":
        return count_before_torch(scores, positions)
    if scores.dtype not in (torch.float32, torch.float64):  # numpy has no bf16; fp16 kernels are slow
        scores = scores.float()
    scores = scores.contiguous()
    thresholds = scores.gather(1, positions)
    return torch.from_numpy(count_ranked_before(scores.numpy(), thresholds.numpy(),
                                                positions.numpy(), num.numpy()))


def metrics_from_ranks(ranks: torch.Tensor, num: torch.Tensor, topk: tuple[int, ...] = TOPK) -> dict[str, float]:
    """R<k>, mAP and mINP (percentages) from the 1-based ranks of each query's matches [Q, P]
    (entries beyond ``num`` [Q] ignored); queries with ``num`` 0 are excluded (and counted).
    Sums are exact (``math.fsum``), so the result depends on the table only."""
    keep = num > 0
    excluded = int((~keep).sum())
    if excluded:
        logger.warning("%d queries have no true match in the gallery and are excluded", excluded)
    ranks, num = ranks[keep].double().cpu(), num[keep].cpu()
    if not len(num):
        raise ValueError("no query has a true match in the gallery")
    slot = torch.arange(ranks.shape[1])
    ranks = ranks.masked_fill(slot >= num[:, None], float("inf")).sort(dim=1).values
    first = ranks[:, 0]
    ap = ((slot + 1) / ranks).sum(1) / num
    inp = num / ranks.gather(1, (num - 1)[:, None]).squeeze(1)
    valid = len(num)
    out = {f"R{k}": int((first <= k).sum()) * 100 / valid for k in topk}
    out.update(mAP=float(ap.sum()) * 100 / valid, mINP=float(inp.sum()) * 100 / valid)
    return out


@dataclass
class FirstStage:
    """Per query: the ranks of its true matches [Q, P], their gallery indices [Q, P] and number [Q];
    with ``keep`` > 0 also the top ``keep`` gallery indices and scores [Q, keep] and the range of
    every score computed."""
    ranks: torch.Tensor
    positions: torch.Tensor
    num: torch.Tensor
    top: torch.Tensor | None = None
    top_scores: torch.Tensor | None = None
    low: float = math.inf
    high: float = -math.inf


def _score_chunks(query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                  chunk_size: int | None) -> Iterator[tuple[int, torch.Tensor]]:
    rows = chunk_size or max(1, CHUNK_ELEMENTS // max(1, gallery_feats.shape[0]))
    for start in range(0, query_feats.shape[0], rows):
        yield start, query_feats[start:start + rows] @ gallery_feats.t()


def _check_sizes(num_queries: int, num_gallery: int, query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> None:
    if (num_queries, num_gallery) != (len(query_pids), len(gallery_pids)):
        raise ValueError(f"scores for {num_queries} queries x {num_gallery} gallery items, but "
                         f"{len(query_pids)} query and {len(gallery_pids)} gallery pids")


def _first_stage(chunks, query_pids: torch.Tensor, gallery_pids: torch.Tensor, keep: int = 0) -> FirstStage:
    positions, num = _match_table(query_pids, gallery_pids)
    ranks, tops, top_scores = [], [], []
    low, high = math.inf, -math.inf
    for start, scores in chunks:
        where = positions[start:start + scores.shape[0]]
        count = num[start:start + scores.shape[0]]
        ranks.append(_count_before(scores, where.to(scores.device), count).cpu() + 1)
        if keep:
            k = min(keep, scores.shape[1])
            top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
            tops.append(top.cpu())
            top_scores.append(scores.gather(1, top).cpu())
            if scores.numel():
                low, high = min(low, float(scores.min())), max(high, float(scores.max()))
    width = positions.shape[1]
    stage = FirstStage(torch.cat(ranks) if ranks else torch.zeros(0, width, dtype=torch.long), positions, num)
    if keep:
        k = min(keep, len(gallery_pids))  # no queries: still [0, k], the shape other processes have
        stage.top = torch.cat(tops) if tops else torch.zeros(0, k, dtype=torch.long)
        stage.top_scores = torch.cat(top_scores) if top_scores else torch.zeros(0, k)
        stage.low, stage.high = low, high
    return stage


def first_stage(query_feats: torch.Tensor, gallery_feats: torch.Tensor, query_pids: torch.Tensor,
                gallery_pids: torch.Tensor, *, keep: int = 0, chunk_size: int | None = None) -> FirstStage:
    """The match ranks of every query ranking the gallery by ``q @ g.T`` (and its top ``keep``)."""
    _check_sizes(len(query_feats), len(gallery_feats), query_pids, gallery_pids)
    return _first_stage(_score_chunks(query_feats, gallery_feats, chunk_size), query_pids, gallery_pids, keep)


def rescore(stage: FirstStage, reranker: ReRanker, queries: torch.Tensor, pair_batch: int = 4096) -> torch.Tensor:
    """Second-stage scores [Q, k] of each query's first-stage top k, ``pair_batch`` pairs per call
    of ``reranker.score`` (whole queries). ``queries`` are the queries' global indices."""
    k = stage.top.shape[1]
    rows = max(1, pair_batch // max(1, k))
    parts = [reranker.score(queries[start:start + rows], stage.top[start:start + rows]).float().cpu()
             for start in range(0, len(queries), rows)]
    return torch.cat(parts) if parts else torch.zeros(0, k)


def reranked_order(stage: FirstStage, final: torch.Tensor) -> torch.Tensor:
    """Each query's top k re-ordered by ``final`` [Q, k] (descending; ties keep the first-stage order)."""
    return stage.top.gather(1, torch.sort(final, dim=1, descending=True, stable=True).indices)


def reranked_ranks(stage: FirstStage, order: torch.Tensor) -> torch.Tensor:
    """Match ranks [Q, P] after re-ordering: a match within the top k takes its position in
    ``order``; the others keep their first-stage rank (they were ranked beyond k already)."""
    hit = order[:, None, :] == stage.positions[:, :, None]  # [Q, P, k]
    return torch.where(hit.any(dim=2), hit.float().argmax(dim=2) + 1, stage.ranks)


def local_stats(stage: FirstStage, second: torch.Tensor) -> RerankStats:
    if second.numel():
        return RerankStats(stage.low, stage.high, float(second.min()), float(second.max()))
    return RerankStats(stage.low, stage.high, math.inf, -math.inf)


def retrieval_metrics(query_feats: torch.Tensor, gallery_feats: torch.Tensor, query_pids: torch.Tensor,
                      gallery_pids: torch.Tensor, *, topk: tuple[int, ...] = TOPK,
                      chunk_size: int | None = None) -> dict[str, float]:
    """R<k> for k in ``topk``, mAP and mINP (percentages) ranking the gallery by ``q @ g.T``.

    Features are used as given (L2-normalise them for cosine similarity); scores are computed
    ``chunk_size`` queries at a time (default: about 2^26 scores per chunk).
    """
    stage = first_stage(query_feats, gallery_feats, query_pids, gallery_pids, chunk_size=chunk_size)
    return metrics_from_ranks(stage.ranks, stage.num, tuple(topk))


def reranked_retrieval_metrics(query_feats, gallery_feats, query_pids, gallery_pids, reranker: ReRanker, *,
                               topk: tuple[int, ...] = TOPK, chunk_size: int | None = None,
                               pair_batch: int = 4096) -> tuple[dict[str, float], dict[str, float]]:
    """(first-stage metrics, metrics after ``reranker`` re-orders each query's top k)."""
    stage = first_stage(query_feats, gallery_feats, query_pids, gallery_pids, keep=reranker.k,
                        chunk_size=chunk_size)
    second = rescore(stage, reranker, torch.arange(len(query_feats)), pair_batch)
    final = second if reranker.combine is None else reranker.combine(second, stage.top_scores,
                                                                     local_stats(stage, second))
    ranks = reranked_ranks(stage, reranked_order(stage, final))
    return metrics_from_ranks(stage.ranks, stage.num, tuple(topk)), metrics_from_ranks(ranks, stage.num, tuple(topk))


def rank(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = 10,
         chunk_size: int = 1024) -> dict[str, float]:
    """Metrics from a precomputed [Q, G] similarity: R1..R<max_rank>, mAP, mINP and ``excluded``."""
    _check_sizes(*similarity.shape, q_pids, g_pids)
    chunks = ((s, similarity[s:s + chunk_size]) for s in range(0, similarity.shape[0], chunk_size))
    stage = _first_stage(chunks, q_pids, g_pids)
    return {**metrics_from_ranks(stage.ranks, stage.num, tuple(range(1, max_rank + 1))),
            "excluded": int((stage.num == 0).sum())}


def results_table(results: dict[str, dict[str, float]]) -> PrettyTable:
    table = PrettyTable(["task", "R1", "R5", "R10", "mAP", "mINP"])
    table.float_format = ".3"
    for task, r in results.items():
        table.add_row([task, r["R1"], r["R5"], r["R10"], r["mAP"], r["mINP"]])
    return table

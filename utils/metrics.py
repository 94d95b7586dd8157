"""Retrieval metrics with IRRA's definitions (CMC Rank-k, mAP, mINP), exact and memory-bounded.

For each query the gallery is ranked by descending score; equal scores are ordered by gallery
index, lower first (a stable sort; IRRA's unstable argsort leaves them arbitrary). With |P| true
matches at 1-based ranks r_1 < ... < r_|P|:
  CMC@k = 1[r_1 <= k],  AP = (1/|P|) sum_m m / r_m,  INP = |P| / r_|P|   (percentages, averaged).
The rank of a match is one plus the number of gallery items ranked before it, so the engine
never sorts: scores are computed from the features one query chunk at a time and each chunk is
reduced to the ranks of its matches. Queries whose identity has no gallery item are excluded and
counted. Runs on the features' device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from prettytable import PrettyTable

from .errors import UserError
from .rank_kernels import count_ranked_before

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 26  # scores held at once (256 MB in fp32)


@dataclass
class ReRanker:
    """Second stage: re-scores the first-stage top ``k`` gallery items of each query.

    ``score(query_index [c], gallery_index [c, k]) -> [c, k]``; higher is better. The re-scored
    items are re-ordered among themselves; items beyond the top k keep their first-stage rank.
    """
    k: int
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


class _Accumulator:
    """Sums CMC@k, AP and INP over chunks of match ranks."""

    def __init__(self, topk: tuple[int, ...]):
        self.topk = topk
        self.cmc = torch.zeros(len(topk), dtype=torch.float64)
        self.ap = self.inp = 0.0
        self.valid = self.excluded = 0

    def add(self, ranks: torch.Tensor, num: torch.Tensor) -> None:
        """``ranks`` [c, P] 1-based (entries beyond ``num`` ignored)."""
        keep = num > 0
        self.excluded += int((~keep).sum())
        ranks, num = ranks[keep].double(), num[keep].to(ranks.device)
        if not len(num):
            return
        slot = torch.arange(ranks.shape[1], device=ranks.device)
        ranks = ranks.masked_fill(slot >= num[:, None], float("inf")).sort(dim=1).values
        first = ranks[:, 0]
        self.cmc += torch.stack([(first <= k).sum() for k in self.topk]).double().cpu()
        self.ap += float(((slot + 1) / ranks).sum(1).div(num).sum())
        self.inp += float((num / ranks.gather(1, (num - 1)[:, None]).squeeze(1)).sum())
        self.valid += len(num)

    def result(self) -> dict[str, float]:
        if self.excluded:
            logger.warning("%d queries have no true match in the gallery and are excluded", self.excluded)
        if not self.valid:
            raise ValueError("no query has a true match in the gallery")
        out = {f"R{k}": float(v) * 100 / self.valid for k, v in zip(self.topk, self.cmc)}
        out.update(mAP=self.ap * 100 / self.valid, mINP=self.inp * 100 / self.valid)
        return out


def _score_chunks(query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                  chunk_size: int | None) -> Iterator[tuple[int, torch.Tensor]]:
    rows = chunk_size or max(1, CHUNK_ELEMENTS // max(1, gallery_feats.shape[0]))
    for start in range(0, query_feats.shape[0], rows):
        yield start, query_feats[start:start + rows] @ gallery_feats.t()


def _check_sizes(num_queries: int, num_gallery: int, query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> None:
    if (num_queries, num_gallery) != (len(query_pids), len(gallery_pids)):
        raise ValueError(f"scores for {num_queries} queries x {num_gallery} gallery items, but "
                         f"{len(query_pids)} query and {len(gallery_pids)} gallery pids")


def _evaluate(chunks, query_pids, gallery_pids, topk, reranker: ReRanker | None):
    table, num = _match_table(query_pids, gallery_pids)
    first, second = _Accumulator(topk), _Accumulator(topk)
    for start, scores in chunks:
        positions = table[start:start + scores.shape[0]].to(scores.device)
        count = num[start:start + scores.shape[0]]
        before = _count_before(scores, positions, count)
        ranks = before.to(count.device) + 1
        first.add(ranks, count)
        if reranker is not None:
            second.add(_rerank(scores, start, positions, ranks.to(scores.device), reranker), count)
    return first, second


def _rerank(scores: torch.Tensor, start: int, positions: torch.Tensor, ranks: torch.Tensor,
            reranker: ReRanker) -> torch.Tensor:
    """Match ranks after re-ordering each query's first-stage top k by the second-stage scores."""
    k = min(reranker.k, scores.shape[1])
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    queries = torch.arange(start, start + scores.shape[0], device=scores.device)
    new = reranker.score(queries, top).to(scores.device)
    reordered = top.gather(1, torch.sort(new, dim=1, descending=True, stable=True).indices)
    hit = reordered[:, None, :] == positions[:, :, None]  # [c, P, k]
    in_top = hit.any(dim=2)
    return torch.where(in_top, hit.float().argmax(dim=2) + 1, ranks).cpu()


def retrieval_metrics(query_feats: torch.Tensor, gallery_feats: torch.Tensor, query_pids: torch.Tensor,
                      gallery_pids: torch.Tensor, *, topk: tuple[int, ...] = (1, 5, 10),
                      chunk_size: int | None = None) -> dict[str, float]:
    """R<k> for k in ``topk``, mAP and mINP (percentages) ranking the gallery by ``q @ g.T``.

    Features are used as given (L2-normalise them for cosine similarity); scores are computed
    ``chunk_size`` queries at a time (default: about 2^26 scores per chunk).
    """
    _check_sizes(len(query_feats), len(gallery_feats), query_pids, gallery_pids)
    first, _ = _evaluate(_score_chunks(query_feats, gallery_feats, chunk_size), query_pids, gallery_pids,
                         tuple(topk), None)
    return first.result()


def reranked_retrieval_metrics(query_feats, gallery_feats, query_pids, gallery_pids, reranker: ReRanker, *,
                               topk: tuple[int, ...] = (1, 5, 10), chunk_size: int | None = None
                               ) -> tuple[dict[str, float], dict[str, float]]:
    """(first-stage metrics, metrics after ``reranker`` re-orders each query's top k)."""
    _check_sizes(len(query_feats), len(gallery_feats), query_pids, gallery_pids)
    first, second = _evaluate(_score_chunks(query_feats, gallery_feats, chunk_size), query_pids,
                              gallery_pids, tuple(topk), reranker)
    return first.result(), second.result()


def rank(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = 10,
         chunk_size: int = 1024) -> dict[str, float]:
    """Metrics from a precomputed [Q, G] similarity: R1..R<max_rank>, mAP, mINP and ``excluded``."""
    _check_sizes(*similarity.shape, q_pids, g_pids)
    chunks = ((s, similarity[s:s + chunk_size]) for s in range(0, similarity.shape[0], chunk_size))
    first, _ = _evaluate(chunks, q_pids, g_pids, tuple(range(1, max_rank + 1)), None)
    return {**first.result(), "excluded": first.excluded}


def results_table(results: dict[str, dict[str, float]]) -> PrettyTable:
    table = PrettyTable(["task", "R1", "R5", "R10", "mAP", "mINP"])
    table.float_format = ".3"
    for task, r in results.items():
        table.add_row([task, r["R1"], r["R5"], r["R10"], r["mAP"], r["mINP"]])
    return table


@torch.no_grad()
def extract_features(model, img_loader, txt_loader, device, skip_bad_images: bool = False) -> dict[str, torch.Tensor]:
    """L2-normalised query (text) and gallery (image) features with their pids.

    An unreadable gallery image stops the evaluation naming it, unless ``skip_bad_images``
    (then it is left out of the gallery, with a warning)."""
    model.eval()
    text, text_pids = [], []
    for pid, ids in txt_loader:
        text.append(model.encode_text(ids.to(device)))
        text_pids.append(pid)
    image, image_pids, skipped = [], [], 0
    for pid, images, bad in img_loader:
        if bad and not skip_bad_images:
            raise UserError(f"cannot read gallery image {bad[0]} (pass --skip_bad_images to leave it out)")
        skipped += len(bad)
        if len(pid):
            image.append(model.encode_image(images.to(device)))
            image_pids.append(pid)
    if skipped:
        logger.warning("%d unreadable gallery images left out of the evaluation", skipped)
    return {"text_feats": F.normalize(torch.cat(text), dim=1), "text_pids": torch.cat(text_pids).to(device),
            "image_feats": F.normalize(torch.cat(image), dim=1), "image_pids": torch.cat(image_pids).to(device)}


class Evaluator:
    """t2i and i2t retrieval on fixed image/text loaders; ``t2i_rerank`` too with a ReRanker."""

    def __init__(self, img_loader, txt_loader, reranker: ReRanker | None = None, skip_bad_images: bool = False):
        self.img_loader = img_loader
        self.txt_loader = txt_loader
        self.reranker = reranker
        self.skip_bad_images = skip_bad_images

    def eval(self, model, device, features: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
        f = features or extract_features(model, self.img_loader, self.txt_loader, device, self.skip_bad_images)
        text, image = (f["text_feats"], f["text_pids"]), (f["image_feats"], f["image_pids"])
        results = {}
        if self.reranker is None:
            results["t2i"] = retrieval_metrics(text[0], image[0], text[1], image[1])
        else:
            results["t2i"], results["t2i_rerank"] = reranked_retrieval_metrics(
                text[0], image[0], text[1], image[1], self.reranker)
        results["i2t"] = retrieval_metrics(image[0], text[0], image[1], text[1])
        return results

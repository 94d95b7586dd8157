"""Evaluation: encode a split's captions and images once, rank the gallery as the model's heads
define it, and report every block (``t2i``, ``t2i_<feature set>``, ``t2i_rerank``, ``i2t``).

Nothing here knows a method. The model's ``retrieval`` definition (``model/retrieval.py``) gives
the feature sets, their weights and the optional re-ranking head; heads compute their features
and re-ranking caches from the same encoder pass as the global features.

Under torchrun every process encodes its share of the batches (batch b goes to process
b % world_size), the features are gathered, and each process ranks its own queries: the first
stage, the per-set blocks and the re-ranking of its queries' top k, whose gallery caches are
broadcast chunk by chunk. The match-rank tables are gathered and every process computes the same
numbers from them, equal to a single process's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from model.retrieval import RetrievalDefinition, normalise
from utils.comm import (all_gather_objects, all_gather_rows, all_reduce_range, broadcast_object, broadcast_tensor,
                        get_rank, get_world_size, is_main_process)
from utils.errors import UserError
from utils.metrics import (FirstStage, ReRanker, RerankStats, first_stage, metrics_from_ranks, rescore,
                           reranked_order, reranked_ranks)

logger = logging.getLogger(__name__)


class RowStore:
    """Rows of per-item tensors (one dict per batch) kept in their chunks, never concatenated:
    ``take`` gathers any rows onto a device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.chunks: list[dict[str, torch.Tensor]] = []
        self.starts: list[int] = []
        self.rows = 0

    def append(self, chunk: dict[str, torch.Tensor]) -> None:
        count = len(next(iter(chunk.values()))) if chunk else 0
        if count:
            self.chunks.append({k: v.to(self.device) for k, v in chunk.items()})
            self.starts.append(self.rows)
            self.rows += count

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for chunk in self.chunks for v in chunk.values())

    def take(self, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        rows = rows.cpu()
        which = torch.searchsorted(torch.tensor(self.starts), rows, right=True) - 1
        out: dict[str, torch.Tensor] = {}
        for key, first in self.chunks[0].items():
            out[key] = torch.empty((len(rows), *first.shape[1:]), dtype=first.dtype, device=device)
        for c in which.unique().tolist():
            hit = (which == c).nonzero().squeeze(1)
            local = (rows[hit] - self.starts[c]).to(self.device)
            for key, value in self.chunks[c].items():
                out[key][hit.to(device)] = value.index_select(0, local).to(device)
        return out


@dataclass
class Encoded:
    """One side (queries or gallery) of an evaluation, all processes' items in dataset order."""
    index: torch.Tensor                       # dataset positions of the items (unreadable ones left out)
    pids: torch.Tensor
    sets: dict[str, torch.Tensor]             # L2-normalised features per feature set
    combined: torch.Tensor                    # first-stage features (dot product = first-stage score)
    mine: torch.Tensor                        # positions of this process's items in the above
    cache: RowStore | None = None             # re-ranking cache (queries: this process's items only)


@dataclass
class Evaluation:
    """Results of every block, the features that produced them and the final ranking's top k."""
    results: dict[str, dict[str, float]]
    text: Encoded
    image: Encoded
    rerank_order: torch.Tensor | None = None  # [Q, k] gallery positions, each query's final top k
    split: str = "test"
    skipped_images: list[str] = field(default_factory=list)      # unreadable, left out of the gallery
    excluded_queries: dict[str, int] = field(default_factory=dict)  # per block: queries without a match

    def report(self) -> dict:
        """Every block's metrics and what they were computed on (what results files hold)."""
        return {**self.results, "split": self.split, "queries": {"t2i": len(self.text.pids), "i2t": len(self.image.pids)},
                "gallery": {"t2i": len(self.image.pids), "i2t": len(self.text.pids)},
                "excluded_queries": dict(self.excluded_queries), "skipped_images": list(self.skipped_images)}

    def ranking(self, query: int, top: int) -> list[int]:
        """The gallery positions of query ``query``'s first ``top`` results, in the final order."""
        first = torch.sort(self.text.combined[query] @ self.image.combined.t(), descending=True, stable=True).indices
        if self.rerank_order is None:
            return first[:top].tolist()
        head = self.rerank_order[query].tolist()
        reranked = set(head)
        return (head + [g for g in first.tolist() if g not in reranked])[:top]

    def features(self) -> dict[str, torch.Tensor]:
        """What ``test.py --save_features`` writes (CPU tensors)."""
        out = {"text_feats": self.text.combined, "text_pids": self.text.pids,
               "image_feats": self.image.combined, "image_pids": self.image.pids, "image_index": self.image.index}
        for name in self.text.sets if len(self.text.sets) > 1 else ():
            out[f"text_feats_{name}"], out[f"image_feats_{name}"] = self.text.sets[name], self.image.sets[name]
        if self.rerank_order is not None:
            out["rerank_order"] = self.rerank_order
        return {k: v.cpu() for k, v in out.items()}


def _scatter(parts: torch.Tensor, positions: torch.Tensor, total: int) -> torch.Tensor:
    out = parts.new_empty((total, *parts.shape[1:]))
    out[positions.to(parts.device)] = parts
    return out


def gather_in_order(local_index: torch.Tensor, values: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """All processes' items sorted by dataset index: (index, values, positions of this process's items)."""
    index = all_gather_rows(local_index)
    order = torch.argsort(index)
    gathered = {k: all_gather_rows(v)[order.to(v.device)] for k, v in values.items()}
    mine = torch.searchsorted(index[order], local_index)
    return index[order], gathered, mine


class Evaluator:
    """Ranks a split's gallery images for its captions (and the reverse) with a model's heads."""

    def __init__(self, img_loader, txt_loader, skip_bad_images: bool = False, pair_batch: int = 512,
                 split: str = "test"):
        self.split = split  # the name the results carry
        self.img_loader = img_loader
        self.txt_loader = txt_loader
        self.skip_bad_images = skip_bad_images
        self.pair_batch = pair_batch  # re-scored (query, item) pairs per call of the re-ranking head

    @torch.no_grad()
    def eval(self, model, device: torch.device) -> Evaluation:
        model.eval()
        retrieval: RetrievalDefinition = model.retrieval
        text = self._encode_texts(model, retrieval, device)
        image, skipped = self._encode_images(model, retrieval, device)
        results: dict[str, dict[str, float]] = {}
        excluded: dict[str, int] = {}
        order = None
        reranker = retrieval.reranker
        keep = reranker.rerank_k if reranker is not None else 0
        stage = self._rank(text, image, "combined", keep)
        results["t2i"], excluded["t2i"] = self._metrics(stage, text.mine, len(text.pids))
        if len(retrieval.weights) > 1:
            for name in retrieval.weights:
                results[f"t2i_{name}"], _ = self._metrics(self._rank(text, image, name), text.mine, len(text.pids))
        if reranker is not None:
            ranks, local_order = self._rerank(stage, text, image, reranker, device)
            results["t2i_rerank"], _ = self._metrics(stage, text.mine, len(text.pids), ranks)
            order = _scatter(all_gather_rows(local_order), all_gather_rows(text.mine), len(text.pids))
        results["i2t"], excluded["i2t"] = self._metrics(self._rank(image, text, "combined"), image.mine,
                                                        len(image.pids))
        return Evaluation(results, text, image, order, self.split, skipped, excluded)

    # ---------------------------------------------------------------- encoding
    def _encode_texts(self, model, retrieval: RetrievalDefinition, device: torch.device) -> Encoded:
        index, pids, features, cache = [], [], [], RowStore(torch.device("cpu"))
        for idx, pid, ids in tqdm(self.txt_loader, desc="captions", leave=False, disable=not is_main_process()):
            feats, rows = retrieval.encode_queries(model.encoder, ids.to(device))
            index.append(idx)
            pids.append(pid)
            features.append(feats)
            cache.append(rows)
        return self._gather(retrieval, index, pids, features, device, query_cache=cache)

    def _encode_images(self, model, retrieval: RetrievalDefinition, device: torch.device
                       ) -> tuple[Encoded, list[str]]:
        """The gallery, and the paths of the unreadable images left out of it."""
        index, pids, features, chunks, bad = [], [], [], [], []
        for idx, pid, images, unreadable in tqdm(self.img_loader, desc="images", leave=False,
                                                 disable=not is_main_process()):
            bad += unreadable
            if not len(pid):
                chunks.append({})
                continue
            feats, rows = retrieval.encode_gallery(model.encoder, images.to(device))
            index.append(idx)
            pids.append(pid)
            features.append(feats)
            chunks.append({k: v.cpu() for k, v in rows.items()})
        bad = sorted(path for paths in all_gather_objects(bad) for path in paths)
        if bad and not self.skip_bad_images:
            raise UserError(f"cannot read gallery image {bad[0]} (pass --skip_bad_images to leave it out)")
        if bad:
            logger.warning("%d unreadable gallery images left out of the evaluation", len(bad))
        encoded = self._gather(retrieval, index, pids, features, device)
        if retrieval.reranker is not None:
            encoded.cache = self._gallery_store(chunks, device)
        return encoded, bad

    def _gather(self, retrieval: RetrievalDefinition, index, pids, features, device, query_cache=None) -> Encoded:
        """All processes' items, in dataset order, with normalised and combined features."""
        local = {name: torch.cat([f[name] for f in features]) for name in retrieval.feature_sets} if features else {}
        widths = all_gather_objects({name: value.shape[1] for name, value in local.items()})
        for name in retrieval.feature_sets:  # a process without items still sends rows of the right width
            local.setdefault(name, torch.zeros(0, max(w.get(name, 0) for w in widths), device=device))
        local_pids = torch.cat(pids).to(device) if pids else torch.zeros(0, dtype=torch.long, device=device)
        local_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        order, gathered, mine = gather_in_order(local_index, {**normalise(local), "pids": local_pids})
        all_pids = gathered.pop("pids")
        return Encoded(order, all_pids, gathered, retrieval.combine(gathered), mine, query_cache)

    def _gallery_store(self, chunks: list[dict[str, torch.Tensor]], device: torch.device) -> RowStore:
        """Every process's gallery cache chunks, in dataset order (batch b comes from process b % W)."""
        store = RowStore(_cache_device(chunks, device))
        world, rank = get_world_size(), get_rank()
        for b in range(sum(all_gather_objects(len(chunks)))):
            owner = b % world
            chunk = chunks[b // world] if owner == rank else None
            keys = broadcast_object(sorted(chunk) if chunk is not None else None, owner)
            store.append({k: broadcast_tensor(chunk[k] if chunk is not None else None, owner, store.device)
                          for k in keys})
        return store

    # ---------------------------------------------------------------- ranking
    def _rank(self, queries: Encoded, gallery: Encoded, feature_set: str, keep: int = 0) -> FirstStage:
        q = queries.combined if feature_set == "combined" else queries.sets[feature_set]
        g = gallery.combined if feature_set == "combined" else gallery.sets[feature_set]
        mine = queries.mine.to(q.device)
        return first_stage(q[mine], g, queries.pids[mine], gallery.pids, keep=keep)

    def _rerank(self, stage: FirstStage, text: Encoded, image: Encoded, head, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Match ranks of this process's queries after the head re-orders their top k, and that order."""
        k = stage.top.shape[1]

        def score(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
            query_rows = text.cache.take(queries.repeat_interleave(k), device)
            gallery_rows = image.cache.take(candidates.reshape(-1), device)
            return head.rerank_score(query_rows, gallery_rows).view(len(queries), k)

        second = rescore(stage, ReRanker(k, score), torch.arange(len(text.mine)), self.pair_batch)
        first_low, first_high = all_reduce_range(stage.low, stage.high)
        second_low, second_high = all_reduce_range(float(second.min()) if second.numel() else float("inf"),
                                                   float(second.max()) if second.numel() else float("-inf"))
        final = head.rerank_combine(second, stage.top_scores,
                                    RerankStats(first_low, first_high, second_low, second_high))
        order = reranked_order(stage, final)
        return reranked_ranks(stage, order), order

    @staticmethod
    def _metrics(stage: FirstStage, mine: torch.Tensor, total: int, ranks: torch.Tensor | None = None
                 ) -> tuple[dict[str, float], int]:
        """Metrics of every query from each process's share of the match-rank table, and the number of
        queries left out for having no match in the gallery."""
        local = stage.ranks if ranks is None else ranks
        positions = all_gather_rows(mine.cpu())
        table = _scatter(all_gather_rows(local), positions, total)
        num = _scatter(all_gather_rows(stage.num), positions, total)
        return metrics_from_ranks(table, num), int((num == 0).sum())


def _cache_device(chunks: list[dict[str, torch.Tensor]], device: torch.device) -> torch.device:
    """Keep the gallery cache on the GPU when it fits in a quarter of the free memory, else on the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    local = sum(v.numel() * v.element_size() for chunk in chunks for v in chunk.values())
    return device if local * get_world_size() * 4 < torch.cuda.mem_get_info(device)[0] else torch.device("cpu")

"""Retrieval metrics with IRRA's definitions (CMC Rank-k, mAP, mINP), computed in query chunks.

For each query the gallery is ranked by descending similarity; equal scores are ordered by
gallery index, lower first (a stable sort), unlike IRRA's unstable argsort, which breaks ties
arbitrarily. With |P| true matches at 1-based ranks r_1 < ... < r_|P|:
  CMC@k = 1[r_1 <= k],  AP = (1/|P|) sum_k k / r_k,  INP = |P| / r_|P|.
Queries whose identity has no gallery item are excluded (and counted).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from prettytable import PrettyTable

logger = logging.getLogger(__name__)


def rank(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = 10,
         chunk_size: int = 1024) -> dict[str, float]:
    """R1..R<max_rank>, mAP, mINP (percentages) and the number of queries excluded."""
    g_pids = g_pids.to(similarity.device)
    q_pids = q_pids.to(similarity.device)
    num_gallery = similarity.shape[1]
    cmc_sum = torch.zeros(max_rank, dtype=torch.float64)
    ap_sum = inp_sum = 0.0
    valid = 0
    for start in range(0, similarity.shape[0], chunk_size):
        sims = similarity[start:start + chunk_size]
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        matches = (g_pids[order] == q_pids[start:start + chunk_size, None]).double()
        num_pos = matches.sum(dim=1)
        keep = num_pos > 0
        matches, num_pos = matches[keep], num_pos[keep]
        valid += int(keep.sum())
        hits = matches.cumsum(dim=1)
        top = hits[:, :min(max_rank, num_gallery)].clamp(max=1)
        if top.shape[1] < max_rank:  # small gallery: CMC stays at its last value
            top = torch.cat([top, top[:, -1:].expand(-1, max_rank - top.shape[1])], dim=1)
        cmc_sum += top.sum(dim=0).cpu()
        positions = torch.arange(1, num_gallery + 1, device=sims.device, dtype=torch.float64)
        ap_sum += float(((hits / positions) * matches).sum(dim=1).div(num_pos).sum())
        last = (matches * positions).max(dim=1).values
        inp_sum += float((num_pos / last).sum())
    excluded = similarity.shape[0] - valid
    if excluded:
        logger.warning("%d queries have no true match in the gallery and are excluded", excluded)
    if valid == 0:
        raise ValueError("no query has a true match in the gallery")
    cmc = (cmc_sum / valid * 100).tolist()
    result = {f"R{k}": cmc[k - 1] for k in range(1, max_rank + 1)}
    result.update(mAP=ap_sum / valid * 100, mINP=inp_sum / valid * 100, excluded=excluded)
    return result


def summarize(result: dict[str, float]) -> dict[str, float]:
    """The five reported numbers."""
    return {k: float(result[k]) for k in ("R1", "R5", "R10", "mAP", "mINP")}


def results_table(results: dict[str, dict[str, float]]) -> PrettyTable:
    table = PrettyTable(["task", "R1", "R5", "R10", "mAP", "mINP"])
    table.float_format = ".3"
    for task, r in results.items():
        table.add_row([task, r["R1"], r["R5"], r["R10"], r["mAP"], r["mINP"]])
    return table


@torch.no_grad()
def extract_features(model, img_loader, txt_loader, device) -> dict[str, torch.Tensor]:
    """L2-normalised query (text) and gallery (image) features with their pids."""
    model.eval()
    feats = {}
    for key, loader, encode in (("text", txt_loader, model.encode_text),
                                ("image", img_loader, model.encode_image)):
        pids, chunks = [], []
        for pid, data in loader:
            chunks.append(encode(data.to(device)))
            pids.append(pid.flatten())
        feats[f"{key}_feats"] = F.normalize(torch.cat(chunks), p=2, dim=1)
        feats[f"{key}_pids"] = torch.cat(pids).to(device)
    return feats


class Evaluator:
    """t2i and i2t retrieval on fixed image/text loaders."""

    def __init__(self, img_loader, txt_loader):
        self.img_loader = img_loader
        self.txt_loader = txt_loader

    def eval(self, model, device) -> dict[str, dict[str, float]]:
        f = extract_features(model, self.img_loader, self.txt_loader, device)
        similarity = f["text_feats"] @ f["image_feats"].t()
        return {"t2i": summarize(rank(similarity, f["text_pids"], f["image_pids"])),
                "i2t": summarize(rank(similarity.t(), f["image_pids"], f["text_pids"]))}

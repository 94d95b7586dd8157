"""Retrieval metrics: the definitions of IRRA (anosorae/IRRA @ cfc2378) utils/metrics.py rank(), computed
in query chunks. Our own rules: equal scores are ordered by gallery index, lower first (a stable
descending sort), and a query with no positive in the gallery is excluded and counted."""
import pytest
import torch

from utils.metrics import rank

G_PIDS = torch.tensor([1, 1, 2, 3, 2])
Q_PIDS = torch.tensor([1, 2, 3])
SIM = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.2],
                    [0.5, 0.4, 0.3, 0.9, 0.6],
                    [0.2, 0.3, 0.1, 0.4, 0.5]])


# ---------------------------------------------------------------- independent references
def brute_force(sim, q_pids, g_pids, max_rank=10):
    """Per-query loop; stable descending sort (ties by gallery index, lower first).

    Returns the metrics over queries with at least one positive, and the excluded count.
    """
    sim, q_pids, g_pids = sim.tolist(), q_pids.tolist(), g_pids.tolist()
    cmc = [0.0] * max_rank
    ap_sum = inp_sum = 0.0
    valid = 0
    for row, q in zip(sim, q_pids):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        ranks = [r + 1 for r, j in enumerate(order) if g_pids[j] == q]  # 1-based ranks of positives
        if not ranks:
            continue
        valid += 1
        for k in range(max_rank):
            cmc[k] += 1.0 if ranks[0] <= k + 1 else 0.0
        ap_sum += sum((n + 1) / r for n, r in enumerate(ranks)) / len(ranks)
        inp_sum += len(ranks) / ranks[-1]
    out = {f"R{k + 1}": 100 * cmc[k] / valid for k in range(max_rank)}
    out.update(mAP=100 * ap_sum / valid, mINP=100 * inp_sum / valid, excluded=len(sim) - valid)
    return out


def irra_rank(similarity, q_pids, g_pids, max_rank=10):
    """IRRA's utils/metrics.py rank() (dense argsort, cumsum, AP, INP), rewritten here as a reference."""
    indices = torch.argsort(similarity, dim=1, descending=True)
    pred_labels = g_pids[indices]
    matches = pred_labels.eq(q_pids.view(-1, 1))
    all_cmc = matches[:, :max_rank].cumsum(1)
    all_cmc[all_cmc > 1] = 1
    all_cmc = all_cmc.float().mean(0) * 100
    num_rel = matches.sum(1)
    tmp_cmc = matches.cumsum(1)
    inp = [tmp_cmc[i][match_row.nonzero()[-1]] / (match_row.nonzero()[-1] + 1.0)
           for i, match_row in enumerate(matches)]
    mINP = torch.cat(inp).mean() * 100
    tmp_cmc = [tmp_cmc[:, i] / (i + 1.0) for i in range(tmp_cmc.shape[1])]
    tmp_cmc = torch.stack(tmp_cmc, 1) * matches
    AP = tmp_cmc.sum(1) / num_rel
    mAP = AP.mean() * 100
    return all_cmc, mAP, mINP


def assert_same(result, ref, tol, max_rank=10):
    for k in range(1, max_rank + 1):
        assert result[f"R{k}"] == pytest.approx(ref[f"R{k}"], abs=tol), f"R{k}"
    assert result["mAP"] == pytest.approx(ref["mAP"], abs=tol)
    assert result["mINP"] == pytest.approx(ref["mINP"], abs=tol)
    assert result["excluded"] == ref["excluded"]


def random_problem(seed, num_q, num_g, num_ids, decimals=None):
    g = torch.Generator().manual_seed(seed)
    g_pids = torch.randint(0, num_ids, (num_g,), generator=g)
    g_pids[:num_ids] = torch.arange(num_ids)  # every id present at least once
    q_pids = g_pids[torch.randint(0, num_g, (num_q,), generator=g)]
    sim = torch.rand(num_q, num_g, generator=g, dtype=torch.float64)
    if decimals is not None:
        sim = torch.round(sim * 10 ** decimals) / 10 ** decimals
    return sim, q_pids, g_pids


# ---------------------------------------------------------------- exact values, 3 queries x 5 gallery items
def test_toy_t2i_exact_values():
    r = rank(SIM, Q_PIDS, G_PIDS, max_rank=5)
    assert r["R1"] == pytest.approx(100 / 3, abs=1e-3)
    for k in (2, 3, 4, 5):
        assert r[f"R{k}"] == pytest.approx(100.0, abs=1e-9)
    assert r["mAP"] == pytest.approx(55.0, abs=1e-3)
    assert r["mINP"] == pytest.approx(43.333, abs=1e-3)
    assert r["excluded"] == 0


def test_toy_i2t_transposed_exact_values():
    r = rank(SIM.t(), G_PIDS, Q_PIDS, max_rank=3)
    assert r["R1"] == pytest.approx(40.0, abs=1e-3)
    assert r["R2"] == pytest.approx(80.0, abs=1e-3)
    assert r["R3"] == pytest.approx(100.0, abs=1e-3)
    assert r["mAP"] == pytest.approx(66.667, abs=1e-3)
    assert r["mINP"] == pytest.approx(66.667, abs=1e-3)


def test_toy_default_max_rank_small_gallery_repeats_last_cmc():
    """G = 5 < 10: R6..R10 repeat R5 (t2i), and G = 3: R4..R10 repeat R3 (i2t)."""
    r = rank(SIM, Q_PIDS, G_PIDS)
    assert r["R1"] == pytest.approx(100 / 3, abs=1e-3)
    assert r["mAP"] == pytest.approx(55.0, abs=1e-3)
    for k in range(5, 11):
        assert r[f"R{k}"] == pytest.approx(100.0, abs=1e-9)
    r = rank(SIM.t(), G_PIDS, Q_PIDS)
    assert r["R2"] == pytest.approx(80.0, abs=1e-3)
    for k in range(3, 11):
        assert r[f"R{k}"] == pytest.approx(100.0, abs=1e-9)
    # a two-item gallery: the second query's positive is at rank 2
    sim = torch.tensor([[0.9, 0.5], [0.9, 0.5]])
    r = rank(sim, torch.tensor([1, 2]), torch.tensor([1, 2]), max_rank=4)
    assert [r[f"R{k}"] for k in range(1, 5)] == pytest.approx([50.0, 100.0, 100.0, 100.0])
    assert r["mAP"] == pytest.approx(75.0)


def test_toy_matches_brute_force_and_irra():
    ref = brute_force(SIM, Q_PIDS, G_PIDS, max_rank=5)
    assert_same(rank(SIM, Q_PIDS, G_PIDS, max_rank=5), ref, 1e-6, max_rank=5)
    cmc, mAP, mINP = irra_rank(SIM, Q_PIDS, G_PIDS, max_rank=5)
    assert ref["mAP"] == pytest.approx(mAP.item(), abs=1e-4)
    assert ref["mINP"] == pytest.approx(mINP.item(), abs=1e-4)
    assert [ref[f"R{k}"] for k in range(1, 6)] == pytest.approx(cmc.tolist(), abs=1e-4)


# ---------------------------------------------------------------- random data
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_with_many_ties_matches_brute_force(seed):
    sim, q_pids, g_pids = random_problem(seed, num_q=60, num_g=40, num_ids=8, decimals=1)
    # many exact ties and several gallery items per id
    assert torch.unique(sim[0]).numel() < sim.shape[1] // 2
    assert torch.bincount(g_pids).min() >= 2
    ref = brute_force(sim, q_pids, g_pids)
    assert_same(rank(sim, q_pids, g_pids), ref, 1e-6)
    assert_same(rank(sim.float(), q_pids, g_pids), ref, 1e-6)


def test_chunk_size_independence():
    sim, q_pids, g_pids = random_problem(5, num_q=50, num_g=30, num_ids=6, decimals=1)
    q_pids[3] = 99  # one excluded query, in a middle chunk
    results = [rank(sim, q_pids, g_pids, chunk_size=c) for c in (1, 7, 1024)]
    for r in results[1:]:
        assert r.keys() == results[0].keys()
        for key in r:
            assert r[key] == pytest.approx(results[0][key], abs=1e-9), key
    assert results[0]["excluded"] == 1
    assert_same(results[0], brute_force(sim, q_pids, g_pids), 1e-6)


@pytest.mark.parametrize("seed", [0, 3])
def test_matches_irra_formula_without_ties(seed):
    sim, q_pids, g_pids = random_problem(seed, num_q=80, num_g=50, num_ids=10)
    assert all(torch.unique(row).numel() == row.numel() for row in sim)  # no ties
    cmc, mAP, mINP = irra_rank(sim, q_pids, g_pids)
    r = rank(sim, q_pids, g_pids)
    assert [r[f"R{k}"] for k in range(1, 11)] == pytest.approx(cmc.tolist(), abs=1e-4)
    assert r["mAP"] == pytest.approx(mAP.item(), abs=1e-4)
    assert r["mINP"] == pytest.approx(mINP.item(), abs=1e-4)


# ---------------------------------------------------------------- tie rule, exclusion
def test_all_equal_scores_rank_by_gallery_index():
    g_pids = torch.tensor([0, 1, 2, 3])
    sim = torch.zeros(4, 4)
    r = rank(sim, torch.tensor([3]).expand(4), g_pids, max_rank=4)
    # pid 3 is at gallery index 3 -> rank 4
    assert [r[f"R{k}"] for k in range(1, 5)] == pytest.approx([0.0, 0.0, 0.0, 100.0])
    assert r["mAP"] == pytest.approx(25.0)
    assert r["mINP"] == pytest.approx(25.0)


def test_collapsed_model_does_not_score_100():
    n = 6
    g_pids = torch.arange(n)
    sim = torch.full((n, n), 0.5)
    r = rank(sim, g_pids.clone(), g_pids, max_rank=n)
    # query i's only positive is gallery i, ranked i + 1
    assert r["R1"] == pytest.approx(100 / n)
    assert [r[f"R{k}"] for k in range(1, n + 1)] == pytest.approx([100 * k / n for k in range(1, n + 1)])
    expected = 100 * sum(1 / (i + 1) for i in range(n)) / n
    assert r["mAP"] == pytest.approx(expected)
    assert r["mINP"] == pytest.approx(expected)


def test_tie_with_positive_after_negative():
    # scores tie between a negative (index 0) and a positive (index 1): the negative wins
    sim = torch.tensor([[0.7, 0.7, 0.1]])
    r = rank(sim, torch.tensor([5]), torch.tensor([4, 5, 6]), max_rank=3)
    assert r["R1"] == 0.0 and r["R2"] == 100.0
    assert r["mAP"] == pytest.approx(50.0)
    # the same tie with the positive first
    r = rank(sim, torch.tensor([4]), torch.tensor([4, 5, 6]), max_rank=3)
    assert r["R1"] == 100.0 and r["mAP"] == pytest.approx(100.0)


def test_query_without_gallery_match_is_excluded_and_counted():
    q_pids = torch.tensor([1, 7, 2, 3])  # 7 has no gallery item
    sim = torch.cat([SIM[:1], torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]]), SIM[1:]])
    r = rank(sim, q_pids, G_PIDS, max_rank=5)
    base = rank(SIM, Q_PIDS, G_PIDS, max_rank=5)
    assert r["excluded"] == 1
    for key in ("R1", "R2", "R5", "mAP", "mINP"):
        assert r[key] == pytest.approx(base[key], abs=1e-9)
    assert r["mAP"] == pytest.approx(55.0, abs=1e-3)


def test_no_query_with_a_match_is_an_error():
    with pytest.raises(ValueError):
        rank(SIM, torch.tensor([8, 9, 10]), G_PIDS, max_rank=5)


def test_rank_is_pure():
    sim = SIM.clone()
    q, g = Q_PIDS.clone(), G_PIDS.clone()
    first = rank(sim, q, g, max_rank=5)
    second = rank(sim, q, g, max_rank=5)
    assert first == second
    assert torch.equal(sim, SIM) and torch.equal(q, Q_PIDS) and torch.equal(g, G_PIDS)
    assert isinstance(first, dict)

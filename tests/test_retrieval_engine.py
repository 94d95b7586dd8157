"""Retrieval-metrics engine (utils/metrics.py, utils/rank_kernels.py) against a brute-force reference.

Reference (IRRA's definitions, our tie rule): per query, the gallery is ranked by a stable
descending sort of q.g (equal scores in gallery order). With true matches at 1-based ranks
r_1 < ... < r_|P|: CMC@k = 1[r_1 <= k], AP = (1/|P|) sum_m m / r_m, INP = |P| / r_|P|, averaged
over the queries that have a match, in percent.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils import rank_kernels
from utils.metrics import (ReRanker, RerankStats, count_before_torch, rank,
                           reranked_retrieval_metrics, retrieval_metrics)

TOPK = (1, 5, 10)
TOL = 1e-6


# ---------------------------------------------------------------- brute-force reference
def reference_from_orders(orders, q_pids, g_pids, topk=TOPK):
    """Metrics from explicit rankings: ``orders[i]`` lists gallery indices, best first.

    Returns (metrics dict, number of excluded queries)."""
    q_pids, g_pids = q_pids.tolist(), g_pids.tolist()
    cmc = [0.0] * len(topk)
    ap_sum = inp_sum = 0.0
    valid = excluded = 0
    for i, order in enumerate(orders):
        order = [int(j) for j in order]
        assert sorted(order) == list(range(len(g_pids)))  # a permutation of the gallery
        ranks = [r + 1 for r, j in enumerate(order) if g_pids[j] == q_pids[i]]
        if not ranks:
            excluded += 1
            continue
        valid += 1
        for n, k in enumerate(topk):
            cmc[n] += 1.0 if ranks[0] <= k else 0.0
        ap_sum += sum((m + 1) / r for m, r in enumerate(ranks)) / len(ranks)
        inp_sum += len(ranks) / ranks[-1]
    out = {f"R{k}": 100.0 * c / valid for k, c in zip(topk, cmc)}
    out.update(mAP=100.0 * ap_sum / valid, mINP=100.0 * inp_sum / valid)
    return out, excluded


def stable_orders(scores):
    return [torch.sort(row, descending=True, stable=True).indices for row in scores]


def reference(q, g, q_pids, g_pids, topk=TOPK):
    """Metrics and excluded count ranking the gallery by ``q @ g.T``."""
    return reference_from_orders(stable_orders(q @ g.t()), q_pids, g_pids, topk)


def assert_metrics_equal(result, expected, tol=TOL):
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=tol), key


# ---------------------------------------------------------------- data
def gallery_pids_with_counts(gen, num_ids, low, high):
    """Each id 0..num_ids-1 with between ``low`` and ``high`` gallery items, in shuffled order."""
    counts = torch.randint(low, high + 1, (num_ids,), generator=gen)
    pids = torch.repeat_interleave(torch.arange(num_ids), counts)
    return pids[torch.randperm(len(pids), generator=gen)]


def make_problem(seed, num_q=300, num_g=300, num_ids=100, dim=16, ties=False, per_id=None, absent=0):
    """Features and pids. ``ties``: small integer features (exact, heavily repeated scores);
    ``per_id=(low, high)``: gallery items per id; ``absent``: queries whose pid is not in the gallery."""
    gen = torch.Generator().manual_seed(seed)
    if per_id is None:
        g_pids = torch.randint(0, num_ids, (num_g,), generator=gen)
    else:
        g_pids = gallery_pids_with_counts(gen, num_ids, *per_id)
        num_g = len(g_pids)
    q_pids = g_pids[torch.randint(0, num_g, (num_q,), generator=gen)]
    if absent:
        rows = torch.randperm(num_q, generator=gen)[:absent]
        q_pids[rows] = 10_000 + torch.arange(absent)
    if ties:
        q = torch.randint(0, 3, (num_q, 4), generator=gen).float()
        g = torch.randint(0, 3, (num_g, 4), generator=gen).float()
    else:
        q = torch.nn.functional.normalize(torch.randn(num_q, dim, generator=gen), dim=1)
        g = torch.nn.functional.normalize(torch.randn(num_g, dim, generator=gen), dim=1)
    return q, g, q_pids, g_pids


def has_ties(q, g):
    scores = q @ g.t()
    return sum(torch.unique(row).numel() < row.numel() for row in scores)


# ---------------------------------------------------------------- 1. retrieval_metrics vs reference
@pytest.mark.parametrize("case", ["no_ties", "ties", "several_per_id", "several_per_id_ties", "absent",
                                  "absent_ties"])
def test_retrieval_metrics_matches_reference(case):
    kwargs = {
        "no_ties": dict(seed=1),
        "ties": dict(seed=0, ties=True),
        "several_per_id": dict(seed=2, num_ids=60, per_id=(3, 8)),
        "several_per_id_ties": dict(seed=3, num_ids=60, per_id=(3, 8), ties=True),
        "absent": dict(seed=4, num_ids=60, per_id=(3, 8), absent=25),
        "absent_ties": dict(seed=5, num_q=257, num_ids=50, per_id=(3, 8), absent=40, ties=True),
    }[case]
    q, g, qp, gp = make_problem(**kwargs)
    if kwargs.get("ties"):
        assert has_ties(q, g) == len(q)  # every query row has repeated scores
    else:
        assert has_ties(q, g) == 0
    if "per_id" in kwargs:
        counts = torch.bincount(gp)
        assert counts.min() >= 3 and counts.max() <= 8
    expected, excluded = reference(q, g, qp, gp)
    assert excluded == kwargs.get("absent", 0)
    assert_metrics_equal(retrieval_metrics(q, g, qp, gp, topk=TOPK), expected)


def test_excluded_queries_do_not_change_the_averages():
    q, g, qp, gp = make_problem(seed=6, num_ids=60, per_id=(3, 8), absent=30, ties=True)
    kept = qp < 10_000
    assert int((~kept).sum()) == 30
    assert_metrics_equal(retrieval_metrics(q, g, qp, gp), retrieval_metrics(q[kept], g, qp[kept], gp))
    assert rank(q @ g.t(), qp, gp)["excluded"] == 30


def test_float64_features_are_ranked_in_float64():
    """Scores 1 and 1 + 1e-10 are distinct in float64 (the features' dtype): the match, with the
    higher score, ranks first. Collapsing the scores to float32 makes them a tie broken by gallery
    index, which puts the non-match (index 0) first."""
    q = torch.tensor([[1.0]], dtype=torch.float64)
    g = torch.tensor([[1.0], [1.0 + 1e-10]], dtype=torch.float64)
    qp, gp = torch.tensor([0]), torch.tensor([1, 0])
    expected, _ = reference(q, g, qp, gp, topk=(1, 2))
    assert expected["R1"] == 100.0
    assert_metrics_equal(retrieval_metrics(q, g, qp, gp, topk=(1, 2)), expected)


# ---------------------------------------------------------------- 2. the "many matches" kernel
@pytest.mark.parametrize("ties", [False, True])
def test_many_matches_per_identity_matches_reference(ties):
    gen = torch.Generator().manual_seed(7 + ties)
    num_g, num_ids = 400, 5
    gp = (torch.arange(num_g) % num_ids)[torch.randperm(num_g, generator=gen)]
    assert torch.bincount(gp).min() > rank_kernels.FEW_MATCHES  # 80 per id: count_before_many
    qp = torch.randint(0, num_ids + 1, (150,), generator=gen)  # pid 5: absent from the gallery
    if ties:
        q = torch.randint(0, 3, (150, 4), generator=gen).float()
        g = torch.randint(0, 3, (num_g, 4), generator=gen).float()
    else:
        q, g = torch.randn(150, 16, generator=gen), torch.randn(num_g, 16, generator=gen)
    expected, excluded = reference(q, g, qp, gp)
    assert excluded == int((qp == num_ids).sum()) > 0
    assert_metrics_equal(retrieval_metrics(q, g, qp, gp), expected)
    assert_metrics_equal(retrieval_metrics(q, g, qp, gp, chunk_size=11), expected)


def kernel_inputs(seed, rows, size, width, levels):
    """Tied scores, distinct (unsorted) positions per row, and a number of matches per row."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, size), generator=gen).float()
    positions = torch.stack([torch.randperm(size, generator=gen)[:width] for _ in range(rows)])
    num = torch.randint(0, width + 1, (rows,), generator=gen)
    num[0], num[1] = width, 0
    return scores, positions, num


def kernel_counts(scores, positions, num):
    thresholds = scores.gather(1, positions)
    return torch.from_numpy(rank_kernels.count_ranked_before(
        scores.numpy(), thresholds.numpy(), positions.numpy(), num.numpy()))


def assert_counts_equal(got, expected, num):
    assert got.shape == expected.shape
    for i, n in enumerate(num.tolist()):
        assert torch.equal(got[i, :n], expected[i, :n]), i


@pytest.mark.parametrize("width", [1, 5, rank_kernels.FEW_MATCHES, rank_kernels.FEW_MATCHES + 1, 70])
@pytest.mark.parametrize("levels", [4, 1000])
def test_count_ranked_before_kernels_equal_torch(width, levels):
    """width <= FEW_MATCHES runs count_before_few, width > FEW_MATCHES count_before_many."""
    scores, positions, num = kernel_inputs(width * 31 + levels, rows=40, size=150, width=width, levels=levels)
    expected = count_before_torch(scores, positions)
    assert_counts_equal(kernel_counts(scores, positions, num), expected, num)
    # and the torch version is the definition: items with a higher score, or an equal one earlier
    for i in range(3):
        for k in range(int(num[i])):
            t, p = scores[i, positions[i, k]], int(positions[i, k])
            direct = int((scores[i] > t).sum() + (scores[i, :p] == t).sum())
            assert int(expected[i, k]) == direct


def test_both_kernels_called_directly_agree():
    scores, positions, num = kernel_inputs(11, rows=25, size=120, width=50, levels=6)
    thresholds = scores.gather(1, positions).numpy()
    outs = []
    for kernel in (rank_kernels.count_before_few, rank_kernels.count_before_many):
        out = np.zeros(thresholds.shape, dtype=np.int64)
        kernel(scores.numpy(), thresholds, positions.numpy(), num.numpy(), out)
        outs.append(torch.from_numpy(out))
    expected = count_before_torch(scores, positions)
    for out in outs:
        assert_counts_equal(out, expected, num)


# ---------------------------------------------------------------- 3. chunk-size independence
@pytest.mark.parametrize("ties", [False, True])
def test_chunk_size_independence(ties):
    q, g, qp, gp = make_problem(seed=12 + ties, num_q=203, num_ids=60, per_id=(3, 8), absent=9, ties=ties)
    results = [retrieval_metrics(q, g, qp, gp, chunk_size=c) for c in (1, 7, 64, None)]
    for r in results[1:]:
        assert r.keys() == results[0].keys()
        for key in r:
            assert r[key] == pytest.approx(results[0][key], abs=1e-9), key  # summation order only
    for r in results:
        for k in TOPK:
            assert r[f"R{k}"] == results[0][f"R{k}"]  # counts: exactly equal
    assert_metrics_equal(results[-1], reference(q, g, qp, gp)[0])


# ---------------------------------------------------------------- 4. rank() on a similarity matrix
@pytest.mark.parametrize("ties", [False, True])
def test_rank_on_similarity_equals_retrieval_metrics(ties):
    q, g, qp, gp = make_problem(seed=14 + ties, num_ids=60, per_id=(3, 8), absent=11, ties=ties)
    r = rank(q @ g.t(), qp, gp, max_rank=10)
    m = retrieval_metrics(q, g, qp, gp)
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert r[key] == pytest.approx(m[key], abs=TOL), key
    expected, excluded = reference(q, g, qp, gp, topk=tuple(range(1, 11)))
    assert r["excluded"] == excluded == 11
    assert_metrics_equal({k: v for k, v in r.items() if k != "excluded"}, expected)
    assert_metrics_equal(rank(q @ g.t(), qp, gp, max_rank=10, chunk_size=13), r)


# ---------------------------------------------------------------- 5. sizes
def test_mismatched_sizes_raise_value_error():
    q, g, qp, gp = make_problem(seed=16, num_q=20, num_g=30, num_ids=5)
    with pytest.raises(ValueError):
        rank(q @ g.t(), qp[:-1], gp)
    with pytest.raises(ValueError):
        rank(q @ g.t(), qp, gp[:-1])
    with pytest.raises(ValueError):
        retrieval_metrics(q, g, qp[:-1], gp)
    with pytest.raises(ValueError):
        retrieval_metrics(q, g[:-1], qp, gp)
    with pytest.raises(ValueError):
        reranked_retrieval_metrics(q[:-1], g, qp, gp, ReRanker(5, lambda qi, gi: gi.float()))


# ---------------------------------------------------------------- 6. re-ranking
def test_rerank_with_first_stage_scores_changes_nothing():
    q, g, qp, gp = make_problem(seed=17, num_ids=60, per_id=(3, 8), absent=7)
    scores = q @ g.t()
    plain = retrieval_metrics(q, g, qp, gp)
    first, second = reranked_retrieval_metrics(
        q, g, qp, gp, ReRanker(10, lambda qi, gi: scores[qi[:, None], gi]))
    assert_metrics_equal(first, plain)
    assert_metrics_equal(second, plain)


def test_rerank_with_first_stage_scores_changes_nothing_with_ties():
    q, g, qp, gp = make_problem(seed=18, num_ids=60, per_id=(3, 8), ties=True)
    plain = retrieval_metrics(q, g, qp, gp)

    def dot(qi, gi):  # exact for integer features
        return (q[qi][:, None, :] * g[gi]).sum(-1)

    for chunk in (None, 5):
        first, second = reranked_retrieval_metrics(q, g, qp, gp, ReRanker(20, dot), chunk_size=chunk)
        assert_metrics_equal(first, plain)
        assert_metrics_equal(second, plain)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_rerank_oracle_r1_is_hit_rate_in_top_k(k):
    q, g, qp, gp = make_problem(seed=19, num_ids=60, per_id=(3, 8), absent=10, ties=True)

    def oracle(qi, gi):
        return (gp[gi] == qp[qi][:, None]).float()

    first, second = reranked_retrieval_metrics(q, g, qp, gp, ReRanker(k, oracle), chunk_size=32)
    assert_metrics_equal(first, retrieval_metrics(q, g, qp, gp))
    valid = hits = 0
    for i, order in enumerate(stable_orders(q @ g.t())):
        if (gp == qp[i]).any():
            valid += 1
            hits += bool((gp[order[:k]] == qp[i]).any())
    assert 0 < hits < valid
    assert second["R1"] == pytest.approx(100.0 * hits / valid, abs=TOL)
    if k in TOPK:  # the same thing: a first-stage match within the top k
        assert second["R1"] == pytest.approx(first[f"R{k}"], abs=TOL)
    assert second["R1"] >= first["R1"]


@pytest.mark.parametrize("ties", [False, True])
def test_rerank_keeps_first_stage_order_beyond_top_k(ties):
    k = 5
    q, g, qp, gp = make_problem(seed=20 + ties, num_ids=60, per_id=(3, 8), absent=5, ties=ties)
    gen = torch.Generator().manual_seed(99)
    # ties in the second-stage scores too (with ties=True): they keep the first-stage order
    new_scores = (torch.randint(0, 3, (len(q), len(g)), generator=gen).float() if ties
                  else torch.rand(len(q), len(g), generator=gen))

    def score_fn(qi, gi):
        return new_scores[qi[:, None], gi]

    orders = []
    beyond = 0
    for i, order in enumerate(stable_orders(q @ g.t())):
        top, rest = order[:k], order[k:]
        top = top[torch.sort(new_scores[i, top], descending=True, stable=True).indices]
        orders.append(torch.cat([top, rest]))
        beyond += int((gp[rest] == qp[i]).any())
    assert beyond > 0  # some matches lie beyond the re-ranked top k
    expected, _ = reference_from_orders(orders, qp, gp)
    for chunk in (None, 7):
        first, second = reranked_retrieval_metrics(q, g, qp, gp, ReRanker(k, score_fn), chunk_size=chunk)
        assert_metrics_equal(first, reference(q, g, qp, gp)[0])
        assert_metrics_equal(second, expected)
    assert second != first


def test_rerank_k_larger_than_gallery():
    q, g, qp, gp = make_problem(seed=22, num_q=40, num_g=12, num_ids=4)
    gen = torch.Generator().manual_seed(5)
    new_scores = torch.rand(len(q), len(g), generator=gen)
    _, second = reranked_retrieval_metrics(q, g, qp, gp, ReRanker(50, lambda qi, gi: new_scores[qi[:, None], gi]))
    # k >= G: the whole gallery is re-ordered by the (tie-free) second-stage scores
    assert_metrics_equal(second, reference_from_orders(stable_orders(new_scores), qp, gp)[0])


def test_rerank_score_fn_gets_global_query_indices_in_pair_batches():
    q, g, qp, gp = make_problem(seed=23, num_q=50, num_g=80, num_ids=20)
    k, calls = 6, []

    def score_fn(qi, gi):
        calls.append((qi.clone(), gi.clone()))
        return torch.zeros(gi.shape)

    reranked_retrieval_metrics(q, g, qp, gp, ReRanker(k, score_fn), chunk_size=3, pair_batch=20)
    assert len(calls) == 17  # 20 pairs per call: 3 whole queries of 6 candidates; ceil(50 / 3)
    seen = torch.cat([qi for qi, _ in calls])
    assert seen.tolist() == list(range(50))  # every query once, in order
    orders = stable_orders(q @ g.t())
    for qi, gi in calls:
        assert qi.dtype == torch.int64 and qi.ndim == 1 and 1 <= len(qi) <= 3
        assert gi.shape == (len(qi), k)
        for row, i in zip(gi, qi.tolist()):  # the first-stage top k of that (global) query
            assert torch.equal(row, orders[i][:k])


def test_rerank_combine_gets_whole_matrix_ranges():
    """``combine`` sees the second-stage scores, the first-stage scores of the same top k and the
    ranges over every query (first stage: the whole query x gallery matrix)."""
    q, g, qp, gp = make_problem(seed=27, num_q=40, num_g=60, num_ids=15)
    gen = torch.Generator().manual_seed(8)
    new_scores = torch.randn(len(q), len(g), generator=gen)
    seen = {}

    def combine(second, first, stats):
        seen.update(second=second, first=first, stats=stats)
        return -first  # reverse the first-stage order inside the top k

    k = 4
    _, second = reranked_retrieval_metrics(q, g, qp, gp, ReRanker(k, lambda qi, gi: new_scores[qi[:, None], gi],
                                                                  combine), chunk_size=7)
    scores = q @ g.t()
    orders = stable_orders(scores)
    top = torch.stack([o[:k] for o in orders])
    assert torch.equal(seen["second"], new_scores.gather(1, top))
    assert torch.equal(seen["first"], scores.gather(1, top))
    assert seen["stats"] == RerankStats(float(scores.min()), float(scores.max()), float(seen["second"].min()),
                                        float(seen["second"].max()))
    reversed_orders = [torch.cat([o[:k].flip(0), o[k:]]) for o in orders]
    assert_metrics_equal(second, reference_from_orders(reversed_orders, qp, gp)[0])


# ---------------------------------------------------------------- 8. device
def test_runs_on_the_features_device():
    # the device-generic torch path (used off CPU) equals the compiled kernels, on CPU
    q, g, qp, gp = make_problem(seed=25, num_ids=5, ties=True)  # ~60 matches per id: many-kernel
    scores = q @ g.t()
    for width in (8, 60):
        sc, positions, num = kernel_inputs(26 + width, rows=30, size=200, width=width, levels=5)
        assert_counts_equal(kernel_counts(sc, positions, num), count_before_torch(sc, positions), num)
    order = torch.argsort(gp, stable=True)
    positions = torch.stack([order[gp[order] == p][:40] for p in qp.tolist()])
    num = torch.full((len(qp),), 40)
    assert_counts_equal(kernel_counts(scores, positions, num), count_before_torch(scores, positions), num)

    cpu = retrieval_metrics(q, g, qp, gp)
    assert_metrics_equal(cpu, reference(q, g, qp, gp)[0])
    if torch.cuda.is_available():
        dev = [t.cuda() for t in (q, g, qp, gp)]
        assert_metrics_equal(retrieval_metrics(*dev), cpu)
        assert_metrics_equal(retrieval_metrics(*dev, chunk_size=7), cpu)
        assert_metrics_equal(rank(dev[0] @ dev[1].t(), dev[2], dev[3], max_rank=10),
                             rank(scores, qp, gp, max_rank=10))
        new_scores = torch.rand(len(q), len(g), generator=torch.Generator().manual_seed(4))
        fn = lambda qi, gi: new_scores.to(qi.device)[qi[:, None], gi]  # noqa: E731
        cpu_pair = reranked_retrieval_metrics(q, g, qp, gp, ReRanker(5, fn))
        dev_pair = reranked_retrieval_metrics(*dev, ReRanker(5, fn))
        for a, b in zip(dev_pair, cpu_pair):
            assert_metrics_equal(a, b)

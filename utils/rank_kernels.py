"""CPU kernels (numba) counting, for each true match of a query, the gallery items ranked before it.

An item j is ranked before the match at gallery index p with score t when s_j > t, or s_j == t
and j < p (equal scores in gallery order, as a stable descending sort). Counting instead of
sorting makes CMC, AP and INP exact at the cost of a few vectorised passes over each score row.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# Up to this many matches per query the kernel makes one vectorised pass per match; beyond it a
# single pass with a binary search over the sorted match scores is cheaper.
FEW_MATCHES = 32


@njit(parallel=True, cache=True)
def count_before_few(scores, thresholds, positions, num_matches, out):  # pragma: no cover - compiled
    rows, size = scores.shape
    for i in prange(rows):
        row = scores[i]
        for k in range(num_matches[i]):
            t = thresholds[i, k]
            p = positions[i, k]
            n = 0
            for j in range(p):
                n += row[j] >= t
            for j in range(p + 1, size):
                n += row[j] > t
            out[i, k] = n


@njit(parallel=True, cache=True)
def count_before_many(scores, thresholds, positions, num_matches, out):  # pragma: no cover - compiled
    rows, size = scores.shape
    for i in prange(rows):
        n_pos = num_matches[i]
        order = np.argsort(thresholds[i, :n_pos], kind="mergesort")
        t = thresholds[i, :n_pos][order]  # ascending
        p = positions[i, :n_pos][order]
        below = np.zeros(n_pos + 1, np.int64)  # below[b]: items with exactly b match scores under them
        ties = np.zeros(n_pos, np.int64)       # equal-score items before each match in gallery order
        row = scores[i]
        for j in range(size):
            s = row[j]
            lo, hi = 0, n_pos
            while lo < hi:  # number of match scores strictly below s
                mid = (lo + hi) // 2
                if t[mid] < s:
                    lo = mid + 1
                else:
                    hi = mid
            below[lo] += 1
            k = lo
            while k < n_pos and t[k] == s:
                if j < p[k]:
                    ties[k] += 1
                k += 1
        above = 0
        for k in range(n_pos - 1, -1, -1):  # items above t[k]: those with more than k scores under them
            above += below[k + 1]
            out[i, order[k]] = above + ties[k]


def count_ranked_before(scores: np.ndarray, thresholds: np.ndarray, positions: np.ndarray,
                        num_matches: np.ndarray) -> np.ndarray:
    out = np.zeros(thresholds.shape, dtype=np.int64)
    kernel = count_before_few if thresholds.shape[1] <= FEW_MATCHES else count_before_many
    kernel(scores, thresholds, positions, num_matches, out)
    return out

"""Top-k ranking metrics over score matrices: HR@k, NDCG@k and MRR@k for one target per row.

A row of `scores` rates every candidate item for one state; the row's target is the item that
actually came next. The target's rank is the number of OTHER items whose score is greater than or
equal to the target's: ties are broken against the target (pessimistic). A model that gives many
items the same score (popularity's zero counts, an unknown item's -inf) therefore earns nothing
from the tie, and no tie-break by item index can favour items by when they were first seen.

With a 0-based rank r (None of the metrics depends on anything but r):
- HR@k = 1 if r < k else 0 (one target per row, so hit rate = recall@k),
- NDCG@k = 1 / log2(r + 2) if r < k else 0 (the ideal DCG of one relevant item is 1),
- MRR@k = 1 / (r + 1) if r < k else 0.

The caller batches (and chunks rows to bound memory); these functions are pure numpy.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

RANKING_METRICS = ("hr", "ndcg", "mrr")


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target among all columns, ties counted against it: (N,) int64.

    `scores` (N, C) float, `targets` (N,) int column indices. NaN scores are not allowed.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    assert scores.ndim == 2, f"scores must be (N, C), got {scores.shape}"
    assert targets.shape == (scores.shape[0],), (targets.shape, scores.shape)
    if scores.shape[0] == 0:
        return np.zeros((0,), np.int64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if targets.min() < 0 or targets.max() >= scores.shape[1]:
        raise ValueError(f"targets must be column indices in [0, {scores.shape[1]}), got out-of-range values")
    rows = np.arange(scores.shape[0])
    target_scores = scores[rows, targets][:, None]  # (N, 1)
    # ">=" counts the target itself once; subtracting it leaves the other items at or above it.
    return (scores >= target_scores).sum(axis=1).astype(np.int64) - 1  # (N,)


def hit_rate(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-row HR@k: (N,) float64, 1.0 where the target is in the top k."""
    _check_k(k)
    return (np.asarray(ranks) < k).astype(np.float64)


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-row NDCG@k for one relevant item: (N,) float64, 1 / log2(rank + 2) inside the top k."""
    _check_k(k)
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / np.log2(ranks.astype(np.float64) + 2.0), 0.0)


def mrr(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-row reciprocal rank cut at k: (N,) float64, 1 / (rank + 1) inside the top k."""
    _check_k(k)
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / (ranks.astype(np.float64) + 1.0), 0.0)


_PER_ROW = {"hr": hit_rate, "ndcg": ndcg, "mrr": mrr}


def ranking_metrics(
    ranks: np.ndarray, ks: Iterable[int] = (5, 10, 20), metrics: Iterable[str] = ("hr", "ndcg")
) -> dict[str, float]:
    """Means over rows, keyed like ``"hr@10"``; an empty `ranks` gives NaN (no targets, no estimate)."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    for name in metrics:
        if name not in _PER_ROW:
            raise ValueError(f"unknown ranking metric {name!r}; expected one of {RANKING_METRICS}")
        for k in ks:
            out[f"{name}@{k}"] = float(_PER_ROW[name](ranks, k).mean()) if ranks.size else float("nan")
    return out


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")

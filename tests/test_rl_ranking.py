"""Ranking metrics on tiny score matrices with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rl.ranking import hit_rate, mrr, ndcg, ranking_metrics, target_ranks


def test_ranks_count_other_items_at_or_above_the_target():
    scores = np.array(
        [
            [0.1, 0.5, 0.3, 0.0],  # target 2: only 0.5 is above -> rank 1
            [1.0, 1.0, 0.0, 2.0],  # target 0: 2.0 above, 1.0 tied (counted against) -> rank 2
            [0.0, 0.0, 0.0, 0.0],  # target 3: all tied -> last, rank 3
            [9.0, -1.0, -np.inf, 3.0],  # target 0: best -> rank 0
        ]
    )
    ranks = target_ranks(scores, np.array([2, 0, 3, 0]))
    assert ranks.tolist() == [1, 2, 3, 0]


def test_per_row_metrics_exact():
    ranks = np.array([0, 1, 4, 5, 30])
    assert hit_rate(ranks, 5).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    np.testing.assert_allclose(
        ndcg(ranks, 5), [1.0, 1 / math.log2(3), 1 / math.log2(6), 0.0, 0.0], rtol=1e-12
    )
    np.testing.assert_allclose(mrr(ranks, 5), [1.0, 0.5, 0.2, 0.0, 0.0], rtol=1e-12)


def test_ranking_metrics_means_and_keys():
    ranks = np.array([0, 1, 4, 5])
    metrics = ranking_metrics(ranks, ks=(1, 5), metrics=("hr", "ndcg", "mrr"))
    assert list(metrics) == ["hr@1", "hr@5", "ndcg@1", "ndcg@5", "mrr@1", "mrr@5"]
    assert metrics["hr@1"] == 0.25
    assert metrics["hr@5"] == 0.75
    assert metrics["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert metrics["mrr@5"] == pytest.approx((1 + 0.5 + 0.2) / 4)
    assert math.isnan(ranking_metrics(np.zeros((0,), np.int64), ks=(5,))["hr@5"])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="column indices"):
        target_ranks(np.array([[0.0, 1.0]]), np.array([2]))
    with pytest.raises(ValueError, match="k must be"):
        hit_rate(np.array([0]), 0)
    with pytest.raises(ValueError, match="unknown ranking metric"):
        ranking_metrics(np.array([0]), metrics=("recall",))

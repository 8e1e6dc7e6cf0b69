"""Exposure and fairness numbers on tiny hand-made catalogues."""

from __future__ import annotations

import numpy as np
import pytest

from rl.exposure import (
    catalogue_coverage,
    exposure_report,
    gini,
    group_exposure,
    popularity_bias,
    popularity_percentiles,
)


def test_coverage_counts_items_shown_at_least_once() -> None:
    assert catalogue_coverage(np.array([3, 0, 1, 0])) == 0.5
    assert catalogue_coverage(np.zeros(5, np.int64)) == 0.0


def test_gini_exact_values() -> None:
    assert gini(np.array([1.0, 1.0, 1.0, 1.0])) == 0.0
    assert gini(np.array([0.0, 0.0, 0.0, 4.0])) == pytest.approx(0.75)  # (n - 1) / n
    # Sorted 1, 2, 3: sum (2i - n - 1) x_i = -2*1 + 0*2 + 2*3 = 4; / (3 * 6) = 2/9.
    assert gini(np.array([3.0, 1.0, 2.0])) == pytest.approx(2 / 9)
    assert gini(np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        gini(np.array([-1.0, 2.0]))


def test_group_exposure_sums_items_per_brand() -> None:
    exposure = np.array([1, 2, 3, 4])
    brands = np.array([0, 2, 0, 2])
    np.testing.assert_array_equal(group_exposure(exposure, brands, 3), [4.0, 0.0, 6.0])


def test_popularity_percentiles_average_ties() -> None:
    np.testing.assert_allclose(
        popularity_percentiles(np.array([10, 0, 5, 5, 1])), [1.0, 0.0, 0.625, 0.625, 0.25]
    )
    np.testing.assert_allclose(popularity_percentiles(np.array([7, 7, 7])), [0.5, 0.5, 0.5])


def test_popularity_bias_is_the_exposure_weighted_percentile() -> None:
    popularity = np.array([100, 10, 1, 0])  # percentiles 1, 2/3, 1/3, 0
    assert popularity_bias(np.array([1, 0, 0, 0]), popularity) == pytest.approx(1.0)
    assert popularity_bias(np.array([1, 1, 1, 1]), popularity) == pytest.approx(0.5)
    assert popularity_bias(np.array([0, 3, 0, 1]), popularity) == pytest.approx(0.5)  # (3 * 2/3 + 0) / 4
    assert popularity_bias(np.zeros(4), popularity) == 0.0


def test_report_puts_them_together() -> None:
    report = exposure_report(np.array([4, 0, 0, 0]), np.array([0, 0, 1, 1]), 2, np.array([3, 2, 1, 0]))
    assert report.coverage == 0.25
    assert report.item_gini == pytest.approx(0.75)
    assert report.brand_gini == pytest.approx(0.5)  # brands (4, 0)
    assert report.popularity_bias == pytest.approx(1.0)

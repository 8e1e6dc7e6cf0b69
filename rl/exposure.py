"""Exposure and fairness of recommendations: coverage, Gini of exposure, popularity bias.

All functions take per-item exposure counts over the whole catalogue as an array indexed by item
(items never recommended count as 0), so an unexposed long tail shows up in every number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def catalogue_coverage(exposure: np.ndarray) -> float:
    """Share of the catalogue recommended at least once; exposure (num_items,) -> [0, 1]."""
    assert exposure.ndim == 1, f"exposure must be (num_items,), got {exposure.shape}"
    if exposure.shape[0] == 0:
        return 0.0
    return float(np.count_nonzero(exposure > 0) / exposure.shape[0])


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (n,): 0 when equal, (n - 1) / n when one holds all.

    G = sum_i (2 i - n - 1) x_(i) / (n sum x), over the values sorted ascending (i = 1..n).
    All-zero (or empty) input is perfectly equal: 0.
    """
    assert values.ndim == 1, f"values must be (n,), got {values.shape}"
    x = np.sort(np.asarray(values, np.float64))  # (n,)
    if x.size and x[0] < 0:
        raise ValueError("gini needs non-negative values")
    n, total = x.size, float(x.sum())
    if n == 0 or total == 0.0:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)  # (n,)
    return float(np.sum((2.0 * ranks - n - 1.0) * x) / (n * total))


def group_exposure(exposure: np.ndarray, group_of_item: np.ndarray, num_groups: int) -> np.ndarray:
    """Exposure summed per group (e.g. brand): exposure (num_items,), group index (num_items,) -> (G,)."""
    assert exposure.shape == group_of_item.shape, (exposure.shape, group_of_item.shape)
    return np.bincount(group_of_item, weights=exposure.astype(np.float64), minlength=num_groups)


def popularity_percentiles(popularity: np.ndarray) -> np.ndarray:
    """Each item's popularity percentile in the catalogue, in [0, 1]: 0 least, 1 most popular.

    popularity (num_items,) -> (num_items,); tied items share the mean of their ranks, so a
    catalogue of equally popular items is all at 0.5.
    """
    assert popularity.ndim == 1, f"popularity must be (num_items,), got {popularity.shape}"
    n = popularity.shape[0]
    if n == 1:
        return np.full((1,), 0.5)
    order = np.argsort(popularity, kind="stable")
    ranks = np.empty(n, np.float64)  # (num_items,) 0-based ranks, ties averaged below
    ranks[order] = np.arange(n, dtype=np.float64)
    _, inverse = np.unique(popularity, return_inverse=True)
    mean_rank = np.bincount(inverse, weights=ranks) / np.bincount(inverse)  # (distinct values,)
    return mean_rank[inverse] / (n - 1)


def popularity_bias(exposure: np.ndarray, popularity: np.ndarray) -> float:
    """Exposure-weighted mean popularity percentile of what was recommended (0.5: no bias).

    The catalogue's own mean percentile is 0.5; a recommender that shows only the most popular
    items scores near 1, one that favours the long tail scores below 0.5. 0.0 without exposure.
    """
    assert exposure.shape == popularity.shape, (exposure.shape, popularity.shape)
    total = float(exposure.sum())
    if total == 0.0:
        return 0.0
    return float(np.dot(exposure, popularity_percentiles(popularity)) / total)


@dataclass(frozen=True)
class ExposureReport:
    """The exposure numbers of one policy (or of all recommendations together)."""

    coverage: float
    """Share of the catalogue recommended at least once."""
    item_gini: float
    """Gini of exposure across all catalogue items."""
    brand_gini: float
    """Gini of exposure summed per brand, across all brands."""
    popularity_bias: float
    """Exposure-weighted mean popularity percentile of recommended items (catalogue: 0.5)."""


def exposure_report(
    exposure: np.ndarray, brand_of_item: np.ndarray, num_brands: int, popularity: np.ndarray
) -> ExposureReport:
    """All exposure numbers for per-item counts (num_items,) over a catalogue."""
    return ExposureReport(
        coverage=catalogue_coverage(exposure),
        item_gini=gini(exposure),
        brand_gini=gini(group_exposure(exposure, brand_of_item, num_brands)),
        popularity_bias=popularity_bias(exposure, popularity),
    )

"""Replay buffer: ring overwrite order, uniform and prioritized sampling frequencies, weights."""

from __future__ import annotations

import numpy as np
import pytest

from rl.batch import ObsBatch, TransitionBatch, transition_batch
from rl.replay import ReplayBuffer, SumTree


def numbered(ids: list[int], window: int = 2, feature_dim: int = 3) -> TransitionBatch:
    """Transitions whose every field encodes their id, so a sample can be checked row by row."""
    size = len(ids)
    tags = np.asarray(ids)

    def obs(offset: int) -> ObsBatch:
        return ObsBatch(
            items=np.repeat(tags[:, None] + offset, window, axis=1).astype(np.int32),
            event_types=np.ones((size, window), np.int32),
            gaps=np.repeat(tags[:, None] * 0.5, window, axis=1).astype(np.float32),
            features=np.repeat(tags[:, None] + offset, feature_dim, axis=1).astype(np.float32),
        )

    return transition_batch(obs(0), tags + 2, tags.astype(float), tags % 2 == 1, obs(1000))


def test_ring_buffer_overwrites_the_oldest_first() -> None:
    buffer = ReplayBuffer(5, window=2, feature_dim=3)
    assert len(buffer) == 0
    np.testing.assert_array_equal(buffer.add(numbered([0, 1, 2])), [0, 1, 2])
    assert len(buffer) == 3
    np.testing.assert_array_equal(buffer.add(numbered([3, 4, 5, 6])), [3, 4, 0, 1])
    assert len(buffer) == 5
    batch, indices, _ = buffer.sample(200, np.random.default_rng(0))
    # slot -> id stored there: 5 and 6 overwrote slots 0 and 1.
    slot_ids = np.array([5, 6, 2, 3, 4])
    np.testing.assert_array_equal(batch.r_t, slot_ids[indices])
    np.testing.assert_array_equal(batch.a_tm1, slot_ids[indices] + 2)
    np.testing.assert_array_equal(batch.obs_t.items[:, 0], slot_ids[indices] + 1000)
    np.testing.assert_array_equal(batch.obs_tm1.features[:, 2], slot_ids[indices])
    np.testing.assert_array_equal(batch.discount_t, np.where(slot_ids[indices] % 2 == 1, 0.0, 1.0))
    # A batch longer than the capacity keeps its newest rows, in the slots sequential writes would
    # have left them in: 12 rows from slot 2 on, so the last 5 (ids 17..21) land in slots 4, 0..3.
    np.testing.assert_array_equal(buffer.add(numbered(list(range(10, 22)))), [4, 0, 1, 2, 3])
    batch, indices, _ = buffer.sample(200, np.random.default_rng(1))
    np.testing.assert_array_equal(batch.r_t, np.array([18, 19, 20, 21, 17])[indices])
    np.testing.assert_array_equal(buffer.add(numbered([30])), [4])  # the ring continues after 21


def test_uniform_sampling_frequencies() -> None:
    buffer = ReplayBuffer(10, window=1, feature_dim=1)
    buffer.add(numbered(list(range(10)), window=1, feature_dim=1))
    draws = 200_000
    _, indices, weights = buffer.sample(draws, np.random.default_rng(2))
    frequencies = np.bincount(indices, minlength=10) / draws
    sigma = np.sqrt(0.1 * 0.9 / draws)
    assert np.all(np.abs(frequencies - 0.1) < 5 * sigma), frequencies
    np.testing.assert_array_equal(weights, 1.0)


def test_prioritized_frequencies_follow_priority_to_the_alpha() -> None:
    alpha = 0.7
    buffer = ReplayBuffer(8, window=1, feature_dim=1, prioritized=True, alpha=alpha, beta=0.5)
    slots = buffer.add(numbered(list(range(8)), window=1, feature_dim=1))
    td_errors = np.array([0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 8.0])
    buffer.update_priorities(slots, td_errors)
    mass = (np.abs(td_errors) + buffer.priority_epsilon) ** alpha
    np.testing.assert_allclose(buffer.priorities(), mass)
    expected = mass / mass.sum()
    rng = np.random.default_rng(3)
    counts = np.zeros(8)
    draws = 0
    for _ in range(20):
        _, indices, _ = buffer.sample(10_000, rng)
        counts += np.bincount(indices, minlength=8)
        draws += indices.size
    frequencies = counts / draws
    sigma = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(frequencies - expected) < 5 * sigma + 1e-5), (frequencies, expected)


def test_prioritized_importance_weights() -> None:
    beta = 0.4
    buffer = ReplayBuffer(4, window=1, feature_dim=1, prioritized=True, alpha=1.0, beta=beta)
    slots = buffer.add(numbered([0, 1, 2, 3], window=1, feature_dim=1))
    buffer.update_priorities(slots, np.array([1.0, 2.0, 3.0, 4.0]))
    batch, indices, weights = buffer.sample(64, np.random.default_rng(4))
    probabilities = (np.array([1.0, 2.0, 3.0, 4.0]) + buffer.priority_epsilon) / (
        10.0 + 4 * buffer.priority_epsilon
    )
    raw = (4 * probabilities[indices]) ** -beta
    np.testing.assert_allclose(weights, raw / raw.max(), rtol=1e-6)
    np.testing.assert_array_equal(batch.weights, weights)
    assert weights.max() == 1.0
    # beta = 0: no correction.
    _, _, unweighted = buffer.sample(16, np.random.default_rng(5), beta=0.0)
    np.testing.assert_array_equal(unweighted, 1.0)


def test_new_transitions_get_the_highest_priority_seen() -> None:
    buffer = ReplayBuffer(4, window=1, feature_dim=1, prioritized=True, alpha=1.0)
    slots = buffer.add(numbered([0, 1], window=1, feature_dim=1))
    buffer.update_priorities(slots, np.array([5.0, 0.5]))
    new_slot = buffer.add(numbered([2], window=1, feature_dim=1))
    np.testing.assert_allclose(buffer.priorities()[new_slot], 5.0 + buffer.priority_epsilon)


def test_sample_stacked_for_fused_updates() -> None:
    buffer = ReplayBuffer(16, window=2, feature_dim=3, prioritized=True)
    buffer.add(numbered(list(range(16))))
    batches, indices, weights = buffer.sample_stacked(3, 5, np.random.default_rng(6))
    assert indices.shape == weights.shape == (3, 5)
    assert batches.obs_tm1.items.shape == (3, 5, 2)
    assert batches.obs_t.features.shape == (3, 5, 3)
    assert batches.a_tm1.shape == batches.r_t.shape == batches.discount_t.shape == (3, 5)
    np.testing.assert_array_equal(batches.r_t, indices)  # slot i holds id i
    np.testing.assert_array_equal(batches.weights, weights)


def test_uniform_buffer_ignores_priorities_and_errors_are_reported() -> None:
    buffer = ReplayBuffer(4, window=2, feature_dim=3)
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1, np.random.default_rng(0))
    buffer.add(numbered([0]))
    buffer.update_priorities(np.array([0]), np.array([3.0]))  # a no-op for a uniform buffer
    with pytest.raises(ValueError, match="window"):
        buffer.add(numbered([1], window=3))
    prioritized = ReplayBuffer(4, window=2, feature_dim=3, prioritized=True)
    prioritized.add(numbered([0]))
    with pytest.raises(ValueError, match="indices"):
        prioritized.update_priorities(np.array([3]), np.array([1.0]))


def test_sum_tree_prefix_search_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    for capacity in (1, 2, 3, 7, 64, 100):
        tree = SumTree(capacity)
        values = rng.random(capacity)
        tree.set(np.arange(capacity), values)
        assert tree.total == pytest.approx(values.sum())
        queries = rng.random(500) * values.sum()
        expected = np.searchsorted(np.cumsum(values), queries, side="right")
        np.testing.assert_array_equal(tree.find(queries), expected)

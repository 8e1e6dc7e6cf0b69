"""Slates: exact per-position propensities (enumerated, and matched by empirical frequencies),
masks, empty positions, and greedy top-k against a numpy reference."""

from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.slate import epsilon_greedy_slate, greedy_top_k, scale_bits, softmax_slate, user_slates

SCORES = np.array([0.3, 2.0, 1.0, -1.0, 1.5, 0.7], np.float32)
ALLOWED = np.array([True, True, True, False, True, True])
K = 3
DRAWS = 40_000


def epsilon_greedy_reference(remaining: list[int], action: int, epsilon: float) -> float:
    best = max(remaining, key=lambda a: SCORES[a])
    return (1 - epsilon) * (action == best) + epsilon / len(remaining)


def softmax_reference(remaining: list[int], action: int, temperature: float) -> float:
    logits = SCORES[remaining].astype(np.float64) / temperature
    return float(np.exp(SCORES[action] / temperature - np.log(np.exp(logits).sum())))


def draw(policy: str, parameter: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = jnp.broadcast_to(SCORES, (DRAWS, SCORES.size))  # (N, A): N independent users
    select = epsilon_greedy_slate if policy == "epsilon" else softmax_slate
    actions, propensities, explored = select(scores, ALLOWED, K, parameter, jax.random.key(42))
    return np.asarray(actions), np.asarray(propensities), np.asarray(explored)


@pytest.mark.parametrize(("policy", "parameter"), [("epsilon", 0.4), ("softmax", 0.7)])
def test_propensities_are_exact_sum_to_one_and_match_frequencies(policy: str, parameter: float) -> None:
    actions, propensities, explored = draw(policy, parameter)
    assert actions.shape == propensities.shape == explored.shape == (DRAWS, K)
    allowed = [int(a) for a in np.flatnonzero(ALLOWED)]
    reference = epsilon_greedy_reference if policy == "epsilon" else softmax_reference
    for position in range(K):
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for row in range(DRAWS):
            groups[tuple(actions[row, :position])].append(row)
        for prefix, rows in groups.items():
            remaining = [a for a in allowed if a not in prefix]
            chosen = actions[rows, position]
            reported = propensities[rows, position]
            assert set(chosen.tolist()) <= set(remaining), "a disallowed or repeated action was chosen"
            total = 0.0
            for action in remaining:
                expected = reference(remaining, action, parameter)
                total += expected
                hits = chosen == action
                # Every draw of this action reports the same, exact, propensity.
                np.testing.assert_allclose(reported[hits], expected, rtol=1e-5)
                best = max(remaining, key=lambda a: SCORES[a])
                assert np.all(explored[np.asarray(rows)[hits], position] == (action != best))
                frequency = hits.mean()
                sigma = np.sqrt(expected * (1 - expected) / len(rows))
                assert abs(frequency - expected) < 5 * sigma + 2e-3, (prefix, action, frequency, expected)
            # Enumerating every possible choice at this position: the propensities sum to one.
            assert total == pytest.approx(1.0, abs=1e-6)
            # And the function's reported values for the actions it did pick agree with that total.
            observed = {int(a): float(p) for a, p in zip(chosen, reported, strict=True)}
            if len(rows) >= 2000:
                assert set(observed) == set(remaining)
                assert sum(observed.values()) == pytest.approx(1.0, abs=1e-5)


def test_epsilon_zero_is_greedy_and_epsilon_one_is_uniform() -> None:
    actions, propensities, explored = epsilon_greedy_slate(SCORES, ALLOWED, K, 0.0, jax.random.key(0))
    np.testing.assert_array_equal(actions, [1, 4, 2])
    np.testing.assert_array_equal(propensities, [1.0, 1.0, 1.0])
    assert not np.any(explored)
    top_actions, _ = greedy_top_k(SCORES, ALLOWED, K)
    np.testing.assert_array_equal(actions, top_actions)
    _, propensities, _ = epsilon_greedy_slate(SCORES, ALLOWED, K, 1.0, jax.random.key(1))
    np.testing.assert_allclose(propensities, [1 / 5, 1 / 4, 1 / 3], rtol=1e-6)


def test_fewer_allowed_actions_than_slots_leaves_empty_positions() -> None:
    allowed = np.array([False, True, False, False, True, False])
    for select, parameter in ((epsilon_greedy_slate, 0.5), (softmax_slate, 1.0)):
        actions, propensities, explored = select(SCORES, allowed, 4, parameter, jax.random.key(3))
        assert sorted(actions[:2].tolist()) == [1, 4]
        np.testing.assert_array_equal(actions[2:], [-1, -1])
        np.testing.assert_array_equal(propensities[2:], [0.0, 0.0])
        assert propensities[1] == pytest.approx(1.0)  # one action left: it is certain
        assert not np.any(explored[2:])
    actions, values = greedy_top_k(SCORES, allowed, 4)
    np.testing.assert_array_equal(actions, [1, 4, -1, -1])
    assert np.all(np.isneginf(values[2:]))


def test_per_user_masks_and_vmap() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(64, 20)).astype(np.float32)
    allowed = rng.random((64, 20)) < 0.5
    allowed[:, 0] = True
    actions, propensities, _ = epsilon_greedy_slate(scores, allowed, 5, 0.3, jax.random.key(7))
    actions = np.asarray(actions)
    for row in range(64):
        picked = actions[row][actions[row] >= 0]
        assert np.all(allowed[row, picked]), "a masked action was recommended"
        assert len(set(picked.tolist())) == picked.size, "an action repeated within a slate"
    assert np.all((np.asarray(propensities) > 0) == (actions >= 0))
    keys = jax.random.split(jax.random.key(8), 64)
    per_user = jax.jit(jax.vmap(lambda s, m, key: softmax_slate(s, m, 5, 0.5, key)))
    vmapped_actions, _, _ = per_user(scores, allowed, keys)
    assert vmapped_actions.shape == (64, 5)
    assert np.all(np.take_along_axis(allowed, np.asarray(vmapped_actions), axis=1))


def test_greedy_top_k_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(16, 50)).astype(np.float32)
    allowed = rng.random((16, 50)) < 0.6
    allowed[3] = False
    allowed[3, [7, 9]] = True  # fewer allowed than k in one row
    actions, values = greedy_top_k(scores, allowed, 10)
    for row in range(16):
        candidates = np.flatnonzero(allowed[row])
        order = candidates[np.argsort(-scores[row, candidates], kind="stable")][:10]
        expected = np.full(10, -1)
        expected[: order.size] = order
        np.testing.assert_array_equal(actions[row], expected)
        np.testing.assert_array_equal(values[row, : order.size], scores[row, order])


def test_k_must_fit_the_action_count() -> None:
    with pytest.raises(ValueError, match="k must be"):
        greedy_top_k(SCORES, ALLOWED, 7)


@pytest.mark.parametrize("exploration", ["epsilon", "softmax"])
def test_blocked_indices_give_exactly_the_slates_of_the_folded_mask(exploration: str) -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(32, 600)).astype(np.float32)  # (B, A): more than two rank blocks
    shared = rng.random(600) < 0.7  # (A,)
    blocked = rng.integers(-1, 600, (32, 12)).astype(np.int32)  # (B, m), with repeats and -1
    blocked[0] = -1
    blocked[1, :] = np.flatnonzero(shared)[:12]  # all allowed, all distinct
    folded = np.broadcast_to(shared, scores.shape).copy()  # (B, A)
    for row in range(32):
        folded[row, blocked[row][blocked[row] >= 0]] = False
    keys = jax.random.split(jax.random.key(5), 32)
    parameter = 0.5 if exploration == "epsilon" else 0.8
    with_blocked = user_slates(scores, shared, blocked, keys, parameter, k=10, exploration=exploration)
    with_mask = user_slates(
        scores, folded, np.full((32, 1), -1, np.int32), keys, parameter, k=10, exploration=exploration
    )
    for got, expected in zip(with_blocked, with_mask, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    actions = np.asarray(with_blocked[0])
    assert np.all(np.take_along_axis(folded, actions, axis=1)), "a blocked or disallowed action was chosen"


def test_epsilon_one_draws_uniformly_over_a_large_masked_catalogue() -> None:
    # Uniform picks come from ranks mapped through block counts: check they land on every allowed
    # action about equally often, across block boundaries, and never elsewhere.
    num_actions, users = 1000, 20_000
    allowed = np.zeros(num_actions, bool)
    allowed[[3, 255, 256, 257, 511, 512, 700, 999]] = True
    scores = np.zeros((users, num_actions), np.float32)
    keys = jax.random.split(jax.random.key(11), users)
    blocked = np.full((users, 1), -1, np.int32)
    actions, propensities, _ = user_slates(scores, allowed, blocked, keys, 1.0, k=1, exploration="epsilon")
    counts = np.bincount(np.asarray(actions)[:, 0], minlength=num_actions)
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(allowed))
    expected = users / 8
    assert np.all(np.abs(counts[allowed] - expected) < 5 * np.sqrt(expected * 7 / 8))
    np.testing.assert_allclose(np.asarray(propensities), 1 / 8)


def test_scale_bits_is_floor_of_the_64_bit_product() -> None:
    cases = [
        (0, 0, 1),
        (2**32 - 1, 2**32 - 1, 1),
        (2**32 - 1, 2**32 - 1, 100_000),
        (2**31, 0, 3),
        (12345, 67890, 2**31 - 1),
        (2**32 - 1, 0, 2**31 - 1),
        (0, 2**32 - 1, 7),
    ]
    high, low, span = (np.asarray(column, np.uint32) for column in zip(*cases, strict=True))
    got = np.asarray(scale_bits(high, low, span)).tolist()
    assert got == [((h << 32 | lo) * s) >> 64 for h, lo, s in cases]

"""QNetwork: shapes, the shared item table, masking of padding, the dueling and next-item heads."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.batch import ObsBatch
from rl.networks import NetworkConfig, QNetwork, init_params_compiled

NUM_ACTIONS = 12


@functools.cache
def compiled(network: QNetwork, method: Any) -> Any:
    return jax.jit(functools.partial(network.apply, method=method))


def apply(network: QNetwork, params: dict, *args: object, method: Any = None) -> Any:
    """network.apply, compiled: one quick compile beats eagerly compiling every op of a first call."""
    return compiled(network, method)(params, *args)


def make_obs(items: list[list[int]], features_dim: int = 3) -> ObsBatch:
    items_array = np.asarray(items, np.int32)  # (B, W)
    rng = np.random.default_rng(0)
    return ObsBatch(
        items=items_array,
        event_types=np.where(items_array > 0, 1, 0).astype(np.int32),
        gaps=np.where(items_array > 0, 0.5, 0.0).astype(np.float32),
        features=rng.normal(size=(len(items), features_dim)).astype(np.float32),
    )


@functools.cache
def build(full: bool) -> tuple[QNetwork, dict]:
    """Two networks serve every test (each new shape costs a compile): plain, and dueling + SQN head."""
    config = NetworkConfig.from_dict(
        {
            "num_actions": NUM_ACTIONS,
            "embed_dim": 8,
            "hidden_sizes": [16],
            "dueling": full,
            "next_item_head": full,
        }
    )
    network = QNetwork(config)
    params = init_params_compiled(network, make_obs([[0, 2, 3]]), jax.random.key(0))
    return network, params


@pytest.mark.parametrize("full", [False, True])
def test_shapes_and_gathered_q_matches_full_scores(full: bool) -> None:
    network, params = build(full)
    obs = make_obs([[0, 2, 3], [4, 5, 1], [0, 0, 0]])
    q = apply(network, params, obs)
    assert q.shape == (3, NUM_ACTIONS)
    actions = jnp.array([2, 7, 11])
    q_taken = apply(network, params, obs, actions, method=QNetwork.q_for_actions)
    np.testing.assert_allclose(q_taken, q[jnp.arange(3), actions], rtol=1e-5, atol=1e-6)
    if full:
        q_taken_2, logits = apply(
            network, params, obs, actions, method=QNetwork.q_for_actions_and_next_item_logits
        )
        np.testing.assert_allclose(q_taken_2, q_taken, rtol=1e-6, atol=1e-6)
        assert logits.shape == (3, NUM_ACTIONS)


def test_scores_are_dot_products_with_the_item_table() -> None:
    network, params = build(False)
    obs = make_obs([[0, 2, 3]])
    q = apply(network, params, obs)
    table = params["params"]["item_embedding"]["embedding"]
    bias = params["params"]["action_bias"]
    state = (q - bias) @ jnp.linalg.pinv(table.T)  # recover f(s) from the scores
    np.testing.assert_allclose(state @ table.T + bias, q, rtol=1e-4, atol=1e-4)


def test_item_table_is_shared_between_state_and_action_sides() -> None:
    network, params = build(False)
    obs_with_5 = make_obs([[0, 5, 2]])
    obs_without_5 = make_obs([[0, 6, 2]])
    changed = jax.tree.map(jnp.copy, params)
    table = changed["params"]["item_embedding"]["embedding"]
    changed["params"]["item_embedding"]["embedding"] = table.at[5].add(1.0)
    before_with, after_with = apply(network, params, obs_with_5), apply(network, changed, obs_with_5)
    before_without, after_without = (
        apply(network, params, obs_without_5),
        apply(network, changed, obs_without_5),
    )
    # Action side: Q(s, 5) moves for every state.
    assert abs(float(after_without[0, 5] - before_without[0, 5])) > 1e-4
    # Other actions only move where item 5 is in the window (the state side).
    others = np.array([a for a in range(NUM_ACTIONS) if a != 5])
    np.testing.assert_allclose(after_without[0, others], before_without[0, others], rtol=0, atol=0)
    assert float(jnp.max(jnp.abs(after_with[0, others] - before_with[0, others]))) > 1e-4


def test_padding_is_masked_but_out_of_vocabulary_counts() -> None:
    network, params = build(False)
    obs = make_obs([[0, 0, 3]])
    noisy_padding = obs.replace(gaps=obs.gaps.copy())
    noisy_padding.gaps[0, 0] = 9.0  # a gap in a padded slot must not matter
    np.testing.assert_array_equal(apply(network, params, obs), apply(network, params, noisy_padding))
    with_oov = make_obs([[0, 1, 3]])
    with_oov = with_oov.replace(features=obs.features)
    assert float(jnp.max(jnp.abs(apply(network, params, with_oov) - apply(network, params, obs)))) > 1e-6


def test_dueling_advantages_have_zero_mean() -> None:
    network, params = build(True)
    obs = make_obs([[0, 2, 3], [4, 5, 6]])
    q = apply(network, params, obs)
    hidden = apply(network, params, obs, method=QNetwork.encode)
    value = hidden @ params["params"]["value_head"]["kernel"] + params["params"]["value_head"]["bias"]
    np.testing.assert_allclose(q.mean(axis=1), value[:, 0], rtol=1e-5, atol=1e-5)


def test_without_a_window_only_features_are_used() -> None:
    config = NetworkConfig(num_actions=5, embed_dim=4, hidden_sizes=(8,))
    network = QNetwork(config)
    obs = ObsBatch(
        items=np.zeros((2, 0), np.int32),
        event_types=np.zeros((2, 0), np.int32),
        gaps=np.zeros((2, 0), np.float32),
        features=np.eye(2, 6, dtype=np.float32),
    )
    params = init_params_compiled(network, obs, jax.random.key(1))
    assert params["params"]["hidden_layers_0"]["kernel"].shape == (6, 8)
    assert "event_type_embedding" not in params["params"]
    assert apply(network, params, obs).shape == (2, 5)


def test_next_item_logits_need_the_head() -> None:
    network, params = build(False)
    with pytest.raises(ValueError, match="next_item_head"):
        apply(network, params, make_obs([[0, 2, 3]]), method=QNetwork.next_item_logits)


def test_config_validation_and_round_trip() -> None:
    config = NetworkConfig(num_actions=10, hidden_sizes=(32, 16), dueling=True)
    assert NetworkConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="'hiden_sizes'"):
        NetworkConfig.from_dict({"num_actions": 10, "hiden_sizes": [3]})
    with pytest.raises(ValueError, match="num_actions"):
        NetworkConfig(num_actions=0)
    with pytest.raises(TypeError):
        NetworkConfig(10)  # type: ignore[call-arg]  # keyword-only


@functools.cache
def build_repeat(dueling: bool) -> tuple[QNetwork, dict, dict]:
    """A network with the repeat head: params with the head's output zeroed (as initialised) and
    with it set to fixed non-zero weights, so the head's effect is visible."""
    config = NetworkConfig(
        num_actions=NUM_ACTIONS,
        embed_dim=8,
        hidden_sizes=(16,),
        dueling=dueling,
        next_item_head=True,
        repeat_head=True,
        repeat_hidden=4,
    )
    network = QNetwork(config)
    params = init_params_compiled(network, make_obs([[0, 2, 3]]), jax.random.key(0))
    kernel = params["params"]["repeat_out"]["kernel"]
    assert not np.any(np.asarray(kernel)), "the repeat head starts at zero"
    active = jax.tree.map(lambda x: x, params)
    active["params"]["repeat_out"]["kernel"] = jnp.asarray(
        np.random.default_rng(1).normal(size=kernel.shape).astype(np.float32) * 3.0
    )
    active["params"]["repeat_out"]["bias"] = jnp.asarray([2.0, -1.0])
    return network, params, active


@pytest.mark.parametrize("dueling", [False, True])
def test_repeat_head_adds_a_score_to_exactly_the_window_items(dueling: bool) -> None:
    network, silent, active = build_repeat(dueling)
    # Row 0 holds item 3 twice; row 1 has an OOV slot (1), which must get nothing; row 2 is empty.
    obs = make_obs([[3, 2, 3], [4, 5, 1], [0, 0, 0]])
    q_silent = np.asarray(apply(network, silent, obs))
    q_active = np.asarray(apply(network, active, obs))
    advantage_shift = q_active - q_silent  # (B, A)
    if dueling:
        # V(s) - mean_a A(s, a) moves every action alike; only the differences between actions count.
        advantage_shift = advantage_shift - advantage_shift[:, [0]]
    touched = [{2, 3}, {4, 5}, set()]
    for row, items in enumerate(touched):
        untouched = [a for a in range(NUM_ACTIONS) if a not in items]
        np.testing.assert_allclose(
            advantage_shift[row, untouched], advantage_shift[row, untouched[0]], atol=1e-5
        )
        for item in items:
            assert abs(advantage_shift[row, item] - advantage_shift[row, untouched[0]]) > 1e-3
    # The gathered and chunk-ready forms agree with the full matrix.
    actions = jnp.array([3, 5, 7])
    q_taken = apply(network, active, obs, actions, method=QNetwork.q_for_actions)
    np.testing.assert_allclose(q_taken, q_active[np.arange(3), actions], rtol=1e-5, atol=1e-5)
    q_taken_2, logits = apply(
        network, active, obs, actions, method=QNetwork.q_for_actions_and_next_item_logits
    )
    np.testing.assert_allclose(q_taken_2, q_taken, rtol=1e-5, atol=1e-5)
    silent_logits = apply(network, silent, obs, method=QNetwork.next_item_logits)
    logit_shift = np.asarray(logits) - np.asarray(silent_logits)
    assert np.all(logit_shift[0, [0, 1, 4, 5, 6]] == 0.0) and np.all(logit_shift[0, [2, 3]] != 0.0)
    assert np.all(logit_shift[1, [4, 5]] != 0.0) and logit_shift[1, 1] == 0.0
    assert not np.any(logit_shift[2])


def test_repeat_scores_of_a_repeated_item_add_up() -> None:
    """Item 3 in two slots gets both slots' scores: computed here from the head's own outputs."""
    from rl.networks import add_to_items, repeat_for_actions

    scores = jnp.zeros((2, 6))
    items = jnp.array([[3, 2, 3], [0, 1, 5]])
    repeat = jnp.array([[1.0, 2.0, 4.0], [0.0, 0.0, 8.0]])
    out = np.asarray(add_to_items(scores, items, repeat))
    np.testing.assert_array_equal(out, [[0, 0, 2, 5, 0, 0], [0, 0, 0, 0, 0, 8]])
    np.testing.assert_array_equal(repeat_for_actions(items, repeat, jnp.array([3, 4])), [5.0, 0.0])


def test_repeat_scores_replace_the_logits_of_window_items() -> None:
    """The next-item head's window items take their repeat score (the highest of their slots)."""
    from rl.networks import replace_at_items

    scores = jnp.full((2, 6), 7.0)
    items = jnp.array([[3, 2, 3], [0, 1, 5]])
    repeat = jnp.array([[1.0, -2.0, 4.0], [9.0, 9.0, -8.0]])
    out = np.asarray(replace_at_items(scores, items, repeat))
    np.testing.assert_array_equal(out, [[7, 7, -2, 4, 7, 7], [7, 7, 7, 7, 7, -8]])


def test_repeat_and_explore_modes_mix_into_exact_probabilities() -> None:
    """RepeatNet's two modes by hand: row 0 holds items 3, 2, 3 with P(repeat) = 1/2; row 1 has no
    known window item (padding and OOV), so all its mass explores."""
    from rl.networks import repeat_explore_log_probs

    explore = jnp.log(jnp.array([[1.0, 1.0, 5.0, 7.0, 1.0, 3.0], [1.0] * 6]))  # (2, 6)
    items = jnp.array([[3, 2, 3], [0, 1, 0]])
    # Slot weights 1 : 2 : 1, so item 3 (two slots) and item 2 (one slot) share repeat mass equally.
    repeat = jnp.log(jnp.array([[1.0, 2.0, 1.0], [4.0, 4.0, 4.0]]))
    mode = jnp.array([0.0, 5.0])
    probs = np.exp(np.asarray(repeat_explore_log_probs(explore, items, repeat, mode)))
    # Row 0: items 2 and 3 get 1/2 * 1/2; the explore half goes to items 0, 1, 4, 5 as 1 : 1 : 1 : 3.
    np.testing.assert_allclose(probs[0], [1 / 12, 1 / 12, 1 / 4, 1 / 4, 1 / 12, 1 / 4], rtol=1e-6)
    np.testing.assert_allclose(probs[1], [1 / 6] * 6, rtol=1e-6)
    # A row without a window item keeps finite gradients (no NaN leaks through the masked softmax).
    grads = jax.grad(lambda r, m: repeat_explore_log_probs(explore, items, r, m)[:, 4].sum(), argnums=(0, 1))(
        repeat, mode
    )
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_mixture_network_scores_are_log_probabilities_over_the_items() -> None:
    config = NetworkConfig(
        num_actions=NUM_ACTIONS,
        embed_dim=8,
        hidden_sizes=(16,),
        next_item_head=True,
        repeat_head=True,
        repeat_hidden=4,
        repeat_mode="mixture",
    )
    network = QNetwork(config)
    obs = make_obs([[3, 2, 3], [0, 0, 0]])
    params = init_params_compiled(network, obs, jax.random.key(0))
    assert params["params"]["repeat_mode_logit"]["kernel"].shape == (16, 1)
    logits = np.asarray(apply(network, params, obs, method=QNetwork.next_item_logits))  # (2, A)
    np.testing.assert_allclose(np.exp(logits).sum(axis=1), [1.0, 1.0], rtol=1e-5)
    # The untrained repeat head scores every slot 0, so item 3 (two slots) has twice item 2's mass.
    np.testing.assert_allclose(np.exp(logits[0, 3]) / np.exp(logits[0, 2]), 2.0, rtol=1e-5)
    with pytest.raises(ValueError, match="repeat_mode"):
        NetworkConfig(num_actions=4, repeat_mode="copy")


def _both_heads(seed: int) -> tuple[NetworkConfig, QNetwork, dict, ObsBatch]:
    """A network with the next-item and repeat heads, shifted parameters (the repeat head starts at
    zero) and two states to score."""
    config = NetworkConfig(
        num_actions=NUM_ACTIONS, embed_dim=8, hidden_sizes=(16,), next_item_head=True, repeat_head=True
    )
    network = QNetwork(config)
    params = init_params_compiled(network, make_obs([[0, 2, 3]]), jax.random.key(seed))
    return config, network, jax.tree.map(lambda leaf: leaf + 0.1, params), make_obs([[0, 2, 3], [4, 4, 6]])


def test_a_network_that_scores_by_the_next_item_head_returns_its_logits() -> None:
    config, network, params, obs = _both_heads(2)
    served = QNetwork(dataclasses.replace(config, scores="next_item"))
    np.testing.assert_allclose(
        apply(served, params, obs), apply(network, params, obs, method=QNetwork.next_item_logits), rtol=1e-6
    )
    with pytest.raises(ValueError, match="scores"):
        NetworkConfig(num_actions=3, scores="value")
    with pytest.raises(ValueError, match="next_item_head"):
        NetworkConfig(num_actions=3, scores="next_item")


def test_a_network_that_scores_by_chance_times_value_blends_the_logit_with_log_q() -> None:
    config, network, params, obs = _both_heads(3)
    q, logits = apply(network, params, obs, method=QNetwork.q_and_next_item_logits)
    q, logits = np.asarray(q, np.float64), np.asarray(logits, np.float64)
    assert (q < 2.0).any() and (q > 2.0).any()  # the floor below is reached and not
    served = QNetwork(
        dataclasses.replace(
            config,
            scores="next_item_and_log_q",
            score_next_item_weight=0.5,
            score_log_q_weight=2.0,
            score_q_floor=2.0,
        )
    )
    expected = 0.5 * logits + 2.0 * np.log(np.maximum(q, 2.0))
    np.testing.assert_allclose(apply(served, params, obs), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="next_item_head"):
        NetworkConfig(num_actions=3, scores="next_item_and_log_q")
    with pytest.raises(ValueError, match="score_q_floor"):
        NetworkConfig(num_actions=3, next_item_head=True, scores="next_item_and_log_q", score_q_floor=0.0)


def test_with_its_own_item_table_q_is_scored_against_it_and_the_next_item_head_is_not() -> None:
    config = NetworkConfig(num_actions=NUM_ACTIONS, embed_dim=8, hidden_sizes=(16,), next_item_head=True)
    shared = QNetwork(config)
    own = QNetwork(dataclasses.replace(config, q_item_table=True))
    obs = make_obs([[0, 2, 3], [4, 4, 6]])
    params = init_params_compiled(own, obs, jax.random.key(4))
    inner = params["params"]
    np.testing.assert_array_equal(inner["q_item_embedding"]["embedding"], 0.0)  # Q starts at its bias
    rng = np.random.default_rng(4)
    table = rng.normal(size=inner["q_item_embedding"]["embedding"].shape).astype(np.float32)
    params = {"params": {**inner, "q_item_embedding": {"embedding": table}}}
    q, logits = apply(own, params, obs, method=QNetwork.q_and_next_item_logits)
    state = apply(own, params, obs, method=QNetwork.scoring_parts)[0]
    expected_q = np.asarray(state) @ table.T + np.asarray(inner["action_bias"])
    np.testing.assert_allclose(q, expected_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply(own, params, obs), q, rtol=1e-6)
    actions = jnp.asarray([3, 5])
    np.testing.assert_allclose(
        apply(own, params, obs, actions, method=QNetwork.q_for_actions),
        np.asarray(q)[[0, 1], [3, 5]],
        rtol=1e-5,
    )
    # The next-item head and the window still read the shared table: as in a network without Q's own.
    shared_params = {"params": {k: v for k, v in inner.items() if k != "q_item_embedding"}}
    np.testing.assert_allclose(
        logits, apply(shared, shared_params, obs, method=QNetwork.next_item_logits), rtol=1e-6
    )


def test_the_factored_q_is_the_reward_plus_the_chance_of_going_on_times_what_going_on_is_worth() -> None:
    config = NetworkConfig(
        num_actions=NUM_ACTIONS, embed_dim=8, hidden_sizes=(16,), next_item_head=True, repeat_head=True
    )
    factored = QNetwork(dataclasses.replace(config, factored_q=True))
    obs = make_obs([[0, 2, 3], [4, 4, 6]])
    params = init_params_compiled(factored, obs, jax.random.key(5))
    inner = params["params"]
    for name in ("continuation_bias", "future_bias"):
        np.testing.assert_array_equal(inner[name], 0.0)  # every item starts alike
    rng = np.random.default_rng(5)
    going_on_bias = rng.normal(size=NUM_ACTIONS).astype(np.float32)
    future_bias = rng.normal(size=NUM_ACTIONS).astype(np.float32)
    params = {"params": {**inner, "continuation_bias": going_on_bias, "future_bias": future_bias}}
    hidden = np.asarray(apply(factored, params, obs, method=QNetwork.encode), np.float64)

    def dense(name: str) -> np.ndarray:
        layer = params["params"][name]
        return (hidden @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"]))[:, 0]

    # R(s, a) = r(s) + b_a, plus the repeat head's Q score on the window's items (zero at the start).
    reward = dense("reward_state")[:, None] + np.asarray(inner["action_bias"])
    chance = 1.0 / (1.0 + np.exp(-(dense("continuation_state")[:, None] + going_on_bias)))
    worth = dense("continuation_value")[:, None] + future_bias
    expected = reward + chance * worth
    q = np.asarray(apply(factored, params, obs), np.float64)
    np.testing.assert_allclose(q, expected, rtol=1e-5, atol=1e-5)
    actions = jnp.asarray([3, 5])
    rows = np.arange(2), np.asarray(actions)
    np.testing.assert_allclose(
        apply(factored, params, obs, actions, method=QNetwork.q_for_actions), expected[rows], rtol=1e-5
    )
    parts_reward, log_odds, future, logits = jax.jit(
        functools.partial(factored.apply, next_item=True, method=QNetwork.factored_q_for_actions)
    )(params, obs, actions)
    np.testing.assert_allclose(parts_reward, reward[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(1.0 / (1.0 + np.exp(-np.asarray(log_odds))), chance[rows], rtol=1e-5)
    np.testing.assert_allclose(future, worth[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        logits, apply(factored, params, obs, method=QNetwork.next_item_logits), rtol=1e-6
    )
    assert "state_projection" not in inner  # Q reads no item table
    for other in ({"dueling": True}, {"q_item_table": True}):
        with pytest.raises(ValueError, match="form of Q of its own"):
            NetworkConfig(num_actions=3, factored_q=True, **other)
    with pytest.raises(ValueError, match="factored_q=True"):
        apply(QNetwork(config), params, obs, actions, method=QNetwork.factored_q_for_actions)

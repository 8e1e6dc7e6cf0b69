"""The learner: target-sync timing, fused updates, row resets, and learning a known Q* for real."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.batch import ObsBatch, TransitionBatch, empty_obs_batch, transition_batch
from rl.benchmark import dqn_update_flops
from rl.networks import NetworkConfig, QNetwork, q_values
from rl.replay import ReplayBuffer
from rl.serialize import tree_from_bytes, tree_to_bytes
from rl.train import (
    LAZY_ITEM_UPDATES_ABOVE,
    LearnerConfig,
    TrainState,
    create_train_state,
    lazy_item_updates,
    reset_action_rows,
    sample_negatives,
    stack_batches,
    update,
    update_jit,
    update_many,
    update_many_in_place,
    weight_decay_mask,
    with_next_item_prior,
)

SMALL = NetworkConfig(num_actions=6, embed_dim=4, hidden_sizes=(8,))
# Shared by several tests so the compiled update is reused (each new static config recompiles).
PERIODIC = LearnerConfig(target_update="periodic", target_update_period=3, learning_rate=1e-2)


def random_batch(rng: np.random.Generator, size: int, num_actions: int, window: int = 2) -> TransitionBatch:
    def obs() -> ObsBatch:
        items = rng.integers(0, num_actions, size=(size, window)).astype(np.int32)
        return ObsBatch(
            items=items,
            event_types=np.where(items > 0, 1, 0).astype(np.int32),
            gaps=rng.random((size, window)).astype(np.float32),
            features=rng.normal(size=(size, 3)).astype(np.float32),
        )

    return transition_batch(
        obs(), rng.integers(2, num_actions, size), rng.normal(size=size), rng.random(size) < 0.3, obs()
    )


def trees_equal(a: object, b: object) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_periodic_target_copies_online_params_exactly_at_the_period() -> None:
    config = PERIODIC
    rng = np.random.default_rng(0)
    state = create_train_state(SMALL, config, random_batch(rng, 1, 6).obs_tm1, jax.random.key(0))
    initial_target = jax.tree.map(np.asarray, state.target_params)
    assert trees_equal(state.target_params, state.params)
    network = QNetwork(SMALL)
    for step in (1, 2):
        state, _ = update_jit(state, random_batch(rng, 8, 6), network=network, config=config)
        assert int(state.step) == step
        assert trees_equal(state.target_params, initial_target), (
            f"target moved before the period (step {step})"
        )
        assert not trees_equal(state.target_params, state.params)
    state, _ = update_jit(state, random_batch(rng, 8, 6), network=network, config=config)
    assert int(state.step) == 3
    assert trees_equal(state.target_params, state.params), "target not synced at the period"
    synced = jax.tree.map(np.asarray, state.params)
    state, _ = update_jit(state, random_batch(rng, 8, 6), network=network, config=config)
    assert trees_equal(state.target_params, synced)
    assert not trees_equal(state.target_params, state.params)


def test_polyak_target_blends_after_one_update() -> None:
    tau = 0.25
    config = LearnerConfig(target_update="polyak", polyak_tau=tau, learning_rate=1e-2)
    rng = np.random.default_rng(1)
    state = create_train_state(SMALL, config, random_batch(rng, 1, 6).obs_tm1, jax.random.key(0))
    # Make the old target differ from the online params, so the blend is visible.
    state = state.replace(target_params=jax.tree.map(lambda x: x + 1.0, state.target_params))
    old_target = jax.tree.map(np.asarray, state.target_params)
    new_state, _ = update_jit(state, random_batch(rng, 8, 6), network=QNetwork(SMALL), config=config)
    expected = jax.tree.map(lambda new, old: tau * new + (1 - tau) * old, new_state.params, old_target)
    jax.tree.map(
        lambda actual, want: np.testing.assert_allclose(actual, want, rtol=1e-6, atol=1e-6),
        new_state.target_params,
        expected,
    )
    assert not trees_equal(new_state.params, state.params)


def test_update_many_equals_sequential_updates_and_reports_metrics() -> None:
    config = PERIODIC  # period 3 within 4 updates: the fused scan must sync mid-way too
    rng = np.random.default_rng(2)
    batches = [random_batch(rng, 8, 6) for _ in range(4)]
    state = create_train_state(SMALL, config, batches[0].obs_tm1, jax.random.key(3))
    network = QNetwork(SMALL)
    fused, metrics = update_many(state, stack_batches(batches), network=network, config=config)
    sequential = state
    for batch in batches:
        sequential, last = update_jit(sequential, batch, network=network, config=config)
    assert int(fused.step) == 4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        (fused.params, fused.target_params),
        (sequential.params, sequential.target_params),
    )
    assert set(metrics) == {
        "loss",
        "td_loss",
        "next_item_loss",
        "td_error_abs_mean",
        "q_mean",
        "q_max",
        "grad_norm",
    }
    assert all(value.shape == (4,) and bool(jnp.all(jnp.isfinite(value))) for value in metrics.values())
    np.testing.assert_allclose(metrics["loss"][-1], last["loss"], rtol=1e-5)
    # In place: the same state, written into the donated input's buffers, which are then gone.
    stacked = stack_batches(batches)
    in_place, in_place_metrics = update_many_in_place(state, stacked, network=network, config=config)
    jax.tree.map(np.testing.assert_array_equal, (in_place, in_place_metrics), (fused, metrics))
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(state.params["params"]["action_bias"])
    # A state holding one array twice (here the online bias as the target's too) is donated whole.
    fresh = create_train_state(SMALL, config, batches[0].obs_tm1, jax.random.key(3))
    bias = fresh.params["params"]["action_bias"]
    target = {**fresh.target_params, "params": {**fresh.target_params["params"], "action_bias": bias}}
    aliased = fresh.replace(target_params=target)
    aliased, _ = update_many_in_place(aliased, stacked, network=network, config=config)
    jax.tree.map(np.testing.assert_array_equal, aliased, fused)


def test_action_mask_keeps_unassigned_actions_out_of_the_bootstrap() -> None:
    config = PERIODIC
    rng = np.random.default_rng(4)
    batch = random_batch(rng, 8, 6)
    batch = batch.replace(
        a_tm1=np.array([2, 3, 4, 2, 3, 4, 2, 3], np.int32),
        discount_t=np.ones(8, np.float32),
        r_t=np.zeros(8, np.float32),
    )
    state = create_train_state(SMALL, config, batch.obs_tm1, jax.random.key(0))

    # Action 5 looks worth 100 everywhere (to the selector and the target), but no item holds it.
    def boost(params: dict) -> dict:
        params = jax.tree.map(jnp.copy, params)
        params["params"]["action_bias"] = params["params"]["action_bias"].at[5].set(100.0)
        return params

    state = state.replace(params=boost(state.params), target_params=boost(state.target_params))
    network = QNetwork(SMALL)
    _, unmasked = update_jit(state, batch, network=network, config=config)
    mask = jnp.array([False, False, True, True, True, False])
    _, masked = update_jit(state, batch, network=network, config=config, action_mask=mask)
    # Unmasked: target ~ 0.9 * 100 against Q(s, a) of a few units at most (a_tm1 in 2..4 here).
    assert float(unmasked["td_error_abs_mean"]) > 80.0
    assert float(masked["td_error_abs_mean"]) < 10.0


def test_reset_action_rows_reinitialises_rows_in_params_target_and_adam() -> None:
    # The SQN test's network and update: sharing them saves two compiles.
    batch = sequence_batch(window=3, num_items=SEQUENCE_ITEMS)
    state = create_train_state(SEQUENCE_NETWORK, SEQUENCE_LEARNER, batch.obs_tm1, jax.random.key(0))
    state, _ = update_many(
        state, stack_batches([batch] * 50), network=QNetwork(SEQUENCE_NETWORK), config=SEQUENCE_LEARNER
    )
    reset = reset_action_rows(state, [4, 2], jax.random.key(9))
    kept = np.array([0, 1, 3, 5, 6, 7, 8, 9])
    for params, before in ((reset.params, state.params), (reset.target_params, state.target_params)):
        table = params["params"]["item_embedding"]["embedding"]
        np.testing.assert_array_equal(table[kept], before["params"]["item_embedding"]["embedding"][kept])
        assert not np.allclose(table[2], before["params"]["item_embedding"]["embedding"][2])
        for bias in ("action_bias", "next_item_bias"):
            np.testing.assert_array_equal(params["params"][bias][np.array([2, 4])], [0.0, 0.0])
    np.testing.assert_array_equal(
        reset.params["params"]["item_embedding"]["embedding"][np.array([2, 4])],
        reset.target_params["params"]["item_embedding"]["embedding"][np.array([2, 4])],
    )
    adam = reset.opt_state[1][0]
    for moment in (adam.mu, adam.nu):
        rows = moment["params"]["item_embedding"]["embedding"]
        np.testing.assert_array_equal(rows[np.array([2, 4])], 0.0)
        assert np.any(rows[kept] != 0)
        np.testing.assert_array_equal(moment["params"]["action_bias"][np.array([2, 4])], 0.0)
    # Untouched parameters are the very same arrays.
    assert (
        reset.params["params"]["hidden_layers_0"]["kernel"]
        is state.params["params"]["hidden_layers_0"]["kernel"]
    )
    assert reset_action_rows(state, [], jax.random.key(0)) is state
    # A state restored from a checkpoint holds numpy arrays; resetting must work on it too.
    restored = tree_from_bytes(state, tree_to_bytes(state))
    from_restored = reset_action_rows(restored, [4, 2], jax.random.key(9))
    jax.tree.map(np.testing.assert_array_equal, from_restored.params, reset.params)
    with pytest.raises(ValueError, match="action indices"):
        reset_action_rows(state, [SEQUENCE_NETWORK.num_actions], jax.random.key(0))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="'gama'"):
        LearnerConfig.from_dict({"gama": 0.5})
    with pytest.raises(ValueError, match="target_update"):
        LearnerConfig(target_update="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bootstrap"):
        LearnerConfig(bootstrap="mean")  # type: ignore[arg-type]
    assert LearnerConfig.from_dict(LearnerConfig(gamma=0.5).to_dict()) == LearnerConfig(gamma=0.5)
    with pytest.raises(ValueError, match="next_item_head"):
        create_train_state(SMALL, LearnerConfig(sqn_weight=1.0), empty_obs_batch(1, window=2, feature_dim=3))


def test_analytic_flops_agree_with_the_compiler_cost_model() -> None:
    network_config = NetworkConfig(num_actions=1000, hidden_sizes=(256, 256))
    rng = np.random.default_rng(0)
    obs = ObsBatch(
        items=np.zeros((256, 0), np.int32),
        event_types=np.zeros((256, 0), np.int32),
        gaps=np.zeros((256, 0), np.float32),
        features=rng.normal(size=(256, 64)).astype(np.float32),
    )
    batch = transition_batch(obs, rng.integers(2, 1000, 256), np.zeros(256), np.zeros(256, bool), obs)
    for double in (False, True):
        config = LearnerConfig(double_dqn=double)
        # Shapes only: lowering needs no parameter values, and skipping XLA compilation saves seconds.
        state = jax.eval_shape(lambda o, c=config: create_train_state(network_config, c, o), obs)
        lowered = jax.jit(
            lambda s, b, c=config: update(s, b, network=QNetwork(network_config), config=c)
        ).lower(state, batch)
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        assert cost is not None
        analytic = dqn_update_flops(
            batch_size=256,
            feature_dim=64,
            hidden_sizes=(256, 256),
            embed_dim=64,
            num_actions=1000,
            double_dqn=double,
        )
        # The compiler also counts elementwise work (ReLU, Adam), a few percent at this size.
        assert 0.9 < analytic / cost["flops"] <= 1.0, (double, analytic, cost["flops"])


# --- Lazy item updates ------------------------------------------------------------------------

LAZY_NETWORK = NetworkConfig(num_actions=8, embed_dim=4, hidden_sizes=(8,), repeat_head=True)


def reached_rows(batch: TransitionBatch) -> set[int]:
    return {*np.asarray(batch.obs_tm1.items).ravel().tolist(), *np.asarray(batch.a_tm1).tolist()}


@pytest.mark.parametrize("form", ["plain", "factored_q", "q_item_table"])
def test_lazy_item_updates_equal_dense_adam_when_every_row_is_reached(form: str) -> None:
    rng = np.random.default_rng(1)
    batches = [random_batch(rng, 64, 8, window=3) for _ in range(4)]
    assert all(reached_rows(batch) == set(range(8)) for batch in batches)  # else the two may differ
    # Every per-item table of the form (Q's own table, the factored biases) is gathered and updated.
    network_config = dataclasses.replace(
        LAZY_NETWORK, factored_q=form == "factored_q", q_item_table=form == "q_item_table"
    )
    results = {}
    for mode in ("dense", "lazy"):
        config = LearnerConfig(item_updates=mode, learning_rate=1e-2, target_update_period=2)  # type: ignore[arg-type]
        state = create_train_state(network_config, config, batches[0].obs_tm1, jax.random.key(0))
        results[mode] = update_many(
            state, stack_batches(batches), network=QNetwork(network_config), config=config
        )
    (dense_state, dense_metrics), (lazy_state, lazy_metrics) = results["dense"], results["lazy"]
    # Params, target, Adam's count and moments: the whole state, leaf by leaf.
    jax.tree.map(lambda d, z: np.testing.assert_allclose(z, d, rtol=1e-5, atol=1e-7), dense_state, lazy_state)
    for name in ("loss", "grad_norm", "q_mean"):
        np.testing.assert_allclose(lazy_metrics[name], dense_metrics[name], rtol=1e-5)


def rows_batch(rng: np.random.Generator, low: int, high: int) -> TransitionBatch:
    """16 transitions whose s_tm1 windows and actions use items in [low, high) only (plus padding);
    s_t's windows use items 30..39, which only the bootstrap reads."""

    def obs(items: np.ndarray) -> ObsBatch:
        return ObsBatch(
            items=items.astype(np.int32),
            event_types=np.where(items > 0, 1, 0).astype(np.int32),
            gaps=rng.random(items.shape).astype(np.float32),
            features=rng.normal(size=(16, 3)).astype(np.float32),
        )

    items_tm1 = rng.integers(low, high, size=(16, 2))
    items_tm1[:3, 0] = 0  # some padding
    return transition_batch(
        obs(items_tm1),
        rng.integers(low, high, 16),
        rng.normal(size=16),
        np.zeros(16, bool),
        obs(rng.integers(30, 40, size=(16, 2))),
    )


def item_rows(state: TrainState) -> dict[str, np.ndarray]:
    adam = state.opt_state[1][0]
    return {
        "table": np.asarray(state.params["params"]["item_embedding"]["embedding"]),
        "bias": np.asarray(state.params["params"]["action_bias"]),
        "mu": np.asarray(adam.mu["params"]["item_embedding"]["embedding"]),
        "nu": np.asarray(adam.nu["params"]["item_embedding"]["embedding"]),
        "bias_nu": np.asarray(adam.nu["params"]["action_bias"]),
    }


@pytest.mark.parametrize("mode", ["lazy", "dense"])
def test_lazy_item_updates_leave_rows_no_batch_reaches_and_their_moments_as_they_are(mode: str) -> None:
    network_config = NetworkConfig(num_actions=40, embed_dim=4, hidden_sizes=(8,))
    config = LearnerConfig(item_updates=mode, learning_rate=1e-2)  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    first, second = rows_batch(rng, 2, 10), rows_batch(rng, 10, 20)
    state = create_train_state(network_config, config, first.obs_tm1, jax.random.key(0))
    network = QNetwork(network_config)
    start = item_rows(state)
    state = update_jit(state, first, network=network, config=config)[0]
    after_first = item_rows(state)
    state = update_jit(state, second, network=network, config=config)[0]
    after_second = item_rows(state)
    assert int(state.opt_state[1][0].count) == 2
    first_rows, second_rows, never = np.arange(2, 10), np.arange(10, 20), np.arange(20, 40)
    for name in after_second:
        # Each batch moves its own rows, in both modes.
        assert not np.allclose(after_first[name][first_rows], start[name][first_rows]), name
        assert not np.allclose(after_second[name][second_rows], after_first[name][second_rows]), name
        # Rows no batch reached (s_t's items included: the bootstrap takes no gradient) never move.
        np.testing.assert_array_equal(after_second[name][never], start[name][never])
        if mode == "lazy":  # the first batch's rows wait, values and moments, for a batch to reach them
            np.testing.assert_array_equal(after_second[name][first_rows], after_first[name][first_rows])
        else:  # dense Adam moves them on their momentum and decays their moments
            assert not np.allclose(after_second[name][first_rows], after_first[name][first_rows]), name


def test_auto_item_updates_are_lazy_for_large_catalogues_whose_loss_allows_it() -> None:
    large = NetworkConfig(num_actions=LAZY_ITEM_UPDATES_ABOVE + 1)
    assert lazy_item_updates(LearnerConfig(), large)
    assert not lazy_item_updates(LearnerConfig(), NetworkConfig(num_actions=LAZY_ITEM_UPDATES_ABOVE))
    # The next-item softmax, the dueling mean and weight decay reach every row.
    assert not lazy_item_updates(
        LearnerConfig(sqn_weight=1.0), dataclasses.replace(large, next_item_head=True)
    )
    assert not lazy_item_updates(LearnerConfig(), dataclasses.replace(large, dueling=True))
    assert not lazy_item_updates(LearnerConfig(weight_decay=0.1), large)
    assert not lazy_item_updates(LearnerConfig(item_updates="dense"), large)
    assert lazy_item_updates(LearnerConfig(item_updates="lazy"), SMALL)
    with pytest.raises(ValueError, match="dueling"):
        lazy_item_updates(LearnerConfig(item_updates="lazy"), dataclasses.replace(SMALL, dueling=True))
    with pytest.raises(ValueError, match="sqn_weight 0"):
        LearnerConfig(item_updates="lazy", sqn_weight=1.0)
    # A sampled next-item softmax reaches only the rows it draws.
    sampled = LearnerConfig(sqn_weight=1.0, next_item_negatives=64)
    assert lazy_item_updates(sampled, dataclasses.replace(large, next_item_head=True))
    assert lazy_item_updates(dataclasses.replace(sampled, item_updates="lazy"), SMALL)
    # Q's own item table and the factored form's per-item biases are gathered with the rest.
    assert lazy_item_updates(LearnerConfig(), dataclasses.replace(large, q_item_table=True))
    assert lazy_item_updates(LearnerConfig(), dataclasses.replace(large, factored_q=True))
    assert lazy_item_updates(
        LearnerConfig(item_updates="lazy"), dataclasses.replace(SMALL, q_item_table=True)
    )
    with pytest.raises(ValueError, match="item_updates"):
        LearnerConfig(item_updates="sparse")  # type: ignore[arg-type]


# --- Learning for real -------------------------------------------------------------------------

CHAIN_STATES = 5  # 0..3 playable, 4 terminal
LEFT, RIGHT = 0, 1


def chain_step(state: int, action: int) -> tuple[int, float, bool]:
    """Deterministic chain: RIGHT from 3 reaches the terminal state 4 (+1); LEFT at 0 pays 0.05."""
    if action == RIGHT:
        return state + 1, (1.0 if state + 1 == 4 else 0.0), state + 1 == 4
    return max(state - 1, 0), (0.05 if state == 0 else 0.0), False


def chain_q_star(gamma: float, policy: np.ndarray | None = None) -> np.ndarray:
    """Q* of the chain; with `policy` (4, 2) action probabilities, that policy's own Q instead."""
    q = np.zeros((4, 2))
    for _ in range(1000):
        follow = q.max(axis=1) if policy is None else (policy * q).sum(axis=1)
        value = np.append(follow, 0.0)  # terminal state is worth 0
        q = np.array(
            [
                [
                    r + (0.0 if done else gamma * value[s2])
                    for s2, r, done in (chain_step(s, a) for a in (0, 1))
                ]
                for s in range(4)
            ]
        )
    return q


def one_hot_obs(states: list[int]) -> ObsBatch:
    size = len(states)
    return ObsBatch(
        items=np.zeros((size, 0), np.int32),
        event_types=np.zeros((size, 0), np.int32),
        gaps=np.zeros((size, 0), np.float32),
        features=np.eye(CHAIN_STATES, dtype=np.float32)[states],
    )


def train_on_the_chain(
    network_config: NetworkConfig, config: LearnerConfig, wanted_q: np.ndarray
) -> tuple[float, int]:
    """Replay every (state, action) pair of the chain once each, uniformly, until Q is within 0.02 of
    `wanted_q` after at least 2,000 updates (or 30 s pass); returns max |Q - wanted_q| and the steps."""
    pairs = [(s, a) for s in range(4) for a in (LEFT, RIGHT)]
    outcomes = [chain_step(s, a) for s, a in pairs]
    buffer = ReplayBuffer(64, window=0, feature_dim=CHAIN_STATES)
    buffer.add(
        transition_batch(
            one_hot_obs([s for s, _ in pairs]),
            [a for _, a in pairs],
            [r for _, r, _ in outcomes],
            [done for _, _, done in outcomes],
            one_hot_obs([s2 for s2, _, _ in outcomes]),
        )
    )
    network = QNetwork(network_config)
    state = create_train_state(network_config, config, one_hot_obs([0]), jax.random.key(0))
    rng = np.random.default_rng(0)
    probe = one_hot_obs([0, 1, 2, 3])
    apply = jax.jit(network.apply)
    error = np.inf
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        batches, _, _ = buffer.sample_stacked(100, 32, rng)
        state, _ = update_many(state, batches, network=network, config=config)
        error = float(np.max(np.abs(np.asarray(apply(state.params, probe)) - wanted_q)))
        if error < 0.02 and int(state.step) >= 2000:
            break
    return error, int(state.step)


def test_dqn_learns_the_optimal_q_of_a_chain() -> None:
    gamma = 0.9
    q_star = chain_q_star(gamma)
    # Sanity of the task itself: going right is optimal everywhere, looping left at 0 is not.
    assert np.all(q_star[:, RIGHT] > q_star[:, LEFT])
    network_config = NetworkConfig(num_actions=2, embed_dim=16, hidden_sizes=(64, 64))
    config = LearnerConfig(gamma=gamma, learning_rate=3e-3, target_update_period=50, double_dqn=True)
    error, steps = train_on_the_chain(network_config, config, q_star)
    assert error < 0.05, f"max |Q - Q*| = {error:.3f} after {steps} updates"


def test_expected_bootstrap_learns_the_q_of_the_logged_choices() -> None:
    """bootstrap='expected' values s' under the next-item head's distribution: on logs where each
    state's two actions were taken equally often, that head learns 50/50 and Q converges to the
    uniform-random policy's Q, not to Q* (which the max bootstrap learns from the same logs)."""
    gamma = 0.9
    q_uniform = chain_q_star(gamma, np.full((4, 2), 0.5))
    assert np.max(np.abs(q_uniform - chain_q_star(gamma))) > 0.2  # the two targets differ clearly
    network_config = NetworkConfig(num_actions=2, embed_dim=16, hidden_sizes=(64, 64), next_item_head=True)
    config = LearnerConfig(
        gamma=gamma, learning_rate=3e-3, target_update_period=50, sqn_weight=1.0, bootstrap="expected"
    )
    error, steps = train_on_the_chain(network_config, config, q_uniform)
    assert error < 0.05, f"max |Q - Q_uniform| = {error:.3f} after {steps} updates"


def test_expected_bootstrap_target_is_the_next_item_weighted_mean_of_q() -> None:
    network_config = dataclasses.replace(SMALL, next_item_head=True)
    config = LearnerConfig(gamma=0.8, bootstrap="expected", learning_rate=1e-2)
    rng = np.random.default_rng(11)
    batch = random_batch(rng, 8, 6)
    network = QNetwork(network_config)
    state = create_train_state(network_config, config, batch.obs_tm1, jax.random.key(2))
    mask = jnp.array([False, True, True, True, True, False])
    _, metrics = update_jit(state, batch, network=network, config=config, action_mask=mask)
    # By hand, in numpy: softmax of the target network's logits over the allowed actions weights its Q.
    q_t = np.asarray(network.apply(state.target_params, batch.obs_t), np.float64)  # (B, A)
    logits_t = np.asarray(network.apply(state.target_params, batch.obs_t, method=QNetwork.next_item_logits))
    allowed = np.asarray(mask)
    weights = np.where(allowed, np.exp(logits_t - logits_t[:, allowed].max(axis=1, keepdims=True)), 0.0)
    probs = weights / weights.sum(axis=1, keepdims=True)
    target = np.asarray(batch.r_t) + 0.8 * np.asarray(batch.discount_t) * (probs * q_t).sum(axis=1)
    q_tm1 = np.asarray(network.apply(state.params, batch.obs_tm1))[np.arange(8), np.asarray(batch.a_tm1)]
    np.testing.assert_allclose(float(metrics["td_error_abs_mean"]), np.abs(target - q_tm1).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="next_item_head"):
        update_jit(state, batch, network=QNetwork(SMALL), config=config)


SEQUENCE_ITEMS = 8
SEQUENCE_NETWORK = NetworkConfig(
    num_actions=SEQUENCE_ITEMS + 2, embed_dim=16, hidden_sizes=(32,), next_item_head=True
)
SEQUENCE_LEARNER = LearnerConfig(sqn_weight=1.0, learning_rate=1e-2)


def sequence_batch(window: int, num_items: int) -> TransitionBatch:
    """Items 2..num_items+1 in a fixed cycle; the label (a_tm1) is the item that comes next."""
    cycle = list(range(2, num_items + 2))
    histories = [
        [cycle[(position - offset) % num_items] for offset in reversed(range(window))]
        for position in range(num_items)
    ]
    labels = [cycle[(position + 1) % num_items] for position in range(num_items)]
    next_histories = [[*history[1:], label] for history, label in zip(histories, labels, strict=True)]

    def obs(rows: list[list[int]]) -> ObsBatch:
        items = np.asarray(rows, np.int32)
        return ObsBatch(
            items=items,
            event_types=np.ones_like(items),
            gaps=np.zeros(items.shape, np.float32),
            features=np.ones((len(rows), 1), np.float32),
        )

    return transition_batch(
        obs(histories), labels, np.zeros(num_items), np.zeros(num_items, bool), obs(next_histories)
    )


def test_sqn_next_item_head_learns_a_deterministic_sequence() -> None:
    batch = sequence_batch(window=3, num_items=SEQUENCE_ITEMS)
    network = QNetwork(SEQUENCE_NETWORK)
    state = create_train_state(SEQUENCE_NETWORK, SEQUENCE_LEARNER, batch.obs_tm1, jax.random.key(0))
    logits_of = jax.jit(lambda params, obs: network.apply(params, obs, method=QNetwork.next_item_logits))

    def accuracy(current: TrainState) -> float:
        predicted = np.asarray(jnp.argmax(logits_of(current.params, batch.obs_tm1), axis=1))
        return float(np.mean(predicted == batch.a_tm1))

    before = accuracy(state)
    losses = []
    for _ in range(4):
        state, metrics = update_many(
            state, stack_batches([batch] * 50), network=network, config=SEQUENCE_LEARNER
        )
        losses.append(np.asarray(metrics["next_item_loss"]))
    after = accuracy(state)
    assert before <= 0.5
    assert after == 1.0, f"next-item accuracy {after} (chance {1 / SEQUENCE_ITEMS})"
    assert float(losses[-1][-1]) < 0.2 * float(losses[0][0])


SAMPLED_NETWORK = NetworkConfig(num_actions=50, embed_dim=8, hidden_sizes=(16,), next_item_head=True)


@pytest.mark.parametrize("factored_q", [False, True])
def test_sampled_next_item_loss_is_the_cross_entropy_over_the_item_and_the_drawn_negatives(
    factored_q: bool,
) -> None:
    config = LearnerConfig(sqn_weight=1.0, next_item_negatives=12, learning_rate=1e-2)
    network_config = dataclasses.replace(SAMPLED_NETWORK, factored_q=factored_q)
    network = QNetwork(network_config)
    batch = random_batch(np.random.default_rng(5), 32, 20)  # actions and windows within 0..19
    mask = np.zeros(50, bool)
    mask[2:20] = True  # the vocabulary's assigned rows
    state = create_train_state(network_config, config, batch.obs_tm1, jax.random.key(0))
    logits = np.asarray(
        network.apply(state.params, batch.obs_tm1, method=QNetwork.next_item_logits)
    )  # (B, A)
    for step in (0, 1):
        drawn = np.asarray(sample_negatives(config, jnp.asarray(step), jnp.asarray(mask), 50))
        assert drawn.shape == (12,) and mask[drawn].all(), drawn  # only assigned rows are drawn
    negatives = np.asarray(sample_negatives(config, state.step, jnp.asarray(mask), 50))
    assert not np.array_equal(
        negatives, np.asarray(sample_negatives(config, state.step + 1, jnp.asarray(mask), 50))
    )
    expected = []
    for row, action in enumerate(np.asarray(batch.a_tm1)):
        # The item itself, then every draw that is not the item (repeated draws count each time).
        candidates = logits[row, [action, *[n for n in negatives if n != action]]]
        expected.append(
            np.log(np.sum(np.exp(candidates - candidates.max()))) + candidates.max() - logits[row, action]
        )
    _, metrics = update_jit(state, batch, network=network, config=config, action_mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(metrics["next_item_loss"]), np.mean(expected), rtol=1e-5)
    # Without a mask, padding and OOV are never drawn.
    unmasked = np.asarray(
        sample_negatives(dataclasses.replace(config, next_item_negatives=2000), state.step, None, 50)
    )
    assert unmasked.min() >= 2 and len(set(unmasked.tolist())) == 48


@pytest.mark.parametrize("repeat_mode", [None, "replace", "mixture"])
def test_sampled_next_item_lazy_update_moves_the_drawn_rows_as_dense_adam_does(
    repeat_mode: str | None,
) -> None:
    # From a fresh state, dense Adam moves exactly the rows with a gradient: the batch's own (items
    # 2..9) and the drawn negatives, most of them rows no transition reaches. The lazy update must
    # gather and move the same rows by the same amounts.
    network_config = NetworkConfig(
        num_actions=40,
        embed_dim=4,
        hidden_sizes=(8,),
        next_item_head=True,
        repeat_head=repeat_mode is not None,
        repeat_mode=repeat_mode or "replace",
    )
    batch = rows_batch(np.random.default_rng(3), 2, 10)
    results = {}
    for mode in ("dense", "lazy"):
        config = LearnerConfig(
            item_updates=mode,  # type: ignore[arg-type]
            sqn_weight=1.0,
            next_item_negatives=24,
            learning_rate=1e-2,
        )
        state = create_train_state(network_config, config, batch.obs_tm1, jax.random.key(0))
        results[mode] = (state, *update_jit(state, batch, network=QNetwork(network_config), config=config))
    (start, dense_state, dense_metrics), (_, lazy_state, lazy_metrics) = results["dense"], results["lazy"]
    drawn = set(np.asarray(sample_negatives(config, start.step, None, 40)).tolist())
    beyond = sorted(drawn - set(range(10)))
    assert len(beyond) >= 10, beyond
    table = ("params", "item_embedding", "embedding")
    moved = np.asarray(dense_state.params[table[0]][table[1]][table[2]]) != np.asarray(
        start.params[table[0]][table[1]][table[2]]
    )
    assert moved[beyond].all(axis=1).all()  # the negatives' rows took a step
    jax.tree.map(lambda d, z: np.testing.assert_allclose(z, d, rtol=1e-5, atol=1e-7), dense_state, lazy_state)
    for name in ("loss", "next_item_loss", "grad_norm"):
        np.testing.assert_allclose(lazy_metrics[name], dense_metrics[name], rtol=1e-5)


def test_sampled_next_item_head_learns_a_sequence_in_a_catalogue_it_samples_from() -> None:
    # 40 items in a cycle among 400 actions; each update draws 16 of them as negatives.
    network_config = NetworkConfig(num_actions=400, embed_dim=16, hidden_sizes=(32,), next_item_head=True)
    config = LearnerConfig(sqn_weight=1.0, td_weight=0.0, next_item_negatives=16, learning_rate=1e-2)
    assert lazy_item_updates(dataclasses.replace(config, item_updates="lazy"), network_config)
    batch = sequence_batch(window=3, num_items=40)
    network = QNetwork(network_config)
    state = create_train_state(network_config, config, batch.obs_tm1, jax.random.key(0))
    mask = jnp.asarray(np.arange(400) >= 2)

    def accuracy(current: TrainState) -> float:
        logits = network.apply(current.params, batch.obs_tm1, method=QNetwork.next_item_logits)
        return float(np.mean(np.asarray(jnp.argmax(logits, axis=1)) == np.asarray(batch.a_tm1)))

    before = accuracy(state)
    for _ in range(6):
        state, _ = update_many(
            state, stack_batches([batch] * 50), network=network, config=config, action_mask=mask
        )
    after = accuracy(state)
    # Ranked against all 400 actions, most of which no update drew as often as its own items.
    assert before <= 0.1
    assert after >= 0.95, f"next-item accuracy {after} over the full catalogue"


@pytest.mark.parametrize("repeat", ["none", "replace", "mixture"])
def test_sampled_next_item_log_probs_equal_the_full_softmax_when_every_action_is_drawn_once(
    repeat: str,
) -> None:
    network_config = dataclasses.replace(
        SAMPLED_NETWORK,
        repeat_head=repeat != "none",
        repeat_mode="mixture" if repeat == "mixture" else "replace",
    )
    network = QNetwork(network_config)
    rng = np.random.default_rng(11)
    batch = random_batch(rng, 24, 20, window=5)  # windows with repeats, padding and OOV
    actions = np.asarray(batch.a_tm1).copy()
    actions[:8] = np.asarray(batch.obs_tm1.items)[:8, -1]  # some next items are window items
    actions = jnp.asarray(actions)
    params = create_train_state(network_config, LearnerConfig(), batch.obs_tm1, jax.random.key(3)).params
    # Move the repeat head off its zero start, so window items score apart from the rest.
    params = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    logits = network.apply(params, batch.obs_tm1, method=QNetwork.next_item_logits)  # (B, A)
    rows = np.arange(24)
    if repeat == "mixture":  # already log P(a | s)
        full = np.asarray(logits)[rows, actions]
    else:
        full = np.asarray(jax.nn.log_softmax(logits, axis=1))[rows, actions]
    every_action = jnp.arange(50, dtype=jnp.int32)
    _, sampled = network.apply(
        params, batch.obs_tm1, actions, every_action, method=QNetwork.q_for_actions_and_next_item_logits
    )
    np.testing.assert_allclose(np.asarray(sampled), full, rtol=1e-4, atol=1e-5)
    # Drawn twice over, in any order, every item outside the window would count twice.
    doubled = jnp.concatenate([every_action, every_action[::-1]])
    _, twice = network.apply(
        params, batch.obs_tm1, actions, doubled, method=QNetwork.q_for_actions_and_next_item_logits
    )
    outside = ~np.asarray(
        ((batch.obs_tm1.items == actions[:, None]) & (batch.obs_tm1.items >= 2)).any(axis=1)
    )
    assert np.all(np.asarray(twice)[outside] < full[outside])
    with pytest.raises(ValueError, match="next_item_negatives must be >= 0"):
        LearnerConfig(sqn_weight=1.0, next_item_negatives=-1)


@pytest.mark.parametrize(
    ("double_dqn", "dueling", "repeat_head", "q_item_table"),
    [
        (False, False, False, False),
        (True, False, False, False),
        (False, True, False, False),
        (True, True, False, False),
        (True, False, True, False),
        (False, False, True, False),
        (False, True, True, False),
        (False, False, False, True),
        (True, False, True, True),
    ],
)
def test_chunked_bootstrap_equals_the_full_score_matrix(
    double_dqn: bool, dueling: bool, repeat_head: bool, q_item_table: bool
) -> None:
    """Large catalogues reduce the bootstrap over chunks; the targets are those of the full (B, A) form."""
    from rl.train import _plain_bootstrap_targets, chunked_bootstrap_values

    num_actions = 5_000  # > CHUNKED_ABOVE, with a last chunk that is partly padding
    config = NetworkConfig(
        num_actions=num_actions,
        embed_dim=8,
        hidden_sizes=(16,),
        dueling=dueling,
        repeat_head=repeat_head,
        q_item_table=q_item_table,
    )
    network = QNetwork(config)
    rng = np.random.default_rng(3)
    batch = random_batch(rng, 32, num_actions, window=4)
    state = create_train_state(config, PERIODIC, batch.obs_tm1, jax.random.key(1))
    if q_item_table:
        # Q's own table starts at zero; a random one, so the maxima are decided by it.
        params = jax.tree.map(lambda x: x, state.params)
        params["params"]["q_item_embedding"]["embedding"] = jnp.asarray(
            rng.normal(size=(num_actions, 8)), jnp.float32
        )
        state = state.replace(params=params)
    if repeat_head:
        # Large repeat scores, so the window items (spread over every chunk) win many of the maxima.
        params = jax.tree.map(lambda x: x, state.params)
        kernel = params["params"]["repeat_out"]["kernel"]
        params["params"]["repeat_out"]["kernel"] = jnp.asarray(
            rng.normal(size=kernel.shape) * 5.0, jnp.float32
        )
        params["params"]["repeat_out"]["bias"] = jnp.asarray([20.0, 0.0])
        state = state.replace(params=params)
    # Online and target differ, so Double DQN's selector and evaluator are not the same network.
    state = state.replace(target_params=jax.tree.map(lambda x: x * 0.5 + 0.01, state.params))
    if repeat_head:
        # The test must see the head: window items take the max in most rows, in several chunks.
        best = np.asarray(jnp.argmax(q_values(network, state.target_params, batch.obs_t), axis=1))
        from_window = [b for b in range(32) if best[b] in set(np.asarray(batch.obs_t.items[b]).tolist())]
        assert len(from_window) > 16 and len({int(best[b]) // 2048 for b in from_window}) > 1
    mask = np.ones((num_actions,), bool)
    mask[rng.choice(num_actions, 2_000, replace=False)] = False
    discount = jnp.asarray(0.9 * batch.discount_t)
    for action_mask in (None, jnp.asarray(mask)):
        expected = _plain_bootstrap_targets(state, batch, network, double_dqn, discount, action_mask)
        q_boot = chunked_bootstrap_values(
            network, state.params, state.target_params, batch.obs_t, action_mask, double_dqn=double_dqn
        )
        np.testing.assert_allclose(batch.r_t + discount * q_boot, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("repeat", ["none", "replace", "mixture"])
@pytest.mark.parametrize("form", ["plain", "q_item_table", "factored_q"])
def test_chunked_expected_bootstrap_equals_the_full_softmax_and_value_matrices(
    form: str, repeat: str
) -> None:
    from rl.train import _expected_bootstrap_targets, chunked_expected_values, expected_in_chunks

    num_actions = 3_000  # three chunks of 1,024, the last one padded
    network_config = NetworkConfig(
        num_actions=num_actions,
        embed_dim=8,
        hidden_sizes=(16,),
        next_item_head=True,
        q_item_table=form == "q_item_table",
        factored_q=form == "factored_q",
        repeat_head=repeat != "none",
        repeat_mode="mixture" if repeat == "mixture" else "replace",
    )
    assert expected_in_chunks(network_config)
    assert not expected_in_chunks(dataclasses.replace(network_config, dueling=True, factored_q=False))
    network = QNetwork(network_config)
    rng = np.random.default_rng(4)
    batch = random_batch(rng, 32, num_actions, window=4)
    items_t = np.asarray(batch.obs_t.items).copy()
    items_t[4:12, 1] = items_t[4:12, 0]  # an item twice in the window
    items_t[:4] = 0  # windows of padding only
    items_t[12:16, 2] = 1  # OOV slots
    batch = batch.replace(
        obs_t=batch.obs_t.replace(items=items_t, event_types=np.where(items_t > 0, 1, 0).astype(np.int32))
    )
    params = create_train_state(network_config, LearnerConfig(), batch.obs_tm1, jax.random.key(1)).params
    # Every table and bias off its start (biases and Q's own table start at zero), logits spread wide.
    params = jax.tree.map(lambda x: x + 2.0 * jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    state = TrainState(params=params, target_params=params, opt_state=None, step=jnp.zeros((), jnp.int32))
    discount = jnp.asarray(0.9 * batch.discount_t)
    first_chunk_closed = np.ones(num_actions, bool)
    first_chunk_closed[:1024] = False  # a whole chunk with nothing allowed comes first
    random_mask = rng.random(num_actions) < 0.3
    for action_mask in (None, jnp.asarray(first_chunk_closed), jnp.asarray(random_mask)):
        expected = _expected_bootstrap_targets(state, batch, network, discount, action_mask)
        values = chunked_expected_values(network, params, batch.obs_t, action_mask)
        assert np.all(np.isfinite(np.asarray(values)))
        np.testing.assert_allclose(batch.r_t + discount * values, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("double_dqn", [False, True])
def test_chunked_bootstrap_rates_action_0_when_no_action_is_allowed(double_dqn: bool) -> None:
    """Plain DQN takes the best chunk score as the value; with nothing allowed that score is -inf, and
    the target must stay finite: action 0, rated by the target network, as Double DQN does."""
    from rl.train import chunked_bootstrap_values

    num_actions = 3_000
    config = NetworkConfig(num_actions=num_actions, embed_dim=8, hidden_sizes=(16,))
    network = QNetwork(config)
    batch = random_batch(np.random.default_rng(5), 8, num_actions, window=4)
    state = create_train_state(config, PERIODIC, batch.obs_tm1, jax.random.key(2))
    nothing = jnp.zeros((num_actions,), bool)
    q_boot = chunked_bootstrap_values(
        network, state.params, state.target_params, batch.obs_t, nothing, double_dqn=double_dqn
    )
    expected = network.apply(
        state.target_params, batch.obs_t, jnp.zeros((8,), jnp.int32), method=QNetwork.q_for_actions
    )
    assert np.all(np.isfinite(np.asarray(q_boot)))
    np.testing.assert_allclose(q_boot, expected, rtol=1e-6)


def revisit_batch(rng: np.random.Generator, rows: int, num_items: int, window: int = 4) -> TransitionBatch:
    """Each row's window holds fresh items (never seen in any other row); the next item is always the
    one viewed two events ago (its event type: 2, a cart, unlike the others' 1)."""
    histories = rng.permutation(np.arange(2, num_items + 2))[: rows * window].reshape(rows, window)
    labels = histories[:, -2]
    types = np.ones_like(histories)
    types[:, -2] = 2

    def obs(items: np.ndarray) -> ObsBatch:
        return ObsBatch(
            items=items.astype(np.int32),
            event_types=types,
            gaps=np.zeros(items.shape, np.float32),
            features=np.ones((rows, 1), np.float32),
        )

    return transition_batch(obs(histories), labels, np.zeros(rows), np.ones(rows, bool), obs(histories))


@pytest.mark.parametrize("repeat_head", [False, True])
def test_only_the_repeat_head_learns_to_return_to_items_it_has_no_embedding_for(repeat_head: bool) -> None:
    """Trained on some rows, judged on rows of items it never trained on: only a copy mechanism can
    point back at an item whose embedding is still at its random start."""
    num_items, window = 2_000, 4
    config = NetworkConfig(
        num_actions=num_items + 2,
        embed_dim=16,
        hidden_sizes=(32,),
        next_item_head=True,
        repeat_head=repeat_head,
    )
    network = QNetwork(config)
    rng = np.random.default_rng(0)
    batch = revisit_batch(rng, 400, num_items, window)  # 1,600 of the 2,000 items
    train = jax.tree.map(lambda x: x[:300], batch)
    test = jax.tree.map(lambda x: x[300:], batch)
    state = create_train_state(config, SEQUENCE_LEARNER, train.obs_tm1, jax.random.key(0))
    for _ in range(4):
        state, _ = update_many(state, stack_batches([train] * 50), network=network, config=SEQUENCE_LEARNER)
    logits = network.apply(state.params, test.obs_tm1, method=QNetwork.next_item_logits)
    accuracy = float(np.mean(np.asarray(jnp.argmax(logits, axis=1)) == np.asarray(test.a_tm1)))
    if repeat_head:
        # Not 1.0: the untrained items' random embeddings still add noise to their scores.
        assert accuracy > 0.75, accuracy
    else:
        assert accuracy < 0.1, accuracy


def test_td_weight_zero_is_a_plain_supervised_step_that_ignores_rewards() -> None:
    with pytest.raises(ValueError, match="cannot both be 0"):
        LearnerConfig(td_weight=0.0)
    batch = sequence_batch(window=3, num_items=SEQUENCE_ITEMS)
    network = QNetwork(SEQUENCE_NETWORK)
    supervised = LearnerConfig(sqn_weight=1.0, td_weight=0.0, learning_rate=1e-2)
    state = create_train_state(SEQUENCE_NETWORK, supervised, batch.obs_tm1, jax.random.key(0))
    rewarded = batch.replace(r_t=np.full_like(np.asarray(batch.r_t), 5.0))
    plain, metrics = update_jit(state, batch, network=network, config=supervised)
    other, _ = update_jit(state, rewarded, network=network, config=supervised)
    assert trees_equal(plain.params, other.params)
    assert float(metrics["loss"]) == pytest.approx(float(metrics["next_item_loss"]))
    # With the TD loss on, the rewards move the parameters.
    joint = dataclasses.replace(supervised, td_weight=1.0)
    assert not trees_equal(
        update_jit(state, batch, network=network, config=joint)[0].params,
        update_jit(state, rewarded, network=network, config=joint)[0].params,
    )


def test_weight_decay_shrinks_an_untouched_item_row_by_lr_times_decay_per_step() -> None:
    """AdamW: a row no batch touches has no Adam step, so it only decays, by exactly (1 - lr * wd)."""
    config = LearnerConfig(learning_rate=0.1, weight_decay=0.5, target_update_period=100)
    rng = np.random.default_rng(0)
    batch = random_batch(rng, 8, 4)  # actions and window items all below 4: rows 4 and 5 are untouched
    state = create_train_state(SMALL, config, batch.obs_tm1, jax.random.key(0))
    table = np.asarray(state.params["params"]["item_embedding"]["embedding"])  # (6, 4)
    network = QNetwork(SMALL)
    for _ in range(2):
        state, _ = update_jit(state, batch, network=network, config=config)
    after = np.asarray(state.params["params"]["item_embedding"]["embedding"])
    np.testing.assert_allclose(after[4:], table[4:] * (1 - 0.1 * 0.5) ** 2, rtol=1e-6)
    assert not np.allclose(after[2:4], table[2:4] * (1 - 0.1 * 0.5) ** 2)  # trained rows also learn
    # Only the item table decays by default; 'all' takes every matrix but no bias.
    items_mask = weight_decay_mask(state.params, scope="items")["params"]
    assert items_mask["item_embedding"]["embedding"] and not items_mask["hidden_layers_0"]["kernel"]
    all_mask = weight_decay_mask(state.params, scope="all")["params"]
    assert all_mask["hidden_layers_0"]["kernel"] and all_mask["event_type_embedding"]["embedding"]
    assert not all_mask["hidden_layers_0"]["bias"] and not all_mask["action_bias"]
    with pytest.raises(ValueError, match="weight_decay"):
        LearnerConfig(weight_decay=-1.0)
    with pytest.raises(ValueError, match="weight_decay_scope"):
        LearnerConfig(weight_decay_scope="biases")  # type: ignore[arg-type]


def test_next_item_prior_sets_the_bias_to_centred_log_counts() -> None:
    state = create_train_state(
        SEQUENCE_NETWORK, SEQUENCE_LEARNER, empty_obs_batch(1, window=2, feature_dim=1), jax.random.key(0)
    )
    primed = with_next_item_prior(state, [2, 2, 2, 3, 9])
    counts = np.zeros(SEQUENCE_NETWORK.num_actions)
    counts[[2, 3, 9]] = [3, 1, 1]
    expected = np.log1p(counts) - np.log1p(counts).mean()
    for params in (primed.params, primed.target_params):
        np.testing.assert_allclose(params["params"]["next_item_bias"], expected, rtol=1e-6, atol=1e-7)
    # Everything else is untouched.
    np.testing.assert_array_equal(
        primed.params["params"]["item_embedding"]["embedding"],
        state.params["params"]["item_embedding"]["embedding"],
    )
    with pytest.raises(ValueError, match="actions"):
        with_next_item_prior(state, [SEQUENCE_NETWORK.num_actions])


def test_split_losses_learn_the_next_item_from_logged_rows_and_q_from_shown_slots() -> None:
    rng = np.random.default_rng(3)
    full = sequence_batch(window=3, num_items=SEQUENCE_ITEMS)
    size = full.batch_size
    logged = np.arange(size) % 2 == 0  # (B,)
    batch = full.replace(
        r_t=rng.normal(size=size).astype(np.float32),
        discount_t=(rng.random(size) > 0.3).astype(np.float32),
        logged=logged.astype(np.float32),
    )
    network = QNetwork(SEQUENCE_NETWORK)
    joint = LearnerConfig(sqn_weight=1.0, learning_rate=1e-2)
    split = dataclasses.replace(joint, split_losses=True)
    state = create_train_state(SEQUENCE_NETWORK, split, batch.obs_tm1, jax.random.key(0))

    def rows(mask: np.ndarray) -> TransitionBatch:
        return jax.tree.map(lambda leaf: np.asarray(leaf)[mask], batch)

    _, metrics = update_jit(state, batch, network=network, config=split)
    _, on_logged = update_jit(state, rows(logged), network=network, config=joint)
    _, on_shown = update_jit(state, rows(~logged), network=network, config=joint)
    # Each loss is the plain mean over its own rows.
    assert float(metrics["next_item_loss"]) == pytest.approx(float(on_logged["next_item_loss"]), rel=1e-5)
    assert float(metrics["td_loss"]) == pytest.approx(float(on_shown["td_loss"]), rel=1e-5)
    assert float(metrics["q_mean"]) == pytest.approx(float(on_shown["q_mean"]), rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(
        float(on_shown["td_loss"]) + float(on_logged["next_item_loss"]), rel=1e-5
    )
    # The rewards of logged rows no longer move the parameters; those of shown slots do.
    relabelled = np.asarray(batch.r_t) + np.where(logged, 5.0, 0.0).astype(np.float32)
    assert trees_equal(
        update_jit(state, batch, network=network, config=split)[0].params,
        update_jit(state, batch.replace(r_t=relabelled), network=network, config=split)[0].params,
    )
    shown_changed = np.asarray(batch.r_t) + np.where(logged, 0.0, 5.0).astype(np.float32)
    assert not trees_equal(
        update_jit(state, batch, network=network, config=split)[0].params,
        update_jit(state, batch.replace(r_t=shown_changed), network=network, config=split)[0].params,
    )
    # Without the split, every row is in both losses.
    _, unsplit = update_jit(state, batch, network=network, config=joint)
    assert float(unsplit["next_item_loss"]) != pytest.approx(float(on_logged["next_item_loss"]), rel=1e-5)


FACTORED = NetworkConfig(num_actions=6, embed_dim=8, hidden_sizes=(16,), factored_q=True)


def session_end_batch(rng: np.random.Generator, per_item: int = 40) -> TransitionBatch:
    """Every row shows one of items 2-5 and earns 1; item 3 ends the session with chance 0.8, the
    others with 0.1. States are random windows and features."""
    items = np.repeat(np.arange(2, 6), per_item)
    ends = rng.random(items.size) < np.where(items == 3, 0.8, 0.1)
    size = items.size

    def obs() -> ObsBatch:
        window = rng.integers(2, 6, size=(size, 2)).astype(np.int32)
        return ObsBatch(
            items=window,
            event_types=np.ones_like(window),
            gaps=rng.random((size, 2)).astype(np.float32),
            features=rng.normal(size=(size, 3)).astype(np.float32),
        )

    return transition_batch(obs(), items, np.ones(size), ends, obs())


def test_the_factored_q_learns_each_items_chance_of_ending_the_session() -> None:
    """Each part is fitted to its own signal: R to the reward (1), the continuation to how often the
    session went on after the item (item 3: 20%, the others 90%), and so Q ranks item 3 last, by what
    follows it, though it earns what the others earn."""
    config = LearnerConfig(gamma=0.9, learning_rate=1e-2, target_update_period=20)
    network = QNetwork(FACTORED)
    rng = np.random.default_rng(7)
    batches = [session_end_batch(rng) for _ in range(400)]  # fresh shoppers every update
    state = create_train_state(FACTORED, config, batches[0].obs_tm1, jax.random.key(3))
    state, metrics = update_many(state, stack_batches(batches), network=network, config=config)
    assert np.all(np.isfinite(np.asarray(metrics["loss"])))
    # Judged on states it did not train on: each item shown in every one of them.
    probe = session_end_batch(np.random.default_rng(8))
    states = jax.tree.map(
        lambda part: np.tile(np.asarray(part), (4,) + (1,) * (part.ndim - 1)), probe.obs_tm1
    )
    items = np.repeat(np.arange(2, 6), probe.a_tm1.shape[0])
    reward, log_odds, future, _ = network.apply(
        state.params, states, jnp.asarray(items, jnp.int32), method=QNetwork.factored_q_for_actions
    )
    assert abs(float(np.mean(reward)) - 1.0) < 0.1, float(np.mean(reward))
    chance = 1.0 / (1.0 + np.exp(-np.asarray(log_odds)))
    assert abs(chance[items == 3].mean() - 0.2) < 0.1, chance[items == 3].mean()
    assert abs(chance[items != 3].mean() - 0.9) < 0.1, chance[items != 3].mean()
    assert np.all(np.asarray(future) > 0.5)  # going on is worth something: more rewards of 1
    q = np.asarray(q_values(network, state.params, probe.obs_tm1))[:, 2:6]  # (B, 4): items 2-5
    assert np.mean(q.argmin(axis=1) == 1) > 0.9, "item 3 is not ranked last"


def test_the_factored_q_is_refused_where_its_parts_are_not_computed() -> None:
    rng = np.random.default_rng(8)
    large = dataclasses.replace(FACTORED, num_actions=3_000)
    batch = random_batch(rng, 4, large.num_actions)
    state = create_train_state(large, PERIODIC, batch.obs_tm1, jax.random.key(0))
    with pytest.raises(ValueError, match="bootstrap='expected'"):
        update(state, batch, network=QNetwork(large), config=PERIODIC)


def test_reset_action_rows_clears_q_own_table_and_the_factored_biases() -> None:
    own_table = dataclasses.replace(SMALL, q_item_table=True)
    for config, names in (
        (own_table, ("q_item_embedding",)),
        (FACTORED, ("continuation_bias", "future_bias")),
    ):
        batch = random_batch(np.random.default_rng(9), 4, config.num_actions)
        state = create_train_state(config, PERIODIC, batch.obs_tm1, jax.random.key(0))
        params = jax.tree.map(jnp.ones_like, state.params)
        state = state.replace(params=params, target_params=params)
        reset = reset_action_rows(state, [2], jax.random.key(1))
        for tree in (reset.params, reset.target_params):
            for name in names:
                leaf = tree["params"][name]
                leaf = leaf["embedding"] if isinstance(leaf, dict) else leaf
                np.testing.assert_array_equal(leaf[2], 0.0)
                np.testing.assert_array_equal(leaf[np.array([0, 1, 3, 4, 5])], 1.0)

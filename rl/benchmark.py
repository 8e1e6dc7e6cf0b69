"""Learner throughput, three designs side by side on the same network, data and device.

(a) seed loop: the naive design ported faithfully: per sample, predict Q(s) and Q(s') with separate
    jitted single-sample calls, build the full target vector on the host (a copy of Q(s) with
    target[a] = r + gamma * max Q(s')), then one jitted single-sample fit step (MSE, Adam);
(b) jit batch: one jitted batched DQN update per call (CleanRL's dqn_jax shape: full Q(s) for the
    batch, gather the taken action, Huber, clipped Adam; target copied from the Python loop);
(c) qrec: `rl.train.update_many_in_place` (the learner's call: `update_many` writing into the donated
    state), K updates fused in one `lax.scan`, target sync inside, TD loss on
    the gathered taken action only; over 10,000 actions Adam moves only the item rows each batch
    reaches (`LearnerConfig.item_updates` "auto"), and the same update with dense Adam is timed
    beside it (`qrec_dense_items_tps`). At 100,000 actions, qrec's update with SQN's next-item loss
    too, over the full softmax and over a sampled one (`sqn_full_softmax_tps`,
    `sqn_sampled_softmax_tps`).

All three use the same QNetwork (64-d dense state, no window, 256x256 hidden, 64-d item table of A
actions), batch 256 for (b) and (c), Huber (MSE for the seed loop, as it was), Adam and a target
network, on data already on the device. Times exclude compilation (everything is warmed up first)
and end with block_until_ready. Each figure is the best of a few repeats, which is the least
disturbed by other processes on a shared machine; ratios come from the same run.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rl.batch import ObsBatch, TransitionBatch
from rl.networks import NetworkConfig, QNetwork, q_values
from rl.train import (
    LearnerConfig,
    create_train_state,
    lazy_item_updates,
    make_optimizer,
    update_many_in_place,
)
from rl.value_learning import huber_loss

FEATURE_DIM = 64
HIDDEN_SIZES = (256, 256)
EMBED_DIM = 64
BATCH_SIZE = 256
# Items drawn per update for the sampled next-item softmax in the SQN figures.
SQN_NEGATIVES = 1024


def dqn_update_flops(
    *,
    batch_size: int,
    feature_dim: int,
    hidden_sizes: tuple[int, ...],
    embed_dim: int,
    num_actions: int,
    window: int = 0,
    double_dqn: bool = False,
    next_item_head: bool = False,
) -> int:
    """Matrix-multiply FLOPs (2 per multiply-add) of one `rl.train.update`; elementwise work not counted.

    Online pass on s_tm1 with gradient (forward, weight gradients, input gradients except for the
    first layer), the taken action's dot product, the target network's scores over all A actions on
    s_t, and for double DQN a second full scoring on s_t with the online network.
    """
    input_dim = feature_dim + (2 * embed_dim if window > 0 else 0)
    widths = [input_dim, *hidden_sizes, embed_dim]
    layer_flops = [2 * a * b for a, b in itertools.pairwise(widths)]  # per sample
    encoder_forward = sum(layer_flops) + (2 * window * embed_dim if window > 0 else 0)
    encoder_backward = 2 * sum(layer_flops) - layer_flops[0]
    scoring = 2 * embed_dim * num_actions
    per_sample = encoder_forward + encoder_backward + 2 * embed_dim  # online, taken action only
    per_sample += encoder_forward + scoring  # target network on s_t
    if double_dqn:
        per_sample += encoder_forward + scoring
    if next_item_head:
        projection = 2 * hidden_sizes[-1] * embed_dim
        per_sample += 3 * projection + 3 * scoring  # forward, and gradients w.r.t. state and table
    return batch_size * per_sample


def _random_batches(
    rng: np.random.Generator, count: int, batch_size: int, num_actions: int
) -> list[TransitionBatch]:
    def obs() -> ObsBatch:
        return ObsBatch(
            items=np.zeros((batch_size, 0), np.int32),
            event_types=np.zeros((batch_size, 0), np.int32),
            gaps=np.zeros((batch_size, 0), np.float32),
            features=rng.normal(size=(batch_size, FEATURE_DIM)).astype(np.float32),
        )

    return [
        TransitionBatch(
            obs_tm1=obs(),
            a_tm1=rng.integers(2, num_actions, size=batch_size).astype(np.int32),
            r_t=rng.random(batch_size).astype(np.float32),
            discount_t=(rng.random(batch_size) > 0.1).astype(np.float32),
            obs_t=obs(),
            weights=np.ones((batch_size,), np.float32),
            logged=np.ones((batch_size,), np.float32),
        )
        for _ in range(count)
    ]


def _best_rate(run: Callable[[], int], repeats: int) -> float:
    """Items per second of the fastest of `repeats` runs; `run` returns the items it processed."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        items = run()
        elapsed = time.perf_counter() - start
        best = max(best, items / elapsed)
    return best


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matrix-multiply FLOP/s: the best of `repeats` jitted size x size products."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32)
    b = jax.random.normal(key_b, (size, size), jnp.float32)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    flops = 2.0 * size**3
    return flops * _best_rate(lambda: (matmul(a, b).block_until_ready(), 1)[1], repeats)


def layer_matmul_flops(batch_size: int, widths: tuple[int, ...], repeats: int = 5, chain: int = 200) -> float:
    """FLOP/s of the network's own layer products with nothing else: `chain` passes of a (batch x
    widths[0]) block through bare (w_i x w_i+1) matrices (no bias, no activation), the best of
    `repeats`. What the matmul engine reaches at the update's small shapes, next to the large-square
    peak of `matmul_peak_flops`."""
    assert widths[0] == widths[-1], "the chain feeds its output back in: first and last width must match"
    keys = jax.random.split(jax.random.key(1), len(widths))
    x = jax.random.normal(keys[0], (batch_size, widths[0]), jnp.float32)
    weights = [
        jax.random.normal(key, (a, b), jnp.float32) * a**-0.5
        for key, (a, b) in zip(keys[1:], itertools.pairwise(widths), strict=True)
    ]

    def passes(x: jax.Array, weights: list[jax.Array]) -> jax.Array:
        def one(_: Any, h: jax.Array) -> jax.Array:
            for w in weights:
                h = h @ w
            return h

        return jax.lax.fori_loop(0, chain, one, x)

    run = jax.jit(passes)
    run(x, weights).block_until_ready()
    flops = chain * sum(2 * batch_size * a * b for a, b in itertools.pairwise(widths))
    return flops * _best_rate(lambda: (run(x, weights).block_until_ready(), 1)[1], repeats)


def _seed_loop_tps(
    network: QNetwork,
    state_params: Any,
    batch: TransitionBatch,
    config: LearnerConfig,
    samples: int,
    repeats: int,
) -> float:
    optimizer = optax.adam(config.learning_rate)
    predict = jax.jit(network.apply)

    @jax.jit
    def fit(params: Any, opt_state: Any, obs: ObsBatch, target: jax.Array) -> tuple[Any, Any]:
        def loss(p: Any) -> jax.Array:
            return jnp.mean((q_values(network, p, obs) - target) ** 2)

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def single(obs: ObsBatch, i: int) -> ObsBatch:
        return jax.tree.map(lambda x: x[i : i + 1], obs)  # (1, ...): one sample, as the seed did

    def run_loop(params: Any, count: int) -> tuple[Any, int]:
        target_params = params
        opt_state = optimizer.init(params)
        size = batch.batch_size
        for i in range(count):
            row = i % size
            obs_tm1, obs_t = single(batch.obs_tm1, row), single(batch.obs_t, row)
            q_tm1 = np.asarray(predict(params, obs_tm1))  # (1, A), fetched to the host like Keras
            q_t = np.asarray(predict(target_params, obs_t))  # (1, A)
            target = q_tm1.copy()
            target[0, batch.a_tm1[row]] = batch.r_t[row] + config.gamma * batch.discount_t[row] * q_t.max()
            params, opt_state = fit(params, opt_state, obs_tm1, target)
            if (i + 1) % config.target_update_period == 0:
                target_params = params
        jax.block_until_ready(params)
        return params, count

    run_loop(state_params, 1)  # compile
    return _best_rate(lambda: run_loop(state_params, samples)[1], repeats)


def _jit_batch_tps(
    network: QNetwork,
    state_params: Any,
    batches: list[TransitionBatch],
    config: LearnerConfig,
    updates: int,
    repeats: int,
) -> float:
    optimizer = make_optimizer(config)

    @jax.jit
    def dqn_update(
        params: Any, target_params: Any, opt_state: Any, batch: TransitionBatch
    ) -> tuple[Any, Any, jax.Array]:
        q_next = q_values(network, target_params, batch.obs_t)  # (B, A)
        td_target = batch.r_t + config.gamma * batch.discount_t * q_next.max(axis=1)  # (B,)

        def loss(p: Any) -> jax.Array:
            q = q_values(network, p, batch.obs_tm1)  # (B, A): every action scored, as in CleanRL
            q_taken = q[jnp.arange(q.shape[0]), batch.a_tm1]
            return jnp.mean(huber_loss(q_taken - td_target, config.huber_delta))

        value, grads = jax.value_and_grad(loss)(params)
        grad_updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, grad_updates), opt_state, value

    def run_loop(count: int) -> int:
        params, target_params = state_params, state_params
        opt_state = optimizer.init(params)
        for step in range(1, count + 1):
            params, opt_state, _ = dqn_update(params, target_params, opt_state, batches[step % len(batches)])
            if step % config.target_update_period == 0:
                target_params = params
        jax.block_until_ready(params)
        return count * batches[0].batch_size

    run_loop(1)  # compile
    return _best_rate(lambda: run_loop(updates), repeats)


def _qrec_tps(
    network: QNetwork,
    state: Any,
    stacked: TransitionBatch,
    config: LearnerConfig,
    calls: int,
    repeats: int,
) -> float:
    num_fused, batch_size = stacked.a_tm1.shape
    # As the learner runs it: in place, each call's state going into the next (and the next repeat).
    current = [jax.tree.map(jnp.copy, state)]

    def run_loop(count: int) -> int:
        for _ in range(count):
            current[0], _ = update_many_in_place(current[0], stacked, network=network, config=config)
        jax.block_until_ready(current[0])
        return count * num_fused * batch_size

    run_loop(1)  # compile
    return _best_rate(lambda: run_loop(calls), repeats)


def bench_case(num_actions: int, *, quick: bool, peak_flops: float) -> dict[str, Any]:
    """The three designs for one action count; see the module docstring."""
    network_config = NetworkConfig(num_actions=num_actions, embed_dim=EMBED_DIM, hidden_sizes=HIDDEN_SIZES)
    # Plain (not double) DQN everywhere, so the three designs compute the same algorithm.
    learner_config = LearnerConfig(double_dqn=False, target_update="periodic", target_update_period=500)
    network = QNetwork(network_config)
    large = num_actions > 10_000
    rng = np.random.default_rng(0)
    batches_host = _random_batches(rng, 8, BATCH_SIZE, num_actions)
    state = create_train_state(network_config, learner_config, batches_host[0].obs_tm1, jax.random.key(0))
    batches = [jax.device_put(batch) for batch in batches_host]
    # Iteration counts: a 100k-action update is ~15x the work of a 1k one, the seed loop ~100x.
    if quick:
        num_fused = 4 if large else 32
        seed_samples, jit_updates, qrec_calls = (16 if large else 200), (2 if large else 48), 1
        repeats = 1 if large else 2
    else:
        num_fused = 8 if large else 32
        seed_samples, jit_updates, qrec_calls = (
            (200 if large else 2000),
            (16 if large else 320),
            (4 if large else 10),
        )
        repeats = 3
    stacked = jax.device_put(
        jax.tree.map(lambda *leaves: np.stack(leaves), *[batches_host[i % 8] for i in range(num_fused)])
    )

    seed_tps = _seed_loop_tps(network, state.params, batches_host[0], learner_config, seed_samples, repeats)
    jit_batch_tps = _jit_batch_tps(network, state.params, batches, learner_config, jit_updates, repeats)
    qrec_tps = _qrec_tps(network, state, stacked, learner_config, qrec_calls, repeats)
    lazy = lazy_item_updates(learner_config, network_config)
    if lazy:  # the same update with dense Adam over the item table, timed in the same run
        dense_config = dataclasses.replace(learner_config, item_updates="dense")
        dense_tps = _qrec_tps(network, state, stacked, dense_config, qrec_calls, repeats)
    flops_per_update = dqn_update_flops(
        batch_size=BATCH_SIZE,
        feature_dim=FEATURE_DIM,
        hidden_sizes=HIDDEN_SIZES,
        embed_dim=EMBED_DIM,
        num_actions=num_actions,
        double_dqn=learner_config.double_dqn,
    )
    achieved = flops_per_update * qrec_tps / BATCH_SIZE
    sqn = (
        _sqn_case(network_config, learner_config, batches_host, stacked, qrec_calls, repeats) if large else {}
    )
    return {
        "num_actions": num_actions,
        "batch_size": BATCH_SIZE,
        "fused_updates": num_fused,
        "seed_loop_tps": seed_tps,
        "jit_batch_tps": jit_batch_tps,
        "qrec_tps": qrec_tps,
        "flops_per_update": flops_per_update,
        "matmul_peak_flops": peak_flops,
        "achieved_flops": achieved,
        "fraction_of_peak": achieved / peak_flops,
        "ratio_vs_seed": qrec_tps / seed_tps,
        "ratio_vs_jit_batch": qrec_tps / jit_batch_tps,
        "item_updates": "lazy" if lazy else "dense",
        **({"qrec_dense_items_tps": dense_tps, "lazy_speedup": qrec_tps / dense_tps} if lazy else {}),
        **sqn,
    }


def _sqn_case(
    network_config: NetworkConfig,
    learner_config: LearnerConfig,
    batches_host: list[TransitionBatch],
    stacked: TransitionBatch,
    calls: int,
    repeats: int,
) -> dict[str, Any]:
    """qrec's update with SQN's next-item loss beside the TD loss (weight 1), side by side: the full
    softmax over every action (the item table then updates densely) and the sampled softmax over
    SQN_NEGATIVES drawn items (lazily), and the sampled one with the expected bootstrap (E of Q under
    the next-item softmax, over chunks of the catalogue) in place of the max."""
    sqn_network_config = dataclasses.replace(network_config, next_item_head=True)
    network = QNetwork(sqn_network_config)
    figures = {}
    cases: tuple[tuple[str, int, Literal["max", "expected"]], ...] = (
        ("full", 0, "max"),
        ("sampled", SQN_NEGATIVES, "max"),
        ("expected", SQN_NEGATIVES, "expected"),
    )
    for name, negatives, bootstrap in cases:
        config = dataclasses.replace(
            learner_config, sqn_weight=1.0, next_item_negatives=negatives, bootstrap=bootstrap
        )
        state = create_train_state(sqn_network_config, config, batches_host[0].obs_tm1, jax.random.key(0))
        figures[name] = _qrec_tps(network, state, stacked, config, calls, repeats)
    return {
        "sqn_full_softmax_tps": figures["full"],
        "sqn_sampled_softmax_tps": figures["sampled"],
        "sqn_next_item_negatives": SQN_NEGATIVES,
        "sqn_sampled_speedup": figures["sampled"] / figures["full"],
        "sqn_sampled_expected_bootstrap_tps": figures["expected"],
    }


def bench_learner(quick: bool = False) -> dict[str, Any]:
    """Learner throughput for 1,000 actions (top-level keys) and 100,000 (under "items_100k").

    Keys: seed_loop_tps, jit_batch_tps, qrec_tps (transitions/s), matmul_peak_flops and
    achieved_flops (FLOP/s), ratio_vs_seed, ratio_vs_jit_batch, plus the settings used.
    quick=True runs few iterations (well under a minute in total) for tests and smoke checks.
    """
    start = time.perf_counter()
    # The ceiling is measured before and after the cases and the higher taken: on a shared machine a
    # single low reading would flatter every fraction_of_peak.
    peak_before = matmul_peak_flops(repeats=3 if quick else 7)
    result = bench_case(1_000, quick=quick, peak_flops=peak_before)
    result["items_100k"] = bench_case(100_000, quick=quick, peak_flops=peak_before)
    peak = max(peak_before, matmul_peak_flops(repeats=3 if quick else 7))
    # The encoder's layer shapes (64 -> 256 -> 256 -> 64, batch 256) bare: the ceiling of its products.
    widths = (FEATURE_DIM, *HIDDEN_SIZES, EMBED_DIM)
    layers = layer_matmul_flops(BATCH_SIZE, widths, repeats=3 if quick else 7)
    for case in (result, result["items_100k"]):
        case["matmul_peak_flops"] = peak
        case["fraction_of_peak"] = case["achieved_flops"] / peak
        case["layer_matmul_flops"] = layers
        case["fraction_of_layer_matmul"] = case["achieved_flops"] / layers
    result["device"] = str(jax.devices()[0].platform)
    result["quick"] = quick
    result["wall_seconds"] = time.perf_counter() - start
    return result


if __name__ == "__main__":
    import json
    import sys

    # `python -m rl.benchmark` for the quick run, `python -m rl.benchmark --full` for the long one.
    print(json.dumps(bench_learner(quick="--full" not in sys.argv[1:]), indent=2))

"""The DQN learner: one train-state pytree and one pure update, with the target sync inside it.

`update` is a pure function of (state, batch) that jits with the network and config static;
`update_many` fuses K updates into one compiled `lax.scan`, which amortises Python and dispatch
overhead when batches are small. The target network moves inside the update
(`optax.periodic_update` or `optax.incremental_update`), so no service loop can forget or
mistime it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rl.batch import FIRST_ITEM_INDEX, OOV_INDEX, PAD_INDEX, ObsBatch, TransitionBatch, check_transition_batch
from rl.config_utils import config_from_dict, config_to_dict
from rl.networks import (
    ACTION_ROW_PATHS,
    ITEM_EMBEDDING_PATH,
    NEXT_ITEM_BIAS_PATH,
    NetworkConfig,
    QNetwork,
    init_params,
    init_params_compiled,
    item_embedding_init,
    q_values,
    window_item_scores,
    window_slot_log_probs,
)
from rl.value_learning import double_q_learning_target, expected_sarsa_target, huber_loss, q_learning_target

TARGET_UPDATES = ("periodic", "polyak")
BOOTSTRAPS = ("max", "expected")
WEIGHT_DECAY_SCOPES = ("items", "all")
ITEM_UPDATES = ("auto", "dense", "lazy")
# With item_updates "auto", catalogues above this many actions get lazy item-table updates (where
# the loss allows them): below it the dense Adam step over the table is a small share of an update.
LAZY_ITEM_UPDATES_ABOVE = 10_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    """Hyperparameters of the DQN update."""

    gamma: float = 0.9
    """Discount per step; the batch's 0/1 discount_t is multiplied by it."""
    learning_rate: float = 1e-3
    """Adam step size."""
    max_grad_norm: float = 10.0
    """Gradients are clipped to this global norm before Adam."""
    double_dqn: bool = True
    """Select the bootstrap action with the online network, rate it with the target network."""
    bootstrap: Literal["max", "expected"] = "max"
    """How s_t is valued: 'max' at its best action (Q-learning; Double DQN per double_dqn); 'expected'
    under the target network's next-item distribution (expected SARSA with the shoppers' own choices
    as the policy: the value of s_t as shoppers go on from it, without the max's overestimation).
    'expected' needs the next-item head and scores all actions at once, (B, A)."""
    target_update: Literal["periodic", "polyak"] = "periodic"
    """'periodic': copy online to target every target_update_period updates; 'polyak': blend each update."""
    target_update_period: int = 500
    """Updates between hard target copies (periodic only)."""
    polyak_tau: float = 0.005
    """Weight of the online parameters in each blend (polyak only)."""
    huber_delta: float = 1.0
    """TD errors beyond this magnitude are penalised linearly."""
    sqn_weight: float = 0.0
    """Weight of SQN's next-item cross-entropy (label a_tm1); 0 disables it."""
    next_item_negatives: int = 0
    """0: the next-item cross-entropy is a softmax over every action, (B, A) per update. N > 0: a
    sampled softmax over each state's own next item and N items drawn uniformly (with replacement)
    from the allowed actions per update, shared by the batch: O(B·N) instead of O(B·A), and only
    those rows' gradients are nonzero, so the item table can be updated lazily (item_updates)."""
    td_weight: float = 1.0
    """Weight of the TD loss; 0 (with sqn_weight > 0) trains a plain supervised next-item model."""
    split_losses: bool = False
    """The next-item loss only on logged transitions (batch.logged: the user's own choices) and the TD
    loss only on the others (shown slots: what showing an item earned); each loss is the mean over its
    own rows. False: both losses on every transition."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) decay: each update also subtracts learning_rate * weight_decay * w; 0 disables it."""
    weight_decay_scope: Literal["items", "all"] = "items"
    """What decays: 'items' the item embedding table, 'all' every weight matrix and table (no biases)."""
    item_updates: Literal["auto", "dense", "lazy"] = "auto"
    """How Adam moves the per-action rows (item table and action biases). 'dense': every row at every
    update, as optax.adam does. 'lazy': only the rows the batch's loss reaches (the taken actions and
    the items in the s_tm1 windows), as TensorFlow's LazyAdam: the other rows keep their values and
    moments until a batch reaches them, so an update costs O(B·W·E) there instead of O(A·E). Needs a
    loss that reaches no other row: no next-item loss (sqn_weight 0) and no dueling form. 'auto':
    lazy above 10,000 actions when the loss allows it and weight_decay is 0, dense otherwise."""
    seed: int = 0
    """Seed for parameter initialisation when no key is given."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.bootstrap not in BOOTSTRAPS:
            raise ValueError(f"bootstrap must be one of {BOOTSTRAPS}, got {self.bootstrap!r}")
        if self.target_update not in TARGET_UPDATES:
            raise ValueError(f"target_update must be one of {TARGET_UPDATES}, got {self.target_update!r}")
        if self.target_update_period < 1:
            raise ValueError(f"target_update_period must be >= 1, got {self.target_update_period}")
        if not 0.0 < self.polyak_tau <= 1.0:
            raise ValueError(f"polyak_tau must be in (0, 1], got {self.polyak_tau}")
        if self.huber_delta <= 0:
            raise ValueError(f"huber_delta must be > 0, got {self.huber_delta}")
        if self.sqn_weight < 0:
            raise ValueError(f"sqn_weight must be >= 0, got {self.sqn_weight}")
        if self.td_weight < 0:
            raise ValueError(f"td_weight must be >= 0, got {self.td_weight}")
        if self.td_weight == 0 and self.sqn_weight == 0:
            raise ValueError("td_weight and sqn_weight cannot both be 0: nothing would be learned")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.item_updates not in ITEM_UPDATES:
            raise ValueError(f"item_updates must be one of {ITEM_UPDATES}, got {self.item_updates!r}")
        if self.next_item_negatives < 0:
            raise ValueError(f"next_item_negatives must be >= 0, got {self.next_item_negatives}")
        if self.item_updates == "lazy" and self.sqn_weight > 0 and self.next_item_negatives == 0:
            raise ValueError(
                "item_updates 'lazy' needs sqn_weight 0 or next_item_negatives > 0: the full "
                "next-item softmax reaches every item's row"
            )
        if self.weight_decay_scope not in WEIGHT_DECAY_SCOPES:
            raise ValueError(
                f"weight_decay_scope must be one of {WEIGHT_DECAY_SCOPES}, got {self.weight_decay_scope!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LearnerConfig:
        """Build from a plain dict; unknown keys raise ValueError naming them."""
        return config_from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


@flax.struct.dataclass
class TrainState:
    """Everything the learner carries between updates, as one pytree (checkpoint it whole)."""

    params: Any
    target_params: Any
    opt_state: Any
    step: jax.Array  # () int32: updates applied so far

    def replace(self, **changes: Any) -> TrainState:
        """A copy with some fields changed (flax provides it; declared here for type checkers)."""
        return dataclasses.replace(self, **changes)


def make_optimizer(config: LearnerConfig) -> optax.GradientTransformation:
    """Adam (AdamW with weight_decay > 0) behind global-norm clipping."""
    if config.weight_decay == 0:
        # Plain Adam keeps the optimizer state's structure, so older checkpoints still restore.
        adam = optax.adam(config.learning_rate)
    else:
        adam = optax.adamw(
            config.learning_rate,
            weight_decay=config.weight_decay,
            mask=functools.partial(weight_decay_mask, scope=config.weight_decay_scope),
        )
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam)


def weight_decay_mask(params: Any, *, scope: str) -> Any:
    """True for the parameters that decay: the item table ('items'), or every matrix ('all')."""

    def decays(path: Sequence[Any], leaf: Any) -> bool:
        if scope == "all":
            return bool(jnp.ndim(leaf) >= 2)
        return _dict_key_names(path)[-len(ITEM_EMBEDDING_PATH) :] == ITEM_EMBEDDING_PATH

    return jax.tree_util.tree_map_with_path(decays, params)


def create_train_state(
    network_config: NetworkConfig,
    learner_config: LearnerConfig,
    example_obs: ObsBatch,
    key: jax.Array | None = None,
) -> TrainState:
    """Fresh parameters, target = online, Adam state, step 0; key defaults to learner_config.seed.

    The window width and feature count of `example_obs` are fixed into the parameters.
    """
    if learner_config.sqn_weight > 0 and not network_config.next_item_head:
        raise ValueError("sqn_weight > 0 needs NetworkConfig(next_item_head=True)")
    if key is None:
        key = jax.random.key(learner_config.seed)
    network = QNetwork(network_config)
    optimizer = make_optimizer(learner_config)
    if _is_traced((example_obs, key)):  # inside jit or eval_shape: trace through plainly
        params = init_params(network, example_obs, key)
        opt_state = optimizer.init(params)
    else:  # compiled quickly rather than well: it runs once (see networks.init_params_compiled)
        params = init_params_compiled(network, example_obs, key)
        opt_state = jax.jit(optimizer.init, compiler_options={"xla_backend_optimization_level": 0})(params)
    return TrainState(
        params=params,
        # A distinct buffer, so donating or mutating one never aliases the other.
        target_params=jax.tree.map(jnp.copy, params),
        opt_state=opt_state,
        step=jnp.zeros((), jnp.int32),
    )


def _mean_over(values: jax.Array, rows: jax.Array | None) -> jax.Array:
    """Mean of values (B,) over the rows marked 1 in rows (B,); all rows when None; 0 when none marked."""
    if rows is None:
        return jnp.mean(values)
    return jnp.sum(values * rows) / jnp.maximum(jnp.sum(rows), 1.0)


def _is_traced(tree: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _mask_actions(q: jax.Array, action_mask: jax.Array | None) -> jax.Array:
    """Give disallowed actions the row minimum, so no max or argmax picks them (unless all are)."""
    if action_mask is None:
        return q
    assert action_mask.shape == q.shape[-1:], (action_mask.shape, q.shape)
    # The row minimum rather than -inf: stays finite, so 0 * value at episode ends is 0, not NaN.
    return jnp.where(action_mask, q, jnp.min(q, axis=-1, keepdims=True))


# Above this many actions the bootstrap max runs over chunks of the catalogue: each block of scores
# is reduced while still in cache instead of writing and re-reading a (B, A) matrix (about 1.7x faster
# for 256 x 100,000 on a CPU). Small catalogues keep the plain (B, A) form.
CHUNKED_ABOVE = 2048
# Actions per chunk: a (1,024 x 256) float32 block is 1 MiB, one core's L2 cache here.
BOOTSTRAP_CHUNK = 1024


def chunked_bootstrap_values(
    network: QNetwork,
    params: Any,
    target_params: Any,
    obs_t: ObsBatch,
    action_mask: jax.Array | None,
    *,
    double_dqn: bool,
    chunk: int = BOOTSTRAP_CHUNK,
) -> jax.Array:
    """Q_target(s_t, a*) (B,) with a* = argmax_a of the target (DQN) or online (Double DQN) scores
    over the allowed actions, without materialising (B, A) scores. Ties go to the lowest index, as
    `jnp.argmax`; when no action is allowed, a* is action 0.
    """
    num_actions = network.config.num_actions
    chunks = -(-num_actions // chunk)
    pad = chunks * chunk - num_actions
    allowed = jnp.ones((num_actions,), bool) if action_mask is None else action_mask  # (A,)
    allowed = jnp.pad(allowed, (0, pad)).reshape(chunks, chunk)  # padding is never allowed

    selector = params if double_dqn else target_params
    sel_state, sel_value, sel_repeat = cast(
        "tuple[jax.Array, jax.Array | None, jax.Array | None]",
        network.apply(selector, obs_t, method=QNetwork.scoring_parts),
    )
    # Plain DQN without the dueling form rates a* with the network that chose it, and its chunk
    # scores are already Q(s_t, a): the best score is the value, and no position is tracked.
    value_is_best = not double_dqn and sel_value is None
    table_name = "q_item_embedding" if network.config.q_item_table else "item_embedding"
    sel_table = selector["params"][table_name]["embedding"]  # (A, E)
    sel_bias = selector["params"]["action_bias"]  # (A,)
    batch_size = sel_state.shape[0]
    rows = jnp.arange(batch_size)[:, None]  # (B, 1)
    tables = jnp.pad(sel_table, ((0, pad), (0, 0))).reshape(chunks, chunk, -1)  # (n, C, E)
    # Disallowed actions and the padding get a bias of -inf, so no max picks them.
    biases = jnp.where(allowed, jnp.pad(sel_bias, (0, pad)).reshape(chunks, chunk), -jnp.inf)  # (n, C)
    positions = jnp.arange(chunk, dtype=jnp.int32)[:, None]  # (C, 1)
    # The dueling form adds V(s) - mean_a A(s, a) to every action alike: it never changes the argmax.

    def best_of_chunk(
        carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, jax.Array, jax.Array]
    ) -> tuple[tuple[jax.Array, jax.Array], None]:
        best, best_index = carry
        table, bias, start = xs
        # Actions on the long axis, (C, B): this product and its reductions run fastest on a CPU.
        scores = table @ sel_state.T + bias[:, None]  # (C, B)
        if sel_repeat is not None:
            # Window items inside this chunk get their repeat scores; the rest go out of bounds.
            local = obs_t.items - start  # (B, W)
            local = jnp.where((local >= 0) & (local < chunk), local, chunk)
            scores = scores.at[local, rows].add(sel_repeat, mode="drop")
        value = jnp.max(scores, axis=0)  # (B,)
        better = value > best  # strict: an earlier chunk keeps its ties
        if value_is_best:
            return (jnp.where(better, value, best), best_index), None
        # The first position of the max, by a plain min: XLA's argmax (a paired value-index
        # reduction) took longer on a CPU than the chunk's matrix product.
        index = jnp.min(jnp.where(scores == value, positions, chunk), axis=0)  # (B,)
        return (jnp.where(better, value, best), jnp.where(better, start + index, best_index)), None

    init = (jnp.full((batch_size,), -jnp.inf), jnp.zeros((batch_size,), jnp.int32))
    starts = jnp.arange(chunks, dtype=jnp.int32) * chunk
    (best, best_index), _ = jax.lax.scan(best_of_chunk, init, (tables, biases, starts))
    # The chosen action is rated by the target network, as QNetwork.q_for_actions rates any action
    # (action 0 where none is allowed: the best score is then -inf, which a target must not be).
    rated = cast(jax.Array, network.apply(target_params, obs_t, best_index, method=QNetwork.q_for_actions))
    if value_is_best:
        return jnp.where(best > -jnp.inf, best, rated)
    return rated


def _plain_bootstrap_targets(
    state: TrainState,
    batch: TransitionBatch,
    network: QNetwork,
    double_dqn: bool,
    discount_t: jax.Array,
    action_mask: jax.Array | None,
) -> jax.Array:
    """Targets (B,) from full (B, A) scores through the per-transition rlax-style targets."""
    batch_size, num_actions = batch.a_tm1.shape[0], network.config.num_actions
    q_t_value = _mask_actions(q_values(network, state.target_params, batch.obs_t), action_mask)  # (B, A)
    assert q_t_value.shape == (batch_size, num_actions), q_t_value.shape
    if double_dqn:
        q_t_selector = _mask_actions(q_values(network, state.params, batch.obs_t), action_mask)  # (B, A)
        return jax.vmap(double_q_learning_target)(batch.r_t, discount_t, q_t_value, q_t_selector)
    return jax.vmap(q_learning_target)(batch.r_t, discount_t, q_t_value)


def _expected_bootstrap_targets(
    state: TrainState,
    batch: TransitionBatch,
    network: QNetwork,
    discount_t: jax.Array,
    action_mask: jax.Array | None,
) -> jax.Array:
    """Targets (B,): r + discount * E_{a ~ softmax(next-item logits)} Q(s_t, a), both from the target
    network, over the allowed actions."""
    q_t, logits_t = cast(
        "tuple[jax.Array, jax.Array]",
        network.apply(state.target_params, batch.obs_t, method=QNetwork.q_and_next_item_logits),
    )  # (B, A), (B, A)
    if action_mask is not None:
        logits_t = jnp.where(action_mask, logits_t, -jnp.inf)
        q_t = jnp.where(action_mask, q_t, 0.0)
    probs_t = jax.nn.softmax(logits_t, axis=-1)  # (B, A)
    return jax.vmap(expected_sarsa_target)(batch.r_t, discount_t, q_t, probs_t)


def expected_in_chunks(network_config: NetworkConfig) -> bool:
    """Whether the expected bootstrap runs over chunks of the catalogue: over CHUNKED_ABOVE actions,
    for every form `chunked_expected_values` scores (all but the dueling form)."""
    return network_config.num_actions > CHUNKED_ABOVE and not network_config.dueling


def chunked_expected_values(
    network: QNetwork,
    target_params: Any,
    obs_t: ObsBatch,
    action_mask: jax.Array | None,
    *,
    chunk: int = BOOTSTRAP_CHUNK,
) -> jax.Array:
    """E_{a ~ softmax(next-item logits)} Q(s_t, a) (B,) over the allowed actions, both from
    `target_params`, as `_expected_bootstrap_targets` takes it, without materialising (B, A) logits
    or values: the catalogue is scored in chunks with a running (online) softmax, each block reduced
    while still in cache. With the repeat head, the window's items (whose scores the head replaces or
    mixes) are left out of the chunks and scored exactly, then merged in. Needs the next-item head,
    not the dueling form."""
    config = network.config
    num_actions = config.num_actions
    chunks = -(-num_actions // chunk)
    pad = chunks * chunk - num_actions
    parts = cast(
        "dict[str, jax.Array]", network.apply(target_params, obs_t, method=QNetwork.expected_value_parts)
    )
    params = target_params["params"]

    def per_chunk(values: jax.Array) -> jax.Array:  # (A, ...) -> (n, C, ...), zero padding
        return jnp.pad(values, [(0, pad)] + [(0, 0)] * (values.ndim - 1)).reshape(
            chunks, chunk, *values.shape[1:]
        )

    allowed = jnp.ones((num_actions,), bool) if action_mask is None else jnp.asarray(action_mask, bool)
    real = jnp.arange(chunks * chunk).reshape(chunks, chunk) < num_actions  # (n, C): not padding
    xs: dict[str, jax.Array] = {
        "table": per_chunk(params["item_embedding"]["embedding"]),  # (n, C, E)
        # The padding gets a next-item bias of -inf: no probability.
        "next_bias": jnp.where(real, per_chunk(params["next_item_bias"]), -jnp.inf),  # (n, C)
        "allowed": per_chunk(allowed),  # (n, C)
        "bias": per_chunk(params["action_bias"]),  # (n, C)
        "start": jnp.arange(chunks, dtype=jnp.int32) * chunk,  # (n,)
    }
    if config.factored_q:
        xs["continuation_bias"] = per_chunk(params["continuation_bias"])
        xs["future_bias"] = per_chunk(params["future_bias"])
    elif config.q_item_table:
        xs["q_table"] = per_chunk(params["q_item_embedding"]["embedding"])
    batch_size = parts["next_item"].shape[0]
    repeat = parts.get("repeat")  # (B, W, 2) or None
    known = obs_t.items >= FIRST_ITEM_INDEX  # (B, W)
    rows = jnp.arange(batch_size)[None, :]  # (1, B)

    def running(top: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The new running max (B,), the old sums' rescale (B,) and the block's weights (C, B)."""
        new_top = jnp.maximum(top, jnp.max(logits, axis=0))
        # The shift stays finite while nothing has been seen yet (max -inf), so no -inf - -inf.
        shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
        return new_top, jnp.exp(top - shift), jnp.exp(logits - shift[None, :])

    Sums = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]

    def add_chunk(carry: Sums, block: dict[str, jax.Array]) -> tuple[Sums, None]:
        # Running (B,) each: max allowed logit, sum of exp and of exp * Q over the allowed actions,
        # and max logit and sum of exp over every action (the mixture's explore normaliser).
        top, mass, weighted, top_all, total = carry
        # Actions on the long axis, (C, B), as in the chunked max.
        logits = block["table"] @ parts["next_item"].T + block["next_bias"][:, None]  # (C, B)
        if repeat is not None:  # the window's items are scored apart
            local = obs_t.items - block["start"]  # (B, W)
            local = jnp.where(known & (local >= 0) & (local < chunk), local, chunk)
            logits = logits.at[local.T, rows].set(-jnp.inf, mode="drop")
        if config.factored_q:
            chance = jax.nn.sigmoid(parts["going_on"][None, :] + block["continuation_bias"][:, None])
            q = (
                parts["reward"][None, :]
                + block["bias"][:, None]
                + chance * (parts["future"][None, :] + block["future_bias"][:, None])
            )  # (C, B)
        else:
            table = block["q_table"] if config.q_item_table else block["table"]
            q = table @ parts["q_state"].T + block["bias"][:, None]  # (C, B)
        top_all, rescale_all, weights_all = running(top_all, logits)
        allowed_logits = jnp.where(block["allowed"][:, None], logits, -jnp.inf)
        top, rescale, weights = running(top, allowed_logits)
        return (
            top,
            mass * rescale + weights.sum(axis=0),
            weighted * rescale + jnp.sum(weights * jnp.where(weights > 0, q, 0.0), axis=0),
            top_all,
            total * rescale_all + weights_all.sum(axis=0),
        ), None

    minus_inf, zeros = jnp.full((batch_size,), -jnp.inf), jnp.zeros((batch_size,))
    (top, mass, weighted, top_all, total), _ = jax.lax.scan(
        add_chunk, (minus_inf, zeros, zeros, minus_inf, zeros), xs
    )
    tiny = jnp.finfo(jnp.float32).tiny
    if repeat is None:
        return weighted / jnp.maximum(mass, tiny)

    # The window's slots, exactly: Q(s, item) (the network's, repeat part included) and whether
    # the item is allowed.
    q_window = parts["q_window"]  # (B, W)
    counted = known & allowed[jnp.where(known, obs_t.items, 0)]  # (B, W)
    if config.repeat_mode == "mixture":
        # P(repeat) x the softmax over the window's slots, P(explore) x the softmax over every item
        # outside the window (normalised over all of them, then the allowed ones renormalised).
        mode = parts["mode"]
        any_known = known.any(axis=1)  # (B,)
        slot_log_probs = window_slot_log_probs(obs_t.items, repeat[..., 1])  # (B, W)
        log_repeat = jnp.where(
            counted, jax.nn.log_sigmoid(mode)[:, None] + slot_log_probs, -jnp.inf
        )  # (B, W)
        log_explore = jnp.where(any_known, jax.nn.log_sigmoid(-mode), 0.0)  # (B,)
        # The log of the factor that turns the chunks' exp(logit - top) into explore probabilities.
        log_scale = jnp.where(
            jnp.isfinite(top), log_explore + top - top_all - jnp.log(jnp.maximum(total, tiny)), -jnp.inf
        )  # (B,)
        # One common shift for both parts, so neither underflows against the other's scale.
        top_both = jnp.maximum(log_scale, jnp.max(log_repeat, axis=1))
        shift = jnp.where(jnp.isfinite(top_both), top_both, 0.0)
        scale = jnp.exp(log_scale - shift)  # (B,)
        repeat_weights = jnp.exp(log_repeat - shift[:, None])  # (B, W); 0 where not counted
        numerator = scale * weighted + jnp.sum(repeat_weights * jnp.where(counted, q_window, 0.0), axis=1)
        denominator = scale * mass + jnp.sum(repeat_weights, axis=1)
        return numerator / jnp.maximum(denominator, tiny)
    # 'replace': each window item once (its first slot), its logit the highest repeat score of its slots.
    first, window_logits = window_item_scores(obs_t.items, repeat[..., 1])  # (B, W) each
    first = first & counted
    window_logits = jnp.where(first, window_logits, -jnp.inf)
    new_top = jnp.maximum(top, jnp.max(window_logits, axis=1))
    shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
    rescale = jnp.exp(top - shift)
    window_weights = jnp.exp(window_logits - shift[:, None])  # (B, W); 0 where not counted
    numerator = weighted * rescale + jnp.sum(window_weights * jnp.where(first, q_window, 0.0), axis=1)
    return numerator / jnp.maximum(mass * rescale + window_weights.sum(axis=1), tiny)


def update(
    state: TrainState,
    batch: TransitionBatch,
    *,
    network: QNetwork,
    config: LearnerConfig,
    action_mask: jax.Array | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One DQN step on a batch: Huber TD loss (+ optional SQN loss), Adam, then the target sync.

    `action_mask` (A,) bool limits the bootstrap max to actions that exist (assigned vocabulary
    indices); None allows all. Metrics (scalars): loss, td_loss, next_item_loss, td_error_abs_mean,
    q_mean and q_max (of Q(s_tm1, a_tm1) over the batch), grad_norm. With `config.td_weight` 0 no
    bootstrap is computed and the TD metrics measure Q against 0.
    """
    check_transition_batch(batch)
    batch_size = batch.a_tm1.shape[0]
    num_actions = network.config.num_actions
    use_sqn = config.sqn_weight > 0
    negatives = sample_negatives(config, state.step, action_mask, num_actions) if use_sqn else None
    if use_sqn and not network.config.next_item_head:
        raise ValueError("sqn_weight > 0 needs NetworkConfig(next_item_head=True)")
    if config.bootstrap == "expected" and not network.config.next_item_head:
        raise ValueError("bootstrap='expected' needs NetworkConfig(next_item_head=True)")
    factored = network.config.factored_q
    if factored and config.td_weight > 0 and config.bootstrap == "max" and num_actions > CHUNKED_ABOVE:
        raise ValueError(
            f"factored_q with the max bootstrap is not reduced in chunks over more than {CHUNKED_ABOVE} "
            "actions: use bootstrap='expected' or the plain form of Q"
        )
    discount_t = config.gamma * batch.discount_t  # (B,)
    # Which rows each loss averages over (None: all of them).
    next_item_rows = batch.logged if config.split_losses else None  # (B,)
    td_rows = 1.0 - batch.logged if config.split_losses else None  # (B,)

    # Bootstrap targets need no gradient, so they are computed outside value_and_grad; without a TD
    # loss they are not needed at all (and over a large catalogue they are most of the work).
    if config.td_weight == 0:
        target_tm1 = jnp.zeros((batch_size,), jnp.float32)
    elif config.bootstrap == "expected" and expected_in_chunks(network.config):
        expected = chunked_expected_values(network, state.target_params, batch.obs_t, action_mask)  # (B,)
        target_tm1 = jax.lax.stop_gradient(batch.r_t + discount_t * expected)
    elif config.bootstrap == "expected":
        target_tm1 = _expected_bootstrap_targets(state, batch, network, discount_t, action_mask)
    elif num_actions > CHUNKED_ABOVE:
        q_boot = chunked_bootstrap_values(
            network, state.params, state.target_params, batch.obs_t, action_mask, double_dqn=config.double_dqn
        )  # (B,)
        target_tm1 = jax.lax.stop_gradient(batch.r_t + discount_t * q_boot)
    else:
        target_tm1 = _plain_bootstrap_targets(
            state, batch, network, config.double_dqn, discount_t, action_mask
        )
    assert target_tm1.shape == (batch_size,), target_tm1.shape

    # Lazy item updates: the loss runs on a network whose action rows are only those the batch
    # reaches (gathered, with the window and action indices renumbered to match), and Adam updates
    # those rows and their moments; the rest of every per-action table is left as it is.
    if lazy_item_updates(config, network.config):
        touched = touched_action_rows(batch, num_actions, negatives)  # (U,)
        loss_network = QNetwork(dataclasses.replace(network.config, num_actions=touched.shape[0]))
        obs_tm1 = batch.obs_tm1.replace(items=_local_rows(touched, batch.obs_tm1.items))
        a_tm1 = _local_rows(touched, batch.a_tm1)
        negatives_in = None if negatives is None else _local_rows(touched, negatives)
        params_in = gather_action_rows(state.params, touched, num_actions)
        opt_state_in = gather_action_rows(state.opt_state, touched, num_actions)
    else:
        touched = None
        loss_network, obs_tm1, a_tm1, negatives_in = network, batch.obs_tm1, batch.a_tm1, negatives
        params_in, opt_state_in = state.params, state.opt_state

    def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits: jax.Array | None
        if factored:
            reward, going_on, future, logits = cast(
                "tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]",
                loss_network.apply(
                    params,
                    obs_tm1,
                    a_tm1,
                    next_item=use_sqn,
                    negatives=negatives_in,
                    method=QNetwork.factored_q_for_actions,
                ),
            )  # (B,) x 3, (B, A) or None
            q_tm1_a = reward + jax.nn.sigmoid(going_on) * future
        elif use_sqn:
            q_tm1_a, logits = cast(
                "tuple[jax.Array, jax.Array]",
                loss_network.apply(
                    params,
                    obs_tm1,
                    a_tm1,
                    negatives_in,
                    method=QNetwork.q_for_actions_and_next_item_logits,
                ),
            )  # (B,), (B, A) or sampled (B,)
        else:
            q_tm1_a = cast(
                jax.Array, loss_network.apply(params, obs_tm1, a_tm1, method=QNetwork.q_for_actions)
            )
            logits = None
        if logits is not None:
            if negatives_in is None:
                cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, a_tm1)  # (B,)
            else:  # the sampled softmax gives log P(a_tm1 | s) itself, (B,)
                cross_entropy = -logits
            next_item_loss = _mean_over(batch.weights * cross_entropy, next_item_rows)
        else:
            next_item_loss = jnp.zeros((), jnp.float32)
        assert q_tm1_a.shape == (batch_size,), q_tm1_a.shape
        td_error = target_tm1 - q_tm1_a  # (B,)
        if factored:
            td_loss = _factored_td_loss(
                batch, target_tm1, reward, going_on, future, td_rows, config.huber_delta
            )
        else:
            td_loss = _mean_over(batch.weights * huber_loss(td_error, config.huber_delta), td_rows)
        loss = config.td_weight * td_loss + config.sqn_weight * next_item_loss
        aux = {
            "td_loss": td_loss,
            "next_item_loss": next_item_loss,
            "td_error_abs_mean": _mean_over(jnp.abs(td_error), td_rows),
            "q_mean": _mean_over(q_tm1_a, td_rows),
            "q_max": jnp.max(
                q_tm1_a if td_rows is None else jnp.where(td_rows > 0, q_tm1_a, jnp.min(q_tm1_a))
            ),
        }
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params_in)
    optimizer = make_optimizer(config)
    updates, opt_state = optimizer.update(grads, opt_state_in, params_in)
    params = optax.apply_updates(params_in, updates)
    if touched is not None:
        params = scatter_action_rows(state.params, params, touched, num_actions)
        opt_state = scatter_action_rows(state.opt_state, opt_state, touched, num_actions)
    step = state.step + 1
    if config.target_update == "periodic":
        # Copies exactly when step is a multiple of the period: after the period-th update, not before.
        target_params = optax.periodic_update(params, state.target_params, step, config.target_update_period)
    else:
        target_params = optax.incremental_update(params, state.target_params, config.polyak_tau)
    metrics = {"loss": loss, **aux, "grad_norm": optax.tree_utils.tree_norm(grads)}
    new_state = TrainState(params=params, target_params=target_params, opt_state=opt_state, step=step)
    return new_state, metrics


def _factored_td_loss(
    batch: TransitionBatch,
    target_tm1: jax.Array,
    reward: jax.Array,
    going_on: jax.Array,
    future: jax.Array,
    td_rows: jax.Array | None,
    huber_delta: float,
) -> jax.Array:
    """The TD loss of the factored Q = R + sigmoid(going_on) * G: each part fitted to its own signal.

    R to the reward r_t (Huber), the continuation log-odds to the 0/1 discount_t (the session went on
    after the action: logistic loss), and G to what the target adds to the reward, gamma V(s_t), on
    the transitions that went on (Huber). Their expectations make Q's: E[r + gamma d V'] = E[r] +
    P(d = 1) E[gamma V' | d = 1], with each part's noise apart from the others'. All (B,).
    """
    went_on = batch.discount_t
    reward_loss = _mean_over(batch.weights * huber_loss(batch.r_t - reward, huber_delta), td_rows)
    continuation_loss = _mean_over(
        batch.weights * optax.sigmoid_binary_cross_entropy(going_on, went_on), td_rows
    )
    future_rows = went_on if td_rows is None else went_on * td_rows
    future_error = jax.lax.stop_gradient(target_tm1 - batch.r_t) - future
    future_loss = _mean_over(batch.weights * huber_loss(future_error, huber_delta), future_rows)
    return reward_loss + continuation_loss + future_loss


def lazy_item_updates(config: LearnerConfig, network_config: NetworkConfig) -> bool:
    """Whether `update` moves only the action rows each batch reaches (LearnerConfig.item_updates)."""
    if config.item_updates == "dense":
        return False
    if config.item_updates == "lazy":
        if network_config.dueling:
            raise ValueError(
                "item_updates 'lazy' needs dueling False: the dueling form's mean reaches every item's row"
            )
        return True
    return (
        network_config.num_actions > LAZY_ITEM_UPDATES_ABOVE
        and (config.sqn_weight == 0 or config.next_item_negatives > 0)
        and config.weight_decay == 0
        and not network_config.dueling
    )


def sample_negatives(
    config: LearnerConfig, step: jax.Array, action_mask: jax.Array | None, num_actions: int
) -> jax.Array | None:
    """The update's sampled next-item negatives, (N,) action indices drawn uniformly with replacement
    from the allowed actions (all but padding and OOV when action_mask is None); None when the
    next-item softmax is over every action. Drawn from (config.seed, step): the same update draws
    the same items."""
    if config.next_item_negatives == 0:
        return None
    allowed = jnp.arange(num_actions) > OOV_INDEX if action_mask is None else jnp.asarray(action_mask, bool)
    weights = allowed.astype(jnp.float32)
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    return jax.random.choice(
        key, num_actions, shape=(config.next_item_negatives,), p=weights / jnp.maximum(weights.sum(), 1.0)
    ).astype(jnp.int32)


def touched_action_rows(
    batch: TransitionBatch, num_actions: int, negatives: jax.Array | None = None
) -> jax.Array:
    """The action indices the loss reaches, sorted, (U,) with U = B·W + B + 2 (+ N): padding and OOV
    (always, so they keep local indices 0 and 1), the s_tm1 window items, the taken actions and the
    sampled next-item negatives (N,) when given; the unused tail is filled with num_actions (out of
    range: gathers 0, scatters nothing)."""
    parts = [
        jnp.array([PAD_INDEX, OOV_INDEX], jnp.int32),
        batch.obs_tm1.items.reshape(-1).astype(jnp.int32),
        batch.a_tm1.astype(jnp.int32),
    ]
    if negatives is not None:
        parts.append(negatives.astype(jnp.int32))
    ids = jnp.concatenate(parts)
    return jnp.unique(ids, size=ids.shape[0], fill_value=num_actions)


def _local_rows(touched: jax.Array, indices: jax.Array) -> jax.Array:
    """Positions of `indices` in the sorted `touched`: the same order, so padding stays 0, OOV 1."""
    return jnp.searchsorted(touched, indices).astype(jnp.int32)


def _is_action_row_leaf(path: Sequence[Any], leaf: Any, num_actions: int) -> bool:
    """Whether a leaf of parameters (or of optimizer state shaped like them) holds one row per action."""
    names = _dict_key_names(path)
    return (
        any(names[-len(row_path) :] == row_path for row_path in ACTION_ROW_PATHS)
        and hasattr(leaf, "shape")
        and leaf.ndim >= 1
        and leaf.shape[0] == num_actions
    )


def gather_action_rows(tree: Any, touched: jax.Array, num_actions: int) -> Any:
    """`tree` (parameters, or optimizer state shaped like them) with every per-action leaf cut to
    the rows in `touched`, (A, ...) -> (U, ...); rows past the table read 0."""

    def gather(path: Sequence[Any], leaf: Any) -> Any:
        if not _is_action_row_leaf(path, leaf, num_actions):
            return leaf
        return jnp.asarray(leaf).at[touched].get(mode="fill", fill_value=0)

    return jax.tree_util.tree_map_with_path(gather, tree)


def scatter_action_rows(full: Any, rows: Any, touched: jax.Array, num_actions: int) -> Any:
    """`rows` (a tree from gather_action_rows, updated) written back into `full`: the per-action
    leaves at the rows in `touched` (past the table: dropped), every other leaf taken from `rows`."""

    def scatter(path: Sequence[Any], leaf: Any, row_leaf: Any) -> Any:
        if not _is_action_row_leaf(path, leaf, num_actions):
            return row_leaf
        return jnp.asarray(leaf).at[touched].set(row_leaf, mode="drop")

    return jax.tree_util.tree_map_with_path(scatter, full, rows)


def _update_many(
    state: TrainState,
    batches: TransitionBatch,
    *,
    network: QNetwork,
    config: LearnerConfig,
    action_mask: jax.Array | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """K updates fused in one compiled `lax.scan`; `batches` carry a leading axis K on every array.

    Returns the state after all K updates and each metric stacked as (K,).
    """
    num_updates = batches.a_tm1.shape[0]
    assert batches.a_tm1.ndim == 2, f"expected stacked batches (K, B), got a_tm1 {batches.a_tm1.shape}"
    assert all(leaf.shape[0] == num_updates for leaf in jax.tree.leaves(batches)), "ragged leading axis"

    def body(carry: TrainState, batch: TransitionBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        return update(carry, batch, network=network, config=config, action_mask=action_mask)

    return jax.lax.scan(body, state, batches)


update_many = jax.jit(_update_many, static_argnames=("network", "config"))
# The same, writing the new state into the buffers of the one passed in (donated): no copy of the
# parameters, target and Adam moments per call (5-7% of a fused call over a 100,000-item table).
# The caller must not use `state`, or any array taken from it, afterwards.
_update_many_donating = jax.jit(
    _update_many, static_argnames=("network", "config"), donate_argnames=("state",)
)


def update_many_in_place(
    state: TrainState,
    batches: TransitionBatch,
    *,
    network: QNetwork,
    config: LearnerConfig,
    action_mask: jax.Array | np.ndarray | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """`update_many`, writing the new state into the buffers of `state` (donated to the call)."""
    return _update_many_donating(
        _unaliased(state), batches, network=network, config=config, action_mask=action_mask
    )


def _unaliased(tree: Any) -> Any:
    """`tree` with a copy in place of every array object that already appeared in it: a buffer can be
    donated once per call (e.g. a bias set to one array in both the online and target parameters)."""
    seen: set[int] = set()

    def own(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array | np.ndarray):
            return leaf
        if id(leaf) in seen:
            return jnp.copy(leaf)
        seen.add(id(leaf))
        return leaf

    return jax.tree.map(own, tree)


# One update per call, compiled; the counterpart of update_many for callers without stacked batches.
update_jit = jax.jit(update, static_argnames=("network", "config"))


def stack_batches(batches: Sequence[TransitionBatch]) -> TransitionBatch:
    """Stack K same-shaped batches along a new leading axis, for update_many."""
    assert batches, "need at least one batch"
    return jax.tree.map(lambda *leaves: np.stack(leaves), *batches)


def with_next_item_prior(state: TrainState, actions: np.ndarray | Sequence[int]) -> TrainState:
    """The state with the next-item head's bias set to log(1 + count) of each action in `actions`.

    A softmax trained on the bias alone converges to the log of each item's frequency, so starting
    there lets the state encoder learn only what departs from popularity: an item the encoder
    barely saw keeps a popularity-ordered score instead of one set by initialisation noise. The
    counts are centred (the softmax ignores a shared constant); Adam's moments are left as they are.
    """
    params = state.params
    bias = params[NEXT_ITEM_BIAS_PATH[0]][NEXT_ITEM_BIAS_PATH[1]]  # (A,)
    action_array = np.asarray(actions, dtype=np.int64).reshape(-1)  # (N,)
    if action_array.size and (action_array.min() < 0 or action_array.max() >= bias.shape[0]):
        raise ValueError(
            f"actions must be in [0, {bias.shape[0]}), got {action_array.min()}..{action_array.max()}"
        )
    log_counts = np.log1p(np.bincount(action_array, minlength=bias.shape[0]).astype(np.float64))  # (A,)
    prior = jnp.asarray(log_counts - log_counts.mean(), bias.dtype)  # (A,)

    def set_bias(tree: Any) -> Any:
        inner = dict(tree[NEXT_ITEM_BIAS_PATH[0]])
        inner[NEXT_ITEM_BIAS_PATH[1]] = prior
        return {**tree, NEXT_ITEM_BIAS_PATH[0]: inner}

    return state.replace(params=set_bias(params), target_params=set_bias(state.target_params))


def _dict_key_names(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(entry.key) for entry in path if isinstance(entry, jax.tree_util.DictKey))


def reset_action_rows(state: TrainState, indices: Sequence[int] | np.ndarray, key: jax.Array) -> TrainState:
    """Re-initialise the per-action rows at `indices` (an index the vocabulary gave to a new item).

    The item embedding gets fresh random rows and the biases zeros, in both the online and the target
    parameters (a stale target row would bootstrap the evicted item's value), and Adam's moments for
    those rows are zeroed so the old item's momentum does not steer the new one.
    """
    index_array = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
    if index_array.size == 0:
        return state
    params = state.params
    table = params[ITEM_EMBEDDING_PATH[0]][ITEM_EMBEDDING_PATH[1]][ITEM_EMBEDDING_PATH[2]]  # (A, E)
    num_actions, embed_dim = table.shape
    if index_array.min() < 0 or index_array.max() >= num_actions:
        raise ValueError(f"action indices must be in [0, {num_actions}), got {index_array.tolist()}")
    rows = jnp.asarray(index_array, jnp.int32)
    new_embedding_rows = item_embedding_init(embed_dim)(key, (rows.shape[0], embed_dim), table.dtype)

    def reset_leaf(path: Sequence[Any], leaf: Any, *, fresh: bool) -> Any:
        if not _is_action_row_leaf(path, leaf, num_actions):
            return leaf
        leaf = jnp.asarray(leaf)  # restored checkpoints hold numpy arrays, which have no .at
        if fresh and _dict_key_names(path)[-len(ITEM_EMBEDDING_PATH) :] == ITEM_EMBEDDING_PATH:
            return leaf.at[rows].set(new_embedding_rows)
        # Biases start at zero, as at initialisation; optimizer moments restart at zero.
        return leaf.at[rows].set(0)

    new_params = jax.tree_util.tree_map_with_path(functools.partial(reset_leaf, fresh=True), params)
    new_target = jax.tree_util.tree_map_with_path(
        functools.partial(reset_leaf, fresh=True), state.target_params
    )
    new_opt_state = jax.tree_util.tree_map_with_path(
        functools.partial(reset_leaf, fresh=False), state.opt_state
    )
    return TrainState(params=new_params, target_params=new_target, opt_state=new_opt_state, step=state.step)

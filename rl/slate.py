"""Slates of k distinct actions for the actor, each position with its exact propensity.

A slate is filled position by position from the allowed actions not yet shown. The propensity of
position i is the probability the policy had of choosing that action there, given positions 0..i-1:

- epsilon-greedy: with probability 1 - epsilon the best remaining allowed action, otherwise a
  uniformly random remaining allowed one, so P(a) = (1 - eps)·[a is best remaining] + eps / n_remaining;
- softmax: P(a) = exp(score_a / T) / sum over remaining allowed a' of exp(score_a' / T).

Off-policy evaluation and correction downstream divide by these numbers, so they are computed in
closed form, not estimated. Per position the propensities over all remaining choices sum to one.

All functions take scores (A,) or (B, A) and an `allowed` mask of the same shape (or (A,) shared by
all rows), jit with `k` static, and vmap over users. Per-user exclusions can also come as `blocked`
action indices (m,) or (B, m), -1 for unused slots: with a shared (A,) mask this keeps the per-user
work at O(m + k) besides one top-k, instead of a (B, A) mask per batch. Scores must be finite.
Positions beyond the number of allowed actions are empty: action -1, propensity 0, not explored.

Epsilon-greedy never draws noise over all A actions: a uniform draw among the remaining allowed
actions is a uniform rank among them, and ranks map to actions through per-block counts of the
(shared) mask. Softmax needs one Gumbel draw per action (Gumbel-top-k), which is exact in one pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

SlateResult = tuple[jax.Array, jax.Array, jax.Array]
RANK_BLOCK = 256  # actions per block of the two-level count that finds the r-th allowed action
_NO_RANK = 2**31 - 1  # sorts after every real rank


def _check_k(k: int, num_actions: int) -> None:
    if not 1 <= k <= num_actions:
        raise ValueError(f"k must be in [1, {num_actions}] (the number of actions), got {k}")


class _AllowedRanks:
    """Ranks among the allowed actions of one mask (A,), from per-block counts.

    Built from a mask shared by all users, under vmap the counts are computed once per batch; a
    lookup then reads one block of RANK_BLOCK counts (a binary search), never all A.
    """

    def __init__(self, allowed: jax.Array) -> None:
        num_actions = allowed.shape[0]
        num_blocks = -(-num_actions // RANK_BLOCK)
        padded = jnp.pad(allowed, (0, num_blocks * RANK_BLOCK - num_actions))  # (nb * R,)
        self.blocks = padded.reshape(num_blocks, RANK_BLOCK)  # (nb, R)
        # Allowed actions up to and including each action, counted from the start of its block.
        self.within = jnp.cumsum(self.blocks, axis=1, dtype=jnp.int32)  # (nb, R)
        sizes = self.within[:, -1]  # (nb,)
        self.through = jnp.cumsum(sizes)  # (nb,) allowed actions up to the end of each block
        self.before = self.through - sizes  # (nb,)
        self.count = self.through[-1]

    def rank(self, action: jax.Array) -> jax.Array:
        """How many allowed actions precede ``action`` (its 0-based rank when it is allowed)."""
        block, offset = action // RANK_BLOCK, action % RANK_BLOCK
        return self.before[block] + self.within[block, offset] - self.blocks[block, offset]

    def action(self, rank: jax.Array) -> jax.Array:
        """The allowed action of 0-based ``rank`` (rank < count)."""
        block = jnp.searchsorted(self.through, rank, side="right")
        offset = jnp.searchsorted(self.within[block], rank - self.before[block], side="right")
        return (block * RANK_BLOCK + offset).astype(jnp.int32)


def _masked(scores: jax.Array, allowed: jax.Array, blocked: jax.Array) -> jax.Array:
    """Scores (A,) with disallowed and blocked actions at -inf."""
    num_actions = scores.shape[0]
    masked = jnp.where(allowed, scores, -jnp.inf)  # (A,)
    return masked.at[jnp.where(blocked >= 0, blocked, num_actions)].set(-jnp.inf, mode="drop")


def _blocked_ranks(ranks: _AllowedRanks, allowed: jax.Array, blocked: jax.Array) -> jax.Array:
    """Sorted distinct ranks (m,) of the blocked actions that the mask allows; _NO_RANK elsewhere."""
    in_range = (blocked >= 0) & (blocked < allowed.shape[0])
    index = jnp.where(in_range, blocked, 0)
    effective = in_range & allowed[index]
    ordered = jnp.sort(jnp.where(effective, jax.vmap(ranks.rank)(index), _NO_RANK))  # (m,)
    repeated = jnp.concatenate([jnp.zeros((1,), bool), ordered[1:] == ordered[:-1]])  # (m,)
    return jnp.sort(jnp.where(repeated, _NO_RANK, ordered))


def _best_remaining(greedy_order: jax.Array, actions: jax.Array) -> jax.Array:
    """For each position i of a slate `actions` (k,), the first of `greedy_order` (k,) not in actions[:i]."""
    k = actions.shape[0]
    # Where each greedy action sits in the slate (k if it is not there): it is still available at
    # every position up to and including that one.
    hits = greedy_order[:, None] == actions[None, :]  # (k greedy, k slate)
    slot = jnp.where(jnp.any(hits, axis=1), jnp.argmax(hits, axis=1), k)  # (k,)
    available = slot[None, :] >= jnp.arange(k)[:, None]  # (k positions, k greedy)
    return greedy_order[jnp.argmax(available, axis=1)]  # (k,)


def _mulhi(a: jax.Array, b: jax.Array) -> jax.Array:
    """The high 32 bits of the 64-bit product of uint32 ``a`` and ``b``, in 32-bit arithmetic."""
    a0, a1, b0, b1 = a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16
    low_low, low_high, high_low = a0 * b0, a0 * b1, a1 * b0
    middle = (low_low >> 16) + (low_high & 0xFFFF) + (high_low & 0xFFFF)
    return a1 * b1 + (low_high >> 16) + (high_low >> 16) + (middle >> 16)


def scale_bits(high: jax.Array, low: jax.Array, span: jax.Array) -> jax.Array:
    """floor((high·2**32 + low) · span / 2**64): 64 random bits to a uniform integer in [0, span).

    Each value is hit by floor or ceil of 2**64 / span of the 2**64 inputs, so the bias is below
    span / 2**64 (exact to far more digits than a float32 propensity holds). All uint32.
    """
    from_low = _mulhi(low, span)
    product_low = high * span  # high·span mod 2**32 (wraps)
    carry = (product_low + from_low < product_low).astype(jnp.uint32)
    return _mulhi(high, span) + carry


def _uniform_draws(key: jax.Array, spans: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Uniform integers in [0, spans) (k,) and uniform floats in [0, 1) (k,), from one draw of bits.

    One threefry call instead of three (split, randint, uniform): per user that is most of the cost.
    """
    k = spans.shape[0]
    bits = jax.random.bits(key, (3, k), jnp.uint32)  # (3, k)
    integers = scale_bits(bits[0], bits[1], spans.astype(jnp.uint32))
    floats = (bits[2] >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)  # multiples of 2**-24
    return integers.astype(jnp.int32), floats


def _epsilon_greedy_one(
    scores: jax.Array,
    allowed: jax.Array,
    blocked: jax.Array,
    epsilon: jax.Array,
    key: jax.Array,
    k: int,
) -> SlateResult:
    num_actions = scores.shape[0]
    assert allowed.shape == (num_actions,), (allowed.shape, scores.shape)
    assert blocked.ndim == 1, blocked.shape
    _, greedy_order = jax.lax.top_k(_masked(scores, allowed, blocked), k)  # (k,)
    ranks = _AllowedRanks(allowed)
    excluded = _blocked_ranks(ranks, allowed, blocked)  # (m,)
    greedy_ranks = jax.vmap(ranks.rank)(greedy_order)  # (k,)
    # Allowed actions left at each position: how many remain never depends on which were taken.
    remaining = ranks.count - jnp.sum(excluded != _NO_RANK) - jnp.arange(k)  # (k,)
    # So a uniform draw among them, a uniform rank in [0, remaining), is drawn for all positions at once.
    draws, coins = _uniform_draws(key, jnp.maximum(remaining, 1))  # (k,) each
    explore = coins < epsilon  # (k,)
    offsets = jnp.arange(excluded.shape[0] + k)  # (m + k,)

    def position(
        carry: tuple[jax.Array, jax.Array], i: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
        chosen, gone = carry  # (k,) actions so far (-1: empty); (m + k,) sorted ranks blocked or chosen
        taken = jnp.any(greedy_order[:, None] == chosen[None, :], axis=1)  # (k,)
        first = jnp.argmax(~taken)
        best, best_rank = greedy_order[first], greedy_ranks[first]
        # The draws[i]-th allowed action neither blocked nor chosen: skip the gone ranks in increasing
        # order. With gone ranks c_0 < c_1 < ..., c_j is skipped iff c_j - j <= draw, and c_j - j never
        # decreases, so the skipped ones are a prefix and only their count matters.
        random_rank = draws[i] + jnp.sum(gone - offsets <= draws[i])
        valid = remaining[i] > 0
        action = jnp.where(explore[i], ranks.action(random_rank), best)
        propensity = (1.0 - epsilon) * (action == best) + epsilon / jnp.maximum(remaining[i], 1)
        rank = jnp.where(valid, jnp.where(explore[i], random_rank, best_rank), _NO_RANK)
        action = jnp.where(valid, action, -1)
        propensity = jnp.where(valid, propensity, 0.0)
        explored = valid & (action != best)
        # Insert the new rank in order (cheaper than a sort per position); the last slot, always
        # _NO_RANK while fewer than m + k ranks are gone, falls off.
        slot = jnp.sum(gone < rank)
        shifted = jnp.concatenate([gone[:1], gone[:-1]])
        gone = jnp.where(offsets < slot, gone, jnp.where(offsets == slot, rank, shifted))
        return (chosen.at[i].set(action), gone), (action, propensity, explored)

    init = (jnp.full((k,), -1, jnp.int32), jnp.concatenate([excluded, jnp.full((k,), _NO_RANK, jnp.int32)]))
    _, (actions, propensities, explored) = jax.lax.scan(position, init, jnp.arange(k))
    return actions.astype(jnp.int32), propensities.astype(jnp.float32), explored


def _softmax_one(
    scores: jax.Array,
    allowed: jax.Array,
    blocked: jax.Array,
    temperature: jax.Array,
    key: jax.Array,
    k: int,
) -> SlateResult:
    num_actions = scores.shape[0]
    assert allowed.shape == (num_actions,), (allowed.shape, scores.shape)
    assert blocked.ndim == 1, blocked.shape
    logits = _masked(scores / temperature, allowed, blocked)  # (A,)
    _, greedy_order = jax.lax.top_k(logits, k)  # (k,)
    # Gumbel-top-k: the k largest of logits + Gumbel noise, in order, are distributed exactly as k
    # sequential softmax draws without replacement (Kool et al., ICML 2019), in one pass over A.
    perturbed = logits + jax.random.gumbel(key, (num_actions,))  # (A,), -inf stays -inf
    _, sampled = jax.lax.top_k(perturbed, k)  # (k,)
    num_allowed = jnp.sum(jnp.isfinite(logits))
    valid = jnp.arange(k) < num_allowed  # (k,)
    actions = jnp.where(valid, sampled, -1).astype(jnp.int32)  # (k,)
    # Position i normalises over the allowed actions not in actions[:i]: those never in the slate,
    # plus the slate's own from i on. Summed in log space, never as 1 - (chosen mass), which would
    # cancel catastrophically at low temperature.
    outside = logits.at[jnp.where(valid, sampled, num_actions)].set(-jnp.inf, mode="drop")  # (A,)
    log_rest = jax.nn.logsumexp(outside)
    slate_logits = jnp.where(valid, logits[sampled], -jnp.inf)  # (k,)
    log_norm = jnp.logaddexp(log_rest, jax.lax.cumlogsumexp(slate_logits, reverse=True))  # (k,)
    propensities = jnp.where(valid, jnp.exp(slate_logits - log_norm), 0.0)
    explored = valid & (actions != _best_remaining(greedy_order, actions))
    return actions, propensities.astype(jnp.float32), explored


_POLICIES: dict[str, Callable[..., SlateResult]] = {
    "epsilon": _epsilon_greedy_one,
    "softmax": _softmax_one,
}


def _no_blocked(scores: jax.Array) -> jax.Array:
    return jnp.full((*scores.shape[:-1], 1), -1, jnp.int32)


def _per_user(
    one: Callable[..., SlateResult],
    scores: jax.Array,
    allowed: jax.Array,
    blocked: jax.Array,
    parameter: jax.Array,
    keys: jax.Array,
    k: int,
) -> SlateResult:
    """vmap ``one`` over rows; a shared (A,) mask stays unbatched, so its counts are built once."""
    assert scores.ndim == 2, f"scores must be (B, A), got {scores.shape}"
    num_users, num_actions = scores.shape
    assert allowed.shape in ((num_actions,), scores.shape), (allowed.shape, scores.shape)
    blocked = jnp.broadcast_to(blocked, (num_users, blocked.shape[-1]))  # (B, m)
    parameter = jnp.broadcast_to(parameter, (num_users,))  # (B,)
    allowed_axis = None if allowed.ndim == 1 else 0
    return jax.vmap(functools.partial(one, k=k), in_axes=(0, allowed_axis, 0, 0, 0))(
        scores, allowed, blocked, parameter, keys
    )


def _batched(
    one: Callable[..., SlateResult],
    scores: jax.Array,
    allowed: jax.Array,
    parameter: jax.Array | float,
    key: jax.Array,
    k: int,
    blocked: jax.Array | None,
) -> SlateResult:
    _check_k(k, scores.shape[-1])
    allowed = jnp.asarray(allowed, bool)
    parameter = jnp.asarray(parameter, jnp.float32)
    blocked = _no_blocked(scores) if blocked is None else jnp.asarray(blocked, jnp.int32)
    if scores.ndim == 1:
        assert parameter.ndim == 0, f"a single slate takes a scalar parameter, got {parameter.shape}"
        return one(scores, allowed, blocked, parameter, key, k)
    keys = jax.random.split(key, scores.shape[0])
    return _per_user(one, scores, allowed, blocked, parameter, keys, k)


@functools.partial(jax.jit, static_argnames=("k",))
def epsilon_greedy_slate(
    scores: jax.Array,
    allowed: jax.Array,
    k: int,
    epsilon: jax.Array | float,
    key: jax.Array,
    blocked: jax.Array | None = None,
) -> SlateResult:
    """Epsilon-greedy slate: (actions (k,), propensities (k,), explored (k,)), or (B, k) each for (B, A).

    `explored` marks positions whose action is not the best remaining one.
    """
    return _batched(_epsilon_greedy_one, scores, allowed, epsilon, key, k, blocked)


@functools.partial(jax.jit, static_argnames=("k",))
def softmax_slate(
    scores: jax.Array,
    allowed: jax.Array,
    k: int,
    temperature: jax.Array | float,
    key: jax.Array,
    blocked: jax.Array | None = None,
) -> SlateResult:
    """Boltzmann slate at `temperature` (> 0): (actions, propensities, explored), as epsilon_greedy_slate."""
    return _batched(_softmax_one, scores, allowed, temperature, key, k, blocked)


@functools.partial(jax.jit, static_argnames=("k", "exploration"))
def user_slates(
    scores: jax.Array,
    allowed: jax.Array,
    blocked: jax.Array,
    keys: jax.Array,
    parameter: jax.Array | float,
    *,
    k: int,
    exploration: str,
) -> SlateResult:
    """One slate per row of scores (B, A), each with its own key (B,): (actions, propensities, explored).

    `allowed` is (A,) shared or (B, A); `blocked` (B, m) lists further actions per row (-1: unused).
    `exploration` is "epsilon" (parameter: epsilon) or "softmax" (parameter: temperature).
    """
    if exploration not in _POLICIES:
        raise ValueError(f"exploration must be one of {', '.join(_POLICIES)}, got {exploration!r}")
    _check_k(k, scores.shape[-1])
    parameter = jnp.asarray(parameter, jnp.float32)
    blocked = jnp.asarray(blocked, jnp.int32)
    return _per_user(_POLICIES[exploration], scores, jnp.asarray(allowed, bool), blocked, parameter, keys, k)


@functools.partial(jax.jit, static_argnames=("k",))
def greedy_top_k(scores: jax.Array, allowed: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k best allowed actions, best first: (actions (..., k), scores (..., k)); empty slots -1/-inf."""
    _check_k(k, scores.shape[-1])
    allowed = jnp.broadcast_to(jnp.asarray(allowed, bool), scores.shape)
    values, actions = jax.lax.top_k(jnp.where(allowed, scores, -jnp.inf), k)  # (..., k)
    num_allowed = jnp.sum(allowed, axis=-1, keepdims=True)  # (..., 1)
    filled = jnp.arange(k) < num_allowed  # (..., k)
    return jnp.where(filled, actions, -1).astype(jnp.int32), jnp.where(filled, values, -jnp.inf)

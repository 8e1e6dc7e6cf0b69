"""Slates of k distinct actions for the actor, each position with its exact propensity.

A slate is filled position by position from the allowed actions not yet shown. The propensity of
position i is the probability the policy had of choosing that action there, given positions 0..i-1:

- epsilon-greedy: with probability 1 - epsilon the best remaining allowed action, otherwise a
  uniformly random remaining allowed one, so P(a) = (1 - eps)·[a is best remaining] + eps / n_remaining;
- softmax: P(a) = exp(score_a / T) / sum over remaining allowed a' of exp(score_a' / T).

Off-policy evaluation and correction downstream divide by these numbers, so they are computed in
closed form, not estimated. Per position the propensities over all remaining choices sum to one.

All functions take scores (A,) or (B, A) and an `allowed` mask of the same shape (or (A,) shared by
all rows), jit with `k` static, and vmap over users. Scores must be finite. Positions beyond the
number of allowed actions are empty: action -1, propensity 0, not explored.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

SlateResult = tuple[jax.Array, jax.Array, jax.Array]


def _first_unchosen(order: jax.Array, chosen: jax.Array) -> jax.Array:
    """The first entry of `order` (k,) that is not in `chosen` (k,), where -1 marks empty slots."""
    taken = jnp.any(order[:, None] == chosen[None, :], axis=1)  # (k,)
    return order[jnp.argmax(~taken)]


def _check_k(k: int, num_actions: int) -> None:
    if not 1 <= k <= num_actions:
        raise ValueError(f"k must be in [1, {num_actions}] (the number of actions), got {k}")


def _epsilon_greedy_one(
    scores: jax.Array, allowed: jax.Array, epsilon: jax.Array, key: jax.Array, k: int
) -> SlateResult:
    num_actions = scores.shape[0]
    assert allowed.shape == (num_actions,), (allowed.shape, scores.shape)
    key_order, key_coin = jax.random.split(key)
    _, greedy_order = jax.lax.top_k(jnp.where(allowed, scores, -jnp.inf), k)  # (k,)
    # A uniformly random order of the allowed actions (disallowed sink to -1). Its first entry not yet
    # in the slate is a uniform draw from the remaining ones: the noise is exchangeable and the greedy
    # picks never look at it. Only the first k entries can ever be needed, so top_k suffices.
    noise = jnp.where(allowed, jax.random.uniform(key_order, (num_actions,)), -1.0)  # (A,)
    _, random_order = jax.lax.top_k(noise, k)  # (k,)
    explore = jax.random.uniform(key_coin, (k,)) < epsilon  # (k,)
    num_allowed = jnp.sum(allowed)

    def position(chosen: jax.Array, i: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        best = _first_unchosen(greedy_order, chosen)
        random_action = _first_unchosen(random_order, chosen)
        remaining = num_allowed - i
        valid = remaining > 0
        action = jnp.where(explore[i], random_action, best)
        propensity = (1.0 - epsilon) * (action == best) + epsilon / jnp.maximum(remaining, 1)
        action = jnp.where(valid, action, -1)
        propensity = jnp.where(valid, propensity, 0.0)
        explored = valid & (action != best)
        return chosen.at[i].set(action), (action, propensity, explored)

    empty = jnp.full((k,), -1, jnp.int32)
    _, (actions, propensities, explored) = jax.lax.scan(position, empty, jnp.arange(k))
    return actions.astype(jnp.int32), propensities.astype(jnp.float32), explored


def _softmax_one(
    scores: jax.Array, allowed: jax.Array, temperature: jax.Array, key: jax.Array, k: int
) -> SlateResult:
    num_actions = scores.shape[0]
    assert allowed.shape == (num_actions,), (allowed.shape, scores.shape)
    logits = jnp.where(allowed, scores / temperature, -jnp.inf)  # (A,)
    _, greedy_order = jax.lax.top_k(logits, k)  # (k,)
    # Gumbel-top-k: the k largest of logits + Gumbel noise, in order, are distributed exactly as k
    # sequential softmax draws without replacement (Kool et al., ICML 2019), in one pass over A.
    perturbed = jnp.where(allowed, logits + jax.random.gumbel(key, (num_actions,)), -jnp.inf)
    _, sampled_order = jax.lax.top_k(perturbed, k)  # (k,)
    num_allowed = jnp.sum(allowed)

    def position(
        carry: tuple[jax.Array, jax.Array], i: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
        chosen, remaining_mask = carry
        best = _first_unchosen(greedy_order, chosen)
        action = sampled_order[i]
        valid = num_allowed - i > 0
        # Normalise over what is left in log space: 1 - sum(chosen probabilities) would cancel
        # catastrophically at low temperature.
        log_norm = jax.nn.logsumexp(jnp.where(remaining_mask, logits, -jnp.inf))
        propensity = jnp.exp(logits[action] - log_norm)
        action = jnp.where(valid, action, -1)
        propensity = jnp.where(valid, propensity, 0.0)
        explored = valid & (action != best)
        remaining_mask = jnp.where(valid, remaining_mask.at[action].set(False), remaining_mask)
        return (chosen.at[i].set(action), remaining_mask), (action, propensity, explored)

    init = (jnp.full((k,), -1, jnp.int32), allowed)
    _, (actions, propensities, explored) = jax.lax.scan(position, init, jnp.arange(k))
    return actions.astype(jnp.int32), propensities.astype(jnp.float32), explored


def _batched(
    one: Callable[..., SlateResult],
    scores: jax.Array,
    allowed: jax.Array,
    parameter: jax.Array | float,
    key: jax.Array,
    k: int,
) -> SlateResult:
    _check_k(k, scores.shape[-1])
    allowed = jnp.asarray(allowed, bool)
    parameter = jnp.asarray(parameter, jnp.float32)
    if scores.ndim == 1:
        assert parameter.ndim == 0, f"a single slate takes a scalar parameter, got {parameter.shape}"
        return one(scores, allowed, parameter, key, k)
    assert scores.ndim == 2, f"scores must be (A,) or (B, A), got {scores.shape}"
    num_users = scores.shape[0]
    allowed = jnp.broadcast_to(allowed, scores.shape)  # (B, A)
    parameter = jnp.broadcast_to(parameter, (num_users,))  # (B,)
    keys = jax.random.split(key, num_users)
    return jax.vmap(functools.partial(one, k=k))(scores, allowed, parameter, keys)


@functools.partial(jax.jit, static_argnames=("k",))
def epsilon_greedy_slate(
    scores: jax.Array, allowed: jax.Array, k: int, epsilon: jax.Array | float, key: jax.Array
) -> SlateResult:
    """Epsilon-greedy slate: (actions (k,), propensities (k,), explored (k,)), or (B, k) each for (B, A).

    `explored` marks positions whose action is not the best remaining one.
    """
    return _batched(_epsilon_greedy_one, scores, allowed, epsilon, key, k)


@functools.partial(jax.jit, static_argnames=("k",))
def softmax_slate(
    scores: jax.Array, allowed: jax.Array, k: int, temperature: jax.Array | float, key: jax.Array
) -> SlateResult:
    """Boltzmann slate at `temperature` (> 0): (actions, propensities, explored), as epsilon_greedy_slate."""
    return _batched(_softmax_one, scores, allowed, temperature, key, k)


@functools.partial(jax.jit, static_argnames=("k",))
def greedy_top_k(scores: jax.Array, allowed: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k best allowed actions, best first: (actions (..., k), scores (..., k)); empty slots -1/-inf."""
    _check_k(k, scores.shape[-1])
    allowed = jnp.broadcast_to(jnp.asarray(allowed, bool), scores.shape)
    values, actions = jax.lax.top_k(jnp.where(allowed, scores, -jnp.inf), k)  # (..., k)
    num_allowed = jnp.sum(allowed, axis=-1, keepdims=True)  # (..., 1)
    filled = jnp.arange(k) < num_allowed  # (..., k)
    return jnp.where(filled, actions, -1).astype(jnp.int32), jnp.where(filled, values, -jnp.inf)

"""Exploration schedules as pure functions of the step, usable inside or outside jit.

The actor passes the current epsilon or temperature to `rl.slate`; keeping schedules pure (no hidden
counter) means a restarted actor resumes the same schedule from the model's step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _progress(step: jax.Array | int, decay_steps: int) -> jax.Array:
    """Fraction of the decay done, clipped to [0, 1]."""
    if decay_steps < 1:
        raise ValueError(f"decay_steps must be >= 1, got {decay_steps}")
    return jnp.clip(jnp.asarray(step, jnp.float32) / decay_steps, 0.0, 1.0)


def linear_epsilon(step: jax.Array | int, *, start: float, end: float, decay_steps: int) -> jax.Array:
    """Epsilon falling linearly from `start` at step 0 to `end` at `decay_steps`, then flat."""
    _check_probability("start", start)
    _check_probability("end", end)
    return start + (end - start) * _progress(step, decay_steps)


def exponential_epsilon(step: jax.Array | int, *, start: float, end: float, decay_steps: int) -> jax.Array:
    """Epsilon decaying geometrically from `start` to `end` (both > 0) over `decay_steps`, then flat.

    start * (end / start) ** (step / decay_steps): a constant ratio per step, hitting `end` exactly.
    """
    _check_probability("start", start)
    _check_probability("end", end)
    return _geometric(step, start=start, end=end, decay_steps=decay_steps)


def boltzmann_temperature(step: jax.Array | int, *, start: float, end: float, decay_steps: int) -> jax.Array:
    """Softmax temperature decaying geometrically from `start` to `end` (both > 0), then flat."""
    return _geometric(step, start=start, end=end, decay_steps=decay_steps)


def _geometric(step: jax.Array | int, *, start: float, end: float, decay_steps: int) -> jax.Array:
    if start <= 0 or end <= 0:
        raise ValueError(f"geometric decay needs start > 0 and end > 0, got {start}, {end}")
    return start * (end / start) ** _progress(step, decay_steps)


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")

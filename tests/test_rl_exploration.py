"""Exploration schedules: exact values at the ends and in the middle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.exploration import boltzmann_temperature, exponential_epsilon, linear_epsilon


def test_linear_epsilon() -> None:
    values = [float(linear_epsilon(step, start=1.0, end=0.1, decay_steps=100)) for step in (0, 50, 100, 1000)]
    np.testing.assert_allclose(values, [1.0, 0.55, 0.1, 0.1], rtol=1e-6)


def test_exponential_epsilon_is_geometric() -> None:
    values = [
        float(exponential_epsilon(step, start=0.8, end=0.05, decay_steps=10)) for step in (0, 5, 10, 20)
    ]
    np.testing.assert_allclose(values, [0.8, 0.2, 0.05, 0.05], rtol=1e-6)  # 0.2 = sqrt(0.8 * 0.05)


def test_boltzmann_temperature() -> None:
    values = [float(boltzmann_temperature(step, start=10.0, end=0.1, decay_steps=4)) for step in (0, 2, 4, 9)]
    np.testing.assert_allclose(values, [10.0, 1.0, 0.1, 0.1], rtol=1e-6)


def test_schedules_work_under_jit_with_traced_steps() -> None:
    schedule = jax.jit(lambda step: linear_epsilon(step, start=0.5, end=0.0, decay_steps=10))
    np.testing.assert_allclose(schedule(jnp.array([0, 5, 10])), [0.5, 0.25, 0.0])


def test_invalid_schedules() -> None:
    with pytest.raises(ValueError):
        linear_epsilon(0, start=1.5, end=0.1, decay_steps=10)
    with pytest.raises(ValueError):
        exponential_epsilon(0, start=0.5, end=0.0, decay_steps=10)
    with pytest.raises(ValueError):
        boltzmann_temperature(0, start=1.0, end=0.5, decay_steps=0)

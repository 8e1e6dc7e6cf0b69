"""Exact TD errors and Huber values on hand-made transitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.value_learning import (
    double_q_learning,
    double_q_learning_target,
    expected_sarsa_target,
    huber_loss,
    q_learning,
    q_learning_target,
)


def test_q_learning_non_terminal() -> None:
    # target = 1 + 0.5 * max(3, 4) = 3; q_tm1[1] = 2 -> td = 1
    td = q_learning(
        jnp.array([1.0, 2.0]), jnp.array(1), jnp.array(1.0), jnp.array(0.5), jnp.array([3.0, 4.0])
    )
    assert float(td) == 1.0


def test_q_learning_terminal_ignores_next_values() -> None:
    # discount 0: target = r = 1; q_tm1[0] = 1.5 -> td = -0.5, whatever q_t holds
    td = q_learning(
        jnp.array([1.5, 2.0]), jnp.array(0), jnp.array(1.0), jnp.array(0.0), jnp.array([1e6, -1e6])
    )
    assert float(td) == -0.5


def test_double_q_learning_selects_with_selector_and_rates_with_value() -> None:
    # selector argmax = 0, value[0] = 3: target = 1 + 0.5 * 3 = 2.5; q_tm1[1] = 2 -> td = 0.5.
    # Plain Q-learning on the value net would have used max = 4 (td = 1.0).
    td = double_q_learning(
        jnp.array([1.0, 2.0]),
        jnp.array(1),
        jnp.array(1.0),
        jnp.array(0.5),
        jnp.array([3.0, 4.0]),
        jnp.array([5.0, 1.0]),
    )
    assert float(td) == 0.5


def test_double_q_learning_terminal() -> None:
    td = double_q_learning(
        jnp.array([0.25, 2.0, -1.0]),
        jnp.array(2),
        jnp.array(-2.0),
        jnp.array(0.0),
        jnp.array([9.0, 9.0, 9.0]),
        jnp.array([0.0, 1.0, 0.0]),
    )
    assert float(td) == -1.0  # -2 - (-1)


def test_vmapped_batch_matches_per_transition_values() -> None:
    q_tm1 = jnp.array([[1.0, 2.0], [1.5, 2.0]])
    a_tm1 = jnp.array([1, 0])
    r_t = jnp.array([1.0, 1.0])
    discount_t = jnp.array([0.5, 0.0])
    q_t = jnp.array([[3.0, 4.0], [1e6, -1e6]])
    np.testing.assert_array_equal(jax.vmap(q_learning)(q_tm1, a_tm1, r_t, discount_t, q_t), [1.0, -0.5])
    np.testing.assert_array_equal(jax.vmap(q_learning_target)(r_t, discount_t, q_t), [3.0, 1.0])
    np.testing.assert_array_equal(jax.vmap(double_q_learning_target)(r_t, discount_t, q_t, -q_t), [2.5, 1.0])


def test_td_error_does_not_differentiate_through_the_target() -> None:
    def td_of_q_t(q_t: jax.Array) -> jax.Array:
        return q_learning(jnp.array([1.0, 2.0]), jnp.array(1), jnp.array(1.0), jnp.array(0.5), q_t)

    np.testing.assert_array_equal(jax.grad(td_of_q_t)(jnp.array([3.0, 4.0])), [0.0, 0.0])
    grad_q_tm1 = jax.grad(
        lambda q: q_learning(q, jnp.array(1), jnp.array(1.0), jnp.array(0.5), jnp.array([3.0, 4.0]))
    )(jnp.array([1.0, 2.0]))
    np.testing.assert_array_equal(grad_q_tm1, [0.0, -1.0])


def test_shapes_are_asserted() -> None:
    with pytest.raises(AssertionError):
        q_learning(jnp.ones((2, 2)), jnp.array(1), jnp.array(1.0), jnp.array(0.5), jnp.ones((2, 2)))
    with pytest.raises(AssertionError):
        q_learning(jnp.ones(2), jnp.array([1]), jnp.array(1.0), jnp.array(0.5), jnp.ones(2))
    with pytest.raises(AssertionError):
        double_q_learning(jnp.ones(2), jnp.array(1), jnp.array(1.0), jnp.array(0.5), jnp.ones(3), jnp.ones(2))


@pytest.mark.parametrize(
    ("x", "delta", "expected"),
    [
        (0.0, 1.0, 0.0),
        (0.5, 1.0, 0.125),  # 0.5 * 0.25
        (-1.0, 1.0, 0.5),
        (2.0, 1.0, 1.5),  # 0.5 + 1 * (2 - 1)
        (-3.0, 1.0, 2.5),
        (3.0, 2.0, 4.0),  # 0.5 * 4 + 2 * (3 - 2)
        (1.5, 2.0, 1.125),
    ],
)
def test_huber_loss_values(x: float, delta: float, expected: float) -> None:
    assert float(huber_loss(jnp.array(x), delta)) == expected


def test_huber_gradient_is_clipped_to_delta() -> None:
    grads = jax.vmap(jax.grad(lambda x: huber_loss(x, 1.0)))(jnp.array([-5.0, -0.5, 0.0, 0.5, 5.0]))
    np.testing.assert_array_equal(grads, [-1.0, -0.5, 0.0, 0.5, 1.0])


def test_expected_sarsa_target_weights_next_values_by_the_given_probabilities() -> None:
    # 1 + 0.5 * (0.25 * 2 + 0.75 * 4) = 2.75; max would give 1 + 0.5 * 4 = 3.
    q_t, probs = jnp.array([2.0, 4.0]), jnp.array([0.25, 0.75])
    assert float(expected_sarsa_target(jnp.array(1.0), jnp.array(0.5), q_t, probs)) == 2.75
    # At an episode's end (discount 0) the target is the reward alone.
    assert float(expected_sarsa_target(jnp.array(1.0), jnp.array(0.0), q_t, probs)) == 1.0

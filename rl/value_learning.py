"""TD errors for ONE transition, in rlax's naming (`q_tm1, a_tm1, r_t, discount_t, q_t`); callers vmap.

`discount_t` here is the full discount applied to the bootstrap, i.e. gamma * (1 - done): the learner
multiplies the 0/1 discount it stores in a TransitionBatch by gamma before calling these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _assert_transition_shapes(
    q_tm1: jax.Array, a_tm1: jax.Array, r_t: jax.Array, discount_t: jax.Array
) -> None:
    assert q_tm1.ndim == 1, f"q_tm1 must be (num_actions,), got {q_tm1.shape}"
    assert jnp.ndim(a_tm1) == 0, f"a_tm1 must be a scalar, got {jnp.shape(a_tm1)}"
    assert jnp.ndim(r_t) == 0, f"r_t must be a scalar, got {jnp.shape(r_t)}"
    assert jnp.ndim(discount_t) == 0, f"discount_t must be a scalar, got {jnp.shape(discount_t)}"


def q_learning(
    q_tm1: jax.Array, a_tm1: jax.Array, r_t: jax.Array, discount_t: jax.Array, q_t: jax.Array
) -> jax.Array:
    """Q-learning TD error: r_t + discount_t * max_a q_t[a] - q_tm1[a_tm1] (target not differentiated).

    Shapes: q_tm1 (A,), a_tm1 (), r_t (), discount_t (), q_t (A,); returns ().
    """
    _assert_transition_shapes(q_tm1, a_tm1, r_t, discount_t)
    assert q_t.shape == q_tm1.shape, (q_t.shape, q_tm1.shape)
    return q_learning_target(r_t, discount_t, q_t) - q_tm1[a_tm1]


def double_q_learning(
    q_tm1: jax.Array,
    a_tm1: jax.Array,
    r_t: jax.Array,
    discount_t: jax.Array,
    q_t_value: jax.Array,
    q_t_selector: jax.Array,
) -> jax.Array:
    """Double Q-learning TD error (van Hasselt et al., 2016): the selector picks, the value network rates.

    r_t + discount_t * q_t_value[argmax q_t_selector] - q_tm1[a_tm1]. Decoupling selection from
    evaluation removes max-operator overestimation. Shapes: q_tm1, q_t_value, q_t_selector (A,),
    a_tm1, r_t, discount_t (); returns ().
    """
    _assert_transition_shapes(q_tm1, a_tm1, r_t, discount_t)
    assert q_t_value.shape == q_tm1.shape, (q_t_value.shape, q_tm1.shape)
    assert q_t_selector.shape == q_tm1.shape, (q_t_selector.shape, q_tm1.shape)
    return double_q_learning_target(r_t, discount_t, q_t_value, q_t_selector) - q_tm1[a_tm1]


# The learner scores only the taken action of s_tm1 (see QNetwork.q_for_actions), so it needs the
# bootstrap target on its own; the TD errors above are these targets minus q_tm1[a_tm1].
def q_learning_target(r_t: jax.Array, discount_t: jax.Array, q_t: jax.Array) -> jax.Array:
    """Bootstrap target r_t + discount_t * max_a q_t[a], gradient stopped; q_t (A,) -> ()."""
    assert q_t.ndim == 1, f"q_t must be (num_actions,), got {q_t.shape}"
    return jax.lax.stop_gradient(r_t + discount_t * jnp.max(q_t))


def double_q_learning_target(
    r_t: jax.Array, discount_t: jax.Array, q_t_value: jax.Array, q_t_selector: jax.Array
) -> jax.Array:
    """Bootstrap target r_t + discount_t * q_t_value[argmax q_t_selector], gradient stopped -> ()."""
    assert q_t_value.ndim == 1, f"q_t_value must be (num_actions,), got {q_t_value.shape}"
    assert q_t_selector.shape == q_t_value.shape, (q_t_selector.shape, q_t_value.shape)
    return jax.lax.stop_gradient(r_t + discount_t * q_t_value[jnp.argmax(q_t_selector)])


def expected_sarsa_target(
    r_t: jax.Array, discount_t: jax.Array, q_t: jax.Array, probs_a_t: jax.Array
) -> jax.Array:
    """Bootstrap target r_t + discount_t * sum_a probs_a_t[a] q_t[a], gradient stopped -> ().

    rlax's expected SARSA target: the next state is valued under a distribution over its actions
    rather than at its best action. q_t, probs_a_t (A,); probs_a_t sums to one.
    """
    assert q_t.ndim == 1, f"q_t must be (num_actions,), got {q_t.shape}"
    assert probs_a_t.shape == q_t.shape, (probs_a_t.shape, q_t.shape)
    return jax.lax.stop_gradient(r_t + discount_t * jnp.dot(probs_a_t, q_t))


def huber_loss(x: jax.Array, delta: float = 1.0) -> jax.Array:
    """Huber loss, elementwise: x²/2 for |x| <= delta, delta·(|x| - delta/2) beyond.

    Quadratic near zero, linear in the tails, so one large reward surprise cannot blow up a step.
    """
    abs_x = jnp.abs(x)
    quadratic = jnp.minimum(abs_x, delta)
    # Same value as the piecewise form, written so the gradient is defined everywhere (as in rlax).
    linear = abs_x - quadratic
    return 0.5 * quadratic**2 + delta * linear

"""Off-policy value estimators from logged decisions: IPS, self-normalised IPS and doubly robust.

Each logged decision i has the reward r_i that followed the logged action, the logging policy's
probability p_i of that action (its propensity) and the target policy's probability pi_i of the same
action in the same context. With importance weights w_i = pi_i / p_i:

- IPS:   V = mean_i(w_i r_i)                                   (unbiased when p_i > 0 wherever pi_i > 0)
- SNIPS: V = sum_i(w_i r_i) / sum_i(w_i)                       (biased, consistent, lower variance)
- DR:    V = mean_i(v_hat_i + w_i (r_i - q_hat_i))             (unbiased if either the propensities or
                                                                the reward model are right)

where q_hat_i = r_hat(x_i, a_i) is a reward model's prediction for the logged action and
v_hat_i = sum_a pi(a | x_i) r_hat(x_i, a) its prediction of the target policy's reward.

Confidence intervals use the normal approximation (central limit theorem): IPS and DR are means of
independent terms, so their standard error is the sample standard deviation of the terms over
sqrt(n); SNIPS is a ratio of means, so its standard error comes from the delta method,
sqrt(mean(w_i^2 (r_i - V)^2) / mean(w_i)^2 / n). With heavy-tailed weights (a small effective sample
size) the normal approximation is optimistic: read the ESS beside each interval.

The effective sample size of the weights is ESS = (sum_i w_i)^2 / sum_i w_i^2: n when the target
policy equals the logging policy, far less when a few decisions carry most of the weight.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

ESTIMATORS = ("ips", "snips", "dr")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A policy value estimate with its normal-approximation confidence interval."""

    value: float
    """Estimated expected reward per decision under the target policy."""
    stderr: float
    """Estimated standard error of `value`."""
    ci_low: float
    """Lower end of the confidence interval."""
    ci_high: float
    """Upper end of the confidence interval."""


@dataclasses.dataclass(frozen=True)
class OpeResult:
    """All three estimates for one target policy, with the weights' effective sample size."""

    ips: Estimate
    snips: Estimate
    dr: Estimate
    effective_sample_size: float
    """(sum w)^2 / sum w^2 of the importance weights."""
    samples: int
    """Logged decisions used."""
    max_weight: float
    """Largest importance weight (a huge one means the intervals are not to be trusted)."""

    def estimates(self) -> dict[str, Estimate]:
        return {"ips": self.ips, "snips": self.snips, "dr": self.dr}


def normal_quantile(confidence: float) -> float:
    """Two-sided standard-normal quantile z with P(|Z| <= z) = confidence (e.g. 0.95 -> 1.95996)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    # Invert erf by bisection: exact enough (1e-12) and needs nothing beyond the standard library.
    low, high = 0.0, 40.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if math.erf(mid / math.sqrt(2.0)) < confidence:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def importance_weights(target_probs: np.ndarray, propensities: np.ndarray) -> np.ndarray:
    """w = pi / p, (N,); propensities must be in (0, 1] and target probabilities in [0, 1]."""
    target_probs = np.asarray(target_probs, np.float64)
    propensities = np.asarray(propensities, np.float64)
    assert target_probs.shape == propensities.shape and target_probs.ndim == 1, (
        target_probs.shape,
        propensities.shape,
    )
    if np.any(propensities <= 0) or np.any(propensities > 1) or np.isnan(propensities).any():
        raise ValueError("propensities must be in (0, 1]; a zero propensity cannot be re-weighted")
    if np.any(target_probs < 0) or np.any(target_probs > 1) or np.isnan(target_probs).any():
        raise ValueError("target probabilities must be in [0, 1]")
    return target_probs / propensities


def _mean_estimate(terms: np.ndarray, z: float) -> Estimate:
    value = float(terms.mean())
    stderr = float(terms.std(ddof=1) / math.sqrt(terms.size)) if terms.size > 1 else float("inf")
    return Estimate(value, stderr, value - z * stderr, value + z * stderr)


def ips(rewards: np.ndarray, weights: np.ndarray, z: float) -> Estimate:
    """Inverse propensity scoring: mean(w r)."""
    return _mean_estimate(np.asarray(weights) * np.asarray(rewards), z)


def snips(rewards: np.ndarray, weights: np.ndarray, z: float) -> Estimate:
    """Self-normalised IPS: sum(w r) / sum(w), delta-method standard error."""
    rewards = np.asarray(rewards, np.float64)
    weights = np.asarray(weights, np.float64)
    total = weights.sum()
    if total <= 0:
        # The target policy never takes a logged action: nothing in the log speaks for it.
        return Estimate(float("nan"), float("inf"), float("-inf"), float("inf"))
    value = float((weights * rewards).sum() / total)
    n = rewards.size
    mean_weight = total / n
    variance = float(np.mean(weights**2 * (rewards - value) ** 2) / mean_weight**2 / n)
    stderr = math.sqrt(variance) if n > 1 else float("inf")
    return Estimate(value, stderr, value - z * stderr, value + z * stderr)


def doubly_robust(
    rewards: np.ndarray,
    weights: np.ndarray,
    reward_model_logged: np.ndarray,
    reward_model_target: np.ndarray,
    z: float,
) -> Estimate:
    """Doubly robust: mean(v_hat + w (r - q_hat)); see the module docstring for q_hat and v_hat."""
    terms = np.asarray(reward_model_target, np.float64) + np.asarray(weights, np.float64) * (
        np.asarray(rewards, np.float64) - np.asarray(reward_model_logged, np.float64)
    )
    return _mean_estimate(terms, z)


def effective_sample_size(weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2; 0 when every weight is 0."""
    weights = np.asarray(weights, np.float64)
    squares = float((weights**2).sum())
    return float(weights.sum() ** 2 / squares) if squares > 0 else 0.0


def evaluate_policy(
    rewards: np.ndarray,
    propensities: np.ndarray,
    target_probs: np.ndarray,
    reward_model_logged: np.ndarray,
    reward_model_target: np.ndarray,
    *,
    confidence: float = 0.95,
) -> OpeResult:
    """IPS, SNIPS and DR estimates of a target policy's value from N logged decisions (all (N,))."""
    rewards = np.asarray(rewards, np.float64)
    n = rewards.shape[0]
    assert rewards.shape == (n,), rewards.shape
    for name, array in (
        ("propensities", propensities),
        ("target_probs", target_probs),
        ("reward_model_logged", reward_model_logged),
        ("reward_model_target", reward_model_target),
    ):
        assert np.shape(array) == (n,), f"{name} has shape {np.shape(array)}, expected ({n},)"
    if n == 0:
        raise ValueError("no logged decisions to estimate from")
    z = normal_quantile(confidence)
    weights = importance_weights(target_probs, propensities)  # (N,)
    return OpeResult(
        ips=ips(rewards, weights, z),
        snips=snips(rewards, weights, z),
        dr=doubly_robust(rewards, weights, reward_model_logged, reward_model_target, z),
        effective_sample_size=effective_sample_size(weights),
        samples=n,
        max_weight=float(weights.max()),
    )

"""`qrec evaluate --ope FILE`: estimate candidate policies' value from recorded recommendations.

Input: JSONL as `qrec record` writes it, of the transitions topic (recommendation transitions carry
rec_id, position, propensity and reward), or of the recommendations topic together with the
clickstream (one file or several, comma-separated): those are joined by the state-builder's own
attribution logic into the same per-slot transitions. Each shown slot is one logged decision: the
item at that position, the probability the logging policy gave it there, and the reward it earned.

Candidate policies, all defined from the log alone:
- ``logging``: the logging policy itself (weights 1; the estimate is the logged mean reward, a check),
- ``uniform``: every position drawn uniformly from the catalogue (every item seen in the log),
- ``popularity``: epsilon-greedy popularity: position k shows the k-th most popular item with
  probability 1 - epsilon, a uniformly drawn catalogue item otherwise. Popularity counts the item
  of each recommendation's triggering interaction (the last item of its state).

The doubly robust estimator's reward model is each item's mean slot reward in the log (the global
mean for items never shown). Estimates are written as Prometheus text (``--metrics-file``) for
node_exporter's textfile collector: ``qrec_ope_value``, ``qrec_ope_ci_low``, ``qrec_ope_ci_high``,
``qrec_ope_stderr`` (labels ``policy``, ``estimator``), ``qrec_ope_effective_sample_size`` and
``qrec_ope_decisions`` (label ``policy``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from rich.console import Console
from rich.table import Table

from rl.ope import ESTIMATORS, OpeResult, evaluate_policy
from schemas.messages import ClickEvent, Recommendation, Transition
from services.evaluate.config import EvaluateConfig
from services.state_builder.partition import Emitted, PartitionState
from services.state_builder.step import StepParams


@dataclass(frozen=True)
class Decision:
    """One shown slot: what was shown where, with which probability, and what it earned."""

    item_id: str
    position: int
    propensity: float
    reward: float
    context_item: str | None
    """Item of the interaction that triggered the recommendation (None when unknown)."""


@dataclass
class RecordedLog:
    """Decisions read from recorded files, and the lines that could not be used."""

    decisions: list[Decision]
    errors: list[str]


def read_recorded(paths: Sequence[Path], params: StepParams | None = None) -> RecordedLog:
    """Decisions from recorded JSONL files (transitions, or recommendations plus click events)."""
    transitions: list[Transition] = []
    events: list[ClickEvent] = []
    recommendations: list[Recommendation] = []
    errors: list[str] = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no such recorded file: {path}")
        with path.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                message = _decode(line)
                if isinstance(message, str):
                    errors.append(f"{path.name}:{number}: {message}")
                elif isinstance(message, Transition):
                    transitions.append(message)
                elif isinstance(message, Recommendation):
                    recommendations.append(message)
                else:
                    events.append(message)
    if recommendations:
        transitions.extend(_join(events, recommendations, params or StepParams()))
    decisions = []
    for transition in transitions:
        if transition.source != "recommendation":
            continue
        if transition.propensity is None or transition.position is None:
            errors.append(f"transition {transition.transition_id}: no propensity or position")
            continue
        if transition.propensity <= 0:
            errors.append(f"transition {transition.transition_id}: propensity 0 cannot be re-weighted")
            continue
        recent = transition.obs_tm1.recent_items
        decisions.append(
            Decision(
                item_id=transition.a_tm1,
                position=transition.position,
                propensity=transition.propensity,
                reward=transition.r_t,
                context_item=recent[-1] if recent else None,
            )
        )
    return RecordedLog(decisions, errors)


def _decode(line: bytes) -> Transition | Recommendation | ClickEvent | str:
    try:
        keys = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        return f"not JSON ({exc})"
    if not isinstance(keys, dict):
        return "not a JSON object"
    kind: type[Transition] | type[Recommendation] | type[ClickEvent]
    if "transition_id" in keys:
        kind = Transition
    elif "rec_id" in keys and "items" in keys:
        kind = Recommendation
    elif "event_id" in keys:
        kind = ClickEvent
    else:
        return "neither a Transition, a Recommendation nor a ClickEvent"
    try:
        return msgspec.json.decode(line, type=kind)
    except msgspec.ValidationError as exc:
        return f"invalid {kind.__name__}: {exc}"


def _join(
    events: Iterable[ClickEvent], recommendations: Iterable[Recommendation], params: StepParams
) -> list[Transition]:
    """Recommendation transitions, from the state-builder's attribution join in event-time order."""
    params = StepParams(
        window=params.window,
        session_gap_seconds=params.session_gap_seconds,
        attribution_window_seconds=params.attribution_window_seconds,
        logged_transitions=False,
        recommendation_transitions=True,
    )
    # At equal times the triggering event comes before the recommendation it caused.
    inputs: list[tuple[int, int, int, ClickEvent | Recommendation]] = []
    for index, event in enumerate(events):
        inputs.append((event.timestamp, 0, index, event))
    for index, rec in enumerate(recommendations):
        inputs.append((rec.event_timestamp, 1, index, rec))
    inputs.sort(key=lambda item: item[:3])
    partition = PartitionState(0, params)
    emitted = Emitted()
    for *_, message in inputs:
        if isinstance(message, ClickEvent):
            partition.event(message, None, emitted)
        else:
            partition.recommendation(message, None, emitted)
    # Close every pending slate: past every attribution window and session end.
    partition.watermark_ms += int(
        (max(params.attribution_window_seconds, params.session_gap_seconds) + 1) * 1000
    )
    partition.sweep(emitted)
    return [t for t in emitted.transitions if t.source == "recommendation"]


def policy_probabilities(
    decisions: Sequence[Decision], policy: str, epsilon: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target probabilities, reward model on the logged item, reward model under the policy), (N,) each."""
    items = sorted({d.item_id for d in decisions} | {d.context_item for d in decisions if d.context_item})
    catalogue_size = len(items)
    rewards = np.asarray([d.reward for d in decisions], np.float64)
    global_mean = float(rewards.mean())
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for decision in decisions:
        totals[decision.item_id][0] += decision.reward
        totals[decision.item_id][1] += 1.0

    def reward_model(item: str) -> float:
        total, count = totals.get(item, (0.0, 0.0))
        return total / count if count else global_mean

    logged_model = np.asarray([reward_model(d.item_id) for d in decisions], np.float64)  # (N,)
    if policy == "logging":
        return np.asarray([d.propensity for d in decisions], np.float64), logged_model, logged_model
    catalogue_mean = float(np.mean([reward_model(item) for item in items]))
    if policy == "uniform":
        probs = np.full((len(decisions),), 1.0 / catalogue_size)
        return probs, logged_model, np.full((len(decisions),), catalogue_mean)
    if policy == "popularity":
        counts = Counter(d.context_item for d in decisions if d.context_item)
        ranked = sorted(items, key=lambda item: (-counts.get(item, 0), item))
        probs = np.empty((len(decisions),), np.float64)
        target_model = np.empty((len(decisions),), np.float64)
        for row, decision in enumerate(decisions):
            top = ranked[decision.position] if decision.position < len(ranked) else None
            greedy = 1.0 if decision.item_id == top else 0.0
            probs[row] = (1.0 - epsilon) * greedy + epsilon / catalogue_size
            top_reward = reward_model(top) if top is not None else catalogue_mean
            target_model[row] = (1.0 - epsilon) * top_reward + epsilon * catalogue_mean
        return probs, logged_model, target_model
    raise ValueError(f"unknown OPE policy {policy!r}")


def estimate(
    decisions: Sequence[Decision], policies: Sequence[str], epsilon: float, confidence: float
) -> dict[str, OpeResult]:
    """IPS / SNIPS / DR for each candidate policy."""
    if not decisions:
        raise ValueError("the recorded log holds no recommendation decisions with propensities")
    rewards = np.asarray([d.reward for d in decisions], np.float64)
    propensities = np.asarray([d.propensity for d in decisions], np.float64)
    out = {}
    for policy in policies:
        probs, logged_model, target_model = policy_probabilities(decisions, policy, epsilon)
        out[policy] = evaluate_policy(
            rewards, propensities, probs, logged_model, target_model, confidence=confidence
        )
    return out


def export_metrics(
    results: dict[str, OpeResult], path: Path, registry: CollectorRegistry | None = None
) -> None:
    """Write the estimates as Prometheus text exposition format (atomically, as textfile wants)."""
    registry = registry or CollectorRegistry()
    labels = ["policy", "estimator"]
    value = Gauge("qrec_ope_value", "Estimated reward per decision of a policy", labels, registry=registry)
    low = Gauge(
        "qrec_ope_ci_low", "Lower end of the estimate's confidence interval", labels, registry=registry
    )
    high = Gauge(
        "qrec_ope_ci_high", "Upper end of the estimate's confidence interval", labels, registry=registry
    )
    stderr = Gauge("qrec_ope_stderr", "Standard error of the estimate", labels, registry=registry)
    ess = Gauge(
        "qrec_ope_effective_sample_size",
        "Effective sample size of the importance weights",
        ["policy"],
        registry=registry,
    )
    decisions = Gauge(
        "qrec_ope_decisions", "Logged decisions the estimate used", ["policy"], registry=registry
    )
    for policy, result in results.items():
        for name, est in result.estimates().items():
            value.labels(policy, name).set(est.value)
            low.labels(policy, name).set(est.ci_low)
            high.labels(policy, name).set(est.ci_high)
            stderr.labels(policy, name).set(est.stderr)
        ess.labels(policy).set(result.effective_sample_size)
        decisions.labels(policy).set(result.samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)


def run_ope(config: EvaluateConfig, console: Console | None = None) -> dict[str, Any]:
    """Read the recorded files, estimate every candidate policy, print, export, return as a dict."""
    console = console or Console(stderr=True)
    assert config.ope is not None
    paths = [Path(part.strip()) for part in config.ope.split(",") if part.strip()]
    recorded = read_recorded(paths)
    for error in recorded.errors[:10]:
        console.print(f"[yellow]skipped[/] {error}")
    if len(recorded.errors) > 10:
        console.print(f"[yellow]skipped[/] {len(recorded.errors) - 10} more unusable lines")
    results = estimate(recorded.decisions, config.ope_policy_names(), config.ope_epsilon, config.confidence)
    out: dict[str, Any] = {"ope": {}, "decisions": len(recorded.decisions), "skipped": len(recorded.errors)}
    table = Table(
        title=f"off-policy estimates ({len(recorded.decisions):,} shown slots, {config.confidence:.0%} CI)"
    )
    for column in ("policy", *ESTIMATORS, "ESS", "max weight"):
        table.add_column(column, justify="right" if column != "policy" else "left")
    for policy, result in results.items():
        entry: dict[str, Any] = {
            name: {"value": e.value, "stderr": e.stderr, "ci_low": e.ci_low, "ci_high": e.ci_high}
            for name, e in result.estimates().items()
        }
        entry["effective_sample_size"] = result.effective_sample_size
        entry["max_weight"] = result.max_weight
        entry["decisions"] = result.samples
        out["ope"][policy] = entry
        cells = [f"{e.value:.4f} [{e.ci_low:.4f}, {e.ci_high:.4f}]" for e in result.estimates().values()]
        table.add_row(policy, *cells, f"{result.effective_sample_size:,.1f}", f"{result.max_weight:,.1f}")
    if not config.json:
        console.print(table)
    if config.metrics_file:
        export_metrics(results, Path(config.metrics_file))
        if not config.json:
            console.print(f"metrics written to {config.metrics_file}")
    return out

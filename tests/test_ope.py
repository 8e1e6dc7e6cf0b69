"""Off-policy estimators: exact values on a hand-made log, coverage on simulated bandit logs, and
`qrec evaluate --ope` on recorded transitions and on recommendations joined with clicks."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rl.ope import effective_sample_size, evaluate_policy, normal_quantile
from schemas.messages import ClickEvent, Observation, Recommendation, RecommendedItem, Transition
from services.cli import main
from services.evaluate.config import EvaluateConfig
from services.evaluate.ope import read_recorded, run_ope

REWARDS = np.array([1.0, 0.0, 1.0, 0.0])
PROPENSITIES = np.array([0.5, 0.25, 0.5, 0.8])
TARGET = np.array([1.0, 0.5, 0.25, 0.0])  # weights 2, 2, 0.5, 0
Q_HAT = np.array([0.5, 0.5, 0.5, 0.5])
V_HAT = np.array([0.6, 0.6, 0.6, 0.6])


def test_estimators_match_a_direct_computation():
    result = evaluate_policy(REWARDS, PROPENSITIES, TARGET, Q_HAT, V_HAT, confidence=0.95)
    assert result.ips.value == pytest.approx(2.5 / 4)  # (2*1 + 2*0 + 0.5*1 + 0) / 4
    assert result.snips.value == pytest.approx(2.5 / 4.5)  # sum(w r) / sum(w)
    assert result.dr.value == pytest.approx((1.6 - 0.4 + 0.85 + 0.6) / 4)  # 0.6 + w (r - 0.5)
    assert result.effective_sample_size == pytest.approx(4.5**2 / 8.25)
    assert result.max_weight == 2.0
    # IPS terms 2, 0, 0.5, 0: sample variance 2.6875 / 3.
    ips_stderr = math.sqrt(2.6875 / 3) / 2
    assert result.ips.stderr == pytest.approx(ips_stderr)
    assert result.ips.ci_low == pytest.approx(0.625 - 1.959964 * ips_stderr, rel=1e-6)
    # SNIPS delta method: mean(w^2 (r - V)^2) / mean(w)^2 / n.
    v = 2.5 / 4.5
    snips_var = np.mean(np.array([4, 4, 0.25, 0]) * (REWARDS - v) ** 2) / (4.5 / 4) ** 2 / 4
    assert result.snips.stderr == pytest.approx(math.sqrt(snips_var))


def test_normal_quantile_and_ess():
    assert normal_quantile(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert normal_quantile(0.99) == pytest.approx(2.575829, abs=1e-6)
    assert effective_sample_size(np.ones(7)) == pytest.approx(7.0)
    assert effective_sample_size(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="propensities"):
        evaluate_policy(REWARDS, np.array([0.5, 0.0, 0.5, 0.5]), TARGET, Q_HAT, V_HAT)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_simulated_bandit_value_is_inside_the_interval(seed):
    """A 5-armed Bernoulli bandit logged by a softmax policy; the target policy's true value is known."""
    rng = np.random.default_rng(seed)
    mean_reward = np.array([0.1, 0.3, 0.5, 0.2, 0.05])
    logging = np.exp(np.array([0.5, 0.0, -0.5, 0.2, 0.1]))
    logging /= logging.sum()
    target = np.array([0.05, 0.15, 0.6, 0.15, 0.05])
    truth = float(target @ mean_reward)  # 0.36
    n = 20_000
    actions = rng.choice(5, size=n, p=logging)
    rewards = (rng.random(n) < mean_reward[actions]).astype(np.float64)
    # A deliberately biased reward model: DR must still be right, because the propensities are.
    model = mean_reward + 0.1
    result = evaluate_policy(
        rewards,
        logging[actions],
        target[actions],
        model[actions],
        np.full(n, float(target @ model)),
        confidence=0.99,
    )
    for name, estimate in result.estimates().items():
        assert estimate.ci_low <= truth <= estimate.ci_high, (name, estimate, truth)
        assert estimate.ci_high - estimate.ci_low < 0.06, (name, estimate)  # informative, not vacuous
    # The target is far from the logging policy: the weights are uneven, the ESS well below n.
    assert 0.2 * n < result.effective_sample_size < 0.9 * n


def _obs(items: list[str]) -> Observation:
    return Observation(
        recent_items=items,
        recent_event_types=["view"] * len(items),
        recent_gaps_seconds=[0.0] * len(items),
        features=[0.0] * 61,
    )


def _transition(i: int, item: str, position: int, propensity: float, reward: float) -> Transition:
    return Transition(
        transition_id=f"rec-{i}:{position}",
        user_id=f"u{i}",
        source="recommendation",
        obs_tm1=_obs(["ctx"]),
        a_tm1=item,
        r_t=reward,
        obs_t=_obs(["ctx"]),
        done=False,
        timestamp=1_700_000_000_000 + i,
        rec_id=f"rec-{i}",
        position=position,
        propensity=propensity,
        policy="dqn",
        model_version=1,
    )


def _write_jsonl(path: Path, messages: list[msgspec.Struct]) -> None:
    path.write_bytes(b"".join(msgspec.json.encode(m) + b"\n" for m in messages))


def test_ope_command_on_recorded_transitions_exports_metrics(tmp_path, capsys):
    recorded = tmp_path / "transitions.jsonl"
    transitions = [
        _transition(0, "a", 0, 0.5, 1.0),
        _transition(1, "b", 0, 0.25, 0.0),
        _transition(2, "a", 1, 0.5, 3.0),
        _transition(3, "c", 1, 0.8, 0.0),
    ]
    _write_jsonl(recorded, transitions)
    with recorded.open("ab") as handle:
        handle.write(b"{not json\n")
    metrics_file = tmp_path / "ope.prom"
    code = main(
        ["evaluate", "--ope", str(recorded), "--metrics-file", str(metrics_file), "--json", "--no-progress"]
    )
    assert code == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["decisions"] == 4 and result["skipped"] == 1
    logging = result["ope"]["logging"]
    # The logging policy re-weighted by itself: every estimator gives the mean logged reward.
    for name in ("ips", "snips", "dr"):
        assert logging[name]["value"] == pytest.approx(1.0)
    assert logging["effective_sample_size"] == pytest.approx(4.0)
    # Uniform over the catalogue {a, b, c, ctx}: pi = 1/4, so IPS = mean(r / (4 p)).
    uniform = result["ope"]["uniform"]["ips"]["value"]
    assert uniform == pytest.approx(np.mean([1.0 / (4 * 0.5), 0.0, 3.0 / (4 * 0.5), 0.0]))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics_file.read_text())
        for s in family.samples
    }
    assert samples[("qrec_ope_value", (("estimator", "ips"), ("policy", "uniform")))] == pytest.approx(
        uniform
    )
    assert samples[("qrec_ope_effective_sample_size", (("policy", "logging"),))] == pytest.approx(4.0)
    assert samples[("qrec_ope_decisions", (("policy", "popularity"),))] == 4


def test_recommendations_are_joined_with_the_clicks_that_follow(tmp_path):
    t0 = 1_700_000_000_000
    view = ClickEvent(
        event_id="e1", user_id="u1", session_id="s1", event_type="view", timestamp=t0, item_id="x"
    )
    rec = Recommendation(
        rec_id="rec-e1",
        user_id="u1",
        items=[
            RecommendedItem(item_id="a", score=1.0, propensity=0.9),
            RecommendedItem(item_id="b", score=0.5, propensity=0.05, explored=True),
        ],
        policy="dqn",
        model_version=3,
        explored=True,
        source_event_id="e1",
        event_timestamp=t0,
        created_at=t0 + 5,
    )
    click = ClickEvent(
        event_id="e2", user_id="u1", session_id="s1", event_type="click", timestamp=t0 + 60_000, item_id="b"
    )
    recorded = tmp_path / "recs_and_clicks.jsonl"
    _write_jsonl(recorded, [view, rec, click])
    log = read_recorded([recorded])
    assert log.errors == []
    by_item = {d.item_id: d for d in log.decisions}
    assert set(by_item) == {"a", "b"}
    assert by_item["a"].reward == 0.0 and by_item["a"].position == 0 and by_item["a"].propensity == 0.9
    assert by_item["b"].reward == 1.0 and by_item["b"].position == 1 and by_item["b"].propensity == 0.05
    assert by_item["b"].context_item == "x"
    result = run_ope(EvaluateConfig(ope=str(recorded), json=True, progress=False))
    # Logging policy: mean reward 0.5; uniform over {a, b, x}: IPS = mean(r / (3 p)).
    assert result["ope"]["logging"]["ips"]["value"] == pytest.approx(0.5)
    assert result["ope"]["uniform"]["ips"]["value"] == pytest.approx((0 + 1 / (3 * 0.05)) / 2)


def test_ope_without_decisions_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "events.jsonl"
    _write_jsonl(
        empty,
        [ClickEvent(event_id="e1", user_id="u", session_id="s", event_type="view", timestamp=1, item_id="x")],
    )
    assert main(["evaluate", "--ope", str(empty), "--no-progress"]) == 2
    assert "no recommendation decisions" in capsys.readouterr().err

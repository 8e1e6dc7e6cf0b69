"""The closed-loop demo: simulated shoppers through every service, ending in a report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax.serialization import msgpack_restore
from prometheus_client import CollectorRegistry
from rich.console import Console

from rl.batch import ObsBatch
from rl.networks import NetworkConfig, QNetwork, init_params
from rl.serialize import tree_from_bytes
from schemas.codec import encode
from schemas.messages import Observation, Transition
from services.bus.embedded import EmbeddedBus
from services.config import ConfigError
from services.demo import (
    DemoConfig,
    DemoMetrics,
    Window,
    _results,
    pool_runs,
    ratio_interval,
    run_demo,
    sparkline,
)
from services.learner.config import LearnerServiceConfig, parse_sources
from services.learner.service import Learner
from services.learner.trainer import Trainer, learner_config_for, load_bundle, serving_params
from services.state_builder.step import FEATURE_DIM
from services.topics import SOURCE_HEADER

GROUPS = {"dqn", "popularity", "bandit", "tabular_q", "random", "oracle"}
PER_POLICY = {
    "ctr",
    "conversion",
    "reward_per_session",
    "reward_per_session_se",
    "sessions",
    "slate_value_vs_oracle",
}
EXPOSURE = {"coverage", "item_gini", "brand_gini", "popularity_bias"}


@pytest.mark.timeout(600)
def test_short_demo_closes_the_loop_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    config = DemoConfig(
        hours=0.5,
        shoppers=150,
        items=300,
        sessions_per_minute=20,
        report_every_minutes=10,
        out=str(out),
        live=False,
    )
    data = run_demo(config, Console(file=open(tmp_path / "console.txt", "w"), width=120))  # noqa: SIM115
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(data))
    assert summary["events"] > 1000
    policies = summary["policies"]
    assert set(policies) == GROUPS
    for name, numbers in policies.items():
        assert set(numbers) >= PER_POLICY | EXPOSURE, name
        assert numbers["sessions"] > 0 and numbers["recommendations"] > 0, name
        assert 0.0 <= numbers["ctr"] <= 1.0 and 0.0 < numbers["coverage"] <= 1.0, name
    assert policies["oracle"]["reward_per_session"] > policies["random"]["reward_per_session"]
    assert policies["oracle"]["reward_per_session_se"] > 0.0
    for name, (low, high) in summary["reward_per_session_ratio_ci95"].items():
        assert low < summary["reward_per_session_ratio"][name] < high, name
    # Measured against the oracle's slate for the same shopper and moment, leaving out the same
    # items: the oracle's own slates score about 1 (not exactly: the actor ranked at the time of the
    # shopper's event, the shopper saw the slate up to a tick later), random slates far less.
    assert policies["oracle"]["slate_value_vs_oracle"] == pytest.approx(1.0, abs=0.05)
    assert 0.0 < policies["random"]["slate_value_vs_oracle"] < 0.2
    assert policies["popularity"]["slate_value_vs_oracle"] > policies["random"]["slate_value_vs_oracle"]
    labels = summary["recommendations_by_label"]
    assert {"oracle", "popularity", "random"} <= set(labels), "every recommendation carries its policy"
    assert "tabular_q" in labels, "the tabular learner published a table the actor served"
    assert summary["model_version"] >= 1, "the learner published during the run"
    assert summary["bandit_updates"] > 0 and summary["tabular_updates"] > 0
    assert len(summary["windows"]) == 3
    html = (out / "report.html").read_text()
    for name in (
        "ctr_by_policy.png",
        "reward_by_policy.png",
        "learning_curve.png",
        "exploration.png",
        "exposure.png",
        "clickbait_by_policy.png",  # the demo's shop has clickbait
    ):
        assert (out / name).stat().st_size > 1000
    assert html.count("data:image/png;base64,") == 6, "the page is self-contained"
    assert "Exposure and fairness" in html and "popularity bias" in html
    assert "slate value / oracle" in html
    # The demo's shop has clickbait: the page says how much and how often each policy showed it.
    assert "clickbait slots" in html and "20% of the catalogue here" in html
    assert 0.0 < policies["oracle"]["clickbait_exposure"] < 1.0
    # Per window, the share of each group's slots that held clickbait; over the late windows their
    # slots make up the late-phase exposure.
    late = [w for w in summary["windows"] if w["minute"] > summary["late_phase_from_minute"]]
    assert all(0.0 <= share <= 1.0 for w in summary["windows"] for share in w["clickbait_share"].values())
    assert {"oracle", "random"} <= set(late[-1]["clickbait_share"])


@pytest.mark.timeout(400)
def test_quick_json_prints_only_the_summary(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "services.cli", "demo", "--quick", "--json", "--quick-hours", "0.1"]
    command += ["--shoppers", "60", "--items", "200", "--report-every-minutes", "3", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=390, check=True)
    data = json.loads(result.stdout)  # nothing else on stdout
    assert set(data["policies"]) == GROUPS
    for numbers in data["policies"].values():
        assert set(numbers) >= PER_POLICY
    assert not list(tmp_path.iterdir()), "--json writes no report"


def test_demo_metrics_carry_only_a_policy_label() -> None:
    registry = CollectorRegistry()
    metrics = DemoMetrics(registry)
    numbers = {
        "ctr": 0.25,
        "conversion": 0.02,
        "reward_per_session": 3.5,
        "sessions": 40,
        "coverage": 0.5,
        "item_gini": 0.6,
        "brand_gini": 0.3,
        "popularity_bias": 0.7,
        "slate_value_vs_oracle": 0.55,
    }
    metrics.update({"dqn": numbers, "oracle": {**numbers, "reward_per_session": 9.0}})
    assert registry.get_sample_value("qrec_demo_slate_value_vs_oracle_ratio", {"policy": "dqn"}) == 0.55
    assert registry.get_sample_value("qrec_demo_reward_per_session", {"policy": "dqn"}) == 3.5
    assert registry.get_sample_value("qrec_demo_reward_per_session", {"policy": "oracle"}) == 9.0
    assert registry.get_sample_value("qrec_exposure_item_gini", {"policy": "dqn"}) == 0.6
    assert registry.get_sample_value("qrec_exposure_popularity_bias", {"policy": "oracle"}) == 0.7
    for family in registry.collect():
        assert family.name.startswith("qrec_")
        for sample in family.samples:
            assert set(sample.labels) == {"policy"}


def test_serving_params_blend_the_heads_with_exact_numbers() -> None:
    params = {
        "params": {
            "state_projection": {"kernel": np.array([[1.0, 2.0]]), "bias": np.array([0.5, -1.0])},
            "next_item_projection": {"kernel": np.array([[3.0, 4.0]]), "bias": np.array([1.0, 0.0])},
            "action_bias": np.array([0.0, 1.0, 2.0]),
            "next_item_bias": np.array([4.0, 0.0, -2.0]),
            "item_embedding": {"embedding": np.ones((3, 2))},
        }
    }
    blended = serving_params(params, q_weight=0.5, next_item_weight=2.0)["params"]
    np.testing.assert_allclose(blended["state_projection"]["kernel"], [[6.5, 9.0]])
    np.testing.assert_allclose(blended["state_projection"]["bias"], [2.25, -0.5])
    np.testing.assert_allclose(blended["action_bias"], [8.0, 0.5, -3.0])
    np.testing.assert_allclose(blended["next_item_bias"], [4.0, 0.0, -2.0])  # the heads stay apart
    np.testing.assert_allclose(params["params"]["action_bias"], [0.0, 1.0, 2.0])  # input untouched
    assert serving_params(params, q_weight=1.0, next_item_weight=0.0) is params
    with pytest.raises(ValueError, match="sqn_weight"):
        serving_params({"params": {"state_projection": {}}}, q_weight=0.0, next_item_weight=1.0)
    with pytest.raises(ValueError, match="repeat head"):
        serving_params({"params": {**params["params"], "repeat_out": {}}}, q_weight=0.0, next_item_weight=1.0)


@pytest.mark.parametrize("dueling", [False, True])
def test_a_published_blend_ranks_every_item_by_the_weighted_heads(dueling: bool) -> None:
    network = QNetwork(
        NetworkConfig(num_actions=9, embed_dim=4, hidden_sizes=(8,), dueling=dueling, next_item_head=True)
    )
    rng = np.random.default_rng(3)
    obs = ObsBatch(
        items=rng.integers(0, 9, size=(5, 3)).astype(np.int32),
        event_types=rng.integers(1, 4, size=(5, 3)).astype(np.int32),
        gaps=rng.random((5, 3)).astype(np.float32),
        features=rng.standard_normal((5, 6)).astype(np.float32),
    )
    params = jax.tree.map(
        lambda leaf: np.asarray(leaf) + 0.3 * rng.standard_normal(np.shape(leaf)).astype(np.float32),
        init_params(network, obs, jax.random.key(0)),
    )
    q = np.asarray(network.apply(params, obs))  # (5, 9)
    logits = np.asarray(network.apply(params, obs, method=QNetwork.next_item_logits))  # (5, 9)
    served = np.asarray(network.apply(serving_params(params, q_weight=0.25, next_item_weight=1.5), obs))
    expected = 0.25 * q + 1.5 * logits
    # Equal up to a per-user constant (the dueling value), which no ranking sees.
    shift = served - expected  # (5, 9)
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1], shift.shape), atol=1e-4)
    if not dueling:
        np.testing.assert_allclose(served, expected, atol=1e-4)
    np.testing.assert_array_equal(np.argsort(-served, axis=1), np.argsort(-expected, axis=1))


def test_serve_weights_and_sources_are_checked_at_start_up() -> None:
    with pytest.raises(ConfigError, match="sqn_weight"):
        LearnerServiceConfig(serve_next_item_weight=1.0)
    with pytest.raises(ConfigError, match="cannot all be 0"):
        LearnerServiceConfig(sqn_weight=1.0, serve_q_weight=0.0)
    with pytest.raises(ConfigError, match="repeat head"):
        LearnerServiceConfig(sqn_weight=1.0, serve_next_item_weight=1.0, repeat_head=True)
    with pytest.raises(ConfigError, match="repeat head"):
        LearnerServiceConfig(sqn_weight=1.0, serve_q_weight=0.0, serve_next_item_weight=2.0, repeat_head=True)
    LearnerServiceConfig(sqn_weight=1.0, serve_q_weight=0.0, serve_next_item_weight=1.0, repeat_head=True)
    # log Q is added to the logits, not blended into a head: any next-item weight, repeat head or not.
    LearnerServiceConfig(sqn_weight=1.0, serve_q_weight=0.0, serve_log_q_weight=1.0, repeat_head=True)
    LearnerServiceConfig(
        sqn_weight=1.0,
        serve_q_weight=0.0,
        serve_next_item_weight=2.0,
        serve_log_q_weight=0.5,
        repeat_head=True,
    )
    with pytest.raises(ConfigError, match="not both"):
        LearnerServiceConfig(sqn_weight=1.0, serve_log_q_weight=1.0)  # serve_q_weight defaults to 1
    with pytest.raises(ConfigError, match="sqn_weight"):
        LearnerServiceConfig(serve_q_weight=0.0, serve_log_q_weight=1.0)
    with pytest.raises(ConfigError, match="serve_q_floor"):
        LearnerServiceConfig(sqn_weight=1.0, serve_q_weight=0.0, serve_log_q_weight=1.0, serve_q_floor=0.0)
    with pytest.raises(ConfigError, match=r"sources must be .*'logged,clicks'"):
        LearnerServiceConfig(sources="logged,clicks")
    assert LearnerServiceConfig(sources=" logged ").source_set() == {"logged"}


def _transition(tid: str, source: str, r_t: float = 1.0) -> Transition:
    obs = Observation(
        recent_items=["i1"],
        recent_event_types=["view"],
        recent_gaps_seconds=[0.0],
        features=[0.0] * FEATURE_DIM,
    )
    return Transition(
        transition_id=tid,
        user_id="u1",
        source=source,  # type: ignore[arg-type]
        obs_tm1=obs,
        a_tm1="i2",
        r_t=r_t,
        obs_t=obs,
        done=False,
        timestamp=1000,
    )


def _small_learner_config(tmp_path: Path, **changes: Any) -> LearnerServiceConfig:
    """A tiny learner that never trains in these tests (min_replay_size 100), with its own settings."""
    return LearnerServiceConfig(
        checkpoint_dir=str(tmp_path / "ckpt"),
        partitions=1,
        vocabulary_capacity=50,
        embed_dim=4,
        hidden_sizes="8",
        batch_size=4,
        min_replay_size=100,
        **changes,
    )


@pytest.mark.timeout(120)
def test_learner_learns_only_from_its_sources(tmp_path: Path) -> None:
    bus = EmbeddedBus()
    registry = CollectorRegistry()
    config = _small_learner_config(tmp_path, sources="logged")
    learner = Learner(config, bus, registry)
    producer = bus.producer()
    for tid, source in [
        ("r:0", "recommendation"),
        ("logged:1", "logged"),
        ("r:1", "recommendation"),
        ("logged:2", "logged"),
        ("logged:3", "logged"),
    ]:
        producer.send(config.transitions_topic, b"u1", encode(_transition(tid, source)))
    # The source header skips a record undecoded (this value is not even JSON); an unknown name in it
    # is ignored and the record decoded, and a header naming a learned source is decoded too.
    producer.send(config.transitions_topic, b"u1", b"not json", headers=((SOURCE_HEADER, b"recommendation"),))
    producer.send(
        config.transitions_topic,
        b"u1",
        encode(_transition("logged:4", "logged")),
        headers=((SOURCE_HEADER, b"mystery"),),
    )
    producer.send(
        config.transitions_topic,
        b"u1",
        encode(_transition("logged:5", "logged")),
        headers=((SOURCE_HEADER, b"logged"),),
    )
    producer.flush()
    while learner.poll_once(timeout_s=0.01):
        pass
    assert learner.learned == 5 and len(learner.trainer.buffer) == 5
    assert (
        registry.get_sample_value(
            "qrec_learner_skipped_source_transitions_total", {"source": "recommendation"}
        )
        == 3
    )
    assert registry.get_sample_value("qrec_learner_transitions_total") == 5
    dead_letters = [
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "qrec_dead_letters_total"
    ]
    assert sum(dead_letters) == 0, "the skipped record was never decoded"
    learner.close()


@pytest.mark.timeout(120)
def test_learner_with_clicked_shown_slots_learns_clicked_slots_and_logged_rows_with_their_roles(
    tmp_path: Path,
) -> None:
    bus = EmbeddedBus()
    registry = CollectorRegistry()
    config = _small_learner_config(tmp_path, shown_slots="clicked", split_losses=True, sqn_weight=1.0)
    assert learner_config_for(config).split_losses
    with pytest.raises(ConfigError, match="shown_slots must be one of all, clicked"):
        LearnerServiceConfig(shown_slots="some")
    learner = Learner(config, bus, registry)
    producer = bus.producer()
    for transition in [
        _transition("r:0", "recommendation", 0.0),
        _transition("r:1", "recommendation", 1.0),
        _transition("logged:1", "logged", 1.0),
        _transition("r:2", "recommendation", 0.0),
        _transition("r:3", "recommendation", 13.0),
        _transition("logged:2", "logged", 0.0),  # logged rows are kept whatever their reward
    ]:
        producer.send(config.transitions_topic, b"u1", encode(transition))
    producer.flush()
    while learner.poll_once(timeout_s=0.01):
        pass
    buffer = learner.trainer.buffer
    assert learner.learned == 4 and len(buffer) == 4
    assert registry.get_sample_value("qrec_learner_skipped_unclicked_transitions_total") == 2
    stored = buffer.sample(64, np.random.default_rng(0))[0]
    # The buffer keeps which rows are logged (next-item loss) and which are shown slots (TD loss).
    assert sorted(
        {(float(r), float(logged)) for r, logged in zip(stored.r_t, stored.logged, strict=True)}
    ) == [
        (0.0, 1.0),
        (1.0, 0.0),
        (1.0, 1.0),
        (13.0, 0.0),
    ]
    learner.close()


def _next_item_serving(**changes: Any) -> LearnerServiceConfig:
    """A small learner whose published model ranks by its next-item head."""
    return LearnerServiceConfig(
        **{
            "vocabulary_capacity": 10,
            "embed_dim": 4,
            "hidden_sizes": "8",
            "sqn_weight": 1.0,
            "serve_q_weight": 0.0,
            "serve_next_item_weight": 1.0,
            **changes,
        }
    )


def _trained_looking(trainer: Trainer, rng: np.random.Generator) -> None:
    """Perturb every parameter: the repeat head starts at zero, which would hide what it adds."""
    trainer.state = trainer.state.replace(
        params=jax.tree.map(
            lambda leaf: np.asarray(leaf) + 0.3 * rng.standard_normal(np.shape(leaf)).astype(np.float32),
            trainer.state.params,
        )
    )


def _window_obs(rng: np.random.Generator) -> ObsBatch:
    """Two states with a 3-event window, one with a repeated item."""
    return ObsBatch(
        items=np.asarray([[0, 3, 3], [2, 5, 7]], np.int32),
        event_types=np.asarray([[0, 1, 1], [1, 2, 1]], np.int32),
        gaps=np.full((2, 3), 0.5, np.float32),
        features=rng.standard_normal((2, FEATURE_DIM)).astype(np.float32),
    )


@pytest.mark.parametrize("repeat_mode", ["replace", "mixture"])
def test_with_the_repeat_head_the_published_model_scores_by_the_next_item_head(repeat_mode: str) -> None:
    settings = _next_item_serving(window=3, repeat_head=True)
    trainer = Trainer(settings, FEATURE_DIM, network_changes={"repeat_mode": repeat_mode})
    rng = np.random.default_rng(5)
    _trained_looking(trainer, rng)
    network_config, bundle = load_bundle(trainer.bundle_bytes())
    assert network_config.scores == "next_item" and trainer.network_config.scores == "q"
    published = QNetwork(network_config)
    params = tree_from_bytes(trainer.state.params, bundle.params)
    obs = _window_obs(rng)
    served = np.asarray(published.apply(params, obs))
    logits = np.asarray(trainer.network.apply(trainer.state.params, obs, method=QNetwork.next_item_logits))
    np.testing.assert_allclose(served, logits, rtol=1e-6)
    q = np.asarray(trainer.network.apply(trainer.state.params, obs))
    assert not np.allclose(served, q), "the published model does not score by Q"


def test_with_a_log_q_weight_the_published_model_adds_log_q_to_the_next_item_logits() -> None:
    settings = _next_item_serving(
        window=3, repeat_head=True, serve_next_item_weight=0.5, serve_log_q_weight=2.0, serve_q_floor=0.2
    )
    trainer = Trainer(settings, FEATURE_DIM)
    rng = np.random.default_rng(6)
    _trained_looking(trainer, rng)
    network_config, bundle = load_bundle(trainer.bundle_bytes())
    assert network_config.scores == "next_item_and_log_q" and trainer.network_config.scores == "q"
    assert (network_config.score_next_item_weight, network_config.score_log_q_weight) == (0.5, 2.0)
    params = tree_from_bytes(trainer.state.params, bundle.params)
    obs = _window_obs(rng)
    served = np.asarray(QNetwork(network_config).apply(params, obs), np.float64)
    q, logits = (
        np.asarray(part, np.float64)
        for part in trainer.network.apply(trainer.state.params, obs, method=QNetwork.q_and_next_item_logits)
    )
    assert (q < 0.2).any() and (q > 0.2).any(), "the floor is not exercised"
    np.testing.assert_allclose(served, 0.5 * logits + 2.0 * np.log(np.maximum(q, 0.2)), rtol=1e-5, atol=1e-5)


def test_the_published_bundle_carries_the_blend_and_the_checkpoint_the_heads() -> None:
    trainer = Trainer(_next_item_serving(), FEATURE_DIM)
    _, bundle = load_bundle(trainer.bundle_bytes())
    published = msgpack_restore(bundle.params)["params"]
    inner = trainer.state.params["params"]
    np.testing.assert_allclose(published["action_bias"], inner["next_item_bias"])
    np.testing.assert_allclose(
        published["state_projection"]["kernel"], inner["next_item_projection"]["kernel"]
    )
    restored = msgpack_restore(trainer.checkpoint_bytes())
    np.testing.assert_allclose(
        restored["params"]["params"]["state_projection"]["kernel"], inner["state_projection"]["kernel"]
    )


def test_demo_rejects_learner_settings_that_cannot_work() -> None:
    with pytest.raises(ConfigError, match="sources must be"):
        DemoConfig(learn_from="organic")
    with pytest.raises(ConfigError, match="sqn_weight"):
        DemoConfig(sqn_weight=0.0)  # the default ranks by the next-item head
    with pytest.raises(ConfigError, match="cannot all be 0"):
        DemoConfig(serve_next_item_weight=0.0, serve_log_q_weight=0.0)
    with pytest.raises(ConfigError, match="not both"):
        DemoConfig(serve_log_q_weight=1.0, serve_q_weight=1.0, repeat_head=False, factored_q=False)
    with pytest.raises(ConfigError, match="factored Q"):
        DemoConfig(serve_q_weight=1.0, serve_log_q_weight=0.0, repeat_head=False)  # factored by default
    with pytest.raises(ConfigError, match="serve_log_q_weight must be"):
        DemoConfig(serve_log_q_weight=-1.0)
    assert DemoConfig(serve_log_q_weight=1.0).serve_log_q_weight == 1.0  # with the repeat head
    with pytest.raises(ConfigError, match="serve_q_floor"):
        DemoConfig(serve_q_floor=0.0)
    plain_q = {"serve_log_q_weight": 0.0, "factored_q": False}
    with pytest.raises(ConfigError, match="--no-repeat-head"):
        DemoConfig(serve_q_weight=1.0, **plain_q)  # the repeat head is on by default
    assert DemoConfig(serve_q_weight=1.0, repeat_head=False, **plain_q).serve_q_weight == 1.0
    with pytest.raises(ConfigError, match="window"):
        DemoConfig(window=0)
    config = DemoConfig(
        sqn_weight=0.0,
        serve_q_weight=1.0,
        serve_next_item_weight=0.0,
        td_bootstrap="max",
        learn_from="logged,recommendation",
        **plain_q,
    )
    assert parse_sources(config.learn_from) == {"logged", "recommendation"}


def test_sparkline_draws_each_window_against_the_highest() -> None:
    assert sparkline([0.0, 1.0, None, 2.0], 2.0) == "▁▅ █"
    assert sparkline([0.0, None], 0.0) == "▁ "
    assert sparkline([], 1.0) == ""


def test_the_expected_td_bootstrap_reaches_the_learners_update_and_needs_the_next_item_head(
    tmp_path: Path,
) -> None:
    from rl.train import BOOTSTRAPS
    from services.demo import learner_config
    from services.learner.config import TD_BOOTSTRAPS

    assert TD_BOOTSTRAPS == BOOTSTRAPS  # the services' checks name what the learner accepts
    config = _small_learner_config(tmp_path, td_bootstrap="expected", sqn_weight=1.0)
    assert learner_config_for(config).bootstrap == "expected"
    assert learner_config_for(_small_learner_config(tmp_path)).bootstrap == "max"
    with pytest.raises(ConfigError, match="set sqn_weight > 0"):
        _small_learner_config(tmp_path, td_bootstrap="expected")
    with pytest.raises(ConfigError, match="td_bootstrap must be max or expected"):
        DemoConfig(td_bootstrap="mean")
    demo = DemoConfig(td_bootstrap="expected", out=str(tmp_path / "demo"))
    assert learner_config(demo, gamma=demo.gamma).td_bootstrap == "expected"


def test_the_demo_serves_log_q_alike_from_the_dqn_and_the_bandit() -> None:
    from services.demo import learner_config

    config = DemoConfig(serve_log_q_weight=3.0, serve_q_floor=0.5)
    for gamma in (0.0, config.gamma):
        settings = learner_config(config, gamma=gamma)
        assert (settings.serve_log_q_weight, settings.serve_q_floor, settings.serve_q_weight) == (
            3.0,
            0.5,
            0.0,
        )
        assert settings.gamma == gamma
    config = DemoConfig(serve_log_q_weight=3.0, bandit_serve_log_q_weight=0.0)
    assert learner_config(config, gamma=config.gamma).serve_log_q_weight == 3.0
    assert learner_config(config, gamma=0.0, bandit=True).serve_log_q_weight == 0.0
    with pytest.raises(ConfigError, match="bandit_serve_log_q_weight"):
        DemoConfig(bandit_serve_log_q_weight=-1.0)


def test_reward_per_session_comes_with_its_standard_error_over_sessions() -> None:
    first, second = Window(minute=10.0), Window(minute=20.0)
    first.sessions["a"] |= {"s1", "s2", "s3"}  # s3 earns nothing
    first.session_reward["a"].update({"s1": 2.0, "s2": 4.0})
    first.reward["a"] = 6.0
    second.sessions["a"] |= {"s2", "s4"}  # s2 goes on into the second window
    second.session_reward["a"]["s2"] += 2.0
    second.reward["a"] = 2.0
    [numbers] = _results([first, second], ["a"]).values()
    # Per session 2, 6, 0, 0: mean 2, sample standard deviation sqrt(24 / 3), over sqrt(4) sessions.
    assert numbers["sessions"] == 4 and numbers["reward_per_session"] == 2.0
    assert numbers["reward_per_session_se"] == pytest.approx(np.sqrt(8.0) / 2.0)


def test_the_ratio_interval_adds_the_relative_errors_in_quadrature() -> None:
    dqn = {"reward_per_session": 4.0, "reward_per_session_se": 0.3}
    bandit = {"reward_per_session": 2.0, "reward_per_session_se": 0.4}
    low, high = ratio_interval(dqn, bandit)
    spread = 1.96 * 2.0 * np.hypot(0.3 / 4.0, 0.4 / 2.0)  # 2.0 * sqrt(0.075^2 + 0.2^2)
    assert (low, high) == pytest.approx((2.0 - spread, 2.0 + spread))
    assert ratio_interval(dqn, {"reward_per_session": 0.0, "reward_per_session_se": 0.0}) is None


@pytest.mark.parametrize(
    ("clip", "expected"), [(0.0, [0.0, 1.0, 3.0, 13.0, -2.0]), (1.0, [0.0, 1.0, 1.0, 1.0, -1.0])]
)
def test_reward_clip_bounds_what_the_learner_learns_from(clip: float, expected: list[float]) -> None:
    trainer = Trainer(_next_item_serving(reward_clip=clip), FEATURE_DIM)
    rewards = [0.0, 1.0, 3.0, 13.0, -2.0]
    batch = trainer.to_batch([_transition(f"t{i}", "recommendation", r) for i, r in enumerate(rewards)])
    np.testing.assert_array_equal(batch.r_t, np.asarray(expected, np.float32))


def test_reward_clip_is_checked_and_reaches_both_demo_learners() -> None:
    from services.demo import learner_config

    with pytest.raises(ConfigError, match="reward_clip"):
        LearnerServiceConfig(reward_clip=-1.0)
    with pytest.raises(ConfigError, match="reward_clip"):
        DemoConfig(reward_clip=-1.0)
    config = DemoConfig(reward_clip=1.0)
    assert learner_config(config, gamma=config.gamma).reward_clip == 1.0
    assert learner_config(config, gamma=0.0, bandit=True).reward_clip == 1.0


def test_q_with_its_own_item_table_cannot_be_blended_linearly() -> None:
    with pytest.raises(ConfigError, match="q-item-table"):
        LearnerServiceConfig(sqn_weight=1.0, serve_next_item_weight=1.0, q_item_table=True)
    settings = _next_item_serving(serve_log_q_weight=1.0, q_item_table=True)
    trainer = Trainer(settings, FEATURE_DIM)
    assert "q_item_embedding" in trainer.state.params["params"]
    network_config, _ = load_bundle(trainer.bundle_bytes())
    assert network_config.q_item_table and network_config.scores == "next_item_and_log_q"
    with pytest.raises(ValueError, match="own item table"):
        serving_params(trainer.state.params, q_weight=1.0, next_item_weight=1.0)


def _summary_of(samples: dict[str, list[float]]) -> dict[str, Any]:
    """A run's summary as the demo writes it, from each group's per-session rewards."""
    return {
        "policies": {
            group: {
                "reward_per_session": float(np.mean(values)),
                "reward_per_session_se": float(np.std(values, ddof=1) / np.sqrt(len(values))),
                "sessions": len(values),
            }
            for group, values in samples.items()
        }
    }


def test_pooled_runs_equal_one_sample_of_all_their_sessions() -> None:
    rng = np.random.default_rng(8)
    runs = [
        {"dqn": rng.exponential(3.0, n).tolist(), "bandit": rng.exponential(2.0, n + 7).tolist()}
        for n in (40, 55, 31)
    ]
    pooled = pool_runs([_summary_of(run) for run in runs])
    for group in ("dqn", "bandit"):
        everything = np.concatenate([run[group] for run in runs])
        numbers = pooled["policies"][group]
        assert numbers["sessions"] == len(everything)
        assert numbers["reward_per_session"] == pytest.approx(everything.mean())
        assert numbers["reward_per_session_se"] == pytest.approx(
            everything.std(ddof=1) / np.sqrt(len(everything))
        )
        assert numbers["per_run"] == pytest.approx([np.mean(run[group]) for run in runs])
    ratio = pooled["reward_per_session_ratio"]["dqn_over_bandit"]
    assert ratio == pytest.approx(
        pooled["policies"]["dqn"]["reward_per_session"] / pooled["policies"]["bandit"]["reward_per_session"]
    )
    low, high = pooled["reward_per_session_ratio_ci95"]["dqn_over_bandit"]
    assert low < ratio < high


def test_seeds_are_read_as_a_list_of_distinct_integers() -> None:
    assert DemoConfig().seed_list() == []
    assert DemoConfig(seeds="7, 8,9").seed_list() == [7, 8, 9]
    with pytest.raises(ConfigError, match="comma-separated integers"):
        DemoConfig(seeds="7,x")
    with pytest.raises(ConfigError, match="repeat"):
        DemoConfig(seeds="7,7")


@pytest.mark.timeout(600)
def test_a_demo_over_two_seeds_writes_each_report_and_the_pooled_table(tmp_path: Path) -> None:
    out = tmp_path / "report"
    config = DemoConfig(
        hours=0.25, shoppers=60, items=120, report_every_minutes=5, seeds="3,4", out=str(out), live=False
    )
    pooled = run_demo(config, Console(file=open(tmp_path / "console.txt", "w"), width=120))  # noqa: SIM115
    assert pooled["seeds"] == [3, 4] and [run["run"]["mode"] for run in pooled["runs"]] == ["in-process"] * 2
    for seed in (3, 4):
        assert (out / f"seed-{seed}" / "report.html").exists()
    assert json.loads((out / "pooled.json").read_text()) == json.loads(json.dumps(pooled))
    assert (out / "pooled.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "pooled.html").read_text()
    assert 'href="seed-3/report.html"' in page and "data:image/png;base64," in page
    dqn = pooled["policies"]["dqn"]
    assert f"{dqn['reward_per_session']:.2f} ± {dqn['reward_per_session_se']:.2f}" in page
    for group, numbers in pooled["policies"].items():
        assert numbers["sessions"] == sum(run["policies"][group]["sessions"] for run in pooled["runs"]), group
    # The two runs are different shops: a seed reached each.
    assert pooled["runs"][0]["events"] != pooled["runs"][1]["events"]


def test_the_factored_q_reaches_both_demo_learners_and_cannot_be_blended_linearly() -> None:
    from services.demo import learner_config

    with pytest.raises(ConfigError, match="factored Q"):
        LearnerServiceConfig(sqn_weight=1.0, serve_next_item_weight=1.0, factored_q=True)
    with pytest.raises(ConfigError, match="dueling"):
        LearnerServiceConfig(factored_q=True, dueling=True)
    with pytest.raises(ConfigError, match="item table"):
        LearnerServiceConfig(factored_q=True, q_item_table=True)
    config = DemoConfig(factored_q=True, serve_log_q_weight=3.0)
    assert learner_config(config, gamma=config.gamma).factored_q
    assert learner_config(config, gamma=0.0, bandit=True).factored_q
    trainer = Trainer(_next_item_serving(serve_log_q_weight=1.0, factored_q=True), FEATURE_DIM)
    assert {"continuation_bias", "future_bias"} <= set(trainer.state.params["params"])
    network_config, _ = load_bundle(trainer.bundle_bytes())
    assert network_config.factored_q and network_config.scores == "next_item_and_log_q"
    with pytest.raises(ValueError, match="factored Q"):
        serving_params(trainer.state.params, q_weight=1.0, next_item_weight=1.0)

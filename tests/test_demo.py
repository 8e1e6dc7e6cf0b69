"""The closed-loop demo: simulated shoppers through every service, ending in a report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

from services.demo import DemoConfig, DemoMetrics, run_demo

GROUPS = {"dqn", "popularity", "bandit", "tabular_q", "random", "oracle"}
PER_POLICY = {"ctr", "conversion", "reward_per_session", "sessions"}
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
    ):
        assert (out / name).stat().st_size > 1000
    assert html.count("data:image/png;base64,") == 5, "the page is self-contained"
    assert "Exposure and fairness" in html and "popularity bias" in html


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
    }
    metrics.update({"dqn": numbers, "oracle": {**numbers, "reward_per_session": 9.0}})
    assert registry.get_sample_value("qrec_demo_reward_per_session", {"policy": "dqn"}) == 3.5
    assert registry.get_sample_value("qrec_demo_reward_per_session", {"policy": "oracle"}) == 9.0
    assert registry.get_sample_value("qrec_exposure_item_gini", {"policy": "dqn"}) == 0.6
    assert registry.get_sample_value("qrec_exposure_popularity_bias", {"policy": "oracle"}) == 0.7
    for family in registry.collect():
        assert family.name.startswith("qrec_")
        for sample in family.samples:
            assert set(sample.labels) == {"policy"}

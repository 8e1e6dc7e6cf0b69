"""The closed-loop demo: simulated shoppers through every service, ending in a report."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from services.demo import DemoConfig, run_demo


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
    assert {"popularity", "random"} <= set(policies)
    assert "dqn" in policies or "popularity-coldstart" in policies
    assert all(p["recommendations"] > 0 for p in policies.values())
    assert summary["model_version"] >= 1, "the learner published during the run"
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

"""Prometheus configuration and alert rules: promtool accepts them, each alert fires in its unit test,
and every metric an alert reads is one qrec actually exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.actor.service import ActorMetrics
from services.learner.service import LearnerMetrics
from services.metrics import ConsumerLag
from services.ops.supervisor import SupervisorMetrics
from services.replay.service import ReplayMetrics
from services.simulator.service import SimulatorMetrics
from services.state_builder.service import StateBuilderMetrics

PROMETHEUS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make test` installs the Debian package prometheus"
    return subprocess.run([tool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_scrape_config_and_the_rules() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_its_unit_test() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = set(re.findall(r"^\s+- alert: (\w+)", (PROMETHEUS / "alerts.yml").read_text(), re.M))
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert alerts and alerts == tested, f"alerts without a test: {alerts - tested}"


def exported_names() -> set[str]:
    names: set[str] = set()
    for metrics_class in (
        ReplayMetrics,
        StateBuilderMetrics,
        LearnerMetrics,
        ActorMetrics,
        SimulatorMetrics,
        SupervisorMetrics,
    ):
        registry = CollectorRegistry()
        metrics_class(registry)
        ConsumerLag(registry, "g")
        for family in registry.collect():
            names.update(sample.name for sample in family.samples)
            names.add(family.name)
            if family.type == "counter":  # a labelled counter has no samples until first used
                names.add(family.name + "_total")
    return names


def test_alerts_only_read_metrics_that_qrec_exports() -> None:
    used = set(re.findall(r"\b(qrec_[a-z0-9_]+)", (PROMETHEUS / "alerts.yml").read_text()))
    assert used
    exported = exported_names()
    missing = {name for name in used if name not in exported}
    assert not missing, f"alert rules read metrics no qrec process exports: {sorted(missing)}"

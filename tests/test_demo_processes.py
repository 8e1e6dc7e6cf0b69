"""`qrec demo --processes`: every service as its own OS process on the real broker, and the report."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from rich.console import Console

from services.config import ConfigError, make_bus
from services.demo import DEFAULT_POLICIES, DEFAULT_PROCESS_POLICIES, DemoConfig, run_demo
from services.demo_processes import ProcessDemo, ServiceFailed

PROCESS_GROUPS = {"dqn", "bandit", "tabular_q", "popularity", "random"}
SERVICES = {"learner", "state-builder", "actor", "bandit", "tabular-learner"}


def short_run(tmp_path: Path, bootstrap_servers: str) -> DemoConfig:
    return DemoConfig(
        processes=True,
        bootstrap_servers=bootstrap_servers,
        hours=0.25,
        speed=60.0,
        shoppers=120,
        items=200,
        report_every_minutes=5,
        out=str(tmp_path / "report"),
        live=False,
    )


def test_processes_need_kafka_and_have_no_oracle() -> None:
    with pytest.raises(ConfigError, match="talk over Kafka: pass --bootstrap-servers"):
        DemoConfig(processes=True)
    with pytest.raises(ConfigError, match="leave oracle out of --policies"):
        DemoConfig(processes=True, bootstrap_servers="127.0.0.1:9092", policies="dqn=0.5,oracle=0.5")
    with pytest.raises(ConfigError, match="speed must be > 0"):
        DemoConfig(speed=0.0)
    config = DemoConfig(processes=True, bootstrap_servers="127.0.0.1:9092")
    assert config.policies == DEFAULT_POLICIES and config.process_policies == DEFAULT_PROCESS_POLICIES
    custom = DemoConfig(processes=True, bootstrap_servers="127.0.0.1:9092", policies="dqn=0.5,random=0.5")
    assert custom.process_policies == "dqn=0.5,random=0.5"


@pytest.mark.kafka
@pytest.mark.timeout(420)
def test_the_demo_runs_every_service_as_its_own_process_on_kafka(
    tmp_path: Path, bootstrap_servers: str
) -> None:
    config = short_run(tmp_path, bootstrap_servers)
    console_file = (tmp_path / "console.txt").open("w")
    data = run_demo(config, Console(file=console_file, width=120))
    console_file.close()
    out = Path(config.out)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(data))
    run = data["run"]
    assert run["mode"] == "processes" and run["namespace"].startswith("qrec-demo-")
    processes = run["processes"]
    assert set(processes) == SERVICES
    pids = {p["pid"] for p in processes.values()}
    assert len(pids) == len(SERVICES) and os.getpid() not in pids, "one OS process per service"
    assert all(p["exit_code"] == 0 for p in processes.values()), processes  # stopped cleanly by SIGTERM
    for name, process in processes.items():
        assert Path(process["log"]).stat().st_size > 0, name
    assert set(data["policies"]) == PROCESS_GROUPS == set(data["whole_run"])
    # Over the whole run every group was served (the late phase of so short a run holds only a few
    # minutes of ~25 shoppers per group, too few to require slates for each group there).
    for name, numbers in data["whole_run"].items():
        assert numbers["recommendations"] > 0 and numbers["sessions"] > 0, (name, data["whole_run"])
    assert sum(numbers["sessions"] for numbers in data["policies"].values()) > 0
    # Each link crossed a process boundary over Kafka: shopper -> state-builder -> actor -> shopper,
    # state-builder -> learners (transitions), tabular learner -> actor (a published table).
    assert data["events"] > 500
    assert data["windows"][-1]["transitions"] > 0, "the learner process consumed transitions"
    assert data["tabular_updates"] > 0
    assert "tabular_q" in data["recommendations_by_label"], "the actor served the tabular learner's table"
    html = (out / "report.html").read_text()
    assert "its own OS process on Kafka" in html and "no oracle group" in html
    assert html.count("data:image/png;base64,") == 6  # the clickbait plot too: the default shop has it


@pytest.mark.kafka
@pytest.mark.timeout(420)
def test_a_service_that_dies_stops_the_demo_with_its_log(tmp_path: Path, bootstrap_servers: str) -> None:
    config = short_run(tmp_path, bootstrap_servers)
    bus = make_bus(config)
    demo = ProcessDemo(config, bus, tmp_path / "work", say=lambda _: None)
    try:
        demo.start()
        builder = demo.processes["state-builder"]
        assert builder.popen is not None
        builder.popen.send_signal(signal.SIGKILL)
        builder.popen.wait(timeout=30)
        with pytest.raises(ServiceFailed, match=r"state-builder exited with status -9 .*state-builder\.log"):
            demo.run()
    finally:
        demo.close()
        bus.close()
    survivors = [p for p in demo.processes.values() if p.popen is not None and p.popen.poll() is None]
    assert not survivors, "close() stops every other service"

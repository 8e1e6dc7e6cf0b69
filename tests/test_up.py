"""`qrec up`: the supervisor's rules (backoff, restart, stop order, plan) and a real deployment on Kafka."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

from schemas.codec import CLICK_EVENTS, USER_STATES
from schemas.messages import ClickEvent, UserState
from services.config import BusConfig, ConfigError, make_bus
from services.ops.config import UpConfig
from services.ops.status import parse_metrics, total
from services.ops.supervisor import (
    ACTOR,
    LEARNER,
    REPLAY,
    SIMULATOR,
    STATE_BUILDER,
    ManagedProcess,
    ProcessSpec,
    Supervisor,
    backoff_seconds,
    groups_of,
    namespaced,
    plan,
    prometheus_config,
    should_restart,
    stop_groups,
)
from tests.helpers import PrometheusServer, read_topic, wait_until

# ------------------------------------------------------------------------------------ pure rules


def test_backoff_doubles_from_the_initial_wait_up_to_the_cap() -> None:
    assert [backoff_seconds(n, 1.0, 30.0) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert [backoff_seconds(n, 0.5, 10.0, factor=3.0) for n in (1, 2, 3, 4)] == [0.5, 1.5, 4.5, 10.0]
    with pytest.raises(ValueError, match="failures must be at least 1"):
        backoff_seconds(0, 1.0, 30.0)


def test_only_a_finished_simulator_or_replay_is_left_down() -> None:
    assert not should_restart(SIMULATOR, 0)
    assert not should_restart(REPLAY, 0)
    assert should_restart(SIMULATOR, 1)
    assert should_restart(REPLAY, -9)
    for kind in (LEARNER, STATE_BUILDER, ACTOR):
        assert should_restart(kind, 0)  # long-running services never end on their own
        assert should_restart(kind, -9)


def test_stop_order_is_input_first_then_actors_state_builders_learner() -> None:
    processes = {
        "learner": LEARNER,
        "state-builder-2": STATE_BUILDER,
        "state-builder-1": STATE_BUILDER,
        "actor-1": ACTOR,
        "simulator": SIMULATOR,
    }
    assert stop_groups(processes) == [
        ["simulator"],
        ["actor-1"],
        ["state-builder-1", "state-builder-2"],
        ["learner"],
    ]
    assert stop_groups({"replay": REPLAY, "learner": LEARNER}) == [["replay"], ["learner"]]
    with pytest.raises(ValueError, match="unknown service kind for x"):
        stop_groups({"x": "mystery"})


def value_of(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_plan_gives_every_process_its_port_log_topics_and_groups(tmp_path: Path) -> None:
    config = UpConfig(
        bootstrap_servers="127.0.0.1:9092",
        state_builders=2,
        actors=1,
        simulate=True,
        simulate_speed=60.0,
        namespace="ns1",
        learner_args="--min-replay-size 10",
    )
    ports = iter(range(9101, 9200))
    specs = plan(config, tmp_path, "127.0.0.1:9092", lambda: next(ports))
    assert [(s.name, s.kind, s.metrics_port) for s in specs] == [
        ("learner", LEARNER, 9101),
        ("state-builder-1", STATE_BUILDER, 9102),
        ("state-builder-2", STATE_BUILDER, 9103),
        ("actor-1", ACTOR, 9104),
        ("simulator", SIMULATOR, 9105),
    ]
    learner = specs[0].argv
    assert learner[0] == "learner"
    assert learner[-2:] == ("--min-replay-size", "10")  # extra flags come last, so they win
    assert value_of(learner, "--group-id") == "ns1.qrec-learner"
    assert value_of(learner, "--transitions-topic") == "ns1.qrec.transitions.v1"
    assert value_of(learner, "--checkpoint-dir") == str(tmp_path / "learner")
    assert value_of(learner, "--bootstrap-servers") == "127.0.0.1:9092"
    assert "--no-create-topics" in learner
    simulator = specs[-1].argv
    assert simulator[0] == "simulate"
    assert value_of(simulator, "--speed") == "60.0"
    assert value_of(simulator, "--clickstream-topic") == "ns1.qrec.clickstream.v1"
    assert value_of(specs[1].argv, "--group-id") == "ns1.qrec-state-builder"
    assert value_of(specs[3].argv, "--recommendations-topic") == "ns1.qrec.recommendations.v1"
    assert specs[1].log == tmp_path / "logs" / "state-builder-1.log"
    # Defaults of the Kafka client settings are not repeated on every command line.
    assert "--security-protocol" not in learner and "--kafka-client" not in learner


def test_names_groups_and_prometheus_config() -> None:
    assert namespaced("qrec.clickstream.v1", "") == "qrec.clickstream.v1"
    assert namespaced("qrec-actor", "staging") == "staging.qrec-actor"
    assert groups_of("") == {
        "qrec-actor": {"service": ACTOR, "topics": ["qrec.user-state.v1"]},
        "qrec-learner": {"service": LEARNER, "topics": ["qrec.transitions.v1"]},
        "qrec-state-builder": {
            "service": STATE_BUILDER,
            "topics": ["qrec.clickstream.v1", "qrec.recommendations.v1"],
        },
    }
    config = prometheus_config({"qrec-actor": ["127.0.0.1:1"], "qrec-replay": []}, "2s", ["/x/alerts.yml"])
    assert config == {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [
            {
                "job_name": "qrec-actor",
                "scrape_interval": "2s",
                "scrape_timeout": "2s",
                "static_configs": [{"targets": ["127.0.0.1:1"]}],
            }
        ],
        "rule_files": ["/x/alerts.yml"],
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bootstrap_servers": "embedded"}, "needs Kafka"),
        ({"actors": 0}, "actors must be at least 1"),
        ({"simulate": True, "replay": "log.csv"}, "not both"),
        ({"namespace": "a b"}, "namespace may hold only"),
        ({"backoff_initial_seconds": 90.0}, "at most backoff_max_seconds"),
        ({"learner_args": "--x 'unclosed"}, "learner_args"),
    ],
)
def test_bad_settings_are_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UpConfig(**overrides)


def test_up_help_explains_the_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in (
        "--state-builders",
        "--actors",
        "--simulate",
        "--replay",
        "--run-dir",
        "--bootstrap-servers",
    ):
        assert flag in result.stdout


# ------------------------------------------------------------------------ a real deployment


def metrics_of(url: str) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return parse_metrics(response.read().decode())
    except OSError:
        return None


def service_up(url: str) -> bool:
    samples = metrics_of(url)
    return samples is not None and total(samples, "qrec_service_up") == 1.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.timeout(900)
def test_up_runs_restarts_and_stops_a_deployment_without_losing_events(
    bootstrap_servers: str, unique_name: Any, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    namespace = unique_name("up")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QREC_")}
    output = (tmp_path / "up.out").open("wb")
    # Small models and a small shop: the point is the operations, not the learning.
    up = subprocess.Popen(
        [
            sys.executable, "-m", "services.cli", "up",
            "--bootstrap-servers", bootstrap_servers,
            "--namespace", namespace,
            "--run-dir", str(run_dir),
            "--state-builders", "2",
            "--actors", "1",
            "--simulate", "--simulate-speed", "30", "--simulate-shoppers", "100",
            "--partitions", "2",
            "--prometheus-port", "0",
            "--scrape-interval", "1s",
            "--backoff-initial-seconds", "0.5",
            "--quiet",
            "--learner-args",
            "--min-replay-size 100 --hidden-sizes 32 --embed-dim 16 --vocabulary-capacity 3000 "
            "--batch-size 32 --publish-every-steps 10 --replay-ratio 1",
            "--actor-args", "--popularity-candidates 50 --slate-size 5",
        ],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deployment_file = run_dir / "deployment.json"

    def deployment() -> dict[str, Any]:
        return dict(json.loads(deployment_file.read_text()))

    def process(name: str) -> dict[str, Any]:
        return next(p for p in deployment()["processes"] if p["name"] == name)

    def log_tails() -> str:
        parts = [(tmp_path / "up.out").read_text(errors="replace")[-3000:]]
        for log in sorted((run_dir / "logs").glob("*.log")):
            parts.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-1500:])
        return "\n".join(parts)

    try:
        wait_until(deployment_file.exists, timeout_s=120, what="deployment.json")
        names = [p["name"] for p in deployment()["processes"]]
        assert names == ["learner", "state-builder-1", "state-builder-2", "actor-1", "simulator"]
        # Every service comes up (the actor compiles its slate selection first: give it time).
        for name in names:
            url = process(name)["metrics_url"]
            wait_until(lambda url=url: service_up(url), timeout_s=400, interval_s=1, what=f"{name} up")

        # A real Prometheus scrapes every process and the supervisor.
        info = deployment()
        prometheus = PrometheusServer(tmp_path / "unused", [])
        prometheus.url = info["prometheus"]["url"]
        targets = prometheus.wait_for(
            "up", lambda r: len(r) == 6 and all(s["value"][1] == "1" for s in r), timeout_s=60
        )
        assert {s["metric"]["job"] for s in targets} == {
            "qrec-supervisor",
            "qrec-learner",
            "qrec-state-builder",
            "qrec-actor",
            "qrec-simulator",
        }

        # Recommendations flow back to the simulated shoppers.
        simulator_url = process("simulator")["metrics_url"]

        def shown() -> float:
            samples = metrics_of(simulator_url)
            return (total(samples, "qrec_simulator_recommendations_total") or 0.0) if samples else 0.0

        wait_until(lambda: shown() > 0, timeout_s=120, interval_s=1, what="recommendations shown")

        # SIGKILL one state-builder: the supervisor restarts it and counts the restart.
        victim = process("state-builder-1")
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(
            lambda: process("state-builder-1")["restarts"] == 1, timeout_s=60, what="state-builder restarted"
        )
        restarted = process("state-builder-1")
        assert restarted["pid"] != victim["pid"] and restarted["exit_codes"] == [-9]
        supervisor = metrics_of(info["supervisor"]["metrics_url"])
        assert supervisor is not None
        restarts = {
            labels["service"]: value for labels, value in supervisor["qrec_supervisor_restarts_total"]
        }
        assert restarts == {"learner": 0.0, "state-builder": 1.0, "actor": 0.0, "simulator": 0.0}
        prometheus.wait_for(
            'qrec_supervisor_restarts_total{service="state-builder"}',
            lambda r: len(r) == 1 and r[0]["value"][1] == "1",
            timeout_s=30,
        )
        wait_until(
            lambda: service_up(restarted["metrics_url"]), timeout_s=300, interval_s=1, what="restarted one up"
        )
        time.sleep(3)  # events keep flowing to the restarted member

        # Stop the simulator: it finishes (status 0) and is not restarted.
        os.kill(process("simulator")["pid"], signal.SIGTERM)
        wait_until(lambda: process("simulator")["status"] == "finished", timeout_s=60, what="simulator done")
        summary = json.loads((run_dir / "simulator-summary.json").read_text())
        assert summary["events_produced"] > 0

        # `qrec status --json` reports the deployment; wait until the state-builders caught up.
        def status() -> dict[str, Any]:
            result = subprocess.run(
                [sys.executable, "-m", "services.cli", "status", "--run-dir", str(run_dir), "--json"],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            return dict(json.loads(result.stdout))

        group = f"{namespace}.qrec-state-builder"
        clickstream = f"{namespace}.qrec.clickstream.v1"

        def caught_up() -> bool:
            rows = [r for r in status()["consumer_lag"] if r["group"] == group and r["topic"] == clickstream]
            return len(rows) == 2 and all(r["lag"] == 0 and r["committed"] == r["end"] for r in rows)

        wait_until(caught_up, timeout_s=180, interval_s=2, what="state-builders caught up")
        report = status()
        assert report["deployment"]["state"] == "running"
        assert {p["name"]: p["restarts"] for p in report["processes"]}["state-builder-1"] == 1
        assert report["learner"] is not None and report["learner"]["updates"] > 0
        assert [a["name"] for a in report["actors"]] == ["actor-1"]
        assert set(report["rates"]) >= {
            "events_per_second",
            "recommendations_per_second",
            "updates_per_second",
        }

        # No event lost: every event the simulator produced is on the clickstream, and the
        # state-builders applied each one (a UserState names it as its source).
        bus = make_bus(BusConfig(bootstrap_servers=bootstrap_servers))
        try:
            events = [CLICK_EVENTS.decode(r.value) for r in read_topic(bus, clickstream)]
            states = [
                USER_STATES.decode(r.value)
                for r in read_topic(bus, f"{namespace}.qrec.user-state.v1")
                if r.value is not None and ("qrec-update", b"record-only") not in r.headers
            ]
        finally:
            bus.close()
        assert all(isinstance(e, ClickEvent) for e in events)
        assert all(isinstance(s, UserState) for s in states)
        # (Events of an earlier simulator run, had it crashed, carry another run id.)
        run_events = [e for e in events if e.event_id.startswith(summary["run_id"] + "-")]  # type: ignore[union-attr]
        assert len(run_events) == summary["events_produced"]
        applied = {s.source_event_id for s in states}  # type: ignore[union-attr]
        missing = [e.event_id for e in events if e.event_id not in applied]  # type: ignore[union-attr]
        assert not missing, f"{len(missing)} of {len(events)} events never applied, e.g. {missing[:5]}"

        # The table form of the status names every process and group.
        table = subprocess.run(
            [sys.executable, "-m", "services.cli", "status", "--run-dir", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert table.returncode == 0, table.stderr
        for text in ("state-builder-1", "actor-1", "learner", group, "consumer lag", "model version"):
            assert text in table.stdout
        (tmp_path / "status.txt").write_text(table.stdout)

        # SIGTERM stops everything in order; the learner checkpoints.
        pids = [p["pid"] for p in deployment()["processes"] if p["pid"]]
        prometheus_pid = deployment()["prometheus"]["pid"]
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=180) == 0
        final = deployment()
        assert final["state"] == "stopped"
        assert all(p["status"] in ("stopped", "finished") and p["pid"] is None for p in final["processes"])
        for pid in [*pids, prometheus_pid]:
            assert not alive(pid), f"process {pid} still runs"
        stopped = (run_dir / "logs" / "supervisor.log").read_text()
        order = [stopped.rindex(f"{name} stopped") for name in ("actor-1", "state-builder-1", "learner")]
        assert order == sorted(order)
        assert (run_dir / "learner" / "meta.json").is_file()
    except BaseException:
        print(log_tails())
        raise
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                up.kill()
        output.close()


class FakePopen:
    """A stand-in for a child process whose exit the test decides."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


def test_check_restarts_crashed_processes_with_backoff_and_leaves_finished_ones(tmp_path: Path) -> None:
    now = [0.0]
    config = UpConfig(
        bootstrap_servers="127.0.0.1:9092",
        run_dir=str(tmp_path),
        backoff_initial_seconds=1.0,
        backoff_max_seconds=4.0,
        backoff_reset_seconds=100.0,
    )
    registry = CollectorRegistry()
    supervisor = Supervisor(config, Console(file=io.StringIO()), registry=registry, clock=lambda: now[0])
    launched: list[str] = []
    pids = iter(range(100, 200))

    def launch(process: ManagedProcess) -> None:
        launched.append(process.spec.name)
        process.popen = FakePopen(next(pids))  # type: ignore[assignment]
        process.status = "running"
        process.started_at = now[0]

    supervisor._launch = launch  # type: ignore[method-assign]
    builder = ManagedProcess(ProcessSpec("state-builder-1", STATE_BUILDER, (), 1, tmp_path / "sb.log"))
    simulator = ManagedProcess(ProcessSpec("simulator", SIMULATOR, (), 2, tmp_path / "sim.log"))
    supervisor.processes = [builder, simulator]
    launch(builder)
    launch(simulator)

    def sample(name: str, service: str) -> float | None:
        return registry.get_sample_value(name, {"service": service})

    def crash(process: ManagedProcess, code: int) -> None:
        assert process.popen is not None
        process.popen.returncode = code  # type: ignore[misc]

    now[0] = 10.0
    crash(builder, -9)
    assert supervisor.check()
    assert builder.status == "backoff" and builder.next_start_at == 11.0 and builder.restarts == 0
    assert sample("qrec_supervisor_processes", STATE_BUILDER) == 0
    assert sample("qrec_supervisor_desired_processes", STATE_BUILDER) == 1
    now[0] = 10.9
    assert not supervisor.check()  # still waiting
    now[0] = 11.0
    assert supervisor.check()
    assert builder.restarts == 1 and builder.status == "running"
    assert sample("qrec_supervisor_restarts_total", STATE_BUILDER) == 1
    assert sample("qrec_supervisor_processes", STATE_BUILDER) == 1

    now[0] = 12.0  # crashes again 1 s after the restart: the wait doubles
    crash(builder, 1)
    supervisor.check()
    assert builder.next_start_at == 14.0
    now[0] = 14.0
    supervisor.check()
    assert builder.restarts == 2

    now[0] = 15.0  # the simulator is done: not restarted
    crash(simulator, 0)
    supervisor.check()
    assert simulator.status == "finished" and simulator.popen is None
    assert sample("qrec_supervisor_desired_processes", SIMULATOR) == 0
    now[0] = 100.0
    supervisor.check()
    assert launched == ["state-builder-1", "simulator", "state-builder-1", "state-builder-1"]

    now[0] = 200.0  # ran 186 s before this crash: back to the initial wait
    crash(builder, 1)
    supervisor.check()
    assert builder.next_start_at == 201.0
    written = json.loads((tmp_path / "deployment.json").read_text())
    assert [(p["name"], p["status"], p["restarts"], p["exit_codes"]) for p in written["processes"]] == [
        ("state-builder-1", "backoff", 2, [-9, 1, 1]),
        ("simulator", "finished", 0, [0]),
    ]
    assert written["groups"] == groups_of("")
    # The live view shows the same.
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(supervisor.table())
    text = console.export_text()
    assert "state-builder-1" in text and "restart in 1.0 s" in text and "finished" in text


def test_a_second_up_on_a_running_deployment_folder_is_refused_and_leaves_it_alone(tmp_path: Path) -> None:
    running = {"state": "running", "supervisor": {"pid": os.getpid()}, "processes": []}
    (tmp_path / "deployment.json").write_text(json.dumps(running))
    config = UpConfig(bootstrap_servers="127.0.0.1:9092", run_dir=str(tmp_path))
    supervisor = Supervisor(config, Console(file=io.StringIO()))
    with pytest.raises(ValueError, match="already running from"):
        supervisor.start()
    supervisor.shutdown()  # what run_up does after a failed start
    assert json.loads((tmp_path / "deployment.json").read_text()) == running


def test_plan_with_a_replay_runs_it_last_on_the_namespaced_clickstream(tmp_path: Path) -> None:
    config = UpConfig(
        bootstrap_servers="127.0.0.1:9092",
        state_builders=1,
        actors=1,
        replay="events.jsonl",
        replay_speed="60",
        replay_args="--order time",
        namespace="ns2",
    )
    ports = iter(range(9101, 9200))
    specs = plan(config, tmp_path, "127.0.0.1:9092", lambda: next(ports))
    assert [s.name for s in specs] == ["learner", "state-builder-1", "actor-1", "replay"]
    replay = specs[-1].argv
    assert replay[0] == "replay"
    assert str(Path("events.jsonl").resolve()) in replay  # children may run elsewhere: absolute path
    assert value_of(replay, "--topic") == "ns2.qrec.clickstream.v1"
    assert value_of(replay, "--speed") == "60"
    assert "--no-progress" in replay and replay[-2:] == ("--order", "time")
    assert "--config" not in replay
    with_file = plan(config, tmp_path, "127.0.0.1:9092", lambda: next(ports), Path("qrec.toml"))
    assert all(value_of(s.argv, "--config") == str(Path("qrec.toml").resolve()) for s in with_file)

"""`qrec up`: a whole qrec deployment on one machine, one OS process per service, kept running.

The supervisor starts (unless pointed at an existing cluster) a local Apache Kafka broker, creates
the topics, then runs the learner, N state-builders, M actors and optionally the simulator or a
replay, each as ``python -m services.cli <service>`` with its own /metrics port and log file, and a
Prometheus server scraping all of them. A process that dies is restarted after an exponential
backoff (capped) and the restart is counted in ``qrec_supervisor_restarts_total``; the simulator or
a replay that finishes its work (exit status 0) is left finished. SIGTERM or Ctrl-C stops the
services in order (producers of new input first, the learner last, each with SIGTERM so it commits
offsets and checkpoints, SIGKILL after a timeout), then Prometheus, then the broker.

``RUN_DIR/deployment.json`` describes the running deployment (processes, pids, ports, topics,
groups) for `qrec status` and for people.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge
from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.config import BusConfig, make_bus
from services.local_kafka import LocalKafka
from services.metrics import MetricsServer, ProcessMetrics, serve_metrics
from services.ops.config import LOCAL, UpConfig
from services.topics import (
    CLICKSTREAM,
    DEAD_LETTER,
    MODEL,
    RECOMMENDATIONS,
    TRANSITIONS,
    USER_STATE,
    topic_specs,
)

DEPLOYMENT_FILE = "deployment.json"

# Service kinds, in the order they start; they stop in STOP_ORDER.
LEARNER, STATE_BUILDER, ACTOR, SIMULATOR, REPLAY = "learner", "state-builder", "actor", "simulator", "replay"
KINDS = (LEARNER, STATE_BUILDER, ACTOR, SIMULATOR, REPLAY)
STOP_ORDER: tuple[tuple[str, ...], ...] = ((SIMULATOR, REPLAY), (ACTOR,), (STATE_BUILDER,), (LEARNER,))
"""New input stops first, then the services downstream of it; the learner last, so it checkpoints
everything the state-builders flushed."""
FINITE = frozenset({SIMULATOR, REPLAY})
"""Kinds whose work can end: a clean exit (status 0) is not restarted."""
GROUPS = {STATE_BUILDER: "qrec-state-builder", ACTOR: "qrec-actor", LEARNER: "qrec-learner"}
COMMANDS = {
    LEARNER: "learner",
    STATE_BUILDER: "state-builder",
    ACTOR: "actor",
    SIMULATOR: "simulate",
    REPLAY: "replay",
}
"""The `qrec` subcommand that runs each kind of service."""


# ----------------------------------------------------------------------------------- pure rules


def backoff_seconds(failures: int, initial: float, maximum: float, factor: float = 2.0) -> float:
    """Seconds to wait before a restart after the ``failures``-th crash in a row (doubling, capped).

    ``initial * factor ** (failures - 1)``, at most ``maximum``.
    """
    if failures < 1:
        raise ValueError(f"failures must be at least 1, got {failures}")
    return float(min(maximum, initial * factor ** (failures - 1)))


def should_restart(kind: str, exit_code: int) -> bool:
    """Whether a process that exited with ``exit_code`` is restarted.

    Long-running services never end on their own, so any exit (even 0, e.g. someone else sent it
    SIGTERM) is restarted; the simulator and a replay are done when they exit with 0.
    """
    return not (kind in FINITE and exit_code == 0)


def stop_groups(processes: Mapping[str, str]) -> list[list[str]]:
    """Process names (``name -> kind``) in the order they are stopped: one list per step, sorted."""
    groups = [sorted(name for name, kind in processes.items() if kind in kinds) for kinds in STOP_ORDER]
    unknown = sorted(name for name, kind in processes.items() if kind not in KINDS)
    if unknown:
        raise ValueError(f"unknown service kind for {', '.join(unknown)}")
    return [group for group in groups if group]


def namespaced(name: str, namespace: str) -> str:
    """A topic or group name inside a namespace (``ns.name``); the name itself without one."""
    return f"{namespace}.{name}" if namespace else name


def topics_of(namespace: str) -> dict[str, str]:
    """qrec's topic names (standard name -> name in the namespace)."""
    return {spec.name: namespaced(spec.name, namespace) for spec in topic_specs(1)}


def groups_of(namespace: str) -> dict[str, dict[str, Any]]:
    """The consumer groups of a deployment: group name -> the service kind and the topics it reads."""
    topics = topics_of(namespace)
    reads = {
        STATE_BUILDER: [topics[CLICKSTREAM], topics[RECOMMENDATIONS]],
        ACTOR: [topics[USER_STATE]],
        LEARNER: [topics[TRANSITIONS]],
    }
    return {namespaced(GROUPS[kind], namespace): {"service": kind, "topics": reads[kind]} for kind in GROUPS}


def prometheus_config(
    jobs: Mapping[str, Sequence[str]], scrape_interval: str, rule_files: Sequence[str] = ()
) -> dict[str, Any]:
    """A Prometheus configuration scraping ``jobs`` (job name -> host:port targets) at /metrics."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(targets)}],
            }
            for job, targets in sorted(jobs.items())
            if targets
        ],
    }
    if rule_files:
        config["rule_files"] = list(rule_files)
    return config


@dataclass(frozen=True)
class ProcessSpec:
    """One service process of the deployment: what runs, where its metrics and log go."""

    name: str
    kind: str
    argv: tuple[str, ...]
    metrics_port: int
    log: Path


def plan(
    config: UpConfig,
    run_dir: Path,
    bootstrap_servers: str,
    port: Callable[[], int],
    config_file: Path | None = None,
) -> list[ProcessSpec]:
    """The processes of a deployment, in start order; ``port()`` gives each one a metrics port.

    ``config_file`` (the TOML file `qrec up` was given) is passed on: its top-level keys and each
    service's own table configure the children; the flags set here take precedence.
    """
    topics = topics_of(config.namespace)
    groups = {kind: namespaced(group, config.namespace) for kind, group in GROUPS.items()}
    common = ["--bootstrap-servers", bootstrap_servers, "--no-create-topics", "--metrics-host", "127.0.0.1"]
    if config_file is not None:
        common += ["--config", str(Path(config_file).resolve())]
    for flag, value in (
        ("--kafka-client", config.kafka_client),
        ("--client-id", config.client_id),
        ("--security-protocol", config.security_protocol),
        ("--sasl-mechanism", config.sasl_mechanism),
        ("--sasl-plain-username", config.sasl_plain_username),
        ("--ssl-cafile", config.ssl_cafile),
        ("--ssl-certfile", config.ssl_certfile),
        ("--ssl-keyfile", config.ssl_keyfile),
    ):
        name = flag.removeprefix("--").replace("-", "_")
        if value is not None and value != BusConfig.__dataclass_fields__[name].default:
            common += [flag, value]
    specs: list[ProcessSpec] = []

    def add(name: str, kind: str, args: list[str], extra: str) -> None:
        metrics_port = port()
        argv = (COMMANDS[kind], *common, "--metrics-port", str(metrics_port), *args, *shlex.split(extra))
        specs.append(ProcessSpec(name, kind, argv, metrics_port, run_dir / "logs" / f"{name}.log"))

    add(
        LEARNER,
        LEARNER,
        [
            "--group-id", groups[LEARNER],
            "--transitions-topic", topics[TRANSITIONS],
            "--model-topic", topics[MODEL],
            "--dead-letter-topic", topics[DEAD_LETTER],
            "--checkpoint-dir", str(run_dir / "learner"),
        ],
        config.learner_args,
    )  # fmt: skip
    for i in range(1, config.state_builders + 1):
        add(
            f"{STATE_BUILDER}-{i}",
            STATE_BUILDER,
            [
                "--group-id", groups[STATE_BUILDER],
                "--clickstream-topic", topics[CLICKSTREAM],
                "--recommendations-topic", topics[RECOMMENDATIONS],
                "--user-state-topic", topics[USER_STATE],
                "--transitions-topic", topics[TRANSITIONS],
                "--dead-letter-topic", topics[DEAD_LETTER],
            ],
            config.state_builder_args,
        )  # fmt: skip
    for i in range(1, config.actors + 1):
        add(
            f"{ACTOR}-{i}",
            ACTOR,
            [
                "--group-id", groups[ACTOR],
                "--user-state-topic", topics[USER_STATE],
                "--model-topic", topics[MODEL],
                "--recommendations-topic", topics[RECOMMENDATIONS],
                "--dead-letter-topic", topics[DEAD_LETTER],
            ],
            config.actor_args,
        )  # fmt: skip
    if config.simulate:
        args = [
            "--clickstream-topic", topics[CLICKSTREAM],
            "--recommendations-topic", topics[RECOMMENDATIONS],
            "--dead-letter-topic", topics[DEAD_LETTER],
            "--speed", repr(config.simulate_speed),
            "--seed", str(config.simulate_seed),
            "--shoppers", str(config.simulate_shoppers),
            "--summary-out", str(run_dir / "simulator-summary.json"),
        ]  # fmt: skip
        if config.simulate_duration_seconds is not None:
            args += ["--duration-seconds", repr(config.simulate_duration_seconds)]
        add(SIMULATOR, SIMULATOR, args, config.simulate_args)
    if config.replay:
        add(
            REPLAY,
            REPLAY,
            [
                str(Path(config.replay).resolve()),
                "--topic", topics[CLICKSTREAM],
                "--dead-letter-topic", topics[DEAD_LETTER],
                "--speed", config.replay_speed,
                "--no-progress",
            ],
            config.replay_args,
        )  # fmt: skip
    return specs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] != "Z"


def read_deployment(run_dir: Path) -> dict[str, Any]:
    """The deployment.json of a run folder; a clear error when there is none."""
    path = Path(run_dir) / DEPLOYMENT_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} does not exist: start a deployment with `qrec up --run-dir {run_dir}` or pass "
            "--bootstrap-servers and --metrics-urls"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return data


# ---------------------------------------------------------------------------------- supervisor


class SupervisorMetrics(ProcessMetrics):
    """What the supervisor exports: running processes and restarts, per service kind."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "supervisor")
        self.restarts = Counter(
            "qrec_supervisor_restarts_total",
            "Processes restarted after they exited, by service",
            ["service"],
            registry=registry,
        )
        self.processes = Gauge(
            "qrec_supervisor_processes", "Processes running, by service", ["service"], registry=registry
        )
        self.desired = Gauge(
            "qrec_supervisor_desired_processes",
            "Processes that should be running, by service (finished simulator or replay: 0)",
            ["service"],
            registry=registry,
        )


@dataclass
class ManagedProcess:
    """A service process and its restart bookkeeping."""

    spec: ProcessSpec
    popen: subprocess.Popen[bytes] | None = None
    status: str = "pending"  # pending, running, backoff, finished, stopped
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0  # crashes in a row, for the backoff
    next_start_at: float = 0.0
    last_exit_code: int | None = None
    exit_codes: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None


class Supervisor:
    """Starts, watches, restarts and stops the processes of one deployment."""

    def __init__(
        self,
        config: UpConfig,
        console: Console,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        config_file: Path | None = None,
    ) -> None:
        self.config = config
        self.config_file = config_file
        self.console = console
        self.clock = clock
        self.run_dir = Path(config.run_dir).resolve()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = SupervisorMetrics(self.registry)
        self.processes: list[ManagedProcess] = []
        self.kafka: LocalKafka | None = None
        self.bootstrap_servers = config.bootstrap_servers
        self.prometheus: subprocess.Popen[bytes] | None = None
        self.prometheus_url: str | None = None
        self.metrics_server: MetricsServer | None = None
        self.stop_event = threading.Event()
        self.started_wall = time.time()
        self._log: TextIO | None = None
        self._owns_run_dir = False  # set once no other running deployment uses the run folder
        self._live_view = False

    # -- output --------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self._log is not None:
            self._log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
            self._log.flush()
        if not self._live_view:  # while the live table is shown, it tells the same
            self.console.print(f"{stamp} {message}", highlight=False, markup=False)

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Bring the whole deployment up; the processes run when this returns."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        previous = self.run_dir / DEPLOYMENT_FILE
        running_pid = None
        with contextlib.suppress(ValueError, OSError, AttributeError):  # no file, or not ours
            old = json.loads(previous.read_text())
            pid = old.get("supervisor", {}).get("pid")
            if old.get("state") == "running" and isinstance(pid, int) and pid_alive(pid):
                running_pid = pid
        if running_pid is not None:
            raise ValueError(
                f"a deployment is already running from {self.run_dir} (qrec up, pid {running_pid}); "
                "stop it first or pass another --run-dir"
            )
        self._owns_run_dir = True
        self._log = (self.run_dir / "logs" / "supervisor.log").open("a", encoding="utf-8")
        port = self.config.metrics_port if self.config.metrics_port is not None else 0
        self.metrics_server = serve_metrics(self.registry, port, self.config.metrics_host)
        self.metrics.up.labels("supervisor").set(1)
        self.say(f"supervisor metrics on {self.metrics_server.url}")
        if self.config.bootstrap_servers == LOCAL:
            self.say(f"starting Apache Kafka in {self.run_dir / 'kafka'} (first start fetches the jars) ...")
            self.kafka = LocalKafka(self.run_dir / "kafka", owner_pid=os.getpid()).start()
            self.bootstrap_servers = self.kafka.bootstrap_servers
            self.say(f"Kafka is up at {self.bootstrap_servers}")
        self._create_topics()
        for spec in plan(self.config, self.run_dir, self.bootstrap_servers, free_port, self.config_file):
            self.processes.append(ManagedProcess(spec))
            # Exported at 0 from the start, so increase() sees the first restart too.
            self.metrics.restarts.labels(spec.kind)
        for process in self.processes:
            self._launch(process)
        self._start_prometheus()
        self._update_gauges()
        self.write_deployment("running")

    def _create_topics(self) -> None:
        config = replace(self.config, bootstrap_servers=self.bootstrap_servers)
        bus = make_bus(config)
        try:
            specs = [
                replace(s, name=namespaced(s.name, config.namespace)) for s in topic_specs(config.partitions)
            ]
            created = bus.create_topics(specs)
        finally:
            bus.close()
        self.say(f"topics: {len(created)} created, {len(specs) - len(created)} already there")

    def _launch(self, process: ManagedProcess) -> None:
        spec = process.spec
        env = dict(os.environ)
        # The password goes through the environment, never the command line (visible in `ps`).
        if self.config.sasl_plain_password is not None:
            env["QREC_SASL_PLAIN_PASSWORD"] = self.config.sasl_plain_password
        with spec.log.open("ab") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%dT%H:%M:%S')} qrec {shlex.join(spec.argv)}\n".encode())
            log.flush()
            process.popen = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *spec.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own session: Ctrl-C in the terminal reaches only the supervisor, which then
                # stops the services in order.
                start_new_session=True,
            )
        process.status = "running"
        process.started_at = self.clock()
        self.say(
            f"started {spec.name} (pid {process.popen.pid}, metrics :{spec.metrics_port}, log {spec.log})"
        )

    def _start_prometheus(self) -> None:
        if not self.config.prometheus:
            return
        binary = shutil.which("prometheus")
        if binary is None:
            self.say("prometheus is not installed: no Prometheus server (apt-get install prometheus)")
            return
        directory = self.run_dir / "prometheus"
        directory.mkdir(exist_ok=True)
        jobs: dict[str, list[str]] = {"qrec-supervisor": [f"127.0.0.1:{self.metrics_port}"]}
        for process in self.processes:
            jobs.setdefault(f"qrec-{process.spec.kind}", []).append(f"127.0.0.1:{process.spec.metrics_port}")
        rules = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
        config = prometheus_config(jobs, self.config.scrape_interval, [str(rules)] if rules.exists() else [])
        (directory / "prometheus.yml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        port = self.config.prometheus_port or free_port()
        with (self.run_dir / "logs" / "prometheus.log").open("ab") as log:
            self.prometheus = subprocess.Popen(
                [
                    binary,
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=7d",
                    "--scrape.discovery-reload-interval=100ms",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.prometheus_url = f"http://127.0.0.1:{port}"
        self.say(f"Prometheus on {self.prometheus_url} (pid {self.prometheus.pid})")

    @property
    def metrics_port(self) -> int:
        assert self.metrics_server is not None
        return self.metrics_server.port

    # -- watch ---------------------------------------------------------------------------------

    def check(self) -> bool:
        """Notice exits, restart what is due; True when something changed (deployment.json rewritten)."""
        now = self.clock()
        changed = False
        for process in self.processes:
            popen = process.popen
            if popen is not None and popen.poll() is not None:
                code = popen.returncode
                process.popen = None
                process.last_exit_code = code
                process.exit_codes.append(code)
                changed = True
                if not should_restart(process.spec.kind, code):
                    process.status = "finished"
                    self.say(f"{process.spec.name} finished (exit status 0)")
                    continue
                ran = now - process.started_at
                process.failures = 1 if ran >= self.config.backoff_reset_seconds else process.failures + 1
                delay = backoff_seconds(
                    process.failures, self.config.backoff_initial_seconds, self.config.backoff_max_seconds
                )
                process.status = "backoff"
                process.next_start_at = now + delay
                self.say(
                    f"{process.spec.name} exited with status {code} after {ran:.1f} s; "
                    f"restarting in {delay:.1f} s (crash {process.failures} in a row; log {process.spec.log})"
                )
            if process.status == "backoff" and now >= process.next_start_at:
                process.restarts += 1
                self.metrics.restarts.labels(process.spec.kind).inc()
                self._launch(process)
                changed = True
        if self.prometheus is not None and self.prometheus.poll() is not None:
            self.say(f"Prometheus exited with status {self.prometheus.returncode} (see logs/prometheus.log)")
            self.prometheus = None
            changed = True
        self._update_gauges()
        if changed:
            self.write_deployment("running")
        return changed

    def _update_gauges(self) -> None:
        for kind in {p.spec.kind for p in self.processes}:
            mine = [p for p in self.processes if p.spec.kind == kind]
            self.metrics.processes.labels(kind).set(sum(1 for p in mine if p.popen is not None))
            self.metrics.desired.labels(kind).set(sum(1 for p in mine if p.status != "finished"))

    def handle_signals(self) -> None:
        """SIGTERM, SIGINT (Ctrl-C) and SIGHUP ask the supervisor to stop the deployment in order."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: self.stop_event.set())

    def run(self) -> None:
        """Watch until asked to stop (see handle_signals), then stop everything in order."""
        live = None
        if not self.config.quiet and self.console.is_terminal:
            live = Live(self.table(), console=self.console, refresh_per_second=2)
            live.start()
            self._live_view = True
        try:
            while not self.stop_event.wait(0.2):
                self.check()
                if live is not None:
                    live.update(self.table())
        finally:
            if live is not None:
                live.stop()
                self._live_view = False
            self.shutdown()

    def table(self) -> Table:
        """The live view: one row per process."""
        table = Table(
            title=f"qrec up: Kafka {self.bootstrap_servers}, "
            f"Prometheus {self.prometheus_url or 'off'}, logs in {self.run_dir / 'logs'}  (Ctrl-C stops)"
        )
        for column in ("process", "pid", "status", "restarts", "uptime", "metrics"):
            table.add_column(
                column, justify="left" if column in ("process", "status", "metrics") else "right"
            )
        now = self.clock()
        for process in self.processes:
            up = f"{now - process.started_at:,.0f} s" if process.popen is not None else ""
            status = process.status
            if status == "backoff":
                status = f"restart in {max(0.0, process.next_start_at - now):.1f} s"
            table.add_row(
                process.spec.name,
                str(process.pid or ""),
                status,
                str(process.restarts),
                up,
                f"http://127.0.0.1:{process.spec.metrics_port}/metrics",
            )
        return table

    # -- stop ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop every process in STOP_ORDER (SIGTERM, then SIGKILL after the timeout), Prometheus, Kafka."""
        self.say("stopping ...")
        by_name = {p.spec.name: p for p in self.processes}
        for group in stop_groups({p.spec.name: p.spec.kind for p in self.processes}):
            self._stop_group([by_name[name] for name in group])
        if self.prometheus is not None:
            _terminate(self.prometheus, 10.0)
            self.prometheus = None
        self._update_gauges()
        if self._owns_run_dir:
            self.write_deployment("stopped")
        if self.kafka is not None:
            self.say("stopping Kafka ...")
            try:
                self.kafka.stop()
            except RuntimeError as exc:
                self.say(f"stopping Kafka failed: {exc}")
        if self.metrics_server is not None:
            self.metrics.up.labels("supervisor").set(0)
            self.metrics_server.stop()
        self.say("stopped")
        if self._log is not None:
            self._log.close()
            self._log = None

    def _stop_group(self, group: Iterable[ManagedProcess]) -> None:
        running = []
        for process in group:
            if process.popen is None:
                if process.status != "finished":
                    process.status = "stopped"
                continue
            with contextlib.suppress(ProcessLookupError):
                process.popen.send_signal(signal.SIGTERM)
            running.append(process)
        deadline = self.clock() + self.config.stop_timeout_seconds
        for process in running:
            assert process.popen is not None
            try:
                code = process.popen.wait(timeout=max(0.0, deadline - self.clock()))
                self.say(f"{process.spec.name} stopped (exit status {code})")
            except subprocess.TimeoutExpired:
                process.popen.kill()
                code = process.popen.wait()
                self.say(
                    f"{process.spec.name} did not stop within {self.config.stop_timeout_seconds:g} s: killed"
                )
            process.last_exit_code = code
            process.exit_codes.append(code)
            process.popen = None
            process.status = "stopped"

    # -- deployment.json -----------------------------------------------------------------------

    def deployment(self, state: str) -> dict[str, Any]:
        """What deployment.json holds."""
        return {
            "state": state,
            "run_dir": str(self.run_dir),
            "started_at": self.started_wall,
            "updated_at": time.time(),
            "bootstrap_servers": self.bootstrap_servers,
            "namespace": self.config.namespace,
            "partitions": self.config.partitions,
            "topics": topics_of(self.config.namespace),
            "groups": groups_of(self.config.namespace),
            "supervisor": {
                "pid": os.getpid(),
                "metrics_url": self.metrics_server.url if self.metrics_server is not None else None,
            },
            "prometheus": (
                {"url": self.prometheus_url, "pid": self.prometheus.pid}
                if self.prometheus is not None
                else None
            ),
            "kafka": (
                {"dir": str(self.kafka.directory), "pid": self.kafka.pid} if self.kafka is not None else None
            ),
            "processes": [
                {
                    "name": p.spec.name,
                    "kind": p.spec.kind,
                    "pid": p.pid,
                    "status": p.status,
                    "restarts": p.restarts,
                    "exit_codes": p.exit_codes,
                    "metrics_port": p.spec.metrics_port,
                    "metrics_url": f"http://127.0.0.1:{p.spec.metrics_port}/metrics",
                    "log": str(p.spec.log),
                    "command": ["qrec", *p.spec.argv],
                }
                for p in self.processes
            ],
        }

    def write_deployment(self, state: str) -> None:
        path = self.run_dir / DEPLOYMENT_FILE
        staging = path.with_suffix(".json.tmp")
        staging.write_text(json.dumps(self.deployment(state), indent=2) + "\n")
        os.replace(staging, path)


def _terminate(popen: subprocess.Popen[bytes], timeout_s: float) -> None:
    if popen.poll() is not None:
        return
    popen.terminate()
    try:
        popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()


def run_up(config: UpConfig, console: Console, config_file: Path | None = None) -> Supervisor:
    """`qrec up`: start the deployment, watch it until stopped, stop it in order."""
    supervisor = Supervisor(config, console, config_file=config_file)
    supervisor.handle_signals()
    try:
        supervisor.start()
    except BaseException:
        supervisor.shutdown()
        raise
    supervisor.run()
    return supervisor

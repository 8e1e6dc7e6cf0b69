"""`qrec demo --processes`: the demo's services as separate OS processes on Kafka, as they are deployed.

The state-builder, the actor, the DQN learner, the bandit learner and the tabular Q-learner each run
as ``python -m services.cli <service>``, with the same settings the in-process demo gives them
(built by the same functions, passed as flags), their own /metrics endpoint and a log file in
``OUT/logs``. This process plays the shoppers: the simulated clock runs ``--speed`` times as fast as
the wall clock, organic events go to the clickstream, every recommendation that arrives is shown
to its shopper and the reaction goes back. The books (groups, windows, exposure) and the report
are the in-process demo's; the services' numbers (transitions, updates, model version, loss,
exploration) are scraped from their /metrics endpoints at each report window.

Topics and consumer groups carry a run prefix (``qrec-demo-<run id>.``), so a run starts from empty
topics and leaves other deployments on the same cluster alone; the topics stay on the cluster
afterwards (delete them with the cluster's own tools). The oracle is not a service: it reads the
simulator's hidden preferences, which only this process has, so the split has no oracle group.

Unlike the in-process demo, the services run on their own time, so a run is not reproducible to
the event, and how many updates the learners make depends on the machine's speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.actor.config import BANDIT_MODEL, ActorConfig
from services.bus.base import Bus, TopicPartition
from services.config import BusConfig, config_args
from services.demo import (
    SPLIT_SALT,
    ClosedLoop,
    DemoConfig,
    LearnerTotals,
    ServiceNumbers,
    Window,
    learner_config,
    tabular_config,
)
from services.learner.tabular import TABULAR_MODEL, model_topic_spec
from services.ops.status import Samples, parse_metrics, total
from services.ops.supervisor import free_port, namespaced
from services.state_builder.config import StateBuilderConfig
from services.topics import (
    CLICKSTREAM,
    DEAD_LETTER,
    MODEL,
    RECOMMENDATIONS,
    TRANSITIONS,
    USER_STATE,
    topic_specs,
)

STARTUP_TIMEOUT_SECONDS = 300.0
"""How long the services may take to come up (importing JAX and compiling, on a busy machine)."""
GROUP_MEMBERS = ("state-builder", "actor")
"""Services between a shopper's event and their slate: up only once they own partitions."""
STOP_TIMEOUT_SECONDS = 60.0
"""How long each service may take to stop after SIGTERM (the learners publish and checkpoint)."""
STOP_ORDER = ("actor", "state-builder", "learner", "bandit", "tabular-learner")
"""Upstream first: no new recommendations, then no new transitions, then the learners' last models."""


@dataclass
class ServiceProcess:
    """One service of the demo running as its own OS process."""

    name: str
    command: str  # the qrec subcommand
    args: list[str]
    metrics_port: int
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    exit_code: int | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class ServiceFailed(RuntimeError):
    """A service process of the demo exited or never came up."""


def scrape(url: str, timeout_s: float = 5.0) -> Samples:
    """Every sample a /metrics endpoint serves."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse_metrics(response.read().decode())


class ProcessDemo(ClosedLoop):
    """The shop in this process; the state-builder, actor and learners as separate processes on Kafka."""

    def __init__(
        self, config: DemoConfig, bus: Bus, workdir: Path, *, say: Callable[[str], Any] = print
    ) -> None:
        super().__init__(config, config.process_policies)
        self.bus = bus
        self.say = say
        self.namespace = f"qrec-demo-{uuid.uuid4().hex[:8]}"
        names = [spec.name for spec in topic_specs(1)] + [BANDIT_MODEL, TABULAR_MODEL]
        topic = self.topic = {name: namespaced(name, self.namespace) for name in names}
        self.clickstream_topic = topic[CLICKSTREAM]
        self.logs = Path(config.out) / "logs"
        connection = {
            f.name: getattr(config, f.name) for f in dataclasses.fields(BusConfig) if f.name != "metrics_port"
        }
        common: dict[str, Any] = {**connection, "create_topics": False, "metrics_host": "127.0.0.1"}
        group = f"{self.namespace}.qrec-"
        configs: dict[str, tuple[str, Any]] = {
            "learner": (
                "learner",
                learner_config(
                    config,
                    gamma=config.gamma,
                    group_id=group + "learner",
                    transitions_topic=topic[TRANSITIONS],
                    model_topic=topic[MODEL],
                    dead_letter_topic=topic[DEAD_LETTER],
                    checkpoint_dir=str(workdir / "learner"),
                    **common,
                ),
            ),
            "state-builder": (
                "state-builder",
                StateBuilderConfig(
                    group_id=group + "state-builder",
                    clickstream_topic=topic[CLICKSTREAM],
                    recommendations_topic=topic[RECOMMENDATIONS],
                    user_state_topic=topic[USER_STATE],
                    transitions_topic=topic[TRANSITIONS],
                    dead_letter_topic=topic[DEAD_LETTER],
                    window=config.window,
                    **common,
                ),
            ),
            "actor": (
                "actor",
                ActorConfig(
                    group_id=group + "actor",
                    policies=config.process_policies,
                    split_salt=SPLIT_SALT,
                    epsilon=config.epsilon,
                    epsilon_end=config.epsilon_end,
                    exploration_decay_steps=config.exploration_decay_steps,
                    seed=config.seed,
                    user_state_topic=topic[USER_STATE],
                    model_topic=topic[MODEL],
                    bandit_model_topic=topic[BANDIT_MODEL],
                    tabular_model_topic=topic[TABULAR_MODEL],
                    recommendations_topic=topic[RECOMMENDATIONS],
                    dead_letter_topic=topic[DEAD_LETTER],
                    **common,
                ),
            ),
        }
        if "bandit" in self.split.names:
            configs["bandit"] = (
                "learner",
                learner_config(
                    config,
                    gamma=0.0,
                    bandit=True,
                    group_id=group + "bandit",
                    transitions_topic=topic[TRANSITIONS],
                    model_topic=topic[BANDIT_MODEL],
                    dead_letter_topic=topic[DEAD_LETTER],
                    checkpoint_dir=str(workdir / "bandit"),
                    **common,
                ),
            )
        if "tabular_q" in self.split.names:
            configs["tabular-learner"] = (
                "tabular-learner",
                tabular_config(
                    config,
                    clickstream_topic=topic[CLICKSTREAM],
                    transitions_topic=topic[TRANSITIONS],
                    model_topic=topic[TABULAR_MODEL],
                    dead_letter_topic=topic[DEAD_LETTER],
                    **common,
                ),
            )
        self.processes: dict[str, ServiceProcess] = {}
        for name, (command, service_config) in configs.items():
            port = free_port()
            service_config = replace(service_config, metrics_port=port)
            self.processes[name] = ServiceProcess(
                name, command, config_args(service_config), port, self.logs / f"{name}.log"
            )
        self._last: dict[str, Samples] = {}
        self._totals: LearnerTotals | None = None
        self.recs: Any = None

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        specs = [replace(s, name=self.topic[s.name]) for s in topic_specs(4)]
        specs += [
            replace(model_topic_spec(name), name=self.topic[name]) for name in (BANDIT_MODEL, TABULAR_MODEL)
        ]
        self.bus.create_topics(specs)
        self.logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.config.sasl_plain_password is not None:  # never on a command line, where ps shows it
            env["QREC_SASL_PLAIN_PASSWORD"] = self.config.sasl_plain_password
        if self.config.compile_cache:
            env["JAX_COMPILATION_CACHE_DIR"] = str(Path(self.config.compile_cache).resolve())
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
        for process in self.processes.values():
            with process.log.open("wb") as log:
                process.popen = subprocess.Popen(
                    [sys.executable, "-m", "services.cli", process.command, *process.args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # Ctrl-C reaches this process, which stops them in order
                )
            process.pid = process.popen.pid
            self.say(f"started {process.name} (pid {process.popen.pid}, metrics {process.metrics_url})")
        self._wait_until_up()
        self.producer = self.bus.producer()
        self.recs = self.bus.consumer()
        topic = self.topic[RECOMMENDATIONS]
        parts = [TopicPartition(topic, p) for p in range(self.bus.partitions_for(topic))]
        self.recs.assign(parts)
        self.recs.seek_to_end(parts)
        for tp in parts:  # resolve the lazy seek now, before the first shopper acts
            self.recs.position(tp)
        self.started_wall = time.monotonic()

    def _wait_until_up(self) -> None:
        """Until every service reports qrec_service_up 1 (the actor after compiling its programs) and
        the shoppers' path is open: the state-builder and the actor have joined their groups and own
        partitions. Before that the shop's clock would run while nobody serves (a short run on a busy
        machine could pass with no slate at all)."""
        waiting = set(self.processes)
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while waiting:
            self._check_alive()
            for name in sorted(waiting):
                with contextlib.suppress(OSError):
                    samples = scrape(self.processes[name].metrics_url, 1.0)
                    up = (total(samples, "qrec_service_up") or 0) >= 1
                    if up and name in GROUP_MEMBERS:
                        up = (total(samples, "qrec_consumer_assigned_partitions") or 0) >= 1
                    if up:
                        waiting.discard(name)
                        self.say(f"{name} is up")
            if waiting and time.monotonic() > deadline:
                names = ", ".join(sorted(waiting))
                raise ServiceFailed(
                    f"{names} did not come up within {STARTUP_TIMEOUT_SECONDS:g} s; see {self.logs}"
                )
            if waiting:
                time.sleep(0.25)

    def _check_alive(self) -> None:
        for process in self.processes.values():
            if process.popen is not None and process.popen.poll() is not None:
                process.exit_code = process.popen.returncode
                process.popen = None
                raise ServiceFailed(
                    f"{process.name} exited with status {process.exit_code} during the demo; its log "
                    f"{process.log} ends with:\n{process.log_tail()}"
                )

    # -- run ---------------------------------------------------------------------------------

    def _step(self, now: int, end: int, window: Window) -> int:
        """Slates that arrived are shown at the shop's time now, which runs --speed times the wall clock."""
        self._check_alive()
        records = self.recs.poll(
            max_records=5000, timeout_s=min(0.2, self.config.tick_seconds / self.config.speed)
        )
        elapsed_s = time.monotonic() - self.started_wall
        now = max(now, min(end, self.sim.config.start_time_ms + int(elapsed_s * self.config.speed * 1000)))
        self._send(self.sim.advance(now), window)
        self._show(records, now, window)
        self.producer.flush()
        return now

    def _scrape_all(self) -> None:
        """Read every service's /metrics (one that does not answer keeps its last numbers)."""
        for name, process in self.processes.items():
            with contextlib.suppress(OSError):
                self._last[name] = scrape(process.metrics_url)

    def _value(self, process: str, name: str) -> float:
        """A metric's total as ``process`` last reported it (0 when it has not)."""
        return total(self._last.get(process, {}), name) or 0.0

    def service_numbers(self) -> ServiceNumbers:
        self._scrape_all()
        slots = self._value("actor", "qrec_actor_slots_total")
        return ServiceNumbers(
            transitions=int(self._value("learner", "qrec_learner_transitions_total")),
            updates=int(self._value("learner", "qrec_learner_updates_total")),
            model_version=int(self._value("learner", "qrec_learner_model_version")),
            loss=self._value("learner", "qrec_learner_loss"),
            explored_share=self._value("actor", "qrec_actor_explored_slots_total") / slots if slots else None,
        )

    def learner_totals(self) -> LearnerTotals:
        if self._totals is not None:
            return self._totals
        self._scrape_all()
        return LearnerTotals(
            model_version=int(self._value("learner", "qrec_learner_model_version")),
            updates=int(self._value("learner", "qrec_learner_updates_total")),
            bandit_updates=int(self._value("bandit", "qrec_learner_updates_total")),
            tabular_updates=int(self._value("tabular-learner", "qrec_tabular_updates_total")),
        )

    def run_details(self) -> dict[str, Any]:
        return {
            "mode": "processes",
            "namespace": self.namespace,
            "speed": self.config.speed,
            "processes": {
                name: {
                    "command": process.command,
                    "pid": process.pid,
                    "exit_code": process.exit_code,
                    "log": str(process.log),
                }
                for name, process in self.processes.items()
            },
        }

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the services in STOP_ORDER with SIGTERM: each flushes and commits, the learners publish.

        The learners' totals are read once nothing new reaches them, just before they stop.
        """
        for name in STOP_ORDER:
            if name == "learner":
                self._totals = self.learner_totals()
            process = self.processes.get(name)
            if process is None or process.popen is None:
                continue
            popen = process.popen
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                process.exit_code = popen.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                popen.kill()
                process.exit_code = popen.wait()
                self.say(f"{name} did not stop within {STOP_TIMEOUT_SECONDS:g} s: killed")
            process.popen = None
            self.say(f"{name} stopped (exit status {process.exit_code})")

    def close(self) -> None:
        """Kill whatever still runs (after a failure), and close this process's clients."""
        for process in self.processes.values():
            popen = process.popen
            if popen is not None and popen.poll() is None:
                popen.terminate()
                try:
                    process.exit_code = popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    process.exit_code = popen.wait()
        if self.recs is not None:
            self.recs.close()
        producer = getattr(self, "producer", None)
        if producer is not None:
            producer.flush()
            producer.close()

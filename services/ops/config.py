"""Settings of `qrec up` (the supervisor) and `qrec status`."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from services.config import BusConfig, ConfigError, register, setting

LOCAL = "local"
"""Bootstrap servers value that makes `qrec up` start its own Kafka broker."""


@register("up")
@dataclass(frozen=True, kw_only=True)
class UpConfig(BusConfig):
    """A complete qrec deployment on one machine, one OS process per service, kept running."""

    bootstrap_servers: str = setting(
        LOCAL,
        help="Kafka bootstrap servers (host:port[,host:port]) of an existing cluster, or 'local' to start "
        "Apache Kafka from deploy/kafka in RUN_DIR/kafka",
    )
    run_dir: str = setting(
        "qrec-run", help="folder for the logs (one file per process), deployment.json and checkpoints"
    )
    state_builders: int = setting(2, help="state-builder processes (they share the clickstream partitions)")
    actors: int = setting(2, help="actor processes (they share the user-state partitions)")
    simulate: bool = setting(False, help="also run simulated shoppers (qrec simulate) against the deployment")
    simulate_speed: float = setting(1.0, help="simulated seconds per wall-clock second for --simulate")
    simulate_duration_seconds: float | None = setting(
        None, help="stop the simulated shoppers after this much simulated time (unset: run until stopped)"
    )
    simulate_seed: int = setting(0, help="seed of the simulated shop")
    simulate_shoppers: int = setting(500, help="simulated shoppers")
    replay: str | None = setting(
        None, help="also replay this event log (qrec replay LOG) into the clickstream"
    )
    replay_speed: str = setting("max", help="speed of --replay: 'max' or N times the log's real time")
    namespace: str = setting(
        "",
        help="prefix of topic and consumer group names ('staging' gives staging.qrec.clickstream.v1), "
        "so several deployments can share a cluster",
    )
    partitions: int = setting(6, help="partitions per topic when the topics are created")
    prometheus: bool = setting(
        True,
        help="start a Prometheus server scraping every process (when the prometheus binary is installed)",
    )
    prometheus_port: int = setting(
        9090, help="port of the Prometheus server's web UI and API (0: a free one)"
    )
    scrape_interval: str = setting("5s", help="Prometheus scrape interval (a Prometheus duration, e.g. 1s)")
    backoff_initial_seconds: float = setting(
        1.0, help="wait before restarting a crashed process the first time"
    )
    backoff_max_seconds: float = setting(
        60.0, help="longest wait between restarts (the wait doubles after each crash up to this)"
    )
    backoff_reset_seconds: float = setting(
        120.0, help="a process that ran this long before crashing is restarted after the initial wait again"
    )
    stop_timeout_seconds: float = setting(
        30.0, help="how long each process may take to stop after SIGTERM before it is killed (SIGKILL)"
    )
    learner_args: str = setting("", help="extra flags for the learner, e.g. '--min-replay-size 500'")
    state_builder_args: str = setting("", help="extra flags for every state-builder")
    actor_args: str = setting("", help="extra flags for every actor, e.g. '--epsilon 0.05'")
    simulate_args: str = setting("", help="extra flags for the simulator, e.g. '--items 500'")
    replay_args: str = setting("", help="extra flags for the replay, e.g. '--order time'")
    quiet: bool = setting(False, help="no live view: print only start, exit and restart lines")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bootstrap_servers == "embedded":
            raise ConfigError(
                "qrec up runs each service as its own process and needs Kafka: pass --bootstrap-servers "
                "HOST:PORT, or 'local' to start a broker (qrec demo runs everything on the embedded bus)"
            )
        for name in ("state_builders", "actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.partitions < 1:
            raise ConfigError(f"partitions must be at least 1, got {self.partitions}")
        if self.simulate and self.replay:
            raise ConfigError("choose --simulate or --replay LOG, not both (both write the clickstream)")
        if not self.simulate_speed > 0:
            raise ConfigError(f"simulate_speed must be > 0, got {self.simulate_speed}")
        if not 0 <= self.prometheus_port <= 65535:
            raise ConfigError(f"prometheus_port must be between 0 and 65535, got {self.prometheus_port}")
        if not 0 < self.backoff_initial_seconds <= self.backoff_max_seconds:
            raise ConfigError(
                "backoff_initial_seconds must be > 0 and at most backoff_max_seconds, got "
                f"{self.backoff_initial_seconds} and {self.backoff_max_seconds}"
            )
        if self.stop_timeout_seconds <= 0:
            raise ConfigError(f"stop_timeout_seconds must be > 0, got {self.stop_timeout_seconds}")
        if self.namespace and not all(c.isalnum() or c in "._-" for c in self.namespace):
            raise ConfigError(
                f"namespace may hold only letters, digits, '.', '_' and '-' (a Kafka topic prefix), "
                f"got {self.namespace!r}"
            )
        for name in ("learner_args", "state_builder_args", "actor_args", "simulate_args", "replay_args"):
            try:
                shlex.split(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None


@register("status")
@dataclass(frozen=True, kw_only=True)
class StatusConfig(BusConfig):
    """Consumer lag, model versions and rates of a running deployment."""

    bootstrap_servers: str = setting(
        "", help="Kafka bootstrap servers (default: the ones in RUN_DIR/deployment.json)"
    )
    run_dir: str = setting("qrec-run", help="folder of the deployment (where qrec up wrote deployment.json)")
    metrics_urls: str = setting(
        "",
        help="comma-separated /metrics URLs of qrec processes, for a deployment not started by qrec up",
    )
    namespace: str = setting(
        "", help="topic and group name prefix, for a deployment not started by qrec up (see qrec up)"
    )
    interval_seconds: float = setting(
        1.0, help="time between the two scrapes of every /metrics that the rates are computed from"
    )
    json: bool = setting(False, help="print the status as JSON instead of tables")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.interval_seconds > 0:
            raise ConfigError(f"interval_seconds must be > 0, got {self.interval_seconds}")

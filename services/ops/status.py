"""`qrec status`: consumer lag, model versions and rates of a running deployment.

Lag comes from Kafka (each group's committed offset against each partition's end offset, through
the bus); model versions and rates from two scrapes of every process's /metrics a moment apart.
The deployment is found through ``RUN_DIR/deployment.json`` (written by `qrec up`), or given by
``--bootstrap-servers`` and ``--metrics-urls``; each URL's service is read from its ``qrec_build_info``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.table import Table

from services.bus.base import Bus, TopicPartition
from services.config import ConfigError, make_bus
from services.ops.config import StatusConfig
from services.ops.supervisor import groups_of, pid_alive, read_deployment

# Counters whose per-second rates the status shows: name of the rate -> (service, metric).
RATES: dict[str, tuple[str, str]] = {
    "events_per_second": ("state_builder", "qrec_state_builder_events_total"),
    "recommendations_per_second": ("actor", "qrec_actor_recommendations_total"),
    "updates_per_second": ("learner", "qrec_learner_updates_total"),
    "transitions_per_second": ("learner", "qrec_learner_transitions_total"),
    "simulated_events_per_second": ("simulator", "qrec_simulator_events_total"),
    "replayed_events_per_second": ("replay", "qrec_replay_events_produced_total"),
}

Samples = dict[str, list[tuple[dict[str, str], float]]]
"""Parsed /metrics text: sample name -> [(labels, value), ...]."""


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by sample name."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def total(samples: Samples, name: str) -> float | None:
    """The sum of a metric over all its labels; None when the process does not export it."""
    found = samples.get(name)
    return None if found is None else sum(value for _, value in found)


def service_of(samples: Samples) -> str | None:
    """The service a process runs, from its ``qrec_build_info{service=...}``."""
    for labels, _ in samples.get("qrec_build_info", []):
        if "service" in labels:
            return labels["service"]
    return None


def rates(
    before: Mapping[str, Samples], after: Mapping[str, Samples], services: Mapping[str, str], seconds: float
) -> dict[str, float | None]:
    """Per-second rates of the RATES counters, summed over the processes of each service.

    ``before``/``after``: process name -> samples; ``services``: process name -> service. A rate is
    None when no process of its service was scraped both times; a counter that went down (the
    process restarted in between) counts from zero.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    result: dict[str, float | None] = {}
    for rate_name, (service, metric) in RATES.items():
        increase = None
        for name, kind in services.items():
            if kind != service or name not in before or name not in after:
                continue
            first, second = total(before[name], metric), total(after[name], metric)
            if second is None:
                continue
            first = first or 0.0
            increase = (increase or 0.0) + (second - first if second >= first else second)
        result[rate_name] = None if increase is None else increase / seconds
    return result


def scrape(url: str, timeout_s: float = 2.0) -> Samples | None:
    """The samples at a /metrics URL, or None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return parse_metrics(response.read().decode("utf-8", errors="replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def consumer_lag(bus: Bus, groups: Mapping[str, Iterable[str]]) -> list[dict[str, Any]]:
    """Per group and partition: committed offset, end offset and lag (end - committed).

    A partition without a committed offset has ``committed`` None and a lag from its beginning.
    """
    rows: list[dict[str, Any]] = []
    for group, topics in sorted(groups.items()):
        consumer = bus.consumer(group_id=group)
        try:
            parts = [
                TopicPartition(topic, p)
                for topic in topics
                if topic in bus.list_topics()
                for p in range(bus.partitions_for(topic))
            ]
            if not parts:
                continue
            # Committed offsets first: the ends read after them are at least as far, so a group
            # committing while we read never shows a committed offset past the end.
            committed_offsets = {tp: consumer.committed(tp) for tp in parts}
            ends = consumer.end_offsets(parts)
            beginnings = consumer.beginning_offsets(parts)
            for tp in parts:
                committed = committed_offsets[tp]
                start = committed if committed is not None else beginnings[tp]
                rows.append(
                    {
                        "group": group,
                        "topic": tp.topic,
                        "partition": tp.partition,
                        "committed": committed,
                        "end": ends[tp],
                        "lag": max(0, ends[tp] - start),
                    }
                )
        finally:
            consumer.close()
    return rows


def collect_status(
    config: StatusConfig,
    *,
    bus_factory: Callable[[Any], Bus] = make_bus,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Everything `qrec status` shows, as plain data (what --json prints)."""
    deployment: dict[str, Any] | None = None
    deployment_file = Path(config.run_dir) / "deployment.json"
    if config.metrics_urls and not config.bootstrap_servers:
        raise ConfigError("--metrics-urls needs --bootstrap-servers too")
    if not config.metrics_urls:
        deployment = read_deployment(Path(config.run_dir))
        pid = (deployment.get("supervisor") or {}).get("pid")
        if deployment.get("state") != "running" or not isinstance(pid, int) or not pid_alive(pid):
            raise ConfigError(
                f"the deployment in {config.run_dir} is not running (its supervisor, pid {pid}, has "
                f"stopped); start it again with `qrec up --run-dir {config.run_dir}`"
            )
    bootstrap = config.bootstrap_servers or (deployment or {}).get("bootstrap_servers", "")
    if not bootstrap:
        raise ConfigError(f"no bootstrap servers: pass --bootstrap-servers or check {deployment_file}")

    processes: list[dict[str, Any]] = []
    if deployment is not None:
        for p in deployment["processes"]:
            processes.append(
                {
                    "name": p["name"],
                    "service": p["kind"].replace("-", "_"),
                    "pid": p["pid"],
                    "status": p["status"],
                    "restarts": p["restarts"],
                    "metrics_url": p["metrics_url"],
                }
            )
        groups = {g: v["topics"] for g, v in deployment["groups"].items()}
    else:
        for url in (u.strip() for u in config.metrics_urls.split(",") if u.strip()):
            processes.append(
                {
                    "name": url,
                    "service": None,
                    "pid": None,
                    "status": None,
                    "restarts": None,
                    "metrics_url": url,
                }
            )
        groups = {g: v["topics"] for g, v in groups_of(config.namespace).items()}

    first_at = clock()
    before = {p["name"]: scrape(p["metrics_url"]) for p in processes}
    sleep(config.interval_seconds)
    after = {p["name"]: scrape(p["metrics_url"]) for p in processes}
    seconds = clock() - first_at
    for p in processes:
        samples = after[p["name"]]
        p["scraped"] = samples is not None
        if samples is not None and p["service"] is None:
            p["service"] = service_of(samples)
    services = {p["name"]: p["service"] for p in processes if p["service"]}
    scraped_before = {n: s for n, s in before.items() if s is not None}
    scraped_after = {n: s for n, s in after.items() if s is not None}

    actors = []
    learner: dict[str, Any] | None = None
    for p in processes:
        samples = scraped_after.get(p["name"])
        if samples is None:
            continue
        if p["service"] == "actor":
            actors.append(
                {
                    "name": p["name"],
                    "model_version": total(samples, "qrec_actor_model_version"),
                    "model_age_seconds": total(samples, "qrec_actor_model_age_seconds"),
                }
            )
        elif p["service"] == "learner":
            learner = {
                "name": p["name"],
                "model_version": total(samples, "qrec_learner_model_version"),
                "updates": total(samples, "qrec_learner_updates_total"),
                "replay_size": total(samples, "qrec_learner_replay_size"),
                "last_publish_age_seconds": _age(
                    total(samples, "qrec_learner_last_publish_timestamp_seconds")
                ),
            }

    bus_config = replace(config, bootstrap_servers=bootstrap)
    bus = bus_factory(bus_config)
    try:
        lag = consumer_lag(bus, groups)
    finally:
        bus.close()

    supervisor = (deployment or {}).get("supervisor") or {}
    return {
        "deployment": {
            "run_dir": str(Path(config.run_dir).resolve()) if deployment is not None else None,
            "state": "running" if deployment is not None else "unknown (not started by qrec up)",
            "bootstrap_servers": bootstrap,
            "supervisor_pid": supervisor.get("pid"),
            "prometheus_url": ((deployment or {}).get("prometheus") or {}).get("url"),
        },
        "processes": processes,
        "consumer_lag": lag,
        "group_lag": {g: sum(r["lag"] for r in lag if r["group"] == g) for g in sorted(groups)},
        "learner": learner,
        "actors": actors,
        "rates": rates(scraped_before, scraped_after, services, seconds),
        "interval_seconds": round(seconds, 3),
    }


def _age(timestamp_s: float | None) -> float | None:
    if not timestamp_s:
        return None
    return max(0.0, time.time() - timestamp_s)


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def status_tables(status: Mapping[str, Any]) -> Group:
    """The status as rich tables: processes, models, rates, consumer lag."""
    info = status["deployment"]
    processes = Table(
        title=f"qrec deployment ({info['state']}): Kafka {info['bootstrap_servers']}"
        + (f", Prometheus {info['prometheus_url']}" if info.get("prometheus_url") else "")
    )
    for column in ("process", "service", "pid", "status", "restarts", "/metrics"):
        processes.add_column(column, justify="right" if column in ("pid", "restarts") else "left")
    for p in status["processes"]:
        processes.add_row(
            p["name"],
            p["service"] or "?",
            str(p["pid"] or "-"),
            p["status"] or "-",
            "-" if p["restarts"] is None else str(p["restarts"]),
            "answers" if p["scraped"] else "[red]no answer[/]",
        )

    models = Table(title="models")
    for column in ("process", "service", "model version", "model age", "updates", "replay size"):
        models.add_column(column, justify="left" if column in ("process", "service") else "right")
    learner = status["learner"]
    if learner is not None:
        models.add_row(
            learner["name"],
            "learner",
            _number(learner["model_version"]),
            _number(learner["last_publish_age_seconds"], 1) + " s"
            if learner["last_publish_age_seconds"]
            else "-",
            _number(learner["updates"]),
            _number(learner["replay_size"]),
        )
    for actor in status["actors"]:
        age = actor["model_age_seconds"]
        models.add_row(
            actor["name"],
            "actor",
            _number(actor["model_version"]),
            f"{age:,.1f} s" if actor["model_version"] else "-",
            "",
            "",
        )

    rate_table = Table(title=f"rates (two scrapes {status['interval_seconds']:.1f} s apart)")
    rate_table.add_column("what")
    rate_table.add_column("per second", justify="right")
    for name, value in status["rates"].items():
        if value is not None:
            rate_table.add_row(name.removesuffix("_per_second").replace("_", " "), _number(value, 1))

    lag = Table(title="consumer lag (committed offset vs end offset)")
    for column in ("group", "topic", "partition", "committed", "end", "lag"):
        lag.add_column(column, justify="left" if column in ("group", "topic") else "right")
    for row in status["consumer_lag"]:
        lag.add_row(
            row["group"],
            row["topic"],
            str(row["partition"]),
            "-" if row["committed"] is None else f"{row['committed']:,}",
            f"{row['end']:,}",
            f"{row['lag']:,}",
        )
    return Group(processes, models, rate_table, lag)


def run_status(config: StatusConfig, console: Console) -> dict[str, Any]:
    """`qrec status`: collect and print (tables, or JSON with --json)."""
    status = collect_status(config)
    if config.json:
        print(json.dumps(status, indent=2))
    else:
        console.print(status_tables(status))
    return status

"""The Grafana dashboard and the alert rules read metrics that running qrec processes really serve.

A slice of a real log goes through `qrec replay` into a real broker, read by separate state-builder,
learner and actor processes; a few shoppers click on the slates they were shown, so recommendations
are joined with feedback. A real Prometheus scrapes the three processes; every metric name the
dashboard or the alerts read must be in its scrape, and every dashboard query must return data.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.codec import RECOMMENDATIONS, encode
from schemas.messages import ClickEvent, Recommendation
from services.bus.base import TopicSpec
from services.bus.kafka import KafkaBus, KafkaSettings
from tests.helpers import (
    TAOBAO,
    PrometheusServer,
    free_port,
    read_topic,
    require_shared_data,
    start_service,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "qrec.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Twenty minutes of the Taobao sample (about 400 events, 380 of them views), then ten minutes an hour
# later: by then every slate's 30-minute attribution window has closed in event time.
FIRST_SLICE = ("2017-12-02T13:20:00Z", "2017-12-02T13:40:00Z")
LATER_SLICE = ("2017-12-02T14:20:00Z", "2017-12-02T14:30:00Z")
CLICKED_SLATES = 20
# How Prometheus stores each kind of sample under a metric family's name.
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created", "_info")


def used_names() -> set[str]:
    """Metric names read by the dashboard's queries and the alert rules (series suffixes kept)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    text = "\n".join(exprs) + "\n" + ALERTS.read_text()
    # qrec_supervisor_* belongs to `qrec up`'s supervisor, whose own tests scrape it.
    return {
        name for name in re.findall(r"\b(qrec_[a-z0-9_]+)", text) if not name.startswith("qrec_supervisor_")
    }


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query, with Grafana's interval variable filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", "1m"))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def replay(bootstrap: str, log: Path, topic: str, dead_letter: str, *extra: str) -> str:
    """Run `qrec replay` as its own process; returns its output (it fails the test if replay fails)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QREC_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "replay",
            str(log),
            f"--bootstrap-servers={bootstrap}",
            f"--topic={topic}",
            f"--dead-letter-topic={dead_letter}",
            "--no-progress",
            "--no-create-topics",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def scalar(prometheus: PrometheusServer, promql: str) -> float:
    result = prometheus.query(promql)
    return float(result[0]["value"][1]) if result else 0.0


@pytest.mark.kafka
@pytest.mark.timeout(900)
def test_dashboard_and_alerts_read_only_metrics_that_live_processes_serve(
    bootstrap_servers: str,
    unique_name: Callable[[str], str],
    prometheus_server: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    require_shared_data(TAOBAO)
    bus = KafkaBus(KafkaSettings(bootstrap_servers=bootstrap_servers))
    names = {n: unique_name(n) for n in ("clicks", "recs", "state", "transitions", "dead", "model")}
    bus.create_topics(
        [TopicSpec(names[n], 2) for n in ("clicks", "recs", "transitions")]
        + [
            TopicSpec(names["state"], 2, {"cleanup.policy": "compact"}),
            TopicSpec(names["dead"], 1),
            TopicSpec(names["model"], 1, {"cleanup.policy": "compact", "max.message.bytes": "8388608"}),
        ]
    )
    common = [f"--dead-letter-topic={names['dead']}", "--no-create-topics"]
    ports = {service: free_port() for service in ("state_builder", "learner", "actor")}
    args = {
        "state_builder": [
            f"--clickstream-topic={names['clicks']}",
            f"--recommendations-topic={names['recs']}",
            f"--user-state-topic={names['state']}",
            f"--transitions-topic={names['transitions']}",
            f"--group-id={unique_name('builders')}",
            "--session-timeout-ms=3000",
        ],
        "learner": [
            f"--transitions-topic={names['transitions']}",
            f"--model-topic={names['model']}",
            f"--group-id={unique_name('learner')}",
            f"--checkpoint-dir={tmp_path / 'checkpoints'}",
            # A small model that trains and publishes within seconds of the first transitions, and
            # publishes a few versions rather than dozens (each one is compiled by the actor).
            "--publish-every-steps=100000",
            "--publish-every-seconds=5",
            "--vocabulary-capacity=2000",
            "--embed-dim=8",
            "--hidden-sizes=16",
            "--batch-size=32",
            "--updates-per-call=2",
            "--min-replay-size=100",
        ],
        "actor": [
            f"--user-state-topic={names['state']}",
            f"--recommendations-topic={names['recs']}",
            f"--model-topic={names['model']}",
            f"--group-id={unique_name('actors')}",
            "--session-timeout-ms=3000",
        ],
    }
    processes = {
        service: start_service(
            f"services.{service}",
            bootstrap_servers,
            [*args[service], *common, f"--metrics-port={ports[service]}"],
            tmp_path / f"{service}.log",
        )
        for service in ports
    }

    def logs() -> str:
        return "\n".join(
            f"----- {p.name} -----\n" + p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("*.log")
        )

    def running() -> bool:
        """True while every process runs; fails the test with their logs as soon as one has exited."""
        exited = {s: p.returncode for s, p in processes.items() if p.poll() is not None}
        assert not exited, f"qrec processes exited: {exited}\n{logs()}"
        return True

    def wait_for(promql: str, timeout_s: float) -> None:
        """Wait for a query to give data, failing at once if a process died meanwhile."""
        wait_until(
            lambda: running() and bool(prometheus.query(promql)),
            timeout_s=timeout_s,
            interval_s=0.5,
            what=f"{promql!r} to give data\n{logs()}",
        )

    try:
        prometheus = prometheus_server([f"127.0.0.1:{port}" for port in ports.values()])
        # Each process is up once it has compiled its JAX functions (the actor warms up every batch size).
        wait_for("count(qrec_service_up == 1) == 3", timeout_s=300)
        replay(
            bootstrap_servers,
            TAOBAO,
            names["clicks"],
            names["dead"],
            "--order=time",
            f"--from-time={FIRST_SLICE[0]}",
            f"--to-time={FIRST_SLICE[1]}",
        )

        # Wait for slates the state-builder has already taken in for attribution, then click on them.
        def recommendations() -> list[Recommendation]:
            found = [RECOMMENDATIONS.decode(r.value) for r in read_topic(bus, names["recs"])]
            return [r for r in found if isinstance(r, Recommendation)]

        wait_until(
            lambda: running() and len(recommendations()) >= 300,
            # The actor compiles its scorer first: minutes on a loaded 2-core machine.
            timeout_s=300,
            interval_s=1,
            what=f"300 recommendations\n{logs()}",
        )
        shown = recommendations()
        wait_for(f"qrec_state_builder_recommendations_total >= {len(shown)}", timeout_s=60)
        clicks = tmp_path / "clicks.jsonl"
        clicks.write_bytes(
            b"".join(
                encode(
                    ClickEvent(
                        event_id=f"click-on-{rec.rec_id}",
                        user_id=rec.user_id,
                        session_id=rec.session_id or f"{rec.user_id}-session",
                        event_type="click",
                        timestamp=rec.event_timestamp + 1000,
                        item_id=rec.items[0].item_id,
                        rec_id=rec.rec_id,
                    )
                )
                + b"\n"
                for rec in shown[:CLICKED_SLATES]
            )
        )
        replay(bootstrap_servers, clicks, names["clicks"], names["dead"], "--format=jsonl")
        # Bad input on the clickstream: the state-builder dead-letters it (and counts it by reason).
        producer = bus.producer()
        producer.send(names["clicks"], b"someone", b"{not json")
        producer.flush()
        producer.close()
        replay(
            bootstrap_servers,
            TAOBAO,
            names["clicks"],
            names["dead"],
            "--order=time",
            f"--from-time={LATER_SLICE[0]}",
            f"--to-time={LATER_SLICE[1]}",
        )

        wait_for('sum(qrec_state_builder_attribution_total{outcome="clicked"}) > 0', timeout_s=60)
        wait_for('qrec_dead_letters_total{service="state_builder"} > 0', timeout_s=60)
        wait_for("qrec_learner_model_version >= 1", timeout_s=120)
        # Swapping compiles the model for every batch size first; on a busy machine that takes a while.
        wait_for("qrec_actor_model_version >= 1", timeout_s=300)
        wait_for("qrec_consumer_lag_records", timeout_s=30)

        wanted = used_names()
        assert len(wanted) >= 25, sorted(wanted)

        def served() -> set[str]:
            series = prometheus.query('group by (__name__) ({__name__=~"qrec_.+"})')
            return {s["metric"]["__name__"] for s in series}

        def missing() -> list[str]:
            have = served()
            return sorted(
                name
                for name in wanted
                if name not in have and not any(name + suffix in have for suffix in SUFFIXES)
            )

        with contextlib.suppress(AssertionError):  # reported below, with the names
            wait_until(lambda: not missing(), timeout_s=20, interval_s=1, what="every metric name")
        assert not missing(), (
            f"metrics read by the dashboard or alerts that no live process serves: {missing()}"
        )

        # Every dashboard query is valid PromQL and gives data (a rate needs two scrapes in its window).
        empty = []
        for title, promql in dashboard_queries():
            if not prometheus.query(promql):
                empty.append(f"{title}: {promql}")
        assert not empty, "dashboard queries with no data on the live processes:\n" + "\n".join(empty)
        assert scalar(prometheus, 'sum(qrec_state_builder_attribution_total{outcome="clicked"})') >= 1
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        bus.close()

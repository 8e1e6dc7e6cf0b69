"""Metrics: naming conventions, promtool's linter, and a real Prometheus scraping a running qrec."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.metrics import serve_metrics
from services.replay.service import ReplayMetrics
from tests.helpers import PrometheusServer, free_port, wait_until

FORBIDDEN_LABELS = {"user_id", "item_id", "user", "item", "session_id", "event_id", "rec_id"}


def filled_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    metrics = ReplayMetrics(registry)
    metrics.rows.labels("ok").inc(3)
    metrics.rows.labels("invalid").inc()
    metrics.dead_letters.labels("replay", "invalid_json").inc()
    metrics.events.inc(3)
    metrics.event_time.set(1_511_544_070)
    return registry


def test_metric_names_follow_the_conventions() -> None:
    families = list(filled_registry().collect())
    assert families
    for family in families:
        assert family.name.startswith("qrec_"), family.name
        if family.type == "counter":
            # client_python strips _total from the family name and adds it to the samples.
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        for sample in family.samples:
            assert not FORBIDDEN_LABELS & set(sample.labels), (family.name, sample.labels)


def test_promtool_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs the Debian package prometheus"
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(filled_registry()),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_serve_metrics_exposes_the_registry_over_http() -> None:
    registry = filled_registry()
    server = serve_metrics(registry, 0)
    try:
        with urllib.request.urlopen(server.url, timeout=5) as response:
            body = response.read().decode()
        assert 'qrec_replay_rows_total{outcome="ok"} 3.0' in body
        assert server.port > 0
    finally:
        server.stop()


@pytest.mark.kafka
@pytest.mark.prometheus
def test_real_prometheus_scrapes_a_running_replay(
    bootstrap_servers: str,
    unique_name: Callable[[str], str],
    prometheus_server: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    log = tmp_path / "paced.jsonl"
    # Two events an hour apart, replayed in real time: the process stays up between them.
    log.write_text(
        '{"event_id":"a","user_id":"u","session_id":"s","event_type":"view","timestamp":1000,"item_id":"i"}\n'
        '{"event_id":"b","user_id":"u","session_id":"s","event_type":"view","timestamp":3601000,"item_id":"i"}\n'
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QREC_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "replay",
            str(log),
            "--bootstrap-servers",
            bootstrap_servers,
            "--topic",
            unique_name("clickstream"),
            "--speed",
            "1",
            "--metrics-port",
            str(port),
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def produced_one() -> bool:
            if process.poll() is not None:
                out = process.stdout.read().decode() if process.stdout else ""
                raise AssertionError(f"qrec replay exited early ({process.returncode}):\n{out}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    return b"qrec_replay_events_produced_total 1.0" in response.read()
            except OSError:
                return False

        wait_until(produced_one, timeout_s=60, what="the replay to produce its first event")
        with urllib.request.urlopen(url, timeout=5) as response:
            exposition = response.read()
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30
        )
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()

        prometheus = prometheus_server([f"127.0.0.1:{port}"])
        result = prometheus.wait_for("qrec_replay_events_produced_total", timeout_s=60)
        assert float(result[0]["value"][1]) == 1.0
        assert result[0]["metric"]["job"]
        up = prometheus.wait_for('qrec_service_up{service="replay"}')
        assert float(up[0]["value"][1]) == 1.0
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_consumer_lag_reports_the_assignment_at_every_update_and_the_lag_every_few_seconds() -> None:
    from services.bus.base import TopicPartition, TopicSpec
    from services.bus.embedded import EmbeddedBus
    from services.metrics import ConsumerLag

    bus = EmbeddedBus()
    bus.create_topics([TopicSpec("t", 3)])
    producer = bus.producer()
    for i in range(5):
        producer.send("t", b"k", b"v%d" % i, partition=1)
    producer.flush()
    registry = CollectorRegistry()
    lag = ConsumerLag(registry, "g", every_s=3600.0)
    consumer = bus.consumer()
    lag.update(consumer)  # nothing assigned yet
    assert registry.get_sample_value("qrec_consumer_assigned_partitions", {"group": "g"}) == 0
    consumer.assign([TopicPartition("t", 1), TopicPartition("t", 2)])
    consumer.seek_to_beginning([TopicPartition("t", 1), TopicPartition("t", 2)])
    lag.update(consumer)  # the assignment counts at once; the lag waits for its interval
    assert registry.get_sample_value("qrec_consumer_assigned_partitions", {"group": "g"}) == 2
    assert (
        registry.get_sample_value("qrec_consumer_lag_records", {"group": "g", "topic": "t", "partition": "1"})
        is None
    )
    fresh = ConsumerLag(CollectorRegistry(), "g", every_s=3600.0)
    fresh.update(consumer)
    assert fresh.gauge.labels("g", "t", "1")._value.get() == 5
    assert fresh.gauge.labels("g", "t", "2")._value.get() == 0

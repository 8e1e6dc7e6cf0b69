"""`qrec status`: metrics parsing, rates, consumer lag and the printed tables, on exact small inputs.

The status of a real `qrec up` deployment (tables and JSON) is checked in tests/test_up.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from rich.console import Console

from services.bus.base import TopicPartition, TopicSpec
from services.bus.embedded import EmbeddedBus
from services.cli import main
from services.config import BusConfig, make_bus
from services.metrics import ProcessMetrics, serve_metrics
from services.ops.config import StatusConfig
from services.ops.status import (
    collect_status,
    consumer_lag,
    parse_metrics,
    rates,
    service_of,
    status_tables,
    total,
)

EXPOSITION = """\
# HELP qrec_build_info qrec version and the service this process runs
# TYPE qrec_build_info gauge
qrec_build_info{service="actor",version="0.1.0"} 1.0
# HELP qrec_actor_recommendations_total Recommendations published
# TYPE qrec_actor_recommendations_total counter
qrec_actor_recommendations_total{policy="dqn"} 30.0
qrec_actor_recommendations_total{policy="random"} 12.0
# HELP qrec_actor_model_version Model version being served
# TYPE qrec_actor_model_version gauge
qrec_actor_model_version 7.0
"""


def test_parse_metrics_sums_over_labels_and_finds_the_service() -> None:
    samples = parse_metrics(EXPOSITION)
    assert total(samples, "qrec_actor_recommendations_total") == 42.0
    assert total(samples, "qrec_actor_model_version") == 7.0
    assert total(samples, "qrec_learner_updates_total") is None
    assert service_of(samples) == "actor"
    assert service_of(parse_metrics("")) is None


def counters(name: str, value: float) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {name: [({}, value)]}


def test_rates_sum_processes_of_a_service_and_survive_restarts() -> None:
    services = {"sb-1": "state_builder", "sb-2": "state_builder", "learner": "learner", "actor-1": "actor"}
    before = {
        "sb-1": counters("qrec_state_builder_events_total", 100.0),
        "sb-2": counters("qrec_state_builder_events_total", 50.0),
        "learner": counters("qrec_learner_updates_total", 1000.0),
        "actor-1": counters("qrec_actor_recommendations_total", 10.0),
    }
    after = {
        "sb-1": counters("qrec_state_builder_events_total", 300.0),  # +200
        "sb-2": counters("qrec_state_builder_events_total", 20.0),  # restarted: counts from 0, +20
        "learner": counters("qrec_learner_updates_total", 1100.0),  # +100
        # actor-1 did not answer the second scrape
    }
    result = rates(before, after, services, 2.0)
    assert result["events_per_second"] == 110.0
    assert result["updates_per_second"] == 50.0
    assert result["recommendations_per_second"] is None
    assert result["simulated_events_per_second"] is None
    with pytest.raises(ValueError, match="seconds must be > 0"):
        rates(before, after, services, 0.0)


def filled_bus() -> EmbeddedBus:
    bus = EmbeddedBus()
    bus.create_topics([TopicSpec("t", 2)])
    producer = bus.producer()
    for i in range(5):
        producer.send("t", b"k", str(i).encode(), partition=0)
    for i in range(3):
        producer.send("t", b"k", str(i).encode(), partition=1)
    producer.flush()
    consumer = bus.consumer(group_id="g")
    consumer.assign([TopicPartition("t", 0)])
    consumer.commit({TopicPartition("t", 0): 4})
    consumer.close()
    return bus


def test_consumer_lag_is_end_minus_committed_per_partition() -> None:
    bus = filled_bus()
    rows = consumer_lag(bus, {"g": ["t", "missing-topic"], "other": ["t"]})
    assert rows == [
        {"group": "g", "topic": "t", "partition": 0, "committed": 4, "end": 5, "lag": 1},
        {"group": "g", "topic": "t", "partition": 1, "committed": None, "end": 3, "lag": 3},
        {"group": "other", "topic": "t", "partition": 0, "committed": None, "end": 5, "lag": 5},
        {"group": "other", "topic": "t", "partition": 1, "committed": None, "end": 3, "lag": 3},
    ]


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_consumer_lag_on_a_real_broker(bootstrap_servers: str, unique_name: Any) -> None:
    topic, group = unique_name("lag"), unique_name("group")
    bus = make_bus(BusConfig(bootstrap_servers=bootstrap_servers))
    try:
        bus.create_topics([TopicSpec(topic, 2)])
        producer = bus.producer()
        for i in range(5):
            producer.send(topic, b"k", str(i).encode(), partition=0)
        for i in range(3):
            producer.send(topic, b"k", str(i).encode(), partition=1)
        producer.flush()
        producer.close()
        consumer = bus.consumer(group_id=group)
        consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        consumer.commit({TopicPartition(topic, 0): 4, TopicPartition(topic, 1): 3})
        consumer.close()
        rows = consumer_lag(bus, {group: [topic]})
    finally:
        bus.close()
    assert [(r["partition"], r["committed"], r["end"], r["lag"]) for r in rows] == [
        (0, 4, 5, 1),
        (1, 3, 3, 0),
    ]


def test_collect_status_scrapes_twice_and_reads_lag(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    ProcessMetrics(registry, "learner")
    updates = Counter("qrec_learner_updates_total", "updates", registry=registry)
    version = Gauge("qrec_learner_model_version", "version", registry=registry)
    updates.inc(100)
    version.set(3)
    server = serve_metrics(registry, 0)
    bus = EmbeddedBus()
    bus.create_topics([TopicSpec("qrec.transitions.v1", 1)])
    producer = bus.producer()
    for i in range(10):
        producer.send("qrec.transitions.v1", b"k", str(i).encode())
    producer.flush()
    committer = bus.consumer(group_id="qrec-learner")
    committer.assign([TopicPartition("qrec.transitions.v1", 0)])
    committer.commit({TopicPartition("qrec.transitions.v1", 0): 7})
    times = iter([10.0, 12.0])

    def between_scrapes(seconds: float) -> None:
        assert seconds == 2.0
        updates.inc(50)

    try:
        config = StatusConfig(bootstrap_servers="embedded", metrics_urls=server.url, interval_seconds=2.0)
        status = collect_status(
            config, bus_factory=lambda _: bus, sleep=between_scrapes, clock=lambda: next(times)
        )
    finally:
        server.stop()
    assert status["processes"][0]["service"] == "learner" and status["processes"][0]["scraped"]
    assert status["learner"]["model_version"] == 3.0
    assert status["learner"]["updates"] == 150.0
    assert status["rates"]["updates_per_second"] == 25.0
    assert status["consumer_lag"] == [
        {
            "group": "qrec-learner",
            "topic": "qrec.transitions.v1",
            "partition": 0,
            "committed": 7,
            "end": 10,
            "lag": 3,
        }
    ]
    assert status["group_lag"] == {"qrec-actor": 0, "qrec-learner": 3, "qrec-state-builder": 0}
    assert status["interval_seconds"] == 2.0


def test_status_tables_show_processes_models_rates_and_lag() -> None:
    status = {
        "deployment": {"state": "running", "bootstrap_servers": "127.0.0.1:9092", "prometheus_url": None},
        "processes": [
            {"name": "actor-1", "service": "actor", "pid": 42, "status": "running", "restarts": 2,
             "scraped": True},
            {"name": "simulator", "service": "simulator", "pid": None, "status": "finished", "restarts": 0,
             "scraped": False},
        ],
        "learner": {"name": "learner", "model_version": 9.0, "updates": 1234.0, "replay_size": 500.0,
                    "last_publish_age_seconds": 3.5},
        "actors": [{"name": "actor-1", "model_version": 8.0, "model_age_seconds": 12.25}],
        "rates": {"events_per_second": 321.0, "updates_per_second": None},
        "consumer_lag": [{"group": "qrec-actor", "topic": "qrec.user-state.v1", "partition": 0,
                          "committed": 1000, "end": 1500, "lag": 500}],
        "interval_seconds": 1.0,
    }  # fmt: skip
    console = Console(width=200, record=True)
    console.print(status_tables(status))
    text = console.export_text()
    assert "qrec deployment (running): Kafka 127.0.0.1:9092" in text
    assert "actor-1" in text and "restarts" in text and "no answer" in text
    assert "12.2 s" in text and "1,234" in text  # model age, learner updates
    assert "321.0" in text and "updates" not in text.split("rates")[1].split("consumer lag")[0]
    assert "1,000" in text and "1,500" in text and "500" in text


def test_status_without_a_deployment_says_how_to_start_one(tmp_path: Path, capsys: Any) -> None:
    assert main(["status", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert "qrec up --run-dir" in capsys.readouterr().err


def test_status_of_a_stopped_deployment_says_so(tmp_path: Path, capsys: Any) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid now belongs to no process
    (tmp_path / "deployment.json").write_text(
        json.dumps({"state": "running", "supervisor": {"pid": finished.pid}, "processes": [], "groups": {}})
    )
    assert main(["status", "--run-dir", str(tmp_path)]) == 2
    assert "is not running" in capsys.readouterr().err

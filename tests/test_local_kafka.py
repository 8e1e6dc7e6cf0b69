"""The local Kafka broker (deploy/kafka/kafka.sh, services/local_kafka.py) and the session fixture."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from services.local_kafka import LocalKafka, LocalKafkaError, kafka_script
from tests.helpers import ExternalKafka


def run_script(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(kafka_script()), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def create_topic(bootstrap_servers: str, topic: str, partitions: int = 1) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="qrec-test-admin")
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        assert topic in admin.list_topics()
    finally:
        admin.close()


def produce(bootstrap_servers: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value).get(timeout=30)
        producer.flush()
    finally:
        producer.close()


def consume(
    bootstrap_servers: str, topic: str, group: str, count: int, timeout_s: float = 30
) -> list[tuple[bytes, bytes]]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
    )
    got: list[tuple[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                got += [(r.key, r.value) for r in batch]
    finally:
        consumer.close()
    return got


@contextmanager
def occupied_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def test_help_explains_the_commands() -> None:
    result = run_script("--help", timeout_s=30)
    assert result.returncode == 0, result.stderr
    for command in ("fetch", "start", "stop", "run", "--dir", "--port", "--timeout"):
        assert command in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = run_script("launch", timeout_s=30)
    assert result.returncode == 2
    assert "unknown command" in result.stderr


@pytest.mark.kafka
def test_admin_produce_consume(bootstrap_servers: str, unique_name: Callable[[str], str]) -> None:
    topic = unique_name("test-local-kafka")
    create_topic(bootstrap_servers, topic)
    produce(bootstrap_servers, topic, [(b"k1", b"hello"), (b"k2", b"world")])
    got = consume(bootstrap_servers, topic, unique_name("group"), count=2)
    assert got == [(b"k1", b"hello"), (b"k2", b"world")]


@pytest.mark.kafka
def test_second_broker_on_occupied_port_fails(
    kafka_broker: LocalKafka | ExternalKafka, tmp_path: Path
) -> None:
    with occupied_port() as own_port:
        # The session broker's port when it is ours, else a port this test holds open.
        port = kafka_broker.port if isinstance(kafka_broker, LocalKafka) and kafka_broker.port else own_port
        result = run_script(
            "start", "--dir", str(tmp_path / "second"), "--port", str(port), "--timeout", "60"
        )
        assert result.returncode != 0
        assert f"127.0.0.1:{port} is already in use" in result.stderr
        assert not (tmp_path / "second" / "kafka.pid").exists()

        with pytest.raises(LocalKafkaError, match="already in use"):
            LocalKafka(tmp_path / "third", port=own_port, timeout_s=60).start()


@pytest.mark.kafka
def test_broker_that_dies_reports_its_output(tmp_path: Path) -> None:
    env = {**os.environ, "QREC_KAFKA_HEAP_OPTS": "-Xms1m -Xmx1m"}  # the JVM refuses such a heap
    result = run_script("start", "--dir", str(tmp_path / "dies"), "--timeout", "60", env=env)
    assert result.returncode != 0
    assert "exited with status" in result.stderr
    assert "kafka.out" in result.stderr  # the JVM's output is shown
    assert result.stdout.strip() == ""
    assert not (tmp_path / "dies" / "kafka.pid").exists()


@pytest.mark.kafka
def test_restart_on_same_directory_keeps_address_and_data(
    local_kafka_factory: Callable[..., LocalKafka], unique_name: Callable[[str], str]
) -> None:
    broker = local_kafka_factory()
    first = broker.bootstrap_servers
    assert broker.pid is not None
    topic = unique_name("restart")
    create_topic(first, topic)
    produce(first, topic, [(b"k", b"before restart")])

    broker.stop()
    assert broker.pid is None
    broker.stop()  # idempotent

    broker.start()
    assert broker.bootstrap_servers == first
    assert consume(first, topic, unique_name("group"), count=1) == [(b"k", b"before restart")]
    assert "Kafka Server started" in broker.log_tail(1000)

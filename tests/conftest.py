"""Shared fixtures: one real Kafka broker per test session, unique names, Prometheus servers.

- `kafka_broker` (session): a `LocalKafka` started in a temporary folder, or an `ExternalKafka` when
  `QREC_TEST_BOOTSTRAP_SERVERS` names an existing broker. If the broker cannot start the test fails.
- `bootstrap_servers` (session): its address, "host:port".
- `unique_name` (function): `make(prefix) -> str`, a topic/group name no other test uses.
- `local_kafka_factory` (function): `start(port=None) -> LocalKafka`, an extra broker of the test's own
  (for restart tests); stopped after the test.
- `prometheus_server` (function): `start(targets, scrape_interval="1s") -> PrometheusServer`;
  stopped after the test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.local_kafka import LocalKafka, LocalKafkaError
from tests.helpers import (
    SHARED_DATA,
    ExternalKafka,
    PrometheusError,
    PrometheusServer,
    require_shared_data,
    start_prometheus,
)

BOOTSTRAP_ENV = "QREC_TEST_BOOTSTRAP_SERVERS"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka | ExternalKafka]:
    external = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if external:
        yield ExternalKafka(external)
        return
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), timeout_s=120, owner_pid=os.getpid())
    try:
        broker.start()
    except LocalKafkaError as e:
        pytest.fail(f"could not start the local Kafka broker for the tests:\n{e}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def bootstrap_servers(kafka_broker: LocalKafka | ExternalKafka) -> str:
    return kafka_broker.bootstrap_servers


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    def make(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    return make


@pytest.fixture
def local_kafka_factory(tmp_path: Path) -> Iterator[Callable[..., LocalKafka]]:
    started: list[LocalKafka] = []

    def start(port: int | None = None, timeout_s: float = 120) -> LocalKafka:
        broker = LocalKafka(
            tmp_path / f"kafka-{len(started) + 1}", port=port, timeout_s=timeout_s, owner_pid=os.getpid()
        )
        started.append(broker)
        try:
            return broker.start()
        except LocalKafkaError as e:
            pytest.fail(f"could not start a local Kafka broker:\n{e}", pytrace=False)

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    started: list[PrometheusServer] = []

    def start(targets: list[str], scrape_interval: str = "1s") -> PrometheusServer:
        try:
            server = start_prometheus(tmp_path, targets, scrape_interval)
        except PrometheusError as e:
            pytest.fail(f"could not start Prometheus:\n{e}", pytrace=False)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def shared_data() -> Path:
    """The recorded logs folder; a test using it fails (never skips) when the folder is absent."""
    require_shared_data()
    return SHARED_DATA

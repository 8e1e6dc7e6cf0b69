"""The confluent-kafka (librdkafka) bus: what the shared contract in test_bus_contract.py does not cover.

confluent-kafka is an optional client: without it every test here but the import-error one skips.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from services.bus import BusError, Record, TopicPartition, TopicSpec
from services.bus.kafka import KafkaSettings
from services.bus.partitioner import partition_for_key

HAVE_CONFLUENT = importlib.util.find_spec("confluent_kafka") is not None
needs_confluent = pytest.mark.skipif(
    not HAVE_CONFLUENT,
    reason="optional client confluent-kafka is not installed: pip install 'qrec[confluent]'",
)


def confluent() -> Any:
    return importlib.import_module("services.bus.confluent")


@pytest.fixture
def settings(bootstrap_servers: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap_servers, session_timeout_ms=6000)


@pytest.fixture
def bus(settings: KafkaSettings) -> Iterator[Any]:
    confluent_bus = confluent().ConfluentBus(settings)
    yield confluent_bus
    confluent_bus.close()


def test_importing_without_the_client_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # makes `import confluent_kafka` fail
    monkeypatch.delitem(sys.modules, "services.bus.confluent", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'qrec\[confluent\]'"):
        importlib.import_module("services.bus.confluent")


@needs_confluent
def test_settings_map_to_librdkafka_names() -> None:
    settings = KafkaSettings(
        bootstrap_servers="a:9092,b:9092",
        client_id="svc",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="user",
        sasl_plain_password="secret",
        ssl_cafile="/ca.pem",
        ssl_certfile="/cert.pem",
        ssl_keyfile="/key.pem",
        ssl_check_hostname=False,
        request_timeout_ms=12_000,
        extra={"socket.keepalive.enable": True, "client.id": "override"},
    )
    configs = confluent().librdkafka_configs(settings)
    assert configs["bootstrap.servers"] == "a:9092,b:9092"
    assert configs["client.id"] == "override"  # extra is applied last
    assert configs["security.protocol"] == "sasl_ssl"
    assert configs["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (configs["sasl.username"], configs["sasl.password"]) == ("user", "secret")
    assert configs["ssl.ca.location"] == "/ca.pem"
    assert configs["ssl.certificate.location"] == "/cert.pem"
    assert configs["ssl.key.location"] == "/key.pem"
    assert configs["ssl.endpoint.identification.algorithm"] == "none"
    assert configs["socket.timeout.ms"] == 12_000
    assert configs["socket.keepalive.enable"] is True
    plain = confluent().librdkafka_configs(KafkaSettings(bootstrap_servers="a:9092"))
    assert plain["security.protocol"] == "plaintext"
    assert not any(key.startswith(("sasl.", "ssl.")) for key in plain)


@needs_confluent
def test_a_kafka_python_name_in_extra_is_reported_as_a_bus_error() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", extra={"api_version_auto_timeout_ms": 1000})
    with pytest.raises(BusError, match="librdkafka property names"):
        confluent().ConfluentBus(settings).producer()


@needs_confluent
def test_an_unreachable_broker_is_a_bus_error_that_says_what_to_check() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", request_timeout_ms=1500)
    bus = confluent().ConfluentBus(settings)
    started = time.monotonic()
    with pytest.raises(BusError, match=r"cannot reach Kafka at 127\.0\.0\.1:1.*brokers are up"):
        bus.producer()
    with pytest.raises(BusError, match="cannot reach Kafka"):
        bus.consumer("group")
    with pytest.raises(BusError, match="cannot reach Kafka"):
        bus.list_topics()
    assert time.monotonic() - started < 30


@needs_confluent
@pytest.mark.kafka
def test_keyed_records_land_where_kafkas_murmur2_puts_them(
    bus: Any, unique_name: Callable[[str], str]
) -> None:
    """librdkafka's default partitioner is crc32-based: the bus must use murmur2 for every key."""
    topic = unique_name("murmur")
    partitions = 12
    bus.create_topics([TopicSpec(topic, partitions)])
    keys = [f"user-{i}".encode() for i in range(1500)]
    keys += [bytes(range(n)) for n in range(1, 40)]  # every tail length of the hash
    keys += ["üser-ß-€".encode(), b"\xff" * 7, b"k"]
    producer = bus.producer()
    for key in keys:
        producer.send(topic, key, b"v")
    producer.flush()
    consumer = bus.consumer()
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    placed: dict[bytes, int] = {}
    deadline = time.monotonic() + 30
    while len(placed) < len(set(keys)) and time.monotonic() < deadline:
        for record in consumer.poll(max_records=5000, timeout_s=0.5):
            assert record.key is not None
            placed[record.key] = record.partition
    assert len(placed) == len(set(keys))
    wrong = {key: p for key, p in placed.items() if p != partition_for_key(key, partitions)}
    assert not wrong, f"{len(wrong)} keys off their murmur2 partition, e.g. {list(wrong.items())[:3]}"
    assert all(producer.partition_for(topic, key) == placed[key] for key in keys[:50])
    consumer.close()
    producer.close()


@needs_confluent
@pytest.mark.kafka
def test_explicit_partition_is_honoured_and_a_missing_one_refused(
    bus: Any, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("explicit")
    bus.create_topics([TopicSpec(topic, 3)])
    producer = bus.producer()
    key = b"user-1"
    target = (partition_for_key(key, 3) + 1) % 3
    producer.send(topic, key, b"v", partition=target)
    producer.flush()
    with pytest.raises(BusError):
        producer.send(topic, key, b"v", partition=7)
        producer.flush()
    consumer = bus.consumer()
    consumer.assign([TopicPartition(topic, p) for p in range(3)])
    records: list[Record] = []
    deadline = time.monotonic() + 20
    while not records and time.monotonic() < deadline:
        records = consumer.poll(timeout_s=0.5)
    assert [(r.partition, r.key) for r in records] == [(target, key)]
    consumer.close()
    producer.close()


@needs_confluent
@pytest.mark.kafka
def test_poll_returns_as_soon_as_records_are_there(bus: Any, unique_name: Callable[[str], str]) -> None:
    """librdkafka's consume() waits for a full batch; the bus must not."""
    topic = unique_name("prompt")
    bus.create_topics([TopicSpec(topic, 1)])
    producer = bus.producer()
    for i in range(3):
        producer.send(topic, b"k", str(i).encode())
    producer.flush()
    consumer = bus.consumer()
    consumer.assign([TopicPartition(topic, 0)])
    consumer.poll(max_records=1, timeout_s=10)  # the fetcher is running now
    started = time.monotonic()
    records = consumer.poll(max_records=1000, timeout_s=10)
    assert time.monotonic() - started < 2
    assert [r.value for r in records] == [b"1", b"2"]
    started = time.monotonic()
    assert consumer.poll(max_records=1000, timeout_s=0.3) == []
    assert 0.25 < time.monotonic() - started < 3
    consumer.close()
    producer.close()


@needs_confluent
@pytest.mark.kafka
def test_seeks_right_after_assign_and_positions(bus: Any, unique_name: Callable[[str], str]) -> None:
    topic = unique_name("seek")
    bus.create_topics([TopicSpec(topic, 3)])
    producer = bus.producer()
    for p in range(3):
        for i in range(10):
            producer.send(topic, b"k", f"{p}-{i}".encode(), partition=p)
    producer.flush()
    parts = [TopicPartition(topic, p) for p in range(3)]
    consumer = bus.consumer()
    consumer.assign(parts)
    assert [consumer.position(tp) for tp in parts] == [0, 0, 0]
    for tp in parts:
        consumer.seek(tp, 4 + tp.partition)
    assert [consumer.position(tp) for tp in parts] == [4, 5, 6]
    records: list[Record] = []
    deadline = time.monotonic() + 20
    while len(records) < 6 + 5 + 4 and time.monotonic() < deadline:
        records.extend(consumer.poll(timeout_s=0.5))
    firsts = {tp.partition: min(r.offset for r in records if r.partition == tp.partition) for tp in parts}
    assert firsts == {0: 4, 1: 5, 2: 6}
    assert len(records) == 15
    assert [consumer.position(tp) for tp in parts] == [10, 10, 10]
    consumer.seek_to_beginning()
    assert [consumer.position(tp) for tp in parts] == [0, 0, 0]
    consumer.seek_to_end(parts[:1])
    assert consumer.position(parts[0]) == 10
    with pytest.raises(BusError):
        consumer.seek(TopicPartition(topic, 9), 0)
    with pytest.raises(BusError):
        consumer.commit()  # no group: nothing to commit to
    assert consumer.committed(parts[0]) is None
    consumer.close()
    with pytest.raises(BusError):
        consumer.poll()
    with pytest.raises(BusError, match="unknown topic"):
        bus.consumer().assign([TopicPartition(unique_name("missing"), 0)])
    producer.close()


@needs_confluent
@pytest.mark.kafka
def test_on_assign_can_seek_and_close_does_not_report_a_revoke(
    bus: Any, unique_name: Callable[[str], str]
) -> None:
    topic, group = unique_name("rebalance"), unique_name("group")
    bus.create_topics([TopicSpec(topic, 2)])
    producer = bus.producer()
    for p in range(2):
        for i in range(10):
            producer.send(topic, b"k", str(i).encode(), partition=p)
    producer.flush()
    assigned: list[list[TopicPartition]] = []
    revoked: list[list[TopicPartition]] = []
    consumer = bus.consumer(group)

    def on_assign(partitions: list[TopicPartition]) -> None:
        assigned.append(partitions)
        assert consumer.assignment() == set(partitions)
        for tp in partitions:
            consumer.seek(tp, 7)

    consumer.subscribe([topic], on_assign=on_assign, on_revoke=revoked.append)
    records: list[Record] = []
    deadline = time.monotonic() + 30
    while len(records) < 6 and time.monotonic() < deadline:
        records.extend(consumer.poll(timeout_s=0.2))
    assert assigned == [[TopicPartition(topic, 0), TopicPartition(topic, 1)]]
    assert sorted((r.partition, r.offset) for r in records) == [(p, o) for p in (0, 1) for o in (7, 8, 9)]
    consumer.commit()
    assert consumer.committed(TopicPartition(topic, 0)) == 10
    consumer.seek(TopicPartition(topic, 1), 4)  # outside the callback, on a group-managed partition
    assert consumer.position(TopicPartition(topic, 1)) == 4
    again: list[Record] = []
    while len(again) < 6 and time.monotonic() < deadline:
        again.extend(consumer.poll(timeout_s=0.2))
    assert [(r.partition, r.offset) for r in again] == [(1, o) for o in range(4, 10)]
    assert consumer.assignment() == {TopicPartition(topic, 0), TopicPartition(topic, 1)}
    consumer.close()
    assert revoked == []
    producer.close()


@needs_confluent
@pytest.mark.kafka
def test_a_consumer_without_group_leaves_no_group_behind(
    bus: Any, settings: KafkaSettings, unique_name: Callable[[str], str]
) -> None:
    from confluent_kafka.admin import AdminClient

    topic = unique_name("nogroup")
    bus.create_topics([TopicSpec(topic, 1)])
    producer = bus.producer()
    producer.send(topic, b"k", b"v")
    producer.flush()
    consumer = bus.consumer()
    consumer.assign([TopicPartition(topic, 0)])
    deadline = time.monotonic() + 20
    while not consumer.poll(timeout_s=0.5) and time.monotonic() < deadline:
        pass
    consumer.close()
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    listed = admin.list_consumer_groups(request_timeout=10).result()
    assert not [g.group_id for g in listed.valid if g.group_id.startswith("qrec-nogroup-")]
    producer.close()


@needs_confluent
@pytest.mark.kafka
def test_raw_consume_rate_confluent_counts_every_record(
    bus: Any, settings: KafkaSettings, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("raw")
    bus.create_topics([TopicSpec(topic, 3)])
    producer = bus.producer()
    for i in range(3000):
        producer.send(topic, f"user-{i}".encode(), b"x" * 100)
    producer.flush()
    count, seconds = confluent().raw_consume_rate_confluent(settings, topic, 3000, timeout_s=30)
    assert count == 3000
    assert 0 < seconds < 30
    with pytest.raises(BusError, match="unknown topic"):
        confluent().raw_consume_rate_confluent(settings, unique_name("missing"), 1, timeout_s=5)
    producer.close()

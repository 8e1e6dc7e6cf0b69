"""One contract, two buses: every test here runs on the embedded bus and on the real Kafka broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from services.bus import BusError, TopicPartition, TopicSpec, seek_to_time
from services.bus.base import Bus, Consumer, Record
from services.bus.embedded import EmbeddedBus, range_assign
from services.bus.kafka import KafkaBus, KafkaSettings
from services.bus.partitioner import partition_for_key

BUSES = [
    pytest.param("embedded", id="embedded"),
    pytest.param("kafka", id="kafka", marks=pytest.mark.kafka),
    pytest.param("confluent", id="confluent", marks=pytest.mark.kafka),
]


@pytest.fixture(params=BUSES)
def bus(request: pytest.FixtureRequest) -> Iterator[Bus]:
    if request.param == "embedded":
        yield EmbeddedBus()
        return
    if request.param == "confluent":
        import importlib.util

        if importlib.util.find_spec("confluent_kafka") is None:
            pytest.skip("optional client confluent-kafka is not installed: pip install 'qrec[confluent]'")
    servers = request.getfixturevalue("bootstrap_servers")
    settings = KafkaSettings(bootstrap_servers=servers, session_timeout_ms=6000)
    kafka_bus: Bus
    if request.param == "confluent":
        from services.bus.confluent import ConfluentBus

        kafka_bus = ConfluentBus(settings)
    else:
        kafka_bus = KafkaBus(settings)
    yield kafka_bus
    kafka_bus.close()


@pytest.fixture
def name(unique_name: Callable[[str], str]) -> Callable[[str], str]:
    return unique_name


def drain(consumer: Consumer, expected: int, timeout_s: float = 30.0) -> list[Record]:
    """Poll until ``expected`` records arrived (or fail with what did arrive)."""
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        records.extend(consumer.poll(max_records=1000, timeout_s=0.2))
    assert len(records) == expected, f"got {len(records)} of {expected} records"
    return records


def test_keyed_records_land_on_the_murmur2_partition_in_order(bus: Bus, name: Callable[[str], str]) -> None:
    topic = name("keyed")
    bus.create_topics([TopicSpec(topic, 4)])
    producer = bus.producer()
    sent = [(f"user-{i % 13}".encode(), f"event-{i}".encode()) for i in range(200)]
    for key, value in sent:
        producer.send(topic, key, value)
    producer.flush()
    consumer = bus.consumer()
    consumer.assign([TopicPartition(topic, p) for p in range(4)])
    records = drain(consumer, len(sent))
    for record in records:
        assert record.key is not None
        assert record.partition == partition_for_key(record.key, 4)
        assert record.partition == producer.partition_for(topic, record.key)
    by_key: dict[bytes, list[bytes]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert record.key is not None and record.value is not None
        by_key.setdefault(record.key, []).append(record.value)
    expected: dict[bytes, list[bytes]] = {}
    for key, value in sent:
        expected.setdefault(key, []).append(value)
    assert by_key == expected
    producer.close()
    consumer.close()


def test_create_topics_is_idempotent(bus: Bus, name: Callable[[str], str]) -> None:
    topic = name("idem")
    assert bus.create_topics([TopicSpec(topic, 3)]) == [topic]
    assert bus.create_topics([TopicSpec(topic, 3)]) == []
    assert bus.partitions_for(topic) == 3
    assert topic in bus.list_topics()


def test_group_members_share_co_partitioned_topics_by_range(bus: Bus, name: Callable[[str], str]) -> None:
    clicks, recs, group = name("clicks"), name("recs"), name("group")
    bus.create_topics([TopicSpec(clicks, 4), TopicSpec(recs, 4)])
    producer = bus.producer()
    for i in range(40):
        producer.send(clicks, f"u{i}".encode(), b"c")
        producer.send(recs, f"u{i}".encode(), b"r")
    producer.flush()
    first, second = bus.consumer(group), bus.consumer(group)
    # As in production: one member runs and owns everything, then a second one joins.
    first.subscribe([clicks, recs])
    seen: list[Record] = []
    deadline = time.monotonic() + 60
    while len(first.assignment()) < 8 and time.monotonic() < deadline:
        seen.extend(first.poll(timeout_s=0.1))
    assert len(first.assignment()) == 8, first.assignment()
    # Each member polls in its own thread, as each runs in its own process in production: a member
    # waiting in a group rejoin must not keep the other from polling (and so from rejoining).
    assignments: dict[int, set[TopicPartition]] = {}
    stop = threading.Event()

    def run(member: int, consumer: Consumer) -> None:
        if member == 1:
            consumer.subscribe([clicks, recs])
        while not stop.is_set():
            consumer.poll(timeout_s=0.1)
            assignments[member] = consumer.assignment()

    threads = [threading.Thread(target=run, args=pair, daemon=True) for pair in enumerate((first, second))]
    for thread in threads:
        thread.start()

    def balanced() -> bool:
        a, b = assignments.get(0, set()), assignments.get(1, set())
        return len(a) == 4 and len(b) == 4 and not a & b

    deadline = time.monotonic() + 60
    while not balanced() and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    a, b = assignments.get(0, set()), assignments.get(1, set())
    assert len(a) == 4 and len(b) == 4 and not a & b, (a, b)
    for assigned in (a, b):
        assert {tp.partition for tp in assigned if tp.topic == clicks} == {
            tp.partition for tp in assigned if tp.topic == recs
        }
    first.close()
    second.close()


def test_a_lone_member_joins_its_new_group_once(bus: Bus, name: Callable[[str], str]) -> None:
    """No second, needless rebalance right after the first join (the group leader used to assign on
    stale metadata and rejoin ~100 ms later; a member caught in that rejoin could stay unfed). Three
    fresh groups: a broker's very first group happened to join once even before the fix."""
    for _ in range(3):
        topic, group = name("join-once"), name("group")
        bus.create_topics([TopicSpec(topic, 4)])
        assigned: list[list[TopicPartition]] = []
        revoked: list[list[TopicPartition]] = []
        consumer = bus.consumer(group)
        consumer.subscribe([topic], on_assign=assigned.append, on_revoke=revoked.append)
        deadline = time.monotonic() + 60
        while not assigned and time.monotonic() < deadline:
            consumer.poll(timeout_s=0.1)
        # A rejoin follows the first assignment within a metadata round trip; give it time to show.
        settle = time.monotonic() + 2
        while time.monotonic() < settle:
            consumer.poll(timeout_s=0.1)
        revoked_while_running = list(revoked)
        consumer.close()
        assert [sorted(tp.partition for tp in parts) for parts in assigned] == [[0, 1, 2, 3]], assigned
        assert not revoked_while_running, revoked_while_running


def test_committed_offsets_resume_a_group(bus: Bus, name: Callable[[str], str]) -> None:
    topic, group = name("resume"), name("group")
    bus.create_topics([TopicSpec(topic, 2)])
    producer = bus.producer()
    for i in range(10):
        producer.send(topic, b"same-user", str(i).encode())
    producer.flush()
    consumer = bus.consumer(group)
    consumer.subscribe([topic])
    records = drain(consumer, 10)
    tp = records[0].topic_partition
    consumer.commit({tp: records[5].offset + 1})
    assert consumer.committed(tp) == records[5].offset + 1
    consumer.close()
    again = bus.consumer(group)
    again.subscribe([topic])
    rest = drain(again, 4)
    assert [r.value for r in rest] == [b"6", b"7", b"8", b"9"]
    again.close()


def test_seek_by_offset_and_by_time(bus: Bus, name: Callable[[str], str]) -> None:
    topic = name("seek")
    bus.create_topics([TopicSpec(topic, 1)])
    producer = bus.producer()
    # Recent times: the broker deletes segments older than its retention (7 days) within seconds.
    base = int(time.time() * 1000) - 60_000
    for i in range(10):
        producer.send(topic, b"k", str(i).encode(), timestamp_ms=base + i * 1000)
    producer.flush()
    tp = TopicPartition(topic, 0)
    consumer = bus.consumer()
    consumer.assign([tp])
    assert consumer.beginning_offsets([tp]) == {tp: 0}
    assert consumer.end_offsets([tp]) == {tp: 10}
    consumer.seek(tp, 7)
    assert [r.value for r in drain(consumer, 3)] == [b"7", b"8", b"9"]
    seek_to_time(consumer, [tp], base + 3500)
    records = drain(consumer, 6)
    assert [r.value for r in records] == [b"4", b"5", b"6", b"7", b"8", b"9"]
    assert records[0].timestamp_ms == base + 4000
    seek_to_time(consumer, [tp], base + 60_000)
    assert consumer.position(tp) == 10
    consumer.seek_to_beginning([tp])
    assert consumer.position(tp) == 0
    consumer.close()


def test_headers_and_null_values_round_trip(bus: Bus, name: Callable[[str], str]) -> None:
    topic = name("headers")
    bus.create_topics([TopicSpec(topic, 1)])
    producer = bus.producer()
    producer.send(topic, b"k", b"v", headers=[("schema", b"click_event/1-0-0")])
    producer.send(topic, b"k", None)
    producer.flush()
    consumer = bus.consumer()
    consumer.assign([TopicPartition(topic, 0)])
    first, tombstone = drain(consumer, 2)
    assert first.headers == (("schema", b"click_event/1-0-0"),)
    assert tombstone.value is None
    consumer.close()


def test_records_over_the_topic_size_limit_are_refused(bus: Bus, name: Callable[[str], str]) -> None:
    topic = name("small")
    bus.create_topics([TopicSpec(topic, 1, {"max.message.bytes": "10000"})])
    producer = bus.producer()
    with pytest.raises(BusError):
        producer.send(topic, b"k", b"x" * 20_000)
        producer.flush()
    producer.send(topic, b"k", b"fits")
    producer.flush()
    consumer = bus.consumer()
    consumer.assign([TopicPartition(topic, 0)])
    assert [r.value for r in drain(consumer, 1)] == [b"fits"]
    consumer.close()


def test_compacted_topics_keep_the_latest_value_per_key(bus: Bus, name: Callable[[str], str]) -> None:
    topic = name("compact")
    configs = {
        "cleanup.policy": "compact",
        "segment.ms": "100",
        "min.cleanable.dirty.ratio": "0.01",
        "min.compaction.lag.ms": "0",
    }
    bus.create_topics([TopicSpec(topic, 1, configs)])
    producer = bus.producer()
    for round_ in range(5):
        for user in range(3):
            producer.send(topic, f"u{user}".encode(), f"{user}-{round_}".encode())
    producer.flush()
    tp = TopicPartition(topic, 0)
    latest = {b"u0": b"0-4", b"u1": b"1-4", b"u2": b"2-4"}
    if isinstance(bus, EmbeddedBus):
        bus.compact(topic)
    deadline = time.monotonic() + 60
    while True:
        consumer = bus.consumer()
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp]
        records: list[Record] = []
        while consumer.position(tp) < end:
            records.extend(consumer.poll(timeout_s=0.2))
        consumer.close()
        if len([r for r in records if r.key != b"roll"]) <= 3 or time.monotonic() > deadline:
            break
        # Kafka compacts only closed segments: roll the active one with a fresh record and wait.
        time.sleep(1.0)
        producer.send(topic, b"roll", b"roll")
        producer.flush()
    values = {r.key: r.value for r in records if r.key != b"roll"}
    assert values == latest
    assert len([r for r in records if r.key != b"roll"]) == 3, "older values were not compacted away"
    producer.close()


def test_range_assign_matches_kafkas_range_assignor() -> None:
    members = {"b": ["t1", "t2"], "a": ["t1", "t2"], "c": ["t1"]}
    result = range_assign(members, {"t1": 7, "t2": 4})
    assert result["a"] == {TopicPartition("t1", p) for p in (0, 1, 2)} | {
        TopicPartition("t2", p) for p in (0, 1)
    }
    assert result["b"] == {TopicPartition("t1", p) for p in (3, 4)} | {
        TopicPartition("t2", p) for p in (2, 3)
    }
    assert result["c"] == {TopicPartition("t1", p) for p in (5, 6)}


def test_embedded_partition_moves_only_after_its_owner_releases_it() -> None:
    bus = EmbeddedBus()
    bus.create_topics([TopicSpec("t", 2)])
    revoked: list[list[TopicPartition]] = []
    first = bus.consumer("g")
    first.subscribe(["t"], on_revoke=revoked.append)
    first.poll(timeout_s=0)
    assert first.assignment() == {TopicPartition("t", 0), TopicPartition("t", 1)}
    second = bus.consumer("g")
    second.subscribe(["t"])
    assert second.assignment() == set(), "partition 1 still belongs to the first member"
    first.poll(timeout_s=0)
    assert revoked == [[TopicPartition("t", 1)]]
    assert second.assignment() == {TopicPartition("t", 1)}
    with pytest.raises(BusError):
        first.commit({TopicPartition("t", 1): 0})

"""An in-process bus with Kafka's semantics, for demos and fast tests (no broker needed).

Like Kafka Streams' TopologyTestDriver it runs the real service code against real topic semantics:
partitions chosen by murmur2, offsets, consumer groups with range assignment and rebalancing,
committed offsets, seeks by offset and time, size limits and log compaction. It is thread-safe so a
demo can run every service in its own thread against one bus. It is not a substitute for testing on
the real broker.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from services.bus.base import BusError, RebalanceCallback, Record, TopicPartition, TopicSpec
from services.bus.partitioner import partition_for_key

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024 + 12  # Kafka's default max.message.bytes
# Compact a partition of a compacted topic once this many records were appended since the last pass.
COMPACTION_DIRTY_RECORDS = 5000


def range_assign(
    members: Mapping[str, Sequence[str]], partition_counts: Mapping[str, int]
) -> dict[str, set[TopicPartition]]:
    """Kafka's RangeAssignor: per topic, contiguous partition ranges to members sorted by id.

    Co-partitioned topics (same partition count) give each member the same partition numbers.
    """
    assignment: dict[str, set[TopicPartition]] = {member: set() for member in members}
    topics = sorted({topic for subscribed in members.values() for topic in subscribed})
    for topic in topics:
        consumers = sorted(m for m, subscribed in members.items() if topic in subscribed)
        count = partition_counts.get(topic, 0)
        per_member, extra = divmod(count, len(consumers))
        start = 0
        for index, member in enumerate(consumers):
            length = per_member + (1 if index < extra else 0)
            assignment[member].update(TopicPartition(topic, p) for p in range(start, start + length))
            start += length
    return assignment


@dataclass
class _Partition:
    offsets: list[int] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    next_offset: int = 0
    dirty: int = 0

    def read(self, offset: int, limit: int) -> list[Record]:
        start = bisect.bisect_left(self.offsets, offset)
        return self.records[start : start + limit]

    @property
    def start_offset(self) -> int:
        return self.offsets[0] if self.offsets else self.next_offset


@dataclass
class _Group:
    subscriptions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    target: dict[str, set[TopicPartition]] = field(default_factory=dict)
    owner: dict[TopicPartition, str] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    generation: int = 0


class EmbeddedBus:
    """In-process topics, partitions, offsets, consumer groups and compaction."""

    def __init__(self, *, auto_create_partitions: int | None = None) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._topics: dict[str, tuple[TopicSpec, list[_Partition]]] = {}
        self._groups: dict[str, _Group] = {}
        self._member_ids = itertools.count()
        self.auto_create_partitions = auto_create_partitions

    # -- administration -------------------------------------------------------------------------
    def create_topics(self, specs: Iterable[TopicSpec]) -> list[str]:
        created = []
        with self._lock:
            for spec in specs:
                if spec.partitions < 1:
                    raise BusError(f"topic {spec.name}: partitions must be at least 1")
                if spec.name in self._topics:
                    continue
                self._topics[spec.name] = (spec, [_Partition() for _ in range(spec.partitions)])
                created.append(spec.name)
            self._rebalance_all()
        return created

    def partitions_for(self, topic: str) -> int:
        with self._lock:
            return len(self._topic(topic)[1])

    def list_topics(self) -> set[str]:
        with self._lock:
            return set(self._topics)

    def producer(self) -> EmbeddedProducer:
        return EmbeddedProducer(self)

    def consumer(self, group_id: str | None = None) -> EmbeddedConsumer:
        return EmbeddedConsumer(self, group_id)

    def close(self) -> None:
        """Nothing to release: the bus lives as long as the process."""

    def compact(self, topic: str) -> None:
        """Run log compaction now on every partition of a compacted topic."""
        with self._lock:
            spec, partitions = self._topic(topic)
            if not spec.compacted:
                raise BusError(f"topic {topic} is not compacted (cleanup.policy={spec.configs})")
            for partition in partitions:
                self._compact(partition)

    # -- internals used by producers and consumers ----------------------------------------------
    def _topic(self, name: str) -> tuple[TopicSpec, list[_Partition]]:
        found = self._topics.get(name)
        if found is None:
            if self.auto_create_partitions is None:
                raise BusError(f"unknown topic {name!r}: create it first (qrec topics create)")
            self.create_topics([TopicSpec(name, self.auto_create_partitions)])
            found = self._topics[name]
        return found

    def _append(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        timestamp_ms: int | None,
        headers: tuple[tuple[str, bytes], ...],
        partition_index: int | None = None,
    ) -> Record:
        with self._lock:
            spec, partitions = self._topic(topic)
            limit = int(spec.configs.get("max.message.bytes", DEFAULT_MAX_MESSAGE_BYTES))
            size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)
            if size > limit:
                raise BusError(
                    f"record of {size} bytes is larger than max.message.bytes={limit} of topic {topic}"
                )
            if key is None and spec.compacted:
                raise BusError(f"compacted topic {topic} needs a key on every record")
            if partition_index is not None:
                if not 0 <= partition_index < len(partitions):
                    raise BusError(f"{topic} has no partition {partition_index}")
                index = partition_index
            elif key is None:
                index = min(range(len(partitions)), key=lambda p: partitions[p].next_offset)
            else:
                index = partition_for_key(key, len(partitions))
            partition = partitions[index]
            stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
            record = Record(topic, index, partition.next_offset, stamp, key, value, headers)
            partition.offsets.append(record.offset)
            partition.records.append(record)
            partition.next_offset += 1
            if spec.compacted:
                partition.dirty += 1
                if partition.dirty >= COMPACTION_DIRTY_RECORDS:
                    self._compact(partition)
            self._changed.notify_all()
            return record

    @staticmethod
    def _compact(partition: _Partition) -> None:
        # Like Kafka, keep the newest record per key and leave offsets untouched (gaps appear); the
        # newest record overall is never removed, so the partition's end offset is unchanged.
        latest: dict[bytes | None, int] = {}
        for record in partition.records:
            latest[record.key] = record.offset
        kept = [r for r in partition.records if latest[r.key] == r.offset]
        partition.records = kept
        partition.offsets = [r.offset for r in kept]
        partition.dirty = 0

    def _join(self, group_id: str, member: str, topics: tuple[str, ...]) -> None:
        with self._lock:
            group = self._groups.setdefault(group_id, _Group())
            group.subscriptions[member] = topics
            self._rebalance(group)

    def _leave(self, group_id: str, member: str) -> None:
        with self._lock:
            group = self._groups[group_id]
            group.subscriptions.pop(member, None)
            group.target.pop(member, None)
            for tp, holder in list(group.owner.items()):
                if holder == member:
                    del group.owner[tp]
            self._rebalance(group)

    def _rebalance(self, group: _Group) -> None:
        counts = {name: len(parts) for name, (_, parts) in self._topics.items()}
        group.target = range_assign(group.subscriptions, counts)
        group.generation += 1
        self._changed.notify_all()

    def _rebalance_all(self) -> None:
        for group in self._groups.values():
            if group.subscriptions:
                self._rebalance(group)


class EmbeddedProducer:
    """Appends synchronously: a record is durable on the bus when ``send`` returns."""

    def __init__(self, bus: EmbeddedBus) -> None:
        self._bus = bus

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> None:
        self._bus._append(topic, key, value, timestamp_ms, tuple(headers), partition)

    def flush(self, timeout_s: float | None = None) -> None:
        """Every send is already appended; nothing is buffered."""

    def partition_for(self, topic: str, key: bytes) -> int:
        return partition_for_key(key, self._bus.partitions_for(topic))

    def close(self) -> None:
        """Nothing to release."""


class EmbeddedConsumer:
    """A consumer with Kafka's group protocol semantics, simplified to one process.

    A partition moves between members only after its previous owner has released it at a poll
    (calling its revoke callback first), so two members never process the same partition at once.
    """

    def __init__(self, bus: EmbeddedBus, group_id: str | None) -> None:
        self._bus = bus
        self.group_id = group_id
        self.member_id = f"member-{next(bus._member_ids):06d}"
        self._positions: dict[TopicPartition, int] = {}
        self._subscribed: tuple[str, ...] = ()
        self._manual = False
        self._generation = -1
        self._on_assign: RebalanceCallback | None = None
        self._on_revoke: RebalanceCallback | None = None
        self._closed = False

    # -- membership -------------------------------------------------------------------------------
    def subscribe(
        self,
        topics: Sequence[str],
        *,
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> None:
        if self.group_id is None:
            raise BusError("subscribe needs a group_id; use assign() for a consumer without a group")
        self._subscribed = tuple(topics)
        self._on_assign, self._on_revoke = on_assign, on_revoke
        self._bus._join(self.group_id, self.member_id, self._subscribed)

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._manual = True
        with self._bus._lock:
            for tp in partitions:
                self._bus._topic(tp.topic)
            self._positions = {tp: self._initial_position(tp) for tp in partitions}

    def assignment(self) -> set[TopicPartition]:
        self._sync_group()
        return set(self._positions)

    def _initial_position(self, tp: TopicPartition) -> int:
        if self.group_id is not None:
            committed = self._bus._groups.get(self.group_id, _Group()).committed.get(tp)
            if committed is not None:
                return committed
        return self._partition(tp).start_offset

    def _partition(self, tp: TopicPartition) -> _Partition:
        partitions = self._bus._topic(tp.topic)[1]
        if not 0 <= tp.partition < len(partitions):
            raise BusError(f"{tp.topic} has no partition {tp.partition}")
        return partitions[tp.partition]

    def _sync_group(self) -> None:
        """Apply the group's current assignment: release what moved away, claim what is free."""
        if self._manual or self.group_id is None or not self._subscribed:
            return
        bus = self._bus
        with bus._lock:
            group = bus._groups[self.group_id]
            target = group.target.get(self.member_id, set())
            owned = set(self._positions)
            pending = {tp for tp in target if group.owner.get(tp) not in (None, self.member_id)}
            if group.generation == self._generation and not pending:
                return
            lost = owned - target
            if lost:
                if self._on_revoke is not None:
                    self._on_revoke(sorted(lost))
                for tp in lost:
                    self._positions.pop(tp, None)
                    if group.owner.get(tp) == self.member_id:
                        del group.owner[tp]
            gained = []
            for tp in sorted(target - owned):
                if group.owner.get(tp) in (None, self.member_id):
                    group.owner[tp] = self.member_id
                    self._positions[tp] = self._initial_position(tp)
                    gained.append(tp)
            still_pending = any(group.owner.get(tp) != self.member_id for tp in target)
            self._generation = -1 if still_pending else group.generation
            if lost or gained:
                bus._changed.notify_all()
            if gained and self._on_assign is not None:
                self._on_assign(gained)

    # -- reading ----------------------------------------------------------------------------------
    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        if self._closed:
            raise BusError("consumer is closed")
        deadline = time.monotonic() + timeout_s
        with self._bus._lock:
            while True:
                self._sync_group()
                batch = self._fetch(max_records)
                remaining = deadline - time.monotonic()
                if batch or remaining <= 0:
                    return batch
                self._bus._changed.wait(min(remaining, 0.05))

    def _fetch(self, max_records: int) -> list[Record]:
        batch: list[Record] = []
        for tp in sorted(self._positions):
            if len(batch) >= max_records:
                break
            partition = self._partition(tp)
            records = partition.read(self._positions[tp], max_records - len(batch))
            if records:
                batch.extend(records)
                self._positions[tp] = records[-1].offset + 1
            elif self._positions[tp] < partition.next_offset:
                self._positions[tp] = partition.next_offset  # only compacted-away offsets remain
        return batch

    # -- offsets ----------------------------------------------------------------------------------
    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        if self.group_id is None:
            raise BusError("commit needs a group_id")
        with self._bus._lock:
            group = self._bus._groups.setdefault(self.group_id, _Group())
            to_commit = dict(self._positions) if offsets is None else dict(offsets)
            for tp, offset in to_commit.items():
                if not self._manual and group.owner.get(tp) != self.member_id:
                    raise BusError(
                        f"cannot commit {tp.topic}[{tp.partition}]: the partition was reassigned "
                        "(a rebalance happened); the new owner will reprocess from the last commit"
                    )
                group.committed[tp] = offset

    def committed(self, partition: TopicPartition) -> int | None:
        if self.group_id is None:
            return None
        with self._bus._lock:
            return self._bus._groups.get(self.group_id, _Group()).committed.get(partition)

    def position(self, partition: TopicPartition) -> int:
        if partition not in self._positions:
            raise BusError(f"{partition} is not assigned to this consumer")
        return self._positions[partition]

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition not in self._positions:
            raise BusError(f"{partition} is not assigned to this consumer")
        self._positions[partition] = offset

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        with self._bus._lock:
            for tp in list(self._positions) if partitions is None else partitions:
                self.seek(tp, self._partition(tp).start_offset)

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        with self._bus._lock:
            for tp in list(self._positions) if partitions is None else partitions:
                self.seek(tp, self._partition(tp).next_offset)

    def offsets_for_times(
        self, partitions: Iterable[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int | None]:
        found: dict[TopicPartition, int | None] = {}
        with self._bus._lock:
            for tp in partitions:
                found[tp] = next(
                    (r.offset for r in self._partition(tp).records if r.timestamp_ms >= timestamp_ms), None
                )
        return found

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        with self._bus._lock:
            return {tp: self._partition(tp).start_offset for tp in partitions}

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        with self._bus._lock:
            return {tp: self._partition(tp).next_offset for tp in partitions}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.group_id is not None and self._subscribed and not self._manual:
            self._bus._leave(self.group_id, self.member_id)
        self._positions.clear()

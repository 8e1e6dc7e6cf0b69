"""The bus interface every qrec service talks to: Kafka in production, an in-process bus in demos.

The contract is Kafka's: topics split into partitions, records keyed by user_id and placed by
Kafka's murmur2 partitioner, offsets per partition, consumer groups with range-style assignment
(co-partitioned topics land on the same member), manual commits, and seeks by offset or time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    """One partition of one topic."""

    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed record: where it sits, and what it holds."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic to create: name, partition count and topic-level configs (e.g. cleanup.policy)."""

    name: str
    partitions: int
    configs: Mapping[str, str] = field(default_factory=dict)

    @property
    def compacted(self) -> bool:
        return "compact" in self.configs.get("cleanup.policy", "delete")


RebalanceCallback = Callable[[list[TopicPartition]], None]


class BusError(RuntimeError):
    """A bus operation failed in a way the caller should report (broker down, unknown topic...)."""


class Producer(Protocol):
    """Sends records; ``flush`` returns only when every record sent so far is acknowledged.

    The partition is chosen from the key (murmur2) unless ``partition`` is given: services that
    derive outputs from an input partition write them to the same partition number.
    """

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> None: ...

    def flush(self, timeout_s: float | None = None) -> None: ...

    def partition_for(self, topic: str, key: bytes) -> int: ...

    def close(self) -> None: ...


class Consumer(Protocol):
    """Reads records from subscribed (group-managed) or assigned partitions; commits are manual."""

    def subscribe(
        self,
        topics: Sequence[str],
        *,
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> None: ...

    def assign(self, partitions: Sequence[TopicPartition]) -> None: ...

    def assignment(self) -> set[TopicPartition]: ...

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]: ...

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None: ...

    def committed(self, partition: TopicPartition) -> int | None: ...

    def position(self, partition: TopicPartition) -> int: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None: ...

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None: ...

    def offsets_for_times(
        self, partitions: Iterable[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int | None]: ...

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]: ...

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]: ...

    def close(self) -> None: ...


class Bus(Protocol):
    """A factory for producers, consumers and topic administration on one cluster."""

    def producer(self) -> Producer: ...

    def consumer(self, group_id: str | None = None) -> Consumer: ...

    def create_topics(self, specs: Iterable[TopicSpec]) -> list[str]: ...

    def partitions_for(self, topic: str) -> int: ...

    def list_topics(self) -> set[str]: ...

    def close(self) -> None: ...


def seek_to_time(consumer: Consumer, partitions: Iterable[TopicPartition], timestamp_ms: int) -> None:
    """Position each partition at its first record at or after ``timestamp_ms`` (or at its end)."""
    parts = list(partitions)
    found = consumer.offsets_for_times(parts, timestamp_ms)
    ends = consumer.end_offsets(parts)
    for tp in parts:
        offset = found.get(tp)
        consumer.seek(tp, ends[tp] if offset is None else offset)

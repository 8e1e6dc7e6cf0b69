"""The Kafka bus on kafka-python: the only module that imports a Kafka client.

Producers are idempotent with ``acks=all``; consumers never auto-commit and use the range assignor,
so co-partitioned topics (clickstream and recommendations) give one member the same partitions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import MemberState, OffsetAndMetadata

from services.bus.base import BusError, RebalanceCallback, Record, TopicPartition, TopicSpec
from services.bus.partitioner import partition_for_key

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


@dataclass(frozen=True, kw_only=True)
class KafkaSettings:
    """How to reach a Kafka cluster; security settings pass straight through to the client."""

    bootstrap_servers: str
    client_id: str = "qrec"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    request_timeout_ms: int = 30_000
    linger_ms: int = 5
    # Large batches: with kafka-python every new batch wakes the sender thread through a socket,
    # which costs more than the record itself; qrec's user-state records are a few KB each.
    batch_size: int = 1024 * 1024
    compression_type: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def client_configs(self) -> dict[str, Any]:
        """Settings shared by producer, consumer and admin client (connection and security)."""
        configs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": self.sasl_plain_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        configs.update({k: v for k, v in optional.items() if v is not None})
        if self.security_protocol.startswith("SSL") or self.security_protocol == "SASL_SSL":
            configs["ssl_check_hostname"] = self.ssl_check_hostname
        configs.update(self.extra)
        return configs


def _ktp(tp: TopicPartition) -> KafkaTopicPartition:
    return KafkaTopicPartition(tp.topic, tp.partition)


def _tp(ktp: KafkaTopicPartition) -> TopicPartition:
    return TopicPartition(ktp.topic, ktp.partition)


class KafkaBus:
    """A bus on a real Kafka cluster."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._admin: KafkaAdminClient | None = None

    def _admin_client(self) -> KafkaAdminClient:
        if self._admin is None:
            try:
                self._admin = KafkaAdminClient(**self.settings.client_configs())
            except KafkaError as exc:
                raise BusError(
                    f"cannot reach Kafka at {self.settings.bootstrap_servers}: {exc}. "
                    "Check --bootstrap-servers and that the brokers are up."
                ) from exc
        return self._admin

    def producer(self) -> KafkaBusProducer:
        return KafkaBusProducer(self.settings)

    def consumer(self, group_id: str | None = None) -> KafkaBusConsumer:
        return KafkaBusConsumer(self.settings, group_id)

    def create_topics(self, specs: Iterable[TopicSpec]) -> list[str]:
        specs = list(specs)
        if not specs:
            return []
        request = {
            spec.name: {"num_partitions": spec.partitions, "configs": dict(spec.configs)} for spec in specs
        }
        response = self._admin_client().create_topics(request, raise_errors=False, wait_for_metadata=True)
        created = []
        for topic in _response_topics(response):
            code = topic.get("error_code", 0)
            if code == 0:
                created.append(topic["name"])
            elif code != TOPIC_ALREADY_EXISTS:
                raise BusError(f"creating topic {topic['name']} failed: {topic.get('error_message') or code}")
        return created

    def partitions_for(self, topic: str) -> int:
        for described in self._admin_client().describe_topics([topic]):
            if described.get("error_code", 0) == 0 and described.get("partitions"):
                return len(described["partitions"])
        raise BusError(f"unknown topic {topic!r}: create it first (qrec topics create)")

    def list_topics(self) -> set[str]:
        return set(self._admin_client().list_topics())

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None


def _response_topics(response: Any) -> list[dict[str, Any]]:
    topics = response.get("topics", []) if isinstance(response, dict) else getattr(response, "topics", [])
    result = []
    for topic in topics:
        if isinstance(topic, dict):
            result.append(topic)
        elif isinstance(topic, tuple | list):
            result.append({"name": topic[0], "error_code": topic[1], "error_message": None})
        else:
            result.append(
                {
                    "name": topic.name,
                    "error_code": topic.error_code,
                    "error_message": getattr(topic, "error_message", None),
                }
            )
    return result


class KafkaBusProducer:
    """An idempotent ``acks=all`` producer; ``flush`` raises if any record since the last flush failed."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._configs = settings.client_configs()
        self._configs.update(
            acks="all", enable_idempotence=True, linger_ms=settings.linger_ms, batch_size=settings.batch_size
        )
        if settings.compression_type:
            self._configs["compression_type"] = settings.compression_type
        self._producer = self._connect()
        self._errors: list[BaseException] = []
        self._partition_counts: dict[str, int] = {}

    def _connect(self) -> KafkaProducer:
        try:
            return KafkaProducer(**self._configs)
        except KafkaError as exc:
            raise BusError(
                f"cannot create a producer for {self._configs['bootstrap_servers']}: {exc}"
            ) from exc

    def _failed(self, exc: BaseException) -> None:
        self._errors.append(exc)

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
        try:
            future = self._producer.send(
                topic,
                value=value,
                key=key,
                timestamp_ms=timestamp_ms,
                headers=list(headers) or None,
                partition=partition,
            )
        except KafkaError as exc:
            raise BusError(f"sending to {topic} failed: {exc}") from exc
        future.add_errback(self._failed)

    def flush(self, timeout_s: float | None = None) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise BusError(f"flush failed: {exc}") from exc
        if self._errors:
            errors, self._errors = self._errors, []
            # After a failed batch kafka-python's idempotent producer keeps failing later records of
            # that partition; a fresh producer (new producer id) starts clean.
            self._producer.close(timeout=0)
            self._producer = self._connect()
            raise BusError(f"{len(errors)} record(s) were not acknowledged; first error: {errors[0]!r}")

    def partition_for(self, topic: str, key: bytes) -> int:
        count = self._partition_counts.get(topic)
        if count is None:
            partitions = self._producer.partitions_for(topic)
            if not partitions:
                raise BusError(f"unknown topic {topic!r}")
            count = self._partition_counts[topic] = len(partitions)
        return partition_for_key(key, count)

    def close(self) -> None:
        self._producer.close()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_assign: RebalanceCallback | None, on_revoke: RebalanceCallback | None) -> None:
        self._on_assign, self._on_revoke = on_assign, on_revoke

    def on_partitions_revoked(self, revoked: Any) -> None:
        if self._on_revoke is not None and revoked:
            self._on_revoke(sorted(_tp(k) for k in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        if self._on_assign is not None and assigned:
            self._on_assign(sorted(_tp(k) for k in assigned))


class KafkaBusConsumer:
    """A manual-commit consumer; with a group it uses the range assignor, without one it assigns."""

    def __init__(self, settings: KafkaSettings, group_id: str | None) -> None:
        configs = settings.client_configs()
        configs.update(
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=[RangePartitionAssignor],
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            fetch_max_wait_ms=100,
            # Notice new topics and partitions within seconds, not the client default of five minutes.
            metadata_max_age_ms=5000,
        )
        self.group_id = group_id
        self.dropped_joins = 0  # joins repaired by _rejoin_if_join_was_dropped()
        try:
            self._consumer = KafkaConsumer(**configs)
        except KafkaError as exc:
            raise BusError(f"cannot create a consumer for {settings.bootstrap_servers}: {exc}") from exc

    def subscribe(
        self,
        topics: Sequence[str],
        *,
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> None:
        if self.group_id is None:
            raise BusError("subscribe needs a group_id; use assign() for a consumer without a group")
        # Join only once the topics' partitions are known: a member that joins while a new topic's
        # metadata is still missing can be left without partitions until a later rebalance.
        deadline = time.monotonic() + 30
        for topic in topics:
            while not self._consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
                time.sleep(0.1)
        self._consumer.subscribe(list(topics), listener=_Listener(on_assign, on_revoke))
        # Fetch metadata once more now that the subscription is set: the coordinator snapshots the
        # subscribed topics' partitions only from a metadata response that arrives after subscribe().
        # Without it the group leader assigns on an empty snapshot, sees the next refresh differ and
        # rejoins ~100 ms later: a needless second rebalance, and a risky one on kafka-python 3.0.12.
        # There a rejoin triggered by a metadata change stops counting as needed once the leader has
        # assigned; if poll()'s timeout ends between that and the SyncGroup response (7 starts in
        # 85 here), no later poll completes the join: the heartbeat stays off and the broker expires
        # the member (poll() repairs that state, see _rejoin_if_join_was_dropped; better not to enter it).
        try:
            self._consumer.topics()
        except KafkaError as exc:
            raise BusError(f"cannot read topic metadata after subscribing to {list(topics)}: {exc}") from exc

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._consumer.assign([_ktp(tp) for tp in partitions])

    def assignment(self) -> set[TopicPartition]:
        return {_tp(k) for k in self._consumer.assignment()}

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            raise BusError(f"poll failed: {exc}") from exc
        self._rejoin_if_join_was_dropped()
        records = []
        for ktp, consumed in batches.items():
            topic, partition = ktp.topic, ktp.partition
            for r in consumed:
                records.append(
                    Record(topic, partition, r.offset, r.timestamp, r.key, r.value, tuple(r.headers or ()))
                )
        return records

    def _rejoin_if_join_was_dropped(self) -> None:
        """Repair kafka-python 3.0.12's dropped join (see subscribe()): a join attempt that finished
        after poll() stopped waiting for it, while nothing asks for a rejoin any more, is never
        completed; the member would stay in REBALANCING with its heartbeat off for good. Asking for a
        rejoin makes the next poll() join again, with the same member id while the broker still knows
        it, else with a new one. A no-op unless exactly that state is seen."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        task = getattr(coordinator, "_join_task", None)
        if coordinator is None or task is None or self.group_id is None:
            return
        if coordinator.state is MemberState.REBALANCING and task.is_done and not coordinator.need_rejoin():
            log.warning("group %s: a dropped kafka-python join attempt was found; rejoining", self.group_id)
            coordinator.request_rejoin()
            self.dropped_joins += 1

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        try:
            if offsets is None:
                self._consumer.commit()
            else:
                self._consumer.commit({_ktp(tp): OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except KafkaError as exc:
            raise BusError(f"commit failed: {exc}") from exc

    def committed(self, partition: TopicPartition) -> int | None:
        if self.group_id is None:
            return None
        found: int | None = self._consumer.committed(_ktp(partition))
        return found

    def position(self, partition: TopicPartition) -> int:
        found: int = self._consumer.position(_ktp(partition))
        return found

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(_ktp(partition), offset)

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        self._consumer.seek_to_beginning(*[_ktp(tp) for tp in partitions or ()])

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        self._consumer.seek_to_end(*[_ktp(tp) for tp in partitions or ()])

    def offsets_for_times(
        self, partitions: Iterable[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int | None]:
        found = self._consumer.offsets_for_times({_ktp(tp): timestamp_ms for tp in partitions})
        return {_tp(k): (None if v is None else v.offset) for k, v in found.items()}

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        found = self._consumer.beginning_offsets([_ktp(tp) for tp in partitions])
        return {_tp(k): v for k, v in found.items()}

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        found = self._consumer.end_offsets([_ktp(tp) for tp in partitions])
        return {_tp(k): v for k, v in found.items()}

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def raw_consume_rate(
    settings: KafkaSettings, topic: str, expected: int, timeout_s: float = 120.0
) -> tuple[int, float]:
    """Consume ``expected`` records of ``topic`` with a bare kafka-python consumer: (count, seconds).

    This is the ceiling a Python service on kafka-python can reach; services are measured against it.
    """
    consumer = KafkaConsumer(
        topic,
        **settings.client_configs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
    )
    count = 0
    started = time.perf_counter()
    deadline = started + timeout_s
    try:
        while count < expected and time.perf_counter() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=5000).values():
                count += len(records)
        return count, time.perf_counter() - started
    finally:
        consumer.close()

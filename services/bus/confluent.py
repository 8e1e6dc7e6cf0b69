"""The Kafka bus on confluent-kafka (librdkafka): an optional client that consumes far faster.

Same contract as ``services.bus.kafka`` (the kafka-python bus): idempotent ``acks=all`` producers that
place keyed records with Kafka's murmur2 partitioner, manual-commit consumers with the range assignor
(eager rebalancing), seeks by offset and time. ``KafkaSettings`` is shared; its ``extra`` entries are
passed to librdkafka as they are, so on this bus they must use librdkafka's property names
(``socket.keepalive.enable``, ``fetch.max.bytes``...).

Install the client with ``pip install 'qrec[confluent]'``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from services.bus.base import BusError, RebalanceCallback, Record, TopicPartition, TopicSpec
from services.bus.kafka import KafkaSettings
from services.bus.partitioner import partition_for_key

try:
    from confluent_kafka import (
        OFFSET_BEGINNING,
        OFFSET_INVALID,
        Consumer,
        IsolationLevel,
        KafkaError,
        KafkaException,
        Producer,
    )
    from confluent_kafka import TopicPartition as KafkaTopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec
except ImportError as exc:  # pragma: no cover - exercised only without the optional client
    raise ImportError(
        "services.bus.confluent needs the optional confluent-kafka client (librdkafka): "
        f"pip install 'qrec[confluent]' ({exc})"
    ) from exc

__all__ = [
    "ConfluentBus",
    "ConfluentBusConsumer",
    "ConfluentBusProducer",
    "librdkafka_configs",
    "raw_consume_rate_confluent",
]

log = logging.getLogger(__name__)
# librdkafka's own log lines (connection failures, offset resets...) go through Python logging here.
rdkafka_log = logging.getLogger(f"{__name__}.librdkafka")

# Like kafka-python's max_block_ms: how long send() waits for room in a full local queue.
MAX_BLOCK_S = 60.0
# How long creating a producer or consumer waits for the cluster's first metadata.
CONNECT_TIMEOUT_S = 10.0
# Kafka's default max.message.bytes (1 MiB plus record-batch overhead), the embedded bus's limit too.
MAX_MESSAGE_BYTES = 1024 * 1024 + 12
# librdkafka's upper bound for consume(num_messages).
MAX_CONSUME_BATCH = 1_000_000
POLL_EVERY_SENDS = 64


def _codes(names: str) -> frozenset[int]:
    """Error codes by (space-separated) names, skipping names this librdkafka version does not define."""
    return frozenset(getattr(KafkaError, name) for name in names.split() if hasattr(KafkaError, name))


# Consumer errors that librdkafka recovers from by itself (it retries, re-resolves the coordinator,
# refreshes metadata, or rejoins the group): logged, not raised, as kafka-python does.
_TRANSIENT_CONSUMER_ERRORS = _codes(
    """
    _TRANSPORT _ALL_BROKERS_DOWN _RESOLVE _TIMED_OUT _WAIT_COORD _UNKNOWN_TOPIC _UNKNOWN_PARTITION
    _AUTO_OFFSET_RESET _MAX_POLL_EXCEEDED _ASSIGNMENT_LOST NOT_COORDINATOR COORDINATOR_LOAD_IN_PROGRESS
    COORDINATOR_NOT_AVAILABLE LEADER_NOT_AVAILABLE NOT_LEADER_FOR_PARTITION FENCED_LEADER_EPOCH
    UNKNOWN_LEADER_EPOCH OFFSET_NOT_AVAILABLE REQUEST_TIMED_OUT NETWORK_EXCEPTION REBALANCE_IN_PROGRESS
    UNKNOWN_TOPIC_OR_PART KAFKA_STORAGE_ERROR
    """
)
_PARTITION_EOF = KafkaError._PARTITION_EOF
_REBALANCED = _codes("ILLEGAL_GENERATION UNKNOWN_MEMBER_ID REBALANCE_IN_PROGRESS FENCED_INSTANCE_ID")
_UNREACHABLE = _codes("_TRANSPORT _ALL_BROKERS_DOWN _TIMED_OUT _RESOLVE")
_MISSING = _codes("_NOENT UNKNOWN_TOPIC_OR_PART _UNKNOWN_PARTITION")

_Key = tuple[str, int]


def librdkafka_configs(settings: KafkaSettings) -> dict[str, Any]:
    """Connection and security settings shared by producer, consumer and admin client.

    The kafka-python names of ``KafkaSettings`` map to librdkafka's; ``extra`` is applied last, as is.
    """
    configs: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "security.protocol": settings.security_protocol.lower(),
        "socket.timeout.ms": settings.request_timeout_ms,
        "logger": rdkafka_log,
    }
    optional = {
        "sasl.mechanism": settings.sasl_mechanism,
        "sasl.username": settings.sasl_plain_username,
        "sasl.password": settings.sasl_plain_password,
        "ssl.ca.location": settings.ssl_cafile,
        "ssl.certificate.location": settings.ssl_certfile,
        "ssl.key.location": settings.ssl_keyfile,
    }
    configs.update({k: v for k, v in optional.items() if v is not None})
    if "SSL" in settings.security_protocol.upper():
        configs["ssl.endpoint.identification.algorithm"] = "https" if settings.ssl_check_hostname else "none"
    configs.update(settings.extra)
    return configs


def _timeout_s(settings: KafkaSettings) -> float:
    return settings.request_timeout_ms / 1000


def _error_of(exc: BaseException) -> KafkaError | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def _describe(exc: BaseException) -> str:
    err = _error_of(exc)
    return f"{err.name()}: {err.str()}" if err is not None else str(exc)


def _create(kind: Callable[[dict[str, Any]], Any], configs: dict[str, Any], what: str) -> Any:
    """Build a librdkafka client; a bad property becomes a BusError that says where it came from."""
    try:
        return kind(configs)
    except (KafkaException, ValueError, TypeError) as exc:
        raise BusError(
            f"cannot create a {what} for {configs.get('bootstrap.servers')}: {_describe(exc)}. "
            "On the confluent bus KafkaSettings.extra takes librdkafka property names "
            "(https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md)."
        ) from exc


def _unreachable(settings: KafkaSettings, exc: BaseException) -> BusError:
    return BusError(
        f"cannot reach Kafka at {settings.bootstrap_servers}: {_describe(exc)}. "
        "Check --bootstrap-servers and that the brokers are up."
    )


def _check_reachable(client: Any, settings: KafkaSettings) -> None:
    """Wait for the cluster's first metadata, as kafka-python's clients do when they are built."""
    try:
        # Usually answered in a few ms from the metadata fetched on connecting; but a consumer
        # sometimes does not notice that metadata for a second, so then ask for it outright.
        client.cluster_id(timeout=0.1)
        return
    except KafkaException:
        pass
    try:
        client.list_topics(timeout=min(_timeout_s(settings), CONNECT_TIMEOUT_S))
    except KafkaException as exc:
        raise _unreachable(settings, exc) from exc


def _ktp(tp: TopicPartition, offset: int | None = None) -> KafkaTopicPartition:
    if offset is None:
        return KafkaTopicPartition(tp.topic, tp.partition)
    return KafkaTopicPartition(tp.topic, tp.partition, offset)


def _tp(ktp: KafkaTopicPartition) -> TopicPartition:
    return TopicPartition(ktp.topic, ktp.partition)


def _check_partition_errors(found: Iterable[KafkaTopicPartition], what: str) -> None:
    for ktp in found:
        if ktp.error is not None:
            raise BusError(f"{what} failed for {ktp.topic}[{ktp.partition}]: {ktp.error.str()}")


def _new_admin(settings: KafkaSettings) -> AdminClient:
    configs = librdkafka_configs(settings)
    # The admin client is a producer-type handle: never let a metadata lookup create a topic.
    configs.setdefault("allow.auto.create.topics", False)
    configs["error_cb"] = _log_client_error
    admin: AdminClient = _create(AdminClient, configs, "Kafka admin client")
    return admin


class ConfluentBus:
    """A bus on a real Kafka cluster through confluent-kafka (librdkafka)."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._admin: AdminClient | None = None

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = _new_admin(self.settings)
        return self._admin

    def producer(self) -> ConfluentBusProducer:
        return ConfluentBusProducer(self.settings)

    def consumer(self, group_id: str | None = None) -> ConfluentBusConsumer:
        return ConfluentBusConsumer(self.settings, group_id, admin=self._admin_client())

    def _metadata(self, topic: str | None = None) -> Any:
        admin = self._admin_client()
        try:
            return admin.list_topics(topic=topic, timeout=_timeout_s(self.settings))
        except KafkaException as exc:
            raise _unreachable(self.settings, exc) from exc
        finally:
            admin.poll(0)  # serve queued log lines and error callbacks

    def create_topics(self, specs: Iterable[TopicSpec]) -> list[str]:
        unique: dict[str, TopicSpec] = {}
        for spec in specs:
            if spec.partitions < 1:
                raise BusError(f"topic {spec.name}: partitions must be at least 1")
            unique.setdefault(spec.name, spec)
        if not unique:
            return []
        timeout = _timeout_s(self.settings)
        admin = self._admin_client()
        new = [NewTopic(s.name, num_partitions=s.partitions, config=dict(s.configs)) for s in unique.values()]
        futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
        created = []
        for name in unique:
            try:
                futures[name].result()
            except KafkaException as exc:
                err = _error_of(exc)
                if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                if err is not None and err.code() in _UNREACHABLE:
                    raise _unreachable(self.settings, exc) from exc
                raise BusError(f"creating topic {name} failed: {_describe(exc)}") from exc
            created.append(name)
        admin.poll(0)
        self._wait_for_metadata({name: unique[name].partitions for name in created}, timeout)
        return created

    def _wait_for_metadata(self, expected: Mapping[str, int], timeout_s: float) -> None:
        """Return once the brokers' metadata shows every new topic, so clients find them at once."""
        deadline = time.monotonic() + timeout_s
        pending = dict(expected)
        while pending:
            topics = self._metadata().topics
            pending = {
                name: count
                for name, count in pending.items()
                if name not in topics
                or topics[name].error is not None
                or len(topics[name].partitions) < count
            }
            if not pending:
                return
            if time.monotonic() > deadline:
                raise BusError(f"topics {sorted(pending)} were created but did not appear in the metadata")
            time.sleep(0.05)

    def partitions_for(self, topic: str) -> int:
        found = self._metadata(topic).topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise BusError(f"unknown topic {topic!r}: create it first (qrec topics create)")
        return len(found.partitions)

    def list_topics(self) -> set[str]:
        return set(self._metadata().topics)

    def close(self) -> None:
        if self._admin is not None:
            self._admin.poll(0)
            self._admin = None


def _log_client_error(err: KafkaError) -> None:
    log.warning("librdkafka: %s: %s", err.name(), err.str())


class ConfluentBusProducer:
    """An idempotent ``acks=all`` producer; ``flush`` raises if any record since the last flush failed.

    Keyed records go to Kafka's murmur2 partition (``partitioner=murmur2_random``, not librdkafka's
    default crc32), so they land where the Java client, kafka-python and the embedded bus put them.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        configs = librdkafka_configs(settings)
        configs.update(
            {
                "acks": "all",
                "enable.idempotence": True,
                "partitioner": "murmur2_random",
                "linger.ms": settings.linger_ms,
                "batch.size": settings.batch_size,
                "message.max.bytes": max(MAX_MESSAGE_BYTES, settings.batch_size),
                "request.timeout.ms": settings.request_timeout_ms,
                # Delivery reports only for failures: the callback never runs on the happy path.
                "delivery.report.only.error": True,
                "on_delivery": self._delivered,
                "error_cb": self._client_error,
            }
        )
        if settings.compression_type:
            configs["compression.type"] = settings.compression_type
        for key, value in settings.extra.items():  # extra wins over qrec's choices, as in kafka.py
            configs[key] = value
        self._configs = configs
        self._errors: list[KafkaError] = []
        self._fatal: KafkaError | None = None
        self._partition_counts: dict[str, int] = {}
        self._sends = 0
        self._closed = False
        self._producer: Producer = _create(Producer, configs, "producer")
        _check_reachable(self._producer, settings)

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(err)

    def _client_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
            log.error("librdkafka producer fatal error: %s: %s", err.name(), err.str())
        else:
            _log_client_error(err)

    def _restart(self) -> None:
        """Replace a producer that hit a fatal error (idempotence broken) by a fresh one."""
        old = self._producer
        try:
            old.purge()
            old.flush(0)
        except (KafkaException, RuntimeError):  # pragma: no cover - best effort on a dead producer
            pass
        self._fatal = None
        self._producer = _create(Producer, self._configs, "producer")

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
        if self._closed:
            raise BusError("producer is closed")
        producer = self._producer
        deadline = 0.0
        while True:
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=key,
                    partition=-1 if partition is None else partition,
                    timestamp=timestamp_ms or 0,
                    headers=list(headers) if headers else None,
                )
                break
            except BufferError:
                # The local queue is full: serve delivery reports and wait for the brokers to catch up.
                now = time.monotonic()
                if deadline == 0.0:
                    deadline = now + MAX_BLOCK_S
                elif now > deadline:
                    raise BusError(
                        f"sending to {topic} failed: the producer queue stayed full for {MAX_BLOCK_S:.0f} s "
                        f"({len(producer)} records waiting); are the brokers at "
                        f"{self.settings.bootstrap_servers} up?"
                    ) from None
                producer.poll(0.05)
            except KafkaException as exc:
                err = _error_of(exc)
                if err is not None and err.fatal():
                    self._errors.append(err)
                    self._restart()
                raise BusError(f"sending to {topic} failed: {_describe(exc)}") from exc
        self._sends += 1
        if self._sends % POLL_EVERY_SENDS == 0:
            producer.poll(0)

    def flush(self, timeout_s: float | None = None) -> None:
        if self._closed:
            raise BusError("producer is closed")
        remaining = self._producer.flush(-1 if timeout_s is None else timeout_s)
        if self._errors or self._fatal is not None:
            errors, self._errors = self._errors, []
            fatal = self._fatal
            if fatal is not None:
                self._restart()
            first = errors[0] if errors else fatal
            count = len(errors) + remaining
            detail = f"{first.name()}: {first.str()}" if first is not None else "unknown"
            raise BusError(f"{count} record(s) were not acknowledged; first error: {detail}")
        if remaining:
            raise BusError(
                f"flush timed out after {timeout_s} s with {remaining} record(s) not yet acknowledged; "
                f"are the brokers at {self.settings.bootstrap_servers} up?"
            )

    def partition_for(self, topic: str, key: bytes) -> int:
        count = self._partition_counts.get(topic)
        if count is None:
            try:
                found = self._producer.list_topics(topic, timeout=_timeout_s(self.settings)).topics.get(topic)
            except KafkaException as exc:
                raise _unreachable(self.settings, exc) from exc
            if found is None or found.error is not None or not found.partitions:
                raise BusError(f"unknown topic {topic!r}")
            count = self._partition_counts[topic] = len(found.partitions)
        return partition_for_key(key, count)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._producer.flush(-1)
        close = getattr(self._producer, "close", None)  # confluent-kafka >= 2.12
        if close is not None:
            close()


class ConfluentBusConsumer:
    """A manual-commit consumer; with a group it uses the range assignor, without one it assigns.

    librdkafka needs a ``group.id`` even for a consumer that only assigns: without a group this one
    gets a throwaway id, starts at the beginning of its partitions and never commits.

    Positions are kept here (librdkafka's ``position`` forgets seeks until a record arrives), so
    ``position`` answers like kafka-python's: the next offset to read.

    Offset and metadata lookups go through an admin client (the bus's, else one of its own): on the
    consumer's own connection each would wait behind the long-poll fetch, up to fetch.wait.max.ms.
    """

    def __init__(
        self, settings: KafkaSettings, group_id: str | None, admin: AdminClient | None = None
    ) -> None:
        self.settings = settings
        self.group_id = group_id
        self._admin = admin
        configs = librdkafka_configs(settings)
        configs.update(
            {
                "group.id": group_id if group_id is not None else f"qrec-nogroup-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "range",
                "session.timeout.ms": settings.session_timeout_ms,
                "heartbeat.interval.ms": settings.heartbeat_interval_ms,
                "max.poll.interval.ms": settings.max_poll_interval_ms,
                "fetch.wait.max.ms": 100,
                "isolation.level": "read_uncommitted",  # as kafka-python: end offsets are high watermarks
                "error_cb": self._client_error,
            }
        )
        for key, value in settings.extra.items():
            configs[key] = value
        self._consumer: Consumer = _create(Consumer, configs, "consumer")
        self._positions: dict[_Key, int] = {}
        self._known_topics: set[str] = set()
        self._subscribed = False
        self._on_assign: RebalanceCallback | None = None
        self._on_revoke: RebalanceCallback | None = None
        # While the on_assign callback runs: the partitions being assigned, and seeks made meanwhile.
        self._assigning: set[_Key] | None = None
        self._assign_offsets: dict[_Key, int] = {}
        self._seek_pending = False
        self._deferred: BusError | None = None
        self._fatal: KafkaError | None = None
        self._closing = False
        self._closed = False
        try:
            _check_reachable(self._consumer, settings)
        except BusError:
            self._consumer.close()
            raise

    @property
    def _initial_offset(self) -> int:
        # With a group: the committed offset, else auto.offset.reset (earliest); without: the beginning.
        return OFFSET_INVALID if self.group_id is not None else OFFSET_BEGINNING

    def _client_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
        _log_client_error(err)

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("consumer is closed")

    # -- membership -------------------------------------------------------------------------------
    def subscribe(
        self,
        topics: Sequence[str],
        *,
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> None:
        self._check_open()
        if self.group_id is None:
            raise BusError("subscribe needs a group_id; use assign() for a consumer without a group")
        self._on_assign, self._on_revoke = on_assign, on_revoke
        self._subscribed = True
        try:
            self._consumer.subscribe(list(topics), on_assign=self._assigned, on_revoke=self._revoked)
        except KafkaException as exc:
            raise BusError(f"subscribing to {list(topics)} failed: {_describe(exc)}") from exc

    def _assigned(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        """Eager rebalance: the full new assignment. Seeks made by on_assign start the partitions there."""
        keys = [(p.topic, p.partition) for p in partitions]
        self._assigning, self._assign_offsets = set(keys), {}
        self._positions = {k: v for k, v in self._positions.items() if k in self._assigning}
        try:
            if self._on_assign is not None and keys and not self._closing:
                self._on_assign(sorted(TopicPartition(t, p) for t, p in keys))
        finally:
            sought, self._assigning, self._assign_offsets = self._assign_offsets, None, {}
            consumer.assign(
                [KafkaTopicPartition(t, p, sought.get((t, p), self._initial_offset)) for t, p in keys]
            )

    def _revoked(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        try:
            if self._on_revoke is not None and keys and not self._closing:
                self._on_revoke(sorted(TopicPartition(t, p) for t, p in keys))
        finally:
            for key in keys:
                self._positions.pop(key, None)
            self._seek_pending = False  # eager: everything is revoked, seeks of the old assignment lapse
            consumer.unassign()

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._check_open()
        # The first time a topic is assigned, look it up through the consumer: it checks the topic
        # exists, and librdkafka, knowing the leaders, starts fetching at once (without it the first
        # offset query waits for a 500 ms retry timer). Later assigns find it in librdkafka's cache.
        for topic in sorted({tp.topic for tp in partitions} - self._known_topics):
            self._partition_count(topic, self._consumer)
            self._known_topics.add(topic)
        self._positions, self._seek_pending = {}, False
        try:
            self._consumer.assign([_ktp(tp, self._initial_offset) for tp in partitions])
        except KafkaException as exc:
            raise BusError(f"assigning {list(partitions)} failed: {_describe(exc)}") from exc

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = _new_admin(self.settings)
        return self._admin

    def _partition_count(self, topic: str, client: Any) -> int:
        try:
            found = client.list_topics(topic, timeout=_timeout_s(self.settings)).topics.get(topic)
        except KafkaException as exc:
            raise _unreachable(self.settings, exc) from exc
        if found is None or found.error is not None or not found.partitions:
            raise BusError(f"unknown topic {topic!r}: create it first (qrec topics create)")
        return len(found.partitions)

    def _assigned_keys(self) -> set[_Key]:
        if self._assigning is not None:  # inside on_assign librdkafka's (eager) assignment is still empty
            return set(self._assigning)
        return {(p.topic, p.partition) for p in self._consumer.assignment()}

    def assignment(self) -> set[TopicPartition]:
        if self._closed:
            return set()
        return {TopicPartition(t, p) for t, p in self._assigned_keys()}

    def _require_assigned(self, tp: TopicPartition) -> _Key:
        key = (tp.topic, tp.partition)
        if key not in self._assigned_keys():
            raise BusError(f"{tp} is not assigned to this consumer")
        return key

    # -- reading ----------------------------------------------------------------------------------
    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        self._check_open()
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            raise deferred
        if self._fatal is not None:
            raise BusError(f"the consumer hit a fatal error: {self._fatal.name()}: {self._fatal.str()}")
        if self._seek_pending:
            self._apply_seeks()
        batch = max(1, min(max_records, MAX_CONSUME_BATCH))
        consumer = self._consumer
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            try:
                # consume() waits for a full batch or the timeout; to return as soon as records are
                # here (as kafka-python does), take what is queued, else wait for one and add the rest.
                messages = consumer.consume(batch, 0)
                if not messages:
                    remaining = deadline - time.monotonic()
                    first = consumer.poll(max(0.0, remaining))
                    if first is None:
                        return []
                    messages = [first, *consumer.consume(batch - 1, 0)] if batch > 1 else [first]
            except KafkaException as exc:
                raise BusError(f"poll failed: {_describe(exc)}") from exc
            records = self._records(messages)
            if records or time.monotonic() >= deadline:
                return records

    def _records(self, messages: list[Any]) -> list[Record]:
        records = []
        positions = self._positions
        error: BusError | None = None
        for message in messages:
            err = message.error()
            if err is not None:
                if err.code() == _PARTITION_EOF:
                    continue
                if not err.fatal() and (err.code() in _TRANSIENT_CONSUMER_ERRORS or err.retriable()):
                    log.warning("consumer: %s: %s (librdkafka retries)", err.name(), err.str())
                    continue
                if error is None:
                    where = f" on {message.topic()}[{message.partition()}]" if message.topic() else ""
                    error = BusError(f"poll failed{where}: {err.name()}: {err.str()}")
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            stamp_type, stamp = message.timestamp()
            headers = message.headers()
            records.append(
                Record(
                    topic,
                    partition,
                    offset,
                    stamp if stamp_type else -1,
                    message.key(),
                    message.value(),
                    tuple(headers) if headers else (),
                )
            )
            positions[(topic, partition)] = offset + 1
        if error is not None:
            if not records:
                raise error
            self._deferred = error  # hand out what was read first; report the error at the next poll
        return records

    # -- offsets ----------------------------------------------------------------------------------
    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        self._check_open()
        if self.group_id is None:
            raise BusError("commit needs a group_id")
        if offsets is None:
            assigned = self._assigned_keys()
            to_commit = [
                KafkaTopicPartition(t, p, o) for (t, p), o in self._positions.items() if (t, p) in assigned
            ]
        else:
            to_commit = [_ktp(tp, offset) for tp, offset in offsets.items()]
        if not to_commit:
            return
        try:
            result = self._consumer.commit(offsets=to_commit, asynchronous=False)
        except KafkaException as exc:
            err = _error_of(exc)
            if err is not None and err.code() in _REBALANCED:
                raise BusError(
                    f"commit failed ({err.name()}): the partitions were reassigned (a rebalance happened); "
                    "the new owner will reprocess from the last commit"
                ) from exc
            raise BusError(f"commit failed: {_describe(exc)}") from exc
        _check_partition_errors(result or (), "commit")

    def committed(self, partition: TopicPartition) -> int | None:
        self._check_open()
        if self.group_id is None:
            return None
        try:
            found = self._consumer.committed([_ktp(partition)], timeout=_timeout_s(self.settings))
        except KafkaException as exc:
            raise BusError(f"reading the committed offset of {partition} failed: {_describe(exc)}") from exc
        _check_partition_errors(found, "reading the committed offset")
        offset = found[0].offset if found else OFFSET_INVALID
        return offset if offset >= 0 else None

    def position(self, partition: TopicPartition) -> int:
        self._check_open()
        key = self._require_assigned(partition)
        found = self._positions.get(key)
        if found is None:
            # Nothing read or sought yet: where the fetch starts, the committed offset or the beginning.
            committed = self.committed(partition)
            found = committed if committed is not None else self.beginning_offsets([partition])[partition]
            self._positions[key] = found
        return found

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Move ``partition`` to ``offset`` for the next poll (lazily, as kafka-python does).

        librdkafka's own seek fails until a partition's fetcher has started (so right after assign)
        and otherwise blocks up to fetch.wait.max.ms; instead the next poll assigns every partition
        again at its known position, which also applies many seeks at once.
        """
        self._check_open()
        key = self._require_assigned(partition)
        self._positions[key] = offset
        if self._assigning is not None:
            self._assign_offsets[key] = offset  # applied by the assign that ends the rebalance callback
        else:
            self._seek_pending = True

    def _apply_seeks(self) -> None:
        self._seek_pending = False
        initial, positions = self._initial_offset, self._positions
        current = [(p.topic, p.partition) for p in self._consumer.assignment()]
        offsets = [KafkaTopicPartition(t, p, positions.get((t, p), initial)) for t, p in current]
        try:
            self._consumer.assign(offsets)
        except KafkaException as exc:
            raise BusError(f"seeking failed: {_describe(exc)}") from exc

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        parts = self.assignment() if partitions is None else list(partitions)
        for tp, offset in self.beginning_offsets(parts).items():
            self.seek(tp, offset)

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        parts = self.assignment() if partitions is None else list(partitions)
        for tp, offset in self.end_offsets(parts).items():
            self.seek(tp, offset)

    def offsets_for_times(
        self, partitions: Iterable[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int | None]:
        found = self._list_offsets(partitions, OffsetSpec.for_timestamp(timestamp_ms), "by time")
        return {tp: (offset if offset >= 0 else None) for tp, offset in found.items()}

    def _list_offsets(
        self, partitions: Iterable[TopicPartition], spec: Any, what: str
    ) -> dict[TopicPartition, int]:
        """One ListOffsets request per leader for all ``partitions`` (high watermarks, not stable offsets)."""
        self._check_open()
        parts = list(partitions)
        if not parts:
            return {}
        timeout = _timeout_s(self.settings)
        try:
            futures = self._admin_client().list_offsets(
                {_ktp(tp): spec for tp in parts},
                isolation_level=IsolationLevel.READ_UNCOMMITTED,
                request_timeout=timeout,
            )
            by_key = {(k.topic, k.partition): f for k, f in futures.items()}
            return {tp: by_key[(tp.topic, tp.partition)].result(timeout=timeout).offset for tp in parts}
        except KafkaException as exc:
            err = _error_of(exc)
            hint = ""
            if err is not None and err.code() in _MISSING:
                hint = f" (do all of {sorted({tp.topic for tp in parts})} exist, with these partitions?)"
            raise BusError(f"looking up offsets {what} failed: {_describe(exc)}{hint}") from exc
        except TimeoutError as exc:
            raise _unreachable(self.settings, exc) from exc

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return self._list_offsets(partitions, OffsetSpec.earliest(), "at the beginning")

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return self._list_offsets(partitions, OffsetSpec.latest(), "at the end")

    def close(self) -> None:
        if self._closed:
            return
        self._closing = True  # leaving the group revokes everything: not a rebalance to report
        try:
            self._consumer.close()
        finally:
            self._closed = True
            self._positions.clear()


def raw_consume_rate_confluent(
    settings: KafkaSettings, topic: str, expected: int, timeout_s: float = 120.0
) -> tuple[int, float]:
    """Consume ``expected`` records of ``topic`` with a bare confluent-kafka consumer: (count, seconds).

    The librdkafka counterpart of ``services.bus.kafka.raw_consume_rate``: every partition from the
    beginning, no group, batches of up to 5000, records counted but not converted.
    """
    configs = librdkafka_configs(settings)
    configs.update(
        {
            "group.id": f"qrec-nogroup-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
        }
    )
    consumer = _create(Consumer, configs, "consumer")
    try:
        # Connecting and reading the topic's metadata happen before the clock starts, as kafka-python's
        # consumer connects in its constructor; assignment, offset lookup and fetching are timed.
        try:
            found = consumer.list_topics(topic, timeout=_timeout_s(settings)).topics.get(topic)
        except KafkaException as exc:
            raise _unreachable(settings, exc) from exc
        if found is None or found.error is not None or not found.partitions:
            raise BusError(f"unknown topic {topic!r}: create it first (qrec topics create)")
        count = 0
        started = time.perf_counter()
        deadline = started + timeout_s
        consumer.assign([KafkaTopicPartition(topic, p, OFFSET_BEGINNING) for p in found.partitions])
        while count < expected and time.perf_counter() < deadline:
            for message in consumer.consume(min(5000, expected - count), 0.5):
                if message.error() is None:
                    count += 1
        return count, time.perf_counter() - started
    finally:
        consumer.close()

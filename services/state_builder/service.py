"""`qrec state-builder`: the service loop around the pure per-partition logic.

poll -> decode (bad input to the dead-letter topic) -> step -> produce transitions -> flush -> produce
UserState -> flush -> commit. Offsets are committed only after everything derived from those records
has been acknowledged by the bus, so a crash replays records instead of losing them; replayed
records are recognised by the offsets stored in each user's record and skipped. Transitions are
acknowledged before the states that reflect them, so a state never survives a crash without its
transitions (they are re-emitted instead, with the same ids).

Each UserState on the compacted user-state topic carries the user's full internal record (pending
recommendations, dedupe ids, offsets) in the ``qrec-record`` header. A process that is assigned a
partition first reads that partition of the user-state topic to the end and rebuilds its users from
those headers, then processes events: that is how state moves between processes on a rebalance.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.codec import CLICK_EVENTS, RECOMMENDATIONS, DecodeError, encode
from schemas.messages import SCHEMA_VERSIONS, ClickEvent, Recommendation
from services.bus.base import Bus, BusError, Record, TopicPartition
from services.dead_letter import DeadLetterSink, dead_letter
from services.metrics import ConsumerLag, ProcessMetrics, next_offsets
from services.replay.service import ensure_topics
from services.state_builder.config import StateBuilderConfig, parse_weights
from services.state_builder.partition import Emitted, PartitionState
from services.state_builder.step import StepParams, decode_record, encode_record
from services.topics import SOURCE_HEADER

log = logging.getLogger(__name__)

RECORD_HEADER = "qrec-record"
UPDATE_HEADER = "qrec-update"
RECORD_ONLY = b"record-only"
CONTROL_HEADER = "qrec-control"
FORGET = b"forget"
SCHEMA_HEADERS = {
    name: ("qrec-schema", f"{name}/{SCHEMA_VERSIONS[name][0]}".encode())
    for name in ("user_state", "transition")
}
# Sweep timers of idle users at most this often (in event time); results do not depend on it.
SWEEP_EVERY_MS = 60_000


def step_params(config: StateBuilderConfig) -> StepParams:
    """The pure parameters a service config stands for."""
    defaults = StepParams()
    return StepParams(
        window=config.window,
        session_gap_seconds=config.session_gap_seconds,
        attribution_window_seconds=config.attribution_window_seconds,
        ttl_seconds=config.ttl_days * 86400.0,
        reward_weights=parse_weights(config.reward_weights),
        logged_reward_weights=defaults.logged_reward_weights,
        logged_transitions=config.logged_transitions,
        recommendation_transitions=config.recommendation_transitions,
    )


def pseudonym(user_id: str, salt: str) -> str:
    """A stable, salted, irreversible stand-in for a user id."""
    return "p-" + hashlib.blake2b(user_id.encode(), key=salt.encode()[:64], digest_size=16).hexdigest()


class StateBuilderMetrics(ProcessMetrics):
    """What the state-builder exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "state_builder")
        self.events = Counter(
            "qrec_state_builder_events_total",
            "Click events applied, by event type",
            ["event_type"],
            registry=registry,
        )
        self.recommendations = Counter(
            "qrec_state_builder_recommendations_total",
            "Recommendations joined for attribution",
            registry=registry,
        )
        self.skipped = Counter(
            "qrec_state_builder_skipped_total",
            "Inputs not applied: duplicate event ids, or records already applied before a restart",
            ["reason"],
            registry=registry,
        )
        self.late = Counter(
            "qrec_state_builder_late_events_total",
            "Events older than the user's last applied event (applied, in stream order)",
            registry=registry,
        )
        self.state_updates = Counter(
            "qrec_state_builder_state_updates_total", "UserState messages published", registry=registry
        )
        self.transitions = Counter(
            "qrec_state_builder_transitions_total",
            "Transitions published, by source",
            ["source"],
            registry=registry,
        )
        self.attribution = Counter(
            "qrec_state_builder_attribution_total",
            "Recommended slots closed, by recommending policy and outcome (clicked, not_clicked, expired)",
            ["policy", "outcome"],
            registry=registry,
        )
        self.reward = Counter(
            "qrec_state_builder_reward_total",
            "Reward attributed to recommended slots (weighted feedback), by the recommending policy",
            ["policy"],
            registry=registry,
        )
        self.tombstones = Counter(
            "qrec_state_builder_deleted_users_total",
            "Users deleted (TTL expiry or qrec forget)",
            registry=registry,
        )
        self.users = Gauge(
            "qrec_state_builder_users", "Users held in memory by this process", registry=registry
        )
        self.latency = Histogram(
            "qrec_state_builder_latency_seconds",
            "From an event's Kafka record time to its UserState being acknowledged",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.restore_seconds = Histogram(
            "qrec_state_builder_restore_duration_seconds",
            "Time to rebuild the users of newly assigned partitions from the user-state topic",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.batch_size = Histogram(
            "qrec_state_builder_batch_records",
            "Records per processed batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=registry,
        )


@dataclass
class RunStats:
    """Counts of one run, for reports and tests."""

    records: int = 0
    batches: int = 0
    states: int = 0
    transitions: int = 0


class StateBuilder:
    """One state-builder process: owns some partitions of the co-partitioned input topics."""

    def __init__(
        self,
        config: StateBuilderConfig,
        bus: Bus,
        registry: CollectorRegistry | None = None,
        *,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.config = config
        self.bus = bus
        self.params = step_params(config)
        self.metrics = StateBuilderMetrics(registry or CollectorRegistry())
        self.wall_ms = wall_ms
        self.partitions: dict[int, PartitionState] = {}
        self.swept_at: dict[int, int] = {}
        self.stats = RunStats()
        if config.create_topics:
            ensure_topics(bus, config.partitions)
        counts = {t: bus.partitions_for(t) for t in (config.clickstream_topic, config.recommendations_topic)}
        counts[config.user_state_topic] = bus.partitions_for(config.user_state_topic)
        if len(set(counts.values())) != 1:
            raise BusError(
                "the clickstream, recommendations and user-state topics must have the same number of "
                f"partitions (co-partitioned), got {counts}; recreate them with one count"
            )
        self.producer = bus.producer()
        self.dead_letters = DeadLetterSink(self.producer, self.metrics, config.dead_letter_topic)
        self.consumer = bus.consumer(config.group_id)
        self._restore_consumer = bus.consumer()
        self.lag = ConsumerLag(self.metrics.registry, config.group_id)
        self._to_restore: set[int] = set()

    # -- rebalancing ------------------------------------------------------------------------------
    def _on_assign(self, assigned: list[TopicPartition]) -> None:
        # Restoring reads a whole partition of the user-state topic: too long for a rebalance callback
        # (it would hold up the group protocol), so it runs before the next batch is processed.
        self._to_restore.update({tp.partition for tp in assigned} - set(self.partitions))

    def _restore_assigned(self) -> None:
        numbers = sorted(self._to_restore - set(self.partitions))
        self._to_restore.clear()
        if not numbers:
            return
        started = time.monotonic()
        for number in numbers:
            self.partitions[number] = self._restore(number)
        self.metrics.restore_seconds.observe(time.monotonic() - started)
        self._update_users()
        log.info("assigned partitions %s (restored in %.2f s)", numbers, time.monotonic() - started)

    def _on_revoke(self, revoked: list[TopicPartition]) -> None:
        # Everything processed was flushed and committed before the poll that revokes, so the
        # new owner restores exactly this state from the user-state topic.
        for number in {tp.partition for tp in revoked}:
            self.partitions.pop(number, None)
            self._to_restore.discard(number)
        self._update_users()
        log.info("revoked partitions %s", sorted({tp.partition for tp in revoked}))

    def _restore(self, number: int) -> PartitionState:
        state = PartitionState(number, self.params, int(self.config.allowed_lateness_seconds * 1000))
        tp = TopicPartition(self.config.user_state_topic, number)
        consumer = self._restore_consumer
        consumer.assign([tp])
        consumer.seek_to_beginning([tp])
        end = consumer.end_offsets([tp])[tp]
        while consumer.position(tp) < end:
            for record in consumer.poll(max_records=5000, timeout_s=0.5):
                if record.key is None:
                    continue
                user_id = record.key.decode()
                if record.value is None:
                    state.restore(user_id, None)
                    continue
                blob = dict(record.headers).get(RECORD_HEADER)
                if blob is not None:
                    state.restore(user_id, decode_record(blob))
        # Not swept yet: the previous owner may have stopped before sweeping up to this watermark.
        self.swept_at[number] = 0
        return state

    def _update_users(self) -> None:
        self.metrics.users.set(sum(len(p.records) for p in self.partitions.values()))

    # -- processing -------------------------------------------------------------------------------
    def _decode(self, record: Record) -> ClickEvent | Recommendation | None:
        if record.topic == self.config.clickstream_topic:
            decoded: ClickEvent | Recommendation | DecodeError = CLICK_EVENTS.decode(record.value)
        else:
            decoded = RECOMMENDATIONS.decode(record.value)
        if isinstance(decoded, DecodeError):
            letter = dead_letter(
                record.value, decoded, service="state_builder", now_ms=self.wall_ms(), source=record
            )
            self.dead_letters.send(letter)
            return None
        if self.config.pseudonymize:
            from msgspec import structs

            salt = self.config.pseudonymize_salt or ""
            decoded = structs.replace(decoded, user_id=pseudonym(decoded.user_id, salt))
        return decoded

    def process(self, records: list[Record]) -> Emitted:
        """Apply a batch of records; returns what must be published (already sent, not yet flushed)."""
        self._restore_assigned()
        emitted_by_partition: dict[int, Emitted] = {}
        for record in records:
            partition = self.partitions.get(record.partition)
            if partition is None:  # revoked meanwhile: the new owner handles it
                continue
            emitted = emitted_by_partition.setdefault(record.partition, Emitted())
            if dict(record.headers).get(CONTROL_HEADER) == FORGET and record.key is not None:
                user_id = record.key.decode()
                if self.config.pseudonymize:
                    user_id = pseudonym(user_id, self.config.pseudonymize_salt or "")
                partition.forget(user_id, emitted)
                continue
            message = self._decode(record)
            if message is None:
                continue
            if isinstance(message, ClickEvent):
                before = len(emitted.states)
                partition.event(message, record.offset, emitted)
                if len(emitted.states) > before:
                    emitted.state_record_times[message.event_id] = record.timestamp_ms
            else:
                partition.recommendation(message, record.offset, emitted)
                self.metrics.recommendations.inc()
        for number, partition in self.partitions.items():
            emitted = emitted_by_partition.setdefault(number, Emitted())
            behind = partition.watermark_ms - self.swept_at.get(number, 0)
            if behind >= SWEEP_EVERY_MS or (not records and behind > 0):
                partition.sweep(emitted)
                self.swept_at[number] = partition.watermark_ms
        # Transitions first, and acknowledged, before any state that reflects them: a crash between the
        # two re-applies those events (the states did not move) and re-emits the same transition ids,
        # whereas the other order could persist a state whose transitions were lost.
        for number, emitted in emitted_by_partition.items():
            self._publish_transitions(number, emitted)
        if any(emitted.transitions for emitted in emitted_by_partition.values()):
            self.producer.flush()
        merged = Emitted()
        for number, emitted in emitted_by_partition.items():
            self._publish(number, emitted)
            merged.states.extend(emitted.states)
            merged.transitions.extend(emitted.transitions)
            merged.tombstones.extend(emitted.tombstones)
        return merged

    def _publish_transitions(self, number: int, emitted: Emitted) -> None:
        for transition in emitted.transitions:
            self.producer.send(
                self.config.transitions_topic,
                transition.user_id.encode(),
                encode(transition),
                headers=(SCHEMA_HEADERS["transition"], (SOURCE_HEADER, transition.source.encode())),
                partition=number,
            )
            self.metrics.transitions.labels(transition.source).inc()

    def _publish(self, number: int, emitted: Emitted) -> None:
        """States, internal records and tombstones (after the batch's transitions were acknowledged)."""
        send = self.producer.send
        config = self.config
        for state, record in emitted.states:
            # The event's own Kafka time travels on, so the actor can measure end-to-end latency.
            send(
                config.user_state_topic,
                state.user_id.encode(),
                encode(state),
                timestamp_ms=emitted.state_record_times.get(state.source_event_id),
                headers=(SCHEMA_HEADERS["user_state"], (RECORD_HEADER, encode_record(record))),
                partition=number,
            )
        for user_id, record in emitted.records_only:
            send(
                config.user_state_topic,
                user_id.encode(),
                encode(record.state),
                headers=(
                    SCHEMA_HEADERS["user_state"],
                    (RECORD_HEADER, encode_record(record)),
                    (UPDATE_HEADER, RECORD_ONLY),
                ),
                partition=number,
            )
        for user_id in emitted.tombstones:
            send(config.user_state_topic, user_id.encode(), None, partition=number)
            self.metrics.tombstones.inc()
        for event_type, count in emitted.events_by_type.items():
            self.metrics.events.labels(event_type).inc(count)
        for outcome, count in emitted.outcomes.items():
            if outcome in ("duplicate", "replayed"):
                self.metrics.skipped.labels(outcome).inc(count)
            elif outcome == "late":
                self.metrics.late.inc(count)
        for (policy, outcome), count in emitted.attribution.items():
            self.metrics.attribution.labels(policy, outcome).inc(count)
        for policy, reward in emitted.reward_by_policy.items():
            self.metrics.reward.labels(policy).inc(reward)
        self.metrics.state_updates.inc(len(emitted.states))
        self.stats.states += len(emitted.states)
        self.stats.transitions += len(emitted.transitions)

    def poll_once(self, timeout_s: float = 0.5) -> int:
        """One poll -> process -> flush -> commit cycle; returns the number of records consumed."""
        records = self.consumer.poll(max_records=self.config.max_batch, timeout_s=timeout_s)
        self.process(records)
        self.producer.flush()
        if records:
            now = time.time()
            for record in records:
                if record.topic == self.config.clickstream_topic:
                    self.metrics.latency.observe(max(0.0, now - record.timestamp_ms / 1000.0))
            try:
                self.consumer.commit(next_offsets(records))
            except BusError as exc:
                # A rebalance took the partitions away: their new owner resumes from the last commit and
                # skips what this process already published (offsets are stored in each record).
                log.warning("commit failed, records will be re-read by their new owner: %s", exc)
            self.stats.records += len(records)
            self.stats.batches += 1
            self.metrics.batch_size.observe(len(records))
        self._update_users()
        self.lag.update(self.consumer)
        return len(records)

    def run(self, stop: threading.Event | None = None, *, idle_exit_s: float | None = None) -> RunStats:
        """Consume until ``stop`` is set (or nothing arrived for ``idle_exit_s`` seconds)."""
        stop = stop or threading.Event()
        self.consumer.subscribe(
            [self.config.clickstream_topic, self.config.recommendations_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
        )
        self.metrics.up.labels("state_builder").set(1)
        last_record = time.monotonic()
        try:
            while not stop.is_set():
                if self.poll_once():
                    last_record = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last_record > idle_exit_s:
                    break
        finally:
            self.metrics.up.labels("state_builder").set(0)
            self.close()
        return self.stats

    def close(self) -> None:
        try:
            self.producer.flush()
        finally:
            self.consumer.close()
            self._restore_consumer.close()
            self.producer.close()

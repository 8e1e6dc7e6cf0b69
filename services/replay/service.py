"""`qrec replay` and `qrec record`: recorded logs into the clickstream, and topics back into logs."""

from __future__ import annotations

import heapq
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from schemas.codec import encode
from services.bus.base import Bus, Record, TopicPartition, TopicSpec, seek_to_time
from services.dead_letter import DeadLetterSink, dead_letter
from services.metrics import ProcessMetrics
from services.replay.config import RecordConfig, ReplayConfig
from services.replay.formats import Row, read_log
from services.replay.step import Pacer, in_range, parse_time_ms
from services.topics import topic_specs

SCHEMA_HEADER = ("qrec-schema", b"click_event/1-0-0")


class ReplayMetrics(ProcessMetrics):
    """Replay progress: rows read by outcome and events produced."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "replay")
        self.rows = Counter(
            "qrec_replay_rows_total",
            "Log rows read, by outcome (ok, invalid)",
            ["outcome"],
            registry=registry,
        )
        self.events = Counter(
            "qrec_replay_events_produced_total", "Click events produced to the clickstream", registry=registry
        )
        self.skipped = Counter(
            "qrec_replay_events_skipped_total",
            "Events left out because they fall outside --from-time/--to-time",
            registry=registry,
        )
        self.event_time = Gauge(
            "qrec_replay_event_time_seconds",
            "Event time of the last produced event (unix seconds): how far through the log the replay is",
            registry=registry,
        )


@dataclass
class ReplaySummary:
    """What a replay did, for the final report and for tests."""

    rows: int = 0
    events_produced: int = 0
    invalid_rows: int = 0
    skipped_out_of_range: int = 0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def events_per_second(self) -> float:
        return self.events_produced / self.seconds if self.seconds > 0 else 0.0


def _progress(enabled: bool, console: Console | None) -> Progress | nullcontext[None]:
    console = console or Console(stderr=True)
    if not enabled or not console.is_terminal:
        return nullcontext()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[events]:,} events"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def time_ordered(rows: Iterable[Row]) -> Iterator[Row]:
    """Rejected rows first (in file order), then one row per event sorted by time (stable)."""
    events: list[tuple[int, int, int, Row]] = []
    for row in rows:
        if row.error is not None:
            yield row
            continue
        for index, event in enumerate(row.events):
            # Only the first event of a row carries its bytes, so progress still adds up to the file size.
            part = Row(row.line, row.raw if index == 0 else b"", (event,), None)
            events.append((event.timestamp, row.line, index, part))
    events.sort(key=lambda item: item[:3])
    for *_, row in events:
        yield row


def ensure_topics(bus: Bus, partitions: int, *extra: str) -> None:
    """Create the qrec topics (and any extra ones) that do not exist yet."""
    specs = topic_specs(partitions)
    names = {s.name for s in specs}
    bus.create_topics(specs + [TopicSpec(name, partitions) for name in extra if name not in names])


def run_replay(
    config: ReplayConfig,
    bus: Bus,
    registry: CollectorRegistry | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    console: Console | None = None,
) -> ReplaySummary:
    """Produce every event of ``config.log`` to the clickstream; bad rows go to the dead-letter topic."""
    path = Path(config.log)
    if not path.is_file():
        raise FileNotFoundError(f"log file {path} does not exist")
    metrics = ReplayMetrics(registry or CollectorRegistry())
    metrics.up.labels("replay").set(1)
    if config.create_topics:
        ensure_topics(bus, config.partitions, config.topic, config.dead_letter_topic)
    producer = bus.producer()
    sink = DeadLetterSink(producer, metrics, config.dead_letter_topic)
    from_ms = parse_time_ms(config.from_time) if config.from_time else None
    to_ms = parse_time_ms(config.to_time) if config.to_time else None
    pacer = Pacer(None if config.speed == "max" else float(config.speed))
    summary = ReplaySummary()
    started = clock()
    total_bytes = path.stat().st_size
    with _progress(config.progress, console) as progress:
        task = progress.add_task(f"replay {path.name}", total=total_bytes, events=0) if progress else None
        rows: Iterable[Row] = read_log(path, config.format, session_gap_seconds=config.session_gap_seconds)
        if config.order == "time":
            rows = time_ordered(rows)
        for row in rows:
            summary.rows += 1
            if progress is not None and task is not None:
                progress.update(task, advance=len(row.raw) + 1, events=summary.events_produced)
            if row.error is not None:
                summary.invalid_rows += 1
                metrics.rows.labels("invalid").inc()
                sink.send(
                    dead_letter(
                        row.raw,
                        row.error,
                        service="replay",
                        now_ms=now_ms(),
                        source_file=path.name,
                        source_line=row.line,
                    )
                )
                continue
            metrics.rows.labels("ok").inc()
            for event in row.events:
                if not in_range(event.timestamp, from_ms, to_ms):
                    summary.skipped_out_of_range += 1
                    metrics.skipped.inc()
                    continue
                if config.limit is not None and summary.events_produced >= config.limit:
                    break
                wait = pacer.delay_s(event.timestamp, clock())
                if wait > 0:
                    producer.flush()
                    sleep(wait)
                producer.send(config.topic, event.user_id.encode(), encode(event), headers=(SCHEMA_HEADER,))
                summary.events_produced += 1
                metrics.events.inc()
                metrics.event_time.set(event.timestamp / 1000.0)
            if config.limit is not None and summary.events_produced >= config.limit:
                break
        producer.flush()
        if progress is not None and task is not None:
            progress.update(task, completed=total_bytes, events=summary.events_produced)
    producer.close()
    summary.seconds = clock() - started
    summary.dead_letters_by_reason = dict(sink.counts)
    metrics.up.labels("replay").set(0)
    return summary


class _Stamped(msgspec.Struct):
    timestamp: int | None = None


_STAMP = msgspec.json.Decoder(_Stamped)


def _order_key(record: Record) -> tuple[int, int, int]:
    """Sort recorded records by event time when the value carries one, else by record time."""
    stamp = None
    if record.value:
        try:
            stamp = _STAMP.decode(record.value).timestamp
        except (msgspec.MsgspecError, UnicodeDecodeError):
            stamp = None
    return (record.timestamp_ms if stamp is None else stamp, record.partition, record.offset)


@dataclass
class RecordSummary:
    """What a recording wrote."""

    records: int = 0
    tombstones: int = 0
    partitions: int = 0
    seconds: float = 0.0


def _read_partitions(
    consumer: Any, partitions: list[TopicPartition], ends: dict[TopicPartition, int], to_ms: int | None
) -> dict[TopicPartition, list[Record]]:
    by_partition: dict[TopicPartition, list[Record]] = {tp: [] for tp in partitions}
    remaining = {tp for tp in partitions if consumer.position(tp) < ends[tp]}
    while remaining:
        for record in consumer.poll(max_records=5000, timeout_s=0.5):
            tp = record.topic_partition
            if tp not in remaining:
                continue
            if record.offset >= ends[tp] or (to_ms is not None and record.timestamp_ms >= to_ms):
                remaining.discard(tp)
                continue
            by_partition[tp].append(record)
        remaining = {tp for tp in remaining if consumer.position(tp) < ends[tp]}
    return by_partition


def run_record(config: RecordConfig, bus: Bus, out: IO[bytes] | None = None) -> RecordSummary:
    """Write the values of ``config.topic`` as JSONL: each user's records in offset order.

    Without --follow the recording stops at the end offsets seen at start, and partitions are merged
    by event time (the value's ``timestamp`` field when present), so recording the same topic
    contents twice gives the same bytes.
    """
    started = time.monotonic()
    partitions = [TopicPartition(config.topic, p) for p in range(bus.partitions_for(config.topic))]
    consumer = bus.consumer()
    consumer.assign(partitions)
    if config.from_time:
        seek_to_time(consumer, partitions, parse_time_ms(config.from_time))
    else:
        consumer.seek_to_beginning(partitions)
    to_ms = parse_time_ms(config.to_time) if config.to_time else None
    summary = RecordSummary(partitions=len(partitions))
    handle: IO[bytes]
    close = False
    if out is not None:
        handle = out
    elif config.out == "-":
        handle = sys.stdout.buffer
    else:
        handle, close = open(config.out, "wb"), True  # noqa: SIM115 - closed below
    try:
        if config.follow:
            _follow(consumer, handle, summary, to_ms, config.idle_timeout_seconds)
        else:
            ends = consumer.end_offsets(partitions)
            by_partition = _read_partitions(consumer, partitions, ends, to_ms)
            streams: list[Iterator[tuple[tuple[int, int, int], Record]]] = [
                ((_order_key(r), r) for r in records) for records in by_partition.values()
            ]
            for _, record in heapq.merge(*streams, key=lambda pair: pair[0]):
                _write(handle, record, summary)
        handle.flush()
    finally:
        consumer.close()
        if close:
            handle.close()
    summary.seconds = time.monotonic() - started
    return summary


def _write(handle: IO[bytes], record: Record, summary: RecordSummary) -> None:
    if record.value is None:
        summary.tombstones += 1  # a tombstone has no event to write
        return
    handle.write(record.value.rstrip(b"\n") + b"\n")
    summary.records += 1


def _follow(
    consumer: Any, handle: IO[bytes], summary: RecordSummary, to_ms: int | None, idle_s: float
) -> None:
    last = time.monotonic()
    while True:
        batch = consumer.poll(max_records=5000, timeout_s=0.5)
        if batch:
            last = time.monotonic()
        for record in batch:
            if to_ms is not None and record.timestamp_ms >= to_ms:
                return
            _write(handle, record, summary)
        handle.flush()
        if idle_s > 0 and time.monotonic() - last > idle_s:
            return

"""`qrec demo`: what runs end to end today, on the embedded bus.

It replays a real recorded log (the Taobao sample in ../shared/data, or synthetic events when that
folder is absent) through the in-process bus, keeps the rows that do not parse on the dead-letter
topic, reads the clickstream back, and reports. The closed loop (simulator, state-builder, learner,
actor) builds on exactly these parts.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from schemas.codec import CLICK_EVENTS, DEAD_LETTERS, DecodeError, encode
from services.bench import TAOBAO, synthetic_events
from services.bus.base import TopicPartition
from services.bus.embedded import EmbeddedBus
from services.replay.config import ReplayConfig
from services.replay.service import run_replay
from services.topics import CLICKSTREAM, DEAD_LETTER


def run_demo(quick: bool, console: Console) -> int:
    """Replay a real log through the embedded bus and show what arrived; returns an exit code."""
    bus = EmbeddedBus()
    with tempfile.TemporaryDirectory() as tmp:
        log = TAOBAO
        if not log.is_file():
            log = Path(tmp) / "synthetic.jsonl"
            log.write_bytes(b"".join(encode(e) + b"\n" for e in synthetic_events(20_000)))
            console.print(f"[yellow]{TAOBAO} not found; replaying synthetic events instead[/]")
        config = ReplayConfig(log=str(log), limit=20_000 if quick else None)
        summary = run_replay(config, bus, CollectorRegistry(), console=console)
    consumer = bus.consumer()
    consumer.assign(
        [TopicPartition(CLICKSTREAM, p) for p in range(bus.partitions_for(CLICKSTREAM))]
        + [TopicPartition(DEAD_LETTER, 0)]
    )
    by_type: Counter[str] = Counter()
    users: set[str] = set()
    dead: list[str] = []
    while batch := consumer.poll(max_records=10_000, timeout_s=0):
        for record in batch:
            if record.topic == DEAD_LETTER:
                letter = DEAD_LETTERS.decode(record.value)
                if not isinstance(letter, DecodeError):
                    dead.append(f"line {letter.source_line}: {letter.reason}")
                continue
            event = CLICK_EVENTS.decode(record.value)
            if isinstance(event, DecodeError):
                raise RuntimeError(f"the clickstream holds an event that does not decode: {event.reason}")
            by_type[event.event_type] += 1
            users.add(event.user_id)
    table = Table(title=f"{log.name} replayed through the embedded bus ({summary.seconds:.1f} s)")
    table.add_column("event type")
    table.add_column("events", justify="right")
    for event_type, count in by_type.most_common():
        table.add_row(event_type, f"{count:,}")
    table.add_row("[bold]all", f"[bold]{sum(by_type.values()):,}")
    Console().print(table)
    console.print(f"{len(users):,} users; {summary.events_per_second:,.0f} events/s through the bus")
    for line in dead:
        console.print(f"dead letter: {line}")
    return 0

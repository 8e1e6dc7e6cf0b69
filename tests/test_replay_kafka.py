"""Replay and record through the real broker: real logs in, the same events out, bad rows kept."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from schemas.codec import CLICK_EVENTS, DEAD_LETTERS, DecodeError, encode
from schemas.messages import ClickEvent, DeadLetter
from services.bus.base import Bus
from services.bus.embedded import EmbeddedBus
from services.bus.kafka import KafkaBus, KafkaSettings
from services.replay.config import RecordConfig, ReplayConfig
from services.replay.formats import read_log
from services.replay.service import run_record, run_replay
from tests.helpers import TAOBAO, read_topic, require_shared_data


def per_user(events: list[ClickEvent]) -> dict[str, list[ClickEvent]]:
    grouped: dict[str, list[ClickEvent]] = {}
    for event in events:
        grouped.setdefault(event.user_id, []).append(event)
    return grouped


def decode_events(lines: list[bytes]) -> list[ClickEvent]:
    events = []
    for line in lines:
        event = CLICK_EVENTS.decode(line)
        assert not isinstance(event, DecodeError), event
        events.append(event)
    return events


@pytest.fixture
def kafka_bus(bootstrap_servers: str) -> KafkaBus:
    return KafkaBus(KafkaSettings(bootstrap_servers=bootstrap_servers))


@pytest.mark.kafka
def test_taobao_sample_replays_through_kafka_and_records_back_identically(
    kafka_bus: KafkaBus, bootstrap_servers: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    require_shared_data(TAOBAO)
    expected = [e for row in read_log(TAOBAO) for e in row.events]
    topic, dead = unique_name("clickstream"), unique_name("dead-letter")
    config = ReplayConfig(
        log=str(TAOBAO),
        bootstrap_servers=bootstrap_servers,
        topic=topic,
        dead_letter_topic=dead,
        progress=False,
    )
    registry = CollectorRegistry()
    summary = run_replay(config, kafka_bus, registry)
    assert summary.events_produced == len(expected) == 84_475
    assert summary.invalid_rows == 1
    assert registry.get_sample_value("qrec_replay_events_produced_total") == len(expected)
    assert summary.dead_letters_by_reason == {"missing_field": 1}
    labels = {"service": "replay", "reason": "missing_field"}
    assert registry.get_sample_value("qrec_dead_letters_total", labels) == 1

    out = tmp_path / "recorded.jsonl"
    record_config = RecordConfig(
        topic=topic, out=str(out), bootstrap_servers=bootstrap_servers, progress=False
    )
    recorded = run_record(record_config, kafka_bus)
    assert recorded.records == len(expected)
    got = decode_events(out.read_bytes().splitlines())
    assert Counter(encode(e) for e in got) == Counter(encode(e) for e in expected)
    assert per_user(got) == per_user(expected), "each user's events must keep their order"

    # The recorded file replays to the same topic contents: recording it again gives the same bytes.
    topic2 = unique_name("clickstream")
    again = run_replay(
        ReplayConfig(
            log=str(out),
            bootstrap_servers=bootstrap_servers,
            topic=topic2,
            dead_letter_topic=dead,
            progress=False,
        ),
        kafka_bus,
    )
    assert again.events_produced == len(expected) and again.invalid_rows == 0
    buffer = io.BytesIO()
    run_record(RecordConfig(topic=topic2, out="-", bootstrap_servers=bootstrap_servers), kafka_bus, buffer)
    assert buffer.getvalue() == out.read_bytes()

    letters = [DEAD_LETTERS.decode(r.value) for r in read_topic(kafka_bus, dead)]
    assert len(letters) == 1
    letter = letters[0]
    assert isinstance(letter, DeadLetter)
    assert letter.source_line == 84_476 and letter.source_file == TAOBAO.name
    assert "timestamp" in letter.reason


def malformed_log(path: Path) -> tuple[list[ClickEvent], dict[int, str]]:
    """A JSONL log mixing valid events with every kind of bad line; returns (valid, line -> reason)."""
    valid = [
        ClickEvent(
            event_id=f"e{i}",
            user_id=f"u{i % 3}",
            session_id="s",
            event_type="view",
            timestamp=1000 + i,
            item_id=f"i{i}",
        )
        for i in range(6)
    ]
    good = [encode(e) for e in valid]
    lines: list[bytes] = []
    bad: dict[int, str] = {}

    def add_bad(data: bytes, reason: str) -> None:
        lines.append(data)
        bad[len(lines)] = reason

    lines.append(good[0])
    add_bad(b'{"event_id": "x1", "user_id": ', "invalid_json")
    lines.append(good[1])
    add_bad(
        b'{"event_id": "x2", "user_id": "u", "event_type": "view", "timestamp": 5, "item_id": "i"}',
        "missing_field",
    )
    add_bad(
        b'{"event_id": "x3", "user_id": "u", "session_id": "s", "event_type": "view", "timestamp": "noon", '
        b'"item_id": "i"}',
        "wrong_type",
    )
    lines.append(good[2])
    add_bad(
        b'{"event_id": "x4", "user_id": "u", "session_id": "s", "event_type": "teleport", "timestamp": 5, '
        b'"item_id": "i"}',
        "unknown_event_type",
    )
    add_bad(
        b'{"event_id": "x5", "user_id": "u", "session_id": "s", "event_type": "view", "timestamp": 5, '
        b'"item_id": "' + b"i" * 100_000 + b'"}',
        "oversized",
    )
    lines.append(good[3])
    add_bad(
        b'{"event_id": "x6", "user_id": "\xff\xfeu", "session_id": "s", "event_type": "view", '
        b'"timestamp": 5, "item_id": "i"}',
        "not_utf8",
    )
    lines.append(good[4])
    lines.append(good[5])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return valid, bad


def check_malformed_replay(
    bus: Bus, config: ReplayConfig, valid: list[ClickEvent], bad: dict[int, str]
) -> None:
    summary = run_replay(config, bus, CollectorRegistry())
    assert summary.events_produced == len(valid)
    assert summary.invalid_rows == len(bad)
    assert summary.dead_letters_by_reason == dict(Counter(bad.values()))
    arrived = decode_events([r.value or b"" for r in read_topic(bus, config.topic)])
    assert per_user(arrived) == per_user(valid)
    letters = [DEAD_LETTERS.decode(r.value) for r in read_topic(bus, config.dead_letter_topic)]
    assert all(isinstance(letter, DeadLetter) for letter in letters)
    by_line = {letter.source_line: letter for letter in letters if isinstance(letter, DeadLetter)}
    assert {line: letter.reason_code for line, letter in by_line.items()} == bad
    assert by_line[min(k for k, v in bad.items() if v == "not_utf8")].payload_encoding == "base64"
    oversized = by_line[next(k for k, v in bad.items() if v == "oversized")]
    assert "exceeds the limit" in oversized.reason and "payload kept" in oversized.reason


def test_malformed_lines_go_to_dead_letters_on_the_embedded_bus(tmp_path: Path) -> None:
    valid, bad = malformed_log(tmp_path / "mixed.jsonl")
    config = ReplayConfig(log=str(tmp_path / "mixed.jsonl"), progress=False)
    check_malformed_replay(EmbeddedBus(), config, valid, bad)


@pytest.mark.kafka
def test_malformed_lines_go_to_dead_letters_on_kafka(
    kafka_bus: KafkaBus, bootstrap_servers: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    valid, bad = malformed_log(tmp_path / "mixed.jsonl")
    config = ReplayConfig(
        log=str(tmp_path / "mixed.jsonl"),
        bootstrap_servers=bootstrap_servers,
        topic=unique_name("clickstream"),
        dead_letter_topic=unique_name("dead-letter"),
        progress=False,
    )
    check_malformed_replay(kafka_bus, config, valid, bad)


def test_replay_limit_time_range_and_pacing(tmp_path: Path) -> None:
    events = [
        ClickEvent(
            event_id=f"e{i}",
            user_id="u",
            session_id="s",
            event_type="click",
            timestamp=1_000_000 + i * 2000,
            item_id=f"i{i}",
        )
        for i in range(10)
    ]
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(encode(e) + b"\n" for e in events))
    clock = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    bus = EmbeddedBus()
    config = ReplayConfig(log=str(log), from_time="1002", to_time="1016", speed="2", limit=5, progress=False)
    summary = run_replay(config, bus, clock=lambda: clock[0], sleep=sleep)
    # Events at 1002..1014 s are in range (7 of them); the limit keeps the first 5; two fall before.
    assert summary.events_produced == 5
    assert summary.skipped_out_of_range == 1
    assert sleeps == pytest.approx([1.0, 1.0, 1.0, 1.0]), "2 s of log time at speed 2 is 1 s of wall time"
    produced = decode_events([r.value or b"" for r in read_topic(bus, config.topic)])
    assert [e.event_id for e in produced] == ["e1", "e2", "e3", "e4", "e5"]

"""`qrec simulate`: the shopper simulator on a bus, checked on the embedded bus against the bare simulator."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from schemas.codec import CLICK_EVENTS, DEAD_LETTERS, encode
from schemas.messages import ClickEvent, DeadLetter, Recommendation, RecommendedItem
from services.bus.base import TopicPartition
from services.bus.embedded import EmbeddedBus
from services.cli import main
from services.config import ConfigError
from services.simulator.core import ShopperSimulator
from services.simulator.service import SimulateConfig, Simulator
from services.topics import CLICKSTREAM, DEAD_LETTER, RECOMMENDATIONS
from tests.helpers import read_topic

T0 = 1_717_200_000_000
MINUTE = 60_000


def small_config(**overrides: object) -> SimulateConfig:
    values: dict[str, object] = {
        "shoppers": 40,
        "items": 60,
        "sessions_per_minute": 6.0,
        "seed": 3,
        "start_time_ms": T0,
        "run_id": "t1",
        "partitions": 2,
    }
    values.update(overrides)
    return SimulateConfig(**values)  # type: ignore[arg-type]


def slate_for(event: ClickEvent, policy: str, catalogue: tuple[str, ...]) -> Recommendation:
    """A slate that shows the viewed item first (the shopper likes it: clicks follow)."""
    assert event.item_id is not None
    others = [item for item in catalogue[:5] if item != event.item_id][:4]
    return Recommendation(
        rec_id=f"rec-{event.event_id}",
        user_id=event.user_id,
        items=[RecommendedItem(item_id=i, score=0.0, propensity=1.0) for i in [event.item_id, *others]],
        policy=policy,
        model_version=0,
        explored=False,
        source_event_id=event.event_id,
        event_timestamp=event.timestamp,
        created_at=event.timestamp,
        session_id=event.session_id,
    )


def strip(event: ClickEvent, prefix: str) -> ClickEvent:
    assert event.event_id.startswith(prefix) and event.session_id.startswith(prefix)
    return msgspec.structs.replace(
        event, event_id=event.event_id[len(prefix) :], session_id=event.session_id[len(prefix) :]
    )


def test_produces_events_receives_recommendations_and_responds_like_the_bare_simulator() -> None:
    config = small_config()
    bus = EmbeddedBus()
    registry = CollectorRegistry()
    sim = Simulator(config, bus, registry)
    # What the simulator must do: the same shop, fed the same slates at the same simulated times.
    reference = ShopperSimulator(config.simulator_config(T0))
    expected_events: list[ClickEvent] = []

    clicks = bus.consumer()
    parts = [TopicPartition(CLICKSTREAM, p) for p in range(bus.partitions_for(CLICKSTREAM))]
    clicks.assign(parts)
    producer = bus.producer()
    sent = 0
    for minute in range(1, 31):
        now = T0 + minute * MINUTE
        records = sim.poll(timeout_s=0.0)
        sim.step(now, records)
        for record in records:  # the reference sees the slates the service saw, in the same order
            rec = msgspec.json.decode(record.value, type=Recommendation)
            assert rec.session_id is not None
            rec = msgspec.structs.replace(rec, session_id=rec.session_id.removeprefix("t1-"))
            expected_events.extend(reference.respond(rec, now))
        expected_events.extend(reference.advance(now))
        # A stand-in actor: one slate per view, alternating the policy label.
        for record in clicks.poll(max_records=100_000, timeout_s=0.0):
            event = CLICK_EVENTS.decode(record.value)
            assert isinstance(event, ClickEvent)
            if event.event_type == "view":
                policy = "dqn" if sent % 2 == 0 else "popularity"
                rec = slate_for(event, policy, reference.item_ids)
                producer.send(RECOMMENDATIONS, event.user_id.encode(), encode(rec))
                sent += 1
        producer.flush()
    records = sim.poll(timeout_s=0.0)
    sim.step(T0 + 31 * MINUTE, records)
    for record in records:
        rec = msgspec.json.decode(record.value, type=Recommendation)
        assert rec.session_id is not None
        rec = msgspec.structs.replace(rec, session_id=rec.session_id.removeprefix("t1-"))
        expected_events.extend(reference.respond(rec, T0 + 31 * MINUTE))
    expected_events.extend(reference.advance(T0 + 31 * MINUTE))

    produced = [CLICK_EVENTS.decode(r.value) for r in read_topic(bus, CLICKSTREAM)]
    assert all(isinstance(e, ClickEvent) for e in produced)
    got = sorted((strip(e, "t1-") for e in produced), key=lambda e: int(e.event_id.split("-")[1]))  # type: ignore[arg-type]
    assert got == sorted(expected_events, key=lambda e: int(e.event_id.split("-")[1]))
    assert len(got) > 100 and sent > 20  # a real run, not an empty one

    # Every slate was received and answered; reactions carry the slate's rec_id.
    summary = sim.summary
    assert sum(summary.recommendations_by_policy.values()) == sent
    stats = reference.stats()
    for policy in ("dqn", "popularity"):
        assert summary.recommendations_by_policy[policy] == stats[policy]["recommendations"]
        assert summary.clicks_by_policy[policy] == stats[policy]["clicks"]
        assert summary.conversions_by_policy[policy] == stats[policy]["purchases"]
        assert summary.reward_by_policy[policy] == pytest.approx(stats[policy]["reward"])
        assert (
            registry.get_sample_value("qrec_simulator_recommendations_total", {"policy": policy})
            == (stats[policy]["recommendations"])
        )
        assert (
            registry.get_sample_value("qrec_simulator_clicks_total", {"policy": policy})
            == (stats[policy]["clicks"])
        )
    total_clicks = sum(summary.clicks_by_policy.values())
    assert total_clicks > 0
    rec_clicks = [e for e in got if e.event_type == "click" and e.rec_id is not None]
    assert len(rec_clicks) == total_clicks
    by_type: dict[str, int] = {}
    for event in got:
        by_type[event.event_type] = by_type.get(event.event_type, 0) + 1
    assert summary.events_by_type == dict(sorted(by_type.items()))
    assert summary.events_produced == len(got)
    for event_type, count in by_type.items():
        assert registry.get_sample_value("qrec_simulator_events_total", {"event_type": event_type}) == count
    assert registry.get_sample_value("qrec_simulator_simulated_time_seconds") == (T0 + 31 * MINUTE) / 1000
    sim.close()


def test_bad_recommendations_go_to_the_dead_letter_topic_and_old_ones_are_not_shown() -> None:
    bus = EmbeddedBus()
    config = small_config()
    # A recommendation published before the simulator starts is not shown to anyone.
    Simulator(config, bus).close()  # creates the topics
    producer = bus.producer()
    old = slate_for(
        ClickEvent(
            event_id="x",
            user_id="shopper-0001",
            session_id="t1-session-1",
            event_type="view",
            timestamp=T0,
            item_id="sku-00001",
        ),
        "dqn",
        (),
    )
    producer.send(RECOMMENDATIONS, b"shopper-0001", encode(old))
    producer.flush()

    registry = CollectorRegistry()
    sim = Simulator(config, bus, registry)
    producer.send(RECOMMENDATIONS, b"shopper-0002", b"{not json")
    producer.flush()
    sim.step(T0 + MINUTE, sim.poll(timeout_s=0.0))
    sim.step(T0 + 2 * MINUTE, sim.poll(timeout_s=0.0))  # goes on after the bad record

    assert sim.summary.dead_letters == 1
    assert sim.summary.recommendations_by_policy == {}
    letters = [DEAD_LETTERS.decode(r.value) for r in read_topic(bus, DEAD_LETTER)]
    assert len(letters) == 1
    letter = letters[0]
    assert isinstance(letter, DeadLetter)
    assert letter.reason_code == "invalid_json" and letter.service == "simulator"
    assert letter.payload == "{not json"
    assert (
        registry.get_sample_value(
            "qrec_dead_letters_total", {"service": "simulator", "reason": "invalid_json"}
        )
        == 1
    )
    assert sim.now_ms == T0 + 2 * MINUTE
    sim.close()


def test_run_follows_the_simulated_clock_for_the_duration_and_writes_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    config = small_config(speed=60.0, duration_seconds=600.0, tick_seconds=0.001, summary_out=str(out))
    bus = EmbeddedBus()
    registry = CollectorRegistry()
    sim = Simulator(config, bus, registry)
    wall = [0.0]

    def clock() -> float:  # each reading is 1.5 wall seconds later: 90 simulated seconds per step
        wall[0] += 1.5
        return wall[0]

    summary = sim.run(clock=clock)
    assert sim.now_ms == T0 + 600_000  # stopped exactly at the end of the duration
    assert summary.simulated_seconds == 600.0
    # The bare simulator run to the same time gives the same events (no recommendations here).
    reference = ShopperSimulator(config.simulator_config(T0))
    expected: list[ClickEvent] = []
    for seconds in range(90, 600, 90):
        expected.extend(reference.advance(T0 + seconds * 1000))
    expected.extend(reference.advance(T0 + 600_000))
    assert summary.events_produced == len(expected) == len(read_topic(bus, CLICKSTREAM)) > 0
    written = json.loads(out.read_text())
    assert written["events_produced"] == len(expected)
    assert written["run_id"] == "t1" and written["simulated_seconds"] == 600.0
    assert registry.get_sample_value("qrec_service_up", {"service": "simulator"}) == 0


def test_default_run_id_and_start_time_come_from_the_wall_clock() -> None:
    config = small_config(start_time_ms=None, run_id=None)
    sim = Simulator(config, EmbeddedBus(), wall_time_ms=lambda: 1_700_000_000_123)
    assert sim.start_time_ms == 1_700_000_000_123
    assert sim.run_id == f"sim{1_700_000_000_123:x}"
    sim.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"speed": 0.0}, "speed must be > 0"),
        ({"duration_seconds": -1.0}, "duration_seconds must be >= 0"),
        ({"shoppers": 0}, "num_users must be at least 1"),
        ({"run_id": " "}, "run_id must not be empty"),
    ],
)
def test_bad_settings_are_rejected_by_name(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        small_config(**overrides)


def test_cli_help_and_embedded_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--speed", "--duration-seconds", "--seed", "--recommendations-topic", "--summary-out"):
        assert flag in text
    assert main(["simulate", "--duration-seconds", "1"]) == 2  # needs Kafka

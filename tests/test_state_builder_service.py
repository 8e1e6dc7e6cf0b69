"""The state-builder service: embedded-bus behaviour, and separate processes on the real broker."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from schemas.codec import CLICK_EVENTS, TRANSITIONS, USER_STATES, DecodeError, encode
from schemas.messages import ClickEvent, Recommendation, RecommendedItem, Transition, UserState
from services.bus.base import Bus, Record, TopicPartition, TopicSpec
from services.bus.embedded import EmbeddedBus
from services.bus.kafka import KafkaBus, KafkaSettings
from services.replay.config import ReplayConfig
from services.replay.service import run_replay
from services.state_builder.config import StateBuilderConfig
from services.state_builder.partition import Emitted, PartitionState
from services.state_builder.service import CONTROL_HEADER, FORGET, StateBuilder, step_params
from services.topics import CLICKSTREAM, DEAD_LETTER, RECOMMENDATIONS, USER_STATE, topic_specs
from services.topics import TRANSITIONS as TRANSITIONS_TOPIC
from tests.helpers import TAOBAO, read_topic, require_shared_data, start_service, wait_until


def final_states(records: list[Record]) -> dict[str, bytes]:
    """The last value per key of the user-state topic (what compaction converges to)."""
    latest: dict[str, bytes | None] = {}
    for record in records:
        assert record.key is not None
        latest[record.key.decode()] = record.value
    return {user: value for user, value in latest.items() if value is not None}


def reference(config: StateBuilderConfig, bus: Bus) -> tuple[dict[str, bytes], dict[str, Transition]]:
    """Replay the input topics through the pure per-partition logic in this one process."""
    params = step_params(config)
    states: dict[str, bytes] = {}
    transitions: dict[str, Transition] = {}
    clicks = read_topic(bus, config.clickstream_topic)
    recs = read_topic(bus, config.recommendations_topic)
    for number in range(bus.partitions_for(config.clickstream_topic)):
        partition = PartitionState(number, params, int(config.allowed_lateness_seconds * 1000))
        emitted = Emitted()
        # Within a partition the service sees both topics interleaved in poll order; this test
        # only feeds recommendations in tests that publish none, so offset order per topic suffices.
        for record in [r for r in clicks + recs if r.partition == number]:
            if dict(record.headers).get(CONTROL_HEADER) == FORGET and record.key:
                partition.forget(record.key.decode(), emitted)
                continue
            event = CLICK_EVENTS.decode(record.value)
            if isinstance(event, DecodeError):
                continue
            partition.event(event, record.offset, emitted)
        partition.sweep(emitted)
        for state, _ in emitted.states:
            states[state.user_id] = encode(state)
        for user in emitted.tombstones:
            states.pop(user, None)
        for transition in emitted.transitions:
            transitions[transition.transition_id] = transition
    return states, transitions


def view(
    event_id: str, user: str, ts: int, item: str, event_type: str = "view", **extra: object
) -> ClickEvent:
    return ClickEvent(
        event_id=event_id,
        user_id=user,
        session_id=f"{user}-s",
        event_type=event_type,  # type: ignore[arg-type]
        timestamp=ts,
        item_id=item,
        **extra,
    )  # type: ignore[arg-type]


def test_embedded_state_builder_publishes_states_transitions_and_dead_letters() -> None:
    bus = EmbeddedBus()
    config = StateBuilderConfig(partitions=2, max_batch=3)
    builder = StateBuilder(config, bus, CollectorRegistry())
    producer = bus.producer()
    base = 1_700_000_000_000
    events = [
        view("e1", "alice", base, "i1"),
        view("e2", "alice", base + 10_000, "i2", "add_to_cart", price=5.0),
        view("e3", "bob", base + 20_000, "i3"),
        view("e4", "alice", base + 30_000, "i2", "purchase", price=5.0),
    ]
    for event in events:
        producer.send(CLICKSTREAM, event.user_id.encode(), encode(event))
    producer.send(CLICKSTREAM, b"mallory", b"{not json")
    producer.send(CLICKSTREAM, events[0].user_id.encode(), encode(events[0]))  # an exact duplicate
    rec = Recommendation(
        rec_id="r1",
        user_id="bob",
        items=[RecommendedItem(item_id="i9", score=1.0, propensity=1.0)],
        policy="popularity",
        model_version=0,
        explored=False,
        source_event_id="e3",
        event_timestamp=base + 20_000,
        created_at=base + 20_001,
    )
    producer.send(RECOMMENDATIONS, b"bob", encode(rec))
    builder.consumer.subscribe(
        [CLICKSTREAM, RECOMMENDATIONS], on_assign=builder._on_assign, on_revoke=builder._on_revoke
    )
    while builder.poll_once(timeout_s=0.05):
        pass
    builder.poll_once(timeout_s=0.05)  # an idle poll sweeps timers up to the watermark

    states = [USER_STATES.decode(r.value) for r in read_topic(bus, USER_STATE) if r.value]
    assert all(isinstance(s, UserState) for s in states)
    assert [s.source_event_id for s in states if isinstance(s, UserState) and s.user_id == "alice"] == [
        "e1",
        "e2",
        "e4",
    ]
    transitions = [TRANSITIONS.decode(r.value) for r in read_topic(bus, TRANSITIONS_TOPIC)]
    ids = {t.transition_id for t in transitions if isinstance(t, Transition)}
    # e1 and e2 are followed by alice's next event in the same session; e3 and e4 wait for their
    # session to end (30 minutes without events), which has not happened yet in event time.
    assert ids == {"logged:e1", "logged:e2"}
    letters = read_topic(bus, DEAD_LETTER)
    assert len(letters) == 1 and b"invalid_json" in (letters[0].value or b"")
    registry = builder.metrics
    assert registry.skipped.labels("duplicate")._value.get() == 1
    assert registry.state_updates._value.get() == 4
    consumer = bus.consumer(config.group_id)
    for tp in builder.consumer.assignment():
        assert (consumer.committed(tp) or 0) == bus.consumer().end_offsets([tp])[tp], (
            "everything processed is committed"
        )
    builder.close()


def test_embedded_handover_restores_state_from_the_user_state_topic() -> None:
    """One process handles half the stream, a second takes over: the result equals one process."""
    bus = EmbeddedBus()
    config = StateBuilderConfig(partitions=3, max_batch=50)
    first = StateBuilder(config, bus, CollectorRegistry())
    producer = bus.producer()
    base = 1_700_000_000_000
    for i in range(400):
        user = f"u{i % 17}"
        producer.send(
            CLICKSTREAM, user.encode(), encode(view(f"e{i}", user, base + i * 60_000, f"i{i % 23}"))
        )
    first.consumer.subscribe(
        [CLICKSTREAM, RECOMMENDATIONS], on_assign=first._on_assign, on_revoke=first._on_revoke
    )
    for _ in range(3):
        first.poll_once(timeout_s=0.05)
    first.close()  # leaves the group: its partitions move
    second = StateBuilder(config, bus, CollectorRegistry())
    second.consumer.subscribe(
        [CLICKSTREAM, RECOMMENDATIONS], on_assign=second._on_assign, on_revoke=second._on_revoke
    )
    while second.poll_once(timeout_s=0.05):
        pass
    second.poll_once(timeout_s=0.05)
    assert second.metrics.restore_seconds._sum.get() > 0
    expected_states, expected_transitions = reference(config, bus)
    assert final_states(read_topic(bus, USER_STATE)) == expected_states
    published = [TRANSITIONS.decode(r.value) for r in read_topic(bus, TRANSITIONS_TOPIC)]
    assert {t.transition_id for t in published if isinstance(t, Transition)} == set(expected_transitions)
    second.close()


def test_forget_deletes_a_user_everywhere() -> None:
    bus = EmbeddedBus()
    config = StateBuilderConfig(partitions=2)
    builder = StateBuilder(config, bus, CollectorRegistry())
    producer = bus.producer()
    producer.send(CLICKSTREAM, b"carol", encode(view("c1", "carol", 1_700_000_000_000, "i1")))
    producer.send(CLICKSTREAM, b"carol", None, headers=((CONTROL_HEADER, FORGET),))
    builder.consumer.subscribe(
        [CLICKSTREAM, RECOMMENDATIONS], on_assign=builder._on_assign, on_revoke=builder._on_revoke
    )
    while builder.poll_once(timeout_s=0.05):
        pass
    assert all("carol" not in p.records for p in builder.partitions.values())
    records = read_topic(bus, USER_STATE)
    assert records[-1].key == b"carol" and records[-1].value is None, "a tombstone ends the user's history"
    builder.close()


@pytest.mark.kafka
def test_two_processes_one_killed_give_the_same_state_as_one_pure_replay(
    bootstrap_servers: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    require_shared_data(TAOBAO)
    bus = KafkaBus(KafkaSettings(bootstrap_servers=bootstrap_servers))
    names = {
        "clickstream_topic": unique_name("clicks"),
        "recommendations_topic": unique_name("recs"),
        "user_state_topic": unique_name("state"),
        "transitions_topic": unique_name("transitions"),
        "dead_letter_topic": unique_name("dead"),
        "group_id": unique_name("builders"),
    }
    config = StateBuilderConfig(bootstrap_servers=bootstrap_servers, partitions=4, **names)
    renamed = {
        CLICKSTREAM: names["clickstream_topic"],
        RECOMMENDATIONS: names["recommendations_topic"],
        USER_STATE: names["user_state_topic"],
        TRANSITIONS_TOPIC: names["transitions_topic"],
        DEAD_LETTER: names["dead_letter_topic"],
    }
    bus.create_topics(
        [TopicSpec(renamed[s.name], s.partitions, s.configs) for s in topic_specs(4) if s.name in renamed]
    )
    summary = run_replay(
        ReplayConfig(
            log=str(TAOBAO),
            bootstrap_servers=bootstrap_servers,
            topic=names["clickstream_topic"],
            dead_letter_topic=names["dead_letter_topic"],
            order="time",
            limit=30_000,
            progress=False,
            create_topics=False,
        ),
        bus,
    )
    assert summary.events_produced == 30_000
    args = [f"--{k.replace('_', '-')}={v}" for k, v in names.items()] + [
        "--partitions=4",
        "--session-timeout-ms=3000",
        "--max-batch=500",
        "--no-create-topics",
    ]
    first = start_service("services.state_builder", bootstrap_servers, args, tmp_path / "first.log")
    second = start_service("services.state_builder", bootstrap_servers, args, tmp_path / "second.log")
    processes = [first, second]
    try:
        probe = bus.consumer(names["group_id"])
        parts = [TopicPartition(names["clickstream_topic"], p) for p in range(4)]

        def committed() -> int:
            return sum(probe.committed(tp) or 0 for tp in parts)

        wait_until(lambda: committed() > 5_000, timeout_s=120, what="the builders to commit 5,000 events")
        first.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(1.0)
        processes.append(
            start_service("services.state_builder", bootstrap_servers, args, tmp_path / "restarted.log")
        )
        wait_until(
            lambda: committed() == 30_000,
            timeout_s=240,
            interval_s=0.5,
            what="the builders to commit every event",
        )
        time.sleep(3.0)  # idle polls sweep the last timers
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log"))
    expected_states, expected_transitions = reference(config, bus)
    published_states = final_states(read_topic(bus, names["user_state_topic"]))
    assert len(published_states) == len(expected_states), logs
    assert published_states == expected_states, logs
    by_id: dict[str, set[bytes]] = defaultdict(set)
    for record in read_topic(bus, names["transitions_topic"]):
        transition = TRANSITIONS.decode(record.value)
        assert isinstance(transition, Transition)
        by_id[transition.transition_id].add(record.value or b"")
    assert set(by_id) == set(expected_transitions), logs
    assert all(len(copies) == 1 for copies in by_id.values()), "a re-emitted transition must be identical"
    bus.close()


def test_pseudonymize_replaces_user_ids_with_a_keyed_hash() -> None:
    bus = EmbeddedBus()
    config = StateBuilderConfig(partitions=2, pseudonymize=True, pseudonymize_salt="s3cret")
    builder = StateBuilder(config, bus, CollectorRegistry())
    producer = bus.producer()
    producer.send(CLICKSTREAM, b"dave", encode(view("d1", "dave", 1_700_000_000_000, "i1")))
    builder.consumer.subscribe(
        [CLICKSTREAM, RECOMMENDATIONS], on_assign=builder._on_assign, on_revoke=builder._on_revoke
    )
    while builder.poll_once(timeout_s=0.05):
        pass
    states = [USER_STATES.decode(r.value) for r in read_topic(bus, USER_STATE) if r.value]
    assert len(states) == 1 and isinstance(states[0], UserState)
    user = states[0].user_id
    assert user != "dave" and "dave" not in user and user.startswith("p-") and len(user) == 34
    other = StateBuilderConfig(partitions=2, pseudonymize=True, pseudonymize_salt="another")
    from services.state_builder.service import pseudonym

    assert pseudonym("dave", "s3cret") == user and pseudonym("dave", other.pseudonymize_salt or "") != user
    builder.close()


def test_attribution_and_reward_are_counted_by_the_recommending_policy() -> None:
    bus = EmbeddedBus()
    builder = StateBuilder(StateBuilderConfig(partitions=1), bus, CollectorRegistry())
    producer = bus.producer()
    base = 1_700_000_000_000
    producer.send(CLICKSTREAM, b"bob", encode(view("e1", "bob", base, "i1")))
    rec = Recommendation(
        rec_id="r1",
        user_id="bob",
        items=[
            RecommendedItem(item_id="i8", score=2.0, propensity=0.9),
            RecommendedItem(item_id="i9", score=1.0, propensity=0.9),
        ],
        policy="dqn",
        model_version=3,
        explored=False,
        source_event_id="e1",
        event_timestamp=base,
        created_at=base + 1,
    )
    producer.send(RECOMMENDATIONS, b"bob", encode(rec))
    builder.consumer.subscribe(
        [CLICKSTREAM, RECOMMENDATIONS], on_assign=builder._on_assign, on_revoke=builder._on_revoke
    )
    while builder.poll_once(timeout_s=0.05):  # the slate is joined before the feedback arrives
        pass
    # bob clicks and carts the second slot, then comes back after the 30-minute window closed.
    producer.send(CLICKSTREAM, b"bob", encode(view("e2", "bob", base + 5_000, "i9", "click", rec_id="r1")))
    producer.send(
        CLICKSTREAM, b"bob", encode(view("e3", "bob", base + 9_000, "i9", "add_to_cart", rec_id="r1"))
    )
    producer.send(CLICKSTREAM, b"bob", encode(view("e4", "bob", base + 40 * 60_000, "i1")))
    while builder.poll_once(timeout_s=0.05):
        pass
    metrics = builder.metrics
    assert metrics.attribution.labels("dqn", "clicked")._value.get() == 1
    # No recommendation opportunity (a view) inside the window: the other slot expired.
    assert metrics.attribution.labels("dqn", "not_clicked")._value.get() == 0
    assert metrics.attribution.labels("dqn", "expired")._value.get() == 1
    assert metrics.reward.labels("dqn")._value.get() == 4.0  # click 1 + add_to_cart 3
    builder.close()

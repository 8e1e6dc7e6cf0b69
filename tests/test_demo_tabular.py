"""The tabular Q learner as a service: categories from the clickstream, exact updates from the
transitions topic, the table published to its model topic, bad transitions to the dead-letter topic."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from rl.tabular import TabularModel
from schemas.codec import encode
from schemas.messages import ClickEvent, Observation, Transition
from services.bus.base import TopicPartition
from services.bus.embedded import EmbeddedBus
from services.learner.tabular import TabularLearner, TabularLearnerConfig
from services.model_topic import ModelAssembler
from services.state_builder.step import FEATURE_DIM
from services.topics import CLICKSTREAM, DEAD_LETTER, TRANSITIONS


def _obs(items: list[str], session_events: int) -> Observation:
    features = [0.0] * FEATURE_DIM
    features[7] = math.log1p(session_events)  # the state-builder's session_event_count feature
    return Observation(
        recent_items=items,
        recent_event_types=["view"] * len(items),
        recent_gaps_seconds=[1.0] * len(items),
        features=features,
    )


def _transition(tid: str, source: str, action: str, reward: float, done: bool = False) -> Transition:
    return Transition(
        transition_id=tid,
        user_id="u1",
        source=source,  # type: ignore[arg-type]
        obs_tm1=_obs(["a1"], 1),
        a_tm1=action,
        r_t=reward,
        obs_t=_obs(["a1", "b1"], 3),
        done=done,
        timestamp=1000,
    )


@pytest.mark.timeout(60)
def test_tabular_learner_learns_exactly_and_publishes_the_table() -> None:
    bus = EmbeddedBus()
    registry = CollectorRegistry()
    learner = TabularLearner(
        TabularLearnerConfig(learning_rate=0.5, discount=0.9, publish_every_transitions=2), bus, registry
    )
    producer = bus.producer()
    for i, (item, category) in enumerate(
        [("a1", "cat-x"), ("b1", "cat-y"), ("a2", "cat-x"), ("a2", "cat-x")]
    ):
        event = ClickEvent(
            event_id=f"e{i}",
            user_id="u1",
            session_id="s1",
            event_type="view",
            timestamp=i,
            item_id=item,
            category=category,
        )
        producer.send(CLICKSTREAM, b"u1", encode(event))
    producer.flush()
    learner.poll_once()
    assert learner.categories == ["cat-x", "cat-y"]
    # State: (category of the last item, session-length bucket): a1 -> cat-x (0), 1 event -> bucket 0,
    # so row 0; after: b1 -> cat-y (1), 3 events -> bucket 1, so row 1 * 4 + 1 = 5. Action b1 -> cat-y.
    for transition in (
        _transition("t1", "recommendation", "b1", 2.0),
        _transition("t2", "logged", "b1", 5.0),  # not a policy's category action: skipped
        _transition("t3", "recommendation", "unknown-item", 1.0),  # category unknown: skipped
        _transition("t4", "recommendation", "b1", 0.0, done=True),
    ):
        producer.send(TRANSITIONS, b"u1", encode(transition))
    producer.send(TRANSITIONS, b"u1", b"{not json")
    producer.flush()
    learner.poll_once()
    # t1: 0 + 0.5 * (2 + 0.9 * 0 - 0) = 1; t4 (terminal): 1 + 0.5 * (0 - 1) = 0.5.
    assert learner.q[0, 1] == pytest.approx(0.5)
    assert registry.get_sample_value("qrec_tabular_updates_total") == 2
    assert registry.get_sample_value("qrec_tabular_skipped_transitions_total") == 2
    assert learner.version == 1, "published after every 2 learned transitions"
    dead = bus.consumer()
    dead.assign([TopicPartition(DEAD_LETTER, 0)])
    dead.seek_to_beginning([TopicPartition(DEAD_LETTER, 0)])
    assert len(dead.poll(max_records=10, timeout_s=0.0)) == 1

    reader = bus.consumer()
    reader.assign([TopicPartition(learner.config.model_topic, 0)])
    reader.seek_to_beginning([TopicPartition(learner.config.model_topic, 0)])
    assembler = ModelAssembler()
    assembled = [m for r in reader.poll(max_records=100, timeout_s=0.0) if (m := assembler.add(r.value))]
    assert len(assembled) == 1
    model = TabularModel.from_bytes(assembled[0].data)
    assert model.q.shape == (model.config.num_states, 2)
    assert model.q[0, 1] == pytest.approx(0.5)
    assert model.ranked_items == [["a2", "a1"], ["b1"]], "items of each category, most viewed first"
    assert model.item_category == {"a1": 0, "b1": 1, "a2": 0}
    learner.close()

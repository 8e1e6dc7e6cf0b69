"""The tabular Q-learning baseline's learner: a Q-table over categories, learned from transitions.

It reads the clickstream for what it needs to know about items (each item's category, and a recent
popularity per category) and the transitions topic for rewards, updates its table with
``rl.tabular`` one transition at a time, and publishes the table with the ranked items of every
category to its own model topic, in the same header + chunks format as the DQN's models. The actor
serves the ``tabular_q`` policy from the latest table. Only recommendation transitions train the
table: a logged interaction has no category-level action of a policy behind it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from rl.tabular import TabularConfig, TabularModel, q_update_in_place, state_index
from schemas.codec import CLICK_EVENTS, TRANSITIONS, DecodeError
from schemas.messages import ClickEvent, Observation, Transition
from services.actor.step import Popularity
from services.bus.base import Bus, Record, TopicPartition, TopicSpec
from services.config import BusConfig, ConfigError, register, setting
from services.dead_letter import DeadLetterSink, dead_letter
from services.metrics import ProcessMetrics
from services.model_topic import publish_model
from services.replay.service import ensure_topics
from services.topics import CLICKSTREAM, DEAD_LETTER, MODEL_MAX_MESSAGE_BYTES
from services.topics import TRANSITIONS as TRANSITIONS_TOPIC

log = logging.getLogger(__name__)
TABULAR_MODEL = "qrec.model.tabular.v1"
TABULAR_ENCODING = "qrec-tabular-v1+json"
SESSION_EVENTS_FEATURE = 7  # Observation.features[7] is log1p(session_event_count) (state-builder layout)


def model_topic_spec(name: str) -> TopicSpec:
    """A model topic like qrec.model.v1: one partition (readers read partition 0), compacted."""
    return TopicSpec(
        name,
        1,
        {
            "cleanup.policy": "compact",
            "min.cleanable.dirty.ratio": "0.1",
            "segment.ms": "600000",
            "max.message.bytes": str(MODEL_MAX_MESSAGE_BYTES),
        },
    )


@register("tabular-learner")
@dataclass(frozen=True, kw_only=True)
class TabularLearnerConfig(BusConfig):
    """Learns the tabular Q baseline (category-level actions) from transitions and publishes it."""

    clickstream_topic: str = setting(CLICKSTREAM, help="topic of click events (item categories, popularity)")
    transitions_topic: str = setting(TRANSITIONS_TOPIC, help="topic of transitions to learn from")
    model_topic: str = setting(TABULAR_MODEL, help="topic the Q-table is published to")
    dead_letter_topic: str = setting(DEAD_LETTER, help="topic for input that cannot be used")
    max_categories: int = setting(
        64, help="most categories (actions) the table holds; later ones are ignored"
    )
    learning_rate: float = setting(0.1, help="step size of the tabular Q update")
    discount: float = setting(0.9, help="discount of the next state's value")
    epsilon: float = setting(0.1, help="chance of a random category per slate position when serving")
    items_per_category: int = setting(50, help="most popular items per category shipped with the table")
    popularity_half_life_events: float = setting(
        20000.0, help="item popularity counts halve every this many clickstream events"
    )
    publish_every_transitions: int = setting(
        2000, help="publish the table every this many learned transitions"
    )
    create_topics: bool = setting(True, help="create the qrec topics first when they are missing")
    partitions: int = setting(6, help="partitions per topic when topics are created")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_categories < 1 or self.items_per_category < 1 or self.publish_every_transitions < 1:
            raise ConfigError("max_categories, items_per_category and publish_every_transitions must be >= 1")
        try:
            self.table_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def table_config(self) -> TabularConfig:
        return TabularConfig(
            num_categories=self.max_categories,
            learning_rate=self.learning_rate,
            discount=self.discount,
            epsilon=self.epsilon,
        )


class TabularMetrics(ProcessMetrics):
    """What the tabular learner exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "tabular_learner")
        self.updates = Counter(
            "qrec_tabular_updates_total", "Tabular Q updates (one per learned transition)", registry=registry
        )
        self.skipped = Counter(
            "qrec_tabular_skipped_transitions_total",
            "Transitions not learned (logged, or an item of unknown category)",
            registry=registry,
        )
        self.td_error = Gauge(
            "qrec_tabular_td_error", "Mean absolute TD error since the last publish", registry=registry
        )
        self.model_version = Gauge(
            "qrec_tabular_model_version", "Last published table version", registry=registry
        )


class TabularLearner:
    """One tabular learner process: two plain consumers (clickstream, transitions), one table."""

    def __init__(
        self, config: TabularLearnerConfig, bus: Bus, registry: CollectorRegistry | None = None
    ) -> None:
        self.config = config
        self.table = config.table_config()
        self.metrics = TabularMetrics(registry or CollectorRegistry())
        if config.create_topics:
            ensure_topics(bus, config.partitions)
            bus.create_topics([model_topic_spec(config.model_topic)])
        self.q = np.zeros((self.table.num_states, self.table.num_categories))  # (states, categories)
        self.categories: list[str] = []
        self.category_index: dict[str, int] = {}
        self.item_category: dict[str, int] = {}
        self.popularity = Popularity(config.popularity_half_life_events)
        self.version = 0
        self.learned = 0
        self.since_publish = 0
        self.td_abs = 0.0
        self.producer = bus.producer()
        self.dead_letters = DeadLetterSink(self.producer, self.metrics, config.dead_letter_topic)
        self.consumers = []
        for topic in (config.clickstream_topic, config.transitions_topic):
            consumer = bus.consumer()
            parts = [TopicPartition(topic, p) for p in range(bus.partitions_for(topic))]
            consumer.assign(parts)
            consumer.seek_to_beginning(parts)
            self.consumers.append(consumer)

    def observe_event(self, event: ClickEvent) -> None:
        """Learn an item's category and count it towards recent popularity."""
        if event.item_id is None or event.category is None:
            return
        category = self.category_index.get(event.category)
        if category is None:
            if len(self.categories) >= self.table.num_categories:
                return
            category = self.category_index[event.category] = len(self.categories)
            self.categories.append(event.category)
        self.item_category[event.item_id] = category
        self.popularity.observe((event.item_id,))

    def _state(self, obs: Observation) -> int:
        last = self.item_category.get(obs.recent_items[-1]) if obs.recent_items else None
        events = 0
        if len(obs.features) > SESSION_EVENTS_FEATURE:
            events = round(math.expm1(max(0.0, obs.features[SESSION_EVENTS_FEATURE])))
        return state_index(last, events, self.table)

    def learn(self, transition: Transition) -> bool:
        """One tabular update from a recommendation transition; False when it cannot be used."""
        action = self.item_category.get(transition.a_tm1)
        if transition.source != "recommendation" or action is None:
            self.metrics.skipped.inc()
            return False
        discount = 0.0 if transition.done else self.table.discount
        td = q_update_in_place(
            self.q,
            self._state(transition.obs_tm1),
            action,
            transition.r_t,
            discount,
            self._state(transition.obs_t),
            self.table.learning_rate,
        )
        self.td_abs += abs(td)
        self.learned += 1
        self.since_publish += 1
        self.metrics.updates.inc()
        return True

    def model(self) -> TabularModel:
        """The table as served: categories with their most popular items, best first."""
        ranked: list[list[str]] = [[] for _ in self.categories]
        for item, _ in sorted(self.popularity.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            items = ranked[self.item_category[item]]
            if len(items) < self.config.items_per_category:
                items.append(item)
        return TabularModel(
            config=self.table,
            q=self.q[:, : len(self.categories)] if self.categories else self.q[:, :0],
            categories=list(self.categories),
            ranked_items=ranked,
            item_category=dict(self.item_category),
        )

    def publish(self) -> None:
        model = self.model()
        self.version += 1
        publish_model(
            self.producer,
            self.config.model_topic,
            version=self.version,
            step=self.learned,
            data=model.to_bytes(),
            encoding=TABULAR_ENCODING,
            vocabulary_size=len(model.item_category),
            config={"discount": self.table.discount, "learning_rate": self.table.learning_rate},
        )
        self.metrics.td_error.set(self.td_abs / max(1, self.since_publish))
        self.metrics.model_version.set(self.version)
        self.since_publish = 0
        self.td_abs = 0.0

    def _bad(self, record: Record, error: DecodeError) -> None:
        self.dead_letters.send(
            dead_letter(
                record.value, error, service="tabular-learner", now_ms=int(time.time() * 1000), source=record
            )
        )

    def poll_once(self, timeout_s: float = 0.0) -> int:
        """Read what is waiting on both topics, learn from it, publish when due; returns records read."""
        events, transitions = self.consumers
        moved = 0
        for record in events.poll(max_records=10_000, timeout_s=timeout_s):
            moved += 1
            event = CLICK_EVENTS.decode(record.value)
            if isinstance(event, ClickEvent):
                self.observe_event(event)
            # Undecodable clickstream records are the state-builder's to dead-letter, not a second copy.
        for record in transitions.poll(max_records=10_000, timeout_s=timeout_s):
            moved += 1
            message = TRANSITIONS.decode(record.value)
            if isinstance(message, DecodeError):
                self._bad(record, message)
                continue
            self.learn(message)
        if self.since_publish >= self.config.publish_every_transitions:
            self.publish()
        return moved

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self.metrics.up.labels("tabular_learner").set(1)
        try:
            while not stop.is_set():
                if not self.poll_once(timeout_s=0.2):
                    time.sleep(0.05)
        finally:
            self.metrics.up.labels("tabular_learner").set(0)
            self.close()

    def close(self) -> None:
        try:
            self.producer.flush()
        finally:
            for consumer in self.consumers:
                consumer.close()
            self.producer.close()

"""`qrec simulate`: simulated shoppers on a real bus, reacting to the recommendations qrec publishes.

The service runs a ``ShopperSimulator`` on a simulated clock that moves ``speed`` times as fast as
the wall clock. Each step it shows every Recommendation that arrived to its shopper
(``ShopperSimulator.respond``), produces the reactions, then produces the organic events up to the
current simulated time (``ShopperSimulator.advance``). It reads every partition of the
recommendations topic itself (no consumer group), from the end as it was at start-up: a shopper
only reacts to slates shown while the shop is open.

Event and session ids carry a run id (``<run id>-sim-17``), so a restarted simulator, which starts
its shop again from the seed, never repeats an id the state-builders have already seen (they drop
duplicate event ids).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter

from schemas.codec import RECOMMENDATIONS, DecodeError, encode
from schemas.messages import ClickEvent, Recommendation
from services.bus.base import Bus, Record, TopicPartition
from services.config import BusConfig, ConfigError, register, setting
from services.dead_letter import DeadLetterSink, dead_letter
from services.metrics import ProcessMetrics
from services.simulator.config import SimulatorConfig
from services.simulator.core import REWARD_WEIGHTS, ShopperSimulator
from services.topics import CLICKSTREAM, DEAD_LETTER, topic_specs
from services.topics import RECOMMENDATIONS as RECOMMENDATIONS_TOPIC

log = logging.getLogger(__name__)

SCHEMA_HEADER = ("qrec-schema", b"click_event/1-0-0")
CONVERSION = "purchase"


@register("simulate")
@dataclass(frozen=True, kw_only=True)
class SimulateConfig(BusConfig):
    """Simulated shoppers producing to the clickstream and reacting to recommendations."""

    speed: float = setting(
        1.0,
        help="simulated seconds per wall-clock second (1 = real time, 60 = a simulated minute per second)",
    )
    duration_seconds: float | None = setting(
        None, help="stop after this much simulated time (unset: run until stopped)"
    )
    seed: int = setting(0, help="seed of the simulated shop: catalogue, shoppers and their behaviour")
    shoppers: int = setting(500, help="simulated shoppers (user ids shopper-0000 ...)")
    items: int = setting(2000, help="items in the simulated catalogue (ids sku-00000 ...)")
    sessions_per_minute: float = setting(
        30.0, help="shopping sessions starting per simulated minute across all shoppers"
    )
    start_time_ms: int | None = setting(
        None, help="simulated time at start (ms since the epoch; unset: the wall clock's time at start)"
    )
    run_id: str | None = setting(
        None, help="prefix of event and session ids, unique per run (unset: derived from the start time)"
    )
    tick_seconds: float = setting(0.1, help="wall-clock seconds between steps of the simulated clock")
    clickstream_topic: str = setting(CLICKSTREAM, help="topic the shoppers' ClickEvents are produced to")
    recommendations_topic: str = setting(
        RECOMMENDATIONS_TOPIC, help="topic of Recommendations shown to shoppers"
    )
    dead_letter_topic: str = setting(DEAD_LETTER, help="topic for recommendations that cannot be decoded")
    summary_out: str | None = setting(
        None, help="write the run's totals (events by type, reactions by policy) to this JSON file at exit"
    )
    create_topics: bool = setting(True, help="create the qrec topics first when they are missing")
    partitions: int = setting(6, help="partitions per topic when topics are created")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.speed > 0:
            raise ConfigError(f"speed must be > 0, got {self.speed}")
        if self.duration_seconds is not None and self.duration_seconds < 0:
            raise ConfigError(f"duration_seconds must be >= 0, got {self.duration_seconds}")
        if not self.tick_seconds > 0:
            raise ConfigError(f"tick_seconds must be > 0, got {self.tick_seconds}")
        if self.run_id is not None and not self.run_id.strip():
            raise ConfigError("run_id must not be empty")
        self.simulator_config(0)  # validates shoppers, items and sessions_per_minute

    def simulator_config(self, start_time_ms: int) -> SimulatorConfig:
        """The shop's settings for a run starting at ``start_time_ms``."""
        return SimulatorConfig(
            num_users=self.shoppers,
            num_items=self.items,
            session_start_rate_per_minute=self.sessions_per_minute,
            seed=self.seed,
            start_time_ms=start_time_ms,
        )


class SimulatorMetrics(ProcessMetrics):
    """What the simulated shop did: events by type, and reactions to recommendations by policy."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "simulator")
        self.events = PromCounter(
            "qrec_simulator_events_total",
            "Click events produced to the clickstream, by event type",
            ["event_type"],
            registry=registry,
        )
        self.recommendations = PromCounter(
            "qrec_simulator_recommendations_total",
            "Recommendations received and shown to a simulated shopper, by policy",
            ["policy"],
            registry=registry,
        )
        self.clicks = PromCounter(
            "qrec_simulator_clicks_total", "Recommendations clicked, by policy", ["policy"], registry=registry
        )
        self.conversions = PromCounter(
            "qrec_simulator_conversions_total",
            "Recommended items purchased, by policy",
            ["policy"],
            registry=registry,
        )
        self.reward = PromCounter(
            "qrec_simulator_reward_total",
            "Reward earned by recommendations (click 1, add_to_cart 3, favorite 2, purchase 10), by policy",
            ["policy"],
            registry=registry,
        )
        self.simulated_time = Gauge(
            "qrec_simulator_simulated_time_seconds",
            "The simulated clock (unix seconds)",
            registry=registry,
        )


@dataclass
class SimulationSummary:
    """Totals of one run, for the final report, the summary file and tests."""

    run_id: str
    start_time_ms: int
    simulated_seconds: float = 0.0
    wall_seconds: float = 0.0
    events_produced: int = 0
    events_by_type: dict[str, int] = field(default_factory=dict)
    recommendations_by_policy: dict[str, int] = field(default_factory=dict)
    clicks_by_policy: dict[str, int] = field(default_factory=dict)
    conversions_by_policy: dict[str, int] = field(default_factory=dict)
    reward_by_policy: dict[str, float] = field(default_factory=dict)
    dead_letters: int = 0


class Simulator:
    """The shopper simulator wired to a bus: organic events out, recommendations in, reactions out."""

    def __init__(
        self,
        config: SimulateConfig,
        bus: Bus,
        registry: CollectorRegistry | None = None,
        *,
        wall_time_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.config = config
        self.bus = bus
        self.metrics = SimulatorMetrics(registry if registry is not None else CollectorRegistry())
        start = config.start_time_ms if config.start_time_ms is not None else wall_time_ms()
        self.start_time_ms = start
        self.run_id = config.run_id if config.run_id is not None else f"sim{start:x}"
        self._prefix = f"{self.run_id}-"
        self.shop = ShopperSimulator(config.simulator_config(start))
        if config.create_topics:
            specs = [
                s
                for s in topic_specs(config.partitions)
                if s.name in (CLICKSTREAM, RECOMMENDATIONS_TOPIC, DEAD_LETTER)
            ]
            renamed = {
                CLICKSTREAM: config.clickstream_topic,
                RECOMMENDATIONS_TOPIC: config.recommendations_topic,
                DEAD_LETTER: config.dead_letter_topic,
            }
            bus.create_topics([dataclasses.replace(s, name=renamed[s.name]) for s in specs])
        self.producer = bus.producer()
        self.dead_letters = DeadLetterSink(self.producer, self.metrics, config.dead_letter_topic)
        self.consumer = bus.consumer()
        topic = config.recommendations_topic
        self.partitions = [TopicPartition(topic, p) for p in range(bus.partitions_for(topic))]
        self.consumer.assign(self.partitions)
        self.consumer.seek_to_end(self.partitions)
        for tp in self.partitions:  # resolve the lazy seek now, before the first event goes out
            self.consumer.position(tp)
        self.summary = SimulationSummary(run_id=self.run_id, start_time_ms=start)
        self._events_by_type: Counter[str] = Counter()
        self._now_ms = start

    @property
    def now_ms(self) -> int:
        """The simulated time the shop has reached."""
        return self._now_ms

    def _send(self, events: list[ClickEvent]) -> None:
        for event in events:
            event = msgspec.structs.replace(
                event,
                event_id=self._prefix + event.event_id,
                session_id=self._prefix + event.session_id,
            )
            self.producer.send(
                self.config.clickstream_topic,
                event.user_id.encode(),
                encode(event),
                # The record time stays the wall clock's: brokers reject record times more than an
                # hour ahead (log.message.timestamp.after.max.ms), which a fast simulation reaches.
                headers=(SCHEMA_HEADER,),
            )
            self.metrics.events.labels(event.event_type).inc()
            self._events_by_type[event.event_type] += 1

    def _show(self, record: Record, now_ms: int) -> None:
        rec = RECOMMENDATIONS.decode(record.value)
        if isinstance(rec, DecodeError):
            self.dead_letters.send(
                dead_letter(record.value, rec, service="simulator", now_ms=now_ms, source=record)
            )
            self.summary.dead_letters += 1
            return
        assert isinstance(rec, Recommendation)
        if rec.session_id is not None and rec.session_id.startswith(self._prefix):
            # Back to the shop's own session id; slates for another run's sessions get no reaction.
            rec = msgspec.structs.replace(rec, session_id=rec.session_id[len(self._prefix) :])
        response = self.shop.respond(rec, now_ms)
        policy = rec.policy
        summary = self.summary
        summary.recommendations_by_policy[policy] = summary.recommendations_by_policy.get(policy, 0) + 1
        self.metrics.recommendations.labels(policy).inc()
        clicks = sum(1 for e in response if e.event_type == "click")
        conversions = sum(1 for e in response if e.event_type == CONVERSION)
        reward = sum(REWARD_WEIGHTS.get(e.event_type, 0.0) for e in response)
        summary.clicks_by_policy[policy] = summary.clicks_by_policy.get(policy, 0) + clicks
        summary.conversions_by_policy[policy] = summary.conversions_by_policy.get(policy, 0) + conversions
        summary.reward_by_policy[policy] = summary.reward_by_policy.get(policy, 0.0) + reward
        self.metrics.clicks.labels(policy).inc(clicks)
        self.metrics.conversions.labels(policy).inc(conversions)
        self.metrics.reward.labels(policy).inc(reward)
        self._send(response)

    def step(self, now_ms: int, records: Sequence[Record] = ()) -> int:
        """Show ``records`` (recommendations) at ``now_ms``, then produce the shop's events up to it.

        Returns the number of events produced; they are acknowledged when this returns.
        """
        now_ms = max(now_ms, self._now_ms)
        before = self.summary.events_produced
        for record in records:
            self._show(record, now_ms)
        self._send(self.shop.advance(now_ms))
        self.producer.flush()
        self._now_ms = now_ms
        self.summary.events_produced = sum(self._events_by_type.values())
        self.summary.events_by_type = dict(sorted(self._events_by_type.items()))
        self.summary.simulated_seconds = (now_ms - self.start_time_ms) / 1000.0
        self.metrics.simulated_time.set(now_ms / 1000.0)
        return self.summary.events_produced - before

    def poll(self, timeout_s: float) -> list[Record]:
        """Recommendations that arrived (waits up to ``timeout_s`` for the first)."""
        return self.consumer.poll(max_records=5000, timeout_s=timeout_s)

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> SimulationSummary:
        """Run the shop until ``stop`` is set or ``duration_seconds`` of simulated time have passed."""
        stop = stop or threading.Event()
        config = self.config
        end_ms = (
            None
            if config.duration_seconds is None
            else self.start_time_ms + round(config.duration_seconds * 1000)
        )
        started = clock()
        self.metrics.up.labels("simulator").set(1)
        try:
            records: list[Record] = []
            while not stop.is_set():
                now = self.start_time_ms + int((clock() - started) * config.speed * 1000)
                if end_ms is not None:
                    now = min(now, end_ms)
                self.step(now, records)
                if end_ms is not None and now >= end_ms:
                    break
                records = self.poll(config.tick_seconds)
        finally:
            self.metrics.up.labels("simulator").set(0)
            self.summary.wall_seconds = clock() - started
            self.close()
        if config.summary_out:
            path = Path(config.summary_out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(self.summary), indent=2) + "\n")
        return self.summary

    def close(self) -> None:
        try:
            self.producer.flush()
        finally:
            self.consumer.close()
            self.producer.close()

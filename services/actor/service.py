"""`qrec actor`: a recommendation for every recommendation opportunity, from the latest model.

poll UserState -> keep the opportunities -> split users between policies (stable hash) -> score and
pick slates with exact propensities -> produce Recommendations -> flush -> commit. The model topic is
read on the side by every actor (not through the group); a new version is reassembled, verified and
swapped between batches. A corrupt or partial version is rejected and counted, and the previous
model keeps serving. Before any model exists, the DQN group is served by popularity, labelled
``popularity-coldstart``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import jax
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.codec import USER_STATES, DecodeError, encode
from schemas.messages import Recommendation, RecommendedItem, UserState
from services.actor.config import ActorConfig
from services.actor.model import LiveModel, score_and_select, select_slates
from services.actor.step import COLD_START, Popularity, allowed_mask, event_key, parse_split
from services.bus.base import Bus, BusError, Record, TopicPartition
from services.dead_letter import DeadLetterSink, dead_letter
from services.metrics import ConsumerLag, ProcessMetrics, next_offsets
from services.model_topic import ModelAssembler
from services.replay.service import ensure_topics
from services.state_builder.service import UPDATE_HEADER

log = logging.getLogger(__name__)
SCHEMA_HEADER = ("qrec-schema", b"recommendation/1-0-0")
LAST_SLATES = 100_000  # users whose previous slate is remembered for --mask-shown
# Batches are padded to one of a few sizes so that the compiled scorer is built a few times, not per size.
BATCH_BUCKETS = (8, 64, 512)


def bucket(size: int) -> int:
    """The padded batch size for ``size`` users."""
    for limit in BATCH_BUCKETS:
        if size <= limit:
            return limit
    return -(-size // BATCH_BUCKETS[-1]) * BATCH_BUCKETS[-1]


class ActorMetrics(ProcessMetrics):
    """What the actor exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "actor")
        self.recommendations = Counter(
            "qrec_actor_recommendations_total",
            "Recommendations published, by policy",
            ["policy"],
            registry=registry,
        )
        self.slots = Counter("qrec_actor_slots_total", "Slate positions filled", registry=registry)
        self.explored = Counter(
            "qrec_actor_explored_slots_total", "Slate positions filled by exploration", registry=registry
        )
        self.model_version = Gauge(
            "qrec_actor_model_version", "Model version being served (0: none)", registry=registry
        )
        self.model_age = Gauge(
            "qrec_actor_model_age_seconds",
            "Age of the served model (since the learner made it)",
            registry=registry,
        )
        self.swaps = Counter("qrec_actor_model_swaps_total", "Model versions swapped in", registry=registry)
        self.swap_failures = Counter(
            "qrec_actor_model_rejected_total",
            "Model versions rejected (corrupt, partial or unusable)",
            registry=registry,
        )
        self.scoring = Histogram(
            "qrec_actor_scoring_seconds",
            "Time to score a batch and pick its slates",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=registry,
        )
        self.latency = Histogram(
            "qrec_actor_end_to_end_latency_seconds",
            "From the triggering event's Kafka record time to its recommendation being acknowledged",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.batch = Histogram(
            "qrec_actor_batch_states",
            "Recommendation opportunities per batch",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=registry,
        )


class Actor:
    """One actor process: owns some partitions of the user-state topic."""

    def __init__(
        self,
        config: ActorConfig,
        bus: Bus,
        registry: CollectorRegistry | None = None,
        *,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.config = config
        self.bus = bus
        self.metrics = ActorMetrics(registry or CollectorRegistry())
        self.wall_ms = wall_ms
        if config.create_topics:
            ensure_topics(bus, config.partitions)
        self.split = parse_split(config.policies, config.split_salt)
        self.opportunities = {t.strip() for t in config.opportunity_types.split(",") if t.strip()}
        self.popularity = Popularity(config.popularity_half_life_events)
        self.model: LiveModel | None = None
        self.assembler = ModelAssembler()
        self.last_slates: OrderedDict[str, list[str]] = OrderedDict()
        self.producer = bus.producer()
        self.dead_letters = DeadLetterSink(self.producer, self.metrics, config.dead_letter_topic)
        self.consumer = bus.consumer(config.group_id)
        self.model_consumer = bus.consumer()
        model_tp = TopicPartition(config.model_topic, 0)
        self.model_consumer.assign([model_tp])
        self.model_consumer.seek_to_beginning([model_tp])
        self.published = 0
        self.lag = ConsumerLag(self.metrics.registry, config.group_id)

    # -- models ---------------------------------------------------------------------------------
    def refresh_model(self, timeout_s: float = 0.0) -> None:
        """Read new model messages; swap in each verified version (between batches, never during one)."""
        for record in self.model_consumer.poll(max_records=1000, timeout_s=timeout_s):
            rejected_before = len(self.assembler.rejected)
            assembled = self.assembler.add(record.value)
            for reason in self.assembler.rejected[rejected_before:]:
                log.warning("model update rejected: %s", reason)
                self.metrics.swap_failures.inc()
            if assembled is None:
                continue
            try:
                model = LiveModel.from_assembled(assembled)
            except ValueError as exc:
                log.warning("model version %d rejected: %s", assembled.header.model_version, exc)
                self.metrics.swap_failures.inc()
                continue
            self._warm_model(model)  # compile before the swap, so serving never waits on it
            self.model = model
            self.metrics.swaps.inc()
            self.metrics.model_version.set(model.version)
            log.info("serving model version %d (%d items)", model.version, len(model.vocabulary))
        if self.model is not None:
            self.metrics.model_age.set(max(0.0, (self.wall_ms() - self.model.created_at_ms) / 1000.0))

    # -- serving --------------------------------------------------------------------------------
    def _opportunity(self, record: Record) -> UserState | None:
        if record.value is None or dict(record.headers).get(UPDATE_HEADER) is not None:
            return None  # a tombstone, or an update of the state-builder's internal record only
        state = USER_STATES.decode(record.value)
        if isinstance(state, DecodeError):
            self.dead_letters.send(
                dead_letter(record.value, state, service="actor", now_ms=self.wall_ms(), source=record)
            )
            return None
        if state.observation.recent_items and state.source_event_type != "rec_request":
            self.popularity.observe(state.observation.recent_items[-1:])
        return state if state.source_event_type in self.opportunities else None

    def _blocked(self, state: UserState) -> list[str]:
        blocked: list[str] = []
        if self.config.mask_purchased:
            blocked.extend(state.purchased_items)
        if self.config.mask_shown:
            blocked.extend(self.last_slates.get(state.user_id, ()))
        return blocked

    def _keys(self, states: list[UserState]) -> jax.Array:
        seeds = np.asarray([event_key(self.config.seed, s.source_event_id) for s in states], np.uint32)
        return jax.vmap(jax.random.key)(seeds)

    def _exploration_value(self) -> float:
        return self.config.epsilon if self.config.exploration == "epsilon" else self.config.temperature

    def _serve_dqn(self, states: list[UserState], model: LiveModel) -> list[list[RecommendedItem]]:
        size = len(states)
        padded = bucket(size)
        obs = model.encode([s.observation for s in states], padded)
        base = model.vocabulary.allowed_mask()  # (A,)
        index = model.index
        allowed = np.zeros((padded, base.shape[0]), bool)  # (B, A)
        for row, state in enumerate(states):
            allowed[row] = allowed_mask(index, base.shape[0], base, self._blocked(state))
        allowed[size:] = base
        keys = self._keys(states + states[:1] * (padded - size))
        actions, propensities, explored, scores = score_and_select(
            model.params,
            obs,
            allowed,
            keys,
            np.float32(self._exploration_value()),
            network=model.network,
            k=self.config.slate_size,
            exploration=self.config.exploration,
        )
        actions, propensities, explored, scores = (
            np.asarray(actions),
            np.asarray(propensities),
            np.asarray(explored),
            np.asarray(scores),
        )
        ids = model.vocabulary.ids_for(actions[:size].reshape(-1).tolist())
        slates = []
        for row in range(size):
            slate = []
            for pos in range(self.config.slate_size):
                item = ids[row * self.config.slate_size + pos]
                if actions[row, pos] < 0 or item is None:
                    continue  # fewer allowed items than slots
                slate.append(
                    RecommendedItem(
                        item_id=item,
                        score=float(scores[row, pos]),
                        propensity=float(propensities[row, pos]),
                        explored=bool(explored[row, pos]),
                    )
                )
            slates.append(slate)
        return slates

    def _serve_candidates(self, states: list[UserState], policy: str) -> list[list[RecommendedItem]]:
        candidates, log_scores = self.popularity.top(self.config.popularity_candidates)
        if not candidates:
            return [[] for _ in states]
        # Fixed shapes (C candidates, bucketed B) so the compiled selector is reused batch after batch.
        size = max(self.config.popularity_candidates, self.config.slate_size)
        scores = np.zeros((size,), np.float32)  # (C,)
        if policy != "random":
            scores[: len(candidates)] = log_scores
        index = {item: i for i, item in enumerate(candidates)}
        padded = bucket(len(states))
        base = np.zeros((size,), bool)
        base[: len(candidates)] = True
        allowed = np.tile(base, (padded, 1))  # (B, C)
        for row, state in enumerate(states):
            allowed[row] = allowed_mask(index, size, base, self._blocked(state))
        keys = self._keys(states + states[:1] * (padded - len(states)))
        exploration, value = self.config.exploration, self._exploration_value()
        if policy == "random":
            exploration, value = "epsilon", 1.0  # uniform over the allowed candidates
        actions, propensities, explored = (
            np.asarray(a)
            for a in select_slates(
                np.tile(scores, (padded, 1)),
                allowed,
                keys,
                np.float32(value),
                k=self.config.slate_size,
                exploration=exploration,
            )
        )
        slates = []
        for row in range(len(states)):
            slates.append(
                [
                    RecommendedItem(
                        item_id=candidates[int(actions[row, pos])],
                        score=float(scores[int(actions[row, pos])]),
                        propensity=float(propensities[row, pos]),
                        explored=bool(explored[row, pos]) if policy != "random" else True,
                    )
                    for pos in range(self.config.slate_size)
                    if actions[row, pos] >= 0
                ]
            )
        return slates

    def _warm_model(self, model: LiveModel) -> None:
        actions = model.vocabulary.num_actions
        for padded in BATCH_BUCKETS:
            keys = jax.vmap(jax.random.key)(np.arange(padded, dtype=np.uint32))
            jax.block_until_ready(
                score_and_select(
                    model.params,
                    model.encode([], padded),
                    np.ones((padded, actions), bool),
                    keys,
                    np.float32(self._exploration_value()),
                    network=model.network,
                    k=self.config.slate_size,
                    exploration=self.config.exploration,
                )
            )

    def warm_up(self) -> None:
        """Compile the candidate selectors for every batch bucket now, not on the first busy batches."""
        size = max(self.config.popularity_candidates, self.config.slate_size)
        for padded in BATCH_BUCKETS:
            keys = jax.vmap(jax.random.key)(np.arange(padded, dtype=np.uint32))
            allowed = np.ones((padded, size), bool)
            for exploration, value in {
                (self.config.exploration, self._exploration_value()),
                ("epsilon", 1.0),
            }:
                jax.block_until_ready(
                    select_slates(
                        np.zeros((padded, size), np.float32),
                        allowed,
                        keys,
                        np.float32(value),
                        k=self.config.slate_size,
                        exploration=exploration,
                    )
                )

    def serve(self, records: list[Record]) -> list[Recommendation]:
        """Recommendations for the opportunities in a batch of UserState records (sent, not yet flushed)."""
        by_policy: dict[str, list[tuple[UserState, Record]]] = {}
        for record in records:
            state = self._opportunity(record)
            if state is None:
                continue
            policy = self.split.policy_for(state.user_id)
            if policy == "dqn" and self.model is None:
                policy = COLD_START
            by_policy.setdefault(policy, []).append((state, record))
        if not by_policy:
            return []
        started = time.perf_counter()
        made: list[Recommendation] = []
        model = self.model  # one model per batch: a swap lands between batches
        for policy, pairs in by_policy.items():
            states = [state for state, _ in pairs]
            if policy == "dqn" and model is not None:
                slates = self._serve_dqn(states, model)
            else:
                slates = self._serve_candidates(states, "random" if policy == "random" else "popularity")
            version = model.version if policy == "dqn" and model is not None else 0
            for (state, record), slate in zip(pairs, slates, strict=True):
                made.append(self._publish(state, record, slate, policy, version))
        self.metrics.scoring.observe(time.perf_counter() - started)
        self.metrics.batch.observe(len(made))
        return made

    def _publish(
        self, state: UserState, record: Record, slate: list[RecommendedItem], policy: str, version: int
    ) -> Recommendation:
        rec = Recommendation(
            rec_id=f"rec-{state.source_event_id}",  # one per opportunity: re-serving it is idempotent
            user_id=state.user_id,
            items=slate,
            policy=policy,
            model_version=version,
            explored=any(item.explored for item in slate),
            source_event_id=state.source_event_id,
            event_timestamp=state.timestamp,
            created_at=self.wall_ms(),
            session_id=state.session_id,
            request_id=state.request_id,
        )
        self.producer.send(
            self.config.recommendations_topic, state.user_id.encode(), encode(rec), headers=(SCHEMA_HEADER,)
        )
        self.last_slates[state.user_id] = [item.item_id for item in slate]
        self.last_slates.move_to_end(state.user_id)
        if len(self.last_slates) > LAST_SLATES:
            self.last_slates.popitem(last=False)
        self.metrics.recommendations.labels(policy).inc()
        self.metrics.slots.inc(len(slate))
        self.metrics.explored.inc(sum(item.explored for item in slate))
        return rec

    def poll_once(self, timeout_s: float = 0.2) -> int:
        """Refresh the model, then one poll -> serve -> flush -> commit cycle; returns records consumed."""
        self.refresh_model()
        records = self.consumer.poll(max_records=self.config.max_batch, timeout_s=timeout_s)
        if not records:
            self.lag.update(self.consumer)
            return 0
        made = self.serve(records)
        self.producer.flush()
        now = time.time()
        for record in records:
            if record.value is not None and dict(record.headers).get(UPDATE_HEADER) is None:
                self.metrics.latency.observe(max(0.0, now - record.timestamp_ms / 1000.0))
        try:
            self.consumer.commit(next_offsets(records))
        except BusError as exc:  # a rebalance moved the partitions; their new owner re-serves them
            log.warning("commit failed after a rebalance: %s", exc)
        self.published += len(made)
        self.lag.update(self.consumer)
        return len(records)

    def run(self, stop: threading.Event | None = None) -> int:
        stop = stop or threading.Event()
        self.warm_up()
        self.consumer.subscribe([self.config.user_state_topic])
        self.metrics.up.labels("actor").set(1)
        try:
            while not stop.is_set():
                self.poll_once()
        finally:
            self.metrics.up.labels("actor").set(0)
            self.close()
        return self.published

    def close(self) -> None:
        try:
            self.producer.flush()
        finally:
            self.consumer.close()
            self.model_consumer.close()
            self.producer.close()

"""`qrec actor`: a recommendation for every recommendation opportunity, from the latest model.

poll UserState -> keep the opportunities -> split users between policies (stable hash) -> score and
pick slates with exact propensities -> produce Recommendations -> flush -> commit. The model topic is
read on the side by every actor (not through the group); a new version is reassembled, verified and
swapped between batches. A corrupt or partial version is rejected and counted, and the previous
model keeps serving. Before any model exists, the DQN group is served by popularity, labelled
``popularity-coldstart``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rl.exploration import boltzmann_temperature, linear_epsilon
from rl.tabular import TabularModel, category_slate, state_index
from schemas.codec import USER_STATES, DecodeError, encode
from schemas.messages import Recommendation, RecommendedItem, UserState
from services.actor.catalogue import Catalogue
from services.actor.config import ActorConfig
from services.actor.granularity import items_for_groups
from services.actor.model import LiveModel, score_and_select, select_slates
from services.actor.step import COLD_START, Popularity, event_key, parse_split
from services.bus.base import Bus, BusError, Consumer, Record, TopicPartition, TopicSpec
from services.config import ConfigError
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
RERANK_EVENTS = 200  # popularity candidates are re-ranked after this many new events...
RERANK_SECONDS = 1.0  # ...or this long after the last ranking, whichever comes first


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
        self.exploration = Gauge(
            "qrec_actor_exploration",
            "Epsilon (or softmax temperature) of the last slates, by policy; it decays with the served "
            "model's training step under --epsilon-end / --temperature-end",
            ["policy"],
            registry=registry,
        )
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
        self.catalogue_records = Counter(
            "qrec_actor_catalogue_records_total",
            "Catalogue records applied (unusable ones go to the dead-letter topic instead)",
            registry=registry,
        )
        self.catalogue_unavailable = Gauge(
            "qrec_actor_catalogue_unavailable_items",
            "Items the catalogue marks unavailable or deleted (never recommended)",
            registry=registry,
        )


ExternalPolicy = Callable[[UserState, list[str], int], list[str]]
"""(state, blocked item ids, k) -> up to k item ids, best first: a policy served from outside the actor."""


class Actor:
    """One actor process: owns some partitions of the user-state topic."""

    def __init__(
        self,
        config: ActorConfig,
        bus: Bus,
        registry: CollectorRegistry | None = None,
        *,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        external_policies: Mapping[str, ExternalPolicy] | None = None,
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
        # Ranking every item seen takes milliseconds (tens of thousands of items); the candidates are
        # re-ranked once enough new events arrived or enough time passed, not for every batch.
        self._popular: tuple[list[str], np.ndarray] | None = None
        self._popular_observed = 0  # events observed since the last ranking
        self._popular_at = 0.0  # time.monotonic() of the last ranking
        self.model: LiveModel | None = None
        self.assembler = ModelAssembler()
        # A new model's scorer compiles off the serving thread (seconds on a busy machine); it swaps in
        # between batches once compiled. Per slot (dqn, bandit) only the newest pending model counts.
        self._compiler = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="qrec-actor-compile")
            if config.background_compile
            else None
        )
        self._pending: dict[str, tuple[Future[None], LiveModel]] = {}
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
        self.catalogue: Catalogue | None = None
        self.catalogue_consumer: Consumer | None = None
        self._mask_cache: dict[tuple[int, int], tuple[Mapping[str, int], np.ndarray]] = {}
        # The schedule is evaluated once per model step, not per batch (it runs as small JAX ops).
        self._exploration_at = functools.lru_cache(maxsize=64)(self._scheduled_exploration)
        if config.catalogue_topic:
            self._open_catalogue(config.catalogue_topic)
        # The baselines' models, each read from its own topic like the DQN's.
        self.external = dict(external_policies or {})
        for name in self.split.names:
            if name == "oracle" and name not in self.external:
                raise ConfigError(
                    "the oracle policy needs the simulator's true preferences: only qrec demo can serve it"
                )
        self.bandit_model: LiveModel | None = None
        self.tabular: TabularModel | None = None
        self.baseline_feeds: dict[str, tuple[Consumer, ModelAssembler]] = {}
        for name, topic in (("bandit", config.bandit_model_topic), ("tabular_q", config.tabular_model_topic)):
            if name in self.split.names:
                consumer = bus.consumer()
                consumer.assign([TopicPartition(topic, 0)])
                consumer.seek_to_beginning([TopicPartition(topic, 0)])
                self.baseline_feeds[name] = (consumer, ModelAssembler())

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
            self._stage("dqn", model)
        self._refresh_baselines(timeout_s)
        self._install_compiled()
        if self.model is not None:
            self.metrics.model_age.set(max(0.0, (self.wall_ms() - self.model.created_at_ms) / 1000.0))

    def _refresh_baselines(self, timeout_s: float) -> None:
        """Swap in new versions of the baselines' models (the bandit's network, the Q-table)."""
        for name, (consumer, assembler) in self.baseline_feeds.items():
            for record in consumer.poll(max_records=1000, timeout_s=timeout_s):
                rejected_before = len(assembler.rejected)
                assembled = assembler.add(record.value)
                for reason in assembler.rejected[rejected_before:]:
                    log.warning("%s model update rejected: %s", name, reason)
                    self.metrics.swap_failures.inc()
                if assembled is None:
                    continue
                try:
                    if name == "bandit":
                        self._stage("bandit", LiveModel.from_assembled(assembled))
                        continue
                    self.tabular = TabularModel.from_bytes(assembled.data)
                except ValueError as exc:
                    log.warning("%s model version %d rejected: %s", name, assembled.header.model_version, exc)
                    self.metrics.swap_failures.inc()
                    continue
                self.metrics.swaps.inc()

    def _stage(self, slot: str, model: LiveModel) -> None:
        """Compile ``model``'s scorer, then serve it in ``slot`` (dqn or bandit): in the background while
        the current model serves, or here and now without --background-compile."""
        if self._compiler is not None:
            self._pending[slot] = (self._compiler.submit(self._warm_model, model), model)
            return
        done: Future[None] = Future()
        try:
            self._warm_model(model)
            done.set_result(None)
        except Exception as exc:  # any failure rejects the model; the old one serves on
            done.set_exception(exc)
        self._pending[slot] = (done, model)
        self._install_compiled()

    def _install_compiled(self, wait_s: float | None = 0.0) -> None:
        """Swap in the pending models whose scorer compiled (waiting up to ``wait_s``; None: until done)."""
        for slot, (future, model) in list(self._pending.items()):
            try:
                future.result(timeout=wait_s)
            except TimeoutError:
                continue
            except Exception as exc:  # this model cannot serve; the previous one can
                del self._pending[slot]
                log.warning("%s model version %d rejected: its scorer failed: %s", slot, model.version, exc)
                self.metrics.swap_failures.inc()
                continue
            del self._pending[slot]
            if slot == "dqn":
                self.model = model
                self.metrics.model_version.set(model.version)
                log.info("serving model version %d (%d items)", model.version, len(model.vocabulary))
            else:
                self.bandit_model = model
            self.metrics.swaps.inc()

    def wait_for_models(self, timeout_s: float | None = None) -> None:
        """Swap in every model whose scorer is compiling now, once compiled (tests and tools)."""
        self._install_compiled(wait_s=timeout_s)

    # -- catalogue ------------------------------------------------------------------------------
    def _open_catalogue(self, topic: str) -> None:
        """Read the whole catalogue topic on the side (every actor sees every item), from the start."""
        if self.config.create_topics:
            self.bus.create_topics([TopicSpec(topic, 1, {"cleanup.policy": "compact"})])
        partitions = [TopicPartition(topic, p) for p in range(self.bus.partitions_for(topic))]
        self.catalogue = Catalogue()
        self.catalogue_consumer = self.bus.consumer()
        self.catalogue_consumer.assign(partitions)
        self.catalogue_consumer.seek_to_beginning(partitions)

    def refresh_catalogue(self, timeout_s: float = 0.0) -> int:
        """Apply new catalogue records (between batches); returns how many were read."""
        if self.catalogue is None or self.catalogue_consumer is None:
            return 0
        records = self.catalogue_consumer.poll(max_records=10_000, timeout_s=timeout_s)
        for record in records:
            error = self.catalogue.apply(record.key, record.value)
            if error is not None:
                self.dead_letters.send(
                    dead_letter(record.value, error, service="actor", now_ms=self.wall_ms(), source=record)
                )
            else:
                self.metrics.catalogue_records.inc()
        self.metrics.catalogue_unavailable.set(len(self.catalogue.unavailable))
        return len(records)

    def load_catalogue(self, timeout_s: float = 60.0) -> None:
        """Read the catalogue up to its current end before serving, so no early slate misses it."""
        consumer = self.catalogue_consumer
        if consumer is None:
            return
        partitions = sorted(consumer.assignment())
        ends = consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise BusError(f"the catalogue topic could not be read to its end within {timeout_s:.0f} s")
            self.refresh_catalogue(timeout_s=0.2)
        log.info(
            "catalogue loaded: %d unavailable items",
            len(self.catalogue.unavailable if self.catalogue else ()),
        )

    # -- serving --------------------------------------------------------------------------------
    def _serve_tabular(self, states: list[UserState], table: TabularModel) -> list[list[RecommendedItem]]:
        """Slates of the tabular Q baseline: epsilon-greedy categories, popular items within them."""
        slates = []
        for state in states:
            recent = state.observation.recent_items
            last = table.item_category.get(recent[-1]) if recent else None
            row = table.q[state_index(last, state.session_event_count, table.config)]  # (categories,)
            draws = np.random.default_rng(event_key(self.config.seed, state.source_event_id))
            picked = category_slate(
                row,
                table.ranked_items,
                set(self._blocked(state)),
                self.config.slate_size,
                table.config.epsilon,
                draws.random(2 * self.config.slate_size),
            )
            slates.append(
                [
                    RecommendedItem(
                        item_id=item,
                        score=float(row[table.item_category[item]]),
                        propensity=propensity,
                        explored=explored,
                    )
                    for item, propensity, explored in picked
                ]
            )
        return slates

    def _serve_external(self, states: list[UserState], policy: ExternalPolicy) -> list[list[RecommendedItem]]:
        """Slates from a policy outside the actor (the demo's oracle): deterministic, propensity 1."""
        return [
            [
                RecommendedItem(item_id=item, score=0.0, propensity=1.0, explored=False)
                for item in policy(state, self._blocked(state), self.config.slate_size)
            ]
            for state in states
        ]

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
            self._popular_observed += 1
        return state if state.source_event_type in self.opportunities else None

    def _user_blocked(self, state: UserState) -> list[str]:
        """Items this user must not be shown now: purchases and the previous slate (per the config)."""
        blocked: list[str] = []
        if self.config.mask_purchased:
            blocked.extend(state.purchased_items)
        if self.config.mask_shown:
            blocked.extend(self.last_slates.get(state.user_id, ()))
        return blocked

    def _blocked(self, state: UserState) -> list[str]:
        """Every item this user must not be shown: their own blocked items and unavailable ones."""
        if self.catalogue is None or not self.catalogue.unavailable:
            return self._user_blocked(state)
        return self._user_blocked(state) + sorted(self.catalogue.unavailable)

    def _blocked_indices(self, states: list[UserState], index: Mapping[str, int], padded: int) -> np.ndarray:
        """Per-user exclusions as indices (padded, m) for the compiled selector; -1 fills unused slots.

        The width m is bucketed to a power of two (at least 16) so few shapes are ever compiled.
        """
        rows = [[index[item] for item in self._user_blocked(state) if item in index] for state in states]
        width = max(16, 1 << (max((len(row) for row in rows), default=0) - 1).bit_length())
        blocked = np.full((padded, width), -1, np.int32)  # (B, m)
        for number, row in enumerate(rows):
            blocked[number, : len(row)] = row
        return blocked

    def _available(self, index: Mapping[str, int], base: np.ndarray) -> np.ndarray:
        """``base`` (A,) minus the catalogue's unavailable items, cached until either changes."""
        if self.catalogue is None:
            return base
        key = (id(index), self.catalogue.version)
        cached = self._mask_cache.get(key)
        if cached is None or cached[0] is not index:  # ids are reused once an old model is gone
            if len(self._mask_cache) >= 8:
                self._mask_cache.clear()
            cached = self._mask_cache[key] = (index, self.catalogue.mask(index, base))
        return cached[1]

    def _seeds(self, states: list[UserState], padded: int) -> np.ndarray:
        """One exploration seed per triggering event (padding rows reuse the first)."""
        seeds = np.full((padded,), event_key(self.config.seed, states[0].source_event_id), np.uint32)
        seeds[: len(states)] = [event_key(self.config.seed, s.source_event_id) for s in states]
        return seeds

    def _exploration_value(self, model: LiveModel | None = None) -> float:
        """Epsilon or temperature; with --epsilon-end / --temperature-end it decays with the training
        step of the model that serves (rl.exploration), and policies without a model keep the start."""
        return self._exploration_at(0 if model is None else model.step)

    def _scheduled_exploration(self, step: int) -> float:
        config = self.config
        if config.exploration == "epsilon":
            start, end, schedule = config.epsilon, config.epsilon_end, linear_epsilon
        else:
            start, end, schedule = config.temperature, config.temperature_end, boltzmann_temperature
        if end is None:
            return start
        return float(schedule(step, start=start, end=end, decay_steps=config.exploration_decay_steps))

    def _serve_dqn(self, states: list[UserState], model: LiveModel) -> list[list[RecommendedItem]]:
        size = len(states)
        padded = bucket(size)
        obs = model.encode([s.observation for s in states], padded)
        # One mask for the whole batch (vocabulary slots in use, catalogue), per-user exclusions as
        # indices: no (B, A) array is built or copied per batch.
        allowed = self._available(model.index, model.allowed)  # (A,)
        blocked = self._blocked_indices(states, model.index, padded)  # (B, m)
        actions, propensities, explored, scores = score_and_select(
            model.params,
            obs,
            allowed,
            self._seeds(states, padded),
            np.float32(self._exploration_value(model)),
            network=model.network,
            k=self.config.slate_size,
            exploration=self.config.exploration,
            blocked=blocked,
        )
        actions, propensities, explored, scores = (
            np.asarray(actions),
            np.asarray(propensities),
            np.asarray(explored),
            np.asarray(scores),
        )
        ids = model.vocabulary.ids_for(actions[:size].reshape(-1).tolist())
        k = self.config.slate_size
        if model.groups is not None:
            # A category/brand model picked groups: each becomes its most popular item this user may
            # see (deterministic, so the item's propensity is its group's).
            ids = [
                item
                for row, state in enumerate(states)
                for item in items_for_groups(
                    [group or "" for group in ids[row * k : (row + 1) * k]],
                    model.groups,
                    exclude=set(self._blocked(state)),
                )
            ]
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

    def _popular_candidates(self) -> tuple[list[str], np.ndarray]:
        """The most popular items and their log-scores, re-ranked after RERANK_EVENTS new events or
        RERANK_SECONDS (whichever comes first), and whenever fewer than the wanted number are known."""
        now = time.monotonic()
        cached = self._popular
        if (
            cached is None
            or self._popular_observed >= RERANK_EVENTS
            or (self._popular_observed and now - self._popular_at >= RERANK_SECONDS)
            or (self._popular_observed and len(cached[0]) < self.config.popularity_candidates)
        ):
            cached = self._popular = self.popularity.top(self.config.popularity_candidates)
            self._popular_observed, self._popular_at = 0, now
        return cached

    def _serve_candidates(self, states: list[UserState], policy: str) -> list[list[RecommendedItem]]:
        candidates, log_scores = self._popular_candidates()
        if not candidates:
            return [[] for _ in states]
        # Fixed shapes (C candidates, bucketed B) so the compiled selector is reused batch after batch.
        size = max(self.config.popularity_candidates, self.config.slate_size)
        scores = np.zeros((size,), np.float32)  # (C,)
        if policy != "random":
            scores[: len(candidates)] = log_scores
        index = {item: i for i, item in enumerate(candidates)}
        padded = bucket(len(states))
        base = np.zeros((size,), bool)  # (C,)
        base[: len(candidates)] = True
        allowed = base if self.catalogue is None else self.catalogue.mask(index, base)  # (C,)
        exploration, value = self.config.exploration, self._exploration_value()
        if policy == "random":
            exploration, value = "epsilon", 1.0  # uniform over the allowed candidates
        actions, propensities, explored = (
            np.asarray(a)
            for a in select_slates(
                np.broadcast_to(scores, (padded, size)),
                allowed,
                self._seeds(states, padded),
                np.float32(value),
                k=self.config.slate_size,
                exploration=exploration,
                blocked=self._blocked_indices(states, index, padded),
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
        for padded in BATCH_BUCKETS:
            jax.block_until_ready(
                score_and_select(
                    model.params,
                    model.encode([], padded),
                    model.allowed,
                    np.arange(padded, dtype=np.uint32),
                    np.float32(self._exploration_value()),
                    network=model.network,
                    k=self.config.slate_size,
                    exploration=self.config.exploration,
                    blocked=np.full((padded, 16), -1, np.int32),
                )
            )

    def warm_up(self) -> None:
        """Compile the candidate selectors for every batch bucket now, not on the first busy batches."""
        size = max(self.config.popularity_candidates, self.config.slate_size)
        for padded in BATCH_BUCKETS:
            for exploration, value in {
                (self.config.exploration, self._exploration_value()),
                ("epsilon", 1.0),
            }:
                jax.block_until_ready(
                    select_slates(
                        np.zeros((padded, size), np.float32),
                        np.ones((size,), bool),
                        np.arange(padded, dtype=np.uint32),
                        np.float32(value),
                        k=self.config.slate_size,
                        exploration=exploration,
                        blocked=np.full((padded, 16), -1, np.int32),
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
            if (
                (policy == "dqn" and self.model is None)
                or (policy == "bandit" and self.bandit_model is None)
                or (policy == "tabular_q" and self.tabular is None)
            ):
                policy = COLD_START
            by_policy.setdefault(policy, []).append((state, record))
        if not by_policy:
            return []
        started = time.perf_counter()
        made: list[Recommendation] = []
        model = self.model  # one model per batch: a swap lands between batches
        for policy, pairs in by_policy.items():
            states = [state for state, _ in pairs]
            version = 0
            if policy == "dqn" and model is not None:
                slates = self._serve_dqn(states, model)
                version = model.version
                self.metrics.exploration.labels(policy).set(self._exploration_value(model))
            elif policy == "bandit" and self.bandit_model is not None:
                slates = self._serve_dqn(states, self.bandit_model)
                version = self.bandit_model.version
                self.metrics.exploration.labels(policy).set(self._exploration_value(self.bandit_model))
            elif policy == "tabular_q" and self.tabular is not None:
                slates = self._serve_tabular(states, self.tabular)
            elif policy in self.external:
                slates = self._serve_external(states, self.external[policy])
            else:
                slates = self._serve_candidates(states, "random" if policy == "random" else "popularity")
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
        """Refresh the model and catalogue, then one poll -> serve -> flush -> commit cycle; returns
        records consumed."""
        self.refresh_model()
        self.refresh_catalogue()
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
        self.load_catalogue()
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
            if self.catalogue_consumer is not None:
                self.catalogue_consumer.close()
            for consumer, _ in self.baseline_feeds.values():
                consumer.close()
            self.producer.close()
            if self._compiler is not None:
                self._compiler.shutdown(wait=False, cancel_futures=True)

"""`qrec demo`: the whole loop, closed by the shopper simulator, with a live view and a report.

Simulated shoppers browse; their events go to the clickstream; the state-builder, the actor and the
learners run as they do in production (here in one process, on the embedded bus by default, or on
Kafka with --bootstrap-servers); every recommendation is shown to the simulated shopper, whose
reaction goes back into the clickstream. Traffic is split by a stable user hash between the DQN and
its baselines: a myopic contextual bandit (the same network trained with discount 0, by a second
learner), tabular Q-learning over categories, recent popularity, random, and an oracle that knows
the simulator's true preferences (myopic). All of them face the same population and every learner
learns from the transitions of all groups. Time is simulated: the loop advances the shop's clock in
ticks and lets every service drain between ticks, so a run is reproducible for a given seed.

By default the DQN and the bandit learn from the logged transitions (every interaction of every
shopper, clicks and purchases on slates included) and their published models rank items by the
next-item (SQN) head, as SQN recommends with its supervised head, while the Q-learning loss shapes
the shared state encoder and item embeddings. Measured in the demo, the Q-head is the weaker ranker:
logged transitions carry only positive rewards (the item a shopper chose), and a shown slot's
feedback transition is mostly a 0, so Q(s, a) learns how often an item was chosen rather than shown;
and a feedback transition's next-item label is the item shown, which teaches the head to imitate
the serving policy (``--learn-from``, ``--serve-q-weight`` and ``--serve-next-item-weight`` change this).

Each group is scored by what its shoppers' sessions earn from recommendations (click 1, favorite 2,
add_to_cart 3, purchase 10, a later purchase of an item carted from a slate included) over the late
phase of the run (its second half), when the learners have had time to learn.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from rl.exposure import exposure_report
from schemas.codec import RECOMMENDATIONS, encode
from schemas.messages import ClickEvent, Recommendation, UserState
from services.actor.config import BANDIT_MODEL, ActorConfig
from services.actor.service import Actor
from services.actor.step import parse_split
from services.bus.base import Bus, Producer, Record, TopicPartition
from services.config import BusConfig, ConfigError, make_bus, register, setting
from services.learner.config import (
    SHOWN_SLOTS,
    TD_BOOTSTRAPS,
    LearnerServiceConfig,
    blends_into_the_repeat_head,
    parse_sources,
)
from services.learner.service import Learner
from services.learner.tabular import TABULAR_MODEL, TabularLearner, TabularLearnerConfig, model_topic_spec
from services.metrics import serve_metrics
from services.replay.service import ensure_topics
from services.simulator import REWARD_WEIGHTS, ShopperSimulator, SimulatorConfig
from services.state_builder.config import StateBuilderConfig
from services.state_builder.service import StateBuilder
from services.topics import CLICKSTREAM
from services.topics import RECOMMENDATIONS as RECOMMENDATIONS_TOPIC

DEFAULT_POLICIES = "dqn=0.2,bandit=0.16,tabular_q=0.16,popularity=0.16,random=0.16,oracle=0.16"
DEFAULT_PROCESS_POLICIES = "dqn=0.2,bandit=0.2,tabular_q=0.2,popularity=0.2,random=0.2"
SPLIT_SALT = "qrec-ab-1"
LOCAL_KAFKA = "local"
"""--bootstrap-servers value that starts a Kafka broker from deploy/kafka for the run (with --processes)."""
LIVE_WINDOWS = 9
"""Report windows whose reward per session the live view draws per policy (the latest ones)."""


@register("demo")
@dataclass(frozen=True, kw_only=True)
class DemoConfig(BusConfig):
    """The closed-loop demo."""

    hours: float = setting(3.0, help="simulated shop hours to run")
    quick: bool = setting(False, help="a short run (--quick-hours, fewer shoppers): under a minute")
    quick_hours: float = setting(0.75, help="simulated hours of a --quick run")
    json: bool = setting(False, help="print only the summary JSON on stdout (no live view, no report)")
    shoppers: int = setting(300, help="simulated shoppers")
    items: int = setting(300, help="items in the simulated catalogue")
    sessions_per_minute: float = setting(20.0, help="shopping sessions starting per simulated minute")
    clickbait_share: float = setting(
        0.2,
        help="share of clickbait items (simulator --clickbait-share): more appealing than they are worth, "
        "so a shopper who opens one from a slate may leave; a myopic policy favours them, a long-run one "
        "should not",
    )
    clickbait_appeal: float = setting(1.0, help="utility clickbait items gain in every shopper's eyes")
    clickbait_exit_probability: float = setting(
        1.0,
        help="chance that a shopper leaves right after clicking a recommended clickbait item (1: a "
        "disappointed shopper always leaves)",
    )
    tick_seconds: float = setting(30.0, help="simulated seconds per step of the loop")
    report_every_minutes: float = setting(20.0, help="simulated minutes per point of the report's curves")
    policies: str = setting(DEFAULT_POLICIES, help="A/B split of the shoppers (policy=share,...)")
    epsilon: float = setting(
        0.03,
        help="exploration of the DQN, bandit and popularity policies (the networks learn from the shoppers' "
        "own choices by default, which exploring does not add to, so it is kept low)",
    )
    epsilon_end: float | None = setting(
        None,
        help="the DQN's and the bandit's epsilon once their models have trained "
        "--exploration-decay-steps updates, reached linearly (actor --epsilon-end; unset: --epsilon)",
    )
    exploration_decay_steps: int = setting(
        4000,
        help="learner updates over which epsilon decays to --epsilon-end (actor --exploration-decay-steps)",
    )
    gamma: float = setting(0.8, help="discount of the DQN (the bandit's is 0)")
    learning_rate: float = setting(3e-3, help="Adam step size of the DQN and the bandit")
    q_item_table: bool = setting(
        False,
        help="the DQN's and the bandit's Q score items against a table of their own (learner --q-item-table)",
    )
    factored_q: bool = setting(
        True,
        help="the DQN's and the bandit's Q is factored into the immediate reward, the chance the session "
        "goes on (one bias per item) and the value of going on (learner --factored-q)",
    )
    reward_clip: float = setting(
        0.0,
        help="clip the DQN's and the bandit's rewards to [-C, C] (learner --reward-clip; 1: their Q "
        "counts clicks; 0: off)",
    )
    replay_ratio: float = setting(
        32.0,
        help="times each transition is replayed by the DQN and the bandit (logged transitions alone are "
        "about a tenth of all: 32 gives the updates that 4 gave over both sources)",
    )
    target_update_period: int = setting(200, help="updates between target network copies")
    sqn_weight: float = setting(
        1.0,
        help="weight of the next-item (SQN) loss of the DQN and the bandit; it trains every item's embedding",
    )
    serve_q_weight: float = setting(
        0.0,
        help="weight of (1 - gamma) Q(s, a), the value in rewards per step, in the score the DQN's and "
        "the bandit's published models rank by",
    )
    serve_next_item_weight: float = setting(
        1.0,
        help="weight of the next-item (SQN) head's logit in that score (learner --serve-next-item-weight); "
        "like SQN, the demo ranks by this supervised head",
    )
    serve_log_q_weight: float = setting(
        3.0,
        help="weight of log Q(s, a) added to the next-item logit in the DQN's published score (learner "
        "--serve-log-q-weight; the bandit's is --bandit-serve-log-q-weight): with --shown-slots clicked, "
        "rank by the chance a shopper picks an item times its value once picked, the value weighed 3 "
        "times (0: by the next-item head alone)",
    )
    bandit_serve_log_q_weight: float = setting(
        0.0,
        help="the bandit's own --serve-log-q-weight (default 0: it ranks by its next-item head alone, its "
        "best setting, so the DQN is held against the bandit at its best; the DQN's value ranks both alike)",
    )
    serve_q_floor: float = setting(
        0.01,
        help="with --serve-log-q-weight: Q below this counts as this (learner --serve-q-floor; a clicked "
        "item earns at least a click's reward, 1, so a floor of 1 treats any lower Q as noise)",
    )
    learn_from: str = setting(
        "logged,recommendation",
        help="transition sources the DQN and the bandit learn from (learner --sources): logged (each "
        "shopper's own interactions, clicks on slates included), recommendation (every shown slot, "
        "whose next-item label is the item shown, not chosen) or both",
    )
    split_losses: bool = setting(
        True,
        help="the DQN's and the bandit's next-item head learns only from logged transitions and Q only "
        "from shown slots (learner --split-losses)",
    )
    td_bootstrap: str = setting(
        "expected",
        help="the DQN's TD target values the next state at its best item (max) or under the next-item "
        "head's distribution of the shoppers' own choices (expected; learner --td-bootstrap)",
    )
    shown_slots: str = setting(
        "clicked",
        help="shown-slot transitions the DQN and the bandit learn from: all, or clicked (SlateQ's value of "
        "an item given it is clicked; learner --shown-slots)",
    )
    repeat_head: bool = setting(
        True,
        help="the DQN and the bandit also score the items of the shopper's recent window by a learned "
        "repeat score (learner --repeat-head; their models then rank by the next-item head with it)",
    )
    window: int = setting(
        50,
        help="recent interactions in each shopper's state (state-builder --window): the repeat head finds "
        "the items a shopper keeps coming back to in it",
    )
    seed: int = setting(7, help="seed of the simulated shop")
    seeds: str = setting(
        "",
        help="comma-separated seeds (e.g. 7,8,9): run the demo once per seed, each with its report in "
        "OUT/seed-N, and pool the groups' sessions over the runs into one table with 95%% intervals "
        "(OUT/pooled.html with a plot, and pooled.json; with --json printed instead): one 3-hour run "
        "cannot tell a 10%% lead from noise, several can come closer",
    )
    processes: bool = setting(
        False,
        help="run the state-builder, the actor and the three learners each as its own OS process, as in "
        "production (needs Kafka: --bootstrap-servers); this process plays the shoppers on a clock "
        "--speed times the wall clock and writes the report. The oracle group is left out: only the "
        "simulator knows the true preferences, and it is not in the actor's process",
    )
    speed: float = setting(
        20.0,
        help="with --processes: simulated seconds per wall-clock second (20: an hour in 3 minutes); "
        "faster, the services' own delay, in simulated time, grows until slates reach shoppers who "
        "have left (summary: slates_in_session_share)",
    )
    out: str = setting("out/demo", help="folder for report.html, the plots and summary.json")
    live: bool = setting(True, help="show the live view (only on a terminal)")
    compile_cache: str = setting(
        ".qrec/jax-cache",
        help="folder of JAX's persistent compilation cache, so reruns skip compiling ('' off)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_split(self.policies, SPLIT_SALT)
        if self.processes:
            if self.bootstrap_servers == "embedded":
                raise ConfigError(
                    "--processes runs every service as its own process, which talk over Kafka: pass "
                    f"--bootstrap-servers HOST:PORT, or '{LOCAL_KAFKA}' to start a broker from deploy/kafka"
                )
            if "oracle" in parse_split(self.process_policies, SPLIT_SALT).names:
                raise ConfigError(
                    "the oracle reads the simulator's hidden preferences, which only this process has: "
                    "leave oracle out of --policies with --processes"
                )
        if not self.speed > 0:
            raise ConfigError(f"speed must be > 0, got {self.speed}")
        for name, value in (("hours", self.hours), ("quick_hours", self.quick_hours)):
            if value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if not 0.0 <= self.gamma < 1.0:
            raise ConfigError(f"gamma must be in [0, 1), got {self.gamma}")
        parse_sources(self.learn_from)
        if self.shown_slots not in SHOWN_SLOTS:
            raise ConfigError(
                f"shown_slots must be one of {', '.join(SHOWN_SLOTS)}, got {self.shown_slots!r}"
            )
        if self.serve_next_item_weight != 0.0 and self.sqn_weight <= 0:
            raise ConfigError("serve_next_item_weight needs the next-item head: set sqn_weight > 0")
        if self.td_bootstrap not in TD_BOOTSTRAPS:
            raise ConfigError(f"td_bootstrap must be {' or '.join(TD_BOOTSTRAPS)}, got {self.td_bootstrap!r}")
        if self.bandit_serve_log_q_weight < 0:
            raise ConfigError(f"bandit_serve_log_q_weight must be >= 0, got {self.bandit_serve_log_q_weight}")
        if self.serve_log_q_weight == 0.0 and blends_into_the_repeat_head(
            self.repeat_head, self.serve_q_weight, self.serve_next_item_weight
        ):
            raise ConfigError(
                "the repeat head (on by default) cannot be blended into Q: rank by the next-item head "
                "alone (--serve-q-weight 0 --serve-next-item-weight 1, the default), by Q alone "
                "(--serve-next-item-weight 0), or blend without it (--no-repeat-head)"
            )
        if self.window < 1:
            raise ConfigError(f"window must be at least 1, got {self.window}")
        self.seed_list()
        # The rest of the DQN's and the bandit's settings (serve weights, floor, reward clip) are
        # checked where they are defined: by building the two learners' settings now.
        learner_config(self, gamma=self.gamma)
        learner_config(self, gamma=0.0, bandit=True)

    def seed_list(self) -> list[int]:
        """The seeds of --seeds ([] when unset); a ConfigError names a part that is not an integer."""
        seeds = []
        for part in self.seeds.split(","):
            if part.strip():
                try:
                    seeds.append(int(part))
                except ValueError:
                    raise ConfigError(f"seeds must be comma-separated integers, got {self.seeds!r}") from None
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must not repeat, got {self.seeds!r}")
        return seeds

    @property
    def process_policies(self) -> str:
        """The A/B split with --processes: the default one without its oracle group."""
        return DEFAULT_PROCESS_POLICIES if self.policies == DEFAULT_POLICIES else self.policies


@dataclass
class Window:
    """Counts of one report window, per policy group (the A/B arm a shopper is in)."""

    minute: float
    recommendations: Counter[str] = field(default_factory=Counter)
    clicks: Counter[str] = field(default_factory=Counter)
    purchases: Counter[str] = field(default_factory=Counter)
    reward: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    sessions: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # Recommendation reward per session id, per group: the spread behind reward per session.
    session_reward: defaultdict[str, defaultdict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    # Expected immediate reward (ShopperSimulator.slate_value) of the slates shown, and of the
    # oracle's slate for the same shopper at the same moment, summed over the slates shown.
    slate_value: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    oracle_slate_value: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    # Recommended slots holding a known item, and those holding clickbait.
    slots: Counter[str] = field(default_factory=Counter)
    clickbait_slots: Counter[str] = field(default_factory=Counter)
    events: int = 0
    transitions: int = 0
    updates: int = 0
    model_version: int = 0
    loss: float | None = None
    explored_share: float | None = None

    def clickbait_share(self, group: str) -> float | None:
        """The share of the group's recommended slots that held clickbait (None without slots)."""
        slots = self.slots[group]
        return self.clickbait_slots[group] / slots if slots else None


class DemoMetrics:
    """What the demo process exports: late-phase results and exposure, per policy group."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, ["policy"], registry=registry)

        self.gauges = {
            "ctr": gauge("qrec_demo_ctr_ratio", "Late-phase share of recommendations clicked"),
            "conversion": gauge(
                "qrec_demo_conversion_ratio", "Late-phase purchases from recommendations per recommendation"
            ),
            "reward_per_session": gauge(
                "qrec_demo_reward_per_session", "Late-phase recommendation reward per shopping session"
            ),
            "sessions": gauge("qrec_demo_sessions", "Late-phase shopping sessions of the group"),
            "slate_value_vs_oracle": gauge(
                "qrec_demo_slate_value_vs_oracle_ratio",
                "Late-phase expected immediate value of the slates shown over that of the oracle's "
                "slates for the same shoppers at the same moments",
            ),
            "coverage": gauge("qrec_exposure_coverage_ratio", "Share of the catalogue recommended"),
            "item_gini": gauge("qrec_exposure_item_gini", "Gini of recommendation exposure across items"),
            "brand_gini": gauge("qrec_exposure_brand_gini", "Gini of recommendation exposure across brands"),
            "popularity_bias": gauge(
                "qrec_exposure_popularity_bias",
                "Exposure-weighted mean popularity percentile of recommended items (0.5: none)",
            ),
        }

    def update(self, policies: dict[str, dict[str, Any]]) -> None:
        for policy, numbers in policies.items():
            for name, gauge in self.gauges.items():
                gauge.labels(policy).set(numbers[name])


@dataclass(frozen=True)
class ServiceNumbers:
    """What the services report at the end of a report window (cumulative)."""

    transitions: int = 0
    updates: int = 0
    model_version: int = 0
    loss: float | None = None
    explored_share: float | None = None


@dataclass(frozen=True)
class LearnerTotals:
    """What the learners did over the whole run, for the summary."""

    model_version: int
    updates: int
    bandit_updates: int
    tabular_updates: int


class ClosedLoop(abc.ABC):
    """The simulated shop and its books: each shopper's group, and what each group was shown and earned.

    Subclasses connect the shop to the services (in this process, or as separate processes): they
    move the shop one step (``_step``) and say what the services report (``service_numbers``,
    ``learner_totals``).
    """

    producer: Producer
    clickstream_topic: str = CLICKSTREAM

    def __init__(self, config: DemoConfig, policies: str) -> None:
        self.config = config
        hours = config.quick_hours if config.quick else config.hours
        self.duration_ms = int(hours * 3600 * 1000)
        shoppers = min(config.shoppers, 200) if config.quick else config.shoppers
        self.sim = ShopperSimulator(
            SimulatorConfig(
                num_items=config.items,
                num_users=shoppers,
                session_start_rate_per_minute=config.sessions_per_minute,
                clickbait_share=config.clickbait_share,
                clickbait_appeal=config.clickbait_appeal,
                clickbait_exit_probability=config.clickbait_exit_probability,
                seed=config.seed,
            )
        )
        self.split = parse_split(policies, SPLIT_SALT)
        self.registry = CollectorRegistry()  # the demo's own metrics
        self.metrics = DemoMetrics(self.registry)
        self.windows: list[Window] = []
        num_items = self.sim.config.num_items
        self.exposure: defaultdict[str, np.ndarray] = defaultdict(lambda: np.zeros((num_items,), np.int64))
        self.organic_views = np.zeros((num_items,), np.int64)  # (num_items,) popularity of the catalogue
        self.labels: Counter[str] = Counter()  # recommendations by the policy label they carry
        self.groups: dict[str, str] = {}
        # What the actor keeps each shopper from being shown (its mask_shown and mask_purchased), so
        # the oracle's slate a shown one is measured against leaves out the same items.
        self.last_slate: dict[str, list[str]] = {}
        self.purchased: defaultdict[str, set[str]] = defaultdict(set)
        self.events_total = 0
        self.started_wall = time.monotonic()

    @abc.abstractmethod
    def start(self) -> None:
        """Bring the services up (they are ready when this returns)."""

    def run(self, on_window: Any = None) -> None:
        """Run the shop for the configured time, closing a report window every report_every_minutes."""
        start = self.sim.config.start_time_ms
        end = start + self.duration_ms
        every = int(self.config.report_every_minutes * 60 * 1000)
        window = Window(minute=0.0)
        next_report = start + every
        now = start
        while now < end:
            now = self._step(now, end, window)
            if now >= next_report or now >= end:
                self._close(window, now, start)
                if on_window is not None:
                    on_window(self)
                window = Window(minute=(now - start) / 60_000)
                next_report += every

    @abc.abstractmethod
    def _step(self, now: int, end: int, window: Window) -> int:
        """Move the shop on from simulated time ``now`` (ms), booking into ``window``; the new time."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the services cleanly once the run is over (they publish what they learned last)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything, also after a failure."""

    @abc.abstractmethod
    def service_numbers(self) -> ServiceNumbers:
        """What the services report now (cumulative), for the report window being closed."""

    def run_details(self) -> dict[str, Any]:
        """How the services ran, for the summary."""
        return {"mode": "in-process"}

    @abc.abstractmethod
    def learner_totals(self) -> LearnerTotals:
        """What the learners did over the whole run."""

    def group_of(self, user_id: str) -> str:
        """The A/B group of a shopper (the policy the split assigns, whatever label it is served with)."""
        group = self.groups.get(user_id)
        if group is None:
            group = self.groups[user_id] = self.split.policy_for(user_id)
        return group

    def _send(self, events: list[ClickEvent], window: Window) -> None:
        for event in events:
            self.producer.send(self.clickstream_topic, event.user_id.encode(), encode(event))
            group = self.group_of(event.user_id)
            window.sessions[group].add(event.session_id)
            if event.event_type == "purchase" and event.item_id is not None:
                self.purchased[event.user_id].add(event.item_id)
            if event.rec_id is not None:
                window.reward[group] += REWARD_WEIGHTS.get(event.event_type, 0.0)
                window.session_reward[group][event.session_id] += REWARD_WEIGHTS.get(event.event_type, 0.0)
                window.purchases[group] += event.event_type == "purchase"
            elif event.event_type == "view" and event.item_id is not None:
                index = self.sim.item_index(event.item_id)
                if index is not None:
                    self.organic_views[index] += 1
        self.events_total += len(events)

    def _show(self, records: Iterable[Record], now_ms: int, window: Window) -> None:
        """Show each recommendation to its shopper and send the reaction to the clickstream."""
        # The actor decides a batch of slates at once, each keeping out the shopper's slate from
        # before the batch; so does the oracle slate each is measured against.
        slates: dict[str, list[str]] = {}
        clickbait = self.sim.catalogue.clickbait  # (num_items,) bool
        for record in records:
            rec = RECOMMENDATIONS.decode(record.value)
            if not isinstance(rec, Recommendation):
                continue
            group = self.group_of(rec.user_id)
            window.recommendations[group] += 1
            self.labels[rec.policy] += 1
            exposure = self.exposure[group]
            for item in rec.items:
                index = self.sim.item_index(item.item_id)
                if index is not None:
                    exposure[index] += 1
                    window.slots[group] += 1
                    window.clickbait_slots[group] += int(clickbait[index])
            shown = [slot.item_id for slot in rec.items]
            value, best = self._slate_values(rec.user_id, shown, now_ms)
            slates[rec.user_id] = shown
            before = self.sim.shown_total
            response = self.sim.respond(rec, now_ms)
            if self.sim.shown_total > before:  # it reached a shopper in session
                window.slate_value[group] += value
                window.oracle_slate_value[group] += best
            if any(e.event_type == "click" for e in response):
                window.clicks[group] += 1
            self._send(response, window)
        self.last_slate.update(slates)

    def _slate_values(self, user_id: str, shown: list[str], now_ms: int) -> tuple[float, float]:
        """The expected immediate reward of a slate, and of the oracle's slate for the same shopper
        now, leaving out what the actor leaves out for them (their previous slate and purchases)."""
        if self.sim.active_session_id(user_id) is None or not shown:
            return 0.0, 0.0
        blocked = [*self.last_slate.get(user_id, ()), *self.purchased.get(user_id, ())]
        k = min(len(shown), self.sim.config.num_items)
        best = self.sim.oracle_slate(user_id, k, now_ms, exclude=blocked)
        return self.sim.slate_value(user_id, shown, now_ms), self.sim.slate_value(user_id, best, now_ms)

    def _close(self, window: Window, now: int, start: int) -> None:
        window.minute = (now - start) / 60_000
        window.events = self.events_total
        numbers = self.service_numbers()
        window.transitions = numbers.transitions
        window.updates = numbers.updates
        window.model_version = numbers.model_version
        window.loss = numbers.loss if numbers.updates else None
        window.explored_share = numbers.explored_share
        self.windows.append(window)
        self.metrics.update(policy_results(self))


class Demo(ClosedLoop):
    """The shop wired to the services, all in this process, on one clock (reproducible for a seed)."""

    def __init__(self, config: DemoConfig, bus: Bus, workdir: Path) -> None:
        super().__init__(config, config.policies)
        self.bus = bus
        suffix = "" if config.bootstrap_servers == "embedded" else f"-{uuid.uuid4().hex[:6]}"
        ensure_topics(bus, 4)
        bus.create_topics([model_topic_spec(BANDIT_MODEL), model_topic_spec(TABULAR_MODEL)])
        common: dict[str, Any] = {"bootstrap_servers": config.bootstrap_servers, "create_topics": False}
        self.registries = {
            name: CollectorRegistry() for name in ("state_builder", "actor", "learner", "bandit", "tabular")
        }
        self.registries["demo"] = self.registry
        self.builder = StateBuilder(
            StateBuilderConfig(group_id=f"qrec-state-builder{suffix}", window=config.window, **common),
            bus,
            self.registries["state_builder"],
        )
        external = {"oracle": self._oracle} if "oracle" in self.split.names else None
        self.actor = Actor(
            ActorConfig(
                group_id=f"qrec-actor{suffix}",
                policies=config.policies,
                split_salt=SPLIT_SALT,
                epsilon=config.epsilon,
                epsilon_end=config.epsilon_end,
                exploration_decay_steps=config.exploration_decay_steps,
                seed=config.seed,
                # The shop's clock is simulated: a model swaps in at a simulated time, not when a
                # background compile happens to finish, so a seed gives the same run every time.
                background_compile=False,
                **common,
            ),
            bus,
            self.registries["actor"],
            external_policies=external,
        )

        def learner(name: str, gamma: float, model_topic: str) -> Learner:
            return Learner(
                learner_config(
                    config,
                    gamma=gamma,
                    bandit=name == "bandit",
                    group_id=f"qrec-{name}{suffix}",
                    model_topic=model_topic,
                    checkpoint_dir=str(workdir / name),
                    **common,
                ),
                bus,
                self.registries["bandit" if name == "bandit" else "learner"],
            )

        self.learner = learner("learner", config.gamma, self.actor.config.model_topic)
        self.bandit = (
            learner("bandit", 0.0, self.actor.config.bandit_model_topic)
            if "bandit" in self.split.names
            else None
        )
        self.tabular = (
            TabularLearner(
                tabular_config(config, model_topic=self.actor.config.tabular_model_topic, **common),
                bus,
                self.registries["tabular"],
            )
            if "tabular_q" in self.split.names
            else None
        )
        self.builder.consumer.subscribe(
            [self.builder.config.clickstream_topic, self.builder.config.recommendations_topic],
            on_assign=self.builder._on_assign,
            on_revoke=self.builder._on_revoke,
        )
        self.actor.consumer.subscribe([self.actor.config.user_state_topic])
        self.producer = bus.producer()
        self.recs = bus.consumer()
        parts = [
            TopicPartition(RECOMMENDATIONS_TOPIC, p) for p in range(bus.partitions_for(RECOMMENDATIONS_TOPIC))
        ]
        self.recs.assign(parts)
        self.recs.seek_to_end(parts)

    def start(self) -> None:
        self.actor.warm_up()

    def _oracle(self, state: UserState, blocked: list[str], k: int) -> list[str]:
        """The oracle policy: the simulator's myopic best slate for the shopper right now."""
        return self.sim.oracle_slate(state.user_id, k, state.timestamp, exclude=blocked)

    def service_numbers(self) -> ServiceNumbers:
        learner = self.registries["learner"]
        slots = _value(self.registries["actor"], "qrec_actor_slots_total")
        explored = _value(self.registries["actor"], "qrec_actor_explored_slots_total")
        return ServiceNumbers(
            transitions=int(_value(learner, "qrec_learner_transitions_total")),
            updates=int(_value(learner, "qrec_learner_updates_total")),
            model_version=self.learner.version,
            loss=_value(learner, "qrec_learner_loss"),
            explored_share=explored / slots if slots else None,
        )

    def learner_totals(self) -> LearnerTotals:
        return LearnerTotals(
            model_version=self.learner.version,
            updates=self.learner.trainer.step,
            bandit_updates=self.bandit.trainer.step if self.bandit is not None else 0,
            tabular_updates=self.tabular.learned if self.tabular is not None else 0,
        )

    def _pump(self) -> None:
        """Let every service drain what is waiting (bounded, so a tick always ends)."""
        for _ in range(50):
            moved = self.builder.poll_once(timeout_s=0.0) + self.actor.poll_once(timeout_s=0.0)
            if not moved:
                break
        for learner in (self.learner, self.bandit, self.tabular):
            if learner is not None:
                learner.poll_once(timeout_s=0.0)

    def _step(self, now: int, end: int, window: Window) -> int:
        """One tick of simulated time: the shop acts, every service drains, shoppers see their slates."""
        now += int(self.config.tick_seconds * 1000)
        self._send(self.sim.advance(now), window)
        self.producer.flush()
        self._pump()
        self._show(self.recs.poll(max_records=10_000, timeout_s=0.0), now, window)
        self.producer.flush()
        self._pump()
        return now

    def stop(self) -> None:
        for learner in (self.learner, self.bandit):
            if learner is not None and learner.trainer.step > learner.last_publish_step:
                learner.publish()

    def close(self) -> None:
        self.producer.flush()
        self.recs.close()
        for service in (self.builder, self.actor, self.learner, self.bandit, self.tabular):
            if service is not None:
                service.close()


def learner_config(
    config: DemoConfig, *, gamma: float, bandit: bool = False, **overrides: Any
) -> LearnerServiceConfig:
    """The settings of the demo's DQN learner (gamma = config.gamma) or its bandit (gamma 0, bandit)."""
    log_q_weight = config.bandit_serve_log_q_weight if bandit else config.serve_log_q_weight
    return LearnerServiceConfig(
        vocabulary_capacity=config.items + 500,
        embed_dim=32,
        hidden_sizes="128,128",
        batch_size=128,
        updates_per_call=8,
        min_replay_size=500,
        replay_ratio=config.replay_ratio,
        publish_every_steps=200,
        publish_every_seconds=1e9,
        replay_capacity=50_000,
        gamma=gamma,
        learning_rate=config.learning_rate,
        reward_clip=config.reward_clip,
        q_item_table=config.q_item_table,
        factored_q=config.factored_q,
        target_update_period=config.target_update_period,
        sqn_weight=config.sqn_weight,
        sources=config.learn_from,
        split_losses=config.split_losses,
        td_bootstrap=config.td_bootstrap,
        shown_slots=config.shown_slots,
        repeat_head=config.repeat_head,
        window=config.window,
        # Q sums discounted rewards, about 1 / (1 - gamma) steps' worth: in per-step units the
        # DQN's and the bandit's values weigh alike against the next-item logit.
        serve_q_weight=config.serve_q_weight * (1.0 - gamma),
        serve_next_item_weight=config.serve_next_item_weight,
        # log Q ranks alike at any scale: no per-step rescaling.
        serve_log_q_weight=log_q_weight,
        serve_q_floor=config.serve_q_floor,
        **overrides,
    )


def tabular_config(config: DemoConfig, **overrides: Any) -> TabularLearnerConfig:
    """The settings of the demo's tabular Q-learner."""
    return TabularLearnerConfig(epsilon=config.epsilon, publish_every_transitions=1000, **overrides)


def _value(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


def late_windows(demo: ClosedLoop) -> list[Window]:
    """The late phase: the second half of the report windows (all of them when there is one)."""
    return demo.windows[len(demo.windows) // 2 :]


def _results(windows: Iterable[Window], groups: Iterable[str]) -> dict[str, dict[str, float]]:
    windows = list(windows)
    results = {}
    for group in groups:
        recs = sum(w.recommendations[group] for w in windows)
        session_ids: set[str] = set().union(*(w.sessions[group] for w in windows)) if windows else set()
        sessions = len(session_ids)
        reward = sum(w.reward[group] for w in windows)
        per_session: defaultdict[str, float] = defaultdict(float)
        for w in windows:
            for session_id, value in w.session_reward[group].items():
                per_session[session_id] += value
        values = np.asarray([per_session.get(session_id, 0.0) for session_id in session_ids])  # (sessions,)
        oracle_value = sum(w.oracle_slate_value[group] for w in windows)
        results[group] = {
            "ctr": sum(w.clicks[group] for w in windows) / recs if recs else 0.0,
            "conversion": sum(w.purchases[group] for w in windows) / recs if recs else 0.0,
            "reward_per_session": reward / sessions if sessions else 0.0,
            # Standard error of that mean over the group's sessions (0 with fewer than two).
            "reward_per_session_se": float(values.std(ddof=1) / np.sqrt(sessions)) if sessions > 1 else 0.0,
            "sessions": sessions,
            "recommendations": recs,
            "reward": reward,
            "reward_per_recommendation": reward / recs if recs else 0.0,
            "slate_value_vs_oracle": (
                sum(w.slate_value[group] for w in windows) / oracle_value if oracle_value else 0.0
            ),
        }
    return results


def ratio_of_means(a: Mapping[str, Any], b: Mapping[str, Any]) -> float | None:
    """a's reward per session over b's (None when b's is 0)."""
    return a["reward_per_session"] / b["reward_per_session"] if b["reward_per_session"] else None


def ratio_interval(a: Mapping[str, Any], b: Mapping[str, Any], z: float = 1.96) -> list[float] | None:
    """Confidence interval [low, high] of a / b, reward per session, from each mean's standard error.

    The delta method for two independent means: se(a / b) = (a / b) sqrt((se_a / a)^2 + (se_b / b)^2).
    None when either mean is 0 (the relative errors are undefined).
    """
    mean_a, mean_b = a["reward_per_session"], b["reward_per_session"]
    if not mean_a or not mean_b:
        return None
    ratio = mean_a / mean_b
    relative = np.hypot(a["reward_per_session_se"] / mean_a, b["reward_per_session_se"] / mean_b)
    return [float(ratio - z * ratio * relative), float(ratio + z * ratio * relative)]


def dqn_ratios(
    policies: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, float | None], dict[str, list[float] | None]]:
    """The DQN's reward per session over each other group's, and each ratio's 95% interval, keyed
    ``dqn_over_<group>`` (both empty without a dqn group)."""
    comparison: dict[str, float | None] = {}
    intervals: dict[str, list[float] | None] = {}
    if "dqn" in policies:
        dqn = policies["dqn"]
        for name, numbers in policies.items():
            if name != "dqn":
                key = f"dqn_over_{name}"
                comparison[key] = ratio = ratio_of_means(dqn, numbers)
                intervals[key] = None if ratio is None else ratio_interval(dqn, numbers)
    return comparison, intervals


def policy_results(demo: ClosedLoop) -> dict[str, dict[str, Any]]:
    """Per policy group: late-phase ctr, conversion, reward per session, sessions, and exposure."""
    results: dict[str, dict[str, Any]] = dict(_results(late_windows(demo), demo.split.names))
    catalogue = demo.sim.catalogue
    for group, numbers in results.items():
        exposure = demo.exposure.get(group, np.zeros((len(catalogue.item_ids),), np.int64))
        report = exposure_report(exposure, catalogue.brand, demo.sim.config.num_brands, demo.organic_views)
        numbers.update(asdict(report))
        shown = int(exposure.sum())
        # Share of the group's recommended slots that went to clickbait (0 in a shop without any).
        numbers["clickbait_exposure"] = float(exposure[catalogue.clickbait].sum()) / shown if shown else 0.0
    return results


def summary(demo: ClosedLoop) -> dict[str, Any]:
    """The numbers a report shows, as plain data (the ``--json`` output)."""
    policies = policy_results(demo)
    whole_run = _results(demo.windows, demo.split.names)
    catalogue = demo.sim.catalogue
    everything = sum(demo.exposure.values(), np.zeros((len(catalogue.item_ids),), np.int64))
    late = late_windows(demo)
    comparison, intervals = dqn_ratios(policies)
    responses = demo.sim.stats().values()
    slates = sum(s["recommendations"] for s in responses)
    return {
        "simulated_hours": demo.duration_ms / 3_600_000,
        # Slates that reached their shopper while the session was still on (the others came too late).
        "slates_in_session_share": sum(s["shown"] for s in responses) / slates if slates else None,
        "late_phase_from_minute": late[0].minute - demo.config.report_every_minutes if late else 0.0,
        "events": demo.events_total,
        "wall_seconds": round(time.monotonic() - demo.started_wall, 1),
        **asdict(demo.learner_totals()),
        "run": demo.run_details(),
        "policies": policies,
        "reward_per_session_ratio": comparison,
        # 95% confidence interval of each ratio from the groups' standard errors (delta method): a
        # lead whose interval holds 1 is not evidence.
        "reward_per_session_ratio_ci95": intervals,
        "whole_run": whole_run,
        "recommendations_by_label": dict(sorted(demo.labels.items())),
        "exposure_all_policies": asdict(
            exposure_report(everything, catalogue.brand, demo.sim.config.num_brands, demo.organic_views)
        ),
        "windows": [
            {
                "minute": w.minute,
                "recommendations": dict(w.recommendations),
                "clicks": dict(w.clicks),
                "purchases": dict(w.purchases),
                "reward": dict(w.reward),
                "sessions": {group: len(ids) for group, ids in w.sessions.items()},
                "clickbait_share": {
                    group: share for group in w.slots if (share := w.clickbait_share(group)) is not None
                },
                "model_version": w.model_version,
                "loss": w.loss,
                "explored_share": w.explored_share,
                "events": w.events,
                "transitions": w.transitions,
                "updates": w.updates,
            }
            for w in demo.windows
        ],
    }


def live_table(demo: ClosedLoop) -> Table:
    """The live view: throughput, model and per-policy results of the late phase so far."""
    elapsed = max(1e-9, time.monotonic() - demo.started_wall)
    last = demo.windows[-1] if demo.windows else Window(minute=0)
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"simulated {last.minute / 60:.1f} h",
        f"events {demo.events_total:,} ({demo.events_total / elapsed:,.0f}/s)",
        f"transitions {last.transitions:,} ({last.transitions / elapsed:,.0f}/s)",
        f"updates {last.updates:,} ({last.updates / elapsed:,.1f}/s)",
        f"model v{last.model_version}",
    )
    table = Table(title="policies on the same simulated shoppers (late phase so far)")
    for column in (
        "policy",
        "sessions",
        "recommendations",
        "CTR",
        "conversion",
        "reward / session (± s.e.)",
        "slate value / oracle",
        "clickbait slots",
        "coverage",
    ):
        table.add_column(column, justify="right" if column != "policy" else "left")
    table.add_column("reward trend", justify="left", no_wrap=True)  # per report window, oldest first
    recent = demo.windows[-LIVE_WINDOWS:]
    per_window = {
        policy: [w.reward[policy] / len(w.sessions[policy]) if w.sessions[policy] else None for w in recent]
        for policy in demo.split.names
    }
    top = max((v for values in per_window.values() for v in values if v is not None), default=0.0)
    for policy, numbers in policy_results(demo).items():
        table.add_row(
            policy,
            f"{numbers['sessions']:,}",
            f"{numbers['recommendations']:,}",
            f"{numbers['ctr']:.1%}",
            f"{numbers['conversion']:.2%}",
            f"{numbers['reward_per_session']:.2f} ± {numbers['reward_per_session_se']:.2f}",
            f"{numbers['slate_value_vs_oracle']:.2f}",
            f"{numbers['clickbait_exposure']:.1%}",
            f"{numbers['coverage']:.1%}",
            sparkline(per_window.get(policy, []), top),
        )
    outer = Table.grid()
    outer.add_row(head)
    outer.add_row(table)
    return outer


def sparkline(values: list[float | None], top: float) -> str:
    """One block character per value, its height relative to ``top`` (a space where there is none)."""
    blocks = "▁▂▃▄▅▆▇█"
    return "".join(
        " " if v is None else blocks[min(7, round(v / top * 7))] if top > 0 else blocks[0] for v in values
    )


# The reports' stylesheet (report.html, pooled.html).
REPORT_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
    "td:first-child{text-align:left}img{max-width:100%}figure{margin:1.5em 0}"
)


def write_report(demo: ClosedLoop, out: Path) -> dict[str, Any]:
    """summary.json, the PNG plots and a self-contained report.html in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    data = summary(demo)
    (out / "summary.json").write_text(json.dumps(data, indent=2))
    hours = [w.minute / 60 for w in demo.windows]
    policies = list(demo.split.names)
    plots: dict[str, str] = {}

    def save(name: str, title: str, figure: Any) -> None:
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        plots[name] = title

    for metric, label, name in (
        ("ctr", "click-through rate", "ctr_by_policy.png"),
        ("reward", "reward per session", "reward_by_policy.png"),
    ):
        figure, axis = plt.subplots(figsize=(7, 3.6))
        for policy in policies:
            values = []
            for w in demo.windows:
                if metric == "ctr":
                    recs = w.recommendations[policy]
                    values.append(w.clicks[policy] / recs if recs else float("nan"))
                else:
                    sessions = len(w.sessions[policy])
                    values.append(w.reward[policy] / sessions if sessions else float("nan"))
            axis.plot(hours, values, marker="o", label=policy)
        axis.set_xlabel("simulated hours")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
        save(name, f"{label} by policy", figure)
    if demo.sim.config.clickbait_share > 0:
        figure, axis = plt.subplots(figsize=(7, 3.6))
        for policy in policies:
            shares = [np.nan if (share := w.clickbait_share(policy)) is None else share for w in demo.windows]
            axis.plot(hours, shares, marker="o", label=policy)
        axis.axhline(demo.sim.config.clickbait_share, color="tab:gray", linestyle="--", label="catalogue")
        axis.set_xlabel("simulated hours")
        axis.set_ylabel("clickbait share of slots")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
        save("clickbait_by_policy.png", "clickbait share of recommended slots by policy", figure)
    figure, axis = plt.subplots(figsize=(7, 3.6))
    losses = [(h, w.loss) for h, w in zip(hours, demo.windows, strict=True) if w.loss is not None]
    if losses:
        axis.plot([h for h, _ in losses], [v for _, v in losses], marker="o", color="tab:red", label="loss")
    axis.set_xlabel("simulated hours")
    axis.set_ylabel("training loss (DQN)")
    twin = axis.twinx()
    twin.step(
        hours, [w.model_version for w in demo.windows], color="tab:gray", where="post", label="model version"
    )
    twin.set_ylabel("model version")
    axis.grid(alpha=0.3)
    save("learning_curve.png", "DQN learner: loss and published model versions", figure)
    figure, axis = plt.subplots(figsize=(7, 3.6))
    axis.plot(hours, [w.explored_share or 0.0 for w in demo.windows], marker="o")
    axis.set_xlabel("simulated hours")
    axis.set_ylabel("share of explored slots")
    axis.grid(alpha=0.3)
    save("exploration.png", "exploration rate (cumulative, all policies)", figure)
    figure, axis = plt.subplots(figsize=(7, 3.6))
    for policy in policies:
        counts = np.sort(demo.exposure.get(policy, np.zeros(1, np.int64)))[::-1]
        counts = counts[counts > 0]
        if counts.size:
            axis.plot(np.arange(1, counts.size + 1), counts, label=policy)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("item rank")
    axis.set_ylabel("times recommended")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    save(
        "exposure.png", f"item exposure by policy ({len(demo.sim.catalogue.item_ids)} items on sale)", figure
    )

    rows = "".join(
        f"<tr><td>{p}</td><td>{v['sessions']:,}</td><td>{v['recommendations']:,}</td><td>{v['ctr']:.1%}</td>"
        f"<td>{v['conversion']:.2%}</td>"
        f"<td>{v['reward_per_session']:.2f} ± {v['reward_per_session_se']:.2f}</td>"
        f"<td>{v['slate_value_vs_oracle']:.2f}</td><td>{v['clickbait_exposure']:.1%}</td></tr>"
        for p, v in data["policies"].items()
    )
    fairness = "".join(
        f"<tr><td>{p}</td><td>{v['coverage']:.1%}</td><td>{v['item_gini']:.3f}</td>"
        f"<td>{v['brand_gini']:.3f}</td><td>{v['popularity_bias']:.3f}</td></tr>"
        for p, v in data["policies"].items()
    )
    images = "".join(
        f'<figure><img alt="{title}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}"><figcaption>{title}</figcaption></figure>'
        for name, title in plots.items()
    )
    intervals = data["reward_per_session_ratio_ci95"]
    ratios = ", ".join(
        f"{name.removeprefix('dqn_over_')} {value:.2f}x"
        + (f" (95% CI {intervals[name][0]:.2f}-{intervals[name][1]:.2f})" if intervals.get(name) else "")
        for name, value in data["reward_per_session_ratio"].items()
        if value is not None
    )
    run = data["run"]
    how = (
        "The state-builder, the actor and the learners ran in this process, on one simulated clock."
        if run["mode"] == "in-process"
        else "Each service ran as its own OS process on Kafka ("
        + ", ".join(f"{name} pid {p['pid']}" for name, p in run["processes"].items())
        + f"), the shop's clock at {run['speed']:g} times the wall clock; there is no oracle group, "
        "since only the simulator knows the shoppers' true preferences."
    )
    sim_config = demo.sim.config
    clickbait = (
        f"{sim_config.clickbait_share:.0%} of the catalogue here, a click ending the session with chance "
        f"{sim_config.clickbait_exit_probability:g}"
        if sim_config.clickbait_share > 0
        else "none in this shop"
    )
    share = data["slates_in_session_share"]
    in_session = (
        f"{share:.0%} of the slates reached their shopper while the session was still on (a slate that "
        "comes after the shopper left earns nothing)."
        if share is not None
        else ""
    )
    html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qrec demo report</title>
<style>{REPORT_STYLE}</style></head><body>
<h1>qrec closed-loop demo</h1>
<p>{data["simulated_hours"]:.1f} simulated hours, {data["events"]:,} events, {data["updates"]:,} DQN
updates, model version {data["model_version"]}, {data["wall_seconds"]} s of wall time. Shoppers are split
between policies by a stable hash of their id, so every policy faces the same simulated population, and
every learner learns from every group's transitions. Numbers are from the late phase (from simulated
minute {data["late_phase_from_minute"]:.0f}): reward counts what recommendations earned in a session
(click 1, favorite 2, add to cart 3, purchase 10, later purchases of carted items included).
Slate value / oracle: the expected immediate reward of the slates shown, by the simulator's true
preferences and reaction model, over that of the oracle's slates for the same shoppers at the same
moments; it does not
depend on the shoppers' random draws, so it ranks the policies' choices with far less noise than
reward per session, but it is myopic: what a click changes later is not in it. Clickbait slots:
the share of a policy's recommended slots that went to clickbait items (clicked more than they
are worth; a shopper who clicks a recommended one may leave), {clickbait}.
{how}</p>
<p>DQN reward per session relative to the others: {ratios or "n/a"}. {in_session}</p>
<table><tr><th>policy</th><th>sessions</th><th>recommendations</th><th>CTR</th><th>conversion</th>
<th>reward / session (± standard error)</th><th>slate value / oracle</th><th>clickbait slots</th></tr>
{rows}</table>
<h2>Exposure and fairness</h2>
<p>Coverage: share of the catalogue recommended. Gini: inequality of exposure across items and across
brands (0 equal, 1 all on one). Popularity bias: exposure-weighted mean popularity percentile of what was
recommended, by organic views (0.5 is the catalogue's own mean).</p>
<table><tr><th>policy</th><th>coverage</th><th>item Gini</th><th>brand Gini</th><th>popularity bias</th></tr>
{fairness}</table>
{images}
</body></html>
"""
    (out / "report.html").write_text(html)
    return data


def pool_runs(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One table from several runs' summaries: per group, reward per session over all their sessions
    and its standard error, as if the runs' sessions were one sample (the spread between runs' means
    included), and the DQN's ratios with their 95% intervals."""
    policies: dict[str, dict[str, Any]] = {}
    for group in summaries[0]["policies"]:
        runs = [run["policies"][group] for run in summaries if group in run["policies"]]
        counts = np.asarray([run["sessions"] for run in runs], np.float64)  # (R,)
        means = np.asarray([run["reward_per_session"] for run in runs], np.float64)  # (R,)
        # Each run's sample variance back from its standard error: se^2 * n.
        variances = np.asarray([run["reward_per_session_se"] for run in runs]) ** 2 * counts  # (R,)
        total = counts.sum()
        mean = float((counts * means).sum() / total) if total else 0.0
        squares = ((counts - 1).clip(min=0) * variances).sum() + (counts * (means - mean) ** 2).sum()
        se = float(np.sqrt(squares / (total - 1) / total)) if total > 1 else 0.0
        policies[group] = {
            "reward_per_session": mean,
            "reward_per_session_se": se,
            "sessions": int(total),
            "per_run": [float(m) for m in means],
        }
    comparison, intervals = dqn_ratios(policies)
    return {
        "policies": policies,
        "reward_per_session_ratio": comparison,
        "reward_per_session_ratio_ci95": intervals,
    }


def pooled_table(pooled: dict[str, Any], seeds: list[int]) -> Table:
    """The pooled results as a terminal table: reward per session ± standard error, per run, ratio."""
    table = Table(title=f"pooled over seeds {', '.join(map(str, seeds))} (late phase of each run)")
    for column in ("policy", "sessions", "reward / session", "per run", "dqn / policy (95% interval)"):
        table.add_column(column, justify="left" if column in ("policy", "per run") else "right")
    for policy, numbers in pooled["policies"].items():
        table.add_row(
            policy,
            f"{numbers['sessions']:,}",
            f"{numbers['reward_per_session']:.2f} ± {numbers['reward_per_session_se']:.2f}",
            " ".join(f"{value:.2f}" for value in numbers["per_run"]),
            ratio_text(pooled, policy),
        )
    return table


def ratio_text(pooled: Mapping[str, Any], policy: str) -> str:
    """'1.03 (0.90-1.17)': the DQN's reward per session over the policy's, with its 95% interval
    ('' for the DQN itself)."""
    ratio = pooled["reward_per_session_ratio"].get(f"dqn_over_{policy}")
    interval = pooled["reward_per_session_ratio_ci95"].get(f"dqn_over_{policy}")
    if ratio is None:
        return ""
    return f"{ratio:.2f}" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "")


def write_pooled_report(pooled: dict[str, Any], out: Path) -> None:
    """pooled.json, pooled.png (reward per session by policy: pooled mean with its 95% interval, and
    each run's figure as a dot) and a self-contained pooled.html in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "pooled.json").write_text(json.dumps(pooled, indent=2))
    names = list(pooled["policies"])
    numbers = [pooled["policies"][name] for name in names]
    figure, axis = plt.subplots(figsize=(7, 3.6))
    positions = np.arange(len(names))
    axis.bar(
        positions,
        [n["reward_per_session"] for n in numbers],
        yerr=[1.96 * n["reward_per_session_se"] for n in numbers],
        capsize=4,
        color="#9ecae1",
        label="pooled, 95% interval",
    )
    for position, n in zip(positions, numbers, strict=True):
        axis.plot([position] * len(n["per_run"]), n["per_run"], "o", color="#08519c", markersize=4)
    axis.plot([], [], "o", color="#08519c", markersize=4, label="each run")
    axis.set_xticks(positions, names)
    axis.set_ylabel("reward per session (late phase)")
    axis.legend()
    figure.suptitle(f"pooled over seeds {', '.join(map(str, pooled['seeds']))}")
    figure.tight_layout()
    figure.savefig(out / "pooled.png", dpi=100)
    plt.close(figure)
    rows = "".join(
        f"<tr><td>{name}</td><td>{n['sessions']:,}</td><td>{n['reward_per_session']:.2f} ± "
        f"{n['reward_per_session_se']:.2f}</td><td>{' '.join(f'{v:.2f}' for v in n['per_run'])}</td>"
        f"<td>{ratio_text(pooled, name)}</td></tr>"
        for name, n in zip(names, numbers, strict=True)
    )
    image = base64.b64encode((out / "pooled.png").read_bytes()).decode()
    links = " ".join(f'<a href="seed-{seed}/report.html">seed {seed}</a>' for seed in pooled["seeds"])
    seeds = ", ".join(map(str, pooled["seeds"]))
    (out / "pooled.html").write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qrec demo, pooled over seeds</title>
<style>{REPORT_STYLE}</style></head><body>
<h1>qrec closed-loop demo, pooled over seeds {seeds}</h1>
<p>Each seed is its own simulated shop and population. Every group's late-phase sessions of all runs are
pooled into one sample: reward per session with its standard error (the spread between the runs' means
included), and the DQN's reward per session over each group's with a 95% interval. A lead whose interval
holds 1 is not evidence. Each run's report: {links}.</p>
<table><tr><th>policy</th><th>sessions</th><th>reward / session (± standard error)</th><th>per run</th>
<th>dqn / policy (95% interval)</th></tr>{rows}</table>
<figure><img alt="reward per session, pooled" src="data:image/png;base64,{image}"></figure>
</body></html>
""")


def run_demo(config: DemoConfig, console: Console) -> dict[str, Any]:
    """Run the loop and write the report (or, with --json, print the summary); returns the summary.

    With --seeds, one run per seed (reports in OUT/seed-N), then the pooled table: printed as JSON
    with --json, else shown and written to OUT/pooled.html, .png and .json; returns the pooled summary.
    """
    seeds = config.seed_list()
    if not seeds:
        return _run_one(config, console)
    summaries = []
    for number, seed in enumerate(seeds, 1):
        if not config.json:
            console.rule(f"run {number} of {len(seeds)}: seed {seed}")
        run_config = replace(config, seed=seed, seeds="", out=str(Path(config.out) / f"seed-{seed}"))
        summaries.append(_run_one(run_config, console, print_json=False))
    pooled = {"seeds": seeds, **pool_runs(summaries), "runs": summaries}
    if config.json:
        sys.stdout.write(json.dumps(pooled) + "\n")
        sys.stdout.flush()
    else:
        write_pooled_report(pooled, Path(config.out))
        console.print(pooled_table(pooled, seeds))
        console.print(
            f"pooled: {Path(config.out) / 'pooled.html'} (pooled.png and pooled.json beside it); "
            f"each run's report in {Path(config.out)}/seed-N"
        )
    return pooled


def _run_one(config: DemoConfig, console: Console, *, print_json: bool = True) -> dict[str, Any]:
    """One run of the loop: the report (or, with --json, the summary on stdout unless print_json is
    False); returns the summary."""
    if config.compile_cache:
        import jax

        # Compiling the learners' and the actor's programs is most of a short run's time.
        jax.config.update("jax_compilation_cache_dir", str(Path(config.compile_cache).resolve()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    quiet = config.json
    if quiet:
        console = Console(file=sys.stderr, quiet=True)
    where = "the embedded bus" if config.bootstrap_servers == "embedded" else "Kafka"
    with tempfile.TemporaryDirectory(prefix="qrec-demo-") as workdir, contextlib.ExitStack() as cleanup:
        if config.bootstrap_servers == LOCAL_KAFKA:
            from services.local_kafka import LocalKafka

            console.print("starting Apache Kafka from deploy/kafka (the first start fetches the jars) ...")
            kafka = LocalKafka(Path(workdir) / "kafka", owner_pid=os.getpid()).start()
            cleanup.callback(kafka.stop)
            config = replace(config, bootstrap_servers=kafka.bootstrap_servers)
            console.print(f"Kafka is up at {kafka.bootstrap_servers}")
        bus = make_bus(config)
        cleanup.callback(bus.close)  # after the demo's own close below, before Kafka stops
        demo: ClosedLoop
        if config.processes:
            from services.demo_processes import ProcessDemo

            console.print(
                f"qrec demo on {where}: starting the state-builder, actor and learners as separate "
                f"processes (logs in {Path(config.out) / 'logs'}; compiling the models takes a moment) ..."
            )
            demo = ProcessDemo(config, bus, Path(workdir), say=console.print)
        else:
            console.print(
                f"qrec demo on {where}: starting the state-builder, learners and actor "
                "(compiling the models takes a moment) ..."
            )
            demo = Demo(config, bus, Path(workdir))
        if config.metrics_port is not None:
            server = serve_metrics(demo.registry, config.metrics_port, config.metrics_host)
            console.print(f"metrics: {server.url}")
        try:
            demo.start()
            if config.live and console.is_terminal and not quiet:
                with Live(live_table(demo), console=console, refresh_per_second=4) as live:
                    demo.run(lambda d: live.update(Group(live_table(d))))
            else:
                demo.run(
                    lambda d: console.print(
                        f"simulated {d.windows[-1].minute / 60:.1f} h: {d.events_total:,} events, "
                        f"model v{d.windows[-1].model_version}, updates {d.windows[-1].updates:,}"
                    )
                )
            demo.stop()
            data = summary(demo) if quiet else write_report(demo, Path(config.out))
        finally:
            demo.close()
    if quiet:
        if print_json:
            sys.stdout.write(json.dumps(data) + "\n")
            sys.stdout.flush()
        return data
    console.print(live_table(demo))
    console.print(f"report: {Path(config.out) / 'report.html'} (plots and summary.json beside it)")
    return data

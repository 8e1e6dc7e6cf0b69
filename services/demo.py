"""`qrec demo`: the whole loop, closed by the shopper simulator, with a live view and a report.

Simulated shoppers browse; their events go to the clickstream; the state-builder, the actor and the
learner run as they do in production (here in one process, on the embedded bus by default, or on
Kafka with --bootstrap-servers); every recommendation is shown to the simulated shopper, whose
reaction goes back into the clickstream. Traffic is split by a stable user hash between the DQN and
the popularity and random baselines, so the policies are compared on the same shoppers. Time is
simulated: the loop advances the shop's clock in ticks and lets every service drain between ticks,
so a run is reproducible for a given seed.
"""

from __future__ import annotations

import base64
import json
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from schemas.codec import RECOMMENDATIONS, encode
from schemas.messages import ClickEvent, Recommendation
from services.actor.config import ActorConfig
from services.actor.service import Actor
from services.bus.base import Bus, TopicPartition
from services.config import BusConfig, make_bus, register, setting
from services.learner.config import LearnerServiceConfig
from services.learner.service import Learner
from services.replay.service import ensure_topics
from services.simulator import REWARD_WEIGHTS, ShopperSimulator, SimulatorConfig
from services.state_builder.config import StateBuilderConfig
from services.state_builder.service import StateBuilder
from services.topics import CLICKSTREAM
from services.topics import RECOMMENDATIONS as RECOMMENDATIONS_TOPIC


@register("demo")
@dataclass(frozen=True, kw_only=True)
class DemoConfig(BusConfig):
    """The closed-loop demo."""

    hours: float = setting(6.0, help="simulated shop hours to run")
    quick: bool = setting(False, help="a short run (one simulated hour, fewer shoppers): under a minute")
    shoppers: int = setting(500, help="simulated shoppers")
    items: int = setting(1000, help="items in the simulated catalogue")
    sessions_per_minute: float = setting(20.0, help="shopping sessions starting per simulated minute")
    tick_seconds: float = setting(30.0, help="simulated seconds per step of the loop")
    report_every_minutes: float = setting(20.0, help="simulated minutes per point of the report's curves")
    policies: str = setting("dqn=0.5,popularity=0.25,random=0.25", help="A/B split of the shoppers")
    epsilon: float = setting(0.1, help="exploration of the DQN and popularity policies")
    seed: int = setting(7, help="seed of the simulated shop")
    out: str = setting("out/demo", help="folder for report.html, the plots and summary.json")
    live: bool = setting(True, help="show the live view (only on a terminal)")


@dataclass
class Window:
    """Counts of one report window, per policy."""

    minute: float
    recommendations: Counter[str] = field(default_factory=Counter)
    clicks: Counter[str] = field(default_factory=Counter)
    reward: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    events: int = 0
    transitions: int = 0
    updates: int = 0
    model_version: int = 0
    loss: float | None = None
    explored_share: float | None = None


def _reward(event: ClickEvent) -> float:
    return REWARD_WEIGHTS.get(event.event_type, 0.0)


class Demo:
    """Wires the simulator to the services and records what happens."""

    def __init__(self, config: DemoConfig, bus: Bus, workdir: Path) -> None:
        self.config = config
        self.bus = bus
        hours = 1.0 if config.quick else config.hours
        self.duration_ms = int(hours * 3600 * 1000)
        shoppers = min(config.shoppers, 200) if config.quick else config.shoppers
        self.sim = ShopperSimulator(
            SimulatorConfig(
                num_items=config.items,
                num_users=shoppers,
                session_start_rate_per_minute=config.sessions_per_minute,
                seed=config.seed,
            )
        )
        suffix = "" if config.bootstrap_servers == "embedded" else f"-{uuid.uuid4().hex[:6]}"
        ensure_topics(bus, 4)
        common: dict[str, Any] = {"bootstrap_servers": config.bootstrap_servers, "create_topics": False}
        self.registries = {name: CollectorRegistry() for name in ("state_builder", "actor", "learner")}
        self.builder = StateBuilder(
            StateBuilderConfig(group_id=f"qrec-state-builder{suffix}", **common),
            bus,
            self.registries["state_builder"],
        )
        self.actor = Actor(
            ActorConfig(
                group_id=f"qrec-actor{suffix}",
                policies=config.policies,
                epsilon=config.epsilon,
                seed=config.seed,
                **common,
            ),
            bus,
            self.registries["actor"],
        )
        self.learner = Learner(
            LearnerServiceConfig(
                group_id=f"qrec-learner{suffix}",
                checkpoint_dir=str(workdir / "learner"),
                vocabulary_capacity=config.items + 500,
                embed_dim=32,
                hidden_sizes="128,128",
                batch_size=128,
                updates_per_call=8,
                min_replay_size=500,
                replay_ratio=2.0,
                publish_every_steps=200,
                publish_every_seconds=1e9,
                replay_capacity=50_000,
                gamma=0.8,
                **common,
            ),
            bus,
            self.registries["learner"],
        )
        self.builder.consumer.subscribe(
            [self.builder.config.clickstream_topic, self.builder.config.recommendations_topic],
            on_assign=self.builder._on_assign,
            on_revoke=self.builder._on_revoke,
        )
        self.actor.warm_up()
        self.actor.consumer.subscribe([self.actor.config.user_state_topic])
        self.producer = bus.producer()
        self.recs = bus.consumer()
        parts = [
            TopicPartition(RECOMMENDATIONS_TOPIC, p) for p in range(bus.partitions_for(RECOMMENDATIONS_TOPIC))
        ]
        self.recs.assign(parts)
        self.recs.seek_to_end(parts)
        self.windows: list[Window] = []
        self.exposure: Counter[str] = Counter()
        self.totals_by_policy: dict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.events_total = 0
        self.started_wall = time.monotonic()

    def _send(self, events: list[ClickEvent]) -> None:
        for event in events:
            self.producer.send(CLICKSTREAM, event.user_id.encode(), encode(event))
        self.events_total += len(events)

    def _pump(self) -> None:
        """Let every service drain what is waiting (bounded, so a tick always ends)."""
        for _ in range(50):
            moved = self.builder.poll_once(timeout_s=0.0) + self.actor.poll_once(timeout_s=0.0)
            if not moved:
                break
        self.learner.poll_once(timeout_s=0.0)

    def _show_recommendations(self, now_ms: int, window: Window) -> None:
        for record in self.recs.poll(max_records=10_000, timeout_s=0.0):
            rec = RECOMMENDATIONS.decode(record.value)
            if not isinstance(rec, Recommendation):
                continue
            policy = rec.policy
            window.recommendations[policy] += 1
            self.totals_by_policy[policy]["recommendations"] += 1
            self.exposure.update(item.item_id for item in rec.items)
            response = self.sim.respond(rec, now_ms)
            if any(e.event_type == "click" for e in response):
                window.clicks[policy] += 1
                self.totals_by_policy[policy]["clicks"] += 1
            reward = sum(_reward(e) for e in response)
            window.reward[policy] += reward
            self.totals_by_policy[policy]["reward"] += reward
            self._send(response)

    def run(self, on_window: Any = None) -> None:
        start = self.sim.config.start_time_ms
        tick = int(self.config.tick_seconds * 1000)
        every = int(self.config.report_every_minutes * 60 * 1000)
        window = Window(minute=0.0)
        next_report = start + every
        now = start
        while now < start + self.duration_ms:
            now += tick
            self._send(self.sim.advance(now))
            self.producer.flush()
            self._pump()
            self._show_recommendations(now, window)
            self.producer.flush()
            self._pump()
            if now >= next_report:
                self._close(window, now, start)
                if on_window is not None:
                    on_window(self)
                window = Window(minute=(now - start) / 60_000)
                next_report += every
        if self.learner.trainer.step > self.learner.last_publish_step:
            self.learner.publish()

    def _close(self, window: Window, now: int, start: int) -> None:
        window.minute = (now - start) / 60_000
        window.events = self.events_total
        window.transitions = int(_value(self.registries["learner"], "qrec_learner_transitions_total"))
        window.updates = int(_value(self.registries["learner"], "qrec_learner_updates_total"))
        window.model_version = self.learner.version
        loss = _value(self.registries["learner"], "qrec_learner_loss")
        window.loss = loss if window.updates else None
        slots = _value(self.registries["actor"], "qrec_actor_slots_total")
        explored = _value(self.registries["actor"], "qrec_actor_explored_slots_total")
        window.explored_share = explored / slots if slots else None
        self.windows.append(window)

    def close(self) -> None:
        self.producer.flush()
        self.recs.close()
        for service in (self.builder, self.actor, self.learner):
            service.close()


def _value(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


def live_table(demo: Demo) -> Table:
    """The live view: throughput, model and per-policy results so far."""
    elapsed = max(1e-9, time.monotonic() - demo.started_wall)
    last = demo.windows[-1] if demo.windows else Window(minute=0)
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"simulated {last.minute / 60:.1f} h",
        f"events {demo.events_total:,} ({demo.events_total / elapsed:,.0f}/s)",
        f"transitions {last.transitions:,}",
        f"updates {last.updates:,}",
        f"model v{last.model_version}",
    )
    table = Table(title="policies on the same simulated shoppers (so far)")
    for column in (
        "policy",
        "recommendations",
        "CTR",
        "reward / rec",
        "CTR last window",
        "reward / rec last",
    ):
        table.add_column(column, justify="right" if column != "policy" else "left")
    for policy in sorted(demo.totals_by_policy):
        totals = demo.totals_by_policy[policy]
        recs = totals["recommendations"] or 1
        lw = last.recommendations[policy] or 1
        table.add_row(
            policy,
            f"{int(totals['recommendations']):,}",
            f"{totals['clicks'] / recs:.1%}",
            f"{totals['reward'] / recs:.3f}",
            f"{last.clicks[policy] / lw:.1%}",
            f"{last.reward[policy] / lw:.3f}",
        )
    outer = Table.grid()
    outer.add_row(head)
    outer.add_row(table)
    return outer


def summary(demo: Demo) -> dict[str, Any]:
    """The numbers a report shows, as plain data."""
    policies = {}
    for policy, totals in sorted(demo.totals_by_policy.items()):
        recs = totals["recommendations"] or 1
        policies[policy] = {
            "recommendations": int(totals["recommendations"]),
            "ctr": totals["clicks"] / recs,
            "reward_per_recommendation": totals["reward"] / recs,
            "reward": totals["reward"],
        }
    late = demo.windows[len(demo.windows) // 2 :]
    long_run = {}
    for policy in demo.totals_by_policy:
        recs = sum(w.recommendations[policy] for w in late) or 1
        long_run[policy] = sum(w.reward[policy] for w in late) / recs
    counts = sorted(demo.exposure.values(), reverse=True)
    top_share = sum(counts[: max(1, len(counts) // 10)]) / max(1, sum(counts))
    return {
        "simulated_hours": demo.duration_ms / 3_600_000,
        "events": demo.events_total,
        "wall_seconds": round(time.monotonic() - demo.started_wall, 1),
        "model_version": demo.learner.version,
        "updates": demo.learner.trainer.step,
        "policies": policies,
        "reward_per_recommendation_second_half": long_run,
        "items_recommended": len(demo.exposure),
        "exposure_share_of_top_10_percent_items": top_share,
        "windows": [
            {
                "minute": w.minute,
                "recommendations": dict(w.recommendations),
                "clicks": dict(w.clicks),
                "reward": dict(w.reward),
                "model_version": w.model_version,
                "loss": w.loss,
                "explored_share": w.explored_share,
                "updates": w.updates,
            }
            for w in demo.windows
        ],
    }


def write_report(demo: Demo, out: Path) -> dict[str, Any]:
    """summary.json, the PNG plots and a self-contained report.html in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    data = summary(demo)
    (out / "summary.json").write_text(json.dumps(data, indent=2))
    hours = [w.minute / 60 for w in demo.windows]
    policies = sorted(demo.totals_by_policy)
    plots: dict[str, str] = {}

    def save(name: str, title: str, figure: Any) -> None:
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        plots[name] = title

    for metric, label, name in (
        ("ctr", "click-through rate", "ctr_by_policy.png"),
        ("reward", "reward per recommendation", "reward_by_policy.png"),
    ):
        figure, axis = plt.subplots(figsize=(7, 3.6))
        for policy in policies:
            values = []
            for w in demo.windows:
                recs = w.recommendations[policy]
                value = (
                    (w.clicks[policy] if metric == "ctr" else w.reward[policy]) / recs
                    if recs
                    else float("nan")
                )
                values.append(value)
            axis.plot(hours, values, marker="o", label=policy)
        axis.set_xlabel("simulated hours")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
        save(name, f"{label} by policy", figure)
    figure, axis = plt.subplots(figsize=(7, 3.6))
    losses = [(h, w.loss) for h, w in zip(hours, demo.windows, strict=True) if w.loss is not None]
    if losses:
        axis.plot([h for h, _ in losses], [v for _, v in losses], marker="o", color="tab:red", label="loss")
    axis.set_xlabel("simulated hours")
    axis.set_ylabel("training loss")
    twin = axis.twinx()
    twin.step(
        hours, [w.model_version for w in demo.windows], color="tab:gray", where="post", label="model version"
    )
    twin.set_ylabel("model version")
    axis.grid(alpha=0.3)
    save("learning_curve.png", "learner: loss and published model versions", figure)
    figure, axis = plt.subplots(figsize=(7, 3.6))
    axis.plot(hours, [w.explored_share or 0.0 for w in demo.windows], marker="o")
    axis.set_xlabel("simulated hours")
    axis.set_ylabel("share of explored slots")
    axis.grid(alpha=0.3)
    save("exploration.png", "exploration rate (cumulative)", figure)
    figure, axis = plt.subplots(figsize=(7, 3.6))
    counts = sorted(demo.exposure.values(), reverse=True)
    axis.plot(range(1, len(counts) + 1), counts)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("item rank")
    axis.set_ylabel("times recommended")
    axis.grid(alpha=0.3)
    save("exposure.png", f"item exposure ({len(counts)} items recommended)", figure)

    rows = "".join(
        f"<tr><td>{p}</td><td>{v['recommendations']:,}</td><td>{v['ctr']:.1%}</td>"
        f"<td>{v['reward_per_recommendation']:.3f}</td>"
        f"<td>{data['reward_per_recommendation_second_half'].get(p, 0):.3f}</td></tr>"
        for p, v in data["policies"].items()
    )
    images = "".join(
        f'<figure><img alt="{title}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}"><figcaption>{title}</figcaption></figure>'
        for name, title in plots.items()
    )
    html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qrec demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head><body>
<h1>qrec closed-loop demo</h1>
<p>{data["simulated_hours"]:.1f} simulated hours, {data["events"]:,} events, {data["updates"]:,} learner
updates, model version {data["model_version"]}, {data["wall_seconds"]} s of wall time. Shoppers are split
between policies by a stable hash of their id, so every policy faces the same simulated population.</p>
<table><tr><th>policy</th><th>recommendations</th><th>CTR</th><th>reward / rec</th>
<th>reward / rec (second half)</th></tr>{rows}</table>
{images}
</body></html>
"""
    (out / "report.html").write_text(html)
    return data


def run_demo(config: DemoConfig, console: Console) -> dict[str, Any]:
    """Run the loop and write the report; returns the summary."""
    bus = make_bus(config)
    with tempfile.TemporaryDirectory(prefix="qrec-demo-") as workdir:
        console.print(
            f"qrec demo on {'the embedded bus' if config.bootstrap_servers == 'embedded' else 'Kafka'}: "
            "starting the state-builder, learner and actor (compiling the models takes a moment) ..."
        )
        demo = Demo(config, bus, Path(workdir))
        try:
            if config.live and console.is_terminal:
                with Live(live_table(demo), console=console, refresh_per_second=4) as live:
                    demo.run(lambda d: live.update(Group(live_table(d))))
            else:
                demo.run(
                    lambda d: console.print(
                        f"simulated {d.windows[-1].minute / 60:.1f} h: {d.events_total:,} events, "
                        f"model v{d.learner.version}, updates {d.learner.trainer.step:,}"
                    )
                )
            data = write_report(demo, Path(config.out))
        finally:
            demo.close()
            bus.close()
    console.print(live_table(demo))
    console.print(f"report: {Path(config.out) / 'report.html'} (plots and summary.json beside it)")
    return data

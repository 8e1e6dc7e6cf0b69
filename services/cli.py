"""The `qrec` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from services import __version__
from services.bus.base import Bus, BusError
from services.config import (
    BusConfig,
    ConfigError,
    add_arguments,
    config_from_args,
    make_bus,
    register,
    setting,
)
from services.metrics import serve_metrics

DESCRIPTION = """\
qrec: a streaming e-commerce recommender on Kafka that learns with deep Q-learning.

Shops send clickstream events to Kafka; qrec builds per-user state, learns a Q-function from the
rewards its recommendations earn, and publishes recommendations back to Kafka.

Every setting can also come from a QREC_<NAME> environment variable or a TOML file (--config).
Use 'embedded' as bootstrap servers (the default) for the in-process bus, or host:port for Kafka.
"""

EPILOG = """\
examples:
  qrec topics create --bootstrap-servers 127.0.0.1:9092
  qrec replay ../shared/data/taobao_userbehavior_head/UserBehavior_head.csv --bootstrap-servers 127.0.0.1:9092
  qrec record qrec.clickstream.v1 --out events.jsonl --bootstrap-servers 127.0.0.1:9092
  qrec bench codec --quick --json out/bench.json
"""

console = Console(stderr=True, soft_wrap=True)


@register("topics")
@dataclass(frozen=True, kw_only=True)
class TopicsConfig(BusConfig):
    """Creates qrec's topics."""

    partitions: int = setting(
        6, help="partitions of the keyed topics (clickstream and recommendations share it)"
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file (env QREC_CONFIG)")
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level"
    )


def _serve(config: BusConfig, registry: CollectorRegistry) -> None:
    if config.metrics_port is not None:
        server = serve_metrics(registry, config.metrics_port, config.metrics_host)
        console.print(f"metrics: {server.url}")


def cmd_topics(args: argparse.Namespace) -> int:
    from services.replay.service import ensure_topics
    from services.topics import topic_specs

    config = config_from_args(TopicsConfig, args)
    bus = make_bus(config)
    try:
        existing = bus.list_topics()
        ensure_topics(bus, config.partitions)
        table = Table(title=f"qrec topics on {config.bootstrap_servers}")
        for column in ("topic", "partitions", "configs", "status"):
            table.add_column(column)
        for spec in topic_specs(config.partitions):
            status = "exists" if spec.name in existing else "created"
            configs = ", ".join(f"{k}={v}" for k, v in spec.configs.items())
            table.add_row(spec.name, str(bus.partitions_for(spec.name)), configs, status)
        Console().print(table)
    finally:
        bus.close()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from services.replay.config import ReplayConfig
    from services.replay.service import run_replay

    config = config_from_args(ReplayConfig, args)
    registry = CollectorRegistry()
    _serve(config, registry)
    bus = make_bus(config)
    if config.bootstrap_servers == "embedded":
        console.print(
            "[yellow]bootstrap servers are 'embedded': this replay only checks the log (a dry run)[/]"
        )
    try:
        summary = run_replay(config, bus, registry, console=console)
    finally:
        bus.close()
    table = Table(title=f"replayed {config.log}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("rows read", f"{summary.rows:,}")
    table.add_row("events produced", f"{summary.events_produced:,}")
    table.add_row("rows sent to the dead-letter topic", f"{summary.invalid_rows:,}")
    for reason, count in sorted(summary.dead_letters_by_reason.items()):
        table.add_row(f"  {reason}", f"{count:,}")
    table.add_row("events outside --from-time/--to-time", f"{summary.skipped_out_of_range:,}")
    table.add_row("events per second", f"{summary.events_per_second:,.0f}")
    Console().print(table)
    return 0


@contextmanager
def _kafka_bus(config: Any, refusal: str) -> Iterator[Bus]:
    """The bus of a command that only makes sense on a real Kafka: refused (with `refusal`) on the
    embedded bus, closed when the command is done."""
    if config.bootstrap_servers == "embedded":
        raise ConfigError(refusal)
    bus = make_bus(config)
    try:
        yield bus
    finally:
        bus.close()


def cmd_record(args: argparse.Namespace) -> int:
    from services.replay.config import RecordConfig
    from services.replay.service import run_record

    config = config_from_args(RecordConfig, args)
    refusal = "record reads an existing topic: pass --bootstrap-servers HOST:PORT of your Kafka"
    with _kafka_bus(config, refusal) as bus:
        summary = run_record(config, bus)
    console.print(
        f"recorded {summary.records:,} records from {summary.partitions} partitions of {config.topic} "
        f"to {config.out} in {summary.seconds:.1f} s"
        + (f" ({summary.tombstones} tombstones skipped)" if summary.tombstones else "")
    )
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _run_service(
    config: BusConfig,
    name: str,
    build: Callable[[Any, CollectorRegistry], Any],
    *,
    group_member: bool = True,
    without_kafka: str = "qrec demo runs every service on the embedded bus in one process",
) -> Any:
    """Run a long-lived service until SIGTERM/Ctrl-C: metrics endpoint, bus, service loop, clean close."""
    if config.bootstrap_servers == "embedded":
        raise ConfigError(
            f"the {name} runs as its own process and needs Kafka: pass --bootstrap-servers HOST:PORT "
            f"({without_kafka})"
        )
    registry = CollectorRegistry()
    _serve(config, registry)
    stop = _stop_on_signals()
    overrides: dict[str, Any] = {}
    timeout = getattr(config, "session_timeout_ms", None)
    if group_member and timeout:
        overrides = {"session_timeout_ms": timeout, "heartbeat_interval_ms": max(100, timeout // 4)}
    bus = make_bus(config, **overrides)
    try:
        service = build(bus, registry)
        service.run(stop)
    finally:
        bus.close()
    return service


def cmd_state_builder(args: argparse.Namespace) -> int:
    from services.state_builder.config import StateBuilderConfig
    from services.state_builder.service import StateBuilder

    config = config_from_args(StateBuilderConfig, args)
    console.print(f"state-builder consuming {config.clickstream_topic} and {config.recommendations_topic}")
    builder = _run_service(config, "state-builder", lambda bus, registry: StateBuilder(config, bus, registry))
    stats = builder.stats
    console.print(
        f"state-builder stopped: {stats.records:,} records, {stats.states:,} states, "
        f"{stats.transitions:,} transitions"
    )
    return 0


@register("forget")
@dataclass(frozen=True, kw_only=True)
class ForgetConfig(BusConfig):
    """Deletes everything qrec keeps about one user."""

    user_id: str = setting(help="the user to forget (as it appears in the clickstream)", positional=True)
    clickstream_topic: str = setting("qrec.clickstream.v1", help="clickstream topic the state-builders read")


def cmd_forget(args: argparse.Namespace) -> int:
    from services.state_builder.service import CONTROL_HEADER, FORGET

    config = config_from_args(ForgetConfig, args)
    with _kafka_bus(config, "forget talks to your Kafka: pass --bootstrap-servers HOST:PORT") as bus:
        producer = bus.producer()
        # Sent through the clickstream so it reaches the user's owner in order with their events.
        producer.send(
            config.clickstream_topic, config.user_id.encode(), None, headers=((CONTROL_HEADER, FORGET),)
        )
        producer.flush()
        producer.close()
    console.print(
        f"asked the state-builders to forget {config.user_id!r}: its state and pending recommendations are "
        "dropped and a tombstone is written to the user-state topic"
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from rich.table import Table

    from services.learner.rollback import RollbackConfig, kept_versions, rollback

    config = config_from_args(RollbackConfig, args)
    if config.to_version == 0:
        table = Table(title=f"model versions kept beside {config.checkpoint_dir}")
        for column in ("version", "step", "transitions learned", "published at (UTC)"):
            table.add_column(column, justify="right")
        for kept in kept_versions(Path(config.checkpoint_dir)):
            when = kept["created_at"]
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when)) if when else ""
            table.add_row(str(kept["version"]), f"{kept['step']:,}", f"{kept['learned']:,}", stamp)
        console.print(table)
        return 0
    with _kafka_bus(config, "rollback publishes to your Kafka: pass --bootstrap-servers HOST:PORT") as bus:
        done = rollback(config, bus)
    console.print(
        f"version {done['rolled_back_to']} is served again as version {done['published_as']} "
        f"({done['bytes']:,} bytes); the learner's checkpoint now resumes from it: restart the learner"
    )
    return 0


def cmd_learner(args: argparse.Namespace) -> int:
    from services.learner.config import LearnerServiceConfig
    from services.learner.service import Learner

    config = config_from_args(LearnerServiceConfig, args)
    console.print(f"learner consuming {config.transitions_topic}, publishing to {config.model_topic}")

    def build(bus: Any, registry: CollectorRegistry) -> Learner:
        learner = Learner(config, bus, registry)
        console.print(f"resumed at version {learner.version}" if learner.version else "starting from scratch")
        return learner

    learner = _run_service(
        config,
        "learner",
        build,
        group_member=False,
        without_kafka="qrec train --from-log LOG trains offline without Kafka",
    )
    console.print(f"learner stopped at model version {learner.version}, step {learner.trainer.step}")
    return 0


def cmd_tabular_learner(args: argparse.Namespace) -> int:
    from services.learner.tabular import TabularLearner, TabularLearnerConfig

    config = config_from_args(TabularLearnerConfig, args)
    console.print(f"tabular learner consuming {config.transitions_topic}, publishing to {config.model_topic}")
    learner = _run_service(
        config,
        "tabular learner",
        lambda bus, registry: TabularLearner(config, bus, registry),
        group_member=False,
    )
    console.print(f"tabular learner stopped at table version {learner.version}, {learner.learned:,} updates")
    return 0


def cmd_actor(args: argparse.Namespace) -> int:
    from services.actor.config import ActorConfig
    from services.actor.service import Actor

    config = config_from_args(ActorConfig, args)
    console.print(f"actor serving {config.user_state_topic} -> {config.recommendations_topic}")
    actor = _run_service(config, "actor", lambda bus, registry: Actor(config, bus, registry))
    console.print(f"actor stopped after {actor.published:,} recommendations")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from services.learner.config import TrainConfig
    from services.learner.offline import train_from_log, train_from_topic

    config = config_from_args(TrainConfig, args)
    if config.from_topic is not None:
        if config.bootstrap_servers == "embedded":
            raise ConfigError("--from-topic reads a Kafka topic: give --bootstrap-servers HOST:PORT")
        train_from_topic(config, console)
    else:
        train_from_log(config, console)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from services.bench import BENCHMARKS, run_benchmarks

    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(BENCHMARKS)}")
    run_benchmarks(
        args.names or list(BENCHMARKS),
        quick=args.quick,
        json_path=args.json,
        bootstrap_servers=args.bootstrap_servers,
        console=console,
        kafka_client=args.kafka_client,
    )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from services.simulator.service import SimulateConfig, Simulator

    config = config_from_args(SimulateConfig, args)
    console.print(
        f"simulated shop producing to {config.clickstream_topic} at {config.speed:g}x real time, "
        f"showing {config.recommendations_topic} to its shoppers"
    )
    simulator = _run_service(
        config,
        "simulator",
        lambda bus, registry: Simulator(config, bus, registry),
        group_member=False,
        without_kafka="qrec demo runs the simulator with every service on the embedded bus",
    )
    summary = simulator.summary
    shown = sum(summary.recommendations_by_policy.values())
    clicks = sum(summary.clicks_by_policy.values())
    console.print(
        f"simulator stopped after {summary.simulated_seconds:,.0f} simulated seconds: "
        f"{summary.events_produced:,} events produced, {shown:,} recommendations shown, {clicks:,} clicked"
    )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from services.ops.config import UpConfig
    from services.ops.supervisor import run_up

    config = config_from_args(UpConfig, args)
    run_up(config, console, config_file=args.config)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from services.ops.config import StatusConfig
    from services.ops.status import run_status

    config = config_from_args(StatusConfig, args)
    # Piped output (a file, a terminal-less job) gets wide tables rather than 80 columns.
    run_status(config, Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import DemoConfig, run_demo

    config = config_from_args(DemoConfig, args)
    run_demo(config, console)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from services.evaluate.config import EvaluateConfig
    from services.evaluate.ope import run_ope
    from services.evaluate.service import finite, run_evaluate

    if args.log_file is not None:
        args.log = args.log_file
    config = config_from_args(EvaluateConfig, args)
    result = run_ope(config, console) if config.ope is not None else run_evaluate(config, console)
    if config.json:
        sys.stdout.write(json.dumps(finite(result), indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrec",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qrec {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def sub(
        name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        p.set_defaults(handler=handler)
        return p

    from services.actor.config import ActorConfig
    from services.demo import DemoConfig
    from services.evaluate.config import EvaluateConfig
    from services.learner.config import LearnerServiceConfig, TrainConfig
    from services.replay.config import RecordConfig, ReplayConfig
    from services.state_builder.config import StateBuilderConfig

    topics = sub("topics", "create qrec's topics (idempotent) and show them", cmd_topics)
    topics.add_argument("action", choices=["create"], help="what to do with the topics")
    add_arguments(topics, TopicsConfig)
    add_arguments(
        sub(
            "replay",
            "replay a recorded event log to the clickstream topic (bad rows go to dead letters)",
            cmd_replay,
        ),
        ReplayConfig,
    )
    add_arguments(
        sub("record", "write a topic (or a time range of it) to JSONL that replay reads", cmd_record),
        RecordConfig,
    )
    add_arguments(
        sub(
            "state-builder", "build per-user state and RL transitions from the clickstream", cmd_state_builder
        ),
        StateBuilderConfig,
    )
    add_arguments(
        sub("learner", "train the DQN from the transitions topic and publish models", cmd_learner),
        LearnerServiceConfig,
    )
    from services.learner.tabular import TabularLearnerConfig

    add_arguments(
        sub(
            "tabular-learner",
            "learn the tabular Q baseline (category-level actions) from transitions and publish its table",
            cmd_tabular_learner,
        ),
        TabularLearnerConfig,
    )
    add_arguments(
        sub("actor", "publish recommendations for recommendation opportunities", cmd_actor), ActorConfig
    )
    add_arguments(
        sub(
            "train",
            "train the DQN offline from a recorded log or the transitions topic (learning curve and model)",
            cmd_train,
        ),
        TrainConfig,
    )
    add_arguments(sub("forget", "delete everything qrec keeps about one user", cmd_forget), ForgetConfig)
    from services.learner.rollback import RollbackConfig

    add_arguments(
        sub(
            "rollback",
            "serve an earlier model version again (stop the learner first); without --to-version, list "
            "the versions kept",
            cmd_rollback,
        ),
        RollbackConfig,
    )
    from services.bench import BENCHMARKS

    bench = sub("bench", "run benchmarks and write their figures as JSON", cmd_bench)
    bench.formatter_class = argparse.RawDescriptionHelpFormatter
    bench.epilog = "benchmarks:\n" + "\n".join(f"  {name:<14} {what}" for name, what in BENCHMARKS.items())
    bench.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}",
    )
    bench.add_argument("--quick", action="store_true", help="short runs (each well under a minute)")
    bench.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    bench.add_argument(
        "--bootstrap-servers",
        default=None,
        help="benchmark against this Kafka; by default a local broker is started from deploy/kafka",
    )
    bench.add_argument(
        "--kafka-client",
        choices=("kafka-python", "confluent"),
        default="kafka-python",
        help="Kafka client of the services (and the benchmark's own producer and consumer) in the "
        "actor's latency run",
    )
    from services.ops.config import StatusConfig, UpConfig
    from services.simulator.service import SimulateConfig

    add_arguments(
        sub(
            "up",
            "run a whole deployment on this machine (Kafka, state-builders, learner, actors, Prometheus), "
            "restarting crashed processes; Ctrl-C stops it in order",
            cmd_up,
        ),
        UpConfig,
    )
    add_arguments(
        sub(
            "status",
            "consumer lag, model versions and rates of a running deployment (qrec up's, or given by flags)",
            cmd_status,
        ),
        StatusConfig,
    )
    add_arguments(
        sub(
            "simulate",
            "simulated shoppers on Kafka: events to the clickstream, reactions to the recommendations",
            cmd_simulate,
        ),
        SimulateConfig,
    )
    add_arguments(
        sub(
            "demo",
            "the closed loop: simulated shoppers, state-builder, learner and actor, with a report",
            cmd_demo,
        ),
        DemoConfig,
    )
    evaluate = sub(
        "evaluate",
        "offline evaluation on a recorded log: the DQN against baselines (HR@k, NDCG@k), or "
        "off-policy estimates from recorded recommendations (--ope)",
        cmd_evaluate,
    )
    evaluate.add_argument(
        "log_file", nargs="?", metavar="LOG", help="log to evaluate on (same as --log; any replay format)"
    )
    add_arguments(evaluate, EvaluateConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        code: int = args.handler(args)
        return code
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]qrec {args.command}: error:[/] {exc}")
        return 2
    except BusError as exc:
        console.print(f"[red]qrec {args.command}: bus error:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`qrec train`: learn offline from a recorded log or from the transitions topic, without the services.

`--from-log LOG`: the log goes through the same state logic as the state-builder (time-ordered, one
partition) and each interaction becomes a logged transition. `--from-topic TOPIC`: the transitions
already on a bus (as the state-builders published them), read from the beginning up to the end
offsets found at start, deduplicated by transition id. Either way users are split into training and
held-out sets, and the DQN trains from the training users' transitions while the held-out TD loss is
tracked. The output folder gets the model bundle, a learning-curve plot and a summary; from a topic
also a learner checkpoint positioned at those end offsets, which `qrec learner --checkpoint-dir`
resumes from (publishing the model, then learning what arrived since).
"""

from __future__ import annotations

import json
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rl.value_learning import huber_loss
from schemas.codec import TRANSITIONS, DecodeError
from schemas.messages import Transition
from services.bus.base import Bus, BusError, TopicPartition
from services.config import make_bus
from services.learner.config import TrainConfig
from services.learner.service import write_checkpoint
from services.learner.trainer import Trainer, action_id
from services.replay.formats import read_log
from services.replay.service import time_ordered
from services.state_builder.partition import Emitted, PartitionState
from services.state_builder.step import FEATURE_DIM, StepParams


@dataclass
class TrainResult:
    """What offline training produced."""

    transitions: int
    train_transitions: int
    holdout_transitions: int
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    holdout_steps: list[int] = field(default_factory=list)
    holdout_td_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    unusable_transitions: int = 0
    """Transitions without an action at the configured granularity (no category or brand)."""
    vocabulary_size: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    """Where the transitions came from: the log, or the topic with its offsets and what was dropped."""


def logged_transitions(path: Path, fmt: str = "auto", params: StepParams | None = None) -> list[Transition]:
    """Every logged transition of a log, through the state-builder's own logic."""
    params = params or StepParams(recommendation_transitions=False)
    partition = PartitionState(0, params)
    emitted = Emitted()
    for row in time_ordered(read_log(path, fmt)):
        for event in row.events:
            partition.event(event, None, emitted)
    partition.watermark_ms += int((params.session_gap_seconds + 1) * 1000)  # end every open session
    partition.sweep(emitted)
    return [t for t in emitted.transitions if t.source == "logged"]


def is_holdout(user_id: str, fraction: float) -> bool:
    """A stable split by user (crc32, not Python's salted hash)."""
    return (zlib.crc32(user_id.encode()) % 10_000) < fraction * 10_000


def holdout_td_loss(trainer: Trainer, transitions: list[Transition], delta: float = 1.0) -> float:
    """Mean Huber TD loss of held-out transitions under the current parameters."""
    losses = []
    for start in range(0, len(transitions), 1024):
        batch = trainer.to_batch(transitions[start : start + 1024])
        errors = trainer.evaluate_td(batch)
        losses.append(np.asarray(huber_loss(jnp.asarray(errors), delta)))
    return float(np.mean(np.concatenate(losses))) if losses else float("nan")


@dataclass
class TopicTransitions:
    """What reading a transitions topic from the beginning to its end offsets gave."""

    transitions: list[Transition]
    """Decoded transitions, first occurrence of each transition id, in partition then offset order."""
    records: int
    """Records read."""
    duplicates: int
    """Records whose transition id was already read."""
    undecodable: dict[str, int]
    """Records that are not valid transitions, by DecodeError reason_code."""
    end_offsets: dict[int, int]
    """Per partition, the end offset at start: where a learner resuming from this read continues."""


def topic_transitions(bus: Bus, topic: str, *, stall_timeout_s: float = 30.0) -> TopicTransitions:
    """Read every transition on `topic` up to the end offsets at the time of the call.

    Records appended while reading are left for whoever continues from `end_offsets`. Raises
    ValueError when the topic does not exist and BusError when no record arrives for
    `stall_timeout_s` seconds while some are still due.
    """
    if topic not in bus.list_topics():
        raise ValueError(f"topic {topic!r} does not exist on the bus")
    partitions = [TopicPartition(topic, p) for p in range(bus.partitions_for(topic))]
    consumer = bus.consumer(None)
    try:
        consumer.assign(partitions)
        starts = consumer.beginning_offsets(partitions)
        ends = consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, starts[tp])
        pending = {tp for tp in partitions if starts[tp] < ends[tp]}
        seen: set[str] = set()
        transitions: list[Transition] = []
        undecodable: dict[str, int] = {}
        records = duplicates = 0
        last_progress = time.monotonic()
        while pending:
            batch = consumer.poll(max_records=5000, timeout_s=0.5)
            if batch:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > stall_timeout_s:
                missing = {tp.partition: ends[tp] - consumer.position(tp) for tp in sorted(pending)}
                raise BusError(
                    f"reading {topic} stalled for {stall_timeout_s:.0f} s with records still due "
                    f"(partition: records left) {missing}"
                )
            for record in batch:
                tp = record.topic_partition
                if record.offset >= ends[tp]:
                    continue  # arrived after the start: not part of this read
                records += 1
                message = TRANSITIONS.decode(record.value)
                if isinstance(message, DecodeError):
                    undecodable[message.reason_code] = undecodable.get(message.reason_code, 0) + 1
                elif message.transition_id in seen:
                    duplicates += 1
                else:
                    seen.add(message.transition_id)
                    transitions.append(message)
            pending = {tp for tp in pending if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close()
    return TopicTransitions(
        transitions=transitions,
        records=records,
        duplicates=duplicates,
        undecodable=undecodable,
        end_offsets={tp.partition: ends[tp] for tp in partitions},
    )


def train_from_log(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Train offline from a log; writes model.bin, learning_curve.png and summary.json into ``config.out``."""
    console = console or Console(stderr=True)
    started = time.monotonic()
    if config.from_log is None:
        raise ValueError("train_from_log needs --from-log")
    path = Path(config.from_log)
    if not path.is_file():
        raise FileNotFoundError(f"log file {path} does not exist")
    transitions = logged_transitions(path, config.format, StepParams(window=config.window))
    if not transitions:
        raise ValueError(f"{path} gave no transitions to learn from")
    trainer, result = _train(config, transitions, path.name, console)
    result.source = {"log": str(path)}
    result.seconds = time.monotonic() - started
    _write_outputs(config, trainer, result, title=path.name)
    _report(config, result, console)
    return result


def train_from_topic(
    config: TrainConfig, console: Console | None = None, bus: Bus | None = None
) -> TrainResult:
    """Train offline from a transitions topic; writes the outputs of `train_from_log` plus a checkpoint.

    `bus` defaults to the one `config.bootstrap_servers` names. The checkpoint (``out/checkpoint``)
    holds the trained state at the end offsets read, for `qrec learner --checkpoint-dir` to resume.
    """
    console = console or Console(stderr=True)
    started = time.monotonic()
    if config.from_topic is None:
        raise ValueError("train_from_topic needs --from-topic")
    topic = config.from_topic
    own_bus = bus is None
    bus = make_bus(config) if bus is None else bus
    try:
        read = topic_transitions(bus, topic)
    finally:
        if own_bus:
            bus.close()
    dropped = read.duplicates + sum(read.undecodable.values())
    console.print(
        f"{read.records:,} records on {topic}: {len(read.transitions):,} transitions, "
        f"{read.duplicates:,} duplicate ids, {sum(read.undecodable.values()):,} undecodable"
        + (f" {read.undecodable}" if read.undecodable else "")
    )
    if not read.transitions:
        raise ValueError(f"topic {topic!r} gave no transitions to learn from ({dropped} records dropped)")
    trainer, result = _train(config, read.transitions, topic, console)
    result.source = {
        "topic": topic,
        "bootstrap_servers": config.bootstrap_servers,
        "records": read.records,
        "duplicates": read.duplicates,
        "undecodable": read.undecodable,
        "end_offsets": {str(p): o for p, o in read.end_offsets.items()},
    }
    result.seconds = time.monotonic() - started
    _write_outputs(config, trainer, result, title=topic)
    write_checkpoint(
        Path(config.out) / "checkpoint",
        trainer,
        version=0,
        learned=result.train_transitions,
        transitions_topic=topic,
        offsets=read.end_offsets,
    )
    _report(config, result, console)
    return result


def _train(
    config: TrainConfig, transitions: list[Transition], source_name: str, console: Console
) -> tuple[Trainer, TrainResult]:
    """Split by user, fill the trainer with the training users' transitions, and run the updates."""
    granularity = config.action_granularity
    usable = [t for t in transitions if action_id(t, granularity) is not None]
    if not usable:
        raise ValueError(
            f"none of the {len(transitions):,} transitions from {source_name} names its item's "
            f"{granularity} (a_tm1_{granularity}), so a {granularity}-level model has nothing to learn"
        )
    train = [t for t in usable if not is_holdout(t.user_id, config.holdout_fraction)]
    # Held-out transitions whose action never made it into the vocabulary score as out-of-vocabulary,
    # exactly as they would in production.
    holdout = [t for t in usable if is_holdout(t.user_id, config.holdout_fraction)]
    if not train:
        raise ValueError(f"every transition from {source_name} fell into the held-out users")
    trainer = Trainer(config, FEATURE_DIM)
    for start in range(0, len(train), 4096):
        trainer.add(train[start : start + 4096])
    result = TrainResult(len(transitions), len(train), len(holdout))
    result.unusable_transitions = len(transitions) - len(usable)
    result.vocabulary_size = len(trainer.vocabulary)
    per_call = config.updates_per_call
    skipped = (
        f" ({result.unusable_transitions:,} without a {granularity} skipped)"
        if result.unusable_transitions
        else ""
    )
    console.print(
        f"{len(transitions):,} transitions from {source_name}{skipped}: {len(train):,} to train on, "
        f"{len(holdout):,} held out; vocabulary {len(trainer.vocabulary):,} {granularity} actions"
    )
    interactive = config.progress and console.is_terminal
    progress = (
        Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  held-out TD {task.fields[holdout]:.4f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        if interactive
        else nullcontext()
    )
    with progress as bar:
        task = (
            bar.add_task("train", total=config.steps, loss=float("nan"), holdout=float("nan"))
            if bar
            else None
        )
        result.holdout_steps.append(0)
        result.holdout_td_loss.append(holdout_td_loss(trainer, holdout))
        done = 0
        while done < config.steps:
            chunk = min(config.eval_every, config.steps - done)
            chunk = max(per_call, (chunk // per_call) * per_call)
            metrics = trainer.train(chunk)
            done += metrics.updates
            result.train_steps.append(done)
            result.train_loss.append(metrics.loss)
            result.holdout_steps.append(done)
            result.holdout_td_loss.append(holdout_td_loss(trainer, holdout))
            if bar is not None and task is not None:
                bar.update(task, completed=done, loss=metrics.loss, holdout=result.holdout_td_loss[-1])
    return trainer, result


def _report(config: TrainConfig, result: TrainResult, console: Console) -> None:
    console.print(
        f"held-out TD loss {result.holdout_td_loss[0]:.4f} -> {result.holdout_td_loss[-1]:.4f} "
        f"after {result.train_steps[-1] if result.train_steps else 0:,} updates ({result.seconds:.0f} s); "
        f"outputs in {config.out}"
    )


# Settings that must never be written into an output file.
SECRET_SETTINGS = ("sasl_plain_password",)


def _write_outputs(config: TrainConfig, trainer: Trainer, result: TrainResult, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.bin").write_bytes(trainer.bundle_bytes())
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(result.train_steps, result.train_loss, label="training loss (sampled batches)")
    axis.plot(result.holdout_steps, result.holdout_td_loss, label="held-out TD loss (Huber)")
    axis.set_xlabel("updates")
    axis.set_ylabel("loss")
    axis.set_title(f"qrec DQN ({config.action_granularity} actions) on {title}")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "learning_curve.png", dpi=110)
    plt.close(figure)
    settings = {k: ("***" if k in SECRET_SETTINGS and v else v) for k, v in asdict(config).items()}
    summary = {"config": settings, **asdict(result)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

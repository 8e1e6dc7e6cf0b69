"""`qrec train --from-log LOG`: learn from a recorded log's logged behaviour, without Kafka.

The log goes through the same state logic as the state-builder (time-ordered, one partition), each
interaction becomes a logged transition, users are split into training and held-out sets, and the
DQN trains from the training users' transitions while the held-out TD loss is tracked. The output
folder gets the model bundle, a learning-curve plot and a summary.
"""

from __future__ import annotations

import json
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
from schemas.messages import Transition
from services.learner.config import TrainConfig
from services.learner.trainer import Trainer
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


def train_from_log(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Train offline; writes model.bin, learning_curve.png and summary.json into ``config.out``."""
    console = console or Console(stderr=True)
    started = time.monotonic()
    path = Path(config.from_log)
    if not path.is_file():
        raise FileNotFoundError(f"log file {path} does not exist")
    transitions = logged_transitions(path, config.format, StepParams(window=config.window))
    if not transitions:
        raise ValueError(f"{path} gave no transitions to learn from")
    train = [t for t in transitions if not is_holdout(t.user_id, config.holdout_fraction)]
    holdout = [t for t in transitions if is_holdout(t.user_id, config.holdout_fraction)]
    trainer = Trainer(config, FEATURE_DIM)
    for start in range(0, len(train), 4096):
        trainer.add(train[start : start + 4096])
    # Held-out transitions whose item never made it into the vocabulary score as out-of-vocabulary,
    # exactly as they would in production.
    holdout_known = holdout
    result = TrainResult(len(transitions), len(train), len(holdout_known))
    per_call = config.updates_per_call
    console.print(
        f"{len(transitions):,} logged transitions from {path.name}: {len(train):,} to train on, "
        f"{len(holdout_known):,} held out; vocabulary {len(trainer.vocabulary):,} items"
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
        result.holdout_td_loss.append(holdout_td_loss(trainer, holdout_known))
        done = 0
        while done < config.steps:
            chunk = min(config.eval_every, config.steps - done)
            chunk = max(per_call, (chunk // per_call) * per_call)
            metrics = trainer.train(chunk)
            done += metrics.updates
            result.train_steps.append(done)
            result.train_loss.append(metrics.loss)
            result.holdout_steps.append(done)
            result.holdout_td_loss.append(holdout_td_loss(trainer, holdout_known))
            if bar is not None and task is not None:
                bar.update(task, completed=done, loss=metrics.loss, holdout=result.holdout_td_loss[-1])
    result.seconds = time.monotonic() - started
    _write_outputs(config, trainer, result)
    console.print(
        f"held-out TD loss {result.holdout_td_loss[0]:.4f} -> {result.holdout_td_loss[-1]:.4f} "
        f"after {done:,} updates ({result.seconds:.0f} s); outputs in {config.out}"
    )
    return result


def _write_outputs(config: TrainConfig, trainer: Trainer, result: TrainResult) -> None:
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
    axis.set_title(f"qrec DQN on {Path(config.from_log).name}")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "learning_curve.png", dpi=110)
    plt.close(figure)
    summary = {"config": {k: v for k, v in asdict(config).items()}, **asdict(result)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

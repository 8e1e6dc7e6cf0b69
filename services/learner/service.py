"""`qrec learner`: consume transitions, train the DQN, publish versioned models, checkpoint.

Order of a publish: checkpoint to disk (parameters, target, optimiser, vocabulary, consumed offsets,
version), then publish that version, then commit the offsets to the group (for lag monitoring).
On restart the learner loads the checkpoint, refills its replay buffer from the transitions before
the checkpointed offsets (without training on them again), and continues from those offsets; its
next model gets a higher version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rl.vocabulary import ItemGroups
from schemas.codec import TRANSITIONS, DecodeError
from schemas.messages import Transition
from services.bus.base import Bus, Consumer, Record, TopicPartition
from services.dead_letter import DeadLetterSink, dead_letter
from services.learner.config import TRANSITION_SOURCES, LearnerServiceConfig, ModelSettings
from services.learner.trainer import MODEL_ENCODING, Trainer
from services.metrics import ProcessMetrics
from services.model_topic import publish_model
from services.replay.service import ensure_topics
from services.state_builder.step import FEATURE_DIM
from services.topics import SOURCE_HEADER

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class LearnerMetrics(ProcessMetrics):
    """What the learner exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "learner")
        self.updates = Counter("qrec_learner_updates_total", "Gradient updates applied", registry=registry)
        self.transitions = Counter(
            "qrec_learner_transitions_total", "Transitions consumed into the replay buffer", registry=registry
        )
        self.duplicates = Counter(
            "qrec_learner_duplicate_transitions_total",
            "Transitions dropped because their id was already learned",
            registry=registry,
        )
        self.skipped_sources = Counter(
            "qrec_learner_skipped_source_transitions_total",
            "Transitions not learned because their source is not among --sources",
            ["source"],
            registry=registry,
        )
        self.skipped_unclicked = Counter(
            "qrec_learner_skipped_unclicked_transitions_total",
            "Shown-slot transitions not learned because the slot was not clicked (--shown-slots clicked)",
            registry=registry,
        )
        self.unusable = Counter(
            "qrec_learner_unusable_transitions_total",
            "Transitions skipped because they lack the action at the model's granularity",
            ["reason"],
            registry=registry,
        )
        self.loss = Gauge(
            "qrec_learner_loss", "Mean training loss of the last fused updates", registry=registry
        )
        self.td_error = Gauge(
            "qrec_learner_td_error", "Mean absolute TD error of the last updates", registry=registry
        )
        self.q_mean = Gauge(
            "qrec_learner_q_mean", "Mean Q(s, a) of the last sampled batches", registry=registry
        )
        self.q_max = Gauge(
            "qrec_learner_q_max", "Largest Q(s, a) of the last sampled batches", registry=registry
        )
        self.target_age = Gauge(
            "qrec_learner_target_sync_age_updates",
            "Updates since the target network was last synced",
            registry=registry,
        )
        self.replay_size = Gauge(
            "qrec_learner_replay_size", "Transitions in the replay buffer", registry=registry
        )
        self.vocabulary_size = Gauge(
            "qrec_learner_vocabulary_size",
            "Actions (items, categories or brands) with an action index",
            registry=registry,
        )
        self.model_version = Gauge(
            "qrec_learner_model_version", "Last published model version", registry=registry
        )
        self.publish_seconds = Histogram(
            "qrec_learner_publish_duration_seconds",
            "Time to checkpoint and publish one model",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.publish_bytes = Gauge(
            "qrec_learner_publish_size_bytes", "Size of the last published model", registry=registry
        )
        self.last_publish = Gauge(
            "qrec_learner_last_publish_timestamp_seconds",
            "When the last model was published",
            registry=registry,
        )


def model_header_config(settings: ModelSettings) -> dict[str, Any]:
    """What a model header's `config` tells readers before they fetch the bytes."""
    return {
        "gamma": settings.gamma,
        "window": settings.window,
        "feature_dim": FEATURE_DIM,
        "action_granularity": settings.action_granularity,
    }


def write_checkpoint(
    checkpoint_dir: Path,
    trainer: Trainer,
    *,
    version: int,
    learned: int,
    transitions_topic: str,
    offsets: dict[int, int],
) -> None:
    """Write a checkpoint the learner resumes from, atomically (a new folder renamed over the old one).

    `offsets` are the next offsets to consume per partition of `transitions_topic`; `version` is the
    last published model version (the next publish gets version + 1).
    """
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=checkpoint_dir.parent))
    (staging / "state.msgpack").write_bytes(trainer.checkpoint_bytes())
    (staging / "vocabulary.json").write_bytes(trainer.vocabulary.to_bytes())
    (staging / "item_groups.json").write_bytes(trainer.item_groups.to_bytes())
    (staging / "seen_ids.json").write_text(json.dumps(list(trainer.seen_ids)))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": version,
        "step": trainer.step,
        "learned": learned,
        "observed": trainer.observed,
        "action_granularity": trainer.granularity,
        "transitions_topic": transitions_topic,
        "offsets": {str(partition): offset for partition, offset in sorted(offsets.items())},
        "created_at": time.time(),
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    replace_folder(staging, checkpoint_dir)


def replace_folder(staging: Path, target: Path) -> None:
    """Put the fully written folder `staging` in place of `target` (renames, so never half written)."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)


def history_dir(checkpoint_dir: Path) -> Path:
    """Where published versions are kept for `qrec rollback`: beside the checkpoint folder."""
    return checkpoint_dir.with_name(checkpoint_dir.name + ".history")


def archive_version(
    checkpoint_dir: Path, version: int, keep: int, *, model: bytes, header: dict[str, Any]
) -> None:
    """Keep the checkpoint just written for `version` and the model bytes published as it (the
    newest `keep` versions), so that `qrec rollback` can serve and resume from it again."""
    history = history_dir(checkpoint_dir)
    history.mkdir(parents=True, exist_ok=True)
    target = history / f"v{version:08d}"
    staging = Path(tempfile.mkdtemp(prefix=".archive-", dir=history))
    shutil.copytree(checkpoint_dir, staging / "checkpoint")
    (staging / "model.bin").write_bytes(model)
    (staging / "header.json").write_text(json.dumps(header, indent=2))
    replace_folder(staging, target)
    archived = sorted(p for p in history.iterdir() if p.is_dir() and p.name.startswith("v"))
    for old in archived[:-keep]:
        shutil.rmtree(old)


class Learner:
    """One learner process (run exactly one per deployment)."""

    def __init__(
        self, config: LearnerServiceConfig, bus: Bus, registry: CollectorRegistry | None = None
    ) -> None:
        self.config = config
        self.bus = bus
        self.metrics = LearnerMetrics(registry or CollectorRegistry())
        if config.create_topics:
            ensure_topics(bus, config.partitions)
        self.partitions = [
            TopicPartition(config.transitions_topic, p)
            for p in range(bus.partitions_for(config.transitions_topic))
        ]
        self.checkpoint_dir = Path(config.checkpoint_dir)
        self.trainer = Trainer(config, FEATURE_DIM)
        self.sources = config.source_set()
        self.clicked_slots_only = config.shown_slots == "clicked"
        self.version = 0
        self.learned = 0  # transitions consumed into the buffer over the model's whole life
        self.offsets: dict[TopicPartition, int] = {}
        self.updates_due = 0.0
        self.last_publish_step = 0
        self.last_publish_time = time.monotonic()
        self.producer = bus.producer()
        self.dead_letters = DeadLetterSink(self.producer, self.metrics, config.dead_letter_topic)
        self.consumer: Consumer = bus.consumer(config.group_id)
        self.consumer.assign(self.partitions)
        self._resume()

    # -- checkpoints ------------------------------------------------------------------------------
    def _resume(self) -> None:
        meta_path = self.checkpoint_dir / "meta.json"
        if not meta_path.is_file():
            for tp in self.partitions:
                committed = self.consumer.committed(tp)
                if committed is not None:
                    self.consumer.seek(tp, committed)
                    self.offsets[tp] = committed
            return
        meta = json.loads(meta_path.read_text())
        if (
            meta.get("format") != CHECKPOINT_FORMAT
            or meta.get("transitions_topic") != self.config.transitions_topic
        ):
            raise RuntimeError(
                f"checkpoint in {self.checkpoint_dir} is for another topic or format; "
                "move it away or point --checkpoint-dir elsewhere"
            )
        granularity = meta.get("action_granularity", "item")
        if granularity != self.config.action_granularity:
            raise RuntimeError(
                f"checkpoint in {self.checkpoint_dir} has {granularity} actions, not "
                f"{self.config.action_granularity}; pass --action-granularity {granularity} or point "
                "--checkpoint-dir elsewhere"
            )
        groups_path = self.checkpoint_dir / "item_groups.json"
        self.trainer.restore(
            (self.checkpoint_dir / "state.msgpack").read_bytes(),
            (self.checkpoint_dir / "vocabulary.json").read_bytes(),
            json.loads((self.checkpoint_dir / "seen_ids.json").read_text()),
            meta["observed"],
            groups_path.read_bytes() if groups_path.is_file() else None,
        )
        self.version = meta["version"]
        self.learned = meta["learned"]
        # A checkpoint written by `qrec train --from-topic` (version 0) holds a model never published:
        # counting its updates as unpublished gets it published like any other.
        self.last_publish_step = self.trainer.step if self.version > 0 else 0
        self.offsets = {
            TopicPartition(self.config.transitions_topic, int(p)): o for p, o in meta["offsets"].items()
        }
        refilled = self._refill()
        for tp in self.partitions:
            self.consumer.seek(tp, self.offsets.get(tp, 0))
        self.metrics.model_version.set(self.version)
        log.info(
            "resumed from checkpoint: version %d, step %d, %d transitions learned; %d refilled the buffer",
            self.version,
            self.trainer.step,
            self.learned,
            refilled,
        )

    def _refill(self) -> int:
        """Put the transitions just before the checkpointed offsets back into the replay buffer."""
        per_partition = max(1, self.config.replay_capacity // max(1, len(self.partitions)))
        starts = self.consumer.beginning_offsets(self.partitions)
        for tp in self.partitions:
            end = self.offsets.get(tp, 0)
            self.consumer.seek(tp, max(starts[tp], end - per_partition))
        remaining = {tp for tp in self.partitions if self.consumer.position(tp) < self.offsets.get(tp, 0)}
        batch: list[Transition] = []
        while remaining:
            for record in self.consumer.poll(max_records=5000, timeout_s=0.5):
                tp = record.topic_partition
                if record.offset >= self.offsets.get(tp, 0):
                    remaining.discard(tp)
                    continue
                if self._other_source(record) is not None:
                    continue
                message = TRANSITIONS.decode(record.value)
                if isinstance(message, Transition) and self._learns(message):
                    batch.append(message)
            remaining = {tp for tp in remaining if self.consumer.position(tp) < self.offsets.get(tp, 0)}
        seen = self.trainer.seen_ids.copy()
        unusable = self.trainer.unusable
        # The checkpoint's item groups already counted these transitions: keep them as they were.
        item_groups = self.trainer.item_groups
        self.trainer.item_groups = ItemGroups.from_bytes(item_groups.to_bytes())
        self.trainer.seen_ids.clear()  # the buffer is refilled even with transitions already learned
        added = self.trainer.add(batch) if batch else 0
        self.trainer.seen_ids = seen
        self.trainer.unusable = unusable  # counted when first consumed, not again
        self.trainer.item_groups = item_groups
        return added

    def checkpoint(self) -> None:
        """Write the checkpoint atomically (a new folder renamed over the old one)."""
        write_checkpoint(
            self.checkpoint_dir,
            self.trainer,
            version=self.version,
            learned=self.learned,
            transitions_topic=self.config.transitions_topic,
            offsets={tp.partition: offset for tp, offset in self.offsets.items()},
        )

    def publish(self) -> None:
        """Checkpoint, then publish the next model version, then commit consumed offsets."""
        started = time.monotonic()
        self.version += 1
        self.checkpoint()
        data = self.trainer.bundle_bytes()
        header_config = model_header_config(self.config)
        sent = publish_model(
            self.producer,
            self.config.model_topic,
            version=self.version,
            step=self.trainer.step,
            data=data,
            encoding=MODEL_ENCODING,
            vocabulary_size=len(self.trainer.vocabulary),
            config=header_config,
        )
        if self.config.keep_models > 0:
            archive_version(
                self.checkpoint_dir,
                self.version,
                self.config.keep_models,
                model=data,
                header={
                    "step": self.trainer.step,
                    "vocabulary_size": len(self.trainer.vocabulary),
                    "encoding": MODEL_ENCODING,
                    "config": header_config,
                },
            )
        if self.offsets:
            self.consumer.commit(dict(self.offsets))
        self.last_publish_step = self.trainer.step
        self.last_publish_time = time.monotonic()
        self.metrics.publish_seconds.observe(time.monotonic() - started)
        self.metrics.publish_bytes.set(sent)
        self.metrics.model_version.set(self.version)
        self.metrics.last_publish.set(time.time())
        log.info("published model version %d (step %d, %d bytes)", self.version, self.trainer.step, sent)

    # -- the loop ---------------------------------------------------------------------------------
    def _other_source(self, record: Record) -> str | None:
        """The source a record's header names when the learner does not learn from it, else None."""
        for key, value in record.headers:
            if key == SOURCE_HEADER:
                source = value.decode("utf-8", "replace")
                # An unknown name is decoded like a record without the header (and checked there).
                return source if source in TRANSITION_SOURCES and source not in self.sources else None
        return None

    def _decode(self, records: list[Record]) -> list[Transition]:
        """The transitions of the records, those of other sources (by header) skipped undecoded."""
        transitions = []
        for record in records:
            skipped = self._other_source(record)
            if skipped is not None:
                self.metrics.skipped_sources.labels(skipped).inc()
                continue
            message = TRANSITIONS.decode(record.value)
            if isinstance(message, DecodeError):
                self.dead_letters.send(
                    dead_letter(
                        record.value,
                        message,
                        service="learner",
                        now_ms=int(time.time() * 1000),
                        source=record,
                    )
                )
                continue
            transitions.append(message)
        return transitions

    def _learns(self, transition: Transition) -> bool:
        """Whether the learner learns from a transition: its source is in --sources and, with
        --shown-slots clicked, a shown slot was clicked (r > 0)."""
        if transition.source not in self.sources:
            return False
        return transition.source != "recommendation" or not self.clicked_slots_only or transition.r_t > 0

    def _learned_sources(self, transitions: list[Transition]) -> list[Transition]:
        """The transitions the learner learns from; the others are counted by source."""
        kept = []
        for transition in transitions:
            if self._learns(transition):
                kept.append(transition)
            elif transition.source in self.sources:
                self.metrics.skipped_unclicked.inc()
            else:
                self.metrics.skipped_sources.labels(transition.source).inc()
        return kept

    def poll_once(self, timeout_s: float = 0.5) -> int:
        records = self.consumer.poll(max_records=5000, timeout_s=timeout_s)
        if records:
            transitions = self._learned_sources(self._decode(records))
            unusable_before = self.trainer.unusable
            added = self.trainer.add(transitions)
            skipped = self.trainer.unusable - unusable_before
            self.metrics.duplicates.inc(len(transitions) - added - skipped)
            if skipped:
                self.metrics.unusable.labels(f"no_{self.trainer.granularity}").inc(skipped)
            self.metrics.transitions.inc(added)
            self.learned += added
            for record in records:
                tp = record.topic_partition
                self.offsets[tp] = max(self.offsets.get(tp, 0), record.offset + 1)
            if len(self.trainer.buffer) >= self.config.min_replay_size:
                self.updates_due += added * self.config.replay_ratio / self.config.batch_size
        per_call = self.config.updates_per_call
        if not records and 0 < self.updates_due < per_call:
            # The stream went quiet with less than one fused call due: train it now (rounded up to a
            # call), so the last transitions are learned and published instead of waiting for more.
            self.updates_due = per_call
        if self.updates_due >= per_call:
            calls = int(self.updates_due // per_call)
            result = self.trainer.train(calls * per_call)
            self.updates_due -= result.updates
            self._record(result)
        stepped = self.trainer.step - self.last_publish_step
        if stepped >= self.config.publish_every_steps or (
            stepped > 0 and time.monotonic() - self.last_publish_time >= self.config.publish_every_seconds
        ):
            self.publish()
        self.metrics.replay_size.set(len(self.trainer.buffer))
        self.metrics.vocabulary_size.set(len(self.trainer.vocabulary))
        return len(records)

    def _record(self, result: Any) -> None:
        self.metrics.updates.inc(result.updates)
        self.metrics.loss.set(result.loss)
        self.metrics.td_error.set(result.td_error_abs_mean)
        self.metrics.q_mean.set(result.q_mean)
        self.metrics.q_max.set(result.q_max)
        if self.config.target_update == "periodic":
            self.metrics.target_age.set(self.trainer.step % self.config.target_update_period)
        else:
            self.metrics.target_age.set(0)

    def run(self, stop: threading.Event | None = None, *, on_poll: Callable[[], None] | None = None) -> None:
        stop = stop or threading.Event()
        self.metrics.up.labels("learner").set(1)
        try:
            while not stop.is_set():
                self.poll_once()
                if on_poll is not None:
                    on_poll()
            if self.trainer.step > self.last_publish_step:
                self.publish()
            elif self.offsets:
                self.checkpoint()  # keep the consumed offsets even when no new model was trained
        finally:
            self.metrics.up.labels("learner").set(0)
            self.close()

    def close(self) -> None:
        try:
            self.producer.flush()
        finally:
            self.consumer.close()
            self.producer.close()

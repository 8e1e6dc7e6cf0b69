"""`qrec train --from-topic`: offline training from the transitions on a bus, and resuming from it."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

from schemas.codec import encode
from schemas.messages import Observation, Transition
from services import cli
from services.bus.base import Bus, TopicPartition, TopicSpec
from services.bus.embedded import EmbeddedBus
from services.learner.config import LearnerServiceConfig, TrainConfig
from services.learner.offline import topic_transitions, train_from_topic
from services.learner.service import Learner
from services.learner.trainer import load_bundle

SMALL: dict[str, Any] = {
    "window": 4,
    "vocabulary_capacity": 16,
    "embed_dim": 8,
    "hidden_sizes": "16",
    "batch_size": 8,
    "updates_per_call": 4,
    "replay_capacity": 500,
}
USERS = [f"user-{n}" for n in range(8)]


def make_transition(n: int, *, category: str | None = "shoes") -> Transition:
    user = USERS[n % len(USERS)]
    state = Observation(
        recent_items=[f"i{n % 5}"],
        recent_event_types=["view"],
        recent_gaps_seconds=[1.0],
        features=[0.5] * 61,
    )
    return Transition(
        transition_id=f"logged:e{n}",
        user_id=user,
        source="logged",
        obs_tm1=state,
        a_tm1=f"i{(n + 1) % 5}",
        r_t=float(n % 2),
        obs_t=state,
        done=n % 3 == 0,
        timestamp=1_700_000_000_000 + n,
        policy="logged",
        a_tm1_category=category,
    )


def produce(bus: Bus, topic: str, values: list[tuple[str, bytes]]) -> None:
    producer = bus.producer()
    for key, value in values:
        producer.send(topic, key.encode(), value)
    producer.flush()
    producer.close()


def fill(bus: Bus, topic: str) -> list[Transition]:
    """40 transitions, 5 re-sent (duplicate ids), 2 undecodable records: 47 records."""
    transitions = [make_transition(n) for n in range(40)]
    produce(bus, topic, [(t.user_id, encode(t)) for t in transitions])
    produce(bus, topic, [(t.user_id, encode(t)) for t in transitions[:5]])
    produce(bus, topic, [("user-0", b"{not json"), ("user-1", b'{"transition_id": "x"}')])
    return transitions


def held_out(user_id: str, fraction: float) -> bool:
    return zlib.crc32(user_id.encode()) % 10_000 < fraction * 10_000


def test_topic_transitions_reads_to_the_end_offsets_and_dedupes() -> None:
    bus = EmbeddedBus()
    bus.create_topics([TopicSpec("tr", 2)])
    transitions = fill(bus, "tr")
    read = topic_transitions(bus, "tr")
    assert read.records == 47 and read.duplicates == 5
    assert read.undecodable == {"invalid_json": 1, "missing_field": 1}
    assert sorted(t.transition_id for t in read.transitions) == sorted(t.transition_id for t in transitions)
    consumer = bus.consumer()
    ends = consumer.end_offsets([TopicPartition("tr", 0), TopicPartition("tr", 1)])
    assert read.end_offsets == {tp.partition: offset for tp, offset in ends.items()}
    assert sum(read.end_offsets.values()) == 47
    with pytest.raises(ValueError, match="topic 'nope' does not exist"):
        topic_transitions(bus, "nope")


def train_config(out: Path, topic: str, **overrides: Any) -> TrainConfig:
    return TrainConfig(
        from_topic=topic,
        out=str(out),
        steps=8,
        eval_every=4,
        holdout_fraction=0.25,
        progress=False,
        **{**SMALL, **overrides},
    )


@pytest.mark.timeout(180)
def test_train_from_an_embedded_topic_then_the_learner_resumes_and_publishes(tmp_path: Path) -> None:
    bus = EmbeddedBus()
    bus.create_topics([TopicSpec("tr", 2), TopicSpec("models", 1)])
    transitions = fill(bus, "tr")
    out = tmp_path / "train"
    console = Console(file=(tmp_path / "log.txt").open("w"))
    result = train_from_topic(train_config(out, "tr", action_granularity="category"), console, bus=bus)
    expected_holdout = sum(held_out(t.user_id, 0.25) for t in transitions)
    assert 0 < expected_holdout < 40
    assert (result.transitions, result.holdout_transitions) == (40, expected_holdout)
    assert result.train_transitions == 40 - expected_holdout
    assert result.train_steps == [4, 8] and len(result.holdout_td_loss) == 3
    assert result.vocabulary_size == 1  # one category
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == {
        "topic": "tr",
        "bootstrap_servers": "embedded",
        "records": 47,
        "duplicates": 5,
        "undecodable": {"invalid_json": 1, "missing_field": 1},
        "end_offsets": {str(p): o for p, o in topic_transitions(bus, "tr").end_offsets.items()},
    }
    assert summary["config"]["action_granularity"] == "category"
    assert (out / "learning_curve.png").stat().st_size > 1000
    _, bundle = load_bundle((out / "model.bin").read_bytes())
    assert bundle.granularity == "category"
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["version"] == 0 and meta["step"] == 8 and meta["learned"] == 40 - expected_holdout
    assert sum(meta["offsets"].values()) == 47

    # What arrives after the read is the learner's, which resumes from the checkpoint.
    produce(bus, "tr", [(t.user_id, encode(t)) for t in (make_transition(n) for n in range(40, 43))])
    config = LearnerServiceConfig(
        transitions_topic="tr",
        model_topic="models",
        checkpoint_dir=str(out / "checkpoint"),
        action_granularity="category",
        min_replay_size=10_000,  # no further training: what is published is the offline model
        publish_every_steps=4,
        create_topics=False,
        **SMALL,
    )
    registry = CollectorRegistry()
    learner = Learner(config, bus, registry)
    assert (learner.version, learner.trainer.step) == (0, 8)
    learner.poll_once(timeout_s=0.1)
    assert learner.version == 1
    while learner.poll_once(timeout_s=0.01):
        pass
    assert learner.learned == 40 - expected_holdout + 3
    assert registry.get_sample_value("qrec_learner_transitions_total") == 3
    learner.close()


def test_train_rejects_a_topic_without_usable_transitions(tmp_path: Path) -> None:
    bus = EmbeddedBus()
    bus.create_topics([TopicSpec("empty", 1), TopicSpec("bare", 1)])
    with pytest.raises(ValueError, match="gave no transitions"):
        train_from_topic(train_config(tmp_path, "empty"), Console(quiet=True), bus=bus)
    produce(bus, "bare", [("u", encode(make_transition(n, category=None))) for n in range(4)])
    with pytest.raises(ValueError, match="names its item's category"):
        train_from_topic(
            train_config(tmp_path, "bare", action_granularity="category"), Console(quiet=True), bus=bus
        )


def test_cli_needs_exactly_one_source_and_a_real_bus_for_topics(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--from-topic", "qrec.transitions.v1"]) == 2
    assert cli.main(["train", "--from-topic", "t", "--from-log", "x.csv"]) == 2
    assert cli.main(["train"]) == 2
    text = capsys.readouterr().err
    assert "give --bootstrap-servers" in text
    assert text.count("give exactly one of --from-log LOG or --from-topic TOPIC") == 2


@pytest.mark.kafka
@pytest.mark.timeout(240)
def test_qrec_train_from_a_kafka_topic(
    bootstrap_servers: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    from services.bus.kafka import KafkaBus, KafkaSettings

    topic = unique_name("transitions")
    bus = KafkaBus(KafkaSettings(bootstrap_servers=bootstrap_servers))
    try:
        bus.create_topics([TopicSpec(topic, 3)])
        fill(bus, topic)
    finally:
        bus.close()
    out = tmp_path / "train"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    command = ["train", "--from-topic", topic, "--bootstrap-servers", bootstrap_servers, "--out", str(out)]
    code = cli.main([*command, "--steps=8", "--eval-every=4", "--no-progress", *flags])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transitions"] == 40
    assert summary["source"]["records"] == 47 and summary["source"]["duplicates"] == 5
    assert summary["source"]["undecodable"] == {"invalid_json": 1, "missing_field": 1}
    assert sum(summary["source"]["end_offsets"].values()) == 47
    assert summary["train_steps"] == [4, 8]
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["transitions_topic"] == topic and meta["step"] == 8

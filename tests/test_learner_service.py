"""The learner service: models published and reassembled, checkpoints, restart without re-learning."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from schemas.codec import encode
from schemas.messages import Transition
from services.bus.base import Bus, TopicPartition
from services.bus.embedded import EmbeddedBus
from services.bus.kafka import KafkaBus, KafkaSettings
from services.learner.config import LearnerServiceConfig
from services.learner.offline import logged_transitions
from services.learner.service import Learner
from services.learner.trainer import load_bundle
from services.model_topic import ModelAssembler
from tests.helpers import TAOBAO, require_shared_data, start_service, wait_until

SMALL = {
    "window": 20,
    "vocabulary_capacity": 2000,
    "embed_dim": 16,
    "hidden_sizes": "32,32",
    "batch_size": 32,
    "updates_per_call": 4,
    "min_replay_size": 200,
    "publish_every_steps": 16,
    "replay_capacity": 5000,
}


@pytest.fixture(scope="module")
def transitions(tmp_path_factory: pytest.TempPathFactory) -> list[Transition]:
    require_shared_data(TAOBAO)
    head = tmp_path_factory.mktemp("log") / "head.csv"
    with TAOBAO.open("rb") as source:
        head.write_bytes(b"".join(line for _, line in zip(range(4000), source, strict=False)))
    found = logged_transitions(head)
    assert len(found) > 3000
    return found


def produce(bus: Bus, topic: str, transitions: list[Transition]) -> None:
    producer = bus.producer()
    for transition in transitions:
        producer.send(topic, transition.user_id.encode(), encode(transition))
    producer.flush()
    producer.close()


def read_models(bus: Bus, topic: str) -> list[int]:
    """Versions that reassemble and verify, in order."""
    consumer = bus.consumer()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    end = consumer.end_offsets([tp])[tp]
    assembler = ModelAssembler()
    versions = []
    while consumer.position(tp) < end:
        for record in consumer.poll(timeout_s=0.5):
            model = assembler.add(record.value)
            if model is not None:
                network_config, bundle = load_bundle(model.data)
                assert bundle.feature_dim == 61 and network_config.num_actions == 2002
                versions.append(model.header.model_version)
    consumer.close()
    assert not assembler.rejected, assembler.rejected
    return versions


def test_embedded_learner_trains_publishes_and_checkpoints(
    transitions: list[Transition], tmp_path: Path
) -> None:
    bus = EmbeddedBus()
    config = LearnerServiceConfig(checkpoint_dir=str(tmp_path / "ckpt"), partitions=2, **SMALL)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    learner = Learner(config, bus, registry)
    produce(bus, config.transitions_topic, transitions[:1500])
    produce(bus, config.transitions_topic, transitions[:100])  # re-emitted duplicates are dropped
    while learner.poll_once(timeout_s=0.01):
        pass
    assert learner.learned == 1500
    assert registry.get_sample_value("qrec_learner_duplicate_transitions_total") == 100
    assert learner.version >= 1 and learner.trainer.step >= 16
    versions = read_models(bus, config.model_topic)
    assert versions == list(range(1, learner.version + 1))
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert meta["version"] == learner.version and meta["learned"] == 1500
    assert registry.get_sample_value("qrec_learner_model_version") == learner.version


@pytest.mark.kafka
def test_killed_learner_resumes_from_its_checkpoint_at_a_higher_version(
    transitions: list[Transition], bootstrap_servers: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    bus = KafkaBus(KafkaSettings(bootstrap_servers=bootstrap_servers))
    topic, model_topic = unique_name("transitions"), unique_name("model")
    from services.bus.base import TopicSpec

    bus.create_topics([TopicSpec(topic, 3), TopicSpec(model_topic, 1, {"max.message.bytes": "8388608"})])
    checkpoint = tmp_path / "ckpt"
    args = [
        f"--transitions-topic={topic}",
        f"--model-topic={model_topic}",
        f"--checkpoint-dir={checkpoint}",
        f"--group-id={unique_name('learner')}",
        f"--dead-letter-topic={unique_name('dead')}",
        "--no-create-topics",
        "--publish-every-seconds=5",
        *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()],
    ]
    produce(bus, topic, transitions[:1500])
    first = start_service("services.learner", bootstrap_servers, args, tmp_path / "first.log")
    try:
        wait_until(lambda: (checkpoint / "meta.json").is_file(), timeout_s=180, what="a first checkpoint")
        wait_until(lambda: len(read_models(bus, model_topic)) >= 1, timeout_s=60, what="a first model")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    before = json.loads((checkpoint / "meta.json").read_text())
    assert before["version"] >= 1
    produce(bus, topic, transitions[1500:3000])
    second = start_service("services.learner", bootstrap_servers, args, tmp_path / "second.log")
    try:
        wait_until(
            lambda: json.loads((checkpoint / "meta.json").read_text())["learned"] == 3000,
            timeout_s=180,
            interval_s=0.5,
            what="the restarted learner to learn every transition exactly once",
        )
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
    log = (tmp_path / "second.log").read_text(errors="replace")
    after = json.loads((checkpoint / "meta.json").read_text())
    assert after["version"] > before["version"], log
    assert after["learned"] == 3000, "transitions consumed before the checkpoint must not be learned again"
    versions = read_models(bus, model_topic)
    assert versions == sorted(versions) and versions[-1] == after["version"]
    assert "resumed at version" in log
    bus.close()

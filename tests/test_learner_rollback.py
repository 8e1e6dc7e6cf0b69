"""`qrec rollback`: an earlier version served again under a new number, and the learner resumes from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from rl.serialize import sha256_hex
from schemas.messages import Transition
from services.bus.base import TopicPartition
from services.bus.embedded import EmbeddedBus
from services.config import ConfigError
from services.learner.config import LearnerServiceConfig
from services.learner.rollback import RollbackConfig, kept_versions, rollback
from services.learner.service import Learner, history_dir
from services.model_topic import ModelAssembler
from tests.test_learner_service import SMALL, produce, transitions  # noqa: F401 (a fixture)


def published(bus: EmbeddedBus, topic: str) -> dict[int, str]:
    """Model version -> sha256 of its verified bytes, for every version on the topic."""
    consumer = bus.consumer()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    assembler = ModelAssembler()
    found = {}
    for record in consumer.poll(max_records=100_000, timeout_s=0.1):
        model = assembler.add(record.value)
        if model is not None:
            found[model.header.model_version] = sha256_hex(model.data)
    consumer.close()
    return found


def test_rollback_republishes_a_kept_version_and_the_learner_resumes_from_it(
    transitions: list[Transition],  # noqa: F811
    tmp_path: Path,
) -> None:
    bus = EmbeddedBus()
    checkpoint = tmp_path / "learner"
    config = LearnerServiceConfig(checkpoint_dir=str(checkpoint), partitions=2, keep_models=2, **SMALL)  # type: ignore[arg-type]
    learner = Learner(config, bus, CollectorRegistry())
    produce(bus, config.transitions_topic, transitions[:1500])
    while learner.poll_once(timeout_s=0.01):
        pass
    for _ in range(2):  # two more versions with different parameters
        learner.trainer.train(4)
        learner.publish()
    latest = learner.version
    assert latest >= 3
    learned, offsets = learner.learned, json.loads((checkpoint / "meta.json").read_text())["offsets"]
    learner.close()

    kept = kept_versions(checkpoint)
    assert [k["version"] for k in kept] == [latest - 1, latest]  # keep_models=2
    with pytest.raises(ConfigError, match=f"kept: {latest - 1}, {latest}"):
        rollback(RollbackConfig(to_version=1, checkpoint_dir=str(checkpoint)), bus)

    back = latest - 1
    done = rollback(RollbackConfig(to_version=back, checkpoint_dir=str(checkpoint)), bus)
    assert done["published_as"] == latest + 1 and done["replaced"] == latest
    versions = published(bus, config.model_topic)
    assert versions[latest + 1] == versions[back] != versions[latest]

    archived = history_dir(checkpoint) / f"v{back:08d}" / "checkpoint"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["version"] == latest + 1 and meta["rolled_back_from"] == latest
    assert meta["offsets"] == offsets and meta["learned"] == learned  # nothing is learned twice
    resumed = Learner(config, bus, CollectorRegistry())
    assert resumed.version == latest + 1
    assert resumed.trainer.checkpoint_bytes() == (archived / "state.msgpack").read_bytes()
    assert resumed.learned == learned
    produce(bus, config.transitions_topic, transitions[1500:2500])
    while resumed.poll_once(timeout_s=0.01):
        pass
    assert resumed.learned == learned + 1000
    assert max(published(bus, config.model_topic)) == resumed.version > latest + 1
    resumed.close()

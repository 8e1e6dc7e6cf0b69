"""The actor: policy split, popularity, masks, and the serving loop with live model swaps."""

from __future__ import annotations

import base64
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from schemas.codec import RECOMMENDATIONS, TRANSITIONS, USER_STATES, encode
from schemas.messages import ModelUpdateChunk, ModelUpdateHeader, Recommendation, Transition, UserState
from services.actor.config import ActorConfig
from services.actor.service import Actor
from services.actor.step import Popularity, allowed_mask, parse_split
from services.bus.base import Bus, Record, TopicPartition, TopicSpec
from services.bus.embedded import EmbeddedBus
from services.bus.kafka import KafkaBus, KafkaSettings
from services.config import ConfigError
from services.learner.config import LearnerServiceConfig
from services.learner.service import Learner
from services.learner.trainer import MODEL_ENCODING, Trainer
from services.model_topic import publish_model
from services.replay.config import ReplayConfig
from services.replay.formats import read_log
from services.replay.service import run_replay
from services.state_builder.config import StateBuilderConfig
from services.state_builder.service import UPDATE_HEADER, StateBuilder
from services.topics import MODEL, USER_STATE
from services.topics import RECOMMENDATIONS as RECOMMENDATIONS_TOPIC
from tests.helpers import TAOBAO, read_topic, require_shared_data, start_service, wait_until


def test_policy_split_is_stable_and_close_to_its_shares() -> None:
    split = parse_split("dqn=0.7,popularity=0.2,random=0.1", "salt")
    users = [f"user-{i}" for i in range(20_000)]
    first = [split.policy_for(u) for u in users]
    assert first == [split.policy_for(u) for u in users], "the same user always gets the same policy"
    shares = Counter(first)
    assert abs(shares["dqn"] / 20_000 - 0.7) < 0.015
    assert abs(shares["popularity"] / 20_000 - 0.2) < 0.015
    assert abs(shares["random"] / 20_000 - 0.1) < 0.015
    other = parse_split("dqn=0.7,popularity=0.2,random=0.1", "another salt")
    assert [other.policy_for(u) for u in users] != first, "a new salt reshuffles the groups"


@pytest.mark.parametrize("text", ["dqn=0.5", "dqn=0.5,greedy=0.5", "dqn=x,random=1", "dqn=1.2,random=-0.2"])
def test_bad_policy_splits_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_split(text, "s")


def test_popularity_prefers_recent_items() -> None:
    popularity = Popularity(half_life_events=10)
    popularity.observe(["old"] * 30)
    popularity.observe(["new"] * 12)
    ids, scores = popularity.top(2)
    # 30 events of "old" decayed by 12 more events of "new": 30 vs about 12 * 1.4 of weight ...
    assert ids == ["new", "old"] or ids == ["old", "new"]
    popularity.observe(["new"] * 30)
    ids, scores = popularity.top(2)
    assert ids == ["new", "old"] and scores[0] > scores[1]


def test_allowed_mask_blocks_only_known_candidates() -> None:
    index = {"a": 0, "b": 1, "c": 2}
    mask = allowed_mask(index, 3, None, ["b", "zzz"])
    assert mask.tolist() == [True, False, True]
    base = np.array([True, True, False])
    assert allowed_mask(index, 3, base, ["a"]).tolist() == [False, True, False]


def read(bus: Bus, topic: str) -> list[Record]:
    consumer = bus.consumer()
    partitions = [TopicPartition(topic, p) for p in range(bus.partitions_for(topic))]
    consumer.assign(partitions)
    records: list[Record] = []
    while batch := consumer.poll(max_records=10_000, timeout_s=0):
        records.extend(batch)
    consumer.close()
    return records


def opportunities(bus: Bus) -> set[str]:
    found = set()
    for record in read(bus, USER_STATE):
        if record.value is None or dict(record.headers).get(UPDATE_HEADER):
            continue
        state = USER_STATES.decode(record.value)
        assert isinstance(state, UserState)
        if state.source_event_type == "view":
            found.add(state.source_event_id)
    return found


def recommendations(bus: Bus) -> list[Recommendation]:
    recs = [RECOMMENDATIONS.decode(r.value) for r in read(bus, RECOMMENDATIONS_TOPIC)]
    assert all(isinstance(r, Recommendation) for r in recs)
    return [r for r in recs if isinstance(r, Recommendation)]


def drain(*services: StateBuilder | Actor | Learner) -> None:
    busy = True
    while busy:
        busy = False
        for service in services:
            busy |= service.poll_once(timeout_s=0.01) > 0


def test_closed_pipeline_on_the_embedded_bus_with_model_swaps(tmp_path: Path) -> None:
    require_shared_data(TAOBAO)
    events = sorted((e for row in read_log(TAOBAO) for e in row.events), key=lambda e: e.timestamp)
    logs = []
    for name, part in (("a", events[:3000]), ("b", events[3000:4000]), ("c", events[4000:4500])):
        logs.append(tmp_path / f"{name}.jsonl")
        logs[-1].write_bytes(b"".join(encode(e) + b"\n" for e in part))
    bus = EmbeddedBus()
    run_replay(ReplayConfig(log=str(logs[0]), partitions=2, progress=False), bus)
    builder = StateBuilder(StateBuilderConfig(partitions=2), bus, CollectorRegistry())
    builder.consumer.subscribe(
        [builder.config.clickstream_topic, builder.config.recommendations_topic],
        on_assign=builder._on_assign,
        on_revoke=builder._on_revoke,
    )
    registry = CollectorRegistry()
    actor = Actor(ActorConfig(partitions=2, slate_size=5), bus, registry)
    actor.consumer.subscribe([actor.config.user_state_topic])
    drain(builder, actor)

    wanted = opportunities(bus)
    recs = recommendations(bus)
    assert {r.source_event_id for r in recs} == wanted, "every view gets exactly one recommendation"
    assert len(recs) == len(wanted)
    policies = Counter(r.policy for r in recs)
    assert (
        set(policies) <= {"popularity-coldstart", "popularity", "random"}
        and "popularity-coldstart" in policies
    )
    assert all(r.model_version == 0 for r in recs)
    for rec in recs:
        assert len({item.item_id for item in rec.items}) == len(rec.items) <= 5
        assert all(0 < item.propensity <= 1 for item in rec.items)

    learner = Learner(
        LearnerServiceConfig(
            checkpoint_dir=str(tmp_path / "ckpt"),
            partitions=2,
            vocabulary_capacity=3000,
            embed_dim=16,
            hidden_sizes="32,32",
            batch_size=32,
            updates_per_call=4,
            min_replay_size=100,
            publish_every_steps=8,
        ),
        bus,
        CollectorRegistry(),
    )
    drain(learner)
    assert learner.version >= 1
    actor.refresh_model()  # the new model's scorer compiles in the background ...
    actor.wait_for_models()  # ... and swaps in before the next batch
    run_replay(ReplayConfig(log=str(logs[1]), progress=False, create_topics=False), bus)
    drain(builder, actor)
    assert actor.model is not None and actor.model.version == learner.version
    served = recommendations(bus)
    dqn = [r for r in served if r.policy == "dqn"]
    assert dqn and all(r.model_version == learner.version for r in dqn)
    assert registry.get_sample_value("qrec_actor_model_swaps_total") == 1

    # A corrupt version (its bytes do not match the header's hash) is rejected; serving goes on.
    producer = bus.producer()
    header = ModelUpdateHeader(
        model_version=learner.version + 1,
        step=1,
        created_at=1,
        vocabulary_size=1,
        num_chunks=1,
        total_bytes=4,
        sha256="0" * 64,
        encoding="qrec-model-v1+flax-msgpack",
        config={},
    )
    chunk = ModelUpdateChunk(
        model_version=learner.version + 1,
        chunk_index=0,
        num_chunks=1,
        data_base64=base64.b64encode(b"junk").decode(),
    )
    producer.send(MODEL, b"header", encode(header))
    producer.send(MODEL, b"chunk-0", encode(chunk))
    before = len(served)
    run_replay(ReplayConfig(log=str(logs[2]), progress=False, create_topics=False), bus)
    drain(builder, actor)
    assert registry.get_sample_value("qrec_actor_model_rejected_total") == 1
    assert actor.model.version == learner.version, "the previous model keeps serving"
    assert len(recommendations(bus)) > before


@pytest.mark.kafka
def test_separate_processes_serve_every_opportunity_through_a_kill_and_a_model_swap(
    bootstrap_servers: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    require_shared_data(TAOBAO)
    events = sorted((e for row in read_log(TAOBAO) for e in row.events), key=lambda e: e.timestamp)
    first_log, second_log, third_log = (tmp_path / f"{n}.jsonl" for n in ("first", "second", "third"))
    first_log.write_bytes(b"".join(encode(e) + b"\n" for e in events[:2000]))
    second_log.write_bytes(b"".join(encode(e) + b"\n" for e in events[2000:3000]))
    third_log.write_bytes(b"".join(encode(e) + b"\n" for e in events[3000:3500]))
    bus = KafkaBus(KafkaSettings(bootstrap_servers=bootstrap_servers))
    names = {
        "clickstream": unique_name("clicks"),
        "recommendations": unique_name("recs"),
        "user_state": unique_name("state"),
        "transitions": unique_name("transitions"),
        "dead_letter": unique_name("dead"),
        "model": unique_name("model"),
    }
    bus.create_topics(
        [TopicSpec(names[n], 4) for n in ("clickstream", "recommendations", "transitions")]
        + [
            TopicSpec(names["user_state"], 4, {"cleanup.policy": "compact"}),
            TopicSpec(names["dead_letter"], 1),
            TopicSpec(names["model"], 1, {"cleanup.policy": "compact", "max.message.bytes": "8388608"}),
        ]
    )
    replay = {
        "bootstrap_servers": bootstrap_servers,
        "topic": names["clickstream"],
        "dead_letter_topic": names["dead_letter"],
        "progress": False,
        "create_topics": False,
    }
    run_replay(ReplayConfig(log=str(first_log), **replay), bus)  # type: ignore[arg-type]
    common = [
        f"--dead-letter-topic={names['dead_letter']}",
        "--no-create-topics",
        "--session-timeout-ms=3000",
    ]
    builders = unique_name("builders")
    builder_args = [
        f"--clickstream-topic={names['clickstream']}",
        f"--recommendations-topic={names['recommendations']}",
        f"--user-state-topic={names['user_state']}",
        f"--transitions-topic={names['transitions']}",
        f"--group-id={builders}",
        *common,
    ]
    actor_args = [
        f"--user-state-topic={names['user_state']}",
        f"--recommendations-topic={names['recommendations']}",
        f"--model-topic={names['model']}",
        f"--group-id={unique_name('actors')}",
        "--log-level=INFO",
        *common,
    ]
    processes = [
        start_service("services.state_builder", bootstrap_servers, builder_args, tmp_path / "builder.log"),
        start_service("services.actor", bootstrap_servers, actor_args, tmp_path / "actor-a.log"),
        start_service("services.actor", bootstrap_servers, actor_args, tmp_path / "actor-b.log"),
    ]
    try:
        wait_until(
            lambda: len(recommendations_on(bus, names["recommendations"])) >= 300,
            timeout_s=180,
            what="the actors to serve 300 recommendations",
        )
        processes[1].send_signal(signal.SIGKILL)
        processes[1].wait()

        # A corrupt version first (rejected), then a real model trained from the transitions so far.
        producer = bus.producer()
        producer.send(
            names["model"],
            b"header",
            encode(
                ModelUpdateHeader(
                    model_version=1,
                    step=1,
                    created_at=1,
                    vocabulary_size=1,
                    num_chunks=1,
                    total_bytes=4,
                    sha256="0" * 64,
                    encoding="qrec-model-v1+flax-msgpack",
                    config={},
                )
            ),
        )
        producer.send(
            names["model"],
            b"chunk-0",
            encode(
                ModelUpdateChunk(
                    model_version=1,
                    chunk_index=0,
                    num_chunks=1,
                    data_base64=base64.b64encode(b"junk").decode(),
                )
            ),
        )
        producer.flush()
        settings = LearnerServiceConfig(
            vocabulary_capacity=3000, embed_dim=16, hidden_sizes="32,32", batch_size=32, updates_per_call=4
        )
        trainer = Trainer(settings, 61)
        transitions = [TRANSITIONS.decode(r.value) for r in read_topic(bus, names["transitions"])]
        trainer.add([t for t in transitions if isinstance(t, Transition)])
        trainer.train(8)
        publish_model(
            producer,
            names["model"],
            version=2,
            step=trainer.step,
            data=trainer.bundle_bytes(),
            encoding=MODEL_ENCODING,
            vocabulary_size=len(trainer.vocabulary),
            config={},
        )
        # Events keep coming while the survivor compiles the new model's scorer in the background:
        # they are served meanwhile (every opportunity is checked below), and once it swaps in, the
        # events after it get version 2.
        run_replay(ReplayConfig(log=str(second_log), **replay), bus)  # type: ignore[arg-type]
        wait_until(
            lambda: "serving model version 2" in (tmp_path / "actor-b.log").read_text(errors="replace"),
            timeout_s=240,
            what="the surviving actor to swap in model version 2",
        )
        run_replay(ReplayConfig(log=str(third_log), **replay), bus)  # type: ignore[arg-type]

        probe = bus.consumer(builders)
        clicks = [TopicPartition(names["clickstream"], p) for p in range(4)]

        def all_served() -> bool:
            # Only once the state-builder has committed every event is the set of opportunities final.
            if sum(probe.committed(tp) or 0 for tp in clicks) < 3500:
                return False
            wanted = opportunities_on(bus, names["user_state"])
            served = {r.source_event_id for r in recommendations_on(bus, names["recommendations"])}
            return len(wanted) > 1000 and wanted <= served

        wait_until(
            all_served, timeout_s=240, interval_s=1.0, what="every opportunity to get a recommendation"
        )
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    recs = recommendations_on(bus, names["recommendations"])
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("*.log"))
    assert {r.source_event_id for r in recs} == opportunities_on(bus, names["user_state"]), logs
    by_id: dict[str, set[bytes]] = {}
    for rec in recs:
        by_id.setdefault(rec.rec_id, set()).add(rec.source_event_id.encode())
    assert all(len(v) == 1 for v in by_id.values()), "a re-served opportunity keeps its rec_id"
    versions = [r.model_version for r in recs if r.policy == "dqn"]
    assert versions and set(versions) == {2}, (
        "the verified model (version 2) is served, the corrupt one never"
    )
    actor_log = (tmp_path / "actor-b.log").read_text(errors="replace")
    assert "model update rejected" in actor_log, logs
    bus.close()


def recommendations_on(bus: Bus, topic: str) -> list[Recommendation]:
    found = [RECOMMENDATIONS.decode(r.value) for r in read_topic(bus, topic)]
    return [r for r in found if isinstance(r, Recommendation)]


def opportunities_on(bus: Bus, topic: str) -> set[str]:
    found = set()
    for record in read_topic(bus, topic):
        if record.value is None or dict(record.headers).get(UPDATE_HEADER):
            continue
        state = USER_STATES.decode(record.value)
        if isinstance(state, UserState) and state.source_event_type == "view":
            found.add(state.source_event_id)
    return found

"""`qrec bench`: throughput figures measured side by side in one run, written as JSON.

Benchmarks report absolute rates and, where a ceiling is measured in the same run, the ratio to it:
on a shared two-core machine absolute numbers move by 15-25% between runs, ratios much less.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from schemas.codec import CLICK_EVENTS, encode
from schemas.messages import EVENT_TYPES, ClickEvent
from services.bus.base import TopicPartition

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TAOBAO = SHARED_DATA / "taobao_userbehavior_head" / "UserBehavior_head.csv"

log = logging.getLogger(__name__)


def synthetic_events(count: int, seed: int = 7) -> list[ClickEvent]:
    """Realistic ~200-byte click events (ids, category, brand, price) from a seeded generator."""
    rng = random.Random(seed)
    types = [t for t in EVENT_TYPES if t != "rec_request"]
    events = []
    for i in range(count):
        user = rng.randrange(50_000)
        events.append(
            ClickEvent(
                event_id=f"evt-{i:012d}",
                user_id=f"user-{user}",
                session_id=f"user-{user}-{rng.randrange(20)}",
                event_type=rng.choice(types),  # type: ignore[arg-type]
                timestamp=1_700_000_000_000 + i * 37,
                item_id=f"item-{rng.randrange(200_000)}",
                category=f"cat-{rng.randrange(500)}",
                brand=f"brand-{rng.randrange(2_000)}",
                price=round(rng.uniform(1, 500), 2),
            )
        )
    return events


def _rate(count: int, fn: Callable[[], Any], repeats: int) -> float:
    """Best-of-``repeats`` items per second (the least disturbed run on a noisy machine)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return count / best


def bench_codec(quick: bool, **_: Any) -> dict[str, Any]:
    """Typed ClickEvent decoding per core, next to the standard library's untyped json.loads."""
    count = 100_000 if quick else 500_000
    payloads = [encode(e) for e in synthetic_events(count)]
    decode = CLICK_EVENTS.decode

    def typed() -> None:
        for payload in payloads:
            decode(payload)

    def stdlib() -> None:
        for payload in payloads:
            json.loads(payload)

    repeats = 2 if quick else 3
    typed_rate = _rate(count, typed, repeats)
    stdlib_rate = _rate(count, stdlib, repeats)
    return {
        "decode_events_per_s": round(typed_rate),
        "stdlib_json_loads_events_per_s": round(stdlib_rate),
        "ratio_to_stdlib_json": round(typed_rate / stdlib_rate, 2),
        "mean_event_bytes": round(sum(map(len, payloads)) / count, 1),
        "events": count,
    }


@contextmanager
def _broker(bootstrap_servers: str | None, console: Console) -> Iterator[str]:
    if bootstrap_servers:
        yield bootstrap_servers
        return
    from services.local_kafka import LocalKafka

    with tempfile.TemporaryDirectory(prefix="qrec-bench-kafka-") as directory:
        console.print("starting a local Kafka broker from deploy/kafka ...")
        with LocalKafka(Path(directory)) as broker:
            yield broker.bootstrap_servers


def _bench_log(directory: Path, quick: bool) -> Path:
    """The log to replay: the real Taobao sample when present, else synthetic events."""
    if TAOBAO.is_file():
        return TAOBAO
    path = directory / "synthetic.jsonl"
    count = 30_000 if quick else 100_000
    path.write_bytes(b"".join(encode(e) + b"\n" for e in synthetic_events(count)))
    return path


def bench_kafka(quick: bool, servers: str) -> dict[str, Any]:
    """Replay into the real broker (produce rate), then the raw kafka-python consume rate of that topic."""
    from prometheus_client import CollectorRegistry

    from services.bus.kafka import KafkaBus, KafkaSettings, raw_consume_rate
    from services.replay.config import ReplayConfig
    from services.replay.service import run_replay

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        log = _bench_log(Path(tmp), quick)
        topic = f"bench.clickstream.{uuid.uuid4().hex[:8]}"
        config = ReplayConfig(
            log=str(log),
            bootstrap_servers=servers,
            topic=topic,
            dead_letter_topic=f"bench.dead-letter.{uuid.uuid4().hex[:8]}",
            partitions=6,
            progress=False,
            limit=30_000 if quick else None,
        )
        bus = KafkaBus(KafkaSettings(bootstrap_servers=servers))
        try:
            summary = run_replay(config, bus, CollectorRegistry())
        finally:
            bus.close()
        results["replay"] = {
            "produce_events_per_s": round(summary.events_per_second),
            "events": summary.events_produced,
            "log": log.name,
        }
        consumed, seconds = raw_consume_rate(
            KafkaSettings(bootstrap_servers=servers), topic, summary.events_produced
        )
        results["kafka_consume"] = {
            "events_per_s": round(consumed / seconds) if seconds > 0 else 0,
            "events": consumed,
            "client": "kafka-python",
        }
    return results


def bench_state_builder(quick: bool, servers: str) -> dict[str, Any]:
    """The state-builder end to end on the real broker (consume, decode, update, produce, commit) in one
    process, next to the raw consume rate of the same topic measured in the same run: with kafka-python,
    and with confluent-kafka when it is installed."""
    from services.bus.kafka import KafkaBus, KafkaSettings, raw_consume_rate
    from services.replay.config import ReplayConfig
    from services.replay.service import run_replay
    from services.topics import topic_specs

    suffix = uuid.uuid4().hex[:8]
    names = {
        "clickstream_topic": f"bench.sb.clicks.{suffix}",
        "recommendations_topic": f"bench.sb.recs.{suffix}",
        "user_state_topic": f"bench.sb.state.{suffix}",
        "transitions_topic": f"bench.sb.transitions.{suffix}",
        "dead_letter_topic": f"bench.sb.dead.{suffix}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        settings = KafkaSettings(bootstrap_servers=servers)
        bus = KafkaBus(settings)
        renamed = {
            "qrec.clickstream.v1": names["clickstream_topic"],
            "qrec.recommendations.v1": names["recommendations_topic"],
            "qrec.user-state.v1": names["user_state_topic"],
            "qrec.transitions.v1": names["transitions_topic"],
            "qrec.dead-letter.v1": names["dead_letter_topic"],
        }
        from services.bus.base import TopicSpec

        bus.create_topics(
            [TopicSpec(renamed[s.name], s.partitions, s.configs) for s in topic_specs(6) if s.name in renamed]
        )
        log = _bench_log(Path(tmp), quick)
        limit = 20_000 if quick else None
        summary = run_replay(
            ReplayConfig(
                log=str(log),
                bootstrap_servers=servers,
                topic=names["clickstream_topic"],
                dead_letter_topic=names["dead_letter_topic"],
                order="time",
                limit=limit,
                progress=False,
                create_topics=False,
            ),
            bus,
        )
        events = summary.events_produced
        consumed, seconds = raw_consume_rate(settings, names["clickstream_topic"], events)
        ceiling = consumed / seconds if seconds > 0 else 0.0
        results = _state_builder_run(
            KafkaBus(settings), servers, names, f"bench-sb-{suffix}", events, ceiling
        )
        results["client"] = "kafka-python"
        try:
            from services.bus.confluent import ConfluentBus, raw_consume_rate_confluent
        except ImportError:
            results["confluent"] = "not installed (pip install 'qrec[confluent]')"
        else:
            consumed, seconds = raw_consume_rate_confluent(settings, names["clickstream_topic"], events)
            outputs = {k: f"{v}.confluent" for k, v in names.items() if k != "clickstream_topic"}
            bus.create_topics(
                [
                    TopicSpec(topic, 6, {"cleanup.policy": "compact"} if key == "user_state_topic" else {})
                    for key, topic in outputs.items()
                ]
            )
            results["confluent"] = _state_builder_run(
                ConfluentBus(settings),
                servers,
                {**names, **outputs},
                f"bench-sb-confluent-{suffix}",
                events,
                consumed / seconds if seconds > 0 else 0.0,
            )
        bus.close()
    return results


def _state_builder_run(
    bus: Any, servers: str, names: dict[str, str], group: str, events: int, ceiling: float
) -> dict[str, Any]:
    """Run one state-builder until it has processed ``events`` records; its rate next to ``ceiling``."""
    import threading

    from prometheus_client import CollectorRegistry

    from services.state_builder.config import StateBuilderConfig
    from services.state_builder.service import StateBuilder

    config = StateBuilderConfig(
        bootstrap_servers=servers,
        group_id=group,
        create_topics=False,
        clickstream_topic=names["clickstream_topic"],
        recommendations_topic=names["recommendations_topic"],
        user_state_topic=names["user_state_topic"],
        transitions_topic=names["transitions_topic"],
        dead_letter_topic=names["dead_letter_topic"],
    )
    builder = StateBuilder(config, bus, CollectorRegistry())
    stop = threading.Event()
    started = time.perf_counter()
    first_record: list[float] = []

    def watch() -> None:
        while not stop.is_set():
            if builder.stats.records and not first_record:
                first_record.append(time.perf_counter())
            if builder.stats.records >= events:
                stop.set()
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stats = builder.run(stop, idle_exit_s=60)
    elapsed = time.perf_counter() - (first_record[0] if first_record else started)
    try:
        state_rate = _raw_produce_rate(bus, names["user_state_topic"], stats.states)
        transition_rate = _raw_produce_rate(bus, names["transitions_topic"], stats.transitions)
    finally:
        bus.close()
    rate = stats.records / elapsed if elapsed > 0 else 0.0
    # The client's own time per event: one consume, plus the UserStates and transitions it published
    # per event, each at the bare rate of the same client. No process on this client can go faster.
    per_event_s = 0.0
    if ceiling and stats.records:
        per_event_s = 1.0 / ceiling
        for published, produced_per_s in ((stats.states, state_rate), (stats.transitions, transition_rate)):
            if published and produced_per_s:
                per_event_s += published / stats.records / produced_per_s
    io_ceiling = 1.0 / per_event_s if per_event_s else 0.0
    return {
        "events_per_s": round(rate),
        "client_ceiling_events_per_s": round(ceiling),
        "ratio": round(rate / ceiling, 3) if ceiling else 0.0,
        "client_produce_user_states_per_s": round(state_rate),
        "client_produce_transitions_per_s": round(transition_rate),
        "client_io_ceiling_events_per_s": round(io_ceiling),
        "ratio_to_client_io_ceiling": round(rate / io_ceiling, 3) if io_ceiling else 0.0,
        "events": stats.records,
        "states_published": stats.states,
        "transitions_published": stats.transitions,
    }


def _raw_produce_rate(bus: Any, topic: str, count: int) -> float:
    """Records/s the bus's producer (the services' settings: acks=all, idempotent) sends and has
    acknowledged, for the first ``count`` records of ``topic`` (what the state-builder just published
    there: same keys, values and headers) sent again to the same topic."""
    consumer = bus.consumer()
    partitions = [TopicPartition(topic, p) for p in range(bus.partitions_for(topic))]
    consumer.assign(partitions)
    consumer.seek_to_beginning(partitions)
    records: list[Any] = []
    deadline = time.monotonic() + 120
    while len(records) < count and time.monotonic() < deadline:
        records.extend(consumer.poll(max_records=5000, timeout_s=0.5))
    consumer.close()
    if not records:
        return 0.0
    producer = bus.producer()
    producer.send(topic, records[0].key, records[0].value, headers=records[0].headers)  # connect first
    producer.flush()
    started = time.perf_counter()
    for record in records:
        producer.send(topic, record.key, record.value, headers=record.headers, partition=record.partition)
    producer.flush()
    seconds = time.perf_counter() - started
    producer.close()
    return len(records) / seconds if seconds > 0 else 0.0


def _actor_scoring_case(items: int, quick: bool) -> tuple[float, float]:
    """(qrec scorer users/s, bare forward + top-k users/s) for a catalogue of ``items``, over the same
    arrays, timed alternately in one run so that other load on the machine hits both alike."""
    import jax
    import numpy as np

    from rl.batch import ObsBatch
    from rl.networks import NetworkConfig, QNetwork, init_params
    from services.actor.model import score_and_select

    batch, window, dim, k, blocked_per_user = 256, 20, 61, 10, 20
    rng = np.random.default_rng(0)
    network = QNetwork(NetworkConfig(num_actions=items + 2, embed_dim=64, hidden_sizes=(256, 256)))
    obs = ObsBatch(
        items=rng.integers(2, items + 2, (batch, window)).astype(np.int32),
        event_types=rng.integers(1, 8, (batch, window)).astype(np.int32),
        gaps=rng.random((batch, window)).astype(np.float32),
        features=rng.random((batch, dim)).astype(np.float32),
    )
    params = jax.jit(init_params, static_argnums=0)(network, obs, jax.random.key(0))
    # As the actor serves: one mask for the batch (padding and unknown-item slots, unavailable items),
    # plus per-user exclusions (purchased, previous slate) as indices.
    allowed = np.ones((items + 2,), bool)  # (A,)
    allowed[:2] = False
    blocked = rng.integers(2, items + 2, (batch, blocked_per_user)).astype(np.int32)  # (B, m)
    seeds = np.arange(batch, dtype=np.uint32)
    epsilon = np.float32(0.1)

    def qrec() -> int:
        out = score_and_select(
            params, obs, allowed, seeds, epsilon, network=network, k=k, exploration="epsilon", blocked=blocked
        )
        jax.block_until_ready(out)
        return batch

    @jax.jit
    def bare_fn(p: Any, o: ObsBatch) -> Any:
        return jax.lax.top_k(network.apply(p, o), k)  # type: ignore[arg-type]

    def bare() -> int:
        jax.block_until_ready(bare_fn(params, obs))
        return batch

    qrec()
    bare()
    rounds = 3 if quick else 10
    qrec_s = bare_s = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        qrec()
        qrec_s += time.perf_counter() - started
        started = time.perf_counter()
        bare()
        bare_s += time.perf_counter() - started
    return batch * rounds / qrec_s, batch * rounds / bare_s


def bench_actor_scoring(quick: bool) -> dict[str, Any]:
    """Users scored per second by the actor's compiled scorer (Q for every item, then an epsilon-greedy
    slate with propensities and masks), next to a bare jitted forward pass + top-k over the same arrays."""
    results: dict[str, Any] = {"batch_users": 256}
    for label, items in (("1k", 1_000), ("100k", 100_000)):
        qrec, bare = _actor_scoring_case(items, quick)
        results[f"scoring_users_per_s_{label}"] = round(qrec)
        results[f"bare_users_per_s_{label}"] = round(bare)
        results[f"ratio_to_bare_{label}"] = round(qrec / bare, 3)
        results[f"scoring_items_per_s_{label}"] = round(qrec * (items + 2))
    return results


def bench_actor_latency(quick: bool, servers: str, kafka_client: str = "kafka-python") -> dict[str, Any]:
    """End-to-end latency on the real broker at a fixed offered load: a view produced to the clickstream
    until its recommendation is consumed, through a state-builder and an actor in their own processes.

    Per hop, from the same run: event produced -> the recommendation's ``created_at`` (producer,
    state-builder, user-state topic and actor), and ``created_at`` -> consumed (actor flush + fetch)."""
    import os
    import subprocess
    import sys
    import threading

    import numpy as np

    from schemas.codec import RECOMMENDATIONS
    from schemas.messages import Recommendation
    from services.bus.base import TopicSpec
    from services.bus.kafka import KafkaBus, KafkaSettings
    from services.ops.supervisor import free_port

    if kafka_client == "confluent":
        from services.bus.confluent import ConfluentBus

    suffix = uuid.uuid4().hex[:8]
    names = {
        n: f"bench.lat.{n}.{suffix}"
        for n in ("clicks", "recs", "state", "transitions", "dead", "model", "hop")
    }
    settings = KafkaSettings(bootstrap_servers=servers)
    bus = ConfluentBus(settings) if kafka_client == "confluent" else KafkaBus(settings)
    bus.create_topics(
        [TopicSpec(names[n], 6) for n in ("clicks", "recs", "transitions", "hop")]
        + [
            TopicSpec(names["state"], 6, {"cleanup.policy": "compact"}),
            TopicSpec(names["dead"], 1),
            TopicSpec(names["model"], 1, {"cleanup.policy": "compact"}),
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QREC_")}
    common = [
        "--bootstrap-servers",
        servers,
        f"--kafka-client={kafka_client}",
        f"--dead-letter-topic={names['dead']}",
        "--no-create-topics",
    ]
    rate = 1000.0
    seconds = 5.0 if quick else 20.0
    # The floor first, on a quiet machine: one produce -> consume hop through the same broker with the
    # same client at the same load. The pipeline crosses the broker three times (event, user state,
    # recommendation), so no service could bring its latency below about three of these.
    hop = _hop_latencies(bus, names["hop"], rate, seconds)
    ports = {"state_builder": free_port(), "actor": free_port()}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.state_builder",
                *common,
                f"--metrics-port={ports['state_builder']}",
                f"--clickstream-topic={names['clicks']}",
                f"--recommendations-topic={names['recs']}",
                f"--user-state-topic={names['state']}",
                f"--transitions-topic={names['transitions']}",
                f"--group-id=bench-lat-sb-{suffix}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.actor",
                *common,
                f"--metrics-port={ports['actor']}",
                f"--user-state-topic={names['state']}",
                f"--recommendations-topic={names['recs']}",
                f"--model-topic={names['model']}",
                f"--group-id=bench-lat-actor-{suffix}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    warmup = 3.0
    sent_at: dict[str, float] = {}  # event id -> wall-clock seconds when produced
    latencies: list[float] = []
    created: list[float] = []  # event produced -> recommendation made (its created_at)
    delivered: list[float] = []  # recommendation made -> consumed here
    consumer = bus.consumer()
    # Only the recommendations: reading the (larger) user states here too would load this process
    # and delay the very timestamps it takes.
    consumer.assign([TopicPartition(names["recs"], p) for p in range(6)])
    done = threading.Event()
    warmed = threading.Event()

    def consume() -> None:
        while not done.is_set():
            for record in consumer.poll(max_records=5000, timeout_s=0.05):
                now = time.time()
                rec = RECOMMENDATIONS.decode(record.value)
                if isinstance(rec, Recommendation) and rec.source_event_id.startswith("warm-"):
                    warmed.set()
                if isinstance(rec, Recommendation) and rec.source_event_id in sent_at:
                    sent = sent_at[rec.source_event_id]
                    latencies.append(now - sent)
                    created.append(rec.created_at / 1000.0 - sent)
                    delivered.append(now - rec.created_at / 1000.0)

    try:
        producer = bus.producer()
        # Warm up until the pipeline answers: the services start, join their groups and compile
        # their scorers (a minute or more on a busy machine). Events sent before that would only
        # measure the start-up backlog.
        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        ready_by = time.monotonic() + 600
        warm = 0
        while not warmed.is_set():
            if time.monotonic() > ready_by:
                raise RuntimeError("the state-builder and actor did not answer within 10 minutes")
            event = synthetic_events(1, seed=warm)[0]
            view = ClickEvent(
                event_id=f"warm-{suffix}-{warm}",
                user_id=event.user_id,
                session_id=event.session_id,
                event_type="view",
                timestamp=int(time.time() * 1000),
                item_id=event.item_id,
            )
            producer.send(names["clicks"], view.user_id.encode(), encode(view))
            producer.flush()
            warm += 1
            warmed.wait(0.2)
        time.sleep(warmup)
        before = _service_samples(ports)
        events = synthetic_events(int(rate * seconds), seed=99)
        started = time.perf_counter()
        for i, event in enumerate(events):
            _wait_until(started + i / rate)
            view = ClickEvent(
                event_id=f"lat-{suffix}-{i}",
                user_id=event.user_id,
                session_id=event.session_id,
                event_type="view",
                timestamp=int(time.time() * 1000),
                item_id=event.item_id,
            )
            sent_at[view.event_id] = time.time()
            producer.send(names["clicks"], view.user_id.encode(), encode(view))
            # No flush per event: a flush waits for the broker's acknowledgement and would cap the
            # offered rate; the producer's linger (a few ms) sends each event promptly.
        producer.flush()
        offered = len(events) / (time.perf_counter() - started)
        deadline = time.perf_counter() + 30
        while len(latencies) < len(events) and time.perf_counter() < deadline:
            time.sleep(0.2)
        done.set()
        reader.join(timeout=5)
        means = _service_means(before, _service_samples(ports))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        consumer.close()
        bus.close()

    def percentiles(seconds: list[float], prefix: str) -> dict[str, float | None]:
        values = np.asarray(seconds) * 1000.0
        return {
            f"{prefix}p{q}_ms": round(float(np.percentile(values, q)), 1) if values.size else None
            for q in (50, 95, 99)
        }

    return {
        **percentiles(latencies, ""),
        "offered_events_per_s": round(offered),
        "recommendations_received": len(latencies),
        "events_sent": len(events),
        "kafka_client": kafka_client,
        # Per hop: event produced -> recommendation made, and made -> read back (flush + fetch).
        **percentiles(created, "hop_made_"),
        **percentiles(delivered, "hop_delivered_"),
        # One bare hop (produce -> consume, nothing in between) at the same load before the services
        # started, and the pipeline's p99 over it.
        **percentiles(hop, "broker_hop_"),
        "p99_over_broker_hop_p99": round(float(np.percentile(latencies, 99) / np.percentile(hop, 99)), 2)
        if latencies and hop
        else None,
        # The services' own view over the measured events (their Prometheus histograms): mean batch sizes,
        # the actor's scoring time per batch, and each service's latency from the event's Kafka time
        # to its outputs flushed.
        **means,
    }


def _wait_until(due: float) -> None:
    """Sleep in steps of at most 1 ms until ``time.perf_counter()`` reaches ``due`` (a paced send)."""
    while time.perf_counter() < due:
        time.sleep(min(0.001, max(0.0, due - time.perf_counter())))


def _hop_latencies(bus: Any, topic: str, rate: float, seconds: float) -> list[float]:
    """Seconds from produce to consume of small records sent at ``rate`` for ``seconds``, one hop."""
    import threading

    consumer = bus.consumer()
    consumer.assign([TopicPartition(topic, p) for p in range(6)])
    producer = bus.producer()
    latencies: list[float] = []
    measuring = threading.Event()
    done = threading.Event()

    def consume() -> None:
        while not done.is_set():
            for record in consumer.poll(max_records=5000, timeout_s=0.05):
                if measuring.is_set() and record.value is not None:
                    latencies.append(time.time() - float(record.value.decode()))

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        for i in range(100):  # connections, metadata and the fetch sessions first
            producer.send(topic, b"warm-%d" % i, str(time.time()).encode())
            producer.flush()
        time.sleep(1.0)
        measuring.set()
        started = time.perf_counter()
        for i in range(int(rate * seconds)):
            _wait_until(started + i / rate)
            producer.send(topic, b"hop-%d" % i, str(time.time()).encode())
        producer.flush()
        deadline = time.perf_counter() + 10
        while len(latencies) < int(rate * seconds) and time.perf_counter() < deadline:
            time.sleep(0.1)
    finally:
        done.set()
        reader.join(timeout=5)
        consumer.close()
    return latencies


# (key in the results, service, histogram, scale): means the latency benchmark reads from the services.
SERVICE_MEANS = (
    ("state_builder_batch_records_mean", "state_builder", "qrec_state_builder_batch_records", 1.0),
    ("state_builder_latency_mean_ms", "state_builder", "qrec_state_builder_latency_seconds", 1000.0),
    ("actor_batch_states_mean", "actor", "qrec_actor_batch_states", 1.0),
    ("actor_scoring_mean_ms", "actor", "qrec_actor_scoring_seconds", 1000.0),
    ("actor_latency_mean_ms", "actor", "qrec_actor_end_to_end_latency_seconds", 1000.0),
)


def _service_samples(ports: dict[str, int]) -> dict[str, Any]:
    """Every sample each service's /metrics serves now (none from one that does not answer)."""
    from services.ops.status import scrape

    samples = {}
    for service, port in ports.items():
        found = scrape(f"http://127.0.0.1:{port}/metrics")
        if found is None:
            log.warning("could not read the %s's metrics on port %d", service, port)
        samples[service] = found or {}
    return samples


def _service_means(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """Each SERVICE_MEANS histogram's mean (sum / count) over what it observed between two scrapes."""
    from services.ops.status import total

    means: dict[str, float | None] = {}
    for key, service, name, scale in SERVICE_MEANS:

        def grew(suffix: str, service: str = service, name: str = name) -> float:
            return (total(after[service], f"{name}{suffix}") or 0.0) - (
                total(before[service], f"{name}{suffix}") or 0.0
            )

        count = grew("_count")
        means[key] = round(grew("_sum") / count * scale, 2) if count else None
    return means


BENCHMARKS: dict[str, str] = {
    "codec": "typed ClickEvent decode rate per core (decode_events_per_s)",
    "replay": "replay of a real log into the real broker (produce_events_per_s)",
    "kafka_consume": "raw kafka-python consume rate on the same broker (events_per_s)",
    "state_builder": "state-builder throughput on the real broker next to the raw consume rate (ratio)",
    "learner": "DQN transitions/s: seed per-sample loop vs one jitted update vs qrec's fused updates",
    "actor": "end-to-end latency at a fixed load on the real broker, and scoring users/s vs a bare top-k",
}


def run_benchmarks(
    names: list[str],
    *,
    quick: bool,
    json_path: Path | None,
    bootstrap_servers: str | None = None,
    console: Console | None = None,
    kafka_client: str = "kafka-python",
) -> dict[str, Any]:
    """Run the named benchmarks and write one JSON object keyed by benchmark name."""
    console = console or Console(stderr=True)
    results: dict[str, Any] = {}
    if "codec" in names:
        console.print("bench codec ...")
        results["codec"] = bench_codec(quick)
    if "learner" in names:
        from rl.benchmark import bench_learner

        console.print("bench learner ...")
        results["learner"] = bench_learner(quick)
    if "actor" in names:
        console.print("bench actor scoring ...")
        results["actor"] = bench_actor_scoring(quick)
    if {"replay", "kafka_consume", "state_builder", "actor"} & set(names):
        with _broker(bootstrap_servers, console) as servers:
            if "replay" in names or "kafka_consume" in names:
                console.print("bench replay + kafka_consume ...")
                kafka_results = bench_kafka(quick, servers)
                results.update({k: v for k, v in kafka_results.items() if k in names})
            if "state_builder" in names:
                console.print("bench state_builder ...")
                results["state_builder"] = bench_state_builder(quick, servers)
            if "actor" in names:
                console.print("bench actor latency ...")
                results["actor"].update(bench_actor_latency(quick, servers, kafka_client))
    results["_meta"] = {
        "quick": quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(results, indent=2, sort_keys=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
        console.print(f"wrote {json_path}")
    print(text)
    return results

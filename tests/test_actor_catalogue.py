"""The catalogue mask: items the shop marks unavailable (or deletes) never reach any policy's slates."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import jax
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from rl.batch import empty_obs_batch
from rl.networks import NetworkConfig, QNetwork, init_params
from rl.vocabulary import Vocabulary
from schemas.codec import DEAD_LETTERS, encode
from schemas.messages import CatalogueItem, DeadLetter, Observation, Recommendation, UserState
from services.actor.catalogue import Catalogue
from services.actor.config import ActorConfig
from services.actor.model import LiveModel, score_and_select, select_slates
from services.actor.service import Actor
from services.actor.step import COLD_START
from services.bus.base import Bus, Record, TopicSpec
from services.bus.embedded import EmbeddedBus
from services.bus.kafka import KafkaBus, KafkaSettings
from services.topics import CATALOGUE, DEAD_LETTER, USER_STATE
from tests.helpers import read_topic, wait_until

ITEMS = [f"sku-{i}" for i in range(6)]


def catalogue_record(item_id: str, available: bool) -> bytes:
    return encode(CatalogueItem(item_id=item_id, available=available, timestamp=1))


def state(user: str, event: str, last_item: str, purchased: tuple[str, ...] = ()) -> UserState:
    return UserState(
        user_id=user,
        timestamp=1,
        source_event_id=event,
        source_event_type="view",
        session_id=f"s-{user}",
        session_started_at=0,
        session_event_count=1,
        applied_event_count=1,
        observation=Observation(
            recent_items=[last_item],
            recent_event_types=["view"],
            recent_gaps_seconds=[0.0],
            features=[0.0, 1.0],
        ),
        event_counts_decayed={"view": 1.0},
        cart_items=[],
        favorite_items=[],
        purchased_items=list(purchased),
        category_affinity=[],
        brand_affinity=[],
        hour_of_day=0,
        day_of_week=0,
        feature_layout="test",
    )


def records(states: list[UserState], topic: str = USER_STATE) -> list[Record]:
    return [Record(topic, 0, i, 1, s.user_id.encode(), encode(s)) for i, s in enumerate(states)]


def test_catalogue_keeps_the_latest_record_per_item_and_treats_tombstones_as_unavailable() -> None:
    catalogue = Catalogue()
    assert catalogue.apply(b"sku-1", catalogue_record("sku-1", False)) is None
    assert catalogue.apply(b"sku-2", catalogue_record("sku-2", False)) is None
    assert catalogue.apply(b"sku-3", None) is None  # deleted from the catalogue
    assert catalogue.unavailable == {"sku-1", "sku-2", "sku-3"}
    assert catalogue.version == 3
    assert catalogue.apply(b"sku-1", catalogue_record("sku-1", True)) is None
    assert catalogue.apply(b"sku-2", catalogue_record("sku-2", False)) is None  # no change
    assert catalogue.unavailable == {"sku-2", "sku-3"}
    assert catalogue.version == 4
    mask = catalogue.mask(
        {"sku-1": 2, "sku-2": 3, "sku-3": 5}, np.array([False, False, True, True, True, True])
    )
    np.testing.assert_array_equal(mask, [False, False, True, False, True, False])


@pytest.mark.parametrize(
    ("key", "value", "code"),
    [
        (b"sku-1", b"{not json", "invalid_json"),
        (b"sku-1", b'{"item_id": "sku-1", "timestamp": 1}', "missing_field"),
        (b"sku-9", encode(CatalogueItem("sku-1", False, 1)), "catalogue_key_mismatch"),
        (None, None, "catalogue_missing_key"),
    ],
)
def test_unusable_catalogue_records_are_refused_with_a_reason(
    key: bytes | None, value: bytes | None, code: str
) -> None:
    catalogue = Catalogue()
    error = catalogue.apply(key, value)
    assert error is not None and error.reason_code == code
    assert catalogue.unavailable == set() and catalogue.version == 0


def test_score_and_select_honours_the_shared_mask_and_per_user_blocks_with_exact_propensities() -> None:
    network = QNetwork(NetworkConfig(num_actions=8, embed_dim=4, hidden_sizes=(8,)))
    obs = empty_obs_batch(4, window=3, feature_dim=2)
    params = jax.jit(init_params, static_argnums=0)(network, obs, jax.random.key(0))
    allowed = np.array([False, False, True, False, True, True, True, True])  # action 3: unavailable
    blocked = np.array([[4, -1], [5, 6], [3, 3], [-1, -1]], np.int32)  # (B, m); 3 is already masked
    actions, propensities, explored, _ = score_and_select(
        params,
        obs,
        allowed,
        np.arange(4, dtype=np.uint32),
        np.float32(1.0),  # uniform: propensities are 1 / (allowed actions left)
        network=network,
        k=3,
        exploration="epsilon",
        blocked=blocked,
    )
    actions, propensities = np.asarray(actions), np.asarray(propensities)
    left = [4, 3, 5, 5]  # allowed actions per user: {2, 4, 5, 6, 7} minus that user's blocked ones
    for row in range(4):
        assert 3 not in actions[row] and not set(blocked[row]) & set(actions[row].tolist())
        assert set(actions[row].tolist()) <= {2, 4, 5, 6, 7}
        assert len(set(actions[row].tolist())) == 3
        np.testing.assert_allclose(
            propensities[row], [1 / left[row], 1 / (left[row] - 1), 1 / (left[row] - 2)]
        )
    assert np.all(np.asarray(explored) | (propensities > 0))


def test_candidate_slates_fill_with_what_is_left_and_leave_empty_slots() -> None:
    scores = np.array([[3.0, 2.0, 1.0, 0.0]] * 2, np.float32)  # (B, C)
    allowed = np.array([True, False, True, True])
    actions, propensities, explored = select_slates(
        scores,
        allowed,
        np.arange(2, dtype=np.uint32),
        np.float32(0.0),
        k=4,
        exploration="epsilon",
        blocked=np.array([[2], [-1]], np.int32),
    )
    np.testing.assert_array_equal(actions, [[0, 3, -1, -1], [0, 2, 3, -1]])
    np.testing.assert_array_equal(propensities, [[1, 1, 0, 0], [1, 1, 1, 0]])
    assert not np.any(explored)


def make_actor(bus: Bus, policies: str, **overrides: object) -> tuple[Actor, CollectorRegistry]:
    config = ActorConfig(
        catalogue_topic=CATALOGUE,
        policies=policies,
        slate_size=4,
        popularity_candidates=8,
        **overrides,  # type: ignore[arg-type]
    )
    registry = CollectorRegistry()
    return Actor(config, bus, registry), registry


def serve_views(actor: Actor, first: int, count: int) -> list[Recommendation]:
    """One view per new user, cycling over ITEMS (so every item is popular)."""
    states = [state(f"u-{i}", f"e-{i}", ITEMS[i % len(ITEMS)]) for i in range(first, first + count)]
    return actor.serve(records(states))


@pytest.mark.parametrize("policy", ["popularity", "random"])
def test_popularity_and_random_slates_never_hold_unavailable_items(policy: str) -> None:
    bus = EmbeddedBus()
    actor, registry = make_actor(bus, f"{policy}=1")
    producer = bus.producer()
    producer.send(CATALOGUE, b"sku-2", catalogue_record("sku-2", False))
    producer.send(CATALOGUE, b"sku-4", None)
    producer.send(CATALOGUE, b"sku-5", b"garbage")
    producer.flush()
    actor.load_catalogue(timeout_s=5)
    assert actor.catalogue is not None and actor.catalogue.unavailable == {"sku-2", "sku-4"}
    assert registry.get_sample_value("qrec_actor_catalogue_unavailable_items") == 2
    letters = [DEAD_LETTERS.decode(r.value) for r in read_topic(bus, DEAD_LETTER)]
    assert [(d.reason_code, d.service) for d in letters if isinstance(d, DeadLetter)] == [
        ("invalid_json", "actor")
    ]
    serve_views(actor, 0, 12)  # every item becomes popular
    recs = serve_views(actor, 100, 20)
    assert len(recs) == 20
    for rec in recs:
        # Four slots, four items left: every slate holds exactly the available ones.
        assert {item.item_id for item in rec.items} == {"sku-0", "sku-1", "sku-3", "sku-5"}
        if policy == "random":
            propensities = [item.propensity for item in rec.items]
            np.testing.assert_allclose(propensities, [1 / 4, 1 / 3, 1 / 2, 1], rtol=1e-6)
    # The item comes back once the shop marks it available again.
    producer.send(CATALOGUE, b"sku-4", catalogue_record("sku-4", True))
    producer.flush()
    actor.refresh_catalogue()
    recs = serve_views(actor, 200, 20)
    assert all(
        {item.item_id for item in rec.items} <= {"sku-0", "sku-1", "sku-3", "sku-4", "sku-5"} for rec in recs
    )
    assert any("sku-4" in {item.item_id for item in rec.items} for rec in recs)


def tiny_model() -> LiveModel:
    vocabulary = Vocabulary(capacity=8)
    vocabulary.observe(ITEMS, now_step=1)
    network = QNetwork(NetworkConfig(num_actions=vocabulary.num_actions, embed_dim=4, hidden_sizes=(8,)))
    params = jax.jit(init_params, static_argnums=0)(
        network, empty_obs_batch(1, window=3, feature_dim=2), jax.random.key(0)
    )
    index = {item: int(i) for item, i in zip(ITEMS, vocabulary.lookup(ITEMS), strict=True)}
    return LiveModel(1, 0, network, params, vocabulary, 3, 2, index)


def test_dqn_slates_never_hold_unavailable_items_and_respect_purchases() -> None:
    bus = EmbeddedBus()
    actor, _ = make_actor(bus, "dqn=1", epsilon=0.5)
    actor.model = tiny_model()
    producer = bus.producer()
    producer.send(CATALOGUE, b"sku-1", catalogue_record("sku-1", False))
    producer.send(CATALOGUE, b"sku-3", None)
    producer.flush()
    actor.load_catalogue(timeout_s=5)
    states = [state(f"u-{i}", f"e-{i}", ITEMS[i % 6], purchased=("sku-0",)) for i in range(40)]
    recs = actor.serve(records(states))
    assert len(recs) == 40
    for rec in recs:
        # Six items, two unavailable, one purchased: the slate is the three left, in some order.
        assert rec.policy == "dqn" and rec.model_version == 1
        assert {item.item_id for item in rec.items} == {"sku-2", "sku-4", "sku-5"}
        assert rec.items[-1].propensity == pytest.approx(1.0)  # the last one left is certain


def test_a_new_model_compiles_in_the_background_while_the_current_policy_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bus = EmbeddedBus()
    actor, registry = make_actor(bus, "dqn=1")
    started, release = threading.Event(), threading.Event()
    warm = actor._warm_model

    def slow_compile(model: LiveModel) -> None:
        started.set()
        assert release.wait(30)
        warm(model)

    monkeypatch.setattr(actor, "_warm_model", slow_compile)
    model = tiny_model()
    actor._stage("dqn", model)
    assert started.wait(30)
    # While the scorer compiles, batches are served at once by the policy already in place.
    during = serve_views(actor, 0, 12)
    assert len(during) == 12 and {(r.policy, r.model_version) for r in during} == {(COLD_START, 0)}
    actor.refresh_model()
    assert actor.model is None and registry.get_sample_value("qrec_actor_model_swaps_total") == 0
    release.set()
    actor.wait_for_models(timeout_s=60)
    assert actor.model is model and registry.get_sample_value("qrec_actor_model_swaps_total") == 1
    after = serve_views(actor, 12, 12)
    assert {(r.policy, r.model_version) for r in after} == {("dqn", 1)}
    actor.close()


@pytest.mark.parametrize("background", [True, False])
def test_a_model_whose_scorer_fails_is_rejected_and_the_previous_one_serves_on(
    monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    bus = EmbeddedBus()
    actor, registry = make_actor(bus, "dqn=1", background_compile=background)
    first = tiny_model()
    actor._stage("dqn", first)
    actor.wait_for_models(timeout_s=60)
    assert actor.model is first

    def broken(model: LiveModel) -> None:
        raise RuntimeError("XLA ran out of memory")

    monkeypatch.setattr(actor, "_warm_model", broken)
    actor._stage("dqn", tiny_model())
    actor.wait_for_models(timeout_s=60)
    assert actor.model is first, "the previous model keeps serving"
    assert registry.get_sample_value("qrec_actor_model_rejected_total") == 1
    assert registry.get_sample_value("qrec_actor_model_swaps_total") == 1
    assert {r.policy for r in serve_views(actor, 0, 6)} == {"dqn"}
    actor.close()


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_an_item_made_unavailable_mid_stream_leaves_later_slates(
    bootstrap_servers: str, unique_name: Callable[[str], str]
) -> None:
    bus = KafkaBus(KafkaSettings(bootstrap_servers=bootstrap_servers))
    names = {n: unique_name(n) for n in ("state", "recs", "model", "dead", "catalogue")}
    bus.create_topics(
        [
            TopicSpec(names["state"], 2, {"cleanup.policy": "compact"}),
            TopicSpec(names["recs"], 2),
            TopicSpec(names["model"], 1, {"cleanup.policy": "compact"}),
            TopicSpec(names["dead"], 1),
            TopicSpec(names["catalogue"], 1, {"cleanup.policy": "compact"}),
        ]
    )
    config = ActorConfig(
        bootstrap_servers=bootstrap_servers,
        user_state_topic=names["state"],
        recommendations_topic=names["recs"],
        model_topic=names["model"],
        dead_letter_topic=names["dead"],
        catalogue_topic=names["catalogue"],
        group_id=unique_name("actors"),
        policies="popularity=1",
        slate_size=6,
        popularity_candidates=8,
        create_topics=False,
    )
    producer = bus.producer()
    producer.send(names["catalogue"], b"sku-0", catalogue_record("sku-0", True))
    producer.flush()
    actor = Actor(config, bus)
    actor.load_catalogue(timeout_s=30)
    actor.consumer.subscribe([names["state"]])

    def publish(first: int, count: int) -> set[str]:
        states = [state(f"u-{i}", f"e-{i}", ITEMS[i % 6]) for i in range(first, first + count)]
        for s in states:
            producer.send(names["state"], s.user_id.encode(), encode(s))
        producer.flush()
        return {s.source_event_id for s in states}

    def served(wanted: set[str]) -> list[Recommendation]:
        found: dict[str, Recommendation] = {}
        deadline = time.monotonic() + 60
        while not wanted <= found.keys() and time.monotonic() < deadline:
            actor.poll_once(timeout_s=0.2)
            for record in read_topic(bus, names["recs"]):
                rec = msgspec_decode(record.value)
                if rec.source_event_id in wanted:
                    found[rec.source_event_id] = rec
        assert wanted <= found.keys(), f"served {len(found)} of {len(wanted)}"
        return [found[event] for event in sorted(wanted, key=lambda e: int(e[2:]))]

    try:
        before = served(publish(0, 30))
        # Six slots, six items: once every item was seen, every slate holds sku-3.
        assert any("sku-3" in {i.item_id for i in rec.items} for rec in before)
        producer.send(names["catalogue"], b"sku-3", catalogue_record("sku-3", False))
        producer.send(names["catalogue"], b"sku-5", None)
        producer.flush()
        wait_until(
            lambda: (
                actor.refresh_catalogue(timeout_s=0.2) >= 0
                and actor.catalogue is not None
                and actor.catalogue.unavailable == {"sku-3", "sku-5"}
            ),
            timeout_s=30,
            what="the actor to read the catalogue update",
        )
        after = served(publish(100, 30))
        for rec in after:
            items = {i.item_id for i in rec.items}
            assert not items & {"sku-3", "sku-5"}, rec
            assert items == {"sku-0", "sku-1", "sku-2", "sku-4"}  # six slots, four items left
    finally:
        actor.close()
        bus.close()


def msgspec_decode(value: bytes | None) -> Recommendation:
    from schemas.codec import RECOMMENDATIONS

    rec = RECOMMENDATIONS.decode(value)
    assert isinstance(rec, Recommendation)
    return rec

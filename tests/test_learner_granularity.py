"""Action granularity: categories or brands as actions, in the learner, its checkpoints and its models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jsonschema import Draft202012Validator
from prometheus_client import CollectorRegistry

import schemas
from rl.networks import q_values
from rl.vocabulary import ItemGroups
from schemas.codec import TRANSITIONS, DecodeError, encode
from schemas.messages import ClickEvent, Observation, Transition
from services.actor.granularity import (
    GroupCatalogue,
    best_item,
    items_for_groups,
    servable_group_mask,
    window_action_ids,
)
from services.bus.embedded import EmbeddedBus
from services.config import ConfigError
from services.learner.config import LearnerServiceConfig, TrainConfig
from services.learner.offline import logged_transitions
from services.learner.service import Learner, model_header_config
from services.learner.trainer import Trainer, action_id, load_bundle

SCHEMA_DIR = Path(schemas.__file__).parent / "json" / "transition"
GOLDEN_DIR = Path(__file__).parent / "golden" / "transition"
TINY = {
    "window": 3,
    "vocabulary_capacity": 4,
    "embed_dim": 8,
    "hidden_sizes": "16",
    "batch_size": 16,
    "updates_per_call": 4,
    "replay_capacity": 1000,
    "target_update_period": 20,
    "learning_rate": 0.01,
}


# One-step tasks (gamma 0): Q(s, a) converges to the mean reward. Shared, so the update compiles once.
BANDIT: dict[str, Any] = {"gamma": 0.0, "updates_per_call": 50}
# Eager application dispatches every small op on its own (seconds); compiled it is milliseconds.
q_values_jit = jax.jit(q_values, static_argnums=0)


def obs(items: list[str], features: list[float]) -> Observation:
    return Observation(
        recent_items=items,
        recent_event_types=["view"] * len(items),
        recent_gaps_seconds=[0.0] * len(items),
        features=features,
    )


def transition(
    tid: str,
    item: str,
    *,
    category: str | None = None,
    brand: str | None = None,
    window: list[str] | None = None,
    features: list[float] | None = None,
    reward: float = 0.0,
    done: bool = False,
    user: str = "u1",
) -> Transition:
    state = obs(window or [], features or [0.0, 0.0])
    return Transition(
        transition_id=tid,
        user_id=user,
        source="logged",
        obs_tm1=state,
        a_tm1=item,
        r_t=reward,
        obs_t=state,
        done=done,
        timestamp=1,
        a_tm1_category=category,
        a_tm1_brand=brand,
    )


def trainer(granularity: str, **overrides: Any) -> Trainer:
    config = TrainConfig(from_log="unused.csv", action_granularity=granularity, **{**TINY, **overrides})
    return Trainer(config, feature_dim=2)


# --- the schema change ----------------------------------------------------------------------------


def test_transition_category_and_brand_round_trip_and_only_1_0_1_allows_them() -> None:
    message = transition("t-1", "sku-1", category="shoes", brand="acme")
    encoded = encode(message)
    assert json.loads(encoded)["a_tm1_category"] == "shoes"
    assert json.loads(encoded)["a_tm1_brand"] == "acme"
    assert TRANSITIONS.decode(encoded) == message
    new = Draft202012Validator(json.loads((SCHEMA_DIR / "1-0-1.json").read_text()))
    old = Draft202012Validator(json.loads((SCHEMA_DIR / "1-0-0.json").read_text()))
    assert new.is_valid(json.loads(encoded))
    assert not old.is_valid(json.loads(encoded))  # 1-0-0 is closed: the fields are an addition
    # Every 1-0-0 transition stays valid and decodes with the new fields absent.
    old_golden = (GOLDEN_DIR / "1-0-0.json").read_bytes()
    assert new.is_valid(json.loads(old_golden))
    decoded = TRANSITIONS.decode(old_golden)
    assert isinstance(decoded, Transition)
    assert decoded.a_tm1_category is None and decoded.a_tm1_brand is None
    assert b"a_tm1_category" not in encode(decoded)
    golden = TRANSITIONS.decode((GOLDEN_DIR / "1-0-1.json").read_bytes())
    assert isinstance(golden, Transition)
    assert (golden.a_tm1, golden.a_tm1_category, golden.a_tm1_brand) == ("sku-20981", "shoes", "acme")
    bad = TRANSITIONS.decode(encoded.replace(b'"shoes"', b'""'))
    assert isinstance(bad, DecodeError) and bad.reason_code == "invalid_value"


def test_logged_transitions_carry_the_events_category_and_brand(tmp_path: Path) -> None:
    def event(n: int, item: str, **extra: Any) -> ClickEvent:
        return ClickEvent(
            event_id=f"e{n}",
            user_id="u1",
            session_id="s1",
            event_type="view",
            timestamp=1_700_000_000_000 + n * 1000,
            item_id=item,
            **extra,
        )

    log = tmp_path / "events.jsonl"
    events = [event(1, "i1", category="shoes", brand="acme"), event(2, "i2", category="hats"), event(3, "i3")]
    log.write_bytes(b"".join(encode(e) + b"\n" for e in events))
    found = sorted(logged_transitions(log, "jsonl"), key=lambda t: t.timestamp)
    assert [(t.a_tm1, t.a_tm1_category, t.a_tm1_brand) for t in found] == [
        ("i1", "shoes", "acme"),
        ("i2", "hats", None),
        ("i3", None, None),
    ]


# --- mapping transitions to actions ---------------------------------------------------------------


def test_action_id_per_granularity() -> None:
    full = transition("t", "sku-1", category="shoes", brand="acme")
    bare = transition("t", "sku-2")
    assert [action_id(full, g) for g in ("item", "category", "brand")] == ["sku-1", "shoes", "acme"]
    assert [action_id(bare, g) for g in ("item", "category", "brand")] == ["sku-2", None, None]


def test_category_vocabulary_windows_and_skipped_transitions() -> None:
    learner = trainer("category")
    batch = [
        transition("t1", "i1", category="shoes"),
        transition("t2", "i2", category="hats", window=["i1"]),
        transition("t3", "i3", window=["i1", "i2"]),  # no category: skipped
        transition("t4", "i4", category="shoes", window=["i9", "i1", "i2"]),  # i9 never acted on
        transition("t1", "i1", category="shoes"),  # duplicate id
    ]
    assert learner.add(batch) == 3
    assert learner.unusable == 1
    assert learner.vocabulary.ids_for(range(6)) == [None, None, "shoes", "hats", None, None]
    assert learner.item_groups.entries() == [("i1", "shoes", 1), ("i2", "hats", 1), ("i4", "shoes", 1)]
    arrays = learner.to_batch([batch[0], batch[1], batch[3]])
    np.testing.assert_array_equal(arrays.a_tm1, [2, 3, 2])
    # Window items read as their categories (left padding 0; an item of unknown category is OOV 1).
    np.testing.assert_array_equal(arrays.obs_tm1.items, [[0, 0, 0], [0, 0, 2], [1, 2, 3]])
    assert learner.window_ids(["i9", "i1", "i2"]) == ["shoes", "hats"]
    assert len(learner.buffer) == 3


def test_brand_granularity_uses_brands_and_item_granularity_is_unchanged() -> None:
    brands = trainer("brand")
    items = trainer("item")
    batch = [
        transition("t1", "i1", category="shoes", brand="acme"),
        transition("t2", "i2", category="shoes", brand="zenith", window=["i1"]),
    ]
    assert brands.add(batch) == 2 and items.add(batch) == 2
    assert brands.vocabulary.ids_for([2, 3]) == ["acme", "zenith"]
    np.testing.assert_array_equal(brands.to_batch(batch).obs_tm1.items[1], [0, 0, 2])
    assert items.vocabulary.ids_for([2, 3]) == ["i1", "i2"]
    np.testing.assert_array_equal(items.to_batch(batch).a_tm1, [2, 3])
    assert items.unusable == 0 and len(items.item_groups) == 0


def test_unknown_granularity_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="action_granularity must be one of item, category, brand"):
        TrainConfig(from_log="x.csv", action_granularity="colour")


@pytest.mark.timeout(120)
def test_a_category_learner_learns_the_better_category_in_each_context() -> None:
    """Two contexts, two categories of two items each; context A rewards shoes, context B hats."""
    learner = trainer("category", **BANDIT)
    context_a, context_b = [1.0, 0.0], [0.0, 1.0]
    batch = []
    for repeat in range(8):
        for features, good in ((context_a, "shoes"), (context_b, "hats")):
            for item, category in (("s1", "shoes"), ("s2", "shoes"), ("h1", "hats"), ("h2", "hats")):
                batch.append(
                    transition(
                        f"{repeat}-{features}-{item}",
                        item,
                        category=category,
                        features=features,
                        reward=1.0 if category == good else 0.0,
                        done=True,
                    )
                )
    assert learner.add(batch) == 64
    metrics = learner.train(400)
    assert metrics.updates == 400
    shoes, hats = learner.vocabulary.lookup(["shoes", "hats"])
    states = learner.to_batch([batch[0], batch[4]]).obs_tm1  # context A, context B
    q = np.asarray(q_values_jit(learner.network, learner.state.params, states))  # (2, A)
    assert q.shape == (2, 6)
    # gamma 0 and done: Q(s, category) converges to the mean reward of that category in s.
    np.testing.assert_allclose(q[0, [shoes, hats]], [1.0, 0.0], atol=0.1)
    np.testing.assert_allclose(q[1, [shoes, hats]], [0.0, 1.0], atol=0.1)
    assert np.argmax(np.where(learner.action_mask(), q[0], -np.inf)) == shoes
    assert np.argmax(np.where(learner.action_mask(), q[1], -np.inf)) == hats


# --- published models and checkpoints -------------------------------------------------------------


def test_the_bundle_and_header_say_the_granularity() -> None:
    learner = trainer("category")
    learner.add([transition("t1", "i1", category="shoes"), transition("t2", "i2", category="hats")])
    network_config, bundle = load_bundle(learner.bundle_bytes())
    assert bundle.granularity == "category" and network_config.num_actions == 6
    assert ItemGroups.from_bytes(bundle.item_groups).entries() == [("i1", "shoes", 1), ("i2", "hats", 1)]
    config = TrainConfig(from_log="x.csv", action_granularity="brand")
    assert model_header_config(config)["action_granularity"] == "brand"
    _, item_bundle = load_bundle(trainer("item").bundle_bytes())
    assert item_bundle.granularity == "item" and item_bundle.item_groups == b""


def _learner_config(tmp_path: Path, granularity: str) -> LearnerServiceConfig:
    return LearnerServiceConfig(
        checkpoint_dir=str(tmp_path / "ckpt"),
        partitions=1,
        action_granularity=granularity,
        min_replay_size=8,
        publish_every_steps=4,
        **{**TINY, "batch_size": 4},  # type: ignore[arg-type]
    )


@pytest.mark.timeout(120)
def test_category_learner_counts_unusable_transitions_and_resumes_only_as_category(
    tmp_path: Path,
) -> None:
    bus = EmbeddedBus()
    registry = CollectorRegistry()
    config = _learner_config(tmp_path, "category")
    learner = Learner(config, bus, registry)
    producer = bus.producer()
    for n in range(12):
        category = None if n % 4 == 3 else ("shoes" if n % 2 else "hats")
        message = transition(f"t{n}", f"i{n}", category=category, features=[1.0] * 61)
        producer.send(config.transitions_topic, b"u1", encode(message))
    producer.send(config.transitions_topic, b"u1", encode(transition("t0", "i0", category="hats")))
    producer.flush()
    while learner.poll_once(timeout_s=0.01):
        pass
    assert (
        registry.get_sample_value("qrec_learner_unusable_transitions_total", {"reason": "no_category"}) == 3
    )
    assert registry.get_sample_value("qrec_learner_duplicate_transitions_total") == 1
    assert registry.get_sample_value("qrec_learner_transitions_total") == 9
    assert learner.learned == 9 and learner.trainer.vocabulary.ids_for([2, 3]) == ["hats", "shoes"]
    learner.publish()
    learner.close()
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert meta["action_granularity"] == "category"
    resumed = Learner(config, bus, CollectorRegistry())
    assert resumed.trainer.item_groups.entries() == learner.trainer.item_groups.entries()
    assert resumed.trainer.vocabulary.ids_for(range(6)) == [None, None, "hats", "shoes", None, None]
    resumed.close()
    with pytest.raises(RuntimeError, match="has category actions, not item"):
        Learner(_learner_config(tmp_path, "item"), bus, CollectorRegistry())


# --- serving a category model (services/actor/granularity.py) --------------------------------------


CATALOGUE = GroupCatalogue.from_entries(
    [
        ("s1", "shoes", 5),
        ("s2", "shoes", 9),
        ("s3", "shoes", 9),
        ("h1", "hats", 2),
        ("x1", "old", 1),
        ("x1", "socks", 4),  # re-categorised: the last row wins
    ]
)


def test_group_catalogue_ranks_items_by_popularity_then_id() -> None:
    assert dict(CATALOGUE.items_by_group) == {
        "shoes": ("s2", "s3", "s1"),
        "hats": ("h1",),
        "socks": ("x1",),
    }
    assert CATALOGUE.group_of["x1"] == "socks"
    assert window_action_ids(["s1", "zz", "x1"], CATALOGUE) == ["shoes", None, "socks"]


def test_a_group_slate_becomes_the_most_popular_items_not_shown_or_bought() -> None:
    assert items_for_groups(["shoes", "hats"], CATALOGUE, exclude=set()) == ["s2", "h1"]
    assert items_for_groups(["shoes", "hats"], CATALOGUE, exclude={"s2", "h1"}) == ["s3", None]
    # A group twice in a slate (never from the slate functions, but possible) still gives distinct items.
    assert items_for_groups(["shoes", "shoes", "shoes", "shoes"], CATALOGUE, exclude={"s3"}) == [
        "s2",
        "s1",
        None,
        None,
    ]
    assert items_for_groups(["shoes"], CATALOGUE, exclude=set(), available={"s1", "s3"}) == ["s3"]
    assert best_item("unknown", CATALOGUE, exclude=set()) is None


def test_servable_group_mask_blocks_groups_with_nothing_left() -> None:
    action_ids = [None, None, "shoes", "hats", "socks", "gloves"]
    np.testing.assert_array_equal(
        servable_group_mask(action_ids, CATALOGUE, exclude={"h1"}),
        [False, False, True, False, True, False],
    )
    np.testing.assert_array_equal(
        servable_group_mask(action_ids, CATALOGUE, exclude=set(), available={"x1"}),
        [False, False, False, False, True, False],
    )


def test_a_trained_category_model_serves_items_end_to_end() -> None:
    """Bundle -> catalogue -> scores -> top category -> item, with the learner's own popularity."""
    learner = trainer("category", **BANDIT)
    batch = [
        transition(f"t{n}", item, category=category, features=[1.0, 0.0], reward=reward, done=True)
        for n, (item, category, reward) in enumerate(
            [("s1", "shoes", 1.0), ("s2", "shoes", 1.0), ("s2", "shoes", 1.0), ("h1", "hats", 0.0)] * 4
        )
    ]
    learner.add(batch)
    learner.train(200)
    _, bundle = load_bundle(learner.bundle_bytes())
    catalogue = GroupCatalogue.from_entries(ItemGroups.from_bytes(bundle.item_groups).entries())
    assert catalogue.items_by_group["shoes"] == ("s2", "s1")  # s2 acted on 8 times, s1 4 times
    action_ids = learner.vocabulary.ids_for(range(learner.vocabulary.num_actions))
    mask = servable_group_mask(action_ids, catalogue, exclude=set())
    states = learner.to_batch(batch[:1]).obs_tm1
    q = np.asarray(q_values_jit(learner.network, learner.state.params, states))[0]  # (A,)
    ranked = [action_ids[i] for i in np.argsort(-np.where(mask, q, -np.inf))[: int(mask.sum())]]
    assert ranked == ["shoes", "hats"]
    assert items_for_groups([g for g in ranked if g], catalogue, exclude={"s2"}) == ["s1", "h1"]
    assert jax.device_get(learner.state.step) == 200

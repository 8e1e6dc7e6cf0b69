"""An actor serving a category-level model: the model picks categories, the shopper gets items."""

from __future__ import annotations

from schemas.messages import ModelUpdateHeader
from services.actor.model import LiveModel
from services.bus.embedded import EmbeddedBus
from services.model_topic import AssembledModel
from tests.test_actor_catalogue import make_actor, records, state
from tests.test_learner_granularity import BANDIT, trainer, transition


def category_model() -> LiveModel:
    """Shoes pay, hats do not; s2 is the most acted-on shoe, then s1."""
    learner = trainer("category", **BANDIT)
    learner.add(
        [
            transition(f"t{n}", item, category=category, features=[0.0, 1.0], reward=reward, done=True)
            for n, (item, category, reward) in enumerate(
                [("s1", "shoes", 1.0), ("s2", "shoes", 1.0), ("s2", "shoes", 1.0), ("h1", "hats", 0.0)] * 4
            )
        ]
    )
    learner.train(200)
    data = learner.bundle_bytes()
    header = ModelUpdateHeader(
        model_version=1,
        step=200,
        created_at=1,
        vocabulary_size=len(learner.vocabulary),
        num_chunks=1,
        total_bytes=len(data),
        sha256="0" * 64,
        encoding="qrec-bundle-msgpack-1",
        config={},
    )
    return LiveModel.from_assembled(AssembledModel(header, data))


def test_a_category_model_serves_each_categorys_most_popular_item_the_user_may_see() -> None:
    model = category_model()
    assert model.granularity == "category" and model.groups is not None
    actor, _ = make_actor(EmbeddedBus(), "dqn=1", epsilon=0.0)
    actor.model = model
    fresh, bought = state("u-1", "e-1", "s1"), state("u-2", "e-2", "s1", purchased=("s2",))
    first, second = actor.serve(records([fresh, bought]))
    # Greedy over categories: shoes first, then hats, each as its most popular item not excluded.
    assert [item.item_id for item in first.items] == ["s2", "h1"]
    assert [item.item_id for item in second.items] == ["s1", "h1"]
    assert first.policy == "dqn" and first.model_version == 1
    assert [item.propensity for item in first.items] == [1.0, 1.0]

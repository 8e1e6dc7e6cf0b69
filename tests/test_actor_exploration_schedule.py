"""The actor's exploration decays with the training step of the model it serves (rl.exploration)."""

from __future__ import annotations

import dataclasses

import pytest

from services.actor.config import ActorConfig
from services.bus.embedded import EmbeddedBus
from services.config import ConfigError
from tests.test_actor_catalogue import make_actor, records, state
from tests.test_actor_granularity import category_model


def first_slot(epsilon: float, item_id: str) -> float:
    """Propensity of the first slot's item over two categories: greedy (shoes: s1, s2) or not (hats)."""
    return (1.0 - epsilon) * item_id.startswith("s") + epsilon / 2


def test_epsilon_decays_linearly_with_the_served_models_training_step() -> None:
    model = category_model()  # trained 200 steps
    actor, registry = make_actor(
        EmbeddedBus(), "dqn=1", epsilon=1.0, epsilon_end=0.25, exploration_decay_steps=400
    )
    for step, epsilon in ((0, 1.0), (200, 0.625), (400, 0.25), (10_000, 0.25)):
        actor.model = dataclasses.replace(model, step=step)
        slates = actor.serve(records([state(f"u-{step}-{n}", f"e-{step}-{n}", "s1") for n in range(20)]))
        gauge = registry.get_sample_value("qrec_actor_exploration", {"policy": "dqn"})
        assert gauge == pytest.approx(epsilon)
        for rec in slates:
            first = rec.items[0]
            assert first.propensity == pytest.approx(first_slot(epsilon, first.item_id), rel=1e-5)
        explored = sum(rec.items[0].item_id.startswith("h") for rec in slates)
        if epsilon == 0.25:
            assert explored <= 8  # about 2.5 of 20 expected (epsilon / 2 per slot)
        elif epsilon == 1.0:
            assert explored >= 4  # about 10 of 20 expected


def test_without_an_end_value_exploration_ignores_the_step() -> None:
    model = category_model()
    actor, registry = make_actor(EmbeddedBus(), "dqn=1", epsilon=0.3)
    for step in (0, 200, 1_000_000):
        actor.model = dataclasses.replace(model, step=step)
        [rec] = actor.serve(records([state(f"u-{step}", f"e-{step}", "s1")]))
        assert registry.get_sample_value("qrec_actor_exploration", {"policy": "dqn"}) == pytest.approx(0.3)
        assert rec.items[0].propensity == pytest.approx(first_slot(0.3, rec.items[0].item_id), rel=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{"epsilon_end": 1.5}, {"epsilon_end": -0.1}, {"temperature_end": 0.0}, {"exploration_decay_steps": 0}],
)
def test_bad_schedules_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ActorConfig(**overrides)  # type: ignore[arg-type]


def test_softmax_temperature_decays_geometrically_with_the_step() -> None:
    model = category_model()
    actor, registry = make_actor(
        EmbeddedBus(),
        "dqn=1",
        exploration="softmax",
        temperature=2.0,
        temperature_end=0.5,
        exploration_decay_steps=100,
    )
    for step, temperature in ((0, 2.0), (50, 1.0), (100, 0.5), (5_000, 0.5)):
        actor.model = dataclasses.replace(model, step=step)
        [rec] = actor.serve(records([state(f"u-{step}", f"e-{step}", "s1")]))
        gauge = registry.get_sample_value("qrec_actor_exploration", {"policy": "dqn"})
        assert gauge == pytest.approx(temperature, rel=1e-6)
        assert 0 < rec.items[0].propensity < 1  # softmax over two categories: neither is certain

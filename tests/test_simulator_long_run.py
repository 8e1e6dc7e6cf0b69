"""The simulator's oracle and long-run reward: the oracle's slate is the argmax of the true expected
reward, and a cart filled from a slate pays that slate later."""

from __future__ import annotations

import numpy as np

from schemas.messages import Recommendation, RecommendedItem
from services.simulator import REWARD_WEIGHTS, ShopperSimulator, SimulatorConfig

START = SimulatorConfig().start_time_ms


def _expected_reward(sim: ShopperSimulator, user_id: str, now_ms: int) -> np.ndarray:
    """Expected reward of each item alone at the top of a slate, from the true utilities directly."""
    cfg = sim.config
    user = sim.user_ids.index(user_id)
    utilities = sim.true_utilities(user_id, now_ms)
    rewards = np.zeros_like(utilities)
    for i, utility in enumerate(utilities.tolist()):
        liking = 1.0 / (1.0 + np.exp(cfg.no_click_utility - utility))
        price_term = sim._sensitivity[user] * sim.catalogue.log_price_relative[i]
        p_buy = cfg.purchase_probability_scale / (1.0 + np.exp(cfg.no_click_utility + price_term - utility))
        after_click = (
            REWARD_WEIGHTS["click"]
            + REWARD_WEIGHTS["favorite"] * cfg.favorite_probability * liking
            + cfg.cart_probability_scale
            * liking
            * (REWARD_WEIGHTS["add_to_cart"] + REWARD_WEIGHTS["purchase"] * p_buy)
        )
        rewards[i] = cfg.slate_examine_probability * liking * after_click
    return rewards


def test_oracle_slate_is_the_argmax_of_the_true_expected_reward() -> None:
    sim = ShopperSimulator(SimulatorConfig(num_items=300, num_users=20, seed=3))
    for user_id in sim.user_ids[:5]:
        sim.start_session(user_id, START)
        sim.step_session(user_id)
        rewards = _expected_reward(sim, user_id, START)
        np.testing.assert_allclose(sim.expected_click_rewards(user_id, START), rewards, rtol=1e-9)
        best_first = [sim.item_ids[i] for i in np.argsort(-rewards, kind="stable")[:5]]
        assert sim.oracle_slate(user_id, 5, START) == best_first


def test_a_purchase_of_an_item_carted_from_a_slate_carries_its_rec_id() -> None:
    sim = ShopperSimulator(SimulatorConfig(num_items=200, num_users=100, no_click_utility=1.0, seed=4))
    carted: dict[tuple[str, str], str] = {}
    late_purchases = 0
    now = START
    for _ in range(30 * 20):
        now += 2000
        for event in sim.advance(now):
            if event.event_type == "purchase" and event.rec_id is not None:
                assert carted.pop((event.user_id, event.item_id or "")) == event.rec_id
                late_purchases += 1
            if event.event_type != "view":
                continue
            rec = Recommendation(
                rec_id=f"rec-{event.event_id}",
                user_id=event.user_id,
                items=[
                    RecommendedItem(item_id=i, score=0.0, propensity=1.0)
                    for i in sim.oracle_slate(event.user_id, 5, now)
                ],
                policy="oracle",
                model_version=0,
                explored=False,
                source_event_id=event.event_id,
                event_timestamp=event.timestamp,
                created_at=event.timestamp,
            )
            response = sim.respond(rec, event.timestamp)
            types = [e.event_type for e in response]
            if "add_to_cart" in types and "purchase" not in types:
                carted[(event.user_id, response[0].item_id or "")] = rec.rec_id
    assert late_purchases > 5, "carts filled from slates are bought later, at checkout"

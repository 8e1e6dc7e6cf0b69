"""The shopper simulator and its Gymnasium env: determinism, valid ordered events, a choice model
that rewards good slates, position bias, drift, and the Gymnasium API."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import services.simulator  # noqa: F401 (registers qrec/Shopper-v0)
from schemas.codec import CLICK_EVENTS, encode
from schemas.messages import ClickEvent, Recommendation, RecommendedItem
from services.config import ConfigError
from services.simulator import ENV_ID, REWARD_WEIGHTS, ShopperSimulator, SimulatorConfig
from services.simulator.env import ShopperEnv, observation_size

START = SimulatorConfig().start_time_ms
MINUTE = 60_000
DAY = 86_400_000


def _rec(
    rec_id: str, user_id: str, items: list[str], policy: str = "test", session_id: str | None = None
) -> Recommendation:
    return Recommendation(
        rec_id=rec_id,
        user_id=user_id,
        items=[RecommendedItem(item_id=item, score=0.0, propensity=1.0) for item in items],
        policy=policy,
        model_version=0,
        explored=False,
        source_event_id="e",
        event_timestamp=0,
        created_at=0,
        session_id=session_id,
    )


def _closed_loop(
    sim: ShopperSimulator, minutes: int, policy: str = "random", seed: int = 1
) -> list[ClickEvent]:
    """Advance in 2 s ticks and answer every opportunity with a slate; events in delivery order."""
    rng = np.random.default_rng(seed)
    delivered: list[ClickEvent] = []
    now, count = sim.config.start_time_ms, 0
    for _ in range(minutes * 30):
        now += 2000
        organic = sim.advance(now)
        delivered.extend(organic)
        for event in organic:
            if event.event_type not in ("view", "rec_request"):
                continue
            count += 1
            if policy == "oracle":
                items = sim.oracle_slate(event.user_id, 10, event.timestamp)
            else:
                items = [sim.item_ids[i] for i in rng.choice(sim.config.num_items, 10, replace=False)]
            rec = _rec(f"rec-{count}", event.user_id, items, policy, event.session_id)
            delivered.extend(sim.respond(rec, event.timestamp + 20))
    return delivered


def test_ids_follow_the_documented_formats() -> None:
    sim = ShopperSimulator(SimulatorConfig(num_items=120, num_categories=12, num_brands=5, num_users=3))
    assert sim.item_ids[42] == "sku-00042" and len(sim.item_ids) == 120
    assert sim.catalogue.category_ids[7] == "cat-07" and sim.catalogue.brand_ids[4] == "brand-04"
    assert sim.user_ids == ("shopper-0000", "shopper-0001", "shopper-0002")
    assert sim.item_index("sku-00042") == 42 and sim.item_index("sku-x") is None
    assert (sim.catalogue.price > 0).all() and np.array_equal(
        sim.catalogue.price, sim.catalogue.price.round(2)
    )


def test_config_rejects_bad_values_and_unknown_keys_by_name() -> None:
    with pytest.raises(ConfigError, match="num_items"):
        SimulatorConfig(num_items=0)
    with pytest.raises(ConfigError, match="favorite_probability"):
        SimulatorConfig(favorite_probability=1.5)
    with pytest.raises(ConfigError, match="price_sensitivity_max"):
        SimulatorConfig(price_sensitivity_min=2.0, price_sensitivity_max=1.0)
    with pytest.raises(ConfigError, match="num_itemz"):
        SimulatorConfig.from_mapping({"num_itemz": 5})
    assert SimulatorConfig.from_mapping({"num_items": 5}).num_items == 5


def test_same_seed_same_events_and_another_seed_other_events() -> None:
    def run(seed: int) -> list[bytes]:
        return [encode(e) for e in _closed_loop(ShopperSimulator(SimulatorConfig(seed=seed)), minutes=4)]

    first = run(3)
    assert len(first) > 200
    assert run(3) == first
    assert run(4) != first


def test_queries_do_not_change_the_behaviour() -> None:
    """Oracle and utility queries (an evaluation harness) leave the event stream as it was."""
    plain, probed = ShopperSimulator(), ShopperSimulator()
    for minute in range(1, 6):
        now = START + minute * MINUTE
        probed.true_utilities("shopper-0001", now + DAY)
        probed.oracle_slate("shopper-0002", 5, now)
        assert probed.advance(now) == plain.advance(now)


def test_events_are_valid_in_time_order_and_unique() -> None:
    sim = ShopperSimulator()
    organic: list[ClickEvent] = []
    previous_end = 0
    for minute in range(1, 21):
        batch = sim.advance(START + minute * MINUTE)
        stamps = [e.timestamp for e in batch]
        assert stamps == sorted(stamps), "advance returns events in time order"
        assert not stamps or stamps[0] >= previous_end, "and later calls never go back in time"
        previous_end = stamps[-1] if stamps else previous_end
        organic.extend(batch)
    assert len({e.event_id for e in organic}) == len(organic) > 1000
    delivered = organic + _closed_loop(ShopperSimulator(SimulatorConfig(seed=9)), minutes=5)
    types = Counter(e.event_type for e in delivered)
    assert {"view", "click", "add_to_cart", "purchase", "favorite", "rec_request"} <= set(types)
    assert types["view"] > types["add_to_cart"] > 0
    for event in delivered:
        assert CLICK_EVENTS.decode(encode(event)) == event
        assert event.user_id.startswith("shopper-") and event.session_id.startswith("session-")


def test_each_shopper_sees_time_move_forward_through_responses() -> None:
    per_user: dict[str, list[int]] = defaultdict(list)
    for event in _closed_loop(ShopperSimulator(SimulatorConfig(no_click_utility=2.0)), minutes=8):
        per_user[event.user_id].append(event.timestamp)
    assert len(per_user) > 50
    for stamps in per_user.values():
        assert stamps == sorted(stamps)


def test_purchases_follow_an_add_to_cart_of_the_same_item_in_the_session() -> None:
    events = _closed_loop(ShopperSimulator(SimulatorConfig(no_click_utility=2.5, seed=5)), minutes=15)
    in_cart: Counter[tuple[str, str]] = Counter()
    purchases = 0
    for event in sorted(events, key=lambda e: (e.user_id, e.timestamp)):
        assert event.item_id is not None or event.event_type == "rec_request"
        key = (event.session_id, event.item_id or "")
        if event.event_type == "add_to_cart":
            assert in_cart[key] == 0, "an item is in the cart at most once"
            in_cart[key] += 1
        elif event.event_type in ("purchase", "remove_from_cart"):
            assert in_cart[key] == 1, f"{event.event_type} of {key} without it in the cart"
            in_cart[key] -= 1
            purchases += event.event_type == "purchase"
    assert purchases > 20


def test_single_item_choice_is_the_logit_against_the_outside_option() -> None:
    """With one item always examined, P(click) = sigmoid(utility - no_click_utility)."""
    config = SimulatorConfig(
        num_items=4, num_users=1, ignored_slate_exit_probability=0.0, session_start_rate_per_minute=0
    )
    sim = ShopperSimulator(config)
    sim.start_session("shopper-0000", START)
    sim.step_session("shopper-0000")
    utility = float(sim.true_utilities("shopper-0000", START)[2])
    expected = 1.0 / (1.0 + math.exp(config.no_click_utility - utility))
    trials = 20_000
    clicks = sum(
        bool(sim.respond(_rec(f"r{i}", "shopper-0000", ["sku-00002"]), START)) for i in range(trials)
    )
    tolerance = 4 * math.sqrt(expected * (1 - expected) / trials) + 1e-3
    assert abs(clicks / trials - expected) < tolerance
    assert sim.stats()["test"]["shown"] == trials and sim.stats()["test"]["clicks"] == clicks


def test_position_zero_is_clicked_more_than_position_nine() -> None:
    config = SimulatorConfig(no_click_utility=2.0, ignored_slate_exit_probability=0.0)
    sim = ShopperSimulator(config)
    rng = np.random.default_rng(0)
    clicks_at: Counter[int] = Counter()
    for user_id in sim.user_ids[:200]:
        sim.start_session(user_id, START)
        sim.step_session(user_id)
        for k in range(40):
            slate = [sim.item_ids[i] for i in rng.choice(config.num_items, 10, replace=False)]
            response = sim.respond(_rec(f"{user_id}-{k}", user_id, slate), START)
            if response:
                clicks_at[slate.index(response[0].item_id or "")] += 1
    assert sum(clicks_at.values()) > 500
    assert clicks_at[0] > 3 * clicks_at[9]
    assert clicks_at[0] > clicks_at[3] > clicks_at[9]


def test_oracle_slates_earn_clearly_more_than_random_slates() -> None:
    sim = ShopperSimulator()
    rng = np.random.default_rng(2)
    now = START
    count = 0
    for _ in range(8 * 30):
        now += 2000
        for event in sim.advance(now):
            if event.event_type not in ("view", "rec_request"):
                continue
            count += 1
            # Alternate the two policies over the same shoppers, one opportunity each.
            if count % 2:
                rec = _rec(f"r{count}", event.user_id, sim.oracle_slate(event.user_id, 10, now), "oracle")
            else:
                items = [sim.item_ids[i] for i in rng.choice(sim.config.num_items, 10, replace=False)]
                rec = _rec(f"r{count}", event.user_id, items, "random")
            sim.respond(rec, event.timestamp + 20)
    stats = sim.stats()
    assert stats["oracle"]["shown"] > 300 and stats["random"]["shown"] > 300
    assert stats["oracle"]["reward_per_shown"] > 5 * stats["random"]["reward_per_shown"]
    assert stats["oracle"]["ctr"] > 3 * stats["random"]["ctr"]
    assert stats["oracle"]["purchases"] > stats["random"]["purchases"]
    oracle = stats["oracle"]
    weighted = sum(REWARD_WEIGHTS[t] * oracle[c] for t, c in [("click", "clicks"), ("add_to_cart", "carts")])
    weighted += (
        REWARD_WEIGHTS["favorite"] * oracle["favorites"] + REWARD_WEIGHTS["purchase"] * oracle["purchases"]
    )
    assert oracle["reward"] == weighted


def test_oracle_excludes_items_and_prefers_high_utility() -> None:
    sim = ShopperSimulator()
    user = "shopper-0007"
    slate = sim.oracle_slate(user, 10, START)
    assert len(set(slate)) == 10
    utilities = sim.true_utilities(user, START)
    picked = [sim.item_ids.index(i) for i in slate]
    assert np.mean(utilities[picked]) > np.percentile(utilities, 99)
    assert sim.oracle_slate(user, 10, START, exclude=slate[:3])[:7] == slate[3:]
    assert sim.oracle_slate(user, 1, START) == slate[:1]
    rewards = sim.expected_click_rewards(user, START)
    assert [rewards[i] for i in picked] == sorted((rewards[i] for i in picked), reverse=True)


def test_slate_value_is_the_expected_reward_of_the_examined_items_multinomial_choice() -> None:
    sim = ShopperSimulator(SimulatorConfig(num_items=50, num_users=5, clickbait_share=0.2))
    user = "shopper-0001"
    ids = sim.item_ids
    utilities = sim.true_utilities(user, START)
    alone = sim.expected_click_rewards(user, START)  # P(click | alone at the top) * E[reward | click]
    appeal = sim.catalogue.clickbait * sim.config.clickbait_appeal
    weight = np.exp(utilities + appeal - sim.config.no_click_utility)  # choice weight against no click
    reward = alone * (1.0 + weight) / weight  # E[reward | click]
    # One item: exactly its expected reward alone at the top.
    assert sim.slate_value(user, [ids[3]], START) == pytest.approx(alone[3], rel=1e-12)
    # Two items at positions 0 and 2 (the repeat and the unknown id at 1 and 3 count nothing):
    # either is examined alone, or both are and they compete for the click.
    e0, e2 = 1.0, 3**-0.8
    a, b = 4, 9
    both = (weight[a] * reward[a] + weight[b] * reward[b]) / (1.0 + weight[a] + weight[b])
    expected = (
        e0 * (1 - e2) * weight[a] / (1 + weight[a]) * reward[a]
        + (1 - e0) * e2 * weight[b] / (1 + weight[b]) * reward[b]
        + e0 * e2 * both
    )
    assert sim.slate_value(user, [ids[a], ids[a], ids[b], "sku-unknown"], START) == pytest.approx(
        expected, rel=1e-12
    )
    assert sim.slate_value(user, [], START) == 0.0
    # Beyond 12 items the expectation is over fixed draws: repeatable, and close to the exact sum
    # over all 2 ** 13 examined subsets.
    thirteen = sim.oracle_slate(user, 13, START)
    index = np.asarray([ids.index(item) for item in thirteen])
    chance = (1.0 + np.arange(13)) ** -0.8
    subsets = ((np.arange(2**13)[:, None] >> np.arange(13)) & 1).astype(bool)
    p_subset = np.where(subsets, chance, 1.0 - chance).prod(axis=1)
    chosen = subsets * weight[index]
    exact = p_subset @ ((chosen / (1.0 + chosen.sum(axis=1, keepdims=True))) @ reward[index])
    sampled = sim.slate_value(user, thirteen, START)
    assert sampled == sim.slate_value(user, thirteen, START)
    assert sampled == pytest.approx(exact, rel=0.02)
    # The oracle's order beats its reverse; asking draws nothing from the shoppers' behaviour.
    best = sim.oracle_slate(user, 10, START)
    assert sim.slate_value(user, best[::-1], START) < sim.slate_value(user, best, START)
    twin = ShopperSimulator(SimulatorConfig(num_items=50, num_users=5, clickbait_share=0.2))
    later = START + 3_600_000
    assert [e.event_id for e in sim.advance(later)] == [e.event_id for e in twin.advance(later)]


def test_preferences_drift_over_simulated_days_along_one_path() -> None:
    sim = ShopperSimulator()
    user = "shopper-0003"
    day_0 = sim.true_utilities(user, START)
    day_1 = sim.true_utilities(user, START + DAY)
    day_7 = sim.true_utilities(user, START + 7 * DAY)
    assert np.abs(day_1 - day_0).mean() > 0.05
    assert np.abs(day_7 - day_0).mean() > np.abs(day_1 - day_0).mean()
    # The path is a function of the seed: skipping the day-1 query gives the same day-7 preferences.
    assert np.array_equal(ShopperSimulator().true_utilities(user, START + 7 * DAY), day_7)
    still = ShopperSimulator(SimulatorConfig(preference_drift_per_day=0.0))
    assert np.array_equal(still.true_utilities(user, START), still.true_utilities(user, START + 7 * DAY))


def test_no_response_without_a_session_or_for_another_session() -> None:
    config = SimulatorConfig(session_start_rate_per_minute=0)
    sim = ShopperSimulator(config)
    assert sim.respond(_rec("r1", "nobody", ["sku-00001"]), START) == []
    assert sim.respond(_rec("r2", "shopper-0001", ["sku-00001"]), START) == []
    session_id = sim.start_session("shopper-0001", START)
    assert sim.active_session_id("shopper-0001") == session_id
    assert sim.respond(_rec("r3", "shopper-0001", ["sku-00001"], session_id="session-old"), START) == []
    assert sim.stats()["test"]["recommendations"] == 3 and sim.stats()["test"]["shown"] == 0
    with pytest.raises(ValueError, match="already has a session"):
        sim.start_session("shopper-0001", START)
    while sim.step_session("shopper-0001"):
        pass
    assert sim.active_session_id("shopper-0001") is None


def test_a_click_carries_the_rec_id_and_lengthens_the_session() -> None:
    def session_length(clicky: bool) -> float:
        config = SimulatorConfig(no_click_utility=-20.0 if clicky else 50.0, session_start_rate_per_minute=0)
        sim = ShopperSimulator(config)
        lengths = []
        for user_id in sim.user_ids[:300]:
            sim.start_session(user_id, START)
            actions = 0
            while events := sim.step_session(user_id):
                actions += 1
                if events[-1].event_type == "view":
                    rec = _rec(f"r-{user_id}-{actions}", user_id, [sim.item_ids[actions]])
                    response = sim.respond(rec, events[-1].timestamp)
                    assert all(e.rec_id == rec.rec_id for e in response)
                    assert bool(response) == clicky
            lengths.append(actions)
        return float(np.mean(lengths))

    assert session_length(clicky=True) > 1.5 * session_length(clicky=False)


def test_env_passes_the_gymnasium_checker() -> None:
    check_env(gymnasium.make(ENV_ID).unwrapped)
    check_env(gymnasium.make(ENV_ID, slate_size=1).unwrapped)
    small = SimulatorConfig(num_items=50, num_categories=3)
    check_env(gymnasium.make(ENV_ID, config=small, slate_size=3, max_steps=5).unwrapped)


def test_gymnasium_make_runs_episodes() -> None:
    env = gymnasium.make(ENV_ID, slate_size=5, max_steps=3)
    assert isinstance(env.unwrapped, ShopperEnv)
    assert env.action_space == gymnasium.spaces.MultiDiscrete([2000] * 5)
    assert env.observation_space.shape == (observation_size(20),)
    env.action_space.seed(0)
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space and info["user_id"].startswith("shopper-")
    outcomes: Counter[str] = Counter()
    for _ in range(30):
        done = False
        while not done:
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            assert obs in env.observation_space and isinstance(reward, float) and reward >= 0
            done = terminated or truncated
        outcomes["truncated" if truncated else "terminated"] += 1
        env.reset()
    assert outcomes["truncated"] > 0 and outcomes["terminated"] > 0
    env.close()
    assert gymnasium.make(ENV_ID, slate_size=1).action_space == gymnasium.spaces.Discrete(2000)


def test_env_episodes_repeat_with_the_seed_and_reward_the_oracle() -> None:
    def play(seed: int, oracle: bool) -> tuple[list[float], list[np.ndarray]]:
        env = ShopperEnv()
        env.action_space.seed(seed)
        rewards, observations = [], []
        _, info = env.reset(seed=seed)
        for _ in range(40):
            done = False
            while not done:
                if oracle:
                    sim = env.simulator
                    slate = sim.oracle_slate(info["user_id"], 10, info["time_ms"])
                    action = np.array([sim.item_index(i) for i in slate])
                else:
                    action = env.action_space.sample()
                obs, reward, terminated, truncated, info = env.step(action)
                rewards.append(reward)
                observations.append(obs)
                done = terminated or truncated
            _, info = env.reset()
        return rewards, observations

    rewards, observations = play(11, oracle=False)
    again, observed_again = play(11, oracle=False)
    assert rewards == again
    assert all(np.array_equal(a, b) for a, b in zip(observations, observed_again, strict=True))
    oracle_rewards, _ = play(11, oracle=True)
    assert np.mean(oracle_rewards) > 5 * np.mean(rewards)
    assert sum(oracle_rewards) > 5 * sum(rewards), "good slates also keep shoppers longer"


def test_env_observation_layout() -> None:
    env = ShopperEnv(config=dataclasses.replace(SimulatorConfig(), num_categories=6))
    obs, _ = env.reset(seed=1)
    c = 6
    assert obs.shape == (2 * c + 13,) and obs.dtype == np.float32
    assert obs[:c].sum() == 1.0, "the landing view puts an item on screen"
    assert obs[c + 4 + 0] == 1.0, "the last event is a view (EVENT_TYPES[0])"
    assert math.isclose(float(obs[c + 2] ** 2 + obs[c + 3] ** 2), 1.0, rel_tol=1e-5)
    assert math.isclose(float(obs[c + 11 : 2 * c + 11].sum()), 1.0, rel_tol=1e-5)
    assert np.argmax(obs[:c]) == np.argmax(obs[c + 11 : 2 * c + 11])


def test_clickbait_off_leaves_the_shop_as_it_was_and_on_marks_exactly_its_share() -> None:
    plain = ShopperSimulator(SimulatorConfig(num_items=200, seed=5))
    off = ShopperSimulator(
        SimulatorConfig(num_items=200, seed=5, clickbait_appeal=3.0, clickbait_exit_probability=1)
    )
    on = ShopperSimulator(SimulatorConfig(num_items=200, seed=5, clickbait_share=0.15))
    assert not plain.catalogue.clickbait.any() and not off.catalogue.clickbait.any()
    assert int(on.catalogue.clickbait.sum()) == 30
    # The clickbait draw has a stream of its own: every other part of the catalogue is unchanged.
    np.testing.assert_array_equal(on.catalogue.price, plain.catalogue.price)
    np.testing.assert_array_equal(on.catalogue.features, plain.catalogue.features)
    # Without clickbait items, its other settings change nothing.
    assert _closed_loop(plain, 20) == _closed_loop(off, 20)
    # Its worth is not its appeal: true utilities leave the appeal out.
    user = on.user_ids[0]
    np.testing.assert_allclose(on.true_utilities(user, START), plain.true_utilities(user, START))


def _clickbait_shop(
    exit_probability: float, no_click_utility: float = 5.0
) -> tuple[ShopperSimulator, str, str]:
    config = SimulatorConfig(
        no_click_utility=no_click_utility,
        num_items=50,
        num_users=400,
        clickbait_share=0.2,
        clickbait_appeal=1.5,
        clickbait_exit_probability=exit_probability,
        ignored_slate_exit_probability=0.0,
        session_start_rate_per_minute=0,
        seed=11,
    )
    sim = ShopperSimulator(config)
    bait = sim.item_ids[int(np.flatnonzero(sim.catalogue.clickbait)[0])]
    honest = sim.item_ids[int(np.flatnonzero(~sim.catalogue.clickbait)[0])]
    return sim, bait, honest


def test_clickbait_is_clicked_more_than_its_worth_and_the_oracle_knows() -> None:
    """P(click) = sigmoid(worth + appeal - no_click_utility); the cart chance follows the worth."""
    sim, bait, _ = _clickbait_shop(0.0)
    user = sim.user_ids[0]
    sim.start_session(user, START)
    sim.step_session(user)
    index = sim.item_index(bait)
    assert index is not None
    worth = float(sim.true_utilities(user, START)[index])
    expected = 1.0 / (1.0 + math.exp(sim.config.no_click_utility - worth - 1.5))
    trials = 20_000
    clicks = sum(bool(sim.respond(_rec(f"r{i}", user, [bait]), START)) for i in range(trials))
    assert abs(clicks / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials) + 1e-3
    liking = 1.0 / (1.0 + math.exp(sim.config.no_click_utility - worth))
    assert expected > 2 * liking  # the appeal is worth clicks, not carts
    cfg = sim.config
    price_term = sim._sensitivity[0] * sim.catalogue.log_price_relative[index]
    p_buy = cfg.purchase_probability_scale / (1.0 + math.exp(cfg.no_click_utility + price_term - worth))
    after_click = (
        REWARD_WEIGHTS["click"]
        + REWARD_WEIGHTS["favorite"] * cfg.favorite_probability * liking
        + cfg.cart_probability_scale
        * liking
        * (REWARD_WEIGHTS["add_to_cart"] + REWARD_WEIGHTS["purchase"] * p_buy)
    )
    value = sim.expected_click_rewards(user, START)[index]
    assert value == pytest.approx(cfg.slate_examine_probability * expected * after_click, rel=1e-9)


@pytest.mark.parametrize("exit_probability", [0.0, 0.5, 1.0])
def test_a_click_on_recommended_clickbait_ends_the_session_with_its_exit_chance(
    exit_probability: float,
) -> None:
    sim, bait, honest = _clickbait_shop(exit_probability, no_click_utility=-20.0)
    ended = {bait: 0, honest: 0}
    clicked = {bait: 0, honest: 0}
    for n, user in enumerate(sim.user_ids):
        item = bait if n % 2 else honest
        sim.start_session(user, START)
        sim.step_session(user)
        # An always-examined single item against a worthless outside option: always clicked.
        response = sim.respond(_rec(f"r{n}", user, [item]), START)
        if not response or response[0].event_type != "click":
            continue
        clicked[item] += 1
        session = sim._sessions[sim.user_ids.index(user)]
        ended[item] += session.remaining_actions == 0
        sim.end_session(user)
    assert clicked[bait] > 100 and clicked[honest] > 50
    assert ended[honest] <= 0.45 * clicked[honest]  # Poisson(1) extension: zero left about 1/e of the time
    share = ended[bait] / clicked[bait]
    if exit_probability == 1.0:
        assert share == 1.0
    else:
        # Left with nothing: let down, or (otherwise) no actions left and no extension drawn.
        base = ended[honest] / clicked[honest]
        expected = exit_probability + (1 - exit_probability) * base
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / clicked[bait]) + 0.05

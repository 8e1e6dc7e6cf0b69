"""Tabular Q-learning over categories: exact updates, state discretisation, slates with propensities."""

from __future__ import annotations

import numpy as np
import pytest

from rl.tabular import (
    TabularConfig,
    TabularModel,
    category_slate,
    length_bucket,
    q_update,
    q_update_in_place,
    state_index,
)


def test_length_buckets_and_state_rows() -> None:
    assert [length_bucket(n, (2, 5)) for n in (0, 1, 2, 3, 5, 6, 100)] == [0, 0, 0, 1, 1, 2, 2]
    config = TabularConfig(num_categories=2, length_edges=(2, 5))
    assert config.num_length_buckets == 3
    assert config.num_states == 9  # (2 categories + none) x 3 buckets
    assert state_index(None, 1, config) == 6
    assert state_index(0, 3, config) == 1
    assert state_index(1, 7, config) == 5
    with pytest.raises(ValueError, match="out of range"):
        state_index(3, 1, config)


def test_q_updates_on_a_hand_made_sequence() -> None:
    q = np.zeros((9, 2))
    # (s_tm1, a_tm1, r_t, discount_t, s_t): two steps of one session, then a repeat, then the end.
    q, td = q_update(q, 6, 0, 1.0, 0.9, 1, 0.5)
    assert td == pytest.approx(1.0)
    assert q[6, 0] == pytest.approx(0.5)
    q, td = q_update(q, 1, 1, 3.0, 0.9, 6, 0.5)
    assert td == pytest.approx(3.45)  # 3 + 0.9 * max(q[6]) = 3 + 0.9 * 0.5
    assert q[1, 1] == pytest.approx(1.725)
    q, td = q_update(q, 6, 0, 0.0, 0.9, 1, 0.5)
    assert td == pytest.approx(0.9 * 1.725 - 0.5)
    assert q[6, 0] == pytest.approx(1.02625)
    before = q.copy()
    q, td = q_update(q, 1, 1, 2.0, 0.0, 5, 0.5)  # the session ended: no bootstrap
    assert td == pytest.approx(0.275)
    assert q[1, 1] == pytest.approx(1.8625)
    assert before[1, 1] == pytest.approx(1.725), "q_update leaves its input alone"
    assert np.count_nonzero(q) == 2
    in_place = before.copy()
    assert q_update_in_place(in_place, 1, 1, 2.0, 0.0, 5, 0.5) == pytest.approx(0.275)
    np.testing.assert_allclose(in_place, q)


def test_category_slate_takes_popular_items_of_epsilon_greedy_categories() -> None:
    q_row = np.array([0.5, 2.0, 1.0])
    ranked = [["a1", "a2"], ["b1", "b2"], ["c1"]]
    # Coins (then random picks) per position: greedy, explore (-> first open category), greedy, greedy.
    uniforms = np.array([0.9, 0.0, 0.1, 0.2, 0.5, 0.0, 0.5, 0.0])
    slate = category_slate(q_row, ranked, {"b1"}, 4, 0.2, uniforms)
    items = [item for item, _, _ in slate]
    assert items == ["b2", "a1", "c1", "a2"]
    propensities = [p for _, p, _ in slate]
    assert propensities == pytest.approx([0.8 + 0.2 / 3, 0.2 / 2, 0.8 + 0.2 / 2, 1.0])
    assert [explored for _, _, explored in slate] == [False, True, False, False]
    # Out of items: the slate is shorter than k.
    assert len(category_slate(q_row, ranked, {"b1"}, 5, 0.2, np.zeros(10))) == 4


def test_model_round_trips_and_rejects_bad_bytes() -> None:
    config = TabularConfig(num_categories=4, length_edges=(2, 5))
    model = TabularModel(
        config=config,
        q=np.arange(30, dtype=np.float64).reshape(15, 2),  # (5 rows x 3 buckets, 2 categories seen)
        categories=["cat-a", "cat-b"],
        ranked_items=[["x"], ["y", "z"]],
        item_category={"x": 0, "y": 1, "z": 1},
    )
    back = TabularModel.from_bytes(model.to_bytes())
    assert back.config == config
    np.testing.assert_array_equal(back.q, model.q)
    assert back.ranked_items == model.ranked_items
    assert back.item_category == model.item_category
    with pytest.raises(ValueError, match="not a tabular Q model"):
        TabularModel.from_bytes(b"{}")
    wrong_rows = TabularModel(config, np.ones((3, 2)), ["cat-a", "cat-b"], [["x"], ["y"]])
    with pytest.raises(ValueError, match="shapes"):
        TabularModel.from_bytes(wrong_rows.to_bytes())


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        TabularConfig(num_categories=2, learning_rate=0.0)
    with pytest.raises(ValueError, match="length_edges"):
        TabularConfig(num_categories=2, length_edges=(5, 2))

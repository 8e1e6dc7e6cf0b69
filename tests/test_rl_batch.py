"""Building ObsBatch / TransitionBatch from python lists: padding, truncation, encodings."""

from __future__ import annotations

import numpy as np
import pytest

from rl.batch import (
    EVENT_TYPE_ORDER,
    NUM_EVENT_TYPES,
    empty_obs_batch,
    encode_observation,
    event_type_indices,
    obs_batch_from_lists,
    pad_recent,
    transition_batch,
)
from schemas.messages import EVENT_TYPES


def test_event_type_order_matches_the_message_schema() -> None:
    # rl/ may not import schemas, so it keeps its own copy; this keeps the copy honest.
    assert EVENT_TYPE_ORDER == EVENT_TYPES
    assert len(EVENT_TYPES) + 1 == NUM_EVENT_TYPES


def test_pad_recent_keeps_the_most_recent_values_at_the_end() -> None:
    np.testing.assert_array_equal(pad_recent([5, 6], 4, 0, np.int32), [0, 0, 5, 6])
    np.testing.assert_array_equal(pad_recent([1, 2, 3, 4, 5, 6], 4, 0, np.int32), [3, 4, 5, 6])
    np.testing.assert_array_equal(pad_recent([], 3, 0, np.int32), [0, 0, 0])
    assert pad_recent([1, 2], 0, 0, np.int32).shape == (0,)


def test_event_type_indices() -> None:
    assert event_type_indices(["view", "rec_request", 3]) == [1, 7, 3]
    with pytest.raises(ValueError, match="teleport"):
        event_type_indices(["teleport"])
    with pytest.raises(ValueError):
        event_type_indices([8])


def test_encode_observation() -> None:
    items, types, gaps, features = encode_observation(
        [7, 8, 9], ["view", "click", "purchase"], [0.0, 10.0, 100.0], [0.5, -1.0], window=2, feature_dim=2
    )
    np.testing.assert_array_equal(items, [8, 9])
    np.testing.assert_array_equal(types, [2, 5])
    np.testing.assert_allclose(gaps, np.log1p([10.0, 100.0]).astype(np.float32))
    np.testing.assert_array_equal(features, [0.5, -1.0])
    assert items.dtype == np.int32 and types.dtype == np.int32
    assert gaps.dtype == np.float32 and features.dtype == np.float32


def test_encode_observation_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expected 3 features"):
        encode_observation([2], ["view"], [0.0], [1.0, 2.0], window=2, feature_dim=3)
    with pytest.raises(ValueError, match="gaps"):
        encode_observation([2], ["view"], [-1.0], [], window=2, feature_dim=0)


def test_obs_batch_from_lists_shapes_and_padding() -> None:
    obs = obs_batch_from_lists(
        [[2], [3, 4, 5, 6]],
        [["view"], ["view", "click", "view", "add_to_cart"]],
        [[0.0], [1.0, 2.0, 3.0, 4.0]],
        [[1.0], [2.0]],
        window=3,
        feature_dim=1,
    )
    assert obs.items.shape == obs.event_types.shape == obs.gaps.shape == (2, 3)
    assert obs.features.shape == (2, 1)
    np.testing.assert_array_equal(obs.items, [[0, 0, 2], [4, 5, 6]])
    np.testing.assert_array_equal(obs.event_types, [[0, 0, 1], [2, 1, 3]])
    assert (obs.batch_size, obs.window, obs.feature_dim) == (2, 3, 1)


def test_transition_batch_turns_done_into_a_zero_discount() -> None:
    obs = empty_obs_batch(3, window=2, feature_dim=4)
    batch = transition_batch(obs, [2, 3, 4], [1.0, 0.0, -1.0], [False, True, False], obs)
    np.testing.assert_array_equal(batch.discount_t, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(batch.weights, [1.0, 1.0, 1.0])
    assert batch.a_tm1.dtype == np.int32 and batch.r_t.dtype == np.float32
    with pytest.raises(ValueError):
        transition_batch(obs, [2, 3], [1.0, 0.0], [False, True], obs)

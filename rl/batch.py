"""Array batches the networks and the learner consume, and numpy helpers that build them from lists.

An observation is a fixed-width window of the user's most recent interactions plus a dense feature
vector. Windows are left-padded, so the most recent interaction always sits in the last column; that
keeps "the last event" at a fixed position whatever the history length.

Index conventions (shared with `rl.vocabulary`):
- items: 0 = padding, 1 = out-of-vocabulary, >= 2 = an action index assigned by the vocabulary.
- event_types: 0 = padding, 1..7 = `EVENT_TYPE_ORDER` (the order of `schemas.messages.EVENT_TYPES`;
  `rl/` may not import `schemas`, so a test keeps the two tuples equal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct
import numpy as np

# Kept identical to schemas.messages.EVENT_TYPES by tests/test_rl_batch.py.
EVENT_TYPE_ORDER: tuple[str, ...] = (
    "view",
    "click",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
    "favorite",
    "rec_request",
)
EVENT_TYPE_INDEX: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPE_ORDER)}
# Padding plus the seven event types: the size of the event-type embedding table.
NUM_EVENT_TYPES = len(EVENT_TYPE_ORDER) + 1

PAD_INDEX = 0
OOV_INDEX = 1
FIRST_ITEM_INDEX = 2

# numpy arrays on the host, jax arrays on the device: the same classes carry both.
Array = Any


@flax.struct.dataclass
class ObsBatch:
    """A batch of observations: the recent-interaction window and the dense features."""

    items: Array  # (B, W) int32: 0 padding, 1 out-of-vocabulary, >= 2 action indices
    event_types: Array  # (B, W) int32: 0 padding, 1..7 in EVENT_TYPE_ORDER
    gaps: Array  # (B, W) float32: log1p(seconds since the previous event)
    features: Array  # (B, D) float32

    def replace(self, **changes: Any) -> ObsBatch:
        """A copy with some fields changed (flax provides it; declared here for type checkers)."""
        return dataclasses.replace(self, **changes)

    @property
    def batch_size(self) -> int:
        return int(self.items.shape[0])

    @property
    def window(self) -> int:
        return int(self.items.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])


@flax.struct.dataclass
class TransitionBatch:
    """A batch of transitions (obs_tm1, a_tm1, r_t, discount_t, obs_t) with importance weights."""

    obs_tm1: ObsBatch
    a_tm1: Array  # (B,) int32 action index
    r_t: Array  # (B,) float32
    discount_t: Array  # (B,) float32: 0 at episode end, else 1; the learner multiplies by gamma
    obs_t: ObsBatch
    weights: Array  # (B,) float32 importance weights, 1 for uniform sampling
    logged: (
        Array  # (B,) float32: 1 when a_tm1 is the user's own choice (a logged transition), 0 for a shown slot
    )

    def replace(self, **changes: Any) -> TransitionBatch:
        """A copy with some fields changed (flax provides it; declared here for type checkers)."""
        return dataclasses.replace(self, **changes)

    @property
    def batch_size(self) -> int:
        return int(self.a_tm1.shape[0])


def check_obs_batch(obs: ObsBatch) -> None:
    """Raise AssertionError unless the four arrays have consistent (B, W) / (B, D) shapes."""
    assert obs.items.ndim == 2, obs.items.shape
    assert obs.event_types.shape == obs.items.shape, (obs.event_types.shape, obs.items.shape)
    assert obs.gaps.shape == obs.items.shape, (obs.gaps.shape, obs.items.shape)
    assert obs.features.ndim == 2 and obs.features.shape[0] == obs.items.shape[0], (
        obs.features.shape,
        obs.items.shape,
    )


def check_transition_batch(batch: TransitionBatch) -> None:
    """Raise AssertionError unless every array of the batch has a consistent shape."""
    check_obs_batch(batch.obs_tm1)
    check_obs_batch(batch.obs_t)
    size = batch.obs_tm1.items.shape[0]
    assert batch.obs_t.items.shape == batch.obs_tm1.items.shape, (
        batch.obs_t.items.shape,
        batch.obs_tm1.items.shape,
    )
    assert batch.obs_t.features.shape == batch.obs_tm1.features.shape
    for name in ("a_tm1", "r_t", "discount_t", "weights", "logged"):
        shape = getattr(batch, name).shape
        assert shape == (size,), f"{name} has shape {shape}, expected ({size},)"


def pad_recent(values: Sequence[Any], window: int, pad_value: Any, dtype: Any) -> np.ndarray:
    """Keep the last `window` values and left-pad to `window`, so the most recent is at the end."""
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    out = np.full((window,), pad_value, dtype=dtype)  # (W,)
    if window == 0:
        return out
    recent = list(values)[-window:]
    if recent:
        out[window - len(recent) :] = np.asarray(recent, dtype=dtype)
    return out


def event_type_indices(event_types: Sequence[str | int]) -> list[int]:
    """Map event-type names (or already-encoded ints 1..7) to their indices; unknown names raise."""
    out = []
    for event_type in event_types:
        if isinstance(event_type, str):
            try:
                out.append(EVENT_TYPE_INDEX[event_type])
            except KeyError:
                raise ValueError(
                    f"unknown event type {event_type!r}; expected one of {EVENT_TYPE_ORDER}"
                ) from None
        else:
            if not 0 <= int(event_type) < NUM_EVENT_TYPES:
                raise ValueError(f"event type index {event_type} outside 0..{NUM_EVENT_TYPES - 1}")
            out.append(int(event_type))
    return out


def encode_observation(
    item_indices: Sequence[int],
    event_types: Sequence[str | int],
    gaps_seconds: Sequence[float],
    features: Sequence[float],
    *,
    window: int,
    feature_dim: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One observation as arrays: items (W,), event types (W,), log1p gaps (W,), features (D,).

    The three window lists are aligned at their most recent end and padded/truncated independently,
    so a list that is shorter than the others only loses its oldest entries. `item_indices` are
    action indices (look raw ids up in the `Vocabulary` first). Features must have exactly
    `feature_dim` values: a silently padded feature vector would shift every feature's meaning.
    """
    if len(features) != feature_dim:
        raise ValueError(f"expected {feature_dim} features, got {len(features)}")
    gaps = np.asarray(gaps_seconds, dtype=np.float64)
    if gaps.size and (not np.all(np.isfinite(gaps)) or np.any(gaps < 0)):
        raise ValueError("gaps_seconds must be finite and >= 0")
    items = pad_recent(item_indices, window, PAD_INDEX, np.int32)  # (W,)
    types = pad_recent(event_type_indices(event_types), window, 0, np.int32)  # (W,)
    # log1p keeps seconds-to-days gaps within a range an affine projection can use.
    log_gaps = pad_recent(np.log1p(gaps).tolist(), window, 0.0, np.float32)  # (W,)
    dense = np.asarray(features, dtype=np.float32).reshape(feature_dim)  # (D,)
    return items, types, log_gaps, dense


def obs_batch_from_lists(
    item_indices: Sequence[Sequence[int]],
    event_types: Sequence[Sequence[str | int]],
    gaps_seconds: Sequence[Sequence[float]],
    features: Sequence[Sequence[float]],
    *,
    window: int,
    feature_dim: int,
) -> ObsBatch:
    """Build an ObsBatch (numpy) from per-observation python lists; see `encode_observation`."""
    size = len(item_indices)
    if not (len(event_types) == len(gaps_seconds) == len(features) == size):
        raise ValueError(
            "item_indices, event_types, gaps_seconds and features must have the same length, got "
            f"{size}, {len(event_types)}, {len(gaps_seconds)}, {len(features)}"
        )
    items = np.zeros((size, window), np.int32)  # (B, W)
    types = np.zeros((size, window), np.int32)  # (B, W)
    gaps = np.zeros((size, window), np.float32)  # (B, W)
    dense = np.zeros((size, feature_dim), np.float32)  # (B, D)
    for row in range(size):
        items[row], types[row], gaps[row], dense[row] = encode_observation(
            item_indices[row],
            event_types[row],
            gaps_seconds[row],
            features[row],
            window=window,
            feature_dim=feature_dim,
        )
    return ObsBatch(items=items, event_types=types, gaps=gaps, features=dense)


def transition_batch(
    obs_tm1: ObsBatch,
    a_tm1: Sequence[int] | np.ndarray,
    r_t: Sequence[float] | np.ndarray,
    done: Sequence[bool] | np.ndarray,
    obs_t: ObsBatch,
    weights: Sequence[float] | np.ndarray | None = None,
    logged: Sequence[bool] | np.ndarray | None = None,
) -> TransitionBatch:
    """Build a TransitionBatch (numpy); `done` becomes discount_t = 0, otherwise 1.

    `logged` marks the user's own choices (logged transitions) against shown slots; None: all logged.
    """
    size = obs_tm1.batch_size
    done_array = np.asarray(done, dtype=bool).reshape(size)  # (B,)
    batch = TransitionBatch(
        obs_tm1=obs_tm1,
        a_tm1=np.asarray(a_tm1, dtype=np.int32).reshape(size),
        r_t=np.asarray(r_t, dtype=np.float32).reshape(size),
        discount_t=np.where(done_array, 0.0, 1.0).astype(np.float32),
        obs_t=obs_t,
        weights=(
            np.ones((size,), np.float32)
            if weights is None
            else np.asarray(weights, dtype=np.float32).reshape(size)
        ),
        logged=(
            np.ones((size,), np.float32)
            if logged is None
            else np.asarray(logged, dtype=bool).reshape(size).astype(np.float32)
        ),
    )
    check_transition_batch(batch)
    return batch


def empty_obs_batch(batch_size: int, *, window: int, feature_dim: int) -> ObsBatch:
    """An all-padding ObsBatch of the given shape: an example input for initialising parameters."""
    return ObsBatch(
        items=np.zeros((batch_size, window), np.int32),
        event_types=np.zeros((batch_size, window), np.int32),
        gaps=np.zeros((batch_size, window), np.float32),
        features=np.zeros((batch_size, feature_dim), np.float32),
    )

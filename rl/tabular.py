"""Tabular Q-learning over a discretised state with category-level actions (a baseline for the DQN).

The state is the category of the user's last interaction (or none) crossed with a coarse bucket of
the session's length; an action is a category. The table learns with the classic one-step rule

    Q[s_tm1, a_tm1] += learning_rate * (r_t + discount_t * max_a Q[s_t, a] - Q[s_tm1, a_tm1])

(discount_t = discount, or 0 when the session ended), acts epsilon-greedily over categories, and
fills a slate with the most popular items of the chosen categories. numpy only, no I/O.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Upper bounds (inclusive) of the session-length buckets, in events so far: 1-2, 3-5, 6-10, 11+.
LENGTH_EDGES = (2, 5, 10)


@dataclass(frozen=True, kw_only=True)
class TabularConfig:
    """Hyperparameters of the Q-table."""

    num_categories: int
    """Actions: one per item category."""
    length_edges: tuple[int, ...] = LENGTH_EDGES
    """Inclusive upper bounds of the session-length buckets (one more bucket above the last)."""
    learning_rate: float = 0.1
    """Step size of the tabular update."""
    discount: float = 0.9
    """Discount of the bootstrapped next-state value."""
    epsilon: float = 0.1
    """Chance of a uniformly random category at each slate position."""

    def __post_init__(self) -> None:
        if self.num_categories < 1:
            raise ValueError(f"num_categories must be at least 1, got {self.num_categories}")
        if list(self.length_edges) != sorted(set(self.length_edges)):
            raise ValueError(f"length_edges must be strictly increasing, got {self.length_edges}")
        if not 0.0 < self.learning_rate <= 1.0:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate}")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {self.discount}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")

    @property
    def num_length_buckets(self) -> int:
        return len(self.length_edges) + 1

    @property
    def num_states(self) -> int:
        """(categories + 'no interaction yet') x length buckets."""
        return (self.num_categories + 1) * self.num_length_buckets


def length_bucket(session_events: int, edges: Sequence[int] = LENGTH_EDGES) -> int:
    """The bucket of a session length: the first edge it does not exceed, else len(edges)."""
    return bisect.bisect_left(edges, session_events)


def state_index(last_category: int | None, session_events: int, config: TabularConfig) -> int:
    """Row of the table for (category of the last interaction or None, events so far in the session)."""
    row = config.num_categories if last_category is None else last_category
    if not 0 <= row <= config.num_categories:
        raise ValueError(f"category {last_category} out of range [0, {config.num_categories})")
    return row * config.num_length_buckets + length_bucket(session_events, config.length_edges)


def q_update(
    q: np.ndarray,
    s_tm1: int,
    a_tm1: int,
    r_t: float,
    discount_t: float,
    s_t: int,
    learning_rate: float,
) -> tuple[np.ndarray, float]:
    """One tabular Q-learning step on a copy of q (states, actions); returns (new q, TD error)."""
    assert q.ndim == 2, f"q must be (states, actions), got {q.shape}"
    td_error = r_t + discount_t * float(q[s_t].max()) - float(q[s_tm1, a_tm1])
    updated = q.copy()
    updated[s_tm1, a_tm1] += learning_rate * td_error
    return updated, td_error


def q_update_in_place(
    q: np.ndarray, s_tm1: int, a_tm1: int, r_t: float, discount_t: float, s_t: int, learning_rate: float
) -> float:
    """q_update without the copy, for a learner that owns its table; returns the TD error."""
    td_error = r_t + discount_t * float(q[s_t].max()) - float(q[s_tm1, a_tm1])
    q[s_tm1, a_tm1] += learning_rate * td_error
    return td_error


def category_slate(
    q_row: np.ndarray,
    ranked_items: Sequence[Sequence[str]],
    blocked: set[str],
    k: int,
    epsilon: float,
    uniforms: np.ndarray,
) -> list[tuple[str, float, bool]]:
    """Fill k positions: an epsilon-greedy category each, then its most popular remaining item.

    q_row (categories,) holds Q(s, .); ranked_items[c] are category c's items, most popular first;
    blocked items are never shown. uniforms (2 * k,) in [0, 1) drive the coin and the random pick of
    each position. Returns (item, propensity of its category, explored) per filled position; the
    propensity is (1 - eps) * [greedy] + eps / (categories with items left). Fewer than k when the
    categories run out of items.
    """
    assert q_row.shape == (len(ranked_items),), (q_row.shape, len(ranked_items))
    assert uniforms.shape[0] >= 2 * k, f"need {2 * k} uniforms, got {uniforms.shape}"
    cursors = [0] * len(ranked_items)
    taken: set[str] = set()

    def next_item(category: int) -> str | None:
        items = ranked_items[category]
        while cursors[category] < len(items):
            item = items[cursors[category]]
            if item not in blocked and item not in taken:
                return item
            cursors[category] += 1
        return None

    slate: list[tuple[str, float, bool]] = []
    for position in range(k):
        open_categories = [c for c in range(len(ranked_items)) if next_item(c) is not None]
        if not open_categories:
            break
        greedy = max(open_categories, key=lambda c: (float(q_row[c]), -c))
        if uniforms[2 * position] < epsilon:
            category = open_categories[int(uniforms[2 * position + 1] * len(open_categories))]
        else:
            category = greedy
        propensity = (1.0 - epsilon) * (category == greedy) + epsilon / len(open_categories)
        item = next_item(category)
        assert item is not None
        taken.add(item)
        cursors[category] += 1
        slate.append((item, propensity, category != greedy))
    return slate


@dataclass
class TabularModel:
    """What a published tabular model holds: the table, the categories and their ranked items."""

    config: TabularConfig
    q: np.ndarray  # (states, categories seen so far)
    categories: list[str]
    ranked_items: list[list[str]]  # per category, most popular first
    item_category: dict[str, int] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": 1,
                "num_categories": self.config.num_categories,
                "length_edges": list(self.config.length_edges),
                "learning_rate": self.config.learning_rate,
                "discount": self.config.discount,
                "epsilon": self.config.epsilon,
                "q": self.q.tolist(),
                "categories": self.categories,
                "ranked_items": self.ranked_items,
                "item_category": self.item_category,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TabularModel:
        """Decode a published table; raises ValueError when the bytes are not one."""
        try:
            raw = json.loads(data)
            config = TabularConfig(
                num_categories=int(raw["num_categories"]),
                length_edges=tuple(int(e) for e in raw["length_edges"]),
                learning_rate=float(raw["learning_rate"]),
                discount=float(raw["discount"]),
                epsilon=float(raw["epsilon"]),
            )
            q = np.asarray(raw["q"], np.float64)
            model = cls(
                config=config,
                q=q,
                categories=[str(c) for c in raw["categories"]],
                ranked_items=[[str(i) for i in items] for items in raw["ranked_items"]],
                item_category={str(k): int(v) for k, v in raw["item_category"].items()},
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a tabular Q model: {exc}") from None
        # The table has a column per category seen so far (at most num_categories of them).
        if (
            q.shape != (config.num_states, len(model.categories))
            or len(model.categories) > config.num_categories
            or len(model.ranked_items) != len(model.categories)
        ):
            raise ValueError(
                f"tabular Q model shapes do not agree: q {q.shape}, {len(model.categories)} categories"
            )
        return model

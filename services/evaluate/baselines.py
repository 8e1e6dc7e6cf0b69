"""Baselines the DQN is compared with: popularity, co-occurrence, recently-seen, tabular Q-learning.

Each is fitted on training interactions and scores every catalogue item for a batch of targets,
(N, C), higher is better. Where a baseline orders by one thing and then by popularity, the two are
combined lexicographically into one exact float64 score, so ties between items are only true ties.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from services.evaluate.splits import Catalogue, Interaction, Target, stable_bucket


def popularity_counts(train: Sequence[Interaction], catalogue: Catalogue) -> np.ndarray:
    """Interactions per catalogue item in the training data (every event type counts): (C,)."""
    counts = np.zeros((len(catalogue),), np.float64)  # (C,)
    for interaction in train:
        counts[catalogue.index[interaction.item_id]] += 1.0
    return counts


class Popularity:
    """Most interacted-with training items first, the same list for everyone."""

    name = "popularity"

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts

    def scores(self, targets: Sequence[Target]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(targets), self.counts.shape[0])).copy()  # (N, C)


class Recent:
    """The state's items, most recently seen first, then everything else by popularity."""

    name = "recent"

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts
        # One step of recency outweighs any popularity difference.
        self.scale = float(counts.max(initial=0.0)) + 1.0

    def scores(self, targets: Sequence[Target]) -> np.ndarray:
        scores = np.broadcast_to(self.counts, (len(targets), self.counts.shape[0])).copy()  # (N, C)
        for row, target in enumerate(targets):
            # Oldest first, so a repeated item ends with the score of its latest occurrence.
            for position, item in enumerate(target.recent):
                scores[row, item] = (position + 1) * self.scale + self.counts[item]
        return scores


class Cooccurrence:
    """Items that followed the state's last items in training sessions, then popularity.

    Counts directed pairs (i, j) where j came within `window` interactions after i in the same
    training session. A state's score for item j is sum_k 0.5^k * count(i_k, j) over its last
    `window` items i_0 (most recent), i_1, ...; ties (and items never seen after them) go by
    popularity.
    """

    name = "cooccurrence"

    def __init__(
        self, train: Sequence[Interaction], catalogue: Catalogue, counts: np.ndarray, window: int
    ) -> None:
        self.window = window
        self.counts = counts
        sessions: dict[str, list[int]] = defaultdict(list)
        for interaction in train:
            sessions[interaction.session_key].append(catalogue.index[interaction.item_id])
        pairs: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        for items in sessions.values():
            for start, item in enumerate(items):
                for later in items[start + 1 : start + 1 + window]:
                    pairs[item][later] += 1.0
        self.following = {
            item: (np.fromiter(after.keys(), np.int64), np.fromiter(after.values(), np.float64))
            for item, after in pairs.items()
        }
        # Weights are multiples of 2^-(window-1) and counts integers: scaling by this keeps every
        # co-occurrence difference above the largest popularity count.
        self.scale = (float(counts.max(initial=0.0)) + 1.0) * 2.0 ** max(window - 1, 0)

    def scores(self, targets: Sequence[Target]) -> np.ndarray:
        primary = np.zeros((len(targets), self.counts.shape[0]), np.float64)  # (N, C)
        for row, target in enumerate(targets):
            recent = target.recent[::-1][: self.window]  # most recent first
            for age, item in enumerate(recent):
                after = self.following.get(item)
                if after is not None:
                    primary[row, after[0]] += 0.5**age * after[1]
        return primary * self.scale + self.counts[None, :]


class TabularQ:
    """A classic tabular Q-learner over categories, recommending a category's items by popularity.

    State: the category of the state's last item (an empty window is its own state). Action: a
    category. Each training episode (a user's interactions in time order) is replayed as an
    environment: at every step the learner picks a category epsilon-greedily (random ties); if the
    user's logged item is of that category the step pays the logged reward, otherwise 0, and the
    next state is the logged item's category. Q-learning updates the pick and, off-policy, the
    logged category with its logged reward. Ranking: items ordered by Q(state, their category),
    then by popularity. Logs without categories use `buckets` crc32 buckets of item ids instead.
    """

    name = "tabular_q"

    def __init__(
        self,
        train: Sequence[Interaction],
        catalogue: Catalogue,
        counts: np.ndarray,
        categories: dict[str, str],
        *,
        epochs: int,
        learning_rate: float,
        gamma: float,
        epsilon: float,
        buckets: int,
        seed: int,
    ) -> None:
        self.counts = counts
        self.scale = float(counts.max(initial=0.0)) + 1.0
        names = [
            categories.get(item) or f"bucket:{stable_bucket(item, buckets)}" for item in catalogue.item_ids
        ]
        category_ids: dict[str, int] = {}
        self.item_category = np.asarray(
            [category_ids.setdefault(name, len(category_ids)) for name in names], np.int64
        )  # (C,)
        self.num_categories = len(category_ids)
        self.empty_state = self.num_categories  # the state of an empty window
        self.q: dict[int, np.ndarray] = {}
        rng = np.random.default_rng(seed)
        episodes: dict[str, list[Interaction]] = defaultdict(list)
        for interaction in train:
            episodes[interaction.user_id].append(interaction)
        ordered = [episodes[user] for user in sorted(episodes)]
        for _ in range(epochs):
            for episode in ordered:
                for interaction in episode:
                    self._learn(interaction, catalogue, learning_rate, gamma, epsilon, rng)

    def _row(self, state: int) -> np.ndarray:
        row = self.q.get(state)
        if row is None:
            row = self.q[state] = np.zeros((self.num_categories,), np.float64)  # (K,)
        return row

    def state_of(self, recent_ids: Sequence[str], catalogue: Catalogue) -> int:
        for item in reversed(recent_ids):
            index = catalogue.index.get(item)
            if index is not None:
                return int(self.item_category[index])
        return self.empty_state

    def _learn(
        self,
        interaction: Interaction,
        catalogue: Catalogue,
        learning_rate: float,
        gamma: float,
        epsilon: float,
        rng: np.random.Generator,
    ) -> None:
        transition = interaction.transition
        state = self.state_of(transition.obs_tm1.recent_items, catalogue)
        logged = int(self.item_category[catalogue.index[interaction.item_id]])
        next_state = logged  # the user's item is the last of the next window
        row = self._row(state)
        if rng.random() < epsilon:
            pick = int(rng.integers(self.num_categories))
        else:
            best = np.flatnonzero(row == row.max())
            pick = int(best[rng.integers(best.size)])
        bootstrap = 0.0 if transition.done else gamma * float(self._row(next_state).max())
        reward = float(transition.r_t)
        row[logged] += learning_rate * (reward + bootstrap - row[logged])
        if pick != logged:
            row[pick] += learning_rate * (0.0 + bootstrap - row[pick])

    def scores(self, targets: Sequence[Target]) -> np.ndarray:
        out = np.empty((len(targets), self.counts.shape[0]), np.float64)  # (N, C)
        dense_ranks: dict[int, np.ndarray] = {}
        for row, target in enumerate(targets):
            state = int(self.item_category[target.recent[-1]]) if target.recent else self.empty_state
            ranks = dense_ranks.get(state)
            if ranks is None:
                q_row = self.q.get(state)
                if q_row is None:
                    ranks = np.zeros((self.num_categories,), np.float64)
                else:
                    # Dense rank of each category's Q (equal Q, equal rank): an exact integer primary key.
                    ranks = np.unique(q_row, return_inverse=True)[1].astype(np.float64).reshape(-1)
                dense_ranks[state] = ranks
            out[row] = ranks[self.item_category] * self.scale + self.counts
        return out

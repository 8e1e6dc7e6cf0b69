"""Serving a category- or brand-level model: its slate of groups becomes a slate of items.

A model trained with `--action-granularity category` (or brand) scores groups, not items: its
vocabulary maps category (brand) ids to action indices, and it reads the user's recent items as
their groups. To serve it, an actor

1. reads the window through `window_action_ids` (item -> group) before the vocabulary lookup,
2. masks out groups with nothing left to show (`servable_group_mask`), so every slot it picks can
   be filled,
3. picks a slate of groups exactly as it picks items (scores, propensities, exploration), and
4. turns each group into its most popular item not yet shown or purchased (`items_for_groups`).

Step 4 is deterministic given the state, so a slot's propensity is its group's propensity. The
item -> group map and the popularity ranking come from a `GroupCatalogue`: built from the model
bundle's `item_groups` (what the learner saw, with counts) or from a product catalogue.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GroupCatalogue:
    """Which group each item belongs to, and each group's items from most to least popular."""

    group_of: Mapping[str, str]
    """item id -> group id (category or brand)."""
    items_by_group: Mapping[str, tuple[str, ...]]
    """group id -> its item ids, most popular first (ties: item id ascending)."""

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, str, float]]) -> GroupCatalogue:
        """Build from (item id, group id, popularity) rows, e.g. `rl.vocabulary.ItemGroups.entries()`.

        An item listed twice keeps its last row (the latest group it was reported in).
        """
        latest: dict[str, tuple[str, float]] = {}
        for item_id, group_id, popularity in entries:
            latest[item_id] = (group_id, float(popularity))
        ranked: dict[str, list[tuple[float, str]]] = {}
        for item_id, (group_id, popularity) in latest.items():
            ranked.setdefault(group_id, []).append((-popularity, item_id))
        return cls(
            group_of={item_id: group_id for item_id, (group_id, _) in latest.items()},
            items_by_group={group: tuple(item for _, item in sorted(rows)) for group, rows in ranked.items()},
        )


def window_action_ids(recent_items: Sequence[str], catalogue: GroupCatalogue) -> list[str | None]:
    """The recent items as the model reads them: their group ids (None where the group is unknown).

    Look the result up in the model's vocabulary with None as out-of-vocabulary, as the learner does.
    """
    group_of = catalogue.group_of
    return [group_of.get(item_id) for item_id in recent_items]


def best_item(
    group_id: str,
    catalogue: GroupCatalogue,
    exclude: Container[str],
    available: Container[str] | None = None,
) -> str | None:
    """The group's most popular item that is not excluded (and is available, when given), or None."""
    for item_id in catalogue.items_by_group.get(group_id, ()):
        if item_id not in exclude and (available is None or item_id in available):
            return item_id
    return None


def servable_group_mask(
    action_ids: Sequence[str | None],
    catalogue: GroupCatalogue,
    exclude: Container[str],
    available: Container[str] | None = None,
) -> np.ndarray:
    """(A,) bool over the model's action indices: True where the group still has an item to show.

    `action_ids[i]` is the group id at action index i (`Vocabulary.ids_for(range(num_actions))`),
    None for padding, out-of-vocabulary and unassigned indices, which are never servable.
    """
    mask = np.zeros((len(action_ids),), bool)  # (A,)
    for index, group_id in enumerate(action_ids):
        if group_id is not None and best_item(group_id, catalogue, exclude, available) is not None:
            mask[index] = True
    return mask


def items_for_groups(
    group_ids: Sequence[str],
    catalogue: GroupCatalogue,
    exclude: Container[str],
    available: Container[str] | None = None,
) -> list[str | None]:
    """One item per group of a slate, in slate order: its most popular item not excluded.

    `exclude` holds what must not be recommended (items already shown in this session, purchased,
    in the cart). Items picked for earlier slots are excluded from later ones, so the slate holds
    distinct items even if a group repeats. None marks a group with nothing left to show (which
    `servable_group_mask` prevents).
    """
    chosen: list[str | None] = []
    taken: set[str] = set()
    for group_id in group_ids:
        item_id = best_item(group_id, catalogue, _Union(exclude, taken), available)
        if item_id is not None:
            taken.add(item_id)
        chosen.append(item_id)
    return chosen


@dataclass(frozen=True)
class _Union:
    """Membership in either of two containers, without copying them."""

    first: Container[str]
    second: Container[str]

    def __contains__(self, value: object) -> bool:
        return value in self.first or value in self.second

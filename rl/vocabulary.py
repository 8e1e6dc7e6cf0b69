"""The learner's item vocabulary: raw id strings -> action indices, grown online within a capacity.

Indices 0 and 1 are reserved (padding, out-of-vocabulary); real ids get 2..capacity+1. An id is
admitted once it has been observed `min_count` times, which keeps one-off ids (bots, typos) from
taking rows. When every index is taken, the least recently observed id is evicted and its index
reused; `observe` reports reused indices so the learner can re-initialise those rows
(`rl.train.reset_action_rows`) before the new item inherits the old one's values. Not-yet-admitted
candidates are bounded too (least recently observed dropped first), so memory stays O(capacity)
however many distinct ids stream past.

Recency is the order of `observe` calls (and of ids within a call); `now_step` is recorded per id as
its last-seen step for inspection and persistence.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from rl.batch import FIRST_ITEM_INDEX, OOV_INDEX, PAD_INDEX

FORMAT_VERSION = 1


class Vocabulary:
    """Bounded raw-id -> action-index map with frequency admission and least-recently-seen eviction."""

    def __init__(self, capacity: int, min_count: int = 1, max_candidates: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.capacity = capacity
        self.min_count = min_count
        self.max_candidates = 4 * capacity if max_candidates is None else max_candidates
        if self.max_candidates < 0:
            raise ValueError(f"max_candidates must be >= 0, got {self.max_candidates}")
        # Admitted ids in recency order (least recent first): id -> [index, last_seen_step].
        self._admitted: OrderedDict[str, list[int]] = OrderedDict()
        self._id_by_index: dict[int, str] = {}
        # Candidates in recency order: id -> [count, last_seen_step].
        self._candidates: OrderedDict[str, list[int]] = OrderedDict()
        self._next_fresh_index = FIRST_ITEM_INDEX

    @property
    def num_actions(self) -> int:
        """Rows the action table needs: capacity plus the two reserved indices."""
        return self.capacity + FIRST_ITEM_INDEX

    def __len__(self) -> int:
        return len(self._admitted)

    def __contains__(self, raw_id: object) -> bool:
        return raw_id in self._admitted

    def observe(self, ids: Iterable[str], now_step: int) -> list[int]:
        """Count and admit ids; returns the indices that were reused for a new id (evicting another).

        The list is in order of reuse and without duplicates; freshly used indices are not in it.
        """
        if isinstance(ids, str):
            raise TypeError("observe takes an iterable of ids, not a single string")
        reused: list[int] = []
        for raw_id in ids:
            admitted = self._admitted.get(raw_id)
            if admitted is not None:
                admitted[1] = now_step
                self._admitted.move_to_end(raw_id)
                continue
            candidate = self._candidates.pop(raw_id, None)
            count = 1 if candidate is None else candidate[0] + 1
            if count < self.min_count:
                self._candidates[raw_id] = [count, now_step]  # re-inserted as most recent
                if len(self._candidates) > self.max_candidates:
                    self._candidates.popitem(last=False)
                continue
            index, was_reused = self._take_index()
            self._admitted[raw_id] = [index, now_step]
            self._id_by_index[index] = raw_id
            if was_reused and index not in reused:
                reused.append(index)
        return reused

    def _take_index(self) -> tuple[int, bool]:
        if self._next_fresh_index < self.num_actions:
            index = self._next_fresh_index
            self._next_fresh_index += 1
            return index, False
        _evicted_id, (index, _) = self._admitted.popitem(last=False)
        del self._id_by_index[index]
        return index, True

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Action indices for raw ids, (n,) int32; ids not admitted map to OOV (1)."""
        admitted = self._admitted
        return np.fromiter(
            (entry[0] if (entry := admitted.get(raw_id)) is not None else OOV_INDEX for raw_id in ids),
            dtype=np.int32,
            count=len(ids),
        )

    def ids_for(self, indices: Iterable[int]) -> list[str | None]:
        """Raw ids for action indices; None for padding, OOV and unassigned indices."""
        return [self._id_by_index.get(int(index)) for index in indices]

    def allowed_mask(self) -> np.ndarray:
        """(num_actions,) bool: True where an index currently holds an id (the recommendable actions)."""
        mask = np.zeros((self.num_actions,), bool)
        if self._id_by_index:
            mask[np.fromiter(self._id_by_index, dtype=np.int64)] = True
        mask[[PAD_INDEX, OOV_INDEX]] = False
        return mask

    def last_seen(self, raw_id: str) -> int | None:
        """The now_step of the id's latest observation, if admitted."""
        entry = self._admitted.get(raw_id)
        return None if entry is None else entry[1]

    def to_bytes(self) -> bytes:
        """Deterministic JSON: equal vocabularies (including recency order) give equal bytes."""
        state = {
            "format_version": FORMAT_VERSION,
            "capacity": self.capacity,
            "min_count": self.min_count,
            "max_candidates": self.max_candidates,
            "next_fresh_index": self._next_fresh_index,
            # Lists in recency order (least recent first), which eviction depends on.
            "admitted": [[raw_id, index, step] for raw_id, (index, step) in self._admitted.items()],
            "candidates": [[raw_id, count, step] for raw_id, (count, step) in self._candidates.items()],
        }
        return json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Vocabulary:
        """Rebuild from `to_bytes` output; malformed or inconsistent data raises ValueError."""
        try:
            state = json.loads(data.decode("utf-8"))
            if state.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"unsupported vocabulary format_version {state.get('format_version')!r}")
            vocabulary = cls(
                int(state["capacity"]), int(state["min_count"]), max_candidates=int(state["max_candidates"])
            )
            vocabulary._next_fresh_index = int(state["next_fresh_index"])
            for raw_id, index, step in state["admitted"]:
                vocabulary._admitted[str(raw_id)] = [int(index), int(step)]
                vocabulary._id_by_index[int(index)] = str(raw_id)
            for raw_id, count, step in state["candidates"]:
                vocabulary._candidates[str(raw_id)] = [int(count), int(step)]
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed vocabulary bytes: {e}") from e
        vocabulary._check_consistent()
        return vocabulary

    def _check_consistent(self) -> None:
        indices = [index for index, _ in self._admitted.values()]
        if len(set(indices)) != len(indices):
            raise ValueError("malformed vocabulary bytes: an index is assigned twice")
        if any(not FIRST_ITEM_INDEX <= index < self._next_fresh_index for index in indices):
            raise ValueError("malformed vocabulary bytes: an index lies outside the assigned range")
        if not FIRST_ITEM_INDEX <= self._next_fresh_index <= self.num_actions:
            raise ValueError("malformed vocabulary bytes: next_fresh_index out of range")


ITEM_GROUPS_FORMAT_VERSION = 1


class ItemGroups:
    """Which group (category or brand) each item belongs to, with how often the item was acted on.

    A learner whose actions are categories or brands reads the user's recent items through this map,
    so the window and the action side share one embedding table of groups. An item's group is the
    one last reported for it (catalogues get re-categorised); its count is the number of times it was
    reported, the popularity the serving side ranks an action group's items by. Bounded: past
    `capacity` items the least recently reported one is forgotten.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # item id -> [group id, count], least recently reported first.
        self._items: OrderedDict[str, list[Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def observe(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Record (item id, group id) pairs in order: the group is updated and the count grows by one."""
        items = self._items
        for item_id, group_id in pairs:
            entry = items.pop(item_id, None)
            items[item_id] = [group_id, 1 if entry is None else entry[1] + 1]
            if len(items) > self.capacity:
                items.popitem(last=False)

    def group_of(self, item_id: str) -> str | None:
        """The item's group, or None when the item was never reported (or was forgotten)."""
        entry = self._items.get(item_id)
        return None if entry is None else str(entry[0])

    def groups_for(self, item_ids: Sequence[str]) -> list[str | None]:
        """`group_of` for each id, in order."""
        items = self._items
        return [None if (entry := items.get(item_id)) is None else entry[0] for item_id in item_ids]

    def count(self, item_id: str) -> int:
        """How many times the item was reported (0 when unknown)."""
        entry = self._items.get(item_id)
        return 0 if entry is None else int(entry[1])

    def entries(self) -> list[tuple[str, str, int]]:
        """(item id, group id, count) for every item, least recently reported first."""
        return [(item_id, group, count) for item_id, (group, count) in self._items.items()]

    def to_bytes(self) -> bytes:
        """Deterministic JSON: equal maps (including recency order) give equal bytes."""
        state = {
            "format_version": ITEM_GROUPS_FORMAT_VERSION,
            "capacity": self.capacity,
            "items": [[item_id, group, count] for item_id, (group, count) in self._items.items()],
        }
        return json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> ItemGroups:
        """Rebuild from `to_bytes` output; malformed data raises ValueError."""
        try:
            state = json.loads(data.decode("utf-8"))
            if state.get("format_version") != ITEM_GROUPS_FORMAT_VERSION:
                raise ValueError(f"unsupported item groups format_version {state.get('format_version')!r}")
            groups = cls(int(state["capacity"]))
            for item_id, group, count in state["items"]:
                if not isinstance(item_id, str) or not isinstance(group, str) or int(count) < 1:
                    raise ValueError(f"bad entry {[item_id, group, count]!r}")
                groups._items[item_id] = [group, int(count)]
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"malformed item groups bytes: {e}") from e
        if len(groups._items) > groups.capacity:
            raise ValueError("malformed item groups bytes: more items than the capacity")
        return groups

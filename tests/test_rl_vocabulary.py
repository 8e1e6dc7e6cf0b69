"""Vocabulary: growth, admission by count, least-recently-seen eviction, reuse reports, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from rl.vocabulary import ItemGroups, Vocabulary


def test_growth_and_lookup() -> None:
    vocabulary = Vocabulary(capacity=3)
    assert vocabulary.num_actions == 5
    assert vocabulary.observe(["a", "b", "a"], now_step=1) == []
    assert len(vocabulary) == 2
    np.testing.assert_array_equal(vocabulary.lookup(["a", "b", "zzz"]), [2, 3, 1])
    assert vocabulary.lookup(["a"]).dtype == np.int32
    assert vocabulary.ids_for([0, 1, 2, 3, 4]) == [None, None, "a", "b", None]
    np.testing.assert_array_equal(vocabulary.allowed_mask(), [False, False, True, True, False])
    assert "a" in vocabulary and "c" not in vocabulary


def test_min_count_delays_admission() -> None:
    vocabulary = Vocabulary(capacity=3, min_count=3)
    vocabulary.observe(["x", "y"], now_step=1)
    vocabulary.observe(["x"], now_step=2)
    np.testing.assert_array_equal(vocabulary.lookup(["x", "y"]), [1, 1])
    vocabulary.observe(["x"], now_step=3)
    np.testing.assert_array_equal(vocabulary.lookup(["x", "y"]), [2, 1])
    assert len(vocabulary) == 1


def test_eviction_of_the_least_recently_seen_reuses_and_reports_its_index() -> None:
    vocabulary = Vocabulary(capacity=2)
    vocabulary.observe(["a"], now_step=1)
    vocabulary.observe(["b"], now_step=2)
    vocabulary.observe(["a"], now_step=3)  # a is now more recent than b
    assert vocabulary.observe(["c"], now_step=4) == [3]  # b's index goes to c
    np.testing.assert_array_equal(vocabulary.lookup(["a", "b", "c"]), [2, 1, 3])
    assert vocabulary.last_seen("c") == 4 and vocabulary.last_seen("b") is None
    # Two new ids at once evict a then c, in recency order; each reused index reported once.
    assert vocabulary.observe(["d", "e"], now_step=5) == [2, 3]
    np.testing.assert_array_equal(vocabulary.lookup(["d", "e", "a", "c"]), [2, 3, 1, 1])
    # More new ids in one call than capacity: indices cycle, still reported once each.
    assert vocabulary.observe(["f", "g", "h"], now_step=6) == [2, 3]
    assert vocabulary.ids_for([2, 3]) == ["h", "g"]
    assert len(vocabulary) == 2


def test_candidates_are_bounded_and_forget_the_least_recent() -> None:
    vocabulary = Vocabulary(capacity=1, min_count=2, max_candidates=3)
    vocabulary.observe(["p", "q", "r", "s"], now_step=1)  # p is dropped: only 3 candidates kept
    vocabulary.observe(["p"], now_step=2)  # p starts counting again (count 1), evicting q
    assert len(vocabulary) == 0
    vocabulary.observe(["r"], now_step=3)  # r had count 1 -> 2: admitted
    np.testing.assert_array_equal(vocabulary.lookup(["r", "p", "q"]), [2, 1, 1])
    vocabulary.observe(["q"], now_step=4)  # q was forgotten: count 1, not admitted
    np.testing.assert_array_equal(vocabulary.lookup(["q"]), [1])
    state = vocabulary.to_bytes()
    assert len(Vocabulary.from_bytes(state)._candidates) <= 3


def test_bytes_round_trip_is_exact_and_deterministic() -> None:
    def build() -> Vocabulary:
        vocabulary = Vocabulary(capacity=3, min_count=2)
        vocabulary.observe(["a", "b", "a", "c", "b", "ü-ñ", "ü-ñ", "d"], now_step=1)
        vocabulary.observe(["a", "c"], now_step=2)
        return vocabulary

    original = build()
    data = original.to_bytes()
    assert data == build().to_bytes()  # same history, same bytes
    restored = Vocabulary.from_bytes(data)
    assert restored.to_bytes() == data
    ids = ["a", "b", "c", "d", "ü-ñ", "nope"]
    np.testing.assert_array_equal(restored.lookup(ids), original.lookup(ids))
    assert len(restored) == len(original)
    # The restored copy evicts exactly as the original would.
    reused = [vocabulary.observe(["e", "e", "f", "f"], now_step=3) for vocabulary in (original, restored)]
    assert reused[0] == reused[1] and reused[0], reused
    assert original.to_bytes() == restored.to_bytes()
    np.testing.assert_array_equal(restored.lookup([*ids, "e", "f"]), original.lookup([*ids, "e", "f"]))


def test_malformed_bytes_raise_value_error() -> None:
    with pytest.raises(ValueError):
        Vocabulary.from_bytes(b"not json")
    with pytest.raises(ValueError):
        Vocabulary.from_bytes(b'{"format_version": 99}')
    vocabulary = Vocabulary(capacity=2)
    vocabulary.observe(["a", "b"], now_step=1)
    broken = vocabulary.to_bytes().replace(b'["b",3,1]', b'["b",2,1]')
    with pytest.raises(ValueError, match="twice"):
        Vocabulary.from_bytes(broken)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        Vocabulary(capacity=0)
    with pytest.raises(ValueError):
        Vocabulary(capacity=2, min_count=0)


def test_item_groups_keep_the_latest_group_and_count_reports() -> None:
    groups = ItemGroups(capacity=3)
    groups.observe([("i1", "shoes"), ("i2", "hats"), ("i1", "shoes")])
    assert groups.group_of("i1") == "shoes" and groups.count("i1") == 2
    assert groups.groups_for(["i2", "nope", "i1"]) == ["hats", None, "shoes"]
    groups.observe([("i2", "caps")])  # re-categorised: the latest group wins, the count goes on
    assert groups.group_of("i2") == "caps" and groups.count("i2") == 2
    assert groups.entries() == [("i1", "shoes", 2), ("i2", "caps", 2)]
    assert len(groups) == 2 and "i1" in groups and "nope" not in groups and groups.count("nope") == 0


def test_item_groups_forget_the_least_recently_reported_item_past_capacity() -> None:
    groups = ItemGroups(capacity=2)
    groups.observe([("a", "x"), ("b", "y"), ("a", "x"), ("c", "z")])
    assert groups.entries() == [("a", "x", 2), ("c", "z", 1)]
    assert groups.group_of("b") is None


def test_item_groups_bytes_round_trip_and_reject_malformed_bytes() -> None:
    groups = ItemGroups(capacity=5)
    groups.observe([("é", "Schuhe"), ("b", "y"), ("é", "Schuhe")])
    data = groups.to_bytes()
    assert data == b'{"format_version":1,"capacity":5,"items":[["b","y",1],["\xc3\xa9","Schuhe",2]]}'
    restored = ItemGroups.from_bytes(data)
    assert restored.to_bytes() == data and restored.capacity == 5
    with pytest.raises(ValueError):
        ItemGroups.from_bytes(b"[]")
    with pytest.raises(ValueError, match="format_version"):
        ItemGroups.from_bytes(b'{"format_version":2,"capacity":1,"items":[]}')
    with pytest.raises(ValueError, match="capacity"):
        ItemGroups.from_bytes(b'{"format_version":1,"capacity":1,"items":[["a","x",1],["b","x",1]]}')
    with pytest.raises(ValueError, match="bad entry"):
        ItemGroups.from_bytes(b'{"format_version":1,"capacity":1,"items":[["a",7,1]]}')
    with pytest.raises(ValueError):
        ItemGroups(capacity=0)

"""services.state_builder.step: exact state, sessions, transitions and timers on hand-made sequences."""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterable
from typing import Any

import pytest

from schemas.codec import TRANSITIONS, USER_STATES, encode
from schemas.messages import (
    ClickEvent,
    EventType,
    Observation,
    Recommendation,
    RecommendedItem,
    Transition,
    UserState,
)
from services.state_builder.step import (
    FEATURE_DIM,
    FEATURE_LAYOUT,
    Outputs,
    StepParams,
    UserRecord,
    advance_time,
    affinity_bucket,
    apply_event,
    apply_recommendation,
    decode_record,
    empty_observation,
    encode_record,
    feature_dim,
    feature_layout,
    feature_names,
    next_deadline_ms,
)
from tests.helpers import TAOBAO, require_shared_data

T0 = 1_704_117_600_000  # 2024-01-01T14:00:00Z, a Monday
SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 3600 * SECOND


def ev(
    event_id: str,
    event_type: EventType,
    timestamp: int,
    item_id: str | None = None,
    *,
    session_id: str = "s1",
    user_id: str = "u1",
    **extra: Any,
) -> ClickEvent:
    return ClickEvent(
        event_id=event_id,
        user_id=user_id,
        session_id=session_id,
        event_type=event_type,
        timestamp=timestamp,
        item_id=item_id,
        **extra,
    )


def rec(
    rec_id: str,
    items: list[str],
    event_timestamp: int,
    *,
    propensities: list[float] | None = None,
    user_id: str = "u1",
    source_event_id: str = "e1",
) -> Recommendation:
    propensities = propensities or [1.0 / len(items)] * len(items)
    return Recommendation(
        rec_id=rec_id,
        user_id=user_id,
        items=[
            RecommendedItem(item_id=item, score=float(-i), propensity=p)
            for i, (item, p) in enumerate(zip(items, propensities, strict=True))
        ],
        policy="dqn",
        model_version=3,
        explored=False,
        source_event_id=source_event_id,
        event_timestamp=event_timestamp,
        created_at=event_timestamp + 5,
    )


def run(
    events: Iterable[ClickEvent], params: StepParams, record: UserRecord | None = None
) -> tuple[UserRecord, list[Outputs]]:
    outputs = []
    for event in events:
        record, out = apply_event(record, event, params)
        outputs.append(out)
    assert record is not None
    return record, outputs


def shown(record: UserRecord | None, recommendation: Recommendation, params: StepParams) -> UserRecord:
    """apply_recommendation that must store the slate."""
    updated, out = apply_recommendation(record, recommendation, params)
    assert updated is not None and out.outcome == "applied"
    return updated


def state_of(out: Outputs) -> UserState:
    assert out.user_state is not None
    return out.user_state


def h(hour: int) -> tuple[float, float]:
    return math.sin(2.0 * math.pi * hour / 24.0), math.cos(2.0 * math.pi * hour / 24.0)


# ---------------------------------------------------------------------------------------------
# The state itself


PINNED = StepParams(window=2, decay_half_life_seconds=3600.0, session_gap_seconds=7200.0, affinity_buckets=4)


def test_stable_hash_buckets_are_crc32() -> None:
    # Pinned literals: a salted hash() would differ between processes and break restored state.
    assert zlib.crc32(b"c1") == 1591159457
    assert affinity_bucket("c1", 4) == 1
    assert affinity_bucket("b1", 4) == 0
    assert affinity_bucket("b2", 4) == 2
    assert affinity_bucket("b2", 16) == 10


def test_feature_layout_is_documented_and_fixed() -> None:
    assert FEATURE_DIM == 61
    assert FEATURE_LAYOUT == "v1:b=16:d=61"
    names = feature_names(StepParams())
    assert len(names) == FEATURE_DIM == len(set(names))
    assert names[:3] == ["count:view", "count:click", "count:add_to_cart"]
    assert names[6] == "count:rec_request"
    assert names[7:11] == ["session_event_count", "session_duration", "gap", "applied_event_count"]
    assert names[11:15] == ["hour_sin", "hour_cos", "weekday_sin", "weekday_cos"]
    assert names[15:18] == ["cart_size", "favorite_count", "purchased_count"]
    assert names[18:22] == ["has_price", "price_mean", "price_min", "price_max"]
    assert names[22] == "last_event:view" and names[28] == "last_event:rec_request"
    assert names[29] == "category_affinity:0" and names[44] == "category_affinity:15"
    assert names[45] == "brand_affinity:0" and names[60] == "brand_affinity:15"
    assert feature_dim(PINNED) == 37 and feature_layout(PINNED) == "v1:b=4:d=37"
    assert len(feature_names(PINNED)) == 37
    assert empty_observation(PINNED) == Observation([], [], [], [0.0] * 37)


def test_state_after_three_events_is_pinned_exactly() -> None:
    events = [
        ev("e1", "view", T0, "i1", category="c1", brand="b1", price=10.0),
        ev("e2", "add_to_cart", T0 + HOUR, "i2", category="c1", price=30.0),
        ev("e3", "click", T0 + 2 * HOUR, "i1", brand="b2", request_id="r3"),
    ]
    _, outputs = run(events, PINNED)
    state = state_of(outputs[2])
    hour_sin, hour_cos = h(16)
    expected_features = [
        # decayed counts: view 1 -> 0.5 -> 0.25; add_to_cart 1 -> 0.5; click 1
        math.log1p(0.25), math.log1p(1.0), math.log1p(0.5), 0.0, 0.0, 0.0, 0.0,
        math.log1p(3), math.log1p(7200.0), math.log1p(3600.0), math.log1p(3),
        hour_sin, hour_cos, 0.0, 1.0,  # 16:00 on a Monday (weekday 0)
        math.log1p(1), 0.0, 0.0,  # one item in the cart
        1.0, math.log1p(20.0), math.log1p(10.0), math.log1p(30.0),
        0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0,  # last event: click
        0.0, 1.0, 0.0, 0.0,  # category c1 -> bucket 1 only
        0.2, 0.0, 0.8, 0.0,  # brand b1 (bucket 0) 0.25, b2 (bucket 2) 1.0, over their sum 1.25
    ]  # fmt: skip
    expected = UserState(
        user_id="u1",
        timestamp=T0 + 2 * HOUR,
        source_event_id="e3",
        source_event_type="click",
        session_id="s1",
        session_started_at=T0,
        session_event_count=3,
        applied_event_count=3,
        observation=Observation(
            recent_items=["i2", "i1"],
            recent_event_types=["add_to_cart", "click"],
            recent_gaps_seconds=[3600.0, 3600.0],
            features=expected_features,
        ),
        event_counts_decayed={
            "view": 0.25,
            "click": 1.0,
            "add_to_cart": 0.5,
            "remove_from_cart": 0.0,
            "purchase": 0.0,
            "favorite": 0.0,
            "rec_request": 0.0,
        },
        cart_items=["i2"],
        favorite_items=[],
        purchased_items=[],
        category_affinity=[0.0, 0.75, 0.0, 0.0],  # 1 -> 0.5 + 1 -> 0.75
        brand_affinity=[0.25, 0.0, 1.0, 0.0],
        hour_of_day=16,
        day_of_week=0,
        feature_layout="v1:b=4:d=37",
        request_id="r3",
        price_mean=20.0,
        price_min=10.0,
        price_max=30.0,
    )
    assert state == expected
    assert encode(state) == encode(expected)
    assert len(state.observation.features) == feature_dim(PINNED)
    # The first state: no previous event, so gap 0 and a session of one event.
    first = state_of(outputs[0])
    assert first.observation.recent_gaps_seconds == [0.0]
    assert first.observation.features[7:11] == [math.log1p(1), 0.0, 0.0, math.log1p(1)]
    assert first.request_id is None and outputs[1].user_state is not None
    assert outputs[1].user_state.request_id is None
    for out in outputs:  # every state is valid against the released schema
        assert USER_STATES.decode(encode(state_of(out))) == state_of(out)


def test_lists_cart_purchase_favourites_and_item_less_rec_request() -> None:
    params = StepParams(max_item_list=2, window=3)
    events = [
        ev("e1", "add_to_cart", T0, "i1"),
        ev("e2", "add_to_cart", T0 + MINUTE, "i2"),
        ev("e3", "add_to_cart", T0 + 2 * MINUTE, "i3"),  # i1 falls off (max 2, most recent kept)
        ev("e4", "add_to_cart", T0 + 3 * MINUTE, "i2"),  # moves to the end
        ev("e5", "remove_from_cart", T0 + 4 * MINUTE, "i3"),
        ev("e6", "favorite", T0 + 5 * MINUTE, "i9"),
        ev("e7", "purchase", T0 + 6 * MINUTE, "i2"),
        ev("e8", "rec_request", T0 + 7 * MINUTE, request_id="req-8"),
    ]
    _, outputs = run(events, params)
    carts = [state_of(out).cart_items for out in outputs]
    assert carts == [["i1"], ["i1", "i2"], ["i2", "i3"], ["i3", "i2"], ["i2"], ["i2"], [], []]
    last = state_of(outputs[-1])
    assert last.favorite_items == ["i9"] and last.purchased_items == ["i2"]
    # The item-less rec_request leaves the window alone but counts for the session and counts.
    before = state_of(outputs[-2])
    assert last.observation.recent_items == before.observation.recent_items == ["i3", "i9", "i2"]
    assert last.observation.recent_gaps_seconds == [60.0, 60.0, 60.0]
    assert last.session_event_count == 8 and last.applied_event_count == 8
    assert last.request_id == "req-8" and last.source_event_type == "rec_request"
    assert last.event_counts_decayed["rec_request"] == 1.0
    assert last.observation.features[28] == 1.0  # last_event:rec_request
    assert last.price_mean is None and last.observation.features[18:22] == [0.0, 0.0, 0.0, 0.0]


def test_late_event_is_applied_without_decay_and_reported() -> None:
    params = StepParams(decay_half_life_seconds=3600.0, session_gap_seconds=86400.0)
    events = [
        ev("e1", "view", T0 + 2 * HOUR, "i1"),
        ev("e2", "view", T0, "i2"),  # an hour... two hours older than e1
        ev("e3", "view", T0 + 3 * HOUR, "i3"),
    ]
    _, outputs = run(events, params)
    assert [out.outcome for out in outputs] == ["applied", "late", "applied"]
    late = state_of(outputs[1])
    assert late.timestamp == T0 and late.hour_of_day == 14
    assert late.event_counts_decayed["view"] == 2.0  # dt floored at 0: no decay
    assert late.observation.recent_gaps_seconds == [0.0, 0.0]
    assert late.session_started_at == T0  # the earliest event time of the session
    last = state_of(outputs[2])
    # Decay and gap are measured from the latest event time (T0 + 2h), not from the late event.
    assert last.event_counts_decayed["view"] == 2.0 * 0.5 + 1.0
    assert last.observation.recent_gaps_seconds == [0.0, 0.0, 3600.0]
    assert last.observation.features[8] == math.log1p(3 * 3600.0)


# ---------------------------------------------------------------------------------------------
# Duplicates and replays


def test_duplicate_event_ids_are_dropped_while_remembered() -> None:
    params = StepParams(recent_event_ids=2)
    record, _ = run([ev("e1", "view", T0, "i1")], params)
    again, out = apply_event(record, ev("e1", "view", T0 + MINUTE, "i1"), params, offset=9)
    assert out == Outputs(None, (), "duplicate", (), False)
    assert again.state is record.state and again.last_offsets == {"clickstream": 9}
    record, _ = run(
        [ev("e2", "view", T0 + 2 * MINUTE, "i2"), ev("e3", "view", T0 + 3 * MINUTE, "i3")], params, again
    )
    assert record.recent_event_ids == ["e2", "e3"]
    # Only the last two ids are remembered: e1 is applied again.
    _, out = apply_event(record, ev("e1", "view", T0 + 4 * MINUTE, "i1"), params)
    assert out.outcome == "applied"


def test_replayed_offsets_are_skipped_per_source() -> None:
    params = StepParams()
    record, _ = apply_event(None, ev("e1", "view", T0, "i1"), params, offset=5)
    record, _ = apply_event(record, ev("e2", "view", T0 + MINUTE, "i2"), params, offset=6)
    skipped, out = apply_event(record, ev("e3", "view", T0 + 2 * MINUTE, "i3"), params, offset=6)
    assert skipped is record and out == Outputs(None, (), "replayed", (), False)
    record, out = apply_event(record, ev("e3", "view", T0 + 2 * MINUTE, "i3"), params, offset=7)
    assert out.outcome == "applied"
    # Recommendations have their own offsets.
    with_rec, out = apply_recommendation(record, rec("r1", ["a"], T0 + 2 * MINUTE), params, offset=3)
    assert out.outcome == "applied" and with_rec is not None
    assert with_rec.last_offsets == {"clickstream": 7, "recommendations": 3}
    skipped_rec, out = apply_recommendation(with_rec, rec("r2", ["b"], T0 + 2 * MINUTE), params, offset=3)
    assert skipped_rec is with_rec and out.outcome == "replayed"
    # Without offsets nothing counts as replayed.
    _, out = apply_event(record, ev("e4", "view", T0 + 3 * MINUTE, "i4"), params)
    assert out.outcome == "applied"


# ---------------------------------------------------------------------------------------------
# Sessions and logged transitions


def test_logged_transitions_have_exact_ids_rewards_and_done() -> None:
    params = StepParams()  # session gap 1800 s
    events = [
        ev("e1", "view", T0, "i1"),
        ev("e2", "add_to_cart", T0 + 1800 * SECOND, "i1"),  # exactly the gap: same session
        ev("e3", "remove_from_cart", T0 + 3601 * SECOND, "i1"),  # 1801 s later: new session
        ev("e4", "rec_request", T0 + 3602 * SECOND, request_id="q"),  # no logged action
        ev("e5", "view", T0 + 3603 * SECOND, "i5", session_id="s2"),  # session id changes
    ]
    record, outputs = run(events, params)
    states = [state_of(out) for out in outputs]
    assert [s.session_event_count for s in states] == [1, 2, 1, 2, 1]
    assert [s.session_started_at for s in states] == [
        T0,
        T0,
        T0 + 3601 * SECOND,
        T0 + 3601 * SECOND,
        T0 + 3603 * SECOND,
    ]
    assert [s.session_id for s in states] == ["s1", "s1", "s1", "s1", "s2"]

    def logged(
        event_id: str, item: str, r_t: float, obs_tm1: Observation, obs_t: Observation, done: bool, t: int
    ):
        return Transition(
            transition_id=f"logged:{event_id}",
            user_id="u1",
            source="logged",
            obs_tm1=obs_tm1,
            a_tm1=item,
            r_t=r_t,
            obs_t=obs_t,
            done=done,
            timestamp=t,
            policy="logged",
        )

    obs = [s.observation for s in states]
    assert outputs[0].transitions == ()
    assert outputs[1].transitions == (logged("e1", "i1", 1.0, empty_observation(params), obs[0], False, T0),)
    assert outputs[2].transitions == (logged("e2", "i1", 3.0, obs[0], obs[1], True, T0 + 1800 * SECOND),)
    assert outputs[3].transitions == (logged("e3", "i1", 0.0, obs[1], obs[2], False, T0 + 3601 * SECOND),)
    assert outputs[4].transitions == ()  # the rec_request had no action to emit
    waiting = logged("e5", "i5", 1.0, obs[3], obs[4], False, T0 + 3603 * SECOND)
    assert record.pending_logged == waiting
    for out in outputs:
        for transition in out.transitions:
            assert TRANSITIONS.decode(encode(transition)) == transition

    # The session times out on the watermark: emitted with done=True, exactly once.
    assert advance_time(record, T0 + 3603 * SECOND + 1800 * SECOND, params)[0] is record
    ended, out = advance_time(record, T0 + 3603 * SECOND + 1800 * SECOND + 1, params)
    assert out.transitions == (logged("e5", "i5", 1.0, obs[3], obs[4], True, T0 + 3603 * SECOND),)
    assert out.user_state is None and out.outcome == "timer" and not out.expired
    assert ended is not None and ended.pending_logged is None and ended.state is record.state
    again, out = advance_time(ended, T0 + 3603 * SECOND + 1800 * SECOND + 1, params)
    assert again is ended and out.transitions == () and out.attribution == ()
    # The next event does not emit it a second time.
    _, out = apply_event(ended, ev("e6", "view", T0 + 10 * HOUR, "i6", session_id="s3"), params)
    assert out.transitions == ()


def test_logged_transitions_can_be_switched_off() -> None:
    params = StepParams(logged_transitions=False)
    record, outputs = run([ev("e1", "view", T0, "i1"), ev("e2", "view", T0 + HOUR, "i2")], params)
    assert record.pending_logged is None and all(out.transitions == () for out in outputs)


# ---------------------------------------------------------------------------------------------
# Recommendation feedback


def slot(
    rec_id: str,
    position: int,
    item: str,
    r_t: float,
    obs_tm1: Observation,
    obs_t: Observation,
    done: bool,
    created_at: int,
    propensity: float,
) -> Transition:
    return Transition(
        transition_id=f"{rec_id}:{position}",
        user_id="u1",
        source="recommendation",
        obs_tm1=obs_tm1,
        a_tm1=item,
        r_t=r_t,
        obs_t=obs_t,
        done=done,
        timestamp=created_at,
        rec_id=rec_id,
        position=position,
        propensity=propensity,
        model_version=3,
        policy="dqn",
    )


def test_recommendation_feedback_rewards_slots_and_closes_at_window_end() -> None:
    params = StepParams()  # attribution window 1800 s; click 1, add_to_cart 3, favorite 2, purchase 10
    record, outputs = run([ev("e1", "view", T0, "i0")], params)
    s1 = state_of(outputs[0])
    stored, out = apply_recommendation(
        record, rec("r1", ["a", "b", "c"], T0, propensities=[0.5, 0.3, 0.2]), params
    )
    assert out == Outputs(None, (), "applied", (), False) and stored is not None
    assert stored.pending[0].obs_tm1 == s1.observation and stored.pending[0].created_at == T0
    record, outputs = run(
        [
            ev("e2", "click", T0 + MINUTE, "b"),
            ev("e3", "add_to_cart", T0 + 2 * MINUTE, "b"),
            ev("e4", "view", T0 + 3 * MINUTE, "b"),  # the next opportunity: obs_t
            ev("e5", "purchase", T0 + 4 * MINUTE, "c"),
            ev("e6", "view", T0 + 5 * MINUTE, "x"),  # a later opportunity does not move obs_t
        ],
        params,
        stored,
    )
    s4 = state_of(outputs[2])
    assert record.pending[0].rewards == [0.0, 4.0, 10.0]
    assert record.pending[0].obs_t == s4.observation
    assert all(out.attribution == () for out in outputs)  # nothing closes before the deadline

    assert next_deadline_ms(record, params) == T0 + 1800 * SECOND
    assert advance_time(record, T0 + 1800 * SECOND - 1, params)[0] is record
    closed, out = advance_time(record, T0 + 1800 * SECOND, params)
    assert out.transitions == (
        slot("r1", 0, "a", 0.0, s1.observation, s4.observation, False, T0, 0.5),
        slot("r1", 1, "b", 4.0, s1.observation, s4.observation, False, T0, 0.3),
        slot("r1", 2, "c", 10.0, s1.observation, s4.observation, False, T0, 0.2),
    )
    assert out.attribution == ("not_clicked", "clicked", "clicked")
    assert out.user_state is None and not out.expired
    assert closed is not None and closed.pending == [] and closed.state is record.state
    # Idempotent: the same watermark again gives nothing.
    again, out = advance_time(closed, T0 + 1800 * SECOND, params)
    assert again is closed and out.transitions == () and out.attribution == ()
    for transition in advance_time(record, T0 + 1800 * SECOND, params)[1].transitions:
        assert TRANSITIONS.decode(encode(transition)) == transition


def test_feedback_goes_to_the_named_rec_or_the_most_recent_one() -> None:
    params = StepParams()
    record, _ = run([ev("e1", "view", T0, "i0")], params)
    record = shown(record, rec("r1", ["x", "y"], T0), params)
    record, _ = run([ev("e2", "view", T0 + MINUTE, "i1")], params, record)
    record = shown(record, rec("r2", ["z", "x"], T0 + MINUTE), params)
    record, _ = run(
        [
            ev("e3", "click", T0 + 2 * MINUTE, "x", rec_id="r1"),  # named: r1 although r2 is newer
            ev("e4", "click", T0 + 3 * MINUTE, "x"),  # unnamed: the most recent slate with x
            ev("e5", "favorite", T0 + 4 * MINUTE, "y", rec_id="r2"),  # r2 lacks y: no reward, no fallback
            ev("e6", "view", T0 + 5 * MINUTE, "x"),  # views carry no reward weight
        ],
        params,
        record,
    )
    assert [p.rec_id for p in record.pending] == ["r1", "r2"]
    assert [p.rewards for p in record.pending] == [[1.0, 0.0], [0.0, 1.0]]


def test_late_events_from_before_the_recommendation_are_no_feedback() -> None:
    params = StepParams()
    record, _ = run([ev("e1", "view", T0 + 10 * MINUTE, "i0")], params)
    record = shown(record, rec("r1", ["a"], T0 + 10 * MINUTE), params)
    record, outputs = run(
        [
            ev("e2", "click", T0 + 5 * MINUTE, "a"),  # late: happened before the slate was shown
            ev("e3", "view", T0 + 6 * MINUTE, "b"),  # late opportunity: not the user's next one
        ],
        params,
        record,
    )
    assert [out.outcome for out in outputs] == ["late", "late"]
    assert record.pending[0].rewards == [0.0] and record.pending[0].obs_t is None
    record, _ = run([ev("e4", "click", T0 + 11 * MINUTE, "a")], params, record)
    assert record.pending[0].rewards == [1.0]


def test_expired_and_not_clicked_slots() -> None:
    params = StepParams()
    record, outputs = run([ev("e1", "view", T0, "i0")], params)
    record = shown(record, rec("r1", ["a", "b"], T0), params)
    # Only a non-opportunity event on another item follows: no obs_t, the slots expire.
    record, outputs = run([ev("e2", "click", T0 + MINUTE, "zz")], params, record)
    current = state_of(outputs[0]).observation
    _, out = advance_time(record, T0 + HOUR, params)  # long after the deadline: same outcome
    assert out.attribution == ("expired", "expired")
    slots = out.transitions[:2]
    assert [t.transition_id for t in slots] == ["r1:0", "r1:1"]
    assert [t.obs_t for t in slots] == [current, current]
    # No opportunity came after the slate before the session ended: its last transitions.
    assert [t.done for t in slots] == [True, True]
    # The pending logged click is also emitted: the session (gap 1800 s) has ended by then.
    assert [t.transition_id for t in out.transitions[2:]] == ["logged:e2"]


def test_session_end_closes_recommendations_with_done() -> None:
    params = StepParams(attribution_window_seconds=3600.0)  # longer than the 1800 s session gap
    record, outputs = run([ev("e1", "view", T0, "i0")], params)
    s1 = state_of(outputs[0])
    record = shown(record, rec("r1", ["a"], T0), params)
    assert next_deadline_ms(record, params) == T0 + 1800 * SECOND + 1  # the session end comes first
    # By timer at the session end, or only at the deadline: the same transition either way.
    _, by_session = advance_time(record, T0 + 1800 * SECOND + 1, params)
    _, by_deadline = advance_time(record, T0 + 3600 * SECOND, params)
    expected = slot("r1", 0, "a", 0.0, s1.observation, s1.observation, True, T0, 1.0)
    assert by_session.transitions[0] == by_deadline.transitions[0] == expected
    assert by_session.transitions == by_deadline.transitions
    # A new session id closes it too, before the event is applied (so the event earns nothing).
    _, outputs = run([ev("e2", "click", T0 + MINUTE, "a", session_id="s2")], params, record)
    assert outputs[0].transitions[0] == expected
    assert outputs[0].attribution == ("expired",)
    # A slate followed by an opportunity is not the session's last: not done when the session ends.
    went_on, outputs = run([ev("e3", "view", T0 + MINUTE, "b")], params, record)
    s3 = state_of(outputs[0])
    _, out = advance_time(went_on, T0 + MINUTE + 1800 * SECOND + 1, params)
    assert out.transitions[0] == slot("r1", 0, "a", 0.0, s1.observation, s3.observation, False, T0, 1.0)
    assert out.attribution == ("not_clicked",)


def test_a_slate_without_a_next_opportunity_waits_past_its_deadline_for_the_sessions_fate() -> None:
    """Clicked, then silence: the window ends before the session's end is known (gap after the last
    event), so the slate waits; the session's end makes it done, an event in the session does not."""
    params = StepParams()  # attribution window and session gap both 1800 s
    record, outputs = run([ev("e1", "view", T0, "i0")], params)
    s1 = state_of(outputs[0])
    record = shown(record, rec("r1", ["a", "b"], T0), params)
    record, outputs = run([ev("e2", "click", T0 + MINUTE, "b")], params, record)
    clicked = state_of(outputs[0]).observation
    # At the deadline nothing closes: only T0 + 1 min + 30 min tells whether the shopper left.
    assert next_deadline_ms(record, params) == T0 + MINUTE + 1800 * SECOND + 1
    waiting, out = advance_time(record, T0 + 1800 * SECOND, params)
    assert waiting is record and out.transitions == ()
    _, out = advance_time(record, T0 + MINUTE + 1800 * SECOND + 1, params)
    assert out.transitions[:2] == (
        slot("r1", 0, "a", 0.0, s1.observation, clicked, True, T0, 0.5),
        slot("r1", 1, "b", 1.0, s1.observation, clicked, True, T0, 0.5),
    )
    assert out.attribution == ("expired", "clicked")
    # The shopper comes back within the gap (after the window): the session went on, not done, from
    # the observation at the window's end; the late add_to_cart is no feedback.
    _, outputs = run([ev("e3", "add_to_cart", T0 + 1830 * SECOND, "b")], params, record)
    assert outputs[0].transitions[:2] == (
        slot("r1", 0, "a", 0.0, s1.observation, clicked, False, T0, 0.5),
        slot("r1", 1, "b", 1.0, s1.observation, clicked, False, T0, 0.5),
    )
    # Before the deadline, an event changes nothing of the kind: the slate keeps waiting for feedback.
    kept, outputs = run([ev("e3", "add_to_cart", T0 + 20 * MINUTE, "b")], params, record)
    assert outputs[0].transitions[0].transition_id == "logged:e2" and kept.pending[0].rewards == [0.0, 4.0]


def test_purchase_long_after_the_recommendation_earns_nothing() -> None:
    params = StepParams()
    record, outputs = run([ev("e1", "view", T0, "i0")], params)
    s1 = state_of(outputs[0])
    record = shown(record, rec("r1", ["a"], T0), params)
    _, outputs = run([ev("e2", "purchase", T0 + 2 * HOUR, "a")], params, record)
    out = outputs[0]
    # The window closed (at T0 + 30 min, before the purchase) with no reward, and the session ended
    # with no opportunity after the slate: done.
    assert out.transitions[0] == slot("r1", 0, "a", 0.0, s1.observation, s1.observation, True, T0, 1.0)
    assert out.transitions[1].transition_id == "logged:e1" and out.transitions[1].done is True
    assert out.attribution == ("expired",)
    assert state_of(out).purchased_items == ["a"]


def test_recommendation_for_an_unknown_user_waits_in_a_provisional_record() -> None:
    params = StepParams()
    record, out = apply_recommendation(None, rec("r1", ["a", "b"], T0, source_event_id="lost"), params)
    assert out.outcome == "applied" and out.user_state is None and record is not None
    assert record.state.applied_event_count == 0
    assert record.pending[0].obs_tm1 == empty_observation(params)
    assert record.pending[0].obs_tm1.features == [0.0] * FEATURE_DIM
    record, outputs = run([ev("e1", "view", T0 + MINUTE, "b")], params, record)
    state = state_of(outputs[0])
    assert state.applied_event_count == 1 and state.session_event_count == 1
    assert state.observation.recent_gaps_seconds == [0.0]
    assert record.pending[0].obs_t == state.observation
    record, _ = run([ev("e2", "click", T0 + 2 * MINUTE, "b")], params, record)
    assert record.pending[0].rewards == [0.0, 1.0]


def test_recommendations_ignored_duplicate_and_capped() -> None:
    params = StepParams(recommendation_transitions=False)
    assert apply_recommendation(None, rec("r1", ["a"], T0), params) == (
        None,
        Outputs(None, (), "ignored", (), False),
    )
    params = StepParams(max_pending_recommendations=1)
    record, _ = run([ev("e1", "view", T0, "i0")], params)
    record = shown(record, rec("r1", ["a"], T0), params)
    assert record is not None
    same, out = apply_recommendation(record, rec("r1", ["a"], T0), params)
    assert same is record and out.outcome == "duplicate"
    # A second slate pushes the first out early: it closes now, not done.
    updated, out = apply_recommendation(record, rec("r2", ["b"], T0), params)
    assert updated is not None and [p.rec_id for p in updated.pending] == ["r2"]
    assert [t.transition_id for t in out.transitions] == ["r1:0"] and out.attribution == ("expired",)
    assert out.transitions[0].done is False


def test_wrong_user_is_a_bug() -> None:
    params = StepParams()
    record, _ = run([ev("e1", "view", T0, "i0")], params)
    with pytest.raises(ValueError, match="u2"):
        apply_event(record, ev("e2", "view", T0, "i0", user_id="u2"), params)
    with pytest.raises(ValueError, match="u2"):
        apply_recommendation(record, rec("r1", ["a"], T0, user_id="u2"), params)


# ---------------------------------------------------------------------------------------------
# Expiry, persistence, determinism


def test_ttl_expiry_by_timer_and_by_a_late_returning_user() -> None:
    params = StepParams(ttl_seconds=86400.0)
    record, _ = apply_event(None, ev("e1", "view", T0, "i1"), params, offset=4)
    record = shown(record, rec("r1", ["a"], T0), params)
    assert record is not None
    # Just at the TTL: the window and the session are over, the user is not expired yet.
    kept, out = advance_time(record, T0 + 86400 * SECOND, params)
    assert kept is not None and not out.expired
    assert [t.transition_id for t in out.transitions] == ["r1:0", "logged:e1"]
    gone, out = advance_time(kept, T0 + 86400 * SECOND + 1, params)
    assert gone is None and out.expired and out.transitions == () and out.user_state is None
    # Straight from the first record: closes everything and expires in one call.
    gone, out = advance_time(record, T0 + 86400 * SECOND + 1, params)
    assert gone is None and out.expired
    assert [t.transition_id for t in out.transitions] == ["r1:0", "logged:e1"]
    # No opportunity followed the slate, and the session ended: both are the session's last.
    assert out.transitions[0].done is True and out.transitions[1].done is True
    # An event after the TTL starts afresh (offsets kept), without a tombstone.
    fresh, out = apply_event(record, ev("e2", "view", T0 + 2 * 86400 * SECOND, "i2"), params, offset=5)
    state = state_of(out)
    assert state.applied_event_count == 1 and state.observation.recent_items == ["i2"]
    assert state.event_counts_decayed["view"] == 1.0 and not out.expired
    assert fresh.last_offsets == {"clickstream": 5}
    assert fresh.recent_event_ids == ["e2"]
    assert [t.transition_id for t in out.transitions] == ["r1:0", "logged:e1"]


def mixed_inputs() -> list[ClickEvent | Recommendation]:
    return [
        ev("e1", "view", T0, "i1", category="c1", brand="b1", price=12.5),
        rec("r1", ["i2", "i3"], T0, propensities=[0.75, 0.25]),
        ev("e2", "click", T0 + 20 * SECOND, "i2", category="c2", price=3.25),
        ev("e3", "add_to_cart", T0 + 50 * SECOND, "i2", brand="b2"),
        ev("e4", "rec_request", T0 + 70 * SECOND, request_id="q4"),
        rec("r2", ["i4"], T0 + 70 * SECOND, source_event_id="e4"),
        ev("e5", "view", T0 + 95 * SECOND, "i4"),
        ev("e6", "purchase", T0 + 140 * SECOND, "i2", price=3.25),
        ev("e7", "view", T0 + 3 * HOUR, "i5", session_id="s9"),
    ]


def replay(
    inputs: list[ClickEvent | Recommendation], params: StepParams, *, restore_every: int = 0
) -> tuple[list[bytes], UserRecord | None]:
    """Apply inputs; returns every output encoded, in order. restore_every round-trips the record."""
    record: UserRecord | None = None
    encoded: list[bytes] = []
    for offset, message in enumerate(inputs):
        if restore_every and record is not None and offset % restore_every == 0:
            record = decode_record(encode_record(record))
        if isinstance(message, ClickEvent):
            record, out = apply_event(record, message, params, offset=offset)
        else:
            record, out = apply_recommendation(record, message, params, offset=offset)
        if out.user_state is not None:
            encoded.append(encode(out.user_state))
        encoded.extend(encode(t) for t in out.transitions)
        encoded.append(repr((out.outcome, out.attribution, out.expired)).encode())
    return encoded, record


def test_record_round_trip_is_exact() -> None:
    params = StepParams()
    _, record = replay(mixed_inputs()[:7], params)
    assert record is not None and record.pending and record.pending_logged is not None
    data = encode_record(record)
    restored = decode_record(data)
    assert restored == record
    assert encode_record(restored) == data
    assert encode(restored.state) == encode(record.state)  # counts keep EVENT_TYPES order
    assert list(restored.state.event_counts_decayed) == list(record.state.event_counts_decayed)


def test_same_inputs_give_byte_identical_outputs_also_across_restores() -> None:
    params = StepParams()
    first, record_a = replay(mixed_inputs(), params)
    second, record_b = replay(mixed_inputs(), params)
    restored, record_c = replay(mixed_inputs(), params, restore_every=2)
    assert first == second == restored
    assert record_a is not None and record_b is not None and record_c is not None
    assert encode_record(record_a) == encode_record(record_b) == encode_record(record_c)


def test_taobao_sample_is_deterministic_and_speed_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    require_shared_data(TAOBAO)
    from services.replay.formats import iter_events, read_log

    events = list(iter_events(read_log(TAOBAO, "taobao")))
    assert len(events) > 80_000
    params = StepParams()

    def apply_all(limit: int) -> tuple[dict[str, UserRecord], list[bytes]]:
        records: dict[str, UserRecord] = {}
        encoded: list[bytes] = []
        for offset, event in enumerate(events[:limit]):
            record, out = apply_event(records.get(event.user_id), event, params, offset=offset)
            records[event.user_id] = record
            encoded.append(encode(state_of(out)))
        return records, encoded

    a_records, a = apply_all(3000)
    b_records, b = apply_all(3000)
    assert a == b
    assert [encode_record(r) for r in a_records.values()] == [encode_record(r) for r in b_records.values()]

    records: dict[str, UserRecord] = {}
    get = records.get
    started = time.perf_counter()
    for offset, event in enumerate(events):
        records[event.user_id] = apply_event(get(event.user_id), event, params, offset=offset)[0]
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        rate = len(events) / elapsed
        print(f"\napply_event on the Taobao sample: {rate:,.0f} events/s ({len(events)} events, one core)")


def test_params_are_validated_and_frozen() -> None:
    with pytest.raises(ValueError, match="'clicks'"):
        StepParams(reward_weights={"clicks": 1.0})
    with pytest.raises(ValueError, match="window"):
        StepParams(window=0)
    with pytest.raises(ValueError, match="session_gap_seconds"):
        StepParams(session_gap_seconds=float("nan"))
    with pytest.raises(ValueError, match="opportunity_types"):
        StepParams(opportunity_types=("page_view",))
    weights = {"click": 2.0}
    params = StepParams(reward_weights=weights)
    weights["click"] = 100.0  # the caller's dict is copied
    assert params.reward_weights == {"click": 2.0}
    with pytest.raises(TypeError):
        params.reward_weights["click"] = 5.0  # type: ignore[index]

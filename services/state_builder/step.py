"""Per-user state logic of the state-builder: fold one user's events and recommendations into state.

Pure functions over plain data, with event time passed in: no I/O, no wall clock, no Kafka. The
service keeps one ``UserRecord`` per user and calls

- ``apply_event(record, event, params, offset=...)`` for each ClickEvent of the user,
- ``apply_recommendation(record, rec, params, offset=...)`` for each Recommendation shown to the user,
- ``advance_time(record, now_ms, params)`` with its event-time watermark, to fire timers,

and publishes what ``Outputs`` holds. Identical inputs give identical outputs: every float is
computed in a fixed order, so the same event sequence gives byte-identical ``encode(user_state)``.

State (``UserState``), after each applied event at event time ``t``
--------------------------------------------------------------------
- ``dt`` is the time since the latest event time applied so far (``UserRecord.latest_ms``),
  floored at 0, so a late event neither decays nor moves the clock back; the first event has dt 0.
- Window: the last ``window`` interactions, oldest first: raw item ids, event types and gaps
  (``dt`` in seconds). Every event with an item enters it; a ``rec_request`` without an item does
  not, but still counts for the session, the decayed counts and the clock.
- ``event_counts_decayed``: one entry per event type (in ``EVENT_TYPES`` order); at each event every
  count is multiplied by ``0.5 ** ((dt_ms / 1000) / decay_half_life_seconds)``, then the event's
  type gets ``+= 1``.
- ``category_affinity`` / ``brand_affinity``: ``affinity_buckets`` decayed sums each (same decay);
  an event with a category (brand) adds 1 to bucket ``zlib.crc32(value.encode("utf-8")) %
  affinity_buckets``. crc32 is stable across processes, unlike Python's salted ``hash()``.
- Session: an event starts a new session when it is the user's first, when its ``session_id``
  differs from the current one, or when ``dt`` exceeds ``session_gap_seconds``. ``session_id`` is
  the event's own; ``session_started_at`` is the earliest event time in the session;
  ``session_event_count`` counts the session's events (rec_request included). Sessions depend only
  on the user's own events, never on timers, so the state is a pure function of the event sequence.
- ``hour_of_day`` and ``day_of_week`` (0 = Monday) are UTC, from the event time.
- ``cart_items`` (add_to_cart adds; remove_from_cart and purchase remove), ``favorite_items``
  (favorite adds) and ``purchased_items`` (purchase adds) hold distinct items, OLDEST FIRST (most
  recent last, like the window); re-adding an item moves it to the end; each keeps at most
  ``max_item_list`` items (the most recent). Quantities are ignored.
- ``price_mean`` / ``price_min`` / ``price_max`` over all applied events with a finite price
  (``price_sum / price_count``); absent until the first priced event.
- ``applied_event_count``, ``source_event_id`` / ``source_event_type``, ``request_id`` (echoed from
  the event, None when absent) and ``timestamp`` (the event's own time, even when late).
- ``feature_layout`` is ``feature_layout(params)``, e.g. ``"v1:b=16:d=61"`` for the default 16
  buckets (``FEATURE_LAYOUT``).

Features (``Observation.features``, ``feature_dim(params) = 29 + 2 * affinity_buckets`` floats;
``FEATURE_DIM = 61`` with the default params; names from ``feature_names(params)``)
-------------------------------------------------------------------------------------------------
====================  ===================================  =========================================
index                 name                                 value
====================  ===================================  =========================================
0-6                   ``count:<type>``                     log1p(decayed count), types in EVENT_TYPES
                                                           order (view, click, add_to_cart,
                                                           remove_from_cart, purchase, favorite,
                                                           rec_request)
7                     ``session_event_count``              log1p(session_event_count)
8                     ``session_duration``                 log1p(seconds from session start to the
                                                           latest event time)
9                     ``gap``                              log1p(dt of this event, in seconds)
10                    ``applied_event_count``              log1p(applied_event_count)
11, 12                ``hour_sin``, ``hour_cos``           sin, cos of 2*pi*hour_of_day/24
13, 14                ``weekday_sin``, ``weekday_cos``     sin, cos of 2*pi*day_of_week/7
15, 16, 17            ``cart_size``, ``favorite_count``,   log1p of the list lengths
                      ``purchased_count``
18                    ``has_price``                        1.0 once a priced event was seen, else 0.0
19, 20, 21            ``price_mean``, ``price_min``,       log1p of the price stats (0.0 without)
                      ``price_max``
22-28                 ``last_event:<type>``                one-hot of this event's type
29 .. 29+B-1          ``category_affinity:<i>``            bucket i / sum of buckets (0.0 if sum 0)
29+B .. 29+2B-1       ``brand_affinity:<i>``               bucket i / sum of buckets (0.0 if sum 0)
====================  ===================================  =========================================

An unknown user's observation (before any event) is the empty window with all-zero features.

Duplicates, replays, late events
--------------------------------
- An event whose ``event_id`` is among the user's last ``recent_event_ids`` ids: not applied,
  outcome ``"duplicate"``. A recommendation whose ``rec_id`` was seen recently: the same.
- An input whose ``offset`` is <= ``last_offsets[source]`` (sources ``"clickstream"`` and
  ``"recommendations"``): not applied, outcome ``"replayed"``, record returned unchanged. This is
  how a restarted process skips inputs already reflected in a restored record.
- An event older than the latest event time applied is applied (the stream is the order) with
  outcome ``"late"``; its dt is 0.

Logged transitions (``params.logged_transitions``)
--------------------------------------------------
Each event with an item, other than rec_request, is an action of the logging policy (the user):
``obs_tm1`` = observation before the event, ``a_tm1`` = the item, ``r_t`` =
``logged_reward_weights[event_type]`` (0 when absent), ``obs_t`` = observation after the event,
``transition_id = "logged:<event_id>"``, ``source = "logged"``, ``policy = "logged"``,
``timestamp`` = event time, ``a_tm1_category`` / ``a_tm1_brand`` = the event's category and brand
(absent when the event has none). Its ``done`` is not known yet, so it waits in
``UserRecord.pending_logged`` and is emitted when the user's next event arrives (``done`` = that event
starts a new session) or when a timer ends the session (``done=True``).

Recommendation transitions (``params.recommendation_transitions``)
------------------------------------------------------------------
``apply_recommendation`` stores a ``PendingRecommendation``: ``obs_tm1`` is the user's current
observation, ``created_at`` the recommendation's ``event_timestamp``, rewards start at 0. A
recommendation for a user without a record creates a provisional record (``applied_event_count ==
0``, empty observation) that the user's first event turns into a real state.

- Feedback: an event whose type is in ``reward_weights`` with an item, at event time ``t`` with
  ``created_at <= t < created_at + attribution_window``, adds ``reward_weights[type]`` to the first
  slot holding the item: in the recommendation named by the event's ``rec_id`` if it has one
  (no fallback when that one is not pending), otherwise in the pending recommendation with the
  latest ``created_at`` (ties: the one received last) that holds the item.
- ``obs_t``: the observation after the first event of a type in ``opportunity_types`` with
  ``t >= created_at`` applied after the recommendation.
- Closing: a recommendation closes at its deadline ``created_at + attribution_window`` (when an
  event or ``advance_time`` reaches it), when the user's session ends (a new session starts, or
  ``now - latest_ms > session_gap``) and when the user expires. It then gives one transition per
  slot: ``transition_id = "<rec_id>:<position>"``, ``obs_tm1``, ``a_tm1`` = item, ``r_t`` = slot
  reward, ``obs_t`` = the stored obs_t or else the current observation, ``rec_id``, ``position``,
  ``propensity``, ``model_version``, ``policy``, ``source = "recommendation"``, ``timestamp =
  created_at``. ``done`` is True when the slate was the session's last opportunity: the session
  ended (gap, new session or expiry) with no opportunity after the slate (obs_t unset). A slate
  followed by an opportunity is never done: the session went on to obs_t. A slate with no
  opportunity after it does not close at its deadline while the session may still go on: it waits
  until the session's fate is known. The session's end closes it with ``done`` True (the shopper
  left after the slate); the user's next event in the same session closes it with ``done`` False
  and the observation at that time (the window's end; the event, after the window, is no
  feedback). So the outcome does not depend on how late after its deadline a timer fires.
- ``Outputs.attribution`` has one entry per closed slot, in transition order: ``"clicked"`` (the
  slot's reward is > 0), ``"not_clicked"`` (no positive reward, but the user came back to an
  opportunity: obs_t was set) or ``"expired"`` (no positive reward and no opportunity before the
  recommendation closed).
- At most ``max_pending_recommendations`` wait per user; beyond that the oldest closes early
  (``done`` False).

Timers (``advance_time(record, now_ms)``)
-----------------------------------------
``now_ms`` is an event-time watermark. In order: pending recommendations whose deadline is <= now
close; if ``now - latest_ms > session_gap`` the session has ended: the rest close with
``done=True`` and the pending logged transition is emitted with ``done=True``; if ``now -
latest_ms > ttl`` the user expires (record None, ``expired=True``, the service publishes a
tombstone). Its outcome is ``"timer"``. It never changes the published UserState (``user_state`` is
None) and is idempotent: a second call with the same ``now_ms`` gives no outputs and returns the
record object itself (``next_deadline_ms`` says when the next call would do anything).

``apply_event`` first runs the same timers at the event's own time, so outputs do not depend on
how often the service calls ``advance_time``, as long as the watermark does not run ahead of the
user's next event. If it does (a partition watermark moved on by other users' later events), a
timer may end a session that the user's next event, by its own time, continues: the transitions
already emitted keep ``done=True``, while the state, which depends only on the user's events,
continues the session. An event that arrives after the TTL starts a fresh state (keeping
``last_offsets``) and is published as usual, so ``expired`` stays False there.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import cast

import msgspec

from schemas.messages import (
    EVENT_TYPES,
    ClickEvent,
    EventType,
    Observation,
    Recommendation,
    Transition,
    UserState,
)

SOURCE_CLICKSTREAM = "clickstream"
SOURCE_RECOMMENDATIONS = "recommendations"
OUTCOMES: tuple[str, ...] = ("applied", "duplicate", "replayed", "late", "ignored", "timer")
ATTRIBUTIONS: tuple[str, ...] = ("clicked", "not_clicked", "expired")

_DEFAULT_REWARD_WEIGHTS = {"click": 1.0, "add_to_cart": 3.0, "favorite": 2.0, "purchase": 10.0}
_DEFAULT_LOGGED_REWARD_WEIGHTS = {
    "view": 1.0,
    "click": 1.0,
    "add_to_cart": 3.0,
    "favorite": 2.0,
    "purchase": 10.0,
    "remove_from_cart": 0.0,
}


@dataclass(frozen=True, kw_only=True)
class StepParams:
    """Pure parameters of the state logic (the service config maps onto it)."""

    window: int = 20
    """Last W interactions kept in the Observation."""
    session_gap_seconds: float = 1800.0
    """Inactivity (event time) that ends a session."""
    attribution_window_seconds: float = 1800.0
    """How long after a recommendation the user's feedback counts as its reward."""
    decay_half_life_seconds: float = 7 * 86400.0
    """Half-life of the recency decay of per-type counts and affinities."""
    affinity_buckets: int = 16
    """Category and brand affinities are hashed (crc32) into this many buckets each."""
    max_item_list: int = 50
    """Cart, favourites and purchased keep at most this many items (the most recent)."""
    ttl_seconds: float = 30 * 86400.0
    """A user's state expires after this much event time without events."""
    reward_weights: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType(dict(_DEFAULT_REWARD_WEIGHTS))
    )
    """Reward per feedback event type on a recommended item."""
    logged_reward_weights: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType(dict(_DEFAULT_LOGGED_REWARD_WEIGHTS))
    )
    """Reward of a logged interaction, per event type (0 for types not named)."""
    opportunity_types: tuple[str, ...] = ("view", "rec_request")
    """Event types that ask for a recommendation (they set a pending recommendation's obs_t)."""
    logged_transitions: bool = True
    """Emit a transition per logged interaction (SQN-style learning from logs)."""
    recommendation_transitions: bool = True
    """Join recommendations with the feedback that follows them and emit their transitions."""
    recent_event_ids: int = 64
    """Event ids (and recommendation ids) remembered per user to drop exact duplicates."""
    max_pending_recommendations: int = 64
    """Recommendations waiting for feedback per user; beyond this the oldest closes early."""

    def __post_init__(self) -> None:
        for name in ("window", "affinity_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("max_item_list", "recent_event_ids", "max_pending_recommendations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in (
            "session_gap_seconds",
            "attribution_window_seconds",
            "decay_half_life_seconds",
            "ttl_seconds",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("reward_weights", "logged_reward_weights"):
            weights = getattr(self, name)
            for key, weight in weights.items():
                if key not in EVENT_TYPES:
                    raise ValueError(
                        f"{name} has unknown event type {key!r}; expected one of {', '.join(EVENT_TYPES)}"
                    )
                if not math.isfinite(weight):
                    raise ValueError(f"{name}[{key!r}] must be a finite number, got {weight!r}")
            # Frozen means frozen: keep a read-only copy, not the caller's dict.
            object.__setattr__(self, name, MappingProxyType({k: float(v) for k, v in weights.items()}))
        for event_type in self.opportunity_types:
            if event_type not in EVENT_TYPES:
                raise ValueError(
                    f"opportunity_types has unknown event type {event_type!r}; "
                    f"expected one of {', '.join(EVENT_TYPES)}"
                )
        object.__setattr__(self, "opportunity_types", tuple(self.opportunity_types))


# ---------------------------------------------------------------------------------------------
# Feature layout

_TYPES = cast("tuple[EventType, ...]", EVENT_TYPES)
_NUM_TYPES = len(_TYPES)
_TYPE_INDEX = {event_type: i for i, event_type in enumerate(EVENT_TYPES)}
_BASE_FEATURES = 29  # everything before the affinity buckets
_HOUR_SIN = tuple(math.sin(2.0 * math.pi * hour / 24.0) for hour in range(24))
_HOUR_COS = tuple(math.cos(2.0 * math.pi * hour / 24.0) for hour in range(24))
_WEEKDAY_SIN = tuple(math.sin(2.0 * math.pi * day / 7.0) for day in range(7))
_WEEKDAY_COS = tuple(math.cos(2.0 * math.pi * day / 7.0) for day in range(7))
_ONE_HOT = tuple(tuple(1.0 if i == j else 0.0 for j in range(_NUM_TYPES)) for i in range(_NUM_TYPES))


def feature_dim(params: StepParams) -> int:
    """Length of Observation.features under these params: 29 + 2 * affinity_buckets."""
    return _BASE_FEATURES + 2 * params.affinity_buckets


def feature_layout(params: StepParams) -> str:
    """The UserState.feature_layout tag, e.g. "v1:b=16:d=61": version, buckets, dimension."""
    buckets = params.affinity_buckets
    layout = _LAYOUTS.get(buckets)
    if layout is None:
        layout = _LAYOUTS[buckets] = f"v1:b={buckets}:d={feature_dim(params)}"
    return layout


_LAYOUTS: dict[int, str] = {}


FEATURE_DIM: int = feature_dim(StepParams())
FEATURE_LAYOUT: str = feature_layout(StepParams())


def feature_names(params: StepParams) -> list[str]:
    """One name per feature, in Observation.features order (see the module docstring)."""
    names = [f"count:{event_type}" for event_type in EVENT_TYPES]
    names += [
        "session_event_count",
        "session_duration",
        "gap",
        "applied_event_count",
        "hour_sin",
        "hour_cos",
        "weekday_sin",
        "weekday_cos",
        "cart_size",
        "favorite_count",
        "purchased_count",
        "has_price",
        "price_mean",
        "price_min",
        "price_max",
    ]
    names += [f"last_event:{event_type}" for event_type in EVENT_TYPES]
    names += [f"category_affinity:{i}" for i in range(params.affinity_buckets)]
    names += [f"brand_affinity:{i}" for i in range(params.affinity_buckets)]
    assert len(names) == feature_dim(params)
    return names


def affinity_bucket(value: str, buckets: int) -> int:
    """The stable affinity bucket of a category or brand: crc32 of its UTF-8 bytes, modulo buckets."""
    return zlib.crc32(value.encode("utf-8")) % buckets


def hour_and_weekday(timestamp_ms: int) -> tuple[int, int]:
    """(hour of day, day of week with 0 = Monday), in UTC, of an event time in milliseconds."""
    seconds = timestamp_ms // 1000
    # 1970-01-01 was a Thursday (weekday 3).
    return (seconds // 3600) % 24, (seconds // 86400 + 3) % 7


def empty_observation(params: StepParams) -> Observation:
    """What the model sees of a user with no events: an empty window and all-zero features."""
    return Observation(
        recent_items=[], recent_event_types=[], recent_gaps_seconds=[], features=[0.0] * feature_dim(params)
    )


def _decayed(values: list[float], decay: float) -> list[float]:
    """values * decay as a new list, or values itself when that changes nothing (callers copy on write)."""
    if decay == 1.0 or not any(values):
        return values
    return [value * decay for value in values]


def _normalised(buckets: list[float]) -> list[float]:
    # fsum is correctly rounded, so the total does not depend on summation order or Python version
    # (the builtin sum of floats changed to compensated summation in 3.12).
    total = math.fsum(buckets)
    if total <= 0.0:
        return [0.0] * len(buckets)
    return [value / total for value in buckets]


# ---------------------------------------------------------------------------------------------
# Records


class PendingRecommendation(msgspec.Struct, frozen=True):
    """A shown slate waiting for feedback; it closes into one transition per slot (position = index)."""

    rec_id: str
    items: list[str]
    """Recommended item ids; a slot's position is its index here."""
    propensities: list[float]
    model_version: int
    policy: str
    created_at: int
    """Event time of the recommendation (Recommendation.event_timestamp), in ms."""
    session_id: str | None
    """The user's session when the recommendation was stored (None for a provisional record)."""
    obs_tm1: Observation
    """The user's observation when the recommendation was stored."""
    rewards: list[float]
    """Accumulated reward per slot."""
    obs_t: Observation | None = None
    """The observation after the user's next recommendation opportunity, once there was one."""
    source_event_id: str | None = None
    """The event the recommendation answered (Recommendation.source_event_id)."""


class UserRecord(msgspec.Struct, frozen=True):
    """Everything the state-builder keeps for one user; serialisable with msgspec so it can be restored.

    ``state.applied_event_count == 0`` marks a provisional record: a user known only from a recommendation,
    whose ``state`` was never published.
    """

    state: UserState
    recent_event_ids: list[str]
    """The last ``recent_event_ids`` applied event ids, oldest first."""
    pending: list[PendingRecommendation]
    """Open recommendations in the order received."""
    pending_logged: Transition | None
    """The last logged transition, waiting to learn whether the session ended."""
    last_offsets: dict[str, int]
    """Per source ("clickstream", "recommendations"): the last offset processed."""
    price_count: int
    price_sum: float
    latest_ms: int
    """The latest event time applied: the reference of decay, gaps, sessions, timers and TTL."""
    recent_rec_ids: list[str] = []
    """The last ``recent_event_ids`` recommendation ids received, oldest first."""


@dataclass(frozen=True, slots=True)
class Outputs:
    """What one step produced, for the service to publish and count."""

    user_state: UserState | None
    """The new state when an event changed it (None otherwise)."""
    transitions: tuple[Transition, ...]
    outcome: str
    """One of OUTCOMES: "applied", "duplicate", "replayed", "late" (applied, but older than the
    latest event applied), "ignored" (a recommendation not used: transitions off, empty slate) or
    "timer" (advance_time)."""
    attribution: tuple[str, ...]
    """One of ATTRIBUTIONS per closed recommendation slot, in transition order."""
    expired: bool
    """The user's state expired (TTL): the service publishes a tombstone."""


_REPLAYED = Outputs(None, (), "replayed", (), False)
_DUPLICATE = Outputs(None, (), "duplicate", (), False)
_IGNORED = Outputs(None, (), "ignored", (), False)
_NOTHING = Outputs(None, (), "timer", (), False)

_ENCODER = msgspec.msgpack.Encoder(order="deterministic")
_DECODER = msgspec.msgpack.Decoder(UserRecord)
_replace = msgspec.structs.replace


def encode_record(record: UserRecord) -> bytes:
    """The record as msgpack bytes, deterministic (dict keys sorted)."""
    return _ENCODER.encode(record)


def decode_record(data: bytes) -> UserRecord:
    """The record from encode_record's bytes; raises msgspec.DecodeError/ValidationError on bad bytes."""
    record = _DECODER.decode(data)
    counts = record.state.event_counts_decayed
    # Sorted keys on the wire; restore EVENT_TYPES order (which apply_event relies on), so a restored
    # state also encodes exactly as it was published.
    canonical = {event_type: counts.get(event_type, 0.0) for event_type in _TYPES}
    return _replace(record, state=_replace(record.state, event_counts_decayed=canonical))


# ---------------------------------------------------------------------------------------------
# Timers and closing


def _close(
    rec: PendingRecommendation,
    user_id: str,
    current: Observation,
    session_ended: bool,
    transitions: list[Transition],
    attribution: list[str],
) -> None:
    """Append one transition per slot of a closing recommendation, and its attribution outcomes.

    ``done`` is set when the slate was the session's last opportunity: the session ended with no
    opportunity after it.
    """
    obs_t = current if rec.obs_t is None else rec.obs_t
    came_back = rec.obs_t is not None
    done = session_ended and not came_back
    for position, (item, propensity, reward) in enumerate(
        zip(rec.items, rec.propensities, rec.rewards, strict=True)
    ):
        transitions.append(
            Transition(
                transition_id=f"{rec.rec_id}:{position}",
                user_id=user_id,
                source="recommendation",
                obs_tm1=rec.obs_tm1,
                a_tm1=item,
                r_t=reward,
                obs_t=obs_t,
                done=done,
                timestamp=rec.created_at,
                rec_id=rec.rec_id,
                position=position,
                propensity=propensity,
                model_version=rec.model_version,
                policy=rec.policy,
            )
        )
        attribution.append("clicked" if reward > 0.0 else "not_clicked" if came_back else "expired")


def _advance(
    record: UserRecord,
    now_ms: int,
    params: StepParams,
    transitions: list[Transition],
    attribution: list[str],
) -> UserRecord | None:
    """Fire the record's timers at event time now_ms; returns the same object when nothing fired."""
    latest = record.latest_ms
    gap_ms = params.session_gap_seconds * 1000.0
    expired = now_ms - latest > params.ttl_seconds * 1000.0
    session_over = expired or now_ms - latest > gap_ms
    logged = record.pending_logged
    if not record.pending and (logged is None or not session_over) and not expired:
        return record  # the hot path: nothing to fire
    window_ms = params.attribution_window_seconds * 1000.0
    user_id = record.state.user_id
    current = record.state.observation
    keep: list[PendingRecommendation] = []
    for rec in record.pending:
        deadline = rec.created_at + window_ms
        if session_over:
            _close(rec, user_id, current, True, transitions, attribution)
        elif deadline <= now_ms and rec.obs_t is not None:
            _close(rec, user_id, current, False, transitions, attribution)
        else:
            # Before its deadline; or past it with no opportunity since, so whether the session went on
            # is not known yet: the next event in the session (done False) or its end (done True) tells.
            keep.append(rec)
    if session_over and logged is not None:
        transitions.append(_replace(logged, done=True))
        logged = None
    if expired:
        return None
    if len(keep) == len(record.pending) and logged is record.pending_logged:
        return record
    return _replace(record, pending=keep, pending_logged=logged)


def next_deadline_ms(record: UserRecord, params: StepParams) -> int:
    """The earliest event time at which advance_time would change this record (for a timer index).

    advance_time(record, now) is a no-op for every ``now`` below it.
    """
    latest = record.latest_ms
    # Session end and TTL fire when now - latest > limit (strictly), i.e. at floor(latest + limit) + 1.
    deadline = math.floor(latest + params.ttl_seconds * 1000.0) + 1
    if record.pending or record.pending_logged is not None:
        deadline = min(deadline, math.floor(latest + params.session_gap_seconds * 1000.0) + 1)
    window_ms = params.attribution_window_seconds * 1000.0
    for rec in record.pending:
        # A slate without an opportunity since waits for the session's end (already in the minimum).
        if rec.obs_t is not None:
            deadline = min(deadline, math.ceil(rec.created_at + window_ms))
    return deadline


def advance_time(record: UserRecord, now_ms: int, params: StepParams) -> tuple[UserRecord | None, Outputs]:
    """Fire timers up to event time now_ms: close attribution windows, end sessions, expire the user.

    Never changes the published UserState; idempotent for a repeated now_ms.
    """
    transitions: list[Transition] = []
    attribution: list[str] = []
    updated = _advance(record, now_ms, params, transitions, attribution)
    if updated is record:
        return record, _NOTHING
    return updated, Outputs(None, tuple(transitions), "timer", tuple(attribution), updated is None)


# ---------------------------------------------------------------------------------------------
# Events


def _push(items: list[str], item: str, limit: int) -> list[str]:
    """items with item moved (or added) to the end, keeping the last `limit`."""
    if item in items:
        items = [x for x in items if x != item]
        items.append(item)
    else:
        items = [*items, item]
    if len(items) > limit:
        items = items[len(items) - limit :]
    return items


def _with_offset(offsets: dict[str, int], source: str, offset: int | None) -> dict[str, int]:
    if offset is None:
        return offsets
    updated = dict(offsets)
    if source in updated:
        updated[source] = offset
        return updated
    # Fixed key order regardless of which source came first, so equal records encode alike.
    updated[source] = offset
    return {key: updated[key] for key in sorted(updated)}


def apply_event(
    record: UserRecord | None, event: ClickEvent, params: StepParams, *, offset: int | None = None
) -> tuple[UserRecord, Outputs]:
    """Apply one click event of the user: the new record and what to publish (see the module docstring).

    Raises ValueError if the event belongs to another user than the record (a partitioning bug).
    """
    t = event.timestamp
    transitions: list[Transition] = []
    attribution: list[str] = []
    outcome = "applied"
    if record is not None:
        if record.state.user_id != event.user_id:
            raise ValueError(
                f"event of user {event.user_id!r} applied to the record of {record.state.user_id!r}"
            )
        last = record.last_offsets.get(SOURCE_CLICKSTREAM)
        if offset is not None and last is not None and offset <= last:
            return record, _REPLAYED
        if event.event_id in record.recent_event_ids:
            if offset is not None:
                record = _replace(
                    record, last_offsets=_with_offset(record.last_offsets, SOURCE_CLICKSTREAM, offset)
                )
            return record, _DUPLICATE
        if record.state.applied_event_count and t < record.latest_ms:
            outcome = "late"
        offsets = record.last_offsets
        advanced = _advance(record, t, params, transitions, attribution)
        if advanced is None:  # expired before this event: start afresh, remembering what was consumed
            outcome = "applied"
        record = advanced
    else:
        offsets = {}
    offsets = _with_offset(offsets, SOURCE_CLICKSTREAM, offset)

    event_type = event.event_type
    item = event.item_id
    buckets = params.affinity_buckets
    gap_limit_ms = params.session_gap_seconds * 1000.0

    if record is None or not record.state.applied_event_count:
        # The user's first event (or first after expiry); a provisional record keeps its pending slates.
        prev = None
        prev_obs = empty_observation(params) if record is None else record.state.observation
        dt_ms = 0
        latest = t
        new_session = True
        counts = [0.0] * _NUM_TYPES
        category_affinity = [0.0] * buckets
        brand_affinity = [0.0] * buckets
        items: list[str] = []
        types: list[EventType] = []
        gaps: list[float] = []
        cart: list[str] = []
        favorites: list[str] = []
        purchased: list[str] = []
        price_count = 0
        price_sum = 0.0
        price_min: float | None = None
        price_max: float | None = None
        applied = 1
        session_started_at = t
        session_events = 1
        pending = [] if record is None else record.pending
        recent_ids: list[str] = []
        recent_rec_ids = [] if record is None else record.recent_rec_ids
    else:
        prev = record.state
        prev_obs = prev.observation
        dt_ms = t - record.latest_ms
        if dt_ms < 0:
            dt_ms = 0
        latest = record.latest_ms + dt_ms
        new_session = event.session_id != prev.session_id or dt_ms > gap_limit_ms
        decay = 0.5 ** (dt_ms / 1000.0 / params.decay_half_life_seconds) if dt_ms else 1.0
        prev_counts = prev.event_counts_decayed
        # Every record's counts hold all event types in EVENT_TYPES order (decode_record restores it).
        if decay != 1.0:
            counts = [count * decay for count in prev_counts.values()]
        else:
            counts = list(prev_counts.values())
        # Affinity lists are shared with the previous state until written (all-zero ones stay shared).
        category_affinity = _decayed(prev.category_affinity, decay)
        brand_affinity = _decayed(prev.brand_affinity, decay)
        obs = prev.observation
        items = obs.recent_items
        types = obs.recent_event_types
        gaps = obs.recent_gaps_seconds
        cart = prev.cart_items
        favorites = prev.favorite_items
        purchased = prev.purchased_items
        price_count = record.price_count
        price_sum = record.price_sum
        price_min = prev.price_min
        price_max = prev.price_max
        applied = prev.applied_event_count + 1
        if new_session:
            session_started_at = t
            session_events = 1
        else:
            session_started_at = min(prev.session_started_at, t)
            session_events = prev.session_event_count + 1
        pending = record.pending
        recent_ids = record.recent_event_ids
        recent_rec_ids = record.recent_rec_ids
        if new_session and pending:  # a session_id change; a gap already closed them in _advance
            for rec in pending:
                _close(rec, event.user_id, prev_obs, True, transitions, attribution)
            pending = []
        elif pending:
            # Slates past their deadline that waited for the session's fate: it goes on (done False),
            # from the observation at the window's end.
            window_ms = params.attribution_window_seconds * 1000.0
            waited = [rec for rec in pending if rec.created_at + window_ms <= t]
            if waited:
                for rec in waited:
                    _close(rec, event.user_id, prev_obs, False, transitions, attribution)
                pending = [rec for rec in pending if rec.created_at + window_ms > t]
        logged = record.pending_logged
        if logged is not None:  # it waits with done=False
            transitions.append(_replace(logged, done=True) if new_session else logged)

    type_index = _TYPE_INDEX[event_type]
    counts[type_index] += 1.0
    gap_seconds = dt_ms / 1000.0
    if item is not None:
        window = params.window
        items = [*items, item]
        types = [*types, event_type]
        gaps = [*gaps, gap_seconds]
        if len(items) > window:
            items = items[-window:]
            types = types[-window:]
            gaps = gaps[-window:]
        limit = params.max_item_list
        if event_type == "add_to_cart":
            cart = _push(cart, item, limit)
        elif event_type == "remove_from_cart":
            if item in cart:
                cart = [x for x in cart if x != item]
        elif event_type == "purchase":
            if item in cart:
                cart = [x for x in cart if x != item]
            purchased = _push(purchased, item, limit)
        elif event_type == "favorite":
            favorites = _push(favorites, item, limit)
    if event.category is not None:
        if prev is not None and category_affinity is prev.category_affinity:
            category_affinity = list(category_affinity)
        category_affinity[zlib.crc32(event.category.encode("utf-8")) % buckets] += 1.0
    if event.brand is not None:
        if prev is not None and brand_affinity is prev.brand_affinity:
            brand_affinity = list(brand_affinity)
        brand_affinity[zlib.crc32(event.brand.encode("utf-8")) % buckets] += 1.0
    price = event.price
    if price is not None and math.isfinite(price):
        price_count += 1
        price_sum += price
        price_min = price if price_min is None or price < price_min else price_min
        price_max = price if price_max is None or price > price_max else price_max
    price_mean = price_sum / price_count if price_count else None
    hour, weekday = hour_and_weekday(t)

    log1p = math.log1p
    features = list(map(log1p, counts))
    features += (
        log1p(session_events),
        log1p((latest - session_started_at) / 1000.0),
        log1p(gap_seconds),
        log1p(applied),
        _HOUR_SIN[hour],
        _HOUR_COS[hour],
        _WEEKDAY_SIN[weekday],
        _WEEKDAY_COS[weekday],
        log1p(len(cart)),
        log1p(len(favorites)),
        log1p(len(purchased)),
    )
    if price_mean is not None and price_min is not None and price_max is not None:
        features += (1.0, log1p(price_mean), log1p(price_min), log1p(price_max))
    else:
        features += (0.0, 0.0, 0.0, 0.0)
    features += _ONE_HOT[type_index]
    features += _normalised(category_affinity)
    features += _normalised(brand_affinity)

    observation = Observation(
        recent_items=items, recent_event_types=types, recent_gaps_seconds=gaps, features=features
    )
    state = UserState(
        user_id=event.user_id,
        timestamp=t,
        source_event_id=event.event_id,
        source_event_type=event_type,
        session_id=event.session_id,  # equal to the current one unless a new session starts
        session_started_at=session_started_at,
        session_event_count=session_events,
        applied_event_count=applied,
        observation=observation,
        event_counts_decayed=dict(zip(_TYPES, counts)),  # noqa: B905 (both have _NUM_TYPES entries)
        cart_items=cart,
        favorite_items=favorites,
        purchased_items=purchased,
        category_affinity=category_affinity,
        brand_affinity=brand_affinity,
        hour_of_day=hour,
        day_of_week=weekday,
        feature_layout=feature_layout(params),
        request_id=event.request_id,
        price_mean=price_mean,
        price_min=price_min,
        price_max=price_max,
    )

    if pending:
        pending = _feedback(pending, event, observation, params)

    pending_logged = None
    if params.logged_transitions and item is not None and event_type != "rec_request":
        pending_logged = Transition(
            transition_id=f"logged:{event.event_id}",
            user_id=event.user_id,
            source="logged",
            obs_tm1=prev_obs,
            a_tm1=item,
            r_t=params.logged_reward_weights.get(event_type, 0.0),
            obs_t=observation,
            done=False,
            timestamp=t,
            policy="logged",
            a_tm1_category=event.category,
            a_tm1_brand=event.brand,
        )

    keep_ids = params.recent_event_ids
    if keep_ids:
        recent_ids = [*recent_ids, event.event_id]
        if len(recent_ids) > keep_ids:
            recent_ids = recent_ids[len(recent_ids) - keep_ids :]

    new_record = UserRecord(
        state=state,
        recent_event_ids=recent_ids,
        pending=pending,
        pending_logged=pending_logged,
        last_offsets=offsets,
        price_count=price_count,
        price_sum=price_sum,
        latest_ms=latest,
        recent_rec_ids=recent_rec_ids,
    )
    return new_record, Outputs(state, tuple(transitions), outcome, tuple(attribution), False)


def _feedback(
    pending: list[PendingRecommendation], event: ClickEvent, observation: Observation, params: StepParams
) -> list[PendingRecommendation]:
    """Credit the event to a pending slate and set obs_t at an opportunity; pending is not mutated."""
    t = event.timestamp
    item = event.item_id
    updated = pending
    weight = params.reward_weights.get(event.event_type)
    if weight is not None and item is not None:
        target = -1
        for index, rec in enumerate(pending):
            if rec.created_at > t or item not in rec.items:
                continue
            if event.rec_id is not None:
                if rec.rec_id == event.rec_id:
                    target = index
            elif target < 0 or rec.created_at >= pending[target].created_at:
                target = index
        if target >= 0:
            rec = pending[target]
            rewards = list(rec.rewards)
            rewards[rec.items.index(item)] += weight
            updated = list(pending)
            updated[target] = _replace(rec, rewards=rewards)
    if event.event_type in params.opportunity_types and any(
        rec.obs_t is None and rec.created_at <= t for rec in updated
    ):
        updated = [
            _replace(rec, obs_t=observation) if rec.obs_t is None and rec.created_at <= t else rec
            for rec in updated
        ]
    return updated


# ---------------------------------------------------------------------------------------------
# Recommendations


def _provisional_record(rec: Recommendation, params: StepParams) -> UserRecord:
    """A record for a user known only from a recommendation (no event applied yet)."""
    hour, weekday = hour_and_weekday(rec.event_timestamp)
    buckets = params.affinity_buckets
    state = UserState(
        user_id=rec.user_id,
        timestamp=rec.event_timestamp,
        source_event_id=rec.source_event_id,
        source_event_type="rec_request",
        session_id=rec.session_id or rec.rec_id,
        session_started_at=rec.event_timestamp,
        session_event_count=0,
        applied_event_count=0,
        observation=empty_observation(params),
        event_counts_decayed=dict.fromkeys(_TYPES, 0.0),
        cart_items=[],
        favorite_items=[],
        purchased_items=[],
        category_affinity=[0.0] * buckets,
        brand_affinity=[0.0] * buckets,
        hour_of_day=hour,
        day_of_week=weekday,
        feature_layout=feature_layout(params),
        request_id=rec.request_id,
    )
    return UserRecord(
        state=state,
        recent_event_ids=[],
        pending=[],
        pending_logged=None,
        last_offsets={},
        price_count=0,
        price_sum=0.0,
        latest_ms=rec.event_timestamp,
    )


def apply_recommendation(
    record: UserRecord | None, rec: Recommendation, params: StepParams, *, offset: int | None = None
) -> tuple[UserRecord | None, Outputs]:
    """Store a shown slate for the attribution join; the record is None only if it was None and stays so.

    Raises ValueError if the recommendation belongs to another user than the record.
    """
    if record is not None:
        if record.state.user_id != rec.user_id:
            raise ValueError(
                f"recommendation for user {rec.user_id!r} applied to the record of {record.state.user_id!r}"
            )
        last = record.last_offsets.get(SOURCE_RECOMMENDATIONS)
        if offset is not None and last is not None and offset <= last:
            return record, _REPLAYED
    offset_only = (
        None
        if record is None or offset is None
        else _replace(record, last_offsets=_with_offset(record.last_offsets, SOURCE_RECOMMENDATIONS, offset))
    )
    if not params.recommendation_transitions or not rec.items:
        return (offset_only or record), _IGNORED
    if record is not None and (
        rec.rec_id in record.recent_rec_ids or any(p.rec_id == rec.rec_id for p in record.pending)
    ):
        return (offset_only or record), _DUPLICATE

    if record is None:
        record = _provisional_record(rec, params)
    stored = PendingRecommendation(
        rec_id=rec.rec_id,
        items=[slot.item_id for slot in rec.items],
        propensities=[slot.propensity for slot in rec.items],
        model_version=rec.model_version,
        policy=rec.policy,
        created_at=rec.event_timestamp,
        session_id=record.state.session_id if record.state.applied_event_count else rec.session_id,
        obs_tm1=record.state.observation,
        rewards=[0.0] * len(rec.items),
        source_event_id=rec.source_event_id,
    )
    transitions: list[Transition] = []
    attribution: list[str] = []
    pending = [*record.pending, stored]
    excess = len(pending) - params.max_pending_recommendations
    if excess > 0:
        for oldest in pending[:excess]:
            _close(oldest, rec.user_id, record.state.observation, False, transitions, attribution)
        pending = pending[excess:]
    recent_rec_ids = record.recent_rec_ids
    keep_ids = params.recent_event_ids
    if keep_ids:
        recent_rec_ids = [*recent_rec_ids, rec.rec_id][-keep_ids:]
    updated = _replace(
        record,
        pending=pending,
        recent_rec_ids=recent_rec_ids,
        last_offsets=_with_offset(record.last_offsets, SOURCE_RECOMMENDATIONS, offset),
    )
    return updated, Outputs(None, tuple(transitions), "applied", tuple(attribution), False)

"""The messages qrec exchanges on Kafka, as typed, frozen msgspec structs.

Each struct mirrors one JSON Schema file under ``schemas/json/<name>/<M-R-A>.json``; a test keeps
the two from drifting. Optional fields default to ``None`` and are left out when encoding, so the
JSON on the wire holds only what is known. Times are integer milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

EventType = Literal[
    "view",
    "click",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
    "favorite",
    "rec_request",
]
EVENT_TYPES: tuple[str, ...] = (
    "view",
    "click",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
    "favorite",
    "rec_request",
)

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Millis = Annotated[int, msgspec.Meta(ge=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class ClickEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One shopper interaction, as a shop's tracker (or `qrec replay`) sends it to the clickstream."""

    event_id: Id
    user_id: Id
    session_id: Id
    event_type: EventType
    timestamp: Millis
    item_id: Id | None = None
    rec_id: Id | None = None
    request_id: Id | None = None
    category: Id | None = None
    brand: Id | None = None
    price: NonNegative | None = None
    quantity: Annotated[int, msgspec.Meta(ge=1)] | None = None


class Observation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the model sees of a user: the recent interaction window plus the dense feature vector."""

    recent_items: list[Id]
    recent_event_types: list[EventType]
    recent_gaps_seconds: list[NonNegative]
    features: list[float]


class UserState(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A user's state after applying one event; published keyed by user_id to a compacted topic."""

    user_id: Id
    timestamp: Millis
    source_event_id: Id
    source_event_type: EventType
    session_id: Id
    session_started_at: Millis
    session_event_count: Annotated[int, msgspec.Meta(ge=0)]
    applied_event_count: Annotated[int, msgspec.Meta(ge=0)]
    observation: Observation
    event_counts_decayed: dict[EventType, NonNegative]
    cart_items: list[Id]
    favorite_items: list[Id]
    purchased_items: list[Id]
    category_affinity: list[NonNegative]
    brand_affinity: list[NonNegative]
    hour_of_day: Annotated[int, msgspec.Meta(ge=0, le=23)]
    day_of_week: Annotated[int, msgspec.Meta(ge=0, le=6)]
    feature_layout: Id
    request_id: Id | None = None
    price_mean: NonNegative | None = None
    price_min: NonNegative | None = None
    price_max: NonNegative | None = None


class RecommendedItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One slot of a recommended slate."""

    item_id: Id
    score: float
    propensity: Annotated[float, msgspec.Meta(ge=0, le=1)]
    explored: bool = False


class Recommendation(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A slate of items the actor recommends to a user, with the probability of each choice."""

    rec_id: Id
    user_id: Id
    items: list[RecommendedItem]
    policy: Id
    model_version: Annotated[int, msgspec.Meta(ge=0)]
    explored: bool
    source_event_id: Id
    event_timestamp: Millis
    created_at: Millis
    session_id: Id | None = None
    request_id: Id | None = None


class Transition(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One RL transition (obs_tm1, a_tm1, r_t, obs_t, done) for the learner."""

    transition_id: Id
    user_id: Id
    source: Literal["recommendation", "logged"]
    obs_tm1: Observation
    a_tm1: Id
    r_t: float
    obs_t: Observation
    done: bool
    timestamp: Millis
    rec_id: Id | None = None
    position: Annotated[int, msgspec.Meta(ge=0)] | None = None
    propensity: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    model_version: Annotated[int, msgspec.Meta(ge=0)] | None = None
    policy: Id | None = None
    a_tm1_category: Id | None = None
    a_tm1_brand: Id | None = None


class ModelUpdateHeader(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="header"
):
    """Announces a model version; its bytes follow in ``num_chunks`` ModelUpdateChunk messages."""

    model_version: Annotated[int, msgspec.Meta(ge=1)]
    step: Annotated[int, msgspec.Meta(ge=0)]
    created_at: Millis
    vocabulary_size: Annotated[int, msgspec.Meta(ge=0)]
    num_chunks: Annotated[int, msgspec.Meta(ge=1)]
    total_bytes: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Annotated[str, msgspec.Meta(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")]
    encoding: Id
    config: dict[str, Any]


class ModelUpdateChunk(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="chunk"
):
    """One piece of a model version's bytes, base64-encoded."""

    model_version: Annotated[int, msgspec.Meta(ge=1)]
    chunk_index: Annotated[int, msgspec.Meta(ge=0)]
    num_chunks: Annotated[int, msgspec.Meta(ge=1)]
    data_base64: str


ModelUpdate = ModelUpdateHeader | ModelUpdateChunk


class DeadLetter(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Input qrec could not use, kept with the reason instead of being dropped."""

    reason_code: Id
    reason: str
    service: Id
    timestamp: Millis
    payload: str
    payload_encoding: Literal["utf-8", "base64"]
    source_topic: Id | None = None
    source_partition: Annotated[int, msgspec.Meta(ge=0)] | None = None
    source_offset: Annotated[int, msgspec.Meta(ge=0)] | None = None
    source_key: str | None = None
    source_file: str | None = None
    source_line: Annotated[int, msgspec.Meta(ge=1)] | None = None


class CatalogueItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Whether a catalogue item may be recommended, as the shop publishes it (latest per item_id)."""

    item_id: Id
    available: bool
    timestamp: Millis


# Schema name (folder under schemas/json) and current version of each message type.
SCHEMA_VERSIONS: dict[str, tuple[str, type]] = {
    "click_event": ("1-0-0", ClickEvent),
    "user_state": ("1-0-0", UserState),
    "recommendation": ("1-0-0", Recommendation),
    "transition": ("1-0-1", Transition),
    "model_update_header": ("1-0-0", ModelUpdateHeader),
    "model_update_chunk": ("1-0-0", ModelUpdateChunk),
    "dead_letter": ("1-0-0", DeadLetter),
    "catalogue_item": ("1-0-0", CatalogueItem),
}

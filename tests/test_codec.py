"""schemas.codec: exact reason codes for bad input, round trips, deterministic encoding."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import numpy as np
import pytest

from schemas.codec import (
    CATALOGUE_ITEMS,
    CLICK_EVENTS,
    DEAD_LETTERS,
    DEFAULT_MAX_EVENT_BYTES,
    MODEL_UPDATES,
    REASON_CODES,
    RECOMMENDATIONS,
    TRANSITIONS,
    USER_STATES,
    ClickEventCodec,
    Codec,
    DecodeError,
    encode,
    to_builtins,
)
from schemas.messages import (
    CatalogueItem,
    ClickEvent,
    DeadLetter,
    ModelUpdateChunk,
    ModelUpdateHeader,
    Observation,
    Recommendation,
    RecommendedItem,
    Transition,
    UserState,
)

_DROP = object()

BASE_EVENT: dict[str, Any] = {
    "event_id": "e-1",
    "user_id": "u-1",
    "session_id": "s-1",
    "event_type": "view",
    "timestamp": 1718012345678,
    "item_id": "sku-1",
}


def _event(**changes: Any) -> bytes:
    """A ClickEvent payload: BASE_EVENT with fields changed (or dropped with _DROP)."""
    doc = {**BASE_EVENT, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not _DROP}, ensure_ascii=False).encode()


def _padded(size: int) -> bytes:
    """A valid event of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    payload = _event()
    return payload + b" " * (size - len(payload))


# (payload, reason_code, text the reason must contain: the offending field where there is one)
BAD_CLICK_EVENTS: list[Any] = [
    pytest.param(b"", "empty", "empty", id="empty-bytes"),
    pytest.param(None, "empty", "empty", id="none"),
    pytest.param(b'{"event_id": "e-1",', "invalid_json", "JSON", id="truncated-json"),
    pytest.param(b"{'event_id': 'e-1'}", "invalid_json", "JSON", id="single-quotes"),
    pytest.param(b"not json at all", "invalid_json", "JSON", id="not-json"),
    pytest.param(_event() + b" trailing", "invalid_json", "JSON", id="trailing-garbage"),
    pytest.param(_event()[:-1] + b",}", "invalid_json", "JSON", id="trailing-comma"),
    pytest.param(
        _event(item_id="caf\xe9").replace(b"caf\xc3\xa9", b"caf\xe9"),
        "not_utf8",
        "UTF-8",
        id="latin1-in-string",
    ),
    pytest.param(b'{"event_id":"\xff\xfe"}', "not_utf8", "UTF-8", id="bad-bytes-in-string"),
    pytest.param(b"\xff\xfe{}", "not_utf8", "UTF-8", id="bad-bytes-top-level"),
    pytest.param(_event() + b"\xff", "not_utf8", "UTF-8", id="bad-byte-after-object"),
    pytest.param(b"\x80" + _event(), "not_utf8", "UTF-8", id="bad-byte-before-object"),
    pytest.param(b"[]", "not_an_object", "array", id="array"),
    pytest.param(b"null", "not_an_object", "null", id="null"),
    pytest.param(b'"view"', "not_an_object", "str", id="string"),
    pytest.param(b"42", "not_an_object", "int", id="number"),
    pytest.param(b"true", "not_an_object", "bool", id="bool"),
    pytest.param(_event(user_id=_DROP), "missing_field", "'user_id'", id="missing-user_id"),
    pytest.param(_event(event_id=_DROP), "missing_field", "'event_id'", id="missing-event_id"),
    pytest.param(_event(event_type=_DROP), "missing_field", "'event_type'", id="missing-event_type"),
    pytest.param(_event(timestamp=_DROP), "missing_field", "'timestamp'", id="missing-timestamp"),
    pytest.param(b"{}", "missing_field", "missing required field", id="empty-object"),
    pytest.param(_event(item_id=_DROP), "missing_field", "'item_id'", id="view-without-item_id"),
    pytest.param(_event(item_id=None), "missing_field", "'item_id'", id="view-with-null-item_id"),
    pytest.param(
        _event(event_type="purchase", item_id=_DROP),
        "missing_field",
        "'item_id'",
        id="purchase-without-item_id",
    ),
    pytest.param(_event(timestamp="1718012345678"), "wrong_type", "'timestamp'", id="timestamp-string"),
    pytest.param(_event(timestamp=1718012345678.5), "wrong_type", "'timestamp'", id="timestamp-fraction"),
    pytest.param(
        _event(timestamp=1718012345678.0), "wrong_type", "'timestamp'", id="timestamp-integral-float"
    ),
    pytest.param(_event(timestamp=None), "wrong_type", "'timestamp'", id="timestamp-null"),
    pytest.param(_event(user_id=58213), "wrong_type", "'user_id'", id="user_id-number"),
    pytest.param(_event(event_type=3), "wrong_type", "'event_type'", id="event_type-number"),
    pytest.param(_event(event_type=None), "wrong_type", "'event_type'", id="event_type-null"),
    pytest.param(_event(item_id=["sku-1"]), "wrong_type", "'item_id'", id="item_id-list"),
    pytest.param(_event(price="19.99"), "wrong_type", "'price'", id="price-string"),
    pytest.param(_event(quantity=True), "wrong_type", "'quantity'", id="quantity-bool"),
    pytest.param(_event(quantity=1.5), "wrong_type", "'quantity'", id="quantity-fraction"),
    pytest.param(_event(event_type="hover"), "unknown_event_type", "'hover'", id="event_type-unknown"),
    pytest.param(_event(event_type="View"), "unknown_event_type", "'View'", id="event_type-case"),
    pytest.param(_event(event_type=""), "unknown_event_type", "event_type", id="event_type-empty"),
    pytest.param(_event(timestamp=-1), "invalid_value", "timestamp", id="timestamp-negative"),
    pytest.param(_event(price=-0.01), "invalid_value", "price", id="price-negative"),
    pytest.param(_event(quantity=0), "invalid_value", "quantity", id="quantity-zero"),
    pytest.param(_event(user_id=""), "invalid_value", "user_id", id="user_id-empty"),
    pytest.param(_event(item_id=""), "invalid_value", "item_id", id="item_id-empty"),
    pytest.param(_event(session_id="s" * 257), "invalid_value", "session_id", id="session_id-too-long"),
    pytest.param(_event()[:-1] + b', "price": 1e400}', "invalid_value", "price", id="price-out-of-range"),
    pytest.param(_event(price=float("nan")), "invalid_json", "JSON", id="price-NaN-is-not-json"),
    pytest.param(_event(colour="red"), "unknown_field", "'colour'", id="extra-field"),
    pytest.param(_event(ITEM_ID="sku-1"), "unknown_field", "'ITEM_ID'", id="field-name-case"),
    pytest.param(_padded(DEFAULT_MAX_EVENT_BYTES + 1), "oversized", "65537", id="oversized-by-one"),
    pytest.param(b"\xff" * 100_000, "oversized", "100000", id="oversized-checked-before-parsing"),
]


@pytest.mark.parametrize(("payload", "reason_code", "names"), BAD_CLICK_EVENTS)
def test_bad_click_events_get_exact_reason_codes(payload: bytes | None, reason_code: str, names: str) -> None:
    result = CLICK_EVENTS.decode(payload)
    assert isinstance(result, DecodeError), result
    assert result.reason_code == reason_code, result
    assert names in result.reason, result
    assert result.reason_code in REASON_CODES


def test_every_reason_code_is_covered() -> None:
    covered = {param.values[1] for param in BAD_CLICK_EVENTS}
    assert covered == set(REASON_CODES)


def test_reason_for_unknown_event_type_lists_the_allowed_ones() -> None:
    result = CLICK_EVENTS.decode(_event(event_type="hover"))
    assert isinstance(result, DecodeError)
    for event_type in ("view", "purchase", "rec_request"):
        assert event_type in result.reason


def test_oversized_reason_states_size_and_limit() -> None:
    result = CLICK_EVENTS.decode(_padded(DEFAULT_MAX_EVENT_BYTES + 10))
    assert result == DecodeError("oversized", "payload of 65546 bytes exceeds the limit of 65536 bytes")


def test_payload_at_the_size_limit_is_accepted() -> None:
    assert DEFAULT_MAX_EVENT_BYTES == 64 * 1024
    result = CLICK_EVENTS.decode(_padded(DEFAULT_MAX_EVENT_BYTES))
    assert isinstance(result, ClickEvent), result


def test_size_limit_is_configurable_and_optional() -> None:
    small = ClickEventCodec(max_bytes=64)
    result = small.decode(_padded(65))
    assert isinstance(result, DecodeError) and result.reason_code == "oversized"
    assert isinstance(ClickEventCodec(max_bytes=None).decode(_padded(200_000)), ClickEvent)
    # The other codecs have no limit by default (user states, model chunks are larger).
    assert USER_STATES.max_bytes is None and MODEL_UPDATES.max_bytes is None


def test_item_id_is_optional_only_for_rec_request() -> None:
    for payload in (
        _event(event_type="rec_request", item_id=_DROP),
        _event(event_type="rec_request", item_id=None),
    ):
        result = CLICK_EVENTS.decode(payload)
        assert isinstance(result, ClickEvent), result
        assert result.item_id is None
    with_item = CLICK_EVENTS.decode(_event(event_type="rec_request", item_id="sku-on-screen"))
    assert isinstance(with_item, ClickEvent) and with_item.item_id == "sku-on-screen"
    for event_type in ("view", "click", "add_to_cart", "remove_from_cart", "purchase", "favorite"):
        result = CLICK_EVENTS.decode(_event(event_type=event_type, item_id=_DROP))
        assert isinstance(result, DecodeError), event_type
        assert result.reason_code == "missing_field"
        assert "item_id" in result.reason and event_type in result.reason


def test_optional_fields_accept_null() -> None:
    result = CLICK_EVENTS.decode(
        _event(rec_id=None, request_id=None, category=None, brand=None, price=None, quantity=None)
    )
    assert result == ClickEvent("e-1", "u-1", "s-1", "view", 1718012345678, item_id="sku-1")


def test_utf8_text_and_escapes_decode() -> None:
    result = CLICK_EVENTS.decode(_event(category="Küche/咖啡", brand="\u00e9\U0001f600"))
    assert isinstance(result, ClickEvent)
    assert result.category == "Küche/咖啡" and result.brand == "é😀"
    escaped = CLICK_EVENTS.decode(_event().replace(b'"sku-1"', b'"sku-\\u00e9"'))
    assert isinstance(escaped, ClickEvent) and escaped.item_id == "sku-é"


def test_nested_errors_name_the_path() -> None:
    rec = {
        "rec_id": "r-1",
        "user_id": "u-1",
        "items": [{"item_id": "sku-1", "score": 1.0}],
        "policy": "greedy",
        "model_version": 1,
        "explored": False,
        "source_event_id": "e-1",
        "event_timestamp": 1,
        "created_at": 2,
    }
    result = RECOMMENDATIONS.decode(json.dumps(rec).encode())
    assert result == DecodeError("missing_field", "missing required field 'items[0].propensity'")
    rec["items"] = [{"item_id": "sku-1", "score": "high", "propensity": 0.5}]
    result = RECOMMENDATIONS.decode(json.dumps(rec).encode())
    assert isinstance(result, DecodeError) and result.reason_code == "wrong_type"
    assert "'items[0].score'" in result.reason
    rec["items"] = [{"item_id": "sku-1", "score": 1.0, "propensity": 1.5}]
    result = RECOMMENDATIONS.decode(json.dumps(rec).encode())
    assert isinstance(result, DecodeError) and result.reason_code == "invalid_value"
    assert "items[0].propensity" in result.reason
    rec["items"] = [{"item_id": "sku-1", "score": 1.0, "propensity": 0.5, "rank": 1}]
    result = RECOMMENDATIONS.decode(json.dumps(rec).encode())
    assert isinstance(result, DecodeError) and result.reason_code == "unknown_field"
    assert "'items[0].rank'" in result.reason


def test_decode_never_raises_on_garbage() -> None:
    rng = np.random.default_rng(99)
    valid = _event(category="Küche", price=9.5, quantity=2)
    for i in range(3000):
        if i % 3 == 0:
            payload = rng.integers(0, 256, size=int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
        elif i % 3 == 1:
            payload = valid[: int(rng.integers(1, len(valid)))]
        else:
            buf = bytearray(valid)
            for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 4))):
                buf[int(pos)] = int(rng.integers(0, 256))
            payload = bytes(buf)
        result = CLICK_EVENTS.decode(payload)
        assert isinstance(result, ClickEvent | DecodeError)
        if isinstance(result, DecodeError):
            assert result.reason_code in REASON_CODES, (payload, result)
            assert result.reason


# --- round trips -------------------------------------------------------------------------------

OBS = Observation(
    recent_items=["sku-1", "sku-2"],
    recent_event_types=["view", "add_to_cart"],
    recent_gaps_seconds=[0.0, 4.5],
    features=[0.5, -1.25, 3.0],
)
EMPTY_OBS = Observation(recent_items=[], recent_event_types=[], recent_gaps_seconds=[], features=[])

MESSAGES: list[tuple[Codec[Any], Any]] = [
    (CLICK_EVENTS, ClickEvent("e-1", "u-1", "s-1", "view", 0, item_id="sku-1")),
    (CLICK_EVENTS, ClickEvent("e-2", "u-1", "s-1", "rec_request", 1718012345678, request_id="req-1")),
    (
        CLICK_EVENTS,
        ClickEvent(
            "e-3",
            "u-1",
            "s-1",
            "purchase",
            1718012345678,
            item_id="sku-1",
            rec_id="rec-1",
            request_id="req-1",
            category="kitchen",
            brand="acme",
            price=19.99,
            quantity=3,
        ),
    ),
    (
        USER_STATES,
        UserState(
            user_id="u-1",
            timestamp=1718012345678,
            source_event_id="e-3",
            source_event_type="purchase",
            session_id="s-1",
            session_started_at=1718012300000,
            session_event_count=3,
            applied_event_count=10,
            observation=OBS,
            event_counts_decayed={"view": 2.5, "purchase": 1.0},
            cart_items=[],
            favorite_items=["sku-9"],
            purchased_items=["sku-1"],
            category_affinity=[0.0, 1.0],
            brand_affinity=[0.5],
            hour_of_day=23,
            day_of_week=6,
            feature_layout="v1",
            request_id="req-1",
            price_mean=19.99,
            price_min=19.99,
            price_max=19.99,
        ),
    ),
    (
        USER_STATES,
        UserState(
            user_id="u-2",
            timestamp=0,
            source_event_id="e-0",
            source_event_type="view",
            session_id="s-0",
            session_started_at=0,
            session_event_count=0,
            applied_event_count=0,
            observation=EMPTY_OBS,
            event_counts_decayed={},
            cart_items=[],
            favorite_items=[],
            purchased_items=[],
            category_affinity=[],
            brand_affinity=[],
            hour_of_day=0,
            day_of_week=0,
            feature_layout="v1",
        ),
    ),
    (
        RECOMMENDATIONS,
        Recommendation(
            rec_id="rec-1",
            user_id="u-1",
            items=[
                RecommendedItem("sku-1", 2.5, 0.9),
                RecommendedItem("sku-2", -1.0, 0.05, explored=True),
            ],
            policy="epsilon-greedy",
            model_version=0,
            explored=True,
            source_event_id="e-2",
            event_timestamp=1718012345678,
            created_at=1718012345700,
            session_id="s-1",
            request_id="req-1",
        ),
    ),
    (
        TRANSITIONS,
        Transition(
            transition_id="t-1",
            user_id="u-1",
            source="recommendation",
            obs_tm1=EMPTY_OBS,
            a_tm1="sku-1",
            r_t=1.0,
            obs_t=OBS,
            done=True,
            timestamp=1718012345678,
            rec_id="rec-1",
            position=0,
            propensity=0.9,
            model_version=3,
            policy="epsilon-greedy",
        ),
    ),
    (TRANSITIONS, Transition("t-2", "u-1", "logged", OBS, "sku-2", -0.25, OBS, False, 5)),
    (
        MODEL_UPDATES,
        ModelUpdateHeader(
            model_version=1,
            step=0,
            created_at=1718012345678,
            vocabulary_size=100,
            num_chunks=1,
            total_bytes=3,
            sha256="0" * 64,
            encoding="flax-msgpack",
            config={"hidden": [64, 32], "dueling": True, "name": None, "lr": 0.001},
        ),
    ),
    (MODEL_UPDATES, ModelUpdateChunk(model_version=1, chunk_index=0, num_chunks=1, data_base64="AAEC")),
    (
        DEAD_LETTERS,
        DeadLetter(
            "not_utf8",
            "payload is not valid UTF-8 (byte 0)",
            "state-builder",
            1718012345678,
            "/w==",
            "base64",
            source_topic="qrec.clickstream.v1",
            source_partition=0,
            source_offset=17,
            source_key="u-1",
        ),
    ),
    (
        DEAD_LETTERS,
        DeadLetter(
            "empty",
            "empty payload (a tombstone or a blank line)",
            "replay",
            1,
            "",
            "utf-8",
            source_file="clicks.jsonl",
            source_line=1,
        ),
    ),
    (CATALOGUE_ITEMS, CatalogueItem("sku-1", False, 1718012345678)),
]


@pytest.mark.parametrize(("codec", "message"), MESSAGES, ids=lambda v: type(v).__name__)
def test_round_trip(codec: Codec[Any], message: Any) -> None:
    encoded = codec.encode(message)
    assert encoded == encode(message)
    decoded = codec.decode(encoded)
    assert decoded == message
    assert type(decoded) is type(message)
    assert json.loads(encoded) == to_builtins(message)


@pytest.mark.parametrize(("codec", "message"), MESSAGES, ids=lambda v: type(v).__name__)
def test_encoding_is_deterministic_and_in_field_order(codec: Codec[Any], message: Any) -> None:
    first = encode(message)
    assert encode(message) == first
    # An equal message built separately (and one that went through the wire) encodes the same.
    assert encode(msgspec.structs.replace(message)) == first
    decoded = codec.decode(first)
    assert encode(decoded) == first
    # Compact JSON: no whitespace between tokens.
    assert json.dumps(json.loads(first), separators=(",", ":"), ensure_ascii=False).encode() == first
    keys = list(json.loads(first))
    fields = [f for f in type(message).__struct_fields__ if f in keys]
    tag_field = type(message).__struct_config__.tag_field
    assert keys == ([tag_field, *fields] if tag_field else fields)


def test_none_fields_are_omitted() -> None:
    event = ClickEvent("e-1", "u-1", "s-1", "rec_request", 1)
    encoded = encode(event)
    assert (
        encoded
        == b'{"event_id":"e-1","user_id":"u-1","session_id":"s-1","event_type":"rec_request","timestamp":1}'
    )
    assert b"null" not in encoded
    assert list(json.loads(encode(MESSAGES[7][1]))) == [
        "transition_id",
        "user_id",
        "source",
        "obs_tm1",
        "a_tm1",
        "r_t",
        "obs_t",
        "done",
        "timestamp",
    ]
    # A default-valued RecommendedItem.explored (false) is left out too; true is written.
    assert json.loads(encode(RecommendedItem("sku-1", 1.0, 0.5))) == {
        "item_id": "sku-1",
        "score": 1.0,
        "propensity": 0.5,
    }
    assert json.loads(encode(RecommendedItem("sku-1", 1.0, 0.5, explored=True)))["explored"] is True


def test_model_updates_decode_by_kind_tag() -> None:
    header, chunk = MESSAGES[8][1], MESSAGES[9][1]
    encoded_header, encoded_chunk = encode(header), encode(chunk)
    assert encoded_header.startswith(b'{"kind":"header",')
    assert encoded_chunk.startswith(b'{"kind":"chunk",')
    assert MODEL_UPDATES.decode(encoded_header) == header
    assert MODEL_UPDATES.decode(encoded_chunk) == chunk
    assert isinstance(MODEL_UPDATES.decode(encoded_chunk), ModelUpdateChunk)
    # The tag may come anywhere in the object.
    moved = json.dumps(
        {**{k: v for k, v in json.loads(encoded_chunk).items() if k != "kind"}, "kind": "chunk"}
    )
    assert MODEL_UPDATES.decode(moved.encode()) == chunk


def test_model_update_kind_errors() -> None:
    doc = json.loads(encode(MESSAGES[9][1]))
    result = MODEL_UPDATES.decode(json.dumps({**doc, "kind": "weights"}).encode())
    assert isinstance(result, DecodeError) and result.reason_code == "invalid_value"
    assert "kind" in result.reason
    result = MODEL_UPDATES.decode(json.dumps({k: v for k, v in doc.items() if k != "kind"}).encode())
    assert result == DecodeError("missing_field", "missing required field 'kind'")
    # A chunk's fields under the header tag: the header's fields are missing.
    result = MODEL_UPDATES.decode(json.dumps({**doc, "kind": "header"}).encode())
    assert isinstance(result, DecodeError) and result.reason_code in ("missing_field", "unknown_field")


def test_model_update_sha256_must_be_lowercase_hex() -> None:
    doc = json.loads(encode(MESSAGES[8][1]))
    for bad in ("A" * 64, "0" * 63, "0" * 65, "g" * 64, ""):
        result = MODEL_UPDATES.decode(json.dumps({**doc, "sha256": bad}).encode())
        assert isinstance(result, DecodeError) and result.reason_code == "invalid_value", bad
        assert "sha256" in result.reason


def test_model_update_sha256_rejects_a_trailing_newline() -> None:
    doc = json.loads(encode(MESSAGES[8][1]))
    result = MODEL_UPDATES.decode(json.dumps({**doc, "sha256": "0" * 64 + "\n"}).encode())
    assert isinstance(result, DecodeError)

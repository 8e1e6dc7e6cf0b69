"""Encode and decode qrec messages; decoding returns the message or a DecodeError with a reason.

Bad input is data, not a crash: every way a payload can be wrong maps to a short, bounded
``reason_code`` (safe as a metric label) plus a human-readable ``reason`` that names the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from schemas.messages import (
    EVENT_TYPES,
    CatalogueItem,
    ClickEvent,
    DeadLetter,
    ModelUpdate,
    Recommendation,
    Transition,
    UserState,
)

T = TypeVar("T")

# Kafka's default max.message.bytes is about 1 MB; a click event is a few hundred bytes, so anything
# this large is a producer bug and is rejected before parsing.
DEFAULT_MAX_EVENT_BYTES = 64 * 1024

REASON_CODES: tuple[str, ...] = (
    "oversized",
    "not_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "unknown_field",
    "wrong_type",
    "unknown_event_type",
    "invalid_value",
    "empty",
)


@dataclass(frozen=True, slots=True)
class DecodeError:
    """Why a payload could not be decoded: a bounded code for metrics and a sentence for people."""

    reason_code: str
    reason: str


_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_EXPECTED = re.compile(r"^Expected `([^`]+)`, got `([^`]+)`")
_PATH = re.compile(r" - at `([^`]+)`$")


def _classify(exc: msgspec.MsgspecError, data: bytes) -> DecodeError:
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        path_match = _PATH.search(text)
        path = path_match.group(1) if path_match else "$"
        if m := _MISSING.search(text):
            field = m.group(1) if path == "$" else f"{path}.{m.group(1)}"
            return DecodeError("missing_field", f"missing required field '{field.removeprefix('$.')}'")
        if m := _UNKNOWN.search(text):
            field = m.group(1) if path == "$" else f"{path.removeprefix('$.')}.{m.group(1)}"
            return DecodeError("unknown_field", f"unknown field '{field}' (schemas forbid extra fields)")
        if "Invalid enum value" in text and "event_type" in path:
            return DecodeError(
                "unknown_event_type",
                f"unknown event type at '{path.removeprefix('$.')}': "
                f"{text.split(' - at ')[0].removeprefix('Invalid enum value ')}; "
                f"expected one of {', '.join(EVENT_TYPES)}",
            )
        if m := _EXPECTED.search(text):
            if path == "$" and m.group(1) == "object":
                return DecodeError("not_an_object", f"expected a JSON object, got {m.group(2)}")
            return DecodeError(
                "wrong_type", f"field '{path.removeprefix('$.')}' must be {m.group(1)}, got {m.group(2)}"
            )
        return DecodeError("invalid_value", text.replace("`", "'"))
    # A msgspec.DecodeError: the bytes are not valid JSON (or not valid UTF-8 inside a string).
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return DecodeError("not_utf8", f"payload is not valid UTF-8 (byte {err.start})")
    return DecodeError("invalid_json", f"not valid JSON: {text}")


class Codec(Generic[T]):
    """A typed JSON codec for one message type; decode never raises on bad input."""

    def __init__(self, message_type: type[T], max_bytes: int | None = None) -> None:
        self.message_type = message_type
        self.max_bytes = max_bytes
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(message_type)
        self._encoder = msgspec.json.Encoder()

    def encode(self, message: T) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes | None) -> T | DecodeError:
        if not data or not data.strip():
            return DecodeError("empty", "empty payload (a tombstone or a blank line)")
        if self.max_bytes is not None and len(data) > self.max_bytes:
            return DecodeError(
                "oversized", f"payload of {len(data)} bytes exceeds the limit of {self.max_bytes} bytes"
            )
        try:
            message = self._decoder.decode(data)
        except UnicodeDecodeError as err:
            return DecodeError("not_utf8", f"payload is not valid UTF-8 (byte {err.start} of a string)")
        except msgspec.MsgspecError as exc:
            return _classify(exc, data)
        return self._check(message)

    def _check(self, message: T) -> T | DecodeError:
        return message


class ClickEventCodec(Codec[ClickEvent]):
    """ClickEvent codec, with the one cross-field rule JSON typing cannot express."""

    def __init__(self, max_bytes: int | None = DEFAULT_MAX_EVENT_BYTES) -> None:
        super().__init__(ClickEvent, max_bytes)

    def _check(self, message: ClickEvent) -> ClickEvent | DecodeError:
        if message.item_id is None and message.event_type != "rec_request":
            return DecodeError(
                "missing_field",
                f"missing required field 'item_id' (needed for event_type {message.event_type})",
            )
        return message


CLICK_EVENTS = ClickEventCodec()
USER_STATES: Codec[UserState] = Codec(UserState)
RECOMMENDATIONS: Codec[Recommendation] = Codec(Recommendation)
TRANSITIONS: Codec[Transition] = Codec(Transition)
MODEL_UPDATES: Codec[ModelUpdate] = Codec(ModelUpdate)  # type: ignore[arg-type]
DEAD_LETTERS: Codec[DeadLetter] = Codec(DeadLetter)
CATALOGUE_ITEMS: Codec[CatalogueItem] = Codec(CatalogueItem)

_ENCODER = msgspec.json.Encoder()


def encode(message: Any) -> bytes:
    """Encode any qrec message to compact JSON, fields in schema order (deterministic bytes)."""
    return _ENCODER.encode(message)


def to_builtins(message: Any) -> Any:
    """The message as plain dicts and lists (for JSON Schema validation and printing)."""
    return msgspec.to_builtins(message)

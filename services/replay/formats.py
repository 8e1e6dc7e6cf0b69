"""Readers that turn recorded e-commerce logs into qrec ClickEvents, one Row per input line.

Pure apart from reading the input file: no clock, no network, no randomness, so replaying the same
file twice gives the same events, event ids included. Bad rows are data, not crashes: a row that
does not parse comes back as a Row with an error (a reason_code from ``schemas.codec.REASON_CODES``
and a sentence naming the column and the value) and no events. Only blank lines and a format's
header line are skipped.

Files are streamed in binary and each line's UTF-8 is decoded here, so one undecodable line is one
``not_utf8`` row rather than an exception that ends the replay.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from itertools import chain
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from schemas.codec import CLICK_EVENTS, DecodeError
from schemas.messages import ClickEvent, EventType

FORMATS: tuple[str, ...] = (
    "jsonl",
    "taobao",
    "diginetica",
    "rees46",
    "otto",
    "yoochoose",
    "yoochoose-buys",
    "session-tsv",
)

MAX_ID_LENGTH = 256  # the schema's limit on every id (schemas.messages.Id)
MAX_SOURCE_NAME_LENGTH = 200  # leaves room for ":<line>:<index>" inside MAX_ID_LENGTH
# A derived session id is f"{user_id}-{n}"; keeping user ids this short keeps it within MAX_ID_LENGTH.
_MAX_SESSIONIZED_USER_LENGTH = MAX_ID_LENGTH - 12
_SNIFF_LINES = 20
_SNIFF_BYTES = 4 * 1024 * 1024
_SHOWN_VALUE_CHARS = 60
_BOM = b"\xef\xbb\xbf"
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_MS_PER_DAY = 86_400_000
# Timestamps past the end of year 9999 are typos or unit mix-ups (microseconds read as seconds).
MAX_TIMESTAMP_MS = (date(9999, 12, 31).toordinal() + 1 - _EPOCH_ORDINAL) * _MS_PER_DAY - 1


@dataclass(frozen=True, slots=True)
class Row:
    """One input row's outcome: the events it produced, or why it was rejected."""

    line: int
    """1-based line number in the file."""
    raw: bytes
    """The row's original bytes, without the line ending."""
    events: tuple[ClickEvent, ...]
    """The events the row produced, in order; empty when rejected (OTTO lines give many)."""
    error: DecodeError | None
    """Why the row was rejected, or None."""


class _RowError(Exception):
    """Raised inside a row parser to reject the row; never escapes read_log."""

    def __init__(self, reason_code: str, reason: str) -> None:
        super().__init__(reason)
        self.error = DecodeError(reason_code, reason)

    @classmethod
    def of(cls, error: DecodeError) -> _RowError:
        return cls(error.reason_code, error.reason)


# ---------------------------------------------------------------------------------------------
# Small shared helpers


def _show(value: str) -> str:
    """The value quoted for an error message, cut short so a reason stays one readable line."""
    if len(value) > _SHOWN_VALUE_CHARS:
        value = value[:_SHOWN_VALUE_CHARS] + "..."
    return repr(value)


def _id_error(column: str, value: str, max_length: int = MAX_ID_LENGTH) -> DecodeError:
    if not value:
        return DecodeError("invalid_value", f"column '{column}' is empty; ids must be non-empty")
    return DecodeError(
        "invalid_value", f"column '{column}' is {len(value)} characters long; ids are at most {max_length}"
    )


def _check_id(column: str, value: str, max_length: int = MAX_ID_LENGTH) -> None:
    if not value or len(value) > max_length:
        raise _RowError.of(_id_error(column, value, max_length))


def _not_utf8(line: int, raw: bytes, err: UnicodeDecodeError) -> Row:
    return Row(line, raw, (), DecodeError("not_utf8", f"line is not valid UTF-8 (byte {err.start})"))


def _column_count_error(columns: list[str], names: tuple[str, ...], sep: str) -> DecodeError:
    expected = len(names)
    got = len(columns)
    layout = sep.join(names)
    sep_name = {",": "comma", ";": "semicolon", "\t": "tab"}[sep]
    if got < expected:
        missing = ", ".join(f"'{name}'" for name in names[got:])
        return DecodeError(
            "missing_field",
            f"expected {expected} {sep_name}-separated columns ({layout}), got {got}: missing {missing}",
        )
    return DecodeError(
        "invalid_value", f"expected {expected} {sep_name}-separated columns ({layout}), got {got}"
    )


def _is_digits(value: str) -> bool:
    # str.isdigit alone accepts non-ASCII digits such as '²' that int() then rejects.
    return value.isdigit() and value.isascii()


def _unsigned_int(column: str, value: str, unit: str) -> int:
    if not _is_digits(value):
        raise _RowError(
            "wrong_type", f"column '{column}' must be a non-negative integer ({unit}), got {_show(value)}"
        )
    if len(value) > 18:  # beyond any real value, and int() refuses very long digit strings
        raise _RowError("invalid_value", f"column '{column}' is too large ({unit}): {_show(value)}")
    return int(value)


def _timestamp_error(column: str, value: str) -> DecodeError:
    return DecodeError("invalid_value", f"column '{column}' is after the year 9999: {_show(value)}")


def _non_negative_float(column: str, value: str, unit: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _RowError(
            "wrong_type", f"column '{column}' must be a number ({unit}), got {_show(value)}"
        ) from None
    if not math.isfinite(number) or number < 0:
        raise _RowError(
            "invalid_value", f"column '{column}' must be a finite number >= 0 ({unit}), got {_show(value)}"
        )
    return number


class _DayCache:
    """Milliseconds at midnight UTC of 'YYYY-MM-DD' dates, memoised (logs hold few distinct days)."""

    __slots__ = ("_days",)

    def __init__(self) -> None:
        self._days: dict[str, int] = {}

    def midnight_ms(self, column: str, text: str) -> int:
        cached = self._days.get(text)
        if cached is not None:
            return cached
        if not _DATE.fullmatch(text):
            raise _RowError("wrong_type", f"column '{column}' must be a date YYYY-MM-DD, got {_show(text)}")
        try:
            day = date(int(text[0:4]), int(text[5:7]), int(text[8:10]))
        except ValueError as err:
            raise _RowError(
                "invalid_value", f"column '{column}' is not a real date: {_show(text)} ({err})"
            ) from None
        ms = (day.toordinal() - _EPOCH_ORDINAL) * _MS_PER_DAY
        if ms < 0:
            raise _RowError("invalid_value", f"column '{column}' is before 1970-01-01: {_show(text)}")
        self._days[text] = ms
        return ms

    def datetime_ms(self, column: str, text: str, pattern: re.Pattern[str], shape: str) -> int:
        """Parse a UTC date-time matched by ``pattern`` (groups: date, h, m, s, optional fraction)."""
        match = pattern.fullmatch(text)
        if match is None:
            raise _RowError("wrong_type", f"column '{column}' must be a UTC time {shape}, got {_show(text)}")
        day, hours, minutes, seconds, fraction = match.groups()
        hour, minute, second = int(hours), int(minutes), int(seconds)
        if hour > 23 or minute > 59 or second > 59:
            raise _RowError("invalid_value", f"column '{column}' is not a real time of day: {_show(text)}")
        ms = self.midnight_ms(column, day) + ((hour * 60 + minute) * 60 + second) * 1000
        if fraction:
            ms += int(fraction[:3].ljust(3, "0"))  # sub-millisecond digits are dropped, not rounded
        return ms


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# REES46: '2019-10-01 00:00:00 UTC' (the ' UTC' is optional here).
_REES46_TIME = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?(?: UTC)?"
)
# YOOCHOOSE: '2014-04-07T10:51:09.277Z'.
_ISO_TIME = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?Z?")


class _OpenSession:
    __slots__ = ("latest_ms", "number", "session_id")

    def __init__(self, latest_ms: int, number: int, session_id: str) -> None:
        self.latest_ms = latest_ms
        self.number = number
        self.session_id = session_id


class _Sessionizer:
    """Splits each user's events into sessions at inactivity gaps, for logs without a session column.

    Sessions are named f"{user_id}-{n}", n counting that user's sessions from 0 in file order. A gap
    strictly longer than the limit starts a new session; an event that goes back in time stays in
    the current session (the gap is measured from the latest time seen in that session).
    """

    __slots__ = ("_gap_ms", "_users")

    def __init__(self, gap_seconds: float) -> None:
        self._gap_ms = gap_seconds * 1000.0
        self._users: dict[str, _OpenSession] = {}

    def session_id(self, user_id: str, timestamp: int) -> str:
        current = self._users.get(user_id)
        if current is None:
            session_id = f"{user_id}-0"
            self._users[user_id] = _OpenSession(timestamp, 0, session_id)
            return session_id
        if timestamp - current.latest_ms > self._gap_ms:
            current.number += 1
            current.session_id = f"{user_id}-{current.number}"
            current.latest_ms = timestamp
        elif timestamp > current.latest_ms:
            current.latest_ms = timestamp
        return current.session_id


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without the line ending) for every non-blank line, streamed."""
    with path.open("rb") as file:
        first = file.readline()
        if first.startswith(_BOM):
            first = first[3:]
        for number, raw in enumerate(chain((first,), file), 1):
            raw = raw.rstrip(b"\r\n")
            if raw and not raw.isspace():
                yield number, raw


def _drop_header(
    lines: Iterator[tuple[int, bytes]], is_header: Callable[[str], bool]
) -> tuple[str | None, Iterator[tuple[int, bytes]]]:
    """Skip the first line when it is the header; returns (the header text or None, the rest)."""
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if is_header(text):
            return text, lines
        return None, _chain_one((number, raw), lines)
    return None, lines


def _chain_one(first: tuple[int, bytes], rest: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    yield first
    yield from rest


def _header_names(text: str, sep: str) -> list[str]:
    return [name.strip().lower().replace("_", "") for name in text.split(sep)]


# ---------------------------------------------------------------------------------------------
# One reader per format. Each takes the non-blank lines and yields one Row per line.


class _Context:
    __slots__ = ("gap_seconds", "source")

    def __init__(self, source: str, gap_seconds: float) -> None:
        self.source = source
        self.gap_seconds = gap_seconds


def _read_jsonl(lines: Iterator[tuple[int, bytes]], ctx: _Context) -> Iterator[Row]:
    decode = CLICK_EVENTS.decode
    for number, raw in lines:
        result = decode(raw)
        if isinstance(result, DecodeError):
            yield Row(number, raw, (), result)
        else:
            yield Row(number, raw, (result,), None)


_TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior", "timestamp")
_TAOBAO_BEHAVIOURS: dict[str, EventType] = {
    "pv": "view",
    "cart": "add_to_cart",
    "fav": "favorite",
    "buy": "purchase",
}


def _read_taobao(lines: Iterator[tuple[int, bytes]], ctx: _Context) -> Iterator[Row]:
    # The hot path of the largest sample, so the checks are inlined rather than helper calls.
    behaviours = _TAOBAO_BEHAVIOURS
    sessions = _Sessionizer(ctx.gap_seconds)
    source = ctx.source
    max_user = _MAX_SESSIONIZED_USER_LENGTH
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield _not_utf8(number, raw, err)
            continue
        columns = text.split(",")
        if len(columns) != 5:
            yield Row(number, raw, (), _column_count_error(columns, _TAOBAO_COLUMNS, ","))
            continue
        user_id, item_id, category, behaviour, seconds = columns
        event_type = behaviours.get(behaviour)
        if event_type is None:
            reason = (
                f"column 'behavior' has unknown value {_show(behaviour)}; expected one of pv, cart, fav, buy"
            )
            yield Row(number, raw, (), DecodeError("unknown_event_type", reason))
            continue
        if not (seconds.isdigit() and seconds.isascii()):
            reason = f"column 'timestamp' must be a non-negative integer (unix seconds), got {_show(seconds)}"
            yield Row(number, raw, (), DecodeError("wrong_type", reason))
            continue
        if not user_id or len(user_id) > max_user:
            yield Row(number, raw, (), _id_error("user_id", user_id, max_user))
            continue
        if not item_id or len(item_id) > MAX_ID_LENGTH:
            yield Row(number, raw, (), _id_error("item_id", item_id))
            continue
        if len(category) > MAX_ID_LENGTH:
            yield Row(number, raw, (), _id_error("category_id", category))
            continue
        timestamp = int(seconds) * 1000 if len(seconds) <= 12 else MAX_TIMESTAMP_MS + 1
        if timestamp > MAX_TIMESTAMP_MS:
            yield Row(number, raw, (), _timestamp_error("timestamp", seconds))
            continue
        event = ClickEvent(
            event_id=f"{source}:{number}",
            user_id=user_id,
            session_id=sessions.session_id(user_id, timestamp),
            event_type=event_type,
            timestamp=timestamp,
            item_id=item_id,
            category=category or None,
        )
        yield Row(number, raw, (event,), None)


_DIGINETICA_COLUMNS = ("session_id", "user_id", "item_id", "timeframe", "eventdate")
_DIGINETICA_HEADER = ["sessionid", "userid", "itemid", "timeframe", "eventdate"]


def _is_diginetica_header(text: str) -> bool:
    return _header_names(text, ";") == _DIGINETICA_HEADER


def _read_diginetica(lines: Iterator[tuple[int, bytes]], ctx: _Context) -> Iterator[Row]:
    _, lines = _drop_header(lines, _is_diginetica_header)
    days = _DayCache()
    source = ctx.source
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield _not_utf8(number, raw, err)
            continue
        columns = text.split(";")
        if len(columns) != 5:
            yield Row(number, raw, (), _column_count_error(columns, _DIGINETICA_COLUMNS, ";"))
            continue
        session_id, user_id, item_id, timeframe, eventdate = columns
        try:
            _check_id("session_id", session_id)
            if user_id == "NA":  # an anonymous session: the session stands in for the user
                user_id = "s" + session_id
                _check_id("session_id", user_id)
            else:
                _check_id("user_id", user_id)
            _check_id("item_id", item_id)
            offset = _unsigned_int("timeframe", timeframe, "milliseconds")
            timestamp = days.midnight_ms("eventdate", eventdate) + offset
            if timestamp > MAX_TIMESTAMP_MS:
                raise _RowError.of(_timestamp_error("timeframe", timeframe))
        except _RowError as err:
            yield Row(number, raw, (), err.error)
            continue
        event = ClickEvent(
            event_id=f"{source}:{number}",
            user_id=user_id,
            session_id=session_id,
            event_type="view",
            timestamp=timestamp,
            item_id=item_id,
        )
        yield Row(number, raw, (event,), None)


_REES46_COLUMNS = (
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "category_code",
    "brand",
    "price",
    "user_id",
    "user_session",
)
_REES46_HEADER = [name.replace("_", "") for name in _REES46_COLUMNS]
_REES46_EVENTS: dict[str, EventType] = {
    "view": "view",
    "cart": "add_to_cart",
    "remove_from_cart": "remove_from_cart",
    "purchase": "purchase",
}


def _is_rees46_header(text: str) -> bool:
    return _header_names(text, ",") == _REES46_HEADER


def _read_rees46(lines: Iterator[tuple[int, bytes]], ctx: _Context) -> Iterator[Row]:
    _, lines = _drop_header(lines, _is_rees46_header)
    days = _DayCache()
    sessions = _Sessionizer(ctx.gap_seconds)
    source = ctx.source
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield _not_utf8(number, raw, err)
            continue
        # Quoted fields (a comma inside a brand) are rare; only those lines pay for the csv module.
        columns = next(csv.reader([text])) if '"' in text else text.split(",")
        if len(columns) != 9:
            yield Row(number, raw, (), _column_count_error(columns, _REES46_COLUMNS, ","))
            continue
        event_time, kind, product_id, category_id, category_code, brand, price, user_id, user_session = (
            columns
        )
        event_type = _REES46_EVENTS.get(kind)
        if event_type is None:
            reason = (
                f"column 'event_type' has unknown value {_show(kind)}; "
                f"expected one of {', '.join(_REES46_EVENTS)}"
            )
            yield Row(number, raw, (), DecodeError("unknown_event_type", reason))
            continue
        try:
            timestamp = days.datetime_ms("event_time", event_time, _REES46_TIME, "'YYYY-MM-DD HH:MM:SS UTC'")
            _check_id("product_id", product_id)
            category = category_code or category_id
            if category:
                _check_id("category_code" if category_code else "category_id", category)
            if brand:
                _check_id("brand", brand)
            price_value = _non_negative_float("price", price, "currency units") if price else None
            if user_session:
                _check_id("user_id", user_id)
                _check_id("user_session", user_session)
                session_id = user_session
            else:
                _check_id("user_id", user_id, _MAX_SESSIONIZED_USER_LENGTH)
                session_id = sessions.session_id(user_id, timestamp)
        except _RowError as err:
            yield Row(number, raw, (), err.error)
            continue
        event = ClickEvent(
            event_id=f"{source}:{number}",
            user_id=user_id,
            session_id=session_id,
            event_type=event_type,
            timestamp=timestamp,
            item_id=product_id,
            category=category or None,
            brand=brand or None,
            price=price_value,
        )
        yield Row(number, raw, (event,), None)


_OttoId = int | Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
_OTTO_TYPES: dict[str, EventType] = {"clicks": "click", "carts": "add_to_cart", "orders": "purchase"}


class _OttoEvent(msgspec.Struct):
    aid: _OttoId
    ts: Annotated[int, msgspec.Meta(ge=0, le=MAX_TIMESTAMP_MS)]
    type: Literal["clicks", "carts", "orders"]


class _OttoSession(msgspec.Struct):
    session: _OttoId
    events: list[_OttoEvent]


_OTTO_DECODER = msgspec.json.Decoder(_OttoSession)
_MSGSPEC_PATH = re.compile(r" - at `\$((?:\.[A-Za-z_]+|\[[0-9]+\])*)`$")
_MSGSPEC_EVENT = re.compile(r"^\.events\[([0-9]+)\](?:\.([A-Za-z_]+))?$")
_MSGSPEC_MISSING = re.compile(r"missing required field `([^`]+)`")
_MSGSPEC_EXPECTED = re.compile(r"^Expected `([^`]+)`, got `([^`]+)`")


def _otto_error(exc: msgspec.MsgspecError, raw: bytes) -> DecodeError:
    """Turn msgspec's error into a reason that names the event index and the field."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return DecodeError("not_utf8", f"line is not valid UTF-8 (byte {err.start})")
        return DecodeError("invalid_json", f"not valid JSON: {text}")
    path_match = _MSGSPEC_PATH.search(text)
    path = path_match.group(1) if path_match else ""
    message = text[: path_match.start()] if path_match else text
    event_match = _MSGSPEC_EVENT.match(path)
    if event_match:
        index, field = event_match.groups()
        where = f"event {index}" + (f" field '{field}'" if field else "")
    else:
        where = f"field '{path.removeprefix('.')}'" if path else "line"
    if m := _MSGSPEC_MISSING.search(message):
        return DecodeError("missing_field", f"{where}: missing required field '{m.group(1)}'")
    if message.startswith("Invalid enum value"):
        value = message.removeprefix("Invalid enum value ")
        return DecodeError(
            "unknown_event_type", f"{where}: unknown type {value}; expected one of {', '.join(_OTTO_TYPES)}"
        )
    if m := _MSGSPEC_EXPECTED.search(message):
        if not path and m.group(1) == "object":
            return DecodeError("not_an_object", f"expected a JSON object, got {m.group(2)}")
        return DecodeError("wrong_type", f"{where} must be {m.group(1)}, got {m.group(2)}")
    detail = message.replace("`", "'")
    return DecodeError("invalid_value", f"{where}: {detail}")


def _read_otto(lines: Iterator[tuple[int, bytes]], ctx: _Context) -> Iterator[Row]:
    decode = _OTTO_DECODER.decode
    types = _OTTO_TYPES
    source = ctx.source
    for number, raw in lines:
        try:
            session = decode(raw)
        except UnicodeDecodeError as err:
            yield _not_utf8(number, raw, err)
            continue
        except msgspec.MsgspecError as exc:
            yield Row(number, raw, (), _otto_error(exc, raw))
            continue
        if not session.events:
            yield Row(
                number, raw, (), DecodeError("invalid_value", "field 'events' is empty; a session has events")
            )
            continue
        session_id = str(session.session)
        prefix = f"{source}:{number}:"
        events = tuple(
            ClickEvent(
                event_id=f"{prefix}{index}",
                user_id=session_id,
                session_id=session_id,
                event_type=types[event.type],
                timestamp=event.ts,
                item_id=str(event.aid),
            )
            for index, event in enumerate(session.events)
        )
        yield Row(number, raw, events, None)


_YOOCHOOSE_COLUMNS = ("session_id", "timestamp", "item_id", "category")
_YOOCHOOSE_BUYS_COLUMNS = ("session_id", "timestamp", "item_id", "price", "quantity")
_ISO_SHAPE = "'YYYY-MM-DDTHH:MM:SS.sssZ'"


def _read_yoochoose(lines: Iterator[tuple[int, bytes]], ctx: _Context) -> Iterator[Row]:
    days = _DayCache()
    source = ctx.source
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield _not_utf8(number, raw, err)
            continue
        columns = text.split(",")
        if len(columns) != 4:
            yield Row(number, raw, (), _column_count_error(columns, _YOOCHOOSE_COLUMNS, ","))
            continue
        session_id, when, item_id, category = columns
        try:
            _check_id("session_id", session_id)
            timestamp = days.datetime_ms("timestamp", when, _ISO_TIME, _ISO_SHAPE)
            _check_id("item_id", item_id)
            if category == "0":  # YOOCHOOSE's "no category"
                category = ""
            elif category:
                _check_id("category", category)
        except _RowError as err:
            yield Row(number, raw, (), err.error)
            continue
        event = ClickEvent(
            event_id=f"{source}:{number}",
            user_id=session_id,
            session_id=session_id,
            event_type="click",
            timestamp=timestamp,
            item_id=item_id,
            category=category or None,
        )
        yield Row(number, raw, (event,), None)


def _read_yoochoose_buys(lines: Iterator[tuple[int, bytes]], ctx: _Context) -> Iterator[Row]:
    days = _DayCache()
    source = ctx.source
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield _not_utf8(number, raw, err)
            continue
        columns = text.split(",")
        if len(columns) != 5:
            yield Row(number, raw, (), _column_count_error(columns, _YOOCHOOSE_BUYS_COLUMNS, ","))
            continue
        session_id, when, item_id, price, quantity = columns
        try:
            _check_id("session_id", session_id)
            timestamp = days.datetime_ms("timestamp", when, _ISO_TIME, _ISO_SHAPE)
            _check_id("item_id", item_id)
            price_value = _non_negative_float("price", price, "currency units") if price else 0.0
            count = _unsigned_int("quantity", quantity, "items") if quantity else 0
        except _RowError as err:
            yield Row(number, raw, (), err.error)
            continue
        event = ClickEvent(
            event_id=f"{source}:{number}",
            user_id=session_id,
            session_id=session_id,
            event_type="purchase",
            timestamp=timestamp,
            item_id=item_id,
            price=price_value or None,  # YOOCHOOSE writes 0 for an unknown price
            quantity=count or None,  # ... and 0 for an unknown quantity; the schema needs >= 1
        )
        yield Row(number, raw, (event,), None)


_SESSION_TSV_COLUMNS = ("SessionId", "ItemId", "Time")


def _session_tsv_layout(text: str) -> tuple[int, int, int] | None:
    """Positions of SessionId, ItemId and Time when ``text`` is a session-rec header, else None."""
    names = [name.strip() for name in text.split("\t")]
    if not all(column in names for column in _SESSION_TSV_COLUMNS):
        return None
    return names.index("SessionId"), names.index("ItemId"), names.index("Time")


def _read_session_tsv(lines: Iterator[tuple[int, bytes]], ctx: _Context) -> Iterator[Row]:
    header, lines = _drop_header(lines, lambda text: _session_tsv_layout(text) is not None)
    layout = _session_tsv_layout(header) if header is not None else None
    session_at, item_at, time_at = layout or (0, 1, 2)
    names: tuple[str, ...] = tuple(header.split("\t")) if header is not None else _SESSION_TSV_COLUMNS
    width = len(names)
    source = ctx.source
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield _not_utf8(number, raw, err)
            continue
        columns = text.split("\t")
        if len(columns) != width:
            yield Row(number, raw, (), _column_count_error(columns, names, "\t"))
            continue
        session_id, item_id, seconds = columns[session_at], columns[item_at], columns[time_at]
        try:
            _check_id("SessionId", session_id)
            _check_id("ItemId", item_id)
            timestamp = round(_non_negative_float("Time", seconds, "unix seconds") * 1000)
            if timestamp > MAX_TIMESTAMP_MS:
                raise _RowError.of(_timestamp_error("Time", seconds))
        except _RowError as err:
            yield Row(number, raw, (), err.error)
            continue
        event = ClickEvent(
            event_id=f"{source}:{number}",
            user_id=session_id,
            session_id=session_id,
            event_type="click",
            timestamp=timestamp,
            item_id=item_id,
        )
        yield Row(number, raw, (event,), None)


_READERS: dict[str, Callable[[Iterator[tuple[int, bytes]], _Context], Iterator[Row]]] = {
    "jsonl": _read_jsonl,
    "taobao": _read_taobao,
    "diginetica": _read_diginetica,
    "rees46": _read_rees46,
    "otto": _read_otto,
    "yoochoose": _read_yoochoose,
    "yoochoose-buys": _read_yoochoose_buys,
    "session-tsv": _read_session_tsv,
}
assert tuple(_READERS) == FORMATS


# ---------------------------------------------------------------------------------------------
# Format detection


def _sniff_one(text: str, first: bool) -> str | None:
    """The format one line belongs to, or None. Header rules apply only to the first line."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = msgspec.json.decode(stripped)
        except msgspec.DecodeError:
            return None
        if isinstance(value, dict):
            if "session" in value and "events" in value:
                return "otto"
            if "event_type" in value:
                return "jsonl"
        return None
    if first:
        if _is_diginetica_header(stripped):
            return "diginetica"
        if _is_rees46_header(stripped):
            return "rees46"
        if _session_tsv_layout(stripped) is not None:
            return "session-tsv"
    columns = stripped.split(",")
    if len(columns) in (4, 5) and _ISO_TIME.fullmatch(columns[1]):
        return "yoochoose" if len(columns) == 4 else "yoochoose-buys"
    if (
        len(columns) == 5
        and columns[3] in _TAOBAO_BEHAVIOURS
        and all(_is_digits(columns[i]) for i in (0, 1, 2, 4))
    ):
        return "taobao"
    return None


def detect_format(path: Path) -> str:
    """Guess a log's format from its first non-blank lines; ValueError when none fits.

    Headers decide at once (DIGINETICA, REES46, session-rec TSV); otherwise the first line that
    looks like one format decides, so one malformed leading row does not defeat detection.
    """
    path = Path(path)
    seen: list[str] = []
    read = 0
    with path.open("rb") as file:
        for raw in file:
            read += len(raw)
            if len(seen) == 0 and raw.startswith(_BOM):
                raw = raw[3:]
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not text.strip():
                continue
            found = _sniff_one(text, first=not seen)
            if found is not None:
                return found
            seen.append(text)
            if len(seen) >= _SNIFF_LINES or read >= _SNIFF_BYTES:
                break
    if not seen:
        raise ValueError(f"cannot detect the format of {path}: the file has no non-blank lines")
    raise ValueError(
        f"cannot detect the format of {path}: its first line {_show(seen[0])} matches none of the known "
        f"formats ({', '.join(FORMATS)}); pass one of them explicitly"
    )


# ---------------------------------------------------------------------------------------------
# Entry point


def read_log(
    path: Path,
    fmt: str = "auto",
    *,
    session_gap_seconds: float = 1800.0,
    source_name: str | None = None,
) -> Iterator[Row]:
    """Stream a recorded log as Rows, one per non-blank, non-header line, in file order.

    ``fmt`` is one of FORMATS or "auto" (detect_format). Event ids are f"{source_name}:{line}"
    (f"{source_name}:{line}:{index}" for OTTO's many events per line); source_name defaults to the
    file's name. Where the log has no session column, sessions are derived per user with an
    inactivity gap of ``session_gap_seconds``. Arguments are checked here, before iteration
    starts; the rows themselves never raise.
    """
    path = Path(path)
    if fmt != "auto" and fmt not in _READERS:
        raise ValueError(f"unknown log format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    if not (math.isfinite(session_gap_seconds) and session_gap_seconds >= 0):
        raise ValueError(f"session_gap_seconds must be a finite number >= 0, got {session_gap_seconds!r}")
    source = path.name[-MAX_SOURCE_NAME_LENGTH:] if source_name is None else source_name
    if not source or len(source) > MAX_SOURCE_NAME_LENGTH:
        raise ValueError(
            f"source_name must be 1 to {MAX_SOURCE_NAME_LENGTH} characters (it prefixes every event_id), "
            f"got {source!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no such log file: {path}")
    if fmt == "auto":
        fmt = detect_format(path)
    return _READERS[fmt](_lines(path), _Context(source, session_gap_seconds))


def iter_events(rows: Iterable[Row]) -> Iterator[ClickEvent]:
    """The events of the accepted rows, in order (rejected rows contribute nothing)."""
    for row in rows:
        yield from row.events

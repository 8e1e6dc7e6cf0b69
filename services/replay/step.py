"""Pure helpers of replay and record: time parsing, time-range filtering and pacing."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_time_ms(text: str) -> int:
    """Milliseconds since the epoch from ISO 8601 (naive means UTC) or unix seconds."""
    value = text.strip()
    try:
        return round(float(value) * 1000)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read time {text!r}: use ISO 8601 (2017-11-25T00:00:00Z) or unix seconds (1511568000)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return round(parsed.timestamp() * 1000)


def in_range(timestamp_ms: int, from_ms: int | None, to_ms: int | None) -> bool:
    """Whether a time lies in the half-open range [from, to); None leaves a side open."""
    return (from_ms is None or timestamp_ms >= from_ms) and (to_ms is None or timestamp_ms < to_ms)


class Pacer:
    """When to send each event to replay a log at ``speed`` times its real time.

    The first event anchors log time to wall time; an event that goes back in time is sent at once.
    """

    def __init__(self, speed: float | None) -> None:
        self.speed = speed
        self._anchor: tuple[int, float] | None = None

    def delay_s(self, event_ms: int, now_s: float) -> float:
        """Seconds to wait (from ``now_s``) before sending an event stamped ``event_ms``."""
        if self.speed is None:
            return 0.0
        if self._anchor is None:
            self._anchor = (event_ms, now_s)
            return 0.0
        first_ms, start_s = self._anchor
        due_s = start_s + (event_ms - first_ms) / 1000.0 / self.speed
        return max(0.0, due_s - now_s)

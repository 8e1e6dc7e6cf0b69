"""Keep bad input: build a DeadLetter with the reason and send it to the dead-letter topic."""

from __future__ import annotations

import base64

from schemas.codec import DecodeError, encode
from schemas.messages import DeadLetter
from services.bus.base import Producer, Record
from services.metrics import ProcessMetrics
from services.topics import DEAD_LETTER

# Keep dead letters well below Kafka's ~1 MB record limit: an oversized input is kept in part.
MAX_PAYLOAD_BYTES = 64 * 1024


def dead_letter(
    payload: bytes | None,
    error: DecodeError,
    *,
    service: str,
    now_ms: int,
    source: Record | None = None,
    source_file: str | None = None,
    source_line: int | None = None,
) -> DeadLetter:
    """A DeadLetter holding the original bytes (as text when they are UTF-8, else base64)."""
    data = payload or b""
    reason = error.reason
    if len(data) > MAX_PAYLOAD_BYTES:
        reason += f" (payload kept: first {MAX_PAYLOAD_BYTES} of {len(data)} bytes)"
        data = data[:MAX_PAYLOAD_BYTES]
    try:
        text, encoding = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(data).decode("ascii"), "base64"
    key = None
    if source is not None and source.key is not None:
        key = source.key.decode("utf-8", errors="backslashreplace")
    return DeadLetter(
        reason_code=error.reason_code,
        reason=reason,
        service=service,
        timestamp=now_ms,
        payload=text,
        payload_encoding=encoding,  # type: ignore[arg-type]
        source_topic=source.topic if source else None,
        source_partition=source.partition if source else None,
        source_offset=source.offset if source else None,
        source_key=key,
        source_file=source_file,
        source_line=source_line,
    )


class DeadLetterSink:
    """Sends dead letters (keyed by service) and counts them by reason."""

    def __init__(self, producer: Producer, metrics: ProcessMetrics, topic: str = DEAD_LETTER) -> None:
        self.producer, self.metrics, self.topic = producer, metrics, topic
        self.counts: dict[str, int] = {}

    def send(self, letter: DeadLetter) -> None:
        self.producer.send(self.topic, letter.service.encode(), encode(letter), timestamp_ms=letter.timestamp)
        self.metrics.dead_letters.labels(letter.service, letter.reason_code).inc()
        self.counts[letter.reason_code] = self.counts.get(letter.reason_code, 0) + 1

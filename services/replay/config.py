"""Settings of `qrec replay` and `qrec record`."""

from __future__ import annotations

from dataclasses import dataclass

from services.config import BusConfig, ConfigError, register, setting
from services.topics import CLICKSTREAM, DEAD_LETTER


@register("replay")
@dataclass(frozen=True, kw_only=True)
class ReplayConfig(BusConfig):
    """Replays a recorded event log to the clickstream topic."""

    log: str = setting(
        help="the log file to replay (qrec JSONL or a public layout, see --format)", positional=True
    )
    format: str = setting(
        "auto",
        help="log layout: auto, jsonl, taobao, diginetica, rees46, otto, yoochoose, yoochoose-buys, "
        "session-tsv",
    )
    topic: str = setting(CLICKSTREAM, help="topic the events are produced to")
    dead_letter_topic: str = setting(DEAD_LETTER, help="topic rows that do not parse go to, with the reason")
    order: str = setting(
        "file",
        help="'file' keeps the log's order; 'time' sorts events by time first (in memory), as a live "
        "stream would interleave users",
    )
    speed: str = setting(
        "max", help="'max' sends as fast as possible; a number N replays at N times the log's real time"
    )
    limit: int | None = setting(None, help="stop after producing this many events")
    from_time: str | None = setting(
        None, help="skip events before this time (ISO 8601 like 2017-11-25T00:00:00Z, or unix seconds)"
    )
    to_time: str | None = setting(None, help="skip events at or after this time (same forms as --from-time)")
    session_gap_seconds: float = setting(
        1800.0, help="inactivity that starts a new session, for layouts without a session column"
    )
    progress: bool = setting(True, help="show a progress bar with rate and ETA (only on a terminal)")
    create_topics: bool = setting(True, help="create the qrec topics first when they are missing")
    partitions: int = setting(6, help="partitions per topic when topics are created")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.speed != "max":
            try:
                value = float(self.speed)
            except ValueError:
                raise ConfigError(f"speed must be 'max' or a positive number, got {self.speed!r}") from None
            if value <= 0:
                raise ConfigError(f"speed must be 'max' or a positive number, got {self.speed!r}")
        if self.order not in ("file", "time"):
            raise ConfigError(f"order must be 'file' or 'time', got {self.order!r}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")


@register("record")
@dataclass(frozen=True, kw_only=True)
class RecordConfig(BusConfig):
    """Writes a topic (or a time range of it) to a JSONL file that `qrec replay` reads again."""

    topic: str = setting(help="the topic to record, e.g. qrec.clickstream.v1", positional=True)
    out: str = setting(help="output JSONL file ('-' for standard output)")
    from_time: str | None = setting(
        None, help="first record time to include (Kafka record time; ISO 8601 or unix seconds)"
    )
    to_time: str | None = setting(None, help="stop at records at or after this time")
    follow: bool = setting(False, help="keep waiting for new records instead of stopping at the current end")
    idle_timeout_seconds: float = setting(
        10.0, help="with --follow, stop after this long without a new record (0 waits forever)"
    )
    progress: bool = setting(True, help="show a progress bar (only on a terminal)")

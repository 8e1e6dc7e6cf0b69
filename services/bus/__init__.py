"""The bus: one interface (``Bus``), two implementations (Kafka and in-process)."""

from services.bus.base import (
    Bus,
    BusError,
    Consumer,
    Producer,
    Record,
    TopicPartition,
    TopicSpec,
    seek_to_time,
)

__all__ = [
    "Bus",
    "BusError",
    "Consumer",
    "Producer",
    "Record",
    "TopicPartition",
    "TopicSpec",
    "seek_to_time",
]

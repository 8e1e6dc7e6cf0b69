"""Prometheus metrics: each process builds its metrics on an injected registry and serves /metrics.

Conventions: names start with ``qrec_``, carry base units (``_seconds``, ``_bytes``), counters end
in ``_total``, and no label ever holds a user or item id (label values come from small, fixed sets).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server

from services import __version__
from services.bus.base import BusError, Consumer, Record, TopicPartition

log = logging.getLogger(__name__)


@dataclass
class MetricsServer:
    """A running /metrics endpoint."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` on http://host:port/metrics (port 0 picks a free port) in a daemon thread."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    actual = server.server_address[1]
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, actual)
    return MetricsServer(host, int(actual), server, thread)


class ProcessMetrics:
    """What every qrec process exports: its identity, and the dead letters it wrote."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.service = service
        self.info = Info("qrec_build", "qrec version and the service this process runs", registry=registry)
        self.info.info({"version": __version__, "service": service})
        self.up = Gauge(
            "qrec_service_up", "1 while the service loop is running", ["service"], registry=registry
        )
        self.dead_letters = Counter(
            "qrec_dead_letters_total",
            "Inputs sent to the dead-letter topic instead of being processed, by reason",
            ["service", "reason"],
            registry=registry,
        )


def next_offsets(records: Iterable[Record]) -> dict[TopicPartition, int]:
    """For each partition in ``records``, the offset after its last record: what to commit."""
    offsets: dict[TopicPartition, int] = {}
    for record in records:
        tp = record.topic_partition
        offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
    return offsets


class ConsumerLag:
    """Exports ``qrec_consumer_lag_records`` for a consumer's assigned partitions, every few seconds,
    and ``qrec_consumer_assigned_partitions`` (how many) at every update."""

    def __init__(self, registry: CollectorRegistry, group: str, every_s: float = 5.0) -> None:
        self.gauge = Gauge(
            "qrec_consumer_lag_records",
            "Records between the consumer's position and the end of each assigned partition",
            ["group", "topic", "partition"],
            registry=registry,
        )
        self.assigned = Gauge(
            "qrec_consumer_assigned_partitions",
            "Partitions assigned to this process's consumer (0 until it has joined its group)",
            ["group"],
            registry=registry,
        )
        self.group = group
        self.every_s = every_s
        self._last = 0.0

    def update(self, consumer: Consumer) -> None:
        assignment = consumer.assignment()
        self.assigned.labels(self.group).set(len(assignment))
        if time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        assigned = sorted(assignment)
        if not assigned:
            return
        try:
            ends = consumer.end_offsets(assigned)
            for tp in assigned:
                lag = max(0, ends[tp] - consumer.position(tp))
                self.gauge.labels(self.group, tp.topic, str(tp.partition)).set(lag)
        except BusError as exc:
            log.debug("lag update skipped: %s", exc)

"""Prometheus metrics: each process builds its metrics on an injected registry and serves /metrics.

Conventions: names start with ``qrec_``, carry base units (``_seconds``, ``_bytes``), counters end
in ``_total``, and no label ever holds a user or item id (label values come from small, fixed sets).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server

from services import __version__

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

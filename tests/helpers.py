"""Helpers shared by the tests: free ports and a real Prometheus server run as a child process.

Import them as `from tests.helpers import free_port, start_prometheus`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The real recorded logs (see shared/data/PROVENANCE.md), in the shared folder beside the repository.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TAOBAO = SHARED_DATA / "taobao_userbehavior_head" / "UserBehavior_head.csv"
DIGINETICA = SHARED_DATA / "diginetica_sample" / "sample_train-item-views.csv"


def require_shared_data(*paths: Path) -> None:
    """Fail (never skip) the calling test when a recorded log it reads is absent."""
    for path in paths or (SHARED_DATA,):
        if not path.exists():
            pytest.fail(
                f"{path} is missing: the tests read the recorded logs in shared/data beside the "
                "repository (clone qrec next to the shared folder)"
            )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    condition: Callable[[], bool], timeout_s: float = 30, interval_s: float = 0.1, what: str = "condition"
) -> None:
    """Poll `condition` until it is true; raise AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(interval_s)


@dataclass(frozen=True)
class ExternalKafka:
    """A broker not started by the tests (`QREC_TEST_BOOTSTRAP_SERVERS`)."""

    bootstrap_servers: str

    def log_tail(self, lines: int = 60) -> str:
        return f"(external broker at {self.bootstrap_servers}: no log)"


class PrometheusError(RuntimeError):
    """Prometheus could not be started or queried; the message includes its log."""


class PrometheusServer:
    """A real Prometheus server (the `prometheus` binary) scraping the given targets, as a child process."""

    def __init__(self, directory: Path, targets: list[str], scrape_interval: str = "1s") -> None:
        self.directory = Path(directory)
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_file = self.directory / "prometheus.yml"
        self.log_file = self.directory / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [
                {
                    "job_name": "qrec",
                    "scrape_interval": self.scrape_interval,
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        # JSON is YAML: no YAML library needed.
        self.config_file.write_text(json.dumps(config, indent=2) + "\n")

    def start(self, timeout_s: float = 30) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError(
                "the `prometheus` binary is not on PATH; install it (`make prometheus` or "
                "`apt-get install prometheus`)"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with self.log_file.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    # Apply discovered targets at once (discovery itself still batches updates for ~5 s).
                    "--scrape.discovery-reload-interval=100ms",
                    "--log.level=info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise PrometheusError(
                    f"prometheus exited with status {code} before it was ready\n{self.log_tail()}"
                )
            if self._ready():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus was not ready within {timeout_s}s\n{self.log_tail()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Evaluate an instant PromQL query; returns `data.result` (for a vector: [{metric, value}, ...])."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:
            raise PrometheusError(
                f"query {promql!r} failed: HTTP {e.code}: {e.read().decode(errors='replace')}"
            ) from e
        if body.get("status") != "success":
            raise PrometheusError(f"query {promql!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout_s: float = 30,
    ) -> list[dict[str, Any]]:
        """Query until `predicate(result)` holds (default: a non-empty result); return that result."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"query {promql!r} did not give the expected result within {timeout_s}s: {result}"
                )
            time.sleep(0.25)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            text = []
        return "\n".join([f"----- last {lines} lines of {self.log_file} -----", *text])

    def stop(self, timeout_s: float = 10) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_prometheus(tmp_path: Path, targets: list[str], scrape_interval: str = "1s") -> PrometheusServer:
    """Start a Prometheus server in `tmp_path/prometheus` scraping `targets` ("host:port", path /metrics).

    The first scrape of a target happens about 5 s after the start: use `wait_for` rather than `query`.
    """
    directory = Path(tmp_path) / "prometheus"
    suffix = 1
    while directory.exists():  # several servers in one test
        suffix += 1
        directory = Path(tmp_path) / f"prometheus-{suffix}"
    return PrometheusServer(directory, targets, scrape_interval).start()


def read_topic(bus: Any, topic: str) -> list[Any]:
    """Every record of every partition of ``topic`` up to its current end, in (partition, offset) order."""
    from services.bus.base import Record, TopicPartition

    consumer = bus.consumer()
    partitions = [TopicPartition(topic, p) for p in range(bus.partitions_for(topic))]
    consumer.assign(partitions)
    ends = consumer.end_offsets(partitions)
    records: list[Record] = []
    while any(consumer.position(tp) < ends[tp] for tp in partitions):
        records.extend(consumer.poll(max_records=5000, timeout_s=0.5))
    consumer.close()
    return sorted(records, key=lambda r: (r.partition, r.offset))


def start_service(module: str, bootstrap: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Run ``python -m module --bootstrap-servers ...`` as its own OS process, output appended to ``log``.

    QREC_* variables of the test run are not passed on, so only ``args`` configure the process.
    """
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("QREC_")}
    return subprocess.Popen(
        [sys.executable, "-m", module, "--bootstrap-servers", bootstrap, *args],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )

"""A local single-node Apache Kafka broker run as a child process by `deploy/kafka/kafka.sh`.

Used by the test fixtures, the benchmark command and `qrec up`::

    with LocalKafka(Path("/tmp/qrec-kafka")) as kafka:
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)

The broker keeps its configuration, data and logs under the given directory, so a stopped broker can be
started again on the same directory (and, when no port is given, on the same port).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections import deque
from pathlib import Path
from types import TracebackType

# Fetching the jars with Maven happens once per machine; allow for a slow network.
FETCH_TIMEOUT_S = 900.0


class LocalKafkaError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message includes the log tail."""


def kafka_script() -> Path:
    """The path of `deploy/kafka/kafka.sh`.

    The folder is `$QREC_KAFKA_HOME` when set, else `deploy/kafka` in the repository root (the parent of
    the `services` package folder).
    """
    home = os.environ.get("QREC_KAFKA_HOME")
    folder = Path(home) if home else Path(__file__).resolve().parent.parent / "deploy" / "kafka"
    return folder / "kafka.sh"


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except FileNotFoundError:
        return []


class LocalKafka:
    """A single-node Apache Kafka broker run as a child process from deploy/kafka/kafka.sh."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        timeout_s: float = 120,
        *,
        owner_pid: int | None = None,
    ) -> None:
        """`owner_pid`: stop the broker once that process has exited (e.g. `os.getpid()` in test fixtures,
        so that a killed test run leaves no broker behind); None keeps it running until `stop()`."""
        self.directory = Path(directory).resolve()
        self.port = port
        self.timeout_s = timeout_s
        self.owner_pid = owner_pid
        self._bootstrap_servers: str | None = None

    def __repr__(self) -> str:
        return f"LocalKafka(directory={str(self.directory)!r}, bootstrap_servers={self._bootstrap_servers!r})"

    @property
    def bootstrap_servers(self) -> str:
        """The broker's address, `127.0.0.1:PORT`; only after `start()`."""
        if self._bootstrap_servers is None:
            raise LocalKafkaError(f"the broker in {self.directory} is not started; call start() first")
        return self._bootstrap_servers

    @property
    def log_file(self) -> Path:
        """The broker's log (log4j), `DIRECTORY/logs/server.log`."""
        return self.directory / "logs" / "server.log"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs from this directory, else None."""
        try:
            pid = int((self.directory / "kafka.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"kafka.Kafka" in cmdline else None

    def _run(self, args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        script = kafka_script()
        if not script.is_file():
            raise LocalKafkaError(f"{script} not found; set QREC_KAFKA_HOME to the folder holding kafka.sh")
        try:
            return subprocess.run(
                ["bash", str(script), *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise LocalKafkaError(
                f"`kafka.sh {' '.join(args)}` did not finish within {timeout_s:.0f}s\n{self.log_tail()}"
            ) from e

    def start(self) -> LocalKafka:
        """Start the broker (fetching the jars first if needed) and wait until it accepts connections."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fetch = self._run(["fetch"], FETCH_TIMEOUT_S)
        if fetch.returncode != 0:
            raise LocalKafkaError(
                f"fetching the Kafka jars failed (exit {fetch.returncode}):\n{fetch.stderr}"
            )
        args = ["start", "--dir", str(self.directory), "--timeout", str(max(1, round(self.timeout_s)))]
        if self.port is not None:
            args += ["--port", str(self.port)]
        if self.owner_pid is not None:
            args += ["--owner-pid", str(self.owner_pid)]
        try:
            result = self._run(args, self.timeout_s + 60)
        except LocalKafkaError:
            self._kill_quietly()
            raise
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            raise LocalKafkaError(
                f"the Kafka broker in {self.directory} did not start (exit {result.returncode}):\n"
                f"{result.stderr.strip()}"
            )
        self._bootstrap_servers = lines[-1].strip()
        # Keep the port, so that a restart on this directory serves the same address.
        self.port = int(self._bootstrap_servers.rsplit(":", 1)[1])
        return self

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the broker (controlled shutdown, SIGKILL after `timeout_s`); a no-op when not running."""
        if not (self.directory / "kafka.pid").exists():
            return
        result = self._run(
            ["stop", "--dir", str(self.directory), "--timeout", str(round(timeout_s))], timeout_s + 30
        )
        if result.returncode != 0:
            raise LocalKafkaError(f"stopping the broker in {self.directory} failed:\n{result.stderr.strip()}")

    def _kill_quietly(self) -> None:
        with contextlib.suppress(LocalKafkaError):
            self.stop(timeout_s=5)

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the broker log, and of the JVM's stdout/stderr when it wrote any."""
        parts = [f"----- last {lines} lines of {self.log_file} -----", *_tail(self.log_file, lines)]
        out = self.directory / "logs" / "kafka.out"
        out_lines = _tail(out, lines)
        if out_lines:
            parts += [f"----- last {lines} lines of {out} -----", *out_lines]
        return "\n".join(parts)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

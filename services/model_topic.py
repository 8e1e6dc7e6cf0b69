"""Models on Kafka: the learner publishes a header and chunks, readers reassemble and verify them.

A model version is one header (version, step, size, SHA-256, encoding, config) followed by
``num_chunks`` chunk messages, all keyed so that the compacted topic keeps the latest version whole:
the header under ``header`` and chunk i under ``chunk-<i>``. A reader accepts a version only when
every chunk arrived and the bytes hash to the header's SHA-256; anything else is rejected with a
reason and the previous model keeps serving.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

from rl.serialize import ChecksumError, join_chunks, sha256_hex, split_chunks
from schemas.codec import MODEL_UPDATES, DecodeError, encode
from schemas.messages import ModelUpdateChunk, ModelUpdateHeader
from services.bus.base import Producer

# Chunks of 512 KiB become ~700 KB of base64 JSON: below Kafka's default 1 MB record limit, so the
# model topic works even where its max.message.bytes was left at the default.
DEFAULT_CHUNK_BYTES = 512 * 1024
SCHEMA_HEADER = ("qrec-schema", b"model_update/1-0-0")


def publish_model(
    producer: Producer,
    topic: str,
    *,
    version: int,
    step: int,
    data: bytes,
    encoding: str,
    vocabulary_size: int,
    config: dict[str, object],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    now_ms: int | None = None,
) -> int:
    """Send one model version (header first, then chunks) and flush; returns the bytes sent."""
    chunks = split_chunks(data, chunk_bytes)
    header = ModelUpdateHeader(
        model_version=version,
        step=step,
        created_at=int(time.time() * 1000) if now_ms is None else now_ms,
        vocabulary_size=vocabulary_size,
        num_chunks=len(chunks),
        total_bytes=len(data),
        sha256=sha256_hex(data),
        encoding=encoding,
        config=config,
    )
    sent = 0
    payload = encode(header)
    producer.send(topic, b"header", payload, headers=(SCHEMA_HEADER,))
    sent += len(payload)
    for index, chunk in enumerate(chunks):
        message = ModelUpdateChunk(
            model_version=version,
            chunk_index=index,
            num_chunks=len(chunks),
            data_base64=base64.b64encode(chunk).decode("ascii"),
        )
        payload = encode(message)
        producer.send(topic, f"chunk-{index}".encode(), payload, headers=(SCHEMA_HEADER,))
        sent += len(payload)
    producer.flush()
    return sent


@dataclass(frozen=True)
class AssembledModel:
    """A verified model version."""

    header: ModelUpdateHeader
    data: bytes


@dataclass
class ModelAssembler:
    """Collects model messages in any order; yields each version once it is complete and verified."""

    latest_version: int = 0
    rejected: list[str] = field(default_factory=list)
    _headers: dict[int, ModelUpdateHeader] = field(default_factory=dict)
    _chunks: dict[int, dict[int, bytes]] = field(default_factory=dict)

    def add(self, value: bytes | None) -> AssembledModel | None:
        """Feed one record value; returns a newly completed, verified version (newer than the last)."""
        message = MODEL_UPDATES.decode(value)
        if isinstance(message, DecodeError):
            self.rejected.append(f"undecodable model message: {message.reason}")
            return None
        version = message.model_version
        if version <= self.latest_version:
            return None  # an old version, e.g. read back from the compacted topic
        if isinstance(message, ModelUpdateHeader):
            self._headers[version] = message
        else:
            try:
                chunk = base64.b64decode(message.data_base64, validate=True)
            except ValueError:
                self.rejected.append(f"version {version}: chunk {message.chunk_index} is not valid base64")
                self._drop(version)
                return None
            self._chunks.setdefault(version, {})[message.chunk_index] = chunk
        return self._try_complete(version)

    def _try_complete(self, version: int) -> AssembledModel | None:
        header = self._headers.get(version)
        chunks = self._chunks.get(version, {})
        if header is None or len(chunks) < header.num_chunks:
            return None
        try:
            data = join_chunks(
                chunks, header.sha256, header.total_bytes, expected_num_chunks=header.num_chunks
            )
        except ChecksumError as exc:
            self.rejected.append(f"version {version}: {exc}")
            self._drop(version)
            return None
        self.latest_version = version
        for old in [v for v in (*self._headers, *self._chunks) if v <= version]:
            self._drop(old)
        return AssembledModel(header, data)

    def _drop(self, version: int) -> None:
        self._headers.pop(version, None)
        self._chunks.pop(version, None)

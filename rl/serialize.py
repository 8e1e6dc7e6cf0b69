"""Parameters to bytes and back, and the checksummed chunking that carries them over a message bus.

The encoding is flax's msgpack of the pytree's state dict: portable (no pickle), and restoring needs
a template of the same structure, so a model can only be loaded into a network of the right shape.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import flax.serialization

ENCODING = "flax-msgpack"  # the name to put in a model header's `encoding` field

TreeT = TypeVar("TreeT")


class ChecksumError(ValueError):
    """Reassembled bytes are incomplete or differ from what the sender hashed."""


def tree_to_bytes(tree: Any) -> bytes:
    """Serialise a pytree (params, a TrainState...) of arrays to msgpack bytes."""
    return flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(tree))


def tree_from_bytes(template: TreeT, data: bytes) -> TreeT:
    """Restore bytes from `tree_to_bytes` into the structure of `template` (mismatch raises ValueError)."""
    state = flax.serialization.msgpack_restore(data)
    return flax.serialization.from_state_dict(template, state)


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of `data` (64 characters)."""
    return hashlib.sha256(data).hexdigest()


def split_chunks(data: bytes, chunk_size: int) -> list[bytes]:
    """Cut `data` into pieces of at most `chunk_size` bytes; empty data is one empty chunk."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not data:
        return [b""]
    return [data[start : start + chunk_size] for start in range(0, len(data), chunk_size)]


def join_chunks(
    chunks: Sequence[bytes | None] | Mapping[int, bytes],
    expected_sha256: str,
    expected_size: int,
    *,
    expected_num_chunks: int | None = None,
) -> bytes:
    """Concatenate chunks in index order and verify size and SHA-256, else raise ChecksumError.

    `chunks` is a list with None where a chunk never arrived, or a mapping chunk_index -> bytes (as
    collected from a bus, where chunks may come out of order). A missing index, a wrong count, a
    wrong total size or a wrong hash all raise.
    """
    if isinstance(chunks, Mapping):
        count = expected_num_chunks if expected_num_chunks is not None else max(chunks, default=-1) + 1
        extra = sorted(index for index in chunks if not 0 <= index < count)
        if extra:
            raise ChecksumError(f"unexpected chunk indices {extra} for {count} chunks")
        ordered: list[bytes | None] = [chunks.get(index) for index in range(count)]
    else:
        ordered = list(chunks)
        if expected_num_chunks is not None and len(ordered) != expected_num_chunks:
            raise ChecksumError(f"expected {expected_num_chunks} chunks, got {len(ordered)}")
    missing = [index for index, chunk in enumerate(ordered) if chunk is None]
    if missing:
        raise ChecksumError(f"missing chunk(s) {missing} of {len(ordered)}")
    data = b"".join(chunk for chunk in ordered if chunk is not None)
    if len(data) != expected_size:
        raise ChecksumError(f"expected {expected_size} bytes, got {len(data)}")
    actual = sha256_hex(data)
    if actual != expected_sha256.lower():
        raise ChecksumError(f"sha256 mismatch: expected {expected_sha256}, got {actual}")
    return data

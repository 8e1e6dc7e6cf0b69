"""Serialization round trips and checksummed chunking: any corruption or gap is detected."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rl.batch import empty_obs_batch
from rl.networks import NetworkConfig
from rl.serialize import ChecksumError, join_chunks, sha256_hex, split_chunks, tree_from_bytes, tree_to_bytes
from rl.train import LearnerConfig, create_train_state


def test_train_state_round_trip() -> None:
    config = NetworkConfig(num_actions=6, embed_dim=4, hidden_sizes=(8,))
    state = create_train_state(config, LearnerConfig(), empty_obs_batch(1, window=2, feature_dim=3))
    data = tree_to_bytes(state)
    restored = tree_from_bytes(state, data)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert tree_to_bytes(restored) == data
    # Parameters alone, into a template with the same structure.
    params = tree_from_bytes(state.params, tree_to_bytes(state.params))
    jax.tree.map(np.testing.assert_array_equal, params, state.params)


def test_restoring_into_a_different_structure_fails() -> None:
    small = create_train_state(
        NetworkConfig(num_actions=6, embed_dim=4, hidden_sizes=(8,)),
        LearnerConfig(),
        empty_obs_batch(1, window=2, feature_dim=3),
    )
    data = tree_to_bytes(small.params)
    with pytest.raises(ValueError):
        tree_from_bytes({"params": {"other": np.zeros(3)}}, data)


def test_sha256_hex() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_split_and_join() -> None:
    data = bytes(range(256)) * 10  # 2560 bytes
    chunks = split_chunks(data, 1000)
    assert [len(chunk) for chunk in chunks] == [1000, 1000, 560]
    assert join_chunks(chunks, sha256_hex(data), len(data)) == data
    # Out of order from a bus, as a mapping.
    as_mapping = {2: chunks[2], 0: chunks[0], 1: chunks[1]}
    assert join_chunks(as_mapping, sha256_hex(data), len(data), expected_num_chunks=3) == data
    assert split_chunks(b"", 10) == [b""]
    assert join_chunks([b""], sha256_hex(b""), 0) == b""
    with pytest.raises(ValueError):
        split_chunks(data, 0)


def test_flipped_byte_is_detected() -> None:
    data = b"model bytes " * 100
    chunks = split_chunks(data, 64)
    corrupted = list(chunks)
    corrupted[3] = corrupted[3][:10] + bytes([corrupted[3][10] ^ 0x01]) + corrupted[3][11:]
    with pytest.raises(ChecksumError, match="sha256"):
        join_chunks(corrupted, sha256_hex(data), len(data))


def test_missing_chunk_is_detected() -> None:
    data = b"model bytes " * 100
    chunks = split_chunks(data, 64)
    digest = sha256_hex(data)
    with pytest.raises(ChecksumError, match=r"missing chunk\(s\) \[2\]"):
        join_chunks([*chunks[:2], None, *chunks[3:]], digest, len(data))
    with pytest.raises(ChecksumError, match="missing"):
        join_chunks({i: chunk for i, chunk in enumerate(chunks) if i != 5}, digest, len(data))
    # The last chunk never arrived: only the expected count or size can tell.
    with pytest.raises(ChecksumError, match="missing"):
        join_chunks(dict(enumerate(chunks[:-1])), digest, len(data), expected_num_chunks=len(chunks))
    with pytest.raises(ChecksumError, match="bytes"):
        join_chunks(chunks[:-1], digest, len(data))
    with pytest.raises(ChecksumError, match="expected"):
        join_chunks(chunks[:-1], digest, len(data), expected_num_chunks=len(chunks))


def test_checksum_error_is_a_value_error() -> None:
    assert issubclass(ChecksumError, ValueError)

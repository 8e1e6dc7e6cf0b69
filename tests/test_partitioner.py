"""murmur2 must match Kafka's Java implementation bit for bit, or users land on the wrong partition."""

from __future__ import annotations

import pytest

from services.bus.partitioner import murmur2, partition_for_key

# Vectors from Kafka's own UtilsTest.testMurmur2.
JAVA_VECTORS = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
}


@pytest.mark.parametrize(("key", "expected"), JAVA_VECTORS.items())
def test_murmur2_matches_kafkas_java_vectors(key: str, expected: int) -> None:
    assert murmur2(key.encode()) == expected


def test_partition_is_positive_hash_modulo_partitions() -> None:
    assert partition_for_key(b"foobar", 6) == (-790332482 & 0x7FFFFFFF) % 6
    assert {partition_for_key(f"user-{i}".encode(), 6) for i in range(1000)} == set(range(6))


def test_matches_kafka_python_default_partitioner() -> None:
    from kafka.partitioner.default import murmur2 as kafka_python_murmur2

    for i in range(500):
        key = f"user-{i * 7919}".encode()
        assert partition_for_key(key, 12) == (kafka_python_murmur2(key) & 0x7FFFFFFF) % 12

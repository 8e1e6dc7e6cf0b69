"""Layering: rl/ and schemas/ stay pure (no Kafka, Prometheus, network or services), and only the
bus modules import a Kafka client."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IO_MODULES = {
    "kafka",
    "confluent_kafka",
    "prometheus_client",
    "socket",
    "http",
    "urllib",
    "requests",
    "services",
}
KAFKA_CLIENTS = {"kafka", "confluent_kafka", "aiokafka"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_pure_packages_import_no_io() -> None:
    files = [*ROOT.glob("rl/**/*.py"), *ROOT.glob("schemas/**/*.py")]
    assert files
    for path in files:
        bad = imported_roots(path) & IO_MODULES
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: keep rl/ and schemas/ free of I/O"


def test_only_the_bus_module_imports_a_kafka_client() -> None:
    allowed = {ROOT / "services" / "bus" / "kafka.py", ROOT / "services" / "bus" / "confluent.py"}
    for path in ROOT.glob("services/**/*.py"):
        if path in allowed:
            continue
        bad = imported_roots(path) & KAFKA_CLIENTS
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; go through services.bus instead"


def test_layering_check_would_catch_a_violation(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("from kafka import KafkaProducer\nimport prometheus_client\n")
    assert imported_roots(sample) >= {"kafka", "prometheus_client"}

"""The command line: every command explains itself, and mistakes get errors that say what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import main

COMMANDS = [
    "topics",
    "replay",
    "record",
    "state-builder",
    "learner",
    "actor",
    "train",
    "forget",
    "bench",
    "demo",
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_top_level_help_lists_every_command() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: qrec " + command in result.stdout


def test_replay_help_names_formats_env_and_defaults() -> None:
    out = run("replay", "--help").stdout
    for text in ("taobao", "diginetica", "QREC_SPEED", "--bootstrap-servers", "(default: max"):
        assert text in out


def test_bench_help_names_every_benchmark_with_what_it_measures() -> None:
    from services.bench import BENCHMARKS

    out = run("bench", "--help").stdout
    for name, what in BENCHMARKS.items():
        assert f"  {name}" in out and what in out, name


def test_missing_log_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["replay", str(tmp_path / "nope.csv"), "--no-progress"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_setting_value_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("")
    code = main(["replay", str(log), "--speed", "warp"])
    assert code == 2
    assert "speed must be 'max' or a positive number" in capsys.readouterr().err


def test_replay_on_the_embedded_bus_is_a_dry_run_that_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(
        '{"event_id":"a","user_id":"u","session_id":"s","event_type":"view","timestamp":1,"item_id":"i"}\n'
        "{broken\n"
    )
    assert main(["replay", str(log), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "dry run" in captured.err
    assert "invalid_json" in captured.out


def test_topics_create_on_the_embedded_bus_lists_the_topics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topics", "create", "--partitions", "3"]) == 0
    out = capsys.readouterr().out
    assert "qrec.clickstream.v1" in out and "cleanup.policy=compact" in out


def test_bench_codec_quick_writes_json(tmp_path: Path) -> None:
    import json

    target = tmp_path / "bench.json"
    result = run("bench", "codec", "--quick", "--json", str(target))
    assert result.returncode == 0, result.stderr
    figures = json.loads(target.read_text())
    assert figures["codec"]["decode_events_per_s"] > 0
    assert figures["codec"]["events"] == 100_000


def test_unknown_benchmark_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nope"]) == 2
    assert "available: codec" in capsys.readouterr().err

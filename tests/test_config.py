"""Configuration precedence (flags > QREC_* env > TOML > defaults) and unknown-key rejection."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from services.config import BusConfig, ConfigError, add_arguments, config_args, config_from_args, load_config
from services.replay.config import RecordConfig, ReplayConfig


def test_precedence_is_flags_then_env_then_file_then_defaults(tmp_path: Path) -> None:
    file = tmp_path / "qrec.toml"
    file.write_text('client_id = "from-file"\nspeed = "3"\n[replay]\nlimit = 7\npartitions = 2\n')
    env = {"QREC_LIMIT": "9", "QREC_PARTITIONS": "4"}
    config = load_config(ReplayConfig, {"log": "x.csv", "partitions": "5"}, env=env, config_file=file)
    assert config.partitions == 5  # flag beats env and file
    assert config.limit == 9  # env beats file
    assert config.speed == "3"  # top-level file key
    assert config.client_id == "from-file"
    assert config.format == "auto"  # default
    assert config.log == "x.csv"


def test_unknown_keys_are_rejected_with_their_name(tmp_path: Path) -> None:
    file = tmp_path / "qrec.toml"
    file.write_text("[replay]\nlimt = 7\n")
    with pytest.raises(ConfigError, match="limt"):
        load_config(ReplayConfig, {"log": "x"}, env={}, config_file=file)
    file.write_text("bootstrap_server = 'x'\n")
    with pytest.raises(ConfigError, match="bootstrap_server"):
        load_config(ReplayConfig, {"log": "x"}, env={}, config_file=file)
    with pytest.raises(ConfigError, match="QREC_SPEEED"):
        load_config(ReplayConfig, {"log": "x"}, env={"QREC_SPEEED": "2"})


def test_settings_of_other_processes_in_env_and_file_are_allowed(tmp_path: Path) -> None:
    file = tmp_path / "qrec.toml"
    file.write_text("[record]\nfollow = true\n")
    # QREC_FOLLOW belongs to `record`; `replay` ignores it instead of failing.
    config = load_config(ReplayConfig, {"log": "x"}, env={"QREC_FOLLOW": "1"}, config_file=file)
    assert config.log == "x"
    record = load_config(RecordConfig, {"topic": "t", "out": "-"}, env={}, config_file=file)
    assert record.follow is True


def test_values_are_typed_and_validated() -> None:
    config = load_config(ReplayConfig, {"log": "x"}, env={"QREC_PROGRESS": "no", "QREC_METRICS_PORT": "9100"})
    assert config.progress is False and config.metrics_port == 9100
    with pytest.raises(ConfigError, match="limit must be int"):
        load_config(ReplayConfig, {"log": "x", "limit": "many"}, env={})
    with pytest.raises(ConfigError, match="speed"):
        load_config(ReplayConfig, {"log": "x", "speed": "fast"}, env={})
    with pytest.raises(ConfigError, match="security_protocol"):
        load_config(BusConfig, {"security_protocol": "TLS"}, env={})
    with pytest.raises(ConfigError, match="missing required setting"):
        load_config(ReplayConfig, {}, env={})


def test_configs_are_frozen() -> None:
    config = load_config(BusConfig, {}, env={})
    with pytest.raises(AttributeError):
        config.bootstrap_servers = "elsewhere"  # type: ignore[misc]


def test_security_settings_pass_through_to_the_kafka_client() -> None:
    from services.config import kafka_settings

    config = load_config(
        BusConfig,
        {
            "bootstrap_servers": "broker:9093",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "qrec",
            "ssl_cafile": "/etc/ca.pem",
        },
        env={"QREC_SASL_PLAIN_PASSWORD": "secret"},
    )
    client = kafka_settings(config).client_configs()
    assert client["security_protocol"] == "SASL_SSL"
    assert client["sasl_mechanism"] == "SCRAM-SHA-512"
    assert client["sasl_plain_username"] == "qrec" and client["sasl_plain_password"] == "secret"
    assert client["ssl_cafile"] == "/etc/ca.pem"
    assert client["bootstrap_servers"] == ["broker:9093"]


def test_config_args_rebuild_the_config_in_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.actor.config import ActorConfig
    from services.learner.config import LearnerServiceConfig

    monkeypatch.setenv("QREC_EPSILON", "0.5")  # the child's environment cannot change what the parent chose
    originals = [
        LearnerServiceConfig(
            gamma=0.0, hidden_sizes="128,128", double_dqn=False, publish_every_seconds=1e9, metrics_port=9100
        ),
        ActorConfig(epsilon=0.1, catalogue_topic=None, sasl_plain_password="secret", policies="dqn=1"),
    ]
    for original in originals:
        args = config_args(original)
        assert "secret" not in args and "--sasl-plain-password" not in args
        parser = argparse.ArgumentParser()
        add_arguments(parser, type(original))
        rebuilt = config_from_args(type(original), parser.parse_args(args))
        assert rebuilt == dataclasses.replace(original, sasl_plain_password=None)
    assert config_args(originals[0])[config_args(originals[0]).index("--gamma") + 1] == "0.0"
    assert "--no-double-dqn" in config_args(originals[0])


def test_the_learners_item_updates_setting_is_checked_and_reaches_the_update() -> None:
    from rl.train import ITEM_UPDATES as RL_ITEM_UPDATES
    from services.learner.config import ITEM_UPDATES, LearnerServiceConfig
    from services.learner.trainer import learner_config_for

    assert ITEM_UPDATES == RL_ITEM_UPDATES  # the service's check names what the learner accepts
    config = load_config(LearnerServiceConfig, {"item_updates": "dense"}, env={})
    assert learner_config_for(config).item_updates == "dense"
    assert learner_config_for(load_config(LearnerServiceConfig, {}, env={})).item_updates == "auto"
    with pytest.raises(ConfigError, match="item_updates must be one of auto, dense, lazy"):
        load_config(LearnerServiceConfig, {"item_updates": "sparse"}, env={})
    with pytest.raises(ConfigError, match="sqn-weight 0"):
        load_config(LearnerServiceConfig, {"item_updates": "lazy", "sqn_weight": 1.0}, env={})


def test_the_learners_sampled_next_item_setting_is_checked_and_reaches_the_update() -> None:
    from services.learner.config import LearnerServiceConfig
    from services.learner.trainer import learner_config_for

    sampled = {"sqn_weight": 1.0, "next_item_negatives": 64}
    assert learner_config_for(load_config(LearnerServiceConfig, sampled, env={})).next_item_negatives == 64
    assert learner_config_for(load_config(LearnerServiceConfig, {}, env={})).next_item_negatives == 0
    # A sampled softmax reaches only the rows it draws, so the item table may update lazily.
    load_config(LearnerServiceConfig, {**sampled, "item_updates": "lazy"}, env={})
    with pytest.raises(ConfigError, match="set sqn_weight > 0"):
        load_config(LearnerServiceConfig, {"next_item_negatives": 64}, env={})
    load_config(LearnerServiceConfig, {**sampled, "repeat_head": True}, env={})
    with pytest.raises(ConfigError, match="next_item_negatives must be >= 0"):
        load_config(LearnerServiceConfig, {"sqn_weight": 1.0, "next_item_negatives": -1}, env={})

"""Process configuration: one frozen dataclass per process, filled from flags, env and a TOML file.

Precedence, highest first: command-line flags, ``QREC_<FIELD>`` environment variables, the TOML
file (``--config FILE`` or ``QREC_CONFIG``; top-level keys apply to every process, a table named
after the process to that process only), then the dataclass defaults. Unknown keys are rejected
with a message that names them, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

ENV_PREFIX = "QREC_"
# QREC_* variables that are not process settings (tooling, tests, the config file itself).
NON_SETTING_ENV = {"QREC_CONFIG", "QREC_KAFKA_LIBS", "QREC_KAFKA_HOME"}
NON_SETTING_ENV_PREFIXES = ("QREC_TEST_",)

_REGISTRY: dict[str, type] = {}


class ConfigError(ValueError):
    """A setting is unknown or has a value of the wrong kind; the message says which and how to fix it."""


def setting(default: Any = dataclasses.MISSING, *, help: str, positional: bool = False) -> Any:
    """A config field with its one-line help (shown by --help) and an optional positional flag."""
    metadata = {"help": help, "positional": positional}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple for sequence defaults (configs are frozen)")
    return dataclasses.field(default=default, metadata=metadata)


def register(section: str) -> typing.Callable[[type[C]], type[C]]:
    """Register a config class under its TOML table name, so other processes' keys are recognised."""

    def wrap(cls: type[C]) -> type[C]:
        _REGISTRY[section] = cls
        cls.section = section  # type: ignore[attr-defined]
        return cls

    return wrap


@dataclasses.dataclass(frozen=True, kw_only=True)
class BusConfig:
    """Settings every qrec process shares: where the bus is, how to reach it, where metrics go."""

    bootstrap_servers: str = setting(
        "embedded",
        help="Kafka bootstrap servers (host:port[,host:port]) or 'embedded' for the in-process bus",
    )
    kafka_client: str = setting(
        "kafka-python",
        help="Kafka client library: kafka-python, or confluent (librdkafka; pip install 'qrec[confluent]')",
    )
    client_id: str = setting("qrec", help="Kafka client.id, shown in broker logs and quotas")
    security_protocol: str = setting(
        "PLAINTEXT", help="Kafka security.protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: str | None = setting(
        None, help="SASL mechanism, e.g. PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"
    )
    sasl_plain_username: str | None = setting(None, help="SASL username")
    sasl_plain_password: str | None = setting(None, help="SASL password (prefer the QREC_ env variable)")
    ssl_cafile: str | None = setting(None, help="CA certificate file to verify the brokers")
    ssl_certfile: str | None = setting(None, help="client certificate file for mutual TLS")
    ssl_keyfile: str | None = setting(None, help="client private key file for mutual TLS")
    metrics_port: int | None = setting(
        None, help="serve Prometheus /metrics on this port (0 picks a free one; unset: no endpoint)"
    )
    metrics_host: str = setting("127.0.0.1", help="address the /metrics endpoint listens on")

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be between 0 and 65535, got {self.metrics_port}")
        if self.kafka_client not in ("kafka-python", "confluent"):
            raise ConfigError(f"kafka_client must be kafka-python or confluent, got {self.kafka_client!r}")
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in protocols:
            raise ConfigError(
                f"security_protocol must be one of {', '.join(protocols)}, got {self.security_protocol!r}"
            )


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of an annotation such as ``int | None``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _convert(name: str, raw: Any, annotation: Any, origin: str) -> Any:
    kind, nullable = _base_type(annotation)
    if raw is None or (nullable and isinstance(raw, str) and raw.lower() in ("", "none", "null")):
        if nullable:
            return None
        raise ConfigError(f"{origin}: {name} cannot be empty")
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return str(raw)
        if kind is Path:
            return Path(raw)
        if typing.get_origin(kind) is tuple:
            items = raw if isinstance(raw, list | tuple) else [s for s in str(raw).split(",") if s]
            return tuple(str(i) for i in items)
    except ValueError:
        raise ConfigError(
            f"{origin}: {name} must be {getattr(kind, '__name__', kind)}, got {raw!r}"
        ) from None
    return raw


def known_keys() -> set[str]:
    """Every setting name of every registered process config."""
    return {f.name for cls in _REGISTRY.values() for f in dataclasses.fields(cls)}


def load_config(
    cls: type[C],
    cli: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> C:
    """Build ``cls`` from CLI values (None = not given), ``QREC_*`` env and a TOML file."""
    env = os.environ if env is None else env
    section: str = getattr(cls, "section", "")
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}

    path = config_file or (Path(env["QREC_CONFIG"]) if env.get("QREC_CONFIG") else None)
    if path is not None:
        try:
            document = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        everything = known_keys() | set(fields)
        unknown = sorted(
            k
            for k, v in document.items()
            if k not in everything and not (isinstance(v, dict) and k in _REGISTRY)
        )
        if unknown:
            raise ConfigError(
                f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(everything))}"
            )
        for key, value in document.items():
            if key in fields and not isinstance(value, dict):
                values[key] = _convert(key, value, hints[key], str(path))
        table = document.get(section, {})
        unknown = sorted(k for k in table if k not in fields)
        if unknown:
            raise ConfigError(
                f"{path} [{section}]: unknown setting(s) {', '.join(unknown)}; "
                f"known for {section}: {', '.join(sorted(fields))}"
            )
        for key, value in table.items():
            values[key] = _convert(key, value, hints[key], f"{path} [{section}]")

    everything = known_keys() | set(fields)
    for var, raw in env.items():
        if (
            not var.startswith(ENV_PREFIX)
            or var in NON_SETTING_ENV
            or var.startswith(NON_SETTING_ENV_PREFIXES)
        ):
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key not in everything:
            raise ConfigError(
                f"environment variable {var} is not a qrec setting; unset it or fix its name "
                f"(settings of {section or cls.__name__}: {', '.join(sorted(fields))})"
            )
        if key in fields:
            values[key] = _convert(key, raw, hints[key], var)

    for key, value in (cli or {}).items():
        if value is None:
            continue
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r} for {section or cls.__name__}")
        values[key] = _convert(key, value, hints[key], f"--{key.replace('_', '-')}")

    missing = [n for n, f in fields.items() if n not in values and _required(f)]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per config field (positional where marked), with its help and default."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        kind, _ = _base_type(hints[f.name])
        env_name = ENV_PREFIX + f.name.upper()
        if f.metadata.get("positional"):
            parser.add_argument(f.name, metavar=f.name.upper(), help=help_text)
            continue
        if f.default is not dataclasses.MISSING and f.default is not None:
            help_text += f" (default: {f.default}; env {env_name})"
        else:
            help_text += f" (env {env_name})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(
                flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config for a parsed command line (with ``--config`` honoured)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    cli = {k: v for k, v in vars(args).items() if k in names}
    return load_config(cls, cli, config_file=getattr(args, "config", None))


def config_args(config: Any, *, leave_out: tuple[str, ...] = ("sasl_plain_password",)) -> list[str]:
    """Flags that rebuild ``config`` in another process (``qrec <service> <flags>``).

    Every setting is passed, defaults included, so QREC_* variables in the child's environment cannot
    change what the parent chose. Secrets (``leave_out``) never go on a command line, where ``ps``
    shows them: pass them through the environment.
    """
    hints = _field_types(type(config))
    args: list[str] = []
    for f in dataclasses.fields(config):
        if f.name in leave_out:
            continue
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        kind, nullable = _base_type(hints[f.name])
        if f.metadata.get("positional"):
            raise ValueError(f"{f.name} is positional: config_args passes flags only")
        if value is None:
            if not nullable:
                raise ValueError(f"{f.name} is None but cannot be empty")
            args += [flag, "none"]
        elif kind is bool:
            args.append(flag if value else "--no-" + flag[2:])
        elif kind is float:
            args += [flag, repr(float(value))]
        elif typing.get_origin(kind) is tuple:
            args += [flag, ",".join(value)]
        else:
            args += [flag, str(value)]
    return args


def kafka_settings(config: BusConfig, **overrides: Any) -> Any:
    """The KafkaSettings for a config (imported lazily: only the bus module imports the client)."""
    from services.bus.kafka import KafkaSettings

    return KafkaSettings(
        bootstrap_servers=config.bootstrap_servers,
        client_id=config.client_id,
        security_protocol=config.security_protocol,
        sasl_mechanism=config.sasl_mechanism,
        sasl_plain_username=config.sasl_plain_username,
        sasl_plain_password=config.sasl_plain_password,
        ssl_cafile=config.ssl_cafile,
        ssl_certfile=config.ssl_certfile,
        ssl_keyfile=config.ssl_keyfile,
        **overrides,
    )


def make_bus(config: BusConfig, **overrides: Any) -> Any:
    """The bus a config points at: the in-process bus for 'embedded', else Kafka."""
    if config.bootstrap_servers == "embedded":
        from services.bus.embedded import EmbeddedBus

        return EmbeddedBus()
    if config.kafka_client == "confluent":
        try:
            from services.bus.confluent import ConfluentBus
        except ImportError as exc:
            raise ConfigError(str(exc)) from None
        return ConfluentBus(kafka_settings(config, **overrides))
    from services.bus.kafka import KafkaBus

    return KafkaBus(kafka_settings(config, **overrides))

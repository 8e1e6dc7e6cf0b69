"""Building frozen config dataclasses from plain dicts, rejecting keys the dataclass does not know."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], values: Mapping[str, Any]) -> ConfigT:
    """Instantiate the dataclass `cls` from `values`; an unknown key raises ValueError naming it.

    A misspelt hyperparameter that silently falls back to its default is the classic way to run the
    wrong experiment, hence the strictness.
    """
    assert dataclasses.is_dataclass(cls), cls
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s): {', '.join(map(repr, unknown))}; known keys: {sorted(known)}"
        )
    converted = dict(values)
    for field in dataclasses.fields(cls):
        # JSON has no tuples: accept lists for tuple-typed fields so to_dict/from_dict round-trips.
        if field.name in converted and isinstance(converted[field.name], list):
            converted[field.name] = tuple(converted[field.name])
    return cls(**converted)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config's fields as a JSON-friendly dict (tuples become lists)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out

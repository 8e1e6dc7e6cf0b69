"""The actor's pure logic: who gets which policy, what counts as popular, what may be shown.

No I/O and no wall clock: the service passes time and randomness keys in.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.config import ConfigError

POLICIES = ("dqn", "popularity", "random", "bandit", "tabular_q", "oracle")
"""dqn: the DQN; bandit: the same network trained with discount 0 (myopic); tabular_q: a Q-table over
categories; oracle: the simulator's true preferences (only where a simulator is attached, the demo)."""
COLD_START = "popularity-coldstart"  # a model-backed group's policy until its first model arrives


@dataclass(frozen=True)
class PolicySplit:
    """Shares of traffic per policy, assigned by a stable hash of the user id."""

    names: tuple[str, ...]
    cumulative: tuple[float, ...]
    salt: str

    def policy_for(self, user_id: str) -> str:
        """The user's policy: the same for the same user, salt and shares, in every process."""
        point = zlib.crc32(f"{self.salt}:{user_id}".encode()) / 2**32
        for name, upper in zip(self.names, self.cumulative, strict=True):
            if point < upper:
                return name
        return self.names[-1]


def parse_split(text: str, salt: str) -> PolicySplit:
    """'dqn=0.8,popularity=0.1,random=0.1' -> a PolicySplit; shares must be >= 0 and sum to 1."""
    names: list[str] = []
    shares: list[float] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in POLICIES:
            raise ConfigError(
                f"policy split entry {part!r}: use name=share with a name from {', '.join(POLICIES)}"
            )
        try:
            share = float(value)
        except ValueError:
            raise ConfigError(f"policy split entry {part!r}: {value!r} is not a number") from None
        if share < 0 or name in names:
            raise ConfigError(f"policy split entry {part!r}: shares must be >= 0 and each policy named once")
        names.append(name)
        shares.append(share)
    total = sum(shares)
    if not names or not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(f"policy shares must sum to 1, got {total} from {text!r}")
    cumulative = tuple(float(c) for c in np.cumsum(shares))
    return PolicySplit(tuple(names), (*cumulative[:-1], 1.0), salt)


class Popularity:
    """Exponentially decayed item counts over the events the actor sees (a recent window).

    Instead of decaying every count at each event, each new event adds a growing weight; weights are
    rescaled now and then so they stay finite. The ranking is the same as with explicit decay.
    """

    def __init__(self, half_life_events: float, capacity: int = 50_000) -> None:
        self.growth = 2.0 ** (1.0 / half_life_events)
        self.weight = 1.0
        self.counts: dict[str, float] = {}
        self.capacity = capacity

    def observe(self, item_ids: Iterable[str]) -> None:
        for item in item_ids:
            self.weight *= self.growth
            self.counts[item] = self.counts.get(item, 0.0) + self.weight
        if self.weight > 1e100:
            self.counts = {k: v / self.weight for k, v in self.counts.items()}
            self.weight = 1.0
        if len(self.counts) > 2 * self.capacity:
            keep = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.capacity]
            self.counts = dict(keep)

    def top(self, n: int) -> tuple[list[str], np.ndarray]:
        """The n most popular items, ties broken by id (deterministic), and their log-scores."""
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        ids = [item for item, _ in ranked]
        scores = np.log(np.asarray([count for _, count in ranked], np.float64) / self.weight + 1e-12)
        return ids, scores.astype(np.float32)


def allowed_mask(
    candidate_index: dict[str, int], size: int, base: np.ndarray | None, blocked: Sequence[str]
) -> np.ndarray:
    """A (size,) bool mask: ``base`` (or all True) minus the blocked items that are candidates."""
    mask = np.ones((size,), bool) if base is None else base.copy()  # (A,)
    for item in blocked:
        index = candidate_index.get(item)
        if index is not None:
            mask[index] = False
    return mask


def event_key(seed: int, source_event_id: str) -> int:
    """A 32-bit exploration seed per triggering event: re-processing an event gives the same slate."""
    return zlib.crc32(f"{seed}:{source_event_id}".encode())

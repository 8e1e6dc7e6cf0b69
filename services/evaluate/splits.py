"""Logs to evaluation data: logged interactions with their states, 8:1:1 splits, and ranking targets.

A log goes through the state-builder's own logic (`services.learner.offline.logged_transitions`), so
every interaction's state is exactly what the streaming services would have built before it. The
evaluation then only decides which interactions train the models and which are targets.
"""

from __future__ import annotations

import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from schemas.messages import ClickEvent, Transition
from services.learner.offline import logged_transitions
from services.replay.formats import read_log
from services.state_builder.step import StepParams

CLICK_TYPES = frozenset({"view", "click"})
PURCHASE_TYPES = frozenset({"purchase"})
TARGET_KINDS_SQN = ("click", "purchase")
TARGET_KINDS_SESSION = ("next_item",)


@dataclass(frozen=True)
class Interaction:
    """One logged interaction: the user's state before it (in the transition) and what it was."""

    transition: Transition
    user_id: str
    session_key: str
    """user id and session id together: unique across users."""
    position_in_session: int
    """0 for the session's first interaction."""
    timestamp: int
    item_id: str
    event_type: str


@dataclass
class EvalLog:
    """The interactions of one log in time order, with what the baselines need beside them."""

    interactions: list[Interaction]
    categories: dict[str, str]
    """Item id -> the category the log gives it (items without one are absent)."""
    rejected_rows: int = 0


@dataclass(frozen=True)
class Split:
    """Train, validation and test interactions (each in time order)."""

    train: list[Interaction]
    validation: list[Interaction]
    test: list[Interaction]


@dataclass(frozen=True)
class Target:
    """One ranking target: the state the model sees and the item that came next."""

    item: int
    """Catalogue index of the true next item."""
    kind: str
    """'click' or 'purchase' (SQN protocol), 'next_item' (session protocol)."""
    recent: tuple[int, ...]
    """Catalogue indices of the state's window, oldest first."""
    transition: Transition
    """The logged transition; its obs_tm1 is the state (cut to the session for the session protocol)."""


@dataclass
class Catalogue:
    """Every item the evaluation ranks over, with a dense index per item."""

    item_ids: list[str]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {item: i for i, item in enumerate(self.item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def of(cls, logs: Iterable[EvalLog]) -> Catalogue:
        items: set[str] = set()
        for log in logs:
            items.update(interaction.item_id for interaction in log.interactions)
        return cls(sorted(items))


def load_log(path: Path, fmt: str = "auto", *, window: int = 10, limit: int | None = None) -> EvalLog:
    """Read a log (any `qrec replay` format) into time-ordered interactions with their states."""
    path = Path(path)
    events: dict[str, ClickEvent] = {}
    kept: list[ClickEvent] = []
    rejected = 0
    for row in read_log(path, fmt):
        if row.error is not None:
            rejected += 1
            continue
        for event in row.events:
            if limit is not None and len(kept) >= limit:
                break
            kept.append(event)
    if not kept:
        raise ValueError(f"{path} has no readable events")
    for event in kept:
        events.setdefault(event.event_id, event)
    params = StepParams(window=window, recommendation_transitions=False)
    if limit is None:
        transitions = logged_transitions(path, fmt, params)
    else:
        # The state logic reads files; the first `limit` events go through it as qrec JSONL.
        with tempfile.TemporaryDirectory() as folder:
            head = Path(folder) / f"{path.name}.head.jsonl"
            head.write_bytes(b"".join(msgspec.json.encode(event) + b"\n" for event in kept))
            transitions = logged_transitions(head, "jsonl", params)
    categories: dict[str, str] = {}
    for event in kept:
        if event.item_id is not None and event.category is not None:
            categories.setdefault(event.item_id, event.category)
    interactions = _interactions(transitions, events)
    if not interactions:
        raise ValueError(f"{path} gave no interactions with items to evaluate on")
    return EvalLog(interactions, categories, rejected)


def _interactions(transitions: Sequence[Transition], events: dict[str, ClickEvent]) -> list[Interaction]:
    out = []
    positions: Counter[str] = Counter()
    # Time order, then the state-builder's emission order, which follows each user's event order.
    ordered = sorted(enumerate(transitions), key=lambda pair: (pair[1].timestamp, pair[0]))
    for _, transition in ordered:
        event = events.get(transition.transition_id.removeprefix("logged:"))
        if event is None or event.item_id is None:
            continue
        session_key = f"{event.user_id}\x1f{event.session_id}"
        out.append(
            Interaction(
                transition=transition,
                user_id=event.user_id,
                session_key=session_key,
                position_in_session=positions[session_key],
                timestamp=event.timestamp,
                item_id=event.item_id,
                event_type=event.event_type,
            )
        )
        positions[session_key] += 1
    return out


def split_keys(keys: Iterable[str], seed: int) -> tuple[set[str], set[str], set[str]]:
    """Distinct keys shuffled by `seed` and cut 8:1:1 into (train, validation, test).

    Validation and test get round(n / 10) keys each (so 8:1:1 within one key of rounding) and
    train the rest; the result depends only on the set of keys and the seed.
    """
    ordered = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(ordered))
    tenth = round(len(ordered) / 10)
    shuffled = [ordered[i] for i in order]
    test = set(shuffled[:tenth])
    validation = set(shuffled[tenth : 2 * tenth])
    train = set(shuffled[2 * tenth :])
    return train, validation, test


def split_log(log: EvalLog, how: str, seed: int) -> Split:
    """Split 8:1:1 by users, by sessions (seeded shuffles) or by time (oldest 80% trains)."""
    interactions = log.interactions
    if how == "time":
        count = len(interactions)
        train_end, validation_end = round(count * 0.8), round(count * 0.9)
        return Split(
            interactions[:train_end], interactions[train_end:validation_end], interactions[validation_end:]
        )
    if how not in ("users", "sessions"):
        raise ValueError(f"unknown split {how!r}; expected users, sessions or time")

    def key(interaction: Interaction) -> str:
        return interaction.user_id if how == "users" else interaction.session_key

    train, validation, test = split_keys((key(i) for i in interactions), seed)
    return Split(
        [i for i in interactions if key(i) in train],
        [i for i in interactions if key(i) in validation],
        [i for i in interactions if key(i) in test],
    )


def holdout_validation(train: list[Interaction], seed: int) -> Split:
    """For a given train/test pair: a tenth of the training users (seeded) validates."""
    keep, validation, extra = split_keys((i.user_id for i in train), seed)
    keep |= extra
    return Split([i for i in train if i.user_id in keep], [i for i in train if i.user_id in validation], [])


def target_kind(event_type: str, protocol: str) -> str | None:
    """What an interaction is a target of: click / purchase (SQN protocol), next_item (session)."""
    if protocol == "session":
        return "next_item"
    if event_type in CLICK_TYPES:
        return "click"
    if event_type in PURCHASE_TYPES:
        return "purchase"
    return None  # carts and favourites shape the state but are not ranked


def targets_for(interactions: Sequence[Interaction], catalogue: Catalogue, protocol: str) -> list[Target]:
    """Ranking targets of the evaluated interactions under a protocol.

    SQN protocol: every click (view) and purchase, with the state built from all of the user's
    earlier events (its last `window` interactions). Session protocol: every interaction but a
    session's first, with the window cut to the session's own earlier interactions, as
    session-based recommenders see only the current session.
    """
    out = []
    for interaction in interactions:
        kind = target_kind(interaction.event_type, protocol)
        if kind is None:
            continue
        transition = interaction.transition
        if protocol == "session":
            if interaction.position_in_session == 0:
                continue
            transition = _cut_window(transition, interaction.position_in_session)
        recent_ids = transition.obs_tm1.recent_items
        out.append(
            Target(
                item=catalogue.index[interaction.item_id],
                kind=kind,
                recent=tuple(catalogue.index[item] for item in recent_ids if item in catalogue.index),
                transition=transition,
            )
        )
    return out


def _cut_window(transition: Transition, keep: int) -> Transition:
    obs = transition.obs_tm1
    size = min(keep, len(obs.recent_items))
    cut = msgspec.structs.replace(
        obs,
        recent_items=obs.recent_items[len(obs.recent_items) - size :],
        recent_event_types=obs.recent_event_types[len(obs.recent_event_types) - size :],
        recent_gaps_seconds=obs.recent_gaps_seconds[len(obs.recent_gaps_seconds) - size :],
    )
    return msgspec.structs.replace(transition, obs_tm1=cut)


def sample_targets(targets: Sequence[Target], limit: int, seed: int) -> list[Target]:
    """At most `limit` targets, a seeded sample in the original order (for validation checks)."""
    if len(targets) <= limit:
        return list(targets)
    chosen = np.sort(np.random.default_rng(seed).choice(len(targets), size=limit, replace=False))
    return [targets[i] for i in chosen]


def stable_bucket(value: str, buckets: int) -> int:
    """crc32 bucket of a string (stable across processes, unlike Python's salted hash)."""
    return zlib.crc32(value.encode("utf-8")) % buckets

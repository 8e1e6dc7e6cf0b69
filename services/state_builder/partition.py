"""One partition's worth of users, driven by event time: still pure (no I/O, no wall clock).

The service owns one ``PartitionState`` per assigned partition and feeds it records in offset order;
a test can feed the same records in one process and must get the same outputs.

Timers (attribution windows, session ends, TTL) fire in two ways. ``apply_event`` fires a user's
own timers at the event's time before applying it. Users who stay away are swept at the partition's
watermark (the largest event time seen) minus ``allowed_lateness_ms``. A timer's outcome does not
depend on when after its deadline it fires, so both ways agree, and batch boundaries, restarts and
rebalances do not change what is emitted, as long as no event arrives more than the allowed
lateness behind the watermark. A stream sorted by user rather than time breaks that contract: replay
such logs with ``qrec replay --order time``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.messages import ClickEvent, Recommendation, Transition, UserState
from services.state_builder.step import (
    Outputs,
    StepParams,
    UserRecord,
    advance_time,
    apply_event,
    apply_recommendation,
    next_deadline_ms,
)


@dataclass
class Emitted:
    """What the service must publish after feeding inputs: states, transitions, tombstones."""

    states: list[tuple[UserState, UserRecord]] = field(default_factory=list)
    records_only: list[tuple[str, UserRecord]] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    tombstones: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    attribution: dict[tuple[str, str], int] = field(default_factory=dict)  # (policy, outcome) -> slots
    reward_by_policy: dict[str, float] = field(default_factory=dict)
    events_by_type: dict[str, int] = field(default_factory=dict)
    state_record_times: dict[str, int] = field(default_factory=dict)  # source event id -> Kafka record time

    def _absorb(self, outputs: Outputs) -> None:
        self.transitions.extend(outputs.transitions)
        self.outcomes[outputs.outcome] = self.outcomes.get(outputs.outcome, 0) + 1
        # Attribution outcomes come one per recommendation transition, in transition order.
        closed = [t for t in outputs.transitions if t.source == "recommendation"]
        for transition, outcome in zip(closed, outputs.attribution, strict=True):
            policy = transition.policy or "unknown"
            key = (policy, outcome)
            self.attribution[key] = self.attribution.get(key, 0) + 1
            self.reward_by_policy[policy] = self.reward_by_policy.get(policy, 0.0) + transition.r_t


class PartitionState:
    """The users of one partition, their records, and the partition's event-time watermark."""

    def __init__(self, partition: int, params: StepParams, allowed_lateness_ms: int = 0) -> None:
        self.partition = partition
        self.params = params
        self.allowed_lateness_ms = allowed_lateness_ms
        self.records: dict[str, UserRecord] = {}
        self.watermark_ms = 0

    def restore(self, user_id: str, record: UserRecord | None) -> None:
        """Load a user's record from the changelog (None: the user was deleted)."""
        if record is None:
            self.records.pop(user_id, None)
            return
        self.records[user_id] = record
        self.watermark_ms = max(self.watermark_ms, record.state.timestamp)

    def _advance_user(self, user_id: str, now_ms: int, emitted: Emitted) -> None:
        record = self.records.get(user_id)
        if record is None:
            return
        updated, outputs = advance_time(record, now_ms, self.params)
        if outputs.transitions or outputs.attribution:
            emitted._absorb(outputs)
        if updated is None:
            del self.records[user_id]
            emitted.tombstones.append(user_id)
        else:
            self.records[user_id] = updated

    def event(self, event: ClickEvent, offset: int | None, emitted: Emitted) -> None:
        """Apply one click event (``apply_event`` fires the user's due timers first)."""
        self.watermark_ms = max(self.watermark_ms, event.timestamp)
        record, outputs = apply_event(self.records.get(event.user_id), event, self.params, offset=offset)
        self.records[event.user_id] = record
        emitted._absorb(outputs)
        if outputs.user_state is not None:
            emitted.states.append((outputs.user_state, record))
            emitted.events_by_type[event.event_type] = emitted.events_by_type.get(event.event_type, 0) + 1

    def recommendation(self, rec: Recommendation, offset: int | None, emitted: Emitted) -> None:
        """Register a shown slate for the attribution join."""
        self.watermark_ms = max(self.watermark_ms, rec.event_timestamp)
        record, outputs = apply_recommendation(self.records.get(rec.user_id), rec, self.params, offset=offset)
        emitted._absorb(outputs)
        if record is not None:
            changed = record is not self.records.get(rec.user_id)
            self.records[rec.user_id] = record
            if changed and outputs.outcome == "applied":
                emitted.records_only.append((rec.user_id, record))

    def forget(self, user_id: str, emitted: Emitted) -> None:
        """Delete everything kept about a user (state and pending recommendations)."""
        self.records.pop(user_id, None)
        emitted.tombstones.append(user_id)

    def sweep(self, emitted: Emitted) -> None:
        """Fire every user's timers due by the watermark less the allowed lateness."""
        now_ms = self.watermark_ms - self.allowed_lateness_ms
        for user_id, record in list(self.records.items()):
            if next_deadline_ms(record, self.params) <= now_ms:
                self._advance_user(user_id, now_ms, emitted)

"""Settings of `qrec state-builder`."""

from __future__ import annotations

from dataclasses import dataclass

from services.config import BusConfig, ConfigError, register, setting
from services.topics import CLICKSTREAM, DEAD_LETTER, RECOMMENDATIONS, TRANSITIONS, USER_STATE


def parse_weights(text: str) -> dict[str, float]:
    """'click=1,purchase=10' -> {'click': 1.0, 'purchase': 10.0}."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"reward weight {part!r} must look like event_type=number, e.g. purchase=10")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"reward weight {part!r}: {value!r} is not a number") from None
    return weights


@register("state_builder")
@dataclass(frozen=True, kw_only=True)
class StateBuilderConfig(BusConfig):
    """Builds per-user state and RL transitions from the clickstream and the recommendations."""

    group_id: str = setting("qrec-state-builder", help="consumer group shared by all state-builder processes")
    clickstream_topic: str = setting(CLICKSTREAM, help="topic of ClickEvents")
    recommendations_topic: str = setting(RECOMMENDATIONS, help="topic of Recommendations (co-partitioned)")
    user_state_topic: str = setting(USER_STATE, help="compacted topic UserState is published to")
    transitions_topic: str = setting(TRANSITIONS, help="topic transitions are published to")
    dead_letter_topic: str = setting(DEAD_LETTER, help="topic for input that cannot be used, with the reason")
    window: int = setting(20, help="number of recent interactions kept in the state")
    session_gap_seconds: float = setting(1800.0, help="inactivity that ends a session")
    attribution_window_seconds: float = setting(
        1800.0, help="how long after a recommendation the user's feedback counts as its reward"
    )
    allowed_lateness_seconds: float = setting(
        300.0,
        help="how far behind the newest event time an event may arrive and still be on time for timers",
    )
    ttl_days: float = setting(30.0, help="forget a user after this many days of event time without events")
    reward_weights: str = setting(
        "click=1,add_to_cart=3,favorite=2,purchase=10", help="reward per feedback type on a recommended item"
    )
    logged_transitions: bool = setting(
        True, help="emit a transition per logged interaction (learning from logs without recommendations)"
    )
    recommendation_transitions: bool = setting(
        True, help="emit transitions from recommendations joined with the feedback that follows them"
    )
    pseudonymize: bool = setting(False, help="replace user ids by a salted hash as events come in")
    pseudonymize_salt: str | None = setting(
        None, help="secret salt for --pseudonymize (required with it; keep it stable across restarts)"
    )
    max_batch: int = setting(1000, help="records processed per poll (and per flush + commit)")
    session_timeout_ms: int = setting(
        10000, help="Kafka consumer session timeout: how fast a dead peer is noticed"
    )
    create_topics: bool = setting(True, help="create the qrec topics first when they are missing")
    partitions: int = setting(6, help="partitions per topic when topics are created")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ConfigError(f"window must be at least 1, got {self.window}")
        if self.pseudonymize and not self.pseudonymize_salt:
            raise ConfigError("--pseudonymize needs --pseudonymize-salt (or QREC_PSEUDONYMIZE_SALT)")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")
        parse_weights(self.reward_weights)

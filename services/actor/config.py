"""Settings of `qrec actor`."""

from __future__ import annotations

from dataclasses import dataclass

from services.actor.step import parse_split
from services.config import BusConfig, ConfigError, register, setting
from services.learner.tabular import TABULAR_MODEL
from services.topics import DEAD_LETTER, MODEL, RECOMMENDATIONS, USER_STATE

BANDIT_MODEL = "qrec.model.bandit.v1"


@register("actor")
@dataclass(frozen=True, kw_only=True)
class ActorConfig(BusConfig):
    """Publishes a recommendation for every recommendation opportunity, from the latest model."""

    group_id: str = setting("qrec-actor", help="consumer group shared by all actor processes")
    user_state_topic: str = setting(USER_STATE, help="topic of UserState updates")
    model_topic: str = setting(MODEL, help="topic the learner publishes models to")
    bandit_model_topic: str = setting(
        BANDIT_MODEL, help="topic of the myopic bandit's models (a learner run with --gamma 0)"
    )
    tabular_model_topic: str = setting(TABULAR_MODEL, help="topic of the tabular Q baseline's tables")
    recommendations_topic: str = setting(RECOMMENDATIONS, help="topic recommendations are published to")
    dead_letter_topic: str = setting(DEAD_LETTER, help="topic for input that cannot be used")
    catalogue_topic: str | None = setting(
        None,
        help="compacted topic of CatalogueItem records (key item_id), e.g. qrec.catalogue.v1: items "
        "marked unavailable or deleted are never recommended (unset: no catalogue)",
    )
    slate_size: int = setting(10, help="items per recommendation (k)")
    exploration: str = setting("epsilon", help="exploration per slate position: epsilon (greedy) or softmax")
    epsilon: float = setting(0.1, help="probability of a uniformly random item at each position")
    temperature: float = setting(1.0, help="softmax temperature with --exploration softmax")
    epsilon_end: float | None = setting(
        None,
        help="epsilon of model-backed policies once their model has trained --exploration-decay-steps "
        "updates, reached linearly from --epsilon (unset: --epsilon throughout)",
    )
    temperature_end: float | None = setting(
        None,
        help="softmax temperature once the model has trained --exploration-decay-steps updates, reached "
        "geometrically from --temperature (unset: --temperature throughout)",
    )
    exploration_decay_steps: int = setting(
        10000,
        help="learner updates (the served model's training step, so every actor replica and a restarted "
        "actor agree) over which exploration decays to --epsilon-end or --temperature-end",
    )
    policies: str = setting(
        "dqn=0.8,popularity=0.1,random=0.1",
        help="A/B split by stable user hash: policy=share,... (policies: dqn, popularity, random, "
        "bandit, tabular_q; oracle only in qrec demo)",
    )
    split_salt: str = setting("qrec-ab-1", help="salt of the user hash: change it to reshuffle the groups")
    opportunity_types: str = setting("view,rec_request", help="event types that ask for a recommendation")
    mask_purchased: bool = setting(True, help="never recommend items the user already purchased")
    mask_shown: bool = setting(True, help="do not repeat the items of the user's previous slate")
    popularity_half_life_events: float = setting(
        20000.0, help="popularity counts halve every this many observed events (a recent window)"
    )
    popularity_candidates: int = setting(
        500, help="most popular items the popularity and random policies draw from"
    )
    seed: int = setting(0, help="exploration seed; with the same inputs the same slates come out")
    max_batch: int = setting(500, help="user states scored per batch")
    background_compile: bool = setting(
        True,
        help="compile a new model's scorer in a background thread while the current model keeps "
        "serving (off: compile between batches, and serving pauses for it)",
    )
    session_timeout_ms: int = setting(10000, help="Kafka consumer session timeout")
    create_topics: bool = setting(True, help="create the qrec topics first when they are missing")
    partitions: int = setting(6, help="partitions per topic when topics are created")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_split(self.policies, self.split_salt)
        if self.exploration not in ("epsilon", "softmax"):
            raise ConfigError(f"exploration must be epsilon or softmax, got {self.exploration!r}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ConfigError(f"epsilon must be between 0 and 1, got {self.epsilon}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.epsilon_end is not None and not 0.0 <= self.epsilon_end <= 1.0:
            raise ConfigError(f"epsilon_end must be between 0 and 1, got {self.epsilon_end}")
        if self.temperature_end is not None and self.temperature_end <= 0:
            raise ConfigError(f"temperature_end must be > 0, got {self.temperature_end}")
        if self.exploration_decay_steps < 1:
            raise ConfigError(
                f"exploration_decay_steps must be at least 1, got {self.exploration_decay_steps}"
            )
        if self.slate_size < 1:
            raise ConfigError(f"slate_size must be at least 1, got {self.slate_size}")

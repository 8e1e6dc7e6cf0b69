"""Settings of `qrec learner` and `qrec train`."""

from __future__ import annotations

from dataclasses import dataclass

from services.config import BusConfig, ConfigError, register, setting
from services.topics import DEAD_LETTER, MODEL, TRANSITIONS

# What one action of the model is: an item, or the category or brand of the item acted on.
ACTION_GRANULARITIES = ("item", "category", "brand")

# Where a transition comes from (Transition.source): feedback on a shown slate, or logged behaviour.
TRANSITION_SOURCES = ("recommendation", "logged")


SHOWN_SLOTS = ("all", "clicked")
TD_BOOTSTRAPS = ("max", "expected")  # rl.train.BOOTSTRAPS, without importing JAX here
ITEM_UPDATES = ("auto", "dense", "lazy")  # rl.train.ITEM_UPDATES


def parse_sources(text: str) -> frozenset[str]:
    """'recommendation, logged' -> the set of transition sources; a ConfigError names the setting."""
    sources = frozenset(part.strip() for part in text.split(",") if part.strip())
    if not sources or sources - set(TRANSITION_SOURCES):
        raise ConfigError(
            f"sources must be a comma-separated subset of {', '.join(TRANSITION_SOURCES)}, got {text!r}"
        )
    return sources


def parse_hidden_sizes(text: str) -> tuple[int, ...]:
    """'256,256' -> (256, 256); a ConfigError names the setting when the text is not that."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"hidden_sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"hidden_sizes must be positive integers, got {text!r}")
    return sizes


def blends_into_the_repeat_head(repeat_head: bool, q_weight: float, next_item_weight: float) -> bool:
    """Whether serve weights ask for a blend the repeat head cannot give: it adds to an item's Q but
    replaces its next-item logit, so a model serves Q alone or the next-item head alone (weight 1)."""
    return repeat_head and next_item_weight != 0.0 and (q_weight != 0.0 or next_item_weight != 1.0)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """Model and training hyperparameters shared by the streaming learner and offline training."""

    window: int = setting(20, help="recent interactions the model reads (the state-builder's --window)")
    vocabulary_capacity: int = setting(
        20000, help="most items (actions) the model scores; least recent evicted"
    )
    vocabulary_min_count: int = setting(1, help="times an item must be seen before it gets its own action")
    embed_dim: int = setting(64, help="width of item embeddings and of the state vector")
    hidden_sizes: str = setting("256,256", help="hidden layer widths of the state MLP")
    dueling: bool = setting(False, help="dueling Q-network head")
    repeat_head: bool = setting(
        False,
        help="score the items of the recent window with a learned repeat score too (a copy "
        "mechanism: shoppers return to what they just viewed, even to items the model barely knows)",
    )
    q_item_table: bool = setting(
        False,
        help="score Q against an item table of its own instead of the one shared with the window and "
        "the next-item head (for Q learned from few transitions, e.g. clicked slots, beside a next-item "
        "head that shapes the shared table)",
    )
    factored_q: bool = setting(
        False,
        help="factor Q by what follows the action: Q(s, a) = R(s, a) + c(s, a) G(s, a), with R the "
        "immediate reward, c the chance the session goes on after it (fitted to the transitions' done "
        "flags) and G the value of going on, each a state term plus one number per item and each fitted "
        "to its own signal; a cost an item carries in what follows it (a click that ends the session) is "
        "then learned per item without the noise of the session's end; for ranking beside the next-item "
        "head (--serve-log-q-weight), which carries the personal part (not with --dueling or "
        "--q-item-table)",
    )
    gamma: float = setting(0.9, help="discount factor")
    learning_rate: float = setting(1e-3, help="Adam step size")
    reward_clip: float = setting(
        0.0,
        help="clip each transition's reward to [-C, C] before it is learned from, as DQN clipped Atari "
        "scores: with C = 1 and click 1 the smallest reward, Q counts clicks, so its values are not a "
        "noisy mean of rare large purchases (0: off)",
    )
    max_grad_norm: float = setting(10.0, help="gradient clipping by global norm")
    double_dqn: bool = setting(True, help="Double DQN targets")
    td_bootstrap: str = setting(
        "max",
        help="how the next state is valued in the TD target: max (Q-learning at its best action) or "
        "expected (the mean of Q under the next-item head's distribution: the shoppers' own choices; "
        "needs --sqn-weight > 0)",
    )
    target_update: str = setting("periodic", help="target network sync: periodic (hard copy) or polyak")
    target_update_period: int = setting(500, help="updates between hard target copies")
    polyak_tau: float = setting(0.005, help="blend weight per update with --target-update polyak")
    sqn_weight: float = setting(0.0, help="weight of the SQN next-item loss (0 disables the head)")
    next_item_negatives: int = setting(
        0,
        help="with --sqn-weight: learn the next-item head by a sampled softmax over each state's own next "
        "item and this many items drawn uniformly per update, instead of a softmax over the whole "
        "catalogue; for large catalogues (about 10x the updates per second at 100,000 items with 1024, "
        "and the item table then updates lazily); with --repeat-head the window's items are scored "
        "exactly and only the rest are drawn (0: full softmax)",
    )
    item_updates: str = setting(
        "auto",
        help="how Adam moves the item table: dense (every row, every update), lazy (only the rows a batch "
        "reaches: its taken actions, window items and sampled next items; the rest keep their values and "
        "moments, as LazyAdam; needs no --dueling, and --sqn-weight 0 or --next-item-negatives) or auto "
        "(lazy above 10,000 actions where allowed: the dense step over a large table is memory-bound, a "
        "quarter to a third of an update)",
    )
    split_losses: bool = setting(
        False,
        help="learn the next-item head only from logged transitions (the user's own choices) and Q only "
        "from shown slots (what showing an item earned); off: both losses on every transition",
    )
    serve_q_weight: float = setting(
        1.0, help="weight of Q(s, a) in the score the published model ranks items by"
    )
    serve_next_item_weight: float = setting(
        0.0,
        help="weight of the next-item (SQN) head's logit in the published score; like SQN, rank by the "
        "supervised head (with --serve-q-weight 0) or by a blend (needs --sqn-weight > 0; with "
        "--repeat-head only the head alone, weight 1, since its repeat scores cannot be blended)",
    )
    serve_log_q_weight: float = setting(
        0.0,
        help="weight of log Q(s, a) added to the next-item logit (times --serve-next-item-weight) in the "
        "published score, instead of the linear blend: with Q learned from clicked slots (--shown-slots "
        "clicked), the value of an item given it is chosen, weights 1 and 1 rank by chance times value "
        "(SlateQ), so Q's scale and noise weigh little; works with --repeat-head (0: off)",
    )
    serve_q_floor: float = setting(
        0.01, help="with --serve-log-q-weight: Q below this counts as this (log of nothing or less)"
    )
    batch_size: int = setting(256, help="transitions per update")
    updates_per_call: int = setting(8, help="updates fused into one compiled call (lax.scan)")
    replay_capacity: int = setting(200000, help="transitions kept in the replay buffer")
    prioritized: bool = setting(False, help="prioritized replay instead of uniform")
    seed: int = setting(0, help="random seed")
    action_granularity: str = setting(
        "item",
        help="what an action is: item (the model scores items), category or brand (it scores the "
        "categories or brands of the items acted on; transitions without one are skipped)",
    )
    item_groups_capacity: int = setting(
        100000,
        help="with category/brand actions: items whose category/brand is remembered, to read the "
        "user's recent items as categories/brands (least recent forgotten)",
    )

    def hidden(self) -> tuple[int, ...]:
        return parse_hidden_sizes(self.hidden_sizes)

    def check(self) -> None:
        self.hidden()
        if self.serve_next_item_weight != 0.0 and self.sqn_weight <= 0:
            raise ConfigError("serve_next_item_weight needs the next-item head: set sqn_weight > 0")
        if self.q_item_table and self.serve_next_item_weight != 0.0 and self.serve_q_weight != 0.0:
            raise ConfigError(
                "with --q-item-table Q and the next-item head score different item tables, so they cannot "
                "be blended linearly: use --serve-log-q-weight, or serve one head alone"
            )
        if self.factored_q and (self.dueling or self.q_item_table):
            raise ConfigError(
                "--factored-q is a form of Q of its own, with no item table: not with --dueling or "
                "--q-item-table"
            )
        if self.factored_q and self.serve_next_item_weight != 0.0 and self.serve_q_weight != 0.0:
            raise ConfigError(
                "the factored Q is not of the next-item head's form, so they cannot be blended linearly: "
                "use --serve-log-q-weight, or serve one head alone"
            )
        if self.reward_clip < 0:
            raise ConfigError(f"reward_clip must be >= 0 (0: off), got {self.reward_clip}")
        if self.serve_log_q_weight < 0:
            raise ConfigError(f"serve_log_q_weight must be >= 0, got {self.serve_log_q_weight}")
        if not self.serve_q_floor > 0:
            raise ConfigError(f"serve_q_floor must be > 0, got {self.serve_q_floor}")
        if self.serve_log_q_weight > 0:
            if self.sqn_weight <= 0:
                raise ConfigError("serve_log_q_weight adds log Q to the next-item logit: set sqn_weight > 0")
            if self.serve_q_weight != 0.0:
                raise ConfigError(
                    "serve Q either linearly (--serve-q-weight) or as log Q (--serve-log-q-weight), "
                    "not both: set --serve-q-weight 0"
                )
        elif blends_into_the_repeat_head(self.repeat_head, self.serve_q_weight, self.serve_next_item_weight):
            raise ConfigError(
                "with the repeat head the heads cannot be blended: serve Q alone "
                "(--serve-next-item-weight 0) or the next-item head alone, as it is "
                "(--serve-q-weight 0 --serve-next-item-weight 1)"
            )
        if (
            self.serve_q_weight == 0.0
            and self.serve_next_item_weight == 0.0
            and self.serve_log_q_weight == 0.0
        ):
            raise ConfigError("serve_q_weight, serve_next_item_weight and serve_log_q_weight cannot all be 0")
        if self.target_update not in ("periodic", "polyak"):
            raise ConfigError(f"target_update must be periodic or polyak, got {self.target_update!r}")
        if self.td_bootstrap not in TD_BOOTSTRAPS:
            raise ConfigError(f"td_bootstrap must be {' or '.join(TD_BOOTSTRAPS)}, got {self.td_bootstrap!r}")
        if self.td_bootstrap == "expected" and self.sqn_weight <= 0:
            raise ConfigError("td_bootstrap expected values states by the next-item head: set sqn_weight > 0")
        if self.item_updates not in ITEM_UPDATES:
            raise ConfigError(
                f"item_updates must be one of {', '.join(ITEM_UPDATES)}, got {self.item_updates!r}"
            )
        if self.next_item_negatives < 0:
            raise ConfigError(f"next_item_negatives must be >= 0, got {self.next_item_negatives}")
        if self.next_item_negatives > 0 and self.sqn_weight <= 0:
            raise ConfigError("next_item_negatives samples the next-item loss: set sqn_weight > 0")
        full_softmax = self.sqn_weight > 0 and self.next_item_negatives == 0
        if self.item_updates == "lazy" and (full_softmax or self.dueling):
            raise ConfigError(
                "item_updates lazy needs no --dueling, and --sqn-weight 0 or --next-item-negatives: the "
                "dueling mean and the full next-item softmax reach every item's row; use auto or dense"
            )
        if self.action_granularity not in ACTION_GRANULARITIES:
            raise ConfigError(
                f"action_granularity must be one of {', '.join(ACTION_GRANULARITIES)}, "
                f"got {self.action_granularity!r}"
            )
        for name in (
            "window",
            "vocabulary_capacity",
            "batch_size",
            "updates_per_call",
            "replay_capacity",
            "item_groups_capacity",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


@register("learner")
@dataclass(frozen=True, kw_only=True)
class LearnerServiceConfig(ModelSettings, BusConfig):
    """Trains the DQN from the transitions topic and publishes models."""

    group_id: str = setting("qrec-learner", help="consumer group (offsets are also kept in the checkpoint)")
    transitions_topic: str = setting(TRANSITIONS, help="topic of transitions to learn from")
    model_topic: str = setting(MODEL, help="topic models are published to")
    dead_letter_topic: str = setting(DEAD_LETTER, help="topic for transitions that cannot be used")
    checkpoint_dir: str = setting(".qrec/learner", help="folder for checkpoints (resumed from on restart)")
    keep_models: int = setting(
        3,
        help="published versions kept beside the checkpoint (CHECKPOINT_DIR.history) for `qrec rollback`; "
        "0 keeps none",
    )
    sources: str = setting(
        "recommendation,logged",
        help="transition sources to learn from, comma-separated: recommendation (the feedback on shown "
        "slates) and logged (each organic interaction as the user's own action); others are skipped",
    )
    shown_slots: str = setting(
        "all",
        help="which shown-slot (recommendation) transitions to learn from: all, or clicked (only the slots "
        "the user clicked, r > 0: Q becomes an item's value given it is clicked, as in SlateQ, and the "
        "slot's own future is not blurred by the slate's unclicked items)",
    )
    replay_ratio: float = setting(
        4.0, help="times each consumed transition is replayed on average (sampled per consumed)"
    )
    min_replay_size: int = setting(1000, help="transitions to collect before training starts")
    publish_every_steps: int = setting(500, help="publish (and checkpoint) a model every this many updates")
    publish_every_seconds: float = setting(60.0, help="...or at least this often while training")
    dedupe_ids: int = setting(200000, help="recent transition ids remembered to drop re-emitted duplicates")
    create_topics: bool = setting(True, help="create the qrec topics first when they are missing")
    partitions: int = setting(6, help="partitions per topic when topics are created")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check()
        if self.replay_ratio <= 0:
            raise ConfigError(f"replay_ratio must be > 0, got {self.replay_ratio}")
        self.source_set()
        if self.shown_slots not in SHOWN_SLOTS:
            raise ConfigError(
                f"shown_slots must be one of {', '.join(SHOWN_SLOTS)}, got {self.shown_slots!r}"
            )

    def source_set(self) -> frozenset[str]:
        """The transition sources learned from."""
        return parse_sources(self.sources)


@register("train")
@dataclass(frozen=True, kw_only=True)
class TrainConfig(ModelSettings, BusConfig):
    """Trains the DQN offline from a recorded log's logged behaviour or from the transitions topic."""

    from_log: str | None = setting(
        None, help="log file to learn from (any format `qrec replay` reads); or use --from-topic"
    )
    from_topic: str | None = setting(
        None,
        help="transitions topic to learn from instead of a log (e.g. qrec.transitions.v1 on "
        "--bootstrap-servers), read from the beginning to its end when training starts",
    )
    format: str = setting("auto", help="log layout (see qrec replay --help)")
    out: str = setting("out/train", help="folder for the model, checkpoint, learning curve and summary")
    steps: int = setting(2000, help="updates to run")
    eval_every: int = setting(100, help="updates between held-out evaluations")
    holdout_fraction: float = setting(0.1, help="share of users whose transitions are held out")
    progress: bool = setting(True, help="show a progress bar (only on a terminal)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check()
        if (self.from_log is None) == (self.from_topic is None):
            raise ConfigError("give exactly one of --from-log LOG or --from-topic TOPIC")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be between 0 and 1, got {self.holdout_fraction}")

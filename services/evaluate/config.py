"""Settings of `qrec evaluate`."""

from __future__ import annotations

from dataclasses import dataclass

from services.config import ConfigError, register, setting
from services.learner.config import parse_hidden_sizes

SPLITS = ("users", "sessions", "time")
PROTOCOLS = ("sqn", "session")
DQN_VARIANTS = ("sqn", "q_only", "supervised")
OPE_POLICIES = ("logging", "uniform", "popularity")
# rl's own lists, spelled out here so the command line starts without importing JAX.
WEIGHT_DECAY_SCOPES = ("items", "all")
REPEAT_MODES = ("replace", "mixture")


@register("evaluate")
@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Offline evaluation of the DQN and baselines on a recorded log, and off-policy estimates."""

    log: str | None = setting(None, help="log file to evaluate on (any format `qrec replay` reads)")
    format: str = setting("auto", help="log layout (see qrec replay --help)")
    train: str | None = setting(None, help="a given training log (with --test instead of LOG)")
    test: str | None = setting(None, help="a given test log (with --train instead of LOG)")
    protocol: str = setting(
        "sqn",
        help="'sqn': every event of a test user is a target, click and purchase metrics (Xin et al. "
        "2020); 'session': every prefix of a test session predicts its next item (HR@k, MRR@k)",
    )
    split: str = setting(
        "users", help="how LOG is split 8:1:1 into train/validation/test: users, sessions, time"
    )
    seeds: int = setting(3, help="runs with different splits (users/sessions) and initialisations")
    first_seed: int = setting(0, help="seed of the first run; run i uses first_seed + i")
    window: int = setting(10, help="interactions in the state (the protocol's last 10)")
    epochs: float = setting(
        20.0, help="most passes over the training transitions per neural model (see --patience)"
    )
    batch_size: int = setting(256, help="transitions per update")
    learning_rate: float = setting(3e-3, help="Adam step size of the neural models")
    gamma: float = setting(0.5, help="discount of the Q-learning models")
    sqn_weight: float = setting(1.0, help="weight of the next-item loss in the joint SQN model")
    next_item_negatives: int = setting(
        0,
        help="train the next-item heads (supervised, sqn) by a sampled softmax over the true next item "
        "and this many items drawn uniformly per update (with the repeat head, the window's items are "
        "scored exactly and only the rest are drawn) instead of the full softmax (0: full softmax)",
    )
    embed_dim: int = setting(64, help="item embedding width of the neural models")
    weight_decay: float = setting(
        10.0,
        help="decoupled (AdamW) weight decay of the neural models: each update also shrinks the "
        "decayed weights by learning rate x this (0: plain Adam)",
    )
    weight_decay_scope: str = setting(
        "items", help="what --weight-decay shrinks: items (the item embedding table) or all (every matrix)"
    )
    repeat_mode: str = setting(
        "mixture",
        help="how the repeat head enters the next-item scores: replace (a window item's score is its "
        "repeat score) or mixture (RepeatNet's repeat and explore modes, weighted by a learned P(repeat))",
    )
    next_item_prior: bool = setting(
        True,
        help="start the next-item head's item bias at the log of each item's training frequency (what "
        "the softmax learns from the bias alone), so rarely seen items do not outrank popular ones by noise",
    )
    hidden_sizes: str = setting("256", help="hidden layer widths of the state MLP")
    repeat_head: bool = setting(
        True, help="give the neural models the repeat head (a learned score for recently seen items)"
    )
    max_actions: int = setting(
        100000,
        help="items the neural models score: the whole catalogue when it is smaller, else the most "
        "frequent training items (the rest rank last for those models)",
    )
    eval_every: int = setting(
        50, help="updates between validation checks; the best validated parameters are kept"
    )
    patience: int = setting(
        5, help="validation checks without a new best before a neural model stops training (0: never)"
    )
    validation_targets: int = setting(2000, help="validation targets used per check (a fixed sample)")
    models: str = setting(
        "dqn,q_only,supervised,sqn,popularity,cooccurrence,recent,tabular_q",
        help="models to evaluate (comma-separated)",
    )
    dqn_variant: str = setting(
        "sqn",
        help="which trained network is reported as 'dqn': sqn (joint TD + next-item loss, ranked by "
        "its next-item head), q_only or supervised",
    )
    tabular_epochs: int = setting(3, help="passes of the tabular Q-learner over the training episodes")
    tabular_learning_rate: float = setting(0.1, help="step size of the tabular Q-learner")
    tabular_gamma: float = setting(0.5, help="discount of the tabular Q-learner")
    tabular_epsilon: float = setting(0.1, help="exploration rate of the tabular Q-learner's own picks")
    tabular_buckets: int = setting(
        1000, help="item buckets standing in for categories in logs without a category column"
    )
    cooccurrence_window: int = setting(3, help="later events of the same session that count as co-occurring")
    limit: int | None = setting(None, help="use only the first N events of the log (quick runs)")
    out: str = setting("out/evaluate", help="folder for results.json and the plot")
    json: bool = setting(False, help="print the results as JSON on standard output")
    progress: bool = setting(True, help="show a progress bar (only on a terminal)")
    ope: str | None = setting(
        None,
        help="off-policy evaluation instead: recorded transitions, or recommendations plus clickstream, "
        "as JSONL (comma-separated files)",
    )
    ope_policies: str = setting("logging,uniform,popularity", help="target policies to estimate")
    ope_epsilon: float = setting(0.1, help="exploration share of the epsilon-popularity target policy")
    confidence: float = setting(0.95, help="confidence level of the intervals")
    metrics_file: str | None = setting(
        None, help="write OPE estimates in Prometheus text format here (node_exporter textfile collector)"
    )

    def __post_init__(self) -> None:
        if self.ope is None:
            if self.log is None and (self.train is None or self.test is None):
                raise ConfigError("give a LOG, or both --train FILE and --test FILE, or --ope FILE")
            if self.log is not None and (self.train is not None or self.test is not None):
                raise ConfigError("give either a LOG or --train/--test, not both")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.dqn_variant not in DQN_VARIANTS:
            raise ConfigError(
                f"dqn_variant must be one of {', '.join(DQN_VARIANTS)}, got {self.dqn_variant!r}"
            )
        unknown = [m for m in self.model_names() if m not in MODEL_NAMES]
        if unknown:
            raise ConfigError(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(MODEL_NAMES)}")
        unknown = [p for p in self.ope_policy_names() if p not in OPE_POLICIES]
        if unknown:
            raise ConfigError(
                f"unknown OPE policy {', '.join(unknown)}; available: {', '.join(OPE_POLICIES)}"
            )
        for name in ("seeds", "window", "batch_size", "embed_dim", "max_actions", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("tabular_epochs", "validation_targets", "cooccurrence_window", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tabular_buckets < 1:
            raise ConfigError(f"tabular_buckets must be at least 1, got {self.tabular_buckets}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.learning_rate <= 0 or self.tabular_learning_rate <= 0:
            raise ConfigError("learning rates must be > 0")
        for name in ("gamma", "tabular_gamma", "tabular_epsilon", "ope_epsilon"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.sqn_weight <= 0:
            raise ConfigError(f"sqn_weight must be > 0, got {self.sqn_weight}")
        if self.next_item_negatives < 0:
            raise ConfigError(f"next_item_negatives must be >= 0, got {self.next_item_negatives}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.repeat_mode not in REPEAT_MODES:
            raise ConfigError(
                f"repeat_mode must be one of {', '.join(REPEAT_MODES)}, got {self.repeat_mode!r}"
            )
        if self.weight_decay_scope not in WEIGHT_DECAY_SCOPES:
            raise ConfigError(
                f"weight_decay_scope must be one of {', '.join(WEIGHT_DECAY_SCOPES)}, "
                f"got {self.weight_decay_scope!r}"
            )
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        self.hidden()

    def hidden(self) -> tuple[int, ...]:
        return parse_hidden_sizes(self.hidden_sizes)

    def model_names(self) -> list[str]:
        return [name.strip() for name in self.models.split(",") if name.strip()]

    def ope_policy_names(self) -> list[str]:
        return [name.strip() for name in self.ope_policies.split(",") if name.strip()]


NEURAL_MODELS = ("q_only", "supervised", "sqn")
BASELINES = ("popularity", "cooccurrence", "recent", "tabular_q")
MODEL_NAMES = ("dqn", *NEURAL_MODELS, *BASELINES)

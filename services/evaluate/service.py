"""`qrec evaluate`: rank the full catalogue for held-out interactions, for the DQN and the baselines.

Per seed: split the log 8:1:1 (users, sessions or time), fit every model on the training part
(neural models keep the parameters that validate best), rank every catalogue item for each test
target, and compute HR@k / NDCG@k (SQN protocol, clicks and purchases apart) or HR@k / MRR@k
(session protocol). Results are averaged over seeds with their spread.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rl.ranking import ranking_metrics, target_ranks
from services.evaluate.baselines import Cooccurrence, Popularity, Recent, TabularQ, popularity_counts
from services.evaluate.config import BASELINES, NEURAL_MODELS, EvaluateConfig
from services.evaluate.models import NeuralModel
from services.evaluate.report import aggregate, markdown_table, plot, results_table
from services.evaluate.splits import (
    TARGET_KINDS_SESSION,
    TARGET_KINDS_SQN,
    Catalogue,
    EvalLog,
    Split,
    Target,
    holdout_validation,
    load_log,
    sample_targets,
    split_log,
    targets_for,
)

KS = (5, 10, 20)
RANK_CHUNK = 256  # target rows scored at once: bounds the (rows, catalogue) matrix in memory


class Scorer(Protocol):
    name: str

    def scores(self, targets: Sequence[Target]) -> np.ndarray: ...


def evaluate_ranks(model: Scorer, targets: Sequence[Target]) -> np.ndarray:
    """0-based rank of each target's true item under `model`, over the whole catalogue: (N,)."""
    ranks = []
    for start in range(0, len(targets), RANK_CHUNK):
        chunk = targets[start : start + RANK_CHUNK]
        ranks.append(target_ranks(model.scores(chunk), np.asarray([t.item for t in chunk], np.int64)))
    return np.concatenate(ranks) if ranks else np.zeros((0,), np.int64)


def metrics_by_kind(
    ranks: np.ndarray, targets: Sequence[Target], kinds: Sequence[str], metric_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    out = {}
    for kind in kinds:
        mask = np.asarray([t.kind == kind for t in targets], bool)
        out[kind] = ranking_metrics(ranks[mask], KS, metric_names)
    return out


def _protocol(config: EvaluateConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if config.protocol == "session":
        return TARGET_KINDS_SESSION, ("hr", "mrr")
    return TARGET_KINDS_SQN, ("hr", "ndcg")


def _splits(config: EvaluateConfig, seed: int, logs: Sequence[EvalLog]) -> Split:
    if config.log is not None:
        return split_log(logs[0], config.split, seed)
    train = holdout_validation(logs[0].interactions, seed)
    return Split(train.train, train.validation, logs[1].interactions)


def run_evaluate(config: EvaluateConfig, console: Console | None = None) -> dict[str, Any]:
    """Evaluate every configured model over `config.seeds` runs; writes results.json and the plot."""
    console = console or Console(stderr=True)
    started = time.monotonic()
    if config.log is not None:
        logs = [load_log(Path(config.log), config.format, window=config.window, limit=config.limit)]
        source = Path(config.log).name
    else:
        assert config.train is not None and config.test is not None
        logs = [
            load_log(Path(path), config.format, window=config.window, limit=config.limit)
            for path in (config.train, config.test)
        ]
        source = f"{Path(config.train).name} / {Path(config.test).name}"
    catalogue = Catalogue.of(logs)
    kinds, metric_names = _protocol(config)
    wanted = config.model_names()
    neural = [v for v in NEURAL_MODELS if v in wanted or ("dqn" in wanted and v == config.dqn_variant)]
    console.print(
        f"{sum(len(log.interactions) for log in logs):,} interactions from {source}, "
        f"catalogue {len(catalogue):,} items; protocol {config.protocol}, split "
        f"{config.split if config.log else 'given'}, {config.seeds} seed(s)"
    )
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {k: [] for k in kinds} for m in wanted}
    details: list[dict[str, Any]] = []
    interactive = config.progress and console.is_terminal
    progress = (
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        if interactive
        else nullcontext()
    )
    with progress as bar:
        task = bar.add_task("training", total=None) if bar is not None else None

        def advance(count: int) -> None:
            if bar is not None and task is not None:
                bar.update(task, advance=count)

        for run in range(config.seeds):
            seed = config.first_seed + run
            split = _splits(config, seed, logs)
            test_targets = targets_for(split.test, catalogue, config.protocol)
            validation = sample_targets(
                targets_for(split.validation, catalogue, config.protocol), config.validation_targets, seed
            )
            if not test_targets:
                raise ValueError(f"seed {seed}: the test split has no targets (is the log too small?)")
            counts = popularity_counts(split.train, catalogue)
            detail: dict[str, Any] = {
                "seed": seed,
                "train_interactions": len(split.train),
                "validation_interactions": len(split.validation),
                "test_interactions": len(split.test),
                "test_targets": {kind: sum(t.kind == kind for t in test_targets) for kind in kinds},
                "neural": {},
            }
            scorers: dict[str, Scorer] = {}
            trained: dict[str, NeuralModel] = {}
            for variant in neural:
                model = NeuralModel(variant, config, catalogue, split.train, seed)
                if bar is not None and task is not None:
                    total = bar.tasks[task].total or 0
                    bar.update(
                        task,
                        total=total + model.total_updates(config.epochs, config.batch_size),
                        description=f"seed {seed}: {variant}",
                    )
                model.fit(config.epochs, config.eval_every, validation, advance, config.patience)
                trained[variant] = model
                detail["neural"][variant] = {
                    "train_transitions": model.train_transitions,
                    "actions": int(model.scored_items.size),
                    "validation_hr@10": model.validation_curve,
                }
            for variant, model in trained.items():
                if variant in wanted:
                    scorers[variant] = model
            if "dqn" in wanted:
                scorers["dqn"] = trained[config.dqn_variant]
            categories = {k: v for log in logs for k, v in log.categories.items()}
            for name in BASELINES:
                if name in wanted:
                    scorers[name] = build_baseline(name, config, split, catalogue, counts, categories, seed)
            for name in wanted:
                ranks = evaluate_ranks(scorers[name], test_targets)
                for kind, values in metrics_by_kind(ranks, test_targets, kinds, metric_names).items():
                    runs[name][kind].append(values)
            details.append(detail)
    means, spreads = aggregate(runs, 0.95)
    ordered_metrics = [f"{m}@{k}" for m in metric_names for k in KS]
    title = f"qrec evaluate: {source} ({config.protocol} protocol, {config.seeds} seed(s), mean ± std)"
    if not config.json:
        console.print(
            results_table(
                spreads, kinds, [f"{m}@10" for m in metric_names] + [f"{metric_names[0]}@20"], title
            )
        )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_path = out / "evaluate.png"
    # A log without purchases (DIGINETICA's views) gets no empty purchase panel.
    plotted = [
        k
        for k in kinds
        if any(not math.isnan(means[m][k].get(f"{metric_names[0]}@10", math.nan)) for m in means)
    ]
    plot(spreads, plotted or list(kinds), [f"{m}@10" for m in metric_names], title, plot_path)
    result = {
        "models": means,
        "spread": spreads,
        "dqn_variant": config.dqn_variant,
        "protocol": config.protocol,
        "split": config.split if config.log is not None else "given",
        "source": source,
        "catalogue_items": len(catalogue),
        "interactions": sum(len(log.interactions) for log in logs),
        "rejected_rows": sum(log.rejected_rows for log in logs),
        "metrics": ordered_metrics,
        "runs": details,
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(finite(result), indent=2))
    (out / "results.md").write_text(markdown_table(spreads, kinds, ordered_metrics) + "\n")
    if not config.json:
        console.print(f"results in {out / 'results.json'}, plot {plot_path} ({result['seconds']:.0f} s)")
    return result


def build_baseline(
    name: str,
    config: EvaluateConfig,
    split: Split,
    catalogue: Catalogue,
    counts: np.ndarray,
    categories: dict[str, str],
    seed: int,
) -> Scorer:
    """Fit one of the baselines on the split's training interactions."""
    if name == "popularity":
        return Popularity(counts)
    if name == "recent":
        return Recent(counts)
    if name == "cooccurrence":
        return Cooccurrence(split.train, catalogue, counts, config.cooccurrence_window)
    if name == "tabular_q":
        return TabularQ(
            split.train,
            catalogue,
            counts,
            categories,
            epochs=config.tabular_epochs,
            learning_rate=config.tabular_learning_rate,
            gamma=config.tabular_gamma,
            epsilon=config.tabular_epsilon,
            buckets=config.tabular_buckets,
            seed=seed,
        )
    raise ValueError(f"unknown baseline {name!r}")


def finite(value: Any) -> Any:
    """The structure with NaN / infinity replaced by None, so it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value

"""Aggregation over seeds, and the three outputs: a rich table, a bar chart with error bars, JSON."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from scipy import stats

Runs = Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]]  # model -> kind -> one dict per seed


def spread(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample standard deviation and a Student-t confidence interval of per-seed values."""
    array = np.asarray([v for v in values if not math.isnan(v)], np.float64)
    if array.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    mean = float(array.mean())
    if array.size < 2:
        return {"mean": mean, "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    std = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, array.size - 1)) * std / math.sqrt(array.size)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def aggregate(runs: Runs, confidence: float = 0.95) -> tuple[dict[str, Any], dict[str, Any]]:
    """(means, spreads): means[model][kind][metric] = mean over seeds; spreads add std, CI and runs."""
    means: dict[str, Any] = {}
    spreads: dict[str, Any] = {}
    for model, kinds in runs.items():
        means[model], spreads[model] = {}, {}
        for kind, per_seed in kinds.items():
            means[model][kind], spreads[model][kind] = {}, {}
            if not per_seed:
                continue
            for metric in per_seed[0]:
                values = [run[metric] for run in per_seed]
                summary = spread(values, confidence)
                means[model][kind][metric] = summary["mean"]
                spreads[model][kind][metric] = {**summary, "runs": values}
    return means, spreads


def _cell(summary: Mapping[str, Any]) -> str:
    mean, std = summary["mean"], summary["std"]
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def results_table(
    spreads: Mapping[str, Any], kinds: Sequence[str], metrics: Sequence[str], title: str
) -> Table:
    """One row per model, one column per (target kind, metric): mean ± std over seeds."""
    table = Table(title=title)
    table.add_column("model")
    for kind in kinds:
        for metric in metrics:
            table.add_column(f"{kind} {metric}", justify="right")
    for model, by_kind in spreads.items():
        cells = [model]
        for kind in kinds:
            for metric in metrics:
                summary = by_kind.get(kind, {}).get(metric)
                cells.append(_cell(summary) if summary else "-")
        table.add_row(*cells)
    return table


def markdown_table(spreads: Mapping[str, Any], kinds: Sequence[str], metrics: Sequence[str]) -> str:
    """The same table in Markdown (for a README)."""
    header = ["model"] + [f"{kind} {metric}" for kind in kinds for metric in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, by_kind in spreads.items():
        cells = [f"`{model}`"]
        for kind in kinds:
            for metric in metrics:
                summary = by_kind.get(kind, {}).get(metric)
                cells.append(_cell(summary) if summary else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    spreads: Mapping[str, Any], kinds: Sequence[str], metrics: Sequence[str], title: str, path: Path
) -> None:
    """Bars of each metric per model, one panel per target kind, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(spreads)
    figure, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    width = 0.8 / max(1, len(metrics))
    positions = np.arange(len(models))
    for axis, kind in zip(axes[0], kinds, strict=True):
        for offset, metric in enumerate(metrics):
            means = [spreads[m].get(kind, {}).get(metric, {}).get("mean", float("nan")) for m in models]
            errors = [spreads[m].get(kind, {}).get(metric, {}).get("std", float("nan")) for m in models]
            errors = [0.0 if math.isnan(e) else e for e in errors]
            axis.bar(positions + offset * width, means, width, yerr=errors, capsize=3, label=metric)
        axis.set_xticks(positions + width * (len(metrics) - 1) / 2)
        axis.set_xticklabels(models, rotation=30, ha="right")
        axis.set_title(f"{kind} targets")
        axis.grid(axis="y", alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)

"""PNG plots of runs, drawn with matplotlib's object API on the Agg canvas (no display needed).

- accuracy vs iterations: one figure per batch size, one colour per method, one
  line per seed, the target dashed;
- per-layer effective rates over time (from layers.jsonl), one figure per run;
- per-layer warm-up end points (LENA paper, fig. 7), when the method records
  a per-layer warm-up quantity.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from ..train.metrics import LAYERS, read_jsonl
from .results import RunResult


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def accuracy_vs_iterations(runs: list[RunResult], target: float | None, batch: int, path: Path) -> Path:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    colours = {}
    for run in sorted(runs, key=lambda r: (r.method, r.seed)):
        colour = colours.setdefault(run.method, f"C{len(colours)}")
        steps = [0] + [e["step"] for e in run.evals]
        accuracy = [math.nan] + [100 * e["test_accuracy"] for e in run.evals]
        label = run.method if run.seed == min(r.seed for r in runs if r.method == run.method) else None
        ax.plot(steps[1:], accuracy[1:], marker="o", markersize=3, color=colour, label=label)
    if target is not None:
        ax.axhline(100 * target, color="black", linestyle="--", linewidth=1, label="target")
    ax.set(xlabel="iterations", ylabel="test accuracy (%)", title=f"batch {batch}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def layer_series(run_dir: Path, quantity: str) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and, per layer, the values of one per-layer quantity from layers.jsonl."""
    steps, series = [], defaultdict(list)
    for record in read_jsonl(run_dir / LAYERS):
        values = record.get(quantity)
        if not values:
            continue
        steps.append(record["step"])
        for layer, value in values.items():
            series[layer].append(value)
    return steps, dict(series)


def layer_rates(run: RunResult, path: Path) -> Path | None:
    steps, series = layer_series(run.run_dir, "effective_lr")
    if not steps:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for i, (layer, values) in enumerate(series.items()):
        ax.plot(steps[: len(values)], values, label=layer, color=f"C{i % 10}", linewidth=1)
    positive = all(v > 0 for values in series.values() for v in values)
    ax.set(xlabel="iterations", ylabel="effective learning rate", yscale="log" if positive else "linear",
           title=f"{run.method}, batch {run.batch}, seed {run.seed}: per-layer rates")
    ax.grid(alpha=0.3)
    if len(series) <= 16:
        ax.legend(fontsize="x-small", ncol=2)
    return _save(fig, path)


def warmup_quantity(run_dir: Path) -> str | None:
    """The per-layer warm-up quantity a method records, if any."""
    for record in read_jsonl(run_dir / LAYERS):
        found = [q for q in record if "warmup" in q and isinstance(record[q], dict)]
        # The end points themselves if recorded, else a factor that reaches 1 when a layer is done.
        for preferred in ("end", "factor"):
            match = next((q for q in found if preferred in q), None)
            if match:
                return match
        return found[0] if found else None
    return None


def warmup_ends(run: RunResult) -> dict[str, float]:
    """Per layer, the iteration at which its warm-up ended.

    A quantity named like ``warmup_end*`` holds the end points themselves (last
    record wins; negative or NaN: not ended); any other (a warm-up factor or
    progress in [0, 1]) ends at the first step where it reaches 1.
    """
    quantity = warmup_quantity(run.run_dir)
    if quantity is None:
        return {}
    steps, series = layer_series(run.run_dir, quantity)
    if "end" in quantity:
        return {layer: v[-1] for layer, v in series.items() if v and v[-1] >= 0 and not math.isnan(v[-1])}
    return {
        layer: next(s for s, v in zip(steps, values) if v >= 1.0)
        for layer, values in series.items()
        if any(v >= 1.0 for v in values)
    }


def warmup_end_points(run: RunResult, path: Path) -> Path | None:
    ends = warmup_ends(run)
    if not ends:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.bar(range(len(ends)), list(ends.values()), color="C0")
    ax.set_xticks(range(len(ends)), list(ends), rotation=90, fontsize="x-small")
    ax.set(xlabel="layer", ylabel="iteration its warm-up ended",
           title=f"{run.method}, batch {run.batch}: per-layer warm-up end points")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def early_epochs(curves: dict[str, list[tuple[list[float], list[float]]]], target: float | None, epochs: float,
                 title: str, path: Path) -> Path:
    """Test accuracy over the first ``epochs`` epochs: per method, the mean over seeds and the seeds' range.

    ``curves`` maps a method to one (epochs, accuracies) pair per seed, evaluated at the same points.
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for i, (method, seeds) in enumerate(curves.items()):
        length = min(len(x) for x, _ in seeds)
        xs = [x for x in seeds[0][0][:length]]
        keep = [j for j, x in enumerate(xs) if x <= epochs + 1e-9]
        if not keep:
            continue
        xs = [xs[j] for j in keep]
        per_point = [[100 * acc[j] for _, acc in seeds] for j in keep]
        mean = [sum(v) / len(v) for v in per_point]
        ax.plot(xs, mean, marker="o", markersize=3, color=f"C{i}", label=method)
        if len(seeds) > 1:
            ax.fill_between(xs, [min(v) for v in per_point], [max(v) for v in per_point], color=f"C{i}", alpha=0.15)
    if target is not None:
        ax.axhline(100 * target, color="black", linestyle="--", linewidth=1, label="target")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def warmup_ends_by_layer(ends: dict[str, list[dict[str, float]]], references: dict[str, float], title: str,
                         path: Path) -> Path:
    """Per layer, the update its state-aware warm-up ended; one bar group per run label (mean over seeds,
    the seeds' range as an error bar); ``references`` draws horizontal lines (e.g. the fixed warm-up's end).
    """
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    layers = list(dict.fromkeys(layer for runs in ends.values() for run in runs for layer in run))
    width = 0.8 / max(1, len(ends))
    for i, (label, runs) in enumerate(ends.items()):
        values = [[run[layer] for run in runs if layer in run and run[layer] >= 0] for layer in layers]
        mean = [sum(v) / len(v) if v else math.nan for v in values]
        low = [m - min(v) if v else 0 for m, v in zip(mean, values)]
        high = [max(v) - m if v else 0 for m, v in zip(mean, values)]
        xs = [j + (i - (len(ends) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(xs, mean, width=width, color=f"C{i}", label=label, yerr=[low, high], capsize=2)
        for x, v in zip(xs, values):
            if not v:  # no seed ended this layer's warm-up within the run
                ax.text(x, 0, "not ended", rotation=90, ha="center", va="bottom", fontsize="x-small", color=f"C{i}")
    for j, (label, value) in enumerate(references.items()):
        ax.axhline(value, color=f"C{len(ends) + j}", linestyle="--", linewidth=1, label=label)
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize="x-small")
    ax.set(xlabel="layer (parameter tensor)", ylabel="update at which its warm-up ended", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="x-small")
    return _save(fig, path)

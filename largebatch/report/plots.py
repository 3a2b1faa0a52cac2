"""PNG plots of runs, drawn with matplotlib's object API on the Agg canvas (no display needed).

- accuracy vs iterations: one figure per batch size, one colour and marker per
  method, one line per seed, the target dashed; a curve that coincides with
  another method's is drawn with hollow, larger markers and its legend entry
  says which it lies on; a diverged run ends in a cross;
- training loss vs iterations (from metrics.jsonl), one figure per batch size,
  likewise;
- per-layer effective rates over time (from layers.jsonl), one figure per run;
- per-layer warm-up end points (LENA paper, fig. 7), when the method records
  a per-layer warm-up quantity; a layer whose warm-up had not ended when the
  run stopped is drawn as a hatched bar to the last step, marked "not reached".
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..records import LAYERS, METRICS, read_jsonl
from .results import RunResult

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _curves_plot(ax, curves: list[tuple[RunResult, list[float], list[float]]]) -> list[str]:
    """One line per run: colour and marker per method, label on its first seed; returns notes on overlaps.

    A run whose curve equals (to the plotted precision) that of a method drawn
    before it would be hidden: it is drawn with hollow markers twice the size,
    dashed, and its label names the method it lies on.
    """
    styles: dict[str, tuple[str, str]] = {}
    drawn: list[tuple[str, list[float], list[float]]] = []
    labelled: set[str] = set()
    notes = []
    for run, xs, ys in curves:
        colour, marker = styles.setdefault(run.method, (f"C{len(styles) % 10}", MARKERS[len(styles) % len(MARKERS)]))
        under = next((m for m, x, y in drawn if m != run.method and x == xs and _same(y, ys)), None)
        drawn.append((run.method, xs, ys))
        label = None
        if run.method not in labelled:
            labelled.add(run.method)
            label = run.method + (f" (same curve as {under})" if under else "")
        if under:
            notes.append(f"{run.method} (seed {run.seed}) lies exactly on {under}")
            ax.plot(xs, ys, color=colour, marker=marker, markersize=8, markerfacecolor="none", linestyle="--",
                    linewidth=1.2, label=label, zorder=3)
        else:
            ax.plot(xs, ys, color=colour, marker=marker, markersize=3, linewidth=1.2, label=label, zorder=2)
        if run.diverged_at_step is not None and xs:
            # at the step that diverged, level with the last finite value
            ax.plot([max(xs[-1], run.diverged_at_step)], [ys[-1]], marker="x", markersize=10, color=colour,
                    linestyle="none", zorder=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(run.diverged_at_step is not None for run, _, _ in curves):
        ax.plot([], [], marker="x", color="black", linestyle="none", label="diverged (run stopped)")
    return notes


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-6) for x, y in zip(a, b))


def accuracy_vs_iterations(runs: list[RunResult], target: float | None, batch: int, path: Path) -> tuple[Path, list[str]]:
    """Test accuracy at every evaluation; returns the PNG and notes on curves drawn on top of each other."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    curves = [(run, [e["step"] for e in run.evals], [100 * e["test_accuracy"] for e in run.evals])
              for run in sorted(runs, key=lambda r: (r.method, r.seed))]
    notes = _curves_plot(ax, curves)
    if target is not None:
        ax.axhline(100 * target, color="black", linestyle="--", linewidth=1, label="target")
    ax.set(xlabel="iteration (update)", ylabel="test accuracy (%)", title=f"Test accuracy, batch {batch}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path), notes


def training_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    steps = [r for r in read_jsonl(run_dir / METRICS) if r.get("kind") == "step"]
    return [r["step"] for r in steps], [float(r["loss"]) for r in steps]


def loss_vs_iterations(runs: list[RunResult], batch: int, path: Path) -> tuple[Path, list[str]] | None:
    """Training loss of every step (mean over the global batch); a non-finite loss ends the curve in a cross."""
    curves = []
    for run in sorted(runs, key=lambda r: (r.method, r.seed)):
        steps, losses = training_losses(run.run_dir)
        finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
        if finite:
            curves.append((run, [s for s, _ in finite], [v for _, v in finite]))
    if not curves:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    notes = _curves_plot(ax, curves)
    positive = all(v > 0 for _, _, ys in curves for v in ys)
    ax.set(xlabel="iteration (update)", ylabel="training loss (mean over the batch)",
           yscale="log" if positive else "linear", title=f"Training loss, batch {batch}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path), notes


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
        # Layers share rates (one per group): a marker per layer keeps a line drawn over another visible.
        ax.plot(steps[: len(values)], values, label=layer, color=f"C{i % 10}", linewidth=1,
                marker=MARKERS[i % len(MARKERS)], markersize=3 + 5 * (len(series) - 1 - i) / max(1, len(series) - 1),
                markerfacecolor="none", markevery=max(1, len(steps) // 12))
    positive = all(v > 0 for values in series.values() for v in values)
    ax.set(xlabel="iteration (update)", ylabel="effective learning rate", yscale="log" if positive else "linear",
           title=f"{run.method}, batch {run.batch}, seed {run.seed}: per-layer effective rates")
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


def warmup_ends(run: RunResult) -> dict[str, float | None]:
    """Per layer, the iteration at which its warm-up ended (None: not reached when the run stopped).

    A quantity named like ``warmup_end*`` holds the end points themselves (last
    record wins; negative or NaN: not ended); any other (a warm-up factor or
    progress in [0, 1]) ends at the first step where it reaches 1.
    """
    quantity = warmup_quantity(run.run_dir)
    if quantity is None:
        return {}
    steps, series = layer_series(run.run_dir, quantity)
    if "end" in quantity:
        return {layer: v[-1] if v and v[-1] >= 0 and not math.isnan(v[-1]) else None for layer, v in series.items()}
    return {layer: next((s for s, v in zip(steps, values) if v >= 1.0), None) for layer, values in series.items()}


def warmup_end_points(run: RunResult, path: Path) -> Path | None:
    ends = warmup_ends(run)
    if not ends:
        return None
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    xs = range(len(ends))
    reached = [v if v is not None else 0 for v in ends.values()]
    ax.bar(xs, reached, color="C0", label="warm-up ended")
    missing = [x for x, v in zip(xs, ends.values()) if v is None]
    if missing:
        ax.bar(missing, [run.steps] * len(missing), color="none", edgecolor="C3", hatch="//",
               label=f"not reached by the last step ({run.steps})")
        for x in missing:
            ax.text(x, run.steps / 2, "not reached", rotation=90, ha="center", va="center", fontsize="x-small",
                    color="C3")
    ax.set_xticks(list(xs), list(ends), rotation=90, fontsize="x-small")
    ax.set(xlabel="layer (parameter tensor)", ylabel="iteration its warm-up ended",
           title=f"{run.method}, batch {run.batch}, seed {run.seed}: per-layer warm-up end points")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="x-small")
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
        ax.plot(xs, mean, marker=MARKERS[i % len(MARKERS)], markersize=8 - 2 * (i % 3), markerfacecolor="none",
                color=f"C{i}", label=method)
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


def iterations_to_target(series: dict[str, dict[int, float]], perfect: dict[int, float], title: str,
                         path: Path) -> Path:
    """Iterations to target against batch size, log-log, one line per method (the mean over the seeds that
    reached it; a batch no seed reached is left out of its line), and the perfect-scaling line (the base
    batch's iterations x b / B), as the LENA paper's key figure."""
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    if perfect:
        xs = sorted(perfect)
        ax.plot(xs, [perfect[x] for x in xs], color="black", linestyle="--", linewidth=1, label="perfect scaling")
    for i, (method, points) in enumerate(series.items()):
        xs = sorted(points)
        if not xs:
            ax.plot([], [], color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], label=f"{method} (never)")
            continue
        ax.plot(xs, [points[x] for x in xs], color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)],
                markerfacecolor="none", markersize=7, linewidth=1.2, label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({x for points in series.values() for x in points} | set(perfect))
    ax.set_xticks(ticks, [f"{t // 1024}K" if t >= 1024 and t % 1024 == 0 else str(t) for t in ticks])
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.yaxis,):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.set(xlabel="batch size B", ylabel="iterations (updates) to target", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small", ncol=2)
    return _save(fig, path)


def layer_series_panels(panels: dict[str, tuple[list[int], dict[str, list[float | None]]]], ylabel: str,
                        title: str, path: Path, log_y: bool = False, share_y: bool = False) -> Path:
    """One panel per label (e.g. per batch size): a per-layer quantity over the updates, one line per layer;
    ``share_y``: one y scale for every panel, so that panels compare."""
    count = max(1, len(panels))
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.2 * cols, 3.3 * rows + 0.6))
    layers = list(dict.fromkeys(layer for _, values in panels.values() for layer in values))
    colours = {layer: f"C{i % 10}" for i, layer in enumerate(layers)}
    styles = {layer: ("-", "--", ":")[(i // 10) % 3] for i, layer in enumerate(layers)}
    first = None
    for k, (label, (steps, values)) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, k + 1, sharey=first if share_y else None)
        first = first or ax
        for layer, ys in values.items():
            points = [(s, y) for s, y in zip(steps, ys) if y is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], color=colours[layer],
                        linestyle=styles[layer], linewidth=1, label=layer if k == 0 else None)
        if log_y:
            ax.set_yscale("log")
        ax.set(title=label, xlabel="iteration (update)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    if layers:
        fig.legend(fontsize="xx-small", loc="lower center", ncol=min(6, len(layers)))
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(layers) / 6), 1, 1))
    fig.savefig(path, dpi=100)
    return path


def plateau_curve(points: dict[str, dict[int, list[float]]], chosen: int | None, tolerance: float, title: str,
                  path: Path) -> Path:
    """Final accuracy of the base-batch runs against their epoch budget (log x), per metric the mean over
    seeds with the seeds' range; the chosen budget E marked."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for i, (metric, by_epochs) in enumerate(points.items()):
        xs = sorted(by_epochs)
        means = [100 * sum(by_epochs[x]) / len(by_epochs[x]) for x in xs]
        low = [m - 100 * min(by_epochs[x]) for m, x in zip(means, xs)]
        high = [100 * max(by_epochs[x]) - m for m, x in zip(means, xs)]
        ax.errorbar(xs, means, yerr=[low, high], marker=MARKERS[i], capsize=3, color=f"C{i}", label=metric)
    if chosen is not None:
        ax.axvline(chosen, color="black", linestyle="--", linewidth=1, label=f"E = {chosen}")
    ax.set_xscale("log", base=2)
    ticks = sorted({x for by_epochs in points.values() for x in by_epochs})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set(xlabel="epochs of the run (its whole schedule)", ylabel="final accuracy (%)",
           title=f"{title} (rule: within {100 * tolerance:.1f} points of 2E)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save(fig, path)


def noise_scale_over_training(series: dict[str, list], batches: list[int], title: str, path: Path) -> Path:
    """B_noise per window against epochs, log scale, with each study batch as a dotted line; a window whose
    mean |G|^2 was not positive (B_noise beyond what the step's examples resolve) is left out."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    points = [(e, v) for e, v in zip(series["epoch"], series["noise_scale"]) if v is not None and v > 0]
    if points:
        ax.plot([e for e, _ in points], [v for _, v in points], color="C0", marker="o", markersize=3, linewidth=1.2,
                label="B_noise (examples)")
    for i, batch in enumerate(sorted(batches)):
        ax.axhline(batch, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(f"B = {batch}", (1.0, batch), xycoords=("axes fraction", "data"), fontsize="x-small",
                    color="grey", ha="right", va="bottom")
    ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="B_noise = tr(Sigma) / |G|^2 (examples)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small")
    return _save(fig, path)

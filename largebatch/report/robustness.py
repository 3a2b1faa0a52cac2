"""The study page's second look: tuning on seeds, rate sensitivity and the gradient noise scale.

Each function takes the page's :class:`largebatch.report.study_view.Study` (the
records of summaries.json) and returns Markdown lines; nothing here trains or
reads a run directory. The phases are described in
:mod:`largebatch.study` and docs/study.md (amendment 2).
"""

from __future__ import annotations

import math
import statistics
from .plots import noise_scale_over_training
from .study_view import Study

TUNE_SEEDS, SENSITIVITY, NOISE_SCALE = "tune-seeds", "sensitivity", "noise-scale"
FALL = 0.01  # a method "falls" at a batch where its mean accuracy is this far below the mean target


def tune_seeds_lines(study: Study, model: str) -> list[str]:
    """The near-best rates on several seeds and the one-SE choice, per family (empty before the phase)."""
    rows = []
    for family, entry in sorted(study.tuning.get(model, {}).items()):
        scores = entry.get("seed_scores")
        if not scores:
            continue
        cells = "; ".join(f"{lr}: {_mean_sd(values)}" for lr, values in sorted(scores.items(), key=lambda kv: float(kv[0])))
        choice = entry["one_se"]
        first, chosen = entry["first_seed_lr"], entry["lr"]
        change = "same" if math.isclose(first, chosen) else f"**{first:g} -> {chosen:g}**"
        rows.append(f"| {family} | {cells} | {choice['best_mean_lr']:g} | {100 * choice['standard_error']:.2f} | "
                    f"{chosen:g} | {change} |")
    if not rows:
        return []
    seeds = next(e["seeds"] for e in study.tuning[model].values() if e.get("seeds"))
    within = next(e["within"] for e in study.tuning[model].values() if e.get("within") is not None)
    points = f"{100 * within:g} point" + ("" if 100 * within == 1 else "s")
    return [f"Rates within {points} of the first seed's best, on seeds {', '.join(map(str, seeds))} "
            "(validation accuracy %, mean ± sd); the rate used is the smallest whose mean is within one standard "
            "error of the best mean (the one-standard-error rule, amendment 2):", "",
            "| family | rate: mean ± sd over seeds | best mean at | its standard error (points) | rate used | "
            "against the first seed's choice |", "|---|---|---|---|---|---|", *rows, ""]


def _mean_sd(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def _reach(study: Study, model: str, phase: str, method: str, batch: int, seed: int) -> tuple[float, bool] | None:
    """Final test accuracy and whether it reached its seed's target, for one run (None: not run)."""
    pairs = [(r, hit) for r, hit in study.reached(model, method, batch, phase) if r.seed == seed]
    if not pairs:
        return None
    run, hit = pairs[0]
    return run.final_test_accuracy, hit is not None


def sensitivity_cells(study: Study, model: str) -> dict[tuple[str, int], tuple[tuple[float, bool], tuple[float, bool]]]:
    """(method, batch) -> ((accuracy, reached) at the tuned rate, the same from rate / 3), on the phase's seed."""
    seeds = sorted({r["seed"] for r in study.records_of(model, SENSITIVITY)})
    out = {}
    for method in study.spec["methods"]:
        for batch in study.batches(model):
            for seed in seeds:
                tuned = _reach(study, model, "sweep", method, batch, seed)
                lower = _reach(study, model, SENSITIVITY, method, batch, seed)
                if tuned is not None and lower is not None:
                    out[(method, batch)] = (tuned, lower)
    return out


def sensitivity_section(study: Study) -> list[str]:
    """Each method and batch at its tuned rate and from the next lower rate: the target verdict, robust or not."""
    lines: list[str] = []
    for model in study.models:
        cells = sensitivity_cells(study, model)
        if not cells:
            continue
        seeds = sorted({r["seed"] for r in study.records_of(model, SENSITIVITY)})
        rates = {r["method"]: r["base_lr"] for r in study.records_of(model, SENSITIVITY)}
        tuned_rates = {r["method"]: r["base_lr"] for r in study.records_of(model, "sweep")}
        batches = [b for b in study.batches(model) if any((m, b) in cells for m in study.spec["methods"])]
        lines += [f"### {model}", "",
                  f"Seed {', '.join(map(str, seeds))}; each cell: final test accuracy at the tuned rate / from the "
                  "next lower rate (%), with + where the run reached its seed's target; **rate-sensitive** where "
                  "the two disagree on reaching it.", "",
                  "| method (rates) | " + " | ".join(f"B = {b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        flips: dict[str, list[str]] = {}
        for method in study.spec["methods"]:
            row = []
            for b in batches:
                if (method, b) not in cells:
                    row.append("-")
                    continue
                (acc, hit), (low, low_hit) = cells[(method, b)]
                text = f"{100 * acc:.1f}{'+' if hit else ''} / {100 * low:.1f}{'+' if low_hit else ''}"
                if hit != low_hit:
                    text = f"**{text}**"
                    flips.setdefault(method, []).append(f"B = {b} ({100 * acc:.1f}% -> {100 * low:.1f}%)")
                row.append(text)
            if any(c != "-" for c in row):
                rate = f"{tuned_rates.get(method, float('nan')):g}, {rates.get(method, float('nan')):g}"
                lines.append(f"| {method} ({rate}) | " + " | ".join(row) + " |")
        lines += [""]
        robust = [m for m in study.spec["methods"] if any(k[0] == m for k in cells) and m not in flips]
        lines += [f"- **Robust** to the base rate (the same target verdict at every batch): "
                  f"{', '.join(robust) or 'none'}."]
        for method, where in flips.items():
            lines.append(f"- **Rate-sensitive**: {method} at " + "; ".join(where) + ".")
        lines += [""]
    if not lines:
        return []
    return ["## Rate sensitivity", "",
            "The main sweep again from each family's next lower grid rate (rate / 3), every batch (amendment 2). "
            "A verdict that changes between the two rates rests on the rate, not on the method.", "", *lines]


def noise_series(study: Study, model: str) -> dict | None:
    records = study.records_of(model, NOISE_SCALE)
    return records[0].get("noise") if records else None


def falls_at(study: Study, model: str, method: str) -> int | None:
    """The smallest batch above the base where the method's mean final accuracy is FALL below the mean target."""
    targets = study.targets(model)
    if not targets:
        return None
    target = statistics.fmean(targets.values())
    for batch in study.large(model):
        runs = study.runs(model, method=method, batch=batch)
        if runs and statistics.fmean(r.final_test_accuracy for r in runs) < target - FALL:
            return batch
    return None


def noise_section(study: Study, model: str) -> list[str]:
    series = noise_series(study, model)
    if not series:
        return []
    values = [(e, v) for e, v in zip(series["epoch"], series["noise_scale"]) if v is not None]
    path = noise_scale_over_training(series, study.batches(model), f"{model}: gradient noise scale, SGD at b = "
                                     f"{study.spec['base_batch']}", study.artifacts / f"{model}-noise-scale.png")
    start, end = (values[0][1], values[-1][1]) if values else (None, None)
    hidden = sum(v is None for v in series["noise_scale"])
    lines = [f"## {model}: gradient noise scale", "",
             f"B_noise = tr(Sigma) / |G|^2 (McCandlish et al. 2018) over the base-batch run of momentum SGD "
             f"(seed {study.records_of(model, NOISE_SCALE)[0]['seed']}), from per-example gradient norms (the "
             "unbiased estimates of both terms from each step's examples; the ratio of their means over each of "
             f"{len(series['noise_scale'])} windows of the run).", "",
             f"![B_noise over training]({study.link(path)})", ""]
    if start is not None:
        lines += [f"B_noise was {start:,.0f} examples in the first window (to epoch {values[0][0]:.1f}) and "
                  f"{end:,.0f} in the last measurable one (to epoch {values[-1][0]:.1f})"
                  + (f"; in {hidden} window(s) the mean |G|^2 was not positive (the noise hid the gradient)"
                     if hidden else "") + ".", ""]
    rows = []
    for method in study.spec["methods"]:
        batch = falls_at(study, model, method)
        if batch is None:
            if study.runs(model, method=method):
                rows.append(f"| {method} | none up to {max(study.batches(model))} | - | - |")
            continue
        rows.append(f"| {method} | {batch} | {batch / start:.1f} | {batch / end:.2f} |" if start else
                    f"| {method} | {batch} | - | - |")
    if rows:
        lines += [f"Where each method falls off: the smallest batch whose mean final accuracy is more than "
                  f"{100 * FALL:g} point below the mean target, against B_noise at the start and at the end.", "",
                  "| method | falls at B | B / B_noise (start) | B / B_noise (end) |", "|---|---|---|---|", *rows, ""]
    return lines

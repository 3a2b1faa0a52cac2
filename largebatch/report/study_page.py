"""The sections of the study's results page, in the order the page shows them (:func:`page`).

The page opens with the verdicts (:mod:`.verdicts`), then the protocol as
run and, per model: the base-batch convergence curve that set the epoch
budget (the budget rule); the tuning grids with their optima; the LENA
paper's Table 1 analogue; iterations to target against batch size (log-log,
with the perfect-scaling line); where each AdaScale run stopped; LENA's
per-layer gains over training and its per-layer warm-up end points; CLARS
against gradual warm-up in the first epochs and its trust ratios against
LARS's; the warm-up ablation; time per update; the gradient noise scale.
Then the rate sensitivity (:mod:`.robustness`), which clock times the runs
and why, the measured overheads, the README's headline table and the
commands that regenerate it all.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from . import plots, robustness
from .study_view import (ADASCALE_BASELINE, BASELINE, EARLY_METHODS, FIXED_WARMUP, NO_WARMUP, Study, fmt_iters, inside,
                         mean, mean_sd, sd)
from .verdicts import verdicts

def page(study: Study) -> list[str]:
    judged = verdicts(study)
    lines = [f"# Results: the large-batch study ({study.spec['name']})", "",
             "Every number, table, plot and verdict on this page is computed from the run summaries "
             f"({study.link(study.artifacts / 'summaries.json')}); see the last section to regenerate it.", "",
             "## Verdicts", "",
             "For each claim of each paper: **held**, **did not hold** or **inconclusive**, with the numbers "
             "that decide it (means over seeds; a difference within the seeds' standard deviation is "
             "inconclusive).", ""]
    lines += [v.line() for v in judged] or ["- (no finished runs to judge a claim by)"]
    lines += [""] + protocol(study)
    for model in study.models:
        lines += plateau_section(study, model)
        lines += tuning_section(study, model)
        lines += main_table(study, model)
        lines += scaling_section(study, model)
        lines += adascale_section(study, model)
        lines += lena_section(study, model)
        lines += clars_section(study, model)
        lines += ablation_section(study, model)
        lines += throughput_section(study, model)
        lines += robustness.noise_section(study, model)
    lines += robustness.sensitivity_section(study)
    lines += time_section(study)
    lines += overheads(study)
    lines += ["## Headline (the README's table)", ""] + headline(study) + [""]
    lines += commands(study)
    return lines


def protocol(study: Study) -> list[str]:
    s = study.spec
    budgets = []
    for model in study.models:
        m, e = study.model_spec[model], study.epochs(model)
        how = (f"{e} epochs (budget rule, below)" if m.get("epoch_candidates") and e is not None else
               "budget rule not applied yet" if m.get("epoch_candidates") else f"{e} epochs")
        extra = f"; {m['note']}" if m.get("note") else ""
        budgets.append(f"{model}: {how}, batches {', '.join(map(str, study.batches(model)))}, seeds "
                       f"{', '.join(map(str, study.seeds(model)))}{extra}")
    clock, why = study.clock()
    grids = s.get("tune_grids") or {}
    grid_text = ", ".join(f"{lr:g}" for lr in s["tune_grid"]) + "".join(
        f"; {family} family: {', '.join(f'{lr:g}' for lr in g)}" for family, g in sorted(grids.items()))
    extend = s.get("tune_extend", 0)
    lines = [
        "## Protocol (fixed before the runs, the same for every method)", "",
        f"- Data: {s['dataset']}, one seeded split (seed {s['split_seed']}) of the training set into "
        f"{s['val_size']} validation images and the rest for training"
        + (f" (first {s['train_limit']} kept)" if s.get("train_limit") else "")
        + "; accuracy reported on the held-out test set"
        + (f" (first {s['test_limit']} images)" if s.get("test_limit") else "") + ", never used for tuning.",
        "- Models, epoch budgets, batches and seeds: " + "; ".join(budgets)
        + ". The same budget at every batch size of a model.",
        f"- Base batch b = {s['base_batch']}; every batch is formed from micro-batches of {s['micro_batch']} "
        "(gradient accumulation, n = B/b gradient samples per update for the methods that measure statistics).",
        f"- Methods: {', '.join(s['methods'])} (see `largebatch methods`).",
        f"- Base rates: tuned at the base batch only, first seed, on the validation split; starting grid "
        f"{grid_text}"
        + (f"; a grid whose best rate is at an end is extended by half-decade steps (at most {extend} per "
           "end) until the best is inside" if extend else "")
        + ". Each method carries its family's rate to the large batch by its own rule. No tuning at large "
        "batches.",
        "- Schedules: momentum 0.9, weight decay 5e-4, exponential decay to 1% of the rate over the run; "
        f"gradual warm-up over 5.5% of the epochs ({', '.join(m for m in s['methods'] if m in FIXED_WARMUP)}); "
        f"none for {', '.join(m for m in s['methods'] if m in NO_WARMUP)}; LENA's state-aware warm-up with "
        "theta = 5% of T1. "
        + ("adascale: the rate on its scale-invariant clock tau, the run ends when tau reaches T1 or at "
           f"{s['adascale_cap']:g} x the epoch budget. " if "adascale" in s["methods"] and "adascale_cap" in s
           else "")
        + ("as: the LENA paper's AdaScale baseline, gain x rate x the budget's decay, the epoch budget."
           if ADASCALE_BASELINE in s["methods"] else ""),
        "- Target: per seed, the final test accuracy of momentum SGD at the base batch with the same budget. "
        f"Test accuracy is checked {s['evals_per_epoch']} times per epoch; iterations and time to target are "
        "those of the first check at or above the target; \"never\" if none is.",
        f"- Time: training time, evaluation excluded, by the {'process CPU' if clock == 'cpu' else 'wall'} "
        f"clock ({why}; see \"Time measurement\"). A layer is one parameter tensor.",
        f"- Machine: {study.env.get('cpus', '?')} CPUs, {study.env.get('threads', '?')} torch threads, "
        f"torch {study.env.get('torch', '?')}, Python {study.env.get('python', '?')}.",
        "",
    ]
    families: dict[str, list[str]] = {}
    for method in filter(study.known, s["methods"]):
        families.setdefault(study.family_of(method), []).append(method)
    if families:
        at = next(k for k, line in enumerate(lines) if line.startswith("- Base rates")) + 1
        lines.insert(at, "- Families, one tuned base rate each (the methods that coincide at the base batch): "
                     + "; ".join(f"{f}: {', '.join(ms)}" for f, ms in families.items()) + ".")
    return lines + amendments(study)


def amendments(study: Study) -> list[str]:
    """The protocol's amendments and the finished runs each set aside (phase "superseded")."""
    texts = study.spec.get("amendments") or []
    set_aside = [r for r in study.records if r["phase"] == "superseded"]
    if not texts and not set_aside:
        return []
    lines = ["### Amendments to the protocol", ""] + [f"{k}. {text}" for k, text in enumerate(texts, 1)]
    if set_aside:
        groups: dict[tuple, dict[int, list[float]]] = {}
        for r in set_aside:
            key = (r["model"], r.get("superseded_phase", "?"), r["method"], r.get("warmup", "default"),
                   r["base_lr"], r.get("superseded_because", "?"))
            groups.setdefault(key, {}).setdefault(r["batch"], []).append(100 * r["final_test_accuracy"])
        lines += ["", "Runs set aside (kept in summaries.json as phase \"superseded\"; final test accuracy, "
                  "mean ± standard deviation over seeds):", "",
                  "| model | phase | method | warm-up | base rate | final test accuracy | set aside because |",
                  "|---|---|---|---|---|---|---|"]
        for (model, phase, method, warmup, lr, because), cells in sorted(groups.items(), key=str):
            accuracy = "; ".join(f"B = {b}: {mean_sd(v)}% ({len(v)})" for b, v in sorted(cells.items()))
            lines.append(f"| {model} | {phase} | {method} | {warmup} | {lr:g} | {accuracy} | {because} |")
    return lines + [""]


def plateau_section(study: Study, model: str) -> list[str]:
    decision = study.plateau.get(model)
    records = study.records_of(model, "plateau")
    if not decision:
        return []
    metric = decision.get("metric", "val")
    lines = [f"## {model}: the epoch budget (budget rule)", "",
             f"Momentum SGD at b = {study.spec['base_batch']}, rate {decision.get('lr')}, each run with its whole "
             f"schedule over its epochs; the rule: E is the smallest candidate of "
             f"{', '.join(map(str, decision.get('candidates', [])))} with at least "
             f"{decision.get('min_epochs')} epochs ({decision.get('min_updates')} updates at B = "
             f"{decision.get('largest_batch')}) whose mean final {metric} accuracy over the seeds is within "
             f"{100 * decision.get('tolerance', 0):.1f} points of the runs with 2E epochs.", "",
             "| epochs | validation accuracy (%) | test accuracy (%) | seeds |", "|---|---|---|---|"]
    by_epochs: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_epochs[r["epochs"]].append(r)
    for e in sorted(by_epochs):
        rs = by_epochs[e]
        lines.append(f"| {e} | {mean_sd([100 * r['final_val_accuracy'] for r in rs])} | "
                     f"{mean_sd([100 * r['final_test_accuracy'] for r in rs])} | {len(rs)} |")
    lines.append("")
    for c in decision.get("checks", []):
        lines.append(f"- E = {c['epochs']}: {100 * c['accuracy']:.2f}% -> {100 * c['accuracy_2e']:.2f}% with "
                     f"{2 * c['epochs']} epochs, difference {100 * c['difference']:+.2f} points: "
                     f"{'passes' if c['passes'] else 'fails'}.")
    if decision.get("epochs") is not None:
        lines.append(f"- Budget: **E = {decision['epochs']} epochs**"
                     + ("" if decision.get("rule_met") else
                        " (no candidate passed the rule: the largest eligible one; the target may still move)")
                     + ".")
    else:
        lines.append(f"- Not decided yet: the runs with {decision.get('pending')} epochs are missing.")
    if by_epochs:
        points = {"validation": {e: [r["final_val_accuracy"] for r in rs] for e, rs in by_epochs.items()},
                  "test": {e: [r["final_test_accuracy"] for r in rs] for e, rs in by_epochs.items()}}
        png = plots.plateau_curve(points, decision.get("epochs"), decision.get("tolerance", 0),
                                  f"{model}: base-batch convergence", study.artifacts / f"{model}-plateau.png")
        lines += ["", f"![{model}: final accuracy of the base batch against its epoch budget]({study.link(png)})"]
    return lines + [""]


def tuning_section(study: Study, model: str) -> list[str]:
    entries = study.tuning.get(model, {})
    if not entries:
        return []
    lines = [f"## {model}: base-rate tuning (validation accuracy at b = {study.spec['base_batch']})", "",
             "| family | final grid (validation accuracy %) | best rate | inside the grid | extended by |",
             "|---|---|---|---|---|"]
    for family, entry in sorted(entries.items()):
        grid = ", ".join(f"{lr}: {100 * acc:.2f}" for lr, acc in
                         sorted(entry["grid"].items(), key=lambda kv: float(kv[0])))
        interior = inside(entry)
        extended = ", ".join(f"{lr:g}" for lr in entry.get("extended", [])) or "-"
        best = entry.get("first_seed_lr", entry["lr"])
        lines.append(f"| {family} | {grid} | {best:g} | {'yes' if interior else '**no**'} | {extended} |")
    return lines + [""] + robustness.tune_seeds_lines(study, model)


def main_table(study: Study, model: str) -> list[str]:
    targets = study.targets(model)
    batches = study.batches(model)
    clock = "CPU" if study.clock()[0] == "cpu" else "wall"
    lines = [
        f"## {model}: test accuracy, iterations and time to target (LENA paper, Table 1)", "",
        "Targets: " + (", ".join(f"seed {s}: {100 * a:.2f}%" for s, a in sorted(targets.items()))
                       or f"none ({BASELINE} at the base batch has not finished)"), "",
        f"Each cell: final test accuracy / iterations to target / {clock} seconds to target, mean ± standard "
        "deviation over the seeds that reached it (\"never\": no check reached the target; \"k/n\": reached "
        "by k of n seeds).", "",
        "| method | " + " | ".join(f"B = {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for method in study.spec["methods"]:
        row = [cell(study, model, method, b) for b in batches]
        if any(c != "-" for c in row):
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines + [""]


def cell(study: Study, model: str, method: str, batch: int) -> str:
    pairs = study.reached(model, method, batch)
    runs = study.runs(model, method=method, batch=batch)
    if not runs:
        return "-"
    acc = mean_sd([100 * r.final_test_accuracy for r in runs]) + "%"
    hits = [h for _, h in pairs if h]
    diverged = [r.diverged_at_step for r in runs if r.diverged_at_step is not None]
    note = f" (diverged at {', '.join(map(str, diverged))})" if diverged else ""
    if not hits:
        return f"{acc} / never{note}"
    part = "" if len(hits) == len(pairs) else f" ({len(hits)}/{len(pairs)})"
    seconds = [s for s in (study.seconds_of(h) for h in hits) if s is not None]
    iters = [h["step"] for h in hits]
    it = fmt_iters(mean(iters)) + (f" ± {fmt_iters(sd(iters))}" if len(iters) > 1 else "")
    return f"{acc} / {it}{part} / {mean_sd(seconds, '{:.1f}')} s{note}"


def iterations_series(study: Study, model: str) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for method in study.spec["methods"]:
        points = {}
        for b in study.batches(model):
            hits = [h["step"] for _, h in study.reached(model, method, b) if h]
            if hits:
                points[b] = mean(hits)
        if any(study.runs(model, method=method, batch=b) for b in study.batches(model)):
            series[method] = points
    base = study.spec["base_batch"]
    at_base = [h["step"] for _, h in study.reached(model, BASELINE, base) if h]
    perfect = {b: mean(at_base) * base / b for b in study.batches(model)} if at_base else {}
    return series, perfect


def scaling_section(study: Study, model: str) -> list[str]:
    series, perfect = iterations_series(study, model)
    if not any(series.values()):
        return []
    png = plots.iterations_to_target(series, perfect, f"{model}: iterations to the base batch's accuracy",
                                     study.artifacts / f"{model}-iterations-to-target.png")
    return [f"## {model}: iterations to target against batch size", "",
            "Log-log, mean over the seeds that reached the target (a batch no seed reached is left out of "
            "the method's line); dashed: perfect scaling, the base batch's iterations x b / B.", "",
            f"![{model}: iterations to target against batch size]({study.link(png)})", ""]


def adascale_section(study: Study, model: str) -> list[str]:
    records = sorted([r for r in study.records_of(model) if r.get("stopped")],
                     key=lambda r: (r["batch"], r["seed"]))
    if not records:
        return []
    lines = [f"## {model}: where each AdaScale run stopped", "",
             "The published AdaScale trains until its clock tau (base-batch iterations made up for) reaches "
             "T1, the base batch's iterations of the epoch budget, or until the cap.", "",
             "| B | seed | stopped | tau / T1 | updates | epochs used (budget, cap) | final test accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        why = "tau reached T1" if r["stopped"] == "t1" else "at the cap"
        lines.append(f"| {r['batch']} | {r['seed']} | {why} | {r['tau']:.0f} / {r['base_iterations']} "
                     f"({100 * r['tau'] / r['base_iterations']:.0f}%) | {r['steps']} | "
                     f"{r['epochs_used']:.2f} ({r['epochs']}, {r['epoch_cap']}) | "
                     f"{100 * r['final_test_accuracy']:.2f}% |")
    return lines + [""]


def lena_section(study: Study, model: str) -> list[str]:
    panels = {}
    for b in study.large(model):
        for r in study.records_of(model, method="lena", batch=b):
            series = r.get("layer_series")
            if series and series["quantity"] == "gains":
                panels[f"B = {b}, seed {r['seed']}"] = (series["step"], series["values"])
    lines = []
    if panels:
        png = plots.layer_series_panels(panels, "gain r_k", f"{model}: LENA's per-layer gains over training",
                                        study.artifacts / f"{model}-lena-gains.png")
        lines += [f"## {model}: LENA's per-layer gains and warm-up", "",
                  "The gain r_k of each layer (parameter tensor) over the updates, at each batch (at most n = "
                  "B/b); the warm-up of a layer ends when its progress S_k = sum of its gains reaches theta.", "",
                  f"![{model}: LENA's per-layer gains]({study.link(png)})", ""]
    return lines + warmup_ends_plot(study, model, heading=not lines)


def warmup_ends_plot(study: Study, model: str, heading: bool = False) -> list[str]:
    ends: dict[str, list[dict[str, float]]] = {}
    references: dict[str, float] = {}
    for b in study.large(model):
        records = [r for r in study.records if r["model"] == model and r["method"] == "lena"
                   and r["batch"] == b and r.get("warmup_ends") and r["warmup"] in ("default", "state-aware")]
        if records:
            ends[f"LENA, B = {b}"] = [r["warmup_ends"] for r in records]
        fixed = study.records_of(model, "sweep", method="lsw", batch=b)
        if fixed and fixed[0].get("warmup_steps") and b in study.ablation_batches(model):
            references[f"fixed warm-up end, B = {b}"] = fixed[0]["warmup_steps"]
    if not ends:
        return []
    unfinished = {label: sorted({layer for run in runs for layer, end in run.items() if end < 0})
                  for label, runs in ends.items()}
    png = plots.warmup_ends_by_layer(ends, references, f"{model}: per-layer state-aware warm-up end points",
                                     study.artifacts / f"{model}-warmup-ends.png")
    lines = [f"## {model}: LENA's per-layer warm-up", ""] if heading else []
    return lines + [
        "Per-layer warm-up end points of LENA (LENA paper, Fig. 7): the update at which each layer's progress "
        "S_k reached theta; bars: mean over seeds, whiskers: the seeds' range; dashed: where the fixed "
        "warm-up of LSW ends at the same batch.", "",
        f"![{model}: per-layer warm-up end points]({study.link(png)})", "",
    ] + [f"Still warming up when the run ended ({label}, some seed): {', '.join(layers)}." + "\n"
         for label, layers in unfinished.items() if layers]


def clars_section(study: Study, model: str) -> list[str]:
    early = study.spec.get("early_epochs", 2)
    large = study.large(model)
    methods = [m for m in EARLY_METHODS if study.runs(model, method=m)]
    if "clars" not in methods or not large:
        return []
    lines = [
        f"## {model}: CLARS without warm-up against gradual warm-up in the first epochs (CLARS paper)", "",
        "Test accuracy (%) at the end of each of the first epochs, mean ± standard deviation over seeds. "
        "lsw: momentum SGD with linear scaling and gradual warm-up; lars: LARS with gradual warm-up.", "",
        "| B | method | " + " | ".join(f"epoch {e}" for e in range(1, early + 1)) + " | final |",
        "|---|---|" + "---|" * (early + 1),
    ]
    for b in large:
        for m in methods:
            runs = study.runs(model, method=m, batch=b)
            if not runs:
                continue
            cells = [mean_sd([100 * v for v in study.early(model, m, b, e)]) for e in range(1, early + 1)]
            final = mean_sd([100 * r.final_test_accuracy for r in runs])
            lines.append(f"| {b} | {m} | " + " | ".join(cells) + f" | {final} |")
    lines.append("")
    targets = study.targets(model)
    mean_target = statistics.fmean(targets.values()) if targets else None
    for b in large[-2:]:
        curves = {m: [([e["epoch"] for e in r.evals], [e["test_accuracy"] for e in r.evals])
                      for r in study.runs(model, method=m, batch=b)] for m in methods}
        curves = {m: c for m, c in curves.items() if c and all(x for x, _ in c)}
        if not curves:
            continue
        title = f"{model}, batch {b}: first {early} epoch{'s' if early != 1 else ''}"
        png = plots.early_epochs(curves, mean_target, early, title,
                                 study.artifacts / f"{model}-clars-early-b{b}.png")
        lines += [f"![{model}: CLARS vs gradual warm-up, first epochs, batch {b}]({study.link(png)})", ""]
    panels = {}
    for b in large[-2:]:
        for m in ("clars", "lars"):
            for r in study.records_of(model, method=m, batch=b):
                series = r.get("layer_series")
                if series and series["quantity"] == "trust_ratios":
                    panels[f"{m.upper()}, B = {b}, seed {r['seed']}"] = (series["step"], series["values"])
    if panels:
        png = plots.layer_series_panels(panels, "trust ratio", f"{model}: per-layer trust ratios, CLARS vs LARS",
                                        study.artifacts / f"{model}-trust-ratios.png", log_y=True,
                                        share_y=True)
        lines += ["Per-layer trust ratios eta_trust ||w|| / (gradient measure + beta ||w||): CLARS divides by "
                  "the mean of the per-example gradient norms, LARS by the norm of the mini-batch gradient, so "
                  "CLARS's ratios are at most LARS's for the same weights and gradients; LARS's rate also "
                  "carries its gradual warm-up, which the ratio does not show.", "",
                  f"![{model}: trust ratios of CLARS and LARS]({study.link(png)})", ""]
    return lines


def ablation_section(study: Study, model: str) -> list[str]:
    modes = study.spec.get("ablation_modes", ["none", "fixed", "state-aware"])
    methods = study.spec.get("ablation_methods", [])
    if not methods:
        return []
    batches = study.ablation_batches(model)
    seeds = study.spec.get("ablation_seeds")
    lines = [
        f"## {model}: warm-up ablation (LENA paper, Table 2)", "",
        "Final test accuracy (%) / iterations to target, "
        + (f"seed {', '.join(map(str, seeds))}" if seeds else "mean over seeds")
        + ", for each method with no warm-up, fixed gradual warm-up and the state-aware warm-up "
        "(`--warmup none|fixed|state-aware`). For a fixed-scaling method the state-aware warm-up is a linear "
        "ramp over 5% of the updates from about 0 (its gain is B/b for every layer); for as and adascale it "
        "follows the tau clock; LENA's is per layer.", "",
        "| method | " + " | ".join(f"B = {b}, {m}" for b in batches for m in modes) + " |",
        "|---|" + "---|" * (len(batches) * len(modes)),
    ]
    targets = study.targets(model)
    for method in methods:
        row = []
        for b in batches:
            for mode in modes:
                runs = study.ablation_run(model, method, mode, b)
                if not runs:
                    row.append("-")
                    continue
                reached = [r.reaches(targets[r.seed]) for r in runs if r.seed in targets]
                iters = [h["step"] for h in reached if h]
                it = "never" if not iters else f"{mean(iters):.0f}" + (
                    "" if len(iters) == len(reached) else f" ({len(iters)}/{len(reached)})")
                row.append(f"{mean_sd([100 * r.final_test_accuracy for r in runs])} / {it}")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines + [""]


def throughput_section(study: Study, model: str) -> list[str]:
    per = study.per_update(model)
    batches = [b for b in study.large(model) if per.get(("lsw", b))]
    if not batches:
        return []
    clock = "CPU" if study.clock()[0] == "cpu" else "wall"
    lines = [f"## {model}: training time per update relative to LSW ({clock} time, same batch)", "",
             "| method | " + " | ".join(f"B = {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for method in study.spec["methods"]:
        cells = [f"{mean(per[(method, b)]) / mean(per[('lsw', b)]):.2f}" if per.get((method, b)) else "-"
                 for b in batches]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    disturbed, same = study.timing_disturbed(model)
    if disturbed:
        lines += ["", f"The machine's load moved these times (sgd / lsw, the same work per update: "
                  f"{min(same):.2f}-{max(same):.2f}); benchmarks/results holds interleaved measurements."]
    return lines + [""]


def time_section(study: Study) -> list[str]:
    clock, why = study.clock()
    loads = [v for r in study.records for v in (r.get("load") or []) if v]
    loads = [x[0] if isinstance(x, list) else x for x in loads]
    lines = ["## Time measurement", "",
             f"Times to target and per update use the **{'process CPU' if clock == 'cpu' else 'wall'} clock**: "
             f"{why}. Every run records both (training only, evaluation excluded) and the machine's load average "
             "at its start, its end and each check."]
    if loads:
        lines.append(f"The 1-minute load average over the runs ranged from {min(loads):.1f} to {max(loads):.1f} "
                     f"on {study.env.get('cpus', '?')} CPUs.")
    return lines + [""]


def overheads(study: Study) -> list[str]:
    root = Path(study.spec.get("benchmarks", "benchmarks/results"))
    rows = []
    for path in sorted(root.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for where, ratios in _ratio_tables(data, path.stem):
            rows += [f"| {where} | {name} | {value:.2f} |" for name, value in ratios.items()
                     if isinstance(value, (int, float))]
    if not rows:
        return []
    return [
        "## Measured overheads (benchmarks/results/*.json)", "",
        "Ratios of median times measured interleaved against a reference in the same run "
        "(see benchmarks/README.md; regenerate with the scripts in benchmarks/).", "",
        "| benchmark | ratio | value |", "|---|---|---|", *rows, "",
    ]


def headline(study: Study, batch: int | None = None) -> list[str]:
    common = set.intersection(*(set(study.batches(m)) for m in study.models)) if study.models else set()
    batch = batch or (max(common) if common else None)
    if batch is None:
        return ["(no batch common to every model)"]
    methods = [m for m in study.spec["methods"] if any(study.runs(model, method=m, batch=batch)
                                                      for model in study.models)]
    lines = [f"Test accuracy (%) at B = {batch}, mean over seeds ({study.spec['name']}):", "",
             "| | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for model in study.models:
        targets = study.targets(model)
        label = f"{model} (target {100 * mean(list(targets.values())):.1f})" if targets else model
        cells = [f"{100 * mean([r.final_test_accuracy for r in study.runs(model, method=m, batch=batch)]):.1f}"
                 if study.runs(model, method=m, batch=batch) else "-" for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def commands(study: Study) -> list[str]:
    name = study.spec["name"]
    how = f"--spec {study.spec['spec_file']}" if study.spec.get("spec_file") else f"--preset {name}"
    model = study.models[0]
    return [
        "## Regenerating", "",
        "Every table, plot and verdict on this page, from the committed run summaries "
        f"({study.link(study.artifacts / 'summaries.json')}), without training:", "",
        "```sh", f"largebatch study {how} --report-only", "```", "",
        "The whole study (runs only what has not finished; it prints its estimate first):", "",
        "```sh", f"largebatch study {how} --commit", "```", "",
        "One run of it, e.g. LENA without its warm-up at the largest batch, seed 0 "
        "(`config.json` in each run directory holds the full configuration):", "",
        "```sh",
        f"largebatch train --method lena --warmup none --model {model} "
        f"--batch {max(study.batches(model))} --micro-batch {study.spec['micro_batch']} "
        f"--epochs {study.epochs(model) or '<E>'} --lr <tuned sgd-family rate> --run-dir runs/one",
        "```", "",
    ]


def _ratio_tables(data, where: str):
    """Every set of ratios in a benchmark's JSON (a ``ratios`` mapping, or ``*ratio*`` numbers), labelled."""
    if isinstance(data, dict):
        label = where + "".join(f" {data[k]}" for k in ("benchmark", "model", "batch") if k in data)
        if isinstance(data.get("ratios"), dict):
            yield label, data["ratios"]
        # the median ratio only: the other summaries of the same samples tell the same story
        loose = {k: v for k, v in data.items() if k == "ratio_median" and isinstance(v, (int, float))}
        if loose:
            yield label, loose
        for key, value in data.items():
            if key != "ratios" and isinstance(value, (dict, list)):
                yield from _ratio_tables(value, f"{where}/{key}")
    elif isinstance(data, list):
        for item in data:
            yield from _ratio_tables(item, where)

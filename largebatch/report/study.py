"""The study's results page (docs/results.md), written from its summaries.json alone.

The page opens with the verdicts: for each claim of each paper, "held", "did
not hold" or "inconclusive", with the numbers that decide it, all computed
here from the run summaries (:meth:`Study.verdicts`). Then the protocol as
run and, per model: the base-batch convergence curve that set the epoch
budget (the budget rule); the tuning grids with their optima; the LENA
paper's Table 1 analogue; iterations to target against batch size (log-log,
with the perfect-scaling line); where each AdaScale run stopped; LENA's
per-layer gains over training and its per-layer warm-up end points; CLARS
against gradual warm-up in the first epochs and its trust ratios against
LARS's; the warm-up ablation; time per update. Then which clock times the
runs and why, the measured overheads, the README's headline table
(:func:`headline_table`) and the commands that regenerate it all.

How a verdict is decided: a comparison of means over seeds is "held" or
"did not hold" when the difference is larger than the seeds' standard
deviation (the larger of the two sides'), "inconclusive" when it is not; a
claim about reaching the target is "held" when every seed reaches it,
"did not hold" when none does, "inconclusive" in between; a claim over
several batch sizes holds when it holds at every batch where it can be
judged, and did not hold when it failed at any.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..records import read_json
from . import plots, robustness
from .results import RunResult

BASELINE = "sgd"
HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
EARLY_METHODS = ("clars", "lsw", "lars")  # CLARS (no warm-up) against gradual warm-up
ADASCALE_BASELINE = "as"  # the LENA paper's AdaScale ("AS"); "adascale" is the published method
FIXED_WARMUP = ("lsw", "sqrt", "lars", "lars-masked", "lamb")
NO_WARMUP = ("sgd", "clars", "as", "adascale")


def write_study_report(summaries: str | Path, out: str | Path) -> Path:
    """Write the Markdown page to ``out`` and its PNGs beside ``summaries``; returns the page's path."""
    summaries, out = Path(summaries), Path(out)
    if not summaries.exists():
        raise ValueError(f"{summaries} does not exist: run the study first")
    data = read_json(summaries)
    study = Study(data, summaries.parent, out.parent)
    lines = study.page()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def headline_table(data: dict | str | Path, batch: int | None = None) -> str:
    """The README's headline: final test accuracy (%) of every method at ``batch`` (default: the largest
    batch every model ran), mean over seeds, one row per model with its target; Markdown."""
    if not isinstance(data, dict):
        data = read_json(Path(data))
    return "\n".join(Study(data, Path("."), Path(".")).headline(batch))


@dataclass
class Verdict:
    paper: str
    claim: str
    model: str
    status: str  # HELD, NOT_HELD or INCONCLUSIVE
    numbers: str
    methods: tuple[str, ...] = ()  # the methods it compares (a caveat on their family's tuning applies)

    def line(self) -> str:
        return f"- **{self.status}**: {self.paper}, {self.model}: {self.claim}. {self.numbers}"


def _result(record: dict) -> RunResult:
    evals = record.get("evals") or {"step": [], "epoch": [], "seconds": [], "accuracy": []}
    cpu = evals.get("cpu") or [None] * len(evals["step"])
    rows = [
        {"step": s, "epoch": e, "train_seconds": t, "test_accuracy": a, "cpu_seconds": c}
        for s, e, t, a, c in zip(evals["step"], evals["epoch"], evals["seconds"], evals["accuracy"], cpu)
    ]
    return RunResult(record["method"], record["batch"], record["seed"], record["final_test_accuracy"],
                     record["steps"], record["train_seconds"], rows, Path(record["run"]),
                     record.get("diverged_at_step"))


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_sd(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    if len(values) < 2:
        return fmt.format(statistics.fmean(values))
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def _iters(value: float) -> str:
    return f"{value / 1000:.2f}K" if value >= 1000 else f"{value:.0f}"


def compare(mine: list[float], theirs: list[float], higher_is_better: bool = True) -> str:
    """HELD when ``mine`` is better than ``theirs`` by more than the larger of their standard deviations,
    NOT_HELD when worse by more, INCONCLUSIVE within the spread (or with no values)."""
    if not mine or not theirs:
        return INCONCLUSIVE
    diff = _mean(mine) - _mean(theirs)
    if not higher_is_better:
        diff = -diff
    if abs(diff) <= max(_sd(mine), _sd(theirs)):
        return INCONCLUSIVE
    return HELD if diff > 0 else NOT_HELD


def combine(statuses: list[str]) -> str:
    """A claim over several batch sizes: NOT_HELD if it failed at any, HELD if it held at every judged one."""
    if NOT_HELD in statuses:
        return NOT_HELD
    if statuses and all(s == HELD for s in statuses):
        return HELD
    return INCONCLUSIVE


def reach_status(reached: int, seeds: int) -> str:
    if seeds == 0:
        return INCONCLUSIVE
    return HELD if reached == seeds else NOT_HELD if reached == 0 else INCONCLUSIVE


class Study:
    def __init__(self, data: dict, artifacts: Path, page_dir: Path):
        self.spec, self.tuning, self.env = data["spec"], data.get("tuning", {}), data.get("environment", {})
        self.plateau = data.get("plateau", {})
        self.records = data["runs"]
        self.artifacts, self.page_dir = artifacts, page_dir
        self.models = [m["name"] for m in self.spec["models"]]
        # each method's family, and the sweep method equal to it under each warm-up mode (collect writes it)
        self.method_table: dict[str, dict] = data.get("methods", {})
        self.model_spec = {m["name"]: m for m in self.spec["models"]}
        self._clock: tuple[str, str] | None = None

    # -- helpers ------------------------------------------------------------------------------
    def batches(self, model: str) -> list[int]:
        return sorted(self.model_spec[model].get("batches") or self.spec["batches"])

    def large(self, model: str) -> list[int]:
        return [b for b in self.batches(model) if b > self.spec["base_batch"]]

    def seeds(self, model: str) -> list[int]:
        return list(self.model_spec[model].get("seeds") or self.spec["seeds"])

    def epochs(self, model: str) -> int | None:
        given = self.model_spec[model].get("epochs")
        if given is not None:
            return given
        return (self.plateau.get(model) or {}).get("epochs")

    def ablation_batches(self, model: str) -> list[int]:
        return sorted(self.spec.get("ablation_batches") or self.batches(model)[-2:])

    def known(self, method: str) -> bool:
        return method in self.method_table

    def records_of(self, model: str, phase: str = "sweep", **match) -> list[dict]:
        return [r for r in self.records if r["model"] == model and r["phase"] == phase
                and all(r.get(k) == v for k, v in match.items())]

    def runs(self, model: str, phase: str = "sweep", **match) -> list[RunResult]:
        return [_result(r) for r in self.records_of(model, phase, **match)]

    def targets(self, model: str) -> dict[int, float]:
        base = self.spec["base_batch"]
        return {r.seed: r.final_test_accuracy for r in self.runs(model, method=BASELINE, batch=base)}

    def link(self, png: Path) -> str:
        return Path(os.path.relpath(png, self.page_dir)).as_posix()

    def reached(self, model: str, method: str, batch: int, phase: str = "sweep", warmup: str | None = None
                ) -> list[tuple[RunResult, dict | None]]:
        """Each seed's run with its first evaluation at or above the seed's target (None: never)."""
        targets = self.targets(model)
        match = {"method": method, "batch": batch}
        if warmup is not None:
            match["warmup"] = warmup
        return [(r, r.reaches(targets[r.seed])) for r in self.runs(model, phase, **match) if r.seed in targets]

    def ablation_run(self, model: str, method: str, mode: str, batch: int) -> list[RunResult]:
        """The ablation's runs of (method, mode, batch): trained for the ablation, or the sweep's equal run."""
        own = self.runs(model, "ablation", method=method, warmup=mode, batch=batch)
        if own:
            return own
        same = self.method_table.get(method, {}).get("same_in_sweep", {}).get(mode)
        if not same:
            return []
        seeds = self.spec.get("ablation_seeds")
        return [r for r in self.runs(model, method=same, batch=batch) if seeds is None or r.seed in seeds]

    # -- time: which clock --------------------------------------------------------------------------
    def clock(self) -> tuple[str, str]:
        """("wall" or "cpu", why): the clock whose time per update varies least between runs doing the same
        work (the seeds of one method and batch), judged by the median coefficient of variation."""
        if self._clock is not None:
            return self._clock
        groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: {"wall": [], "cpu": []})
        for r in self.records:
            if r["phase"] != "sweep" or not r["steps"] or r.get("diverged_at_step") is not None:
                continue
            g = groups[(r["model"], r["method"], r["batch"])]
            g["wall"].append(r["train_seconds"] / r["steps"])
            if r.get("train_cpu_seconds") is not None:
                g["cpu"].append(r["train_cpu_seconds"] / r["steps"])

        def median_cv(kind: str) -> float | None:
            cvs = [_sd(g[kind]) / _mean(g[kind]) for g in groups.values() if len(g[kind]) > 1 and _mean(g[kind]) > 0]
            return statistics.median(cvs) if cvs else None

        wall, cpu = median_cv("wall"), median_cv("cpu")
        if cpu is None:
            self._clock = ("wall", "the runs recorded wall-clock time only")
        else:
            pick = "cpu" if cpu < (wall if wall is not None else math.inf) else "wall"
            self._clock = (pick, f"between seeds of the same method and batch (the same work per update) the "
                                 f"time per update varies by a median {100 * wall:.1f}% in wall time and "
                                 f"{100 * cpu:.1f}% in process CPU time")
        return self._clock

    def seconds_of(self, hit: dict) -> float | None:
        key = "cpu_seconds" if self.clock()[0] == "cpu" else "train_seconds"
        return hit.get(key)

    # -- the page -----------------------------------------------------------------------------
    def page(self) -> list[str]:
        verdicts = self.verdicts()
        lines = [f"# Results: the large-batch study ({self.spec['name']})", "",
                 "Every number, table, plot and verdict on this page is computed from the run summaries "
                 f"({self.link(self.artifacts / 'summaries.json')}); see the last section to regenerate it.", "",
                 "## Verdicts", "",
                 "For each claim of each paper: **held**, **did not hold** or **inconclusive**, with the numbers "
                 "that decide it (means over seeds; a difference within the seeds' standard deviation is "
                 "inconclusive).", ""]
        lines += [v.line() for v in verdicts] or ["- (no finished runs to judge a claim by)"]
        lines += [""] + self.protocol()
        for model in self.models:
            lines += self.plateau_section(model)
            lines += self.tuning_section(model)
            lines += self.main_table(model)
            lines += self.scaling_section(model)
            lines += self.adascale_section(model)
            lines += self.lena_section(model)
            lines += self.clars_section(model)
            lines += self.ablation_section(model)
            lines += self.throughput_section(model)
            lines += robustness.noise_section(self, model)
        lines += robustness.sensitivity_section(self)
        lines += self.time_section()
        lines += self.overheads()
        lines += ["## Headline (the README's table)", ""] + self.headline() + [""]
        lines += self.commands()
        return lines

    def protocol(self) -> list[str]:
        s = self.spec
        budgets = []
        for model in self.models:
            m, e = self.model_spec[model], self.epochs(model)
            how = (f"{e} epochs (budget rule, below)" if m.get("epoch_candidates") and e is not None else
                   "budget rule not applied yet" if m.get("epoch_candidates") else f"{e} epochs")
            extra = f"; {m['note']}" if m.get("note") else ""
            budgets.append(f"{model}: {how}, batches {', '.join(map(str, self.batches(model)))}, seeds "
                           f"{', '.join(map(str, self.seeds(model)))}{extra}")
        clock, why = self.clock()
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
            f"- Machine: {self.env.get('cpus', '?')} CPUs, {self.env.get('threads', '?')} torch threads, "
            f"torch {self.env.get('torch', '?')}, Python {self.env.get('python', '?')}.",
            "",
        ]
        families: dict[str, list[str]] = {}
        for method in filter(self.known, s["methods"]):
            families.setdefault(self.family_of(method), []).append(method)
        if families:
            at = next(k for k, line in enumerate(lines) if line.startswith("- Base rates")) + 1
            lines.insert(at, "- Families, one tuned base rate each (the methods that coincide at the base batch): "
                         + "; ".join(f"{f}: {', '.join(ms)}" for f, ms in families.items()) + ".")
        return lines + self.amendments()

    def amendments(self) -> list[str]:
        """The protocol's amendments and the finished runs each set aside (phase "superseded")."""
        texts = self.spec.get("amendments") or []
        set_aside = [r for r in self.records if r["phase"] == "superseded"]
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
                accuracy = "; ".join(f"B = {b}: {_mean_sd(v)}% ({len(v)})" for b, v in sorted(cells.items()))
                lines.append(f"| {model} | {phase} | {method} | {warmup} | {lr:g} | {accuracy} | {because} |")
        return lines + [""]

    # -- the budget rule -------------------------------------------------------------------------
    def plateau_section(self, model: str) -> list[str]:
        decision = self.plateau.get(model)
        records = self.records_of(model, "plateau")
        if not decision:
            return []
        metric = decision.get("metric", "val")
        lines = [f"## {model}: the epoch budget (budget rule)", "",
                 f"Momentum SGD at b = {self.spec['base_batch']}, rate {decision.get('lr')}, each run with its whole "
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
            lines.append(f"| {e} | {_mean_sd([100 * r['final_val_accuracy'] for r in rs])} | "
                         f"{_mean_sd([100 * r['final_test_accuracy'] for r in rs])} | {len(rs)} |")
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
                                      f"{model}: base-batch convergence", self.artifacts / f"{model}-plateau.png")
            lines += ["", f"![{model}: final accuracy of the base batch against its epoch budget]({self.link(png)})"]
        return lines + [""]

    # -- tuning ------------------------------------------------------------------------------------
    def tuning_section(self, model: str) -> list[str]:
        entries = self.tuning.get(model, {})
        if not entries:
            return []
        lines = [f"## {model}: base-rate tuning (validation accuracy at b = {self.spec['base_batch']})", "",
                 "| family | final grid (validation accuracy %) | best rate | inside the grid | extended by |",
                 "|---|---|---|---|---|"]
        for family, entry in sorted(entries.items()):
            grid = ", ".join(f"{lr}: {100 * acc:.2f}" for lr, acc in
                             sorted(entry["grid"].items(), key=lambda kv: float(kv[0])))
            inside = _inside(entry)
            extended = ", ".join(f"{lr:g}" for lr in entry.get("extended", [])) or "-"
            best = entry.get("first_seed_lr", entry["lr"])
            lines.append(f"| {family} | {grid} | {best:g} | {'yes' if inside else '**no**'} | {extended} |")
        return lines + [""] + robustness.tune_seeds_lines(self, model)

    # -- Table 1 ------------------------------------------------------------------------------
    def main_table(self, model: str) -> list[str]:
        targets = self.targets(model)
        batches = self.batches(model)
        clock = "CPU" if self.clock()[0] == "cpu" else "wall"
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
        for method in self.spec["methods"]:
            row = [self.cell(model, method, b) for b in batches]
            if any(c != "-" for c in row):
                lines.append(f"| {method} | " + " | ".join(row) + " |")
        return lines + [""]

    def cell(self, model: str, method: str, batch: int) -> str:
        pairs = self.reached(model, method, batch)
        runs = self.runs(model, method=method, batch=batch)
        if not runs:
            return "-"
        acc = _mean_sd([100 * r.final_test_accuracy for r in runs]) + "%"
        hits = [h for _, h in pairs if h]
        diverged = [r.diverged_at_step for r in runs if r.diverged_at_step is not None]
        note = f" (diverged at {', '.join(map(str, diverged))})" if diverged else ""
        if not hits:
            return f"{acc} / never{note}"
        part = "" if len(hits) == len(pairs) else f" ({len(hits)}/{len(pairs)})"
        seconds = [s for s in (self.seconds_of(h) for h in hits) if s is not None]
        iters = [h["step"] for h in hits]
        it = _iters(_mean(iters)) + (f" ± {_iters(_sd(iters))}" if len(iters) > 1 else "")
        return f"{acc} / {it}{part} / {_mean_sd(seconds, '{:.1f}')} s{note}"

    # -- the key figure -----------------------------------------------------------------------------
    def iterations_series(self, model: str) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
        series: dict[str, dict[int, float]] = {}
        for method in self.spec["methods"]:
            points = {}
            for b in self.batches(model):
                hits = [h["step"] for _, h in self.reached(model, method, b) if h]
                if hits:
                    points[b] = _mean(hits)
            if any(self.runs(model, method=method, batch=b) for b in self.batches(model)):
                series[method] = points
        base = self.spec["base_batch"]
        at_base = [h["step"] for _, h in self.reached(model, BASELINE, base) if h]
        perfect = {b: _mean(at_base) * base / b for b in self.batches(model)} if at_base else {}
        return series, perfect

    def scaling_section(self, model: str) -> list[str]:
        series, perfect = self.iterations_series(model)
        if not any(series.values()):
            return []
        png = plots.iterations_to_target(series, perfect, f"{model}: iterations to the base batch's accuracy",
                                         self.artifacts / f"{model}-iterations-to-target.png")
        return [f"## {model}: iterations to target against batch size", "",
                "Log-log, mean over the seeds that reached the target (a batch no seed reached is left out of "
                "the method's line); dashed: perfect scaling, the base batch's iterations x b / B.", "",
                f"![{model}: iterations to target against batch size]({self.link(png)})", ""]

    # -- AdaScale ------------------------------------------------------------------------------------
    def adascale_section(self, model: str) -> list[str]:
        records = sorted([r for r in self.records_of(model) if r.get("stopped")],
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

    # -- LENA's mechanism ----------------------------------------------------------------------------
    def lena_section(self, model: str) -> list[str]:
        panels = {}
        for b in self.large(model):
            for r in self.records_of(model, method="lena", batch=b):
                series = r.get("layer_series")
                if series and series["quantity"] == "gains":
                    panels[f"B = {b}, seed {r['seed']}"] = (series["step"], series["values"])
        lines = []
        if panels:
            png = plots.layer_series_panels(panels, "gain r_k", f"{model}: LENA's per-layer gains over training",
                                            self.artifacts / f"{model}-lena-gains.png")
            lines += [f"## {model}: LENA's per-layer gains and warm-up", "",
                      "The gain r_k of each layer (parameter tensor) over the updates, at each batch (at most n = "
                      "B/b); the warm-up of a layer ends when its progress S_k = sum of its gains reaches theta.", "",
                      f"![{model}: LENA's per-layer gains]({self.link(png)})", ""]
        return lines + self.warmup_ends_plot(model, heading=not lines)

    def warmup_ends_plot(self, model: str, heading: bool = False) -> list[str]:
        ends: dict[str, list[dict[str, float]]] = {}
        references: dict[str, float] = {}
        for b in self.large(model):
            records = [r for r in self.records if r["model"] == model and r["method"] == "lena"
                       and r["batch"] == b and r.get("warmup_ends") and r["warmup"] in ("default", "state-aware")]
            if records:
                ends[f"LENA, B = {b}"] = [r["warmup_ends"] for r in records]
            fixed = self.records_of(model, "sweep", method="lsw", batch=b)
            if fixed and fixed[0].get("warmup_steps") and b in self.ablation_batches(model):
                references[f"fixed warm-up end, B = {b}"] = fixed[0]["warmup_steps"]
        if not ends:
            return []
        unfinished = {label: sorted({layer for run in runs for layer, end in run.items() if end < 0})
                      for label, runs in ends.items()}
        png = plots.warmup_ends_by_layer(ends, references, f"{model}: per-layer state-aware warm-up end points",
                                         self.artifacts / f"{model}-warmup-ends.png")
        lines = [f"## {model}: LENA's per-layer warm-up", ""] if heading else []
        return lines + [
            "Per-layer warm-up end points of LENA (LENA paper, Fig. 7): the update at which each layer's progress "
            "S_k reached theta; bars: mean over seeds, whiskers: the seeds' range; dashed: where the fixed "
            "warm-up of LSW ends at the same batch.", "",
            f"![{model}: per-layer warm-up end points]({self.link(png)})", "",
        ] + [f"Still warming up when the run ended ({label}, some seed): {', '.join(layers)}." + "\n"
             for label, layers in unfinished.items() if layers]

    # -- CLARS -----------------------------------------------------------------------------------------
    def early(self, model: str, method: str, batch: int, epoch: int) -> list[float]:
        return [a for a in (_accuracy_at_epoch(r, epoch) for r in self.runs(model, method=method, batch=batch))
                if a is not None]

    def clars_section(self, model: str) -> list[str]:
        early = self.spec.get("early_epochs", 2)
        large = self.large(model)
        methods = [m for m in EARLY_METHODS if self.runs(model, method=m)]
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
                runs = self.runs(model, method=m, batch=b)
                if not runs:
                    continue
                cells = [_mean_sd([100 * v for v in self.early(model, m, b, e)]) for e in range(1, early + 1)]
                final = _mean_sd([100 * r.final_test_accuracy for r in runs])
                lines.append(f"| {b} | {m} | " + " | ".join(cells) + f" | {final} |")
        lines.append("")
        targets = self.targets(model)
        mean_target = statistics.fmean(targets.values()) if targets else None
        for b in large[-2:]:
            curves = {m: [([e["epoch"] for e in r.evals], [e["test_accuracy"] for e in r.evals])
                          for r in self.runs(model, method=m, batch=b)] for m in methods}
            curves = {m: c for m, c in curves.items() if c and all(x for x, _ in c)}
            if not curves:
                continue
            title = f"{model}, batch {b}: first {early} epoch{'s' if early != 1 else ''}"
            png = plots.early_epochs(curves, mean_target, early, title,
                                     self.artifacts / f"{model}-clars-early-b{b}.png")
            lines += [f"![{model}: CLARS vs gradual warm-up, first epochs, batch {b}]({self.link(png)})", ""]
        panels = {}
        for b in large[-2:]:
            for m in ("clars", "lars"):
                for r in self.records_of(model, method=m, batch=b):
                    series = r.get("layer_series")
                    if series and series["quantity"] == "trust_ratios":
                        panels[f"{m.upper()}, B = {b}, seed {r['seed']}"] = (series["step"], series["values"])
        if panels:
            png = plots.layer_series_panels(panels, "trust ratio", f"{model}: per-layer trust ratios, CLARS vs LARS",
                                            self.artifacts / f"{model}-trust-ratios.png", log_y=True,
                                            share_y=True)
            lines += ["Per-layer trust ratios eta_trust ||w|| / (gradient measure + beta ||w||): CLARS divides by "
                      "the mean of the per-example gradient norms, LARS by the norm of the mini-batch gradient, so "
                      "CLARS's ratios are at most LARS's for the same weights and gradients; LARS's rate also "
                      "carries its gradual warm-up, which the ratio does not show.", "",
                      f"![{model}: trust ratios of CLARS and LARS]({self.link(png)})", ""]
        return lines

    # -- ablation ------------------------------------------------------------------------------
    def ablation_gains(self, model: str) -> dict[str, dict[int, float]]:
        """Per method and batch: final accuracy with the state-aware warm-up minus the best other mode."""
        modes = self.spec.get("ablation_modes", ["none", "fixed", "state-aware"])
        gains: dict[str, dict[int, float]] = defaultdict(dict)
        for method in self.spec.get("ablation_methods", []):
            for b in self.ablation_batches(model):
                finals = {mode: _mean([r.final_test_accuracy for r in self.ablation_run(model, method, mode, b)])
                          for mode in modes}
                finals = {m: v for m, v in finals.items() if not math.isnan(v)}
                if "state-aware" in finals and len(finals) > 1:
                    gains[method][b] = finals["state-aware"] - max(v for m, v in finals.items() if m != "state-aware")
        return gains

    def ablation_section(self, model: str) -> list[str]:
        modes = self.spec.get("ablation_modes", ["none", "fixed", "state-aware"])
        methods = self.spec.get("ablation_methods", [])
        if not methods:
            return []
        batches = self.ablation_batches(model)
        seeds = self.spec.get("ablation_seeds")
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
        targets = self.targets(model)
        for method in methods:
            row = []
            for b in batches:
                for mode in modes:
                    runs = self.ablation_run(model, method, mode, b)
                    if not runs:
                        row.append("-")
                        continue
                    reached = [r.reaches(targets[r.seed]) for r in runs if r.seed in targets]
                    iters = [h["step"] for h in reached if h]
                    it = "never" if not iters else f"{_mean(iters):.0f}" + (
                        "" if len(iters) == len(reached) else f" ({len(iters)}/{len(reached)})")
                    row.append(f"{_mean_sd([100 * r.final_test_accuracy for r in runs])} / {it}")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        return lines + [""]

    # -- cost ------------------------------------------------------------------------------------
    def per_update(self, model: str) -> dict[tuple[str, int], list[float]]:
        key = "train_cpu_seconds" if self.clock()[0] == "cpu" else "train_seconds"
        out: dict[tuple[str, int], list[float]] = defaultdict(list)
        for r in self.records_of(model, "sweep"):
            if r["steps"] and r.get(key) is not None:
                out[(r["method"], r["batch"])].append(r[key] / r["steps"])
        return out

    def timing_disturbed(self, model: str) -> tuple[bool, list[float]]:
        """sgd and lsw do the same work per update: their ratio off 1 by more than 10% means the machine's
        load moved the times more than the methods differ."""
        per = self.per_update(model)
        same = [_mean(per[("sgd", b)]) / _mean(per[("lsw", b)]) for b in self.large(model)
                if per.get(("sgd", b)) and per.get(("lsw", b))]
        return any(abs(r - 1) > 0.1 for r in same), same

    def throughput_section(self, model: str) -> list[str]:
        per = self.per_update(model)
        batches = [b for b in self.large(model) if per.get(("lsw", b))]
        if not batches:
            return []
        clock = "CPU" if self.clock()[0] == "cpu" else "wall"
        lines = [f"## {model}: training time per update relative to LSW ({clock} time, same batch)", "",
                 "| method | " + " | ".join(f"B = {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
        for method in self.spec["methods"]:
            cells = [f"{_mean(per[(method, b)]) / _mean(per[('lsw', b)]):.2f}" if per.get((method, b)) else "-"
                     for b in batches]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        disturbed, same = self.timing_disturbed(model)
        if disturbed:
            lines += ["", f"The machine's load moved these times (sgd / lsw, the same work per update: "
                      f"{min(same):.2f}-{max(same):.2f}); benchmarks/results holds interleaved measurements."]
        return lines + [""]

    def time_section(self) -> list[str]:
        clock, why = self.clock()
        loads = [v for r in self.records for v in (r.get("load") or []) if v]
        loads = [x[0] if isinstance(x, list) else x for x in loads]
        lines = ["## Time measurement", "",
                 f"Times to target and per update use the **{'process CPU' if clock == 'cpu' else 'wall'} clock**: "
                 f"{why}. Every run records both (training only, evaluation excluded) and the machine's load average "
                 "at its start, its end and each check."]
        if loads:
            lines.append(f"The 1-minute load average over the runs ranged from {min(loads):.1f} to {max(loads):.1f} "
                         f"on {self.env.get('cpus', '?')} CPUs.")
        return lines + [""]

    def overheads(self) -> list[str]:
        root = Path(self.spec.get("benchmarks", "benchmarks/results"))
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

    def headline(self, batch: int | None = None) -> list[str]:
        common = set.intersection(*(set(self.batches(m)) for m in self.models)) if self.models else set()
        batch = batch or (max(common) if common else None)
        if batch is None:
            return ["(no batch common to every model)"]
        methods = [m for m in self.spec["methods"] if any(self.runs(model, method=m, batch=batch)
                                                          for model in self.models)]
        lines = [f"Test accuracy (%) at B = {batch}, mean over seeds ({self.spec['name']}):", "",
                 "| | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for model in self.models:
            targets = self.targets(model)
            label = f"{model} (target {100 * _mean(list(targets.values())):.1f})" if targets else model
            cells = [f"{100 * _mean([r.final_test_accuracy for r in self.runs(model, method=m, batch=batch)]):.1f}"
                     if self.runs(model, method=m, batch=batch) else "-" for m in methods]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return lines

    def commands(self) -> list[str]:
        name = self.spec["name"]
        how = f"--spec {self.spec['spec_file']}" if self.spec.get("spec_file") else f"--preset {name}"
        model = self.models[0]
        return [
            "## Regenerating", "",
            "Every table, plot and verdict on this page, from the committed run summaries "
            f"({self.link(self.artifacts / 'summaries.json')}), without training:", "",
            "```sh", f"largebatch study {how} --report-only", "```", "",
            "The whole study (runs only what has not finished; it prints its estimate first):", "",
            "```sh", f"largebatch study {how} --commit", "```", "",
            "One run of it, e.g. LENA without its warm-up at the largest batch, seed 0 "
            "(`config.json` in each run directory holds the full configuration):", "",
            "```sh",
            f"largebatch train --method lena --warmup none --model {model} "
            f"--batch {max(self.batches(model))} --micro-batch {self.spec['micro_batch']} "
            f"--epochs {self.epochs(model) or '<E>'} --lr <tuned sgd-family rate> --run-dir runs/one",
            "```", "",
        ]

    # -- verdicts ------------------------------------------------------------------------------------
    def verdicts(self) -> list[Verdict]:
        """Every claim of every paper this study can judge, per model, from the summaries alone."""
        out: list[Verdict] = []
        for model in self.models:
            if not self.targets(model):
                continue
            for v in (self.reaches_everywhere(model, "lena", "LENA paper"),
                      *self.fewer_iterations(model),
                      *self.never_at_largest(model),
                      self.lena_throughput(model),
                      self.state_aware_most_at_largest(model),
                      *self.clars_claims(model),
                      self.reaches_everywhere(model, "adascale", "AdaScale paper")):
                if v is not None:
                    caveat = self.caveats(model, v.methods)
                    if caveat and v.status != INCONCLUSIVE:
                        v.numbers += f" Caveat: {caveat}."
                    out.append(v)
        return out

    def family_of(self, method: str) -> str:
        """The family whose tuned rate the method's runs carry: today's, or the one it had when these
        summaries were written (CLARS carried LARS's rate before the study v2's amendment)."""
        family = self.method_table[method]["family"]
        tuned = {f for entries in self.tuning.values() for f in entries}
        earlier = _EARLIER_FAMILIES.get(method)
        return earlier if tuned and family not in tuned and earlier in tuned else family

    def caveats(self, model: str, methods: tuple[str, ...] = ()) -> str:
        """What weakens a verdict on ``methods``: an unconverged target, a rate at an end of its grid."""
        notes = []
        decision = self.plateau.get(model)
        if decision and decision.get("rule_met") is False:
            notes.append("the base batch had not converged by the budget rule at any candidate")
        families = {self.family_of(m) for m in methods if self.known(m)}
        for family, entry in sorted(self.tuning.get(model, {}).items()):
            if family in families and not _inside(entry):
                notes.append(f"the {family} family's best rate is an end of its tuning grid")
        return "; ".join(notes)

    def reaches_everywhere(self, model: str, method: str, paper: str) -> Verdict | None:
        large = [b for b in self.large(model) if self.runs(model, method=method, batch=b)]
        if not large:
            return None
        parts, statuses = [], []
        for b in large:
            pairs = self.reached(model, method, b)
            k = sum(1 for _, h in pairs if h)
            statuses.append(reach_status(k, len(pairs)))
            parts.append(f"B = {b}: {k}/{len(pairs)} seeds")
        missing = [b for b in self.large(model) if b not in large]
        status = NOT_HELD if NOT_HELD in statuses else HELD if all(s == HELD for s in statuses) else INCONCLUSIVE
        if missing and status == HELD:
            status = INCONCLUSIVE
        extra = f"; not run yet at B = {', '.join(map(str, missing))}" if missing else ""
        if method == "adascale":
            stops = [r for b in large for r in self.records_of(model, method=method, batch=b) if r.get("stopped")]
            capped = sum(r["stopped"] == "cap" for r in stops)
            extra += f"; {capped} of {len(stops)} runs stopped at the cap before tau reached T1" if stops else ""
        return Verdict(paper, f"{method} reaches the base batch's test accuracy at every batch size", model, status,
                       "Reached by " + ", ".join(parts) + extra + ".", (method,))

    def fewer_iterations(self, model: str) -> list[Verdict]:
        out = []
        for rival in (ADASCALE_BASELINE, "lsw"):
            if rival not in self.spec["methods"] or "lena" not in self.spec["methods"]:
                continue
            parts, statuses, ran = [], [], False
            for b in self.large(model):
                mine, theirs = self.reached(model, "lena", b), self.reached(model, rival, b)
                if not mine or not theirs:
                    parts.append(f"B = {b}: not run yet")
                    statuses.append(INCONCLUSIVE)
                    continue
                ran = True
                a = [h["step"] for _, h in mine if h]
                c = [h["step"] for _, h in theirs if h]
                if not a and not c:  # not judged here, so the claim "at every large batch" cannot hold
                    parts.append(f"B = {b}: neither reaches the target")
                    statuses.append(INCONCLUSIVE)
                    continue
                if len(a) == len(mine) and not c:
                    status = HELD
                elif not a and c:
                    status = NOT_HELD
                elif len(a) == len(mine) and len(c) == len(theirs):
                    status = compare(a, c, higher_is_better=False)
                else:
                    status = INCONCLUSIVE
                statuses.append(status)
                fa = f"{_mean(a):.0f}" + ("" if len(a) == len(mine) else f" ({len(a)}/{len(mine)} seeds)") if a \
                    else "never"
                fc = f"{_mean(c):.0f}" + ("" if len(c) == len(theirs) else f" ({len(c)}/{len(theirs)} seeds)") if c \
                    else "never"
                parts.append(f"B = {b}: {fa} vs {fc} ({status})")
            if not ran:
                continue
            out.append(Verdict("LENA paper", f"LENA needs fewer iterations to target than {rival} at every large "
                               "batch", model, combine(statuses),
                               "Iterations to target, LENA vs " + rival + ": " + "; ".join(parts) + ".",
                               ("lena", rival)))
        return out

    def never_at_largest(self, model: str) -> list[Verdict]:
        out = []
        top = max(self.batches(model))
        if top <= self.spec["base_batch"]:
            return out
        for rival in ("lsw", ADASCALE_BASELINE):
            pairs = self.reached(model, rival, top)
            if not pairs:
                continue
            k = sum(1 for _, h in pairs if h)
            status = HELD if k == 0 else NOT_HELD if k == len(pairs) else INCONCLUSIVE
            out.append(Verdict("LENA paper", f"{rival} never reaches the target at the largest batch (B = {top})",
                               model, status, f"Reached by {k}/{len(pairs)} seeds; final test accuracy "
                               f"{_mean_sd([100 * r.final_test_accuracy for r, _ in pairs])}%.", (rival,)))
        return out

    def lena_throughput(self, model: str) -> Verdict | None:
        per = self.per_update(model)
        ratios = [_mean(per[("lena", b)]) / _mean(per[("lsw", b)]) for b in self.large(model)
                  if per.get(("lena", b)) and per.get(("lsw", b))]
        if not ratios:
            return None
        slowdown = _mean(ratios) - 1
        disturbed, same = self.timing_disturbed(model)
        clock = "CPU" if self.clock()[0] == "cpu" else "wall"
        if disturbed:
            status, why = INCONCLUSIVE, (f"; the machine's load moved the times (sgd / lsw, the same work: "
                                         f"{min(same):.2f}-{max(same):.2f})")
        else:
            status, why = (HELD if slowdown <= 0.075 else NOT_HELD), " (held: at most 7.5% slower)"
        return Verdict("LENA paper", "LENA's time per update is about 5% above fixed scaling's (LSW)", model, status,
                       f"Measured {100 * slowdown:+.1f}% ({clock} time per update, mean over the large batches){why}.")
        # (a timing claim: no tuning caveat)

    def state_aware_most_at_largest(self, model: str) -> Verdict | None:
        gains = self.ablation_gains(model)
        batches = self.ablation_batches(model)
        if not gains or len(batches) < 2:
            return None
        top, second = batches[-1], batches[-2]
        parts, statuses = [], []
        for method, g in gains.items():
            if top not in g:
                continue
            noise = _sd([r.final_test_accuracy for r in self.runs(model, method=method, batch=top)])
            if g[top] > noise and g[top] > g.get(second, -math.inf):
                status = HELD
            elif g[top] < -noise or (second in g and g[top] < g[second] - noise):
                status = NOT_HELD
            else:
                status = INCONCLUSIVE
            statuses.append(status)
            parts.append(f"{method} {100 * g[top]:+.2f} at {top}" + (f" vs {100 * g[second]:+.2f} at {second}"
                                                                     if second in g else "") + f" ({status})")
        if not parts:
            return None
        return Verdict("LENA paper, Table 2", "the state-aware warm-up helps every method, most at the largest batch",
                       model, combine(statuses),
                       "Final accuracy with the state-aware warm-up minus the better of none and fixed, in points "
                       "(noise: the seeds' standard deviation in the main sweep): " + "; ".join(parts) + ".",
                       tuple(gains))

    def clars_claims(self, model: str) -> list[Verdict]:
        if "clars" not in self.spec["methods"]:
            return []
        out = []
        for rival, what in (("lsw", "momentum SGD with gradual warm-up"), ("lars", "LARS with gradual warm-up")):
            parts, statuses = [], []
            for b in self.large(model):
                mine, theirs = self.early(model, "clars", b, 1), self.early(model, rival, b, 1)
                if not mine or not theirs:
                    continue
                status = compare(mine, theirs)
                statuses.append(status)
                parts.append(f"B = {b}: {100 * _mean(mine):.2f}% vs {100 * _mean(theirs):.2f}% ({status})")
            if parts:
                out.append(Verdict("CLARS paper", f"CLARS without warm-up is ahead of {what} after the first epoch",
                                   model, combine(statuses), "Test accuracy after epoch 1: " + "; ".join(parts) + ".",
                                   ("clars", rival)))
        parts, statuses = [], []
        for b in self.large(model):
            mine = [r.final_test_accuracy for r in self.runs(model, method="clars", batch=b)]
            theirs = [r.final_test_accuracy for r in self.runs(model, method="lars", batch=b)]
            if not mine or not theirs:
                continue
            status = compare(mine, theirs)
            statuses.append(status)
            parts.append(f"B = {b}: {100 * _mean(mine):.2f}% vs {100 * _mean(theirs):.2f}% ({status})")
        if parts:
            out.append(Verdict("CLARS paper", "CLARS ends more accurate than LARS with gradual warm-up", model,
                               combine(statuses), "Final test accuracy: " + "; ".join(parts) + ".",
                               ("clars", "lars")))
        return out


# method -> the family it belonged to before it got its own (summaries written then tuned only that one)
_EARLIER_FAMILIES = {"clars": "lars"}


def _inside(entry: dict) -> bool:
    if "inside" in entry:
        return bool(entry["inside"])
    rates = sorted(float(lr) for lr in entry.get("grid", {}))
    return len(rates) > 2 and rates[0] < entry["lr"] < rates[-1]


def _accuracy_at_epoch(run: RunResult, epoch: int) -> float | None:
    """Test accuracy at the end of epoch ``epoch`` (the evaluation at that epoch boundary)."""
    for e in run.evals:
        if abs(e["epoch"] - epoch) < 1e-6:
            return e["test_accuracy"]
    return None


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

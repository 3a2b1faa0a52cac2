"""The study's results page (docs/results.md), written from its summaries.json alone.

Sections: the protocol as run; per model, the LENA paper's Table 1 analogue;
CLARS against gradual warm-up in the first epochs and against LARS with
warm-up; the warm-up ablation at the two largest batches with the per-layer
warm-up end points; the measured overheads (benchmarks/results/*.json); each
paper claim checked against the numbers; the commands that regenerate it all.

A claim "held" when the means over seeds say so; where the difference is
smaller than the seeds' standard deviation the verdict says so too.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

from ..train.metrics import read_json
from . import plots
from .results import Cell, RunResult, table

BASELINE = "sgd"
EARLY_METHODS = ("clars", "lsw", "lars")  # CLARS (no warm-up) against gradual warm-up


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


def _result(record: dict) -> RunResult:
    evals = record.get("evals") or {"step": [], "epoch": [], "seconds": [], "accuracy": []}
    rows = [
        {"step": s, "epoch": e, "train_seconds": t, "test_accuracy": a}
        for s, e, t, a in zip(evals["step"], evals["epoch"], evals["seconds"], evals["accuracy"])
    ]
    return RunResult(record["method"], record["batch"], record["seed"], record["final_test_accuracy"],
                     record["steps"], record["train_seconds"], rows, Path(record["run"]),
                     record.get("diverged_at_step"))


def _mean_sd(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(statistics.stdev(values))}"


def _grid_edge(entry: dict) -> str | None:
    """"largest"/"smallest" when the chosen rate is an end of its tuning grid, else None."""
    rates = sorted(float(lr) for lr in entry.get("grid", {}))
    if len(rates) < 2:
        return None
    return "largest" if entry["lr"] == rates[-1] else "smallest" if entry["lr"] == rates[0] else None


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


class Study:
    def __init__(self, data: dict, artifacts: Path, page_dir: Path):
        self.spec, self.tuning, self.env = data["spec"], data.get("tuning", {}), data.get("environment", {})
        self.records = data["runs"]
        self.artifacts, self.page_dir = artifacts, page_dir
        self.models = [m["name"] for m in self.spec["models"]]
        self.epochs = {m["name"]: m["epochs"] for m in self.spec["models"]}
        self.ablation_batches = self.spec.get("ablation_batches") or sorted(self.spec["batches"])[-2:]
        self.verdicts: list[str] = []

    # -- helpers ------------------------------------------------------------------------------
    def runs(self, model: str, phase: str = "sweep", **match) -> list[RunResult]:
        return [_result(r) for r in self.records if r["model"] == model and r["phase"] == phase
                and all(r.get(k) == v for k, v in match.items())]

    def records_of(self, model: str, phase: str, **match) -> list[dict]:
        return [r for r in self.records if r["model"] == model and r["phase"] == phase
                and all(r.get(k) == v for k, v in match.items())]

    def targets(self, model: str) -> dict[int, float]:
        base = self.spec["base_batch"]
        return {r.seed: r.final_test_accuracy for r in self.runs(model, method=BASELINE, batch=base)}

    def link(self, png: Path) -> str:
        return Path(os.path.relpath(png, self.page_dir)).as_posix()

    def ablation_run(self, model: str, method: str, mode: str, batch: int) -> list[RunResult]:
        """The ablation's runs of (method, mode, batch): trained for the ablation, or the sweep's equal run."""
        own = self.runs(model, "ablation", method=method, warmup=mode, batch=batch)
        if own:
            return own
        from ..train.study import same_run_in_sweep

        same = same_run_in_sweep(method, mode, self.spec["methods"])
        return self.runs(model, method=same, batch=batch) if same else []

    # -- the page -----------------------------------------------------------------------------
    def page(self) -> list[str]:
        lines = [f"# Results: the large-batch study ({self.spec['name']})", ""]
        lines += self.protocol()
        for model in self.models:
            lines += self.main_table(model)
            lines += self.clars_section(model)
            lines += self.ablation_section(model)
            lines += self.throughput_section(model)
        lines += self.overheads()
        lines += ["## Claims: where they held and where not", "",
                  "Each line compares means over seeds; \"within the spread\" marks a difference smaller than "
                  "the seeds' standard deviation.", ""]
        lines += [f"- {v}" for v in self.verdicts] or ["- (no finished runs to check claims against)"]
        lines += [""] + self.commands()
        return lines

    def protocol(self) -> list[str]:
        s = self.spec
        lines = [
            "## Protocol (fixed before the runs, the same for every method)", "",
            f"- Data: {s['dataset']}, one seeded split (seed {s['split_seed']}) of the training set into "
            f"{s['val_size']} validation images and the rest for training"
            + (f" (first {s['train_limit']} kept)" if s.get("train_limit") else "")
            + "; accuracy reported on the held-out test set"
            + (f" (first {s['test_limit']} images)" if s.get("test_limit") else "") + ", never used for tuning.",
            "- Models and epoch budgets: " + ", ".join(f"{m['name']} {m['epochs']} epochs" for m in s["models"])
            + "; the same budget at every batch size.",
            f"- Base batch b = {s['base_batch']}; batches {', '.join(map(str, s['batches']))}; every batch is "
            f"formed from micro-batches of {s['micro_batch']} (gradient accumulation, n = B/b gradient samples "
            "per update for the methods that measure statistics).",
            f"- Methods: {', '.join(s['methods'])} (see `largebatch methods`); seeds {', '.join(map(str, s['seeds']))}.",
            f"- Base rates: tuned at the base batch only, seed {s['seeds'][0]}, on the validation split, over the "
            f"grid {', '.join(f'{lr:g}' for lr in s['tune_grid'])} (the same grid for every method family); each "
            "method carries its family's rate to the large batch by its own rule. No tuning at large batches.",
            "- Schedules: momentum 0.9, weight decay 5e-4, exponential decay to 1% of the rate over the run; "
            "gradual warm-up over 5.5% of the epochs; LENA's state-aware warm-up with alpha = 5%.",
            "- Target: per seed, the final test accuracy of momentum SGD at the base batch with the same budget. "
            f"Test accuracy is checked {s['evals_per_epoch']} times per epoch; iterations and time to target are "
            "those of the first check at or above the target; \"never\" if none is.",
            "- Time: training wall-clock seconds (evaluation excluded). A layer is one parameter tensor.",
            f"- Machine: {self.env.get('cpus', '?')} CPUs, {self.env.get('threads', '?')} torch threads, "
            f"torch {self.env.get('torch', '?')}, Python {self.env.get('python', '?')}.",
            "",
        ]
        for model in self.models:
            for family, entry in sorted(self.tuning.get(model, {}).items()):
                grid = ", ".join(f"{lr}: {100 * acc:.2f}%" for lr, acc in entry["grid"].items())
                lines.append(f"- {model}, {family} family: base rate {entry['lr']:g} (validation accuracy {grid}).")
                edge = _grid_edge(entry)
                if edge:
                    note = (f"{model}, {family} family: the best base rate is the {edge} of the tuning grid, so the "
                            f"optimum may lie beyond it and the family's methods may be under-tuned here")
                    lines.append(f"  **Caveat:** {note}.")
                    self.verdicts.append(f"Protocol caveat: {note}.")
        return lines + [""]

    # -- Table 1 ------------------------------------------------------------------------------
    def main_table(self, model: str) -> list[str]:
        runs, target_of = self.runs(model), self.targets(model)
        cells = table(runs, target_of)
        batches = sorted({b for _, b in cells})
        lines = [
            f"## {model}: test accuracy, iterations and time to target (LENA paper, Table 1)", "",
            "Targets: " + (", ".join(f"seed {s}: {100 * a:.2f}%" for s, a in sorted(target_of.items()))
                           or f"none ({BASELINE} at the base batch has not finished)"), "",
            "Each cell: final test accuracy / iterations to target / time to target, mean ± standard deviation "
            "over seeds (\"never\": no check reached the target; \"k/n seeds\": reached by k of n).", "",
            "| method | " + " | ".join(f"B = {b}" for b in batches) + " |",
            "|---|" + "---|" * len(batches),
        ]
        for method in [m for m in self.spec["methods"] if any(k[0] == m for k in cells)]:
            row = [cells[(method, b)].text() if (method, b) in cells else "-" for b in batches]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        self._lena_claims(model, cells, batches)
        return lines + [""]

    def _lena_claims(self, model: str, cells: dict[tuple[str, int], Cell], batches: list[int]) -> None:
        large = [b for b in batches if b > self.spec["base_batch"]]
        if not large or not any(("lena", b) in cells for b in large):
            return
        missed = [b for b in large if ("lena", b) in cells and None in cells[("lena", b)].iterations]
        self.verdicts.append(
            f"{model}, LENA reaches the base-batch target at every batch size (LENA paper): "
            + ("held." if not missed else f"did not hold at B = {', '.join(map(str, missed))}.")
        )
        for rival in ("adascale", "lsw"):
            for b in large:
                mine, theirs = cells.get(("lena", b)), cells.get((rival, b))
                if mine is None or theirs is None:
                    continue
                a = [i for i in mine.iterations if i is not None]
                c = [i for i in theirs.iterations if i is not None]
                if not a:
                    continue
                if not c:
                    self.verdicts.append(f"{model}, B = {b}: LENA reaches the target, {rival} never (held).")
                    continue
                diff = statistics.fmean(c) - statistics.fmean(a)
                spread = max(_sd(a), _sd(c))
                verdict = "held" if diff > 0 else "did not hold"
                close = " (within the spread)" if abs(diff) <= spread else ""
                self.verdicts.append(
                    f"{model}, B = {b}: LENA needs fewer iterations to target than {rival} "
                    f"({statistics.fmean(a):.0f} vs {statistics.fmean(c):.0f}): {verdict}{close}."
                )
        top = max(large)
        for rival in ("lsw", "adascale"):
            if (rival, top) in cells:
                never = all(i is None for i in cells[(rival, top)].iterations)
                self.verdicts.append(
                    f"{model}, B = {top}: {rival} never reaches the target (the LENA paper's finding at its "
                    f"largest batch): {'held' if never else 'did not hold'}."
                )

    # -- CLARS ---------------------------------------------------------------------------------
    def clars_section(self, model: str) -> list[str]:
        early = self.spec.get("early_epochs", 2)
        large = [b for b in sorted(self.spec["batches"]) if b > self.spec["base_batch"]]
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
            at = {}
            for m in methods:
                runs = self.runs(model, method=m, batch=b)
                if not runs:
                    continue
                per_epoch = [[_accuracy_at_epoch(r, e) for r in runs] for e in range(1, early + 1)]
                at[m] = per_epoch
                cells = [_mean_sd([100 * v for v in vals if v is not None]) for vals in per_epoch]
                final = _mean_sd([100 * r.final_test_accuracy for r in runs])
                lines.append(f"| {b} | {m} | " + " | ".join(cells) + f" | {final} |")
            self._clars_claims(model, b, at)
        lines.append("")
        target = self.targets(model)
        mean_target = statistics.fmean(target.values()) if target else None
        for b in large[-2:]:
            curves = {m: [([e["epoch"] for e in r.evals], [e["test_accuracy"] for e in r.evals])
                          for r in self.runs(model, method=m, batch=b)] for m in methods}
            curves = {m: c for m, c in curves.items() if c and all(x for x, _ in c)}
            if not curves:
                continue
            title = f"{model}, batch {b}: first {early} epoch{'s' if early != 1 else ''}"
            png = plots.early_epochs(curves, mean_target, early, title, self.artifacts / f"{model}-clars-early-b{b}.png")
            lines += [f"![{model}: CLARS vs gradual warm-up, first epochs, batch {b}]({self.link(png)})", ""]
        return lines

    def _clars_claims(self, model: str, batch: int, at: dict[str, list[list[float | None]]]) -> None:
        if "clars" not in at:
            return
        for rival, claim in (("lsw", "faster early-epoch progress than gradual warm-up"),
                             ("lars", "faster early-epoch progress than LARS with warm-up")):
            if rival not in at:
                continue
            mine = [v for v in at["clars"][0] if v is not None]
            theirs = [v for v in at[rival][0] if v is not None]
            if not mine or not theirs:
                continue
            diff = statistics.fmean(mine) - statistics.fmean(theirs)
            close = " (within the spread)" if abs(diff) <= max(_sd(mine), _sd(theirs)) else ""
            self.verdicts.append(
                f"{model}, B = {batch}: CLARS {claim}, test accuracy after epoch 1 "
                f"{100 * statistics.fmean(mine):.2f}% vs {100 * statistics.fmean(theirs):.2f}% ({rival}): "
                f"{'held' if diff > 0 else 'did not hold'}{close}."
            )
        if "lars" in at:
            mine = [r.final_test_accuracy for r in self.runs(model, method="clars", batch=batch)]
            theirs = [r.final_test_accuracy for r in self.runs(model, method="lars", batch=batch)]
            diff = statistics.fmean(mine) - statistics.fmean(theirs)
            close = " (within the spread)" if abs(diff) <= max(_sd(mine), _sd(theirs)) else ""
            self.verdicts.append(
                f"{model}, B = {batch}: CLARS ends at least as accurate as LARS with warm-up "
                f"({100 * statistics.fmean(mine):.2f}% vs {100 * statistics.fmean(theirs):.2f}%): "
                f"{'held' if diff >= 0 else 'did not hold'}{close}."
            )

    # -- ablation ------------------------------------------------------------------------------
    def ablation_section(self, model: str) -> list[str]:
        modes = self.spec.get("ablation_modes", ["none", "fixed", "state-aware"])
        methods = self.spec.get("ablation_methods", [])
        if not methods:
            return []
        batches = self.ablation_batches
        lines = [
            f"## {model}: warm-up ablation (LENA paper, Table 2)", "",
            "Final test accuracy (%) / iterations to target, mean over seeds, for each method with no warm-up, "
            "fixed gradual warm-up and the state-aware warm-up (`--warmup none|fixed|state-aware`). For a "
            "fixed-scaling method the state-aware warm-up is a linear ramp over 5% of the updates from about 0 "
            "(its gain is B/b for every layer); for AdaScale it follows the tau clock; LENA's is per layer.", "",
            "| method | " + " | ".join(f"B = {b}, {m}" for b in batches for m in modes) + " |",
            "|---|" + "---|" * (len(batches) * len(modes)),
        ]
        targets = self.targets(model)
        gains: dict[str, dict[int, float]] = defaultdict(dict)
        for method in methods:
            row = []
            for b in batches:
                finals = {}
                for mode in modes:
                    runs = self.ablation_run(model, method, mode, b)
                    if not runs:
                        row.append("-")
                        continue
                    finals[mode] = statistics.fmean(r.final_test_accuracy for r in runs)
                    reached = [r.reaches(targets[r.seed]) for r in runs if r.seed in targets]
                    iters = [h["step"] for h in reached if h]
                    it = "never" if not iters else f"{statistics.fmean(iters):.0f}" + (
                        "" if len(iters) == len(reached) else f" ({len(iters)}/{len(reached)})")
                    row.append(f"{_mean_sd([100 * r.final_test_accuracy for r in runs])} / {it}")
                if "state-aware" in finals and len(finals) > 1:
                    others = [v for m, v in finals.items() if m != "state-aware"]
                    gains[method][b] = finals["state-aware"] - max(others)
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append("")
        self._ablation_claims(model, gains, batches)
        return lines + self.warmup_ends_plot(model)

    def _ablation_claims(self, model: str, gains: dict[str, dict[int, float]], batches: list[int]) -> None:
        if not gains:
            return
        top = max(batches)
        helped = [m for m, g in gains.items() if g.get(top, -1) > 0]
        self.verdicts.append(
            f"{model}, B = {top}: the state-aware warm-up beats both no warm-up and fixed warm-up in final "
            f"accuracy for every method (LENA paper, Table 2): "
            + ("held." if len(helped) == len(gains) else
               f"did not hold; it did for {', '.join(helped) or 'none'} of {', '.join(gains)}.")
        )
        if len(batches) > 1:
            most = [m for m, g in gains.items()
                    if len(g) == len(batches) and g[top] > 0 and all(g[top] > v for b, v in g.items() if b != top)]
            self.verdicts.append(
                f"{model}: the state-aware warm-up helps most at the largest batch: held for "
                f"{', '.join(most) or 'no method'} of {', '.join(gains)}."
            )

    def warmup_ends_plot(self, model: str) -> list[str]:
        ends: dict[str, list[dict[str, float]]] = {}
        references: dict[str, float] = {}
        for b in self.ablation_batches:
            records = [r for r in self.records if r["model"] == model and r["method"] == "lena"
                       and r["batch"] == b and r.get("warmup_ends") and r["warmup"] in ("default", "state-aware")]
            if records:
                ends[f"LENA, B = {b}"] = [r["warmup_ends"] for r in records]
            fixed = self.records_of(model, "sweep", method="lsw", batch=b)
            if fixed and fixed[0].get("warmup_steps"):
                references[f"fixed warm-up end, B = {b}"] = fixed[0]["warmup_steps"]
        if not ends:
            return []
        unfinished = {label: sorted({layer for run in runs for layer, end in run.items() if end < 0})
                      for label, runs in ends.items()}
        png = plots.warmup_ends_by_layer(ends, references, f"{model}: per-layer state-aware warm-up end points",
                                         self.artifacts / f"{model}-warmup-ends.png")
        return [
            "Per-layer warm-up end points of LENA (LENA paper, Fig. 7): the update at which each layer's progress "
            "S_k reached theta; bars: mean over seeds, whiskers: the seeds' range; dashed: where the fixed "
            "warm-up of LSW ends at the same batch.", "",
            f"![{model}: per-layer warm-up end points]({self.link(png)})", "",
        ] + [f"Still warming up when the run ended ({label}, some seed): {', '.join(layers)}." + "\n"
             for label, layers in unfinished.items() if layers]

    # -- cost ------------------------------------------------------------------------------------
    def throughput_section(self, model: str) -> list[str]:
        per_step: dict[tuple[str, int], list[float]] = defaultdict(list)
        for r in self.records_of(model, "sweep"):
            if r["steps"]:
                per_step[(r["method"], r["batch"])].append(r["train_seconds"] / r["steps"])
        batches = sorted({b for _, b in per_step if b > self.spec["base_batch"]})
        if not batches or not any(m == "lsw" for m, _ in per_step):
            return []
        lines = [f"## {model}: training time per update relative to LSW (same batch, this study's runs)", "",
                 "| method | " + " | ".join(f"B = {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
        for method in self.spec["methods"]:
            cells = []
            for b in batches:
                mine, ref = per_step.get((method, b)), per_step.get(("lsw", b))
                cells.append(f"{statistics.fmean(mine) / statistics.fmean(ref):.2f}" if mine and ref else "-")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        ratios = [statistics.fmean(per_step[key]) / statistics.fmean(per_step[("lsw", key[1])])
                  for key in per_step if key[1] in batches and ("lsw", key[1]) in per_step]
        # sgd and lsw do the same work per update (only the schedule differs): their ratio shows how
        # much the machine's load moved the run times.
        same_work = [statistics.fmean(per_step[("sgd", b)]) / statistics.fmean(per_step[("lsw", b)])
                     for b in batches if ("sgd", b) in per_step and ("lsw", b) in per_step]
        disturbed = any(not 0.5 <= r <= 3 for r in ratios) or any(abs(r - 1) > 0.1 for r in same_work)
        if disturbed:
            spread = f" (sgd / lsw, the same work per update: {min(same_work):.2f}-{max(same_work):.2f})" \
                if same_work else ""
            lines += ["", f"The machine was busy with other work during some runs{spread}: these times are not "
                      "comparable; benchmarks/results holds interleaved measurements of the same overheads."]
        lena = [statistics.fmean(per_step[("lena", b)]) / statistics.fmean(per_step[("lsw", b)])
                for b in batches if ("lena", b) in per_step and ("lsw", b) in per_step]
        if lena:
            slowdown = statistics.fmean(lena) - 1
            verdict = ("not judged: the run times were disturbed" if disturbed else
                       "held (at most 7.5% slower)" if slowdown <= 0.075 else "did not hold (more than 7.5% slower)")
            self.verdicts.append(
                f"{model}: LENA's throughput about 5% below fixed scaling (LENA paper): measured "
                f"{100 * slowdown:+.1f}% time per update against LSW, mean over the large batches: {verdict}."
            )
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

    def commands(self) -> list[str]:
        name = self.spec["name"]
        how = f"--spec {self.spec['spec_file']}" if self.spec.get("spec_file") else f"--preset {name}"
        return [
            "## Regenerating", "",
            "Every table and plot on this page, from the committed run summaries "
            f"({self.link(self.artifacts / 'summaries.json')}), without training:", "",
            "```sh", f"largebatch study {how} --report-only", "```", "",
            "The whole study (runs only what has not finished; about two hours on 2 cores):", "",
            "```sh", f"largebatch study {how}", "```", "",
            "One run of it, e.g. LENA without its warm-up at the largest batch, seed 0 "
            "(`config.json` in each run directory holds the full configuration):", "",
            "```sh",
            f"largebatch train --method lena --warmup none --model {self.models[0]} "
            f"--batch {max(self.spec['batches'])} --micro-batch {self.spec['micro_batch']} "
            f"--epochs {self.epochs[self.models[0]]} --lr <tuned sgd-family rate> --run-dir runs/one",
            "```", "",
        ]


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

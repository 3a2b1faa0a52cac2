"""The results page's view of a study: summaries.json as queries (:class:`Study`), and the small numeric
helpers the sections and verdicts share. Nothing here writes prose."""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from .results import RunResult

BASELINE = "sgd"
EARLY_METHODS = ("clars", "lsw", "lars")  # CLARS (no warm-up) against gradual warm-up
ADASCALE_BASELINE = "as"  # the LENA paper's AdaScale ("AS"); "adascale" is the published method
FIXED_WARMUP = ("lsw", "sqrt", "lars", "lars-masked", "lamb")
NO_WARMUP = ("sgd", "clars", "as", "adascale")
# method -> the family it belonged to before it got its own (summaries written then tuned only that one)
_EARLIER_FAMILIES = {"clars": "lars"}


def run_result(record: dict) -> RunResult:
    evals = record.get("evals") or {"step": [], "epoch": [], "seconds": [], "accuracy": []}
    cpu = evals.get("cpu") or [None] * len(evals["step"])
    rows = [
        {"step": s, "epoch": e, "train_seconds": t, "test_accuracy": a, "cpu_seconds": c}
        for s, e, t, a, c in zip(evals["step"], evals["epoch"], evals["seconds"], evals["accuracy"], cpu)
    ]
    return RunResult(record["method"], record["batch"], record["seed"], record["final_test_accuracy"],
                     record["steps"], record["train_seconds"], rows, Path(record["run"]),
                     record.get("diverged_at_step"))


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_sd(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    if len(values) < 2:
        return fmt.format(statistics.fmean(values))
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def fmt_iters(value: float) -> str:
    return f"{value / 1000:.2f}K" if value >= 1000 else f"{value:.0f}"


def inside(entry: dict) -> bool:
    if "inside" in entry:
        return bool(entry["inside"])
    rates = sorted(float(lr) for lr in entry.get("grid", {}))
    return len(rates) > 2 and rates[0] < entry["lr"] < rates[-1]


def accuracy_at_epoch(run: RunResult, epoch: int) -> float | None:
    """Test accuracy at the end of epoch ``epoch`` (the evaluation at that epoch boundary)."""
    for e in run.evals:
        if abs(e["epoch"] - epoch) < 1e-6:
            return e["test_accuracy"]
    return None


class Study:
    """The page's view of a study's summaries.json: its spec, tuning, method table and run records,
    with the queries every section and verdict asks (runs, targets, who reached them, which clock)."""

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
        return [run_result(r) for r in self.records_of(model, phase, **match)]

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
            cvs = [sd(g[kind]) / mean(g[kind]) for g in groups.values() if len(g[kind]) > 1 and mean(g[kind]) > 0]
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

    def early(self, model: str, method: str, batch: int, epoch: int) -> list[float]:
        return [a for a in (accuracy_at_epoch(r, epoch) for r in self.runs(model, method=method, batch=batch))
                if a is not None]

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
            if family in families and not inside(entry):
                notes.append(f"the {family} family's best rate is an end of its tuning grid")
        return "; ".join(notes)

    def ablation_gains(self, model: str) -> dict[str, dict[int, float]]:
        """Per method and batch: final accuracy with the state-aware warm-up minus the best other mode."""
        modes = self.spec.get("ablation_modes", ["none", "fixed", "state-aware"])
        gains: dict[str, dict[int, float]] = defaultdict(dict)
        for method in self.spec.get("ablation_methods", []):
            for b in self.ablation_batches(model):
                finals = {mode: mean([r.final_test_accuracy for r in self.ablation_run(model, method, mode, b)])
                          for mode in modes}
                finals = {m: v for m, v in finals.items() if not math.isnan(v)}
                if "state-aware" in finals and len(finals) > 1:
                    gains[method][b] = finals["state-aware"] - max(v for m, v in finals.items() if m != "state-aware")
        return gains

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
        same = [mean(per[("sgd", b)]) / mean(per[("lsw", b)]) for b in self.large(model)
                if per.get(("sgd", b)) and per.get(("lsw", b))]
        return any(abs(r - 1) > 0.1 for r in same), same

"""Results of a sweep: runs, targets, iterations and time to target, table cells.

Measuring success as the papers do (methods.md): the target of a seed is the
final test accuracy of the baseline (momentum SGD at the base batch, same
epoch budget); a run reaches it at the first evaluation whose test accuracy
is at least the target, and "never" if no evaluation does.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..records import SUMMARY, read_json


@dataclass
class RunResult:
    method: str
    batch: int
    seed: int
    final_test_accuracy: float
    steps: int
    train_seconds: float
    evals: list[dict]
    run_dir: Path
    diverged_at_step: int | None = None  # the step whose training loss was not finite (the run stopped there)
    load_average: list[float] | None = None  # the machine's 1/5/15-minute load averages when the run ended

    @classmethod
    def load(cls, run_dir: Path) -> RunResult:
        s = read_json(run_dir / SUMMARY)
        return cls(s["method"], s["batch"], s["seed"], s["final_test_accuracy"], s["steps"],
                   s["train_seconds"], s["evals"], run_dir, s.get("diverged_at_step"),
                   (s.get("machine") or {}).get("load_average_end"))

    def reaches(self, target: float) -> dict | None:
        """The first evaluation at or above ``target`` (None: never)."""
        return next((e for e in self.evals if e["test_accuracy"] >= target), None)


def load_runs(root: Path) -> list[RunResult]:
    """Finished runs under ``root/runs/`` (a sweep) or ``root`` itself (one run)."""
    root = Path(root)
    if (root / SUMMARY).exists():
        return [RunResult.load(root)]
    return [RunResult.load(d) for d in sorted((root / "runs").glob("*")) if (d / SUMMARY).exists()]


def targets(runs: list[RunResult], base_batch: int, baseline_method: str = "sgd") -> dict[int, float]:
    """Per seed: the final test accuracy of the baseline at the base batch."""
    return {r.seed: r.final_test_accuracy for r in runs if r.method == baseline_method and r.batch == base_batch}


@dataclass
class Cell:
    """One (method, batch) cell of the table, over seeds."""

    accuracies: list[float] = field(default_factory=list)
    iterations: list[int | None] = field(default_factory=list)  # None: never reached
    seconds: list[float | None] = field(default_factory=list)
    diverged: list[int] = field(default_factory=list)  # the steps at which seeds diverged

    def add(self, run: RunResult, target: float | None) -> None:
        self.accuracies.append(run.final_test_accuracy)
        if run.diverged_at_step is not None:
            self.diverged.append(run.diverged_at_step)
        hit = run.reaches(target) if target is not None else None
        self.iterations.append(hit["step"] if hit else None)
        self.seconds.append(hit["train_seconds"] if hit else None)

    def text(self) -> str:
        return self._text() + self.diverged_note()

    def diverged_note(self) -> str:
        if not self.diverged:
            return ""
        seeds = "" if len(self.accuracies) == 1 else f"{len(self.diverged)}/{len(self.accuracies)} seeds "
        return f" ({seeds}diverged at step {', '.join(map(str, sorted(self.diverged)))})"

    def _text(self) -> str:
        acc = _mean_spread([100 * a for a in self.accuracies], "{:.2f}") + "%"
        reached = [i for i in self.iterations if i is not None]
        if not reached:
            return f"{acc} / never"
        times = [s for s in self.seconds if s is not None]
        partial = "" if len(reached) == len(self.iterations) else f" ({len(reached)}/{len(self.iterations)} seeds)"
        return f"{acc} / {_mean_spread(reached, '{:.0f}', iters=True)}{partial} / {_mean_spread(times, '{:.1f}')} s"


def table(runs: list[RunResult], target_of: dict[int, float]) -> dict[tuple[str, int], Cell]:
    cells: dict[tuple[str, int], Cell] = {}
    for run in runs:
        cells.setdefault((run.method, run.batch), Cell()).add(run, target_of.get(run.seed))
    return cells


def _mean_spread(values: list[float], fmt: str, iters: bool = False) -> str:
    show = _iterations if iters else fmt.format
    mean = statistics.fmean(values)
    if len(values) < 2:
        return show(mean)
    return f"{show(mean)} ± {show(statistics.stdev(values))}"


def _iterations(value: float) -> str:
    """1234 -> 1.23K, as the LENA paper writes iteration counts."""
    return f"{value / 1000:.2f}K" if value >= 1000 else f"{value:.0f}"

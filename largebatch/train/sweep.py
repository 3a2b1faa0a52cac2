"""Sweeps over (method, batch, seed), with base rates chosen the same way for every method.

Layout of a sweep directory::

    DIR/sweep.json                      the sweep's settings and protocol
    DIR/tune/<family>-lr<rate>/         tuning runs (with --tune)
    DIR/runs/<method>-b<batch>-s<seed>/ one training run each (summary.json when finished);
                                        <method>-w<mode>-b... with a --warmup mode other than default,
                                        <method>-sexample-b... for LENA and AdaScale with
                                        --statistics example
    DIR/report.md, DIR/*.png            written by ``largebatch report DIR``

The target of each seed is the final test accuracy of the baseline, momentum
SGD at the base batch with the same epoch budget (as in the LENA paper); the
baseline is run for every seed whether or not it is in the grid. Finished runs
are skipped, unfinished ones resumed from their checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import TrainConfig
from .methods import get_method
from ..records import BASELINE_METHOD, SUMMARY, SWEEP_FILE, read_json, write_json
from .rundir import prepare_run_dir
from .runner import train

TUNED_FILE = "tuned.json"


@dataclass
class SweepSpec:
    methods: list[str]
    batches: list[int]
    seeds: list[int]
    run_dir: str
    template: TrainConfig  # model, epochs, data, micro-batch... shared by every run
    lrs: dict[str, float] = field(default_factory=dict)  # family -> base rate
    tune_grid: list[float] = field(default_factory=list)
    # > 0: evaluate this many times per epoch at every batch size (overrides template.eval_every), so
    # that iterations to target have the same resolution, in epochs, at every batch size
    evals_per_epoch: int = 0
    train_size: int | None = None  # training images, needed with evals_per_epoch

    def validate(self) -> None:
        for method in self.methods:
            get_method(method)
        for batch in sorted(set(self.batches) | {self.template.base_batch}):
            self.config(BASELINE_METHOD, batch, self.seeds[0]).validate()
        for family in self.lrs:
            if family not in {get_method(m).family for m in self.methods} | {"sgd"}:
                raise ValueError(f"--lr names the family {family!r}, which no method of the sweep belongs to")

    def config(self, method: str, batch: int, seed: int, lr: float | None = None) -> TrainConfig:
        family = get_method(method).family
        # the other methods (the baseline among them) have no per-example gains: their usual statistics
        statistics = self.template.statistics if get_method(method).example_statistics else "micro_batch"
        return dataclasses.replace(
            self.template,
            method=method, batch=batch, seed=seed,
            micro_batch=min(self.template.micro_batch, batch),
            lr=lr if lr is not None else self.lrs.get(family, self.template.lr),
            statistics=statistics,
            run_dir=str(run_path(self.run_dir, method, batch, seed, self.template.warmup, statistics)),
            eval_every=self.eval_every(batch),
            resume=True,
        )

    def eval_every(self, batch: int) -> int:
        if not self.evals_per_epoch:
            return self.template.eval_every
        if self.train_size is None:
            raise ValueError("evals_per_epoch needs train_size")
        return max(1, (self.train_size // batch) // self.evals_per_epoch)

    def runs(self) -> list[tuple[str, int, int]]:
        """Every (method, batch, seed) to train: the baselines first, then the grid."""
        base = self.template.base_batch
        grid = [(m, b, s) for s in self.seeds for m in self.methods for b in self.batches]
        baselines = [(BASELINE_METHOD, base, s) for s in self.seeds]
        return baselines + [r for r in grid if r not in baselines]

    def protocol(self, tuned: dict | None) -> dict:
        families = sorted({get_method(m).family for m in self.methods} | {"sgd"})
        rates = {}
        for family in families:
            if tuned and family in tuned:
                rates[family] = {"lr": tuned[family]["lr"], "how": tuned[family]["how"]}
            elif family in self.lrs:
                rates[family] = {"lr": self.lrs[family], "how": "given with --lr"}
            else:
                method = next(m for m in [*self.methods, BASELINE_METHOD] if get_method(m).family == family)
                rates[family] = {"lr": self.template.lr or get_method(method).default_base_lr,
                                 "how": "given with --lr" if self.template.lr else "the method's default"}
        return {
            "base_rates": rates,
            "target": f"per seed, the final test accuracy of momentum SGD at the base batch "
            f"{self.template.base_batch} after {self.template.epochs} epochs",
            "accuracy_checked": "on the test set at the end of every epoch"
            + (f" and {self.evals_per_epoch} times per epoch" if self.evals_per_epoch else
               f" and every {self.template.eval_every} steps" if self.template.eval_every else ""),
            "time": "training wall-clock seconds, evaluation excluded",
        }


def run_path(root: str | Path, method: str, batch: int, seed: int, warmup: str = "default",
             statistics: str = "micro_batch") -> Path:
    mode = "" if warmup == "default" else f"-w{warmup}"
    source = "" if statistics == "micro_batch" else f"-s{statistics}"
    return Path(root) / "runs" / f"{method}{mode}{source}-b{batch}-s{seed}"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / SUMMARY).exists()


def finished_differently(config: TrainConfig) -> str | None:
    """How the finished run in ``config.run_dir`` differs from ``config``, or None.

    A run directory is named by method, batch, seed and warm-up, not by base
    rate or epochs: when a sweep's family rate changes (a new tuning, a new
    family), the old run must not pass for the new one.
    """
    path = Path(config.run_dir) / SUMMARY
    if not path.exists():
        return None
    summary = read_json(path)
    wanted = {("base_lr", "base rate"): config.base_lr(), ("epochs", "epochs"): config.epochs}
    changed = [f"{label} {summary[key]:g}, not {value:g}" for (key, label), value in wanted.items()
               if summary.get(key) is not None and not math.isclose(summary[key], value, rel_tol=1e-9)]
    return "; ".join(changed) or None


def run_sweep(spec: SweepSpec, log: Callable[[str], None] = print) -> Path:
    """Train every run of the sweep that has not finished; returns the sweep directory."""
    spec.validate()
    root = prepare_run_dir(spec.run_dir, 0)
    tuned = tune_families(spec, log) if spec.tune_grid else None
    if tuned:
        spec.lrs.update({family: entry["lr"] for family, entry in tuned.items()})
    runs = spec.runs()
    for run in runs:
        config = spec.config(*run)
        changed = finished_differently(config)
        if changed:
            raise ValueError(f"{config.run_dir} finished as another run ({changed}): move it away, or use "
                             "another --run-dir, to train this sweep's run")
    write_json(root / SWEEP_FILE, {
        "methods": spec.methods, "batches": spec.batches, "seeds": spec.seeds,
        "base_batch": spec.template.base_batch, "baseline_method": BASELINE_METHOD,
        "template": dataclasses.asdict(spec.template), "protocol": spec.protocol(tuned),
    })
    progress = Progress(sum(not is_finished(Path(spec.config(*run).run_dir)) for run in runs))
    for k, (method, batch, seed) in enumerate(runs, 1):
        config = spec.config(method, batch, seed)
        label = f"run {k} of {len(runs)}: {method} batch {batch} seed {seed}"
        if is_finished(Path(config.run_dir)):
            log(f"{label}: finished, skipped")
            continue
        log(f"{label}: training{progress.eta()}")
        summary = progress.timed(train, config)
        log(f"{label}: {outcome(summary)}")
    return root


def outcome(summary: dict) -> str:
    """One line on a finished run: its accuracy, or where it diverged."""
    text = (f"test accuracy {100 * summary['final_test_accuracy']:.2f}% after {summary['steps']} steps "
            f"({summary['train_seconds']:.1f} s)")
    if summary.get("diverged_at_step") is not None:
        return f"diverged at step {summary['diverged_at_step']} (loss {summary.get('diverged_loss')}); {text}"
    return text


class Progress:
    """Runs left to train and an estimate of the time they take, from the runs trained so far.

    Every run of a sweep trains the same number of epochs on the same data, so
    the mean wall time of the runs done (evaluation included) times the runs
    left is the estimate.
    """

    def __init__(self, to_train: int):
        self.left = to_train
        self.seconds: list[float] = []

    def timed(self, fn, *args):
        started = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.seconds.append(time.monotonic() - started)
            self.left -= 1

    def eta(self) -> str:
        if not self.seconds:
            return f" ({self.left} to train; the time left is estimated after the first)"
        from tqdm import tqdm

        per_run = sum(self.seconds) / len(self.seconds)
        return (f" ({self.left} to train, about {tqdm.format_interval(per_run * self.left)} left at "
                f"{tqdm.format_interval(per_run)} per run)")


def tune_families(spec: SweepSpec, log: Callable[[str], None] = print, *, with_baseline: bool = True) -> dict:
    """Pick each family's base rate at the base batch by validation accuracy over the grid.

    A sweep also needs the baseline's family (its run defines the target);
    ``with_baseline=False`` tunes only the families of ``spec.methods``.
    """
    root = Path(spec.run_dir)
    path = root / TUNED_FILE
    tuned = read_json(path) if path.exists() else {}
    representatives: dict[str, str] = {}
    for method in [BASELINE_METHOD, *spec.methods] if with_baseline else spec.methods:
        representatives.setdefault(get_method(method).family, method)
    for family, method in representatives.items():
        if family in tuned and set(tuned[family]["grid"]) == {f"{lr:g}" for lr in spec.tune_grid}:
            continue  # tuned on this grid before
        tuned[family] = tune(spec, method, root / "tune", log)
        write_json(path, tuned)
    return tuned


def tune(spec: SweepSpec, method: str, tune_root: Path, log: Callable[[str], None] = print) -> dict:
    """Train ``method`` at the base batch for every rate of the grid; best validation accuracy wins."""
    base, seed = spec.template.base_batch, spec.seeds[0]
    scores: dict[str, float] = {}
    for k, lr in enumerate(spec.tune_grid, 1):
        config = dataclasses.replace(
            spec.config(method, base, seed, lr=lr),
            run_dir=str(tune_root / f"{get_method(method).family}-lr{lr:g}"),
        )
        summary = read_json(Path(config.run_dir) / SUMMARY) if is_finished(Path(config.run_dir)) else train(config)
        scores[f"{lr:g}"] = summary["final_val_accuracy"]
        diverged = summary.get("diverged_at_step")
        note = f" (diverged at step {diverged})" if diverged is not None else ""
        log(f"tune {method} lr {lr:g} at batch {base}: validation accuracy {100 * scores[f'{lr:g}']:.2f}%{note} "
            f"[rate {k} of {len(spec.tune_grid)}]")
    best = max(spec.tune_grid, key=lambda lr: scores[f"{lr:g}"])
    how = (f"tuned with {method} at batch {base}, seed {seed}, {spec.template.epochs} epochs: best validation "
           f"accuracy over {', '.join(f'{lr:g}' for lr in spec.tune_grid)}")
    return {"lr": best, "grid": scores, "how": how}

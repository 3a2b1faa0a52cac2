"""The papers' study, scaled to a small machine: one specification, one command.

``largebatch study --preset paper-v2`` (or ``--spec study.toml``) runs, per model:

0. the plateau phase (when the model gives ``epoch_candidates`` instead of
   ``epochs``): momentum SGD at the base batch with E and 2E epochs for every
   seed, for the smallest candidate E that gives the largest batch at least
   ``min_updates`` updates, then the next candidate until one passes
   |acc(2E) - acc(E)| <= ``plateau_tolerance`` (mean over seeds); that E is the
   model's epoch budget for every later phase (:func:`choose_epochs`);
1. base-rate tuning: for every method family, its representative method at the
   base batch, first seed, over the family's grid; the best final validation
   accuracy wins, and with ``tune_extend`` > 0 a grid whose best rate is at an
   end is extended by half-decade steps until the best is inside
   (:func:`tune_with_extension`);
2. the main sweep: every (method, batch, seed) from the tuned base rates, each
   method carrying its rate to the large batch by its own rule; no tuning at
   large batches;
3. the warm-up ablation (LENA paper, Table 2): every ablation method with each
   warm-up mode (none, fixed, state-aware) at the two largest batches. A mode
   that is the method's own default is the main sweep's run, as is a mode that
   turns one method into another of the sweep (LSW without warm-up is SGD);
4. the summaries of every run in one small JSON file, and the results page
   (Markdown, plots) written from that file alone, so the page can be
   regenerated from the committed summaries without the run directories.

Layout under the study's run directory (not committed: checkpoints)::

    RUN_DIR/<model>/plateau/sgd-e<E>-s<seed>/   the plateau phase
    RUN_DIR/<model>/            a sweep directory (largebatch.train.sweep): tune/, runs/, sweep.json
    RUN_DIR/<model>/ablation/runs/<method>-w<mode>-b<batch>-s<seed>/

Every run is skipped when its summary.json exists and resumed from its
checkpoint otherwise, tuning and plateau runs included; ``summaries.json`` is
rewritten after every finished run and, with ``--commit``, committed after the
first run that finishes ``commit_every_minutes`` after the previous commit and
at the end of every phase.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .methods import WARMUP_MODES, get_method
from ..records import BASELINE_METHOD, LAYERS, METRICS, SUMMARY, read_json, read_jsonl, write_json
from .noise import windowed_noise_scale
from .robustness import (NOISE_SCALE, ONE_SE, SENSITIVITY, TUNE_RULES, TUNE_SEEDS, next_rate, noise_scale_config,
                         run_configs, run_tune_seeds, sensitivity_configs, tune_seed_configs)
from .runner import Interrupted, load_data, train
from .sweep import (TUNED_FILE, Progress, SweepSpec, finished_differently, is_finished, outcome,
                    run_sweep)

SUMMARIES = "summaries.json"
PLATEAU_FILE = "plateau.json"
ABLATION_MODES = ("none", "fixed", "state-aware")
# The per-layer quantity each method's page section draws over training (layers.jsonl), sampled into
# summaries.json for the first seed: LENA's gains, the trust ratios of LARS and CLARS, AdaScale's model gain.
LAYER_SERIES = {"lena": "gains", "lars": "trust_ratios", "lars-masked": "trust_ratios", "clars": "trust_ratios",
                "adascale": "gain", "as": "gain"}
NOISE_WINDOWS = 40  # points of the noise-scale series kept in summaries.json

_PAPER_METHODS = ["sgd", "lsw", "sqrt", "adascale", "lars", "lamb", "clars", "lena"]
_HALF_DECADES = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]

PRESETS: dict[str, dict] = {
    # The first study (docs/study.md, "paper-small"): a fixed budget of 5 and 2 epochs, about two hours on
    # 2 cores. Kept so that its committed summaries regenerate their page.
    "paper-small": {
        "name": "paper-small",
        "dataset": "fashion-mnist",
        "base_batch": 128,
        "micro_batch": 128,
        "batches": [128, 1024, 2048, 4096, 8192, 16384],
        "methods": _PAPER_METHODS,
        "seeds": [0, 1, 2],
        "models": [{"name": "mlp", "epochs": 5}, {"name": "lenet5-bn", "epochs": 2}],
        # Half-decade steps over four decades (momentum SGD ~0.1, LAMB ~0.003, LARS/CLARS ~1-10).
        "tune_grid": _HALF_DECADES,
        "ablation_methods": ["lsw", "sqrt", "adascale", "lars", "lamb", "clars", "lena"],
        "evals_per_epoch": 2,
        "early_epochs": 2,
        "budget_hours": 2.0,
        "run_dir": "runs/study",
        "artifacts": "results/study",
        "out": "docs/results-v1.md",  # docs/results.md is the study v2's page
    },
    # The study v2 (docs/study.md, "The study v2"): an epoch budget from the budget rule, every method on
    # its own terms, interior tuning optima. LeNet-5-BN's largest batch is 8K: at 16K the rule's 34 epochs
    # cannot be afforded for it on 2 cores (the arithmetic is in docs/study.md).
    "paper-v2": {
        "name": "paper-v2",
        "dataset": "fashion-mnist",
        "base_batch": 128,
        "micro_batch": 128,
        "batches": [128, 1024, 2048, 4096, 8192, 16384],
        "methods": ["sgd", "lsw", "sqrt", "as", "adascale", "lars-masked", "lamb", "clars", "lena", "lars"],
        "seeds": [0, 1, 2],
        "models": [
            {"name": "mlp", "epoch_candidates": [34, 68]},
            {"name": "lenet5-bn", "epoch_candidates": [17, 34], "batches": [128, 1024, 2048, 4096, 8192],
             "seeds": [0, 1],
             "note": "largest batch 8K and seeds 0, 1: at 16K the budget rule needs 34 epochs, and the "
                     "estimate with 3 seeds at 8K is over the 8-hour budget (docs/study.md)"},
        ],
        "tune_grid": _HALF_DECADES,
        # LARS and CLARS (trust coefficient 1e-3) were best at the old grid's top, 10: their grids reach 100.
        # CLARS tunes its own rate (amendment 1, docs/study.md): at LARS's its steps are 5-8x smaller.
        "tune_grids": {"lars-masked": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
                       "lars": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
                       "clars": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]},
        "tune_extend": 4,
        "tune_seeds": 2,
        "tune_within": 0.01,
        "tune_rule": "one-se",
        "sensitivity_seeds": [0],
        "noise_scale": True,
        "plateau_lr": 0.1,
        "plateau_tolerance": 0.003,
        "plateau_metric": "val",
        "min_updates": 100,
        "adascale_cap": 3.0,
        "ablation_methods": ["lsw", "sqrt", "as", "lars-masked", "lamb", "clars", "lena", "lars"],
        "ablation_seeds": [0],
        "evals_per_epoch": 2,
        "early_epochs": 2,
        "budget_hours": 16.0,  # 8 before amendment 2, whose phases take about as long again
        "commit_every_minutes": 20.0,
        "amendments": [
            "CLARS tunes its own base rate (family clars) instead of carrying LARS's. A family is the methods "
            "that coincide at the base batch; CLARS does not coincide with LARS there: it divides by the mean "
            "of the per-example gradient norms, which in the MLP's first sweep at b = 128 was 5-8x the "
            "mini-batch norm LARS divides by, so at LARS's rate its steps were 5-8x smaller and it ended 2 "
            "points below LARS at b = 128. Made after the MLP's sweep and ablation, before LeNet-5-BN's; the "
            "MLP's CLARS runs at LARS's rate are kept below as superseded.",
            "A second look, before its runs (amendment 2). (a) The study's LARS left biases and normalisation "
            "weights out of the trust ratio, and they took plain SGD steps at LARS's rate, about 100x an SGD rate "
            "and 64x more at 8K; the library now adapts every tensor. Its runs are relabelled lars-masked, and "
            "LARS adapting every tensor (lars) is tuned and swept beside it; CLARS, which adapts every tensor, is "
            "compared with lars. (b) Every family's rate was chosen by one seed, CLARS's on a 0.16-point "
            "difference, within the seeds' spread: every rate within 1 point of the first seed's best is run on "
            "a second seed, and the rate is the smallest whose mean validation accuracy is within one standard "
            "error of the best mean (the one-standard-error rule: of rates the noise cannot tell apart, the "
            "smaller is the safer to scale up); a family whose rate changes is swept again, its runs at the old "
            "rate kept as superseded. (c) The main sweep runs again from each family's next lower grid rate "
            "(rate / 3), seed 0, every batch: a verdict that changes between the two rates is rate-sensitive. "
            "(d) The gradient noise scale over the base-batch run of momentum SGD, from per-example norms, for "
            "where each method falls off against it.",
        ],
        "run_dir": "runs/study-v2",
        "artifacts": "results/study-v2",
        "out": "docs/results.md",
    },
}


@dataclass
class ModelBudget:
    """One model of the study: its epoch budget (``epochs``) or the candidates of the budget rule
    (``epoch_candidates``), and optionally its own batches and seeds (``note`` says why on the page)."""

    name: str
    epochs: int | None = None
    epoch_candidates: list[int] | None = None
    batches: list[int] | None = None
    seeds: list[int] | None = None
    note: str | None = None


@dataclass
class StudySpec:
    """What the study runs; every field is a key of the TOML specification (docs/study.md)."""

    name: str
    methods: list[str]
    batches: list[int]
    seeds: list[int]
    models: list[ModelBudget]
    tune_grid: list[float]
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    base_batch: int = 128
    micro_batch: int = 128
    tune_grids: dict[str, list[float]] = field(default_factory=dict)  # family -> its own starting grid
    tune_extend: int = 0  # at most this many half-decade steps beyond each end of a grid (0: the grid as given)
    tune_seeds: int = 1  # seeds of each model that train the near-best rates (tune-seeds phase when > 1)
    tune_within: float = 0.01  # near-best: validation accuracy within this of the first seed's best
    tune_rule: str = "best"  # "best" (the first seed's best) or "one-se" (robustness.one_standard_error)
    sensitivity_seeds: list[int] = field(default_factory=list)  # main sweep from rate / 3 for these seeds
    noise_scale: bool = False  # the noise-scale phase: B_noise over the base-batch run (robustness.py)
    plateau_lr: float | None = None  # the plateau phase's base rate (None: the sgd family's default)
    plateau_tolerance: float = 0.003  # |acc(2E) - acc(E)|, mean over seeds, as a fraction
    plateau_metric: str = "val"  # "val" (the validation split) or "test"
    min_updates: int = 100  # the budget rule: the largest batch gets at least this many updates
    adascale_cap: float = 3.0  # AdaScale ends when tau reaches T1, at most this many times the epoch budget
    ablation_methods: list[str] = field(default_factory=list)
    ablation_batches: list[int] | None = None  # default: the two largest batches (of each model)
    ablation_modes: list[str] = field(default_factory=lambda: list(ABLATION_MODES))
    ablation_seeds: list[int] | None = None  # default: every seed
    evals_per_epoch: int = 2
    early_epochs: int = 2  # the CLARS paper's "first epochs"
    layer_samples: int = 40  # points per layer series kept in summaries.json
    train_limit: int | None = None
    test_limit: int | None = None
    val_size: int = 5000
    split_seed: int = 0
    warmup_fraction: float | None = None  # None: the library default (5.5% of the epochs)
    layer_every: int | None = None  # None: every 10 steps, every step in short runs (TrainConfig)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (part of every run)
    device: str | None = None  # where the runs train (not part of a run: --device)
    threads: int | None = None  # torch threads (not part of a run: --threads)
    budget_hours: float = 2.0
    commit_every_minutes: float = 20.0  # --commit: after the first run finishing this long after the last commit
    run_dir: str = "runs/study"
    artifacts: str = "results/study"
    out: str = "docs/results.md"
    benchmarks: str = "benchmarks/results"  # their JSON feeds the page's overhead table
    spec_file: str | None = None  # the TOML file it was read from (None: a preset)
    # changes to the protocol after runs had started, each with its reason (the page lists them)
    amendments: list[str] = field(default_factory=list)
    progress: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> StudySpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in the study specification: {', '.join(unknown)}")
        data = dict(data)
        models = []
        for m in data.get("models", []):
            extra = sorted(set(m) - {f.name for f in dataclasses.fields(ModelBudget)})
            if extra:
                raise ValueError(f"unknown key(s) in a [[models]] entry: {', '.join(extra)}")
            models.append(ModelBudget(**m))
        data["models"] = models
        spec = cls(**data)
        spec.validate()
        return spec

    @classmethod
    def load(cls, path: str | Path | None = None, preset: str | None = None, **overrides) -> StudySpec:
        if (path is None) == (preset is None):
            raise ValueError("give exactly one of --spec and --preset")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
            data = json.loads(json.dumps(PRESETS[preset]))  # a deep copy
        else:
            try:
                data = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ValueError(f"cannot read the study specification {path}: {e}") from None
            data["spec_file"] = str(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    def validate(self) -> None:
        for method in {*self.methods, *self.ablation_methods}:
            get_method(method)
        for mode in self.ablation_modes:
            if mode not in WARMUP_MODES or mode == "default":
                raise ValueError(f"ablation mode {mode!r}: use none, fixed or state-aware")
        if not self.models or not self.seeds or not self.batches or not self.tune_grid:
            raise ValueError("a study needs models, seeds, batches and a tune_grid")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision {self.precision!r}: use fp32, bf16 or fp16")
        if self.plateau_metric not in ("val", "test"):
            raise ValueError(f"plateau_metric {self.plateau_metric!r}: use val or test")
        if not 0 < self.plateau_tolerance < 1:
            raise ValueError(f"plateau_tolerance {self.plateau_tolerance}: a fraction of accuracy in (0, 1)")
        if self.tune_extend < 0 or self.min_updates < 1 or not self.adascale_cap >= 1:
            raise ValueError("tune_extend must be >= 0, min_updates >= 1 and adascale_cap >= 1")
        if self.commit_every_minutes <= 0:
            raise ValueError("commit_every_minutes must be positive")
        if self.tune_rule not in TUNE_RULES:
            raise ValueError(f"tune_rule {self.tune_rule!r}: use {' or '.join(TUNE_RULES)}")
        if self.tune_seeds < 1 or (self.tune_seeds > 1) != (self.tune_rule == ONE_SE):
            raise ValueError("tune_seeds > 1 goes with tune_rule 'one-se' (and 1 with 'best')")
        if not 0 <= self.tune_within < 1:
            raise ValueError(f"tune_within {self.tune_within}: a fraction of accuracy in [0, 1)")
        if not set(self.sensitivity_seeds) <= set(self.seeds):
            raise ValueError(f"sensitivity_seeds must be among the seeds {self.seeds}")
        families = {get_method(m).family for m in [BASELINE_METHOD, *self.methods]}
        for family, grid in self.tune_grids.items():
            if family not in families:
                raise ValueError(f"tune_grids names the family {family!r}, which no method of the study belongs to")
            if not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
                raise ValueError(f"tune_grids[{family!r}]: a list of positive rates")
        if not isinstance(self.amendments, list) or not all(isinstance(a, str) and a for a in self.amendments):
            raise ValueError("amendments: a list of texts, one per change to the protocol")
        for lr in self.tune_grid:
            if not (lr > 0 and math.isfinite(lr)):
                raise ValueError(f"tune_grid: {lr} is not a positive rate")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("a model appears twice in the study")
        for model in self.models:
            if (model.epochs is None) == (model.epoch_candidates is None):
                raise ValueError(f"model {model.name}: give exactly one of epochs and epoch_candidates")
            for e in [model.epochs] if model.epochs is not None else model.epoch_candidates:
                if not isinstance(e, int) or e < 1:
                    raise ValueError(f"model {model.name}: epochs must be positive integers, got {e!r}")
            batches = self.batches_of(model)
            if self.base_batch not in batches:
                raise ValueError(f"model {model.name}: the base batch {self.base_batch} must be one of its batches")
            if not set(batches) <= set(self.batches):
                raise ValueError(f"model {model.name}: its batches must be among the study's {self.batches}")
            if not self.seeds_of(model) or not set(self.seeds_of(model)) <= set(self.seeds):
                raise ValueError(f"model {model.name}: its seeds must be among the study's {self.seeds}")
            for batch in self.ablation_batch_sizes(model):
                if batch not in batches:
                    raise ValueError(f"model {model.name}: ablation batch {batch} is not one of its batches")
        if self.ablation_seeds is not None and not set(self.ablation_seeds) <= set(self.seeds):
            raise ValueError(f"ablation_seeds must be among the seeds {self.seeds}")
        for method in self.ablation_methods:
            if get_method(method).family not in families:
                # its base rate would not come from the tuning every other method had
                raise ValueError(f"ablation method {method}: no method of its family {get_method(method).family!r} "
                                 "is in the main sweep, so its base rate is not tuned")

    def model(self, name: str) -> ModelBudget:
        return next(m for m in self.models if m.name == name)

    def batches_of(self, model: ModelBudget) -> list[int]:
        return sorted(model.batches if model.batches is not None else self.batches)

    def seeds_of(self, model: ModelBudget) -> list[int]:
        return list(model.seeds if model.seeds is not None else self.seeds)

    def ablation_seeds_of(self, model: ModelBudget) -> list[int]:
        seeds = self.seeds_of(model)
        return [s for s in seeds if self.ablation_seeds is None or s in self.ablation_seeds]

    def ablation_batch_sizes(self, model: ModelBudget | None = None) -> list[int]:
        if self.ablation_batches is not None:
            return sorted(self.ablation_batches)
        return (self.batches_of(model) if model is not None else sorted(self.batches))[-2:]

    def sensitivity_seeds_of(self, model: ModelBudget) -> list[int]:
        return [s for s in self.seeds_of(model) if s in self.sensitivity_seeds]

    def grid_of(self, family: str) -> list[float]:
        return sorted(self.tune_grids.get(family, self.tune_grid))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- the budget rule ------------------------------------------------------------------------------

def min_epochs_for_updates(train_size: int, batch: int, updates: int) -> int:
    """The fewest epochs that give ``batch`` at least ``updates`` updates (the last incomplete batch of an
    epoch is dropped): 55,000 images at 16,384 are 3 updates per epoch, so 100 updates need 34 epochs."""
    per_epoch = train_size // batch
    if per_epoch < 1:
        raise ValueError(f"batch {batch} is larger than the {train_size} training images")
    return math.ceil(updates / per_epoch)


def choose_epochs(candidates: list[int], accuracy: dict[int, list[float]], tolerance: float,
                  min_epochs: int) -> dict:
    """The budget rule: the smallest candidate E >= ``min_epochs`` with |mean acc(2E) - mean acc(E)| <=
    ``tolerance`` (``accuracy``: epochs -> the seeds' final accuracies).

    Returns ``{"epochs", "rule_met", "pending", "checks", "min_epochs"}``: ``pending`` is the next number
    of epochs to train when the answer needs runs not made yet (``epochs`` is then None); when no eligible
    candidate passes, ``epochs`` is the largest eligible one and ``rule_met`` False.
    """
    eligible = sorted(e for e in set(candidates) if e >= min_epochs)
    if not eligible:
        raise ValueError(f"no epoch candidate of {sorted(candidates)} gives the largest batch enough updates "
                         f"(needs at least {min_epochs} epochs)")
    checks = []
    for e in eligible:
        for needed in (e, 2 * e):
            if not accuracy.get(needed):
                return {"epochs": None, "rule_met": None, "pending": needed, "checks": checks,
                        "min_epochs": min_epochs}
        at_e, at_2e = statistics.fmean(accuracy[e]), statistics.fmean(accuracy[2 * e])
        passes = abs(at_2e - at_e) <= tolerance + 1e-12
        checks.append({"epochs": e, "accuracy": at_e, "accuracy_2e": at_2e, "difference": at_2e - at_e,
                       "seeds": len(accuracy[e]), "passes": passes})
        if passes:
            return {"epochs": e, "rule_met": True, "pending": None, "checks": checks, "min_epochs": min_epochs}
    return {"epochs": eligible[-1], "rule_met": False, "pending": None, "checks": checks, "min_epochs": min_epochs}


# -- tuning with grid extension ---------------------------------------------------------------------

def tune_with_extension(grid: list[float], evaluate: Callable[[float], float], max_extend: int) -> dict:
    """Score every rate of ``grid``; while the best is at an end, extend that end by one half-decade step
    (at most ``max_extend`` per end). The first of equal scores (the smaller rate) is the best.

    Returns ``{"lr", "grid" (rate -> score, in rate order), "initial_grid", "final_grid", "extended",
    "inside"}``; ``inside`` is False when the best is still an end of the final grid.
    """
    rates = sorted(set(grid))
    scores = {lr: evaluate(lr) for lr in rates}
    extended = {"up": 0, "down": 0}

    def best() -> float:
        return max(sorted(scores), key=lambda lr: (scores[lr], -lr))

    while True:
        top, bottom, chosen = max(scores), min(scores), best()
        if len(scores) > 1 and chosen == top and extended["up"] < max_extend:
            new, extended["up"] = next_rate(top, up=True), extended["up"] + 1
        elif len(scores) > 1 and chosen == bottom and extended["down"] < max_extend:
            new, extended["down"] = next_rate(bottom, up=False), extended["down"] + 1
        else:
            break
        scores[new] = evaluate(new)
    chosen, final = best(), sorted(scores)
    return {"lr": chosen, "grid": {f"{lr:g}": scores[lr] for lr in final}, "initial_grid": rates,
            "final_grid": final, "extended": [lr for lr in final if lr not in rates],
            "inside": final[0] < chosen < final[-1]}


# -- the runs --------------------------------------------------------------------------------------

def template(spec: StudySpec, model: ModelBudget, epochs: int | None = None) -> TrainConfig:
    epochs = epochs or model.epochs or min(model.epoch_candidates)
    fields = dict(
        model=model.name, micro_batch=spec.micro_batch, epochs=epochs, base_batch=spec.base_batch,
        dataset=spec.dataset, data_dir=spec.data_dir, train_limit=spec.train_limit, test_limit=spec.test_limit,
        val_size=spec.val_size, split_seed=spec.split_seed, layer_every=spec.layer_every, progress=spec.progress,
        precision=spec.precision, device=spec.device, threads=spec.threads, clock_cap=spec.adascale_cap,
    )
    if spec.warmup_fraction is not None:
        fields["warmup_fraction"] = spec.warmup_fraction
    return TrainConfig(**fields)


def train_size(spec: StudySpec, model: ModelBudget) -> int:
    return len(load_data(template(spec, model, 1)).train)


def model_min_epochs(spec: StudySpec, model: ModelBudget) -> int:
    """The budget rule's part (b): the fewest epochs giving the model's largest batch ``min_updates`` updates."""
    return min_epochs_for_updates(train_size(spec, model), max(spec.batches_of(model)), spec.min_updates)


def plateau_config(spec: StudySpec, model: ModelBudget, epochs: int, seed: int) -> TrainConfig:
    config = template(spec, model, epochs)
    return dataclasses.replace(
        config, method=BASELINE_METHOD, batch=spec.base_batch, seed=seed, micro_batch=min(spec.micro_batch,
                                                                                            spec.base_batch),
        lr=spec.plateau_lr, resume=True,
        run_dir=str(Path(spec.run_dir) / model.name / "plateau" / f"{BASELINE_METHOD}-e{epochs}-s{seed}"))


def plateau_accuracies(spec: StudySpec, model: ModelBudget) -> dict[int, list[float]]:
    """Epochs -> the seeds' final accuracies (the rule's metric) of the finished plateau runs, every seed done."""
    key = "final_val_accuracy" if spec.plateau_metric == "val" else "final_test_accuracy"
    out = {}
    for epochs in sorted({e for c in model.epoch_candidates for e in (c, 2 * c)}):
        values = []
        for seed in spec.seeds_of(model):
            path = Path(plateau_config(spec, model, epochs, seed).run_dir)
            if not is_finished(path):
                break
            values.append(read_json(path / SUMMARY)[key])
        else:
            out[epochs] = values
    return out


def plateau_decision(spec: StudySpec, model: ModelBudget) -> dict:
    """The budget rule applied to the finished plateau runs (``epochs`` None while runs are missing)."""
    decision = choose_epochs(model.epoch_candidates, plateau_accuracies(spec, model), spec.plateau_tolerance,
                             model_min_epochs(spec, model))
    decision.update(metric=spec.plateau_metric, tolerance=spec.plateau_tolerance, lr=spec.plateau_lr,
                    candidates=sorted(model.epoch_candidates), min_updates=spec.min_updates,
                    largest_batch=max(spec.batches_of(model)))
    return decision


def epochs_of(spec: StudySpec, model: ModelBudget) -> int | None:
    """The model's epoch budget: given, or chosen by the budget rule (None: the plateau phase is not done)."""
    if model.epochs is not None:
        return model.epochs
    return plateau_decision(spec, model)["epochs"]


def planned_epochs(spec: StudySpec, model: ModelBudget) -> int:
    """The budget if the first eligible candidate passes the rule (what the estimate assumes)."""
    if model.epochs is not None:
        return model.epochs
    return epochs_of(spec, model) or min(e for e in model.epoch_candidates if e >= model_min_epochs(spec, model))


def sweep_spec(spec: StudySpec, model: ModelBudget, epochs: int | None = None) -> SweepSpec:
    config = template(spec, model, epochs)
    legacy = model.epoch_candidates is None and not spec.tune_extend and not spec.tune_grids
    return SweepSpec(
        methods=list(spec.methods), batches=spec.batches_of(model), seeds=spec.seeds_of(model),
        run_dir=str(Path(spec.run_dir) / model.name), template=config,
        # the first study tunes inside the sweep, on one grid; otherwise the study tunes (extending grids)
        tune_grid=list(spec.tune_grid) if legacy else [],
        evals_per_epoch=spec.evals_per_epoch, train_size=len(load_data(config).train),
    )


def tune_config(sweep: SweepSpec, spec: StudySpec, family: str, method: str, lr: float) -> TrainConfig:
    return dataclasses.replace(sweep.config(method, spec.base_batch, sweep.seeds[0], lr=lr),
                               run_dir=str(Path(sweep.run_dir) / "tune" / f"{family}-lr{lr:g}"))


@dataclass(frozen=True)
class AblationRun:
    method: str
    mode: str
    batch: int
    seed: int
    same_as: str | None  # the main-sweep method whose run this is, or None: trained here


def same_run_in_sweep(method: str, mode: str, sweep_methods: list[str]) -> str | None:
    """The sweep method that trains exactly (method, mode), if any: same optimiser, rule, family, schedule."""
    wanted = get_method(method)
    for name in sweep_methods:
        other = get_method(name)
        if (other.make_optimizer is wanted.make_optimizer and other.scaling == wanted.scaling
                and other.family == wanted.family and other.make_decay is wanted.make_decay
                and other.warmup == mode):
            return name
    return None


def ablation_runs(spec: StudySpec, model: ModelBudget | None = None) -> list[AblationRun]:
    model = model or spec.models[0]
    return [
        AblationRun(method, mode, batch, seed, same_run_in_sweep(method, mode, spec.methods))
        for seed in spec.ablation_seeds_of(model) for batch in spec.ablation_batch_sizes(model)
        for method in spec.ablation_methods for mode in spec.ablation_modes
    ]


def ablation_config(sweep: SweepSpec, run: AblationRun) -> TrainConfig:
    if run.same_as is not None:
        return sweep.config(run.same_as, run.batch, run.seed)
    config = sweep.config(run.method, run.batch, run.seed)
    run_dir = Path(sweep.run_dir) / "ablation" / "runs" / f"{run.method}-w{run.mode}-b{run.batch}-s{run.seed}"
    return dataclasses.replace(config, warmup=run.mode, run_dir=str(run_dir))


# -- the estimate ------------------------------------------------------------------------------------

@dataclass
class Throughput:
    """Measured seconds per training image (by kind of method) and per evaluated image, for one model."""

    train: dict[str, float]
    evaluate: float


def method_kind(method: str) -> str:
    """What drives a method's cost: plain backward, per-micro-batch statistics, per-example norms."""
    m = get_method(method)
    if not m.uses_statistics:
        return "plain"
    return "per-example" if m.name == "clars" else "statistics"


KIND_METHODS = {"plain": "lsw", "statistics": "lena", "per-example": "clars"}


def measure_throughput(config: TrainConfig, kinds: set[str], rounds: int = 8, batch: int | None = None) -> Throughput:
    """Timed steps at a batch of 4 micro-batches, the kinds of method interleaved round-robin so that a
    busy moment hits all alike; per kind the fastest step (the quiet machine's speed) after one untimed."""
    from .loop import accumulate_gradients, evaluate
    from .methods import RunShape, build
    from .runner import make_model

    data = load_data(config)
    batch = batch or min(4 * config.micro_batch, len(data.train))
    images, labels = data.train.images[:batch], data.train.labels[:batch]
    steppers = {}
    for kind in sorted(kinds):
        method = KIND_METHODS[kind]
        model = make_model(dataclasses.replace(config, method=method), data, torch.device("cpu"))
        shape = RunShape(base_lr=0.01, base_batch=config.base_batch, batch=batch, steps_per_epoch=rounds + 1,
                         epochs=1)
        steppers[kind] = (model, build(get_method(method), model, shape)[0])
    best = {kind: math.inf for kind in steppers}
    for round_ in range(rounds + 1):
        for kind, (model, optimizer) in steppers.items():
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            accumulate_gradients(model, images, labels, min(config.micro_batch, batch))
            optimizer.step()
            if round_:
                best[kind] = min(best[kind], time.perf_counter() - started)
    model = next(iter(steppers.values()))[0]
    evaluate(model, data.test)
    started = time.perf_counter()
    evaluate(model, data.test)
    return Throughput({kind: seconds / batch for kind, seconds in best.items()},
                      (time.perf_counter() - started) / max(1, len(data.test)))


def run_seconds(config: TrainConfig, throughput: Throughput, train_size: int, test_size: int,
                val_size: int) -> float:
    """A run's training and evaluation time by the cost model; AdaScale's at its cap (an upper bound)."""
    epochs = config.epochs
    if get_method(config.method).ends_on_clock:
        epochs = math.ceil(config.clock_cap * config.epochs)
    steps_per_epoch = train_size // config.batch
    trained = steps_per_epoch * config.batch * epochs
    per_epoch = math.ceil(steps_per_epoch / config.eval_every) if config.eval_every else 1
    evals = epochs * per_epoch
    evaluated = evals * test_size + epochs * val_size
    return trained * throughput.train[method_kind(config.method)] + evaluated * throughput.evaluate


@dataclass
class Phase:
    model: str
    name: str  # "plateau", "tune", "sweep" or "ablation"
    configs: list[TrainConfig]
    note: str = ""


def phases(spec: StudySpec) -> list[Phase]:
    """Every phase's runs. A model whose budget the plateau phase has not chosen yet is planned at its first
    eligible candidate (the tuning phase at the initial grids: an extension adds runs)."""
    out = []
    for model in spec.models:
        epochs = planned_epochs(spec, model)
        if model.epoch_candidates is not None:
            decided = epochs_of(spec, model) is not None
            plateau = [plateau_config(spec, model, e, s) for e in (epochs, 2 * epochs) for s in spec.seeds_of(model)]
            note = "" if decided else f"E = {epochs} if it passes the rule"
            out.append(Phase(model.name, "plateau", plateau, note))
        sweep = sweep_spec(spec, model, epochs)
        tune_runs = [tune_config(sweep, spec, get_method(method).family, method, lr)
                     for method in family_representatives(spec.methods)
                     for lr in spec.grid_of(get_method(method).family)]
        tuned = _tuned_so_far(spec, model)
        sweep.lrs.update({family: entry["lr"] for family, entry in tuned.items()})
        main = [sweep.config(m, b, s) for m, b, s in sweep.runs()]
        ablation = [ablation_config(sweep, r) for r in ablation_runs(spec, model) if r.same_as is None]
        out += [Phase(model.name, "tune", tune_runs)]
        if spec.tune_seeds > 1:
            out.append(Phase(model.name, TUNE_SEEDS, tune_seed_configs(
                sweep, spec.base_batch, tuned, _representatives(spec), spec.tune_seeds, spec.tune_within),
                "" if tuned else "the near-best rates once tuned"))
        out += [Phase(model.name, "sweep", main), Phase(model.name, "ablation", ablation)]
        if spec.sensitivity_seeds_of(model):
            out.append(Phase(model.name, SENSITIVITY, sensitivity_configs(sweep, spec.sensitivity_seeds_of(model))))
        if spec.noise_scale:
            out.append(Phase(model.name, NOISE_SCALE, [noise_scale_config(sweep, spec.base_batch)]))
    return out


def _tuned_so_far(spec: StudySpec, model: ModelBudget) -> dict:
    path = Path(spec.run_dir) / model.name / TUNED_FILE
    return read_json(path) if path.exists() else {}


def _representatives(spec: StudySpec) -> dict[str, str]:
    """Family -> the method that tunes its rate."""
    return {get_method(m).family: m for m in family_representatives(spec.methods)}


def family_representatives(methods: list[str]) -> list[str]:
    """The method that tunes each family's base rate (as largebatch.train.sweep.tune_families picks it)."""
    chosen: dict[str, str] = {}
    for method in [BASELINE_METHOD, *methods]:
        chosen.setdefault(get_method(method).family, method)
    return list(chosen.values())


def estimate(spec: StudySpec, log: Callable[[str], None] = print) -> dict:
    """Seconds per phase (all runs, and those not finished yet), from a few measured steps per model."""
    rows = []
    for phase in phases(spec):
        config = phase.configs[0] if phase.configs else None
        if config is None:
            continue
        data = load_data(config)
        throughput = _throughput_of(config, {method_kind(m) for m in {*spec.methods, *spec.ablation_methods,
                                                                       BASELINE_METHOD}})
        seconds = [run_seconds(c, throughput, len(data.train), len(data.test), len(data.val)) for c in phase.configs]
        left = [s for s, c in zip(seconds, phase.configs) if not is_finished(Path(c.run_dir))]
        rows.append({"model": phase.model, "phase": phase.name, "runs": len(phase.configs), "runs_left": len(left),
                     "epochs": max(c.epochs for c in phase.configs), "note": phase.note,
                     "seconds": sum(seconds), "seconds_left": sum(left),
                     "images_per_second": {k: 1 / v for k, v in throughput.train.items()}})
    total, left = sum(r["seconds"] for r in rows), sum(r["seconds_left"] for r in rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"Estimated wall time of {spec.name}: total {total / 60:.1f} min ({total / 3600:.2f} h), left "
        f"{left / 60:.1f} min; budget {60 * spec.budget_hours:.0f} min")
    log(f"  measured now from a few steps per kind of method and model; load average {load:.1f} on "
        f"{os.cpu_count()} CPUs (a busy machine makes this pessimistic); AdaScale counted at its cap "
        f"({spec.adascale_cap:g} x the epochs), grids before any extension:")
    for r in rows:
        speed = ", ".join(f"{k} {v:,.0f}" for k, v in r["images_per_second"].items())
        note = f" ({r['note']})" if r["note"] else ""
        log(f"  {r['model']:10} {r['phase']:8} {r['runs']:4} runs ({r['runs_left']} left), {r['epochs']} epochs"
            f"{note}: {r['seconds'] / 60:6.1f} min, left {r['seconds_left'] / 60:6.1f} min   [img/s: {speed}]")
    log(f"  total {total / 60:.1f} min, left {left / 60:.1f} min; budget {60 * spec.budget_hours:.0f} min")
    if total > 3600 * spec.budget_hours:
        log("  warning: over the budget on this machine now (busy? slower?); see docs/study.md for the arithmetic")
    return {"phases": rows, "seconds": total, "seconds_left": left, "load_average": load}


_THROUGHPUT: dict[tuple, Throughput] = {}


def _throughput_of(config: TrainConfig, kinds: set[str]) -> Throughput:
    key = (config.model, config.dataset, config.micro_batch, config.train_limit, config.test_limit, *sorted(kinds))
    if key not in _THROUGHPUT:
        _THROUGHPUT[key] = measure_throughput(config, kinds)
    return _THROUGHPUT[key]


# -- running ----------------------------------------------------------------------------------------

class Committer:
    """--commit: refresh summaries.json after every finished run; git-commit it (and the page, once written)
    after the first run that finishes ``every`` seconds after the last commit, and at the end of each phase."""

    def __init__(self, spec: StudySpec, enabled: bool, log: Callable[[str], None], every: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.spec, self.enabled, self.log, self.clock = spec, enabled, log, clock
        self.every = 60 * spec.commit_every_minutes if every is None else every
        self.last = clock()
        self.commits: list[str] = []

    def finished_run(self) -> None:
        collect(self.spec)
        if self.clock() - self.last >= self.every:
            self.commit("finished runs so far")

    def commit(self, what: str) -> None:
        collect(self.spec)
        self.last = self.clock()
        if not self.enabled:
            return
        paths = [str(p) for p in (Path(self.spec.artifacts), Path(self.spec.out)) if p.exists()]
        message = f"Study {self.spec.name}: {what} (run summaries)"
        try:
            subprocess.run(["git", "add", *paths], check=True, capture_output=True)
            done = subprocess.run(["git", "commit", "-m", message, "--", *paths], capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            self.log(f"commit skipped: {e}")
            return
        if done.returncode == 0:
            self.commits.append(message)
            self.log(f"committed: {message}")
        else:
            reason = (done.stdout + done.stderr).strip().splitlines()
            self.log(f"commit skipped: {reason[0] if reason else 'git commit failed'}")


def _train_logged(config: TrainConfig, label: str, progress: Progress, committer: Committer,
                  log: Callable[[str], None], k: int, n: int) -> dict | None:
    if is_finished(Path(config.run_dir)):
        log(f"{label}: finished, skipped")
        return read_json(Path(config.run_dir) / SUMMARY)
    log(f"{label}: training, run {k} of {n}{progress.eta()}")
    summary = progress.timed(train, config)
    log(f"{label}: {outcome(summary)}")
    committer.finished_run()
    return summary


def run_plateau(spec: StudySpec, model: ModelBudget, committer: Committer,
                log: Callable[[str], None] = print) -> dict:
    """Train the plateau runs the budget rule asks for, one candidate at a time; returns the decision."""
    while True:
        decision = plateau_decision(spec, model)
        if decision["pending"] is None:
            break
        epochs = decision["pending"]
        configs = [plateau_config(spec, model, epochs, s) for s in spec.seeds_of(model)]
        progress = Progress(sum(not is_finished(Path(c.run_dir)) for c in configs))
        for k, config in enumerate(configs, 1):
            _train_logged(config, f"plateau {model.name} sgd batch {spec.base_batch} {epochs} epochs seed "
                          f"{config.seed}", progress, committer, log, k, len(configs))
    root = Path(spec.run_dir) / model.name
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / PLATEAU_FILE, decision)
    checks = "; ".join(f"E = {c['epochs']}: {100 * c['accuracy']:.2f}% -> {100 * c['accuracy_2e']:.2f}% at 2E "
                       f"({'passes' if c['passes'] else 'fails'})" for c in decision["checks"])
    log(f"== {model.name}: budget rule: {checks}; E = {decision['epochs']}"
        + ("" if decision["rule_met"] else " (no candidate passed: the largest eligible one)"))
    return decision


def run_tuning(spec: StudySpec, sweep: SweepSpec, committer: Committer, log: Callable[[str], None] = print) -> dict:
    """Tune each family at the base batch on its grid, extending a grid whose best rate is at an end."""
    path = Path(sweep.run_dir) / TUNED_FILE
    tuned = read_json(path) if path.exists() else {}
    for method in family_representatives(spec.methods):
        family = get_method(method).family
        grid = spec.grid_of(family)
        entry = tuned.get(family)
        if entry and entry.get("initial_grid") == grid and entry.get("max_extend") == spec.tune_extend:
            continue
        progress = Progress(sum(not is_finished(Path(tune_config(sweep, spec, family, method, lr).run_dir))
                                for lr in grid))

        def evaluate(lr: float, method=method, family=family) -> float:
            config = tune_config(sweep, spec, family, method, lr)
            label = f"tune {method} lr {lr:g} at batch {spec.base_batch}"
            summary = _train_logged(config, label, progress, committer, log, 1, 1)
            return summary["final_val_accuracy"]  # a diverged run's: its model as the run left it

        result = tune_with_extension(grid, evaluate, spec.tune_extend)
        result["max_extend"] = spec.tune_extend
        result["how"] = (f"tuned with {method} at batch {spec.base_batch}, seed {sweep.seeds[0]}, "
                         f"{sweep.template.epochs} epochs: best validation accuracy over "
                         f"{', '.join(f'{lr:g}' for lr in result['final_grid'])}")
        tuned[family] = result
        write_json(path, tuned)
        log(f"tuned {family}: {result['lr']:g} ({'inside' if result['inside'] else 'AT AN END of'} the grid "
            f"{', '.join(f'{lr:g}' for lr in result['final_grid'])})")
    return tuned


def run_study(spec: StudySpec, log: Callable[[str], None] = print, commit: bool = False,
              write_page: Callable[[Path], Path] | None = None) -> Path:
    """Plateau, tune, sweep and ablate every model (skipping finished runs), then write summaries.json and,
    with ``write_page`` (summaries.json -> the page it wrote; the command line passes the report's), the page.
    Returns the page, or summaries.json without ``write_page``.

    Stopped by a signal or Ctrl-C, it commits what finished (with ``commit``) and says how far it got.
    """
    Path(spec.artifacts).mkdir(parents=True, exist_ok=True)
    restore_committed(spec, log)
    committer = Committer(spec, commit, log)
    try:
        for model in spec.models:
            _run_model(spec, model, committer, log)
    except (Interrupted, KeyboardInterrupt):
        committer.commit("interrupted; finished runs kept")
        log(f"stopped: {progress_note(spec)}; run the same command to resume")
        raise
    summaries = collect(spec)
    page = write_page(summaries) if write_page is not None else summaries
    committer.commit("results page" if write_page is not None else "every run")
    log(f"done: {progress_note(spec)}")
    return page


def _run_model(spec: StudySpec, model: ModelBudget, committer: Committer, log: Callable[[str], None]) -> None:
    epochs = model.epochs
    if model.epoch_candidates is not None:
        log(f"== {model.name}: plateau phase (budget rule), sgd at batch {spec.base_batch}, candidates "
            f"{model.epoch_candidates}, at least {model_min_epochs(spec, model)} epochs for {spec.min_updates} "
            f"updates at {max(spec.batches_of(model))}")
        epochs = run_plateau(spec, model, committer, log)["epochs"]
        committer.commit(f"{model.name}: plateau phase")
    sweep = sweep_spec(spec, model, epochs)
    if not sweep.tune_grid:
        log(f"== {model.name}: tuning base rates at batch {spec.base_batch}, {epochs} epochs")
        tuned = run_tuning(spec, sweep, committer, log)
        committer.commit(f"{model.name}: tuning")
        if spec.tune_seeds > 1:
            log(f"== {model.name}: near-best rates on seeds {sweep.seeds[:spec.tune_seeds]}, one-SE rule")
            configs = tune_seed_configs(sweep, spec.base_batch, tuned, _representatives(spec), spec.tune_seeds,
                                        spec.tune_within)
            tuned = run_tune_seeds(sweep, spec.base_batch, tuned, _representatives(spec), spec.tune_seeds,
                                   spec.tune_within, _trainer(configs, committer, log), log)
            committer.commit(f"{model.name}: tuning on seeds")
        sweep.lrs.update({family: entry["lr"] for family, entry in tuned.items()})
    runs = ablation_runs(spec, model)
    sensitivity = sensitivity_configs(sweep, spec.sensitivity_seeds_of(model))
    moved = set_aside_superseded([sweep.config(*run) for run in sweep.runs()]
                                 + [ablation_config(sweep, r) for r in runs if r.same_as is None] + sensitivity,
                                 Path(spec.run_dir) / model.name, log)
    if moved:
        committer.finished_run()
    if spec.noise_scale:  # one run, and the page's explanation of every fall-off: before the long phases
        log(f"== {model.name}: gradient noise scale over the base-batch run")
        noise = [noise_scale_config(sweep, spec.base_batch)]
        run_configs(noise, NOISE_SCALE, _trainer(noise, committer, log))
        committer.commit(f"{model.name}: gradient noise scale")
    log(f"== {model.name}: main sweep, {epochs} epochs, batches {sweep.batches}, seeds {sweep.seeds}")
    run_sweep(sweep, log=_then_collect(committer, log))
    committer.commit(f"{model.name}: main sweep")
    log(f"== {model.name}: warm-up ablation at batches {spec.ablation_batch_sizes(model)}")
    progress = Progress(sum(r.same_as is None and not is_finished(Path(ablation_config(sweep, r).run_dir))
                            for r in runs))
    for k, run in enumerate(runs, 1):
        label = f"ablation {run.method} --warmup {run.mode} batch {run.batch} seed {run.seed}"
        if run.same_as is not None:
            log(f"{label}: the sweep's {run.same_as} run")
            continue
        _train_logged(ablation_config(sweep, run), label, progress, committer, log, k, len(runs))
    committer.commit(f"{model.name}: warm-up ablation")
    if sensitivity:
        log(f"== {model.name}: rate sensitivity, the main sweep from each family's rate / 3, seeds "
            f"{spec.sensitivity_seeds_of(model)}")
        run_configs(sensitivity, SENSITIVITY, _trainer(sensitivity, committer, log))
        committer.commit(f"{model.name}: rate sensitivity")


def _trainer(configs: list[TrainConfig], committer: Committer, log: Callable[[str], None]):
    """A phase's train_one: trains (or skips, when finished) one of ``configs``, logging k of n with an ETA."""
    progress = Progress(sum(not is_finished(Path(c.run_dir)) for c in configs))
    counter = iter(range(1, len(configs) + 1))

    def train_one(config: TrainConfig, label: str) -> dict:
        return _train_logged(config, label, progress, committer, log, next(counter, len(configs)), len(configs))

    return train_one


def set_aside_superseded(configs: list[TrainConfig], model_root: Path, log: Callable[[str], None] = print) -> int:
    """Move finished runs that the protocol no longer asks for out of the phases' directories.

    A run directory is named by method, batch, seed and warm-up: when an
    amendment changes a family's rate (or the budget), the finished run there
    is not the run the phase wants, and would otherwise be skipped as if it
    were. It moves to ``<model>/superseded/<its path>``, with a note of why;
    ``collect`` keeps it in summaries.json as phase "superseded", so the page
    can show what the amendment replaced. Returns how many moved.
    """
    moved = 0
    for config in configs:
        changed = finished_differently(config)
        if changed is None:
            continue
        source = Path(config.run_dir)
        relative = source.relative_to(model_root)
        target = model_root / SUPERSEDED / relative
        for k in range(1, 1000):
            if not target.exists():
                break
            target = model_root / SUPERSEDED / relative.with_name(f"{relative.name}.{k}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
        phase = relative.parts[0] if relative.parts[0] in ("ablation", SENSITIVITY) else "sweep"
        write_json(target / SUPERSEDED_NOTE, {"phase": phase, "because": changed})
        log(f"{source}: finished as another run ({changed}); set aside in {target}")
        moved += 1
    return moved


def _then_collect(committer: Committer, log: Callable[[str], None]) -> Callable[[str], None]:
    # run_sweep logs once per run: refresh summaries.json (and commit when due), so a stop loses nothing.
    def log_and_collect(line: str) -> None:
        log(line)
        if not line.endswith("finished, skipped") and ": training" not in line:
            committer.finished_run()

    return log_and_collect


def progress_note(spec: StudySpec) -> str:
    """How far the study got: finished runs per model and phase."""
    parts = []
    for phase in phases(spec):
        done = sum(is_finished(Path(c.run_dir)) for c in phase.configs)
        parts.append(f"{phase.model} {phase.name} {done}/{len(phase.configs)}")
    return "finished runs: " + ", ".join(parts)


# -- summaries ---------------------------------------------------------------------------------------

# Key of a summary.json written back from a committed record (restore_committed): the record itself.
RESTORED = "restored_record"
_PHASE_DIRS = {"plateau": ("plateau",), "tune": ("tune",), "sweep": ("runs",), "ablation": ("ablation", "runs"),
               TUNE_SEEDS: (TUNE_SEEDS,), SENSITIVITY: (SENSITIVITY, "runs"), NOISE_SCALE: (NOISE_SCALE,),
               "superseded": ("superseded",)}  # its records' "run" is the path under superseded/
SUPERSEDED = "superseded"
SUPERSEDED_NOTE = "superseded.json"  # in a set-aside run: the phase it was run for and why it no longer is


def restore_committed(spec: StudySpec, log: Callable[[str], None] = print) -> int:
    """Bring back, from the committed summaries.json, the finished runs whose directories are gone.

    Run directories (checkpoints, per-step logs) are not committed, so on a
    new machine only summaries.json says what finished. Each of its runs gets
    a summary.json in its run directory holding its record (the fields the
    phases read, and the record itself for ``collect``), and each model its
    tuned rates, so the study skips them as finished. Returns how many were restored.
    """
    path = Path(spec.artifacts) / SUMMARIES
    if not path.exists():
        return 0
    data = read_json(path)
    if data.get("spec", {}).get("name") != spec.name:
        log(f"{path} holds the study {data.get('spec', {}).get('name')!r}, not {spec.name!r}: nothing restored")
        return 0
    restored = 0
    for record in data.get("runs", []):
        directory = Path(spec.run_dir) / record["model"] / Path(*_PHASE_DIRS[record["phase"]]) / record["run"]
        if is_finished(directory):
            continue
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / SUMMARY, {**record, RESTORED: record})
        restored += 1
    for model, tuned in data.get("tuning", {}).items():
        tuned_path = Path(spec.run_dir) / model / TUNED_FILE
        if not tuned_path.exists():
            tuned_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(tuned_path, tuned)
    if restored:
        log(f"restored {restored} finished runs from {path} (their run directories were not here)")
    return restored


def collect(spec: StudySpec) -> Path:
    """Write summaries.json: the spec, the budget rule's decisions, tuned rates and every finished run,
    compact, from the run directories."""
    runs, tuning, plateau = [], {}, {}
    for model in spec.models:
        root = Path(spec.run_dir) / model.name
        if model.epoch_candidates is not None:
            plateau[model.name] = plateau_decision(spec, model)
            for directory in sorted((root / "plateau").glob("*")):
                if is_finished(directory):
                    runs.append(_run_record(directory, model.name, "plateau", spec))
        tuned_path = root / TUNED_FILE
        if tuned_path.exists():
            tuning[model.name] = read_json(tuned_path)
        for phase in ("tune", TUNE_SEEDS, "sweep", "ablation", SENSITIVITY, NOISE_SCALE):
            for directory in sorted(root.joinpath(*_PHASE_DIRS[phase]).glob("*")):
                if is_finished(directory):
                    runs.append(_run_record(directory, model.name, phase, spec))
        for summary in sorted((root / SUPERSEDED).rglob(SUMMARY)):
            runs.append(_superseded_record(summary.parent, root / SUPERSEDED, model.name, spec))
    path = Path(spec.artifacts) / SUMMARIES
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"spec": spec.to_dict(), "environment": _environment(), "methods": method_table(spec), "tuning": tuning}
    if plateau:
        header["plateau"] = plateau
    _write_one_run_per_line(path, header, runs)
    return path


def method_table(spec: StudySpec) -> dict[str, dict]:
    """What the page needs of each method, so that it reads no registry: its family, and per warm-up mode of
    the ablation the main-sweep method that trains exactly that (None: the ablation trains it)."""
    names = sorted({*spec.methods, *spec.ablation_methods, BASELINE_METHOD})
    return {m: {"family": get_method(m).family,
                "same_in_sweep": {mode: same_run_in_sweep(m, mode, spec.methods) for mode in ABLATION_MODES}}
            for m in names}


def _superseded_record(directory: Path, superseded_root: Path, model: str, spec: StudySpec) -> dict:
    record = _run_record(directory, model, SUPERSEDED, spec)
    if "superseded_phase" in record:  # restored from summaries.json: the record as it was
        return record
    note = read_json(directory / SUPERSEDED_NOTE)
    return {**record, "phase": SUPERSEDED, "superseded_phase": note["phase"], "superseded_because": note["because"],
            "run": directory.relative_to(superseded_root).as_posix()}


def _write_one_run_per_line(path: Path, header: dict, runs: list[dict]) -> None:
    """Valid JSON, compact, one run per line: small to commit and readable in a diff."""
    lines = ["{"] + [f"{json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()] + ['"runs": [']
    lines += [json.dumps(run, separators=(",", ":")) + ("," if i < len(runs) - 1 else "") for i, run in enumerate(runs)]
    lines += ["]}"]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


_RECORDS: dict[tuple, dict] = {}  # a run's record, until its summary.json changes


def _run_record(directory: Path, model: str, phase: str, spec: StudySpec | None = None) -> dict:
    first_seed = spec.seeds_of(spec.model(model))[0] if spec is not None else None
    samples = spec.layer_samples if spec is not None else 0
    key = (str(directory), phase, (directory / SUMMARY).stat().st_mtime, first_seed, samples)
    if key not in _RECORDS:
        _RECORDS[key] = _read_run_record(directory, model, phase, first_seed, samples)
    return _RECORDS[key]


def _read_run_record(directory: Path, model: str, phase: str, first_seed: int | None = None,
                     samples: int = 0) -> dict:
    summary = read_json(directory / SUMMARY)
    if RESTORED in summary:  # written back from a committed record: that record, as it was
        return summary[RESTORED]
    config = read_json(directory / "config.json")
    settings = config["config"]
    machine = summary.get("machine") or {}
    record = {
        "model": model, "phase": phase, "method": summary["method"], "warmup": settings.get("warmup", "default"),
        "batch": summary["batch"], "seed": summary["seed"], "base_lr": summary["base_lr"],
        "epochs": summary["epochs"], "steps": summary["steps"], "steps_per_epoch": config["steps_per_epoch"],
        "train_seconds": round(summary["train_seconds"], 3),
        "final_test_accuracy": summary["final_test_accuracy"], "final_val_accuracy": summary["final_val_accuracy"],
        "warmup_steps": config["method"].get("warmup_steps"), "run": directory.name,
    }
    if summary.get("train_cpu_seconds") is not None:
        record["train_cpu_seconds"] = round(summary["train_cpu_seconds"], 3)
    if machine.get("load_average_start") or machine.get("load_average_end"):
        record["load"] = [machine.get("load_average_start"), machine.get("load_average_end")]
    if summary.get("stopped") is not None:  # AdaScale: where its clock run ended
        record["stopped"] = summary["stopped"]
        for key in ("tau", "base_iterations", "epochs_used", "epoch_cap"):
            record[key] = summary.get(key)
    if summary.get("diverged_at_step") is not None:
        record["diverged_at_step"] = summary["diverged_at_step"]
    if phase not in ("tune", TUNE_SEEDS):
        record["evals"] = _compact_evals(summary["evals"], read_jsonl(directory / METRICS))
        ends = _final_warmup_ends(directory) if get_method(summary["method"]).own_state_aware_warmup else None
        if ends:
            record["warmup_ends"] = ends
    if phase == NOISE_SCALE:
        noise = windowed_noise_scale(read_jsonl(directory / LAYERS), NOISE_WINDOWS, config["steps_per_epoch"])
        if noise:
            record["noise"] = noise
    quantity = LAYER_SERIES.get(summary["method"])
    if (phase == "sweep" and quantity and samples and summary["seed"] == first_seed):
        series = _layer_series(directory / LAYERS, quantity, samples)
        if series:
            record["layer_series"] = series
    return record


def _compact_evals(evals: list[dict], metrics: list[dict]) -> dict[str, list]:
    """Columns, rounded; ``loss``: mean training loss of the steps since the previous evaluation; ``cpu``:
    the process CPU seconds of training and ``load`` the 1-minute load average, where the run recorded them."""
    losses = [r for r in metrics if r.get("kind") == "step"]
    logged = {r["step"]: r for r in metrics if r.get("kind") == "eval"}
    columns: dict[str, list] = {"step": [], "epoch": [], "seconds": [], "accuracy": [], "loss": []}
    cpu, load = [], []
    previous = 0
    for e in evals:
        window = [r["loss"] for r in losses if previous < r["step"] <= e["step"]]
        columns["step"].append(e["step"])
        columns["epoch"].append(round(e["epoch"], 4))
        columns["seconds"].append(round(e["train_seconds"], 3))
        columns["accuracy"].append(round(e["test_accuracy"], 5))
        columns["loss"].append(round(sum(window) / len(window), 5) if window and all(map(math.isfinite, window))
                               else None)
        full = {**logged.get(e["step"], {}), **e}
        cpu.append(round(full["train_cpu_seconds"], 3) if full.get("train_cpu_seconds") is not None else None)
        load.append(full.get("load"))
        previous = e["step"]
    if any(v is not None for v in cpu):
        columns["cpu"] = cpu
    if any(v is not None for v in load):
        columns["load"] = load
    return columns


def _layer_series(path: Path, quantity: str, samples: int) -> dict | None:
    """At most ``samples`` evenly spaced records of one per-layer quantity: {"quantity", "step", "values"}."""
    records = [r for r in read_jsonl(path) if isinstance(r.get(quantity), dict)]
    if not records:
        return None
    if len(records) > samples:
        picks = sorted({round(i * (len(records) - 1) / (samples - 1)) for i in range(samples)})
        records = [records[i] for i in picks]
    layers = sorted({layer for r in records for layer in r[quantity]})
    return {"quantity": quantity, "step": [r["step"] for r in records],
            "values": {layer: [_round(r[quantity].get(layer)) for r in records] for layer in layers}}


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.4g}")


def _final_warmup_ends(directory: Path) -> dict[str, float] | None:
    """Per layer, the update its state-aware warm-up ended (-1: not within the run), from the optimiser
    state in the run's final checkpoint; layers.jsonl is sampled every layer_every steps and can miss the end."""
    from . import checkpoint as ckpt

    path = ckpt.checkpoint_path(directory)
    if not path.exists():
        return _logged_warmup_ends(directory)
    state = ckpt.load(path).get("optimizer", {})
    ends = {}
    for group in state.get("param_groups", []):
        for index, name in zip(group["params"], group.get("param_names") or []):
            end = state.get("state", {}).get(index, {}).get("warmup_end")
            if end is not None:
                ends[name] = float(end)
    return ends or _logged_warmup_ends(directory)


def _logged_warmup_ends(directory: Path) -> dict[str, float] | None:
    for record in reversed(read_jsonl(directory / LAYERS)):
        if isinstance(record.get("warmup_end"), dict):
            return record["warmup_end"]
    return None


def _environment() -> dict:
    import platform

    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "machine": platform.machine()}

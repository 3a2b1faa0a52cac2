"""What a study runs: its specification, read from a TOML file or a preset (``presets/*.toml``).

Every key of a specification is a field of :class:`StudySpec`; docs/study.md
lists them with the presets written out. A preset is a data file beside this
module: adding one is adding ``presets/<name>.toml``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..records import BASELINE_METHOD
from ..train.methods import WARMUP_MODES, get_method
from .protocol import ABLATION_MODES, ONE_SE, TUNE_RULES

PRESET_DIR = Path(__file__).parent / "presets"


def presets() -> dict[str, dict]:
    """Every preset by name, as the data its TOML file holds."""
    return {path.stem: tomllib.loads(path.read_text()) for path in sorted(PRESET_DIR.glob("*.toml"))}


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
            offered = presets()
            if preset not in offered:
                raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(offered)}")
            data = offered[preset]
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

"""The papers' study, scaled to a small machine: one specification, one command.

``largebatch study --preset paper-small`` (or ``--spec study.toml``) runs, per model:

1. base-rate tuning: for every method family, its representative method at the
   base batch, seed of the first seed, over one grid of base rates that is the
   same for every family; the best final validation accuracy wins;
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

    RUN_DIR/<model>/            a sweep directory (largebatch.train.sweep): tune/, runs/, sweep.json
    RUN_DIR/<model>/ablation/runs/<method>-w<mode>-b<batch>-s<seed>/

Every run is skipped when its summary.json exists and resumed from its
checkpoint otherwise, tuning runs included; ``summaries.json`` is rewritten
after every finished run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .methods import WARMUP_MODES, get_method
from .metrics import LAYERS, METRICS, SUMMARY, read_json, read_jsonl
from .sweep import BASELINE_METHOD, Progress, SweepSpec, is_finished, outcome, run_sweep
from .runner import load_data, train

SUMMARIES = "summaries.json"
ABLATION_MODES = ("none", "fixed", "state-aware")

# The preset of docs/study.md: Fashion-MNIST, MLP and LeNet-5 with BatchNorm, about two hours on 2 cores.
PRESETS: dict[str, dict] = {
    "paper-small": {
        "name": "paper-small",
        "dataset": "fashion-mnist",
        "base_batch": 128,
        "micro_batch": 128,
        "batches": [128, 1024, 2048, 4096, 8192, 16384],
        "methods": ["sgd", "lsw", "sqrt", "adascale", "lars", "lamb", "clars", "lena"],
        "seeds": [0, 1, 2],
        "models": [{"name": "mlp", "epochs": 5}, {"name": "lenet5-bn", "epochs": 2}],
        # Half-decade steps over four decades: wide enough for every family's optimum at b = 128
        # (momentum SGD ~0.1, LAMB ~0.003, LARS/CLARS with trust coefficient 1e-3 ~1-10).
        "tune_grid": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
        "ablation_methods": ["lsw", "sqrt", "adascale", "lars", "lamb", "clars", "lena"],
        "evals_per_epoch": 2,
        "early_epochs": 2,
        "budget_hours": 2.0,
        "run_dir": "runs/study",
        "artifacts": "results/study",
        "out": "docs/results.md",
    },
}


@dataclass
class ModelBudget:
    name: str
    epochs: int


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
    ablation_methods: list[str] = field(default_factory=list)
    ablation_batches: list[int] | None = None  # default: the two largest batches
    ablation_modes: list[str] = field(default_factory=lambda: list(ABLATION_MODES))
    evals_per_epoch: int = 2
    early_epochs: int = 2  # the CLARS paper's "first epochs"
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
    run_dir: str = "runs/study"
    artifacts: str = "results/study"
    out: str = "docs/results.md"
    benchmarks: str = "benchmarks/results"  # their JSON feeds the page's overhead table
    spec_file: str | None = None  # the TOML file it was read from (None: a preset)
    progress: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> StudySpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in the study specification: {', '.join(unknown)}")
        data = dict(data)
        data["models"] = [ModelBudget(**m) for m in data.get("models", [])]
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
            data = dict(PRESETS[preset])
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
        if self.base_batch not in self.batches:
            raise ValueError(f"the base batch {self.base_batch} must be one of the batches")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision {self.precision!r}: use fp32, bf16 or fp16")
        for model in self.models:
            if model.epochs < 1:
                raise ValueError(f"model {model.name}: epochs must be a positive integer")
        tuned = {get_method(m).family for m in [BASELINE_METHOD, *self.methods]}
        for method in self.ablation_methods:
            if get_method(method).family not in tuned:
                # its base rate would not come from the tuning every other method had
                raise ValueError(f"ablation method {method}: no method of its family {get_method(method).family!r} "
                                 "is in the main sweep, so its base rate is not tuned")
        for batch in self.ablation_batch_sizes():
            if batch not in self.batches:
                raise ValueError(f"ablation batch {batch} is not one of the batches")

    def ablation_batch_sizes(self) -> list[int]:
        if self.ablation_batches is not None:
            return sorted(self.ablation_batches)
        return sorted(self.batches)[-2:]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- the runs --------------------------------------------------------------------------------------

def template(spec: StudySpec, model: ModelBudget) -> TrainConfig:
    fields = dict(
        model=model.name, micro_batch=spec.micro_batch, epochs=model.epochs, base_batch=spec.base_batch,
        dataset=spec.dataset, data_dir=spec.data_dir, train_limit=spec.train_limit, test_limit=spec.test_limit,
        val_size=spec.val_size, split_seed=spec.split_seed, layer_every=spec.layer_every, progress=spec.progress,
        precision=spec.precision, device=spec.device, threads=spec.threads,
    )
    if spec.warmup_fraction is not None:
        fields["warmup_fraction"] = spec.warmup_fraction
    return TrainConfig(**fields)


def sweep_spec(spec: StudySpec, model: ModelBudget) -> SweepSpec:
    config = template(spec, model)
    return SweepSpec(
        methods=list(spec.methods), batches=list(spec.batches), seeds=list(spec.seeds),
        run_dir=str(Path(spec.run_dir) / model.name), template=config, tune_grid=list(spec.tune_grid),
        evals_per_epoch=spec.evals_per_epoch, train_size=len(load_data(config).train),
    )


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


def ablation_runs(spec: StudySpec) -> list[AblationRun]:
    return [
        AblationRun(method, mode, batch, seed, same_run_in_sweep(method, mode, spec.methods))
        for seed in spec.seeds for batch in spec.ablation_batch_sizes()
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
    steps_per_epoch = train_size // config.batch
    trained = steps_per_epoch * config.batch * config.epochs
    per_epoch = math.ceil(steps_per_epoch / config.eval_every) if config.eval_every else 1
    evals = config.epochs * per_epoch
    evaluated = evals * test_size + config.epochs * val_size
    return trained * throughput.train[method_kind(config.method)] + evaluated * throughput.evaluate


@dataclass
class Phase:
    model: str
    name: str  # "tune", "sweep" or "ablation"
    configs: list[TrainConfig]


def phases(spec: StudySpec) -> list[Phase]:
    out = []
    for model in spec.models:
        sweep = sweep_spec(spec, model)
        tune_runs = [
            dataclasses.replace(sweep.config(method, spec.base_batch, spec.seeds[0], lr=lr),
                                run_dir=str(Path(sweep.run_dir) / "tune" / f"{get_method(method).family}-lr{lr:g}"))
            for method in family_representatives(spec.methods) for lr in spec.tune_grid
        ]
        main = [sweep.config(m, b, s) for m, b, s in sweep.runs()]
        ablation = [ablation_config(sweep, r) for r in ablation_runs(spec) if r.same_as is None]
        out += [Phase(model.name, "tune", tune_runs), Phase(model.name, "sweep", main),
                Phase(model.name, "ablation", ablation)]
    return out


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
        config = phase.configs[0]
        data = load_data(config)
        throughput = _throughput_of(config, {method_kind(m) for m in {*spec.methods, *spec.ablation_methods,
                                                                       BASELINE_METHOD}})
        seconds = [run_seconds(c, throughput, len(data.train), len(data.test), len(data.val)) for c in phase.configs]
        left = [s for s, c in zip(seconds, phase.configs) if not is_finished(Path(c.run_dir))]
        rows.append({"model": phase.model, "phase": phase.name, "runs": len(phase.configs), "runs_left": len(left),
                     "seconds": sum(seconds), "seconds_left": sum(left),
                     "images_per_second": {k: 1 / v for k, v in throughput.train.items()}})
    total, left = sum(r["seconds"] for r in rows), sum(r["seconds_left"] for r in rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"Estimated wall time (from a few steps per kind of method and model, measured now; load average "
        f"{load:.1f} on {os.cpu_count()} CPUs: a busy machine makes this pessimistic):")
    for r in rows:
        speed = ", ".join(f"{k} {v:,.0f}" for k, v in r["images_per_second"].items())
        log(f"  {r['model']:10} {r['phase']:8} {r['runs']:4} runs ({r['runs_left']} left): "
            f"{r['seconds'] / 60:6.1f} min, left {r['seconds_left'] / 60:6.1f} min   [img/s: {speed}]")
    log(f"  total {total / 60:.1f} min, left {left / 60:.1f} min; budget {60 * spec.budget_hours:.0f} min")
    if total > 3600 * spec.budget_hours:
        log("  warning: over the budget on this machine now (busy? slower?); see docs/study.md for the arithmetic")
    return {"phases": rows, "seconds": total, "seconds_left": left}


_THROUGHPUT: dict[tuple, Throughput] = {}


def _throughput_of(config: TrainConfig, kinds: set[str]) -> Throughput:
    key = (config.model, config.dataset, config.micro_batch, config.train_limit, config.test_limit, *sorted(kinds))
    if key not in _THROUGHPUT:
        _THROUGHPUT[key] = measure_throughput(config, kinds)
    return _THROUGHPUT[key]


# -- running ----------------------------------------------------------------------------------------

def run_study(spec: StudySpec, log: Callable[[str], None] = print, commit: bool = False) -> Path:
    """Tune, sweep and ablate every model (skipping finished runs), then write summaries and the page."""
    artifacts = Path(spec.artifacts)
    artifacts.mkdir(parents=True, exist_ok=True)
    for model in spec.models:
        sweep = sweep_spec(spec, model)
        log(f"== {model.name}: tuning base rates at batch {spec.base_batch} over {spec.tune_grid}, then the sweep")
        run_sweep(sweep, log=_then_collect(spec, log))
        _commit(spec, commit, f"{model.name}: tuning and main sweep", log)
        log(f"== {model.name}: warm-up ablation at batches {spec.ablation_batch_sizes()}")
        runs = ablation_runs(spec)
        progress = Progress(sum(r.same_as is None and not is_finished(Path(ablation_config(sweep, r).run_dir))
                                for r in runs))
        for k, run in enumerate(runs, 1):
            config = ablation_config(sweep, run)
            label = f"ablation {run.method} --warmup {run.mode} batch {run.batch} seed {run.seed}"
            if run.same_as is not None:
                log(f"{label}: the sweep's {run.same_as} run")
            elif is_finished(Path(config.run_dir)):
                log(f"{label}: finished, skipped")
            else:
                log(f"{label}: training, run {k} of {len(runs)}{progress.eta()}")
                summary = progress.timed(train, config)
                log(f"{label}: {outcome(summary)}")
                collect(spec)
        collect(spec)
        _commit(spec, commit, f"{model.name}: warm-up ablation", log)
    from ..report.study import write_study_report

    page = write_study_report(artifacts / SUMMARIES, spec.out)
    _commit(spec, commit, "results page", log)
    return page


def _then_collect(spec: StudySpec, log: Callable[[str], None]) -> Callable[[str], None]:
    # run_sweep logs once per run: refresh summaries.json then, so a stopped study loses nothing committed.
    def log_and_collect(line: str) -> None:
        log(line)
        if not line.endswith("finished, skipped") and ": training" not in line:
            collect(spec)

    return log_and_collect


def _commit(spec: StudySpec, enabled: bool, what: str, log: Callable[[str], None]) -> None:
    """git-commit the summaries (and the page, once written): finished work is kept as it comes."""
    if not enabled:
        return
    paths = [str(p) for p in (Path(spec.artifacts), Path(spec.out)) if p.exists()]
    message = f"Study {spec.name}: {what} (run summaries)"
    try:
        subprocess.run(["git", "add", *paths], check=True, capture_output=True)
        done = subprocess.run(["git", "commit", "-m", message, "--", *paths], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"commit skipped: {e}")
        return
    if done.returncode == 0:
        log(f"committed: {message}")
    else:
        reason = (done.stdout + done.stderr).strip().splitlines()
        log(f"commit skipped: {reason[0] if reason else 'git commit failed'}")


# -- summaries ---------------------------------------------------------------------------------------

def collect(spec: StudySpec) -> Path:
    """Write summaries.json: the spec, tuned rates and every finished run, compact, from the run directories."""
    runs, tuning = [], {}
    for model in spec.models:
        root = Path(spec.run_dir) / model.name
        tuned_path = root / "tuned.json"
        if tuned_path.exists():
            tuning[model.name] = read_json(tuned_path)
        for directory in sorted((root / "tune").glob("*")):
            if is_finished(directory):
                runs.append(_run_record(directory, model.name, "tune"))
        for directory in sorted((root / "runs").glob("*")):
            if is_finished(directory):
                runs.append(_run_record(directory, model.name, "sweep"))
        for directory in sorted((root / "ablation" / "runs").glob("*")):
            if is_finished(directory):
                runs.append(_run_record(directory, model.name, "ablation"))
    path = Path(spec.artifacts) / SUMMARIES
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_one_run_per_line(path, {"spec": spec.to_dict(), "environment": _environment(), "tuning": tuning},
                             runs)
    return path


def _write_one_run_per_line(path: Path, header: dict, runs: list[dict]) -> None:
    """Valid JSON, compact, one run per line: small to commit and readable in a diff."""
    lines = ["{"] + [f"{json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()] + ['"runs": [']
    lines += [json.dumps(run, separators=(",", ":")) + ("," if i < len(runs) - 1 else "") for i, run in enumerate(runs)]
    lines += ["]}"]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


_RECORDS: dict[tuple[str, str, float], dict] = {}  # a run's record, until its summary.json changes


def _run_record(directory: Path, model: str, phase: str) -> dict:
    key = (str(directory), phase, (directory / SUMMARY).stat().st_mtime)
    if key not in _RECORDS:
        _RECORDS[key] = _read_run_record(directory, model, phase)
    return _RECORDS[key]


def _read_run_record(directory: Path, model: str, phase: str) -> dict:
    summary = read_json(directory / SUMMARY)
    config = read_json(directory / "config.json")
    settings = config["config"]
    record = {
        "model": model, "phase": phase, "method": summary["method"], "warmup": settings.get("warmup", "default"),
        "batch": summary["batch"], "seed": summary["seed"], "base_lr": summary["base_lr"],
        "epochs": summary["epochs"], "steps": summary["steps"], "steps_per_epoch": config["steps_per_epoch"],
        "train_seconds": round(summary["train_seconds"], 3),
        "final_test_accuracy": summary["final_test_accuracy"], "final_val_accuracy": summary["final_val_accuracy"],
        "warmup_steps": config["method"].get("warmup_steps"), "run": directory.name,
    }
    if summary.get("diverged_at_step") is not None:
        record["diverged_at_step"] = summary["diverged_at_step"]
    if phase != "tune":
        record["evals"] = _compact_evals(summary["evals"], read_jsonl(directory / METRICS))
        ends = _final_warmup_ends(directory) if get_method(summary["method"]).own_state_aware_warmup else None
        if ends:
            record["warmup_ends"] = ends
    return record


def _compact_evals(evals: list[dict], metrics: list[dict]) -> dict[str, list]:
    """Columns, rounded; ``loss``: mean training loss of the steps since the previous evaluation."""
    losses = [r for r in metrics if r.get("kind") == "step"]
    columns: dict[str, list] = {"step": [], "epoch": [], "seconds": [], "accuracy": [], "loss": []}
    previous = 0
    for e in evals:
        window = [r["loss"] for r in losses if previous < r["step"] <= e["step"]]
        columns["step"].append(e["step"])
        columns["epoch"].append(round(e["epoch"], 4))
        columns["seconds"].append(round(e["train_seconds"], 3))
        columns["accuracy"].append(round(e["test_accuracy"], 5))
        columns["loss"].append(round(sum(window) / len(window), 5) if window and all(map(math.isfinite, window))
                               else None)
        previous = e["step"]
    return columns


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

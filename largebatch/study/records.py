"""summaries.json: every finished run of a study as a compact record, written from the run directories
(``collect``) and read back into them on a new machine (``restore_committed``), so that the page and the
study's resumption need only what is committed."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from ..records import BASELINE_METHOD, LAYERS, METRICS, SUMMARY, read_json, read_jsonl, write_json
from ..train import checkpoint as ckpt
from ..train.methods import get_method
from ..train.noise import windowed_noise_scale
from ..train.sweep import TUNED_FILE, is_finished
from .phases import NOISE_SCALE, SENSITIVITY, TUNE_SEEDS, plateau_decision
from .protocol import ABLATION_MODES, same_run_in_sweep
from .spec import StudySpec

SUMMARIES = "summaries.json"
PLATEAU_FILE = "plateau.json"
# The per-layer quantity each method's page section draws over training (layers.jsonl), sampled into
# summaries.json for the first seed: LENA's gains, the trust ratios of LARS and CLARS, AdaScale's model gain.
LAYER_SERIES = {"lena": "gains", "lars": "trust_ratios", "lars-masked": "trust_ratios", "clars": "trust_ratios",
                "adascale": "gain", "as": "gain"}
NOISE_WINDOWS = 40  # points of the noise-scale series kept in summaries.json
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
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "machine": platform.machine()}

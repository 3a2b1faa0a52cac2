"""How long a study takes on this machine: a few timed steps per kind of method and model, scaled by each
phase's runs (what ``largebatch study`` prints before it starts, and ``--estimate-only``)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..records import BASELINE_METHOD
from ..train.config import TrainConfig
from ..train.loop import accumulate_gradients, evaluate
from ..train.methods import RunShape, build, get_method
from ..train.parts import make_model
from ..train.runner import load_data
from ..train.sweep import is_finished
from .phases import phases
from .spec import StudySpec


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

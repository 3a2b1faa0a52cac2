"""The study's second look: tuning on several seeds, rate sensitivity, the gradient noise scale.

Three phases that a study specification turns on (docs/study.md, the study v2's amendment 2):

- ``tune-seeds``: every rate whose validation accuracy on the first seed is
  within ``tune_within`` of that seed's best is trained again on the next
  seeds, up to ``tune_seeds`` seeds; the family's rate is then chosen by the
  one-standard-error rule (Hastie, Tibshirani, Friedman, *The Elements of
  Statistical Learning*, 2nd ed., section 7.10): the smallest rate whose mean
  validation accuracy is within one standard error of the best mean. A
  verdict should not rest on a difference one seed's noise made, and of two
  rates the noise cannot tell apart the smaller is the safer to scale up.
- ``sensitivity``: every method of the main sweep, at every batch, for the
  ``sensitivity_seeds``, from the next lower rate of the half-decade ladder
  (rate / 3, or / 3.3 from a power of ten); a verdict that changes between the
  two rates is rate-sensitive.
- ``noise-scale``: the base-batch run of momentum SGD (first seed, the sgd
  family's rate) once more, recording the two terms of the gradient noise
  scale from per-example norms every few steps (:mod:`.noise`).

The phases take the study's own helpers as arguments, so this module needs
nothing of :mod:`.study`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from pathlib import Path

from .config import TrainConfig
from ..records import BASELINE_METHOD, write_json
from .sweep import TUNED_FILE, SweepSpec

TUNE_SEEDS = "tune-seeds"
SENSITIVITY = "sensitivity"
NOISE_SCALE = "noise-scale"
ONE_SE = "one-se"
TUNE_RULES = ("best", ONE_SE)

# (config, label) -> the finished run's summary
TrainOne = Callable[[TrainConfig, str], dict]


def near_best_rates(grid: dict[str, float], within: float) -> list[float]:
    """The rates of a tuning grid (rate text -> validation accuracy) within ``within`` of its best accuracy."""
    best = max(grid.values())
    return sorted(float(lr) for lr, accuracy in grid.items() if accuracy >= best - within)


def one_standard_error(scores: dict[float, list[float]]) -> dict:
    """The one-standard-error rule over rates: ``scores`` maps a rate to its seeds' accuracies.

    The best rate has the highest mean (the smaller rate on a tie); its
    standard error is the seeds' sample standard deviation over sqrt(seeds)
    (0 with one seed). The chosen rate is the smallest whose mean is at least
    the best mean minus that standard error.
    """
    if not scores or any(not values for values in scores.values()):
        raise ValueError("one_standard_error needs at least one accuracy per rate")
    means = {lr: statistics.fmean(values) for lr, values in scores.items()}
    best = max(sorted(means), key=lambda lr: (means[lr], -lr))
    values = scores[best]
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    chosen = min(lr for lr in means if means[lr] >= means[best] - se)
    return {"lr": chosen, "best_mean_lr": best, "standard_error": se,
            "means": {f"{lr:g}": round(means[lr], 6) for lr in sorted(means)}}


def tune_seed_config(sweep: SweepSpec, base_batch: int, family: str, method: str, lr: float,
                     seed: int) -> TrainConfig:
    return dataclasses.replace(sweep.config(method, base_batch, seed, lr=lr),
                               run_dir=str(Path(sweep.run_dir) / TUNE_SEEDS / f"{family}-lr{lr:g}-s{seed}"))


def tune_seed_configs(sweep: SweepSpec, base_batch: int, tuned: dict, representatives: dict[str, str],
                      tune_seeds: int, within: float) -> list[TrainConfig]:
    """The runs the phase asks for, from the first seed's grids in ``tuned`` (family -> its entry)."""
    seeds = sweep.seeds[1:tune_seeds]
    return [tune_seed_config(sweep, base_batch, family, representatives[family], lr, seed)
            for family, entry in tuned.items() if family in representatives
            for lr in near_best_rates(entry["grid"], within) for seed in seeds]


def run_tune_seeds(sweep: SweepSpec, base_batch: int, tuned: dict, representatives: dict[str, str],
                   tune_seeds: int, within: float, train_one: TrainOne,
                   log: Callable[[str], None] = print) -> dict:
    """Train the near-best rates on the next seeds and choose each family's rate by the one-SE rule.

    Each family's entry of ``tuned`` keeps what the first seed chose as
    ``first_seed_lr`` and gets ``lr`` (the rule's choice), ``rule``,
    ``seeds``, ``seed_scores`` (rate -> the seeds' validation accuracies)
    and the rule's ``one_se`` record; tuned.json is rewritten after each family.
    """
    seeds = sweep.seeds[:tune_seeds]
    path = Path(sweep.run_dir) / TUNED_FILE
    for family, entry in tuned.items():
        if family not in representatives:
            continue
        method = representatives[family]
        scores: dict[float, list[float]] = {}
        for lr in near_best_rates(entry["grid"], within):
            scores[lr] = [entry["grid"][f"{lr:g}"]]
            for seed in seeds[1:]:
                config = tune_seed_config(sweep, base_batch, family, method, lr, seed)
                summary = train_one(config, f"tune-seeds {method} lr {lr:g} at batch {base_batch} seed {seed}")
                scores[lr].append(summary["final_val_accuracy"])
        choice = one_standard_error(scores)
        first = entry.get("first_seed_lr", entry["lr"])
        entry.update(first_seed_lr=first, lr=choice["lr"], rule=ONE_SE, seeds=seeds, within=within,
                     seed_scores={f"{lr:g}": values for lr, values in sorted(scores.items())}, one_se=choice)
        write_json(path, tuned)
        change = "unchanged" if math.isclose(choice["lr"], first) else f"was {first:g} on seed {seeds[0]}"
        log(f"tuned {family} on seeds {seeds}: {choice['lr']:g} by the one-SE rule ({change})")
    return tuned


def next_rate(rate: float, up: bool) -> float:
    """The neighbour of ``rate`` on the half-decade ladder 1, 3, 10, 30, ... (x 10^k)."""
    k = math.floor(math.log10(rate))
    ladder = sorted(m * 10.0 ** j for j in range(k - 2, k + 3) for m in (1, 3))
    if up:
        value = min(v for v in ladder if v > rate * (1 + 1e-9))
    else:
        value = max(v for v in ladder if v < rate * (1 - 1e-9))
    return float(f"{value:.6g}")


def sensitivity_config(sweep: SweepSpec, method: str, batch: int, seed: int) -> TrainConfig:
    """The main sweep's run of (method, batch, seed) from its family's next lower rate."""
    config = sweep.config(method, batch, seed)
    return dataclasses.replace(config, lr=next_rate(config.base_lr(), up=False),
                               run_dir=str(Path(sweep.run_dir) / SENSITIVITY / "runs" / Path(config.run_dir).name))


def sensitivity_configs(sweep: SweepSpec, seeds: list[int]) -> list[TrainConfig]:
    return [sensitivity_config(sweep, method, batch, seed)
            for seed in seeds for batch in sweep.batches for method in sweep.methods]


def noise_scale_config(sweep: SweepSpec, base_batch: int) -> TrainConfig:
    config = sweep.config(BASELINE_METHOD, base_batch, sweep.seeds[0])
    name = Path(config.run_dir).name
    return dataclasses.replace(config, noise_scale=True, run_dir=str(Path(sweep.run_dir) / NOISE_SCALE / name))


def run_configs(configs: list[TrainConfig], phase: str, train_one: TrainOne) -> list[dict]:
    return [train_one(config, f"{phase} {config.method} lr {config.base_lr():g} batch {config.batch} "
                              f"seed {config.seed}") for config in configs]

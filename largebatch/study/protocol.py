"""The study's rules, as pure functions: the epoch budget, tuning with grid extension, tuning on several
seeds (the one-standard-error rule), the next lower rate, and which ablation run the main sweep already has.

docs/study.md states each rule and why; the phases (:mod:`.phases`) apply them to runs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from ..records import BASELINE_METHOD
from ..train.methods import get_method

ABLATION_MODES = ("none", "fixed", "state-aware")
ONE_SE = "one-se"
TUNE_RULES = ("best", ONE_SE)


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


# -- tuning ---------------------------------------------------------------------------------------

def next_rate(rate: float, up: bool) -> float:
    """The neighbour of ``rate`` on the half-decade ladder 1, 3, 10, 30, ... (x 10^k)."""
    k = math.floor(math.log10(rate))
    ladder = sorted(m * 10.0 ** j for j in range(k - 2, k + 3) for m in (1, 3))
    if up:
        value = min(v for v in ladder if v > rate * (1 + 1e-9))
    else:
        value = max(v for v in ladder if v < rate * (1 - 1e-9))
    return float(f"{value:.6g}")


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


def family_representatives(methods: list[str]) -> list[str]:
    """The method that tunes each family's base rate (as largebatch.train.sweep.tune_families picks it)."""
    chosen: dict[str, str] = {}
    for method in [BASELINE_METHOD, *methods]:
        chosen.setdefault(get_method(method).family, method)
    return list(chosen.values())


# -- the warm-up ablation -------------------------------------------------------------------------

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

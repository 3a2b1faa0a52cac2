"""Runs that have failed but keep going: a finite loss that explodes (diverged) and a loss that stays at
chance (collapsed), judged from the mean training loss of each stretch between evaluations.

The unit is the window the study records (``evals.loss`` in its summaries.json: the mean training loss of
the steps since the previous evaluation), so the rules were chosen on, and are tested against, exactly what
the committed runs of the study v2 (results/study-v2/summaries.json, 336 runs with losses) recorded
(tests/test_run_health.py):

* Diverged: a window's mean loss above ``DIVERGED_FACTOR`` x log K, chance for K classes (2,303 for ten).
  The highest window of a run that ended clearly above chance (15% or more on ten classes) was 820 (LARS
  without the bias and normalisation tensors at 8K on the MLP, ending at 38%); 1000 x log K leaves a factor
  of 2.8 over it. Runs that exploded went through it on their way to 1e12 and beyond (CLARS at rate 30 on
  the MLP from 1K up; CLARS at rate 10 on the MLP at 8K went 2.3, 14, 7e4, 7e6, 1.5e12).
* Collapsed: windows whose mean lies within ``CHANCE_TOLERANCE`` x log K of log K, or of the entropy of
  the training labels (a model that predicts the class prior), for ``COLLAPSE_UPDATES`` updates in a row.
  The longest stretch at chance of a run that recovered was 104 updates (LeNet-5-BN, CLARS at 1K, seed 0,
  which ended at 85%); LENA and AdaScale at 16K start near chance for about 12. Runs that stayed dead sat
  there for 208 to 1,256 updates.

A non-finite loss is divergence at once, as before (the runner checks every step).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

DIVERGED_FACTOR = 1000.0
CHANCE_TOLERANCE = 0.005  # relative to log K: 0.0115 for ten classes
COLLAPSE_UPDATES = 200


@dataclass
class Failure:
    kind: str  # "diverged" or "collapsed"
    step: int
    reason: str
    loss: float  # the window's mean loss (the step's loss when it was not finite)

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "loss"}


def label_entropy(counts: Iterable[int]) -> float:
    """The entropy (nats) of the label distribution with these class counts: the loss of predicting the prior."""
    counts = [c for c in counts if c > 0]
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts) if total else 0.0


class LossWatch:
    """Fed each step's loss (:meth:`add`) and told where each window ends (:meth:`window_end`), it says when
    the run has failed. Its state is the losses since the last window and the updates spent at chance."""

    def __init__(self, num_classes: int, prior_entropy: float | None = None):
        self.chance = [math.log(num_classes)]
        if prior_entropy is not None and abs(prior_entropy - self.chance[0]) > 1e-9:
            self.chance.append(prior_entropy)
        self.limit = DIVERGED_FACTOR * math.log(num_classes)
        self.tolerance = CHANCE_TOLERANCE * math.log(num_classes)
        self.total, self.count, self.at_chance = 0.0, 0, 0

    def add(self, loss: float) -> None:
        self.total += loss
        self.count += 1

    def window_end(self, step: int) -> Failure | None:
        """Judge the window of the losses added since the last call; None: the run looks healthy."""
        if not self.count:
            return None
        mean, updates = self.total / self.count, self.count
        self.total, self.count = 0.0, 0
        return self.judge(step, updates, mean)

    def judge(self, step: int, updates: int, mean: float) -> Failure | None:
        """The rules on one window: ``updates`` steps ending at ``step`` with mean loss ``mean``."""
        if not math.isfinite(mean):
            return Failure("diverged", step, f"the loss was not finite ({mean})", mean)
        if mean > self.limit:
            return Failure("diverged", step, f"the mean training loss of the {updates} updates to step {step} was "
                           f"{mean:.3g}, above {DIVERGED_FACTOR:g} x log K = {self.limit:.4g}", mean)
        near = [c for c in self.chance if abs(mean - c) <= self.tolerance]
        self.at_chance = self.at_chance + updates if near else 0
        if self.at_chance >= COLLAPSE_UPDATES:
            return Failure("collapsed", step, f"the mean training loss stayed within {self.tolerance:.3g} of chance "
                           f"({near[0]:.4g}) for the {self.at_chance} updates to step {step}", mean)
        return None


def judge_windows(windows: Iterable[tuple[int, float | None]], num_classes: int,
                  prior_entropy: float | None = None) -> Failure | None:
    """The first failure in a run's recorded windows, ``(step, mean loss)`` at each evaluation (a mean of
    None: a window with a non-finite loss), as the study's summaries hold them; None: healthy throughout."""
    watch = LossWatch(num_classes, prior_entropy)
    previous = 0
    for step, mean in windows:
        if step == previous:
            continue  # a second evaluation at the same step (a run ending on its clock): no updates between
        failure = watch.judge(step, step - previous, math.nan if mean is None else mean)
        if failure is not None:
            return failure
        previous = step
    return None

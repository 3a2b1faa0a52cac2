"""The gradient noise scale over a run, from per-example gradient norms.

McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of Large-Batch
Training", define the simple noise scale B_noise = tr(Sigma) / |G|^2, where
Sigma is the per-example gradient covariance and G the true gradient. Each
step's per-example norms give unbiased estimates of both terms (appendix A,
with B_small = 1 and B_big = the step's N examples):

    tr(Sigma) ~ N / (N - 1) * (mean_i |g_i|^2 - |gbar|^2),
    |G|^2     ~ |gbar|^2 - tr(Sigma) / N.

One step's ratio is noisy (|G|^2 can come out negative), so a run records the
two terms and the ratio is taken of their means over a window of steps
(:func:`windowed_noise_scale`), as McCandlish et al. advise.

Under BatchNorm in train mode an example's gradient depends on the others;
the engine's per-example quantity there is its additive contribution to the
batch gradient (docs/guide.md, "the statistics").
"""

from __future__ import annotations

import math

from torch import nn

from ..stats import GradientStatistics
from ..stats import estimators

TRACE, GRAD_SQ = "noise_trace", "noise_grad_sq"  # the two quantities of a run's layers.jsonl ("model" entry)


class NoiseScaleProbe:
    """Per-example statistics on ``model`` for any optimiser: reset before a step's backwards, read after."""

    def __init__(self, model: nn.Module):
        self.stats = GradientStatistics(model, per_example=True)

    def reset(self) -> None:
        self.stats.reset()

    def read(self) -> dict[str, dict[str, float]]:
        """The step's tr(Sigma) and |G|^2 estimates (model totals), as per-layer records: {quantity: {"model": v}}."""
        summary = self.stats.summary()
        examples = estimators.total(summary.example_sq_norm_mean)
        batch = estimators.total(summary.mean_grad_sq_norm)
        trace = estimators.example_variance(examples, batch, summary.num_examples)
        grad_sq = estimators.example_true_grad_sq_norm(examples, batch, summary.num_examples)
        return {TRACE: {"model": float(trace)}, GRAD_SQ: {"model": float(grad_sq)}}

    def remove(self) -> None:
        self.stats.remove()


def windowed_noise_scale(records: list[dict], windows: int, steps_per_epoch: int) -> dict[str, list] | None:
    """B_noise over a run: ``records`` are layers.jsonl lines (step and the two terms); the run is cut into
    ``windows`` windows of equal record counts and each gives mean(trace) / mean(|G|^2), or None where the
    mean |G|^2 is not positive (the noise hides the gradient at that batch). None without records."""
    rows = [(r["step"], r["step"] / steps_per_epoch, r[TRACE]["model"], r[GRAD_SQ]["model"]) for r in records
            if TRACE in r and GRAD_SQ in r and math.isfinite(r[TRACE]["model"]) and math.isfinite(r[GRAD_SQ]["model"])]
    if not rows:
        return None
    windows = max(1, min(windows, len(rows)))
    out: dict[str, list] = {"step": [], "epoch": [], "trace": [], "grad_sq": [], "noise_scale": []}
    for k in range(windows):
        part = rows[k * len(rows) // windows:(k + 1) * len(rows) // windows]
        trace = sum(r[2] for r in part) / len(part)
        grad_sq = sum(r[3] for r in part) / len(part)
        out["step"].append(part[-1][0])
        out["epoch"].append(round(part[-1][1], 4))
        out["trace"].append(float(f"{trace:.6g}"))
        out["grad_sq"].append(float(f"{grad_sq:.6g}"))
        out["noise_scale"].append(float(f"{trace / grad_sq:.6g}") if grad_sq > 0 else None)
    return out

"""What one step's gradient statistics hold, and the loss scale they carry.

:class:`GradientSummary` is what :class:`~largebatch.stats.engine.GradientStatistics`
returns for a step; its estimators follow ``estimators.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import Tensor

from . import estimators

__all__ = ["GradientSummary", "loss_scale", "warn_if_unscaled"]


@dataclass
class GradientSummary:
    """Per-layer gradient statistics of one step; tensors of shape [K], on device.

    ``sample_sq_norm_mean`` is A_k = (1/n) sum_i ||g_k^(i)||^2 and
    ``mean_grad_sq_norm`` is B_k = ||gbar_k||^2 (methods.md, AdaScale / LENA).
    ``example_*`` are set when per-example norms were collected (CLARS).
    ``grad_scale`` relates them to ``p.grad``: the backwards leave
    ``p.grad = grad_scale * gbar`` (a loss scale included on both sides; m
    under ``accumulation="sum"``, times the micro-batch size under
    ``loss_reduction="sum"``, 1 with the defaults).
    ``loss_scale`` is S, the ``GradScaler`` scale the backwards ran with (its
    scale tensor, read without a host sync; 1 without ``grad_scaler``): every
    norm here carries it (A and B S^2 times, example norms S times). The
    optimisers divide it out; they never infer it from ``p.grad``, which
    unscaling and clipping change.
    Derived estimators follow estimators.py; "total" means model-level, the
    ratio of sums over layers.
    """

    n: int
    sample_sq_norm_mean: Tensor
    mean_grad_sq_norm: Tensor
    num_examples: int | Tensor
    example_norm_mean: Tensor | None = None
    example_sq_norm_mean: Tensor | None = None
    grad_scale: float = 1.0
    loss_scale: float | Tensor = 1.0

    @property
    def examples_per_sample(self) -> float | Tensor:
        return self.num_examples / self.n

    def _pair(self, total: bool, examples: bool = False) -> tuple[Tensor, Tensor]:
        """(A, B), or (the per-example mean squared norm, B); summed over layers if ``total``."""
        if examples and self.example_sq_norm_mean is None:
            raise RuntimeError("per-example statistics need GradientStatistics(per_example=True)")
        first = self.example_sq_norm_mean if examples else self.sample_sq_norm_mean
        B = self.mean_grad_sq_norm
        return (estimators.total(first), estimators.total(B)) if total else (first, B)

    def variance(self, total: bool = False) -> Tensor:
        """Unbiased tr(Sigma) of one gradient sample, n - 1 degrees of freedom."""
        return estimators.sample_variance(*self._pair(total), self.n)

    def true_grad_sq_norm(self, total: bool = False) -> Tensor:
        """Unbiased ||E g||^2 (AdaScale's mu^2)."""
        return estimators.true_grad_sq_norm(*self._pair(total), self.n)

    def gain_ratio(self, total: bool = False) -> Tensor:
        """AdaScale gain r in [1, n] (per layer: LENA's unsmoothed gain)."""
        return estimators.gain_ratio(*self._pair(total), self.n)

    def noise_scale(self, total: bool = False) -> Tensor:
        """McCandlish et al. (2018) B_noise in examples, per layer or model.

        NaN where undefined: n = 1, or |G|^2 <= 0 (noise-dominated); never
        negative (estimators.noise_scale).
        """
        self._require_examples()
        return estimators.noise_scale(*self._pair(total), self.n, self.examples_per_sample)

    def example_variance(self, total: bool = False) -> Tensor:
        """Unbiased per-example tr(Sigma), N - 1 degrees of freedom."""
        return estimators.example_variance(*self._pair(total, examples=True), self.num_examples)

    def example_noise_scale(self, total: bool = False) -> Tensor:
        """B_noise from per-example norms (N - 1 degrees of freedom); NaN where undefined, as noise_scale."""
        return estimators.example_noise_scale(*self._pair(total, examples=True), self.num_examples)

    def _require_examples(self) -> None:
        if isinstance(self.num_examples, int) and self.num_examples <= 0:
            raise RuntimeError(
                "the number of examples is unknown (no tensor argument to the model's forward); "
                "use per_example=True or pass batched tensors to forward"
            )


# A GradScaler's initial scale is 2^16: its unscaling shrinks ||p.grad||^2
# by 4e9. A factor of 1e4 (gradients 100x smaller than the backward left
# them) is far from either rounding or ordinary clipping.
_UNSCALED_RATIO = 1e4


def warn_if_unscaled(B: Tensor, grad_scale: float, now: Tensor) -> None:
    """Warn if p.grad (``now``: its squared norm) was unscaled by a scaler the statistics were not given.

    Without ``grad_scaler=`` the statistics carry the loss scale S while
    the optimisers apply the unscaled p.grad: CLARS's trust ratios would
    be S times too small, silently. One host read: the engine checks its
    first summary only, so that the step never waits for the host.
    """
    measured = B.sum() * grad_scale**2
    if bool(measured > _UNSCALED_RATIO * now) and bool(now > 0):
        warnings.warn(
            f"GradientStatistics: p.grad is {float((measured / now).sqrt()):.3g} times smaller than "
            "the backward left it. If a torch.amp.GradScaler scaled the loss, pass it as "
            "GradientStatistics(grad_scaler=scaler): the statistics carry its scale, and the "
            "optimisers divide it out only when they know it. (Gradient clipping by such a "
            "factor also shows this; the statistics are then the unclipped gradients', as intended.)",
            stacklevel=3,
        )


def loss_scale(scaler) -> float | Tensor:
    """The scaler's current scale tensor (the one this step's backwards used: ``update()``
    runs after the step), without reading it; 1 without an enabled scaler."""
    if scaler is None or not scaler.is_enabled():
        return 1.0
    scale = scaler._get_scale_async()
    return 1.0 if scale is None else scale

"""Estimators built from per-layer squared-norm statistics (pure functions).

Notation (docs: shared stats reference, methods.md): for one layer, n gradient
samples g^(i) (micro-batches or workers, each the *mean* gradient of its
examples) with mean gbar,

    A = (1/n) sum_i ||g^(i)||^2        (mean of squared sample norms)
    B = ||gbar||^2                     (squared norm of the applied gradient)

Every function works elementwise on tensors of any shape (one entry per
layer), keeps everything on the device and never synchronises with the host.
``n`` is a Python number: it is counted, never measured.

Sources:
- unbiased variance: sum_i ||g^(i) - gbar||^2 = sum_i ||g^(i)||^2 - n ||gbar||^2,
  divided by n - 1;
- AdaScale gain ratio: Johnson et al., "AdaScale SGD", ICML 2020, Eq. (7);
  LENA's layer-wise gain (Ko et al., WWW 2022, Eq. 4, 5) is the same per layer;
- gradient noise scale: McCandlish et al. 2018, "An Empirical Model of
  Large-Batch Training", App. A.1 (unbiased |G|^2 and tr(Sigma) from two batch
  sizes, here b and n*b);
- base-batch statistics from per-example norms (``example_gain_statistics``):
  the same unbiased tr(Sigma) and |G|^2, N - 1 degrees of freedom, restated as
  the A of n = N/b samples of the base batch b.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "sample_variance",
    "true_grad_sq_norm",
    "gain_ratio",
    "noise_scale",
    "example_variance",
    "example_true_grad_sq_norm",
    "example_noise_scale",
    "example_gain_statistics",
    "total",
]


def _check_n(n: int | float, name: str = "n") -> None:
    if n < 1:
        raise ValueError(f"{name} must be at least 1, got {n}")


def sample_variance(A: Tensor, B: Tensor, n: int) -> Tensor:
    """Unbiased tr(Sigma) of one gradient sample: n/(n-1) * (A - B).

    From sum_i ||g^(i) - gbar||^2 = n A - n B with n - 1 degrees of freedom.
    With a single sample the variance is undefined: NaN.
    """
    _check_n(n)
    if n == 1:
        return torch.full_like(A, math.nan)
    return (A - B) * (n / (n - 1))


def true_grad_sq_norm(A: Tensor, B: Tensor, n: int) -> Tensor:
    """Unbiased estimate of ||E g||^2: B - sigma^2/n = (n B - A)/(n - 1).

    AdaScale's mu^2 (Johnson et al. 2020); McCandlish et al. 2018 App. A.1
    |G|^2 with B_small = b, B_big = n b. Can be negative when noise dominates.
    """
    _check_n(n)
    if n == 1:
        return torch.full_like(A, math.nan)
    return (B * n - A) / (n - 1)


def gain_ratio(A: Tensor, B: Tensor, n: int) -> Tensor:
    """AdaScale gain r = (sigma^2 + mu^2) / (sigma^2/n + mu^2), clamped to [1, n].

    With the unbiased estimates above sigma^2 + mu^2 = A and
    sigma^2/n + mu^2 = B exactly, so r = A / B (Johnson et al. 2020, Eq. 7;
    LENA Eq. 5 per layer). A layer without any gradient (A = 0) gets 1; a zero
    mean with nonzero samples (B = 0 < A) gets n.
    """
    _check_n(n)
    ratio = torch.where(A > 0, A / B, torch.ones_like(A))
    return ratio.nan_to_num(nan=1.0, posinf=float(n)).clamp(1.0, float(n))


def _ratio_or_nan(variance: Tensor, grad_sq: Tensor) -> Tensor:
    """tr(Sigma) / |G|^2 where |G|^2 > 0, else NaN; a rounding-negative tr(Sigma) counts as 0.

    |G|^2 <= 0 means the noise in these samples hides the mean gradient
    (B_noise is beyond what they can resolve); NaN says "not measurable
    here" where a negative ratio would read as a number.
    """
    ratio = variance.clamp_min(0) / grad_sq
    return torch.where(grad_sq > 0, ratio, torch.full_like(ratio, math.nan))


def noise_scale(A: Tensor, B: Tensor, n: int, examples_per_sample: float | Tensor) -> Tensor:
    """Simple gradient noise scale B_noise = tr(Sigma) / |G|^2, in examples.

    McCandlish et al. 2018, Eq. 2.8 and App. A.1: with b examples per sample,
    the per-example covariance trace is b * sample_variance and |G|^2 is
    ``true_grad_sq_norm``.

    NaN where it is undefined: n = 1 (no variance from one sample), or the
    unbiased |G|^2 is <= 0 (noise dominates the samples, so B_noise is larger
    than one step's samples can measure). Never negative: a tr(Sigma) below 0
    (rounding; A >= B exactly) counts as 0. The paper smooths numerator and
    denominator separately over steps before dividing, which callers can do
    with ``sample_variance`` and ``true_grad_sq_norm``.
    """
    return _ratio_or_nan(sample_variance(A, B, n) * examples_per_sample, true_grad_sq_norm(A, B, n))


def _unless_single(estimate, num_examples: int | Tensor, like: Tensor) -> Tensor:
    """``estimate(N)``, NaN where N = 1 (N - 1 degrees of freedom); a tensor N is tested on device."""
    N = num_examples
    if not isinstance(N, Tensor):
        _check_n(N, "num_examples")
        return torch.full_like(like, math.nan) if N == 1 else estimate(N)
    value = estimate(N)  # inf or NaN where N = 1, replaced below
    return torch.where(N > 1, value, torch.full_like(value, math.nan))


def example_variance(example_sq_norm_mean: Tensor, B: Tensor, num_examples: int | Tensor) -> Tensor:
    """Unbiased per-example tr(Sigma) from per-example norms: N/(N-1) (E - B).

    E = (1/N) sum_j ||grad f_j||^2 and B = ||gbar||^2, the mean of the N
    per-example gradients: the estimator above with n = N, N - 1 degrees of
    freedom. NaN for N = 1.
    """
    return _unless_single(lambda N: (example_sq_norm_mean - B) * (N / (N - 1)), num_examples, B)


def example_true_grad_sq_norm(example_sq_norm_mean: Tensor, B: Tensor, num_examples: int | Tensor) -> Tensor:
    """Unbiased ||E grad f||^2 from per-example norms: (N B - E)/(N - 1); NaN for N = 1."""
    return _unless_single(lambda N: (B * N - example_sq_norm_mean) / (N - 1), num_examples, B)


def example_noise_scale(example_sq_norm_mean: Tensor, B: Tensor, num_examples: int | Tensor) -> Tensor:
    """B_noise = tr(Sigma) / |G|^2 (McCandlish et al. 2018) from per-example norms, in examples.

    NaN where undefined (N = 1) or noise-dominated (|G|^2 <= 0), never
    negative, as for ``noise_scale``.
    """
    return _ratio_or_nan(
        example_variance(example_sq_norm_mean, B, num_examples),
        example_true_grad_sq_norm(example_sq_norm_mean, B, num_examples),
    )


def example_gain_statistics(
    example_sq_norm_mean: Tensor, B: Tensor, num_examples: int | Tensor, base_batch: int
) -> tuple[Tensor, float | Tensor]:
    """``(A_eq, n_eff)``: the base-batch sample statistics that per-example norms imply.

    With N examples in the step, E = (1/N) sum_j ||grad f_j||^2 and
    B = ||gbar||^2 (gbar their mean, the applied gradient):

        tr(Sigma)_hat = N/(N-1) (E - B)                 (unbiased, N - 1 degrees of freedom)
        A_eq = B + tr(Sigma)_hat (1/b - 1/N),   n_eff = N/b

    so that E[A_eq] = tr(Sigma)/b + ||G||^2, the expectation of A over n_eff
    samples of b examples each (E[B] = tr(Sigma)/N + ||G||^2). Every estimator
    above then reads (A_eq, B, n_eff) as it reads micro-batch statistics:
    ``sample_variance`` gives tr(Sigma)_hat / b (the variance of one base-size
    sample), ``true_grad_sq_norm`` gives B - tr(Sigma)_hat / N (unbiased
    ||G||^2), and ``gain_ratio`` AdaScale's r = (tr(Sigma)/b + ||G||^2) /
    (tr(Sigma)/N + ||G||^2) (Johnson et al. 2020, Eq. 7; LENA Eq. 5 per layer)
    in [1, N/b]. The micro-batch estimator is the case where each sample is a
    base-size batch; both agree in expectation.

    A step of at most b examples is one base-size sample: n_eff = 1, A_eq = B
    (gain 1). ``num_examples`` may be a tensor (summed across workers): then
    n_eff is a 0-d tensor and nothing is read back to the host.
    """
    if isinstance(base_batch, bool) or not isinstance(base_batch, int) or base_batch < 1:
        raise ValueError(f"base_batch must be a positive integer, got {base_batch!r}")
    N = num_examples
    if not isinstance(N, Tensor):
        _check_n(N, "num_examples")
        if N <= base_batch:
            return B.clone(), 1.0
        variance = (example_sq_norm_mean - B) * (N / (N - 1))
        return B + variance * (1.0 / base_batch - 1.0 / N), N / base_batch
    N = N.to(device=B.device, dtype=B.dtype).reshape(())
    several = N > base_batch  # then N >= 2: the divisions below are finite
    safe_N = torch.where(several, N, torch.full_like(N, 2.0 * base_batch))
    variance = (example_sq_norm_mean - B) * (safe_N / (safe_N - 1))
    A_eq = torch.where(several, B + variance * (1.0 / base_batch - 1.0 / safe_N), B)
    return A_eq, torch.where(several, N / base_batch, torch.ones_like(N))


def total(per_layer: Tensor) -> Tensor:
    """Model-level value of an additive per-layer statistic (A, B, tr(Sigma), |G|^2).

    Squared norms and traces add over layers; ratios do not, so model-level
    gains and noise scales are ratios of these totals.
    """
    return per_layer.sum(dim=-1)

"""The noise scale where it is undefined or noise-dominated: NaN, never a negative number.

Reference values are written out from the formulas (McCandlish et al. 2018,
App. A.1): with n samples of b examples, tr(Sigma) = b n/(n-1) (A - B) and
|G|^2 = (n B - A)/(n - 1); per example the same with n = N, b = 1.
"""

import math

import torch
from torch import nn

from largebatch.stats import estimators
from largebatch.stats.engine import GradientStatistics, GradientSummary


def T(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_noise_dominated_layers_are_nan_and_others_exact():
    # Layer 0: n B - A = 3 * 1 - 5 < 0, noise dominated; layer 1: n B - A = 3 * 4 - 6 = 6 > 0;
    # layer 2: n B - A = 0 exactly.
    A, B, n, b = T(5.0, 6.0, 3.0), T(1.0, 4.0, 1.0), 3, 8
    got = estimators.noise_scale(A, B, n, b)
    assert math.isnan(got[0].item()) and math.isnan(got[2].item())
    want = b * n / (n - 1) * (6.0 - 4.0) / ((n * 4.0 - 6.0) / (n - 1))
    assert got[1].item() == want
    # per example, N = 3: the same numbers with b = 1
    got = estimators.example_noise_scale(A, B, 3)
    assert math.isnan(got[0].item()) and got[1].item() == want / b


def test_undefined_with_a_single_sample():
    assert math.isnan(estimators.noise_scale(T(2.0), T(1.0), 1, 4).item())
    assert math.isnan(estimators.example_noise_scale(T(2.0), T(1.0), 1).item())
    # a counted tensor N (under DDP), tested on device
    for N in (torch.tensor(1.0, dtype=torch.float64), torch.tensor(1)):
        assert math.isnan(estimators.example_noise_scale(T(2.0, 3.0), T(1.0, 3.0), N)[0].item())
        assert math.isnan(estimators.example_variance(T(2.0), T(1.0), N).item())
        assert math.isnan(estimators.example_true_grad_sq_norm(T(2.0), T(1.0), N).item())
    assert estimators.example_noise_scale(T(5.0), T(4.0), torch.tensor(3.0)).item() == 3 / 2 * 1 / ((12 - 5) / 2)


def test_rounding_negative_variance_counts_as_zero():
    # A < B only by rounding; |G|^2 > 0: B_noise is 0, not a small negative number.
    got = estimators.noise_scale(T(1.0 - 1e-15), T(1.0), 4, 2)
    assert got.item() == 0.0


def test_summary_noise_scale_is_never_negative():
    # Two micro-batches whose gradients point in opposite directions: noise dominates.
    model = nn.Linear(2, 1, bias=False).double()
    stats = GradientStatistics(model)
    for sign in (1.0, -1.0):
        x = torch.tensor([[sign, 0.0], [sign, 0.0]], dtype=torch.float64)
        (model(x).sum() * 1.0).backward()
    summary = stats.summary()
    assert isinstance(summary, GradientSummary) and summary.n == 2
    assert summary.true_grad_sq_norm().item() < 0
    assert math.isnan(summary.noise_scale().item())
    assert math.isnan(summary.noise_scale(total=True).item())

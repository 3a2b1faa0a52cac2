"""LENA and AdaScale with gradient samples from per-example norms (``statistics="example"``).

The estimators are checked against closed forms (linear regression with
Gaussian inputs, whose per-example gradient mean and covariance are known),
the example-based gain against the micro-batch-based one on a real model,
and the optimisers' conventions (state dicts, arguments, the n = 1 warning,
accumulation).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.models import LeNet5
from largebatch.models.mlp import MLP
from largebatch.optim import SingleSampleWarning
from largebatch.optim.adascale import AdaScale
from largebatch.optim.lena import LENA
from largebatch.stats import GradientStatistics, estimators

# -- (1) unbiasedness against closed forms ------------------------------------------------------

D, NOISE = 4, 0.5  # input dimension, label noise s
DELTA = torch.tensor([0.6, -0.3, 0.2, 0.4], dtype=torch.float64)  # w - w*


def regression_truth() -> tuple[float, float]:
    """tr(Sigma) and ||G||^2 of the per-example gradient g = x (x^T delta - e), x ~ N(0, I_d), e ~ N(0, s^2).

    E g = delta; E ||g||^2 = E[||x||^2 (x^T delta)^2] + s^2 E||x||^2 = (d + 2) |delta|^2 + d s^2
    (Isserlis), so tr(Sigma) = (d + 1) |delta|^2 + d s^2.
    """
    sq = float(DELTA.pow(2).sum())
    return (D + 1) * sq + D * NOISE**2, sq


def regression_draws(draws: int, micro: int, size: int, base_batch: int) -> dict[str, torch.Tensor]:
    """Each draw: ``micro`` micro-batches of ``size`` fresh examples through the engine; every estimate of it."""
    torch.manual_seed(0)
    w_star = torch.randn(D, dtype=torch.float64)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + DELTA).unsqueeze(0))
    stats = GradientStatistics(model, per_example=True)
    g = torch.Generator().manual_seed(1)
    out: dict[str, list] = {k: [] for k in ("mb_trace", "mb_sq", "ex_trace", "ex_sq", "eq_trace", "eq_sq",
                                            "biased_ex_trace", "biased_mb_trace")}
    for _ in range(draws):
        x = torch.randn(micro * size, D, generator=g, dtype=torch.float64)
        y = x @ w_star + NOISE * torch.randn(micro * size, generator=g, dtype=torch.float64)
        model.zero_grad()
        stats.reset()
        for xm, ym in zip(x.split(size), y.split(size)):
            (0.5 * (model(xm).squeeze(1) - ym).pow(2).mean() / micro).backward()
        s = stats.summary()
        out["mb_trace"].append(s.variance(total=True) * size)  # per-example tr(Sigma) from n = micro samples
        out["mb_sq"].append(s.true_grad_sq_norm(total=True))
        out["ex_trace"].append(s.example_variance(total=True))
        out["ex_sq"].append(estimators.total(
            estimators.example_true_grad_sq_norm(s.example_sq_norm_mean, s.mean_grad_sq_norm, s.num_examples)))
        # what LENA and AdaScale read with statistics="example": (A_eq, B, n = N/b)
        A_eq, n_eff = estimators.example_gain_statistics(s.example_sq_norm_mean, s.mean_grad_sq_norm,
                                                         s.num_examples, base_batch)
        A_eq, B = estimators.total(A_eq), estimators.total(s.mean_grad_sq_norm)
        out["eq_trace"].append(estimators.sample_variance(A_eq, B, n_eff) * base_batch)
        out["eq_sq"].append(estimators.true_grad_sq_norm(A_eq, B, n_eff))
        N = micro * size
        out["biased_ex_trace"].append(estimators.total(s.example_sq_norm_mean - s.mean_grad_sq_norm))
        out["biased_mb_trace"].append((s.sample_sq_norm_mean - s.mean_grad_sq_norm).sum() * size)
        assert int(s.num_examples) == N
    return {k: torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in vs]) for k, vs in out.items()}


def within(samples: torch.Tensor, truth: float, ses: float = 4.0) -> bool:
    """The mean of the draws within ``ses`` standard errors of ``truth``."""
    se = float(samples.std() / math.sqrt(samples.numel()))
    return abs(float(samples.mean()) - truth) <= ses * se


def test_both_estimators_are_unbiased_for_the_trace_and_the_true_gradient():
    trace, sq = regression_truth()
    draws = regression_draws(draws=1500, micro=4, size=2, base_batch=2)
    for key in ("mb_trace", "ex_trace", "eq_trace"):
        assert within(draws[key], trace), (key, float(draws[key].mean()), trace)
    for key in ("mb_sq", "ex_sq", "eq_sq"):
        assert within(draws[key], sq), (key, float(draws[key].mean()), sq)
    # the base-batch equivalent reads back the per-example estimates exactly
    torch.testing.assert_close(draws["eq_trace"], draws["ex_trace"])
    torch.testing.assert_close(draws["eq_sq"], draws["ex_sq"])
    # the test can fail: without the N/(N-1) and n/(n-1) corrections the same draws are biased
    assert not within(draws["biased_ex_trace"], trace)
    assert not within(draws["biased_mb_trace"], trace)


def test_example_gain_statistics_matches_its_formula_for_int_and_tensor_counts():
    E = torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)
    B = torch.tensor([1.0, 1.5, 1.0], dtype=torch.float64)
    N, b = 40, 8
    trace = N / (N - 1) * (E - B)
    expected = B + trace * (1 / b - 1 / N)
    for count in (N, torch.tensor(float(N))):
        A, n = estimators.example_gain_statistics(E, B, count, b)
        torch.testing.assert_close(A, expected)
        assert float(n) == 5.0
    # at most b examples: one base-size sample, gain 1; a single example is no NaN
    for count in (8, 1, torch.tensor(8.0), torch.tensor(1.0)):
        A, n = estimators.example_gain_statistics(E, B, count, b)
        torch.testing.assert_close(A, B)
        assert float(n) == 1.0
    with pytest.raises(ValueError, match="base_batch"):
        estimators.example_gain_statistics(E, B, N, 0)


# -- (2) the example-based gain agrees with the micro-batch-based one on a real model --------------

def clusters(n: int, generator: torch.Generator, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, means.shape[0], (n,), generator=generator)
    return means[y] + 1.5 * torch.randn(n, means.shape[1], generator=generator), y


def test_example_gain_of_one_micro_batch_agrees_with_eight_micro_batches_in_expectation():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    means = torch.randn(10, 32, generator=g)
    model = MLP(in_features=32, hidden=(64, 64), num_classes=10)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):  # away from the initialisation, where the signal is still large
        x, y = clusters(128, g, means)
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()
    stats = GradientStatistics(model, per_example=True)
    A_ex, A_mb, B_ex, B_mb = [], [], [], []
    for _ in range(40):
        x, y = clusters(1024, g, means)
        model.zero_grad()
        stats.reset()
        F.cross_entropy(model(x), y).backward()  # one micro-batch of 1024: n = 1 sample
        s = stats.summary()
        assert s.n == 1
        A, n_eff = estimators.example_gain_statistics(s.example_sq_norm_mean, s.mean_grad_sq_norm, s.num_examples, 128)
        assert float(n_eff) == 8.0
        A_ex.append(A)
        B_ex.append(s.mean_grad_sq_norm)
        model.zero_grad()
        stats.reset()
        for xm, ym in zip(x.split(128), y.split(128)):  # the same examples as 8 micro-batches of 128
            (F.cross_entropy(model(xm), ym) / 8).backward()
        s = stats.summary()
        assert s.n == 8
        A_mb.append(s.sample_sq_norm_mean)
        B_mb.append(s.mean_grad_sq_norm)
    A_ex, A_mb, B_ex, B_mb = map(torch.stack, (A_ex, A_mb, B_ex, B_mb))
    torch.testing.assert_close(B_ex, B_mb, rtol=1e-4, atol=0)  # the same applied gradient
    # E[A_eq] = E[A]: the paired differences average to 0 within their standard error, per layer
    diff = A_ex - A_mb
    se = diff.std(0) / math.sqrt(diff.shape[0])
    assert bool((diff.mean(0).abs() <= 4 * se).all()), (diff.mean(0), se)
    # the gains r = mean A / mean B (what the smoothed averages give) agree
    r_ex = (A_ex.mean(0) / B_ex.mean(0)).clamp(1, 8)
    r_mb = (A_mb.mean(0) / B_mb.mean(0)).clamp(1, 8)
    torch.testing.assert_close(r_ex, r_mb, rtol=0.1, atol=0)
    assert bool((r_mb > 1.5).any())  # a gain to agree on, not 1 = 1


# -- optimisers ---------------------------------------------------------------------------------------

def net() -> nn.Module:
    torch.manual_seed(0)
    return MLP(in_features=6, hidden=(16, 16), num_classes=3).double()


def batches(steps: int, size: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 6, generator=g, dtype=torch.float64)
    for _ in range(steps):
        y = torch.randint(0, 3, (size,), generator=g)
        yield means[y] + torch.randn(size, 6, generator=g, dtype=torch.float64), y


def make(method: str, model: nn.Module, stats, **options):
    if method == "lena":
        return LENA(model.parameters(), lr=0.1, stats=stats, base_iterations=20, alpha=0.2, **options)
    return AdaScale(model.parameters(), lr=0.1, momentum=0.9, stats=stats, **options)


def train(method: str, micro: int, steps: int = 5, size: int = 32, statistics: str = "example", **options):
    model = net()
    stats = GradientStatistics(model, per_example=statistics == "example")
    extra = dict(statistics="example", base_batch=4) if statistics == "example" else {}
    opt = make(method, model, stats, **extra, **options)
    trace = []
    for x, y in batches(steps, size):
        opt.zero_grad()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            (F.cross_entropy(model(xm), ym) / micro).backward()
        opt.step()
        trace.append(torch.cat(opt.last_gains) if method == "lena" else torch.stack([opt.last_gain, opt.progress]))
    return model, opt, trace


@pytest.mark.parametrize("method", ["lena", "adascale"])
def test_example_statistics_do_not_depend_on_the_split_into_micro_batches(method):
    whole, opt, trace = train(method, micro=1)
    split, _, split_trace = train(method, micro=4)
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(trace, split_trace):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    gains = trace[-1] if method == "lena" else trace[-1][:1]
    assert bool((gains > 1).any()) and bool((gains <= 8).all())  # n = 32 / 4 = 8


@pytest.mark.parametrize("method", ["lena", "adascale"])
def test_lena_and_adascale_read_example_statistics_as_documented(method):
    """One step against the formulas: A_eq from per-example norms, n = N/b, then the method's own core."""
    model = net()
    stats = GradientStatistics(model, per_example=True)
    opt = make(method, model, stats, statistics="example", base_batch=4)
    x, y = next(batches(1, 32))
    F.cross_entropy(model(x), y).backward()
    s = stats.summary()
    E, B, N = s.example_sq_norm_mean, s.mean_grad_sq_norm, 32
    A = B + N / (N - 1) * (E - B) * (1 / 4 - 1 / N)
    opt.step()
    if method == "lena":  # first step: the bias-corrected averages are this step's A and B
        torch.testing.assert_close(torch.cat(opt.last_gains), ((A + 1e-6) / (B + 1e-6)).clamp(1, 8))
    else:
        var, sq = (A - B).sum() * 8 / 7, B.sum() - (A - B).sum() * 8 / 7 / 8
        torch.testing.assert_close(opt.last_gain, ((var + sq) / (var / 8 + sq)).clamp(1, 8))


@pytest.mark.parametrize("method", ["lena", "adascale"])
def test_at_most_a_base_batch_of_examples_gives_gain_1(method):
    _, opt, trace = train(method, micro=1, size=4)  # N = b: one base-size sample
    for t in trace:
        values = t if method == "lena" else t[:1]
        assert bool((values == 1).all())
    if method == "adascale":
        assert float(opt.progress) == 5.0


def test_batchnorm_layers_use_their_contributions():
    """BatchNorm in train mode: the engine's per-example contributions (the documented policy)."""
    torch.manual_seed(0)
    model = LeNet5(batch_norm=True)
    stats = GradientStatistics(model, per_example=True)
    opt = LENA(model.parameters(), lr=0.05, stats=stats, base_iterations=10, statistics="example", base_batch=8)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    F.cross_entropy(model(x), y).backward()
    assert "batchnorm-contribution" in stats.per_example.methods().values()
    opt.step()
    gains = torch.cat(opt.last_gains)
    assert bool(torch.isfinite(gains).all()) and bool((gains >= 1).all()) and bool((gains <= 4).all())


# -- the n = 1 warning ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lena", "adascale"])
def test_one_sample_warns_once(method):
    with pytest.warns(SingleSampleWarning, match="n = 1") as caught:
        train(method, micro=1, statistics="micro_batch")
    assert len([w for w in caught if issubclass(w.category, SingleSampleWarning)]) == 1
    assert caught[0].filename == __file__  # points at the caller of step()


@pytest.mark.parametrize("method", ["lena", "adascale"])
@pytest.mark.parametrize("micro, statistics", [(2, "micro_batch"), (1, "example")])
def test_no_warning_with_samples_to_measure(method, micro, statistics):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingleSampleWarning)
        train(method, micro=micro, statistics=statistics)


# -- state dicts and arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lena", "adascale"])
def test_state_dict_round_trip_keeps_the_mode_and_base_batch(method):
    model, opt, _ = train(method, micro=1)
    saved = opt.state_dict()
    assert saved["statistics"] == "example" and all(g["base_batch"] == 4 for g in saved["param_groups"])
    fresh = make(method, model, GradientStatistics(model, per_example=True), statistics="example", base_batch=4)
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    assert again["statistics"] == saved["statistics"] and again["param_groups"] == saved["param_groups"]
    for k, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(again["state"][k][key], value), key


@pytest.mark.parametrize("method", ["lena", "adascale"])
def test_a_state_dict_of_the_other_mode_is_refused(method):
    model, example_opt, _ = train(method, micro=1)
    _, sample_opt, _ = train(method, micro=2, statistics="micro_batch")
    to_sample = make(method, model, GradientStatistics(model))
    with pytest.raises(ValueError, match="statistics='example'"):
        to_sample.load_state_dict(example_opt.state_dict())
    to_example = make(method, model, GradientStatistics(model, per_example=True), statistics="example", base_batch=4)
    with pytest.raises(ValueError, match="statistics='micro_batch'"):
        to_example.load_state_dict(sample_opt.state_dict())
    # a state dict saved before the option existed is a micro-batch one
    legacy = {k: v for k, v in sample_opt.state_dict().items() if k != "statistics"}
    for group in legacy["param_groups"]:
        del group["base_batch"]
    to_sample.load_state_dict(legacy)
    assert all(g["base_batch"] is None for g in to_sample.param_groups)


@pytest.mark.parametrize("method", ["lena", "adascale"])
def test_bad_statistics_arguments_are_refused_by_name(method):
    model = net()
    plain, per_example = GradientStatistics(model), GradientStatistics(model, per_example=True)
    with pytest.raises(ValueError, match="statistics must be one of"):
        make(method, model, per_example, statistics="examples", base_batch=4)
    with pytest.raises(ValueError, match="base_batch"):
        make(method, model, per_example, statistics="example")
    with pytest.raises(ValueError, match="base_batch"):
        make(method, model, per_example, statistics="example", base_batch=0)
    with pytest.raises(ValueError, match="base_batch"):
        make(method, model, per_example, statistics="example", base_batch=4.0)
    with pytest.raises(ValueError, match="only used with statistics='example'"):
        make(method, model, plain, base_batch=4)
    with pytest.raises(ValueError, match="per_example=True"):
        make(method, model, plain, statistics="example", base_batch=4)
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": weights}, {"params": others, "base_batch": 8}]
    with pytest.raises(ValueError, match="same base batch"):
        cls = LENA if method == "lena" else AdaScale
        extra = dict(base_iterations=10) if method == "lena" else {}
        cls(groups, lr=0.1, stats=per_example, statistics="example", base_batch=4, **extra)


class _NoExampleNorms:
    """A statistics source of one's own without per-example norms."""

    def __init__(self, stats):
        self.stats = stats

    def summary(self):
        s = self.stats.summary()
        s.example_sq_norm_mean = None
        return s

    def index_of(self, p):
        return self.stats.index_of(p)

    def reset(self):
        self.stats.reset()


def test_a_source_without_example_norms_fails_at_its_first_summary():
    model = net()
    opt = make("lena", model, _NoExampleNorms(GradientStatistics(model)), statistics="example", base_batch=4)
    x, y = next(batches(1, 8))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="per_example=True"):
        opt.step()

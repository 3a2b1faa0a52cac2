"""Gradient statistics in one process: estimators, the engine, bad input."""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from largebatch.stats import GradientStatistics, GradientSummary, estimators

HAVE_PER_EXAMPLE = importlib.util.find_spec("largebatch.stats.per_example") is not None
needs_per_example = pytest.mark.skipif(
    not HAVE_PER_EXAMPLE, reason="largebatch/stats/per_example.py (PerExampleNorms) is not there yet"
)

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


# -- estimators: hand-computed cases ---------------------------------------------
# Samples (one "layer" in R^2): g1 = (3, 1), g2 = (1, 1), g3 = (2, 1).
# ||g_i||^2 = 10, 2, 5 -> A = 17/3; gbar = (2, 1) -> B = 5;
# deviations (1,0), (-1,0), (0,0) -> sum 2, unbiased tr(Sigma) = 2 / 2 = 1;
# mu^2 = B - 1/3 = 14/3; gain A/B = 17/15; noise scale (b = 4) = 4 * 1 / (14/3) = 6/7.
A3, B3 = T(17 / 3), T(5.0)


def test_sample_variance_hand_computed():
    assert estimators.sample_variance(A3, B3, 3).item() == pytest.approx(1.0)
    # g = (1,0), (0,1): A = 1, B = 1/2, deviations 2 * 1/2 = 1 over 1 dof.
    assert estimators.sample_variance(T(1.0), T(0.5), 2).item() == pytest.approx(1.0)


def test_true_grad_sq_norm_hand_computed():
    assert estimators.true_grad_sq_norm(A3, B3, 3).item() == pytest.approx(14 / 3)
    assert estimators.true_grad_sq_norm(T(1.0), T(0.5), 2).item() == pytest.approx(0.0)


def test_gain_ratio_hand_computed_and_clamped():
    assert estimators.gain_ratio(A3, B3, 3).item() == pytest.approx(17 / 15)
    # (sigma^2 + mu^2) / (sigma^2/n + mu^2) with sigma^2 = 1, mu^2 = 14/3, n = 3.
    assert estimators.gain_ratio(A3, B3, 3).item() == pytest.approx((1 + 14 / 3) / (1 / 3 + 14 / 3))
    r = estimators.gain_ratio(T(0.0, 2.0, 1.0, 9.0), T(0.0, 0.0, 1.0, 1.0), 4)
    assert r.tolist() == [1.0, 4.0, 1.0, 4.0]  # no gradient, zero mean, no noise, beyond n


def test_noise_scale_hand_computed():
    assert estimators.noise_scale(A3, B3, 3, 4).item() == pytest.approx(6 / 7)


def test_example_estimators_hand_computed():
    # The same three vectors read as per-example gradients, N = 3.
    assert estimators.example_variance(A3, B3, 3).item() == pytest.approx(1.0)
    assert estimators.example_true_grad_sq_norm(A3, B3, 3).item() == pytest.approx(14 / 3)
    assert estimators.example_noise_scale(A3, B3, 3).item() == pytest.approx(3 / 14)
    assert estimators.example_variance(A3, B3, torch.tensor(3.0)).item() == pytest.approx(1.0)


def test_single_sample_is_undefined_not_an_error():
    assert math.isnan(estimators.sample_variance(T(1.0), T(1.0), 1).item())
    assert math.isnan(estimators.true_grad_sq_norm(T(1.0), T(1.0), 1).item())
    assert estimators.gain_ratio(T(1.0), T(1.0), 1).item() == 1.0
    with pytest.raises(ValueError, match="n must be"):
        estimators.sample_variance(T(1.0), T(1.0), 0)


def test_total_is_sum_over_layers():
    assert estimators.total(T(1.0, 2.0, 3.0)).item() == 6.0


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6),
    dim=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_estimators_match_numpy_on_random_samples(n, dim, seed):
    g = np.random.default_rng(seed).normal(size=(n, dim))
    A = (g**2).sum(1).mean()
    B = (g.mean(0) ** 2).sum()
    var = ((g - g.mean(0)) ** 2).sum() / (n - 1)
    assert estimators.sample_variance(T(A), T(B), n).item() == pytest.approx(var, rel=1e-9, abs=1e-12)
    mu2 = estimators.true_grad_sq_norm(T(A), T(B), n).item()
    assert mu2 == pytest.approx(B - var / n, rel=1e-9, abs=1e-12)
    r = estimators.gain_ratio(T(A), T(B), n).item()
    assert 1.0 <= r <= n
    assert r == pytest.approx(min(max(A / B, 1.0), n), rel=1e-9)


# -- engine vs explicitly saved micro-batch gradients ----------------------------

def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _micro_batches(count: int, size: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g, dtype=torch.float64), torch.randn(size, 3, generator=g, dtype=torch.float64)) for _ in range(count)]


def _loss(model, x, y, reduction="mean"):
    """Per-example loss (mean over outputs), then mean or sum over the examples."""
    per_example = nn.functional.mse_loss(model(x), y, reduction="none").mean(dim=1)
    return per_example.mean() if reduction == "mean" else per_example.sum()


def _saved_sample_grads(model, batches) -> list[list[np.ndarray]]:
    """g^(i): the gradient of each micro-batch's mean loss, one backward each."""
    out = []
    for x, y in batches:
        model.zero_grad()
        _loss(model, x, y).backward()
        out.append([p.grad.detach().numpy().copy() for p in model.parameters()])
    model.zero_grad()
    return out


def _reference_AB(samples: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    K = len(samples[0])
    A = np.array([np.mean([(s[k] ** 2).sum() for s in samples]) for k in range(K)])
    B = np.array([(np.mean([s[k] for s in samples], axis=0) ** 2).sum() for k in range(K)])
    return A, B


def _accumulate(model, batches, accumulation="mean", reduction="mean"):
    for x, y in batches:
        loss = _loss(model, x, y, reduction)
        if accumulation == "mean":
            loss = loss / len(batches)
        loss.backward()


@pytest.mark.parametrize("accumulation", ["mean", "sum"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_engine_matches_saved_micro_batch_gradients(accumulation, loss_reduction):
    model, batches = _mlp(), _micro_batches(4)
    A_ref, B_ref = _reference_AB(_saved_sample_grads(model, batches))
    stats = GradientStatistics(model, accumulation=accumulation, loss_reduction=loss_reduction)
    _accumulate(model, batches, accumulation, loss_reduction)
    s = stats.summary()
    assert s.n == 4 and s.num_examples == 16
    np.testing.assert_allclose(s.sample_sq_norm_mean.numpy(), A_ref, rtol=1e-10)
    np.testing.assert_allclose(s.mean_grad_sq_norm.numpy(), B_ref, rtol=1e-10)



@pytest.mark.parametrize("accumulation", ["mean", "sum"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_grad_scale_relates_p_grad_to_the_mean_gradient(accumulation, loss_reduction):
    model, batches = _mlp(), _micro_batches(3, size=5)
    gbar = [np.mean(s, axis=0) for s in zip(*_saved_sample_grads(model, batches))]
    stats = GradientStatistics(model, accumulation=accumulation, loss_reduction=loss_reduction)
    _accumulate(model, batches, accumulation, loss_reduction)
    s = stats.summary()
    assert s.grad_scale == pytest.approx((3 if accumulation == "sum" else 1) * (5 if loss_reduction == "sum" else 1))
    for p, g in zip(model.parameters(), gbar):
        np.testing.assert_allclose(p.grad.numpy(), s.grad_scale * g, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        [(p.grad**2).sum().item() for p in model.parameters()], s.grad_scale**2 * s.mean_grad_sq_norm.numpy(), rtol=1e-10
    )

def test_engine_derived_statistics_match_numpy():
    model, batches = _mlp(), _micro_batches(3, size=5)
    samples = _saved_sample_grads(model, batches)
    stats = GradientStatistics(model)
    _accumulate(model, batches)
    s = stats.summary()
    n, b = 3, 5
    for k in range(len(samples[0])):
        g = np.stack([smp[k].ravel() for smp in samples])
        var = ((g - g.mean(0)) ** 2).sum() / (n - 1)
        mu2 = (g.mean(0) ** 2).sum() - var / n
        assert s.variance()[k].item() == pytest.approx(var, rel=1e-9)
        assert s.true_grad_sq_norm()[k].item() == pytest.approx(mu2, rel=1e-9)
        assert s.gain_ratio()[k].item() == pytest.approx(np.clip((var + mu2) / (var / n + mu2), 1, n), rel=1e-9)
        # |G|^2 <= 0 (noise-dominated): NaN, not the negative ratio
        want = b * var / mu2 if mu2 > 0 else math.nan
        assert s.noise_scale()[k].item() == pytest.approx(want, rel=1e-8, nan_ok=True)
    g_all = [np.stack([smp[k].ravel() for smp in samples]) for k in range(len(samples[0]))]
    var_total = sum(((g - g.mean(0)) ** 2).sum() / (n - 1) for g in g_all)
    mu2_total = sum((g.mean(0) ** 2).sum() for g in g_all) - var_total / n
    want = b * var_total / mu2_total if mu2_total > 0 else math.nan
    assert s.noise_scale(total=True).item() == pytest.approx(want, rel=1e-8, nan_ok=True)
    A_tot, B_tot = s.sample_sq_norm_mean.sum().item(), s.mean_grad_sq_norm.sum().item()
    assert s.gain_ratio(total=True).item() == pytest.approx(A_tot / B_tot, rel=1e-12)


def test_gradients_changed_after_backward_do_not_skew_statistics():
    # GradScaler.unscale_ or clipping rescale p.grad in place before the
    # optimiser reads the summary; A and B must still be on one scale.
    model, batches = _mlp(), _micro_batches(3)
    A_ref, B_ref = _reference_AB(_saved_sample_grads(model, batches))
    stats = GradientStatistics(model)
    _accumulate(model, batches)
    torch._foreach_mul_([p.grad for p in model.parameters()], 1 / 1024)
    s = stats.summary()
    np.testing.assert_allclose(s.sample_sq_norm_mean.numpy(), A_ref, rtol=1e-10)
    np.testing.assert_allclose(s.mean_grad_sq_norm.numpy(), B_ref, rtol=1e-10)


def _scaled_steps(model, plan, **options):
    """Steps of (micro-batch count, p.grad rescaled in place before summary()).

    Yields (summary, A_ref, B_ref) per step; the references are computed first,
    before the statistics are attached (their backwards would count).
    """
    steps = []
    for step, (count, scaled) in enumerate(plan):
        batches = _micro_batches(count, seed=10 + step)
        steps.append((batches, scaled, *_reference_AB(_saved_sample_grads(model, batches))))
    stats = GradientStatistics(model, **options)
    for batches, scaled, A_ref, B_ref in steps:
        _accumulate(model, batches)
        if scaled:
            torch._foreach_mul_([p.grad for p in model.parameters()], 1 / 1024)
        yield stats.summary, A_ref, B_ref
        model.zero_grad(set_to_none=True)
        stats.reset()


@pytest.mark.parametrize("applied_norm", ["backward", "every_backward"])
def test_applied_norm_backward_follows_the_micro_batch_count(applied_norm):
    # "backward" reads ||p.grad||^2 after the backward expected to be the
    # step's last (the previous step's count): more backwards than expected,
    # fewer with p.grad untouched, and equal with it rescaled are all exact.
    plan = [(3, True), (3, True), (4, True), (2, False), (2, True)]
    for summary, A_ref, B_ref in _scaled_steps(_mlp(), plan, applied_norm=applied_norm):
        s = summary()
        np.testing.assert_allclose(s.sample_sq_norm_mean.numpy(), A_ref, rtol=1e-10)
        np.testing.assert_allclose(s.mean_grad_sq_norm.numpy(), B_ref, rtol=1e-10)


def test_applied_norm_backward_reads_gradients_once_per_step(monkeypatch):
    from largebatch.stats import engine

    reads = []
    counted = engine.sq_norms
    monkeypatch.setattr(engine, "sq_norms", lambda *a: reads.append(1) or counted(*a))
    per_step = []
    for summary, *_ in _scaled_steps(_mlp(), [(4, False), (4, False), (4, True)]):
        summary()
        per_step.append(len(reads))
        reads.clear()
    # The first step cannot know which backward is its last (4 reads), and its
    # summary reads p.grad once more, to report a GradScaler not given to the engine.
    assert per_step == [5, 1, 1]


def test_applied_norm_backward_refuses_a_short_step_with_changed_gradients():
    steps = _scaled_steps(_mlp(), [(3, False), (2, True)])
    next(steps)[0]()
    summary, *_ = next(steps)
    with pytest.raises(RuntimeError, match="every_backward"):
        summary()


@pytest.mark.parametrize("accumulation", ["mean", "sum"])
def test_applied_norm_read_in_summary_matches(accumulation):
    model, batches = _mlp(), _micro_batches(3)
    A_ref, B_ref = _reference_AB(_saved_sample_grads(model, batches))
    stats = GradientStatistics(model, accumulation=accumulation, applied_norm="summary")
    _accumulate(model, batches, accumulation)
    s = stats.summary()
    np.testing.assert_allclose(s.sample_sq_norm_mean.numpy(), A_ref, rtol=1e-10)
    np.testing.assert_allclose(s.mean_grad_sq_norm.numpy(), B_ref, rtol=1e-10)


def test_applied_norm_read_in_summary_refuses_modified_gradients():
    model = _mlp()
    stats = GradientStatistics(model, applied_norm="summary")
    _accumulate(model, _micro_batches(2))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.raises(RuntimeError, match="applied_norm='backward'"):
        stats.summary()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_backward_with_create_graph():
    # Gradients that require grad (a gradient penalty's backward) are measured,
    # not differentiated: the statistics equal those of a plain backward.
    model, batches = _mlp(), _micro_batches(2)
    A_ref, B_ref = _reference_AB(_saved_sample_grads(model, batches))
    stats = GradientStatistics(model)
    for x, y in batches:
        (_loss(model, x, y) / len(batches)).backward(create_graph=True)
    s = stats.summary()
    assert not s.sample_sq_norm_mean.requires_grad and not s.mean_grad_sq_norm.requires_grad
    np.testing.assert_allclose(s.sample_sq_norm_mean.numpy(), A_ref, rtol=1e-10)
    np.testing.assert_allclose(s.mean_grad_sq_norm.numpy(), B_ref, rtol=1e-10)
    for p in model.parameters():
        p.grad = None  # the graph of p.grad holds p (a reference cycle)


def test_worker_sample_in_one_process_is_one_sample():
    model, batches = _mlp(), _micro_batches(2)
    stats = GradientStatistics(model, sample="worker")
    _accumulate(model, batches)
    s = stats.summary()
    assert s.n == 1
    torch.testing.assert_close(s.sample_sq_norm_mean, s.mean_grad_sq_norm)
    assert torch.all(s.gain_ratio() == 1)


def test_reset_starts_a_new_step_and_statistics_stay_on_device():
    model, batches = _mlp(), _micro_batches(4)
    stats = GradientStatistics(model)
    _accumulate(model, batches[:2])
    model.zero_grad()
    stats.reset()
    _accumulate(model, batches[2:])
    s = stats.summary()
    A_ref, B_ref = _reference_AB(_saved_sample_grads(model, batches[2:]))
    assert s.n == 2
    np.testing.assert_allclose(s.sample_sq_norm_mean.numpy(), A_ref, rtol=1e-10)
    np.testing.assert_allclose(s.mean_grad_sq_norm.numpy(), B_ref, rtol=1e-10)
    assert isinstance(s, GradientSummary) and s.sample_sq_norm_mean.shape == (4,)


@pytest.mark.parametrize("applied_norm", ["backward", "every_backward", "summary"])
def test_summary_tensors_belong_to_the_caller(applied_norm):
    # Editing one summary's tensors in place leaves the next summary() as it was.
    model, batches = _mlp(), _micro_batches(3)
    stats = GradientStatistics(model, applied_norm=applied_norm)
    _accumulate(model, batches)
    first = stats.summary()
    A, B = first.sample_sq_norm_mean.clone(), first.mean_grad_sq_norm.clone()
    first.sample_sq_norm_mean.zero_()
    first.mean_grad_sq_norm.zero_()
    again = stats.summary()
    assert torch.equal(again.sample_sq_norm_mean, A) and torch.equal(again.mean_grad_sq_norm, B)


def test_params_order_index_of_and_subset():
    model = _mlp()
    params = list(model.parameters())
    stats = GradientStatistics(model, params=[params[2], params[0]])
    assert stats.params == [params[2], params[0]]
    assert stats.index_of(params[0]) == 1
    with pytest.raises(KeyError):
        stats.index_of(params[1])
    _accumulate(model, _micro_batches(2))
    s = stats.summary()
    assert s.mean_grad_sq_norm[0].item() == pytest.approx(params[2].grad.pow(2).sum().item() / 1.0)


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()
        self.unused = nn.Linear(2, 2).double()

    def forward(self, x):
        return self.body(x)


def test_parameter_without_gradient_counts_as_zero():
    model = _WithUnused()
    extra = model.unused
    stats = GradientStatistics(model)
    _accumulate(model, _micro_batches(2))
    s = stats.summary()
    k = stats.index_of(extra.weight)
    assert s.sample_sq_norm_mean[k].item() == 0.0 and s.mean_grad_sq_norm[k].item() == 0.0
    assert s.gain_ratio()[k].item() == 1.0


def test_remove_detaches_hooks():
    model = _mlp()
    stats = GradientStatistics(model)
    stats.remove()
    _accumulate(model, _micro_batches(2))
    with pytest.raises(RuntimeError, match="no backward"):
        stats.summary()


def test_float32_model_gives_float32_statistics():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    stats = GradientStatistics(model)
    model(torch.randn(3, 4)).sum().backward()
    assert stats.summary().sample_sq_norm_mean.dtype == torch.float32


# -- the compiled accumulation hook ------------------------------------------------

def _float_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3))


def _float_batches(count: int):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 40, generator=g), torch.randn(8, 3, generator=g)) for _ in range(count)]


def test_float32_statistics_match_a_float64_reference():
    model, batches = _float_mlp(), _float_batches(5)
    reference = _float_mlp().double()
    samples = _saved_sample_grads(reference, [(x.double(), y.double()) for x, y in batches])
    A_ref, B_ref = _reference_AB(samples)
    stats = GradientStatistics(model)
    _accumulate(model, batches)
    s = stats.summary()
    np.testing.assert_allclose(s.sample_sq_norm_mean.numpy(), A_ref, rtol=1e-5)
    np.testing.assert_allclose(s.mean_grad_sq_norm.numpy(), B_ref, rtol=1e-5)


def test_autograd_grad_micro_batches_count_like_backward_ones():
    # torch.autograd.grad does not accumulate into p.grad, but the tensor
    # hooks see its gradients: a micro-batch taken that way counts as one.
    model, batches = _mlp(), _micro_batches(3)
    A_ref, B_ref = _reference_AB(_saved_sample_grads(_mlp(), batches))
    stats = GradientStatistics(model)
    params = list(model.parameters())
    (_loss(model, *batches[0]) / 3).backward()
    grads = torch.autograd.grad(_loss(model, *batches[1]) / 3, params)
    for p, g in zip(params, grads):
        p.grad += g
    (_loss(model, *batches[2]) / 3).backward()
    s = stats.summary()
    assert s.n == 3
    np.testing.assert_allclose(s.sample_sq_norm_mean.numpy(), A_ref, rtol=1e-10)
    np.testing.assert_allclose(s.mean_grad_sq_norm.numpy(), B_ref, rtol=1e-10)


def test_reentrant_checkpointing_gives_the_plain_statistics():
    # Under reentrant checkpointing the checkpointed layers' gradients arrive
    # from a nested backward: they still count once per micro-batch.
    class Checkpointed(nn.Module):
        def __init__(self, checkpointed: bool):
            super().__init__()
            self.inner, self.outer = _mlp(), nn.Linear(3, 3).double()
            self.checkpointed = checkpointed

        def forward(self, x):
            if self.checkpointed:
                return self.outer(torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True))
            return self.outer(self.inner(x))

    summaries = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Checkpointed(checkpointed)
        stats = GradientStatistics(model)
        for x, y in _micro_batches(3):
            (nn.functional.mse_loss(model(x.requires_grad_()), y) / 3).backward()
        summaries.append(stats.summary())
    plain, checkpointed = summaries
    assert checkpointed.n == plain.n == 3
    torch.testing.assert_close(checkpointed.sample_sq_norm_mean, plain.sample_sq_norm_mean, rtol=1e-10, atol=0)
    torch.testing.assert_close(checkpointed.mean_grad_sq_norm, plain.mean_grad_sq_norm, rtol=1e-10, atol=0)


# -- bad input --------------------------------------------------------------------


def test_summary_before_any_backward_is_an_error():
    stats = GradientStatistics(_mlp())
    with pytest.raises(RuntimeError, match="no backward since reset"):
        stats.summary()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"sample": "example"}, "sample"),
        ({"accumulation": "avg"}, "accumulation"),
        ({"loss_reduction": "none"}, "loss_reduction"),
        ({"applied_norm": "step"}, "applied_norm"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GradientStatistics(_mlp(), **kwargs)


def test_frozen_model_is_an_error():
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="params"):
        GradientStatistics(model)


def test_per_example_statistics_need_per_example():
    model = _mlp()
    stats = GradientStatistics(model)
    _accumulate(model, _micro_batches(2))
    with pytest.raises(RuntimeError, match="per_example=True"):
        stats.summary().example_variance()


# -- per-example norms (PerExampleNorms) ---------------------------------------------


def _saved_example_grads(model, batches) -> list[list[np.ndarray]]:
    """grad f_j for every example j: one backward per example (slow reference)."""
    out = []
    for x, y in batches:
        for j in range(len(x)):
            model.zero_grad()
            _loss(model, x[j : j + 1], y[j : j + 1]).backward()
            out.append([p.grad.detach().numpy().copy() for p in model.parameters()])
    model.zero_grad()
    return out


@needs_per_example
@pytest.mark.parametrize("accumulation", ["mean", "sum"])
def test_per_example_norms_match_saved_example_gradients(accumulation):
    model, batches = _mlp(), _micro_batches(2, size=3)
    examples = _saved_example_grads(model, batches)
    K = len(examples[0])
    norm_ref = np.array([np.mean([np.sqrt((e[k] ** 2).sum()) for e in examples]) for k in range(K)])
    sq_ref = np.array([np.mean([(e[k] ** 2).sum() for e in examples]) for k in range(K)])
    stats = GradientStatistics(model, per_example=True, accumulation=accumulation)
    _accumulate(model, batches, accumulation)
    s = stats.summary()
    assert int(s.num_examples) == 6
    np.testing.assert_allclose(s.example_norm_mean.numpy(), norm_ref, rtol=1e-7)
    np.testing.assert_allclose(s.example_sq_norm_mean.numpy(), sq_ref, rtol=1e-7)
    # B - 1 degrees of freedom over the examples.
    for k in range(K):
        g = np.stack([e[k].ravel() for e in examples])
        var = ((g - g.mean(0)) ** 2).sum() / (len(g) - 1)
        assert s.example_variance()[k].item() == pytest.approx(var, rel=1e-6)


class _Unsupported(nn.Module):
    """Uses its parameter outside any standard layer."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6, dtype=torch.float64))

    def forward(self, x):
        return x * self.scale


@needs_per_example
def test_per_example_unsupported_layer_error_comes_from_per_example_norms():
    model = nn.Sequential(_Unsupported(), nn.Linear(6, 3).double())
    x, y = _micro_batches(1)[0]
    with pytest.raises(Exception) as info:
        GradientStatistics(model, per_example=True, per_example_fallback=False)
        _loss(model, x, y).backward()
    raised_in = {entry.path.name for entry in info.traceback}
    assert raised_in & {"per_example.py", "_ghost.py"}, str(info.value)


# -- what counts as an example and as a sample ----------------------------------


def test_forward_that_is_not_backpropagated_adds_no_examples():
    # A logging forward with grad enabled used to be counted: under
    # loss_reduction="sum" it skewed grad_scale (and CLARS's trust ratios).
    model, batches = _mlp(), _micro_batches(2, size=4)
    A_ref, B_ref = _reference_AB(_saved_sample_grads(_mlp(), batches))
    stats = GradientStatistics(model, loss_reduction="sum")
    for x, y in batches:
        model(torch.randn(5, 6, dtype=torch.float64))  # logged, never backpropagated
        (_loss(model, x, y, "sum") / 2).backward()
    s = stats.summary()
    assert s.n == 2 and s.num_examples == 8 and s.grad_scale == 4
    np.testing.assert_allclose(s.sample_sq_norm_mean.numpy(), A_ref, rtol=1e-10)
    np.testing.assert_allclose(s.mean_grad_sq_norm.numpy(), B_ref, rtol=1e-10)


def test_input_gradient_backward_is_not_a_sample():
    # Adversarial training takes the gradient with respect to the inputs
    # first; that backward reaches no parameter and is not counted.
    model, batches = _mlp(), _micro_batches(2)
    A_ref, B_ref = _reference_AB(_saved_sample_grads(_mlp(), batches))
    stats = GradientStatistics(model)
    for x, y in batches:
        x = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(_loss(model, x, y), x)
        assert grad_x.abs().sum() > 0
        (_loss(model, x.detach(), y) / 2).backward()
    s = stats.summary()
    assert s.n == 2 and s.num_examples == 8
    np.testing.assert_allclose(s.sample_sq_norm_mean.numpy(), A_ref, rtol=1e-10)
    np.testing.assert_allclose(s.mean_grad_sq_norm.numpy(), B_ref, rtol=1e-10)


def test_two_forwards_in_one_backward_are_one_sample_with_both_batches():
    model, (first, second) = _mlp(), _micro_batches(2)
    stats = GradientStatistics(model)
    (_loss(model, *first) + _loss(model, *second)).backward()
    s = stats.summary()
    assert s.n == 1 and s.num_examples == 8
    applied = torch.stack([p.grad.square().sum() for p in model.parameters()])
    torch.testing.assert_close(s.sample_sq_norm_mean, applied, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.mean_grad_sq_norm, applied, rtol=1e-12, atol=0)


def test_in_place_edit_of_the_output_keeps_the_count():
    model, (x, y) = _mlp(), _micro_batches(1)[0]
    stats = GradientStatistics(model)
    out = model(x)
    out.mul_(2)  # the output's node changes; the forward's node still runs
    nn.functional.mse_loss(out, y).backward()
    assert stats.summary().num_examples == 4


def _backprop_one_forward_twice(model, x, y):
    out = model(x)
    nn.functional.mse_loss(out, y).backward(retain_graph=True)
    out.square().mean().backward()


def _gradient_penalty(model, x, y):
    loss = _loss(model, x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    (loss + sum(g.square().sum() for g in grads)).backward()


@pytest.mark.parametrize("run", [_backprop_one_forward_twice, _gradient_penalty], ids=["retain_graph", "gradient_penalty"])
def test_one_forward_backpropagated_twice_is_refused(run):
    # Both backwards would count as gradient samples of the same examples
    # (n = 2, the norms of two halves of one gradient): never a silent number.
    model, (x, y) = _mlp(), _micro_batches(1)[0]
    stats = GradientStatistics(model)
    run(model, x, y)
    with pytest.raises(RuntimeError, match="backpropagated in two backward passes"):
        stats.summary()
    stats.reset()  # the next step is measured as usual
    model.zero_grad()
    _loss(model, x, y).backward()
    assert stats.summary().n == 1


def test_a_grad_scaler_not_given_to_the_engine_is_reported_once():
    # The statistics carry the loss scale; without grad_scaler= the
    # optimisers cannot divide it out. The first summary says so.
    model, (x, y) = _mlp(), _micro_batches(1)[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for given in (False, True):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        stats = GradientStatistics(model, grad_scaler=scaler if given else None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                scaler.scale(_loss(model, x, y)).backward()
                scaler.unscale_(optimizer)
                stats.summary()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
                stats.reset()
        reported = [w for w in caught if "grad_scaler=scaler" in str(w.message)]
        assert len(reported) == (0 if given else 1)
        stats.remove()


def test_plain_training_and_clipping_are_not_reported():
    model, (x, y) = _mlp(), _micro_batches(1)[0]
    stats = GradientStatistics(model)
    _loss(model, x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats.summary()

"""CLARS (Huo, Gu, Huang 2021) against a slow reference, its relation to LARS, and its fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _method_stats import FakeStats, make_params, set_random_grads
from largebatch.optim.clars import CLARS
from largebatch.optim.lena import LENA

def reference_clars_step(w, grads, bufs, measures, hyper, lr_scale=1.0):
    """LARS algorithm with the layer gradient measure G_k given; one loop per layer."""
    rates = []
    for k, (x, g) in enumerate(zip(w, grads)):
        h = hyper[k]
        wn, G = x.norm().item(), float(measures[k])
        if h["adapt"] and wn > 0 and G + h["wd"] * wn > 0:
            local = h["trust"] * wn / (G + h["wd"] * wn + h["eps"])
        else:
            local = 1.0
        s = h["lr"] * lr_scale * local
        d = g.double() + h["wd"] * x
        if h["momentum"]:
            bufs[k] = s * d if bufs[k] is None else h["momentum"] * bufs[k] + s * d
            x.sub_(bufs[k])
        else:
            x.sub_(s * d)
        rates.append(s)
    return rates


def hyper_of(opt):
    return [
        dict(lr=float(g["lr"]), momentum=g["momentum"], wd=g["weight_decay"], trust=g["trust_coefficient"],
             eps=g["eps"], adapt=g["adapt"], statistic=g["statistic"])
        for g in opt.param_groups for _ in g["params"]
    ]


def measure_of(summary, hyper):
    return [
        (summary.example_sq_norm_mean[k].sqrt() if h["statistic"] == "rms_norm" else summary.example_norm_mean[k]).item()
        for k, h in enumerate(hyper)
    ]


@pytest.mark.parametrize("statistic", ["mean_norm", "rms_norm"])
def test_matches_reference(statistic):
    params = make_params()
    stats = FakeStats(params, n=4, seed=1)
    opt = CLARS(
        [{"params": params[:2]}, {"params": params[2:], "adapt": False, "weight_decay": 0.0}],
        lr=2.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, stats=stats, statistic=statistic,
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.8)
    hyper = hyper_of(opt)
    w, bufs = [p.detach().clone().double() for p in params], [None] * 4
    g = torch.Generator().manual_seed(2)
    for t in range(8):
        set_random_grads(params, g)
        grads = [p.grad.clone() for p in params]
        opt.step()
        expected = reference_clars_step(w, grads, bufs, measure_of(stats.history[-1], hyper), hyper, 0.8**t)
        torch.testing.assert_close(torch.cat(opt.effective_lrs()).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-9)
        sched.step()
    for p, x in zip(params, w):
        torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-6)
    assert torch.equal(opt.last_trust_ratios[1], torch.ones(2))  # adapt=False group


class IdenticalExamples(FakeStats):
    """Every example has the batch's gradient: ||grad f_i|| = ||gbar|| for all i."""

    def summary(self):
        s = super().summary()
        s.example_norm_mean = s.mean_grad_sq_norm.sqrt()
        s.example_sq_norm_mean = s.mean_grad_sq_norm.clone()
        s.sample_sq_norm_mean = s.mean_grad_sq_norm.clone()
        return s


def reference_lars_step(w, grads, bufs, lr, momentum, wd, trust, eps):
    hyper = [dict(lr=lr, momentum=momentum, wd=wd, trust=trust, eps=eps, adapt=True)] * len(w)
    return reference_clars_step(w, grads, bufs, [g.norm().item() for g in grads], hyper)


@pytest.mark.parametrize("statistic", ["mean_norm", "rms_norm"])
def test_identical_examples_reduce_to_lars(statistic):
    params = make_params()
    opt = CLARS(params, lr=1.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=1e-2,
                stats=IdenticalExamples(params), statistic=statistic)
    w, bufs = [p.detach().clone().double() for p in params], [None] * 4
    twins = make_params()
    lars = None
    try:  # the project's LARS, when present, must agree too
        from largebatch.optim.lars import LARS

        lars = LARS(twins, lr=1.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=1e-2, eps=1e-8)
    except ImportError:
        pass
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        set_random_grads(params, g)
        grads = [p.grad.clone() for p in params]
        for q, gr in zip(twins, grads):
            q.grad = gr.clone()
        opt.step()
        if lars is not None:
            lars.step()
        reference_lars_step(w, grads, bufs, 1.0, 0.9, 5e-4, 1e-2, 1e-8)
    for p, x, q in zip(params, w, twins):
        torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-6)
        if lars is not None:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _engine():
    return pytest.importorskip("largebatch.stats").GradientStatistics


def test_rate_never_above_lars_with_real_per_example_norms():
    GradientStatistics = _engine()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    stats = GradientStatistics(model, per_example=True)
    opt = CLARS(model.parameters(), lr=0.5, weight_decay=1e-3, stats=stats, reset_statistics=False)
    for _ in range(3):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        opt.zero_grad()
        for xs, ys in zip(x.split(8), y.split(8)):  # two micro-batches
            (nn.functional.cross_entropy(model(xs), ys) / 2).backward()
        weights = [p.detach().clone() for p in model.parameters()]
        grad_norms = torch.stack([p.grad.norm() for p in model.parameters()])
        opt.step()
        stats.reset()
        wn = torch.stack([w.norm() for w in weights])
        lars_ratio = 1e-3 * wn / (grad_norms + 1e-3 * wn + 1e-8)
        assert torch.all(opt.last_gradient_measures[0] >= grad_norms * (1 - 1e-5))
        assert torch.all(opt.last_trust_ratios[0] <= lars_ratio * (1 + 1e-5))
        assert torch.all(opt.last_trust_ratios[0] < lars_ratio)  # examples disagree: strictly below


def test_fallback_for_layers_without_per_example_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    params = list(model.parameters())

    class PartlyMissing(FakeStats):
        def summary(self):
            s = super().summary()
            s.example_norm_mean = s.example_norm_mean.clone()
            s.example_norm_mean[1] = float("nan")
            return s

    stats = PartlyMissing(params, n=4)
    opt = CLARS(model.named_parameters(), stats=stats)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    s = stats.history[-1]
    assert opt.fallback_layers == ["0.bias"]
    assert opt.last_gradient_measures[0][1].item() == pytest.approx(s.sample_sq_norm_mean[1].sqrt().item(), rel=1e-6)
    assert opt.last_gradient_measures[0][0].item() == pytest.approx(s.example_norm_mean[0].item(), rel=1e-6)


def test_batchnorm_layers_use_the_fallback_with_the_engine():
    GradientStatistics = _engine()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    stats = GradientStatistics(model, per_example=True)
    opt = CLARS(model.named_parameters(), stats=stats, lr=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.fallback_layers == ["1.weight", "1.bias"]
    use = CLARS(model.named_parameters(), stats=stats, lr=0.1, inexact="use")
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    use.step()
    assert use.fallback_layers == []


def test_zero_initialised_bias_moves():
    w, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.zeros(3))
    opt = CLARS([w, b], lr=0.1, stats=FakeStats([w, b]))
    w.grad, b.grad = torch.randn(3, 2), torch.randn(3)
    opt.step()
    assert opt.last_trust_ratios[0][1] == 1.0
    assert b.abs().sum() > 0


def test_resume_is_identical():
    def run(stop_at=None, steps=6):
        params = make_params()
        stats = FakeStats(params, seed=4)
        opt = CLARS(params, lr=1.0, trust_coefficient=0.01, stats=stats)
        g = torch.Generator().manual_seed(1)
        for t in range(steps):
            if t == stop_at:
                sd = opt.state_dict()
                opt = CLARS(params, lr=1.0, trust_coefficient=0.01, stats=stats)
                opt.load_state_dict(sd)
            set_random_grads(params, g)
            opt.step()
        return params

    for a, b in zip(run(), run(stop_at=3)):
        assert torch.equal(a, b)


def test_errors():
    params = make_params()
    with pytest.raises(ValueError, match="per_example=True"):
        CLARS(params)
    with pytest.raises(ValueError, match="statistic"):
        CLARS(params, stats=FakeStats(params), statistic="median")
    with pytest.raises(ValueError, match="trust_coefficient"):
        CLARS(params, stats=FakeStats(params), trust_coefficient=-1.0)
    opt = CLARS(params, stats=FakeStats(params, per_example=False))
    set_random_grads(params, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="per-example"):
        opt.step()
    with pytest.raises(ValueError, match="lena"):
        opt.load_state_dict(LENA(params, stats=FakeStats(params), base_iterations=5).state_dict())


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    weight_norm=st.floats(0.0, 1e3), grad_norm=st.floats(0.0, 1e3), spread=st.floats(1.0, 50.0),
    weight_decay=st.floats(0.0, 1e-1), trust=st.floats(1e-4, 1.0),
)
def test_trust_ratio_never_above_lars(weight_norm, grad_norm, spread, weight_decay, trust):
    from largebatch.optim.lars import trust_ratios
    from largebatch.optim.clars import clars_trust_ratios

    w, g = torch.tensor([weight_norm], dtype=torch.float64), torch.tensor([grad_norm], dtype=torch.float64)
    kw = dict(weight_decay=torch.tensor(weight_decay, dtype=torch.float64),
              trust_coefficient=torch.tensor(trust, dtype=torch.float64),
              eps=torch.tensor(1e-8, dtype=torch.float64), adapt=torch.tensor(True))
    clars = clars_trust_ratios(w, g * spread, **kw)  # mean of example norms >= ||gbar||
    lars = trust_ratios(w, g + weight_decay * w, coefficient=trust, eps=1e-8)
    if grad_norm > 0 and weight_norm > 0:
        assert clars.item() <= lars.item() * (1 + 1e-12)
    torch.testing.assert_close(clars_trust_ratios(w, g, **kw), lars, rtol=1e-14, atol=0)  # identical examples: LARS

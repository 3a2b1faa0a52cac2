"""LARS against an independent per-tensor reference (methods.md formulas)."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.optim import LARS

SHAPES = [(4, 3), (4,), (2, 3, 2, 2), (5,)]
LRS = [0.5, 0.3, 0.3, 0.1, 0.2]  # changes between steps, so the rate's place matters


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    params[1].zero_()  # a zero-initialised bias
    return [p.requires_grad_() for p in params]


def make_grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]


def reference_lars(params, grad_steps, lrs, *, momentum, dampening, weight_decay, nesterov,
                   trust_coefficient, eps, denominator, lr_in_momentum, trust_clip, adapt,
                   maximize):
    """Plain per-tensor formulas, one step at a time."""
    w = [p.detach().clone() for p in params]
    v = [None] * len(w)
    for grads, lr in zip(grad_steps, lrs):
        for k, g in enumerate(grads):
            g = -g if maximize else g
            d = g + weight_decay * w[k]
            w_norm = math.sqrt(float((w[k] ** 2).sum()))
            if denominator == "separate":
                den = math.sqrt(float((g ** 2).sum())) + weight_decay * w_norm
            else:
                den = math.sqrt(float((d ** 2).sum()))
            local = trust_coefficient * w_norm / (den + eps) if (w_norm > 0 and den > 0) else 1.0
            if trust_clip:
                local = min(local, 1.0)
            if not adapt:
                local = 1.0
            s = lr * local if lr_in_momentum else local
            outer = 1.0 if lr_in_momentum else lr
            if momentum == 0:
                w[k] = w[k] - outer * s * d
                continue
            if v[k] is None:
                v[k] = s * d
            else:
                v[k] = momentum * v[k] + (1 - dampening) * s * d
            u = s * d + momentum * v[k] if nesterov else v[k]
            w[k] = w[k] - outer * u
    return w


def run_lars(grad_steps, lrs, foreach=True, **options):
    params = make_params()
    opt = LARS(params, lr=lrs[0], foreach=foreach, **options)
    for grads, lr in zip(grad_steps, lrs):
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def option_grid():
    for denominator, inside, clip, (momentum, dampening, nesterov), wd, adapt, maximize in itertools.product(
        ["separate", "combined"],
        [True, False],
        [False, True],
        [(0.9, 0.0, False), (0.9, 0.0, True), (0.8, 0.3, False), (0.0, 0.0, False)],
        [0.0, 0.05],
        [True, False],
        [False, True],
    ):
        if maximize and (clip or not adapt or denominator == "combined"):
            continue  # maximize only flips the sign; a few combinations suffice
        yield dict(
            momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd,
            trust_coefficient=0.1, eps=1e-9, denominator=denominator, lr_in_momentum=inside,
            trust_clip=clip, adapt=adapt, maximize=maximize,
        )


GRID = list(option_grid())


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("options", GRID, ids=lambda o: "-".join(
    f"{k}={v}" for k, v in o.items() if k not in ("trust_coefficient", "eps")))
def test_matches_reference(options, foreach):
    grad_steps = make_grads(len(LRS))
    params, _ = run_lars(grad_steps, LRS, foreach=foreach, **options)
    expected = reference_lars(make_params(), grad_steps, LRS, **options)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_default_options_documented():
    opt = LARS([torch.zeros(2, requires_grad=True)])
    group = opt.param_groups[0]
    assert {k: group[k] for k in (
        "lr", "momentum", "dampening", "weight_decay", "nesterov", "trust_coefficient", "eps",
        "denominator", "lr_in_momentum", "trust_clip", "adapt", "maximize", "foreach", "fused",
    )} == dict(
        lr=1.0, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
        trust_coefficient=1e-3, eps=1e-8, denominator="separate", lr_in_momentum=True,
        trust_clip=False, adapt=True, maximize=False, foreach=None, fused=False,
    )
    doc = LARS.__doc__
    for text in ("default: 1.0", "default: 0.9", "default: 0.001", "default: 1e-8",
                 '"separate"', "(default: False)", "(default: True)"):
        assert text in doc


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum,dampening,nesterov", [
    (0.9, 0.0, False), (0.9, 0.0, True), (0.9, 0.5, False), (0.0, 0.0, False)])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("lr_in_momentum", [True, False])
def test_adapt_false_is_sgd(foreach, momentum, dampening, nesterov, weight_decay, lr_in_momentum):
    grad_steps = make_grads(4)
    kwargs = dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                  weight_decay=weight_decay)
    ours, theirs = make_params(), make_params()
    opt = LARS(ours, lr=0.1, adapt=False, foreach=foreach, lr_in_momentum=lr_in_momentum, **kwargs)
    ref = torch.optim.SGD(theirs, lr=0.1, **kwargs)
    for grads in grad_steps:
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_first_step_uses_scaled_update_not_raw_gradient():
    # The buffer is seeded with lr * local * d, so the first step is lr * local * ||d||,
    # not the raw gradient (which would be 1/(lr*local) = 1000x too large here).
    w = torch.full((10,), 2.0, requires_grad=True)
    w.grad = torch.full((10,), 0.5)
    opt = LARS([w], lr=1.0, momentum=0.9, trust_coefficient=1e-3, eps=0.0)
    before = w.detach().clone()
    opt.step()
    local = 1e-3 * before.norm() / w.grad.norm()
    torch.testing.assert_close((before - w.detach()).norm(), local * w.grad.norm())
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], local * w.grad)


def test_zero_initialised_bias_moves_and_decay_applied():
    bias = torch.zeros(3, requires_grad=True)
    weight = torch.ones(3, requires_grad=True)
    opt = LARS([bias, weight], lr=0.1, momentum=0.0, weight_decay=0.1)
    bias.grad = torch.ones(3)
    weight.grad = torch.zeros(3)  # zero gradient: only the decay moves it
    opt.step()
    assert (bias.detach() != 0).all()
    assert (weight.detach() < 1).all()
    ratios = opt.last_trust_ratios[0]
    assert ratios[0] == 1.0  # zero weight norm -> ratio 1


def test_trust_clip_caps_ratio():
    w = torch.ones(4, requires_grad=True)
    w.grad = torch.full((4,), 1e-6)
    opt = LARS([w], lr=0.1, trust_coefficient=1.0, trust_clip=True)
    opt.step()
    assert opt.last_trust_ratios[0].item() == 1.0


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(min_value=1e-3, max_value=1e3),
    denominator=st.sampled_from(["separate", "combined"]),
    seed=st.integers(0, 1000),
)
def test_update_invariant_to_gradient_scale_without_decay(scale, denominator, seed):
    """With weight_decay=0 (and eps=0) the step does not depend on the gradient's scale
    (for layers with non-zero weights: a zero layer takes the plain rate)."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    steps = []
    for c in (1.0, scale):
        params = make_params(seed)
        params[1].data.fill_(0.5)
        opt = LARS(params, lr=0.5, momentum=0.9, eps=0.0, denominator=denominator)
        for _ in range(2):
            for p, gr in zip(params, grads):
                p.grad = gr * c
            opt.step()
        steps.append([p.detach().clone() for p in params])
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("options", GRID[::3], ids=lambda o: "-".join(
    f"{k}={v}" for k, v in o.items() if k not in ("trust_coefficient", "eps")))
def test_workspace_path_matches_reference(options, monkeypatch):
    """Lists of large tensors write d = g + wd*w into a reused workspace (per-tensor
    ``out=``) instead of allocating it; force that path on the small test tensors."""
    import largebatch.optim._foreach as trust

    monkeypatch.setattr(trust, "WORKSPACE_MIN_MEAN_NUMEL", 1)
    grad_steps = make_grads(len(LRS))
    params, opt = run_lars(grad_steps, LRS, foreach=True, **options)
    expected = reference_lars(make_params(), grad_steps, LRS, **options)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)
    assert len(opt._workspace._buffers) == len(params)  # the path was taken
    assert "workspace" not in repr(opt.state_dict())

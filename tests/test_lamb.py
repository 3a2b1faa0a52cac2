"""LAMB against an independent per-tensor reference (methods.md formulas)."""

import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.optim import LAMB

SHAPES = [(4, 3), (4,), (2, 3, 2, 2), (5,)]
LRS = [0.05, 0.03, 0.03, 0.01, 0.02]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    params[1].zero_()  # a zero-initialised bias
    return [p.requires_grad_() for p in params]


def make_grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]


def reference_lamb(params, grad_steps, lrs, *, betas, eps, weight_decay, bias_correction,
                   phi_clamp, decoupled_weight_decay, adapt, maximize):
    b1, b2 = betas
    w = [p.detach().clone() for p in params]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t, (grads, lr) in enumerate(zip(grad_steps, lrs), start=1):
        for k, g in enumerate(grads):
            g = -g if maximize else g
            if not decoupled_weight_decay:
                g = g + weight_decay * w[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1**t) if bias_correction else m[k]
            v_hat = v[k] / (1 - b2**t) if bias_correction else v[k]
            u = m_hat / (v_hat.sqrt() + eps)
            if decoupled_weight_decay:
                u = u + weight_decay * w[k]
            phi = math.sqrt(float((w[k] ** 2).sum()))
            if phi_clamp is not None:
                phi = min(max(phi, phi_clamp[0]), phi_clamp[1])
            u_norm = math.sqrt(float((u ** 2).sum()))
            ratio = phi / u_norm if (phi > 0 and u_norm > 0) and adapt else 1.0
            w[k] = w[k] - lr * ratio * u
    return w


def run_lamb(grad_steps, lrs, foreach=True, **options):
    params = make_params()
    opt = LAMB(params, lr=lrs[0], foreach=foreach, **options)
    for grads, lr in zip(grad_steps, lrs):
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def option_grid():
    for bc, clamp, decoupled, wd, adapt, maximize, betas, eps in itertools.product(
        [True, False],
        [None, (0.5, 2.0)],
        [True, False],
        [0.0, 0.1],
        [True, False],
        [False, True],
        [(0.9, 0.999), (0.5, 0.9)],
        [1e-6, 1e-3],
    ):
        if maximize and (clamp or not adapt or betas != (0.9, 0.999)):
            continue
        if eps == 1e-3 and betas != (0.9, 0.999):
            continue
        yield dict(betas=betas, eps=eps, weight_decay=wd, bias_correction=bc, phi_clamp=clamp,
                   decoupled_weight_decay=decoupled, adapt=adapt, maximize=maximize)


GRID = list(option_grid())


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("options", GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_matches_reference(options, foreach):
    grad_steps = make_grads(len(LRS))
    params, _ = run_lamb(grad_steps, LRS, foreach=foreach, **options)
    expected = reference_lamb(make_params(), grad_steps, LRS, **options)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def _fused_cases():
    wanted = [
        dict(bias_correction=True, decoupled_weight_decay=True, weight_decay=0.1, adapt=True, maximize=False),
        dict(bias_correction=False, decoupled_weight_decay=False, weight_decay=0.1, adapt=True),
        dict(phi_clamp=(0.5, 2.0), adapt=True),
        dict(maximize=True, weight_decay=0.1),
        dict(adapt=False, weight_decay=0.1),
    ]
    return [next(o for o in GRID if all(o[k] == v for k, v in w.items())) for w in wanted]


@pytest.mark.slow
@pytest.mark.parametrize("options", _fused_cases(), ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fused_matches_reference(options):
    """fused=True (the per-tensor update compiled with dynamic shapes) against the reference,
    with a schedule given as a tensor rate."""
    grad_steps = make_grads(len(LRS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = make_params()
        opt = LAMB(params, lr=torch.tensor(LRS[0]), fused=True, **options)
        for grads, lr in zip(grad_steps, LRS):
            opt.param_groups[0]["lr"].fill_(lr)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert not [w for w in caught if "could not compile" in str(w.message)]  # else the test is vacuous
    expected = reference_lamb(make_params(), grad_steps, LRS, **options)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-8)


def test_default_options_documented():
    opt = LAMB([torch.zeros(2, requires_grad=True)])
    group = opt.param_groups[0]
    assert {k: group[k] for k in (
        "lr", "betas", "eps", "weight_decay", "bias_correction", "phi_clamp",
        "decoupled_weight_decay", "adapt", "maximize", "foreach", "fused",
    )} == dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
        phi_clamp=None, decoupled_weight_decay=True, adapt=True, maximize=False,
        foreach=None, fused=False,
    )
    doc = LAMB.__doc__
    for text in ("default: 1e-3", "default: (0.9, 0.999)", "default: 1e-6", "default: 0.01",
                 "default: True", "default: None", "(default: False)"):
        assert text in doc


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("decoupled", [True, False])
def test_adapt_false_is_adamw(foreach, weight_decay, decoupled):
    grad_steps = make_grads(5)
    ours, theirs = make_params(), make_params()
    opt = LAMB(ours, lr=0.01, eps=1e-8, weight_decay=weight_decay, adapt=False, foreach=foreach,
               decoupled_weight_decay=decoupled)
    reference = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = reference(theirs, lr=0.01, eps=1e-8, weight_decay=weight_decay)
    for grads in grad_steps:
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_zero_initialised_bias_moves_and_decay_applied():
    bias = torch.zeros(3, requires_grad=True)
    weight = torch.ones(3, requires_grad=True)
    opt = LAMB([bias, weight], lr=0.1, weight_decay=0.1)
    bias.grad = torch.ones(3)
    weight.grad = torch.zeros(3)  # zero gradient: only the decay moves it
    opt.step()
    assert (bias.detach() != 0).all()
    assert (weight.detach() < 1).all()
    assert opt.last_trust_ratios[0][0] == 1.0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 1000),
    lr=st.floats(1e-4, 1.0),
    clamp=st.sampled_from([None, (0.5, 1.5), (2.0, 3.0)]),
    weight_decay=st.sampled_from([0.0, 0.01]),
)
def test_update_norm_is_lr_times_phi_of_weight_norm(seed, lr, clamp, weight_decay):
    """Every adapted layer with non-zero weights moves by exactly lr * phi(||w||)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]
    opt = LAMB(params, lr=lr, weight_decay=weight_decay, phi_clamp=clamp)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        before = [p.detach().clone() for p in params]
        opt.step()
        for b, p in zip(before, params):
            phi = b.norm() if clamp is None else b.norm().clamp(*clamp)
            torch.testing.assert_close((p.detach() - b).norm(), lr * phi, rtol=1e-9, atol=0)


@pytest.mark.parametrize("options", GRID[::2], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_workspace_path_matches_reference(options, monkeypatch):
    """Lists of large tensors build the update in a workspace reused across steps
    (per-tensor ``out=``) instead of two allocated lists; force that path here."""
    import largebatch.optim._foreach as trust

    monkeypatch.setattr(trust, "WORKSPACE_MIN_MEAN_NUMEL", 1)
    grad_steps = make_grads(len(LRS))
    params, opt = run_lamb(grad_steps, LRS, foreach=True, **options)
    expected = reference_lamb(make_params(), grad_steps, LRS, **options)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)
    assert len(opt._workspace._buffers) == len(params)  # the path was taken
    assert "workspace" not in repr(opt.state_dict())

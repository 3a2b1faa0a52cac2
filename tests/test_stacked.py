"""The stacked layout (largebatch/optim/_layout.py): lists of many small tensors of few
shapes are stepped as per-shape stacks. Each optimiser on such a list must equal its
per-tensor path (foreach=False, itself checked against the formulas in the per-method
tests), keep its state as ordinary per-parameter entries (state_dict round trip, in-place
edits, replaced entries), and cope with parameter lists that change between steps."""

import copy

import pytest
import torch

from largebatch.optim import CLARS, LAMB, LARS, LENA, AdaScale
from largebatch.optim._layout import MIN_TENSORS, StackedLayout

from _method_stats import FakeStats

# 96 tensors of 4 shapes, two of them non-contiguous (transposed) weights: stacking applies
SHAPES = [(3 + i % 3, 5) for i in range(80)] + [(7,)] * 16
STEPS = 4


def make_params(seed=1):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    params[0] = torch.randn(5, 3, generator=g, dtype=torch.float64).t()  # non-contiguous
    params[3] = torch.randn(5, 3, generator=g, dtype=torch.float64).t()
    params[80].zero_()  # a zero-initialised bias: ratio 1
    return [torch.nn.Parameter(p) for p in params]


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)


def build(cls, params, foreach, kwargs):
    if cls in (CLARS, LENA, AdaScale):
        return cls(params, stats=FakeStats(params, n=4, seed=0), foreach=foreach, **kwargs)
    return cls(params, foreach=foreach, **kwargs)


def run(cls, foreach, kwargs, steps=STEPS, lrs=None):
    params = make_params()
    opt = build(cls, params, foreach, kwargs)
    ratios = []
    for t in range(steps):
        set_grads(params, t)
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        opt.step()
        if hasattr(opt, "last_trust_ratios"):
            ratios.append(opt.last_trust_ratios[0].clone())
    return params, opt, ratios


def assert_same(a, b, tol=1e-12):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


CASES = [
    (LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-2)),
    (LARS, dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-2, denominator="combined")),
    (LARS, dict(lr=0.5, momentum=0.0, weight_decay=1e-2, maximize=True)),
    (LARS, dict(lr=0.5, momentum=0.9, dampening=0.1, lr_in_momentum=False, trust_clip=True)),
    (LARS, dict(lr=0.5, momentum=0.9, adapt=False, weight_decay=1e-2)),
    (LAMB, dict(lr=0.01, weight_decay=1e-2)),
    (LAMB, dict(lr=0.01, weight_decay=1e-2, decoupled_weight_decay=False, bias_correction=False)),
    (LAMB, dict(lr=0.01, weight_decay=1e-2, phi_clamp=(0.1, 5.0), maximize=True)),
    (LAMB, dict(lr=0.01, adapt=False)),
    (CLARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-2)),
    (CLARS, dict(lr=0.5, momentum=0.0, weight_decay=1e-2, maximize=True)),
    (CLARS, dict(lr=0.5, momentum=0.9, nesterov=True)),
    (LENA, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, base_iterations=20)),
    (LENA, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, decoupled_weight_decay=True, base_iterations=20)),
    (AdaScale, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, dampening=0.1)),
    (AdaScale, dict(lr=0.1, momentum=0.9, nesterov=True)),
]


def case_id(case):
    cls, kwargs = case
    return cls.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items() if k != "lr")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_stacked_equals_per_tensor_path(case):
    cls, kwargs = case
    lrs = [kwargs["lr"] * f for f in (1.0, 0.5, 0.5, 0.2)]  # a schedule: the rate's place matters
    stacked, opt, ratios = run(cls, None, kwargs, lrs=lrs)
    loop, _, loop_ratios = run(cls, False, kwargs, lrs=lrs)
    assert opt._layouts.stacked(), "the stacked path did not run"
    assert_same(stacked, loop)
    assert_same(ratios, loop_ratios)


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[9], CASES[12]], ids=case_id)
def test_stacked_takes_a_tensor_lr(case):
    cls, kwargs = case
    stacked, opt, _ = run(cls, None, dict(kwargs, lr=torch.tensor(kwargs["lr"], dtype=torch.float64)))
    loop, _, _ = run(cls, False, kwargs)
    assert opt._layouts.stacked()
    assert_same(stacked, loop)


def test_lars_stacked_without_adaptation_is_torch_sgd():
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    ours, opt, _ = run(LARS, None, dict(kwargs, adapt=False))
    assert opt._layouts.stacked()
    params = make_params()
    sgd = torch.optim.SGD(params, **kwargs)
    for t in range(STEPS):
        set_grads(params, t)
        sgd.step()
    assert_same(ours, params)


def test_grads_unchanged_and_ratios_in_parameter_order():
    params = make_params()
    opt = LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-2)
    set_grads(params, 0)
    grads = [p.grad.clone() for p in params]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    # ratio of the zero bias is 1, and each ratio is its own tensor's
    before = make_params()
    for k in (0, 5, 80, 95):
        w, g = before[k].detach(), grads[k]
        expected = 1.0 if k == 80 else 1e-3 * w.norm() / (g.norm() + 1e-2 * w.norm() + 1e-8)
        assert float(opt.last_trust_ratios[0][k]) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("cls,kwargs", [CASES[0], CASES[5], CASES[9], CASES[12]], ids=lambda c: getattr(c, "__name__", ""))
def test_state_dict_round_trip_mid_run(cls, kwargs):
    """Save after 2 steps, load into a fresh optimiser (its state entries are the loaded
    tensors, not views of its stacks), continue: identical to the uninterrupted run."""
    full, _, _ = run(cls, None, kwargs, steps=STEPS)
    params = make_params()
    opt = build(cls, params, None, kwargs)
    for t in range(2):
        set_grads(params, t)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = build(cls, fresh_params, None, kwargs)
    if hasattr(fresh, "stats") and isinstance(fresh.stats, FakeStats):
        for _ in range(2):  # the source draws once per step: keep the two runs' draws aligned
            fresh.stats.summary()
    fresh.load_state_dict(saved)
    for t in range(2, STEPS):
        set_grads(fresh_params, t)
        fresh.step()
    assert_same(full, fresh_params, tol=0)
    assert fresh.state_dict()["state"].keys() == saved["state"].keys()


def test_state_entries_are_live_views():
    """Editing a momentum buffer in place, or replacing it, acts on the next step as it
    would on the per-tensor path."""
    results = []
    for foreach in (None, False):
        params = make_params()
        opt = LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-2, foreach=foreach)
        set_grads(params, 0)
        opt.step()
        opt.state[params[7]]["momentum_buffer"].zero_()
        opt.state[params[90]]["momentum_buffer"] = torch.full((7,), 0.25, dtype=torch.float64)
        for t in (1, 2):
            set_grads(params, t)
            opt.step()
        results.append(params)
    assert_same(*results)


def test_changing_parameter_lists():
    """A parameter without a gradient at one step changes the list (a new layout); a
    parameter whose buffer is new while others have one takes the per-tensor path."""
    results = []
    for foreach in (None, False):
        params = make_params()
        opt = LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-2, foreach=foreach)
        for t in range(4):
            set_grads(params, t)
            if t == 0:
                params[10].grad = None  # first step without it: its buffer starts later
            if t == 2:
                params[20].grad = None
            opt.step()
        results.append(params)
    assert_same(*results)


def test_layout_only_for_many_small_tensors_of_few_shapes():
    small = [torch.zeros(4, 4) for _ in range(MIN_TENSORS)]
    assert StackedLayout.suits(small)
    assert not StackedLayout.suits(small[: MIN_TENSORS - 1])
    assert not StackedLayout.suits([torch.zeros(i + 1) for i in range(MIN_TENSORS)])  # one per shape
    assert not StackedLayout.suits([torch.zeros(512, 512) for _ in range(MIN_TENSORS)])  # large
    assert not StackedLayout.suits(small[:-1] + [torch.zeros(4, 4, dtype=torch.float64)])  # mixed dtypes
    params = make_params()
    opt = LARS(params, lr=0.5, foreach=False)
    set_grads(params, 0)
    opt.step()
    assert not opt._layouts.stacked()


def test_clars_with_a_stacked_group_and_a_plain_one():
    """Norms from the stacks for one group, from the tensors for the other (and the stacks the
    norms filled are the ones stepped): equal to the per-tensor path."""
    results = []
    for foreach in (None, False):
        params = make_params()
        extra = [torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(k)))
                 for k in range(3)]
        every = params + extra
        groups = [{"params": params}, {"params": extra, "lr": 0.2, "weight_decay": 0.0}]
        opt = CLARS(groups, lr=0.5, momentum=0.9, weight_decay=1e-2, foreach=foreach,
                    stats=FakeStats(every, n=4, seed=0))
        for t in range(STEPS):
            set_grads(params, t)
            for k, p in enumerate(extra):
                p.grad = torch.full_like(p, 0.1 * (t + k + 1))
            opt.step()
        assert opt._layouts.stacked() == (foreach is None)
        results.append(every)
    assert_same(*results)


def test_stacked_only_on_cpu():
    """On CUDA a foreach op is already one fused kernel: the stacks' copies would only add
    traffic, so the layout is chosen on CPU only (any other device keeps the tensors)."""
    from largebatch.optim._layout import Layouts

    small = [torch.zeros(4, 4) for _ in range(MIN_TENSORS)]
    assert StackedLayout.suits(small)
    elsewhere = [torch.zeros(4, 4, device="meta") for _ in range(MIN_TENSORS)]
    assert not StackedLayout.suits(elsewhere)
    assert Layouts().of(elsewhere).kind == "tensors"
    assert Layouts().of(small).kind == "stacked"

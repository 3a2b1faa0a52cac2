"""The torch.optim conventions (docs/architecture.md) for CLARS, LENA and AdaScale, fed by the real engine."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field

import pytest
import torch

from largebatch.optim.adascale import AdaScale
from largebatch.optim.clars import CLARS
from largebatch.optim.lena import LENA
from largebatch.stats import GradientStatistics


@dataclass
class Case:
    cls: type
    kwargs: dict
    per_example: bool = False
    bad: list = field(default_factory=list)

    def __repr__(self):
        return self.cls.__name__

    def make(self, net, params=None, grad_scaler=None, **overrides):
        stats = GradientStatistics(net, per_example=self.per_example, grad_scaler=grad_scaler)
        return self.cls(net.parameters() if params is None else params, stats=stats, **{**self.kwargs, **overrides})


CASES = [
    Case(CLARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02), per_example=True,
         bad=[(dict(lr=-0.1), "lr"), (dict(momentum=1.0), "momentum"), (dict(statistic="max"), "statistic"),
              (dict(trust_coefficient=-1.0), "trust_coefficient"), (dict(adapt="yes"), "adapt"),
              (dict(inexact="drop"), "inexact")]),
    Case(LENA, dict(lr=0.05, momentum=0.9, weight_decay=5e-4, base_iterations=20, alpha=0.2),
         bad=[(dict(lr=-0.1), "lr"), (dict(alpha=0.0), "alpha"), (dict(alpha=2.0), "alpha"),
              (dict(base_iterations=0), "base_iterations"), (dict(eps=-1.0), "eps"), (dict(warmup=1), "warmup")]),
    Case(AdaScale, dict(lr=0.05, momentum=0.9, weight_decay=5e-4),
         bad=[(dict(lr=-0.1), "lr"), (dict(momentum=-0.5), "momentum"), (dict(weight_decay=-1.0), "weight_decay"),
              (dict(nesterov=True, momentum=0.0), "nesterov")]),
]


@pytest.fixture(params=CASES, ids=repr)
def case(request):
    return request.param


def model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    torch.nn.init.zeros_(net[0].bias)
    return net


def backward(net, step, scaler=None):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=g)
    for xs in x.split(4):  # two micro-batches: n = 2
        loss = net(xs).pow(2).mean() / 2
        (scaler.scale(loss) if scaler is not None else loss).backward()


def train(net, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        backward(net, step)
        opt.step()


def flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def first_introspection(opt):
    return opt.last_trust_ratios[0] if isinstance(opt, CLARS) else opt.effective_lrs()[0]


def test_named_parameters_and_introspection_by_name(case):
    net = model()
    opt = case.make(net, net.named_parameters())
    train(net, opt, 2)
    names = set(opt.trust_ratios_by_name() if isinstance(opt, CLARS) else opt.by_name("effective_lr"))
    assert names == {n for n, _ in net.named_parameters()}


@pytest.mark.parametrize("foreach", [True, False])
def test_grad_never_modified(case, foreach):
    net = model()
    opt = case.make(net, foreach=foreach, maximize=True)
    for step in range(3):
        opt.zero_grad()
        backward(net, step)
        grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
        for p, g in zip(net.parameters(), grads):
            assert torch.equal(p.grad, g)


def test_foreach_and_single_tensor_agree(case):
    a, b = model(), model()
    train(a, case.make(a, foreach=True), 4)
    train(b, case.make(b, foreach=False), 4)
    torch.testing.assert_close(flat(a), flat(b))


def test_state_dict_round_trip_resumes_identically(case):
    reference = model()
    train(reference, case.make(reference), 6)
    net = model()
    opt = case.make(net)
    train(net, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = model()
    resumed.load_state_dict(saved["model"])
    fresh = case.make(resumed)
    fresh.load_state_dict(saved["opt"])
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    train(resumed, fresh, 3, start=3)
    assert torch.equal(flat(resumed), flat(reference))


def test_introspection_is_tensor_and_not_checkpointed(case):
    net = model()
    opt = case.make(net)
    train(net, opt, 2)
    values = first_introspection(opt)
    assert isinstance(values, torch.Tensor) and values.shape == (len(list(net.parameters())),)
    assert torch.isfinite(values).all()
    keys = {k for s in opt.state_dict()["state"].values() for k in s}
    assert not keys & {"gain", "trust_ratio", "effective_lr", "warmup_factor", "layer_gain"}


def test_every_hyperparameter_in_param_groups(case):
    net = model()
    opt = case.make(net)
    group = opt.param_groups[0]
    for key, value in case.kwargs.items():
        assert group[key] == value
    for key in ("lr", "weight_decay", "maximize", "foreach"):
        assert key in group


def test_tensor_lr_matches_float_lr_and_scheduler_composes(case):
    a, b = model(), model()
    lr = case.kwargs["lr"]
    opt_t = case.make(a, lr=torch.tensor(lr))
    train(a, opt_t, 3)
    train(b, case.make(b), 3)
    torch.testing.assert_close(flat(a), flat(b))
    opt_t.param_groups[0]["lr"].fill_(lr / 2)  # scheduling in place
    train(a, opt_t, 1, start=3)
    net = model()
    opt = case.make(net)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        train(net, opt, 1, start=step)
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr / 8)


def test_no_host_sync_in_step(case, monkeypatch):
    net = model()
    opt = case.make(net)
    train(net, opt, 1)
    opt.zero_grad()
    backward(net, 1)
    opt.stats.summary()  # the engine's own work is not under test here

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside step()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    monkeypatch.undo()


def test_grad_scaler(case):
    net = model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = case.make(net, grad_scaler=scaler)
    train(net, opt, 1)
    weights = flat(net).clone()
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    backward(net, 1, scaler)
    next(net.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)  # skipped: the optimiser does not run
    scaler.update()
    assert torch.equal(flat(net), weights)
    after = opt.state_dict()["state"]
    for key in state:
        for name, value in state[key].items():
            assert torch.equal(after[key][name], value), name

    # a finite step through the scaler equals an unscaled step (the statistics saw the scale)
    other = model()
    other.load_state_dict(net.state_dict())
    other_opt = case.make(other)
    other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.zero_grad()  # also resets the statistics of the skipped step
    backward(net, 2, scaler)
    scaler.step(opt)
    train(other, other_opt, 1, start=2)
    torch.testing.assert_close(flat(net), flat(other), rtol=1e-5, atol=1e-6)


def test_step_hooks_run(case):
    net = model()
    opt = case.make(net)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(first_introspection(o)))
    train(net, opt, 2)
    assert calls[0] == "pre" and len(calls) == 4 and isinstance(calls[1], torch.Tensor)


def test_params_without_grad_are_skipped(case):
    net = model()
    opt = case.make(net)
    frozen = net[3].weight
    before = frozen.detach().clone()
    opt.zero_grad()
    backward(net, 0)
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before)
    assert len(first_introspection(opt)) == len(list(net.parameters())) - 1


@pytest.mark.parametrize(
    "case, bad, name",
    [(c, bad, name) for c in CASES for bad, name in c.bad],
    ids=lambda x: repr(x) if isinstance(x, Case) else str(x),
)
def test_bad_hyperparameters_name_the_argument(case, bad, name):
    net = model()
    with pytest.raises(ValueError, match=name):
        case.make(net, **bad)
    with pytest.raises(ValueError, match=name):
        case.make(net, params=[{"params": list(net.parameters()), **bad}])


# -- accumulation and loss-reduction conventions ---------------------------------------------
# With accumulation="sum" (the loss is not divided by the m micro-batches) p.grad is m times
# the mean gradient, with loss_reduction="sum" b times; the engine reports A, B and the
# per-example norms on the mean-gradient scale whatever the convention. "The same run" then
# means what each method's equations make invariant:
# * LENA, AdaScale (momentum SGD with a gain): the same gains, warm-up progress and clock,
#   and the same weights when lr is divided and weight decay multiplied by the factor c
#   (exactly as torch.optim.SGD on a c times larger loss);
# * CLARS (a LARS trust ratio): the same steps when weight decay and eps, which are in
#   gradient units in the denominator, are multiplied by c; the trust ratio, a factor on
#   p.grad, is then c times smaller.
# No weight is zero: a zero-norm layer gets trust ratio 1, a plain SGD step that is c times
# larger, as in LARS.

M, MICRO = 3, 4  # micro-batches per step, examples per micro-batch


def _convention_equivalent(case, factor):
    kw = {**case.kwargs, "eps": 1e-3} if case.cls is LENA else dict(case.kwargs)  # eps must matter
    if case.cls is CLARS:
        return {**kw, "weight_decay": kw["weight_decay"] * factor, "eps": 1e-8 * factor}
    if factor == 1:
        return kw
    return {**kw, "lr": kw["lr"] / factor, "weight_decay": kw["weight_decay"] * factor}


def _convention_run(case, accumulation, loss_reduction, steps=4):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)).double()
    with torch.no_grad():
        net[2].bias.uniform_(-0.5, 0.5)
    stats = GradientStatistics(net, per_example=case.per_example, accumulation=accumulation, loss_reduction=loss_reduction)
    factor = (M if accumulation == "sum" else 1) * (MICRO if loss_reduction == "sum" else 1)
    opt = case.cls(net.parameters(), stats=stats, **_convention_equivalent(case, factor))
    trace = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(M * MICRO, 6, generator=g, dtype=torch.float64)
        opt.zero_grad()
        for xs in x.split(MICRO):
            per_example = net(xs).pow(2).mean(dim=1)
            loss = per_example.mean() if loss_reduction == "mean" else per_example.sum()
            (loss / M if accumulation == "mean" else loss).backward()
        opt.step()
        if isinstance(opt, CLARS):
            trace.append(torch.cat(opt.last_trust_ratios) * factor)
        elif isinstance(opt, LENA):
            trace.append(torch.cat(opt.last_gains + opt.last_warmup_progress))
        else:
            trace.append(torch.stack([opt.last_gain, opt.progress]))
    states = list(opt.state_dict()["state"].values())
    keys = [k for k in states[0] if k != "momentum_buffer"]
    return flat(net), trace, {k: torch.stack([s[k] for s in states]) for k in keys}


@pytest.mark.parametrize("accumulation, loss_reduction", [("sum", "mean"), ("mean", "sum"), ("sum", "sum")])
def test_accumulation_and_reduction_conventions_give_the_same_run(case, accumulation, loss_reduction):
    weights, trace, state = _convention_run(case, "mean", "mean")
    other_weights, other_trace, other_state = _convention_run(case, accumulation, loss_reduction)
    for a, b in zip(other_trace, trace):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    torch.testing.assert_close(other_weights, weights, rtol=1e-9, atol=1e-12)
    # the moving averages are kept on the mean-gradient scale: a checkpoint means the same
    # thing whatever the convention (and n or m may change on resuming)
    for key, values in state.items():
        torch.testing.assert_close(other_state[key], values, rtol=1e-9, atol=1e-9 * values.abs().max().item())


# -- the public surface -------------------------------------------------------------------------

PAPERS = {"clars": "Huo, Gu, Huang", "lena": "Ko, Lee, Kim", "adascale": "Johnson"}


@pytest.mark.parametrize("module", sorted(PAPERS))
def test_public_objects_cite_the_paper_and_an_equation(module):
    import importlib

    mod = importlib.import_module(f"largebatch.optim.{module}")
    for name in mod.__all__:
        obj = getattr(mod, name)
        assert PAPERS[module].split(",")[0] in obj.__doc__, name
        assert "=" in obj.__doc__ or "math::" in obj.__doc__, name
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            assert PAPERS[module].split(",")[0] in obj.step.__doc__, f"{name}.step"


def test_top_level_exports_take_named_parameters(case):
    import largebatch

    cls = getattr(largebatch, case.cls.__name__)
    assert cls is case.cls
    net = model()
    opt = cls(net.named_parameters(), stats=GradientStatistics(net, per_example=case.per_example), **case.kwargs)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in net.named_parameters()]
    train(net, opt, 2)
    assert torch.isfinite(flat(net)).all()

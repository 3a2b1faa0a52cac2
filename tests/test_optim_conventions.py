"""Conventions every layer-wise optimiser follows (docs/architecture.md).

Add a new optimiser by appending a ``Case`` to ``OPTIMIZERS``.
"""

import copy
import io
import warnings
from dataclasses import dataclass, field

import pytest
import torch

from largebatch.optim import LAMB, LARS


@dataclass
class Case:
    cls: type
    kwargs: dict
    bad: list = field(default_factory=list)  # (kwargs, argument named in the error)

    def __repr__(self):
        return self.cls.__name__


OPTIMIZERS = [
    Case(
        LARS,
        dict(lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02),
        bad=[
            (dict(lr=-0.1), "lr"),
            (dict(momentum=1.0), "momentum"),
            (dict(momentum=-0.5), "momentum"),
            (dict(dampening=1.5), "dampening"),
            (dict(weight_decay=-1e-4), "weight_decay"),
            (dict(trust_coefficient=-1.0), "trust_coefficient"),
            (dict(eps=-1.0), "eps"),
            (dict(denominator="tf"), "denominator"),
            (dict(nesterov=True, momentum=0.0), "nesterov"),
            (dict(adapt="yes"), "adapt"),
            (dict(lr=torch.tensor([0.1, 0.2])), "lr"),
        ],
    ),
    Case(
        LAMB,
        dict(lr=0.01, weight_decay=1e-2),
        bad=[
            (dict(lr=-1e-3), "lr"),
            (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
            (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
            (dict(betas=(0.9,)), "betas"),
            (dict(eps=-1e-6), "eps"),
            (dict(weight_decay=-0.1), "weight_decay"),
            (dict(phi_clamp=(2.0, 1.0)), r"phi_clamp\[1\]"),
            (dict(phi_clamp="identity"), "phi_clamp"),
            (dict(bias_correction=1), "bias_correction"),
            (dict(adapt=None), "adapt"),
        ],
    ),
]


def model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)
    )
    torch.nn.init.zeros_(net[0].bias)
    return net


def loss_fn(net, step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=g)
    return net(x).pow(2).mean()


def train(net, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_fn(net, step).backward()
        opt.step()


def flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.fixture(params=OPTIMIZERS, ids=repr)
def case(request):
    return request.param


def test_accepts_named_parameters(case):
    net = model()
    opt = case.cls(net.named_parameters(), **case.kwargs)
    train(net, opt, 2)
    names = set(opt.trust_ratios_by_name())
    assert names == {n for n, _ in net.named_parameters()}
    assert opt.state_dict()["param_groups"][0]["param_names"]


def test_groups_with_exclusion_masks(case):
    net = model()
    decay = [p for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in net.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    opt = case.cls([
        {"params": decay},
        {"params": rest, "weight_decay": 0.0, "adapt": False},
    ], **case.kwargs)
    train(net, opt, 2)
    assert opt.param_groups[1]["adapt"] is False and opt.param_groups[0]["adapt"] is True
    assert torch.equal(opt.last_trust_ratios[1], torch.ones(len(rest)))
    assert not torch.equal(opt.last_trust_ratios[0], torch.ones(len(decay)))


@pytest.mark.parametrize("foreach", [True, False])
def test_grad_never_modified(case, foreach):
    net = model()
    opt = case.cls(net.parameters(), foreach=foreach, maximize=True, **case.kwargs)
    for step in range(3):
        opt.zero_grad()
        loss_fn(net, step).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
        for p, g in zip(net.parameters(), grads):
            assert torch.equal(p.grad, g)


def test_foreach_and_single_tensor_agree(case):
    a, b = model(), model()
    train(a, case.cls(a.parameters(), foreach=True, **case.kwargs), 5)
    train(b, case.cls(b.parameters(), foreach=False, **case.kwargs), 5)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_grouped_and_ratios_in_order(case):
    a = [torch.randn(3, 2, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True),
         torch.randn(5, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    ratios = []
    for params, foreach in ((a, True), (b, False)):
        opt = case.cls(params, foreach=foreach, **case.kwargs)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        ratios.append(opt.last_trust_ratios[0])
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(ratios[0], ratios[1].to(ratios[0].dtype))


def test_state_dict_round_trip_resumes_identically(case):
    reference = model()
    train(reference, case.cls(reference.parameters(), **case.kwargs), 6)

    net = model()
    opt = case.cls(net.parameters(), **case.kwargs)
    train(net, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed = model()
    resumed.load_state_dict(saved["model"])
    fresh = case.cls(resumed.parameters(), **case.kwargs)
    fresh.load_state_dict(saved["opt"])
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    train(resumed, fresh, 3, start=3)
    assert torch.equal(flat(resumed), flat(reference))


def test_introspection_is_tensor_and_not_checkpointed(case):
    net = model()
    opt = case.cls(net.parameters(), **case.kwargs)
    train(net, opt, 2)
    ratios = opt.last_trust_ratios[0]
    assert isinstance(ratios, torch.Tensor) and ratios.shape == (len(list(net.parameters())),)
    assert torch.isfinite(ratios).all()
    effective = opt.effective_lrs()[0]
    torch.testing.assert_close(effective, ratios * opt.param_groups[0]["lr"])
    text = repr(opt.state_dict())
    assert "trust" not in str(list(opt.state_dict()["state"][0].keys()))
    assert "last_trust_ratios" not in text


def test_every_hyperparameter_in_param_groups(case):
    net = model()
    opt = case.cls(net.parameters(), **case.kwargs)
    group = opt.param_groups[0]
    for key in ("lr", "weight_decay", "adapt", "maximize", "foreach", "fused"):
        assert key in group
    for key, value in case.kwargs.items():
        assert group[key] == value


def test_tensor_lr_matches_float_lr(case):
    a, b = model(), model()
    kwargs = dict(case.kwargs)
    lr = kwargs.pop("lr")
    opt_t = case.cls(a.parameters(), lr=torch.tensor(lr), **kwargs)
    train(a, opt_t, 3)
    train(b, case.cls(b.parameters(), lr=lr, **kwargs), 3)
    torch.testing.assert_close(flat(a), flat(b))
    opt_t.param_groups[0]["lr"].fill_(lr / 2)  # scheduling in place
    train(a, opt_t, 1, start=3)


def test_lr_scheduler_composes(case):
    net = model()
    opt = case.cls(net.parameters(), **case.kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        train(net, opt, 1, start=step)
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(case.kwargs["lr"] / 8)


def test_no_host_sync_in_step(case, monkeypatch):
    net = model()
    opt = case.cls(net.parameters(), **case.kwargs)
    train(net, opt, 1)  # state creation happens on the first step; check later steps too
    opt.zero_grad()
    loss_fn(net, 1).backward()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside step()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    monkeypatch.undo()


def test_grad_scaler_skips_inf_step(case):
    net = model()
    opt = case.cls(net.parameters(), **case.kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    train(net, opt, 1)
    weights = flat(net).clone()
    state = copy.deepcopy(opt.state_dict()["state"])

    opt.zero_grad()
    scaler.scale(loss_fn(net, 1)).backward()
    next(net.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert torch.equal(flat(net), weights)
    after = opt.state_dict()["state"]
    for key in state:
        for name, value in state[key].items():
            assert torch.equal(after[key][name], value), name
    assert scaler.get_scale() == 512.0

    # A finite step through the scaler equals an unscaled step.
    other = model()
    other.load_state_dict(net.state_dict())
    other_opt = case.cls(other.parameters(), **case.kwargs)
    other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else buffers are shared
    opt.zero_grad()
    scaler.scale(loss_fn(net, 2)).backward()
    scaler.step(opt)
    train(other, other_opt, 1, start=2)
    torch.testing.assert_close(flat(net), flat(other))


def test_step_hooks_run(case):
    net = model()
    opt = case.cls(net.parameters(), **case.kwargs)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o.last_trust_ratios[0]))
    train(net, opt, 2)
    assert calls[0] == "pre" and len(calls) == 4
    assert isinstance(calls[1], torch.Tensor)


def test_params_without_grad_are_skipped(case):
    net = model()
    opt = case.cls(net.parameters(), **case.kwargs)
    frozen = net[3].weight
    before = frozen.detach().clone()
    opt.zero_grad()
    loss_fn(net, 0).backward()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before)
    assert len(opt.last_trust_ratios[0]) == len(list(net.parameters())) - 1
    assert "3.weight" not in opt.trust_ratios_by_name() and "group0.4" not in opt.trust_ratios_by_name()


@pytest.mark.parametrize(
    "case,bad,name",
    [(c, bad, name) for c in OPTIMIZERS for bad, name in c.bad],
    ids=lambda x: repr(x) if isinstance(x, Case) else str(x),
)
def test_bad_hyperparameters_name_the_argument(case, bad, name):
    with pytest.raises(ValueError, match=name):
        case.cls([torch.zeros(2, requires_grad=True)], **{**case.kwargs, **bad})
    # per-group values are validated too
    with pytest.raises(ValueError, match=name):
        case.cls([{"params": [torch.zeros(2, requires_grad=True)], **bad}], **case.kwargs)


def test_fused_and_foreach_together_rejected(case):
    with pytest.raises(ValueError, match="fused"):
        case.cls([torch.zeros(2, requires_grad=True)], fused=True, foreach=True)


@pytest.mark.slow
def test_fused_matches_eager(case):
    a, b = model(), model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(a, case.cls(a.parameters(), fused=True, **case.kwargs), 4)
    # a fallback to eager would make the comparison vacuous
    assert not [w for w in caught if "could not compile" in str(w.message)]
    train(b, case.cls(b.parameters(), **case.kwargs), 4)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-5, atol=1e-6)

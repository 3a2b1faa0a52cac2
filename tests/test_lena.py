"""LENA against a slow per-parameter reference written from the paper (Ko et al. 2022, Eq. 4-8, Alg. 1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _method_stats import FakeStats, make_params, set_random_grads
from largebatch.optim.adascale import AdaScale
from largebatch.optim.lena import LENA

class ReferenceLENA:
    """One Python loop per parameter, floats where the paper has scalars."""

    def __init__(self, params, hyper, layer_of=None):
        self.w = [p.detach().clone().double() for p in params]
        self.hyper = hyper  # per parameter: dict(lr, momentum, wd, alpha, T1, eps, warmup, decoupled, nesterov, dampening)
        self.layer_of = layer_of or list(range(len(params)))
        L = max(self.layer_of) + 1
        self.a = [0.0] * L
        self.b = [0.0] * L
        self.weight = 0.0
        self.S = [0.0] * L
        self.end = [-1] * L
        self.t = 0
        self.buf = [None] * len(params)
        self.rates = []

    def step(self, grads, A, B, n, lr_scale=1.0):
        self.t += 1
        c = max(1 - n / 1000, 0.0)
        L = len(self.a)
        A_l = [sum(float(A[k]) for k in range(len(A)) if self.layer_of[k] == l) for l in range(L)]
        B_l = [sum(float(B[k]) for k in range(len(B)) if self.layer_of[k] == l) for l in range(L)]
        self.weight = c * self.weight + (1 - c)
        gains, factors = [0.0] * L, [0.0] * L
        for l in range(L):
            self.a[l] = c * self.a[l] + (1 - c) * A_l[l]
            self.b[l] = c * self.b[l] + (1 - c) * B_l[l]
        rates = []
        for k, (w, g) in enumerate(zip(self.w, grads)):
            h, l = self.hyper[k], self.layer_of[k]
            eps = h["eps"]
            r = (self.a[l] / self.weight + eps) / (self.b[l] / self.weight + eps)
            r = min(max(r, 1.0), n)
            gains[l] = r
            theta = h["alpha"] * h["T1"]
            rates.append((l, r, theta))
        for l in range(L):  # S once per layer
            r = next(r for (ll, r, _) in rates if ll == l)
            self.S[l] += r
        out = []
        for k, (w, g) in enumerate(zip(self.w, grads)):
            h = self.hyper[k]
            l, r, theta = rates[k]
            warming = h["warmup"] and self.S[l] < theta
            f = self.S[l] / theta if warming else 1.0
            if self.end[l] == -1 and not warming:
                self.end[l] = self.t
            lr = h["lr"] * lr_scale
            eta = r * lr * f
            out.append(eta)
            d = g.double()
            if h["wd"] and h["decoupled"]:
                w.mul_(1 - lr * h["wd"])
            elif h["wd"]:
                d = d + h["wd"] * w
            if h["momentum"]:
                if self.buf[k] is None:
                    self.buf[k] = d.clone()
                else:
                    self.buf[k] = h["momentum"] * self.buf[k] + (1 - h["dampening"]) * d
                d = d + h["momentum"] * self.buf[k] if h["nesterov"] else self.buf[k]
            w.sub_(eta * d)
        self.rates.append(out)
        return out


def hyper_of(opt):
    out = []
    for g in opt.param_groups:
        for _ in g["params"]:
            out.append(dict(
                lr=float(g["lr"]), momentum=g["momentum"], wd=g["weight_decay"], alpha=g["alpha"],
                T1=g["base_iterations"], eps=g["eps"], warmup=g["warmup"], decoupled=g["decoupled_weight_decay"],
                nesterov=g["nesterov"], dampening=g["dampening"],
            ))
    return out


def run_against_reference(make_opt, steps=12, n=4, seed=1, gamma=0.9, layer_of=None, gain=None):
    params = make_params()
    stats = FakeStats(params, n=n, seed=seed, gain=gain)
    opt = make_opt(params, stats)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    ref = ReferenceLENA(params, hyper_of(opt), layer_of)
    g = torch.Generator().manual_seed(seed + 100)
    for t in range(steps):
        set_random_grads(params, g)
        grads = [p.grad.clone() for p in params]
        opt.step()
        s = stats.history[-1]
        expected = ref.step(grads, s.sample_sq_norm_mean, s.mean_grad_sq_norm, n, lr_scale=gamma**t)
        torch.testing.assert_close(torch.cat(opt.effective_lrs()).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)
        sched.step()
    for p, w in zip(params, ref.w):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    return opt, ref


def test_matches_reference_two_groups_with_schedule():
    def make(params, stats):
        return LENA(
            [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "lr": 0.05}],
            lr=0.1, momentum=0.9, weight_decay=5e-4, stats=stats, base_iterations=100, alpha=0.3,
        )

    opt, ref = run_against_reference(make, steps=12, n=4)
    ends = opt.warmup_ends().tolist()
    assert ends == [ref.end[k] for k in range(4)]
    assert any(e > 1 for e in ends)  # the warm-up really ran for some steps
    progress = torch.stack([opt.state[p]["progress"] for g in opt.param_groups for p in g["params"]])
    torch.testing.assert_close(progress.double(), torch.tensor(ref.S, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_reference_options(decoupled, nesterov):
    def make(params, stats):
        return LENA(params, lr=0.05, momentum=0.8, weight_decay=1e-2, nesterov=nesterov, stats=stats,
                    base_iterations=40, alpha=0.5, decoupled_weight_decay=decoupled, eps=1e-3)

    run_against_reference(make, steps=8, n=3, seed=3)


def test_large_n_guarded_smoothing():
    # n > 1000: the authors' 1 - n/1000 would be negative; here the factor is 0 (no averaging)
    def make(params, stats):
        return LENA(params, stats=stats, base_iterations=10_000, momentum=0.0)

    run_against_reference(make, steps=4, n=2048)


def test_module_grouping_matches_reference():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
    params = make_params()
    with torch.no_grad():
        for p, q in zip(params, model.parameters()):
            q.copy_(p)

    def make(_, stats):
        return LENA(model.parameters(), stats=stats, base_iterations=100, alpha=0.2,
                    layer_grouping="module", model=model)

    # reuse the reference driver on the model's own parameters
    params[:] = list(model.parameters())
    stats = FakeStats(params, n=4, seed=5)
    opt = make(params, stats)
    ref = ReferenceLENA(params, hyper_of(opt), layer_of=[0, 0, 1, 1])
    g = torch.Generator().manual_seed(7)
    for _ in range(8):
        set_random_grads(params, g)
        grads = [p.grad.clone() for p in params]
        opt.step()
        s = stats.history[-1]
        expected = ref.step(grads, s.sample_sq_norm_mean, s.mean_grad_sq_norm, 4)
        torch.testing.assert_close(torch.cat(opt.effective_lrs()).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    gain = torch.cat(opt.last_gains)
    assert gain[0] == gain[1] and gain[2] == gain[3]
    for p, w in zip(params, ref.w):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)


def test_module_grouping_from_named_parameters():
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 4))
    stats = FakeStats(list(model.parameters()), n=4)
    opt = LENA(model.named_parameters(), stats=stats, base_iterations=100, layer_grouping="module")
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    gain = opt.by_name("gain")
    assert gain["0.weight"] == gain["0.bias"] and gain["1.weight"] == gain["1.bias"]


def test_one_layer_is_gain_scaled_sgd():
    p = nn.Parameter(torch.randn(6))
    q = nn.Parameter(p.detach().clone())
    stats = FakeStats([p], n=8, gain=3.0)
    opt = LENA([p], lr=0.1, momentum=0.9, weight_decay=1e-3, stats=stats, base_iterations=10, warmup=False)
    sgd = torch.optim.SGD([q], lr=0.3, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        p.grad = torch.randn(6, generator=g)
        q.grad = p.grad.clone()
        opt.step()
        sgd.step()
        torch.testing.assert_close(torch.cat(opt.last_gains), torch.tensor([3.0]))
    torch.testing.assert_close(p, q)


def test_n1_is_plain_sgd():
    params, twins = make_params(), make_params()
    stats = FakeStats(params, n=1)
    opt = LENA(params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True, stats=stats,
               base_iterations=100, warmup=False)
    sgd = torch.optim.SGD(twins, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        set_random_grads(params, g)
        for p, q in zip(params, twins):
            q.grad = p.grad.clone()
        opt.step()
        sgd.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)


def test_n1_with_warmup_is_sgd_with_linear_warmup_and_first_step_not_zero():
    params, twins = make_params(), make_params()
    stats = FakeStats(params, n=1)
    theta = 0.05 * 100
    opt = LENA(params, lr=0.1, momentum=0.9, stats=stats, base_iterations=100, weight_decay=0.0)
    sgd = torch.optim.SGD(twins, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda t: min((t + 1) / theta, 1.0))
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in params]
    for t in range(8):
        set_random_grads(params, g)
        for p, q in zip(params, twins):
            q.grad = p.grad.clone()
        opt.step()
        if t == 0:
            assert all(not torch.equal(p, b) for p, b in zip(params, before))  # S updated before the test
        sgd.step()
        sched.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)
    assert opt.warmup_ends().tolist() == [5] * 4


@pytest.mark.parametrize("n", [4, 7])
def test_constant_gain_n_ends_warmup_at_alpha_of_the_run(n):
    T1, alpha = 400, 0.05
    params = make_params()
    stats = FakeStats(params, n=n, gain=float(n) * 10)  # A/B above n: the gain is bounded to n
    opt = LENA(params, stats=stats, base_iterations=T1, alpha=alpha)
    g = torch.Generator().manual_seed(0)
    run = T1 // n
    for t in range(run):
        set_random_grads(params, g)
        opt.step()
        torch.testing.assert_close(torch.cat(opt.last_gains), torch.full((4,), float(n)))
    expected = math.ceil(alpha * T1 / n)  # theta / n updates = alpha of the run's T1 / n updates
    assert opt.warmup_ends().tolist() == [expected] * 4
    assert abs(expected / run - alpha) <= 1 / run


def test_resume_is_identical_and_world_size_change_keeps_averages():
    def run(stop_at=None, steps=10):
        torch.manual_seed(0)
        params = make_params()
        stats = FakeStats(params, n=4, seed=2)
        opt = LENA(params, stats=stats, base_iterations=200, alpha=0.1)
        g = torch.Generator().manual_seed(9)
        for t in range(steps):
            if t == stop_at:
                saved = {"opt": opt.state_dict(), "params": [p.detach().clone() for p in params],
                         "gen": g.get_state(), "stats": stats.generator.get_state()}
                params = make_params(seed=123)  # fresh objects
                with torch.no_grad():
                    for p, w in zip(params, saved["params"]):
                        p.copy_(w)
                stats = FakeStats(params, n=4, seed=2)
                stats.generator.set_state(saved["stats"])
                opt = LENA(params, stats=stats, base_iterations=200, alpha=0.1)
                opt.load_state_dict(saved["opt"])
            set_random_grads(params, g)
            opt.step()
        return [p.detach() for p in params], opt

    straight, _ = run()
    resumed, opt = run(stop_at=5)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    # introspection is not in the checkpoint
    sd = opt.state_dict()
    assert sd["method"] == "lena"
    assert all("gain" not in s and "effective_lr" not in s for s in sd["state"].values())

    # a different number of workers after resuming: averages carry over, the new n applies
    params = make_params()
    opt2 = LENA(params, stats=FakeStats(params, n=16, gain=100.0), base_iterations=200, alpha=0.1)
    opt2.load_state_dict(sd)
    before = opt2.state[params[0]]["sample_sq_norm_avg"].clone()
    set_random_grads(params, torch.Generator().manual_seed(1))
    opt2.step()
    assert torch.cat(opt2.last_gains).max() <= 16 and torch.cat(opt2.last_gains).max() > 4
    c = 1 - 16 / 1000
    a = opt2.state[params[0]]["sample_sq_norm_avg"]
    assert torch.allclose(a, c * before + (1 - c) * opt2.stats.history[-1].sample_sq_norm_mean[0].float())


def test_tensor_lr_matches_float_lr_and_stats_are_reset():
    a, b = make_params(), make_params()
    sa, sb = FakeStats(a, seed=4), FakeStats(b, seed=4)
    oa = LENA(a, lr=0.1, stats=sa, base_iterations=50)
    ob = LENA(b, lr=torch.tensor(0.1), stats=sb, base_iterations=50)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for _ in range(4):
        set_random_grads(a, g1)
        set_random_grads(b, g2)
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
    assert sa.resets == 4


def test_errors():
    params = make_params()
    stats = FakeStats(params)
    with pytest.raises(ValueError, match="alpha"):
        LENA(params, stats=stats, base_iterations=10, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        LENA(params, stats=stats, base_iterations=10, alpha=1.5)
    with pytest.raises(ValueError, match="statistics source"):
        LENA(params, base_iterations=10)
    with pytest.raises(ValueError, match="base_iterations"):
        LENA(params, stats=stats)
    with pytest.raises(ValueError, match="lr"):
        LENA(params, stats=stats, base_iterations=10, lr=-1.0)
    with pytest.raises(ValueError, match="layer_grouping"):
        LENA(params, stats=stats, base_iterations=10, layer_grouping="block")
    with pytest.raises(ValueError, match="module"):
        LENA(params, stats=stats, base_iterations=10, layer_grouping="module")
    opt = LENA(params, stats=stats, base_iterations=10)
    other = AdaScale(params, stats=stats)
    with pytest.raises(ValueError, match="adascale"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="method tag"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1).state_dict())
    model = nn.Sequential(nn.Linear(2, 2))
    by_module = LENA(model.parameters(), stats=FakeStats(model.parameters()), base_iterations=10,
                     layer_grouping="module", model=model)
    by_parameter = LENA(model.parameters(), stats=FakeStats(model.parameters()), base_iterations=10)
    with pytest.raises(ValueError, match="layer_grouping"):
        by_module.load_state_dict(by_parameter.state_dict())
    stranger = nn.Parameter(torch.zeros(2))
    stranger.grad = torch.ones(2)
    opt.add_param_group({"params": [stranger]})
    with pytest.raises(ValueError, match="not tracked"):
        opt.step()


def test_docstring_example_runs_with_the_engine():
    from largebatch.models.mlp import MLP
    from largebatch.stats import GradientStatistics

    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(16,), num_classes=4)
    images, labels = torch.randn(64, 12), torch.randint(0, 4, (64,))
    stats = GradientStatistics(model)
    total_steps = 4
    opt = LENA(model.parameters(), lr=0.1, stats=stats, base_iterations=total_steps * 4)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1 / total_steps))
    for step in range(total_steps):
        batch = slice(16 * step, 16 * (step + 1))
        opt.zero_grad()
        for x, y in zip(images[batch].split(4), labels[batch].split(4)):
            (nn.functional.cross_entropy(model(x), y) / 4).backward()
        opt.step()
        decay.step()
        gains = torch.cat(opt.last_gains)
        assert torch.all((gains >= 1) & (gains <= 4))
    assert torch.all(opt.warmup_ends() > 0)  # theta = 0.8: every layer ended its warm-up on step 1

"""AdaScale (Johnson et al. 2020, Algorithm 1) against a slow reference, and its clock."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _method_stats import FakeStats, Summary, make_params, set_random_grads
from largebatch.optim.adascale import AdaScale, ProgressLR
from largebatch.optim.lena import LENA

class ReferenceAdaScale:
    def __init__(self, params, lr, momentum, wd, schedule):
        self.w = [p.detach().clone().double() for p in params]
        self.lr, self.momentum, self.wd, self.schedule = lr, momentum, wd, schedule
        self.var = self.sq = self.weight = 0.0
        self.tau = 0.0
        self.buf = [None] * len(params)

    def step(self, grads, A, B, n):
        if n > 1:
            var = sum(n / (n - 1) * (float(a) - float(b)) for a, b in zip(A, B))
            sq = sum(float(b) for b in B) - var / n
            c = max(1 - n / 1000, 0.0)
            self.var = c * self.var + (1 - c) * var
            self.sq = c * self.sq + (1 - c) * sq
            self.weight = c * self.weight + (1 - c)
        r = 1.0
        if self.weight > 0:
            v, s = max(self.var / self.weight, 0.0), max(self.sq / self.weight, 0.0)
            if v / n + s > 0:
                r = min(max((v + s) / (v / n + s), 1.0), float(n))
        eta = r * self.lr * self.schedule(self.tau)
        self.tau += r
        for k, (w, g) in enumerate(zip(self.w, grads)):
            d = g.double() + self.wd * w
            if self.momentum:
                self.buf[k] = d.clone() if self.buf[k] is None else self.momentum * self.buf[k] + d
                d = self.buf[k]
            w.sub_(eta * d)
        return r, eta


def schedule(tau):
    return 1.0 / (1.0 + 0.05 * tau)


@pytest.mark.parametrize("ns", [[4] * 10, [4] * 4 + [8] * 3 + [2] * 3, [2048] * 3])
def test_matches_reference(ns):
    params = make_params()
    stats = FakeStats(params, n=ns[0], seed=3)
    opt = AdaScale(params, lr=0.1, momentum=0.9, weight_decay=1e-3, stats=stats)
    sched = ProgressLR(opt, schedule)
    ref = ReferenceAdaScale(params, 0.1, 0.9, 1e-3, schedule)
    g = torch.Generator().manual_seed(5)
    for n in ns:
        stats.n = n  # the world size may change between steps (resumed on other workers)
        set_random_grads(params, g)
        grads = [p.grad.clone() for p in params]
        opt.step()
        sched.step()
        s = stats.history[-1]
        r, eta = ref.step(grads, s.sample_sq_norm_mean, s.mean_grad_sq_norm, n)
        assert opt.last_gain.item() == pytest.approx(r, rel=1e-5)
        assert opt.effective_lrs()[0][0].item() == pytest.approx(eta, rel=1e-5)
        assert opt.progress.item() == pytest.approx(ref.tau, rel=1e-5)
        assert 1.0 <= r <= n
    for p, w in zip(params, ref.w):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)


class FixedStats:
    """A source with fixed A and B."""

    def __init__(self, params, A, B, n):
        self.params, self.A, self.B, self.n = list(params), torch.tensor(A), torch.tensor(B), n

    def index_of(self, p):
        return next(k for k, q in enumerate(self.params) if q is p)

    def summary(self):
        return Summary(self.n, self.A, self.B, 8 * self.n)

    def reset(self):
        pass


def test_gain_limits():
    p = [nn.Parameter(torch.ones(3))]
    p[0].grad = torch.ones(3)
    same = AdaScale(p, stats=FixedStats(p, [2.0], [2.0], 8))  # identical samples: no noise
    same.step()
    assert same.last_gain.item() == pytest.approx(1.0)
    noise = AdaScale(p, stats=FixedStats(p, [2.0], [0.0], 8))  # zero mean: all noise
    noise.step()
    assert noise.last_gain.item() == pytest.approx(8.0)
    nothing = AdaScale(p, stats=FixedStats(p, [0.0], [0.0], 8))
    nothing.step()
    assert nothing.last_gain.item() == 1.0


def test_one_worker_without_accumulation_is_sgd_and_clock_counts_steps():
    params, twins = make_params(), make_params()
    opt = AdaScale(params, lr=0.1, momentum=0.9, stats=FakeStats(params, n=1))
    sgd = torch.optim.SGD(twins, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    steps = 0
    while not opt.done(5):
        set_random_grads(params, g)
        for p, q in zip(params, twins):
            q.grad = p.grad.clone()
        opt.step()
        sgd.step()
        steps += 1
        assert opt.last_gain.item() == 1.0
    assert steps == 5
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)


def test_constant_gain_finishes_in_T1_over_n_updates():
    params = make_params()
    n, T1 = 8, 64
    opt = AdaScale(params, stats=FakeStats(params, n=n, gain=float(n)))  # A = n B: zero mean gradient
    g = torch.Generator().manual_seed(0)
    steps = 0
    while not opt.done(T1):
        set_random_grads(params, g)
        opt.step()
        steps += 1
    assert steps == math.ceil(T1 / n)


def test_params_without_gradients_keep_the_clock():
    params = make_params()
    opt = AdaScale(params, stats=FakeStats(params, n=4))
    g = torch.Generator().manual_seed(0)
    set_random_grads(params, g)
    params[3].grad = None
    opt.step()
    assert opt.state[params[3]]["progress"] == opt.progress
    set_random_grads(params, g)
    opt.step()
    taus = {float(opt.state[p]["progress"]) for p in params}
    assert len(taus) == 1


def test_resume_is_identical():
    def run(stop_at=None, steps=8):
        params = make_params()
        stats = FakeStats(params, n=4, seed=2)
        opt = AdaScale(params, lr=0.1, momentum=0.9, stats=stats)
        sched = ProgressLR(opt, schedule)
        g = torch.Generator().manual_seed(9)
        for t in range(steps):
            if t == stop_at:
                saved = {"opt": opt.state_dict(), "sched": sched.state_dict(),
                         "w": [p.detach().clone() for p in params]}
                params = make_params(seed=99)
                with torch.no_grad():
                    for p, w in zip(params, saved["w"]):
                        p.copy_(w)
                state = stats.generator.get_state()
                stats = FakeStats(params, n=4, seed=2)
                stats.generator.set_state(state)
                opt = AdaScale(params, lr=0.1, momentum=0.9, stats=stats)
                opt.load_state_dict(saved["opt"])
                sched = ProgressLR(opt, schedule)
                sched.load_state_dict(saved["sched"])
            set_random_grads(params, g)
            opt.step()
            sched.step()
        return [p.detach() for p in params], opt

    a, opt_a = run()
    b, opt_b = run(stop_at=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(opt_a.progress, opt_b.progress)
    assert opt_b.state_dict()["method"] == "adascale"


def test_errors():
    params = make_params()
    with pytest.raises(ValueError, match="statistics source"):
        AdaScale(params)
    with pytest.raises(ValueError, match="momentum"):
        AdaScale(params, stats=FakeStats(params), momentum=-0.1)
    opt = AdaScale(params, stats=FakeStats(params))
    with pytest.raises(ValueError, match="lena"):
        opt.load_state_dict(LENA(params, stats=FakeStats(params), base_iterations=5).state_dict())
    with pytest.raises(ValueError, match="progress clock"):
        ProgressLR(torch.optim.SGD(params, lr=0.1), schedule)

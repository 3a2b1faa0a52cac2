"""The adaptive batch controller (largebatch/schedules/adaptive_batch.py): the estimators, the choice,
its guards and limits, its errors, checkpoints, DDP against accumulation, and a learnable run."""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import largebatch
from largebatch.schedules import AdaptiveBatch, BatchScaledLR
from largebatch.schedules.adaptive_batch import (
    batch_gain,
    choose_batch,
    next_batch,
    two_batch_estimates,
)
from largebatch.stats import GradientStatistics, GradientSummary, estimators


def summary_of(sigma2: float, mu2: float, n: int, b: int, scale: float | torch.Tensor = 1.0) -> GradientSummary:
    """A summary whose unbiased estimates are exactly sigma2 (one b-sample's variance) and mu2 = |G|^2:
    A = sigma2 + mu2 and B = sigma2/n + mu2, their expectations; times a loss scale squared."""
    s2 = scale**2 if isinstance(scale, float) else float(scale) ** 2
    A = torch.tensor([sigma2 + mu2], dtype=torch.float64) * s2
    B = torch.tensor([sigma2 / n + mu2], dtype=torch.float64) * s2
    return GradientSummary(n=n, sample_sq_norm_mean=A, mean_grad_sq_norm=B, num_examples=n * b, loss_scale=scale)


def feed(controller: AdaptiveBatch, sigma2: float, mu2: float) -> int:
    """One update at the controller's batch with the given truth; returns the next batch."""
    n = controller.batch // controller.micro_batch
    return controller.update(summary_of(sigma2, mu2, n, controller.micro_batch))


# -- estimators ----------------------------------------------------------------------------------


@pytest.mark.parametrize("per_example", [False, True])
def test_two_batch_estimates_are_unbiased(per_example):
    """Synthetic per-example gradients g = G + noise with known |G|^2 and tr(Sigma): the mean of many
    updates' estimates is within 4 standard errors of the truth, and those errors are small enough
    (under 3%) to catch a missing n/(n-1) (a 25% bias at n = 4)."""
    gen = torch.Generator().manual_seed(0)
    draws, n, b, d = 20000, 4, 8, 5
    G = torch.tensor([0.5, -0.3, 0.2, 0.1, 0.4], dtype=torch.float64)
    sd = torch.tensor([1.0, 0.5, 2.0, 0.7, 1.2], dtype=torch.float64)
    g = G + sd * torch.randn(draws, n, b, d, generator=gen, dtype=torch.float64)  # per-example gradients
    big = g.mean(dim=(1, 2)).pow(2).sum(-1)  # ||gbar||^2 over the n*b examples
    if per_example:
        small, small_batch = g.pow(2).sum(-1).mean(dim=(1, 2)), 1
    else:
        small, small_batch = g.mean(dim=2).pow(2).sum(-1).mean(dim=1), b  # A: mean of the micro-batch norms
    grad_sq, trace = two_batch_estimates(small, big, small_batch, n * b)
    for estimate, truth in ((grad_sq, G.pow(2).sum()), (trace, sd.pow(2).sum())):
        se = estimate.std() / math.sqrt(draws)
        assert abs(estimate.mean() - truth) < 4 * se
        assert 4 * se < 0.03 * truth


def test_two_batch_estimates_are_the_engine_estimators():
    A, B, n, b = torch.tensor([3.0, 0.5]), torch.tensor([1.2, 0.4]), 6, 32
    grad_sq, trace = two_batch_estimates(A, B, b, n * b)
    torch.testing.assert_close(grad_sq, estimators.true_grad_sq_norm(A, B, n))
    torch.testing.assert_close(trace, b * estimators.sample_variance(A, B, n))
    with pytest.raises(ValueError, match="small_batch < big_batch"):
        two_batch_estimates(1.0, 1.0, 8, 8)


def test_controller_reads_sigma_and_mu_exactly_and_divides_the_loss_scale():
    for scale in (1.0, torch.tensor(1024.0, dtype=torch.float64)):
        ab = AdaptiveBatch(micro_batch=16, max_batch=1024, smoothing=0.9)
        ab.update(summary_of(0.8, 0.02, 2, 16, scale))
        sigma2, mu2 = ab.estimates()
        assert sigma2 == pytest.approx(0.8, rel=1e-12) and mu2 == pytest.approx(0.02, rel=1e-12)
        assert ab.noise_scale == pytest.approx(16 * 0.8 / 0.02, rel=1e-12)  # B_noise = b sigma^2 / mu^2


def test_example_statistics_are_the_per_example_estimators():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    stats = GradientStatistics(model, per_example=True)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    F.cross_entropy(model(x), y).backward()  # one micro-batch of 64: n = 1, the examples are the samples
    s = stats.summary()
    ab = AdaptiveBatch(micro_batch=64, max_batch=256, statistics="example", smoothing=0.0)
    ab.update(s)
    E, B = s.example_sq_norm_mean.sum(), s.mean_grad_sq_norm.sum()
    want = float(estimators.example_variance(E, B, 64) / estimators.example_true_grad_sq_norm(E, B, 64))
    assert ab.noise_scale == pytest.approx(want, rel=1e-6)
    with pytest.raises(RuntimeError, match="per_example=True"):
        AdaptiveBatch(micro_batch=32, max_batch=256, statistics="example").update(summary_of(1.0, 1.0, 2, 32))


def test_a_single_sample_or_an_overflow_adds_nothing():
    ab = AdaptiveBatch(micro_batch=8, max_batch=64, world_size=2)  # min_batch = one micro-batch per worker
    ab.update(summary_of(1.0, 0.1, 1, 16))  # n = 1: nothing to compare
    assert ab.estimates() is None and math.isnan(ab.noise_scale) and ab.batch == 16
    overflow = summary_of(1.0, 0.1, 2, 8)
    overflow.sample_sq_norm_mean[0] = math.inf
    ab.update(overflow)
    assert ab.estimates() is None and ab.updates == 2 and ab.examples == 32


# -- the choice ----------------------------------------------------------------------------------


def test_choice_matches_the_closed_form():
    rng = random.Random(0)
    for _ in range(3000):
        b = rng.choice([16, 32, 128])
        unit = b * rng.choice([1, 2, 4])
        lo = unit * rng.randint(1, 4)
        hi = lo + unit * rng.randint(0, 200)
        e = rng.choice([1.0, 0.5, rng.uniform(0.05, 1.0)])
        sigma2, mu2 = 10 ** rng.uniform(-3, 3), 10 ** rng.uniform(-4, 1)
        got = choose_batch(sigma2, mu2, base_batch=b, unit=unit, min_batch=lo, max_batch=hi, efficiency=e)
        # the efficiency itself, over every candidate
        paying = [k * unit for k in range(lo // unit, hi // unit + 1)
                  if batch_gain(sigma2, mu2, k * unit / b) / (k * unit / b) >= e]
        assert got == (max(paying) if paying else lo)
        # the closed form: batch <= B_noise (1/e - 1) + b/e, B_noise = b sigma^2 / mu^2
        limit = (b * sigma2 / mu2) * (1 / e - 1) + b / e
        if abs(limit / unit - round(limit / unit)) > 1e-9:
            assert got == min(max(math.floor(limit / unit) * unit, lo), hi)
    # e = 0.5 gives about B_noise (+ 2b); noise hiding the gradient gives the most
    critical = choose_batch(1.0, 1 / 64, base_batch=128, unit=128, min_batch=128, max_batch=1 << 20, efficiency=0.5)
    assert 8192 <= critical <= 8192 + 256  # B_noise = 128 * 64
    assert choose_batch(1.0, -0.1, base_batch=128, unit=128, min_batch=128, max_batch=4096, efficiency=0.5) == 4096
    assert batch_gain(1.0, 0.25, 1) == 1.0 and batch_gain(1.0, 0.0, 8) == 8.0


def test_growth_waits_for_a_five_percent_gain():
    kwargs = {"updates_since_change": 10, "cooldown": 10, "allow_shrink": False, "base_batch": 32, "unit": 32,
                  "min_batch": 64, "max_batch": 1 << 16, "efficiency": 0.5}
    # B_noise = 32 / 0.0099 = 3232.3: the paying batch is 3232.3 + 64 -> 3296; from 3200 the gain is 1.5%
    limits = {k: kwargs[k] for k in ("base_batch", "unit", "min_batch", "max_batch", "efficiency")}
    target = choose_batch(1.0, 0.0099, **limits)
    assert target == 3296
    assert next_batch(3200, 1.0, 0.0099, min_gain=0.05, **kwargs) == 3200
    assert next_batch(3200, 1.0, 0.0099, min_gain=0.0, **kwargs) == 3296
    assert next_batch(1024, 1.0, 0.0099, min_gain=0.05, **kwargs) == 3296  # r: 24.6 -> 51.5
    assert next_batch(1024, 1.0, 0.0099, min_gain=0.05, **{**kwargs, "updates_since_change": 9}) == 1024


def test_at_most_one_change_per_cooldown_and_the_limits_hold():
    ab = AdaptiveBatch(micro_batch=32, min_batch=64, max_batch=2048, cooldown=5, smoothing=0.0)
    batches, changes = [], []
    for t in range(60):
        mu2 = 1.0 / (1 + t) ** 1.5  # |G|^2 falls: B_noise grows from 32 to past the maximum
        new = feed(ab, 1.0, mu2)
        if new != (batches[-1] if batches else 64):
            changes.append(t + 1)
        batches.append(new)
    assert all(64 <= x <= 2048 and x % 32 == 0 for x in batches)
    assert batches == sorted(batches) and batches[-1] == 2048
    assert changes[0] >= 5 and all(b - a >= 5 for a, b in itertools.pairwise(changes))
    assert len(changes) >= 3
    assert [r["batch"] for r in ab.history] == [64] + batches[:-1]  # the batch each update used
    assert [r["update"] for r in ab.history] == list(range(1, 61))


@pytest.mark.parametrize("allow_shrink", [False, True])
def test_no_shrinking_unless_asked(allow_shrink):
    ab = AdaptiveBatch(micro_batch=32, max_batch=4096, batch=4096, cooldown=2, smoothing=0.0, allow_shrink=allow_shrink)
    for _ in range(4):
        feed(ab, 1.0, 1.0)  # B_noise = 32: the paying batch is 96
    assert ab.batch == (96 if allow_shrink else 4096)


# -- bad settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"efficiency": 0.0}, r"efficiency must be in \(0, 1\]"),
    ({"efficiency": 1.5}, r"efficiency must be in \(0, 1\]"),
    ({"efficiency": math.nan}, r"efficiency must be in \(0, 1\]"),
    ({"min_batch": 512, "max_batch": 256}, "max_batch 256 is below min_batch 512"),
    ({"max_batch": 1000}, "max_batch 1000 is not a multiple of micro_batch x world_size = 32 x 2 = 64"),
    ({"min_batch": 96}, "min_batch 96 is not a multiple"),
    ({"micro_batch": 0}, "micro_batch must be a positive integer"),
    ({"micro_batch": 32.0}, "micro_batch must be a positive integer"),
    ({"batch": 4096}, r"batch 4096 is outside \[min_batch, max_batch\] = \[64, 1024\]"),
    ({"smoothing": 1.0}, r"smoothing must be in \[0, 1\)"),
    ({"cooldown": 0}, "cooldown must be a positive integer"),
    ({"min_gain": -0.1}, "min_gain must be a finite number >= 0"),
    ({"allow_shrink": 1}, "allow_shrink must be True or False"),
    ({"statistics": "worker"}, "statistics must be one of"),
    ({"world_size": 1, "min_batch": 32}, "statistics='micro_batch' in one process needs two samples"),
])
def test_bad_settings_give_one_line_errors(kwargs, message):
    settings = {"micro_batch": 32, "max_batch": 1024, "world_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message) as error:
        AdaptiveBatch(**settings)
    assert "\n" not in str(error.value)


def test_bad_scheduler_settings_give_one_line_errors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    ab = AdaptiveBatch(micro_batch=32, max_batch=1024)
    for kwargs, message in (({"rule": "cube"}, "rule must be one of 'linear', 'sqrt', 'none'"),
                            ({"base_batch": 0}, "base_batch must be a positive integer")):
        with pytest.raises(ValueError, match=message) as error:
            BatchScaledLR(opt, ab, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(TypeError, match="controller must be an AdaptiveBatch"):
        BatchScaledLR(opt, 1024)


# -- checkpoints ---------------------------------------------------------------------------------


def test_state_dict_round_trips_exactly():
    ab = AdaptiveBatch(micro_batch=32, max_batch=2048, cooldown=3, smoothing=0.8)
    for t in range(12):
        feed(ab, 1.0 + 0.1 * t, 1.0 / (1 + t))
    buffer = io.BytesIO()
    torch.save(ab.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # host numbers only: loads under weights_only
    other = AdaptiveBatch(micro_batch=32, max_batch=2048, cooldown=3, smoothing=0.8)
    other.load_state_dict(saved)
    assert other.state_dict() == ab.state_dict()
    for t in range(12, 20):  # and they go on identically
        assert feed(ab, 1.0 + 0.1 * t, 1.0 / (1 + t)) == feed(other, 1.0 + 0.1 * t, 1.0 / (1 + t))
    assert other.state_dict() == ab.state_dict()
    smaller = AdaptiveBatch(micro_batch=32, max_batch=128)
    with pytest.raises(ValueError, match=r"the saved batch \d+ is outside \[min_batch, max_batch\] = \[64, 128\]"):
        smaller.load_state_dict(ab.state_dict())
    with pytest.raises(ValueError, match="not an AdaptiveBatch state dict: missing"):
        smaller.load_state_dict({"batch": 64})


# -- training loops ------------------------------------------------------------------------------

DIM, CLASSES, EXAMPLES = 20, 4, 1024


def learnable_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(EXAMPLES, DIM, generator=gen)
    y = (x @ torch.randn(DIM, CLASSES, generator=gen)).argmax(1)  # a fixed random linear map
    return x, y


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, CLASSES))


def update_batch(x, y, examples: int, batch: int):
    """The update's examples: the next ``batch`` of the data in order, wrapping round."""
    idx = torch.arange(examples, examples + batch) % len(x)
    return x[idx], y[idx]


class AdaScaleLoop:
    """A user's loop: AdaScale with its gain on the tau clock (ProgressLR), the batch from the controller."""

    def __init__(self):
        self.x, self.y = learnable_data()
        self.model = tiny_model()
        self.stats = GradientStatistics(self.model)
        self.opt = largebatch.AdaScale(self.model.parameters(), lr=0.2, momentum=0.9, stats=self.stats)
        self.sched = largebatch.ProgressLR(self.opt, lambda tau: 0.5 ** (tau / 100))
        self.ab = AdaptiveBatch(micro_batch=8, max_batch=512, cooldown=3, smoothing=0.8)
        self.losses = []

    def run(self, updates: int):
        for _ in range(updates):
            x, y = update_batch(self.x, self.y, self.ab.examples, self.ab.batch)
            self.opt.zero_grad()
            m = self.ab.micro_batches
            total = 0.0
            for xm, ym in zip(x.split(8), y.split(8)):
                loss = F.cross_entropy(self.model(xm), ym) / m
                loss.backward()
                total += loss.item()
            self.losses.append(total)
            self.ab.update(self.stats.summary())
            self.opt.step()
            self.sched.step()

    def state_dict(self):
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "batch": self.ab.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.ab.load_state_dict(state["batch"])


def test_a_resume_in_the_middle_of_growth_is_bit_exact():
    whole = AdaScaleLoop()
    whole.run(40)
    batches = [r["batch"] for r in whole.ab.history]
    assert batches[0] < batches[20] < batches[-1]  # growing before the cut and after it

    first = AdaScaleLoop()
    first.run(20)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = AdaScaleLoop()
    resumed.load_state_dict(torch.load(buffer))
    resumed.run(20)
    assert resumed.ab.state_dict() == whole.ab.state_dict()
    for p, q in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(resumed.opt.progress, whole.opt.progress)


def test_learnable_run_grows_the_batch_and_lowers_the_loss():
    loop = AdaScaleLoop()
    loop.run(40)
    batches = [r["batch"] for r in loop.ab.history]
    assert batches == sorted(batches) and batches[-1] >= 8 * batches[0]
    assert len(set(batches)) >= 3  # grown in steps, not in one jump
    k = len(loop.losses) // 5
    assert sum(loop.losses[-k:]) / k < 0.5 * sum(loop.losses[:k]) / k
    noise = [r["noise_scale"] for r in loop.ab.history]
    assert noise[-1] > noise[0]  # B_noise rises as the loss falls (McCandlish et al. 2018)


def test_batch_scaled_lr_follows_the_batch_from_the_base_rate():
    params = [nn.Parameter(torch.zeros(2))]
    opt = largebatch.LAMB([{"params": params}], lr=0.01)
    ab = AdaptiveBatch(micro_batch=32, max_batch=4096, cooldown=1, smoothing=0.0)
    sched = BatchScaledLR(opt, ab, lambda examples: 0.5 ** (examples / 1024))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * math.sqrt(64 / 32))
    rates = []
    for t in range(6):
        used = ab.batch
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * math.sqrt(used / 32) * 0.5 ** (ab.examples / 1024))
        feed(ab, 1.0, 1.0 / (1 + t) ** 2)
        params[0].grad = torch.ones(2)
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    assert len({r["batch"] for r in ab.history}) >= 3  # the rate followed several batches
    linear = BatchScaledLR(torch.optim.SGD(params, lr=0.1), ab, rule="linear")
    assert linear.get_last_lr() == [pytest.approx(0.1 * ab.batch / 32)]
    state = sched.state_dict()
    assert "controller" not in state and state["lr_lambda"] is None
    again = BatchScaledLR(opt, ab, lambda examples: 0.5 ** (examples / 1024))
    again.load_state_dict(state)
    assert again.last_epoch == sched.last_epoch and again.base_lrs == sched.base_lrs


# -- DDP -----------------------------------------------------------------------------------------

WORLD, MICRO = 2, 4


def _ddp_data(update: int, batch: int):
    gen = torch.Generator().manual_seed(1000 + update)
    x = torch.randn(batch, DIM, generator=gen, dtype=torch.float64)
    w = torch.linspace(-1, 1, DIM * CLASSES, dtype=torch.float64).reshape(DIM, CLASSES)
    return x, (x @ w).argmax(1)


def _decision_controller():
    # every update may change the batch, both ways: the most sensitive setting for equal decisions
    return AdaptiveBatch(micro_batch=MICRO, world_size=WORLD, max_batch=256, cooldown=1, min_gain=0.0,
                         allow_shrink=True, smoothing=0.5)


def _decisions(rank: int | None, world: int, updates: int):
    """Train with the controller's batches; rank None is one process accumulating every worker's micro-batches."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, CLASSES)).double()
    net = model if rank is None else DDP(model)
    stats = GradientStatistics(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ab = _decision_controller()
    for t in range(updates):
        x, y = _ddp_data(t, ab.batch)
        chunks = list(zip(x.split(MICRO), y.split(MICRO)))
        m = ab.micro_batches
        mine = chunks if rank is None else chunks[rank * m:(rank + 1) * m]
        for j, (xm, ym) in enumerate(mine):
            quiet = rank is not None and j < m - 1
            with net.no_sync() if quiet else contextlib.nullcontext():
                (F.cross_entropy(net(xm), ym) / len(mine)).backward()
        ab.update(stats.summary())
        opt.step()
        opt.zero_grad()
        stats.reset()
    return ab.state_dict()


@pytest.mark.distributed
def test_two_ranks_and_one_process_take_the_same_decisions():
    from _dist import run_in_group

    updates = 25
    ranks = run_in_group(_decisions, updates, world_size=WORLD)
    alone = _decisions(None, 1, updates)
    batches = [r["batch"] for r in alone["history"]]
    assert len(set(batches)) >= 3  # the decisions were not all the same one
    assert alone["batch"] == ranks[0]["batch"] == ranks[1]["batch"]
    assert ranks[0] == ranks[1]  # bit for bit: every rank read the same reduced statistics
    for got in ranks:
        assert [r["batch"] for r in got["history"]] == batches
        assert [r["examples"] for r in got["history"]] == [r["examples"] for r in alone["history"]]
        for g, w in zip(got["history"], alone["history"], strict=True):
            assert g["noise_scale"] == pytest.approx(w["noise_scale"], rel=1e-9)

"""CLARS, LENA and AdaScale give the same run with 2 gloo DDP workers and in one process with accumulation.

n = workers x micro-batches is read from the statistics engine in both; the
global batch, its split into n gradient samples and every hyperparameter are
the same, so the weights must agree to floating-point tolerance (float64).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from _dist import WorkerGroup
from largebatch.models.mlp import MLP
from largebatch.optim.adascale import AdaScale, ProgressLR
from largebatch.optim.clars import CLARS
from largebatch.optim.lena import LENA
from largebatch.stats import GradientStatistics

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 6


def _model():
    torch.manual_seed(0)
    return MLP(in_features=6, hidden=(8, 8), num_classes=3).double()


def _data(step: int, samples: int, size: int = 4):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(samples * size, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (samples * size,), generator=g)
    return list(zip(x.split(size), y.split(size)))


def _optimizer(method, model, stats):
    if method == "clars":
        return CLARS(model.parameters(), lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, stats=stats), None
    if method == "lena":
        opt = LENA(model.parameters(), lr=0.2, stats=stats, base_iterations=40, alpha=0.25)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, 0.95)
    opt = AdaScale(model.parameters(), lr=0.2, momentum=0.9, stats=stats)
    return opt, ProgressLR(opt, lambda tau: 0.5 ** (tau // 4))


def _introspect(method, opt):
    if method == "clars":
        return torch.cat(opt.last_trust_ratios).clone()
    if method == "lena":
        return torch.cat(opt.last_gains + [opt.warmup_ends().double()])
    return torch.stack([opt.last_gain, opt.progress])


def _train(rank: int, world: int, method: str, micro: int, sample: str):
    """``world`` workers x ``micro`` micro-batches each; rank r takes its slice of every global batch."""
    model = _model()
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, bucket_cap_mb=0.0005)  # several buckets even for a tiny net
    stats = GradientStatistics(net, per_example=(method == "clars"), sample=sample)
    opt, sched = _optimizer(method, model, stats)
    trace = []
    for step in range(STEPS):
        mine = _data(step, WORLD * 2)  # the same global batch in every configuration
        per_rank = len(mine) // world
        mine = mine[rank * per_rank : (rank + 1) * per_rank]
        k = len(mine) // micro
        chunks = [
            (torch.cat([x for x, _ in mine[i * k : (i + 1) * k]]), torch.cat([y for _, y in mine[i * k : (i + 1) * k]]))
            for i in range(micro)
        ]
        opt.zero_grad()
        for j, (x, y) in enumerate(chunks):
            quiet = world > 1 and j < micro - 1
            with net.no_sync() if quiet else contextlib.nullcontext():
                (nn.functional.cross_entropy(net(x), y) / micro).backward()
        assert stats.summary().n == (world * micro if sample == "micro_batch" else world)
        opt.step()
        if sched is not None:
            sched.step()
        trace.append(_introspect(method, opt))
    return [p.detach().clone() for p in model.parameters()], trace


@pytest.fixture(scope="module")
def group():
    with WorkerGroup(WORLD) as workers:
        yield workers


CONFIGS = [
    # (micro-batches per worker, sample kind in DDP, micro-batches of the one-process run)
    (1, "worker", 2),  # n = 2 workers; one process: 2 micro-batches
    (2, "micro_batch", 4),  # n = 2 workers x 2 micro-batches; one process: 4 micro-batches
]


@pytest.mark.parametrize("method", ["clars", "lena", "adascale"])
@pytest.mark.parametrize("micro, sample, single_micro", CONFIGS)
def test_ddp_equals_one_process_with_accumulation(group, method, micro, sample, single_micro):
    expected_weights, expected_trace = _train(0, 1, method, single_micro, "micro_batch")
    for weights, trace in group.run(_train, method, micro, sample):
        for a, b in zip(weights, expected_weights):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        for a, b in zip(trace, expected_trace):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # the run really adapted: gains above 1 / trust ratios not all equal
    assert not torch.allclose(expected_trace[-1], torch.ones_like(expected_trace[-1]))

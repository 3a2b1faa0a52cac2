"""LENA and AdaScale with example statistics: 2 gloo DDP workers give the run of one process.

The per-example sums and the example count travel in the engine's one
all-reduce, so N, E and B are the global ones whatever the split over workers
and micro-batches: 2 workers with 1 or 2 micro-batches each must give the
weights (float64) of one process with one micro-batch of the whole batch.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from _dist import WorkerGroup
from largebatch.models.mlp import MLP
from largebatch.optim.adascale import AdaScale, ProgressLR
from largebatch.optim.lena import LENA
from largebatch.stats import GradientStatistics

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 5
GLOBAL = 32  # examples per step; base batch 4: n = 8
BASE = 4


def _model():
    torch.manual_seed(0)
    return MLP(in_features=6, hidden=(8, 8), num_classes=3).double()


def _batch(step: int):
    g = torch.Generator().manual_seed(200 + step)
    y = torch.randint(0, 3, (GLOBAL,), generator=g)
    means = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]], dtype=torch.float64)
    return means[y] + torch.randn(GLOBAL, 6, generator=g, dtype=torch.float64), y


def _train(rank: int, world: int, method: str, micro: int):
    model = _model()
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, bucket_cap_mb=0.0005)  # several buckets even for a tiny net
    stats = GradientStatistics(net, per_example=True)
    if method == "lena":
        opt = LENA(model.parameters(), lr=0.2, stats=stats, base_iterations=40, alpha=0.25,
                   statistics="example", base_batch=BASE)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.95)
    else:
        opt = AdaScale(model.parameters(), lr=0.2, momentum=0.9, stats=stats, statistics="example", base_batch=BASE)
        sched = ProgressLR(opt, lambda tau: 0.5 ** (tau // 8))
    trace = []
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        for j, (xm, ym) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            quiet = world > 1 and j < micro - 1
            with net.no_sync() if quiet else contextlib.nullcontext():
                (nn.functional.cross_entropy(net(xm), ym) / micro).backward()
        assert int(stats.summary().num_examples) == GLOBAL
        opt.step()
        sched.step()
        trace.append(torch.cat(opt.last_gains + [opt.warmup_ends().double()]) if method == "lena"
                     else torch.stack([opt.last_gain, opt.progress]))
    return [p.detach().clone() for p in model.parameters()], trace


@pytest.fixture(scope="module")
def group():
    with WorkerGroup(WORLD) as workers:
        yield workers


@pytest.mark.parametrize("method", ["lena", "adascale"])
@pytest.mark.parametrize("micro", [1, 2])
def test_ddp_with_example_statistics_equals_one_process_with_one_micro_batch(group, method, micro):
    expected_weights, expected_trace = _train(0, 1, method, 1)
    for weights, trace in group.run(_train, method, micro):
        for a, b in zip(weights, expected_weights):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        for a, b in zip(trace, expected_trace):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # one micro-batch per step and the gains still measured: above 1
    gains = expected_trace[-1][:-6] if method == "lena" else expected_trace[-1][:1]
    assert bool((gains > 1).any())

"""The hot path never waits for the device: after the first step, backward + step of every
optimiser (and the statistics engine's summary) runs no operator that reads a tensor's value
on the host. Counted at the dispatcher, so the test means the same on CPU as on CUDA, where
each of these operators is a synchronisation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from largebatch.optim import CLARS, LAMB, LARS, LENA, AdaScale
from largebatch.stats import GradientStatistics

# operators whose result depends on a tensor's values on the host
SYNCING = {
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
    "aten::nonzero_static", "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::allclose", "aten::repeat_interleave",
    "aten::_assert_async",
}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def small_tensors():
    """96 small tensors of 4 shapes: the stacked layout on CPU."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 5) for _ in range(48)]
    return torch.nn.Sequential(*layers)


def makers():
    lr = torch.tensor(0.1)  # a tensor lr must not be read either
    return {
        "lars": lambda m: LARS(m.parameters(), lr=lr, weight_decay=1e-4),
        "lamb": lambda m: LAMB(m.parameters(), lr=lr),
        "clars": lambda m: CLARS(m.parameters(), lr=lr, weight_decay=1e-4,
                                 stats=GradientStatistics(m, per_example=True)),
        "lena": lambda m: LENA(m.parameters(), lr=lr, stats=GradientStatistics(m), base_iterations=10),
        "adascale": lambda m: AdaScale(m.parameters(), lr=lr, momentum=0.9, stats=GradientStatistics(m)),
        # gains from per-example norms: n = N/b is a tensor on device (the example count)
        "lena-example": lambda m: LENA(m.parameters(), lr=lr, stats=GradientStatistics(m, per_example=True),
                                       base_iterations=10, statistics="example", base_batch=2),
        "adascale-example": lambda m: AdaScale(m.parameters(), lr=lr, momentum=0.9,
                                               stats=GradientStatistics(m, per_example=True),
                                               statistics="example", base_batch=2),
    }


def step(model, opt, generator, scaler=None):
    opt.zero_grad()
    width = model[0].in_features
    for x in torch.randn(8, width, generator=generator).split(4):  # two micro-batches
        loss = model(x).pow(2).mean() / 2
        (scaler.scale(loss) if scaler is not None else loss).backward()
    opt.step()


@pytest.mark.parametrize("layout", ["tensors", "stacked"])
@pytest.mark.parametrize("name", ["lars", "lamb", "clars", "lena", "adascale", "lena-example", "adascale-example"])
def test_backward_and_step_never_read_a_tensor_on_the_host(name, layout):
    model = net() if layout == "tensors" else small_tensors()
    opt = makers()[name](model)
    g = torch.Generator().manual_seed(1)
    step(model, opt, g)  # the first step may set things up
    with HostReads() as reads:
        for _ in range(2):
            step(model, opt, g)
    assert reads.seen == []


def test_engine_summary_never_reads_a_tensor_on_the_host():
    model = net()
    stats = GradientStatistics(model, per_example=True)
    g = torch.Generator().manual_seed(1)

    def step():
        for x in torch.randn(8, 6, generator=g).split(4):
            model(x).pow(2).mean().backward()
        summary = stats.summary()
        summary.gain_ratio()
        stats.reset()
        model.zero_grad()

    step()  # the first summary checks once that p.grad was not unscaled behind its back
    with HostReads() as reads:
        step()
        step()
    assert reads.seen == []


def test_the_counter_sees_a_host_read():
    with HostReads() as reads:
        torch.ones(3).sum().item()
        bool(torch.ones(()) > 0)
    assert "aten::_local_scalar_dense" in reads.seen

"""The statistics the methods use are the raw gradients', whatever happens to ``p.grad``
between the backward and the step: gradient clipping (which rescales ``p.grad``) leaves
them as they are, and a GradScaler's scale is taken from the scaler, not from ``p.grad``."""

from __future__ import annotations

import pytest
import torch

from largebatch.optim import CLARS, LENA, AdaScale
from largebatch.stats import GradientStatistics


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


MAKERS = {
    "lena": lambda net, scaler: LENA(net.parameters(), lr=0.05, stats=GradientStatistics(net, grad_scaler=scaler),
                                     base_iterations=20, alpha=0.5),
    "adascale": lambda net, scaler: AdaScale(net.parameters(), lr=0.05, momentum=0.9,
                                             stats=GradientStatistics(net, grad_scaler=scaler)),
    "clars": lambda net, scaler: CLARS(net.parameters(), lr=0.5, trust_coefficient=0.02,
                                       stats=GradientStatistics(net, per_example=True, grad_scaler=scaler)),
}

STATE_KEYS = {
    "lena": ("sample_sq_norm_avg", "mean_sq_norm_avg", "progress"),
    "adascale": ("var_avg", "sq_avg", "progress"),
    "clars": (),
}


def run(name, *, clip=None, scaler=None, steps=1):
    net = model()
    opt = MAKERS[name](net, scaler)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(12, 6, generator=g, dtype=torch.float64)
        for xs in x.split(4):  # three micro-batches: n = 3
            loss = (net(xs) ** 2).mean() / 3
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return opt


def introspection(opt):
    if isinstance(opt, CLARS):
        return torch.cat(opt.last_trust_ratios)
    if isinstance(opt, LENA):
        return torch.cat(opt.last_gains)
    return opt.last_gain.reshape(1)


def per_layer_state(opt, name):
    params = [p for g in opt.param_groups for p in g["params"]]
    return {key: torch.stack([opt.state[p][key] for p in params]) for key in STATE_KEYS[name]}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_clipping_leaves_the_statistics_alone(name):
    """clip_grad_norm_ with a small max_norm rescales p.grad by a factor far from 1; the
    gains, trust ratios and per-layer averages are the unclipped run's."""
    plain, clipped = run(name), run(name, clip=1e-3)
    torch.testing.assert_close(introspection(clipped), introspection(plain), rtol=1e-12, atol=0)
    for key, value in per_layer_state(plain, name).items():
        torch.testing.assert_close(per_layer_state(clipped, name)[key], value, rtol=1e-12, atol=0, msg=key)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_grad_scaler_and_clipping(name):
    """A GradScaler given to the engine: its scale is divided out of the statistics, so
    scaled steps equal plain ones, and a scaled, unscaled and clipped step has the
    statistics of the plain one."""
    for clip, steps in ((None, 3), (1e-3, 1)):  # clipped steps change the weights: one step
        plain = run(name, steps=steps)
        scaled = run(name, clip=clip, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12), steps=steps)
        torch.testing.assert_close(introspection(scaled), introspection(plain), rtol=1e-9, atol=0)
        for key, value in per_layer_state(plain, name).items():
            torch.testing.assert_close(per_layer_state(scaled, name)[key], value, rtol=1e-9, atol=0, msg=key)

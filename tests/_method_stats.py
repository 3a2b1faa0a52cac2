"""A small statistics source for the optimiser tests, random but consistent, and
the parameters the CLARS, LENA and AdaScale tests step.

It follows the interface of largebatch.stats.GradientStatistics (params,
index_of, summary, reset) and computes B_k from the real gradients, then
draws A_k (mean of squared sample norms, so B_k <= A_k <= n B_k up to the
ratio bound) and per-example norms (mean >= sqrt(B_k), rms >= mean) from a
seeded generator, one draw per step, so two optimisers fed by two sources
with the same seed see the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SHAPES = [(5, 3), (5,), (4, 5), (4,)]  # two layers, weight and bias each


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def set_random_grads(params, generator):
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


@dataclass
class Summary:
    n: int
    sample_sq_norm_mean: torch.Tensor
    mean_grad_sq_norm: torch.Tensor
    num_examples: int
    example_norm_mean: torch.Tensor | None = None
    example_sq_norm_mean: torch.Tensor | None = None
    grad_scale: float = 1.0  # B_k is computed from p.grad itself
    loss_scale: float = 1.0


class FakeStats:
    def __init__(self, params, n: int = 4, seed: int = 0, per_example: bool = True, gain=None, dtype=torch.float64):
        self.params = list(params)
        self.n = n
        self.per_example = per_example
        self.gain = gain  # fixed A/B ratio (a number or a [K] tensor) instead of a random one
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.steps = 0
        self.resets = 0
        self.history: list[Summary] = []

    def index_of(self, p) -> int:
        for k, q in enumerate(self.params):
            if q is p:
                return k
        raise KeyError("not tracked")

    def summary(self) -> Summary:
        K = len(self.params)
        B = torch.stack([
            torch.zeros((), dtype=self.dtype) if p.grad is None else p.grad.detach().to(self.dtype).pow(2).sum()
            for p in self.params
        ])
        u = torch.rand(K, generator=self.generator, dtype=self.dtype)
        ratio = 1 + u * (self.n - 1) * 1.3 if self.gain is None else torch.as_tensor(self.gain, dtype=self.dtype).expand(K)
        A = B * ratio
        s = Summary(n=self.n, sample_sq_norm_mean=A, mean_grad_sq_norm=B, num_examples=32 * self.n)
        if self.per_example:
            spread = 1 + 2 * torch.rand(K, generator=self.generator, dtype=self.dtype)
            s.example_norm_mean = B.sqrt() * spread
            s.example_sq_norm_mean = s.example_norm_mean.pow(2) * (1 + torch.rand(K, generator=self.generator, dtype=self.dtype))
        self.history.append(s)
        return s

    def reset(self) -> None:
        self.resets += 1

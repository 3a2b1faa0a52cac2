"""``nn.Conv1d/2d/3d``: per group j, dW_ij = G_ij U_ij^T with U = unfold(x) (Li et al. 2021, arXiv 2110.05679, App. F).

Strides, padding modes, dilation, groups and depthwise convolutions; the
bias gradient of example i is the sum of its output gradient over positions.
The weight's norms come from any of three exact strategies
(:mod:`largebatch.stats.strategy` chooses): the Gram form of the unfolded
input (``"ghost"``), the per-example gradients by unfold + bmm (``"bmm"``), or
by the convolution's own weight-gradient kernel with the examples as extra
groups (``"conv-backward"``).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ghost
from .base import Call, Rule

__all__ = ["ConvRule", "ConvFactored", "conv_uses", "unfold_nd"]


class ConvRule(Rule):
    def label(self, name: str) -> str | None:
        return "direct" if name == "bias" else None

    def uses(self, call: Call, x: Tensor, g: Tensor, tracked: dict[str, int]):
        weight, bias = conv_uses(call.module, x, g)
        return {"weight": (weight, None), "bias": (bias, "direct")}


class ConvFactored(_ghost.Factored):
    """A convolution's use: ``right`` (the unfolded input) is built only if needed.

    ``direct()`` runs the convolution's own weight-gradient kernel once with
    the examples as extra groups; ``materialise("bmm")`` unfolds the input
    and multiplies, the faster of the two for few positions and many output
    channels (``strategy.estimate``).
    """

    strategies = ("ghost", "bmm", "conv-backward")
    layer = None

    def __init__(self, module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor, padding: tuple[int, ...]):
        self.module, self.x, self.g, self.padding = module, x, g, padding  # g: (B, C_out, *S')
        self.groups = module.groups
        self.m = g.shape[1] // self.groups
        self.ids = None
        self._right = None

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return math.prod(self.g.shape[2:])

    @property
    def n(self) -> int:
        return math.prod(self.module.weight.shape[1:])

    @property
    def tensor(self) -> Tensor:
        return self.x

    @property
    def unfolded(self) -> int:
        return self.length * self.n

    @property
    def left(self) -> Tensor:
        return self.g.reshape(self.batch * self.groups, self.m, -1).transpose(1, 2)

    @property
    def right(self) -> Tensor:
        if self._right is None:
            module = self.module
            cols = unfold_nd(self.x, module.kernel_size, module.dilation, self.padding, module.stride)
            self._right = cols.reshape(self.batch * self.groups, self.n, -1).transpose(1, 2)
        return self._right

    def select(self, start: int, stop: int) -> "ConvFactored":
        return ConvFactored(self.module, self.x[start:stop], self.g[start:stop], self.padding)

    def signature(self) -> tuple:
        m = self.module
        return ("conv", tuple(self.x.shape[1:]), tuple(m.weight.shape), m.stride, self.padding, m.dilation, m.groups)

    def materialise(self, strategy: str) -> Tensor:
        if strategy == "bmm":
            return torch.bmm(self.left.transpose(1, 2), self.right)
        return self.direct()

    def direct(self) -> Tensor:
        """Per-example gradients by the convolution's weight-gradient kernel, the examples as extra groups."""
        batch, module = self.batch, self.module
        nd = self.x.dim() - 2
        weight_shape = (batch * self.g.shape[1], *module.weight.shape[1:])
        grads = torch.ops.aten.convolution_backward(
            self.g.reshape(1, -1, *self.g.shape[2:]),
            self.x.reshape(1, -1, *self.x.shape[2:]),
            self.g.new_empty(()).expand(weight_shape),  # only its shape is read
            None, module.stride, self.padding, module.dilation, False, (0,) * nd,
            batch * self.groups, (False, True, False),
        )[1]
        return grads.reshape(batch * self.groups, self.m, self.n)


def _conv_padding(module: nn.modules.conv._ConvNd, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Apply non-zero padding modes and string paddings ahead of the unfold."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return x, tuple(module.padding)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    return x, (0,) * (x.dim() - 2)


def unfold_nd(x: Tensor, kernel: tuple, dilation: tuple, padding: tuple, stride: tuple) -> Tensor:
    """im2col for 1-, 2- and 3-d inputs: (B, C, *S) -> (B, C * prod(kernel), L).

    The column order (channel-major, then kernel position) matches
    ``weight.reshape(C_out, -1)``.
    """
    nd = x.dim() - 2
    if nd == 2:
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    if nd == 1:
        return F.unfold(
            x.unsqueeze(2), (1, kernel[0]), dilation=(1, dilation[0]),
            padding=(0, padding[0]), stride=(1, stride[0]),
        )
    # F.unfold is 2-d only: gather one strided slice per kernel offset.
    pad = [p for p in reversed(padding) for _ in range(2)]
    x = F.pad(x, pad)
    sizes = [
        (x.shape[2 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(nd)
    ]
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None), slice(None)]
        for d in range(nd):
            start = offset[d] * dilation[d]
            index.append(slice(start, start + (sizes[d] - 1) * stride[d] + 1, stride[d]))
        slices.append(x[tuple(index)])
    cols = torch.stack(slices, dim=2)  # (B, C, K, *sizes)
    return cols.reshape(x.shape[0], -1, cols[0, 0, 0].numel())


def conv_uses(module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor) -> tuple[ConvFactored, Tensor | None]:
    """Convolution per group j: dW_ij = G_ij U_ij^T with U = unfold(x) (Li et al. 2021, App. F).

    Groups are kept apart (folded into the batch dimension), so grouped and
    depthwise convolutions use only the blocks of the weight they touch.
    """
    dtype = _ghost.compute_dtype(x, g)
    x, padding = _conv_padding(module, x.to(dtype))
    g = g.to(dtype)
    bias = g.flatten(2).sum(2) if module.bias is not None else None
    return ConvFactored(module, x, g, padding), bias

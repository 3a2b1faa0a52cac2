"""``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``: per-example gradients of the affine parameters.

Each example is normalised on its own, so the affine parameters' per-example
gradients are exact and small: dgamma_i = sum_s g_is * xhat_is and
dbeta_i = sum_s g_is, formed directly from the normalised input.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ghost
from .base import Call, Rule

__all__ = ["NormRule", "norm_affine_uses"]


class NormRule(Rule):
    def label(self, name: str) -> str | None:
        return "norm-affine"

    def capture(self, module: nn.Module, x: Tensor, output: Tensor, transposed: bool):
        moments = _layer_norm_moments(output, x) if isinstance(module, nn.LayerNorm) else None
        if moments is not None and transposed:  # (L, B, ...): the examples first, as the input
            moments = tuple(t.transpose(0, 1) for t in moments)
        return moments

    def uses(self, call: Call, x: Tensor, g: Tensor, tracked: dict[str, int]):
        weight, bias = norm_affine_uses(call.module, x, g, call.context)
        return {"weight": (weight, "norm-affine"), "bias": (bias, "norm-affine")}


def _layer_norm_moments(output: Tensor, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """The (mean, rstd) autograd saved for a LayerNorm's backward, or None.

    Normalising with them costs a fifth of recomputing the layer norm on this
    CPU; any other graph (another backend's kernel, a wrapped output) returns
    None and the norm is recomputed.
    """
    node = output.grad_fn
    if type(node).__name__ != "NativeLayerNormBackward0":
        return None
    try:
        mean, rstd = node._saved_result1, node._saved_result2
    except AttributeError:
        return None
    if mean is None or rstd is None or mean.dim() != x.dim() or mean.shape != rstd.shape:
        return None
    return mean, rstd


def norm_affine_uses(
    module: nn.Module, x: Tensor, g: Tensor, moments: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """LayerNorm, RMSNorm, GroupNorm: per-example gradients formed from the normalised input.

    ``moments``: a LayerNorm's (mean, rstd) from its forward, broadcastable to
    ``x``; without them the normalisation is recomputed.
    """
    weight = getattr(module, "weight", None) is not None
    bias = getattr(module, "bias", None) is not None
    batch = x.shape[0]
    dtype = _ghost.compute_dtype(x, g)
    x, g = x.to(dtype), g.to(dtype)
    if isinstance(module, nn.GroupNorm):
        xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
        reduce = list(range(2, x.dim()))
        gx = g * xhat
        return (
            (gx.sum(reduce) if reduce else gx) if weight else None,
            (g.sum(reduce) if reduce else g) if bias else None,
        )
    shape = tuple(module.normalized_shape)
    if isinstance(module, nn.LayerNorm):
        if moments is not None:
            mean, rstd = moments
            xhat = (x - mean.to(dtype)) * rstd.to(dtype)
        else:
            xhat = F.layer_norm(x, shape, None, None, module.eps)
    else:
        xhat = F.rms_norm(x, shape, None, module.eps)
    flat = (batch, -1, *shape)
    return (
        (g * xhat).reshape(flat).sum(1) if weight else None,
        g.reshape(flat).sum(1) if bias else None,
    )

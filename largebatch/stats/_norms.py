"""Squared 2-norms of gradient tensors, written where the engine keeps them.

Measured on a 2-core CPU, each small op the engine adds after a backward
costs 10-20 us, several times its price in a tight loop (2-5 us). These
helpers therefore spend as few ops as they can: one BLAS dot per tensor,
written straight into a 0-d view ("slot") of the vector that holds it, for
short lists; one ``_foreach_norm`` for long ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sq_norm_into", "sq_norms"]

_LOOP_MAX = 32  # up to this many tensors, a dot each beats _foreach_norm + stack + square


def sq_norm_into(t: Tensor, out: Tensor) -> None:
    """``out`` (a 0-d tensor) = ||t||^2: one BLAS dot for a dense tensor of out's dtype.

    ``t`` is detached: under ``backward(create_graph=True)`` gradients require
    grad, and the statistics are not part of any graph (``out=`` refuses them).
    """
    t = _dense_values(t.detach())
    if t.dtype == out.dtype and t.is_contiguous():
        flat = t.view(-1)
        torch.dot(flat, flat, out=out)
    else:  # half precision (accumulated in out's dtype) or a strided view
        torch.linalg.vector_norm(t, dtype=out.dtype, out=out)
        out.square_()


def _dense_values(t: Tensor) -> Tensor:
    """A strided tensor with the same 2-norm as ``t``.

    A sparse COO gradient (``nn.Embedding(sparse=True)``) may repeat an index,
    its entries then adding up, so it is coalesced before its values are
    read; vector_norm refuses sparse tensors. A compressed-sparse tensor
    never repeats an index.
    """
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce()._values()
    if t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        return t.values()
    raise TypeError(f"squared norms of {t.layout} gradients are not supported")


def sq_norms(tensors: list[Tensor | None], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A new vector of the squared 2-norms of ``tensors``; None gives 0."""
    out = torch.zeros(len(tensors), dtype=dtype, device=device)
    present = [i for i, t in enumerate(tensors) if t is not None]
    if len(tensors) <= _LOOP_MAX:
        for i in present:
            sq_norm_into(tensors[i], out[i])
    elif present:
        norms = torch._foreach_norm([_dense_values(tensors[i].detach()) for i in present], 2, dtype=dtype)
        out[present] = torch.stack(norms).square()
    return out

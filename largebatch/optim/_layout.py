"""How one parameter group's tensors are laid out for a step, chosen once per group.

Every optimiser here steps a group through one layout object, and the
functional cores use it through the same few calls, whatever the layout:

* ``norms(lists)``: the per-layer L2 norms of several tensor lists, one 1-D
  tensor per list (in the layout's order);
* ``per_layer(vector)``: a per-layer vector as per-entry scales that broadcast
  against the lists' entries (the foreach ops' per-tensor scales);
* ``layer_vector(tensors)``: per-layer values held per entry, as one vector;
* ``enter(params, grads)`` / ``leave(params)``: the lists a step works on, and
  writing the stepped weights back where they are copies;
* ``to_param_order(vector)``: a vector in the layout's order, in parameter order.

The layouts:

* :class:`TensorLayout`: the tensors themselves (the multi-tensor ``foreach``
  path). The default, and the only one on CUDA, where a foreach op is one
  fused multi-tensor kernel.
* :class:`ShardedLayout`: FSDP2 (``fully_shard``) DTensor parameters; the
  lists are the local shards, the norms those of whole layers from one
  all-reduce per call (``_sharded.layer_sq_norms``).
* :class:`~._stacked.StackedLayout`: many small CPU tensors of few shapes,
  stepped as one stack per shape (measured on CPU only; see ``_stacked.py``).

:class:`Layouts`, kept on the optimiser (never in its state), chooses and
caches the layout of each parameter list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._sharded import check_not_flat, is_sharded, layer_sq_norms, local
from ._stacked import StackedLayout

__all__ = ["Layouts", "ShardedLayout", "TensorLayout", "layer_norms"]


class TensorLayout:
    """The parameters' own tensors: foreach ops over the list, 0-d per-layer scales."""

    kind = "tensors"

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.length = len(params)
        self._views: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def norms(self, lists: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Per list, the 1-D tensor of its tensors' L2 norms (one ``_foreach_norm`` each, or
        BLAS dots where they pay: :func:`layer_norms`).

        One call per list measured faster on CPU than one on the joined lists, and far
        faster than norms of a flat copy (``torch.cat`` + segment sums: a full extra pass)."""
        return [layer_norms(list(tensors)) for tensors in lists]

    def per_layer(self, vector: Tensor, slot: int | None = None) -> list[Tensor]:
        """One 0-d tensor per layer. With ``slot``, views of a vector kept here and refreshed
        with one ``copy_``: unbinding a new vector costs about a microsecond per tensor on CPU
        (2 ms on 2,000 tensors), the copy one kernel. A slot's views are valid until the
        slot is used again."""
        if slot is None:
            return list(vector.unbind())
        entry = self._views.get(slot)
        if entry is None or entry[0].shape != vector.shape or entry[0].dtype != vector.dtype or entry[0].device != vector.device:
            kept = torch.empty_like(vector)
            entry = self._views[slot] = (kept, list(kept.unbind()))
        entry[0].copy_(vector)
        return entry[1]

    def layer_vector(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(tensors))

    def enter(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return list(params), list(grads)

    def leave(self, params: Sequence[Tensor]) -> None:
        """Nothing to write back: the step worked on the parameters themselves."""

    def to_param_order(self, vector: Tensor | None) -> Tensor | None:
        return vector

    def to_stack_order(self, vector: Tensor) -> Tensor:
        return vector


# Measured on CPU only (2 threads): on the ResNet-50 list (161 tensors, 25.6M parameters)
# ``_foreach_norm`` took 7.9 ms where one BLAS dot per tensor took 2.7 ms; on 2,000
# tensors of 2K elements the dots lost (7.0 ms against 3.2 ms). On CUDA ``_foreach_norm``
# is one fused multi-tensor kernel, so it is kept there.
DOT_NORMS_MIN_MEAN_NUMEL = 1 << 16


def layer_norms(tensors: list[Tensor]) -> Tensor:
    """The L2 norm of each tensor, as one 1-D tensor (no host sync)."""
    first = tensors[0]
    if (
        first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.float64)
        and sum(t.numel() for t in tensors) >= DOT_NORMS_MIN_MEAN_NUMEL * len(tensors)
        and all(t.dtype == first.dtype and t.layout == torch.strided and t.is_contiguous() for t in tensors)
    ):
        out = torch.empty(len(tensors), dtype=first.dtype)
        for t, slot in zip(tensors, out.unbind()):
            flat = t.detach().view(-1)
            torch.dot(flat, flat, out=slot)
        return out.sqrt_()
    return torch.stack(torch._foreach_norm(tensors))


class ShardedLayout(TensorLayout):
    """FSDP2 DTensor parameters: the step works on the local shards; ``norms`` are those of
    whole layers, all the lists of one call together in ONE all-reduce."""

    kind = "sharded"

    def __init__(self, params: Sequence[Tensor]) -> None:
        super().__init__(params)
        self.like = list(params)

    def norms(self, lists: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        from torch.distributed.tensor import DTensor

        wrapped = []
        for tensors in lists:
            for t, p in zip(tensors, self.like):
                if is_sharded(p) and not is_sharded(t):
                    t = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
                wrapped.append(t)
        norms = layer_sq_norms(wrapped).sqrt().to(local(self.like[0]).dtype)
        return list(norms.split(len(self.like)))

    def enter(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return [local(p) for p in params], [local(g) for g in grads]


def any_sharded(tensors: Sequence[Tensor]) -> bool:
    return any(map(is_sharded, tensors))


class Layouts:
    """The layout of each parameter list an optimiser steps, chosen once and cached
    (by the identity of the list's tensors; a few lists kept, as lists change when
    parameters have no gradient). On the optimiser object, never in its state."""

    def __init__(self) -> None:
        self.chosen: dict[tuple[int, ...], TensorLayout | StackedLayout] = {}

    def of(self, params: Sequence[Tensor], *, foreach: bool = True) -> TensorLayout | StackedLayout:
        """Sharded for DTensor parameters; stacked for many small CPU tensors of few shapes on
        the foreach path; else the tensors themselves."""
        key = tuple(map(id, params))
        layout = self.chosen.get(key)
        if layout is None:
            if len(self.chosen) > 16:
                self.chosen.clear()
            check_not_flat(params)  # FSDP1 / ZeRO flat layouts: per-layer norms impossible
            if any_sharded(params):
                layout = ShardedLayout(params)
            elif foreach and StackedLayout.suits(params):
                layout = StackedLayout(params)
            else:
                layout = TensorLayout(params)
            self.chosen[key] = layout
        return layout

    def stacked(self) -> bool:
        """Whether any list was stepped as stacks (introspection for tests)."""
        return any(isinstance(layout, StackedLayout) for layout in self.chosen.values())

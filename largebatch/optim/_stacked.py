"""Many small tensors of few shapes, stepped as a few stacked tensors.

On CPU a ``torch._foreach_*`` op is a C++ loop over the tensors, with a fixed
cost of a few microseconds each; on a list of 2,000 tensors of 1-4K elements
(a deep transformer's shape) that overhead, not memory traffic, sets the step
time, and every extra per-tensor pass a layer-wise method makes (two norms,
per-layer scales) costs as much as SGD's whole update. The stacked layout
removes the count instead of the cost: tensors of one shape are stepped as one
``[k, *shape]`` stack, so a pass over 2,000 tensors of 49 shapes is 49 ops.

* the weights and gradients are copied in, one ``torch.stack(out=)`` per shape
  into memory kept across steps, and the new weights copied back with one
  ``_foreach_copy_``: three per-tensor passes in all, fewer than the
  per-tensor path's four to six;
* the optimiser's own state lives stacked: the entries of ``optimizer.state``
  are views (rows) of the stacks, so ``state_dict()`` and in-place edits work
  as usual; state that is not those views (after ``load_state_dict``, or any
  replacement) is re-stacked at the next step, found by identity;
* per-layer norms are row norms of the stacks, per-layer scales a broadcast
  ``[k, 1, ...]`` view of each shape's slice of the scale vector.

The functional cores do not know the difference: a :class:`StackedLayout` is
one of the layouts of :mod:`._layout`; the cores get the stacks as their
"tensor lists" and call its ``norms``, ``per_layer`` and ``layer_vector``;
vectors they return are in stack order and go back to parameter order with
:meth:`StackedLayout.to_param_order`. Results equal the per-tensor path up to
the summation order of the norms.

CPU only. On CUDA a ``_foreach_*`` op is already one fused multi-tensor kernel
launch for the whole list, so the per-tensor overhead this layout removes is
not there, and its copies in and out would be pure extra memory traffic; it
was measured on CPU and is used on CPU (:meth:`StackedLayout.suits`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._sharded import is_sharded

__all__ = ["StackedLayout"]

# When to stack (CPU only; measured on CPU, one thread: benchmarks/optimizer_step.py list
# (b), 2,000 tensors of 49 shapes and 1-4K elements, steps LARS 4.6x and LAMB
# 7.2x faster than per tensor). Small tensors only: on 256 tensors of 8 shapes
# the stacked step was 0.4-0.9x the per-tensor one up to a mean of 64K
# elements and 1.5-1.7x at 128K, where the copies in and out are memory
# traffic that the saved per-tensor overhead no longer repays.
# Memory: the weight and gradient stacks are two parameter-sized copies of the
# stacked lists, kept across steps (the update scratch exists on both paths).
MIN_TENSORS = 64
MAX_MEAN_NUMEL = 1 << 16
MIN_TENSORS_PER_SHAPE = 8


class StackedLayout:
    """Which parameter goes to which row of which stack, for one list of tensors; the
    stacks a step fills (kept across steps) and the state that lives in stacks."""

    kind = "stacked"

    def __init__(self, params: Sequence[Tensor]) -> None:
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        self.shapes = list(by_shape)
        self.indices = list(by_shape.values())
        self.sizes = [len(ix) for ix in self.indices]
        self.length = len(params)
        device = params[0].device
        stack_order = torch.tensor([i for ix in self.indices for i in ix])
        # both directions as one gather: to_stack_order and to_param_order
        self._to_stack = stack_order.to(device)
        self._to_param = torch.empty(self.length, dtype=torch.long)
        self._to_param[stack_order] = torch.arange(self.length)
        self._to_param = self._to_param.to(device)
        self._broadcast = [(-1,) + (1,) * len(shape) for shape in self.shapes]
        self._scratch: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        self._state: dict[str, tuple[list[Tensor], list[Tensor]]] = {}

    @staticmethod
    def suits(params: Sequence[Tensor]) -> bool:
        """Whether stacking pays: many small dense CPU tensors of one dtype, several per shape.

        Only on CPU, where it was measured: there a foreach op loops over the tensors;
        on CUDA it is one fused kernel and the stacks' copies would only add traffic."""
        if len(params) < MIN_TENSORS:
            return False
        first = params[0]
        if is_sharded(first) or first.layout != torch.strided or first.dim() == 0 or first.device.type != "cpu":
            return False
        shapes = set()
        total = 0
        for p in params:
            if p.device != first.device or p.dtype != first.dtype or is_sharded(p) or p.layout != torch.strided:
                return False
            shapes.add(p.shape)
            total += p.numel()
        return total < MAX_MEAN_NUMEL * len(params) and len(params) >= MIN_TENSORS_PER_SHAPE * len(shapes)

    def empty_stacks(self, like: Tensor) -> list[Tensor]:
        return [torch.empty((k, *shape), dtype=like.dtype, device=like.device)
                for k, shape in zip(self.sizes, self.shapes)]

    def stack(self, tensors: Sequence[Tensor], out: list[Tensor] | None = None) -> list[Tensor]:
        """One stack per shape, rows in parameter order (into ``out`` when given)."""
        if out is None:
            return [torch.stack([tensors[i] for i in ix]) for ix in self.indices]
        for o, ix in zip(out, self.indices):
            torch.stack([tensors[i] for i in ix], out=o)
        return out

    def rows(self, stacks: Sequence[Tensor]) -> list[Tensor]:
        """The rows of the stacks as one list in parameter order (views)."""
        out: list[Tensor] = [None] * self.length  # type: ignore[list-item]
        for stack, ix in zip(stacks, self.indices):
            for i, row in zip(ix, stack.unbind()):
                out[i] = row
        return out

    def layer_vector(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-layer values held as one 1-D tensor per stack (the LAMB step counters), joined."""
        return torch.cat(list(tensors))

    def norms(self, lists: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Per list of stacks, the L2 norm of every row, in stack order (the cores' ``norms``)."""
        return [
            torch.cat([torch.linalg.vector_norm(s.reshape(s.shape[0], -1), dim=1) for s in stacks])
            for stacks in lists
        ]

    def per_layer(self, vector: Tensor, slot: int | None = None) -> list[Tensor]:
        """A per-layer vector (stack order) as one broadcastable ``[k, 1, ...]`` view per stack
        (a handful of views: nothing to keep across steps, so ``slot`` is not used)."""
        return [part.view(shape) for part, shape in zip(vector.split(self.sizes), self._broadcast)]

    def to_param_order(self, vector: Tensor | None) -> Tensor | None:
        """A per-layer vector in stack order, put in parameter order."""
        return None if vector is None else vector[self._to_param.to(vector.device)]

    def to_stack_order(self, vector: Tensor) -> Tensor:
        """A per-layer vector in parameter order, put in stack order."""
        return vector[self._to_stack.to(vector.device)]

    # -- a step on the stacks -------------------------------------------------------------

    def scratch(self, like: Tensor, name: str) -> tuple[list[Tensor], list[Tensor]]:
        """Stacks reused from step to step (``name`` tells several apart), and their rows."""
        kept = self._scratch.get(name)
        if kept is None:
            stacks = self.empty_stacks(like)
            kept = self._scratch[name] = (stacks, self.rows(stacks))
        return kept

    def enter(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Copy the weights and gradients into their stacks (one ``stack(out=)`` per shape)."""
        weights = self.stack(params, self.scratch(params[0], "weights")[0])
        return weights, self.stack(grads, self.scratch(params[0], "grads")[0])

    def leave(self, params: Sequence[Tensor]) -> None:
        """Copy the stepped weights back into the parameters (one ``_foreach_copy_``)."""
        torch._foreach_copy_(list(params), self.scratch(params[0], "weights")[1])

    def workspace(self, params: Sequence[Tensor]) -> list[Tensor]:
        """Scratch stacks for d = g + wd * w or an update."""
        return self.scratch(params[0], "updates")[0]

    def state(self, optimizer_state, params: Sequence[Tensor], name: str) -> list[Tensor] | None | bool:
        """The stacks whose rows are ``optimizer_state[p][name]`` for ``params``.

        ``None`` when no parameter has the entry yet (the step creates the stacks: hand them
        to :meth:`adopt`); ``False`` when some have it and some do not (that step takes the
        per-tensor layout). Entries that are not the rows of the stacks kept here (a loaded
        state dict, a replaced tensor) are stacked anew and replaced by the new rows.
        """
        entries = [optimizer_state[p].get(name) for p in params]
        kept = self._state.get(name)
        if kept is not None and all(a is b for a, b in zip(entries, kept[1])):
            return kept[0]
        missing = sum(e is None for e in entries)
        if missing == len(entries):
            return None
        if missing:
            return False
        stacks = self.stack(entries)  # type: ignore[arg-type]
        self.adopt(optimizer_state, params, name, stacks)
        return stacks

    def adopt(self, optimizer_state, params: Sequence[Tensor], name: str, stacks: list[Tensor]) -> None:
        """Keep ``stacks`` as state ``name``; their rows become ``optimizer_state[p][name]``."""
        rows = self.rows(stacks)
        for p, row in zip(params, rows):
            optimizer_state[p][name] = row
        self._state[name] = (stacks, rows)

"""How one parameter group's tensors are laid out for a step, chosen once per group.

Every optimiser here steps a group through one :class:`Layout`, and the
step and the functional cores use it through the same calls, whatever the
layout (the step never asks which one it has):

* ``enter(params, grads)`` / ``leave(params)``: the lists a step works on,
  and writing the stepped weights back where they are copies;
* ``state(states, name)`` / ``adopt(...)``: an entry of the parameters' state
  dicts as the step's lists (``None`` where a parameter has none yet), and
  keeping the new ones;
* ``scratch(params, workspace)``: scratch shaped like the lists, or ``None``;
* ``norms(lists)``: the per-layer L2 norms of several lists, one 1-D tensor
  per list (in the layout's order);
* ``per_layer(vector, slot)``: a per-layer vector as per-entry scales that
  broadcast against the lists' entries (the foreach ops' per-tensor scales);
* ``layer_vector(tensors)``: per-layer values held per entry, as one vector;
* ``to_param_order`` / ``to_layout_order``: a per-layer vector between the
  parameters' order and the layout's.

The layouts:

* :class:`TensorLayout`: the tensors themselves (the multi-tensor ``foreach``
  path). The default, and the only one on CUDA, where a foreach op is one
  fused multi-tensor kernel.
* :class:`ShardedLayout`: FSDP2 (``fully_shard``) DTensor parameters; the
  lists are the local shards, the norms those of whole layers from one
  all-reduce per call (``_sharded.layer_sq_norms``).
* :class:`StackedLayout`: many small CPU tensors of few shapes, stepped as one
  stack per shape.

:class:`Layouts`, kept on the optimiser (never in its state), chooses and
caches the layout of each parameter list.

Why stacks. On CPU a ``torch._foreach_*`` op is a C++ loop over the tensors,
with a fixed cost of a few microseconds each; on a list of 2,000 tensors of
1-4K elements (a deep transformer's shape) that overhead, not memory traffic,
sets the step time, and every extra per-tensor pass a layer-wise method makes
costs as much as SGD's whole update. Tensors of one shape are stepped as one
``[k, *shape]`` stack: the weights and gradients are copied in (one
``torch.stack(out=)`` per shape into memory kept across steps) and the new
weights copied back (one ``_foreach_copy_``), three per-tensor passes in all;
the state lives stacked, its entries in ``optimizer.state`` being rows of the
stacks, so ``state_dict()`` and in-place edits work as usual, and entries that
are not those rows (after ``load_state_dict``) are stacked anew. Results equal
the per-tensor path up to the summation order of the norms. CPU only: on CUDA
the per-tensor overhead is not there and the copies would be pure traffic.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from ._foreach import Workspace
from ._sharded import any_sharded, as_sharded_like, check_not_flat, is_sharded, layer_sq_norms, local

__all__ = ["Layout", "Layouts", "ShardedLayout", "StackedLayout", "TensorLayout", "layer_norms"]


class Layout(Protocol):
    """What a step and the functional cores ask of a group's layout (see the module docstring)."""

    kind: str
    #: the lists are the parameters' own, whole tensors (so the per-tensor and compiled forms apply)
    own_tensors: bool

    def enter(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]: ...

    def leave(self, params: Sequence[Tensor]) -> None: ...

    def fits(self, states: Sequence[dict], names: Sequence[str]) -> bool: ...

    def state(self, states: Sequence[dict], name: str) -> list[Tensor | None]: ...

    def adopt(self, states: Sequence[dict], params: Sequence[Tensor], name: str, tensors: list[Tensor]) -> None: ...

    def scratch(self, params: Sequence[Tensor], workspace: Workspace) -> list[Tensor] | None: ...

    def norms(self, lists: Sequence[Sequence[Tensor]]) -> list[Tensor]: ...

    def per_layer(self, vector: Tensor, slot: int | None = None) -> list[Tensor]: ...

    def layer_vector(self, tensors: Sequence[Tensor]) -> Tensor: ...

    def to_param_order(self, vector: Tensor | None) -> Tensor | None: ...

    def to_layout_order(self, vector: Tensor) -> Tensor: ...


class TensorLayout:
    """The parameters' own tensors: foreach ops over the list, 0-d per-layer scales."""

    kind = "tensors"
    own_tensors = True

    def __init__(self, params: Sequence[Tensor], *, keep_views: bool = True) -> None:
        self.length = len(params)
        self.keep_views = keep_views
        self._views: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def enter(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return list(params), list(grads)

    def leave(self, params: Sequence[Tensor]) -> None:
        """Nothing to write back: the step worked on the parameters themselves."""

    def fits(self, states: Sequence[dict], names: Sequence[str]) -> bool:
        return True

    def state(self, states: Sequence[dict], name: str) -> list[Tensor | None]:
        return list(map(operator.methodcaller("get", name), states))

    def adopt(self, states: Sequence[dict], params: Sequence[Tensor], name: str, tensors: list[Tensor]) -> None:
        for state, t in zip(states, tensors):
            state[name] = t

    def scratch(self, params: Sequence[Tensor], workspace: Workspace) -> list[Tensor] | None:
        return workspace.like(params)

    def norms(self, lists: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Per list, the 1-D tensor of its tensors' L2 norms (:func:`layer_norms`).

        One call per list measured faster on CPU than one on the joined lists, and far
        faster than norms of a flat copy (``torch.cat`` + segment sums: a full extra pass)."""
        return [layer_norms(list(tensors)) for tensors in lists]

    def per_layer(self, vector: Tensor, slot: int | None = None) -> list[Tensor]:
        """One 0-d tensor per layer. With ``slot``, views of a vector kept here and refreshed
        with one ``copy_``, since unbinding a new vector costs a Python object per tensor
        every step. A slot's views are valid until the slot is used again. ``keep_views=False``
        (a layout inside a compiled graph) always unbinds."""
        if slot is None or not self.keep_views:
            return list(vector.unbind())
        entry = self._views.get(slot)
        if entry is None or entry[0].shape != vector.shape or entry[0].dtype != vector.dtype or entry[0].device != vector.device:
            kept = torch.empty_like(vector)
            entry = self._views[slot] = (kept, list(kept.unbind()))
        entry[0].copy_(vector)
        return entry[1]

    def layer_vector(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(tensors))

    def to_param_order(self, vector: Tensor | None) -> Tensor | None:
        return vector

    def to_layout_order(self, vector: Tensor) -> Tensor:
        return vector


#: the layout of the functional cores when no optimiser keeps one (and inside compiled graphs)
UNBOUND = TensorLayout((), keep_views=False)

# Norms of large contiguous CPU tensors are BLAS dots, one per tensor: there they beat
# ``_foreach_norm`` (ResNet-50's list), while on many small tensors the single foreach call
# wins (benchmarks/README.md). On CUDA ``_foreach_norm`` is one fused kernel and is kept.
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
    own_tensors = False

    def __init__(self, params: Sequence[Tensor]) -> None:
        super().__init__(params)
        self.like = list(params)

    def enter(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return [local(p) for p in params], [local(g) for g in grads]

    def state(self, states: Sequence[dict], name: str) -> list[Tensor | None]:
        return [local(state.get(name)) for state in states]

    def adopt(self, states: Sequence[dict], params: Sequence[Tensor], name: str, tensors: list[Tensor]) -> None:
        """New state from local shards: kept as DTensors laid out like their parameters."""
        for state, p, t in zip(states, params, tensors):
            state[name] = as_sharded_like(t, p)

    def scratch(self, params: Sequence[Tensor], workspace: Workspace) -> list[Tensor] | None:
        kept = workspace.like(params)
        return None if kept is None else [local(w) for w in kept]

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


# When to stack (measured on CPU: benchmarks/README.md). Small tensors only: from a mean of
# about 128K elements the copies in and out cost more than the per-tensor overhead they save.
# Memory: the weight and gradient stacks are two parameter-sized copies of the stacked lists,
# kept across steps.
MIN_TENSORS = 64
MAX_MEAN_NUMEL = 1 << 16
MIN_TENSORS_PER_SHAPE = 8


class StackedLayout:
    """Which parameter goes to which row of which stack, for one list of tensors; the
    stacks a step fills (kept across steps) and the state that lives in stacks."""

    kind = "stacked"
    own_tensors = False

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
        # both directions as one gather: to_layout_order and to_param_order
        self._to_stack = stack_order.to(device)
        self._to_param = torch.empty(self.length, dtype=torch.long)
        self._to_param[stack_order] = torch.arange(self.length)
        self._to_param = self._to_param.to(device)
        self._broadcast = [(-1,) + (1,) * len(shape) for shape in self.shapes]
        self._scratch: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        self._state: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        # the step's list of state dicts last found to hold the kept rows, and for which entries
        self._checked: tuple[Sequence[dict] | None, set[str]] = (None, set())

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

    def _empty_stacks(self, like: Tensor) -> list[Tensor]:
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

    def _kept(self, like: Tensor, name: str) -> tuple[list[Tensor], list[Tensor]]:
        """Stacks reused from step to step (``name`` tells several apart), and their rows."""
        kept = self._scratch.get(name)
        if kept is None:
            stacks = self._empty_stacks(like)
            kept = self._scratch[name] = (stacks, self.rows(stacks))
        return kept

    def enter(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Copy the weights and gradients into their stacks (one ``stack(out=)`` per shape)."""
        weights = self.stack(params, self._kept(params[0], "weights")[0])
        return weights, self.stack(grads, self._kept(params[0], "grads")[0])

    def leave(self, params: Sequence[Tensor]) -> None:
        """Copy the stepped weights back into the parameters (one ``_foreach_copy_``)."""
        torch._foreach_copy_(list(params), self._kept(params[0], "weights")[1])

    def scratch(self, params: Sequence[Tensor], workspace: Workspace) -> list[Tensor] | None:
        """Scratch stacks for d = g + wd * w or an update (kept here, not in ``workspace``)."""
        return self._kept(params[0], "updates")[0]

    def _holds(self, states: Sequence[dict], name: str) -> bool:
        """Whether the entries ``name`` of ``states`` are the rows kept here; checked once per
        step's list of state dicts (a pass over every entry, by identity)."""
        if self._checked[0] is states and name in self._checked[1]:
            return True
        kept = self._state.get(name)
        if kept is None or not all(map(operator.is_, map(operator.methodcaller("get", name), states), kept[1])):
            return False
        if self._checked[0] is not states:
            self._checked = (states, set())
        self._checked[1].add(name)
        return True

    def fits(self, states: Sequence[dict], names: Sequence[str]) -> bool:
        """Whether each entry in ``names`` is held by every parameter or by none (else the
        step takes the tensors themselves: stacks cannot hold a state half new)."""
        for name in names:
            if self._holds(states, name):
                continue
            missing = list(map(operator.methodcaller("get", name), states)).count(None)
            if 0 < missing < len(states):
                return False
        return True

    def state(self, states: Sequence[dict], name: str) -> list[Tensor | None]:
        """The stacks whose rows are the entries ``name`` of ``states`` (``None`` per stack when no
        parameter has the entry yet: hand the new stacks to :meth:`adopt`). Entries that are not
        the rows of the stacks kept here (a loaded state dict, a replaced tensor) are stacked
        anew and replaced by the new rows."""
        if self._holds(states, name):
            return self._state[name][0]
        entries = list(map(operator.methodcaller("get", name), states))
        if entries.count(None) == len(entries):
            return [None] * len(self.sizes)
        stacks = self.stack(entries)  # type: ignore[arg-type]
        self.adopt(states, (), name, stacks)
        return stacks

    def adopt(self, states: Sequence[dict], params: Sequence[Tensor], name: str, tensors: list[Tensor]) -> None:
        """Keep the stacks ``tensors`` as state ``name``; their rows become the entries of ``states``."""
        rows = self.rows(tensors)
        for state, row in zip(states, rows):
            state[name] = row
        self._state[name] = (tensors, rows)
        self._checked = (None, set())

    def norms(self, lists: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Per list of stacks, the L2 norm of every row, in stack order."""
        return [
            torch.cat([torch.linalg.vector_norm(s.reshape(s.shape[0], -1), dim=1) for s in stacks])
            for stacks in lists
        ]

    def per_layer(self, vector: Tensor, slot: int | None = None) -> list[Tensor]:
        """A per-layer vector (stack order) as one broadcastable ``[k, 1, ...]`` view per stack
        (a handful of views: nothing to keep across steps, so ``slot`` is not used)."""
        return [part.view(shape) for part, shape in zip(vector.split(self.sizes), self._broadcast)]

    def layer_vector(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-layer values held as one 1-D tensor per stack (the LAMB step counters), joined."""
        return torch.cat(list(tensors))

    def to_param_order(self, vector: Tensor | None) -> Tensor | None:
        return None if vector is None else vector[self._to_param.to(vector.device)]

    def to_layout_order(self, vector: Tensor) -> Tensor:
        return vector[self._to_stack.to(vector.device)]


class Layouts:
    """The layout of each parameter list an optimiser steps, chosen once and cached
    (by the identity of the list's tensors; a few lists kept, as lists change when
    parameters have no gradient). On the optimiser object, never in its state."""

    def __init__(self) -> None:
        self.chosen: dict[tuple[int, ...], Layout] = {}

    def of(self, params: Sequence[Tensor], *, foreach: bool = True, states: Sequence[dict] | None = None,
           names: Sequence[str] = ()) -> Layout:
        """Sharded for DTensor parameters; stacked for many small CPU tensors of few shapes on
        the foreach path; else the tensors themselves. A layout that cannot hold the entries
        ``names`` of the parameters' state dicts ``states`` as they are (stacks, some entries
        new) gives way to the tensors themselves for this step."""
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
        if states is not None and names and not layout.fits(states, names):
            return TensorLayout(params)
        return layout

    def stacked(self) -> bool:
        """Whether any list was stepped as stacks (introspection for tests)."""
        return any(layout.kind == "stacked" for layout in self.chosen.values())


def layout_of(params: Sequence[Tensor]) -> Layout:
    """The layout of a list stepped once, by a functional core: shards or the tensors."""
    return ShardedLayout(params) if any_sharded(params) else UNBOUND

"""Multi-tensor helpers every core uses, and the compile cache of the ``fused`` paths.

* :func:`group_by_device_and_dtype`, :func:`add_scaled_`, :func:`scatter_by_indices`:
  small wrappers over the ``torch._foreach_*`` API;
* :class:`Workspace` and :func:`into`: parameter-shaped scratch reused across
  steps, so lists of large tensors are never freshly allocated in a step;
* :func:`compiled`: a functional core compiled with ``torch.compile``, cached
  per configuration, falling back to eager (with a warning) where it cannot
  compile.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

__all__ = [
    "Workspace",
    "add_scaled_",
    "compiled",
    "group_by_device_and_dtype",
    "into",
    "scatter_by_indices",
]

ScaleT = float | Tensor | Sequence[Tensor]


def group_by_device_and_dtype(
    tensorlists: list[list[Tensor | None]],
) -> list[tuple[list[list[Any]], list[int]]]:
    """Group parallel tensor lists by (device, dtype); foreach ops need one of each.

    Returns ``[(lists, indices), ...]`` where ``indices`` give each entry's
    position in the original lists (used to write new state back).
    """
    first = tensorlists[0]
    device, dtype = first[0].device, first[0].dtype
    if all(t.dtype == dtype and t.device == device for t in first):
        # One group (the usual case): a Python check of the first list is far cheaper than
        # the general grouping, whose host-side work grows with the list (benchmarks/README.md).
        return [(tensorlists, list(range(len(first))))]
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensorlists, with_indices=True)
    return [(lists, indices) for lists, indices in grouped.values()]


def add_scaled_(targets: list[Tensor], tensors: list[Tensor], scale: ScaleT) -> None:
    """``targets[i] += scale_i * tensors[i]`` in one foreach op.

    ``scale`` is a Python number (one ``alpha`` for all), a 0-d tensor, or a
    list of 0-d tensors (one per tensor, e.g. ``ratios.unbind()``). Tensor
    scales go through ``addcmul`` with a broadcast 0-d factor, so they are
    never read back to the host.
    """
    if isinstance(scale, Tensor):
        scale = [scale] * len(targets)
    if isinstance(scale, (list, tuple)):
        torch._foreach_addcmul_(targets, tensors, list(scale))
    else:
        torch._foreach_add_(targets, tensors, alpha=scale)


# Lists whose mean tensor has at least this many elements get a Workspace: fresh large
# blocks come back from the OS and are page-faulted in on every step, so a foreach op that
# allocates them is several times slower than ``out=`` into reused memory; small blocks are
# recycled by the allocator and one foreach call beats a loop of ``out=`` calls
# (benchmarks/README.md).
WORKSPACE_MIN_MEAN_NUMEL = 1 << 16


class Workspace:
    """Scratch tensors shaped like the parameters, reused from step to step.

    Kept on the optimiser object, keyed by parameter: never state, never in
    ``state_dict()``; it costs one parameter-sized buffer, the size of the
    temporary that ``torch.optim.AdamW`` allocates and frees every step.
    """

    def __init__(self) -> None:
        self._buffers: dict[Tensor, Tensor] = {}

    def like(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        """One scratch tensor per parameter, or ``None`` for lists of small tensors."""
        if not params or sum(p.numel() for p in params) < WORKSPACE_MIN_MEAN_NUMEL * len(params):
            return None
        out = []
        for p in params:
            buffer = self._buffers.get(p)
            if buffer is None or buffer.shape != p.shape or buffer.dtype != p.dtype:
                buffer = self._buffers[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            out.append(buffer)
        return out


_FOREACH = {torch.sqrt: torch._foreach_sqrt, torch.div: torch._foreach_div, torch.add: torch._foreach_add}


def into(out: list[Tensor] | None, op: Callable[..., Tensor], *lists: list[Tensor], **kwargs: Any) -> list[Tensor]:
    """``op`` on every tensor of ``lists``: written into ``out`` (``out=``) when given,
    else one allocating foreach op (``torch.sqrt`` -> ``torch._foreach_sqrt``).
    ``out`` may alias an input list (elementwise ops allow it)."""
    if out is None:
        return _FOREACH[op](*lists, **kwargs)
    for o, *args in zip(out, *lists):
        op(*args, out=o, **kwargs)
    return out


def scatter_by_indices(
    values: list[tuple[Tensor, list[int]]], length: int
) -> Tensor | None:
    """Put per-(device, dtype) vectors back in the original parameter order."""
    if not values:
        return None
    if len(values) == 1:
        vector, indices = values[0]
        if indices == list(range(length)):
            return vector
    first = values[0][0]
    out = torch.empty(length, dtype=first.dtype, device=first.device)
    for vector, indices in values:
        index = torch.tensor(indices, device=first.device)
        out.index_copy_(0, index, vector.to(device=first.device, dtype=first.dtype, non_blocking=True))
    return out


# ----------------------------------------------------------------------------
# The fused path: torch.compile of the functional core, cached per configuration

_COMPILED: dict[Hashable, Callable[..., Any]] = {}
_UNCOMPILABLE: set[Hashable] = set()


def compiled(fn: Callable[..., Any], key: Hashable, *, dynamic: bool = False) -> Callable[..., Any]:
    """``fn`` compiled with ``torch.compile`` once per ``key``, or ``fn`` itself.

    ``dynamic=True`` compiles for symbolic shapes (one graph for tensors of
    every size: the per-tensor fused updates); else for the shapes met.

    ``key`` holds every static option the compiled graph depends on (the
    variant flags), so changing a flag never reuses a graph compiled for
    another. Values that change during training (the learning rate, the step)
    are passed as tensors so a schedule does not trigger recompilation. If
    compilation fails (no compiler, unsupported platform), a warning is issued
    once for the key and the eager function is used from then on.
    """
    full_key = (fn.__module__, fn.__qualname__, key, dynamic)
    if full_key in _UNCOMPILABLE:
        return fn
    compiled_fn = _COMPILED.get(full_key)
    if compiled_fn is None:
        try:
            compiled_fn = torch.compile(fn, dynamic=dynamic)
        except Exception as error:  # noqa: BLE001 - any failure means "run eager"
            _mark_uncompilable(full_key, fn, error)
            return fn
        _COMPILED[full_key] = compiled_fn

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled_fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            # Compilation happens lazily at the first call; inputs are only
            # mutated after a successful compile, so running eager is safe.
            _mark_uncompilable(full_key, fn, error)
            return fn(*args, **kwargs)

    return run


def _mark_uncompilable(full_key: Hashable, fn: Callable[..., Any], error: Exception) -> None:
    _UNCOMPILABLE.add(full_key)
    _COMPILED.pop(full_key, None)
    warnings.warn(
        f"fused=True: could not compile {fn.__qualname__} ({type(error).__name__}: "
        f"{error}); running the eager multi-tensor path instead",
        RuntimeWarning,
        stacklevel=3,
    )

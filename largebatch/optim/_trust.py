"""What the layer-wise adaptive optimisers share.

* :func:`trust_ratios`: the per-layer trust ratio for all layers at once, one
  vectorised op on the stacked norms; zero norms give 1 through ``torch.where``
  (no Python branch, so no host synchronisation).
* validation helpers that raise ``ValueError`` naming the argument;
* :func:`group_by_device_and_dtype` and :func:`add_scaled_`, small wrappers over
  the ``torch._foreach_*`` API used by every multi-tensor path;
* :class:`Workspace` and :func:`into`: parameter-shaped scratch reused across
  steps, so lists of large tensors are never freshly allocated in a step;
* :func:`compiled`: the ``fused`` path, the functional core compiled with
  ``torch.compile``, cached per configuration, falling back to eager (with a
  warning) where it cannot compile;
* :class:`TrustRatioOptimizer`: the thin ``Optimizer`` base that keeps the
  per-layer introspection (``last_trust_ratios``) off the checkpoint.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from ._layout import Layouts
from ._sharded import is_sharded, local

__all__ = [
    "TrustRatioOptimizer",
    "Workspace",
    "add_scaled_",
    "check_bool",
    "check_choice",
    "check_foreach_fused",
    "check_lr",
    "check_range",
    "compiled",
    "group_by_device_and_dtype",
    "into",
    "trust_ratios",
]

ScaleT = float | Tensor | Sequence[Tensor]


# ----------------------------------------------------------------------------
# Trust ratios


def trust_ratios(
    numerator_norms: Tensor,
    denominator_norms: Tensor,
    *,
    coefficient: float = 1.0,
    eps: float = 0.0,
    clip: bool = False,
) -> Tensor:
    """``coefficient * num / (den + eps)`` per layer, 1 where either norm is 0.

    Both arguments are 1-D tensors (one entry per layer, e.g. ``torch.stack``
    of a ``torch._foreach_norm`` result). A zero weight norm (a zero-initialised
    bias) or a zero update norm gives ratio 1, so such a layer is still updated
    at the global rate; the test is ``> 0`` on both, never ``>= 0``. ``clip``
    caps the ratio at 1 (LARC: the effective rate never exceeds the global one).
    """
    ratio = coefficient * numerator_norms / (denominator_norms + eps)
    ratio = torch.where(
        (numerator_norms > 0) & (denominator_norms > 0), ratio, torch.ones_like(ratio)
    )
    if clip:
        ratio = ratio.clamp(max=1.0)
    return ratio


def any_sharded(tensors: Sequence[Tensor]) -> bool:
    """Whether any tensor is an FSDP2 DTensor shard (then the sharded branch runs)."""
    return any(map(is_sharded, tensors))


def as_sharded_like(t: Tensor, like: Tensor) -> Tensor:
    """A local shard as a DTensor laid out like ``like`` (new optimiser state under FSDP2)."""
    if not is_sharded(like) or is_sharded(t):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        t, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


# ----------------------------------------------------------------------------
# Validation (at construction and again in the functional API)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_lr(lr: Any, *, read: bool = True) -> None:
    """``lr`` is a non-negative number or a one-element tensor. ``read=False`` (inside a
    step): a tensor's value is not read, which would synchronise with the device."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if lr.requires_grad:
            raise ValueError("lr: a tensor lr must not require grad")
        if not read:
            return
        value = float(lr.detach().cpu())  # at construction, not in step()
    elif _is_number(lr):
        value = float(lr)
    else:
        raise ValueError(f"lr: expected a float or a tensor, got {type(lr).__name__}")
    if not value >= 0.0:
        raise ValueError(f"lr: must be >= 0, got {value}")


def check_range(
    name: str, value: Any, low: float, high: float = math.inf, *, high_open: bool = False
) -> None:
    """``low <= value <= high`` (``< high`` with ``high_open``), else ValueError naming it."""
    if not _is_number(value):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name}: must be in [{low}, {high}{bracket}, got {value}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_foreach_fused(foreach: Any, fused: Any) -> None:
    """``foreach`` is None or a bool, ``fused`` a bool, and not both set."""
    if foreach is not None:
        check_bool("foreach", foreach)
    check_bool("fused", fused)
    if fused and foreach:
        raise ValueError("fused: fused=True and foreach=True cannot be set together")


# ----------------------------------------------------------------------------
# Multi-tensor helpers


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
        # One group (the usual case): a Python check of the first list, keyed as
        # the general grouping is; on 2,000 tensors x 3 lists the general
        # grouping took ~4 ms of a ~55 ms LARS step on CPU, this check ~0.5 ms
        # (host-side Python work: the same on every device).
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


# Lists whose mean tensor has at least this many elements get a Workspace.
# Measured on CPU only (ResNet-50 list, 25.6M parameters): a foreach op that
# allocates its result (``_foreach_sqrt``, ``_foreach_div``) took 3-4x as long
# as the same op written with ``out=`` into memory reused across steps (fresh
# large blocks come back from the OS and are page-faulted in on every step).
# Below it (e.g. 2,000 tensors of 1-4K elements) small blocks are recycled by
# the allocator and one foreach call beats a Python loop of ``out=`` calls.
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


def as_tensor_like(value: float | Tensor, like: Tensor) -> Tensor:
    """A hyperparameter as a 0-d tensor on ``like``'s device (tensors are moved, not read)."""
    if isinstance(value, Tensor):
        return value.reshape(()).to(device=like.device, dtype=like.dtype, non_blocking=True)
    return torch.tensor(value, device=like.device, dtype=like.dtype)


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


# ----------------------------------------------------------------------------
# The thin Optimizer base


class TrustRatioOptimizer(Optimizer):
    """Base of the layer-wise adaptive optimisers.

    Adds, on top of :class:`torch.optim.Optimizer`:

    * :meth:`step`: gathers, per parameter group, the parameters that have a
      gradient and hands them to the subclass's ``_step_group`` (which calls
      the functional core);
    * ``last_trust_ratios``: after each :meth:`step`, one 1-D tensor per
      parameter group with the trust ratio applied to each parameter that had
      a gradient, in the group's order (all ones in a group with
      ``adapt=False``; ``None`` for a group that had no gradients). These are
      the stacked tensors the step computed anyway, so keeping them costs
      nothing. They are attributes, not state: never in ``state_dict()``.
    * :meth:`effective_lrs` (rate times ratio) and :meth:`trust_ratios_by_name`;
    * a :class:`Workspace` (scratch reused across steps, not state), and the
      :class:`~._layout.Layouts`: the layout of each group's list, chosen once.
    """

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self.last_trust_ratios: list[Tensor | None] = [None] * len(self.param_groups)
        self._last_stepped: list[list[int]] = [[] for _ in self.param_groups]
        self._workspace = Workspace()
        self._layouts = Layouts()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.last_trust_ratios = [None] * len(self.param_groups)
        self._last_stepped = [[] for _ in self.param_groups]
        self._workspace = Workspace()
        self._layouts = Layouts()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])
        if hasattr(self, "last_trust_ratios"):
            self.last_trust_ratios.append(None)
            self._last_stepped.append([])

    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> Tensor | None:  # pragma: no cover - abstract
        """Step one group's parameters that have gradients; return the trust ratios or None."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one step (see the class docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for index, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            stepped: list[int] = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                stepped.append(i)
            if not params:
                self._record(index, stepped, None)
                continue
            ratios = self._step_group(group, params, grads)
            if ratios is None:
                ratios = torch.ones(len(params), device=local(params[0]).device)
            self._record(index, stepped, ratios)
        return loss

    def _record(self, group_index: int, stepped: list[int], ratios: Tensor | None) -> None:
        self._last_stepped[group_index] = stepped
        self.last_trust_ratios[group_index] = ratios

    def effective_lrs(self) -> list[Tensor | None]:
        """Per group: ``lr * trust ratio`` of each parameter stepped last."""
        return [
            None if ratios is None else ratios * group["lr"]
            for group, ratios in zip(self.param_groups, self.last_trust_ratios)
        ]

    def trust_ratios_by_name(self) -> dict[str, Tensor]:
        """``{name: 0-d ratio}`` from the last step (names from ``named_parameters()``
        when the optimiser was built from them, else ``"group{g}.{i}"``)."""
        out: dict[str, Tensor] = {}
        for g, (group, ratios) in enumerate(zip(self.param_groups, self.last_trust_ratios)):
            if ratios is None:
                continue
            names = group.get("param_names")
            for ratio, i in zip(ratios.unbind(), self._last_stepped[g]):
                out[names[i] if names else f"group{g}.{i}"] = ratio
        return out

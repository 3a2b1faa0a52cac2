"""What CLARS, LENA and AdaScale share: the statistics source, bias-corrected
moving averages, the momentum-SGD update with a per-layer rate, method tags
for checkpoints and argument checks.

All of it works on stacked per-parameter vectors so a step costs a handful of
kernels whatever the number of layers, and nothing is read back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._sharded import local

METHOD_KEY = "method"


# -- arguments ---------------------------------------------------------------------------

def check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha: the warm-up fraction must be in (0, 1], got {alpha!r}")


def check_source(stats, method: str, need_per_example: bool = False) -> None:
    if stats is None:
        raise ValueError(
            f"{method} needs a gradient-statistics source: pass stats=largebatch.stats.GradientStatistics(model"
            + (", per_example=True" if need_per_example else "")
            + ") (or an object with summary() and index_of())"
        )
    for attr in ("summary", "index_of"):
        if not callable(getattr(stats, attr, None)):
            raise ValueError(f"stats must provide {attr}(); got {type(stats).__name__}")


# -- the statistics source -----------------------------------------------------------------

class StatisticsIndex:
    """Maps a list of parameters to their positions in the source's [K] vectors.

    The index tensor is built once per distinct parameter list (Python-side
    work only) and cached on device; gathering with it does not sync.
    """

    def __init__(self, stats):
        self.stats = stats
        self._cache: dict[tuple[int, ...], Tensor] = {}

    def index(self, params: Sequence[Tensor], device) -> Tensor:
        key = tuple(id(p) for p in params)
        idx = self._cache.get(key)
        if idx is None:
            positions = []
            for p in params:
                try:
                    positions.append(int(self.stats.index_of(p)))
                except (KeyError, ValueError) as exc:
                    raise ValueError(
                        "a parameter of the optimiser is not tracked by the statistics source "
                        f"(shape {tuple(p.shape)}); build the source on the same model"
                    ) from exc
            idx = torch.tensor(positions, dtype=torch.long, device=device)
            self._cache = {key: idx}  # the usual case: one list, reused every step
        return idx

    def gather(self, vector: Tensor, params: Sequence[Tensor]) -> Tensor:
        return vector.index_select(0, self.index(params, vector.device))


def loss_scale_sq(measured_sq_norms: Tensor, grad_sq_norms: Tensor) -> Tensor:
    """S^2, the squared loss scale the statistics saw but ``p.grad`` no longer carries.

    A source reports B_k = ||gbar_k||^2 as the backward passes left it; a
    ``GradScaler`` unscales ``p.grad`` before ``step``. The ratio of the total
    squared norms gives S^2 (1 without loss scaling; 1 where either is 0).
    ``grad_sq_norms`` are the squared norms of the current ``p.grad``
    (``layer_sq_norms``). No host sync.
    """
    measured = measured_sq_norms.sum()
    actual = grad_sq_norms.to(measured.dtype).sum()
    ok = (measured > 0) & (actual > 0)
    one = torch.ones_like(measured)
    return torch.where(ok, measured / torch.where(ok, actual, one), one)


def summary_n(summary) -> int:
    n = summary.n
    if isinstance(n, Tensor):  # the interface says int; tolerate a 0-d tensor once per step
        n = int(n)
    if n < 1:
        raise ValueError(f"the statistics summary reports n = {n} gradient samples")
    return n


# -- moving averages -------------------------------------------------------------------------

def smoothing(n: int) -> float:
    """Moving-average factor max(1 - n/1000, 0) (AdaScale; LENA Eq. 8), guarded for n > 1000."""
    return max(1.0 - n / 1000.0, 0.0)


def ema_update(avg: Tensor, weight: Tensor, value: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """One step of a bias-corrected moving average, kept as (sum, weight).

    avg/weight is the average. With a constant factor c this is the usual
    1 - c^t correction; written this way it stays exact when c changes because
    n changes (a resumed run on another number of workers) and when c = 0.
    """
    return avg * c + value * (1.0 - c), weight * c + (1.0 - c)


# -- the update ------------------------------------------------------------------------------

def momentum_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    rates: Tensor,
    *,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    decoupled_weight_decay: bool,
    lr,
    maximize: bool,
    foreach: bool,
) -> list[Tensor | None]:
    """PyTorch-SGD update with a per-parameter rate vector ``rates`` (shape [P]):

        d = g + wd * w   (coupled decay; the gradient statistics never see this term)
        v = m * v + (1 - dampening) * d      (v = d on the first step, as torch.optim.SGD)
        w = w - rate_k * (d + m * v if nesterov else v)
        decoupled decay instead: w = w * (1 - lr * wd), at the scheduled group rate.

    The rate sits outside the momentum buffer (the PyTorch convention the LENA
    and AdaScale codes build on). ``p.grad`` is never modified. Returns the
    momentum buffers (new ones where None was passed).
    """
    if not params:
        return momentum_buffers
    originals = params
    params = [local(p) for p in params]
    grads = [local(g) for g in grads]
    if maximize:
        grads = torch._foreach_neg(grads) if foreach else [-g for g in grads]
    if decoupled_weight_decay and weight_decay != 0:
        factor = 1 - lr * weight_decay
        if foreach:
            torch._foreach_mul_(params, factor)
        else:
            for p in params:
                p.mul_(factor)
    elif weight_decay != 0:
        grads = (
            torch._foreach_add(grads, params, alpha=weight_decay)
            if foreach
            else [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
        )
    if momentum != 0:
        bufs = []
        for i, (d, b) in enumerate(zip(grads, momentum_buffers)):
            if b is None:
                # zeros_like of the parameter keeps a sharded (DTensor) layout for checkpoints
                momentum_buffers[i] = b = torch.zeros_like(originals[i], memory_format=torch.preserve_format)
                local(b).copy_(d)
                bufs.append(None)
            else:
                bufs.append(local(b))
        old = [i for i, b in enumerate(bufs) if b is not None]
        if old:
            ob, od = [bufs[i] for i in old], [grads[i] for i in old]
            if foreach:
                torch._foreach_mul_(ob, momentum)
                torch._foreach_add_(ob, od, alpha=1 - dampening)
            else:
                for b, d in zip(ob, od):
                    b.mul_(momentum).add_(d, alpha=1 - dampening)
        bufs = [local(b) for b in momentum_buffers]
        if nesterov:
            directions = (
                torch._foreach_add(grads, bufs, alpha=momentum)
                if foreach
                else [d.add(b, alpha=momentum) for d, b in zip(grads, bufs)]
            )
        else:
            directions = bufs
    else:
        directions = grads
    neg_rates = list((-rates).unbind(0))
    if foreach:
        torch._foreach_add_(params, torch._foreach_mul(directions, neg_rates))
    else:
        for p, d, r in zip(params, directions, neg_rates):
            p.add_(d * r)
    return momentum_buffers


# -- bookkeeping -------------------------------------------------------------------------------

def scalar_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """dtype of the per-layer vectors: float64 for a float64 model (exact comparisons), else float32."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def stack_state(states: Sequence[dict], key: str, dtype: torch.dtype | None = None) -> Tensor:
    stacked = torch.stack([s[key] for s in states])
    return stacked if dtype is None or not stacked.is_floating_point() else stacked.to(dtype)


def write_state(states: Sequence[dict], key: str, values: Tensor) -> None:
    torch._foreach_copy_([s[key] for s in states], list(values.unbind(0)))


def group_vector(groups_of: Sequence[dict], key: str, device, dtype=torch.float32) -> Tensor:
    """A per-parameter vector of one hyperparameter (groups may differ); float or tensor values."""
    values = [g[key] for g in groups_of]
    if any(isinstance(v, Tensor) for v in values):
        return torch.stack([torch.as_tensor(v, dtype=dtype, device=device).reshape(()) for v in values])
    return torch.tensor(values, dtype=dtype, device=device)


def tag_state_dict(state_dict: dict, method: str) -> dict:
    state_dict[METHOD_KEY] = method
    return state_dict


def check_state_dict(state_dict: dict, method: str) -> None:
    found = state_dict.get(METHOD_KEY)
    if found != method:
        raise ValueError(
            f"this state dict was saved by {found or 'an optimiser without a method tag'!s}, "
            f"not by {method}: its moving averages and progress would be meaningless here"
        )


# -- introspection -----------------------------------------------------------------------------

class LayerIntrospection:
    """Per-layer tensors of the last step, split per parameter group (like LARS's
    ``last_trust_ratios``), with names; attributes only, never in ``state_dict()``.

    Subclasses list the recorded quantities in ``_introspected`` and call
    ``_record(stepped, **flat_vectors)`` at the end of ``step``.
    """

    _introspected: tuple[str, ...] = ()

    def _clear_introspection(self) -> None:
        groups = len(getattr(self, "param_groups", []))
        self._stepped: list[list[int]] = [[] for _ in range(groups)]
        self._last: dict[str, list[Tensor | None]] = {name: [None] * groups for name in self._introspected}

    def _record(self, stepped: list[list[int]], **vectors: Tensor) -> None:
        self._stepped = stepped
        for name, vector in vectors.items():
            pieces, start = [], 0
            for indices in stepped:
                pieces.append(vector[start : start + len(indices)] if indices else None)
                start += len(indices)
            self._last[name] = pieces

    def last(self, name: str) -> list[Tensor | None]:
        """Per group: the 1-D tensor of ``name`` for the parameters stepped last (None if none)."""
        return self._last[name]

    def by_name(self, name: str) -> dict[str, Tensor]:
        """``{parameter name: 0-d value}`` of the last step (``group{g}.{i}`` without names)."""
        out: dict[str, Tensor] = {}
        for g, (group, values) in enumerate(zip(self.param_groups, self._last[name])):
            if values is None:
                continue
            names = group.get("param_names")
            for value, i in zip(values.unbind(), self._stepped[g]):
                out[names[i] if names else f"group{g}.{i}"] = value
        return out


class StatisticsConsumer:
    """Keeps the statistics source in step with the gradients it describes.

    With ``reset_statistics`` (the default) the source is reset after every
    ``step()`` and whenever the gradients are cleared with ``zero_grad()``; the
    latter covers a step that did not run (a ``GradScaler`` skipping an inf/NaN
    step), so the next step's statistics never include an old step's backwards.
    """

    stats: object
    reset_statistics: bool

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._reset_statistics()

    def _reset_statistics(self) -> None:
        if getattr(self, "reset_statistics", False) and callable(getattr(self.stats, "reset", None)):
            self.stats.reset()

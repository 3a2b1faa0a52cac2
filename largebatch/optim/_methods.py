"""What CLARS, LENA and AdaScale share: the statistics source and its scales,
bias-corrected moving averages, the momentum-SGD update with a per-layer rate,
the step's bookkeeping (parameters with gradients, per-group updates and
momentum buffers), method tags for checkpoints and argument checks.

All of it works on stacked per-parameter vectors so a step costs a handful of
kernels whatever the number of layers, and nothing is read back to the host.
Each group is stepped through its layout (:mod:`._layout`, chosen once per
group by :func:`group_parts`): a step reads :func:`group_parts`, the layouts'
``norms`` (CLARS's weight norms), then :func:`apply_by_group` with the
layouts' ``per_layer`` scales, and that is all.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from itertools import repeat

import torch
from torch import Tensor

from ._layout import Layouts, TensorLayout
from ._sharded import DTensor, local
from ._stacked import StackedLayout
from ._trust import Workspace, check_bool, check_lr, check_range, into

METHOD_KEY = "method"
STATISTICS_KEY = "statistics"
#: where LENA and AdaScale take their gradient samples from
STATISTICS = ("micro_batch", "example")


class SingleSampleWarning(UserWarning):
    """LENA or AdaScale measured n = 1 gradient sample per step: every gain is 1 by construction."""


# -- arguments ---------------------------------------------------------------------------

def check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha: the warm-up fraction must be in (0, 1], got {alpha!r}")


def check_sgd_group(group: dict) -> None:
    """The momentum-SGD hyperparameters every method has (ValueError naming the argument)."""
    check_lr(group["lr"])
    check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    check_range("dampening", group["dampening"], 0.0, 1.0)
    check_range("weight_decay", group["weight_decay"], 0.0)
    for name in ("nesterov", "maximize"):
        check_bool(name, group[name])
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("nesterov: Nesterov momentum needs momentum > 0 and dampening = 0")


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


def check_statistics(statistics: str, stats, base_batch, method: str) -> None:
    """The statistics source of LENA and AdaScale: ``"micro_batch"`` samples, or ``"example"``
    norms with a base batch (ValueError naming the argument)."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    if statistics == "micro_batch":
        if base_batch is not None:
            raise ValueError(
                "base_batch is only used with statistics='example' (with micro-batch statistics "
                "each micro-batch is a base-size sample)"
            )
        return
    check_base_batch(base_batch)
    # GradientStatistics without per_example=True has per_example None; another source is
    # checked at its first summary
    if getattr(stats, "per_example", True) is None:
        raise ValueError(
            f"{method}(statistics='example') needs per-example norms: build the source as "
            "GradientStatistics(model, per_example=True)"
        )


def check_group_base_batch(optimizer, group: dict) -> None:
    """A new group's ``base_batch``: with example statistics one positive integer shared by every
    group (n = N/b is one per step); with micro-batch statistics None."""
    if getattr(optimizer, "statistics", "micro_batch") != "example":
        if group.get("base_batch") is not None:
            raise ValueError("base_batch is only used with statistics='example'")
        return
    check_base_batch(group["base_batch"])
    first = optimizer.param_groups[0]["base_batch"]
    if group["base_batch"] != first:
        raise ValueError(
            f"base_batch: every parameter group needs the same base batch (n = N/b is one per step), "
            f"got {first} and {group['base_batch']}"
        )


def check_base_batch(base_batch) -> None:
    if isinstance(base_batch, bool) or not isinstance(base_batch, int) or base_batch < 1:
        raise ValueError(
            "base_batch: statistics='example' needs the base batch b (a positive integer, the batch "
            f"the base rate was tuned at), got {base_batch!r}"
        )


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
        key = tuple(map(id, params))
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


def grad_scale(summary) -> float:
    """c with ``p.grad = c * gbar`` as the backwards leave it (``GradientSummary.grad_scale``; 1 if not given)."""
    return float(getattr(summary, "grad_scale", 1.0))


def loss_scale_sq(summary, dtype: torch.dtype, device) -> Tensor | float:
    """S^2, the squared loss scale (``GradScaler``) the statistics saw but ``p.grad`` no longer carries.

    ``summary.loss_scale`` is the scale the backwards ran with, as the source
    recorded it (``GradientStatistics(model, grad_scaler=scaler)`` reads the
    scaler's scale tensor; 1 when the source does not say). ``scaler.step``
    unscales ``p.grad`` before the step, so statistics divided by S^2 are on
    the mean-gradient scale. Never inferred from ``p.grad``: clipping between
    the backward and the step rescales ``p.grad`` too, and the statistics must
    stay the raw gradients'. No host sync (the scale stays a tensor).
    """
    scale = getattr(summary, "loss_scale", 1.0)
    if isinstance(scale, Tensor):
        scale = scale.to(device=device, dtype=dtype, non_blocking=True).reshape(())
        return scale * scale
    return float(scale) ** 2


def sample_statistics(summary, index: StatisticsIndex, params: Sequence[Tensor], dtype) -> tuple[Tensor, Tensor]:
    """A_k and B_k of ``params`` (AdaScale, LENA Eq. 4) on the mean-gradient scale.

    Gathered from the summary and divided by the loss scale S^2
    (``loss_scale_sq``), so epsilons are in the units of the papers and moving
    averages never mix scales, whatever the loss scale, the accumulation
    convention or the number of micro-batches.
    """
    A = index.gather(summary.sample_sq_norm_mean, params).to(dtype)
    B = index.gather(summary.mean_grad_sq_norm, params).to(dtype)
    scale_sq = loss_scale_sq(summary, dtype, A.device)
    return A / scale_sq, B / scale_sq


def example_statistics(
    summary, index: StatisticsIndex, params: Sequence[Tensor], dtype, base_batch: int
) -> tuple[Tensor, Tensor, float | Tensor]:
    """``(A_eq, B, n_eff)`` of ``params`` from per-example norms (``estimators.example_gain_statistics``).

    The base-batch samples the step's N examples amount to: n_eff = N/b and
    E[A_eq] = tr(Sigma)/b + ||G||^2, as for n_eff micro-batches of b; on the
    mean-gradient scale (divided by S^2), as ``sample_statistics``. n_eff is
    a 0-d tensor when the source counts examples on device: no host sync.
    """
    from ..stats.estimators import example_gain_statistics

    if getattr(summary, "example_sq_norm_mean", None) is None:
        raise RuntimeError(
            "statistics='example': the statistics summary has no per-example norms; build the source as "
            "GradientStatistics(model, per_example=True)"
        )
    E = index.gather(summary.example_sq_norm_mean, params).to(dtype)
    B = index.gather(summary.mean_grad_sq_norm, params).to(dtype)
    scale_sq = loss_scale_sq(summary, dtype, E.device)
    E, B = E / scale_sq, B / scale_sq
    A, n = example_gain_statistics(E, B, summary.num_examples, base_batch)
    return A, B, n


def summary_n(summary) -> int:
    n = summary.n
    if isinstance(n, Tensor):  # the interface says int; tolerate a 0-d tensor once per step
        n = int(n)
    if n < 1:
        raise ValueError(f"the statistics summary reports n = {n} gradient samples")
    return n


# -- moving averages -------------------------------------------------------------------------

def smoothing(n: int | float | Tensor) -> float | Tensor:
    """Moving-average factor max(1 - n/1000, 0) (AdaScale; LENA Eq. 8), guarded for n > 1000.

    n is counted (an int), or with example statistics N/b, possibly a 0-d tensor (kept on device).
    """
    if isinstance(n, Tensor):
        return (1.0 - n / 1000.0).clamp(min=0.0)
    return max(1.0 - n / 1000.0, 0.0)


def clamp_gain(gain: Tensor, n: int | float | Tensor) -> Tensor:
    """The gain limited to [1, n] (AdaScale; LENA Eq. 5); n may be a 0-d tensor (n >= 1)."""
    if isinstance(n, Tensor):
        return torch.minimum(gain.clamp(min=1.0), n.to(gain.dtype))
    return gain.clamp(1.0, float(n))


def ema_update(avg: Tensor, weight: Tensor, value: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """One step of a bias-corrected moving average, kept as (sum, weight).

    avg/weight is the average. With a constant factor c this is the usual
    1 - c^t correction; written this way it stays exact when c changes because
    n changes (a resumed run on another number of workers) and when c = 0.
    """
    return avg * c + value * (1.0 - c), weight * c + (1.0 - c)


# -- the update ------------------------------------------------------------------------------

def local_list(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``[local(t) for t in tensors]``, with the check for DTensors done at C speed (a new list)."""
    if DTensor is None or not any(map(isinstance, tensors, repeat(DTensor))):
        return list(tensors)
    return [local(t) for t in tensors]


def decayed_gradients(
    params: list[Tensor],
    grads: list[Tensor],
    weight_decay: float,
    *,
    maximize: bool,
    foreach: bool,
    workspace: list[Tensor] | None = None,
) -> list[Tensor]:
    """d = (-g if maximize else g) + wd * w, coupled weight decay, on the local shards.

    New tensors where anything is added or negated (written into ``workspace``,
    scratch shaped like the parameters, when given); ``p.grad`` is never modified.
    """
    params, grads = local_list(params), local_list(grads)
    if maximize:
        grads = torch._foreach_neg(grads) if foreach else [-g for g in grads]
    if weight_decay != 0:
        if foreach:
            grads = into(workspace, torch.add, grads, params, alpha=weight_decay)
        else:
            grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
    return grads


def _owns(grads: list[Tensor], weight_decay: float, maximize: bool) -> bool:
    """Whether ``decayed_gradients`` returned new tensors (which the update may then overwrite)."""
    return bool(grads) and (maximize or weight_decay != 0)


def momentum_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    neg_rates: list[Tensor],
    *,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    decoupled_weight_decay: bool,
    lr,
    maximize: bool,
    foreach: bool,
    workspace: list[Tensor] | None = None,
) -> list[Tensor | None]:
    """PyTorch-SGD update with per-parameter rates, given negated as 0-d tensors ``neg_rates``:

        d = g + wd * w   (coupled decay; the gradient statistics never see this term)
        v = m * v + (1 - dampening) * d      (v = d on the first step, as torch.optim.SGD)
        w = w + neg_rate_k * (d + m * v if nesterov else v)
        decoupled decay instead: w = w * (1 - lr * wd), at the scheduled group rate.

    The rate sits outside the momentum buffer (the PyTorch convention the LENA
    and AdaScale codes build on). ``p.grad`` is never modified. ``workspace``
    (optional, parameter-shaped scratch) receives d. In place throughout:
    d is formed once, the buffers take ``mul_`` and ``add_``, the weights one
    ``addcmul_`` with the 0-d rates (no host sync). Returns the momentum
    buffers (new ones where None was passed).
    """
    originals = params
    params = local_list(params)
    decoupled = decoupled_weight_decay and weight_decay != 0
    coupled = 0.0 if decoupled else weight_decay
    grads = decayed_gradients(params, grads, coupled, maximize=maximize, foreach=foreach, workspace=workspace)
    owned = _owns(grads, coupled, maximize)
    if decoupled:
        factor = 1 - lr * weight_decay
        if foreach:
            torch._foreach_mul_(params, factor)
        else:
            for p in params:
                p.mul_(factor)
    directions = grads
    if momentum != 0:
        bufs = _update_buffers(originals, grads, momentum_buffers, momentum, dampening, foreach)
        if nesterov:
            if foreach:
                if owned:
                    torch._foreach_add_(grads, bufs, alpha=momentum)
                else:
                    directions = torch._foreach_add(grads, bufs, alpha=momentum)
            else:
                directions = [d.add(b, alpha=momentum) for d, b in zip(grads, bufs)]
        else:
            directions = bufs
    if foreach:
        torch._foreach_addcmul_(params, directions, neg_rates)
    else:
        for p, d, r in zip(params, directions, neg_rates):
            p.addcmul_(d, r)
    return momentum_buffers


def _update_buffers(
    originals: list[Tensor],
    updates: list[Tensor],
    momentum_buffers: list[Tensor | None],
    momentum: float,
    dampening: float,
    foreach: bool,
    scales: list[Tensor] | None = None,
) -> list[Tensor]:
    """v = m v + (1 - dampening) * s_k * d (``scales`` s_k, 1 when None), in place; new buffers
    (zeros_like the parameter, so a sharded layout is kept) are seeded with s_k * d.
    ``momentum_buffers`` is filled in; returns the local buffers."""
    if any(b is None for b in momentum_buffers):
        for i, b in enumerate(momentum_buffers):
            d = updates[i]
            if b is None:
                # zeros_like of the parameter keeps a sharded (DTensor) layout for checkpoints
                momentum_buffers[i] = b = torch.zeros_like(originals[i], memory_format=torch.preserve_format)
                if scales is None:
                    local(b).copy_(d)
                else:
                    torch.mul(d, scales[i], out=local(b))
            elif scales is None:
                local(b).mul_(momentum).add_(d, alpha=1 - dampening)
            else:
                local(b).mul_(momentum).addcmul_(d, scales[i], value=1 - dampening)
        return local_list(momentum_buffers)
    bufs = local_list(momentum_buffers)
    if foreach:
        torch._foreach_mul_(bufs, momentum)
        if scales is None:
            torch._foreach_add_(bufs, updates, alpha=1 - dampening)
        elif dampening == 0:
            torch._foreach_addcmul_(bufs, updates, scales)
        else:
            torch._foreach_addcmul_(bufs, updates, scales, value=1 - dampening)
    else:
        for b, d, s in zip(bufs, updates, scales or [None] * len(bufs)):
            b.mul_(momentum)
            if s is None:
                b.add_(d, alpha=1 - dampening)
            else:
                b.addcmul_(d, s, value=1 - dampening)
    return bufs


def sgd_options(group: dict) -> dict:
    """The keyword arguments of ``momentum_sgd_`` from a parameter group."""
    return dict(
        momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
        weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
        lr=group["lr"], maximize=group["maximize"], foreach=group["foreach"] is not False,
    )


def stepped_parameters(param_groups: Sequence[dict], method: str) -> tuple[list[Tensor], list[dict], list[list[int]]]:
    """The parameters with a gradient in group order, the group of each, and per group their indices."""
    params, groups_of, stepped = [], [], []
    grad = operator.attrgetter("grad")
    for group in param_groups:
        grads = list(map(grad, group["params"]))
        if not any(map(operator.is_, grads, repeat(None))):  # every parameter has a gradient (usual)
            if any(map(operator.attrgetter("is_sparse"), grads)):
                raise RuntimeError(f"{method} does not support sparse gradients")
            params.extend(group["params"])
            groups_of.extend([group] * len(grads))
            stepped.append(list(range(len(grads))))
            continue
        stepped.append([])
        for i, p in enumerate(group["params"]):
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{method} does not support sparse gradients")
                params.append(p)
                groups_of.append(group)
                stepped[-1].append(i)
    return params, groups_of, stepped


class GroupPart:
    """One parameter group's stepped parameters in this step: positions ``start:end`` of the
    step's parameter list, the group's layout (:mod:`._layout`, chosen once per list), and
    the lists the update works on (for stacks: filled once per step)."""

    def __init__(self, group: dict, params: list[Tensor], start: int, layout) -> None:
        self.group, self.params, self.start, self.end = group, params, start, start + len(params)
        self.layout = layout
        grads = [p.grad for p in params]
        self.stacked = isinstance(layout, StackedLayout)
        self.weights, self.grads = layout.enter(params, grads) if self.stacked else (params, grads)

    def weight_norms(self) -> Tensor:
        """||w_k|| of the group's parameters, in parameter order."""
        (norms,) = self.layout.norms([self.weights])
        return self.layout.to_param_order(norms)


def group_parts(optimizer, params: list[Tensor], stepped: list[list[int]]) -> list[GroupPart]:
    """The stepped parameters of each group with their layout, in group order (groups
    without gradients left out). A stacked group whose momentum buffers are new for some
    parameters and not for others (a parameter without a gradient earlier) takes the
    per-tensor layout for this step."""
    layouts = _layouts(optimizer)
    parts, start = [], 0
    for group, indices in zip(optimizer.param_groups, stepped):
        if not indices:
            continue
        ps = params[start : start + len(indices)]
        layout = layouts.of(ps, foreach=group["foreach"] is not False)
        if isinstance(layout, StackedLayout) and group["momentum"] != 0 and \
                layout.state(optimizer.state, ps, "momentum_buffer") is False:
            layout = TensorLayout(ps)
        parts.append(GroupPart(group, ps, start, layout))
        start += len(indices)
    return parts


def apply_by_group(optimizer, parts: list[GroupPart], update, *vectors: Tensor, decays=None) -> None:
    """Run ``update(weights, grads, momentum_buffers, group, *scales, workspace=...) -> momentum_buffers``
    on each group's lists and keep the buffers in the optimiser state.

    ``vectors`` are per-parameter [P] vectors (rates); ``update`` gets each as the layout's
    per-layer scales (0-d tensors, or ``[k, 1, ...]`` views for stacks). ``decays(group)``
    says whether the update forms d = g + wd * w, which then goes into scratch shaped like
    the lists (for lists of large tensors, and for stacks).
    """
    state = optimizer.state
    workspace = _workspace(optimizer)
    for part in parts:
        group, layout, ps = part.group, part.layout, part.params
        momentum = group["momentum"] != 0
        foreach = group["foreach"] is not False
        scratch = foreach and (decays is None or decays(group))
        scales = [layout.per_layer(layout.to_stack_order(v[part.start : part.end]), slot=i)
                  for i, v in enumerate(vectors)]
        if part.stacked:
            stacks = layout.state(state, ps, "momentum_buffer") if momentum else None
            buffers = stacks if stacks is not None else [None] * len(part.weights)
            buffers = update(part.weights, part.grads, buffers, group, *scales,
                             workspace=layout.workspace(ps) if scratch else None)
            layout.leave(ps)
            if stacks is None and momentum:
                layout.adopt(state, ps, "momentum_buffer", buffers)
            continue
        buffers = update(ps, part.grads, [state[p].get("momentum_buffer") for p in ps], group, *scales,
                         workspace=local_workspace(workspace, ps) if scratch else None)
        if momentum:
            for p, b in zip(ps, buffers):
                state[p]["momentum_buffer"] = b


def _layouts(optimizer) -> Layouts:
    layouts = optimizer.__dict__.get("_layouts")
    if layouts is None:
        layouts = optimizer.__dict__["_layouts"] = Layouts()
    return layouts


def momentum_sgd_by_group(optimizer, parts: list[GroupPart], rates: Tensor) -> None:
    """``momentum_sgd_`` with each group's options and the per-parameter ``rates`` (LENA, AdaScale),
    given to the update negated; d goes into scratch kept on the optimiser."""
    apply_by_group(
        optimizer, parts,
        lambda ps, grads, buffers, group, neg_rates, workspace: momentum_sgd_(
            ps, grads, buffers, neg_rates, workspace=workspace, **sgd_options(group),
        ),
        -rates, decays=_decays,
    )


def local_workspace(workspace: Workspace, params: list[Tensor]) -> list[Tensor] | None:
    """The local shards of the workspace for ``params`` (None for lists of small tensors)."""
    scratch = workspace.like(params)
    return None if scratch is None else [local(w) for w in scratch]


def _decays(group: dict) -> bool:
    """Whether the update forms d = g + wd * w (coupled weight decay) for this group."""
    return group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False)


def _workspace(optimizer) -> Workspace:
    workspace = optimizer.__dict__.get("_workspace")
    if workspace is None:
        workspace = optimizer.__dict__["_workspace"] = Workspace()
    return workspace


# -- bookkeeping -------------------------------------------------------------------------------

def scalar_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """dtype of the per-layer vectors: float64 for a float64 model (exact comparisons), else float32."""
    return torch.float64 if torch.float64 in set(map(operator.attrgetter("dtype"), params)) else torch.float32


def zeros_state(p: Tensor, keys: Sequence[str]) -> dict[str, Tensor]:
    """0-d zeros of the per-layer dtype on ``p``'s device, one per key (fresh per-parameter state)."""
    return {key: torch.zeros((), dtype=scalar_dtype([p]), device=p.device) for key in keys}


def stack_state(states: Sequence[dict], key: str, dtype: torch.dtype | None = None) -> Tensor:
    stacked = torch.stack([s[key] for s in states])
    return stacked if dtype is None or not stacked.is_floating_point() else stacked.to(dtype)


def write_state(states: Sequence[dict], key: str, values: Tensor) -> None:
    torch._foreach_copy_([s[key] for s in states], list(values.unbind(0)))


class StackedState:
    """Per-parameter 0-d state entries kept as views of one vector per key.

    The state stays per parameter (``state[p][key]`` is a 0-d tensor, so
    ``state_dict()`` and ``load_state_dict()`` are those of any optimiser),
    but each entry is a view of a [P] vector over the stepped parameters, so a
    step reads the stacked state without ``torch.stack`` and writes it back
    with one ``copy_`` per key instead of P. Rebuilt (one stack per key, and
    the entries re-pointed at the new vector) whenever the parameters, their
    state dicts or any entry changed (``load_state_dict``, another set of
    parameters with gradients). Kept on the optimiser, never in the state.
    """

    def __init__(self) -> None:
        self._owner = None
        self._states: list[dict] = []
        self._vectors: dict[str, Tensor] = {}
        self._views: dict[str, list[Tensor]] = {}

    def _valid(self, owner, states: Sequence[dict], keys: Sequence[str]) -> bool:
        if self._owner is not owner or len(states) != len(self._states):
            return False
        if not all(map(operator.is_, states, self._states)):
            return False
        try:  # identity of every entry, at C speed
            return all(all(map(operator.is_, map(operator.itemgetter(key), states), self._views[key])) for key in keys)
        except KeyError:
            return False

    def vectors(self, owner, states: Sequence[dict], keys: Sequence[str], dtype: torch.dtype) -> dict[str, Tensor]:
        """The [P] vector of each key (floating keys in ``dtype``); ``owner`` is the optimiser's
        ``state`` mapping (a new one after ``load_state_dict``)."""
        if not self._valid(owner, states, keys):
            vectors, views = {}, {}
            for key in keys:
                vector = stack_state(states, key, dtype)
                views[key] = list(vector.unbind(0))
                for s, v in zip(states, views[key]):
                    s[key] = v
                vectors[key] = vector
            self._owner, self._states, self._vectors, self._views = owner, list(states), vectors, views
        return {key: self._vectors[key] for key in keys}

    def write(self, values: dict[str, Tensor]) -> None:
        """New values of the vectors (and so of every entry): one ``copy_`` per key."""
        for key, value in values.items():
            vector = self._vectors[key]
            if value is not vector:
                vector.copy_(value)


def stacked_state(optimizer, name: str = "stacked") -> StackedState:
    """The optimiser's :class:`StackedState` called ``name`` (created on first use)."""
    cache = optimizer.__dict__.setdefault("_stacked_state", {})
    stacked = cache.get(name)
    if stacked is None:
        stacked = cache[name] = StackedState()
    return stacked


def group_vector(groups_of: Sequence[dict], key: str, device, dtype=torch.float32) -> Tensor:
    """A per-parameter vector of one hyperparameter (groups may differ); float or tensor values."""
    first = groups_of[0] if groups_of else None
    if first is not None and all(map(operator.is_, groups_of, repeat(first))):  # one group: one fill
        value = first[key]
        if isinstance(value, Tensor):
            return torch.as_tensor(value, dtype=dtype, device=device).reshape(()).expand(len(groups_of)).clone()
        return torch.full((len(groups_of),), value, dtype=dtype, device=device)
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

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._clear_introspection()

    def effective_lrs(self) -> list[Tensor | None]:
        """Per group: the rate applied to each parameter stepped last."""
        return self.last("effective_lr")

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


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside largebatch.optim and torch: the code that called
    ``step()`` (through torch's decorators, a ``GradScaler``, ...)."""
    import os
    import sys

    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


class StatisticsConsumer:
    """An optimiser that reads a statistics source at every step.

    Keeps the source in step with the gradients it describes: with
    ``reset_statistics`` (the default) the source is reset after every
    ``step()`` and whenever the gradients are cleared with ``zero_grad()``; the
    latter covers a step that did not run (a ``GradScaler`` skipping an inf/NaN
    step), so the next step's statistics never include an old step's backwards.
    Checkpoints carry the class's ``method`` tag and refuse another method's.
    """

    method: str
    stats: object
    reset_statistics: bool

    def _attach_statistics(self, stats, reset_statistics: bool) -> None:
        self.stats = stats
        self.reset_statistics = reset_statistics
        self._index = StatisticsIndex(stats)

    def _begin_step(self, closure) -> tuple:
        """Run the closure (its backwards belong to this step), then read the source: (loss, summary, n)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        summary = self.stats.summary()
        return loss, summary, summary_n(summary)

    def _gain_statistics(self, summary, n: int, params: Sequence[Tensor], dtype) -> tuple:
        """LENA's and AdaScale's ``(A, B, n)`` from the source, as ``self.statistics`` says.

        ``"micro_batch"``: A and B of the n samples the source counted (warns once when
        n = 1: every gain is then 1). ``"example"``: the base-batch equivalent of the
        per-example norms, n = N/b (``example_statistics``).
        """
        if self.statistics == "example":
            return example_statistics(summary, self._index, params, dtype, self.param_groups[0]["base_batch"])
        if n == 1 and not getattr(self, "_warned_single_sample", False):
            self._warned_single_sample = True
            warnings.warn(
                f"{type(self).__name__}: the statistics source measured n = 1 gradient sample in this step "
                "(one micro-batch in one process, or sample='worker' with one worker), so every gain is 1 by "
                "construction and the method reduces to momentum SGD. Split the batch into micro-batches of the base batch, or use "
                f"{type(self).__name__}(..., statistics='example', base_batch=b) with "
                "GradientStatistics(model, per_example=True) (largebatch train --statistics example).",
                SingleSampleWarning,
                stacklevel=_caller_level(),
            )
        A, B = sample_statistics(summary, self._index, params, dtype)
        return A, B, n

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._reset_statistics()

    def _reset_statistics(self) -> None:
        if getattr(self, "reset_statistics", False) and callable(getattr(self.stats, "reset", None)):
            self.stats.reset()

    def state_dict(self) -> dict:
        state_dict = tag_state_dict(super().state_dict(), self.method)
        mode = getattr(self, "statistics", None)
        if mode is not None:
            state_dict[STATISTICS_KEY] = mode
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        check_state_dict(state_dict, self.method)
        mode = getattr(self, "statistics", None)
        if mode is not None:
            saved = state_dict.get(STATISTICS_KEY, "micro_batch")  # saved before the option existed
            if saved != mode:
                # example mode keeps base_batch in its groups, micro-batch mode has none to restore
                raise ValueError(
                    f"this state dict was saved with statistics={saved!r}, this optimiser uses "
                    f"statistics={mode!r}; build it with statistics={saved!r} to resume"
                )
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in (METHOD_KEY, STATISTICS_KEY)})
        if "base_batch" in self.defaults:
            for group in self.param_groups:  # groups saved before the option existed
                group.setdefault("base_batch", None)
        self._restore_per_layer_state(state_dict)

    #: 0-d per-layer state entries (averages, progress, clocks): kept in float32 or wider
    _per_layer_keys: tuple[str, ...] = ()

    def _restore_per_layer_state(self, state_dict: dict) -> None:
        """Undo ``Optimizer.load_state_dict``'s cast of the per-layer state to the parameter dtype.

        torch.optim casts every floating state entry but ``step`` to the parameter's dtype
        (right for momentum buffers). For a bfloat16 model that rounds S_k = 70001.5 to 70144,
        for float16 it makes it inf. These entries are loaded again from ``state_dict`` in
        their saved dtype (at least float32; integers such as ``warmup_end`` stay integers),
        as torch.optim exempts ``step``.
        """
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        saved_state = state_dict["state"]
        for saved_id, p in zip(saved_ids, params):
            entry = saved_state.get(saved_id)
            if not entry:
                continue
            for key in self._per_layer_keys:
                value = entry.get(key)
                if isinstance(value, Tensor):
                    dtype = torch.promote_types(value.dtype, torch.float32) if value.is_floating_point() else value.dtype
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)

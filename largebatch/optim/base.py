"""The step every optimiser here takes, and the update kernel LARS, CLARS, LENA and AdaScale share.

:class:`LayerwiseOptimizer` is a thin :class:`torch.optim.Optimizer` whose
:meth:`~LayerwiseOptimizer.step` is the same for every method:

1. collect the parameters with gradients, per group (:func:`stepped_parameters`);
2. let each group's layout (:mod:`._layout`, chosen once per list) enter: a
   :class:`Part` holds the lists the step works on;
3. let the method compute its per-layer scales, a pure function of tensors
   (``_scales``: LARS's trust ratios, LENA's rates, ...);
4. apply the update (``_update``): for LARS, CLARS, LENA and AdaScale the one
   kernel :func:`scaled_momentum_`, for LAMB its Adam-moment update;
5. let the layout leave (stacked weights are copied back);
6. record the per-layer tensors of the step for introspection (never state).

LARS and LAMB compute their scales inside ``_update``, per group: their trust
ratios need the norms of what the update builds (``g + wd * w``, the Adam
ratio), and their ``fused`` path compiles scales and update as one graph. The
statistics-driven methods compute theirs in ``_scales`` for all groups at
once (:mod:`._statistics`): AdaScale's gain is one for the whole model.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from itertools import repeat
from typing import Any, Union

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from ._foreach import Workspace, add_scaled_, into
from ._layout import UNBOUND, Layout, Layouts

__all__ = ["LayerwiseOptimizer", "Part", "directions", "recorded", "scaled_momentum_", "stepped_parameters"]

#: a scale of the kernel: a number, a 0-d tensor, or a 1-D per-layer vector (layout order)
Scale = Union[float, Tensor]


# -- the kernel ------------------------------------------------------------------------------

def directions(
    params: list[Tensor], grads: list[Tensor], weight_decay: float, *, maximize: bool,
    workspace: list[Tensor] | None = None, foreach: bool = True,
) -> list[Tensor]:
    """d = (-g if maximize else g) + wd * w (coupled weight decay), one foreach op each
    (one op per tensor with ``foreach=False``).

    New tensors where anything is negated or added (written into ``workspace``, scratch
    shaped like the lists, when given); ``p.grad`` is never modified. The gradient
    statistics never see the decay term."""
    if maximize:
        grads = torch._foreach_neg(grads) if foreach else [-g for g in grads]
    if weight_decay != 0:
        if foreach:
            grads = into(workspace, torch.add, grads, params, alpha=weight_decay)
        else:
            grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
    return grads


def scaled_momentum_(
    params: list[Tensor], directions: list[Tensor], buffers: list[Tensor | None], *,
    inner: Scale | None, outer: Scale, momentum: float, dampening: float, nesterov: bool,
    per_layer=UNBOUND.per_layer, owns_directions: bool = False, decay: Scale | None = None, foreach: bool = True,
) -> None:
    r"""Momentum SGD with per-layer scales, the rate inside or outside the buffer, in place.

    With :math:`s` = ``inner`` (1 when None) and :math:`o` = ``outer``:

    .. math::

        v_1 = s\,d,\qquad v_t = m v_{t-1} + (1 - \text{dampening})\, s\, d,\qquad
        w \leftarrow w - o\,(s\,d + m v_t) \ (\text{nesterov})\ \text{ else }\ w - o\,v_t

    and :math:`w \leftarrow w - o\,s\,d` without momentum. LARS (You et al. 2017,
    Algorithm 1) and CLARS put the rate inside (``inner`` = rate x ratio, ``outer`` = 1);
    LENA and AdaScale, as ``torch.optim.SGD``, outside (``inner`` None, ``outer`` the
    per-layer rates). The buffer is seeded with the scaled update, never the raw
    gradient, as SGD seeds it with d. ``decay`` multiplies the weights first
    (decoupled weight decay, ``1 - lr * wd``).

    Scales are numbers, 0-d tensors or 1-D per-layer vectors, which ``per_layer`` (the
    layout's) splits to match the lists; nothing is read back to the host. ``buffers``
    is filled in where it holds None. ``owns_directions``: d may be overwritten (it is
    not ``p.grad``). ``foreach=False`` runs the same ops one tensor at a time.
    """
    s, o = inner, outer
    moving = momentum != 0
    # per-entry scales, each per-layer vector into a slot of its own (valid for this call)
    if s is None:  # the buffer holds d; the rate multiplies it on its way into the weights
        neg_step = neg_outer = _each(per_layer, -o, 0)
        into_buffer = seed = neg_m_outer = None
    else:  # the buffer holds s * d; each scale formed only where the update uses it
        direct = not moving or nesterov  # s * d goes into the weights
        neg_step = _each(per_layer, -(s if not isinstance(o, Tensor) and o == 1.0 else s * o), 0) if direct else None
        into_buffer = _each(per_layer, s if dampening == 0 else s * (1 - dampening), 1) if moving else None
        seed = into_buffer if dampening == 0 or not moving else _each(per_layer, s, 2)
        neg_outer = -o if moving and not nesterov else None
        neg_m_outer = -momentum * o if moving and nesterov else None
    options = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, scaled=s is not None,
                   owns_directions=owns_directions, decay=decay)
    if foreach:
        _momentum_step(params, directions, buffers, neg_step, into_buffer, seed, neg_outer, neg_m_outer, **options)
        return
    for i in range(len(params)):
        pick = _one(i)
        entry = [buffers[i]]
        _momentum_step([params[i]], [directions[i]], entry, pick(neg_step), pick(into_buffer), pick(seed),
                       pick(neg_outer), neg_m_outer, **options)
        buffers[i] = entry[0]


def _momentum_step(params, d, buffers, neg_step, into_buffer, seed, neg_outer, neg_m_outer, *, momentum,
                   dampening, nesterov, scaled, owns_directions, decay) -> None:
    """The foreach ops of :func:`scaled_momentum_` on lists (one-entry lists for foreach=False)."""
    if decay is not None:
        torch._foreach_mul_(params, decay)
    if momentum == 0:
        add_scaled_(params, d, neg_step)
        return
    if all(b is not None for b in buffers):
        torch._foreach_mul_(buffers, momentum)
        add_scaled_(buffers, d, into_buffer if scaled else 1 - dampening)
    else:  # some buffers new: seed those with s * d (d itself when unscaled), update the rest
        for k, update in enumerate(d):
            if buffers[k] is None:
                buffers[k] = update * _at(seed, k) if scaled else torch.clone(update).detach()
            elif scaled:
                buffers[k].mul_(momentum).add_(update * _at(into_buffer, k))
            else:
                buffers[k].mul_(momentum).add_(update, alpha=1 - dampening)
    if not nesterov:
        add_scaled_(params, buffers, neg_outer)
    elif scaled:  # w -= o s d + o m v
        add_scaled_(params, d, neg_step)
        add_scaled_(params, buffers, neg_m_outer)
    else:  # w -= o (d + m v), as torch.optim.SGD
        if owns_directions:
            torch._foreach_add_(d, buffers, alpha=momentum)
        else:
            d = torch._foreach_add(d, buffers, alpha=momentum)
        add_scaled_(params, d, neg_outer)


def _each(per_layer, scale: Scale, slot: int):
    """A per-layer vector as the layout's per-entry scales; numbers and 0-d tensors stay."""
    if isinstance(scale, Tensor) and scale.dim() == 1:
        return per_layer(scale, slot)
    return scale


def _at(scale, k: int):
    return scale[k] if isinstance(scale, list) else scale


def _one(i: int):
    def pick(value):
        return [value[i]] if isinstance(value, list) else value
    return pick


# -- the step --------------------------------------------------------------------------------

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


class Part:
    """One parameter group's stepped parameters in this step: positions ``start:end`` of the
    step's parameter list, their state dicts, the group's layout and the lists the update
    works on (the layout's: the tensors, their local shards, or stacks filled once per step)."""

    def __init__(self, group: dict, params: list[Tensor], start: int, layout: Layout, states: list[dict]) -> None:
        self.group, self.params, self.start, self.end = group, params, start, start + len(params)
        self.layout, self.states = layout, states
        self.weights, self.grads = layout.enter(params, list(map(operator.attrgetter("grad"), params)))

    def in_layout_order(self, vector: Tensor) -> Tensor:
        """This part's slice of a per-parameter [P] vector, in the layout's order."""
        return self.layout.to_layout_order(vector[self.start : self.end])

    def weight_norms(self) -> Tensor:
        """||w_k|| of the group's parameters, in parameter order."""
        (norms,) = self.layout.norms([self.weights])
        return self.layout.to_param_order(norms)


class LayerwiseOptimizer(Optimizer):
    """The base of every optimiser here: the step of the module docstring, and introspection.

    Subclasses give ``_validate_group``, ``_update`` and, when their scales span the
    groups, ``_scales``; ``_state_names`` lists the state the layout must hold (a group
    whose stacks cannot hold it as it is steps its tensors themselves for that step).

    Introspection: ``_introspected`` names the per-layer tensors a step records; after
    each step :meth:`last` gives, per group, the 1-D tensor of one of them over the
    parameters that had gradients (None for a group without). Attributes only, never
    in ``state_dict()``; recording them costs nothing, they are the step's own tensors.
    """

    _introspected: tuple[str, ...] = ("trust_ratio",)
    _state_names: tuple[str, ...] = ("momentum_buffer",)

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._clear_transient()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._clear_transient()

    def _clear_transient(self) -> None:
        """What the optimiser keeps beside its state: layouts, scratch, the last step's tensors."""
        self._layouts = Layouts()
        self._workspace = Workspace()
        self._stepped: list[list[int]] = []
        self._last: dict[str, list[Tensor | None]] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the step's hooks

    def _begin(self) -> Any:
        """What the step reads before collecting the parameters (a statistics summary)."""
        return None

    def _scales(self, parts: list[Part], params: list[Tensor], groups_of: list[dict], source: Any
                ) -> tuple[list[Any], dict[str, Tensor]]:
        """Per part, what ``_update`` applies; and the per-parameter [P] vectors to record."""
        return [None] * len(parts), {}

    def _update(self, part: Part, scale: Any) -> dict[str, Tensor | None]:  # pragma: no cover - abstract
        """Step one part; return per-layer tensors to record, in the layout's order."""
        raise NotImplementedError

    def _finish(self) -> None:
        """After the update (statistics consumers reset their source)."""

    def _multi_tensor(self, group: dict) -> bool:
        """Whether the group takes the eager multi-tensor path (where stacks may step it)."""
        return group["foreach"] is not False and not group.get("fused", False)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one step (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        source = self._begin()
        params, groups_of, stepped = stepped_parameters(self.param_groups, type(self).__name__)
        if not params:
            self._record(stepped, [], {})
            return loss
        parts, start = [], 0
        for group, indices in zip(self.param_groups, stepped):
            if indices:
                ps = params[start : start + len(indices)]
                states = list(map(self.state.__getitem__, ps))  # looked up once a step (hashing is Python)
                layout = self._layouts.of(ps, foreach=self._multi_tensor(group), states=states, names=self._state_names)
                parts.append(Part(group, ps, start, layout, states))
                start += len(indices)
        scales, vectors = self._scales(parts, params, groups_of, source)
        per_part = []
        for part, scale in zip(parts, scales):
            found = self._update(part, scale)
            part.layout.leave(part.params)
            per_part.append({name: part.layout.to_param_order(value) for name, value in found.items()})
        self._record(stepped, per_part, vectors)
        self._finish()
        return loss

    def _momentum_update(self, part: Part, *, inner: Scale | None, outer: Scale, weight_decay: float,
                         decay: Scale | None = None) -> None:
        """:func:`scaled_momentum_` on a part, with its group's options; the momentum buffers
        are the layout's (new ones kept in the state), d goes into scratch."""
        group, layout = part.group, part.layout
        foreach = self._multi_tensor(group)
        owns = group["maximize"] or weight_decay != 0
        scratch = layout.scratch(part.params, self._workspace) if foreach and weight_decay != 0 else None
        d = directions(part.weights, part.grads, weight_decay, maximize=group["maximize"], workspace=scratch,
                       foreach=foreach)
        momentum = group["momentum"] != 0
        buffers = layout.state(part.states, "momentum_buffer") if momentum else [None] * len(d)
        new = momentum and any(b is None for b in buffers)
        scaled_momentum_(
            part.weights, d, buffers, inner=inner, outer=outer, momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"], per_layer=layout.per_layer,
            owns_directions=owns, decay=decay, foreach=foreach,
        )
        if new:
            layout.adopt(part.states, part.params, "momentum_buffer", buffers)

    # -- introspection

    def _record(self, stepped: list[list[int]], per_part: list[dict[str, Tensor | None]],
                vectors: dict[str, Tensor]) -> None:
        """Keep the step's per-layer tensors per group: ``per_part`` (one dict per stepped group,
        in parameter order) and ``vectors`` (over all stepped parameters, split here)."""
        self._stepped = stepped
        last: dict[str, list[Tensor | None]] = {name: [None] * len(stepped) for name in self._introspected}
        parts = iter(per_part)
        start = 0
        for g, indices in enumerate(stepped):
            if not indices:
                continue
            found = next(parts, {})
            for name in self._introspected:
                if name in vectors:
                    last[name][g] = vectors[name][start : start + len(indices)]
                elif name in found:
                    value = found[name]
                    last[name][g] = value if value is not None else torch.ones(
                        len(indices), device=self.param_groups[g]["params"][indices[0]].grad.device)
            start += len(indices)
        self._last = last

    def last(self, name: str) -> list[Tensor | None]:
        """Per group: the 1-D tensor of ``name`` for the parameters stepped last (None if none)."""
        values = self._last.get(name, [])
        return list(values) + [None] * (len(self.param_groups) - len(values))

    def by_name(self, name: str) -> dict[str, Tensor]:
        """``{parameter name: 0-d value}`` of the last step (``group{g}.{i}`` without names)."""
        out: dict[str, Tensor] = {}
        for g, (group, values) in enumerate(zip(self.param_groups, self.last(name))):
            if values is None:
                continue
            names = group.get("param_names")
            for value, i in zip(values.unbind(), self._stepped[g]):
                out[names[i] if names else f"group{g}.{i}"] = value
        return out

    def effective_lrs(self) -> list[Tensor | None]:
        """Per group: the rate applied to each parameter stepped last (``lr`` times its trust
        ratio, where the method has one)."""
        if "effective_lr" in self._introspected:
            return self.last("effective_lr")
        return [
            None if ratios is None else ratios * group["lr"]
            for group, ratios in zip(self.param_groups, self.last("trust_ratio"))
        ]


def recorded(name: str, doc: str) -> property:
    """A per-group introspection attribute (``last_gains``, ...): ``optimizer.last(name)``."""
    return property(lambda optimizer: optimizer.last(name), doc=doc)

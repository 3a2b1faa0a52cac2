r"""LARS: layer-wise adaptive rate scaling.

You, Gitman, Ginsburg (2017), "Large Batch Training of Convolutional
Networks", arXiv:1708.03888, Algorithm 1. For each layer (parameter tensor)
:math:`w` with gradient :math:`g`, weight decay :math:`\beta`, momentum
:math:`m`, global rate :math:`\eta_t` and trust coefficient :math:`\eta`:

.. math::

    \text{local} = \eta \frac{\lVert w\rVert}{\lVert g\rVert + \beta\lVert w\rVert + \epsilon},
    \qquad v \leftarrow m v + \eta_t\,\text{local}\,(g + \beta w),
    \qquad w \leftarrow w - v.

The functional core is :func:`lars` with a per-tensor path
(:func:`_single_tensor_lars`) and a multi-tensor path
(:func:`_multi_tensor_lars`, the default); :class:`LARS` gathers the state and
calls it. Each group is stepped through its layout (:mod:`._layout`, chosen
once per group): the tensors themselves, FSDP2 (``fully_shard``, DTensor)
local shards with the norms of whole layers from one all-reduce per step
(:func:`_sharded_lars`), or per-shape stacks of many small CPU tensors; the
core :func:`_lars_device_step` calls the layout's ``norms`` and ``per_layer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._layout import ShardedLayout, TensorLayout
from ._sharded import check_not_flat, local
from ._stacked import StackedLayout
from ._trust import (
    TrustRatioOptimizer,
    add_scaled_,
    any_sharded,
    as_sharded_like,
    check_bool,
    check_choice,
    check_foreach_fused,
    check_lr,
    check_range,
    compiled,
    group_by_device_and_dtype,
    into,
    scatter_by_indices,
    trust_ratios,
)

__all__ = ["LARS", "lars"]

DENOMINATORS = ("separate", "combined")


class LARS(TrustRatioOptimizer):
    r"""LARS (You, Gitman, Ginsburg 2017, arXiv:1708.03888), with its common variants as options.

    Per parameter tensor ("layer") and step, with :math:`d = g + \beta w`
    (:math:`\beta` = ``weight_decay``):

    .. math::

        \text{local} = \texttt{trust\_coefficient}\cdot
            \frac{\lVert w\rVert}{N + \texttt{eps}},\quad
        N = \begin{cases}\lVert g\rVert + \beta\lVert w\rVert & \texttt{denominator="separate"} \\
                         \lVert g + \beta w\rVert & \texttt{denominator="combined"}\end{cases}

    ``local`` is 1 where :math:`\lVert w\rVert = 0` or :math:`N = 0` (so a
    zero-initialised bias still moves), is capped at 1 with ``trust_clip``
    (LARC: effective rate :math:`\min(\text{local}\,\eta_t, \eta_t)`), and is
    1 in a group with ``adapt=False`` (the update is then exactly
    ``torch.optim.SGD``). With the scale :math:`s = \eta_t\,\text{local}`
    (``lr_in_momentum=True``) or :math:`s = \text{local}` (``False``):

    .. math::

        v_1 = s\,d,\qquad v_t = m v_{t-1} + (1 - \texttt{dampening})\, s\, d,

        u = s\,d + m v_t \ (\texttt{nesterov})\ \text{ else }\ u = v_t,\qquad
        w \leftarrow w - u \ \ (\text{or } w - \eta_t u \text{ when the rate is outside}).

    First step: the buffer is seeded with the *scaled* update :math:`s\,d`
    (never the raw gradient) and without dampening, as ``torch.optim.SGD``
    seeds it with :math:`d`; so the first step has the size of every later
    one. With ``momentum=0`` there is no buffer: :math:`w \leftarrow w - \eta_t\,
    \text{local}\, d`.

    Args:
        params: tensors, dicts (parameter groups) or ``named_parameters()``.
            Every argument below except ``foreach``/``fused`` may be set per
            group; the exclusion masks are per-group ``weight_decay=0`` and,
            independently, ``adapt=False``.
        lr: global rate :math:`\eta_t`, float or 1-element tensor (default: 1.0).
        momentum: :math:`m`, in [0, 1) (default: 0.9).
        dampening: in [0, 1] (default: 0).
        weight_decay: :math:`\beta \ge 0`, L2 term added to the gradient and to
            the trust-ratio denominator (default: 0).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and
            ``dampening == 0`` (default: False).
        trust_coefficient: :math:`\eta` of the paper (default: 0.001).
        eps: added to the denominator (default: 1e-8).
        denominator: ``"separate"`` :math:`\lVert g\rVert+\beta\lVert w\rVert`
            (the paper, default) or ``"combined"`` :math:`\lVert g+\beta w\rVert`
            (TensorFlow / SimCLR implementations).
        lr_in_momentum: ``True`` (default, the paper): the rate multiplies the
            update before it enters the buffer, so a schedule changes new
            contributions only; ``False`` (the usual PyTorch port): the buffer
            holds ``local * d`` and the rate multiplies the buffer. Both are
            identical at a constant rate.
        trust_clip: cap ``local`` at 1 (LARC clipping). Note apex/timm clip the
            *product* ``local`` at ``lr`` instead; this is the
            :math:`\min(\text{local}\,\eta_t, \eta_t)` form (default: False).
        adapt: use the trust ratio in this group (default: True).
        maximize: ascend instead of descend (default: False).
        foreach: multi-tensor path (``None``, the default, means True); on it
            a list of many small CPU tensors of few shapes is stepped as one stack
            per shape (:mod:`largebatch.optim._stacked`), with the same results.
        fused: run the multi-tensor core compiled with ``torch.compile``
            (cached per configuration; eager with a warning where it cannot
            compile) (default: False).

    After each step ``last_trust_ratios`` holds, per group, the 1-D tensor of
    ``local`` (after clipping) for the parameters that had gradients; it is
    never part of ``state_dict()``. State per parameter: ``momentum_buffer``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
        denominator: str = "separate",
        lr_in_momentum: bool = True,
        trust_clip: bool = False,
        adapt: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        check_foreach_fused(foreach, fused)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            trust_coefficient=trust_coefficient,
            eps=eps,
            denominator=denominator,
            lr_in_momentum=lr_in_momentum,
            trust_clip=trust_clip,
            adapt=adapt,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        validate_lars_hyperparameters(**{k: group[k] for k in _HYPERPARAMETERS})
        check_not_flat(group["params"])  # FSDP1 / ZeRO flat layouts: per-layer norms impossible

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> Tensor | None:
        layout = self._layouts.of(params, foreach=group["foreach"] is not False and not group["fused"])
        if isinstance(layout, StackedLayout):
            stepped, ratios = self._step_stacked(group, params, grads, layout)
            if stepped:
                return ratios
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        new_buffers = group["momentum"] != 0 and any(b is None for b in buffers)
        ratios = lars(
            params,
            grads,
            buffers,
            **{k: group[k] for k in _HYPERPARAMETERS},
            foreach=group["foreach"],
            fused=group["fused"],
            workspace=None if group["fused"] else self._workspace.like(params),
        )
        if new_buffers:
            for p, buffer in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buffer
        return ratios

    def _step_stacked(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], layout: StackedLayout
    ) -> tuple[bool, Tensor | None]:
        """The multi-tensor core on per-shape stacks (:mod:`._stacked`): many small tensors."""
        validate_lars_hyperparameters(**{k: group[k] for k in _HYPERPARAMETERS}, read_lr=False)
        buffers: list[Tensor] | None | bool = None
        if group["momentum"] != 0:
            buffers = layout.state(self.state, params, "momentum_buffer")
            if buffers is False:  # some buffers new, some not: the per-tensor lists handle it
                return False, None
        weights, grad_stacks = layout.enter(params, grads)
        stacks = buffers if isinstance(buffers, list) else [None] * len(weights)
        options = {k: group[k] for k in _HYPERPARAMETERS if k != "lr"}
        ratios = _lars_device_step(
            weights, grad_stacks, stacks, group["lr"], workspace=layout.workspace(params), layout=layout, **options,
        )
        layout.leave(params)
        if buffers is None and group["momentum"] != 0:
            layout.adopt(self.state, params, "momentum_buffer", stacks)
        return True, layout.to_param_order(ratios)


_HYPERPARAMETERS = (
    "lr",
    "momentum",
    "dampening",
    "weight_decay",
    "nesterov",
    "trust_coefficient",
    "eps",
    "denominator",
    "lr_in_momentum",
    "trust_clip",
    "adapt",
    "maximize",
)


def validate_lars_hyperparameters(
    *,
    lr: Any,
    momentum: Any,
    dampening: Any,
    weight_decay: Any,
    nesterov: Any,
    trust_coefficient: Any,
    eps: Any,
    denominator: Any,
    lr_in_momentum: Any,
    trust_clip: Any,
    adapt: Any,
    maximize: Any,
    read_lr: bool = True,
) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter. ``read_lr=False`` (inside
    a step): a tensor lr's value is not read (no host sync), only its shape."""
    check_lr(lr, read=read_lr)
    check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    check_range("dampening", dampening, 0.0, 1.0)
    check_range("weight_decay", weight_decay, 0.0)
    check_range("trust_coefficient", trust_coefficient, 0.0)
    check_range("eps", eps, 0.0)
    check_choice("denominator", denominator, DENOMINATORS)
    for name, flag in (
        ("nesterov", nesterov),
        ("lr_in_momentum", lr_in_momentum),
        ("trust_clip", trust_clip),
        ("adapt", adapt),
        ("maximize", maximize),
    ):
        check_bool(name, flag)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov: Nesterov momentum needs momentum > 0 and dampening = 0")


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    trust_coefficient: float,
    eps: float,
    denominator: str,
    lr_in_momentum: bool,
    trust_clip: bool,
    adapt: bool,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool = False,
    workspace: list[Tensor] | None = None,
) -> Tensor | None:
    """Functional LARS: update ``params`` in place; see :class:`LARS` for the maths.

    ``momentum_buffers`` holds one entry per parameter (``None`` before the
    first step); new buffers are written into it. Returns the 1-D tensor of
    trust ratios (one per parameter), or ``None`` when ``adapt`` is False.
    ``grads`` are never modified. ``workspace`` (optional, one scratch tensor
    per parameter, e.g. ``Workspace.like(params)``) lets the eager
    multi-tensor path write ``g + weight_decay * w`` there instead of
    allocating it. DTensor (FSDP2) parameters always take the multi-tensor
    path on their local shards (:func:`_sharded_lars`).
    """
    options = dict(
        momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov, trust_coefficient=trust_coefficient, eps=eps,
        denominator=denominator, lr_in_momentum=lr_in_momentum, trust_clip=trust_clip,
        adapt=adapt, maximize=maximize,
    )
    validate_lars_hyperparameters(lr=lr, **options, read_lr=False)
    if not params:
        return None
    if any_sharded(params):
        return _sharded_lars(params, grads, momentum_buffers, lr=lr, workspace=workspace, **options)
    if foreach is None:
        foreach = not torch.jit.is_scripting()
    if fused:
        return _multi_tensor_lars(params, grads, momentum_buffers, lr=lr, compile=True, **options)
    if foreach:
        return _multi_tensor_lars(
            params, grads, momentum_buffers, lr=lr, workspace=workspace, **options
        )
    return _single_tensor_lars(params, grads, momentum_buffers, lr=lr, **options)


def _single_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    trust_coefficient: float,
    eps: float,
    denominator: str,
    lr_in_momentum: bool,
    trust_clip: bool,
    adapt: bool,
    maximize: bool,
) -> Tensor | None:
    """Per-tensor loop: the readable form of the update, and the path for foreach=False."""
    outer = 1.0 if lr_in_momentum else lr  # the rate applied to the buffer
    ratios = []
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        update = grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad

        if adapt:
            weight_norm = torch.linalg.vector_norm(param)
            if denominator == "combined":
                update_norm = torch.linalg.vector_norm(update)
            else:
                update_norm = torch.linalg.vector_norm(grad) + weight_decay * weight_norm
            ratio = trust_ratios(
                weight_norm, update_norm, coefficient=trust_coefficient, eps=eps, clip=trust_clip
            )
            ratios.append(ratio)
            scale = ratio * lr if lr_in_momentum else ratio
        else:
            scale = lr if lr_in_momentum else 1.0

        if momentum != 0:
            buffer = momentum_buffers[i]
            if buffer is None:
                # Seed with the scaled update (as SGD seeds with d): never the raw gradient.
                buffer = momentum_buffers[i] = update * scale
            else:
                buffer.mul_(momentum).add_(update * (scale * (1 - dampening)))
            step = update * scale + momentum * buffer if nesterov else buffer
        else:
            step = update * scale
        param.sub_(step * outer if isinstance(outer, Tensor) or outer != 1.0 else step)
    return torch.stack(ratios) if adapt else None


def _multi_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    compile: bool = False,
    workspace: list[Tensor] | None = None,
    **options: Any,
) -> Tensor | None:
    """Multi-tensor path: per (device, dtype) group, norms with one
    ``_foreach_norm`` each, ratios in one vectorised op, updates with foreach ops."""
    results = []
    scratch = [workspace] if workspace is not None else []
    for (device_params, device_grads, device_buffers, *device_scratch), indices in (
        group_by_device_and_dtype([params, grads, momentum_buffers, *scratch])
    ):
        use_momentum = options["momentum"] != 0
        first_step = use_momentum and any(b is None for b in device_buffers)
        if compile and not first_step:
            # Static options form the cache key; the rate goes in as a tensor
            # so a schedule never triggers recompilation.
            key = tuple(sorted(options.items()))
            step_fn = compiled(_lars_device_step, key)
            rate = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float32)
            ratios = step_fn(
                device_params, device_grads, device_buffers,
                rate.to(device_params[0].device), **options,
            )
        else:
            ratios = _lars_device_step(
                device_params, device_grads, device_buffers, lr,
                workspace=device_scratch[0] if device_scratch else None, **options,
            )
        if first_step:
            for i, buffer in zip(indices, device_buffers):
                momentum_buffers[i] = buffer
        if ratios is not None:
            results.append((ratios, indices))
    return scatter_by_indices(results, len(params))


def _sharded_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    workspace: list[Tensor] | None = None,
    **options: Any,
) -> Tensor | None:
    """FSDP2: the multi-tensor step on the local shards; the norms of whole layers
    (weights and gradients together) come from one all-reduce (:class:`~._layout.ShardedLayout`).
    New momentum buffers are DTensors laid out like their parameters."""
    check_not_flat(params)
    local_buffers = [local(b) for b in momentum_buffers]
    ratios = _lars_device_step(
        [local(p) for p in params], [local(g) for g in grads], local_buffers, lr,
        workspace=None if workspace is None else [local(w) for w in workspace],
        layout=ShardedLayout(params), **options,
    )
    for i, buffer in enumerate(local_buffers):
        if momentum_buffers[i] is None and buffer is not None:
            momentum_buffers[i] = as_sharded_like(buffer, params[i])
    return ratios


def _lars_device_step(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor | None],
    lr: float | Tensor,
    *,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    trust_coefficient: float,
    eps: float,
    denominator: str,
    lr_in_momentum: bool,
    trust_clip: bool,
    adapt: bool,
    maximize: bool,
    workspace: list[Tensor] | None = None,
    layout: TensorLayout | StackedLayout = TensorLayout(()),
) -> Tensor | None:
    """One LARS step for tensors on one device with one dtype (``buffers`` filled in place).

    ``layout`` (:mod:`._layout`) gives the per-layer norms of several lists at once
    (``norms``: foreach norms, whole-layer norms of FSDP2 shards with one all-reduce, or
    row norms of stacks) and splits a per-layer vector to match the list entries
    (``per_layer``)."""
    norms, per_layer = layout.norms, layout.per_layer
    if maximize:
        grads = torch._foreach_neg(grads)
    # d = g + wd*w is materialised once (into the workspace when there is one):
    # the momentum update needs it, and so does the norm of the "combined" denominator.
    updates = into(workspace, torch.add, grads, params, alpha=weight_decay) if weight_decay != 0 else grads

    ratios = None
    if adapt:
        if denominator == "combined":
            weight_norms, update_norms = norms([params, updates])
        else:
            weight_norms, update_norms = norms([params, grads])
            if weight_decay != 0:
                update_norms = torch.add(update_norms, weight_norms, alpha=weight_decay)
        ratios = trust_ratios(
            weight_norms, update_norms, coefficient=trust_coefficient, eps=eps, clip=trust_clip
        )

    # scale: what multiplies d on its way into the buffer; outer: what
    # multiplies the buffer on its way into the weights. Per-tensor scales are
    # a vector (one op) handed to the foreach ops as 0-d tensors from unbind.
    if ratios is not None:
        scale: float | Tensor = ratios * lr if lr_in_momentum else ratios
    else:
        scale = lr if lr_in_momentum else 1.0
    outer = 1.0 if lr_in_momentum else lr

    if momentum == 0:
        add_scaled_(params, updates, _per_tensor(-(scale * outer), per_layer))
        return ratios

    if all(b is not None for b in buffers):
        torch._foreach_mul_(buffers, momentum)
        add_scaled_(buffers, updates, _per_tensor(scale * (1 - dampening), per_layer))
    else:
        _seed_or_accumulate(buffers, updates, _per_tensor(scale, per_layer), momentum, dampening)

    if nesterov:
        add_scaled_(params, updates, _per_tensor(-(scale * outer), per_layer))
        add_scaled_(params, buffers, -momentum * outer)
    else:
        add_scaled_(params, buffers, -outer)
    return ratios


def _per_tensor(scale: float | Tensor, per_layer) -> float | Tensor | list[Tensor]:
    """A vector of per-layer scales becomes one broadcastable tensor per list entry
    (``per_layer``: 0-d tensors, or ``[k, 1, ...]`` views for stacks); scalars stay."""
    if isinstance(scale, Tensor) and scale.dim() == 1:
        return per_layer(scale)
    return scale


def _seed_or_accumulate(
    buffers: list[Tensor | None],
    updates: list[Tensor],
    scales: float | Tensor | list[Tensor],
    momentum: float,
    dampening: float,
) -> None:
    """Steps where some buffers are new: seed those with ``scale * d``, update the rest."""
    for i, update in enumerate(updates):
        s = scales[i] if isinstance(scales, list) else scales
        if buffers[i] is None:
            buffers[i] = update * s
        else:
            buffers[i].mul_(momentum).add_(update * (s * (1 - dampening)))

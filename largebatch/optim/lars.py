r"""LARS: layer-wise adaptive rate scaling.

You, Gitman, Ginsburg (2017), "Large Batch Training of Convolutional
Networks", arXiv:1708.03888, Algorithm 1. For each layer (parameter tensor)
:math:`w` with gradient :math:`g`, weight decay :math:`\beta`, momentum
:math:`m`, global rate :math:`\eta_t` and trust coefficient :math:`\eta`:

.. math::

    \text{local} = \eta \frac{\lVert w\rVert}{\lVert g\rVert + \beta\lVert w\rVert + \epsilon},
    \qquad v \leftarrow m v + \eta_t\,\text{local}\,(g + \beta w),
    \qquad w \leftarrow w - v.

The per-layer scale is :func:`lars_trust_ratios`, a pure function of the
norms; the update is the shared momentum kernel
(:func:`~.base.scaled_momentum_`, the rate inside the buffer by default). The
functional core is :func:`lars` with a per-tensor path
(:func:`_single_tensor_lars`) and a multi-tensor path
(:func:`_multi_tensor_lars`, the default); :class:`LARS` steps each group
through its layout (:mod:`._layout`: the tensors themselves, FSDP2 local
shards with the norms of whole layers from one all-reduce per step, or
per-shape stacks of many small CPU tensors) and calls it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._checks import check_bool, check_choice, check_foreach_fused, check_lr, check_range
from ._foreach import compiled, group_by_device_and_dtype, scatter_by_indices
from ._layout import UNBOUND, Layout, ShardedLayout
from ._sharded import any_sharded, as_sharded_like, check_not_flat, local
from .base import LayerwiseOptimizer, Part, directions, recorded, scaled_momentum_

__all__ = ["LARS", "lars", "lars_trust_ratios", "trust_ratios"]

DENOMINATORS = ("separate", "combined")


class LARS(LayerwiseOptimizer):
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
            per shape (:class:`largebatch.optim._layout.StackedLayout`), with the same results.
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
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            trust_coefficient=trust_coefficient, eps=eps, denominator=denominator, lr_in_momentum=lr_in_momentum,
            trust_clip=trust_clip, adapt=adapt, maximize=maximize, foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)

    def step(self, closure: Any = None) -> Any:
        """One LARS step (You, Gitman, Ginsburg 2017, Algorithm 1): per group, the trust ratios of
        ``lars_trust_ratios`` from the norms, then the momentum kernel with s = eta_t * local."""
        return super().step(closure)

    def _validate_group(self, group: dict[str, Any]) -> None:
        validate_lars_hyperparameters(**{k: group[k] for k in _HYPERPARAMETERS})
        check_not_flat(group["params"])  # FSDP1 / ZeRO flat layouts: per-layer norms impossible

    last_trust_ratios = recorded("trust_ratio", "Per group, the trust ratios of the last step.")

    def trust_ratios_by_name(self) -> dict[str, Tensor]:
        """``{name: 0-d ratio}`` of the last step (``by_name``)."""
        return self.by_name("trust_ratio")

    def _update(self, part: Part, scale: None) -> dict[str, Tensor | None]:
        """The functional core on the group's lists, as its layout holds them."""
        group, layout = part.group, part.layout
        momentum = group["momentum"] != 0
        buffers = layout.state(part.states, "momentum_buffer") if momentum else [None] * len(part.weights)
        new = momentum and any(b is None for b in buffers)
        ratios = lars(
            part.weights, part.grads, buffers,
            **{k: group[k] for k in _HYPERPARAMETERS},
            foreach=group["foreach"], fused=group["fused"],
            workspace=None if group["fused"] else layout.scratch(part.params, self._workspace),
            layout=layout,
        )
        if new:
            layout.adopt(part.states, part.params, "momentum_buffer", buffers)
        return {"trust_ratio": ratios}


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


def trust_ratios(
    numerator_norms: Tensor,
    denominator_norms: Tensor,
    *,
    coefficient: float | Tensor = 1.0,
    eps: float | Tensor = 0.0,
    clip: bool = False,
    adapt: Tensor | None = None,
) -> Tensor:
    """``coefficient * num / (den + eps)`` per layer, 1 where either norm is 0 (You et al. 2017).

    Both arguments are 1-D tensors (one entry per layer). A zero weight norm (a
    zero-initialised bias) or a zero update norm gives ratio 1, so such a layer is
    still updated at the global rate; the test is ``> 0`` on both, never ``>= 0``,
    through ``torch.where`` (no host sync). ``clip`` caps the ratio at 1 (LARC: the
    effective rate never exceeds the global one); ``adapt`` (a bool mask) gives 1
    where it is False. Hyperparameters may be numbers or per-layer vectors.
    """
    ratio = coefficient * numerator_norms / (denominator_norms + eps)
    keep = (numerator_norms > 0) & (denominator_norms > 0)
    if adapt is not None:
        keep = keep & adapt
    ratio = torch.where(keep, ratio, torch.ones_like(ratio))
    if clip:
        ratio = ratio.clamp(max=1.0)
    return ratio


def lars_trust_ratios(
    weight_norms: Tensor, gradient_norms: Tensor, *, weight_decay: float, trust_coefficient: float,
    eps: float, trust_clip: bool = False,
) -> Tensor:
    r"""LARS's per-layer scale (You, Gitman, Ginsburg 2017, Algorithm 1), a pure function of the norms:

    .. math:: \text{local} = \eta\,\lVert w\rVert / (\lVert g\rVert + \beta\lVert w\rVert + \epsilon)

    ``gradient_norms`` is :math:`\lVert g\rVert` (``denominator="separate"``) or
    :math:`\lVert g + \beta w\rVert` with ``weight_decay=0`` (``"combined"``); CLARS
    passes its own gradient measure."""
    if weight_decay != 0:
        gradient_norms = torch.add(gradient_norms, weight_norms, alpha=weight_decay)
    return trust_ratios(weight_norms, gradient_norms, coefficient=trust_coefficient, eps=eps, clip=trust_clip)


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
    layout: Layout | None = None,
) -> Tensor | None:
    """Functional LARS: update ``params`` in place; see :class:`LARS` for the maths.

    ``momentum_buffers`` holds one entry per parameter (``None`` before the
    first step); new buffers are written into it. Returns the 1-D tensor of
    trust ratios (one per parameter, in the layout's order), or ``None`` when
    ``adapt`` is False. ``grads`` are never modified. ``workspace`` (optional,
    one scratch tensor per parameter, e.g. ``Workspace.like(params)``) lets the
    eager multi-tensor path write ``g + weight_decay * w`` there instead of
    allocating it. ``layout`` (:mod:`._layout`): the lists are a layout's
    (shards or stacks, stepped by the multi-tensor path); without one, DTensor
    (FSDP2) parameters take the multi-tensor path on their local shards.
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
    if layout is None and any_sharded(params):
        return _sharded_lars(params, grads, momentum_buffers, lr=lr, workspace=workspace, **options)
    layout = UNBOUND if layout is None else layout
    if not layout.own_tensors:
        return _lars_device_step(params, grads, momentum_buffers, lr, workspace=workspace, layout=layout, **options)
    if foreach is None:
        foreach = not torch.jit.is_scripting()
    if fused:
        return _multi_tensor_lars(params, grads, momentum_buffers, lr=lr, compile=True, **options)
    if foreach:
        return _multi_tensor_lars(
            params, grads, momentum_buffers, lr=lr, workspace=workspace, layout=layout, **options
        )
    return _single_tensor_lars(params, grads, momentum_buffers, lr=lr, **options)


def _single_tensor_lars(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], *, lr: float | Tensor,
    weight_decay: float, trust_coefficient: float, eps: float, denominator: str, lr_in_momentum: bool,
    trust_clip: bool, adapt: bool, maximize: bool, **momentum: Any,
) -> Tensor | None:
    """Per-tensor loop (the path for foreach=False): each tensor's norms and ratio, then the
    kernel one tensor at a time."""
    updates, ratios = [], []
    for param, grad in zip(params, grads):
        grad = -grad if maximize else grad
        update = grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad
        updates.append(update)
        if adapt:
            weight_norm = torch.linalg.vector_norm(param)
            if denominator == "combined":
                ratios.append(lars_trust_ratios(weight_norm, torch.linalg.vector_norm(update), weight_decay=0.0,
                                                trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip))
            else:
                ratios.append(lars_trust_ratios(weight_norm, torch.linalg.vector_norm(grad), weight_decay=weight_decay,
                                                trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip))
    ratio = torch.stack(ratios) if adapt else None
    _lars_momentum(params, updates, momentum_buffers, ratio, lr, lr_in_momentum=lr_in_momentum,
                   per_layer=UNBOUND.per_layer, foreach=False, **momentum)
    return ratio


def _multi_tensor_lars(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], *, lr: float | Tensor,
    compile: bool = False, workspace: list[Tensor] | None = None, layout: Layout = UNBOUND, **options: Any,
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
                workspace=device_scratch[0] if device_scratch else None, layout=layout, **options,
            )
        if first_step:
            for i, buffer in zip(indices, device_buffers):
                momentum_buffers[i] = buffer
        if ratios is not None:
            results.append((ratios, indices))
    return scatter_by_indices(results, len(params))


def _sharded_lars(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], *, lr: float | Tensor,
    workspace: list[Tensor] | None = None, **options: Any,
) -> Tensor | None:
    """FSDP2 parameters given to the functional form: the multi-tensor step on the local
    shards, the norms of whole layers from one all-reduce (:class:`~._layout.ShardedLayout`).
    New momentum buffers are DTensors laid out like their parameters."""
    check_not_flat(params)
    layout = ShardedLayout(params)
    weights, local_grads = layout.enter(params, grads)
    local_buffers = [local(b) for b in momentum_buffers]
    ratios = _lars_device_step(
        weights, local_grads, local_buffers, lr,
        workspace=None if workspace is None else [local(w) for w in workspace], layout=layout, **options,
    )
    for i, buffer in enumerate(local_buffers):
        if momentum_buffers[i] is None and buffer is not None:
            momentum_buffers[i] = as_sharded_like(buffer, params[i])
    return ratios


def _lars_device_step(
    params: list[Tensor], grads: list[Tensor], buffers: list[Tensor | None], lr: float | Tensor, *,
    weight_decay: float, trust_coefficient: float, eps: float, denominator: str, lr_in_momentum: bool,
    trust_clip: bool, adapt: bool, maximize: bool, workspace: list[Tensor] | None = None,
    layout: Layout = UNBOUND, **momentum: Any,
) -> Tensor | None:
    """One LARS step for tensors on one device with one dtype (``buffers`` filled in place);
    ``momentum`` holds ``momentum``, ``dampening`` and ``nesterov``.

    ``layout`` (:mod:`._layout`) gives the per-layer norms of several lists at once
    (foreach norms, whole-layer norms of FSDP2 shards with one all-reduce, or row norms
    of stacks) and splits a per-layer vector to match the list entries."""
    # d = g + wd*w is materialised once (into the workspace when there is one):
    # the momentum update needs it, and so does the norm of the "combined" denominator.
    updates = directions(params, grads, weight_decay, maximize=maximize, workspace=workspace)
    ratios = None
    if adapt:
        options = dict(trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip)
        if denominator == "combined":
            weight_norms, update_norms = layout.norms([params, updates])
            ratios = lars_trust_ratios(weight_norms, update_norms, weight_decay=0.0, **options)
        else:
            weight_norms, grad_norms = layout.norms([params, grads])
            ratios = lars_trust_ratios(weight_norms, grad_norms, weight_decay=weight_decay, **options)
    _lars_momentum(params, updates, buffers, ratios, lr, lr_in_momentum=lr_in_momentum, per_layer=layout.per_layer,
                   owns_directions=maximize or weight_decay != 0, **momentum)
    return ratios


def _lars_momentum(params, updates, buffers, ratios: Tensor | None, lr, *, lr_in_momentum: bool, **options) -> None:
    """The shared kernel with LARS's scales: s = lr * local inside the buffer (the paper), or
    s = local inside and the rate outside (``lr_in_momentum=False``)."""
    if ratios is not None:
        inner = ratios * lr if lr_in_momentum else ratios
    else:
        inner = lr if lr_in_momentum else 1.0
    scaled_momentum_(params, updates, buffers, inner=inner, outer=1.0 if lr_in_momentum else lr, **options)

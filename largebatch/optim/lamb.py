r"""LAMB: layer-wise adaptive moments for batch training.

You et al. (2020), "Large Batch Optimization for Deep Learning: Training BERT
in 76 minutes", arXiv:1904.00962, Algorithm 2. For each layer (parameter
tensor) :math:`w` with gradient :math:`g`:

.. math::

    m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
    v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
    r = \frac{\hat m}{\sqrt{\hat v} + \epsilon},\quad
    u = r + \lambda w,\quad
    w \leftarrow w - \eta_t \frac{\phi(\lVert w\rVert)}{\lVert u\rVert} u.

The per-layer scale is :func:`lamb_trust_ratios`, a pure function of the
norms. The functional core is :func:`lamb` with a per-tensor path
(:func:`_single_tensor_lamb`, a loop over :func:`_lamb_tensor_`), a
multi-tensor path (:func:`_multi_tensor_lamb`, the default) and a fused path
(:func:`_fused_lamb`: :func:`_lamb_tensor_` compiled once, run per tensor);
:class:`LAMB` steps each group through its layout (:mod:`._layout`: the
tensors, FSDP2 local shards with the norms of whole layers from one
all-reduce per step, or per-shape stacks) and calls it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._checks import check_bool, check_foreach_fused, check_lr, check_range
from ._foreach import add_scaled_, compiled, group_by_device_and_dtype, into, scatter_by_indices
from ._layout import UNBOUND, Layout, ShardedLayout
from ._sharded import any_sharded, check_not_flat, local
from .base import LayerwiseOptimizer, Part, recorded
from .lars import trust_ratios

__all__ = ["LAMB", "lamb", "lamb_trust_ratios"]


class LAMB(LayerwiseOptimizer):
    r"""LAMB (You et al. 2020, arXiv:1904.00962), with its common variants as options.

    Per parameter tensor ("layer") and step :math:`t` (counted per parameter):

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2,

        \hat m = m_t / (1-\beta_1^t),\ \hat v = v_t / (1-\beta_2^t)
        \ \ (\text{or } m_t, v_t \text{ with } \texttt{bias\_correction=False}),

        u = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda w,\qquad
        w \leftarrow w - \eta_t\, \rho\, u,\qquad
        \rho = \frac{\phi(\lVert w\rVert)}{\lVert u\rVert}.

    :math:`\phi` is the identity (``phi_clamp=None``, default) or
    :math:`\min(\max(z, lo), hi)` with ``phi_clamp=(lo, hi)``. :math:`\rho` is 1
    where :math:`\phi(\lVert w\rVert) = 0` or :math:`\lVert u\rVert = 0` (a
    zero-initialised bias still moves, at the plain Adam rate) and in a group
    with ``adapt=False``, where the step is exactly ``torch.optim.AdamW`` (or
    ``torch.optim.Adam`` with L2 decay when ``decoupled_weight_decay=False``).
    Both moments start at zero, as in the paper and in Adam; nothing is seeded
    with a raw gradient.

    Args:
        params: tensors, dicts (parameter groups) or ``named_parameters()``.
            Every argument below except ``foreach``/``fused`` may be set per
            group; the exclusion masks are per-group ``weight_decay=0`` and,
            independently, ``adapt=False``.
        lr: :math:`\eta_t`, float or 1-element tensor (default: 1e-3).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1) (default: (0.9, 0.999)).
        eps: :math:`\epsilon` (default: 1e-6, the paper's reference code).
        weight_decay: :math:`\lambda \ge 0` (default: 0.01).
        bias_correction: divide the moments by :math:`1-\beta^t` (default: True).
        phi_clamp: ``None`` for :math:`\phi(z) = z`, or ``(lo, hi)`` with
            ``0 <= lo <= hi`` to clamp the weight norm (default: None).
        decoupled_weight_decay: ``True`` (default, the paper): :math:`\lambda w`
            is added to the Adam ratio :math:`r` and takes part in the trust
            ratio; ``False``: :math:`\lambda w` is added to the gradient
            before the moments (L2 regularisation, as in Adam).
        adapt: use the trust ratio in this group (default: True).
        maximize: ascend instead of descend (default: False).
        foreach: multi-tensor path (``None``, the default, means True); on it
            a list of many small CPU tensors of few shapes is stepped as one stack
            per shape (:class:`largebatch.optim._layout.StackedLayout`), with the same results.
        fused: run the per-tensor update compiled with ``torch.compile``
            (dynamic shapes, so one compilation serves every tensor; cached
            per configuration; eager with a warning where it cannot compile).
            Each tensor then costs two kernels, the moments with both norms
            and the weight update: it pays on lists of large tensors; on many
            small ones the default path is faster (default: False).

    After each step ``last_trust_ratios`` holds, per group, the 1-D tensor of
    :math:`\rho` for the parameters that had gradients; it is never part of
    ``state_dict()``. State per parameter: ``step`` (0-d float32 tensor on the
    CPU, as in ``torch.optim.Adam``), ``exp_avg``, ``exp_avg_sq``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        bias_correction: bool = True,
        phi_clamp: tuple[float, float] | None = None,
        decoupled_weight_decay: bool = True,
        adapt: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        check_foreach_fused(foreach, fused)
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, phi_clamp=tuple(phi_clamp) if isinstance(phi_clamp, list) else phi_clamp,
            decoupled_weight_decay=decoupled_weight_decay, adapt=adapt, maximize=maximize, foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def step(self, closure: Any = None) -> Any:
        """One LAMB step (You et al. 2020, Algorithm 2): per group, the Adam moments, the
        update u, the trust ratios of ``lamb_trust_ratios``, then w -= eta_t * rho * u."""
        return super().step(closure)

    def _validate_group(self, group: dict[str, Any]) -> None:
        validate_lamb_hyperparameters(**{k: group[k] for k in _HYPERPARAMETERS})
        check_not_flat(group["params"])  # FSDP1 / ZeRO flat layouts: per-layer norms impossible

    _state_names = ("exp_avg", "exp_avg_sq", "step")

    last_trust_ratios = recorded("trust_ratio", "Per group, the trust ratios of the last step.")

    def trust_ratios_by_name(self) -> dict[str, Tensor]:
        """``{name: 0-d ratio}`` of the last step (``by_name``)."""
        return self.by_name("trust_ratio")

    def _update(self, part: Part, scale: None) -> dict[str, Tensor | None]:
        """The functional core on the group's lists, as its layout holds them (the state is
        created per parameter, as ``torch.optim.Adam`` does, then laid out)."""
        group, layout = part.group, part.layout
        if not all(part.states):
            for p, state in zip(part.params, part.states):
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avgs, exp_avg_sqs, steps = (layout.state(part.states, name) for name in self._state_names)
        ratios = lamb(
            part.weights, part.grads, exp_avgs, exp_avg_sqs, steps,
            **{k: group[k] for k in _HYPERPARAMETERS},
            foreach=group["foreach"], fused=group["fused"],
            workspace=None if group["fused"] else layout.scratch(part.params, self._workspace),
            layout=layout,
        )
        return {"trust_ratio": ratios}


_HYPERPARAMETERS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "bias_correction",
    "phi_clamp",
    "decoupled_weight_decay",
    "adapt",
    "maximize",
)


def validate_lamb_hyperparameters(
    *,
    lr: Any,
    betas: Any,
    eps: Any,
    weight_decay: Any,
    bias_correction: Any,
    phi_clamp: Any,
    decoupled_weight_decay: Any,
    adapt: Any,
    maximize: Any,
    read_lr: bool = True,
) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter. ``read_lr=False`` (inside
    a step): a tensor lr's value is not read (no host sync), only its shape."""
    check_lr(lr, read=read_lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
    check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
    check_range("eps", eps, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    if phi_clamp is not None:
        if not isinstance(phi_clamp, (tuple, list)) or len(phi_clamp) != 2:
            raise ValueError(f"phi_clamp: expected None or a pair (lo, hi), got {phi_clamp!r}")
        check_range("phi_clamp[0]", phi_clamp[0], 0.0)
        check_range("phi_clamp[1]", phi_clamp[1], phi_clamp[0])
    for name, flag in (
        ("bias_correction", bias_correction),
        ("decoupled_weight_decay", decoupled_weight_decay),
        ("adapt", adapt),
        ("maximize", maximize),
    ):
        check_bool(name, flag)


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    phi_clamp: tuple[float, float] | None,
    decoupled_weight_decay: bool,
    adapt: bool,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool = False,
    workspace: list[Tensor] | None = None,
    layout: Layout | None = None,
) -> Tensor | None:
    """Functional LAMB: update ``params`` and the state in place; see :class:`LAMB`.

    ``exp_avgs``/``exp_avg_sqs`` start as zeros and ``steps`` as 0-d tensors
    holding 0. Returns the 1-D tensor of trust ratios (one per parameter), or
    ``None`` when ``adapt`` is False. ``grads`` are never modified.
    ``workspace`` (optional, one scratch tensor per parameter, e.g.
    ``Workspace.like(params)``) lets the eager multi-tensor path build the
    update there instead of allocating two parameter-sized lists. DTensor
    (FSDP2) parameters always take the multi-tensor path on their local
    shards (:func:`_sharded_lamb`).
    """
    validate_lamb_hyperparameters(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
        bias_correction=bias_correction, phi_clamp=phi_clamp,
        decoupled_weight_decay=decoupled_weight_decay, adapt=adapt, maximize=maximize, read_lr=False,
    )
    if not params:
        return None
    options = _core_options(
        betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
        phi_clamp=phi_clamp, decoupled_weight_decay=decoupled_weight_decay, adapt=adapt, maximize=maximize,
    )
    state = (params, grads, exp_avgs, exp_avg_sqs, steps)
    if layout is None and any_sharded(params):
        return _sharded_lamb(*state, lr=lr, workspace=workspace, **options)
    layout = UNBOUND if layout is None else layout
    if not layout.own_tensors:
        return _lamb_device_step(*state, lr, workspace=workspace, layout=layout, **options)
    if foreach is None:
        foreach = not torch.jit.is_scripting()
    if fused:
        return _fused_lamb(*state, lr=lr, **options)
    if foreach:
        return _multi_tensor_lamb(*state, lr=lr, workspace=workspace, layout=layout, **options)
    return _single_tensor_lamb(*state, lr=lr, **options)


def _core_options(
    *, betas: tuple[float, float], eps: float, weight_decay: float, bias_correction: bool,
    phi_clamp: tuple[float, float] | None, decoupled_weight_decay: bool, adapt: bool, maximize: bool,
) -> dict[str, Any]:
    """The hyperparameters as the device step takes them (static Python values)."""
    return dict(
        beta1=float(betas[0]), beta2=float(betas[1]), eps=eps, weight_decay=weight_decay,
        bias_correction=bias_correction,
        phi_clamp=None if phi_clamp is None else (float(phi_clamp[0]), float(phi_clamp[1])),
        decoupled_weight_decay=decoupled_weight_decay, adapt=adapt, maximize=maximize,
    )


def lamb_trust_ratios(weight_norms: Tensor, update_norms: Tensor, phi_clamp: tuple[float, float] | None) -> Tensor:
    r"""LAMB's per-layer scale (You et al. 2020, Algorithm 2), a pure function of the norms:
    :math:`\rho = \phi(\lVert w\rVert) / \lVert u\rVert`, 1 where either is 0; :math:`\phi`
    the identity or the clamp to ``phi_clamp``."""
    phi = weight_norms if phi_clamp is None else weight_norms.clamp(*phi_clamp)
    return trust_ratios(phi, update_norms)


def _single_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, lr: float | Tensor, **options: Any,
) -> Tensor | None:
    """Per-tensor loop: the path for foreach=False."""
    corrections = _advance_steps(steps, params, options["beta1"], options["beta2"], options["bias_correction"])
    ratios = [
        _lamb_tensor_(*state, lr, **options)
        for state in zip(params, grads, exp_avgs, exp_avg_sqs, corrections)
    ]
    return torch.stack(ratios) if options["adapt"] else None


def _advance_steps(
    steps: list[Tensor], params: list[Tensor], beta1: float, beta2: float, bias_correction: bool
) -> list[tuple[Tensor, Tensor] | None]:
    """Add 1 to each step counter; per tensor, the bias corrections ``(1 - beta1^t, 1 - beta2^t)``
    as 0-d tensors in the parameter's precision (tensor arithmetic: no host read), or None.

    Computed outside :func:`_lamb_tensor_` so that its compiled form reads them
    as scalars: computed inside, Inductor evaluates the powers once per element."""
    for step in steps:
        step += 1
    if not bias_correction:
        return [None] * len(steps)
    out = []
    for step, param in zip(steps, params):
        t = step.to(device=param.device, dtype=param.dtype, non_blocking=True)
        out.append((1 - beta1**t, 1 - beta2**t))
    return out


def _fused_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, lr: float | Tensor, **options: Any,
) -> Tensor | None:
    """fused=True: :func:`_lamb_tensor_` compiled once per configuration with
    dynamic shapes, called per tensor on flat views.

    Inductor makes the per-tensor update two kernels, one for the moments and
    both norms, one for the weight update: about 10 passes over memory against
    about 20 for AdamW's foreach step. Compiling one tensor's update with
    dynamic shapes, rather than the whole-list multi-tensor core, is both faster
    to compile and faster to run (benchmarks/README.md)."""
    step_fn = compiled(_lamb_tensor_, tuple(sorted(options.items())), dynamic=True)
    # The rate as a tensor: a schedule never triggers recompilation.
    rate = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float32)
    results = []
    for (ps, gs, ms, vs, ss), indices in group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps]):
        device_rate = rate.to(ps[0].device)
        corrections = _advance_steps(ss, ps, options["beta1"], options["beta2"], options["bias_correction"])
        ratios = [
            step_fn(*_flat_views(p, g, m, v), c, device_rate, **options)
            for p, g, m, v, c in zip(ps, gs, ms, vs, corrections)
        ]
        if options["adapt"]:
            results.append((torch.stack(ratios), indices))
    return scatter_by_indices(results, len(params))


def _flat_views(*tensors: Tensor) -> tuple[Tensor, ...]:
    """1-D views when every tensor is contiguous (one compiled graph for all shapes), else as given."""
    if all(t.is_contiguous() for t in tensors):
        return tuple(t.detach().view(-1) for t in tensors)
    return tuple(t.detach() for t in tensors)


def _lamb_tensor_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
    bias_corrections: tuple[Tensor, Tensor] | None, lr: float | Tensor, *, beta1: float, beta2: float,
    eps: float, weight_decay: float, bias_correction: bool, phi_clamp: tuple[float, float] | None,
    decoupled_weight_decay: bool, adapt: bool, maximize: bool,
) -> Tensor | None:
    """One tensor's LAMB step, in place (Algorithm 2, the readable form); returns its trust ratio.

    ``bias_corrections`` are ``(1 - beta1^t, 1 - beta2^t)`` for this step (:func:`_advance_steps`)."""
    if maximize:
        grad = -grad
    if weight_decay != 0 and not decoupled_weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if bias_correction:
        m_hat = exp_avg / bias_corrections[0]
        v_hat = exp_avg_sq / bias_corrections[1]
    else:
        m_hat, v_hat = exp_avg, exp_avg_sq
    update = m_hat / (v_hat.sqrt() + eps)
    if weight_decay != 0 and decoupled_weight_decay:
        update.add_(param, alpha=weight_decay)
    if not adapt:
        param.sub_(update * lr)
        return None
    ratio = lamb_trust_ratios(torch.linalg.vector_norm(param), torch.linalg.vector_norm(update), phi_clamp)
    param.sub_(update * (ratio * lr))
    return ratio


def _multi_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, lr: float | Tensor,
    workspace: list[Tensor] | None = None, layout: Layout = UNBOUND, **options: Any,
) -> Tensor | None:
    """Multi-tensor path: per (device, dtype) group, moments with foreach ops,
    norms with one ``_foreach_norm`` each, ratios in one vectorised op."""
    results = []
    scratch = [workspace] if workspace is not None else []
    for grouped, indices in group_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, steps, *scratch]
    ):
        lists, device_scratch = grouped[:5], (grouped[5] if scratch else None)
        ratios = _lamb_device_step(*lists, lr, workspace=device_scratch, layout=layout, **options)
        if ratios is not None:
            results.append((ratios, indices))
    return scatter_by_indices(results, len(params))


def _sharded_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, lr: float | Tensor, workspace: list[Tensor] | None = None, **options: Any,
) -> Tensor | None:
    """FSDP2: the multi-tensor step on the local shards (the moments are DTensors
    like their parameters); the norms of whole layers (weights and updates
    together) come from one all-reduce (:class:`~._layout.ShardedLayout`)."""
    check_not_flat(params)
    shards = [[local(t) for t in tensors] for tensors in (params, grads, exp_avgs, exp_avg_sqs)]
    return _lamb_device_step(
        *shards, steps, lr,
        workspace=None if workspace is None else [local(w) for w in workspace],
        layout=ShardedLayout(params), **options,
    )


def _lamb_device_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], lr: float | Tensor, *, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction: bool, phi_clamp: tuple[float, float] | None, decoupled_weight_decay: bool, adapt: bool,
    maximize: bool, workspace: list[Tensor] | None = None, layout: Layout = UNBOUND,
) -> Tensor | None:
    """One LAMB step for tensors on one device with one dtype.

    The update is built in one list: the denominators first, then, in place,
    the Adam ratio (in ``workspace`` when given, so nothing parameter-sized is
    allocated). ``layout`` (:mod:`._layout`) gives the per-layer norms of several lists
    at once (``norms``), splits a per-layer vector to match the list entries
    (``per_layer``) and joins the step counters into one (``layer_vector``)."""
    norms, per_layer, layer_vector = layout.norms, layout.per_layer, layout.layer_vector
    device = params[0].device
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0 and not decoupled_weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)

    if steps[0].is_cpu:
        # A wrapped CPU tensor avoids re-wrapping 1 per step tensor (as torch.optim.Adam).
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

    # With b1 = 1 - beta1^t, b2 = 1 - beta2^t and c = sqrt(b2) / b1:
    #   m_hat / (sqrt(v_hat) + eps) = c * m / (sqrt(v) + eps * sqrt(b2)),
    # so bias correction costs one per-tensor factor c (folded into later ops)
    # instead of two extra passes over v.
    denominators = into(workspace, torch.sqrt, exp_avg_sqs)
    if bias_correction:
        step = layer_vector(steps).to(device=device, dtype=params[0].dtype, non_blocking=True)
        sqrt_b2 = (1 - beta2**step).sqrt()
        c = sqrt_b2 / (1 - beta1**step)
        torch._foreach_add_(denominators, per_layer(eps * sqrt_b2))
    else:
        c = None
        torch._foreach_add_(denominators, eps)
    # updates = r / c, i.e. u = c * (updates + (wd / c) * w); with a workspace
    # the ratio overwrites the denominators it is computed from.
    updates = into(workspace, torch.div, exp_avgs, denominators)
    del denominators
    if weight_decay != 0 and decoupled_weight_decay:
        if c is None:
            torch._foreach_add_(updates, params, alpha=weight_decay)
        else:
            torch._foreach_addcmul_(updates, params, per_layer(weight_decay / c))

    if adapt:
        # ||u|| = c * ||updates||, as one vectorised op on the norm vectors.
        weight_norms, update_norms = norms([params, updates])
        if c is not None:
            update_norms = update_norms * c
        ratios = lamb_trust_ratios(weight_norms, update_norms, phi_clamp)
        scale = ratios * lr if c is None else ratios * c * lr
        add_scaled_(params, updates, per_layer(-scale))
        return ratios

    if c is None:
        add_scaled_(params, updates, -lr)
    else:
        add_scaled_(params, updates, per_layer(-(c * lr)))
    return None

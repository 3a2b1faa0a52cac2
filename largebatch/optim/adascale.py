r"""AdaScale SGD: the gain ratio and the scale-invariant clock.

Johnson, Agrawal, Gu, Guestrin, "AdaScale SGD: A User-Friendly Algorithm for
Distributed Training", ICML 2020, arXiv 2007.05105, Algorithm 1. With n
gradient samples per update (workers x micro-batches), per layer
:math:`A = \tfrac1n\sum_i\lVert g^{(i)}\rVert^2`, :math:`B = \lVert\bar g\rVert^2`:

.. math::

    \hat\sigma^2 = \tfrac{n}{n-1}(A - B),\qquad \hat\mu^2 = B - \hat\sigma^2/n,

summed over the model's layers, each smoothed by a bias-corrected moving
average with factor :math:`c = \max(1 - n/1000, 0)`, then

.. math::

    r_t = \frac{\bar\sigma^2 + \bar\mu^2}{\bar\sigma^2/n + \bar\mu^2}\in[1, n],\qquad
    \eta_t = r_t\,\eta_0(\tau_t),\qquad \tau_{t+1} = \tau_t + r_t.

:math:`\tau` ("scale-invariant iterations", ``opt.progress``) is the number of
base-batch iterations the run has made up for; training ends when it reaches
:math:`T_1`, the length of the base-batch schedule (``opt.done(T1)``), and the
base schedule is evaluated at :math:`\tau`, not at the step count: use
:class:`ProgressLR` (or read ``opt.progress`` in your own scheduler). The
smoothed :math:`\bar\sigma^2, \bar\mu^2` are clamped at 0 before the ratio
(:math:`\hat\mu^2` can be negative when noise dominates); with
:math:`\bar\mu^2 = 0` the gain is n. With n = 1 the variance is undefined:
the averages are left as they are and :math:`r = 1` (plain SGD), so one
worker without accumulation works.

Loss scaling: statistics measured on ``GradScaler``-scaled gradients are
divided by :math:`S^2`, found from the reported :math:`\lVert\bar g\rVert^2` and the
unscaled ``p.grad`` (one ``_foreach_norm``), so the averages never mix scales.

Works with one process and accumulation (n = micro-batches) and under DDP
(n = workers x micro-batches) through ``largebatch.stats``. The update is
momentum SGD with the rate outside the buffer (``torch.optim.SGD``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.optimizer import Optimizer

from ._sharded import layer_sq_norms
from ._trust import check_bool, check_lr, check_range

from ._methods import (
    StatisticsConsumer,
    LayerIntrospection,
    StatisticsIndex,
    check_source,
    check_state_dict,
    ema_update,
    loss_scale_sq,
    momentum_sgd_,
    scalar_dtype,
    smoothing,
    stack_state,
    summary_n,
    tag_state_dict,
    write_state,
)

__all__ = ["AdaScale", "ProgressLR", "adascale_gain"]

_STAT_KEYS = ("step", "var_avg", "sq_avg", "avg_weight", "progress")


def adascale_gain(
    sample_sq_norm: Tensor, mean_sq_norm: Tensor, state: dict[str, Tensor], *, n: int
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The functional core: new state, model gain r_t (0-d) and per-layer gains.

    ``state`` holds stacked per-parameter vectors: the smoothed per-layer
    estimates (their sums over layers are the model's smoothed estimates,
    since the average is linear), the shared average weight, tau and the step.
    """
    A, B = sample_sq_norm.to(state["progress"].dtype), mean_sq_norm.to(state["progress"].dtype)
    var_avg, sq_avg, weight = state["var_avg"], state["sq_avg"], state["avg_weight"]
    if n > 1:
        var = (A - B) * (n / (n - 1))
        sq = B - var / n
        c = smoothing(n)
        var_avg, weight = ema_update(var_avg, weight, var, c)
        sq_avg, _ = ema_update(sq_avg, state["avg_weight"], sq, c)

    def ratio(v: Tensor, s: Tensor, w: Tensor) -> Tensor:
        safe_w = torch.where(w > 0, w, torch.ones_like(w))
        v, s = (v / safe_w).clamp(min=0), (s / safe_w).clamp(min=0)
        den = v / n + s
        r = torch.where((den > 0) & (w > 0), (v + s) / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
        return r.clamp(1.0, float(n))

    gain = ratio(var_avg.sum(), sq_avg.sum(), weight[0])
    layer_gain = ratio(var_avg, sq_avg, weight)
    new_state = dict(
        step=state["step"] + 1, var_avg=var_avg, sq_avg=sq_avg, avg_weight=weight,
        progress=state["progress"] + gain,
    )
    return new_state, gain, layer_gain


class AdaScale(StatisticsConsumer, LayerIntrospection, Optimizer):
    r"""AdaScale SGD (Johnson et al., ICML 2020). See the module docstring.

    Args:
        params: tensors, dicts or ``named_parameters()``.
        lr: :math:`\eta_0`, the base-batch rate; a scheduler sets it to
            :math:`\eta_0(\tau)` (see :class:`ProgressLR`). Float or tensor.
        momentum, dampening, nesterov, weight_decay: as ``torch.optim.SGD``;
            the gain is computed on the raw gradient. ``decoupled_weight_decay``:
            ``w *= 1 - lr * wd`` instead of coupled L2.
        stats: the statistics source (``largebatch.stats.GradientStatistics``);
            n, A and B come from its ``summary()``.
        reset_statistics: call ``stats.reset()`` after each step and in ``zero_grad()`` (default True).

    ``progress`` (:math:`\tau`, 0-d tensor), ``done(T1)``, ``last_gain``
    (:math:`r_t`, 0-d), and per group ``last_layer_gains`` (each layer's gain
    from the same averages, for plots; not used in the update) and
    ``effective_lrs()`` (:math:`r_t \eta_0(\tau_t)` per parameter) are available after
    each step; only the state (averages, :math:`\tau`, step, momentum) is
    checkpointed. The model-wide state is kept in every parameter's state
    (as ``step`` is in ``torch.optim``) so checkpoints need nothing extra.
    Resuming on another number of workers: the averages and :math:`\tau`
    carry over; the new n applies from the next step.
    """

    method = "adascale"
    _introspected = ("layer_gain", "effective_lr")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.1,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        stats: Any = None,
        decoupled_weight_decay: bool = False,
        reset_statistics: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_source(stats, "AdaScale")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, foreach=foreach,
        )
        super().__init__(params, defaults)
        self.stats = stats
        self.reset_statistics = reset_statistics
        self._index = StatisticsIndex(stats)
        self._clear_introspection()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_lr(group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("dampening", group["dampening"], 0.0, 1.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        for name in ("decoupled_weight_decay", "nesterov", "maximize"):
            check_bool(name, group[name])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0 and dampening = 0")

    def _clear_introspection(self) -> None:
        super()._clear_introspection()
        self.last_gain: Tensor | None = None

    @property
    def last_layer_gains(self) -> list[Tensor | None]:
        return self.last("layer_gain")

    def effective_lrs(self) -> list[Tensor | None]:
        return self.last("effective_lr")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._clear_introspection()

    def state_dict(self) -> dict[str, Any]:
        return tag_state_dict(super().state_dict(), self.method)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_dict(state_dict, self.method)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "method"})

    @property
    def progress(self) -> Tensor:
        r""":math:`\tau`: scale-invariant iterations so far (0-d tensor; 0 before the first step)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "progress" in self.state[p]:
                    return self.state[p]["progress"]
        return torch.zeros(())

    def done(self, base_iterations: float) -> bool:
        r"""True once :math:`\tau \ge T_1` (reads :math:`\tau` back: call once per step, outside ``step``)."""
        return bool(self.progress >= base_iterations)

    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            zero = torch.zeros((), dtype=scalar_dtype([p]), device=p.device)
            state.update(
                step=zero.clone(), var_avg=zero.clone(), sq_avg=zero.clone(),
                avg_weight=zero.clone(), progress=self.progress.to(p.device, zero.dtype).clone(),
            )
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        summary = self.stats.summary()
        n = summary_n(summary)
        everything = [p for g in self.param_groups for p in g["params"]]
        params = [p for p in everything if p.grad is not None]
        if not params:
            return loss
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("AdaScale does not support sparse gradients")
        # every parameter carries the model-wide clock, also those without a gradient now
        all_states = [self._init_state(p) for p in everything]
        states = [self.state[p] for p in params]
        stacked = {key: stack_state(states, key, scalar_dtype(params)) for key in _STAT_KEYS}
        dtype = scalar_dtype(params)
        A = self._index.gather(summary.sample_sq_norm_mean, params).to(dtype)
        B = self._index.gather(summary.mean_grad_sq_norm, params).to(dtype)
        # statistics measured under a GradScaler carry S^2; the averages must not mix scales
        scale_sq = loss_scale_sq(B, layer_sq_norms([p.grad for p in params]))
        new_state, gain, layer_gain = adascale_gain(A / scale_sq, B / scale_sq, stacked, n=n)
        for key in ("step", "var_avg", "sq_avg"):
            write_state(states, key, new_state[key])
        torch._foreach_copy_([s["avg_weight"] for s in all_states], [new_state["avg_weight"][0]] * len(all_states))
        torch._foreach_copy_([s["progress"] for s in all_states], [new_state["progress"][0]] * len(all_states))

        effective, stepped = [], []
        for group in self.param_groups:
            stepped.append([i for i, p in enumerate(group["params"]) if p.grad is not None])
            ps = [group["params"][i] for i in stepped[-1]]
            if not ps:
                continue
            rate = gain * group["lr"]
            effective.append(rate.expand(len(ps)))
            buffers = [self.state[p].get("momentum_buffer") for p in ps]
            buffers = momentum_sgd_(
                ps, [p.grad for p in ps], buffers, rate.expand(len(ps)),
                momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
                lr=group["lr"], maximize=group["maximize"], foreach=group["foreach"] is not False,
            )
            if group["momentum"] != 0:
                for p, b in zip(ps, buffers):
                    self.state[p]["momentum_buffer"] = b
        self.last_gain = gain
        self._record(stepped, layer_gain=layer_gain, effective_lr=torch.cat(effective))
        self._reset_statistics()
        return loss


class ProgressLR(LRScheduler):
    r"""Drive an optimiser's rate by AdaScale's clock: ``lr = base_lr * lr_lambda(tau)``.

    ``lr_lambda`` is the base-batch schedule as a function of base-batch
    iterations (e.g. ``lambda it: 0.1 ** (it // 30_000)``); call
    ``scheduler.step()`` after every ``optimizer.step()``, as with any
    scheduler. Reading tau costs one host read per scheduler step (outside the
    optimiser step). The rate for update t is evaluated at :math:`\tau_t`,
    the progress before that update (Algorithm 1).
    """

    def __init__(self, optimizer: AdaScale, lr_lambda: Callable[[float], float], last_epoch: int = -1):
        if not hasattr(optimizer, "progress"):
            raise ValueError("ProgressLR needs an optimiser with a progress clock (AdaScale)")
        self.lr_lambda = lr_lambda
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        tau = float(self.optimizer.progress)
        return [base * self.lr_lambda(tau) for base in self.base_lrs]

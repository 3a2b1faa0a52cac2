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

Scales: A and B are used on the mean-gradient scale (gradients of mean
losses, as the engine reports them) whatever the accumulation convention and
loss scale: a ``GradScaler``'s :math:`S^2`, as the statistics source records it
(``GradientStatistics(model, grad_scaler=scaler)``, ``summary().loss_scale``),
is divided out, so the averages never mix scales, also when the number of
micro-batches changes. It is never inferred from ``p.grad``: clipping between
the backward and the step rescales ``p.grad``, and A and B stay the raw
gradients'.

Works with one process and accumulation (n = micro-batches) and under DDP
(n = workers x micro-batches) through ``largebatch.stats``. With
``statistics="example"`` the samples are the step's N examples instead, read
as n = N/b samples of the base batch b (per-example layer norms,
``GradientStatistics(model, per_example=True)``): A is replaced by its
unbiased base-batch equivalent, so that :math:`\hat\sigma^2` estimates the
variance of a base-size batch and :math:`\hat\mu^2` the squared true
gradient, N - 1 degrees of freedom, from one micro-batch per step
(``largebatch.stats.estimators.example_gain_statistics``). The update is
momentum SGD with the rate outside the buffer (``torch.optim.SGD``).
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from ._checks import check_bool, check_group_base_batch, check_sgd_group
from ._statistics import StatisticsOptimizer, check_source, check_statistics, group_vector, scalar_dtype
from ._statistics import clamp_gain, ema_update, smoothing, zeros_state
from .base import Part, recorded

__all__ = ["AdaScale", "ProgressLR", "adascale_gain"]

_STAT_KEYS = ("step", "var_avg", "sq_avg", "avg_weight", "progress")


def adascale_gain(
    sample_sq_norm: Tensor, mean_sq_norm: Tensor, state: dict[str, Tensor], *, n: int | float | Tensor
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    r"""The functional core of AdaScale (Johnson et al., ICML 2020, Algorithm 1): new state,
    model gain r_t (0-d) and per-layer gains.

    .. math::

        \hat\sigma^2 = \tfrac{n}{n-1}(A - B),\quad \hat\mu^2 = B - \hat\sigma^2/n,\quad
        r_t = \frac{\bar\sigma^2 + \bar\mu^2}{\bar\sigma^2/n + \bar\mu^2}\in[1, n],\quad
        \tau_{t+1} = \tau_t + r_t

    with bias-corrected moving averages (factor :math:`\max(1 - n/1000, 0)`); r = 1 when n = 1.
    n may be a 0-d tensor (example statistics, n = N/b): then the n = 1 case is a
    ``torch.where``, not a branch, and nothing is read back to the host.

    ``state`` holds per-parameter vectors: the smoothed per-layer
    estimates (their sums over layers are the model's smoothed estimates,
    since the average is linear), the shared average weight, tau and the step.
    """
    A, B = sample_sq_norm.to(state["progress"].dtype), mean_sq_norm.to(state["progress"].dtype)
    var_avg, sq_avg, weight = state["var_avg"], state["sq_avg"], state["avg_weight"]
    if isinstance(n, Tensor):
        n = n.to(A.dtype)
        several = n > 1
        var = (A - B) * (n / torch.where(several, n - 1, torch.ones_like(n)))
        sq = B - var / n
        c = torch.where(several, smoothing(n), torch.ones_like(n))  # n = 1: averages unchanged, as below
        var_avg, weight = ema_update(var_avg, weight, var, c)
        sq_avg, _ = ema_update(sq_avg, state["avg_weight"], sq, c)
    elif n > 1:
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
        return clamp_gain(r, n)

    gain = ratio(var_avg.sum(), sq_avg.sum(), weight[0])
    layer_gain = ratio(var_avg, sq_avg, weight)
    new_state = dict(
        step=state["step"] + 1, var_avg=var_avg, sq_avg=sq_avg, avg_weight=weight,
        progress=state["progress"] + gain,
    )
    return new_state, gain, layer_gain


class AdaScale(StatisticsOptimizer):
    r"""AdaScale SGD (Johnson et al., ICML 2020, Algorithm 1). See the module docstring.

    .. math::

        r_t = \frac{\bar\sigma^2 + \bar\mu^2}{\bar\sigma^2/n + \bar\mu^2},\qquad
        \eta_t = r_t\,\eta_0(\tau_t),\qquad \tau_{t+1} = \tau_t + r_t

    then momentum SGD at :math:`\eta_t` (rate outside the buffer, as ``torch.optim.SGD``).

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
        statistics: ``"micro_batch"`` (default, the paper's: the source's n = workers x
            micro-batches samples) or ``"example"`` (per-example norms of the step's N
            examples read as n = N/b base-batch samples; the source needs
            ``per_example=True``). Saved in ``state_dict()``; a state dict of the other
            mode is refused.
        base_batch: b, the batch ``lr`` was tuned at (``statistics="example"`` only; kept in
            every parameter group, the same in all).

    With n = 1 micro-batch statistics the gain is 1 by construction; the optimiser warns
    once (``SingleSampleWarning``).

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
    _per_layer_keys = _STAT_KEYS
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
        statistics: str = "micro_batch",
        base_batch: int | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_source(stats, "AdaScale")
        check_statistics(statistics, stats, base_batch, "AdaScale")
        self.statistics = statistics  # before the groups are added: they check base_batch by it
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            decoupled_weight_decay=decoupled_weight_decay, base_batch=base_batch, maximize=maximize,
            foreach=foreach,
        )
        super().__init__(params, defaults, stats=stats, reset_statistics=reset_statistics)

    def step(self, closure: Any = None) -> Any:
        """One AdaScale update (Johnson et al. 2020, Algorithm 1): A, B from ``stats.summary()``,
        r_t from ``adascale_gain``, momentum SGD at r_t * eta0(tau_t), tau += r_t."""
        return super().step(closure)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_sgd_group(group)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])
        check_group_base_batch(self.statistics, group, self.param_groups[0])
        if group.get("adapt", True) is not True:
            # refused rather than ignored: largebatch.param_groups gives adapt=False to biases
            raise ValueError(
                "adapt: AdaScale scales every parameter by one model-wide gain, so it has no per-group "
                "adaptation to turn off; build its groups with param_groups(model, no_adapt=())"
            )

    def _clear_transient(self) -> None:
        super()._clear_transient()
        self.last_gain: Tensor | None = None

    last_layer_gains = recorded("layer_gain", "Per group, each layer's gain from the averages (for plots).")

    @property
    def progress(self) -> Tensor:
        r""":math:`\tau`: scale-invariant iterations so far, :math:`\tau_{t+1} = \tau_t + r_t`
        (Johnson et al. 2020, Algorithm 1); 0-d tensor, 0 before the first step."""
        for group in self.param_groups:
            for p in group["params"]:
                if "progress" in self.state[p]:
                    return self.state[p]["progress"]
        return torch.zeros(())

    def done(self, base_iterations: float) -> bool:
        r"""True once :math:`\tau \ge T_1`, AdaScale's stopping rule (Johnson et al. 2020, Algorithm 1).

        Reads :math:`\tau` back: call once per step, outside ``step``."""
        return bool(self.progress >= base_iterations)

    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state.update(zeros_state(p, _STAT_KEYS[:-1]))
            state["progress"] = self.progress.to(p.device, state["step"].dtype).clone()
        return state

    def _positions(self, params: list[Tensor]) -> Tensor:
        """Positions of ``params`` among all parameters (group order)."""
        where = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return torch.tensor([where[id(p)] for p in params], dtype=torch.long)

    def _scales(self, parts: list[Part], params: list[Tensor], groups_of: list[dict], source: tuple
                ) -> tuple[list[Tensor], dict[str, Tensor]]:
        r"""One AdaScale update's rates (Johnson et al. 2020, Algorithm 1): A, B from
        ``stats.summary()``, r_t from ``adascale_gain``, rates r_t * eta0(tau_t); tau += r_t."""
        summary, n = source
        dtype = scalar_dtype(params)
        # every parameter carries the model-wide clock, also those without a gradient now
        all_states = [self._init_state(p) for g in self.param_groups for p in g["params"]]
        states = [self.state[p] for p in params]
        # the averages never mix scales; example statistics: A_eq and n = N/b
        A, B, n = self._gain_statistics(summary, n, params, dtype)
        # per-parameter entries are views of one vector per key (no stack, one copy_ per key): the
        # layer estimates over the stepped parameters, the model-wide clock over all parameters
        layers = self.state_vectors("layers")
        clock = self.state_vectors("clock")
        state = layers.vectors(self.state, states, ("step", "var_avg", "sq_avg"), dtype)
        shared = clock.vectors(self.state, all_states, ("avg_weight", "progress"), dtype)
        if len(states) == len(all_states):  # every parameter stepped (the usual case): the same order
            state.update(shared)
        else:
            positions = self._positions(params)
            state.update({key: value.index_select(0, positions.to(value.device)) for key, value in shared.items()})
        new_state, gain, layer_gain = adascale_gain(A, B, state, n=n)
        layers.write({key: new_state[key] for key in ("step", "var_avg", "sq_avg")})
        clock.write({key: new_state[key][0].clone() for key in ("avg_weight", "progress")})  # may alias the vector
        rates = gain * group_vector(groups_of, "lr", params[0].device, dtype)  # r_t * eta0(tau_t)
        self.last_gain = gain
        return [rates] * len(parts), {"layer_gain": layer_gain, "effective_lr": rates}

    def _update(self, part: Part, rates: Tensor) -> dict[str, Tensor | None]:
        """Momentum SGD at r_t * eta0(tau_t), the rate outside the buffer (``torch.optim.SGD``)."""
        self._sgd_update(part, rates)
        return {}


class ProgressLR(LRScheduler):
    r"""Drive an optimiser's rate by AdaScale's clock (Johnson et al. 2020): :math:`\eta_0(\tau_t)`,
    ``lr = base_lr * lr_lambda(tau)``.

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

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state, as ``LambdaLR``'s: a function ``lr_lambda`` is not saved (a
        lambda cannot be pickled); a callable object's attributes are."""
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "lr_lambda")}
        state["lr_lambda"] = None if isinstance(self.lr_lambda, types.FunctionType) else dict(self.lr_lambda.__dict__)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        lr_lambda = state.pop("lr_lambda", None)
        self.__dict__.update(state)
        if isinstance(lr_lambda, dict):
            self.lr_lambda.__dict__.update(lr_lambda)

    def get_lr(self) -> list[float]:
        tau = float(self.optimizer.progress)
        return [base * self.lr_lambda(tau) for base in self.base_lrs]

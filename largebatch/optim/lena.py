r"""LENA: layer-wise adaptive learning-rate scaling with state-aware warm-up.

Ko, Lee, Kim, "Not All Layers Are Equal: A Layer-Wise Adaptive Approach Toward
Large-Scale DNN Training", WWW 2022 (doi 10.1145/3485447.3511989), Eq. 4-8 and
Algorithm 1. With n gradient samples per update (workers x micro-batches),
for each layer k and update t:

.. math::

    A_k = \tfrac1n \textstyle\sum_i \lVert g_k^{(i)}\rVert^2,\qquad
    B_k = \lVert \bar g_k\rVert^2                                   \quad\text{(Eq. 4)}

    \bar A_k, \bar B_k = \text{bias-corrected moving averages, factor } c = \max(1 - n/1000, 0)
                                                                      \quad\text{(Eq. 8)}

    r_k = \operatorname{clamp}\Big(\frac{\bar A_k + \epsilon}{\bar B_k + \epsilon}, 1, n\Big)
                                                                      \quad\text{(Eq. 5)}

    S_k \mathrel{+}= r_k,\qquad \theta = \alpha T_1,\qquad
    \eta_{t,k} = r_k\,\eta_0\,\text{decay}(t)\cdot\min(S_k/\theta, 1)  \quad\text{(Eq. 6, 7)}

:math:`\eta_0\,\text{decay}(t)` is the group ``lr``, so any
``torch.optim.lr_scheduler`` drives the decay. The update is momentum SGD with
the rate outside the buffer (``torch.optim.SGD``).

Where this differs from the authors' code (methods.md lists the defects):
the averages start from 0 *with* bias correction and a guarded factor (so
n > 1000 works); ``S_k`` is updated before the warm-up test (the first step
is not zero); :math:`\theta` is not truncated to whole epochs; there is no
random 30%/70% rule after the warm-up; statistics come from one fused
reduction (largebatch.stats), not one all-reduce per tensor.

Choices stated: the gain is computed on the raw gradient (the statistics never
see the weight-decay term); weight decay is coupled (added to the gradient,
the authors' choice) or decoupled (``w *= 1 - lr * wd``); and it applies to
whatever parameters are in a group with ``weight_decay > 0`` (exclude biases
and norm weights with a separate group). A "layer" is a parameter tensor
(``layer_grouping="parameter"``, the authors' choice) or a module
(``"module"``: weight and bias of one module share A, B, r and S).
:math:`A_k, B_k` are used on the mean-gradient scale (gradients of mean
losses, as the engine reports them) whatever the accumulation convention
(micro-batches summed or averaged) and loss scale: a ``GradScaler``'s squared
scale, the source's ``loss_scale`` (``GradientStatistics(model, grad_scaler=scaler)``;
never inferred from ``p.grad``, which clipping rescales), is divided out. So :math:`\epsilon` is in the paper's
units and the averages never mix scales (also when the number of
micro-batches changes). A layer's warm-up ends at the first update where :math:`S_k \ge \theta` (the
first update at its full rate); ``warmup_end`` records that update's number
(1-based), -1 while the layer is still warming up and for a layer without
warm-up (``warmup=False`` or ``adapt=False``).

The ``adapt`` mask (``largebatch.param_groups`` gives ``adapt=False`` to biases
and normalisation weights by default): a group with ``adapt=False`` takes
neither the gain nor the warm-up, r_k = 1 and momentum SGD at the group's
rate, as ``adapt=False`` gives LARS, LAMB and CLARS a trust ratio of 1. The
paper and the authors' code adapt every tensor; ``largebatch.train`` builds
LENA's groups that way (``param_groups(model, no_adapt=())``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_alpha, check_bool, check_group_base_batch, check_range, check_sgd_group
from ._statistics import StatisticsOptimizer, check_source, check_statistics, group_vector, scalar_dtype
from ._statistics import clamp_gain, ema_update, smoothing, zeros_state
from .base import Part, recorded

__all__ = ["LENA", "lena_rates"]

_STAT_KEYS = ("step", "sample_sq_norm_avg", "mean_sq_norm_avg", "avg_weight", "progress", "warmup_end")


def lena_rates(
    sample_sq_norm: Tensor,
    mean_sq_norm: Tensor,
    state: dict[str, Tensor],
    *,
    n: int | float | Tensor,
    lr: Tensor,
    theta: Tensor,
    eps: Tensor,
    warmup: Tensor,
    adapt: Tensor | None = None,
    layer_index: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    r"""The functional core: per-parameter rates of one LENA update (Ko, Lee, Kim, WWW 2022, Eq. 5-8).

    .. math::

        \bar A_k, \bar B_k \leftarrow \text{bias-corrected averages, } c = \max(1 - n/1000, 0) \quad\text{(Eq. 8)}

        r_k = \operatorname{clamp}\big((\bar A_k + \epsilon)/(\bar B_k + \epsilon), 1, n\big) \quad\text{(Eq. 5)},\qquad
        S_k \mathrel{+}= r_k,\qquad \eta_{t,k} = r_k\,\text{lr}\,\min(S_k/\theta, 1) \quad\text{(Eq. 6, 7)}

    Inputs are vectors over the P stepped parameters: this step's A and B per
    parameter (with example statistics, ``A_eq`` and n = N/b, possibly a 0-d
    tensor: ``largebatch.stats.estimators.example_gain_statistics``), the state as per-parameter vectors (keys ``_STAT_KEYS``), and per-parameter
    hyperparameters (``lr`` = eta0 * decay(t), ``theta`` = alpha * T1, ``eps``,
    ``warmup`` and ``adapt`` as bool; ``adapt`` False: gain 1 and no warm-up, momentum SGD at
    ``lr``; None: every layer adapted). ``layer_index`` maps each parameter to its layer
    (module grouping); None means each parameter is its own layer. Returns the
    new state and the introspection tensors (gain, warm-up factor, rate).
    Nothing is read back to the host.
    """
    A, B = sample_sq_norm.to(lr.dtype), mean_sq_norm.to(lr.dtype)
    if layer_index is not None:  # a module's A and B are the sums over its tensors
        layers = layer_index.numel()  # an upper bound on the number of layers: no host sync
        A = A.new_zeros(layers).index_add_(0, layer_index, A)[layer_index]
        B = B.new_zeros(layers).index_add_(0, layer_index, B)[layer_index]
    c = smoothing(n)
    a_sum, weight = ema_update(state["sample_sq_norm_avg"], state["avg_weight"], A, c)
    b_sum, _ = ema_update(state["mean_sq_norm_avg"], state["avg_weight"], B, c)
    gain = clamp_gain((a_sum / weight + eps) / (b_sum / weight + eps), n)
    if adapt is not None:
        gain = torch.where(adapt, gain, torch.ones_like(gain))
        warmup = warmup & adapt
    step = state["step"] + 1
    progress = state["progress"] + gain  # before the warm-up test (Algorithm 1)
    reached = progress >= theta
    factor = torch.where(warmup & ~reached, progress / theta, torch.ones_like(progress))
    # a layer without warm-up never ends one: its end stays -1
    ended_now = (state["warmup_end"] < 0) & warmup & reached
    warmup_end = torch.where(ended_now, step.to(state["warmup_end"].dtype), state["warmup_end"])
    rate = gain * factor * lr
    new_state = dict(
        step=step,
        sample_sq_norm_avg=a_sum,
        mean_sq_norm_avg=b_sum,
        avg_weight=weight,
        progress=progress,
        warmup_end=warmup_end,
    )
    introspection = dict(gain=gain, warmup_factor=factor, warmup_progress=progress / theta, effective_lr=rate)
    return new_state, introspection


def _module_layers(params: list[Tensor], model: nn.Module | None, names: dict[int, str]) -> dict[int, Any]:
    """Layer key of every parameter: its owning module (by identity or by name prefix)."""
    keys: dict[int, Any] = {}
    if model is not None:
        for module in model.modules():
            for p in module.parameters(recurse=False):
                keys.setdefault(id(p), id(module))
    for p in params:
        if id(p) in keys:
            continue
        if id(p) in names:
            keys[id(p)] = names[id(p)].rpartition(".")[0]
        else:
            raise ValueError(
                "layer_grouping='module' needs to know each parameter's module: pass model=, or "
                "build the optimiser from model.named_parameters()"
            )
    return keys


class LENA(StatisticsOptimizer):
    r"""LENA (Ko, Lee, Kim, WWW 2022): per-layer gain, state-aware warm-up. See the module docstring.

    .. math::

        r_k = \operatorname{clamp}\Big(\frac{\bar A_k + \epsilon}{\bar B_k + \epsilon}, 1, n\Big)
        \ \text{(Eq. 4, 5, 8)},\qquad
        S_k \mathrel{+}= r_k,\qquad
        \eta_{t,k} = r_k\,\eta_0\,\text{decay}(t)\,\min(S_k/(\alpha T_1), 1)\ \text{(Eq. 6, 7)}

    then momentum SGD at :math:`\eta_{t,k}` (rate outside the buffer, as ``torch.optim.SGD``).

    Args:
        params: tensors, dicts (parameter groups) or ``named_parameters()``.
        lr: :math:`\eta_0` tuned at the base batch; schedulers change it to
            :math:`\eta_0\,\text{decay}(t)`. Float or tensor (default 0.1, the paper's).
        momentum, dampening, nesterov: as ``torch.optim.SGD`` (default 0.9, 0, False).
        weight_decay: (default 5e-4, the paper's); put biases and norm weights in
            a group with 0 to exclude them.
        stats: the statistics source (``largebatch.stats.GradientStatistics``):
            n, A_k and B_k are read from its ``summary()`` at every step.
        base_iterations: :math:`T_1`, the number of iterations of the base-batch
            schedule (the warm-up threshold is :math:`\theta = \alpha T_1`).
        alpha: warm-up fraction in (0, 1] (default 0.05, the paper's).
        eps: :math:`\epsilon` of Eq. 5 (default 1e-6).
        warmup: apply the state-aware warm-up (default True). With ``False`` and
            n = 1 the method is exactly ``torch.optim.SGD``.
        adapt: give this group's layers their gain and warm-up (default True);
            ``False``: r_k = 1, no warm-up (momentum SGD at ``lr``).
        decoupled_weight_decay: ``w *= 1 - lr * wd`` instead of adding ``wd * w``
            to the gradient (default False, the authors' choice).
        layer_grouping: ``"parameter"`` (default) or ``"module"``.
        model: the model, for ``layer_grouping="module"`` (or pass named parameters).
        reset_statistics: call ``stats.reset()`` after each step and in ``zero_grad()`` (default True).
        statistics: where the n gradient samples come from. ``"micro_batch"`` (default, the
            paper's): the source's n = workers x micro-batches samples. ``"example"``: the
            per-example layer norms of the step's N examples (the source built with
            ``per_example=True``), read as n = N/b samples of the base batch b, with
            :math:`A_k` replaced by its unbiased base-batch equivalent
            :math:`B_k + \widehat{\mathrm{tr}\Sigma_k}(1/b - 1/N)`
            (``largebatch.stats.estimators.example_gain_statistics``): the same gains in
            expectation, from one micro-batch per step. Saved in ``state_dict()``; a state
            dict of the other mode is refused.
        base_batch: b, the batch ``lr`` was tuned at (``statistics="example"`` only; kept in
            every parameter group, the same in all).

    With n = 1 micro-batch statistics (one micro-batch in one process) every gain is 1 by
    construction; the optimiser warns once (``SingleSampleWarning``).

    State per parameter (checkpointed): ``step``, the two moving averages and
    their weight, ``progress`` :math:`S_k`, ``warmup_end``, ``momentum_buffer``.
    Under module grouping the tensors of one module hold the same values.
    After each step (not checkpointed), per group, 1-D over the parameters
    that had gradients: ``last_gains`` (:math:`r_k`), ``last_warmup_factors``
    (:math:`\min(S_k/\theta, 1)`), ``last_warmup_progress`` (:math:`S_k/\theta`),
    ``effective_lrs()`` (:math:`\eta_{t,k}`); ``by_name("gain")`` etc.; and
    ``warmup_ends()`` over all parameters (from the state).

    Resuming on another number of workers: the moving averages and
    :math:`S_k` carry over; the new n (and its smoothing factor and gain
    bound) applies from the next step.

    Example (one process, 4 micro-batches: n = 4; under DDP wrap the model and
    pass the DDP module to ``GradientStatistics``, n = workers x micro-batches)::

        stats = GradientStatistics(model)
        opt = LENA(model.parameters(), lr=0.1, stats=stats,
                   base_iterations=epochs * len(train_set) // 128)  # T1 at b = 128
        decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1 / total_steps))
        for images, labels in global_batches(train_set, 512, generator):
            opt.zero_grad()                       # also resets the statistics
            for x, y in zip(images.split(128), labels.split(128)):
                (F.cross_entropy(model(x), y) / 4).backward()
            opt.step()                            # reads n, A_k, B_k from stats.summary()
            decay.step()
    """

    method = "lena"
    _per_layer_keys = _STAT_KEYS
    _introspected = ("gain", "warmup_factor", "warmup_progress", "effective_lr")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        *,
        stats: Any = None,
        base_iterations: int | None = None,
        alpha: float = 0.05,
        eps: float = 1e-6,
        warmup: bool = True,
        adapt: bool = True,
        decoupled_weight_decay: bool = False,
        layer_grouping: str = "parameter",
        model: nn.Module | None = None,
        reset_statistics: bool = True,
        statistics: str = "micro_batch",
        base_batch: int | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_source(stats, "LENA")
        check_statistics(statistics, stats, base_batch, "LENA")
        self.statistics = statistics  # before the groups are added: they check base_batch by it
        self._layer_key = None
        if base_iterations is None:
            raise ValueError("base_iterations (T1, iterations of the base-batch schedule) is required")
        if layer_grouping not in ("parameter", "module"):
            raise ValueError(f"invalid layer_grouping: {layer_grouping!r} (use 'parameter' or 'module')")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            base_iterations=base_iterations, alpha=alpha, eps=eps, warmup=warmup, adapt=adapt,
            decoupled_weight_decay=decoupled_weight_decay, base_batch=base_batch, maximize=maximize,
            foreach=foreach,
        )
        super().__init__(params, defaults, stats=stats, reset_statistics=reset_statistics)
        self.layer_grouping = layer_grouping
        if layer_grouping == "module":
            names = {
                id(p): name
                for g in self.param_groups
                for p, name in zip(g["params"], g.get("param_names") or [None] * len(g["params"]))
                if name is not None
            }
            self._layer_key = _module_layers([p for g in self.param_groups for p in g["params"]], model, names)
        self._layer_index_cache: tuple[tuple[int, ...], Tensor] | None = None

    def step(self, closure: Any = None) -> Any:
        """One LENA update (Ko et al. 2022, Algorithm 1): A_k, B_k from ``stats.summary()``, the rates
        of ``lena_rates`` (Eq. 4-8), then momentum SGD at eta_{t,k}."""
        return super().step(closure)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_sgd_group(group)
        check_range("eps", group["eps"], 0.0)
        check_alpha(group["alpha"])
        check_range("base_iterations", group["base_iterations"], 1e-12)  # T1 > 0
        for name in ("warmup", "adapt", "decoupled_weight_decay"):
            check_bool(name, group[name])
        check_group_base_batch(self.statistics, group, self.param_groups[0])
        if self._layer_key is not None:
            raise ValueError("add_param_group after construction is not supported with layer_grouping='module'")

    last_gains = recorded("gain", "Per group, r_k of the last step.")
    last_warmup_factors = recorded("warmup_factor", "Per group, min(S_k / theta, 1) of the last step.")
    last_warmup_progress = recorded("warmup_progress", "Per group, S_k / theta after the last step.")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "layer_grouping": self.layer_grouping}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("layer_grouping", self.layer_grouping)
        if saved != self.layer_grouping:
            # the per-layer averages and progress were kept for other layers
            raise ValueError(f"this state dict used layer_grouping={saved!r}, this optimiser {self.layer_grouping!r}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "layer_grouping"})

    def warmup_ends(self) -> Tensor:
        """Update (1-based) at which each parameter's layer ended its state-aware warm-up, S_k >= alpha T1
        (Ko et al. 2022, Eq. 7); -1 if not yet, or if the layer has no warm-up (``warmup=False`` or
        ``adapt=False``). Every parameter, in group order; an integer tensor."""
        ends = [
            self.state[p]["warmup_end"] if "warmup_end" in self.state[p] else torch.tensor(-1)
            for g in self.param_groups
            for p in g["params"]
        ]
        return torch.stack([e.to(ends[0].device, torch.long) for e in ends])

    def _layer_index(self, params: list[Tensor], device) -> Tensor | None:
        if self._layer_key is None:
            return None
        key = tuple(id(p) for p in params)
        if self._layer_index_cache is None or self._layer_index_cache[0] != key:
            ids: dict[Any, int] = {}
            index = [ids.setdefault(self._layer_key[id(p)], len(ids)) for p in params]
            self._layer_index_cache = (key, torch.tensor(index, dtype=torch.long, device=device))
        return self._layer_index_cache[1]

    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state.update(zeros_state(p, _STAT_KEYS[:-1]), warmup_end=torch.full((), -1, dtype=torch.long, device=p.device))
        return state

    def _scales(self, parts: list[Part], params: list[Tensor], groups_of: list[dict], source: tuple
                ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One LENA update's rates (Ko et al. 2022, Algorithm 1): A_k, B_k from ``stats.summary()``,
        then ``lena_rates`` (Eq. 4-8); the new state is written, the rates go to the update."""
        summary, n = source
        device, dtype = params[0].device, scalar_dtype(params)
        states = [self._init_state(p) for p in params]
        # mean-gradient scale, eps in its units; example statistics: A_eq and n = N/b
        A, B, n = self._gain_statistics(summary, n, params, dtype)
        # the per-parameter entries are views of one vector per key: no stack, one copy_ per key
        vectors = self.state_vectors("layers")
        new_state, intro = lena_rates(
            A,
            B,
            vectors.vectors(self.state, states, _STAT_KEYS, dtype),
            n=n,
            lr=group_vector(groups_of, "lr", device, dtype),
            # theta = alpha * T1 formed in double precision on the host (no truncation to epochs)
            theta=torch.tensor([g["alpha"] * g["base_iterations"] for g in groups_of], dtype=dtype, device=device),
            eps=group_vector(groups_of, "eps", device, dtype),
            warmup=group_vector(groups_of, "warmup", device, dtype=torch.bool),
            adapt=group_vector(groups_of, "adapt", device, dtype=torch.bool),
            layer_index=self._layer_index(params, device),
        )
        vectors.write(new_state)
        return [intro["effective_lr"]] * len(parts), intro

    def _update(self, part: Part, rates: Tensor) -> dict[str, Tensor | None]:
        """Momentum SGD at eta_{t,k}, the rate outside the buffer (``torch.optim.SGD``)."""
        self._sgd_update(part, rates)
        return {}

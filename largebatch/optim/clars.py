r"""CLARS: complete layer-wise adaptive rate scaling.

Huo, Gu, Huang, "Large Batch Optimization for Deep Learning Using New Complete
Layer-Wise Adaptive Rate Scaling", AAAI 2021, arXiv 2002.01576. LARS measures a
layer's gradient by the norm of the mini-batch gradient
:math:`\lVert\bar g_k\rVert`; CLARS by the mean of the per-example gradient
norms of that layer. Per layer k, with B examples, weight decay :math:`\beta`,
trust coefficient :math:`\eta`, momentum m and global rate :math:`\eta_t`:

.. math::

    G_k = \tfrac1B \textstyle\sum_i \lVert\nabla_k f_i(w)\rVert,\qquad
    \text{local}_k = \eta\,\frac{\lVert w_k\rVert}{G_k + \beta\lVert w_k\rVert + \epsilon}

    v_k \leftarrow m v_k + \eta_t\,\text{local}_k\,(\bar g_k + \beta w_k),\qquad
    w_k \leftarrow w_k - v_k

The reading. The public record of the paper does not show its algorithm box
in full; the form above (the mean of per-example layer norms in place of the
mini-batch norm, everything else as LARS) is the reading implemented here. By
the triangle inequality :math:`G_k \ge \lVert\bar g_k\rVert`, so the trust
ratio, and the rate, is never above LARS's, and much lower when examples
disagree (early training): that is how CLARS does without warm-up. The
per-layer statistic is pluggable: ``statistic="mean_norm"`` (default, the
above) or ``"rms_norm"`` (:math:`\sqrt{\tfrac1B\sum_i\lVert\nabla_k f_i\rVert^2}`,
also :math:`\ge G_k`), should a later reading of the paper differ.
Caveats of this reading: (1) it is a reading, not a transcription of the
paper's algorithm; (2) :math:`G_k` estimates :math:`E\lVert\nabla_k f_i\rVert`,
which does not shrink as the batch grows while :math:`\lVert\bar g_k\rVert` does,
so late in training (noise-dominated gradients) CLARS keeps a smaller rate than
LARS at every batch size; (3) per-example norms depend on what an "example" is:
with a mean loss the engine reports :math:`\nabla f_i` of example i's own
(undivided) loss, on the scale of :math:`\bar g`. ``local`` is 1 where
:math:`\lVert w_k\rVert = 0` or the denominator is 0 (as in LARS), without a
host sync.

Fallback. Where a layer has no exact per-example norm (BatchNorm in train
mode mixes examples: the engine reports ``"batchnorm-contribution"``; or the
engine returns NaN for it), the default ``inexact="fallback"`` uses
:math:`\sqrt{A_k}`, the root-mean-square of the n micro-batch (or worker)
gradient norms, which is :math:`\ge\lVert\bar g_k\rVert` and equals it (plain
LARS) when n = 1. ``inexact="use"`` takes the engine's per-example
contributions as they are. ``opt.fallback_layers`` names the layers that used
the fallback in the last step.

The optimiser reads the statistics from ``stats.summary()`` (built with
``GradientStatistics(model, per_example=True)``); weight norms go through
``largebatch.optim._sharded.layer_sq_norms`` (one all-reduce for FSDP2
DTensor parameters). Groups with ``adapt=False`` get local = 1 (momentum SGD
at :math:`\eta_t`), groups with ``weight_decay=0`` no decay: the two masks of
LARS.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._checks import check_bool, check_choice, check_range, check_sgd_group
from ._statistics import (
    ExampleSource,
    LabelledExamples,
    StatisticsOptimizer,
    Summary,
    check_source,
    group_vector,
    loss_scale_sq,
    scalar_dtype,
)
from .base import Part, recorded
from .lars import trust_ratios

__all__ = ["CLARS", "clars_trust_ratios"]

STATISTICS = ("mean_norm", "rms_norm")
INEXACT_METHODS = ("batchnorm-contribution",)


def clars_trust_ratios(
    weight_norms: Tensor,
    gradient_measure: Tensor,
    *,
    weight_decay: Tensor,
    trust_coefficient: Tensor,
    eps: Tensor,
    adapt: Tensor,
) -> Tensor:
    """CLARS trust ratios (Huo, Gu, Huang, AAAI 2021): LARS's ratio with G_k in place of ||g_k||,

        local_k = eta * ||w_k|| / (G_k + beta ||w_k|| + eps),   G_k = (1/B) sum_i ||grad_k f_i(w)||

    1 where ||w_k|| = 0, where the denominator G_k + beta ||w_k|| is 0 (as LARS), or where
    the group is not adapted. Vectors over the layers; no host sync.
    """
    return trust_ratios(weight_norms, gradient_measure + weight_decay * weight_norms,
                        coefficient=trust_coefficient, eps=eps, adapt=adapt)


class CLARS(StatisticsOptimizer):
    r"""CLARS (Huo, Gu, Huang, AAAI 2021): LARS with the mean per-example layer gradient norm.

    .. math::

        G_k = \tfrac1B \textstyle\sum_i \lVert\nabla_k f_i(w)\rVert,\qquad
        \text{local}_k = \eta\,\frac{\lVert w_k\rVert}{G_k + \beta\lVert w_k\rVert + \epsilon},\qquad
        v_k \leftarrow m v_k + \eta_t\,\text{local}_k\,(\bar g_k + \beta w_k),\quad w_k \leftarrow w_k - v_k

    See the module docstring for the reading of the paper and the fallback.

    Args:
        params: tensors, dicts or ``named_parameters()``.
        lr: :math:`\eta_t` (float or tensor; schedulers drive it). Default 1.0.
        momentum, dampening, nesterov: as LARS (rate inside the buffer; the
            buffer starts from the scaled update, never the raw gradient).
        weight_decay: :math:`\beta`, in the update and in the denominator.
        stats: the statistics source, built with ``per_example=True``.
        trust_coefficient: :math:`\eta` (default 0.001). eps: default 1e-8.
        statistic: ``"mean_norm"`` (default) or ``"rms_norm"``.
        adapt: use the trust ratio in this group (default True).
        inexact: ``"fallback"`` (default) or ``"use"`` for layers without exact
            per-example norms (see the module docstring).
        reset_statistics: call ``stats.reset()`` after each step and in ``zero_grad()`` (default True).

    Scales: :math:`G_k` is used on the scale of ``p.grad``, which the trust
    ratio multiplies (as LARS uses :math:`\lVert g_k\rVert`). The engine
    reports it on the mean-gradient scale with ``grad_scale`` = c, where
    ``p.grad`` = c :math:`\bar g` (c = m when m micro-batches are summed rather
    than averaged), so :math:`G_k` is multiplied by c; a ``GradScaler``'s loss
    scale, which the statistics saw but the unscaled ``p.grad`` no longer has,
    is the source's ``loss_scale`` (``GradientStatistics(model, per_example=True,
    grad_scaler=scaler)``) and is divided out; it is never read from ``p.grad``
    (clipping rescales ``p.grad``; :math:`G_k` stays the raw gradients'). A scaled step equals an unscaled one, and summed accumulation with
    ``weight_decay`` and ``eps`` (gradient units) multiplied by c takes the
    same steps as averaged accumulation.

    After each step (never checkpointed), per group as in LARS:
    ``last_trust_ratios``, ``effective_lrs()``, ``trust_ratios_by_name()``;
    plus ``last_gradient_measures`` (:math:`G_k`) and ``fallback_layers``, the
    names (or ``group{g}.{i}``) of the layers that used the fallback.
    """

    method = "clars"
    _introspected = ("trust_ratio", "gradient_measure")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        stats: Any = None,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
        statistic: str = "mean_norm",
        adapt: bool = True,
        inexact: str = "fallback",
        reset_statistics: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_source(stats, "CLARS", need_per_example=True)
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            trust_coefficient=trust_coefficient, eps=eps, statistic=statistic, adapt=adapt, inexact=inexact,
            maximize=maximize, foreach=foreach,
        )
        super().__init__(params, defaults, stats=stats, reset_statistics=reset_statistics)
        # how the engine computed each layer's per-example norm, where it says so
        examples = stats.per_example if isinstance(stats, ExampleSource) else None
        self._labels = examples.methods if isinstance(examples, LabelledExamples) else None
        self._inexact_cache: tuple[tuple[bool, ...] | None, Tensor | None] = (None, None)

    def step(self, closure: Any = None) -> Any:
        """One CLARS update (Huo et al. 2021): G_k from ``stats.summary()``, local_k, then LARS's momentum step."""
        return super().step(closure)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_sgd_group(group)
        for name in ("trust_coefficient", "eps"):
            check_range(name, group[name], 0.0)
        check_choice("statistic", group["statistic"], STATISTICS)
        check_choice("inexact", group["inexact"], ("fallback", "use"))
        check_bool("adapt", group["adapt"])

    def _clear_transient(self) -> None:
        super()._clear_transient()
        self._fallback: Tensor | None = None
        self._fallback_params: list[Tensor] = []

    last_trust_ratios = recorded("trust_ratio", "Per group, the trust ratios of the last step.")
    last_gradient_measures = recorded("gradient_measure", "Per group, G_k of the last step.")

    def trust_ratios_by_name(self) -> dict[str, Tensor]:
        """``{name: 0-d ratio}`` of the last step (``by_name``)."""
        return self.by_name("trust_ratio")

    @property
    def fallback_layers(self) -> list[str]:
        """Names of the layers whose measure used the fallback in the last step (reads the mask once)."""
        if self._fallback is None:
            return []
        names = {}
        for g, group in enumerate(self.param_groups):
            group_names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                names[id(p)] = group_names[i] if group_names else f"group{g}.{i}"
        flags = self._fallback.tolist()
        return [names[id(p)] for p, used in zip(self._fallback_params, flags) if used]

    def _inexact_mask(self, count: int) -> list[bool] | None:
        """Per statistics index: True where the engine says the per-example norm is not exact."""
        if self._labels is None:
            return None
        labels = list(self._labels().values())
        if len(labels) != count:
            return None
        return [any(part in INEXACT_METHODS for part in label.split("+")) for label in labels]

    def _gradient_measure(self, summary: Summary, params: list[Tensor], groups_of: list[dict]) -> tuple[Tensor, Tensor]:
        if summary.example_norm_mean is None or summary.example_sq_norm_mean is None:
            raise ValueError(
                "CLARS needs per-example gradient norms: build the statistics source with "
                "GradientStatistics(model, per_example=True)"
            )
        dtype = scalar_dtype(params)
        mean_norm = self._index.gather(summary.example_norm_mean, params).to(dtype)
        rms_norm = self._index.gather(summary.example_sq_norm_mean, params).to(dtype).clamp(min=0).sqrt()
        use_rms = torch.tensor([g["statistic"] == "rms_norm" for g in groups_of], device=mean_norm.device)
        measure = torch.where(use_rms, rms_norm, mean_norm)
        fallback = torch.isnan(measure)
        wants_fallback = [g["inexact"] == "fallback" for g in groups_of]
        if any(wants_fallback):
            inexact = self._inexact_mask(summary.example_norm_mean.numel())
            if inexact is not None and any(inexact):
                index = self._index.index(params, measure.device)
                key = tuple(inexact)
                if self._inexact_cache[0] != key:  # labels rarely change: build the mask once
                    self._inexact_cache = (key, torch.tensor(inexact, device=measure.device))
                engine_says = self._inexact_cache[1][index]
                fallback = fallback | (engine_says & torch.tensor(wants_fallback, device=measure.device))
        micro = self._index.gather(summary.sample_sq_norm_mean, params).to(dtype).clamp(min=0).sqrt()
        measure = torch.where(fallback, micro, measure)
        # The trust ratio multiplies p.grad, so G_k goes on p.grad's scale, as LARS's ||g_k||:
        # times c (p.grad = c * gbar: m micro-batches summed, not averaged) and without the loss
        # scale S the statistics saw but p.grad no longer has (GradScaler). Never read from
        # p.grad itself: clipping rescales it, and G_k must stay the raw gradients' measure.
        scale_sq = loss_scale_sq(summary, dtype, measure.device)
        loss_scale = scale_sq.sqrt() if isinstance(scale_sq, Tensor) else scale_sq**0.5
        return measure * (float(summary.grad_scale) / loss_scale), fallback

    def _scales(self, parts: list[Part], params: list[Tensor], groups_of: list[dict], source: tuple
                ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """LARS's ratio with G_k from ``stats.summary()`` (Huo et al. 2021), times each group's rate."""
        summary, _ = source
        device, dtype = params[0].device, scalar_dtype(params)
        weight_norms = torch.cat([part.weight_norms() for part in parts]).to(dtype)
        measure, fallback = self._gradient_measure(summary, params, groups_of)
        ratio = clars_trust_ratios(
            weight_norms, measure, weight_decay=group_vector(groups_of, "weight_decay", device, dtype),
            trust_coefficient=group_vector(groups_of, "trust_coefficient", device, dtype),
            eps=group_vector(groups_of, "eps", device, dtype), adapt=group_vector(groups_of, "adapt", device, torch.bool),
        )
        rates = ratio * group_vector(groups_of, "lr", device, dtype)
        self._fallback, self._fallback_params = fallback, params
        return [part.in_layout_order(rates) for part in parts], {"trust_ratio": ratio, "gradient_measure": measure}

    def _update(self, part: Part, rates: Tensor) -> dict[str, Tensor | None]:
        """LARS's momentum step, the rate inside the buffer (``inner`` = eta_t * local_k)."""
        self._momentum_update(part, inner=rates, outer=1.0, weight_decay=part.group["weight_decay"])
        return {}

r"""Grow the batch from the gradient noise scale, in your own training loop.

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch
Training" (2018): the simple noise scale :math:`B_\mathrm{noise} =
\operatorname{tr}(\Sigma)/|G|^2` (Eq. 2.8) is about the batch beyond which
more examples per update stop paying, and it grows as the loss falls. Its two
terms have unbiased estimates from the squared norms of mean gradients at two
batch sizes (App. A.1), since :math:`E|G_B|^2 = |G|^2 + \operatorname{tr}(\Sigma)/B`:

.. math::

    |G|^2 \approx \frac{B_\mathrm{big}|G_{B_\mathrm{big}}|^2 - B_\mathrm{small}|G_{B_\mathrm{small}}|^2}
                      {B_\mathrm{big} - B_\mathrm{small}},\qquad
    \operatorname{tr}(\Sigma) \approx \frac{|G_{B_\mathrm{small}}|^2 - |G_{B_\mathrm{big}}|^2}
                                          {1/B_\mathrm{small} - 1/B_\mathrm{big}}

(:func:`two_batch_estimates`). ``GradientStatistics`` already has both: the
small batch is one gradient sample (a micro-batch or a worker; the mean of the
samples' squared norms, A) or one example (per-example norms), the big batch
is the update's N examples (B = the applied gradient's squared norm).

With :math:`\sigma^2 = \operatorname{tr}(\Sigma)/b`, the variance of one
base-batch sample (b examples, the batch the rate was tuned at), and
:math:`\mu^2 = |G|^2`, the gain of an update of n base-batch samples is
AdaScale's (Johnson et al., ICML 2020, Eq. 7)

.. math::

    r(n) = \frac{\sigma^2 + \mu^2}{\sigma^2/n + \mu^2}

(:func:`batch_gain`): one update at batch n b is worth r(n) updates at b, and
its efficiency r(n)/n is the fraction of its examples that pay.
:func:`choose_batch` takes the largest batch whose efficiency is at least e:

.. math::

    \frac{r(n)}{n} \ge e \iff n b \le B_\mathrm{noise}\,(1/e - 1) + b/e,

about :math:`B_\mathrm{noise}` at the default e = 0.5, McCandlish et al.'s
critical batch (twice the fewest examples for twice the fewest updates).
:func:`next_batch` adds the guards against noise; :class:`AdaptiveBatch` keeps
the smoothed estimates and a record of :math:`B_\mathrm{noise}`, and
:class:`BatchScaledLR` sets a rate that follows the batch.

What each learning-rate rule does when the batch changes:

- AdaScale (the default; Johnson et al. 2020, Algorithm 1): nothing to set.
  Each update's gain :math:`r_t\in[1, n]` comes from that update's n samples
  (micro-batches x workers), so it follows the batch by itself; its moving
  averages are of one sample's variance and of :math:`|G|^2`, which do not
  depend on n, so they carry over a change. :math:`\tau` advances by
  :math:`r_t`, so the base schedule :math:`\eta_0(\tau)` (``ProgressLR``) and
  the end of the run, :math:`\tau \ge T_1` (``opt.done(T1)``), stay in
  base-batch iterations whatever the batch; a stated cap on the examples
  (``controller.examples``) ends it earlier.
- LENA (Ko et al. 2022, Eq. 5-7): the per-layer gains :math:`r_k\in[1, n]`
  follow the batch the same way, and its state-aware warm-up sums them
  (:math:`S_k \mathrel{+}= r_k` against :math:`\alpha T_1`), so it is
  measured in base-batch iterations and a larger batch ends it in fewer
  updates. Its decay is the group rate's: drive it by examples with
  ``BatchScaledLR(rule="none")``.
- LAMB and LARS: their rates do not see the batch. ``BatchScaledLR`` sets
  :math:`\eta_0\sqrt{B/b}\,\text{decay(examples)}` from the base rate at
  every update (square-root scaling, Krizhevsky 2014; Hoffer et al. 2017),
  so a change of batch changes the rate at once and never compounds; the
  trust ratios and moments carry over.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .scaling import SCALING_RULES, scale_lr

__all__ = ["AdaptiveBatch", "BatchScaledLR", "batch_gain", "choose_batch", "next_batch", "two_batch_estimates"]

_STATISTICS = ("micro_batch", "example")
_STATE_KEYS = ("batch", "updates", "last_change", "examples", "trace_avg", "grad_sq_avg", "avg_weight", "history")


def two_batch_estimates(small_sq_norm, big_sq_norm, small_batch, big_batch):
    r"""Unbiased ``(|G|^2, tr(Sigma))`` from squared gradient norms at two batch sizes.

    McCandlish et al. 2018, App. A.1: ``small_sq_norm`` estimates
    :math:`|G_{B_\mathrm{small}}|^2`, the squared norm of a mean gradient of
    ``small_batch`` examples (or the mean of several such), ``big_sq_norm`` the
    same at ``big_batch``; both have expectation :math:`|G|^2 +
    \operatorname{tr}(\Sigma)/B`, so

        |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

    are unbiased. With micro-batch samples (B_small = b, B_big = n b, |G_small|^2 = A)
    these are ``true_grad_sq_norm`` and b times ``sample_variance`` of
    ``largebatch.stats.estimators``. Floats or tensors (elementwise); |G|^2 may
    come out negative when noise dominates.
    """
    numbers = not isinstance(small_batch, torch.Tensor) and not isinstance(big_batch, torch.Tensor)
    if numbers and not 0 < small_batch < big_batch:
        raise ValueError(f"need 0 < small_batch < big_batch, got {small_batch!r} and {big_batch!r}")
    grad_sq = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
    return grad_sq, trace


def batch_gain(sigma2: float, mu2: float, n: float) -> float:
    r"""AdaScale's gain at n base-batch samples, :math:`r(n) = (\sigma^2 + \mu^2)/(\sigma^2/n + \mu^2)`.

    Johnson et al., ICML 2020, Eq. 7: how many base-batch updates one update
    of n samples is worth. A negative :math:`\sigma^2` (rounding) counts as 0;
    with :math:`\mu^2 \le 0` the noise hides the gradient and every sample
    counts fully: r = n.
    """
    if mu2 <= 0:
        return float(n)
    sigma2 = max(sigma2, 0.0)
    return (sigma2 + mu2) / (sigma2 / n + mu2)


def _efficiency(sigma2: float, mu2: float, batch: int, base_batch: int) -> float:
    n = batch / base_batch
    return batch_gain(sigma2, mu2, n) / n


def choose_batch(
    sigma2: float, mu2: float, *, base_batch: int, unit: int, min_batch: int, max_batch: int, efficiency: float
) -> int:
    r"""The largest multiple of ``unit`` in [min_batch, max_batch] whose efficiency r(n)/n is at least e.

    n = batch / base_batch; :math:`\sigma^2` is the variance of one base-batch
    sample, :math:`\mu^2 = |G|^2`. Closed form (module docstring): batch <=
    B_noise (1/e - 1) + b/e with B_noise = b sigma^2 / mu^2; every batch when
    :math:`\mu^2 \le 0`; ``min_batch`` when none reaches e.
    """
    if mu2 <= 0:
        return max_batch
    lo, hi = min_batch // unit, max_batch // unit
    noise = max(sigma2, 0.0) * base_batch / mu2
    limit = noise * (1.0 / efficiency - 1.0) + base_batch / efficiency
    k = hi if limit >= max_batch else max(lo, int(limit // unit))
    # the closed form and the efficiency itself may disagree by a rounding at the boundary
    while k < hi and _efficiency(sigma2, mu2, (k + 1) * unit, base_batch) >= efficiency:
        k += 1
    while k > lo and _efficiency(sigma2, mu2, k * unit, base_batch) < efficiency:
        k -= 1
    return k * unit


def next_batch(
    batch: int,
    sigma2: float,
    mu2: float,
    *,
    updates_since_change: int,
    cooldown: int,
    min_gain: float,
    allow_shrink: bool,
    base_batch: int,
    unit: int,
    min_batch: int,
    max_batch: int,
    efficiency: float,
) -> int:
    """The next update's batch: :func:`choose_batch` behind three guards against noisy estimates.

    - at most one change per ``cooldown`` updates (``updates_since_change``
      counts from the last change, or from the start);
    - growth only when the predicted gain per update, r(new)/r(batch), is at
      least ``1 + min_gain`` (adaptdl's users asked for 5%: adaptdl#27);
    - shrinking only with ``allow_shrink``, and only when the predicted
      efficiency per example, (r/n)(new) / (r/n)(batch), is at least
      ``1 + min_gain``.
    """
    if updates_since_change < cooldown:
        return batch
    target = choose_batch(sigma2, mu2, base_batch=base_batch, unit=unit, min_batch=min_batch,
                          max_batch=max_batch, efficiency=efficiency)
    if target > batch:
        gain = batch_gain(sigma2, mu2, target / base_batch) / batch_gain(sigma2, mu2, batch / base_batch)
    elif target < batch and allow_shrink:
        gain = _efficiency(sigma2, mu2, target, base_batch) / _efficiency(sigma2, mu2, batch, base_batch)
    else:
        return batch
    return target if gain >= 1.0 + min_gain else batch


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class AdaptiveBatch:
    r"""Choose each update's batch from the gradient noise scale (McCandlish et al. 2018).

    Each update, from the statistics the update gathered anyway (a
    ``GradientStatistics`` summary), :meth:`update`:

    1. estimates :math:`|G|^2` and :math:`\operatorname{tr}(\Sigma)` without
       bias (App. A.1, :func:`two_batch_estimates`): the small batch is one
       sample (``statistics="micro_batch"``: a micro-batch, or a worker with
       ``GradientStatistics(sample="worker")``; needs n >= 2 samples) or one
       example (``"example"``: per-example norms, ``per_example=True``), the
       big batch the update's N examples;
    2. smooths the two separately, each a bias-corrected moving average with
       factor ``smoothing``, and records :math:`B_\mathrm{noise} =
       \overline{\operatorname{tr}(\Sigma)}/\overline{|G|^2}` (``history``);
    3. returns the next update's batch (:func:`next_batch`): the largest
       multiple of ``micro_batch * world_size`` in [min_batch, max_batch] whose
       predicted efficiency r(n)/n is at least ``efficiency``, with
       r(n) = (sigma^2 + mu^2)/(sigma^2/n + mu^2) at n = batch / base_batch
       (AdaScale's gain, Johnson et al. 2020, Eq. 7), behind the guards.

    An update with non-finite statistics (a ``GradScaler`` overflow) or a
    single sample adds nothing to the averages. A ``GradScaler``'s loss scale
    (``summary.loss_scale``) is divided out, so the averages never mix scales.

    Args:
        micro_batch: examples per micro-batch on each worker.
        max_batch: the largest global batch; a multiple of ``micro_batch * world_size``.
        min_batch: the smallest global batch, a multiple of the same unit
            (default: the unit, or two micro-batches with ``"micro_batch"``
            statistics in one process, which need two samples).
        batch: the first update's batch (default ``min_batch``).
        base_batch: b, the batch at which the gain is 1 (the rate's tuning
            batch; default ``micro_batch``).
        world_size: data-parallel workers (default: the initialised default
            group's size, else 1).
        efficiency: e in (0, 1], the least predicted efficiency r(n)/n (0.5:
            about B_noise).
        smoothing: moving-average factor in [0, 1) of the two estimates.
        min_gain: the least predicted gain of a change (0.05: 5%).
        cooldown: at most one change per ``cooldown`` updates (also the
            updates before the first change).
        allow_shrink: allow the batch to shrink (default False).
        statistics: ``"micro_batch"`` or ``"example"``, as above.

    Host reads: :meth:`update` reads three numbers back to the host once per
    update (the data loader needs the next batch as a host number); nothing
    else syncs, and the optimiser step stays free of host syncs. Under DDP
    every rank reads the same all-reduced statistics (the engine sums the
    samples' norms over the workers in one all-reduce, and ``p.grad`` is the
    same averaged gradient on every rank), so every rank takes the same
    decision; on one process, accumulating the workers' micro-batches with
    the same ``world_size`` gives the same decisions.

    ``state_dict()`` / ``load_state_dict()`` round-trip exactly (the averages
    are host floats), so a resumed loop continues bit for bit. The settings
    are the constructor's, as the loop's other arguments: ``state_dict()``
    records them for reference, and ``load_state_dict()`` keeps the current
    ones (a larger ``max_batch`` on resume, say), refusing a saved batch
    that they do not allow.
    """

    def __init__(
        self,
        micro_batch: int,
        max_batch: int,
        *,
        min_batch: int | None = None,
        batch: int | None = None,
        base_batch: int | None = None,
        world_size: int | None = None,
        efficiency: float = 0.5,
        smoothing: float = 0.95,
        min_gain: float = 0.05,
        cooldown: int = 10,
        allow_shrink: bool = False,
        statistics: str = "micro_batch",
    ) -> None:
        self.micro_batch = _positive_int("micro_batch", micro_batch)
        self.world_size = _world_size() if world_size is None else _positive_int("world_size", world_size)
        self.unit = unit = self.micro_batch * self.world_size
        if statistics not in _STATISTICS:
            raise ValueError(f"statistics must be one of {_STATISTICS}, got {statistics!r}")
        self.statistics = statistics
        self.base_batch = self.micro_batch if base_batch is None else _positive_int("base_batch", base_batch)
        if min_batch is None:
            # one process, micro-batch samples: two micro-batches, or nothing is measured
            min_batch = 2 * unit if statistics == "micro_batch" and self.world_size == 1 else unit
        self.min_batch = self._multiple("min_batch", min_batch)
        self.max_batch = self._multiple("max_batch", max_batch)
        if self.max_batch < self.min_batch:
            raise ValueError(f"max_batch {self.max_batch} is below min_batch {self.min_batch}")
        if statistics == "micro_batch" and self.world_size == 1 and self.min_batch < 2 * unit:
            raise ValueError(
                f"min_batch {self.min_batch} is one micro-batch: statistics='micro_batch' in one process needs "
                f"two samples per update (min_batch >= {2 * unit}), or use statistics='example'"
            )
        if not isinstance(efficiency, (int, float)) or isinstance(efficiency, bool) or not 0 < efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
        if not isinstance(smoothing, (int, float)) or isinstance(smoothing, bool) or not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        if not isinstance(min_gain, (int, float)) or isinstance(min_gain, bool) or not 0 <= min_gain < math.inf:
            raise ValueError(f"min_gain must be a finite number >= 0, got {min_gain!r}")
        if not isinstance(allow_shrink, bool):
            raise ValueError(f"allow_shrink must be True or False, got {allow_shrink!r}")
        self.efficiency, self.smoothing, self.min_gain = float(efficiency), float(smoothing), float(min_gain)
        self.cooldown = _positive_int("cooldown", cooldown)
        self.allow_shrink = allow_shrink
        first = self.min_batch if batch is None else batch
        self.batch = self._allowed("batch", first)
        self.updates = 0  # updates observed
        self.last_change = 0  # the update after which the batch last changed (0: the start)
        self.examples = 0  # examples of the updates observed (the summaries' counts)
        self.trace_avg = self.grad_sq_avg = self.avg_weight = 0.0
        self.history: list[dict[str, Any]] = []

    # -- settings -----------------------------------------------------------
    def _multiple(self, name: str, value: object) -> int:
        value = _positive_int(name, value)
        if value % self.unit:
            raise ValueError(
                f"{name} {value} is not a multiple of micro_batch x world_size = "
                f"{self.micro_batch} x {self.world_size} = {self.unit}"
            )
        return value

    def _allowed(self, name: str, value: object) -> int:
        value = self._multiple(name, value)
        if not self.min_batch <= value <= self.max_batch:
            raise ValueError(f"{name} {value} is outside [min_batch, max_batch] = [{self.min_batch}, {self.max_batch}]")
        return value

    def settings(self) -> dict[str, Any]:
        """The constructor's settings (also in ``state_dict()["settings"]``)."""
        names = ("micro_batch", "world_size", "min_batch", "max_batch", "base_batch", "efficiency", "smoothing",
                 "min_gain", "cooldown", "allow_shrink", "statistics")
        return {name: getattr(self, name) for name in names}

    # -- what the loop reads ------------------------------------------------
    @property
    def micro_batches(self) -> int:
        """Micro-batches each worker runs in the next update: batch / (micro_batch x world_size)."""
        return self.batch // self.unit

    def estimates(self) -> tuple[float, float] | None:
        r"""The smoothed (sigma^2, mu^2): variance of one base-batch sample, |G|^2; None before any estimate."""
        if self.avg_weight == 0:
            return None
        return self.trace_avg / self.avg_weight / self.base_batch, self.grad_sq_avg / self.avg_weight

    @property
    def noise_scale(self) -> float:
        """Smoothed B_noise = tr(Sigma)/|G|^2 in examples; NaN before any estimate, inf while |G|^2 <= 0."""
        if self.avg_weight == 0:
            return math.nan
        if self.grad_sq_avg <= 0:
            return math.inf
        return max(self.trace_avg, 0.0) / self.grad_sq_avg

    def gain(self, batch: int | None = None) -> float:
        """Predicted gain r(n) of an update of ``batch`` (default: the next one's) over the base batch.

        NaN before any estimate."""
        estimates = self.estimates()
        if estimates is None:
            return math.nan
        return batch_gain(*estimates, (self.batch if batch is None else batch) / self.base_batch)

    # -- the update -----------------------------------------------------------
    def update(self, summary) -> int:
        """Take an update's ``GradientSummary`` and return the next update's batch.

        Call once per update, after its last backward and before
        ``optimizer.step()`` (a statistics-driven optimiser resets the
        statistics in its step). One host read (class docstring).
        """
        small, big, examples, small_batch = self._read(summary)
        self.updates += 1
        self.examples += examples
        if small_batch < examples and math.isfinite(small) and math.isfinite(big):
            grad_sq, trace = two_batch_estimates(small, big, small_batch, examples)
            c = self.smoothing
            self.trace_avg = c * self.trace_avg + (1 - c) * trace
            self.grad_sq_avg = c * self.grad_sq_avg + (1 - c) * grad_sq
            self.avg_weight = c * self.avg_weight + (1 - c)  # bias correction: divide by the weight
        used = self.batch
        estimates = self.estimates()
        if estimates is not None:
            self.batch = next_batch(
                used, *estimates, updates_since_change=self.updates - self.last_change, cooldown=self.cooldown,
                min_gain=self.min_gain, allow_shrink=self.allow_shrink, base_batch=self.base_batch, unit=self.unit,
                min_batch=self.min_batch, max_batch=self.max_batch, efficiency=self.efficiency,
            )
            if self.batch != used:
                self.last_change = self.updates
        self.history.append({"update": self.updates, "batch": used, "examples": examples,
                             "noise_scale": self.noise_scale, "gain": self.gain(used)})
        return self.batch

    def _read(self, summary) -> tuple[float, float, int, float]:
        """(|G_small|^2, |G_big|^2, N, B_small) of the update on the unscaled mean-gradient scale, in one host read."""
        if self.statistics == "example":
            if summary.example_sq_norm_mean is None:
                raise RuntimeError("AdaptiveBatch(statistics='example') needs GradientStatistics(per_example=True)")
            small = summary.example_sq_norm_mean.sum()
        else:
            small = summary.sample_sq_norm_mean.sum()
        big = summary.mean_grad_sq_norm.sum()
        values = [small.double(), big.double()]
        host_values = {}
        for name, value in (("examples", summary.num_examples), ("scale", summary.loss_scale)):
            if isinstance(value, torch.Tensor):
                values.append(value.to(small.device, torch.float64).reshape(()))
            else:
                host_values[name] = float(value)
        read = torch.stack(values).tolist()  # the one host read of the update
        small, big = read[0], read[1]
        rest = iter(read[2:])
        examples = host_values["examples"] if "examples" in host_values else next(rest)
        scale = host_values["scale"] if "scale" in host_values else next(rest)
        if examples < 1:
            raise RuntimeError(
                "the summary counts no examples (no tensor argument to the model's forward); "
                "pass batched tensors to forward, or use per_example=True"
            )
        examples = round(examples)
        small_batch = 1.0 if self.statistics == "example" else examples / summary.n
        return small / scale**2, big / scale**2, examples, small_batch

    # -- checkpoints -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The controller's state (host numbers and the record), and its settings for reference."""
        state = {key: copy.deepcopy(getattr(self, key)) for key in _STATE_KEYS}
        state["settings"] = self.settings()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict()``; the settings stay this controller's."""
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"not an AdaptiveBatch state dict: missing {', '.join(missing)}")
        self._allowed("the saved batch", state_dict["batch"])
        for key in _STATE_KEYS:
            setattr(self, key, copy.deepcopy(state_dict[key]))


class BatchScaledLR(LRScheduler):
    r"""A rate that follows the batch: ``lr = base_lr * rule(batch / base_batch) * lr_lambda(examples)``.

    For LAMB and LARS, whose rates do not adapt to the batch by themselves:
    each group's rate is its base rate :math:`\eta_0` (tuned at ``base_batch``),
    scaled to the controller's current batch by ``rule`` (``"sqrt"``,
    :math:`\eta_0\sqrt{B/b}`, Krizhevsky 2014, Hoffer et al. 2017;
    ``"linear"``; ``"none"``), times the decay schedule ``lr_lambda`` as a
    function of the examples seen (``controller.examples``): with a batch that
    changes, the number of updates is not known in advance, the examples
    (epochs) are. ``rule="none"`` drives a LENA schedule the same way.

    Call ``step()`` after each ``optimizer.step()`` and after
    ``controller.update(...)``: the rate set is the next update's, at its
    batch. It is recomputed from the base rate each step, so the scaling
    never compounds. ``state_dict()`` saves as ``LambdaLR`` does, without a
    function ``lr_lambda``; rebuild with the same function and controller,
    then load.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        controller: AdaptiveBatch,
        lr_lambda: Callable[[int], float] | None = None,
        *,
        rule: str = "sqrt",
        base_batch: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if rule not in SCALING_RULES:
            raise ValueError(f"rule must be one of {', '.join(map(repr, SCALING_RULES))}, got {rule!r}")
        if not isinstance(controller, AdaptiveBatch):
            raise TypeError(f"controller must be an AdaptiveBatch, got {type(controller).__name__}")
        self.controller, self.rule, self.lr_lambda = controller, rule, lr_lambda
        self.base_batch = controller.base_batch if base_batch is None else _positive_int("base_batch", base_batch)
        super().__init__(optimizer, last_epoch)

    def factor(self) -> float:
        """The multiplier of the base rates for the next update."""
        scale = scale_lr(self.rule, 1.0, self.base_batch, self.controller.batch)
        return scale * (1.0 if self.lr_lambda is None else float(self.lr_lambda(self.controller.examples)))

    def get_lr(self) -> list[float]:
        factor = self.factor()
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        skip = ("optimizer", "controller", "lr_lambda")
        state = {key: value for key, value in self.__dict__.items() if key not in skip}
        state["lr_lambda"] = (None if self.lr_lambda is None or isinstance(self.lr_lambda, types.FunctionType)
                              else dict(self.lr_lambda.__dict__))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        lr_lambda = state.pop("lr_lambda", None)
        self.__dict__.update(state)
        if isinstance(lr_lambda, dict) and self.lr_lambda is not None:
            self.lr_lambda.__dict__.update(lr_lambda)

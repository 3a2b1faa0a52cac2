"""Gradual warm-up (Goyal et al. 2017) as a chainable ``torch.optim`` scheduler.

Goyal et al. ("Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
2017, Sec. 2.2) start a large-batch run at the small-batch rate eta0 and raise
it by a constant amount every iteration until it reaches the scaled rate after
5 epochs; the decay schedule then continues as usual. The LENA paper's LSW
baseline (Ko et al. 2022) warms up over 5.5% of the epochs.

With ``W`` warm-up steps and start factor ``s`` the multiplier applied to a
group's rate after ``t`` calls of :meth:`GradualWarmup.step` is::

    f(t) = s + (1 - s) * t / W    for t < W,      f(t) = 1    for t >= W

so the first update uses ``s * peak`` (``eta0`` when ``start_lr=eta0``), the
update after ``W`` scheduler steps uses the peak rate exactly, and from then on
the scheduler leaves the rate alone.

LSW (linear scaling + warm-up on momentum SGD) in two lines::

    opt = SGD(model.parameters(), lr=linear_scaling(0.1, 128, batch), momentum=0.9, weight_decay=5e-4)
    sched = warmup_then(opt, ExponentialLR(opt, gamma=0.01 ** (1 / total_steps)),
                        warmup_epochs=0.055 * epochs, steps_per_epoch=steps_per_epoch, start_lr=0.1)

and ``sched.step()`` after every ``opt.step()``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Literal

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ChainedScheduler, LRScheduler, SequentialLR

__all__ = ["GradualWarmup", "epochs_to_steps", "warmup_factor", "warmup_then"]


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return _is_real(value) and float(value).is_integer()


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps, rounded to the nearest step.

    Fractional epochs are allowed (LENA's LSW warms up over 5.5% of the run).
    Rounds to nearest rather than truncating, so ``0.3 * 10`` is 3 steps and
    a warm-up is not silently shortened by a whole epoch.
    """
    if not _is_int(steps_per_epoch) or steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
    if not _is_real(epochs) or not math.isfinite(epochs) or epochs < 0:
        raise ValueError(f"warmup_epochs must be a finite number >= 0, got {epochs!r}")
    return int(math.floor(epochs * int(steps_per_epoch) + 0.5))


def warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    """The warm-up multiplier after ``step`` scheduler steps: linear from ``start_factor`` to 1."""
    if step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * step / warmup_steps


def _resolve_warmup_steps(
    warmup_steps: int | None, warmup_epochs: float | None, steps_per_epoch: int | None
) -> int:
    if (warmup_steps is None) == (warmup_epochs is None):
        raise ValueError("give exactly one of warmup_steps and warmup_epochs")
    if warmup_epochs is not None:
        if steps_per_epoch is None:
            raise ValueError("steps_per_epoch is required with warmup_epochs")
        return epochs_to_steps(warmup_epochs, steps_per_epoch)
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    return int(warmup_steps)


def _per_group(name: str, value: object, n_groups: int) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_groups
    if len(values) != n_groups:
        raise ValueError(f"{name} has {len(values)} values for {n_groups} param groups")
    for v in values:
        if not _is_real(v) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number (or one per param group), got {v!r}")
    return [float(v) for v in values]


def _peak_lrs(optimizer: Optimizer) -> list[float]:
    # The group's own rate is the warm-up's target; "initial_lr" wins when an
    # earlier scheduler on this optimizer has already recorded it.
    return [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]


def _start_factors(
    optimizer: Optimizer, start_lr: object, start_factor: object
) -> list[float]:
    n_groups = len(optimizer.param_groups)
    if (start_lr is None) == (start_factor is None):
        raise ValueError(
            "give exactly one of start_lr (the unscaled base rate eta0 of Goyal et al. 2017) "
            "and start_factor (start rate / peak rate)"
        )
    if start_factor is not None:
        factors = _per_group("start_factor", start_factor, n_groups)
        for f in factors:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"start_factor must be in (0, 1], got {f!r}")
        return factors
    factors = []
    for i, (lr0, peak) in enumerate(
        zip(_per_group("start_lr", start_lr, n_groups), _peak_lrs(optimizer))
    ):
        if peak == 0.0:
            factors.append(1.0)  # nothing to warm up
        elif not 0.0 < lr0 <= peak:
            raise ValueError(
                f"start_lr must be in (0, peak rate]; got {lr0!r} for param group {i} "
                f"whose rate is {peak!r}"
            )
        else:
            factors.append(lr0 / peak)
    return factors


def _as_stored(current: float | torch.Tensor, value: float) -> float:
    """The value ``current`` holds after being set to ``value`` (tensor lrs are filled in place)."""
    if isinstance(current, torch.Tensor):
        return torch.tensor(value, dtype=current.dtype).item()
    return value


class GradualWarmup(LRScheduler):
    """Linear warm-up of every param group's rate (Goyal et al. 2017), chainable.

    The rate of each group rises linearly from ``start_factor * peak`` to its
    ``peak`` (the group's ``lr`` when the scheduler is built) over
    ``warmup_steps`` calls of :meth:`step`, then is left alone. Call
    :meth:`step` once per optimizer update.

    Args:
        optimizer: the wrapped optimizer; its group rates are the peak rates
            (typically scaled with :func:`linear_scaling`).
        warmup_steps: warm-up length W in scheduler steps (0: no warm-up).
        warmup_epochs: alternatively, the length in epochs (fractions allowed),
            with ``steps_per_epoch``; rounded to the nearest step.
        steps_per_epoch: optimizer updates per epoch.
        start_lr: the unscaled base rate eta0 the warm-up starts from (Goyal
            et al.'s choice): ``start_factor = start_lr / peak`` per group. One
            number or one per param group.
        start_factor: alternatively, the start rate as a fraction of the peak,
            in (0, 1]. One number or one per param group.
        last_epoch: as in :class:`~torch.optim.lr_scheduler.LRScheduler`;
            resume with :meth:`load_state_dict` instead.

    Composition: the warm-up multiplies whatever rate it finds (the chainable
    form of ``torch.optim.lr_scheduler``), so
    ``ChainedScheduler([GradualWarmup(...), ExponentialLR(...)])`` gives the
    product of both schedules, and ``SequentialLR([warmup, decay],
    milestones=[W])`` hands over to ``decay`` after the warm-up. Tensor ``lr``
    is filled in place and stays a tensor.

    Why it keeps state: the multiplier is undone exactly rather than by the
    ratio ``f(t) / f(t - 1)``, so that, on its own, the warm-up ends at the
    peak rate bit for bit. When another scheduler has changed the rate since
    the last step, the rate it left is divided by the multiplier last applied.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int | None = None,
        *,
        warmup_epochs: float | None = None,
        steps_per_epoch: int | None = None,
        start_lr: float | Sequence[float] | None = None,
        start_factor: float | Sequence[float] | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.warmup_steps = _resolve_warmup_steps(warmup_steps, warmup_epochs, steps_per_epoch)
        self.start_factors = _start_factors(optimizer, start_lr, start_factor)
        n_groups = len(optimizer.param_groups)
        # Per group: the rate before the warm-up multiplier, the multiplier in
        # force, and the rate as written (to notice changes by other schedulers).
        self._undecorated: list[float | None] = [None] * n_groups
        self._applied: list[float] = [1.0] * n_groups
        self._written: list[float | None] = [None] * n_groups
        super().__init__(optimizer, last_epoch)

    def factors(self, step: int | None = None) -> list[float]:
        """The warm-up multiplier of each group after ``step`` (default: the current) steps."""
        step = self.last_epoch if step is None else step
        return [warmup_factor(step, self.warmup_steps, s) for s in self.start_factors]

    @property
    def finished(self) -> bool:
        """True once the rate has reached the peak and the warm-up leaves it alone."""
        return self.last_epoch >= self.warmup_steps

    def get_lr(self) -> list[float | torch.Tensor]:
        """Rates for the current ``last_epoch``; use :meth:`get_last_lr` to read them."""
        if not self._within_step():
            warnings.warn(
                "GradualWarmup.get_lr() computes the next rates; use get_last_lr() to read the current ones",
                UserWarning,
                stacklevel=2,
            )
        groups = self.optimizer.param_groups
        step = self.last_epoch
        if step > self.warmup_steps:
            return [group["lr"] for group in groups]
        if self._is_initial and step > 0:
            # Resumed through ``last_epoch``: torch's convention leaves the rate
            # found, which carries the multiplier of the previous step.
            held = self.factors(step - 1)
            self._record([float(g["lr"]) / f for g, f in zip(groups, held)], held, None)
            return [group["lr"] for group in groups]
        factors = self.factors(step)
        bases = [self._undecorated_rate(i, g["lr"], step) for i, g in enumerate(groups)]
        rates = [base * factor for base, factor in zip(bases, factors, strict=True)]
        self._record(bases, factors, rates)
        return rates

    def _undecorated_rate(self, i: int, current: float | torch.Tensor, step: int) -> float:
        current = float(current)
        if step == 0:
            # As in torch's chainable schedulers: at step 0 the rate found is
            # the undecorated one (also after SequentialLR resets it).
            return current
        if current == self._written[i]:
            return self._undecorated[i]
        return current / self._applied[i]

    def _within_step(self) -> bool:
        # Set by torch's LRScheduler around the get_lr() call made by step().
        return getattr(self, "_get_lr_called_within_step", True)

    def _record(
        self, bases: list[float], factors: list[float], rates: list[float] | None
    ) -> None:
        # Only when torch is about to write these rates: a stray get_lr() call
        # from user code must not change what the next step undoes.
        if not self._within_step():
            return
        for i, group in enumerate(self.optimizer.param_groups):
            self._undecorated[i] = bases[i]
            self._applied[i] = factors[i]
            self._written[i] = None if rates is None else _as_stored(group["lr"], rates[i])


def warmup_then(
    optimizer: Optimizer,
    decay: LRScheduler | Callable[[Optimizer], LRScheduler] | None = None,
    *,
    warmup_steps: int | None = None,
    warmup_epochs: float | None = None,
    steps_per_epoch: int | None = None,
    start_lr: float | Sequence[float] | None = None,
    start_factor: float | Sequence[float] | None = None,
    compose: Literal["product", "sequential"] = "product",
) -> LRScheduler:
    """Gradual warm-up followed by a decay schedule, as one scheduler.

    Args:
        optimizer: the wrapped optimizer, its rates set to the (scaled) peak.
        decay: a ``torch.optim.lr_scheduler`` scheduler on ``optimizer``, or a
            factory ``optimizer -> scheduler``; ``None`` for warm-up only.
        warmup_steps, warmup_epochs, steps_per_epoch, start_lr, start_factor:
            as in :class:`GradualWarmup`.
        compose: ``"product"`` (default) runs the decay from step 0 and
            multiplies it by the warm-up (``ChainedScheduler``), so the decay
            keeps the training clock, as in Goyal et al. 2017 and LENA's LSW;
            the decay must be chainable (``ExponentialLR``, ``StepLR``,
            ``MultiStepLR``, ``CosineAnnealingLR`` with ``eta_min=0``,
            ``PolynomialLR``...). ``"sequential"`` starts the decay from the
            peak after the warm-up (``SequentialLR``), for schedules such as
            ``LambdaLR`` that set the rate outright.

    Call ``step()`` on the result after every optimizer update.
    """
    if compose not in ("product", "sequential"):
        raise ValueError(f"compose must be 'product' or 'sequential', got {compose!r}")
    warmup = GradualWarmup(
        optimizer,
        warmup_steps,
        warmup_epochs=warmup_epochs,
        steps_per_epoch=steps_per_epoch,
        start_lr=start_lr,
        start_factor=start_factor,
    )
    if decay is None:
        return warmup
    if not isinstance(decay, LRScheduler):
        if not callable(decay):
            raise ValueError(f"decay must be an LRScheduler or a factory, got {decay!r}")
        decay = decay(optimizer)
    if decay.optimizer is not optimizer:
        raise ValueError("decay must schedule the same optimizer as the warm-up")
    if compose == "product":
        return ChainedScheduler([warmup, decay], optimizer=optimizer)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup.warmup_steps])

"""Fixed learning-rate scaling rules for a larger batch.

A rate ``base_lr`` (eta0) tuned at ``base_batch`` (b) is carried to a batch of
``batch`` (B) samples per update:

- linear scaling (Goyal et al. 2017, "Accurate, Large Minibatch SGD"):
  ``eta = eta0 * B / b``;
- square-root scaling (Krizhevsky 2014, "One weird trick..."; Hoffer, Hubara
  and Soudry 2017, "Train longer, generalize better"): ``eta = eta0 * sqrt(B / b)``,
  which keeps the variance of the update constant.

Either is usually paired with gradual warm-up (:class:`GradualWarmup`).
``B`` is the global batch: workers x accumulation micro-batches x micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

__all__ = ["SCALING_RULES", "linear_scaling", "scale_lr", "sqrt_scaling"]


def _positive(name: str, value: object) -> float:
    # bool is a Real subclass; True as a batch size is always a mistake.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _batch_ratio(base_batch: object, batch: object) -> float:
    return _positive("batch", batch) / _positive("base_batch", base_batch)


def linear_scaling(base_lr: float, base_batch: float, batch: float) -> float:
    """Return ``base_lr * batch / base_batch`` (Goyal et al. 2017).

    >>> linear_scaling(0.1, 256, 8192)
    3.2
    """
    return _positive("base_lr", base_lr) * _batch_ratio(base_batch, batch)


def sqrt_scaling(base_lr: float, base_batch: float, batch: float) -> float:
    """Return ``base_lr * sqrt(batch / base_batch)`` (Krizhevsky 2014; Hoffer et al. 2017).

    >>> sqrt_scaling(0.1, 128, 512)
    0.2
    """
    return _positive("base_lr", base_lr) * math.sqrt(_batch_ratio(base_batch, batch))


def _no_scaling(base_lr: float, base_batch: float, batch: float) -> float:
    # Validated like the others so that a sweep over rules fails the same way.
    _batch_ratio(base_batch, batch)
    return _positive("base_lr", base_lr)


SCALING_RULES: dict[str, Callable[[float, float, float], float]] = {
    "linear": linear_scaling,
    "sqrt": sqrt_scaling,
    "none": _no_scaling,
}


def scale_lr(rule: str, base_lr: float, base_batch: float, batch: float) -> float:
    """Scale ``base_lr`` from ``base_batch`` to ``batch`` by the rule named ``rule``.

    ``rule`` is one of ``"linear"`` (:func:`linear_scaling`), ``"sqrt"``
    (:func:`sqrt_scaling`) or ``"none"`` (the rate unchanged).

    >>> scale_lr("sqrt", 0.1, 128, 8192)
    0.8
    """
    try:
        scale = SCALING_RULES[rule]
    except (KeyError, TypeError):
        choices = ", ".join(repr(name) for name in SCALING_RULES)
        raise ValueError(f"rule must be one of {choices}, got {rule!r}") from None
    return scale(base_lr, base_batch, batch)

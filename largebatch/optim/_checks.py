"""Argument checks of every optimiser here: ``ValueError`` naming the argument, at
construction (``add_param_group``) and again in the functional cores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = [
    "check_alpha",
    "check_base_batch",
    "check_bool",
    "check_choice",
    "check_foreach_fused",
    "check_group_base_batch",
    "check_lr",
    "check_range",
    "check_sgd_group",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_lr(lr: Any, *, read: bool = True) -> None:
    """``lr`` is a non-negative number or a one-element tensor. ``read=False`` (inside a
    step): a tensor's value is not read, which would synchronise with the device."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if lr.requires_grad:
            raise ValueError("lr: a tensor lr must not require grad")
        if not read:
            return
        value = float(lr.detach().cpu())  # at construction, not in step()
    elif _is_number(lr):
        value = float(lr)
    else:
        raise ValueError(f"lr: expected a float or a tensor, got {type(lr).__name__}")
    if not value >= 0.0:
        raise ValueError(f"lr: must be >= 0, got {value}")


def check_range(
    name: str, value: Any, low: float, high: float = math.inf, *, high_open: bool = False
) -> None:
    """``low <= value <= high`` (``< high`` with ``high_open``), else ValueError naming it."""
    if not _is_number(value):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name}: must be in [{low}, {high}{bracket}, got {value}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_foreach_fused(foreach: Any, fused: Any) -> None:
    """``foreach`` is None or a bool, ``fused`` a bool, and not both set."""
    if foreach is not None:
        check_bool("foreach", foreach)
    check_bool("fused", fused)
    if fused and foreach:
        raise ValueError("fused: fused=True and foreach=True cannot be set together")


def check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha: the warm-up fraction must be in (0, 1], got {alpha!r}")


def check_sgd_group(group: dict) -> None:
    """The momentum-SGD hyperparameters every method has (ValueError naming the argument)."""
    check_lr(group["lr"])
    check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    check_range("dampening", group["dampening"], 0.0, 1.0)
    check_range("weight_decay", group["weight_decay"], 0.0)
    for name in ("nesterov", "maximize"):
        check_bool(name, group[name])
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("nesterov: Nesterov momentum needs momentum > 0 and dampening = 0")


def check_group_base_batch(statistics: str, group: dict, first_group: dict) -> None:
    """A new group's ``base_batch``: with example statistics one positive integer shared by every
    group (n = N/b is one per step); with micro-batch statistics None."""
    if statistics != "example":
        if group.get("base_batch") is not None:
            raise ValueError("base_batch is only used with statistics='example'")
        return
    check_base_batch(group["base_batch"])
    first = first_group["base_batch"]
    if group["base_batch"] != first:
        raise ValueError(
            f"base_batch: every parameter group needs the same base batch (n = N/b is one per step), "
            f"got {first} and {group['base_batch']}"
        )


def check_base_batch(base_batch) -> None:
    if isinstance(base_batch, bool) or not isinstance(base_batch, int) or base_batch < 1:
        raise ValueError(
            "base_batch: statistics='example' needs the base batch b (a positive integer, the batch "
            f"the base rate was tuned at), got {base_batch!r}"
        )

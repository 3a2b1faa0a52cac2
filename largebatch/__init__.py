"""largebatch: training neural networks with very large batches.

Optimisers (``torch.optim`` drop-ins): :class:`CLARS`, :class:`LENA`,
:class:`AdaScale`, :class:`LARS`, :class:`LAMB`.
Scaling rules and warm-up: :func:`linear_scaling`, :func:`sqrt_scaling`,
:func:`scale_lr`, :class:`GradualWarmup`, :func:`warmup_then`.
Adaptive batch size from the gradient noise scale: :class:`AdaptiveBatch`,
with :class:`BatchScaledLR` for a rate that follows the batch.
Parameter groups with the two exclusion masks (weight decay, adaptation):
:func:`param_groups`, :func:`plan_param_groups`.
Gradient statistics: :class:`GradientStatistics`.
Batch-size advice for your own model: :func:`advise` (the gradient noise scale;
:func:`format_advice`, or ``advice.summary()``, puts it in words).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each export is imported on first use, so that `import largebatch` (and the command line's start-up, where
# a Ctrl-C must not meet a half-done `import torch` outside its handler) costs nothing until it is needed.
_EXPORTS = {
    "AdaScale": ".optim",
    "CLARS": ".optim",
    "LAMB": ".optim",
    "LARS": ".optim",
    "LENA": ".optim",
    "ProgressLR": ".optim",
    "param_groups": ".param_groups",
    "plan_param_groups": ".param_groups",
    "AdaptiveBatch": ".schedules",
    "BatchScaledLR": ".schedules",
    "GradualWarmup": ".schedules",
    "linear_scaling": ".schedules",
    "scale_lr": ".schedules",
    "sqrt_scaling": ".schedules",
    "warmup_then": ".schedules",
    "GradientStatistics": ".stats",
    "GradientSummary": ".stats",
    "Advice": ".train.advise",
    "advise": ".train.advise",
    "format_advice": ".train.advise",
}

__all__ = sorted(_EXPORTS, key=str.lower)

if TYPE_CHECKING:
    from .optim import CLARS, LAMB, LARS, LENA, AdaScale, ProgressLR
    from .param_groups import param_groups, plan_param_groups
    from .schedules import AdaptiveBatch, BatchScaledLR, GradualWarmup, linear_scaling, scale_lr, sqrt_scaling, warmup_then
    from .stats import GradientStatistics, GradientSummary
    from .train.advise import Advice, advise, format_advice


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'largebatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing a submodule sets it as an attribute of this package; `param_groups` names both a
        # submodule and the function exported here, and the function must stay.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""largebatch: training neural networks with very large batches.

Optimisers (``torch.optim`` drop-ins): :class:`CLARS`, :class:`LENA`,
:class:`AdaScale`, :class:`LARS`, :class:`LAMB`.
Scaling rules and warm-up: :func:`linear_scaling`, :func:`sqrt_scaling`,
:func:`scale_lr`, :class:`GradualWarmup`, :func:`warmup_then`.
Parameter groups with the two exclusion masks (weight decay, adaptation):
:func:`param_groups`, :func:`plan_param_groups`.
Gradient statistics: :class:`GradientStatistics`.
Batch-size advice for your own model: :func:`advise` (the gradient noise scale).
"""

from .optim import CLARS, LAMB, LARS, LENA, AdaScale, ProgressLR
from .param_groups import param_groups, plan_param_groups
from .schedules import GradualWarmup, linear_scaling, scale_lr, sqrt_scaling, warmup_then
from .stats import GradientStatistics, GradientSummary

__version__ = "0.1.0"

__all__ = [
    "AdaScale",
    "advise",
    "CLARS",
    "LAMB",
    "LENA",
    "ProgressLR",
    "LARS",
    "GradientStatistics",
    "GradientSummary",
    "GradualWarmup",
    "linear_scaling",
    "param_groups",
    "plan_param_groups",
    "scale_lr",
    "sqrt_scaling",
    "warmup_then",
]


def __getattr__(name: str):
    # Imported on first use: largebatch.train imports this package's version.
    if name == "advise":
        from .train.advise import advise

        return advise
    raise AttributeError(f"module 'largebatch' has no attribute {name!r}")

"""Learning-rate scaling rules for large batches and gradual warm-up.

:func:`linear_scaling` (Goyal et al. 2017), :func:`sqrt_scaling` (Krizhevsky
2014; Hoffer et al. 2017) and :func:`scale_lr` carry a rate tuned at a base
batch to a larger one; :class:`GradualWarmup` (Goyal et al. 2017) is a
chainable ``torch.optim.lr_scheduler`` scheduler, and :func:`warmup_then`
joins it to a decay schedule. :class:`AdaptiveBatch` grows the batch from the
gradient noise scale (McCandlish et al. 2018) in your own loop, and
:class:`BatchScaledLR` keeps a rate scaled to the batch it chose.
"""

from .adaptive_batch import AdaptiveBatch, BatchScaledLR
from .scaling import SCALING_RULES, linear_scaling, scale_lr, sqrt_scaling
from .warmup import GradualWarmup, epochs_to_steps, warmup_factor, warmup_then

__all__ = [
    "AdaptiveBatch",
    "BatchScaledLR",
    "SCALING_RULES",
    "GradualWarmup",
    "epochs_to_steps",
    "linear_scaling",
    "scale_lr",
    "sqrt_scaling",
    "warmup_factor",
    "warmup_then",
]

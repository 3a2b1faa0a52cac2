"""largebatch: training neural networks with very large batches.

Optimisers (``torch.optim`` drop-ins): :class:`LARS`, :class:`LAMB`.
Scaling rules and warm-up: :func:`linear_scaling`, :func:`sqrt_scaling`,
:class:`GradualWarmup`. Parameter groups with exclusion masks:
:func:`param_groups`.
"""

__version__ = "0.1.0"

"""Large-batch optimisers (``torch.optim`` drop-ins), one file per method.

* :class:`LARS` (You, Gitman, Ginsburg 2017) and :class:`LAMB` (You et al. 2020):
  layer-wise trust ratios; functional forms :func:`lars`, :func:`lamb`.
* :class:`CLARS` (Huo, Gu, Huang 2021): LARS with the mean per-example layer
  gradient norm; no warm-up.
* :class:`LENA` (Ko, Lee, Kim 2022): per-layer gain ratio and state-aware
  per-layer warm-up.
* :class:`AdaScale` (Johnson et al. 2020): gain ratio and the scale-invariant
  progress clock, with :class:`ProgressLR` to drive a schedule by it.

CLARS, LENA and AdaScale read their statistics from
:class:`largebatch.stats.GradientStatistics`; LENA and AdaScale from micro-batch
(or worker) samples, or with ``statistics="example"`` from per-example norms.
"""

from ._statistics import SingleSampleWarning
from ._sharded import layer_sq_norms
from .adascale import AdaScale, ProgressLR, adascale_gain
from .clars import CLARS, clars_trust_ratios
from .lamb import LAMB, lamb
from .lars import LARS, lars
from .lena import LENA, lena_rates

__all__ = [
    "AdaScale",
    "CLARS",
    "LAMB",
    "LARS",
    "LENA",
    "ProgressLR",
    "SingleSampleWarning",
    "adascale_gain",
    "clars_trust_ratios",
    "lamb",
    "lars",
    "layer_sq_norms",
    "lena_rates",
]

"""Layer-wise adaptive optimisers (``torch.optim`` drop-ins).

:class:`LARS` (You, Gitman, Ginsburg 2017) and :class:`LAMB` (You et al. 2020),
with their functional forms :func:`lars` and :func:`lamb`.
"""

from .lamb import LAMB, lamb
from .lars import LARS, lars

__all__ = ["LAMB", "LARS", "lamb", "lars"]

"""Gradient statistics: per-micro-batch, per-worker and per-example norms and
the estimators built on them (variance, AdaScale gain, gradient noise scale)."""

from . import estimators
from .engine import GradientStatistics, GradientSummary

__all__ = ["GradientStatistics", "GradientSummary", "estimators"]

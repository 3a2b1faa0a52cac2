"""The training methods, one table entry each (methods.md).

A method turns a model, a base rate ``eta0`` tuned at the base batch ``b`` and
the run's shape (batch ``B``, steps per epoch, epochs) into an optimiser and a
learning-rate scheduler:

========  =================================  =========  =========================
name      optimiser                           scaling    warm-up
========  =================================  =========  =========================
sgd       momentum SGD                        linear     none (Goyal et al. rule)
lsw       momentum SGD                        linear     gradual, 5.5% of epochs
sqrt      momentum SGD                        sqrt       gradual, 5.5% of epochs
lars      ``largebatch.optim.LARS``           linear     gradual, 5.5% of epochs
lamb      ``largebatch.optim.LAMB``           sqrt       gradual, 5.5% of epochs
clars     ``largebatch.optim.CLARS``          linear     none (per-example norms)
lena      ``largebatch.optim.LENA``           own gain   own per-layer warm-up
adascale  ``largebatch.optim.AdaScale``       own gain   none; decay on its tau clock
========  =================================  =========  =========================

An entry whose optimiser class is missing from :mod:`largebatch.optim` is
simply not offered. The user's decay schedule (default: exponential decay to
1% of the rate over the run, as in the LENA paper) multiplies the warm-up.

CLARS, LENA and AdaScale read their statistics from a
:class:`largebatch.stats.GradientStatistics` attached to the (DDP-wrapped)
model; their n is the number of gradient samples per update, ranks x
micro-batches, so the micro-batch should be the base batch for n = B / b.
LENA's T1 is the number of iterations of the base-batch run with the same
epoch budget.

Every method starts from momentum 0.9 and weight decay 5e-4 (the LENA paper's
defaults). Momentum SGD decays every tensor (the coupled decay of the papers'
baselines); the layer-wise methods exclude biases and normalisation weights
from decay and adaptation through :func:`largebatch.param_groups.param_groups`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import ExponentialLR, LRScheduler

DEFAULT_WARMUP_FRACTION = 0.055  # LENA paper's LSW baseline: 5.5% of the epochs
DEFAULT_DECAY_TO = 0.01  # LENA paper: exponential decay to 1% over the run
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


@dataclass(frozen=True)
class RunShape:
    """What a method needs to know about the run to build its schedule."""

    base_lr: float
    base_batch: int
    batch: int
    steps_per_epoch: int
    epochs: int
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION
    decay_to: float | None = DEFAULT_DECAY_TO  # None: constant rate after warm-up

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def samples_per_step(self) -> int:
        """n of methods.md for the gradient samples a batch holds at the base batch."""
        return max(1, self.batch // self.base_batch)


@dataclass(frozen=True)
class Method:
    """One training method: how to build its optimiser, and which rule scales its rate."""

    name: str
    summary: str
    family: str  # methods of one family share a base rate tuned at the base batch
    scaling: str  # "linear", "sqrt" or "none" (the method adapts the rate itself)
    warmup: bool
    # (model, wrapped model, peak rate, run shape) -> optimiser; "wrapped" is the DDP
    # module under torchrun (statistics hooks go there), else the model itself.
    make_optimizer: Callable[[nn.Module, nn.Module, float, RunShape], torch.optim.Optimizer]
    optimizer_class: str | None = None  # "module:Class" under largebatch.optim this method needs
    default_base_lr: float = 0.05
    make_decay: Callable[[torch.optim.Optimizer, RunShape], LRScheduler | None] | None = None
    uses_statistics: bool = False

    def available(self) -> bool:
        return self.optimizer_class is None or _optim_class(self.optimizer_class) is not None


def _optim_class(path: str):
    """``"lena:LENA"`` -> ``largebatch.optim.lena.LENA``, or None when it does not exist (yet)."""
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(f"largebatch.optim.{module_name}")
    except ImportError:
        return None
    return getattr(module, class_name, None)


def _momentum_sgd(model: nn.Module, wrapped: nn.Module, lr: float, shape: RunShape) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _groups(model: nn.Module) -> list[dict]:
    # Biases and normalisation weights: no weight decay, no adaptation.
    from ..param_groups import param_groups

    return param_groups(model, weight_decay=WEIGHT_DECAY)


def _layerwise(path: str, **options):
    """Build ``largebatch.optim`` class ``path`` on the project's parameter groups."""

    def make(model: nn.Module, wrapped: nn.Module, lr: float, shape: RunShape) -> torch.optim.Optimizer:
        return _optim_class(path)(_groups(model), lr=lr, **options)

    return make


def _with_statistics(path: str, per_example: bool = False, needs_t1: bool = False, **options):
    """A method that reads per-layer gradient statistics from :mod:`largebatch.stats`."""

    def make(model: nn.Module, wrapped: nn.Module, lr: float, shape: RunShape) -> torch.optim.Optimizer:
        from ..stats import GradientStatistics

        stats = GradientStatistics(wrapped, per_example=per_example)
        if needs_t1:
            options["base_iterations"] = base_iterations(shape)
        return _optim_class(path)(_groups(model), lr=lr, stats=stats, **options)

    return make


def base_iterations(shape: RunShape) -> int:
    """T1: the iterations of base-batch training with the same epoch budget."""
    return max(1, round(shape.total_steps * shape.batch / shape.base_batch))


def _progress_decay(optimizer: torch.optim.Optimizer, shape: RunShape) -> LRScheduler | None:
    """AdaScale's decay, driven by its scale-invariant clock tau (base-batch iterations)."""
    if shape.decay_to is None:
        return None
    from ..optim.adascale import ProgressLR

    return ProgressLR(optimizer, ExponentialOnClock(base_iterations(shape), shape.decay_to))


@dataclass(frozen=True)
class ExponentialOnClock:
    """decay_to ** (tau / T1): exponential decay on a clock of base-batch iterations.

    A class rather than a lambda so the scheduler's state (which holds it) can be checkpointed.
    """

    base_iterations: int
    decay_to: float

    def __call__(self, tau: float) -> float:
        return self.decay_to ** (min(tau, self.base_iterations) / self.base_iterations)


# The single table of methods: adding a method is adding one entry.
_ALL_METHODS = (
    Method("sgd", "momentum SGD, linear scaling, no warm-up", "sgd", "linear", False, _momentum_sgd),
    Method("lsw", "momentum SGD, linear scaling + gradual warm-up", "sgd", "linear", True, _momentum_sgd),
    Method("sqrt", "momentum SGD, square-root scaling + gradual warm-up", "sgd", "sqrt", True, _momentum_sgd),
    Method("lars", "LARS, linear scaling + gradual warm-up", "lars", "linear", True,
           _layerwise("lars:LARS", momentum=MOMENTUM), optimizer_class="lars:LARS"),
    Method("lamb", "LAMB, square-root scaling + gradual warm-up", "lamb", "sqrt", True,
           _layerwise("lamb:LAMB"), optimizer_class="lamb:LAMB", default_base_lr=0.002),
    Method("clars", "CLARS (per-example layer norms), linear scaling, no warm-up", "lars", "linear", False,
           _with_statistics("clars:CLARS", per_example=True, momentum=MOMENTUM), optimizer_class="clars:CLARS",
           uses_statistics=True),
    Method("lena", "LENA: per-layer gain + state-aware per-layer warm-up", "sgd", "none", False,
           _with_statistics("lena:LENA", needs_t1=True, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
           optimizer_class="lena:LENA", uses_statistics=True),
    Method("adascale", "AdaScale: gain ratio, decay on its tau clock", "sgd", "none", False,
           _with_statistics("adascale:AdaScale", momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
           optimizer_class="adascale:AdaScale", make_decay=_progress_decay, uses_statistics=True),
)


def methods() -> dict[str, Method]:
    """The methods this installation offers (those whose optimiser class exists)."""
    return {m.name: m for m in _ALL_METHODS if m.available()}


def get_method(name: str) -> Method:
    offered = methods()
    if name not in offered:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(offered)}")
    return offered[name]


def peak_lr(method: Method, shape: RunShape) -> float:
    """The base rate carried from the base batch to this batch by the method's rule."""
    from ..schedules import scale_lr

    return scale_lr(method.scaling, shape.base_lr, shape.base_batch, shape.batch)


def warmup_steps(method: Method, shape: RunShape) -> int:
    if not method.warmup:
        return 0
    from ..schedules import epochs_to_steps

    return epochs_to_steps(shape.warmup_fraction * shape.epochs, shape.steps_per_epoch)


def _decay(optimizer: torch.optim.Optimizer, shape: RunShape) -> LRScheduler | None:
    if shape.decay_to is None:
        return None
    # gamma ** total_steps == decay_to: the rate reaches decay_to x peak at the end.
    gamma = shape.decay_to ** (1.0 / max(1, shape.total_steps))
    return ExponentialLR(optimizer, gamma=gamma)


def build(
    method: Method, model: nn.Module, shape: RunShape, wrapped: nn.Module | None = None
) -> tuple[torch.optim.Optimizer, LRScheduler | None]:
    """The method's optimiser at its peak rate and its scheduler (warm-up x decay)."""
    peak = peak_lr(method, shape)
    optimizer = method.make_optimizer(model, model if wrapped is None else wrapped, peak, shape)
    decay = (method.make_decay or _decay)(optimizer, shape)
    steps = warmup_steps(method, shape)
    if steps == 0 or peak <= shape.base_lr:
        return optimizer, decay
    from ..schedules import warmup_then

    # Goyal et al.: start at the unscaled rate eta0, reach the scaled rate after W steps.
    scheduler = warmup_then(optimizer, decay, warmup_steps=steps, start_lr=shape.base_lr)
    return optimizer, scheduler

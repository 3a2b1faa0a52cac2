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
adascale  ``largebatch.optim.AdaScale``       own gain   none; decay on its tau clock, ends at T1
as        ``largebatch.optim.AdaScale``       own gain   none; decay on the update count
========  =================================  =========  =========================

``lars-masked`` is ``lars`` with biases and normalisation weights out of the
trust ratio (the study v2's LARS): they take plain SGD steps at LARS's rate.
``adascale`` is the published method (Johnson et al. 2020): its rate follows
the decay schedule on the scale-invariant clock tau (``ProgressLR``) and the
run ends when tau reaches T1, the base-batch iterations of the epoch budget,
or at ``clock_cap`` times the epoch budget (``TrainConfig.clock_cap``,
default 3), whichever comes first; its summary says which (``stopped``:
``"t1"`` or ``"cap"``), with tau and the epochs used. ``as`` is the LENA
paper's AdaScale baseline (its Table 1 and the authors' code): the same gain
times the rate times the budget's decay on the update count, no clock, the
epoch budget like every other method.

Warm-up is also a run option (``RunShape.warmup``, ``--warmup``), applicable to
every method, for the LENA paper's ablation (Table 2):

- ``default``: the method's own, the last column of the table above;
- ``none``: no warm-up;
- ``fixed``: gradual warm-up over ``warmup_fraction`` of the epochs (Goyal et
  al.). Fixed-scaling methods start from the unscaled rate eta0; gain-driven
  methods (LENA, AdaScale: scaling "none") start at 1/n of their rate, which is
  eta0 when the gain is n, the same start as linear scaling;
- ``state-aware``: LENA's Eq. 6-7 with theta = alpha T1 (alpha = 0.05, T1 the
  base-batch iterations of the budget): each layer k counts its progress in
  base-batch iterations, S_k += r_k, and its rate is multiplied by
  min(S_k / theta, 1). LENA does this itself, per layer, from its own gains.
  For a fixed-scaling method r_k is the data an update consumes in base
  batches, B/b, for every layer, so S_k = t B/b and the warm-up is a linear
  ramp from (B/b)/theta to 1 that ends at the same update for every layer,
  after alpha of the run's updates: state-aware and fixed warm-up differ only
  in the start (near 0 instead of eta0) and the length (5% instead of 5.5%).
  For AdaScale and AS r is the model gain and S the tau clock; the rate of update
  t uses tau before the update plus 1 (the least an update adds), because the
  scheduler sets the rate before the optimiser measures that update's gain.
 The user's decay schedule (default: exponential decay to
1% of the rate over the run, as in the LENA paper) multiplies the warm-up.

CLARS, LENA and AdaScale read their statistics from a
:class:`largebatch.stats.GradientStatistics` attached to the (DDP-wrapped)
model; their n is the number of gradient samples per update, ranks x
micro-batches, so the micro-batch should be the base batch for n = B / b.
With ``RunShape.statistics = "example"`` (``--statistics example``) LENA and
AdaScale take their samples from per-example norms instead, n = B / b
whatever the micro-batch (``LENA(statistics="example", base_batch=b)``).
LENA's T1 is the number of iterations of the base-batch run with the same
epoch budget.

Every method starts from momentum 0.9 and weight decay 5e-4 (the LENA paper's
defaults). Momentum SGD decays every tensor (the coupled decay of the papers'
baselines); the other methods exclude biases and normalisation weights from
decay through :func:`largebatch.param_groups.param_groups`. LARS and LAMB also
exclude them from adaptation (trust ratio 1); CLARS, LENA and AdaScale adapt
every tensor (``adapt=True`` in every group): CLARS has no warm-up to hold an
unadapted tensor back, LENA gives every layer its gain and warm-up as the
paper and the authors' code do (with ``adapt=False`` a LENA group would take
neither), and AdaScale's gain is one for the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.optim.lr_scheduler import ExponentialLR, LambdaLR, LRScheduler

from ..optim import CLARS, LAMB, LARS, LENA, AdaScale

DEFAULT_WARMUP_FRACTION = 0.055  # LENA paper's LSW baseline: 5.5% of the epochs
DEFAULT_DECAY_TO = 0.01  # LENA paper: exponential decay to 1% over the run
STATE_AWARE_ALPHA = 0.05  # LENA paper: theta = 5% of the base-batch iterations
WARMUP_MODES = ("default", "none", "fixed", "state-aware")
STATISTICS_MODES = ("micro_batch", "example")  # where LENA and AdaScale take their gradient samples
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4

# Default base rates per family at batch 128, tuned on the validation split of
# Fashion-MNIST with the MLP (5 epochs, seed 0, micro-batch 128), e.g.
#   largebatch tune --method lars --grid 0.1,0.3,1,3,10,30 --epochs 5 --model mlp --run-dir runs/tune
# sgd: best of 0.01-0.2 -> 0.1; lamb: best of 0.0003-0.03 -> 0.01. LARS (trust coefficient 1e-3): 3, the
# study v2's optimum on both models at 17-34 epochs (docs/results.md); 10, the 5-epoch optimum, diverged
# at 8K. Other models should be tuned (--tune).
SGD_BASE_LR, LARS_BASE_LR, LAMB_BASE_LR = 0.1, 3.0, 0.01
# A family is the methods that coincide at the base batch, so one tuned rate
# means the same step for all of them: lsw, sqrt, as, adascale and lena are
# momentum SGD there (n = 1, gain 1). CLARS is not LARS there: it divides by
# the mean of the 128 per-example norms, which on the MLP measured 5-8x the
# mini-batch norm LARS divides by, so at LARS's rate its steps are 5-8x
# smaller. It is a family of its own, tuned on its own grid.
CLARS_BASE_LR = 10.0


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
    warmup: str = "default"  # one of WARMUP_MODES
    statistics: str = "micro_batch"  # one of STATISTICS_MODES (LENA and AdaScale)

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
    warmup: str  # its default warm-up mode: "none", "fixed" or "state-aware"
    # (model, wrapped model, peak rate, run shape) -> optimiser; "wrapped" is the DDP
    # module under torchrun (statistics hooks go there), else the model itself.
    make_optimizer: Callable[[nn.Module, nn.Module, float, RunShape], torch.optim.Optimizer]
    default_base_lr: float = SGD_BASE_LR
    make_decay: Callable[[torch.optim.Optimizer, RunShape], LRScheduler | None] | None = None
    uses_statistics: bool = False
    own_state_aware_warmup: bool = False  # the optimiser warms up per layer itself (its warmup= option)
    example_statistics: bool = False  # its gains can come from per-example norms (--statistics example)
    ends_on_clock: bool = False  # the run ends when the optimiser's clock reaches T1 (``done(T1)``), capped



def _momentum_sgd(model: nn.Module, wrapped: nn.Module, lr: float, shape: RunShape) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


# Biases and normalisation weights out of the trust ratio: LAMB's usual form, and the study v2's LARS
# ("lars-masked"), whose excluded tensors take plain SGD steps at LARS's rate (largebatch.param_groups).
MASKED = ("ndim<=1",)


def _groups(model: nn.Module, no_adapt: tuple = ()) -> list[dict]:
    """Biases and normalisation weights without weight decay; every tensor adapted unless ``no_adapt`` says."""
    from ..param_groups import param_groups

    return param_groups(model, weight_decay=WEIGHT_DECAY, no_adapt=no_adapt)


def _layerwise(optimizer_class: type[torch.optim.Optimizer], no_adapt: tuple = (), **options):
    """Build a layer-wise optimiser on the project's parameter groups."""

    def make(model: nn.Module, wrapped: nn.Module, lr: float, shape: RunShape) -> torch.optim.Optimizer:
        return optimizer_class(_groups(model, no_adapt), lr=lr, **options)

    return make


def _with_statistics(optimizer_class: type[torch.optim.Optimizer], per_example: bool = False,
                     needs_t1: bool = False, own_warmup: bool = False, gains: bool = False, **options):
    """A method that reads per-layer gradient statistics from :mod:`largebatch.stats`.

    ``gains``: a gain-ratio method (LENA, AdaScale) that takes ``statistics=`` and
    ``base_batch=``, from the run's ``RunShape.statistics``.
    """

    def make(model: nn.Module, wrapped: nn.Module, lr: float, shape: RunShape) -> torch.optim.Optimizer:
        from ..stats import GradientStatistics

        example = gains and shape.statistics == "example"
        stats = GradientStatistics(wrapped, per_example=per_example or example)
        extra = {}
        if example:
            extra.update(statistics="example", base_batch=shape.base_batch)
        if needs_t1:
            extra["base_iterations"] = base_iterations(shape)
        if own_warmup:  # the optimiser's own state-aware warm-up, on or off by the run's mode
            extra["warmup"] = shape.warmup in ("default", "state-aware")
            extra["alpha"] = STATE_AWARE_ALPHA
        return optimizer_class(_groups(model), lr=lr, stats=stats, **options, **extra)

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
    Method("sgd", "momentum SGD, linear scaling, no warm-up", "sgd", "linear", "none", _momentum_sgd),
    Method("lsw", "momentum SGD, linear scaling + gradual warm-up", "sgd", "linear", "fixed", _momentum_sgd),
    Method("sqrt", "momentum SGD, square-root scaling + gradual warm-up", "sgd", "sqrt", "fixed", _momentum_sgd),
    Method("lars", "LARS (every tensor adapted), linear scaling + gradual warm-up", "lars", "linear", "fixed",
           _layerwise(LARS, momentum=MOMENTUM), default_base_lr=LARS_BASE_LR),
    Method("lars-masked", "LARS, biases and norm weights out of the trust ratio (plain steps at LARS's rate), "
           "linear scaling + gradual warm-up", "lars-masked", "linear", "fixed",
           _layerwise(LARS, no_adapt=MASKED, momentum=MOMENTUM), default_base_lr=LARS_BASE_LR),
    Method("lamb", "LAMB (biases and norm weights out of the trust ratio), square-root scaling + gradual warm-up",
           "lamb", "sqrt", "fixed", _layerwise(LAMB, no_adapt=MASKED), default_base_lr=LAMB_BASE_LR),
    Method("clars", "CLARS (per-example layer norms), linear scaling, no warm-up", "clars", "linear", "none",
           _with_statistics(CLARS, per_example=True, momentum=MOMENTUM),
           default_base_lr=CLARS_BASE_LR, uses_statistics=True),
    Method("lena", "LENA: per-layer gain + state-aware per-layer warm-up", "sgd", "none", "state-aware",
           _with_statistics(LENA, needs_t1=True, own_warmup=True, gains=True, momentum=MOMENTUM,
                            weight_decay=WEIGHT_DECAY),
           uses_statistics=True, own_state_aware_warmup=True, example_statistics=True),
    Method("adascale", "AdaScale: gain ratio, decay on its tau clock, the run ends when tau reaches T1",
           "sgd", "none", "none",
           _with_statistics(AdaScale, gains=True, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
           make_decay=_progress_decay, uses_statistics=True, example_statistics=True, ends_on_clock=True),
    Method("as", "AS (LENA paper's AdaScale baseline): gain ratio x rate x the budget's decay, no clock",
           "sgd", "none", "none",
           _with_statistics(AdaScale, gains=True, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
           uses_statistics=True, example_statistics=True),
)


def methods() -> dict[str, Method]:
    """Every method, by name."""
    return {m.name: m for m in _ALL_METHODS}


def get_method(name: str) -> Method:
    offered = methods()
    if name not in offered:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(offered)}")
    return offered[name]


def peak_lr(method: Method, shape: RunShape) -> float:
    """The base rate carried from the base batch to this batch by the method's rule."""
    from ..schedules import scale_lr

    return scale_lr(method.scaling, shape.base_lr, shape.base_batch, shape.batch)


def warmup_mode(method: Method, shape: RunShape) -> str:
    """The run's warm-up mode: ``none``, ``fixed`` or ``state-aware`` (``default`` resolved)."""
    if shape.warmup not in WARMUP_MODES:
        raise ValueError(f"--warmup must be one of {', '.join(WARMUP_MODES)}, got {shape.warmup!r}")
    return method.warmup if shape.warmup == "default" else shape.warmup


def warmup_steps(method: Method, shape: RunShape) -> int:
    """Length of a warm-up fixed in advance, in updates (0: none, or one driven by measured gains)."""
    mode = warmup_mode(method, shape)
    if mode == "fixed":
        from ..schedules import epochs_to_steps

        return epochs_to_steps(shape.warmup_fraction * shape.epochs, shape.steps_per_epoch)
    if mode == "state-aware" and method.scaling != "none":
        return math.ceil(state_aware_theta(shape) / shape.samples_per_step)
    return 0


def state_aware_theta(shape: RunShape) -> float:
    """theta = alpha T1, in base-batch iterations (LENA Eq. 7)."""
    return STATE_AWARE_ALPHA * base_iterations(shape)


def _decay(optimizer: torch.optim.Optimizer, shape: RunShape) -> LRScheduler | None:
    if shape.decay_to is None:
        return None
    # gamma ** total_steps == decay_to: the rate reaches decay_to x peak at the end.
    gamma = shape.decay_to ** (1.0 / max(1, shape.total_steps))
    return ExponentialLR(optimizer, gamma=gamma)


@dataclass(frozen=True)
class StateAwareRamp:
    """Rate multiplier of update t+1 (t scheduler steps done) for a fixed-scaling method.

    S = (t + 1) * n base-batch iterations after the update (progress counted
    before the test, as LENA's Algorithm 1), times the exponential decay on the
    training clock. A class so LambdaLR can checkpoint it.
    """

    samples_per_step: int
    theta: float
    total_steps: int
    decay_to: float | None

    def __call__(self, step: int) -> float:
        ramp = min((step + 1) * self.samples_per_step / self.theta, 1.0)
        decay = 1.0 if self.decay_to is None else self.decay_to ** (min(step, self.total_steps) / self.total_steps)
        return ramp * decay


def _state_aware_fixed_scaling(optimizer: torch.optim.Optimizer, shape: RunShape) -> LRScheduler:
    ramp = StateAwareRamp(shape.samples_per_step, state_aware_theta(shape), max(1, shape.total_steps),
                          shape.decay_to)
    return LambdaLR(optimizer, ramp)


@dataclass(frozen=True)
class ClockedWarmup:
    """AdaScale's schedule with a warm-up: decay on the tau clock times a fixed or state-aware ramp."""

    mode: str  # "fixed" or "state-aware"
    decay: ExponentialOnClock | None
    fixed_steps: int
    start_factor: float
    theta: float
    decay_on_steps: bool = False  # the decay runs on the update count, not on tau (``as``)

    def __call__(self, step: int, tau: float) -> float:
        from ..schedules import warmup_factor

        factor = 1.0 if self.decay is None else self.decay(step if self.decay_on_steps else tau)
        if self.mode == "fixed":
            return factor * warmup_factor(step, self.fixed_steps, self.start_factor)
        # tau + 1: this update's progress is at least one base-batch iteration (its gain is not known yet)
        return factor * min((tau + 1.0) / self.theta, 1.0)


class ClockedWarmupLR(LRScheduler):
    """``lr = base_lr * schedule(step, tau)``, tau read from the optimiser's ``progress`` (AdaScale)."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: ClockedWarmup, last_epoch: int = -1):
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        tau = float(self.optimizer.progress)
        return [base * self.schedule(self.last_epoch, tau) for base in self.base_lrs]


def _clocked_warmup(optimizer: torch.optim.Optimizer, method: Method, shape: RunShape, mode: str) -> LRScheduler:
    # AdaScale decays on tau over T1; ``as`` on the update count over the run (the same gamma as _decay)
    on_steps = method.make_decay is None
    length = max(1, shape.total_steps) if on_steps else base_iterations(shape)
    decay = None if shape.decay_to is None else ExponentialOnClock(length, shape.decay_to)
    fixed = warmup_steps(method, replace(shape, warmup="fixed"))
    schedule = ClockedWarmup(mode, decay, fixed, 1.0 / shape.samples_per_step, state_aware_theta(shape), on_steps)
    return ClockedWarmupLR(optimizer, schedule)


def build(
    method: Method, model: nn.Module, shape: RunShape, wrapped: nn.Module | None = None
) -> tuple[torch.optim.Optimizer, LRScheduler | None]:
    """The method's optimiser at its peak rate and its scheduler (warm-up x decay)."""
    mode = warmup_mode(method, shape)
    peak = peak_lr(method, shape)
    optimizer = method.make_optimizer(model, model if wrapped is None else wrapped, peak, shape)
    if method.make_decay is not None and mode != "none" and not method.own_state_aware_warmup:
        return optimizer, _clocked_warmup(optimizer, method, shape, mode)  # AdaScale's decay runs on its own clock
    if mode == "state-aware" and method.scaling == "none" and not method.own_state_aware_warmup:
        # a gain-driven method without the clock schedule (``as``): the ramp follows its tau, S = tau
        return optimizer, _clocked_warmup(optimizer, method, shape, mode)
    if mode == "state-aware" and not method.own_state_aware_warmup:
        return optimizer, _state_aware_fixed_scaling(optimizer, shape)
    decay = (method.make_decay or _decay)(optimizer, shape)
    if mode != "fixed":
        return optimizer, decay  # no warm-up, or the optimiser's own per-layer one
    return optimizer, _fixed_warmup(optimizer, decay, method, shape, peak)


def _fixed_warmup(optimizer, decay, method: Method, shape: RunShape, peak: float) -> LRScheduler | None:
    from ..schedules import warmup_then

    steps = warmup_steps(method, shape)
    if method.scaling == "none":
        # Gain-driven: start at 1/n of the rate (eta0 when the gain is n), as linear scaling starts at eta0.
        if steps == 0 or shape.samples_per_step == 1:
            return decay
        return warmup_then(optimizer, decay, warmup_steps=steps, start_factor=1.0 / shape.samples_per_step)
    if steps == 0 or peak <= shape.base_lr:
        return decay
    # Goyal et al.: start at the unscaled rate eta0, reach the scaled rate after W steps.
    return warmup_then(optimizer, decay, warmup_steps=steps, start_lr=shape.base_lr)

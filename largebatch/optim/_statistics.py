"""The optimisers that read gradient statistics at every step: CLARS, LENA, AdaScale.

* :class:`StatisticsSource` and :class:`Summary`: what the optimisers need of a
  statistics source, as ``typing.Protocol`` classes.
  :class:`largebatch.stats.GradientStatistics` implements them without importing
  them; so may any object of one's own.
* reading a summary: per-parameter A_k and B_k on the mean-gradient scale
  (:func:`sample_statistics`, :func:`example_statistics`), the loss scale;
* the per-layer state across steps: bias-corrected moving averages
  (:func:`ema_update`, :func:`smoothing`, :func:`clamp_gain`) and
  :class:`StateVectors`, 0-d state entries kept as views of one vector per key;
* :class:`StatisticsOptimizer`: the base of the three, on
  :class:`~.base.LayerwiseOptimizer`'s step: reads the source before it,
  resets it after, and tags checkpoints with the method.

All of it works on per-parameter vectors, so a step costs a handful of kernels
whatever the number of layers, and nothing is read back to the host.
"""

from __future__ import annotations

import operator
import os
import sys
import warnings
from collections.abc import Sequence
from itertools import repeat
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._checks import check_base_batch
from .base import LayerwiseOptimizer, Part

METHOD_KEY = "method"
STATISTICS_KEY = "statistics"
#: where LENA and AdaScale take their gradient samples from
STATISTICS = ("micro_batch", "example")


class SingleSampleWarning(UserWarning):
    """LENA or AdaScale measured n = 1 gradient sample per step: every gain is 1 by construction."""


# -- the interface ---------------------------------------------------------------------------

class Summary(Protocol):
    """One step's statistics, tensors of shape [K] over the source's parameters
    (``largebatch.stats.GradientSummary``).

    ``sample_sq_norm_mean`` A_k = (1/n) sum_i ||g_k^(i)||^2 over n samples (micro-batches
    or workers), ``mean_grad_sq_norm`` B_k = ||gbar_k||^2; ``example_*`` the mean and
    mean square of per-example norms, None without them; ``grad_scale`` c with
    ``p.grad = c * gbar``; ``loss_scale`` S, the ``GradScaler`` scale every norm carries
    (A and B S^2 times, example norms S times), 1 or a 0-d tensor."""

    n: int
    sample_sq_norm_mean: Tensor
    mean_grad_sq_norm: Tensor
    num_examples: int | Tensor
    example_norm_mean: Tensor | None
    example_sq_norm_mean: Tensor | None
    grad_scale: float
    loss_scale: float | Tensor


@runtime_checkable
class StatisticsSource(Protocol):
    """A statistics source: the step's summary and each parameter's position in it
    (``largebatch.stats.GradientStatistics``)."""

    def summary(self) -> Summary: ...

    def index_of(self, p: Tensor) -> int: ...


@runtime_checkable
class Resettable(Protocol):
    """A source that starts the next step's statistics afresh (``GradientStatistics.reset``)."""

    def reset(self) -> None: ...


@runtime_checkable
class LabelledExamples(Protocol):
    """A per-example norm collector that says how each parameter's norm was computed
    (``largebatch.stats.per_example.PerExampleNorms.methods``: name -> label)."""

    def methods(self) -> dict[str, str]: ...


@runtime_checkable
class ExampleSource(Protocol):
    """A source that may collect per-example norms: ``per_example`` is its collector, or None
    when it was built without them."""

    per_example: Any


def check_source(stats: Any, method: str, need_per_example: bool = False) -> None:
    if stats is None:
        raise ValueError(
            f"{method} needs a gradient-statistics source: pass stats=largebatch.stats.GradientStatistics(model"
            + (", per_example=True" if need_per_example else "")
            + ") (or an object with summary() and index_of())"
        )
    if not isinstance(stats, StatisticsSource):
        raise ValueError(f"stats must provide summary() and index_of(); got {type(stats).__name__}")


def check_statistics(statistics: str, stats: Any, base_batch, method: str) -> None:
    """The statistics source of LENA and AdaScale: ``"micro_batch"`` samples, or ``"example"``
    norms with a base batch (ValueError naming the argument)."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    if statistics == "micro_batch":
        if base_batch is not None:
            raise ValueError(
                "base_batch is only used with statistics='example' (with micro-batch statistics "
                "each micro-batch is a base-size sample)"
            )
        return
    check_base_batch(base_batch)
    # a source that says it has no per-example collector is refused now; another is checked
    # at its first summary
    if isinstance(stats, ExampleSource) and stats.per_example is None:
        raise ValueError(
            f"{method}(statistics='example') needs per-example norms: build the source as "
            "GradientStatistics(model, per_example=True)"
        )


# -- reading a summary -----------------------------------------------------------------------

class StatisticsIndex:
    """Maps a list of parameters to their positions in the source's [K] vectors.

    The index tensor is built once per distinct parameter list (Python-side
    work only) and cached on device; gathering with it does not sync.
    """

    def __init__(self, stats: StatisticsSource):
        self.stats = stats
        self._cache: dict[tuple[int, ...], Tensor] = {}

    def index(self, params: Sequence[Tensor], device) -> Tensor:
        key = tuple(map(id, params))
        idx = self._cache.get(key)
        if idx is None:
            positions = []
            for p in params:
                try:
                    positions.append(int(self.stats.index_of(p)))
                except (KeyError, ValueError) as exc:
                    raise ValueError(
                        "a parameter of the optimiser is not tracked by the statistics source "
                        f"(shape {tuple(p.shape)}); build the source on the same model"
                    ) from exc
            idx = torch.tensor(positions, dtype=torch.long, device=device)
            self._cache = {key: idx}  # the usual case: one list, reused every step
        return idx

    def gather(self, vector: Tensor, params: Sequence[Tensor]) -> Tensor:
        return vector.index_select(0, self.index(params, vector.device))


def loss_scale_sq(summary: Summary, dtype: torch.dtype, device) -> Tensor | float:
    """S^2, the squared loss scale (``GradScaler``) the statistics saw but ``p.grad`` no longer carries.

    ``summary.loss_scale`` is the scale the backwards ran with, as the source
    recorded it (``GradientStatistics(model, grad_scaler=scaler)`` reads the
    scaler's scale tensor). ``scaler.step`` unscales ``p.grad`` before the
    step, so statistics divided by S^2 are on the mean-gradient scale. Never
    inferred from ``p.grad``: clipping between the backward and the step
    rescales ``p.grad`` too, and the statistics must stay the raw gradients'.
    No host sync (the scale stays a tensor).
    """
    scale = summary.loss_scale
    if isinstance(scale, Tensor):
        scale = scale.to(device=device, dtype=dtype, non_blocking=True).reshape(())
        return scale * scale
    return float(scale) ** 2


def sample_statistics(summary: Summary, index: StatisticsIndex, params: Sequence[Tensor], dtype
                      ) -> tuple[Tensor, Tensor]:
    """A_k and B_k of ``params`` (AdaScale, LENA Eq. 4) on the mean-gradient scale.

    Gathered from the summary and divided by the loss scale S^2, so epsilons are
    in the units of the papers and moving averages never mix scales, whatever
    the loss scale, the accumulation convention or the number of micro-batches.
    """
    A = index.gather(summary.sample_sq_norm_mean, params).to(dtype)
    B = index.gather(summary.mean_grad_sq_norm, params).to(dtype)
    scale_sq = loss_scale_sq(summary, dtype, A.device)
    return A / scale_sq, B / scale_sq


def example_statistics(summary: Summary, index: StatisticsIndex, params: Sequence[Tensor], dtype,
                       base_batch: int) -> tuple[Tensor, Tensor, float | Tensor]:
    """``(A_eq, B, n_eff)`` of ``params`` from per-example norms (``estimators.example_gain_statistics``).

    The base-batch samples the step's N examples amount to: n_eff = N/b and
    E[A_eq] = tr(Sigma)/b + ||G||^2, as for n_eff micro-batches of b; on the
    mean-gradient scale (divided by S^2), as ``sample_statistics``. n_eff is
    a 0-d tensor when the source counts examples on device: no host sync.
    """
    from ..stats.estimators import example_gain_statistics

    if summary.example_sq_norm_mean is None:
        raise RuntimeError(
            "statistics='example': the statistics summary has no per-example norms; build the source as "
            "GradientStatistics(model, per_example=True)"
        )
    E = index.gather(summary.example_sq_norm_mean, params).to(dtype)
    B = index.gather(summary.mean_grad_sq_norm, params).to(dtype)
    scale_sq = loss_scale_sq(summary, dtype, E.device)
    E, B = E / scale_sq, B / scale_sq
    A, n = example_gain_statistics(E, B, summary.num_examples, base_batch)
    return A, B, n


def summary_n(summary: Summary) -> int:
    n = summary.n
    if isinstance(n, Tensor):  # the interface says int; tolerate a 0-d tensor once per step
        n = int(n)
    if n < 1:
        raise ValueError(f"the statistics summary reports n = {n} gradient samples")
    return n


# -- the per-layer state across steps --------------------------------------------------------

def smoothing(n: int | float | Tensor) -> float | Tensor:
    """Moving-average factor max(1 - n/1000, 0) (AdaScale; LENA Eq. 8), guarded for n > 1000.

    n is counted (an int), or with example statistics N/b, possibly a 0-d tensor (kept on device).
    """
    if isinstance(n, Tensor):
        return (1.0 - n / 1000.0).clamp(min=0.0)
    return max(1.0 - n / 1000.0, 0.0)


def clamp_gain(gain: Tensor, n: int | float | Tensor) -> Tensor:
    """The gain limited to [1, n] (AdaScale; LENA Eq. 5); n may be a 0-d tensor (n >= 1)."""
    if isinstance(n, Tensor):
        return torch.minimum(gain.clamp(min=1.0), n.to(gain.dtype))
    return gain.clamp(1.0, float(n))


def ema_update(avg: Tensor, weight: Tensor, value: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """One step of a bias-corrected moving average, kept as (sum, weight).

    avg/weight is the average. With a constant factor c this is the usual
    1 - c^t correction; written this way it stays exact when c changes because
    n changes (a resumed run on another number of workers) and when c = 0.
    """
    return avg * c + value * (1.0 - c), weight * c + (1.0 - c)


def scalar_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """dtype of the per-layer vectors: float64 for a float64 model (exact comparisons), else float32."""
    return torch.float64 if torch.float64 in set(map(operator.attrgetter("dtype"), params)) else torch.float32


def zeros_state(p: Tensor, keys: Sequence[str]) -> dict[str, Tensor]:
    """0-d zeros of the per-layer dtype on ``p``'s device, one per key (fresh per-parameter state)."""
    return {key: torch.zeros((), dtype=scalar_dtype([p]), device=p.device) for key in keys}


def group_vector(groups_of: Sequence[dict], key: str, device, dtype=torch.float32) -> Tensor:
    """A per-parameter vector of one hyperparameter (groups may differ); float or tensor values."""
    first = groups_of[0] if groups_of else None
    if first is not None and all(map(operator.is_, groups_of, repeat(first))):  # one group: one fill
        value = first[key]
        if isinstance(value, Tensor):
            return torch.as_tensor(value, dtype=dtype, device=device).reshape(()).expand(len(groups_of)).clone()
        return torch.full((len(groups_of),), value, dtype=dtype, device=device)
    values = [g[key] for g in groups_of]
    if any(isinstance(v, Tensor) for v in values):
        return torch.stack([torch.as_tensor(v, dtype=dtype, device=device).reshape(()) for v in values])
    return torch.tensor(values, dtype=dtype, device=device)


class StateVectors:
    """Per-parameter 0-d state entries kept as views of one vector per key.

    The state stays per parameter (``state[p][key]`` is a 0-d tensor, so
    ``state_dict()`` and ``load_state_dict()`` are those of any optimiser),
    but each entry is a view of a [P] vector over the stepped parameters, so a
    step reads the state without ``torch.stack`` and writes it back with one
    ``copy_`` per key instead of P. Rebuilt (one stack per key, and the entries
    re-pointed at the new vector) whenever the parameters, their state dicts or
    any entry changed (``load_state_dict``, another set of parameters with
    gradients). Kept on the optimiser, never in the state.
    """

    def __init__(self) -> None:
        self._owner = None
        self._states: list[dict] = []
        self._vectors: dict[str, Tensor] = {}
        self._views: dict[str, list[Tensor]] = {}

    def _valid(self, owner, states: Sequence[dict], keys: Sequence[str]) -> bool:
        if self._owner is not owner or len(states) != len(self._states):
            return False
        if not all(map(operator.is_, states, self._states)):
            return False
        try:  # identity of every entry, at C speed
            return all(all(map(operator.is_, map(operator.itemgetter(key), states), self._views[key])) for key in keys)
        except KeyError:
            return False

    def vectors(self, owner, states: Sequence[dict], keys: Sequence[str], dtype: torch.dtype) -> dict[str, Tensor]:
        """The [P] vector of each key (floating keys in ``dtype``); ``owner`` is the optimiser's
        ``state`` mapping (a new one after ``load_state_dict``)."""
        if not self._valid(owner, states, keys):
            vectors, views = {}, {}
            for key in keys:
                vector = torch.stack([s[key] for s in states])
                if vector.is_floating_point():
                    vector = vector.to(dtype)
                views[key] = list(vector.unbind(0))
                for s, v in zip(states, views[key]):
                    s[key] = v
                vectors[key] = vector
            self._owner, self._states, self._vectors, self._views = owner, list(states), vectors, views
        return {key: self._vectors[key] for key in keys}

    def write(self, values: dict[str, Tensor]) -> None:
        """New values of the vectors (and so of every entry): one ``copy_`` per key."""
        for key, value in values.items():
            vector = self._vectors[key]
            if value is not vector:
                vector.copy_(value)


# -- the optimiser base ----------------------------------------------------------------------

def _caller_level() -> int:
    """``stacklevel`` of the first frame outside largebatch.optim and torch: the code that called
    ``step()`` (through torch's decorators, a ``GradScaler``, ...)."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


class StatisticsOptimizer(LayerwiseOptimizer):
    """An optimiser that reads a statistics source at every step.

    Keeps the source in step with the gradients it describes: with
    ``reset_statistics`` (the default) the source is reset after every
    ``step()`` and whenever the gradients are cleared with ``zero_grad()``; the
    latter covers a step that did not run (a ``GradScaler`` skipping an inf/NaN
    step), so the next step's statistics never include an old step's backwards.
    Checkpoints carry the class's ``method`` tag (and LENA's and AdaScale's
    ``statistics`` mode) and refuse another method's.
    """

    method: str
    #: "micro_batch" or "example" for LENA and AdaScale; None for CLARS
    statistics: str | None = None
    #: 0-d per-layer state entries (averages, progress, clocks): kept in float32 or wider
    _per_layer_keys: tuple[str, ...] = ()

    def __init__(self, params: Any, defaults: dict[str, Any], *, stats: StatisticsSource,
                 reset_statistics: bool) -> None:
        self.stats = stats
        self.reset_statistics = reset_statistics
        self._resets = reset_statistics and isinstance(stats, Resettable)
        self._index = StatisticsIndex(stats)
        self._warned_single_sample = False
        super().__init__(params, defaults)

    def _clear_transient(self) -> None:
        super()._clear_transient()
        self._state_vectors: dict[str, StateVectors] = {}

    def state_vectors(self, name: str) -> StateVectors:
        """The :class:`StateVectors` called ``name`` (created on first use)."""
        kept = self._state_vectors.get(name)
        if kept is None:
            kept = self._state_vectors[name] = StateVectors()
        return kept

    def _begin(self) -> tuple[Summary, int]:
        summary = self.stats.summary()
        return summary, summary_n(summary)

    def _finish(self) -> None:
        if self._resets:
            self.stats.reset()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._resets:
            self.stats.reset()

    def _gain_statistics(self, summary: Summary, n: int, params: Sequence[Tensor], dtype) -> tuple:
        """LENA's and AdaScale's ``(A, B, n)`` from the source, as ``self.statistics`` says.

        ``"micro_batch"``: A and B of the n samples the source counted (warns once when
        n = 1: every gain is then 1). ``"example"``: the base-batch equivalent of the
        per-example norms, n = N/b (``example_statistics``).
        """
        if self.statistics == "example":
            return example_statistics(summary, self._index, params, dtype, self.param_groups[0]["base_batch"])
        if n == 1 and not self._warned_single_sample:
            self._warned_single_sample = True
            warnings.warn(
                f"{type(self).__name__}: the statistics source measured n = 1 gradient sample in this step "
                "(one micro-batch in one process, or sample='worker' with one worker), so every gain is 1 by "
                "construction and the method reduces to momentum SGD. Split the batch into micro-batches of the base batch, or use "
                f"{type(self).__name__}(..., statistics='example', base_batch=b) with "
                "GradientStatistics(model, per_example=True) (largebatch train --statistics example).",
                SingleSampleWarning,
                stacklevel=_caller_level(),
            )
        A, B = sample_statistics(summary, self._index, params, dtype)
        return A, B, n

    def _sgd_update(self, part: Part, rates: Tensor) -> None:
        """Momentum SGD with the per-layer ``rates`` outside the buffer, as ``torch.optim.SGD``
        (LENA, AdaScale): coupled weight decay in d, or decoupled ``w *= 1 - lr * wd``."""
        group = part.group
        decoupled = group["decoupled_weight_decay"] and group["weight_decay"] != 0
        self._momentum_update(
            part, inner=None, outer=part.in_layout_order(rates),
            weight_decay=0.0 if decoupled else group["weight_decay"],
            decay=1 - group["lr"] * group["weight_decay"] if decoupled else None,
        )

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict[METHOD_KEY] = self.method
        if self.statistics is not None:
            state_dict[STATISTICS_KEY] = self.statistics
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        found = state_dict.get(METHOD_KEY)
        if found != self.method:
            raise ValueError(
                f"this state dict was saved by {found or 'an optimiser without a method tag'!s}, "
                f"not by {self.method}: its moving averages and progress would be meaningless here"
            )
        if self.statistics is not None:
            saved = state_dict.get(STATISTICS_KEY, "micro_batch")  # saved before the option existed
            if saved != self.statistics:
                # example mode keeps base_batch in its groups, micro-batch mode has none to restore
                raise ValueError(
                    f"this state dict was saved with statistics={saved!r}, this optimiser uses "
                    f"statistics={self.statistics!r}; build it with statistics={saved!r} to resume"
                )
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in (METHOD_KEY, STATISTICS_KEY)})
        if "base_batch" in self.defaults:
            for group in self.param_groups:  # groups saved before the option existed
                group.setdefault("base_batch", None)
        self._restore_per_layer_state(state_dict)

    def _restore_per_layer_state(self, state_dict: dict) -> None:
        """Undo ``Optimizer.load_state_dict``'s cast of the per-layer state to the parameter dtype.

        torch.optim casts every floating state entry but ``step`` to the parameter's dtype
        (right for momentum buffers). For a bfloat16 model that rounds S_k = 70001.5 to 70144,
        for float16 it makes it inf. These entries are loaded again from ``state_dict`` in
        their saved dtype (at least float32; integers such as ``warmup_end`` stay integers),
        as torch.optim exempts ``step``.
        """
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        saved_state = state_dict["state"]
        for saved_id, p in zip(saved_ids, params):
            entry = saved_state.get(saved_id)
            if not entry:
                continue
            for key in self._per_layer_keys:
                value = entry.get(key)
                if isinstance(value, Tensor):
                    dtype = torch.promote_types(value.dtype, torch.float32) if value.is_floating_point() else value.dtype
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)

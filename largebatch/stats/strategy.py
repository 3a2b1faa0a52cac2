"""Which exact strategy forms each layer's per-example norms: by rule, by measurement, or forced.

A factored use (:mod:`largebatch.stats._ghost`: a Linear layer on sequences,
a convolution, an attention projection) offers the strategies exact for it:
``"ghost"`` (Gram form), ``"bmm"`` (per-example gradients by a batched matrix
product, after unfold for a convolution) and, for convolutions,
``"conv-backward"`` (the convolution's weight-gradient kernel with the
examples as extra groups). All give the same norms up to rounding; they
differ in time and memory, and which is fastest depends on the layer's shape
and the device.

``strategy="rule"`` (the default). The Gram form when ``2 T^2 <= p d``, with T
the output positions, d = C_in k^2 / groups and p = C_out / groups (the
Linear layer: d = in, p = out features): the rule of fastDP's
``mixed_ghost_norm`` (awslabs/fast-differential-privacy) and private_vision
(Bu et al. 2022, arXiv 2210.00038), which compares the Gram matrices' 2 T^2
entries per example with the gradient's p d. Otherwise the cheaper
materialisation by the estimate :func:`estimate`, in multiply-add
equivalents per example and group:

* ``bmm``: ``T p d + UNFOLD_COST * T d`` -- the product's multiply-adds plus
  the unfolded input, written and read again (memory traffic, none for a
  Linear layer, whose input is its unfolded form);
* ``conv-backward``: ``T p d + GROUPED_COST * p d`` -- the same multiply-adds,
  plus a cost per weight-gradient entry of each (example, group) call of the
  grouped kernel, which runs one short product over T positions per entry.

So ``bmm`` wins when ``T < (GROUPED_COST / UNFOLD_COST) p = 2 p``: few
positions and many output channels (a 128-channel 3x3 convolution on 8x8
maps), ``conv-backward`` otherwise (LeNet-5's and ResNet-20's early layers).
The constants were fitted to single-thread timings on a 2-core x86 CPU
(``benchmarks/grad_stats.py --strategies``); another device may differ, which
``"measure"`` is for. Peak memory enters through the blocks: every strategy
runs over blocks of examples whose intermediates fit ``block_bytes``
(``_ghost.examples_per_block``), so it bounds memory, not the choice.

``strategy="measure"``. The first call of each layer shape (layer geometry,
batch, dtype, device) times every applicable strategy once, after one
untimed run, on the first examples of the batch (as many as the smallest
block holds, at least 64, at most the batch), and keeps the fastest for that shape for the rest
of the process, as cuDNN's ``benchmark=True`` does for convolution
algorithms. Those first calls synchronise with the device around each timing
(``torch.accelerator.synchronize``); once every shape is measured nothing does.

``strategy="ghost"``, ``"bmm"`` or ``"conv-backward"`` forces one strategy
wherever a layer offers it; a layer that does not (``conv-backward`` on a
Linear layer) keeps its rule choice. The choices are recorded
(``PerExampleNorms.strategies()``): parameter name -> :class:`Choice`, the
strategy and why.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from . import _ghost

__all__ = ["MODES", "STRATEGIES", "Choice", "Chooser", "estimate", "rule_choice", "fixed_choice", "clear_measurements"]

STRATEGIES = ("ghost", "bmm", "conv-backward")
MODES = ("rule", "measure", *STRATEGIES)

UNFOLD_COST = 32  # multiply-add equivalents per unfolded entry (written once, read once)
GROUPED_COST = 64  # multiply-add equivalents per weight-gradient entry per (example, group) call

# Per process: (layer signature, batch, dtype, device) -> the measured choice.
_MEASURED: dict[tuple, "Choice"] = {}


class Choice(NamedTuple):
    """How a parameter's per-example norms were formed, and why."""

    strategy: str
    reason: str

    def __str__(self) -> str:
        return f"{self.strategy} ({self.reason})"


# The parameters with one formula: the engine's method label -> what it computes.
_FIXED = {
    "linear-outer": Choice("outer", "one position: ||g_i||^2 ||a_i||^2 (Goodfellow 2015)"),
    "embedding": Choice("segment-sum", "output gradients summed over equal ids, O(B T D)"),
    "direct": Choice("dense", "small per-example gradient (a bias) formed directly"),
    "norm-affine": Choice("dense", "affine per-example gradients sum_s g_is xhat_is, sum_s g_is"),
    "batchnorm-contribution": Choice(
        "dense", "train-mode BatchNorm: example i's contribution sum_s g_is xhat_is to the batch gradient"
    ),
    "func-fallback": Choice("torch.func", "no formula: vmap(grad) of the module"),
}


def fixed_choice(label: str) -> Choice:
    """The record for a parameter whose norms have one formula (``PerExampleNorms.methods()`` label)."""
    return _FIXED.get(label, Choice(label, "one formula"))


def clear_measurements() -> None:
    """Forget the process's measured choices (the next call of each shape measures again)."""
    _MEASURED.clear()


def estimate(use: _ghost.Factored, strategy: str) -> int:
    """Cost of ``strategy`` per example and group, in multiply-add equivalents (module docstring)."""
    t, p, d = use.length, use.m, use.n
    unfold = UNFOLD_COST * use.unfolded
    if strategy == "ghost":
        return t * t * (p + d) + unfold
    if strategy == "bmm":
        return t * p * d + unfold
    return t * p * d + GROUPED_COST * p * d


def rule_choice(use: _ghost.Factored, allowed: tuple[str, ...] = STRATEGIES) -> Choice:
    """The fastDP rule between the Gram form and materialising, then the cheaper materialisation by estimate."""
    offered = [s for s in use.strategies if s in allowed] or list(use.strategies)
    t, p, d = use.length, use.m, use.n
    if "ghost" in offered and (len(offered) == 1 or 2 * t * t <= p * d):
        relation = "<=" if 2 * t * t <= p * d else ">"
        return Choice("ghost", f"rule: 2T^2 = {2 * t * t} {relation} p d = {p * d}")
    materialise = [s for s in offered if s != "ghost"]
    costs = {s: estimate(use, s) for s in materialise}
    best = min(materialise, key=costs.__getitem__)
    why = f"2T^2 = {2 * t * t} > p d = {p * d}" if 2 * t * t > p * d else f"forced among {'/'.join(offered)}"
    if len(costs) > 1:
        why += "; estimate " + ", ".join(f"{s} {c:.3g}" for s, c in costs.items())
    return Choice(best, f"rule: {why}")


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _timed(use: _ghost.Factored, strategy: str, block_bytes: int) -> float:
    """Seconds for one run of ``strategy`` on ``use``, after an untimed one."""
    _ghost.sq_norms_by(use, strategy, block_bytes)
    device = use.tensor.device
    _synchronize(device)
    start = time.perf_counter()
    _ghost.sq_norms_by(use, strategy, block_bytes)
    _synchronize(device)
    return time.perf_counter() - start


class Chooser:
    """Picks, and records, the strategy of each factored use for one engine.

    ``mode``: one of :data:`MODES`; ``allowed`` narrows the rule (the legacy
    ``method="gram"`` / ``"direct"``).
    """

    def __init__(self, mode: str, block_bytes: int, allowed: tuple[str, ...] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"strategy must be one of {MODES}, got {mode!r}")
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0:
            raise ValueError(f"block_bytes must be a positive int (bytes), got {block_bytes!r}")
        self.mode, self.block_bytes = mode, block_bytes
        self.allowed = (mode,) if mode in STRATEGIES else (allowed or STRATEGIES)

    def choose(self, use: _ghost.Factored) -> Choice:
        if self.mode == "measure" and len(use.strategies) > 1:
            return self._measured(use)
        choice = rule_choice(use, self.allowed)
        if self.mode in STRATEGIES:
            if choice.strategy == self.mode:
                return Choice(self.mode, f"forced (strategy={self.mode!r})")
            return Choice(choice.strategy, f"{self.mode} not offered by this layer; {choice.reason}")
        return choice

    def _measured(self, use: _ghost.Factored) -> Choice:
        device, dtype = use.tensor.device, use.tensor.dtype
        key = (use.signature(), use.batch, dtype, str(device))
        choice = _MEASURED.get(key)
        if choice is None:
            # As many examples as the smallest block, and at least 64 (blocked if need be): one
            # example alone would time per-call overheads, not the strategies.
            smallest = min(_ghost.examples_per_block(use, s, self.block_bytes) for s in use.strategies)
            examples = min(use.batch, max(64, smallest))
            sample = use.select(0, examples)
            times = {s: _timed(sample, s, self.block_bytes) for s in use.strategies}
            best = min(times, key=times.__getitem__)
            listed = ", ".join(f"{s} {1e3 * t:.3g} ms" for s, t in times.items())
            choice = Choice(best, f"measured on {examples} examples on {device}: {listed}")
            _MEASURED[key] = choice
        return choice

"""``nn.Linear``: dW_i = G_i^T A_i, db_i = sum_t g_it (any number of leading dims).

One position (T = 1): ``||dW_i||^2 = ||a_i||^2 ||g_i||^2`` (Goodfellow 2015,
arXiv 1510.01799); sequences: the Gram or the direct form, whichever is
cheaper (``_ghost``; Li et al. 2021, arXiv 2110.05679; Bu et al. 2022,
arXiv 2210.00038).

Per-example gradients as the weight gradient. For a Linear layer on
sequences (T > 1 positions) whose per-example gradients are cheaper to form
than the Gram form (``prefers_summed_direct``; always with
``method="direct"``, never with ``"gram"``), they also supply the layer's
weight gradient: the layer runs with its weight's ``requires_grad`` off, so
autograd skips the weight gradient, and an in-place identity on the output
(``_WeightGradientTap``) returns their sum to the weight's gradient
accumulator, where DDP's and the engine's hooks see it as usual. The norms
then cost only the memory traffic of the per-example blocks (a transformer
block's layers at T = 64: about half the Gram form's time). Not under
autocast or ``torch.func`` transforms, nor for weights shared with another
module; ``backward(create_graph=True)`` gets exact second derivatives.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import _ghost
from ..strategy import Choice
from .base import Call, Rule, is_reshape_of_base

__all__ = ["LinearRule", "linear_uses", "linear_sq_norms", "prefers_summed_direct"]


def linear_uses(a: Tensor, g: Tensor, has_bias: bool) -> tuple[_ghost.Factored, Tensor | None]:
    """Linear ``y = a W^T + b`` with input (B, ..., n): dW_i = G_i^T A_i, db_i = sum_t g_it."""
    dtype = _ghost.compute_dtype(a, g)
    batch = a.shape[0]
    a = a.reshape(batch, -1, a.shape[-1]).to(dtype)
    g = g.reshape(batch, -1, g.shape[-1]).to(dtype)
    bias = g.sum(1) if has_bias else None
    return _ghost.Factored(left=g, right=a, m=g.shape[-1]), bias


def linear_sq_norms(a: Tensor, g: Tensor, bias: bool, chooser) -> tuple[dict[str, tuple[Tensor, str]], Any]:
    """Squared norms (B,) and method names for a Linear layer's weight and bias in one pass, and the
    strategy ``chooser`` (``strategy.Chooser``) picked for the weight (None for one position)."""
    weight, _ = linear_uses(a, g, has_bias=False)
    left, sq = weight.left, _ghost.row_sq_norms
    if weight.length == 1:  # ||dW_i||^2 = ||a_i||^2 ||g_i||^2 (Goodfellow 2015)
        g_sq = sq(left)
        return {"weight": (g_sq * sq(weight.right), "linear-outer"), "bias": (g_sq, "direct")}, None
    choice = chooser.choose(weight)
    if choice.strategy == "ghost":
        w_sq, b_sq = _ghost.ghost_sq_norms(weight, chooser.block_bytes)
        return {"weight": (w_sq, "gram"), "bias": (b_sq, "direct")}, choice
    out = {"weight": (_ghost.sq_norms_by(weight, "bmm", chooser.block_bytes), "direct")}
    if bias:
        out["bias"] = (sq(left.sum(1)), "direct")
    return out, choice


def prefers_summed_direct(length: int, m: int, n: int, element_size: int) -> bool:
    """Per-example gradients in place of the weight gradient, rather than the Gram form?

    Measured on a 2-core x86 CPU (batch 32, float32): beyond the weight
    gradient the per-example blocks cost about 0.5 ns an entry while an
    example's m x n gradient fits in 512 KB (much more beyond: out of cache);
    the Gram form costs about 0.02 ns per multiply-add of ``T^2 (m + n)``.
    """
    return m * n * element_size <= 512 << 10 and 24 * m * n <= length * length * (m + n)


class LinearRule(Rule):
    flat_output = True

    def label(self, name: str) -> str | None:
        return "direct" if name == "bias" else None

    def register(self, module: nn.Module, tracked: dict[str, int]) -> list:
        norms = self.norms
        # The per-example gradients may stand in for the weight gradient: the
        # weight is tracked and no tracked parameter is shared.
        tappable = (
            "weight" in tracked
            and all(norms._owners[k] == 1 for k in tracked.values())
            and module not in norms._sequence_first
        )
        if not tappable:
            return super().register(module, tracked)
        return [
            module.register_forward_pre_hook(self._before),
            module.register_forward_hook(self._after, with_kwargs=True),
            module.register_forward_hook(self._after_error, always_call=True),  # if the forward raised
        ]

    def reset(self) -> None:
        for module in list(self.norms._suspended):  # a forward interrupted between its hooks
            self._resume(module)

    def sq_norms(self, call: Call, g: Tensor, tracked: dict[str, int]) -> dict:
        # The common case, with the bias norm taken from the weight's computation.
        results, choice = linear_sq_norms(call.args[0], g, "bias" in tracked, self.norms._chooser)
        if choice is not None and "weight" in tracked:
            self.norms._note(tracked["weight"], choice)
        return results

    def uses(self, call: Call, x: Tensor, g: Tensor, tracked: dict[str, int]):
        weight, bias = linear_uses(x, g, "bias" in tracked)
        return {"weight": (weight, None), "bias": (bias, "direct")}

    # -- the weight-gradient tap -------------------------------------------------
    def _before(self, module: nn.Linear, args: tuple) -> None:
        """Let the per-example gradients stand in for this call's weight gradient, if cheaper.

        Autograd's linear then computes no weight gradient (the weight does
        not require grad during the call); the tap applied in _after
        supplies it, summed from the per-example gradients it measures.
        """
        norms = self.norms
        if not norms._active or not torch.is_grad_enabled() or norms.method == "gram":
            return
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() < 3 or x.numel() == 0 or not module.weight.requires_grad:
            return
        if torch.is_autocast_enabled(x.device.type) or torch._C._are_functorch_transforms_active():
            return  # the weight gradient would be in another dtype, or the tap cannot be transformed
        length = x.numel() // (x.shape[0] * x.shape[-1])
        if length < 2:
            return  # one position: the outer-product form is cheaper still
        if norms.method == "auto" and not prefers_summed_direct(
            length, module.out_features, module.in_features, x.element_size()
        ):
            return
        module.weight.requires_grad_(False)
        norms._suspended.add(module)

    def _resume(self, module: nn.Module) -> bool:
        """Give the weight back its requires_grad; True if this call was suspended."""
        if module not in self.norms._suspended:
            return False
        self.norms._suspended.discard(module)
        module.weight.requires_grad_(True)
        return True

    def _after_error(self, module: nn.Module, args: tuple, output) -> None:
        self._resume(module)  # a no-op unless the forward raised

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        tapped = self._resume(module)  # _before's checks passed: record this call
        return self.norms._on_forward(module, args, kwargs, output, tapped=tapped)

    def tap(self, call: Call, x: Tensor, output: Tensor):
        """Attach the tap that will supply the weight gradient of this call (see _before).

        ``x`` is the layer input as the graph has it (not detached), for
        ``create_graph=True``.
        """
        weight = call.module.weight
        if output._base is None:
            _WeightGradientTap.apply(output, weight, x, self, call)
            return None
        if not is_reshape_of_base(output):
            return _WeightGradientTap.apply(output.clone(), weight, x, self, call)
        # Tap the base and view it afresh: the old view would be rebased
        # through as_strided, whose backward copies the whole gradient.
        call.grad_shape = output.shape
        return _WeightGradientTap.apply(output._base, weight, x, self, call).view(output.shape)

    def weight_gradient(self, call: Call, g: Tensor, x: Tensor) -> Tensor:
        """The tapped call's weight gradient ``g^T x``; its per-example norms are recorded on the way.

        ``g`` and ``x`` are attached to the graph under ``create_graph=True``,
        so the gradient is differentiable.
        """
        norms = self.norms
        norms._ensure_finalize()
        norms._tapped_now += 1
        module, batch = call.module, call.batch
        left = g.reshape(batch, -1, g.shape[-1])
        right = x.reshape(batch, -1, x.shape[-1])
        if call.forward.calls[module] > 1:
            # Called more than once in the forward: the uses are combined
            # exactly at the end of the backward, from their factors.
            norms._on_output_grad(call, g)
            return left.flatten(0, 1).t().mm(right.flatten(0, 1))
        _, tracked = norms._plan[module]
        grad, sq = _ghost.summed_direct(left, right)
        norms._note(tracked["weight"], _TAPPED)
        pending = norms._pending.setdefault(call.forward, {})
        pending[tracked["weight"]] = (sq, "direct", batch)
        if "bias" in tracked:
            pending[tracked["bias"]] = (_ghost.row_sq_norms(left.detach().sum(1)), "direct", batch)
        return grad


_TAPPED = Choice("bmm", "per-example gradients by blocks of 2 MB also supply the weight gradient (prefers_summed_direct)")


class _WeightGradientTap(torch.autograd.Function):
    """Identity on a Linear layer's output whose backward supplies the layer's weight gradient.

    Declared in place (``mark_dirty``), so the forward copies nothing and the
    output's gradient passes through unchanged; the extra input ``weight``
    gives the graph its edge to the weight's gradient accumulator (and so to
    DDP's and the engine's hooks on it); the layer input ``x`` is an input
    for ``create_graph=True`` (below).
    """

    @staticmethod
    def forward(ctx, output: Tensor, weight: Tensor, x: Tensor, rule: LinearRule, call: Call) -> Tensor:
        ctx.mark_dirty(output)
        ctx.save_for_backward(x, weight)
        ctx.rule, ctx.call = rule, call
        return output

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        grad_weight = ctx.rule.weight_gradient(ctx.call, g, x)
        grad_x = None
        if torch.is_grad_enabled() and ctx.needs_input_grad[2]:
            # create_graph=True: autograd's linear saw the weight as a constant,
            # so its input gradient g W lacks the dependence on W. A zero-valued
            # term carrying exactly that dependence restores the second order.
            term = (g.detach().reshape(-1, g.shape[-1]) @ weight).reshape(x.shape)
            grad_x = term - term.detach()
        return g, grad_weight, grad_x, None, None


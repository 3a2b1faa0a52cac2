"""Per-example, per-layer gradient norms without per-example gradients.

:class:`PerExampleNorms` keeps, for each parameter ``k``, the running sums over
examples ``i`` of ``||grad_k f_i||`` and ``||grad_k f_i||^2``. It never forms the
model's per-example gradients: a forward hook keeps each layer's input, a
tensor hook on the layer's output receives ``dLoss/dOutput``, and the norms
follow from the layer's formula in :mod:`largebatch.stats._ghost`
(Goodfellow 2015, arXiv 1510.01799; Li et al. 2021, arXiv 2110.05679;
Bu et al. 2022, arXiv 2210.00038).

Supported layers: ``nn.Linear`` (any number of leading dims), ``nn.Conv1d/2d/3d``
(strides, padding modes, dilation, groups, depthwise), ``nn.Embedding``
(``padding_idx``; not ``scale_grad_by_freq``), ``nn.LayerNorm``, ``nn.GroupNorm``,
``nn.RMSNorm``, BatchNorm (see *BatchNorm policy*), and any other module with
parameters of its own through a ``torch.func`` per-module fallback. Subclasses
that override ``forward`` use the fallback. Dimension 0 of every layer input is
the example dimension.

Combining uses. A parameter used more than once in one forward pass (a module
called twice, or one ``nn.Parameter`` shared by several modules, e.g. an
embedding tied to an output ``nn.Linear``) gets the exact norm of the *sum* of
its uses' per-example gradients, through the cross inner products
``<L_u L_v^T, R_u R_v^T>`` (``||a + b||^2 != ||a||^2 + ||b||^2``, so the uses are
never simply added in norm). A tied weight must be used through modules: a
parameter that receives a gradient but was used by no hooked module call (e.g.
``F.linear(h, emb.weight)``, or ``nn.MultiheadAttention.out_proj``) raises a
``RuntimeError`` naming it; a parameter used both through a module and
functionally cannot be detected and gets only the module's share.

Per-example gradients as the weight gradient. For a Linear layer on
sequences (T > 1 positions) whose per-example gradients are cheaper to form
than the Gram form (``_ghost.prefers_summed_direct``; always with
``method="direct"``, never with ``"gram"``), they also supply the layer's
weight gradient: the layer runs with its weight's ``requires_grad`` off, so
autograd skips the weight gradient, and an in-place identity on the output
(``_WeightGradientTap``) returns their sum to the weight's gradient
accumulator, where DDP's and the engine's hooks see it as usual. The norms
then cost only the memory traffic of the per-example blocks (a transformer
block's layers at T = 64: about half the Gram form's time). Not under
autocast or ``torch.func`` transforms, nor for weights shared with another
module; ``backward(create_graph=True)`` gets exact second derivatives.

BatchNorm policy. In train mode BatchNorm normalises with batch statistics, so
an example's loss depends on the other examples and no exact per-example
gradient exists. ``batchnorm="contribution"`` (the default) reports example
``i``'s additive contribution ``sum_s g_is * xhat_is`` (and ``sum_s g_is`` for
the bias) to the batch gradient: the contributions sum to the exact gradient,
but their norms are an approximation, and the gradients reaching earlier layers
carry the same coupling. In eval mode the same formula is exact.
``batchnorm="error"`` refuses models with a BatchNorm in train mode.

Scale. Norms are of the gradient of example ``i``'s loss on the scale the loss
was backpropagated, multiplied by the micro-batch size when
``loss_reduction="mean"`` (so a mean loss and a sum loss give the same numbers).
Each forward pass of ``model`` is one micro-batch; run one backward per forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from . import _ghost

__all__ = ["PerExampleNorms"]

_BATCH_NORM = nn.modules.batchnorm._BatchNorm
# (class, kind): a module is handled natively only if it keeps the class's forward.
_KINDS = (
    (nn.Linear, "linear"),
    (nn.Conv1d, "conv"),
    (nn.Conv2d, "conv"),
    (nn.Conv3d, "conv"),
    (nn.Embedding, "embedding"),
    (nn.LayerNorm, "norm"),
    (nn.GroupNorm, "norm"),
    (nn.RMSNorm, "norm"),
    (_BATCH_NORM, "batchnorm"),
)
_STATIC_LABELS = {
    "embedding": "embedding",
    "norm": "norm-affine",
    "batchnorm": "batchnorm-contribution",
    "fallback": "func-fallback",
}
_UNRESOLVED = "gram-or-direct"  # Linear/Conv weights before their first backward


def _module_kind(module: nn.Module, tracked_names: set[str]) -> str | None:
    if isinstance(module, nn.SyncBatchNorm):
        return None  # batch statistics span workers; neither formula nor fallback is right
    for cls, kind in _KINDS:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            if not tracked_names <= {"weight", "bias"}:
                return "fallback"
            if kind == "embedding" and module.scale_grad_by_freq:
                return None
            return kind
    return "fallback"


@dataclass(eq=False)
class _Forward:
    """One forward pass of the model: the calls of each module in it."""

    calls: dict = field(default_factory=lambda: defaultdict(int))


@dataclass(eq=False)
class _Call:
    """One call of a hooked module: what its backward formula needs."""

    module: nn.Module
    kind: str
    args: tuple
    kwargs: dict
    batch: int
    forward: _Forward
    bn_stats: tuple[Tensor, Tensor] | None = None
    moments: tuple[Tensor, Tensor] | None = None  # a LayerNorm's saved (mean, rstd)
    grad_shape: torch.Size | None = None  # set when the hook sits on the output's base


class PerExampleNorms:
    """Sums of per-example per-parameter gradient norms, accumulated over backward passes.

    Args:
        model: the network; hooks are registered on its modules that own
            tracked parameters.
        loss_reduction: ``"mean"`` or ``"sum"``, how the loss reduces over the
            examples of a micro-batch.
        batchnorm: ``"contribution"`` or ``"error"`` (see the module docstring).
        fallback: use ``torch.func`` (``functional_call`` + ``vmap(grad)``) for
            modules with parameters of their own and no formula; if ``False``
            such modules raise ``ValueError``. The fallback needs a
            deterministic module returning one tensor; tensor arguments whose
            dimension 0 is the batch size are treated as batched.
        params: the parameters to track, in this order; default: the model's
            trainable parameters, deduplicated.
        method: ``"auto"`` (cheaper of Gram and direct per layer call, from the
            shapes), ``"gram"`` or ``"direct"`` for Linear and Conv weights.

    ``accumulators()`` returns ``(norm_sum [K], sq_norm_sum [K], num_examples)``
    on the parameters' device, without a host synchronisation.
    ``tapped_calls`` counts the Linear calls of the latest backward whose
    weight gradient came from the per-example gradients (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_reduction: str = "mean",
        batchnorm: str = "contribution",
        fallback: bool = True,
        params: list[nn.Parameter] | None = None,
        method: str = "auto",
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if batchnorm not in ("contribution", "error"):
            raise ValueError(f"batchnorm must be 'contribution' or 'error', got {batchnorm!r}")
        if method not in ("auto", "gram", "direct"):
            raise ValueError(f"method must be 'auto', 'gram' or 'direct', got {method!r}")
        self.loss_reduction, self.batchnorm, self.method = loss_reduction, batchnorm, method
        self.fallback = fallback
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.params = list(params)
        if not self.params:
            raise ValueError("params: no parameters to track")

        names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), name)
        self._index = {}
        for k, p in enumerate(self.params):
            if id(p) not in names:
                raise ValueError(f"params[{k}] is not a parameter of the model")
            if id(p) in self._index:
                raise ValueError(f"params: {names[id(p)]!r} is listed twice")
            self._index[id(p)] = k
        self._names = [names[id(p)] for p in self.params]

        device = self.params[0].device
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self._norm_sum = torch.zeros(len(self.params), device=device, dtype=dtype)
        self._sq_sum = torch.zeros_like(self._norm_sum)
        self._count = torch.zeros((), device=device, dtype=dtype)
        self._backwards = 0
        self._labels = [_UNRESOLVED] * len(self.params)
        self._owners = [0] * len(self.params)
        self._plan: dict[nn.Module, tuple[str, dict[str, int]]] = {}
        self._handles = []
        self._active = True
        self._forward: _Forward | None = None
        self._pending: dict[_Forward, dict[int, list]] = {}
        self._seen: set[int] = set()
        self._queued = False
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self._suspended: set[nn.Module] = set()  # Linear layers running with their weight's requires_grad off
        self._tapped_now = 0
        self.tapped_calls = 0
        self._plan_modules(model)
        self._register(model)

    # ------------------------------------------------------------ set-up

    def _plan_modules(self, model: nn.Module) -> None:
        for module_name, module in model.named_modules():
            if isinstance(module, _BATCH_NORM) and self.batchnorm == "error":
                _refuse_train_batchnorm(module, module_name)
            tracked = {
                n: self._index[id(p)]
                for n, p in module.named_parameters(recurse=False)
                if id(p) in self._index
            }
            if not tracked:
                continue
            kind = _module_kind(module, set(tracked))
            label = module_name or type(module).__name__
            if kind is None:
                raise ValueError(
                    f"module {label!r} ({type(module).__name__}) is not supported: no per-example "
                    "gradient exists for it (SyncBatchNorm couples examples across workers; "
                    "Embedding(scale_grad_by_freq=True) scales by counts over the whole batch)"
                )
            if kind == "fallback" and not self.fallback:
                raise ValueError(
                    f"module {label!r} ({type(module).__name__}) has no per-example norm formula "
                    "and fallback=False; pass fallback=True to use torch.func for it"
                )
            self._plan[module] = (kind, tracked)
            for pname, k in tracked.items():
                self._owners[k] += 1
                if pname == "bias" and kind in ("linear", "conv"):
                    self._labels[k] = "direct"
                elif kind in _STATIC_LABELS:
                    self._labels[k] = _STATIC_LABELS[kind]
        for k, owners in enumerate(self._owners):
            if owners == 0:
                raise ValueError(f"parameter {self._names[k]!r} is owned by no module of the model")
        # Linear layers whose per-example gradients may stand in for the weight
        # gradient: the weight is tracked and no tracked parameter is shared.
        self._tappable = [
            module
            for module, (kind, tracked) in self._plan.items()
            if kind == "linear" and "weight" in tracked and all(self._owners[k] == 1 for k in tracked.values())
        ]

    def _register(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward))
        for module in self._tappable:
            self._handles.append(module.register_forward_pre_hook(self._before_linear))
        for module in self._plan:
            self._handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))
        for module in self._tappable:  # if the forward raised, _on_forward did not run
            self._handles.append(module.register_forward_hook(self._on_forward_error, always_call=True))
        if self.batchnorm == "error":
            for name, module in model.named_modules():
                if isinstance(module, _BATCH_NORM):
                    check = functools.partial(_refuse_train_batchnorm, name=name)
                    self._handles.append(module.register_forward_pre_hook(lambda m, _, c=check: c(m)))
        for k, p in enumerate(self.params):
            if p.requires_grad:
                self._handles.append(p.register_hook(functools.partial(self._on_param_grad, k)))

    # ------------------------------------------------------------ public API

    def reset(self) -> None:
        """Zero the accumulators (start of an optimiser step)."""
        self._norm_sum.zero_()
        self._sq_sum.zero_()
        self._count.zero_()
        self._backwards = 0

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def accumulators(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(sum_i ||grad_k f_i|| [K], sum_i ||grad_k f_i||^2 [K], number of examples)``."""
        if self._backwards == 0:
            raise RuntimeError(
                "PerExampleNorms.accumulators(): no backward pass has reached a tracked layer "
                "since reset() (or construction); call loss.backward() first"
            )
        return self._norm_sum.clone(), self._sq_sum.clone(), self._count.clone()

    def flush(self) -> None:
        """Combine and accumulate the uses seen so far in a backward that is still running.

        For callers that need the sums before the backward ends, e.g. a DDP
        communication hook on the last bucket (every layer-output gradient has
        arrived by then). The end-of-backward callback then finds nothing left.
        """
        if self._queued:
            self._finalize()

    def methods(self) -> dict[str, str]:
        """Parameter name -> how its norm was computed in the latest backward.

        One of "linear-outer", "gram", "direct", "embedding", "norm-affine",
        "batchnorm-contribution", "func-fallback"; uses combined exactly are
        joined with "+"; Linear and Conv weights report "gram-or-direct" until
        their first backward (the choice depends on the input's shape).
        """
        return dict(zip(self._names, self._labels))

    # ------------------------------------------------------------ forward side

    def _on_model_forward(self, module, args) -> None:
        if self._active:  # not while the fallback re-runs a module inside backward
            self._forward = _Forward()

    def _before_linear(self, module: nn.Linear, args: tuple) -> None:
        """Let the per-example gradients stand in for this call's weight gradient, if cheaper.

        Autograd's linear then computes no weight gradient (the weight does
        not require grad during the call); the tap applied in _on_forward
        supplies it, summed from the per-example gradients it measures.
        """
        if not self._active or not torch.is_grad_enabled() or self.method == "gram":
            return
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() < 3 or x.numel() == 0 or not module.weight.requires_grad:
            return
        if torch.is_autocast_enabled(x.device.type) or torch._C._are_functorch_transforms_active():
            return  # the weight gradient would be in another dtype, or the tap cannot be transformed
        length = x.numel() // (x.shape[0] * x.shape[-1])
        if length < 2:
            return  # one position: the outer-product form is cheaper still
        if self.method == "auto" and not _ghost.prefers_summed_direct(
            length, module.out_features, module.in_features, x.element_size()
        ):
            return
        module.weight.requires_grad_(False)
        self._suspended.add(module)

    def _resume_weight(self, module: nn.Module) -> bool:
        """Give the weight back its requires_grad; True if this call was suspended."""
        if module not in self._suspended:
            return False
        self._suspended.discard(module)
        module.weight.requires_grad_(True)
        return True

    def _on_forward_error(self, module: nn.Module, args: tuple, output) -> None:
        self._resume_weight(module)  # a no-op unless the forward raised

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output):
        tapped = self._resume_weight(module)  # _before_linear's checks passed: record this call
        if not tapped and (not self._active or not torch.is_grad_enabled()):
            return None
        kind, _ = self._plan[module]
        if not isinstance(output, Tensor):
            if any(isinstance(t, Tensor) and t.requires_grad for t in tree_flatten(output)[0]):
                raise TypeError(
                    f"{type(module).__name__} returns {type(output).__name__}; per-example norms "
                    "need modules with parameters to return a single tensor"
                )
            return None
        if not output.requires_grad and not tapped:  # (a tapped output requires grad once tapped)
            return None
        layer_input = args[0] if args else None
        if kind == "fallback":
            args, kwargs = tree_map(_detach, args), tree_map(_detach, kwargs)
        else:  # the formulas read only the first input
            args, kwargs = (args[0].detach(),) if args else (), {}
        batch = _batch_size(args, kwargs)
        if batch is None:
            raise RuntimeError(f"{type(module).__name__} was called without a batched tensor input")
        if self._forward is None:
            self._forward = _Forward()
        self._forward.calls[module] += 1
        call = _Call(
            module=module,
            kind=kind,
            args=args,
            kwargs=kwargs,
            batch=batch,
            forward=self._forward,
            bn_stats=_eval_batchnorm_stats(module) if kind == "batchnorm" else None,
            moments=_layer_norm_moments(output, args[0]) if isinstance(module, nn.LayerNorm) else None,
        )
        if tapped:
            return self._tap_weight_gradient(call, layer_input, output)
        target, replacement = output, None
        if output._base is not None:
            # A hook on a view is dropped if the view is later modified in place.
            if kind == "linear" and _is_reshape_of_base(output):
                target, call.grad_shape = output._base, output.shape
            else:
                target = replacement = output.clone()
        target.register_hook(functools.partial(self._on_output_grad, call))
        return replacement

    def _tap_weight_gradient(self, call: _Call, x: Tensor, output: Tensor):
        """Attach the tap that will supply the weight gradient of this call (see _before_linear).

        ``x`` is the layer input as the graph has it (not detached), for
        ``create_graph=True``.
        """
        weight = call.module.weight
        if output._base is None:
            _WeightGradientTap.apply(output, weight, x, self, call)
            return None
        if not _is_reshape_of_base(output):
            return _WeightGradientTap.apply(output.clone(), weight, x, self, call)
        # Tap the base and view it afresh: the old view would be rebased
        # through as_strided, whose backward copies the whole gradient.
        call.grad_shape = output.shape
        return _WeightGradientTap.apply(output._base, weight, x, self, call).view(output.shape)

    # ------------------------------------------------------------ backward side

    def _weight_gradient(self, call: _Call, g: Tensor, x: Tensor) -> Tensor:
        """The tapped call's weight gradient ``g^T x``; its per-example norms are recorded on the way.

        ``g`` and ``x`` are attached to the graph under ``create_graph=True``,
        so the gradient is differentiable.
        """
        self._ensure_finalize()
        self._tapped_now += 1
        module, batch = call.module, call.batch
        left = g.reshape(batch, -1, g.shape[-1])
        right = x.reshape(batch, -1, x.shape[-1])
        if call.forward.calls[module] > 1:
            # Called more than once in the forward: the uses are combined
            # exactly at the end of the backward, from their factors.
            self._on_output_grad(call, g)
            return left.flatten(0, 1).t().mm(right.flatten(0, 1))
        _, tracked = self._plan[module]
        grad, sq = _ghost.summed_direct(left, right)
        pending = self._pending.setdefault(call.forward, {})
        pending[tracked["weight"]] = (sq, "direct", batch)
        if "bias" in tracked:
            pending[tracked["bias"]] = (_ghost.row_sq_norms(left.detach().sum(1)), "direct", batch)
        return grad

    def _ensure_finalize(self) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)

    def _on_param_grad(self, k: int, _grad: Tensor) -> None:
        self._ensure_finalize()
        self._seen.add(k)

    def _on_output_grad(self, call: _Call, g: Tensor) -> None:
        self._ensure_finalize()
        g = g.detach()
        if call.grad_shape is not None:
            g = g.reshape(call.grad_shape)
        pending = self._pending.setdefault(call.forward, {})
        single_call = call.forward.calls[call.module] == 1
        _, tracked = self._plan[call.module]
        if call.kind == "linear" and single_call and all(self._owners[k] == 1 for k in tracked.values()):
            # The common case, with the bias norm taken from the weight's computation.
            results = _ghost.linear_sq_norms(call.args[0], g, self.method, "bias" in tracked)
            for name, k in tracked.items():
                pending[k] = (*results[name], call.batch)
            return
        for k, use, label in self._uses(call, g):
            if single_call and self._owners[k] == 1:
                sq, name = _ghost.sq_norm(use, self.method)
                pending[k] = (sq, label or name, call.batch)
            else:
                pending.setdefault(k, []).append((use, label, call.batch))

    def _uses(self, call: _Call, g: Tensor) -> list[tuple[int, _ghost.Use, str | None]]:
        kind, tracked = self._plan[call.module]
        module, x = call.module, call.args[0] if call.args else None
        if kind == "linear":
            weight, bias = _ghost.linear_uses(x, g, "bias" in tracked)
            found = {"weight": (weight, None), "bias": (bias, "direct")}
        elif kind == "conv":
            weight, bias = _ghost.conv_uses(module, x, g)
            found = {"weight": (weight, None), "bias": (bias, "direct")}
        elif kind == "embedding":
            found = {"weight": (_ghost.embedding_uses(module, x, g), None)}
        elif kind == "norm":
            weight, bias = _ghost.norm_affine_uses(module, x, g, call.moments)
            found = {"weight": (weight, "norm-affine"), "bias": (bias, "norm-affine")}
        elif kind == "batchnorm":
            weight, bias = _ghost.batch_norm_uses(module, x, g, call.bn_stats)
            label = "batchnorm-contribution" if call.bn_stats is None else "norm-affine"
            found = {"weight": (weight, label), "bias": (bias, label)}
        else:
            grads = self._fallback_grads(call, g, list(tracked))
            found = {name: (grads[name], "func-fallback") for name in tracked}
        return [(k, *found[name]) for name, k in tracked.items() if name in found]

    @contextlib.contextmanager
    def _paused(self):
        active, self._active = self._active, False
        try:
            yield
        finally:
            self._active = active

    def _fallback_grads(self, call: _Call, g: Tensor, names: list[str]) -> dict[str, Tensor]:
        """Per-example gradients of <module(x_i), g_i> by torch.func (functional_call + vmap(grad))."""
        module, batch = call.module, call.batch
        params = {name: getattr(module, name).detach() for name in names}
        dims = lambda tree: tree_map(  # noqa: E731
            lambda t: 0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch else None, tree
        )
        arg_dims, kwarg_dims = dims(call.args), dims(call.kwargs)

        def contribution(p, args, kwargs, g_i):
            args = tree_map(_unsqueeze_batched, args, arg_dims)
            kwargs = tree_map(_unsqueeze_batched, kwargs, kwarg_dims)
            out = functional_call(module, p, args, kwargs)
            return (out * g_i.unsqueeze(0)).sum()

        with self._paused(), torch.enable_grad():
            return vmap(grad(contribution), in_dims=(None, arg_dims, kwarg_dims, 0))(
                params, call.args, call.kwargs, g
            )

    def _finalize(self) -> None:
        """End of a backward pass: combine each parameter's uses and accumulate."""
        self._queued = False
        pending, self._pending = self._pending, {}
        seen, self._seen = self._seen, set()
        reached = set()
        for per_param in pending.values():
            ks, sqs, batch = [], [], None
            for k, entry in per_param.items():
                if isinstance(entry, tuple):
                    sq, label, batch_k = entry
                else:
                    sq, label = _ghost.combined_sq_norm(
                        [use for use, _, _ in entry], self.method, [lab for _, lab, _ in entry]
                    )
                    batch_k = entry[0][2]
                if batch is not None and batch_k != batch:
                    raise RuntimeError(
                        f"{self._names[k]!r}: layers of one forward pass saw batch sizes "
                        f"{batch} and {batch_k}; dimension 0 must be the example dimension"
                    )
                batch = batch_k
                ks.append(k)
                sqs.append(sq.to(self._sq_sum.dtype))
                self._labels[k] = label
            reached.update(ks)
            self._accumulate(ks, torch.stack(sqs), batch)
        missing = seen - reached
        if missing:
            names = ", ".join(repr(self._names[k]) for k in sorted(missing))
            raise RuntimeError(
                f"parameters {names} received gradients without a call of a hooked module "
                "(used functionally, e.g. F.linear(x, emb.weight) or nn.MultiheadAttention); "
                "use them through modules so their per-example norms can be formed"
            )
        if pending:  # (a flushed backward's own end-of-backward callback finds nothing)
            self._backwards += 1
            self.tapped_calls, self._tapped_now = self._tapped_now, 0

    def _accumulate(self, ks: list[int], sq: Tensor, batch: int) -> None:
        """sq: (len(ks), B) squared norms on the backpropagated scale."""
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        index = self._index_cache.get(tuple(ks))
        if index is None:
            index = torch.tensor(ks, device=self._norm_sum.device)
            self._index_cache[tuple(ks)] = index
        # Cross terms can leave tiny negative squares from rounding.
        self._norm_sum.index_add_(0, index, sq.clamp_min(0).sqrt().sum(1), alpha=scale)
        self._sq_sum.index_add_(0, index, sq.sum(1), alpha=scale * scale)
        self._count.add_(batch)


class _WeightGradientTap(torch.autograd.Function):
    """Identity on a Linear layer's output whose backward supplies the layer's weight gradient.

    Declared in place (``mark_dirty``), so the forward copies nothing and the
    output's gradient passes through unchanged; the extra input ``weight``
    gives the graph its edge to the weight's gradient accumulator (and so to
    DDP's and the engine's hooks on it); the layer input ``x`` is an input
    for ``create_graph=True`` (below).
    """

    @staticmethod
    def forward(ctx, output: Tensor, weight: Tensor, x: Tensor, norms: "PerExampleNorms", call: _Call) -> Tensor:
        ctx.mark_dirty(output)
        ctx.save_for_backward(x, weight)
        ctx.norms, ctx.call = norms, call
        return output

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        grad_weight = ctx.norms._weight_gradient(ctx.call, g, x)
        grad_x = None
        if torch.is_grad_enabled() and ctx.needs_input_grad[2]:
            # create_graph=True: autograd's linear saw the weight as a constant,
            # so its input gradient g W lacks the dependence on W. A zero-valued
            # term carrying exactly that dependence restores the second order.
            term = (g.detach().reshape(-1, g.shape[-1]) @ weight).reshape(x.shape)
            grad_x = term - term.detach()
        return g, grad_weight, grad_x, None, None


def _refuse_train_batchnorm(module: nn.Module, name: str = "") -> None:
    if module.training or module.running_mean is None:
        raise ValueError(
            f"BatchNorm {name or type(module).__name__!r} normalises with batch statistics "
            "(train mode), which couples examples; batchnorm='error' refuses it "
            "(use model.eval() for it, or batchnorm='contribution')"
        )


def _eval_batchnorm_stats(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """Running statistics at forward time if the module uses them, else None (batch statistics)."""
    if module.training or module.running_mean is None:
        return None
    return module.running_mean.detach().clone(), module.running_var.detach().clone()


def _layer_norm_moments(output: Tensor, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """The (mean, rstd) autograd saved for a LayerNorm's backward, or None.

    Normalising with them costs a fifth of recomputing the layer norm on this
    CPU; any other graph (another backend's kernel, a wrapped output) returns
    None and the norm is recomputed.
    """
    node = output.grad_fn
    if type(node).__name__ != "NativeLayerNormBackward0":
        return None
    try:
        mean, rstd = node._saved_result1, node._saved_result2
    except AttributeError:
        return None
    if mean is None or rstd is None or mean.dim() != x.dim() or mean.shape != rstd.shape:
        return None
    return mean, rstd


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
        return args[0].shape[0]
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, Tensor) and t.dim() > 0:
            return t.shape[0]
    return None


def _detach(t):
    return t.detach() if isinstance(t, Tensor) else t


def _unsqueeze_batched(t, dim):
    return t.unsqueeze(0) if dim == 0 else t


def _is_reshape_of_base(view: Tensor) -> bool:
    """True if ``view`` covers all of its contiguous base in the same order."""
    base = view._base
    return (
        view.is_contiguous()
        and base.is_contiguous()
        and view.numel() == base.numel()
        and view.storage_offset() == base.storage_offset()
    )

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
``nn.RMSNorm``, BatchNorm (see *BatchNorm policy*), ``nn.MultiheadAttention``
(hence ``nn.TransformerEncoderLayer``/``DecoderLayer`` in training, see
*Attention*), ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (padded batches, no inter-layer
dropout in train mode; torch.func one example at a time, so B small re-runs of
the module per backward), and any other module with parameters of its own
through a ``torch.func`` per-module fallback, which may return a tuple or other
container of tensors and must be deterministic (no dropout in train mode).
Subclasses that override ``forward`` use the fallback. Parameters of any shape,
0-dim ones (a learnable temperature) included. Dimension 0 of every layer input
is the example dimension, except in ``batch_first=False`` attention, recurrent
and transformer layers, whose layouts are known. Errors name the module's path.

Attention. ``nn.MultiheadAttention`` computes its projections with ``F.linear``
inside ``F.multi_head_attention_forward``; a ``TorchFunctionMode`` active
during the call hooks each projection's output, and each projection gets the
Linear layer's rule (rows of ``in_proj_weight`` used by the q, k, v projections
form one factored gradient). Exact with attention dropout, masks, ``kdim``/``vdim``
and ``add_bias_kv``; needs ``torch.overrides.redispatch_function``.

Combining uses. A parameter used more than once in one forward pass (a module
called twice, or one ``nn.Parameter`` shared by several modules, e.g. an
embedding tied to an output ``nn.Linear``) gets the exact norm of the *sum* of
its uses' per-example gradients, through the cross inner products
``<L_u L_v^T, R_u R_v^T>`` (``||a + b||^2 != ||a||^2 + ||b||^2``, so the uses are
never simply added in norm). A tied weight must be used through modules: a
parameter that receives a gradient but was used by no hooked module call (e.g.
``F.linear(h, emb.weight)``) raises a
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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

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
# Fused recurrent kernels: the torch.func fallback, one example at a time (they have no vmap rule).
_RNNS = (nn.RNN, nn.GRU, nn.LSTM)
# Runs a __torch_function__ implementation with the mode still seeing the ops inside it;
# the attention rule needs it (see _AttentionTap).
_REDISPATCH = getattr(torch.overrides, "redispatch_function", None)
_STATIC_LABELS = {
    "embedding": "embedding",
    "norm": "norm-affine",
    "batchnorm": "batchnorm-contribution",
    "fallback": "func-fallback",
    "rnn": "func-fallback",
}
_UNRESOLVED = "gram-or-direct"  # Linear/Conv weights before their first backward


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward


def _module_kind(module: nn.Module, tracked_names: set[str]) -> str | None:
    if isinstance(module, nn.SyncBatchNorm):
        return None  # batch statistics span workers; neither formula nor fallback is right
    if _is_attention(module):
        return "attention"
    if any(isinstance(module, cls) and type(module).forward is cls.forward for cls in _RNNS):
        return "rnn"
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
    transposed: bool = False  # input and output are (L, B, ...), see _sequence_first_layers
    # the fallback's example dimension of each argument and hooked output leaf (None: not batched)
    arg_dims: tuple | None = None
    kwarg_dims: dict | None = None
    out_dims: dict[int, int] | None = None


@dataclass(eq=False)
class _Deferred:
    """A call whose norms need the gradients of several tensors: its output leaves, or projections inside it.

    ``entries[j]`` says what the gradient of hooked tensor ``j`` means;
    the norms are formed when all have arrived, or at the end of the
    backward from those that did (a tensor the loss does not reach adds 0).
    """

    call: _Call
    entries: list = field(default_factory=list)
    grads: dict = field(default_factory=dict)
    done: bool = False


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
            such modules raise ``ValueError`` (RNN/GRU/LSTM included). The
            fallback needs a deterministic module; tensor arguments and output
            tensors whose dimension 0 is the batch size are treated as batched.
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
        self._deferred: list[_Deferred] = []  # those that received a gradient in this backward
        self._taps: dict[nn.Module, list[_AttentionTap]] = defaultdict(list)
        self._module_names: dict[nn.Module, str] = {}
        self._plan_modules(model)
        self._register(model)

    # ------------------------------------------------------------ set-up

    def _plan_modules(self, model: nn.Module) -> None:
        # nn.MultiheadAttention uses its out_proj's parameters functionally: they are planned with it.
        absorbed = {module.out_proj for module in model.modules() if _is_attention(module)}
        self._sequence_first = _sequence_first_layers(model)
        for module_name, module in model.named_modules():
            if isinstance(module, _BATCH_NORM) and self.batchnorm == "error":
                _refuse_train_batchnorm(module, module_name)
            if module in absorbed:
                continue
            self._refuse_tracked_parametrization(module, module_name)
            members = list(module.named_parameters(recurse=False))
            if _is_attention(module):
                members += list(module.out_proj.named_parameters(prefix="out_proj", recurse=False))
            tracked = {n: self._index[id(p)] for n, p in members if id(p) in self._index}
            if not tracked:
                continue
            kind = _module_kind(module, set(tracked))
            label = module_name or type(module).__name__
            self._module_names[module] = label
            if kind == "attention" and _REDISPATCH is None:
                raise ValueError(
                    f"module {label!r} (MultiheadAttention): its per-example norms need "
                    "torch.overrides.redispatch_function, which this PyTorch lacks; upgrade PyTorch"
                )
            if kind is None:
                raise ValueError(
                    f"module {label!r} ({type(module).__name__}) is not supported: no per-example "
                    "gradient exists for it (SyncBatchNorm couples examples across workers; "
                    "Embedding(scale_grad_by_freq=True) scales by counts over the whole batch)"
                )
            if kind in ("fallback", "rnn") and not self.fallback:
                raise ValueError(
                    f"module {label!r} ({type(module).__name__}) has no per-example norm formula "
                    "and fallback=False; pass fallback=True to use torch.func for it"
                )
            self._plan[module] = (kind, tracked)
            for pname, k in tracked.items():
                self._owners[k] += 1
                if pname == "bias" and kind in ("linear", "conv"):
                    self._labels[k] = "direct"
                elif kind == "attention" and not pname.endswith("weight"):
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
            if kind == "linear"
            and "weight" in tracked
            and all(self._owners[k] == 1 for k in tracked.values())
            and module not in self._sequence_first
        ]

    def _refuse_tracked_parametrization(self, module: nn.Module, module_name: str) -> None:
        """Refuse a tracked parameter behind ``torch.nn.utils.parametrize`` (weight_norm, spectral_norm, ...).

        The layer's formula gives the per-example gradient of the computed
        weight, not of the parametrization's original tensors; spectral_norm
        would also advance its power iteration if its weight were recomputed.
        """
        if not parametrize.is_parametrized(module):
            return
        for tensor_name, plist in module.parametrizations.items():
            originals = [n for n, p in plist.named_parameters(recurse=False) if id(p) in self._index]
            if originals:
                kinds = ", ".join(type(f).__name__ for f in plist)
                label = module_name or type(module).__name__
                raise ValueError(
                    f"module {label!r} ({type(module).__name__}): its {tensor_name!r} is computed by a "
                    f"parametrization ({kinds}: weight_norm, spectral_norm, ...), which per-example norms do not "
                    f"support; remove it (torch.nn.utils.parametrize.remove_parametrizations) or leave "
                    f"{', '.join(f'parametrizations.{tensor_name}.{n}' for n in originals)} untracked (params=)"
                )

    def _register(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward))
        for module in self._tappable:
            self._handles.append(module.register_forward_pre_hook(self._before_linear))
        for module, (kind, _) in self._plan.items():
            if kind == "attention":
                self._handles.append(module.register_forward_pre_hook(self._before_attention, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._after_attention, always_call=True))
            else:
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
        """Zero the accumulators and forget any backward in flight (start of an optimiser step).

        A backward that raised (a user hook, a NaN guard, KeyboardInterrupt,
        out of memory) never runs its end-of-backward callback, so its
        partial uses and the "callback queued" flag are dropped here too;
        otherwise no later backward would queue one.
        """
        self._norm_sum.zero_()
        self._sq_sum.zero_()
        self._count.zero_()
        self._backwards = 0
        self._queued = False
        self._pending = {}
        self._seen = set()
        self._deferred = []
        self._forward = None
        self._tapped_now = 0
        for module in list(self._suspended):  # a forward interrupted between its hooks
            self._resume_weight(module)

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
        if kind in ("fallback", "rnn"):
            return self._on_fallback_forward(module, kind, args, kwargs, output)
        if not isinstance(output, Tensor):  # (not from the modules with formulas)
            raise TypeError(f"{self._describe(module)} returned {type(output).__name__}, not a tensor")
        if not output.requires_grad and not tapped:  # (a tapped output requires grad once tapped)
            return None
        layer_input = args[0] if args else None
        args, kwargs = (args[0].detach(),) if args else (), {}  # the formulas read only the first input
        moments = _layer_norm_moments(output, args[0]) if isinstance(module, nn.LayerNorm) else None
        transposed = module in self._sequence_first
        if transposed:  # (L, B, ...): the examples first for the formulas
            args = (args[0].transpose(0, 1),)
            moments = None if moments is None else tuple(t.transpose(0, 1) for t in moments)
        batch = _batch_size(args, kwargs)
        if batch is None:
            raise RuntimeError(f"{self._describe(module)} was called without a batched tensor input")
        call = _Call(
            module=module,
            kind=kind,
            args=args,
            kwargs=kwargs,
            batch=batch,
            forward=self._count_call(module),
            bn_stats=_eval_batchnorm_stats(module) if kind == "batchnorm" else None,
            moments=moments,
            transposed=transposed,
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

    def _describe(self, module: nn.Module) -> str:
        return f"module {self._module_names[module]!r} ({type(module).__name__})"

    def _count_call(self, module: nn.Module) -> _Forward:
        if self._forward is None:
            self._forward = _Forward()
        self._forward.calls[module] += 1
        return self._forward

    def _on_fallback_forward(self, module: nn.Module, kind: str, args: tuple, kwargs: dict, output):
        """Hook every output leaf that requires grad; torch.func runs once their gradients are in."""
        leaves, spec = tree_flatten(output)
        hooked = [j for j, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad]
        if not hooked:
            return None
        args, kwargs = tree_map(_detach, args), tree_map(_detach, kwargs)
        if kind == "rnn":
            batch, arg_dims, kwarg_dims, out_dims = self._rnn_dims(module, args, kwargs, hooked)
        else:
            batch = _batch_size(args, kwargs)
            if batch is None:
                raise RuntimeError(f"{self._describe(module)} was called without a batched tensor input")
            dims = lambda tree: tree_map(  # noqa: E731
                lambda t: 0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch else None, tree
            )
            arg_dims, kwarg_dims, out_dims = dims(args), dims(kwargs), {j: 0 for j in hooked}
            for j in hooked:
                if leaves[j].dim() == 0 or leaves[j].shape[0] != batch:
                    raise RuntimeError(
                        f"{self._describe(module)} returned a tensor of shape {tuple(leaves[j].shape)} "
                        f"that requires grad, without the example dimension (dimension 0, size {batch})"
                    )
        call = _Call(module=module, kind=kind, args=args, kwargs=kwargs, batch=batch, forward=self._count_call(module))
        call.arg_dims, call.kwarg_dims, call.out_dims = arg_dims, kwarg_dims, out_dims
        record = _Deferred(call, entries=hooked)
        replaced = False
        for slot, j in enumerate(hooked):
            if leaves[j]._base is not None:  # a hook on a view is dropped if the view is modified in place
                leaves[j], replaced = leaves[j].clone(), True
            leaves[j].register_hook(functools.partial(self._on_deferred_grad, record, slot))
        return tree_unflatten(leaves, spec) if replaced else None

    def _rnn_dims(self, module: nn.RNNBase, args: tuple, kwargs: dict, hooked: list[int]):
        """(batch, arg dims, kwarg dims, output dims) of an RNN/GRU/LSTM call; refuses what cannot be exact."""
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, PackedSequence):
            raise ValueError(
                f"{self._describe(module)}: per-example norms need a padded batch, not a PackedSequence"
            )
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"{self._describe(module)}: per-example norms need a batched (3-d) input")
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise RuntimeError(
                f"{self._describe(module)} applies dropout between its layers in train mode; its per-example "
                "gradients come from re-running it, which would draw other masks (use dropout=0)"
            )
        dim = 0 if module.batch_first else 1
        batch = x.shape[dim]
        # The input has the batch at `dim`; every hidden state (h_0, c_0, h_n, c_n) at 1.
        first = [True]

        def arg_dim(t):
            if not isinstance(t, Tensor):
                return None
            is_input, first[0] = first[0], False
            return dim if is_input else 1

        arg_dims = tree_map(arg_dim, args)
        kwarg_dims = {name: tree_map(lambda t: 1 if isinstance(t, Tensor) else None, v) for name, v in kwargs.items()}
        if "input" in kwargs:
            kwarg_dims["input"] = dim
        out_dims = {j: dim if j == 0 else 1 for j in hooked}
        return batch, arg_dims, kwarg_dims, out_dims

    def _before_attention(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        """Watch the projections inside this call (see _AttentionTap)."""
        if not self._active or not torch.is_grad_enabled():
            return
        call = _Call(module=module, kind="attention", args=(), kwargs={}, batch=0, forward=self._count_call(module))
        tap = _AttentionTap(self, _Deferred(call))
        tap.__enter__()
        self._taps[module].append(tap)

    def _after_attention(self, module: nn.MultiheadAttention, args: tuple, output) -> None:
        if self._taps[module]:  # always_call: also when the forward raised
            self._taps[module].pop().__exit__(None, None, None)

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
        if call.transposed:
            g = g.transpose(0, 1)
        pending = self._pending.setdefault(call.forward, {})
        single_call = call.forward.calls[call.module] == 1
        _, tracked = self._plan[call.module]
        if call.kind == "linear" and single_call and all(self._owners[k] == 1 for k in tracked.values()):
            # The common case, with the bias norm taken from the weight's computation.
            results = _ghost.linear_sq_norms(call.args[0], g, self.method, "bias" in tracked)
            for name, k in tracked.items():
                pending[k] = (*results[name], call.batch)
            return
        self._add_uses(call, self._uses(call, g))

    def _add_uses(self, call: _Call, uses: list[tuple[int, _ghost.Use, str | None]]) -> None:
        """Measure a parameter's only use now; keep uses to be combined for the end of the backward."""
        pending = self._pending.setdefault(call.forward, {})
        single_call = call.forward.calls[call.module] == 1
        for k, use, label in uses:
            if single_call and self._owners[k] == 1:
                sq, name = _ghost.sq_norm(use, self.method)
                pending[k] = (sq, label or name, call.batch)
            else:
                pending.setdefault(k, []).append((use, label, call.batch))

    def _on_deferred_grad(self, record: _Deferred, slot: int, g: Tensor) -> None:
        self._ensure_finalize()
        if record.done:
            raise RuntimeError(
                f"{self._describe(record.call.module)}: a gradient reached it after its per-example norms "
                "were formed (flush() came too early in the backward)"
            )
        if not record.grads:
            self._deferred.append(record)
        record.grads[slot] = g.detach()
        if len(record.grads) == len(record.entries):
            self._complete(record)

    def _complete(self, record: _Deferred) -> None:
        record.done = True
        call = record.call
        _, tracked = self._plan[call.module]
        if call.kind == "attention":
            uses = _attention_uses(call, tracked, record)
        else:
            grads = self._fallback_grads(call, record, list(tracked))
            uses = [(k, grads[name], "func-fallback") for name, k in tracked.items()]
        self._add_uses(call, uses)

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
        return [(k, *found[name]) for name, k in tracked.items() if name in found]

    @contextlib.contextmanager
    def _paused(self):
        active, self._active = self._active, False
        try:
            yield
        finally:
            self._active = active

    def _fallback_grads(self, call: _Call, record: _Deferred, names: list[str]) -> dict[str, Tensor]:
        """Per-example gradients of sum_j <out_j(x_i), g_ij> over the output leaves j, by torch.func.

        ``functional_call`` + ``vmap(grad)``; for RNN/GRU/LSTM, whose fused
        kernels have no vmap rule, ``grad`` one example at a time.
        """
        module, batch = call.module, call.batch
        params = {name: module.get_parameter(name).detach() for name in names}
        leaf_of = {slot: record.entries[slot] for slot in record.grads}
        gs = {slot: g for slot, g in record.grads.items()}
        g_dims = {slot: call.out_dims[leaf_of[slot]] for slot in gs}

        def contribution(p, args, kwargs, gs):  # every batched tensor with an example dimension of size 1
            leaves = tree_flatten(functional_call(module, p, args, kwargs))[0]
            return sum((leaves[leaf_of[slot]] * g).sum() for slot, g in gs.items())

        def one_example(p, args, kwargs, gs):  # under vmap: the example dimensions are gone
            args = tree_map(_unsqueeze_batched, args, call.arg_dims)
            kwargs = tree_map(_unsqueeze_batched, kwargs, call.kwarg_dims)
            return contribution(p, args, kwargs, {slot: g.unsqueeze(g_dims[slot]) for slot, g in gs.items()})

        try:
            with self._paused(), torch.enable_grad():
                if call.kind != "rnn":
                    return vmap(grad(one_example), in_dims=(None, call.arg_dims, call.kwarg_dims, g_dims))(
                        params, call.args, call.kwargs, gs
                    )
                per_example = [
                    grad(contribution)(
                        params,
                        tree_map(functools.partial(_narrow, i), call.args, call.arg_dims),
                        tree_map(functools.partial(_narrow, i), call.kwargs, call.kwarg_dims),
                        {slot: g.narrow(g_dims[slot], i, 1) for slot, g in gs.items()},
                    )
                    for i in range(batch)
                ]
                return {name: torch.stack([grads[name] for grads in per_example]) for name in names}
        except Exception as error:  # name the module: torch.func's messages do not
            raise RuntimeError(
                f"{self._describe(module)}: its per-example gradients by torch.func failed (the fallback "
                f"needs a deterministic module: no dropout in train mode): {error}"
            ) from error

    def _finalize(self) -> None:
        """End of a backward pass: combine each parameter's uses and accumulate."""
        self._queued = False
        deferred, self._deferred = self._deferred, []
        for record in deferred:  # some of their tensors got no gradient: those add 0
            if not record.done:
                self._complete(record)
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
                "(used functionally, e.g. F.linear(x, emb.weight)); "
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


class _AttentionTap(TorchFunctionMode):
    """Sees the projections inside one ``nn.MultiheadAttention`` call.

    ``F.multi_head_attention_forward`` forms q, k, v = x W^T + b from rows of
    ``in_proj_weight`` (or ``q/k/v_proj_weight``) and the output o W_o^T + b_o,
    each with ``F.linear``. A linear map's per-example weight gradient is
    G_i^T X_i, as for a Linear layer, so hooking each ``F.linear`` output
    whose weight is (a block of rows of) a tracked parameter gives exact
    per-example norms, whatever dropout does between the projections.
    ``bias_k``/``bias_v`` reach the keys through ``repeat``, one copy per
    example. ``redispatch_function`` keeps this mode active inside the
    functional (a mode otherwise sees only the functional's own call).
    """

    def __init__(self, norms: PerExampleNorms, record: _Deferred):
        super().__init__()
        self.norms, self.record = norms, record
        module = record.call.module
        _, tracked = norms._plan[module]
        self.params = {name: module.get_parameter(name) for name in tracked}
        self.params = {name: p for name, p in self.params.items() if p.requires_grad}
        self.inside = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and not self.inside:
            query = args[0] if args else kwargs["query"]
            if query.dim() != 3:
                raise ValueError(
                    f"{self.norms._describe(self.record.call.module)}: per-example norms need a batched (3-d) input"
                )
            self.record.call.batch = query.shape[1]  # the functional's layout: (L, B, E)
            self.inside = True
            with self:
                return _REDISPATCH(func, types, args, kwargs)
        out = func(*args, **kwargs)
        if self.inside and isinstance(out, Tensor) and out.requires_grad:
            if func is F.linear:
                self._linear(out, *args, **kwargs)
            elif func is Tensor.repeat and any(args[0] is p for p in self.params.values()):
                self._hook(out, (None, self._block(args[0]), None))
        return out

    def _linear(self, out: Tensor, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> None:
        entry = (input.detach(), self._block(weight), None if bias is None else self._block(bias))
        if entry[1] is not None or entry[2] is not None:
            self._hook(out, entry)

    def _hook(self, out: Tensor, entry: tuple) -> None:
        slot = len(self.record.entries)
        self.record.entries.append(entry)
        out.register_hook(functools.partial(self.norms._on_deferred_grad, self.record, slot))

    def _block(self, t: Tensor) -> tuple[str, int] | None:
        """(name, first row) of the tracked parameter of which ``t`` is a block of whole rows; None if untracked."""
        for name, p in self.params.items():
            if t is p:
                return name, 0
            if t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
                continue
            offset = t.storage_offset() - p.storage_offset()
            if t.shape[1:] == p.shape[1:] and t.stride() == p.stride() and offset % p.stride(0) == 0:
                return name, offset // p.stride(0)
            raise RuntimeError(
                f"{self.norms._describe(self.record.call.module)}: {name} is used in a way the attention "
                "rule does not know (not a block of its rows)"
            )
        return None


def _attention_uses(call: _Call, tracked: dict[str, int], record: _Deferred) -> list:
    """Per-example uses of an attention call's parameters from its projections' inputs and output gradients.

    Projection j uses rows r_j .. r_j + m_j of a weight: its per-example
    gradient is G_ij^T X_ij in those rows. All of a weight's projections are
    one factored gradient L_i^T R_i with L_i the G_ij placed in their rows
    (zeros elsewhere) and stacked along positions, R_i the X_ij stacked
    likewise: exact, with no cross terms to add.
    """
    module, batch = call.module, call.batch
    weights: dict[str, list] = defaultdict(list)
    biases: dict[str, Tensor] = {}
    for slot, g in record.grads.items():
        x, weight, bias = record.entries[slot]
        if x is None:  # bias_k / bias_v repeated to (1, B, E): example i's copy is column i
            name = weight[0]
            biases[name] = g.transpose(0, 1).reshape(batch, *module.get_parameter(name).shape)
            continue
        dtype = _ghost._compute_dtype(x, g)
        g, x = _examples_first(g, batch).to(dtype), _examples_first(x, batch).to(dtype)
        if weight is not None:
            weights[weight[0]].append((g, x, weight[1]))
        if bias is not None:
            name, row = bias
            if name not in biases:
                biases[name] = g.new_zeros(batch, module.get_parameter(name).shape[0])
            biases[name][:, row : row + g.shape[-1]] += g.sum(1)
    uses = []
    for name, parts in weights.items():
        rows = module.get_parameter(name).shape[0]
        left = torch.cat([F.pad(g, (row, rows - row - g.shape[-1])) for g, _, row in parts], 1)
        right = torch.cat([x for _, x, _ in parts], 1)
        uses.append((tracked[name], _ghost.Factored(left=left, right=right, m=rows), None))
    uses += [(tracked[name], value, "direct") for name, value in biases.items()]
    return uses


def _examples_first(t: Tensor, batch: int) -> Tensor:
    """(L, B, n), or (L * B, n) with rows position-major (the output projection's input), to (B, L, n)."""
    if t.dim() == 2:
        t = t.reshape(-1, batch, t.shape[-1])
    return t.transpose(0, 1)


def _sequence_first_layers(model: nn.Module) -> set[nn.Module]:
    """The Linear and LayerNorm children of ``batch_first=False`` transformer layers: their example dimension is 1.

    ``nn.TransformerEncoderLayer``/``DecoderLayer`` (and the final norm of
    ``nn.TransformerEncoder``/``Decoder``) apply them to (L, B, E) tensors.
    """
    found = set()
    for module in model.modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            if not module.self_attn.batch_first:
                found.update(c for n, c in module.named_children() if n.startswith(("linear", "norm")))
        elif isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and module.norm is not None:
            attention = getattr(module.layers[0], "self_attn", None) if len(module.layers) else None
            if isinstance(attention, nn.MultiheadAttention) and not attention.batch_first:
                found.add(module.norm)
    return found


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
    return t if dim is None else t.unsqueeze(dim)


def _narrow(i: int, t, dim):
    """Example ``i`` of a batched tensor, keeping its example dimension."""
    return t if dim is None else t.narrow(dim, i, 1)


def _is_reshape_of_base(view: Tensor) -> bool:
    """True if ``view`` covers all of its contiguous base in the same order."""
    base = view._base
    return (
        view.is_contiguous()
        and base.is_contiguous()
        and view.numel() == base.numel()
        and view.storage_offset() == base.storage_offset()
    )

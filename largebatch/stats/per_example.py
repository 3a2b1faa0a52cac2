"""Per-example, per-layer gradient norms without per-example gradients.

:class:`PerExampleNorms` keeps, for each parameter ``k``, the running sums over
examples ``i`` of ``||grad_k f_i||`` and ``||grad_k f_i||^2``. It never forms the
model's per-example gradients: a forward hook keeps each layer's input, a
tensor hook on the layer's output receives ``dLoss/dOutput``, and the norms
follow from the layer's rule in :mod:`largebatch.stats.layers` and the
factored-gradient norms of :mod:`largebatch.stats._ghost` (Goodfellow 2015,
arXiv 1510.01799; Li et al. 2021, arXiv 2110.05679; Bu et al. 2022,
arXiv 2210.00038). This module owns the hooks and the accumulation; each
layer type's formula lives in its own file of ``layers/``.

Supported layers: ``nn.Linear`` (any number of leading dims), ``nn.Conv1d/2d/3d``
(strides, padding modes, dilation, groups, depthwise), ``nn.Embedding``
(``padding_idx``; not ``scale_grad_by_freq``), ``nn.LayerNorm``, ``nn.GroupNorm``,
``nn.RMSNorm``, BatchNorm (``layers/batchnorm.py``: ``batchnorm="contribution"``
or ``"error"``), ``nn.MultiheadAttention`` (hence
``nn.TransformerEncoderLayer``/``DecoderLayer`` in training,
``layers/attention.py``), ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (padded batches, no
inter-layer dropout in train mode; torch.func one example at a time, so B
small re-runs of the module per backward), and any other module with
parameters of its own through a ``torch.func`` per-module fallback, which may
return a tuple or other container of tensors and must be deterministic (no
dropout in train mode). Subclasses that override ``forward`` use the fallback.
Parameters of any shape, 0-dim ones (a learnable temperature) included.
Dimension 0 of every layer input is the example dimension, except in
``batch_first=False`` attention, recurrent and transformer layers, whose
layouts are known. Errors name the module's path. Linear layers on sequences
may supply their own weight gradient from the per-example gradients
(``layers/linear.py``; ``tapped_calls`` counts them).

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

Strategies. A Linear layer on sequences, a convolution or an attention
projection has more than one exact way to its norms: the Gram ("ghost")
form, per-example gradients by bmm (after unfold for a convolution), or a
convolution's grouped weight-gradient kernel. ``strategy="rule"`` picks per
call by fastDP's 2 T^2 <= p d rule and a documented cost estimate,
``"measure"`` times them once per layer shape, or one is forced
(:mod:`largebatch.stats.strategy`); ``strategies()`` says which each parameter
got and why.

Memory. The per-example work of one layer call runs over blocks of
examples whose intermediates (Gram matrices, unfolded inputs, materialised
per-example gradients) take at most ``block_bytes`` (64 MiB by default; one
example's share if that is larger). Beyond that a call holds only tensors of
the size of its input and output gradient (which autograd holds anyway:
normalised inputs, padded inputs, BatchNorm contributions) and O(B) norms,
so peak memory does not grow with the micro-batch faster than the plain
backward's, up to B = 8192 and beyond (``tests/test_norm_strategies.py``
measures the largest tensor allocated). Not blocked: the torch.func fallback
(its per-example gradients are the module's parameters times B) and the
inner products that combine the uses of a shared parameter.

Scale. Norms are of the gradient of example ``i``'s loss on the scale the loss
was backpropagated, multiplied by the micro-batch size when
``loss_reduction="mean"`` (so a mean loss and a sum loss give the same numbers).
Each forward pass of ``model`` is one micro-batch; run one backward per forward.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _ghost
from .strategy import Choice, Chooser, fixed_choice
from .layers import Call, Deferred, FallbackRule, Forward, Rule, batch_size, rule_class, sequence_first_layers
from .layers.base import describe, is_reshape_of_base

__all__ = ["PerExampleNorms"]

_UNRESOLVED = "gram-or-direct"  # Linear/Conv weights before their first backward


class PerExampleNorms:
    """Sums of per-example per-parameter gradient norms, accumulated over backward passes.

    Args:
        model: the network; hooks are registered on its modules that own
            tracked parameters.
        loss_reduction: ``"mean"`` or ``"sum"``, how the loss reduces over the
            examples of a micro-batch.
        batchnorm: ``"contribution"`` or ``"error"`` (see ``layers/batchnorm.py``).
        fallback: use ``torch.func`` (``functional_call`` + ``vmap(grad)``) for
            modules with parameters of their own and no formula; if ``False``
            such modules raise ``ValueError`` (RNN/GRU/LSTM included). The
            fallback needs a deterministic module; tensor arguments and output
            tensors whose dimension 0 is the batch size are treated as batched.
        params: the parameters to track, in this order; default: the model's
            trainable parameters, deduplicated.
        method: ``"auto"`` (the strategy chooses), ``"gram"`` (the Gram form)
            or ``"direct"`` (per-example gradients, the cheaper form by the
            rule's estimate) for Linear and Conv weights; kept for
            compatibility, ``strategy`` says more.
        strategy: ``"rule"`` (default), ``"measure"``, or a forced
            ``"ghost"``, ``"bmm"`` or ``"conv-backward"`` (module docstring,
            :mod:`largebatch.stats.strategy`).
        block_bytes: bound on the per-example intermediates of one layer
            call held at a time (module docstring, "Memory").

    ``accumulators()`` returns ``(norm_sum [K], sq_norm_sum [K], num_examples)``
    on the parameters' device, without a host synchronisation.
    ``tapped_calls`` counts the Linear calls of the latest backward whose
    weight gradient came from the per-example gradients (``layers/linear.py``).
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
        strategy: str = "rule",
        block_bytes: int = _ghost.BLOCK_BYTES,
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if batchnorm not in ("contribution", "error"):
            raise ValueError(f"batchnorm must be 'contribution' or 'error', got {batchnorm!r}")
        if method not in ("auto", "gram", "direct"):
            raise ValueError(f"method must be 'auto', 'gram' or 'direct', got {method!r}")
        if method != "auto" and strategy != "rule":
            raise ValueError(f"pass method={method!r} or strategy={strategy!r}, not both (strategy supersedes method)")
        allowed = {"gram": ("ghost",), "direct": ("bmm", "conv-backward")}.get(method)
        self._chooser = Chooser(strategy, block_bytes, allowed)
        # The Linear rule's weight-gradient tap reads method: never with the Gram form, always with bmm.
        method = {"ghost": "gram", "bmm": "direct"}.get(strategy, method)
        self.loss_reduction, self.batchnorm, self.method, self.strategy = loss_reduction, batchnorm, method, strategy
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
        self._choices: list[Choice | None] = [None] * len(self.params)
        self._noted: dict[int, list[Choice]] = {}  # this backward's choices, by parameter
        self._owners = [0] * len(self.params)
        self._rules: dict[type[Rule], Rule] = {}  # one object per rule class, for this engine
        self._plan: dict[nn.Module, tuple[Rule, dict[str, int]]] = {}
        self._handles = []
        self._active = True
        self._forward: Forward | None = None
        self._pending: dict[Forward, dict[int, list]] = {}
        self._seen: set[int] = set()
        self._queued = False
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self._suspended: set[nn.Module] = set()  # Linear layers running with their weight's requires_grad off
        self._tapped_now = 0
        self.tapped_calls = 0
        self._deferred: list[Deferred] = []  # those that received a gradient in this backward
        self.module_names: dict[nn.Module, str] = {}
        self._plan_modules(model)
        self._register(model)

    # ------------------------------------------------------------ set-up

    def _rule(self, cls: type[Rule]) -> Rule:
        if cls not in self._rules:
            self._rules[cls] = cls(self)
        return self._rules[cls]

    def _plan_modules(self, model: nn.Module) -> None:
        """Give each module that owns tracked parameters its rule; refuse what cannot be measured."""
        self._sequence_first = sequence_first_layers(model)
        # Modules whose parameters another module uses functionally are planned with it.
        absorbed = {sub for module in model.modules() for sub in self._rule(rule_class(module)[1]).absorbs(module)}
        for module_name, module in model.named_modules():
            family, cls = rule_class(module)
            if family is not None:
                self._rule(family).check(module, module_name)
            if module in absorbed:
                continue
            _refuse_tracked_parametrization(module, module_name, self._index)
            rule = self._rule(cls)
            tracked = {n: self._index[id(p)] for n, p in rule.members(module) if id(p) in self._index}
            if not tracked:
                continue
            if rule.params is not None and not set(tracked) <= rule.params:
                rule = self._rule(FallbackRule)  # parameters of its own beside the formula's
            label = module_name or type(module).__name__
            self.module_names[module] = label
            if rule.refuses(module):
                raise ValueError(
                    f"module {label!r} ({type(module).__name__}) is not supported: no per-example "
                    "gradient exists for it (SyncBatchNorm couples examples across workers; "
                    "Embedding(scale_grad_by_freq=True) scales by counts over the whole batch)"
                )
            if not rule.formula and not self.fallback:
                raise ValueError(
                    f"module {label!r} ({type(module).__name__}) has no per-example norm formula "
                    "and fallback=False; pass fallback=True to use torch.func for it"
                )
            self._plan[module] = (rule, tracked)
            for pname, k in tracked.items():
                self._owners[k] += 1
                self._labels[k] = rule.label(pname) or self._labels[k]
        for k, owners in enumerate(self._owners):
            if owners == 0:
                raise ValueError(f"parameter {self._names[k]!r} is owned by no module of the model")

    def _register(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward))
        for module, (rule, tracked) in self._plan.items():
            self._handles += rule.register(module, tracked)
        for name, module in model.named_modules():
            family, _ = rule_class(module)
            if family is not None:
                self._handles += self._rule(family).watch(module, name)
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
        self._noted = {}
        self._forward = None
        self._tapped_now = 0
        for rule in self._rules.values():
            rule.reset()

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

    def strategies(self) -> dict[str, Choice]:
        """Parameter name -> the strategy of its norms in the latest backward, and why (a ``Choice``).

        Factored weights (Linear on sequences, convolutions, attention) get
        ``"ghost"``, ``"bmm"`` or ``"conv-backward"`` with the rule's numbers
        or the measured times (:mod:`largebatch.stats.strategy`); the rest say
        what their one formula is (``"outer"``, ``"segment-sum"``,
        ``"dense"``, ``"torch.func"``). Uses combined exactly are joined with
        "+". Parameters no backward has reached yet are absent.
        """
        return {name: choice for name, choice in zip(self._names, self._choices) if choice is not None}

    def _note(self, k: int, choice: Choice) -> None:
        self._noted.setdefault(k, []).append(choice)

    def _sq_norm(self, k: int, use: _ghost.Use) -> tuple[Tensor, str]:
        """A use's squared norms by the strategy the chooser picks for it, the choice noted for ``k``."""

        def choose(factored: _ghost.Factored) -> str:
            choice = self._chooser.choose(factored)
            self._note(k, choice)
            return choice.strategy

        return _ghost.sq_norm(use, choose, self._chooser.block_bytes)

    def _record_choice(self, k: int, label: str) -> None:
        """The choice of the latest backward for ``k``: the chooser's for factored uses, else what the label says."""
        noted = self._noted.pop(k, [])
        parts = [noted.pop(0) if part in ("gram", "direct") and noted else fixed_choice(part) for part in label.split("+")]
        self._choices[k] = parts[0] if len(parts) == 1 else Choice(
            "+".join(c.strategy for c in parts), "; ".join(c.reason for c in parts)
        )

    # ------------------------------------------------------------ forward side

    def _on_model_forward(self, module, args) -> None:
        if self._active:  # not while the fallback re-runs a module inside backward
            self._forward = Forward()

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output, tapped: bool = False):
        """Keep what the module's rule needs and hook its output; ``tapped``: see ``layers/linear.py``."""
        if not tapped and (not self._active or not torch.is_grad_enabled()):
            return None
        rule, _ = self._plan[module]
        if rule.deferred:
            return rule.on_forward(module, args, kwargs, output)
        if not isinstance(output, Tensor):  # (not from the modules with formulas)
            raise TypeError(f"{describe(self.module_names, module)} returned {type(output).__name__}, not a tensor")
        if not output.requires_grad and not tapped:  # (a tapped output requires grad once tapped)
            return None
        layer_input = args[0] if args else None
        args = (args[0].detach(),) if args else ()  # the formulas read only the first input
        transposed = module in self._sequence_first
        context = rule.capture(module, args[0], output, transposed) if args else None
        if transposed:  # (L, B, ...): the examples first for the formulas
            args = (args[0].transpose(0, 1),)
        batch = batch_size(args, {})
        if batch is None:
            raise RuntimeError(f"{describe(self.module_names, module)} was called without a batched tensor input")
        call = Call(
            module=module,
            rule=rule,
            args=args,
            kwargs={},
            batch=batch,
            forward=self._count_call(module),
            context=context,
            transposed=transposed,
        )
        if tapped:
            return rule.tap(call, layer_input, output)
        target, replacement = output, None
        if output._base is not None:
            # A hook on a view is dropped if the view is later modified in place.
            if rule.flat_output and is_reshape_of_base(output):
                target, call.grad_shape = output._base, output.shape
            else:
                target = replacement = output.clone()
        target.register_hook(functools.partial(self._on_output_grad, call))
        return replacement

    def _count_call(self, module: nn.Module) -> Forward:
        if self._forward is None:
            self._forward = Forward()
        self._forward.calls[module] += 1
        return self._forward

    # ------------------------------------------------------------ backward side

    def _ensure_finalize(self) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)

    def _on_param_grad(self, k: int, _grad: Tensor) -> None:
        self._ensure_finalize()
        self._seen.add(k)

    def _on_output_grad(self, call: Call, g: Tensor) -> None:
        self._ensure_finalize()
        g = g.detach()
        if call.grad_shape is not None:
            g = g.reshape(call.grad_shape)
        if call.transposed:
            g = g.transpose(0, 1)
        rule, tracked = self._plan[call.module]
        if call.forward.calls[call.module] == 1 and all(self._owners[k] == 1 for k in tracked.values()):
            results = rule.sq_norms(call, g, tracked)
            if results is not None:
                pending = self._pending.setdefault(call.forward, {})
                for name, k in tracked.items():
                    pending[k] = (*results[name], call.batch)
                return
        x = call.args[0] if call.args else None
        found = rule.uses(call, x, g, tracked)
        self._add_uses(call, [(k, *found[name]) for name, k in tracked.items() if name in found])

    def _add_uses(self, call: Call, uses: list[tuple[int, _ghost.Use, str | None]]) -> None:
        """Measure a parameter's only use now; keep uses to be combined for the end of the backward."""
        pending = self._pending.setdefault(call.forward, {})
        single_call = call.forward.calls[call.module] == 1
        for k, use, label in uses:
            if single_call and self._owners[k] == 1:
                sq, name = self._sq_norm(k, use)
                pending[k] = (sq, label or name, call.batch)
            else:
                pending.setdefault(k, []).append((use, label, call.batch))

    def _on_deferred_grad(self, record: Deferred, slot: int, g: Tensor) -> None:
        self._ensure_finalize()
        if record.done:
            raise RuntimeError(
                f"{describe(self.module_names, record.call.module)}: a gradient reached it after its per-example norms "
                "were formed (flush() came too early in the backward)"
            )
        if not record.grads:
            self._deferred.append(record)
        record.grads[slot] = g.detach()
        if len(record.grads) == len(record.entries):
            self._complete(record)

    def _complete(self, record: Deferred) -> None:
        record.done = True
        rule, tracked = self._plan[record.call.module]
        self._add_uses(record.call, rule.complete(record, tracked))

    @contextlib.contextmanager
    def _paused(self):
        """No hook of this object records anything inside (a rule re-running a module)."""
        active, self._active = self._active, False
        try:
            yield
        finally:
            self._active = active

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
                        [use for use, _, _ in entry], functools.partial(self._sq_norm, k), [lab for _, lab, _ in entry]
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
                self._record_choice(k, label)
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


def _refuse_tracked_parametrization(module: nn.Module, module_name: str, index: dict[int, int]) -> None:
    """Refuse a tracked parameter behind ``torch.nn.utils.parametrize`` (weight_norm, spectral_norm, ...).

    The layer's formula gives the per-example gradient of the computed
    weight, not of the parametrization's original tensors; spectral_norm
    would also advance its power iteration if its weight were recomputed.
    """
    if not parametrize.is_parametrized(module):
        return
    for tensor_name, plist in module.parametrizations.items():
        originals = [n for n, p in plist.named_parameters(recurse=False) if id(p) in index]
        if originals:
            kinds = ", ".join(type(f).__name__ for f in plist)
            label = module_name or type(module).__name__
            raise ValueError(
                f"module {label!r} ({type(module).__name__}): its {tensor_name!r} is computed by a "
                f"parametrization ({kinds}: weight_norm, spectral_norm, ...), which per-example norms do not "
                f"support; remove it (torch.nn.utils.parametrize.remove_parametrizations) or leave "
                f"{', '.join(f'parametrizations.{tensor_name}.{n}' for n in originals)} untracked (params=)"
            )

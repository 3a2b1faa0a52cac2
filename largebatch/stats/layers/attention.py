"""``nn.MultiheadAttention`` (hence ``nn.TransformerEncoderLayer``/``DecoderLayer``): the Linear rule per projection.

``nn.MultiheadAttention`` computes its projections with ``F.linear``
inside ``F.multi_head_attention_forward``; a ``TorchFunctionMode`` active
during the call hooks each projection's output, and each projection gets the
Linear layer's rule (rows of ``in_proj_weight`` used by the q, k, v projections
form one factored gradient). Exact with attention dropout, masks, ``kdim``/``vdim``
and ``add_bias_kv``; needs ``torch.overrides.redispatch_function``.

The Linear and LayerNorm children of ``batch_first=False`` transformer layers
see (L, B, E) tensors: the engine transposes them for their rules
(``sequence_first_layers``).
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import _ghost
from .base import Call, Deferred, Rule, describe

__all__ = ["AttentionRule", "sequence_first_layers"]

# Runs a __torch_function__ implementation with the mode still seeing the ops inside it.
_REDISPATCH = getattr(torch.overrides, "redispatch_function", None)


class AttentionRule(Rule):
    params = None
    deferred = True

    def members(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        # out_proj's parameters are used functionally inside the call: they are planned with it.
        own = list(module.named_parameters(recurse=False))
        return own + list(module.out_proj.named_parameters(prefix="out_proj", recurse=False))

    def absorbs(self, module: nn.Module) -> list[nn.Module]:
        return [module.out_proj]

    def check(self, module: nn.Module, name: str) -> None:
        if _REDISPATCH is None and any(id(p) in self.norms._index for _, p in self.members(module)):
            raise ValueError(
                f"module {name or type(module).__name__!r} (MultiheadAttention): its per-example norms need "
                "torch.overrides.redispatch_function, which this PyTorch lacks; upgrade PyTorch"
            )

    def label(self, name: str) -> str | None:
        return None if name.endswith("weight") else "direct"

    def register(self, module: nn.Module, tracked: dict[str, int]) -> list:
        return [_EagerForward(self, module)]

    def watched(self, module: nn.MultiheadAttention, forward, args: tuple, kwargs: dict):
        """One call of ``module`` with its projections watched (see _AttentionTap)."""
        norms = self.norms
        if not norms._active or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        call = Call(module=module, rule=self, args=(), kwargs={}, batch=0, forward=norms._count_call(module))
        with _AttentionTap(norms, Deferred(call)):
            return forward(*args, **kwargs)

    def complete(self, record: Deferred, tracked: dict[str, int]):
        return _attention_uses(record.call, tracked, record)


class _EagerForward:
    """Set as the module's ``forward``: runs the call, and the rule's watch over it, outside ``torch.compile``.

    The projections are found by a ``TorchFunctionMode`` while
    ``F.multi_head_attention_forward`` runs; traced by Dynamo, they would be
    compiled into a graph the mode never sees. ``torch.compiler.disable``
    makes Dynamo break its graph around the attention call and run it
    eagerly; the rest of the model compiles as usual. Eagerly this is the
    plain call. An object, not a closure, so that ``copy.deepcopy`` of the
    model binds the copy's forward to the copied module, as it does hooks.
    """

    def __init__(self, rule: AttentionRule, module: nn.Module) -> None:
        self.rule, self.module, self.active = rule, module, True
        self.previous = module.__dict__.get("forward")  # another override (a second engine), or None
        module.forward = self

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        module = self.module
        forward = self.previous or type(module).forward.__get__(module)
        if not self.active:
            return forward(*args, **kwargs)
        return self.rule.watched(module, forward, args, kwargs)

    def remove(self) -> None:
        """Give the module its forward back (or, if something wrapped this one since, pass calls through)."""
        self.active = False
        if self.module.__dict__.get("forward") is self:
            if self.previous is None:
                del self.module.forward
            else:
                self.module.forward = self.previous


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

    def __init__(self, norms, record: Deferred):
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
                    f"{describe(self.norms.module_names, self.record.call.module)}: per-example norms need a batched (3-d) input"
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
                f"{describe(self.norms.module_names, self.record.call.module)}: {name} is used in a way the attention "
                "rule does not know (not a block of its rows)"
            )
        return None


def _attention_uses(call: Call, tracked: dict[str, int], record: Deferred) -> list:
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
        dtype = _ghost.compute_dtype(x, g)
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


def sequence_first_layers(model: nn.Module) -> set[nn.Module]:
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

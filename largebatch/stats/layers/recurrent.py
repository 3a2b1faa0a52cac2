"""``nn.RNN``, ``nn.GRU``, ``nn.LSTM``: the torch.func fallback, one example at a time.

The fused recurrent kernels have no vmap rule, so each example's gradient is
``grad`` of the module re-run on that example alone: B small re-runs per
backward. Padded batches only (not ``PackedSequence``), ``batch_first``
either way, and no inter-layer dropout in train mode (a re-run would draw
other masks).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.func import grad
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_map

from .base import Deferred, describe
from .fallback import FallbackRule

__all__ = ["RecurrentRule"]


class RecurrentRule(FallbackRule):
    def dims(self, module: nn.RNNBase, args: tuple, kwargs: dict, leaves: list, hooked: list[int]):
        """The input has the examples at 0 (``batch_first``) or 1; every hidden state (h_0, c_0, h_n, c_n) at 1."""
        name = describe(self.norms.module_names, module)
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, PackedSequence):
            raise ValueError(f"{name}: per-example norms need a padded batch, not a PackedSequence")
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"{name}: per-example norms need a batched (3-d) input")
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise RuntimeError(
                f"{name} applies dropout between its layers in train mode; its per-example "
                "gradients come from re-running it, which would draw other masks (use dropout=0)"
            )
        dim = 0 if module.batch_first else 1
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
        return x.shape[dim], arg_dims, kwarg_dims, out_dims

    def per_example_grads(self, record: Deferred, names: list[str]) -> dict[str, Tensor]:
        call = record.call
        arg_dims, kwarg_dims, _ = call.context
        params, contribution, gs, g_dims = self._contribution(record, names)
        per_example = [
            grad(contribution)(
                params,
                tree_map(functools.partial(_narrow, i), call.args, arg_dims),
                tree_map(functools.partial(_narrow, i), call.kwargs, kwarg_dims),
                {slot: g.narrow(g_dims[slot], i, 1) for slot, g in gs.items()},
            )
            for i in range(call.batch)
        ]
        return {name: torch.stack([grads[name] for grads in per_example]) for name in names}


def _narrow(i: int, t, dim):
    """Example ``i`` of a batched tensor, keeping its example dimension."""
    return t if dim is None else t.narrow(dim, i, 1)

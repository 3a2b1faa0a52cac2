"""Any other module with parameters of its own: per-example gradients by ``torch.func``.

The module's output leaves that require grad are hooked; once their
gradients ``g_ij`` are in, ``functional_call`` + ``vmap(grad)`` gives each
example's gradient of ``sum_j <out_j(x_i), g_ij>``, which is its gradient of
the loss through this module. The module may return a tuple or another
container of tensors and must be deterministic (no dropout in train mode):
it is run again. Tensor arguments and output tensors whose dimension 0 is
the batch size are treated as batched. Subclasses of the layers with rules
that override ``forward`` come here too.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .base import Call, Deferred, Rule, describe

__all__ = ["FallbackRule", "batch_size"]


class FallbackRule(Rule):
    params = None
    formula = False
    deferred = True

    def label(self, name: str) -> str | None:
        return "func-fallback"

    def dims(self, module: nn.Module, args: tuple, kwargs: dict, leaves: list, hooked: list[int]):
        """(batch, arg dims, kwarg dims, output dims): the example dimension of each tensor (None: not batched)."""
        batch = batch_size(args, kwargs)
        if batch is None:
            raise RuntimeError(f"{describe(self.norms.module_names, module)} was called without a batched tensor input")
        dims = lambda tree: tree_map(  # noqa: E731
            lambda t: 0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch else None, tree
        )
        for j in hooked:
            if leaves[j].dim() == 0 or leaves[j].shape[0] != batch:
                raise RuntimeError(
                    f"{describe(self.norms.module_names, module)} returned a tensor of shape {tuple(leaves[j].shape)} "
                    f"that requires grad, without the example dimension (dimension 0, size {batch})"
                )
        return batch, dims(args), dims(kwargs), {j: 0 for j in hooked}

    def on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output):
        """Hook every output leaf that requires grad; torch.func runs once their gradients are in."""
        norms = self.norms
        leaves, spec = tree_flatten(output)
        hooked = [j for j, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad]
        if not hooked:
            return None
        args, kwargs = tree_map(_detach, args), tree_map(_detach, kwargs)
        batch, arg_dims, kwarg_dims, out_dims = self.dims(module, args, kwargs, leaves, hooked)
        call = Call(module=module, rule=self, args=args, kwargs=kwargs, batch=batch, forward=norms._count_call(module))
        call.context = (arg_dims, kwarg_dims, out_dims)
        record = Deferred(call, entries=hooked)
        replaced = False
        for slot, j in enumerate(hooked):
            if leaves[j]._base is not None:  # a hook on a view is dropped if the view is modified in place
                leaves[j], replaced = leaves[j].clone(), True
            leaves[j].register_hook(functools.partial(norms._on_deferred_grad, record, slot))
        return tree_unflatten(leaves, spec) if replaced else None

    def complete(self, record: Deferred, tracked: dict[str, int]):
        try:
            with self.norms._paused(), torch.enable_grad():
                grads = self.per_example_grads(record, list(tracked))
        except Exception as error:  # name the module: torch.func's messages do not
            raise RuntimeError(
                f"{describe(self.norms.module_names, record.call.module)}: its per-example gradients by torch.func failed (the "
                f"fallback needs a deterministic module: no dropout in train mode): {error}"
            ) from error
        return [(k, grads[name], "func-fallback") for name, k in tracked.items()]

    def per_example_grads(self, record: Deferred, names: list[str]) -> dict[str, Tensor]:
        """Per-example gradients of sum_j <out_j(x_i), g_ij> over the output leaves j: ``vmap(grad)``."""
        call = record.call
        arg_dims, kwarg_dims, _ = call.context
        params, contribution, gs, g_dims = self._contribution(record, names)

        def one_example(p, args, kwargs, gs):  # under vmap: the example dimensions are gone
            args = tree_map(_unsqueeze_batched, args, arg_dims)
            kwargs = tree_map(_unsqueeze_batched, kwargs, kwarg_dims)
            return contribution(p, args, kwargs, {slot: g.unsqueeze(g_dims[slot]) for slot, g in gs.items()})

        return vmap(grad(one_example), in_dims=(None, arg_dims, kwarg_dims, g_dims))(
            params, call.args, call.kwargs, gs
        )

    def _contribution(self, record: Deferred, names: list[str]):
        """(parameters, f(p, args, kwargs, gs) = sum_j <out_j, g_j>, the gradients, their example dimensions)."""
        module = record.call.module
        _, _, out_dims = record.call.context
        params = {name: module.get_parameter(name).detach() for name in names}
        leaf_of = {slot: record.entries[slot] for slot in record.grads}
        gs = dict(record.grads)
        g_dims = {slot: out_dims[leaf_of[slot]] for slot in gs}

        def contribution(p, args, kwargs, gs):  # every batched tensor with an example dimension of size 1
            leaves = tree_flatten(functional_call(module, p, args, kwargs))[0]
            return sum((leaves[leaf_of[slot]] * g).sum() for slot, g in gs.items())

        return params, contribution, gs, g_dims


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The leading dimension of the first tensor argument with one (None if there is none)."""
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

"""Per-layer norms of parameters that may be sharded (FSDP2 / DTensor).

A layer-wise optimiser needs ||w_k|| (and sometimes ||g_k||) of the *whole*
tensor. Under FSDP2 (``torch.distributed.fsdp.fully_shard``) each rank holds a
DTensor shard: ``vector_norm`` of the local shard is a partial norm, and
``full_tensor()`` would cost one collective (and a full copy) per parameter.
``layer_sq_norms`` instead takes the local sum of squares of every tensor,
stacks them and does ONE all-reduce per call over the shard dimensions of the
mesh, which gives the full-tensor squared norms exactly (up to summation order).

Flat-parameter layouts (FSDP1 ``FlatParameter``, FSDP1 with
``use_orig_params=True`` whose parameters are 1-D views into flat shards,
DeepSpeed ZeRO partitions) do not keep one tensor per layer on any rank, so
per-layer ratios computed from them are silently wrong; they are refused.

For elementwise work (momentum, weight decay, the update itself) an optimiser
can act on ``local(t)``, the rank's shard, which aliases the DTensor's storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

import torch
from torch import Tensor

try:  # DTensor is public from torch 2.4 on; keep the import soft for minimal builds
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = ["any_sharded", "as_sharded_like", "check_not_flat", "is_sharded", "layer_sq_norms", "local", "local_list"]


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor | None) -> Tensor | None:
    """The rank's local shard of a DTensor (aliases its storage); other tensors unchanged."""
    if t is not None and is_sharded(t):
        return t.to_local()
    return t


def local_list(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``[local(t) for t in tensors]``, with the test for DTensors done at C speed (a new list)."""
    if DTensor is None or not any(map(isinstance, tensors, repeat(DTensor))):
        return list(tensors)
    return [local(t) for t in tensors]


def any_sharded(tensors: Sequence[Tensor]) -> bool:
    """Whether any tensor is an FSDP2 DTensor shard."""
    return any(map(is_sharded, tensors))


def as_sharded_like(t: Tensor, like: Tensor) -> Tensor:
    """A local shard as a DTensor laid out like ``like`` (new optimiser state under FSDP2)."""
    if not is_sharded(like) or is_sharded(t):
        return t
    return DTensor.from_local(
        t, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def check_not_flat(tensors: Sequence[Tensor]) -> None:
    """Raise if any tensor belongs to a flat-parameter layout (FSDP1, ZeRO)."""
    for t in tensors:
        if getattr(t, "_is_flat_param", False) or type(t).__name__ == "FlatParameter":
            raise ValueError(
                "flat parameters (FSDP1 FlatParameter, use_orig_params=False) mix several layers in "
                "one tensor, so per-layer norms cannot be computed from them; shard the model with "
                "torch.distributed.fsdp.fully_shard (FSDP2) instead"
            )
        if getattr(t, "_fsdp_flattened", False):
            raise ValueError(
                "this parameter is a view into an FSDP1 flat shard (use_orig_params=True): its local "
                "values are a 1-D slice of a flat buffer, not a shard with a known layout; use "
                "torch.distributed.fsdp.fully_shard (FSDP2) instead"
            )
        if hasattr(t, "ds_id") or hasattr(t, "ds_tensor"):
            raise ValueError(
                "DeepSpeed ZeRO partitions flatten parameters; per-layer norms would be wrong. "
                "Use ZeRO stage 0 or FSDP2 (fully_shard)"
            )


def _shard_reduce_groups(t: Tensor):
    """Process groups over which the local sums of squares of ``t`` must be added."""
    mesh = t.device_mesh
    groups = []
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard):
            groups.append(mesh.get_group(dim))
        elif not isinstance(placement, Replicate):
            raise ValueError(f"unsupported DTensor placement {placement!r} for a parameter norm")
    return tuple(groups)


def layer_sq_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Squared Frobenius norms of full tensors, shape [len(tensors)], float32 or wider.

    Plain tensors: ``torch._foreach_norm`` (no host sync). DTensors: local sums of
    squares, stacked, then one all-reduce per distinct set of shard groups (one
    in the usual case of a single FSDP2 mesh). Every rank must call this with
    the same list, as with any collective.
    """
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0)
    check_not_flat(tensors)
    locals_ = [local(t) for t in tensors]
    # _foreach_norm keeps everything on device and is one kernel per dtype group;
    # squaring after the norm is exact enough and avoids materialising t*t.
    norms = torch._foreach_norm(locals_)
    wide = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    sq = torch.stack([n.to(wide) for n in norms]).pow(2)
    sharded = [i for i, t in enumerate(tensors) if is_sharded(t)]
    if not sharded:
        return sq
    import torch.distributed as dist

    by_groups: dict[tuple, list[int]] = {}
    for i in sharded:
        by_groups.setdefault(_shard_reduce_groups(tensors[i]), []).append(i)
    for groups, idx in by_groups.items():
        if not groups:  # fully replicated: local is already the full tensor
            continue
        index = torch.tensor(idx, device=sq.device)
        part = sq.index_select(0, index)
        for group in groups:  # one per shard dimension of the mesh (one for FSDP2, HSDP too)
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        sq = sq.index_copy(0, index, part)
    return sq

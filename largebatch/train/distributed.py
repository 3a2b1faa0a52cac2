"""Data-parallel context: one process, or one of the ranks started by torchrun.

torchrun (or any launcher) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
then the process group is initialised with NCCL on GPUs and gloo on CPUs. A
process group that is already initialised (e.g. by a test harness) is used
as it is.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "LARGEBATCH_DIST_TIMEOUT"


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """The world size a launcher asked for (1 when not launched by one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup() -> Context:
    """Join the process group the environment describes, or run as a single process."""
    use_cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return Context(rank, world, local_rank, _device(use_cuda, local_rank), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(device=_device(use_cuda, 0))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:
        # Share the cores between the ranks on this machine instead of oversubscribing.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=_timeout())
    return Context(rank, world, local_rank, _device(use_cuda, local_rank), owns_group=True)


def _timeout() -> timedelta | None:
    """``LARGEBATCH_DIST_TIMEOUT`` seconds for connecting and collectives (default: torch's).

    After a torchrun restart the new gloo group has been seen to hang while
    connecting on a loaded machine; a finite timeout turns that into a failure
    the next restart recovers from.
    """
    seconds = os.environ.get(TIMEOUT_ENV)
    return timedelta(seconds=float(seconds)) if seconds else None


def teardown(context: Context) -> None:
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _device(use_cuda: bool, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def rank_slice(indices: torch.Tensor, context: Context) -> torch.Tensor:
    """This rank's disjoint, contiguous share of a global batch.

    Rank r takes the r-th of ``world_size`` equal parts, so the ranks' micro-
    batches are, in rank order, the single-process run's micro-batches.
    """
    share = len(indices) // context.world_size
    return indices[context.rank * share : (context.rank + 1) * share]


def mean_over_ranks(value: torch.Tensor, context: Context) -> torch.Tensor:
    if context.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= context.world_size
    return value


def gather_objects(obj, context: Context) -> list:
    """Every rank's ``obj``, in rank order (a list of one in a single process)."""
    if not context.distributed:
        return [obj]
    out = [None] * context.world_size
    dist.all_gather_object(out, obj)
    return out


def no_sync(model: torch.nn.Module):
    """DDP's ``no_sync`` for a wrapped model, else a context that does nothing."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

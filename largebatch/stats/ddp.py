"""How the statistics engine rides along DistributedDataParallel without a comm hook.

DDP reduces gradients with its built-in C++ all-reduce, or with the user's
comm hook; the engine registers none, so both run untouched and no Python
runs on the communication threads. (On a 2-core CPU a Python hook that only
all-reduces cost 5% of a small MLP's 2-process gloo step, the statistics'
own all-reduce 9%; benchmarks/README.md.) Instead:

* each worker's local gradient is read where autograd leaves it: per
  micro-batch by a tensor hook, or (``sample="worker"``) the accumulated one by
  a post-accumulate-grad hook, which runs before DDP's reducer hook on the
  same ``AccumulateGrad`` node copies the gradient into its bucket;
* the step's statistics, one small vector, are summed over the workers by one
  all-reduce (:func:`all_reduce_sum`) issued at the end of the synchronised
  backward (:func:`may_launch_before_finalize`), while DDP's last buckets are
  still in flight; the engine waits for it in ``summary()``.

Per-worker sampling follows the shared statistics reference (stats.md,
"Per-worker statistics under DDP"); the single fused reduction replaces the
one-collective-per-tensor scheme of the LENA authors' code.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

__all__ = ["all_reduce_sum", "forward_synchronises", "may_launch_before_finalize"]


def all_reduce_sum(process_group: dist.ProcessGroup, tensor: Tensor) -> torch.futures.Future:
    """Sum ``tensor`` over the group in place, asynchronously.

    Issued on the process group directly: ``dist.all_reduce``'s Python checks
    cost about 35 us a call, as much as a small model's norms.
    """
    return process_group.allreduce([tensor], _sum_options()).get_future()


@functools.cache
def _sum_options() -> dist.AllreduceOptions:
    options = dist.AllreduceOptions()
    options.reduceOp = dist.ReduceOp.SUM
    return options


def forward_synchronises(ddp: DistributedDataParallel) -> bool:
    """Whether the backward of a forward running now averages the gradients.

    DDP decides in its forward, with this same test (``_pre_forward``): a forward
    under ``no_sync()`` leaves its backward local, wherever that backward runs.
    """
    return torch.is_grad_enabled() and ddp.require_backward_grad_sync


def may_launch_before_finalize(ddp: DistributedDataParallel, group: dist.ProcessGroup) -> bool:
    """Whether the statistics may be all-reduced at the end of the backward's graph.

    Then every gradient collective of the backward has been issued on every
    rank: DDP launches its last bucket before queueing its finalize callback,
    which runs after the engine's. On DDP's own group the statistics
    therefore follow the same collectives in the same order on every rank,
    overlapping the last buckets' reduction. Not so when a Python comm hook
    may issue collectives from its futures' callbacks (PowerSGD), or when DDP
    reduces outside its reducer: then the engine waits for DDP's finalize,
    which waits for all of them.
    """
    if group is not ddp.process_group:
        return True
    if getattr(ddp, "_delay_all_reduce_all_params", False) or getattr(ddp, "_use_python_reducer", False):
        return False
    return not getattr(ddp, "_comm_hooks", True)

"""DDP communication hooks that measure each worker's local gradient.

Before a bucket is reduced, the 2-norms of ``bucket.gradients()`` (each
worker's *local* gradient, not yet divided by the world size) are taken and
keyed by parameter identity, because DDP rebuilds its buckets after the first
step (bucket indices are not stable). Then the statistics of the step, one
small vector, are summed over the workers:

* with DDP's default reduction (:func:`mean_allreduce_with_statistics`), in
  the last bucket's own all-reduce: the vector is appended to the bucket, so
  a step costs no extra collective (a separate all-reduce of a few floats
  takes about 0.4 ms between two gloo processes on a 2-core CPU, 3-4% of a
  small MLP's step);
* with the user's hook (fp16 compression, PowerSGD, ...;
  :func:`statistics_comm_hook`), the bucket is reduced by that hook,
  unchanged, and the engine issues one small all-reduce after DDP has
  finished the backward: all gradient collectives are issued by then on every
  rank in the same order, even when the hook issues collectives from its own
  callbacks, as PowerSGD does.

Per-worker sampling follows the shared statistics reference (stats.md,
"Per-worker statistics under DDP"); the single fused reduction replaces the
one-collective-per-tensor scheme of the LENA authors' code.
"""

# No "from __future__ import annotations": DDP compares the hook's annotations
# with dist.GradBucket and Future[Tensor] at registration.
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum", "mean_allreduce_with_statistics", "statistics_comm_hook"]

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future]


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


def statistics_comm_hook(
    inner_hook: CommHook,
    inner_state: Any,
    *,
    before_reduce: Callable[[dist.GradBucket], None] | None,
    after_last_bucket: Callable[[], None],
    is_active: Callable[[], bool],
) -> CommHook:
    """Wrap ``inner_hook`` so that statistics are taken alongside it.

    ``before_reduce(bucket)``, if given, runs before the wrapped hook may
    modify the bucket in place; ``after_last_bucket()`` runs after the last bucket's
    reduction was launched. When ``is_active()`` is false the hook only
    forwards to ``inner_hook`` (DDP has no way to unregister a comm hook).
    """

    def largebatch_statistics_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if not is_active():
            return inner_hook(inner_state, bucket)
        if before_reduce is not None:
            before_reduce(bucket)
        reduced = inner_hook(inner_state, bucket)
        if bucket.is_last():
            after_last_bucket()
        return reduced

    return largebatch_statistics_hook


def mean_allreduce_with_statistics(
    process_group: dist.ProcessGroup,
    *,
    before_reduce: Callable[[dist.GradBucket], None] | None,
    last_bucket_statistics: Callable[[], Tensor],
    deliver: Callable[[Tensor, torch.futures.Future], None],
    is_active: Callable[[], bool],
) -> CommHook:
    """DDP's default reduction (the mean over workers), the statistics riding on its last bucket.

    ``last_bucket_statistics()`` returns the vector to sum over the workers
    (left unchanged); ``deliver(reduced, future)`` receives the tensor that
    will hold the sums and the collective's future. A vector of another dtype
    than the bucket (float64 statistics, a float32 bucket) gets its own
    all-reduce instead. ``before_reduce`` may be None (nothing to measure per
    bucket).
    """
    world = process_group.size()

    def largebatch_mean_allreduce_with_statistics(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        active = is_active()
        if active and before_reduce is not None:
            before_reduce(bucket)
        if active and bucket.is_last():
            statistics = last_bucket_statistics()
            if statistics.dtype == buffer.dtype:
                n = buffer.numel()
                combined = buffer.new_empty(n + statistics.numel())
                torch.div(buffer, world, out=combined[:n])
                combined[n:].copy_(statistics)
                reduced = all_reduce_sum(process_group, combined)
                deliver(combined[n:], reduced)
                # DDP copies a result that is not the bucket's buffer into the gradients.
                return reduced.then(lambda fut: fut.value()[0][:n])
            statistics = statistics.clone()  # reduced in place; the caller's vector stays local
            deliver(statistics, all_reduce_sum(process_group, statistics))
        buffer.div_(world)
        return all_reduce_sum(process_group, buffer).then(_first)

    return largebatch_mean_allreduce_with_statistics


def _first(fut: torch.futures.Future) -> Tensor:
    return fut.value()[0]

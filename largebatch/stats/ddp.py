"""DDP communication hook that measures each worker's local gradient.

The hook wraps the gradient reduction DDP would otherwise run (default
all-reduce or the user's hook, e.g. fp16 compression or PowerSGD):

1. before the bucket is reduced, the squared norms of ``bucket.gradients()``
   (each worker's *local* gradient, not yet divided by the world size) are
   scattered into a per-parameter vector; parameters are found by identity,
   because DDP rebuilds its buckets after the first step (bucket indices are
   not stable);
2. the bucket is reduced by the wrapped hook, unchanged;
3. in the last bucket's hook one small all-reduce carries every statistic of
   the step, and the returned future waits for both reductions, so DDP's
   backward does not return before the statistics are there.

Per-worker sampling follows the shared statistics reference (stats.md,
"Per-worker statistics under DDP"); the single fused reduction replaces the
one-collective-per-tensor scheme of the LENA authors' code.
"""

# No "from __future__ import annotations": DDP compares the hook's annotations
# with dist.GradBucket and Future[Tensor] at registration.
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["bucket_norms", "statistics_comm_hook", "launch_stats_all_reduce"]

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future]


def bucket_norms(
    gradients: list[Tensor], parameters: list[Tensor], index_of: dict[int, int], dtype: torch.dtype
) -> tuple[list[int], list[Tensor]]:
    """2-norms of one bucket's gradients (one ``_foreach_norm``), keyed by parameter position.

    Returns (indices, norms) for the parameters the engine tracks; parameters
    it does not track (``params=`` subset) are skipped. The norms are taken
    now, before the bucket's reduction overwrites the gradients.
    """
    indices, tracked = [], []
    for grad, param in zip(gradients, parameters):
        k = index_of.get(id(param))
        if k is not None:
            indices.append(k)
            tracked.append(grad)
    if not tracked:
        return indices, []
    return indices, list(torch._foreach_norm(tracked, 2, dtype=dtype))


def launch_stats_all_reduce(vector: Tensor, group) -> torch.futures.Future:
    """Sum ``vector`` over the group in place, asynchronously."""
    return dist.all_reduce(vector, group=group, async_op=True).get_future()


def statistics_comm_hook(
    inner_hook: CommHook,
    inner_state: Any,
    *,
    before_reduce: Callable[[dist.GradBucket], None],
    after_last_bucket: Callable[[], torch.futures.Future | None],
    is_active: Callable[[], bool],
) -> CommHook:
    """Wrap ``inner_hook`` so that statistics are taken and reduced alongside it.

    ``before_reduce(bucket)`` runs before the wrapped hook may modify the
    bucket in place; ``after_last_bucket()`` runs after the last bucket's
    reduction was launched (same order on every rank, as collectives need) and
    may return a future the bucket's future must also wait for. When
    ``is_active()`` is false the hook only forwards to ``inner_hook`` (DDP has
    no way to unregister a comm hook).
    """

    def largebatch_statistics_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if not is_active():
            return inner_hook(inner_state, bucket)
        before_reduce(bucket)
        reduced = inner_hook(inner_state, bucket)
        if not bucket.is_last():
            return reduced
        extra = after_last_bucket()
        if extra is None:
            return reduced
        both = torch.futures.collect_all([reduced, extra])
        return both.then(lambda fut: fut.value()[0].value())

    return largebatch_statistics_hook

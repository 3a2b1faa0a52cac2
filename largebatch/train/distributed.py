"""Data-parallel context: one process, or one of the ranks started by torchrun.

torchrun (or any launcher) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
then the process group is initialised with NCCL on GPUs and gloo on CPUs. A
process group that is already initialised (e.g. by a test harness) is used
as it is.

Restarts under ``torchrun --max-restarts``: the elastic agent hosts one
TCPStore for the whole job (``TORCHELASTIC_USE_AGENT_STORE=True``) and hands
every start of the workers the same ``MASTER_PORT``, and torch keys the
process group's rendezvous by names that do not change between starts. The
addresses the previous workers published are therefore still in the store
when the restarted workers connect, and a rank that reads a peer's key before
the peer has overwritten it tries to connect to a socket that died with the
old process (seen both as "connection refused" and as a hang). So with
an agent store the ranks first agree on a namespace that is new for this
start of the workers (:func:`_fresh_namespace`) and rendezvous inside it.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

TIMEOUT_ENV = "LARGEBATCH_DIST_TIMEOUT"
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"
JOIN_PREFIX = "largebatch/join"


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


def setup(device: str | None = None) -> Context:
    """Join the process group the environment describes, or run as a single process.

    ``device``: ``cpu``, ``cuda`` (under a launcher: the GPU of the local
    rank), ``cuda:N`` (one process only) or None (a GPU if there is one).
    NCCL joins GPU ranks, gloo CPU ranks.
    """
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return Context(rank, world, local_rank, _device(use_cuda, local_rank, device, world), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        chosen = _device(use_cuda, 0, device, 1)
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        return Context(device=chosen)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _device(use_cuda, local_rank, device, world)
    if use_cuda:
        torch.cuda.set_device(chosen)
    timeout = _timeout()
    store = _store_for_this_start(rank, world, timeout)
    if store is None:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    else:
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world,
                                timeout=timeout)
    return Context(rank, world, local_rank, chosen, owns_group=True)


def local_world_size() -> int:
    """The processes a launcher started on this machine (1 without one)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def _timeout() -> timedelta | None:
    """How long connecting and each collective may take: ``LARGEBATCH_DIST_TIMEOUT`` seconds (None: torch's default).

    Restarts do not need it (see the module docstring); it bounds a rank that
    waits for a peer which is alive but stuck.
    """
    seconds = os.environ.get(TIMEOUT_ENV)
    if not seconds:
        return None
    try:
        value = float(seconds)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, not {seconds!r}")
    return timedelta(seconds=value)


def _store_for_this_start(rank: int, world: int, timeout: timedelta | None) -> dist.Store | None:
    """A view of the launcher's store that only this start of the workers uses (None: let torch connect).

    Without an agent store (plain ``env://``, or torchrun with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) rank 0 hosts a new store on
    every start, so nothing survives a restart and torch's own rendezvous is
    used.
    """
    if os.environ.get(AGENT_STORE_ENV) != str(True):
        return None
    timeout = timeout or default_pg_timeout
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"largebatch/{_fresh_namespace(store, rank, world, timeout)}", store)


def _fresh_namespace(store: dist.Store, rank: int, world: int, timeout: timedelta, poll: float = 0.02) -> str:
    """A name that every rank of this start agrees on and that no earlier start used.

    Keys outlive the processes that wrote them, so a value read from a
    well-known key may be an earlier start's. A rank can only trust what
    carries a token it made itself: rank 0 makes the namespace, every other
    rank makes a token, publishes it under ``hello/<rank>`` and waits for
    ``welcome/<token>``, which rank 0 writes (holding the namespace) for each
    token it sees. Rank 0 keeps answering until every rank has confirmed
    inside the new namespace, since a ``hello`` it reads may be a stale one
    that its writer will overwrite. (``TORCHELASTIC_RESTART_COUNT`` is no
    substitute: each node's agent counts its own restarts.)
    """
    if rank != 0:
        token = uuid.uuid4().hex
        store.set(f"{JOIN_PREFIX}/hello/{rank}", token)
        welcome = f"{JOIN_PREFIX}/welcome/{token}"
        store.wait([welcome], timeout)
        namespace = store.get(welcome).decode()
        store.delete_key(welcome)
        store.set(f"{JOIN_PREFIX}/{namespace}/joined/{rank}", b"")
        return namespace
    namespace = uuid.uuid4().hex
    deadline = time.monotonic() + timeout.total_seconds()
    answered: set[bytes] = set()
    waiting = set(range(1, world))
    while waiting:
        hellos = [f"{JOIN_PREFIX}/hello/{r}" for r in sorted(waiting)]
        store.wait(hellos, timeout)  # the first start: nothing published yet
        for token in store.multi_get(hellos):
            if token not in answered:
                store.set(f"{JOIN_PREFIX}/welcome/{token.decode()}", namespace)
                answered.add(token)
        waiting = {r for r in waiting if not store.check([f"{JOIN_PREFIX}/{namespace}/joined/{r}"])}
        if waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {sorted(waiting)} did not join within {timeout} (set {TIMEOUT_ENV})")
            time.sleep(poll)
    return namespace


# How long teardown gives the communication threads (see retire_collectives).
RETIRE_SECONDS = 0.05


def retire_collectives() -> None:
    """Let gloo's threads release the collectives that a comm hook issued.

    Such a collective can hold a Python object (a Python hook's future),
    which the communication thread drops, under the GIL, after the collective
    completed. If the interpreter is already shutting down by then, that
    thread is made to exit inside a destructor and the process aborts
    ("terminate called without an active exception"): 3 of 8 runs of plain
    DDP with torch's own ``allreduce_hook`` on a 2-core CPU, 0 of 8 after a
    50 ms pause (a pause releases the GIL). Call before the process ends.
    """
    time.sleep(RETIRE_SECONDS)


def teardown(context: Context) -> None:
    if context.owns_group and dist.is_initialized():
        retire_collectives()
        dist.destroy_process_group()


def _device(use_cuda: bool, local_rank: int, requested: str | None = None, world: int = 1) -> torch.device:
    if not use_cuda:
        return torch.device("cpu")
    index = torch.device(requested).index if requested else None
    if index is not None and world > 1:
        raise ValueError(f"--device {requested}: with several ranks each takes the GPU of its local rank; "
                         "use --device cuda")
    return torch.device("cuda", local_rank if index is None else index)


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

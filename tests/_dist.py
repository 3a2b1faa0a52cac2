"""Real multi-process gloo groups on loopback, for tests.

``WorkerGroup`` starts ``world_size`` processes once (process start and
``import torch`` cost seconds on a busy machine), joins them into one gloo
group, and then runs any number of tasks: ``group.run(fn, *args)`` calls
``fn(rank, world_size, *args)`` on every rank and returns the results in rank
order. ``fn`` must be a module-level (importable) function. A failing or hung
task raises RuntimeError with every rank's traceback and retires the group
(the next ``run`` starts a fresh one), since a failed collective can leave the
others waiting.

``run_in_group(fn, *args)`` is the one-shot form.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from largebatch.train.distributed import retire_collectives

__all__ = ["WorkerGroup", "free_port", "run_in_group"]


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _serve(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args = task
            try:
                results.put((rank, True, _dumps(fn(rank, world_size, *args))))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    finally:
        retire_collectives()
        dist.destroy_process_group()


class WorkerGroup:
    def __init__(self, world_size: int = 2, timeout: float = 120.0):
        self.world_size, self.timeout = world_size, timeout
        self._processes: list = []

    def _start(self) -> None:
        context = mp.get_context("spawn")
        port = free_port()
        self._tasks = [context.SimpleQueue() for _ in range(self.world_size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(target=_serve, args=(rank, self.world_size, port, self._tasks[rank], self._results), daemon=True)
            for rank in range(self.world_size)
        ]
        for process in self._processes:
            process.start()

    def run(self, fn, *args):
        if not self._processes:
            self._start()
        for task_queue in self._tasks:
            task_queue.put((fn, args))
        outputs, errors = {}, []
        for _ in range(self.world_size):
            try:
                rank, ok, payload = self._results.get(timeout=self.timeout)
            except queue.Empty:
                errors.append(f"no answer within {self.timeout:.0f} s")
                break
            if ok:
                outputs[rank] = _loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            self.close(force=True)
            raise RuntimeError("\n".join(errors))
        return [outputs[rank] for rank in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        if not force:
            for task_queue in self._tasks if self._processes else []:
                task_queue.put(None)
        for process in self._processes:
            process.join(timeout=0 if force else 10)
            if process.is_alive():
                process.kill()
                process.join()
        self._processes = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_in_group(fn, *args, world_size: int = 2, timeout: float = 120.0):
    """Run ``fn(rank, world_size, *args)`` once in a fresh group; return the results."""
    with WorkerGroup(world_size, timeout) as group:
        return group.run(fn, *args)

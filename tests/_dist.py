"""Real multi-process gloo groups on loopback, and child processes, for tests.

``WorkerGroup`` starts ``world_size`` processes once (process start and
``import torch`` cost seconds on a busy machine), joins them into one gloo
group, and then runs any number of tasks: ``group.run(fn, *args)`` calls
``fn(rank, world_size, *args)`` on every rank and returns the results in rank
order. ``fn`` must be a module-level (importable) function; ``timeout=``
(keyword) overrides the group's timeout for one task.

A task fails fast and says why. ``timeout`` bounds a whole task (the group's
start included in the first). A rank that raises, or a process that dies,
cuts the others' remaining time to ``AFTER_FAILURE`` seconds (a failed
collective leaves the other ranks waiting for good). Every rank still busy at
the deadline is asked for its Python stack (``faulthandler``, registered on
``SIGUSR1`` in each worker, which dumps every thread's stack even while the
rank waits inside a C++ collective), then the group is killed, and
``RuntimeError`` carries each rank's traceback or stack. The next ``run``
starts a fresh group.

``run_in_group(fn, *args)`` is the one-shot form.

``run_command(argv, timeout=...)`` runs a command (a CLI run, ``torchrun``)
with the same promise: at its timeout every process of its tree (``torchrun``
starts its workers in sessions of their own, so the tree is followed through
``/proc``) gets ``SIGABRT``, which ``PYTHONFAULTHANDLER=1`` turns into a
dump of its Python stack on its stderr, and ``CommandTimeout`` carries that
stderr.
"""

from __future__ import annotations

import faulthandler
import io
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from largebatch.train.distributed import retire_collectives

__all__ = ["AFTER_FAILURE", "CommandTimeout", "WorkerGroup", "free_port", "run_command", "run_in_group"]

AFTER_FAILURE = 10.0  # seconds the other ranks get once one rank has failed
_STACK_SIGNAL = signal.SIGUSR1
_STACK_WAIT = 5.0  # seconds to wait for a rank's stack dump to be written
_POLL = 0.25


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


def _serve(rank: int, world_size: int, port: int, tasks, results, stack_path: str) -> None:
    # Kept open for the life of the process: faulthandler writes to its descriptor.
    stacks = open(stack_path, "w")  # noqa: SIM115
    faulthandler.enable(stacks, all_threads=True)  # crashes (SIGSEGV, SIGABRT, ...)
    faulthandler.register(_STACK_SIGNAL, stacks, all_threads=True)  # the parent's request at a timeout
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


def _read_dump(path: Path, deadline: float) -> str:
    """The stack dump written to ``path``, once it has stopped growing (or at ``deadline``)."""
    size = -1
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if text and len(text) == size:
            return text
        if time.monotonic() >= deadline:
            return text
        size = len(text)
        time.sleep(0.2)


class WorkerGroup:
    def __init__(self, world_size: int = 2, timeout: float = 120.0):
        self.world_size, self.timeout = world_size, timeout
        self._processes: list = []
        self._dir: Path | None = None

    def _start(self) -> None:
        context = mp.get_context("spawn")
        port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="workergroup-"))
        self._stacks = [self._dir / f"rank{rank}.stack" for rank in range(self.world_size)]
        self._tasks = [context.SimpleQueue() for _ in range(self.world_size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(
                target=_serve,
                args=(rank, self.world_size, port, self._tasks[rank], self._results, str(self._stacks[rank])),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for process in self._processes:
            process.start()

    def run(self, fn, *args, timeout: float | None = None):
        """``fn(rank, world_size, *args)`` on every rank; ``timeout`` overrides the group's for this task."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self._processes:
            self._start()
        for task_queue in self._tasks:
            task_queue.put((fn, args))
        outputs: dict[int, object] = {}
        failures: dict[int, str] = {}
        while len(outputs) + len(failures) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, payload = self._results.get(timeout=min(left, _POLL))
            except queue.Empty:
                for rank, process in enumerate(self._processes):
                    if rank not in outputs and rank not in failures and not process.is_alive():
                        failures[rank] = f"process exited with code {process.exitcode}"
                        crash = _read_dump(self._stacks[rank], time.monotonic() + 1.0)
                        if crash:
                            failures[rank] += f"; its Python stack at the crash:\n{crash}"
                        deadline = min(deadline, time.monotonic() + AFTER_FAILURE)
                continue
            if ok:
                outputs[rank] = _loads(payload)
            else:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + AFTER_FAILURE)
        if len(outputs) == self.world_size:
            return [outputs[rank] for rank in range(self.world_size)]
        hung = [rank for rank in range(self.world_size) if rank not in outputs and rank not in failures]
        stacks = self._dump_stacks(hung)
        self.close(force=True)
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
        lines = [f"task {name} failed on {self.world_size} ranks (timeout {timeout:.0f} s):"]
        for rank in range(self.world_size):
            if rank in outputs:
                lines.append(f"rank {rank}: answered")
            elif rank in failures:
                lines.append(f"rank {rank}: {failures[rank]}")
            else:
                why = "no answer within the timeout" if not failures else "still running after another rank failed"
                lines.append(f"rank {rank}: {why}; its Python stack, then killed:\n{stacks[rank]}")
        raise RuntimeError("\n".join(lines))

    def _dump_stacks(self, ranks: list[int]) -> dict[int, str]:
        """Each rank's Python stack (every thread), written by faulthandler on ``SIGUSR1``."""
        for rank in ranks:
            process = self._processes[rank]
            if process.is_alive():
                try:
                    os.kill(process.pid, _STACK_SIGNAL)
                except ProcessLookupError:
                    pass
        stop = time.monotonic() + _STACK_WAIT
        stacks = {}
        for rank in ranks:
            dump = _read_dump(self._stacks[rank], stop)
            stacks[rank] = dump or "(no stack: the process did not answer SIGUSR1)"
        return stacks

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
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_in_group(fn, *args, world_size: int = 2, timeout: float = 120.0):
    """Run ``fn(rank, world_size, *args)`` once in a fresh group; return the results."""
    with WorkerGroup(world_size, timeout) as group:
        return group.run(fn, *args)


class CommandTimeout(AssertionError):
    """A command outlived its timeout; the message holds every process's Python stack (from its stderr).

    ``stdout`` and ``stderr`` hold the whole output.
    """

    stdout: str = ""
    stderr: str = ""


# Started in front of the command: no core files from the SIGABRT at a timeout.
_NO_CORE = (
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def _descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid``, found through ``/proc`` (sessions and process groups aside)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])  # after "pid (comm) state"
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"  # a zombie has finished


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def run_command(argv: list[str], *, timeout: float, env: dict[str, str] | None = None,
                cwd: str | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)`` that fails fast and says why.

    At ``timeout`` every process of the command's tree is sent ``SIGABRT``
    (each Python process dumps its stack on stderr), then killed; raises
    ``CommandTimeout`` with the stderr.
    """
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    process = subprocess.Popen(
        [sys.executable, "-c", _NO_CORE, *map(str, argv)], env=env, cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [process.pid, *_descendants(process.pid)]
        _signal_all(tree, signal.SIGABRT)
        stop = time.monotonic() + _STACK_WAIT
        while any(_alive(pid) for pid in tree) and time.monotonic() < stop:
            time.sleep(0.1)
        _signal_all([pid for pid in tree if _alive(pid)] + _descendants(process.pid), signal.SIGKILL)
        out, err = process.communicate()
        failure = CommandTimeout(
            f"{' '.join(map(str, argv))}\nno exit within {timeout:.0f} s; every process was sent SIGABRT "
            f"(each Python process's stack is on stderr), then killed.\n"
            f"--- stdout (end) ---\n{out[-5000:]}\n--- stderr (end) ---\n{err[-30000:]}"
        )
        failure.stdout, failure.stderr = out, err
        raise failure from None
    return subprocess.CompletedProcess(list(argv), process.returncode, out, err)

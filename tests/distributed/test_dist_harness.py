"""The multi-process harness fails fast and says why: a hung rank or command is killed and its stack shown.

No test here measures time. Each hang lasts far longer than the harness's
timeout and would end by itself with an answer, so a harness that did not
kill at its timeout (or did not cut the wait short after a failure) makes
the test fail on the missing error or on the message.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist import AFTER_FAILURE, CommandTimeout, WorkerGroup, _alive, run_command

pytestmark = pytest.mark.distributed

LONG = 600.0  # far beyond every timeout below
WAIT = 3 * AFTER_FAILURE + 60  # a failed rank's peer waits this long before giving up by itself


def _sleep_in_a_named_frame(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


def _rank_one_hangs(rank: int, world_size: int, seconds: float) -> str:
    if rank == 1:
        return _sleep_in_a_named_frame(seconds)
    return "done"


def _rank_zero_raises_rank_one_waits_in_a_collective(rank: int, world_size: int) -> str:
    if rank == 0:
        raise ValueError("rank zero gives up")
    _wait_for_rank_zero()
    return "rank zero joined after all"


def _wait_for_rank_zero() -> None:
    work = dist.all_reduce(torch.ones(1), async_op=True)
    stop = time.monotonic() + WAIT
    while not work.is_completed() and time.monotonic() < stop:
        time.sleep(0.05)


def _rank_one_dies(rank: int, world_size: int) -> str:
    if rank == 1:
        os._exit(3)
    return "done"


def _pids(rank: int, world_size: int) -> int:
    return os.getpid()


def _sum_of_ranks(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def test_a_hung_rank_is_killed_at_the_timeout_and_its_stack_is_in_the_error():
    group = WorkerGroup(2, timeout=LONG)
    try:
        pids = group.run(_pids)  # the group's start, on a busy machine, is not part of the hang
        with pytest.raises(RuntimeError) as failure:
            group.run(_rank_one_hangs, LONG, timeout=10)
        text = str(failure.value)
        assert "(timeout 10 s)" in text and "rank 0: answered" in text
        assert "rank 1: no answer within the timeout" in text
        # the hung rank's own frames, innermost first, down to the task
        assert "in _sleep_in_a_named_frame" in text and "in _rank_one_hangs" in text
        assert text.index("in _sleep_in_a_named_frame") < text.index("in _rank_one_hangs")
        assert not any(_alive(pid) for pid in pids)  # the whole group was killed
        assert group.run(_sum_of_ranks) == [1.0, 1.0]  # and the next task gets a fresh one
    finally:
        group.close()


def test_a_rank_waiting_for_a_failed_rank_is_stopped_soon_with_its_stack():
    """Rank 0 raises; rank 1 waits for it in an all-reduce. Both are reported, long before the timeout.

    gloo's own timeout (30 min) would keep rank 1 waiting; the harness gives it
    AFTER_FAILURE seconds. Rank 1 gives up by itself after WAIT seconds and
    answers: a harness that waited for it would report "rank 1: answered".
    """
    with pytest.raises(RuntimeError) as failure:
        with WorkerGroup(2, timeout=LONG) as group:
            group.run(_rank_zero_raises_rank_one_waits_in_a_collective)
    text = str(failure.value)
    assert "ValueError: rank zero gives up" in text
    assert "rank 1: still running after another rank failed" in text
    assert "in _wait_for_rank_zero" in text


def test_a_dead_rank_is_reported_with_its_exit_code():
    with pytest.raises(RuntimeError) as failure:
        with WorkerGroup(2, timeout=WAIT) as group:
            group.run(_rank_one_dies)
    text = str(failure.value)
    assert "rank 0: answered" in text and "rank 1: process exited with code 3" in text


# The child writes its pid from inside the named frame and the parent hangs only
# then, so that both are in that frame when the timeout comes, however slowly a
# loaded machine starts them. The child's stderr is a file of its own: two
# stacks dumped at once into one pipe interleave mid-line.
HANGING_SCRIPT = """
import os, subprocess, sys, time

def {name}(ready=None):
    if ready is not None:
        with open(ready + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(ready + ".tmp", ready)
    time.sleep({seconds})

if sys.argv[1] == "parent":
    subprocess.Popen([sys.executable, __file__, "child", sys.argv[2]], start_new_session=True,
                     stderr=open(sys.argv[2] + ".stderr", "w"))
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
    {name}()
else:
    {name}(sys.argv[2])
"""


def test_a_hung_command_tree_is_killed_at_the_timeout_with_every_process_stack(tmp_path):
    """A parent and a child in a session of its own (as torchrun starts its workers) both hang."""
    script = tmp_path / "hang.py"
    script.write_text(HANGING_SCRIPT.format(name="hang_in_a_named_frame", seconds=LONG))
    pid_file = tmp_path / "child.pid"
    with pytest.raises(CommandTimeout) as failure:
        run_command([sys.executable, str(script), "parent", str(pid_file)], timeout=20)
    text, stderr = str(failure.value), failure.value.stderr
    child_stderr = Path(f"{pid_file}.stderr").read_text()
    for dump in (stderr, child_stderr):  # the parent's, then the child's
        assert dump.count("Fatal Python error: Aborted") == 1 and "in hang_in_a_named_frame" in dump, text
    assert "in hang_in_a_named_frame" in text
    assert not _alive(int(Path(pid_file).read_text()))


def test_a_command_that_finishes_returns_its_output():
    done = run_command([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(5)"],
                       timeout=LONG)
    assert (done.returncode, done.stdout, done.stderr) == (5, "out\n", "err\n")

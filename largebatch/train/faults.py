"""Fault injection for the resume and interruption tests: a run kills or signals itself at a given step
when these environment variables say so (never set in normal use)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .distributed import Context

CRASH_AT_STEP_ENV = "LARGEBATCH_TEST_CRASH_AT_STEP"  # this process exits abruptly after step k, once
CRASH_RANK_ENV = "LARGEBATCH_TEST_CRASH_RANK"
SIGNAL_AT_STEP_ENV = "LARGEBATCH_TEST_SIGNAL_AT_STEP"  # "k" or "k:TERM": this process signals itself during step k


def maybe_crash(step: int, context: Context, run_dir: Path) -> None:
    """Kill this process once at the given step (fault injection for the resume tests)."""
    at = os.environ.get(CRASH_AT_STEP_ENV)
    if at is None or int(at) != step:
        return
    crash_rank = int(os.environ.get(CRASH_RANK_ENV, "1" if context.distributed else "0"))
    marker = run_dir / f".crashed-at-step-{step}"
    if context.rank != crash_rank or marker.exists():
        return
    marker.write_text("")
    os._exit(17)


def maybe_signal(step: int, context: Context) -> None:
    """Send this process SIGINT (or SIGTERM) during the given step (for the interruption tests).

    Only the rank ``LARGEBATCH_TEST_CRASH_RANK`` (default 0) is signalled: the others must stop with it.
    """
    at = os.environ.get(SIGNAL_AT_STEP_ENV)
    if at is None:
        return
    when, _, name = at.partition(":")
    if int(when) == step and context.rank == int(os.environ.get(CRASH_RANK_ENV, "0")):
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'INT'}"))

"""``--commit``: the study commits its summaries (and its page, once written) to git as it goes, so that a
stop loses nothing and a new machine resumes from what is committed."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .records import collect
from .spec import StudySpec


class Committer:
    """--commit: refresh summaries.json after every finished run; git-commit it (and the page, once written)
    after the first run that finishes ``every`` seconds after the last commit, and at the end of each phase."""

    def __init__(self, spec: StudySpec, enabled: bool, log: Callable[[str], None], every: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.spec, self.enabled, self.log, self.clock = spec, enabled, log, clock
        self.every = 60 * spec.commit_every_minutes if every is None else every
        self.last = clock()
        self.commits: list[str] = []

    def finished_run(self) -> None:
        collect(self.spec)
        if self.clock() - self.last >= self.every:
            self.commit("finished runs so far")

    def commit(self, what: str) -> None:
        collect(self.spec)
        self.last = self.clock()
        if not self.enabled:
            return
        paths = [str(p) for p in (Path(self.spec.artifacts), Path(self.spec.out)) if p.exists()]
        message = f"Study {self.spec.name}: {what} (run summaries)"
        try:
            subprocess.run(["git", "add", *paths], check=True, capture_output=True)
            done = subprocess.run(["git", "commit", "-m", message, "--", *paths], capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            self.log(f"commit skipped: {e}")
            return
        if done.returncode == 0:
            self.commits.append(message)
            self.log(f"committed: {message}")
        else:
            reason = (done.stdout + done.stderr).strip().splitlines()
            self.log(f"commit skipped: {reason[0] if reason else 'git commit failed'}")

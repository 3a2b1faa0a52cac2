"""A run's directory: the guard against replacing a run, starting fresh or resuming from its checkpoint,
and writing checkpoints (rank 0 writes; every rank's random state is gathered into it)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..records import CONFIG, LAYERS, METRICS, SUMMARY, read_json, read_jsonl, write_json
from . import checkpoint as ckpt
from . import distributed
from .config import NOT_PART_OF_THE_RUN, TrainConfig
from .distributed import Context
from .loop import epoch_seed
from .metrics import truncate_after
from .parts import Parts


class RunDirError(ValueError):
    """The run directory cannot be used."""


def holds_a_run(run_dir: Path) -> str | None:
    """What run ``run_dir`` holds, in a few words (None: nothing a new run would destroy)."""
    if (run_dir / SUMMARY).exists():
        try:
            summary = read_json(run_dir / SUMMARY)
            if summary.get("diverged_at_step") is not None:
                return f"diverged at step {summary['diverged_at_step']}"
            return f"finished after {summary['steps']} steps"
        except (ValueError, KeyError, OSError):
            return "finished"
    logged = [r["step"] for r in read_jsonl(run_dir / METRICS) if "step" in r]
    if ckpt.checkpoint_path(run_dir).exists():
        return "a checkpoint" + (f", logged up to step {max(logged)}" if logged else "")
    if logged:
        return f"logs up to step {max(logged)}"
    return None


def prepare_run_dir(path: str | Path, rank: int) -> Path:
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to run directory {run_dir}: {e.strerror or e}") from None
    for stale in run_dir.glob(f".{ckpt.CHECKPOINT_NAME}.*.tmp"):
        if rank == 0:  # left by a process killed while writing
            stale.unlink(missing_ok=True)
    return run_dir


@dataclass
class Start:
    """Where a run starts: its position, the evaluations it logged so far, or its summary if it had finished."""

    position: ckpt.Position
    evals: list[dict] = field(default_factory=list)
    finished_summary: dict | None = None


class RunDirectory:
    def __init__(self, config: TrainConfig, context: Context):
        self.config, self.context = config, context
        self.path = prepare_run_dir(config.run_dir, context.rank)
        self.checkpoint = ckpt.checkpoint_path(self.path)

    def start(self, parts: Parts, description: dict, asked_to_resume: bool = False) -> Start:
        """Refuse to replace a run unless told; resume its checkpoint with ``resume``, else start at step 0."""
        config, is_main = self.config, self.context.is_main
        held = holds_a_run(self.path)
        if held and not (config.resume or config.overwrite):
            raise RunDirError(f"{self.path} already holds a run ({held}): pass --resume to continue it or "
                              "--overwrite to replace it")
        start = Start(ckpt.Position(epoch_seed=epoch_seed(config.seed, 0)))
        if config.resume and self.checkpoint.exists():
            start = self._resume(parts)
        else:
            if config.resume and asked_to_resume and is_main:
                print(f"largebatch: nothing to resume in {self.path} (no {ckpt.CHECKPOINT_NAME}): starting at "
                      "step 0", file=sys.stderr, flush=True)
            if is_main:
                self.checkpoint.unlink(missing_ok=True)  # a stale checkpoint must not be resumed into this run
                for name in (METRICS, LAYERS, SUMMARY):
                    (self.path / name).unlink(missing_ok=True)
        if is_main:
            write_json(self.path / CONFIG, description)
        return start

    def _resume(self, parts: Parts) -> Start:
        try:
            payload = ckpt.load(self.checkpoint)
        except ckpt.CheckpointError as e:
            raise RunDirError(f"{e}: nothing was changed; move it away to keep it, or pass --overwrite instead of "
                              "--resume to start the run again") from None
        changed = ckpt.differences(payload["run"], self.config.run_identity(), ignored=NOT_PART_OF_THE_RUN)
        if changed:
            raise ValueError(f"{self.checkpoint} belongs to a different run ({'; '.join(changed)}); use a new "
                             "--run-dir or drop --resume")
        if (self.path / SUMMARY).exists():
            # Finished (or diverged) already: the checkpoint is its last state; nothing to train.
            if self.context.is_main:
                print(f"largebatch: {self.path} has finished already; nothing to resume", file=sys.stderr,
                      flush=True)
            return Start(ckpt.Position(epoch_seed=epoch_seed(self.config.seed, 0)),
                         finished_summary=read_json(self.path / SUMMARY))
        position = ckpt.restore(payload, parts.model, parts.optimizer, parts.scheduler, self.context.rank,
                                parts.scaler)
        if self.context.is_main:
            for name in (METRICS, LAYERS):
                truncate_after(self.path / name, position.step)
            print(f"resuming {self.checkpoint} at step {position.step}", file=sys.stderr, flush=True)
        return Start(position, [r for r in read_jsonl(self.path / METRICS) if r.get("kind") == "eval"])

    def save_checkpoint(self, parts: Parts, position: ckpt.Position) -> None:
        states = distributed.gather_objects(ckpt.rng_state(), self.context)
        if self.context.is_main:
            payload = ckpt.make_payload(parts.model, parts.optimizer, parts.scheduler, position, states,
                                        self.config.run_identity(), parts.scaler)
            ckpt.save_atomic(payload, self.checkpoint)

"""Atomic checkpoints that let a run continue exactly where it stopped.

A checkpoint holds the model, optimiser and scheduler states, every rank's RNG
states, the data position (epoch, step within the epoch and the seed of that
epoch's permutation) and the run's clocks. It is written to a temporary file in
the run directory and moved over ``checkpoint.pt`` with ``os.replace``, so the
file named ``checkpoint.pt`` is always a complete checkpoint, whatever moment a
process is killed at.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Position:
    """Where the run is: ``step_in_epoch`` steps of ``epoch`` are done, ``step`` in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    epoch_seed: int = 0
    train_seconds: float = 0.0  # training time so far, evaluation excluded
    train_cpu_seconds: float = 0.0  # the process's CPU time of training so far (time.process_time)


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_atomic(payload: dict, path: Path) -> None:
    """Write ``payload`` to ``path`` so that ``path`` is never a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_payload(model, optimizer, scheduler, position: Position, rng_states: list, identity: dict,
                 scaler=None) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "position": asdict(position),
        "rng_states": rng_states,
        "run": identity,
        "torch_version": torch.__version__,
    }


REQUIRED = ("model", "optimizer", "scheduler", "position", "rng_states", "run")


class CheckpointError(ValueError):
    """A file named checkpoint.pt that is not a complete checkpoint of a run."""


def load(path: Path) -> dict:
    """The checkpoint at ``path``; CheckpointError (one line) if it is empty, cut short or not ours."""
    try:
        # Our own files: they hold numpy RNG states and plain Python objects.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many kinds (pickle, zip, EOF, runtime) for a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0].rstrip(".")
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"{path} is not a readable checkpoint ({size} bytes; {reason[:120]})") from None
    missing = [k for k in REQUIRED if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of a largebatch run (no {', '.join(missing)})")
    return payload


def restore(payload: dict, model, optimizer, scheduler, rank: int, scaler=None) -> Position:
    """Load the states into the live objects; returns the position to continue from."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    states = payload["rng_states"]
    set_rng_state(states[rank] if rank < len(states) else states[0])
    return Position(**payload["position"])


def differences(saved: dict, current: dict, ignored: tuple[str, ...] = ()) -> list[str]:
    """The settings in which a resumed run differs from the checkpointed one (``ignored``: never compared)."""
    keys = sorted((set(saved) | set(current)) - set(ignored))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]

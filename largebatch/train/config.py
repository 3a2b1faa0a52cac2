"""The configuration of one training run, and its validation.

Everything that determines a run's result lives here, so that ``config.json``
describes the run completely and a resumed run can check it continues the
same one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data import DATASETS
from ..models import MODELS
from .methods import DEFAULT_DECAY_TO, DEFAULT_WARMUP_FRACTION, WARMUP_MODES, get_method

# Fields that may differ between a run and its resumption.
NOT_PART_OF_THE_RUN = ("resume", "progress", "checkpoint_every", "tensorboard", "run_dir", "max_steps")


@dataclass
class TrainConfig:
    method: str = "sgd"
    model: str = "mlp"
    batch: int = 128
    micro_batch: int = 128
    epochs: int = 1
    lr: float | None = None  # base rate eta0 at base_batch; None: the method's default
    base_batch: int = 128
    seed: int = 0
    run_dir: str = "runs/run"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    val_size: int = 5000
    split_seed: int = 0  # the train/validation split, the same for every run of a sweep
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION
    warmup: str = "default"  # none | fixed | state-aware | default (the method's own)
    decay_to: float | None = DEFAULT_DECAY_TO
    eval_every: int = 0  # also evaluate every k steps (0: once per epoch only)
    layer_every: int = 10  # per-layer statistics every k steps
    checkpoint_every: int = 0  # steps; 0: only at the end
    max_steps: int | None = None  # stop early (for tests and interruption experiments)
    resume: bool = False
    progress: bool = True
    tensorboard: bool = False

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).default_base_lr

    def run_identity(self) -> dict:
        """The fields a resumed run must share with the run it continues."""
        identity = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_PART_OF_THE_RUN}
        if identity["warmup"] == "default":
            del identity["warmup"]  # checkpoints written before the option existed still resume
        return identity

    def validate(self, world_size: int = 1) -> None:
        """Raise ValueError with a one-line message for any bad setting."""
        get_method(self.method)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        for name in ("batch", "micro_batch", "epochs", "base_batch", "layer_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        per_step = self.micro_batch * world_size
        if self.batch % per_step:
            raise ValueError(
                f"--batch {self.batch} is not divisible by micro-batch x world size "
                f"({self.micro_batch} x {world_size} = {per_step})"
            )
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.decay_to is not None and not 0 < self.decay_to <= 1:
            raise ValueError(f"--decay-to must be in (0, 1], got {self.decay_to}")
        if self.warmup not in WARMUP_MODES:
            raise ValueError(f"--warmup must be one of {', '.join(WARMUP_MODES)}, got {self.warmup!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"--warmup-fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.train_limit is not None and self.train_limit < self.batch:
            raise ValueError(f"--train-limit {self.train_limit} is smaller than one batch ({self.batch})")

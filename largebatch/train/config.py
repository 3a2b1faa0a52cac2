"""The configuration of one training run, and its validation.

Everything that determines a run's result lives here, so that ``config.json``
describes the run completely and a resumed run can check it continues the
same one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from ..data import check_dataset_name
from ..data.augment import AUGMENTATIONS
from ..models import check_model_name
from .methods import DEFAULT_DECAY_TO, DEFAULT_WARMUP_FRACTION, STATISTICS_MODES, WARMUP_MODES, get_method, methods

# Fields that may differ between a run and its resumption.
# The device and thread count change the last bits of the arithmetic, not what the run is (a run may be
# resumed on another machine); layer_every only what is logged.
NOT_PART_OF_THE_RUN = ("resume", "overwrite", "progress", "checkpoint_every", "tensorboard", "run_dir", "max_steps",
                       "device", "threads", "layer_every")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_CHECKPOINT_EVERY = 100
# Per-layer records: every layer_every steps, or with layer_every None at least this many per run (every step
# when the run has fewer updates), so short large-batch runs still give curves.
LAYER_RECORDS_PER_RUN = 200
DEFAULT_LAYER_EVERY = 10


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
    augment: str = "none"  # none | crop-flip (random 4-pixel-padded crop and horizontal flip, seeded per epoch)
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION
    warmup: str = "default"  # none | fixed | state-aware | default (the method's own)
    statistics: str = "micro_batch"  # LENA and AdaScale: micro_batch samples | example (per-example norms)
    decay_to: float | None = DEFAULT_DECAY_TO
    clock_cap: float = 3.0  # a method ending on its clock (AdaScale) trains at most clock_cap x epochs
    eval_every: int = 0  # also evaluate every k steps (0: once per epoch only)
    layer_every: int | None = None  # per-layer statistics every k steps (None: see effective_layer_every)
    noise_scale: bool = False  # also record the gradient noise scale's two terms from per-example norms (noise.py)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast and GradScaler)
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # steps; 0: only at the end and when interrupted
    max_steps: int | None = None  # stop after this many steps in all (resumable)
    resume: bool = False
    overwrite: bool = False  # replace a run already in run_dir
    progress: bool = True
    tensorboard: bool = False
    device: str | None = None  # cpu, cuda, cuda:N; None: the local GPU if there is one, else the CPU
    threads: int | None = None  # torch threads per process; None: the cores available to it

    def effective_layer_every(self, total_steps: int) -> int:
        """layer_every, or by default every 10 steps but every step of a short run (at least 200 records)."""
        if self.layer_every is not None:
            return self.layer_every
        return max(1, min(DEFAULT_LAYER_EVERY, total_steps // LAYER_RECORDS_PER_RUN))

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).default_base_lr

    def run_identity(self) -> dict:
        """The fields a resumed run must share with the run it continues."""
        identity = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_PART_OF_THE_RUN}
        # checkpoints written before these options existed still resume
        if identity["warmup"] == "default":
            del identity["warmup"]
        if identity["precision"] == "fp32":
            del identity["precision"]
        if identity["statistics"] == "micro_batch":
            del identity["statistics"]
        if identity["augment"] == "none":
            del identity["augment"]
        if not identity["noise_scale"]:
            del identity["noise_scale"]
        if not get_method(self.method).ends_on_clock:
            del identity["clock_cap"]  # no effect on the other methods
        return identity

    def validate(self, world_size: int = 1) -> None:
        """Raise ValueError with a one-line message for any bad setting."""
        get_method(self.method)
        check_model_name(self.model)
        check_dataset_name(self.dataset)
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        for name in ("batch", "micro_batch", "epochs", "base_batch", "layer_every", "max_steps", "train_limit",
                     "test_limit", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        for name in ("eval_every", "checkpoint_every", "val_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: give one")
        check_device(self.device)
        per_step = self.micro_batch * world_size
        if self.batch % per_step:
            raise ValueError(
                f"--batch {self.batch} is not divisible by micro-batch x world size "
                f"({self.micro_batch} x {world_size} = {per_step})"
            )
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive finite number, got {self.lr}")
        if self.decay_to is not None and not 0 < self.decay_to <= 1:
            raise ValueError(f"--decay-to must be in (0, 1], got {self.decay_to}")
        if self.warmup not in WARMUP_MODES:
            raise ValueError(f"--warmup must be one of {', '.join(WARMUP_MODES)}, got {self.warmup!r}")
        if self.statistics not in STATISTICS_MODES:
            raise ValueError(f"--statistics must be one of {', '.join(STATISTICS_MODES)}, got {self.statistics!r}")
        if self.statistics == "example" and not get_method(self.method).example_statistics:
            offered = ", ".join(m.name for m in methods().values() if m.example_statistics)
            raise ValueError(f"--statistics example applies to the gain-ratio methods ({offered}), not to "
                             f"{self.method}")
        if not (self.clock_cap >= 1 and math.isfinite(self.clock_cap)):
            raise ValueError(f"--clock-cap must be a finite number >= 1, got {self.clock_cap}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"--warmup-fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.train_limit is not None and self.train_limit < self.batch:
            raise ValueError(f"--train-limit {self.train_limit} is smaller than one batch ({self.batch})")


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, in one line naming ``--device``."""
    import torch

    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type == "cpu":
        if parsed.index not in (None, 0):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
        return
    if parsed.type != "cuda":
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

"""One training run: data, model, method, the step loop, logs and checkpoints.

The global batch of ``batch`` examples is split across the ranks (each takes a
disjoint contiguous share) and, on each rank, into micro-batches whose
gradients are accumulated; DDP averages the ranks' gradients once per step.
So 2 ranks with micro-batch m compute the same update as 1 process with 2
micro-batches of m.

The order of each epoch is a function of (seed, epoch) only, which is what
makes resuming exact: a checkpoint records the epoch and the steps done in
it, and the resumed run rebuilds the permutation and skips those steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import platform
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..records import LAYER_DEFINITION, LAYERS, METRICS, SUMMARY, read_jsonl, write_json
from ..data import ImageDataset, load_dataset
from ..data.augment import crop_flip, crop_flip_draws
from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig, available_cores
from .distributed import Context
from .loop import (
    accumulate_gradients,
    batch_indices,
    epoch_permutation,
    epoch_seed,
    evaluate,
)
from .methods import peak_lr, warmup_steps
from .metrics import JsonlLog, TensorBoard, layer_record, tensorboard_installed
from .faults import maybe_crash, maybe_signal
from .health import Failure, LossWatch, label_entropy
from .parts import build_parts
from .rundir import RunDirectory

class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a step; its checkpoint at that step was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        # What happened, without how to go on: a sweep or a study continues by running the same command again.
        self.stopped = f"{signal.Signals(signum).name} at step {step}: checkpoint written to {checkpoint}"
        super().__init__(f"{self.stopped}; continue with --resume")


def train(config: TrainConfig, *, asked_to_resume: bool = False) -> dict | None:
    """Run (or resume) one training run; returns its summary (None if ``max_steps`` stopped it first).

    A failed run stops at the step it is found out: a non-finite loss, a
    finite loss that explodes, or a loss that stays at chance (:mod:`.health`);
    its summary has ``diverged_at_step`` and ``failure`` (kind "diverged" or
    "collapsed", step, reason). SIGINT or SIGTERM stop the run after the current
    step, write a checkpoint at it and raise :class:`Interrupted`.

    ``config.resume`` continues from the run directory's checkpoint if there
    is one, else starts at step 0; ``asked_to_resume`` (``largebatch train
    --resume``) also says so when there is none. Sweeps and studies resume
    whatever is there and say nothing.
    """
    config.validate(distributed.launched_world_size())
    if config.tensorboard and not tensorboard_installed():
        raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)")
    threads = torch.get_num_threads()
    torch.set_num_threads(run_threads(config.threads))
    # CPU only: a LAMB tuning run whose weights decayed into denormal floats ran 15x
    # slower on a 2-core CPU (17 against 300 steps/s); flushing them to zero keeps the
    # time per step that of the arithmetic. The flag has no effect on CUDA kernels. It
    # is per thread: torch's worker threads have it only if it was set before they
    # started, as the command line does first thing (cli.main).
    flushed = torch.set_flush_denormal(True)
    try:
        context = distributed.setup(config.device)
        try:
            return _train(config, context, asked_to_resume)
        finally:
            distributed.teardown(context)
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)


def run_threads(threads: int | None = None) -> int:
    """torch threads per process: ``threads`` (--threads), else the cores available shared by this machine's ranks."""
    if threads is not None:
        return threads
    import torch.distributed as dist

    local = distributed.local_world_size()
    if dist.is_available() and dist.is_initialized() and "LOCAL_WORLD_SIZE" not in os.environ:
        local = dist.get_world_size()
    return max(1, available_cores() // max(1, local))


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (None where the system does not tell)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def load_data(config: TrainConfig) -> ImageDataset:
    return _load_dataset_once(
        config.dataset, config.data_dir, config.val_size, config.split_seed, config.train_limit, config.test_limit
    )


@functools.lru_cache(maxsize=2)
def _load_dataset_once(name, data_dir, val_size, split_seed, train_limit, test_limit) -> ImageDataset:
    # A sweep trains many runs on the same split: read and standardise it once.
    # Training only indexes these tensors, never writes them.
    return load_dataset(
        name, data_dir=data_dir, val_size=val_size, seed=split_seed, train_limit=train_limit, test_limit=test_limit
    )


class _Run:
    """A run in progress: its parts (:mod:`.parts`), its directory (:mod:`.rundir`) and the step loop (:meth:`run`),
    which logs every step, evaluates, checkpoints and stops on divergence, a signal, --max-steps or the clock."""

    def __init__(self, config: TrainConfig, context: Context):
        self.config, self.context = config, context
        self.directory = RunDirectory(config, context)
        self.run_dir = self.directory.path
        self.data = load_data(config)
        self.parts = build_parts(config, self.data, context)
        self.method, self.shape = self.parts.method, self.parts.shape
        self.model, self.optimizer, self.scheduler = self.parts.model, self.parts.optimizer, self.parts.scheduler
        self.steps_per_epoch = self.shape.steps_per_epoch
        self.position = ckpt.Position(epoch_seed=epoch_seed(config.seed, 0))
        self.evals: list[dict] = []
        self.diverged_at: int | None = None  # the step at which the run was stopped as failed (self.failure)
        self.diverged_loss = math.nan
        self.failure: Failure | None = None
        self.watch = LossWatch(self.data.num_classes,
                               label_entropy(torch.bincount(self.data.train.labels).tolist()))
        self.load_start = load_average()
        self.signal: int | None = None  # the first SIGINT/SIGTERM received
        self.finished_summary: dict | None = None  # set by start() when resuming a finished run
        self._layer_values: dict = {}
        self._draws: tuple[torch.Tensor, torch.Tensor] | None = None  # this epoch's crop-flip draws

    def start(self, asked_to_resume: bool = False) -> None:
        start = self.directory.start(self.parts, self.describe(), asked_to_resume)
        self.position, self.evals, self.finished_summary = start.position, start.evals, start.finished_summary
        if self.position.step and self.finished_summary is None:
            self._replay_watch()

    def _replay_watch(self) -> None:
        """The loss watch as it was at the checkpoint, from the steps logged up to it: a resumed run judges
        the same windows as one that was never stopped. Every rank reads the log (rank 0 may have truncated
        it to the checkpoint already, hence the filter)."""
        for record in read_jsonl(self.run_dir / METRICS):
            step = record.get("step", 0)
            if record.get("kind") != "step" or step > self.position.step:
                continue
            self.watch.add(record["loss"])
            if self._window_ends(step):
                self.watch.window_end(step)

    def _window_ends(self, step: int) -> bool:
        """Whether an evaluation follows ``step``: the end of each loss window the watch judges."""
        every = self.config.eval_every
        return step % self.steps_per_epoch == 0 or bool(every and step % every == 0)

    def describe(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "method": {
                "name": self.method.name, "summary": self.method.summary, "family": self.method.family,
                "scaling": self.method.scaling, "base_lr": self.shape.base_lr,
                "peak_lr": peak_lr(self.method, self.shape), "warmup_steps": warmup_steps(self.method, self.shape),
                "decay": None if self.shape.decay_to is None else f"exponential to {self.shape.decay_to:g} x peak",
                "optimizer": type(self.optimizer).__name__,
                "scheduler": type(self.scheduler).__name__ if self.scheduler is not None else None,
            },
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.shape.total_steps,
            "world_size": self.context.world_size,
            "micro_batches_per_rank": self.config.batch // (self.config.micro_batch * self.context.world_size),
            "device": str(self.context.device),
            "precision": self.config.precision,
            "threads": torch.get_num_threads(),
            "layer_every": self.parts.layer_every,
            "layer": LAYER_DEFINITION,
            "layers": list(self.parts.names.values()),
            "dataset": {
                "name": self.data.name, "source": self.data.source, "train": len(self.data.train),
                "val": len(self.data.val), "test": len(self.data.test),
            },
            "accuracy_checked": self.eval_schedule(),
            "torch_version": torch.__version__,
            "largebatch_version": __version__,
            "python": platform.python_version(),
            "argv": sys.argv,
        }

    def eval_schedule(self) -> str:
        every = self.config.eval_every
        extra = f" and every {every} steps" if every else ""
        return f"test accuracy at the end of every epoch{extra}; validation accuracy at the end of every epoch"

    # -- the step loop -----------------------------------------------------------
    def run(self) -> dict | None:
        if self.finished_summary is not None:
            return self.finished_summary
        config, context = self.config, self.context
        main = context.is_main
        metrics = JsonlLog(self.run_dir / METRICS, enabled=main)
        layers = JsonlLog(self.run_dir / LAYERS, enabled=main)
        board = TensorBoard(self.run_dir, enabled=main and config.tensorboard)
        bar = tqdm(
            total=self.steps_per_epoch * self.parts.epoch_limit, initial=self.position.step,
            disable=not (main and config.progress),
            desc=f"{config.method} B={config.batch}", unit="step", dynamic_ncols=True,
        )
        self.model.train()
        outcome = "finished"
        try:
            with self._stop_on_signals(), self._no_single_sample_warning_at_the_base_batch():
                while self.position.epoch < self.parts.epoch_limit:
                    outcome = self._run_epoch(metrics, layers, board, bar)
                    if outcome != "finished":
                        break
                last = self.evals[-1] if self.evals else {}
                if outcome == "diverged" or (outcome == "t1" and not (
                        last.get("step") == self.position.step and "val_accuracy" in last)):
                    # The model as the run left it (what its summary's accuracy describes).
                    self._evaluate(metrics, board, bar, with_val=True)
        finally:
            bar.close()
            metrics.close()
            layers.close()
            board.close()
        if outcome != "diverged":
            # A diverged run keeps its last finite checkpoint.
            self._save_checkpoint()
        if outcome == "interrupted":
            raise Interrupted(self.signal or signal.SIGINT, self.position.step, ckpt.checkpoint_path(self.run_dir))
        if outcome == "max_steps":
            if main:
                print(f"largebatch: stopped at step {self.position.step} of {self.shape.total_steps} "
                      f"(--max-steps {config.max_steps}); checkpoint in {self.run_dir}, continue with --resume",
                      file=sys.stderr, flush=True)
            return None
        summary = self.summary()
        if main:
            write_json(self.run_dir / SUMMARY, summary)
            if outcome == "diverged":
                print(f"largebatch: {config.method} batch {config.batch} {self.failure.kind} at step "
                      f"{self.diverged_at} ({self.failure.reason}); stopped, summary in {self.run_dir}",
                      file=sys.stderr, flush=True)
        return summary

    @contextlib.contextmanager
    def _no_single_sample_warning_at_the_base_batch(self):
        """LENA and AdaScale warn when a step has n = 1 gradient sample; at (or below) the base batch n = B / b
        is 1 by definition, their gain 1 is the intended one and the warning's advice does not apply."""
        if self.config.batch > self.config.base_batch:
            yield
            return
        from ..optim import SingleSampleWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SingleSampleWarning)
            yield

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM: finish the current step, then stop with a checkpoint; a second signal aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def handler(signum, frame):
            if self.signal is not None:
                raise KeyboardInterrupt
            self.signal = signum
            if self.context.is_main:
                print(f"\nlargebatch: {signal.Signals(signum).name}: stopping after this step with a checkpoint "
                      "(again to abort without one)", file=sys.stderr, flush=True)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _run_epoch(self, metrics: JsonlLog, layers: JsonlLog, board: TensorBoard, bar: tqdm) -> str:
        """Finish the current epoch ("finished"), or stop inside it: "max_steps", "interrupted", "diverged"."""
        config, position = self.config, self.position
        order = epoch_permutation(len(self.data.train), config.seed, position.epoch)
        # Like the order, the epoch's augmentation is a function of (seed, epoch): a resumed run redraws it.
        self._draws = (crop_flip_draws(len(self.data.train), epoch_seed(config.seed, position.epoch))
                       if config.augment == "crop-flip" else None)
        for indices in batch_indices(order, config.batch, position.step_in_epoch):
            record, stop = self._step(indices)
            metrics.write(record)
            board.scalars(record, position.step)
            if position.step % self.parts.layer_every == 0 and self._layer_values:
                layers.write({"step": position.step, "epoch": position.epoch, **self._layer_values})
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.3g}", refresh=False)
            if not math.isfinite(record["loss"]):
                return self._failed(Failure("diverged", position.step, f"the loss was not finite ({record['loss']})",
                                            record["loss"]))
            self.watch.add(record["loss"])
            if self._window_ends(position.step):
                failure = self.watch.window_end(position.step)
                if failure is not None:
                    return self._failed(failure)
            maybe_crash(position.step, self.context, self.run_dir)
            end_of_epoch = position.step_in_epoch == self.steps_per_epoch
            if end_of_epoch or (config.eval_every and position.step % config.eval_every == 0):
                self._evaluate(metrics, board, bar, with_val=end_of_epoch)
            if end_of_epoch:
                position.epoch += 1
                position.step_in_epoch = 0
                position.epoch_seed = epoch_seed(config.seed, position.epoch)
            if self.parts.clock_done():
                return "t1"
            if stop:
                return "interrupted"
            if config.max_steps is not None and position.step >= config.max_steps:
                return "max_steps"
            if config.checkpoint_every and position.step % config.checkpoint_every == 0:
                self._save_checkpoint()
        return "finished"

    def _failed(self, failure: Failure) -> str:
        self.failure = failure
        self.diverged_at, self.diverged_loss = failure.step, failure.loss
        return "diverged"

    def _step(self, indices: torch.Tensor) -> tuple[dict, bool]:
        """One update; returns its record and whether any rank was asked to stop (SIGINT/SIGTERM)."""
        maybe_signal(self.position.step + 1, self.context)
        started, cpu_started = time.perf_counter(), time.process_time()
        config, context = self.config, self.context
        local = distributed.rank_slice(indices, context)
        images = self.data.train.images[local].to(context.device, non_blocking=True)
        labels = self.data.train.labels[local].to(context.device, non_blocking=True)
        if self._draws is not None:
            offsets, flips = self._draws
            images = crop_flip(images, offsets[local], flips[local], self.data.fill)
        self.optimizer.zero_grad(set_to_none=True)
        if self.parts.noise is not None:
            self.parts.noise.reset()
        no_sync = self.parts.wrapped.no_sync if context.distributed else None
        loss = accumulate_gradients(self.parts.wrapped, images, labels, config.micro_batch, no_sync=no_sync,
                                    autocast=self.parts.autocast, scaler=self.parts.scaler)
        lr = float(self.optimizer.param_groups[0]["lr"])
        if self.parts.scaler is None:
            self.optimizer.step()
        else:
            self.parts.scaler.step(self.optimizer)  # unscales first; skips a step with inf/NaN gradients
            self.parts.scaler.update()
        # Read before the scheduler moves the rates: the values of this step.
        due = (self.position.step + 1) % self.parts.layer_every == 0
        self._layer_values = layer_record(self.optimizer, self.parts.names) if due and context.is_main else {}
        if due and self.parts.noise is not None:  # a collective under DDP: every rank reads
            noise = self.parts.noise.read()
            if context.is_main:
                self._layer_values.update(noise)
        if self.scheduler is not None:
            self.scheduler.step()
        # The stop request rides on the loss's all-reduce, so every rank stops after the same step.
        stop = torch.tensor(0.0 if self.signal is None else 1.0, device=loss.device)
        loss, stop = distributed.mean_over_ranks(torch.stack([loss, stop]), context).tolist()
        self.position.step += 1
        self.position.step_in_epoch += 1
        self.position.train_seconds += time.perf_counter() - started
        self.position.train_cpu_seconds += time.process_time() - cpu_started
        record = {
            "kind": "step", "step": self.position.step, "epoch": self.position.epoch, "loss": loss,
            "lr": lr, "train_seconds": self.position.train_seconds,
        }
        if self.parts.scaler is not None:
            record["loss_scale"] = float(self.parts.scaler.get_scale())
        return record, stop > 0

    def _evaluate(self, metrics: JsonlLog, board: TensorBoard, bar: tqdm, with_val: bool) -> None:
        if not self.context.is_main:
            return  # the other ranks go on to the next step and wait for rank 0 in its all-reduce
        position = self.position
        record = {
            "kind": "eval", "step": position.step,
            "epoch": position.epoch + position.step_in_epoch / self.steps_per_epoch,
            "train_seconds": position.train_seconds, "train_cpu_seconds": position.train_cpu_seconds,
            "load": (load_average() or [None])[0],
            "test_accuracy": evaluate(self.model, self.data.test, autocast=self.parts.autocast),
        }
        if with_val and len(self.data.val):
            record["val_accuracy"] = evaluate(self.model, self.data.val, autocast=self.parts.autocast)
        self.evals.append(record)
        metrics.write(record)
        board.scalars(record, position.step)
        bar.set_postfix(test_acc=f"{100 * record['test_accuracy']:.1f}%", refresh=False)

    def _save_checkpoint(self) -> None:
        self.directory.save_checkpoint(self.parts, self.position)

    def summary(self) -> dict:
        final = self.evals[-1] if self.evals else {}
        val = [r["val_accuracy"] for r in self.evals if "val_accuracy" in r]
        return {
            "method": self.config.method, "model": self.config.model, "batch": self.config.batch,
            "seed": self.config.seed, "epochs": self.config.epochs, "base_lr": self.shape.base_lr,
            "micro_batch": self.config.micro_batch, "statistics": self.config.statistics,
            "steps": self.position.step, "train_seconds": self.position.train_seconds,
            # the process's CPU seconds of training (all its threads): less moved by other work than wall time
            "train_cpu_seconds": self.position.train_cpu_seconds,
            "final_test_accuracy": final.get("test_accuracy"),
            "final_val_accuracy": val[-1] if val else None,
            "diverged_at_step": self.diverged_at,
            "diverged_loss": None if self.diverged_at is None else str(self.diverged_loss),
            "failure": None if self.failure is None else self.failure.record(),
            "world_size": self.context.world_size,
            "machine": {
                "device": str(self.context.device), "precision": self.config.precision,
                "threads": torch.get_num_threads(), "cores_available": available_cores(),
                "cpus": os.cpu_count(),
                # 1, 5 and 15 minute load averages at the start and the end of this (part of the) run: a
                # machine busy with other work makes the times to target longer than the method's.
                "load_average_start": self.load_start, "load_average_end": load_average(),
            },
            "evals": [
                {k: r[k] for k in ("step", "epoch", "train_seconds", "train_cpu_seconds", "load", "test_accuracy")
                 if k in r} for r in self.evals
            ],
            **self.parts.clock_summary(self.position.step),
        }

def _train(config: TrainConfig, context: Context, asked_to_resume: bool = False) -> dict | None:
    run = _Run(config, context)
    run.start(asked_to_resume)
    return run.run()

"""What one run trains with, built from its configuration: the model (wrapped in DDP under torchrun), the
method's optimiser and schedule, precision, the statistics' loss scale, and the rule that ends the run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data import ImageDataset
from ..models import build_model
from .config import TrainConfig
from .distributed import Context
from .loop import grad_scaler, precision_context
from .methods import Method, RunShape, base_iterations, build, get_method
from .metrics import layer_names
from .noise import NoiseScaleProbe


def make_model(config: TrainConfig, data: ImageDataset, device: torch.device) -> nn.Module:
    torch.manual_seed(config.seed)
    return build_model(config.model, data.num_classes, data.image_shape[0], data.image_size).to(device)


@dataclass
class Parts:
    method: Method
    shape: RunShape
    model: nn.Module
    wrapped: nn.Module  # the DDP module under torchrun (statistics hooks and no_sync go there), else the model
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    autocast: object
    scaler: torch.amp.GradScaler | None
    noise: NoiseScaleProbe | None  # the noise scale's two terms, recorded with the per-layer values
    names: dict[int, str]
    layer_every: int
    t1: int | None  # a method that ends on its clock (AdaScale) stops when tau reaches T1 ...
    epoch_limit: int  # ... or at clock_cap x the epochs; every other method at its epochs

    def clock_done(self) -> bool:
        return self.t1 is not None and self.optimizer.done(self.t1)

    def clock_summary(self, steps: int) -> dict:
        """Where a run that ends on its clock stopped: "t1" (tau reached T1) or "cap" (clock_cap x epochs)."""
        if self.t1 is None:
            return {}
        tau = float(self.optimizer.progress)
        return {"stopped": "t1" if tau >= self.t1 else "cap", "tau": tau, "base_iterations": self.t1,
                "epochs_used": steps / self.shape.steps_per_epoch, "epoch_cap": self.epoch_limit}


def build_parts(config: TrainConfig, data: ImageDataset, context: Context) -> Parts:
    method = get_method(config.method)
    shape = RunShape(
        base_lr=config.base_lr(), base_batch=config.base_batch, batch=config.batch,
        steps_per_epoch=len(data.train) // config.batch, epochs=config.epochs,
        warmup_fraction=config.warmup_fraction, decay_to=config.decay_to, warmup=config.warmup,
        statistics=config.statistics,
    )
    model = make_model(config, data, context.device)
    wrapped = model
    if context.distributed:
        device_ids = [context.local_rank] if context.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer, scheduler = build(method, model, shape, wrapped)
    scaler = grad_scaler(config.precision, context.device)
    stats = getattr(optimizer, "stats", None)
    if scaler is not None and stats is not None:
        # The statistics carry the loss scale the backwards ran with; the optimiser divides it out.
        stats.grad_scaler = scaler
    t1 = base_iterations(shape) if method.ends_on_clock else None
    return Parts(
        method=method, shape=shape, model=model, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
        autocast=precision_context(config.precision, context.device), scaler=scaler,
        noise=NoiseScaleProbe(wrapped) if config.noise_scale else None, names=layer_names(model),
        layer_every=config.effective_layer_every(shape.total_steps), t1=t1,
        epoch_limit=math.ceil(config.clock_cap * config.epochs) if t1 is not None else config.epochs,
    )

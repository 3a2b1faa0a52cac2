"""A minimal, exact training loop: global batches formed from micro-batches.

The global batch of ``batch_size`` examples is split into micro-batches of at
most ``micro_batch_size``; each micro-batch's mean loss is divided by the
number of micro-batches, so the accumulated gradient is the mean over the
global batch, exactly as one large batch would give (BatchNorm aside, whose
statistics are per micro-batch, as on data-parallel workers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ContextManager

import torch
from torch import nn

from ..data import Split


def global_batches(split: Split, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled global batches; the last incomplete batch is dropped."""
    order = torch.randperm(len(split), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield split.images[idx], split.labels[idx]


def accumulate_gradients(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    micro_batch_size: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    no_sync: Callable[[], ContextManager] | None = None,
    autocast: Callable[[], ContextManager] | None = None,
    scaler: Any = None,
) -> torch.Tensor:
    """Backpropagate the mean loss of a global batch in micro-batches; returns the loss (0-d, on device).

    ``no_sync`` (e.g. DDP's ``model.no_sync``) wraps every micro-batch but the
    last, so data-parallel workers reduce their gradients once per step.
    ``autocast`` (see :func:`precision_context`) wraps each forward and loss;
    ``scaler`` (a ``torch.amp.GradScaler``) scales each backward. The loss
    returned is unscaled, in float32.
    """
    chunks = list(zip(images.split(micro_batch_size), labels.split(micro_batch_size)))
    total = torch.zeros((), device=images.device)
    for i, (x, y) in enumerate(chunks):
        last = i == len(chunks) - 1
        with contextlib.nullcontext() if no_sync is None or last else no_sync():
            with contextlib.nullcontext() if autocast is None else autocast():
                loss = loss_fn(model(x), y) * (len(y) / len(labels))
            (loss if scaler is None else scaler.scale(loss)).backward()
        total += loss.detach().float()
    return total


def precision_context(precision: str, device: torch.device) -> Callable[[], ContextManager] | None:
    """A factory of autocast contexts for ``fp32`` (None), ``bf16`` or ``fp16``, on any device type."""
    if precision == "fp32":
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """A ``torch.amp.GradScaler`` for fp16 (the loss scale keeps small gradients from underflowing), else None."""
    if precision != "fp16":
        return None
    try:
        return torch.amp.GradScaler(device.type)
    except (RuntimeError, ValueError, AttributeError) as e:
        raise ValueError(f"--precision fp16 needs a GradScaler on {device.type}, which this torch lacks ({e}); "
                         "use --precision bf16") from None


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of one epoch, a function of (seed, epoch) alone.

    Resuming at any step of any epoch needs no generator state: the
    permutation is rebuilt from its seed and the steps already taken skipped.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_examples, generator=generator)


def epoch_seed(seed: int, epoch: int) -> int:
    # A large odd multiplier keeps (seed, epoch) pairs from colliding.
    return (seed * 1_000_003 + epoch) % (2**63)


def batch_indices(order: torch.Tensor, batch_size: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Index tensors of the global batches of one epoch from ``start_step`` on (incomplete batch dropped)."""
    for start in range(start_step * batch_size, len(order) - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 2048,
             autocast: Callable[[], ContextManager] | None = None) -> float:
    """Top-1 accuracy on a split, on the model's device (one host sync at the end)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in zip(split.images.split(batch_size), split.labels.split(batch_size)):
        with contextlib.nullcontext() if autocast is None else autocast():
            logits = model(x.to(device, non_blocking=True))
        correct += (logits.argmax(1) == y.to(device, non_blocking=True)).sum()
    model.train(was_training)
    return correct.item() / len(split)

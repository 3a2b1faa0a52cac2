"""A minimal, exact training loop: global batches formed from micro-batches.

The global batch of ``batch_size`` examples is split into micro-batches of at
most ``micro_batch_size``; each micro-batch's mean loss is divided by the
number of micro-batches, so the accumulated gradient is the mean over the
global batch, exactly as one large batch would give (BatchNorm aside, whose
statistics are per micro-batch, as on data-parallel workers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
) -> torch.Tensor:
    """Backpropagate the mean loss of a global batch in micro-batches; returns the loss (0-d, on device)."""
    chunks = list(zip(images.split(micro_batch_size), labels.split(micro_batch_size)))
    total = torch.zeros((), device=images.device)
    for x, y in chunks:
        loss = loss_fn(model(x), y) * (len(y) / len(labels))
        loss.backward()
        total += loss.detach()
    return total


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 2048) -> float:
    """Top-1 accuracy on a split (one host sync at the end)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    for x, y in zip(split.images.split(batch_size), split.labels.split(batch_size)):
        correct += (model(x).argmax(1) == y).sum()
    model.train(was_training)
    return correct.item() / len(split)

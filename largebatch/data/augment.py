"""Training-time augmentation on tensors on the training device: ``crop-flip``, the random 4-pixel-padded
crop and horizontal flip of the CIFAR papers (He et al. 2016, Sec. 4.2; torchvision's
``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()``, which the LENA and CLARS code use).

The random draws of an epoch are a function of (seed, epoch) alone, made on the CPU for every training
example at once, as the epoch's order is: a run resumed at any step draws what it drew before, on any
device and any number of ranks (each rank takes the draws of its own examples).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop-flip")
PADDING = 4
# Keeps the augmentation's stream apart from the epoch permutation's, which is seeded by the same (seed, epoch).
_SALT = 0x9E3779B97F4A7C15


def crop_flip_draws(num_examples: int, epoch_seed: int, padding: int = PADDING) -> tuple[torch.Tensor, torch.Tensor]:
    """Per training example (by its index in the training set): the crop's (row, column) offsets in
    [0, 2 * padding] and whether to flip, drawn from a generator seeded by ``epoch_seed``."""
    generator = torch.Generator().manual_seed((epoch_seed + _SALT) % 2**63)
    offsets = torch.randint(0, 2 * padding + 1, (num_examples, 2), generator=generator)
    flips = torch.randint(0, 2, (num_examples,), generator=generator).bool()
    return offsets, flips


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
              fill: Sequence[float] | None = None, padding: int = PADDING) -> torch.Tensor:
    """Pad ``images`` (N, C, H, W) by ``padding`` pixels with ``fill`` (per channel; None: 0), crop each back
    to H x W at its ``offsets`` (N, 2) and flip those marked in ``flips`` (N,), on the images' device.

    ``fill`` is the standardised value of black, so the padding is the black border torchvision's
    RandomCrop adds before normalisation.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    if fill is not None and any(fill):
        border = torch.ones(1, 1, h, w, dtype=images.dtype, device=images.device)
        border = F.pad(border, (padding, padding, padding, padding)) == 0
        value = torch.tensor(list(fill), dtype=images.dtype, device=images.device).view(1, c, 1, 1)
        padded = torch.where(border, value, padded)
    offsets = offsets.to(images.device)
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[:, 1:] + torch.arange(w, device=images.device)  # (N, W)
    flips = flips.to(images.device)
    # A flipped crop reads its columns right to left.
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # (N, H, W, C) by advanced indexing over (example, row, column), then back to (N, C, H, W).
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()

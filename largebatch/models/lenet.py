"""LeNet-5 (LeCun et al. 1998) for 28x28 inputs, with optional BatchNorm.

The classic 32x32 layout is kept by padding the first convolution by 2:
conv5x5(6) -> pool -> conv5x5(16) -> pool -> 120 -> 84 -> classes.
ReLU and max-pooling replace the original tanh and subsampling, as is usual
today. With ``batch_norm=True`` a BatchNorm follows each convolution and each
hidden fully connected layer (the LENA study's "LeNet-5 with BatchNorm").
"""

from __future__ import annotations

from torch import nn


def _maybe_bn(batch_norm: bool, features: int, dims: int) -> list[nn.Module]:
    if not batch_norm:
        return []
    return [nn.BatchNorm2d(features) if dims == 2 else nn.BatchNorm1d(features)]


class LeNet5(nn.Sequential):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, batch_norm: bool = False):
        bias = not batch_norm  # a bias before BatchNorm is cancelled by its mean
        super().__init__(
            nn.Conv2d(in_channels, 6, 5, padding=2, bias=bias), *_maybe_bn(batch_norm, 6, 2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, bias=bias), *_maybe_bn(batch_norm, 16, 2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120, bias=bias), *_maybe_bn(batch_norm, 120, 1), nn.ReLU(),
            nn.Linear(120, 84, bias=bias), *_maybe_bn(batch_norm, 84, 1), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

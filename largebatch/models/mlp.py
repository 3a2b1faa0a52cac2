"""Multi-layer perceptron for 28x28 images (the datasets.md throughput baseline: 784-512-512-10)."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (512, 512), num_classes: int = 10):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)

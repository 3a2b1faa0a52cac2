"""Small models for the experiments: MLP, LeNet-5 (with and without BatchNorm), ResNet-20."""

from __future__ import annotations

from torch import nn

from .lenet import LeNet5
from .mlp import MLP
from .resnet import ResNet20

MODELS = ("mlp", "lenet5", "lenet5-bn", "resnet20")


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Build a model by name (one of MODELS)."""
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes=num_classes)
    if name in ("lenet5", "lenet5-bn"):
        return LeNet5(num_classes, in_channels, batch_norm=name == "lenet5-bn")
    if name == "resnet20":
        return ResNet20(num_classes, in_channels)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


__all__ = ["MLP", "LeNet5", "ResNet20", "MODELS", "build_model"]

"""Small models for the experiments: MLP, LeNet-5 (with and without BatchNorm), ResNet-20, ResNet-18 (CIFAR
variant); or the user's own, named ``package.module:callable``."""

from __future__ import annotations

from torch import nn

from .lenet import LeNet5
from .mlp import MLP
from .resnet import ResNet18, ResNet20
from .user import check_spec, is_callable_spec

MODELS = ("mlp", "lenet5", "lenet5-bn", "resnet20", "resnet18")


def check_model_name(name: str, option: str = "--model") -> None:
    """A one-line ValueError unless ``name`` is one of MODELS or has the form ``package.module:callable``."""
    if is_callable_spec(name):
        check_spec(name, option)
    elif name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, or give your own as "
                         "package.module:callable")


def build_model(name: str, num_classes: int = 10, in_channels: int = 1,
                image_size: int | tuple[int, int] = 28) -> nn.Module:
    """Build a model by name: one of MODELS, or ``package.module:callable``.

    The user's callable is imported from the working directory or the Python path and called with the
    keyword arguments ``num_classes`` (int), ``in_channels`` (int) and ``image_size`` (the side, an int, of
    square images; ``(height, width)`` otherwise), of those its signature accepts (all of them when it takes
    ``**kwargs``). It must return a ``torch.nn.Module`` that maps ``(N, in_channels, height, width)`` float
    images to ``(N, num_classes)`` logits. A failed import or call, or another return value, raises a
    ValueError of one line.
    """
    check_model_name(name)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if is_callable_spec(name):
        from .user import call_with, import_callable

        model = call_with(import_callable(name, "--model"), name, "--model", num_classes=num_classes,
                          in_channels=in_channels, image_size=image_size)
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model {name} returned an object of type {type(model).__name__}, not a torch.nn.Module")
        return model
    if name == "mlp":
        return MLP(in_channels * height * width, num_classes=num_classes)
    if name in ("lenet5", "lenet5-bn"):
        return LeNet5(num_classes, in_channels, batch_norm=name == "lenet5-bn")
    if name == "resnet20":
        return ResNet20(num_classes, in_channels)
    return ResNet18(num_classes, in_channels)


__all__ = ["MLP", "MODELS", "LeNet5", "ResNet18", "ResNet20", "build_model", "check_model_name"]

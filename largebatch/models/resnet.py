"""CIFAR-style ResNet-20 (He et al. 2016, Sec. 4.2): 3 stages of 3 basic blocks, 16/32/64 channels; and
ResNet-18 in its CIFAR variant (ResNet18 below).

Shortcuts that change shape use a strided 1x1 convolution with BatchNorm
(option B of the paper), which also works for 1-channel 28x28 inputs.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, blocks_per_stage: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                stages.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016, Table 1: four stages of two basic blocks, 64/128/256/512 channels), in the
    CIFAR variant: a 3x3 stride-1 stem and no max-pool, as in the CIFAR ResNet-18 of the large-batch
    literature (e.g. github.com/kuangliu/pytorch-cifar, models/resnet.py). Shortcuts that change shape are
    strided 1x1 convolutions with BatchNorm (option B).

    How it differs from the ImageNet-stem ResNet-18 of torchvision (``torchvision.models.resnet18``), which
    the LENA authors' code trains on 32x32 CIFAR images:

    * torchvision's stem is a 7x7 stride-2 convolution followed by a 3x3 stride-2 max-pool, so a 32x32
      image is 8x8 when it enters the first stage and 1x1 in the last (a 3x3 convolution there sees one
      real pixel and eight of padding). Here the stem keeps 32x32: the stages work on 32, 16, 8 and 4
      pixels square.
    * So this model does 15x the work per 32x32 image of torchvision's (0.555 against 0.037 G
      multiply-adds, counted with torch.utils.flop_counter), with nearly the same parameters (11.17M: the
      stem has 1,728 weights instead of 9,408). Accuracies and step times of the two are not comparable.
    * ``in_channels`` is free (torchvision's stem takes 3 channels).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for i in range(2):
                stages.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

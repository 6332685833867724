"""Replicas of torchvision's ResNet blocks (``torchvision/models/resnet.py``, 0.28), for tests that
must run where torchvision cannot be imported. ``as_torchvision`` gives a copy of a class that
claims torchvision's qualified name, to test the built-in matching."""

from __future__ import annotations

import torch
from torch import nn


def conv3x3(i: int, o: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(i, o, 3, stride, 1, bias=False)


def conv1x1(i: int, o: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(i, o, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        nn.Module.__init__(self)  # (not super(): as_torchvision copies the class)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        nn.Module.__init__(self)  # (not super(): as_torchvision copies the class)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def as_torchvision(cls: type) -> type:
    """A subclass-free copy of ``cls`` whose qualified name is torchvision's."""
    copy = type(cls.__name__, (nn.Module,), dict(cls.__dict__))
    copy.__module__ = "torchvision.models.resnet"
    copy.__qualname__ = cls.__name__
    return copy


def tiny_resnet(block: type, widths=(8, 16), blocks=1) -> nn.Sequential:
    """stem (conv, BN, ReLU) + one stage per width (the first block of a stage downsamples) + head."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                               nn.ReLU(inplace=True)]
    inp = widths[0]
    for i, w in enumerate(widths):
        for j in range(blocks):
            stride = 2 if i > 0 and j == 0 else 1
            out = w * block.expansion
            down = None
            if stride != 1 or inp != out:
                down = nn.Sequential(conv1x1(inp, out, stride), nn.BatchNorm2d(out))
            layers.append(block(inp, w, stride, down))
            inp = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inp, 5)]
    return nn.Sequential(*layers)

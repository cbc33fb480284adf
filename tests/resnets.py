"""Test models: a CIFAR ResNet-18 (3x3 stem, BasicBlocks [2, 2, 2, 2], BatchNorm) of any width, a max-pooling CNN."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm, ReLU, and a shortcut (a strided 1x1 conv + BatchNorm when the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W)`` → ``(N, C_out, H / stride, W / stride)``."""
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet18(width: int = 64, classes: int = 10) -> nn.Sequential:
    """ResNet-18 for ``(N, 3, 32, 32)`` images → ``(N, classes)`` logits, in eval mode (BatchNorm running statistics).

    ``width`` 64 is the standard network (11.2M parameters); the tests use narrower ones.
    """
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for stage, multiple in enumerate((1, 2, 4, 8)):
        for block in range(2):
            stride = 2 if block == 0 and stage > 0 else 1
            layers.append(BasicBlock(channels, width * multiple, stride))
            channels = width * multiple
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    model = nn.Sequential(*layers)
    with torch.no_grad():  # running statistics that are not the identity, so eval-mode BatchNorm is exercised
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def max_pooling_cnn(classes: int = 10) -> nn.Sequential:
    """conv 16, conv 32 (3x3, each followed by 2x2 max-pooling), Linear: ``(N, 3, 32, 32)`` → ``(N, classes)``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, classes),
    )


class InPlaceBasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` as written there: one ``ReLU(inplace=True)`` module and ``out += identity``."""

    def __init__(self, channels: int, inplace: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` → ``(N, C, H, W)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.relu(out)


def torchvision_style_resnet(width: int = 4, classes: int = 3, inplace: bool = True) -> nn.Sequential:
    """A tiny ResNet written as torchvision's: stem conv, BatchNorm, ``ReLU(inplace=True)``, 3x3 stride-2 max-pooling,
    one :class:`InPlaceBasicBlock`, average pooling and a Linear head, float64, eval mode: ``(N, 3, H, W)`` →
    ``(N, classes)``. ``inplace=False``: the same network (same weights) with every in-place op out of place.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=inplace),
        nn.MaxPool2d(3, 2, 1),
        InPlaceBasicBlock(width, inplace),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    ).double()
    with torch.no_grad():  # BatchNorm that is not the identity
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()

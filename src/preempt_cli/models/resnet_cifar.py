"""ResNet-18 for CIFAR (the common 32x32 adaptation of He et al. 2016's ImageNet ResNet-18).

Differs from the ImageNet model by its stem: one 3x3 stride-1 convolution, no max-pool, so four stages
(widths 64, 128, 256, 512) run at 32, 16, 8 and 4 pixels. A shortcut that changes shape is a 1x1
convolution plus BatchNorm (``downsample``), as in torchvision.

Canonical ``state_dict`` keys (checked against ``cifar10_resnet18_std``, from fra31/auto-attack):
``conv1``, ``bn1``, ``layer{1..4}.{i}.{conv1,bn1,conv2,bn2}``, ``layer{2,3,4}.0.downsample.{0,1}``, ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_arch

__all__ = ["ResNetCifar", "BasicBlock"]


class BasicBlock(nn.Module):
    """Post-activation basic block with a projection (``downsample``) shortcut when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class ResNetCifar(nn.Module):
    """ResNet with basic blocks and a CIFAR stem.

    Args:
        layers: number of blocks in each of the four stages (``(2, 2, 2, 2)`` for ResNet-18).
        num_classes: number of output logits.
        widths: channels of the four stages.

    Raises:
        ValueError: ``layers`` and ``widths`` differ in length.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"layers and widths need 4 stages each, got {list(layers)} and {list(widths)}")
        self.num_classes = num_classes
        self.num_features = widths[-1]

        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_chs = widths[0]
        stages = []
        for i, (depth, out_chs) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(in_chs, out_chs, stride=2 if i > 0 and j == 0 else 1))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map, ``[N, 512, H/8, W/8]``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool (``avg_pool2d(4)`` on 32x32 inputs) and classifier."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_arch
def resnet18_cifar(*, num_classes: int = 10) -> ResNetCifar:
    """ResNet-18 with a CIFAR stem (11.2M parameters)."""
    return ResNetCifar(layers=(2, 2, 2, 2), num_classes=num_classes)

"""Wide Residual Networks for CIFAR (Zagoruyko and Komodakis, BMVC 2016).

WRN-``depth``-``k``: three groups of ``(depth - 4) / 6`` pre-activation basic blocks with widths
``16k, 32k, 64k``. Key names follow RobustBench's (and TRADES') ``WideResNet``: ``conv1``,
``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2}``, ``block{1,2,3}.layer.0.convShortcut`` (1x1 projection
when the width changes), ``bn1`` (final BatchNorm, followed by ReLU), ``fc``.

When a block changes width, both branches start from the pre-activated input ``relu(bn1(x))``; otherwise
the shortcut is the raw input (as in the reference code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_arch

__all__ = ["WideResNet", "WideBasicBlock", "NetworkBlock"]


class WideBasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_chs == out_chs
        self.convShortcut: nn.Conv2d | None = None  # noqa: N815 (canonical key name)
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(
                in_chs, out_chs, kernel_size=1, stride=stride, padding=0, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = self.relu2(self.bn2(self.conv1(out)))
        out = self.conv2(out)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A group of ``num_blocks`` blocks; the first one changes width and stride."""

    def __init__(self, num_blocks: int, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1)
                for i in range(num_blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs.

    Args:
        depth: total depth, ``6n + 4`` (16, 22, 28, 34, 40, 70, ...).
        widen_factor: width multiplier ``k``.
        num_classes: number of output logits.

    Raises:
        ValueError: ``depth`` is not ``6n + 4`` or ``widen_factor`` is not positive.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 (16, 22, 28, 34, 40, 70, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.num_features = widths[3]

        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], stride=1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], stride=2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map after the final BN-ReLU, ``[N, 64k, H/4, W/4]``."""
        x = self.conv1(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        return self.relu(self.bn1(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool (``avg_pool2d(8)`` on 32x32 inputs) and classifier."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_arch
def wide_resnet(*, depth: int = 28, widen_factor: int = 10, num_classes: int = 10) -> WideResNet:
    """WRN of any ``depth`` (6n+4) and ``widen_factor``."""
    return WideResNet(depth=depth, widen_factor=widen_factor, num_classes=num_classes)


@register_arch
def wide_resnet28_10(*, num_classes: int = 10) -> WideResNet:
    """WRN-28-10 (36.5M parameters)."""
    return WideResNet(depth=28, widen_factor=10, num_classes=num_classes)


@register_arch
def wide_resnet34_10(*, num_classes: int = 10) -> WideResNet:
    """WRN-34-10 (46.2M parameters)."""
    return WideResNet(depth=34, widen_factor=10, num_classes=num_classes)


@register_arch
def wide_resnet34_20(*, num_classes: int = 10) -> WideResNet:
    """WRN-34-20 (184.5M parameters)."""
    return WideResNet(depth=34, widen_factor=20, num_classes=num_classes)


@register_arch
def wide_resnet70_16(*, num_classes: int = 10) -> WideResNet:
    """WRN-70-16 (266.8M parameters)."""
    return WideResNet(depth=70, widen_factor=16, num_classes=num_classes)

"""Pre-activation ResNet-18 for CIFAR (He et al. 2016, "Identity Mappings in Deep Residual Networks").

The backbone family of Gowal et al. 2020 ("Uncovering the Limits of Adversarial Training") and of the Fast
Preemption paper. Key names follow RobustBench's ``PreActResNet`` (with ``bn_before_fc=True``):
``conv1``, ``layer{1..4}.{i}.{bn1,conv1,bn2,conv2}``, ``layer{2,3,4}.0.shortcut.0`` (1x1 projection),
``bn`` (final BatchNorm, followed by ReLU), ``linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_arch

__all__ = ["PreActResNet", "PreActBlock"]


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus shortcut.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: stride of the first convolution (and of the projection shortcut).
        preact_shortcut: feed the projection shortcut the pre-activated input ``relu(bn1(x))``, as He et
            al. 2016, DeepMind's model zoo and RobustBench's ``PreActBlockV2`` do; ``False`` feeds it the
            raw input ``x`` (RobustBench's ``PreActBlock``). Identity shortcuts always take ``x``.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, preact_shortcut: bool = True) -> None:
        super().__init__()
        self.preact_shortcut = preact_shortcut
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(out if self.preact_shortcut else x)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with a CIFAR stem (3x3 stride-1 convolution, no max-pool).

    Args:
        layers: number of blocks in each of the four stages (``(2, 2, 2, 2)`` for PreActResNet-18).
        num_classes: number of output logits.
        widths: channels of the four stages.
        preact_shortcut: see :class:`PreActBlock`.

    Raises:
        ValueError: ``layers`` or ``widths`` do not have four stages.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        widths: Sequence[int] = (64, 128, 256, 512),
        preact_shortcut: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"layers and widths need 4 stages each, got {list(layers)} and {list(widths)}")
        self.num_classes = num_classes
        self.num_features = widths[-1]

        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        in_chs = widths[0]
        stages = []
        for i, (depth, out_chs) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(PreActBlock(in_chs, out_chs, stride, preact_shortcut=preact_shortcut))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(self.num_features)
        self.linear = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map after the final BN-ReLU, ``[N, 512, H/8, W/8]``."""
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return F.relu(self.bn(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool (``avg_pool2d(4)`` on 32x32 inputs) and classifier."""
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_arch
def preact_resnet18(*, num_classes: int = 10, preact_shortcut: bool = True) -> PreActResNet:
    """PreActResNet-18 (11.2M parameters)."""
    return PreActResNet(layers=(2, 2, 2, 2), num_classes=num_classes, preact_shortcut=preact_shortcut)

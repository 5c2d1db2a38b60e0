"""ResNeXt-29 for CIFAR (Xie et al. 2017), as used by AugMix (Hendrycks et al. 2020).

Follows ``third_party/ResNeXt_DenseNet/models/resnext.py`` of google-research/augmix (from
D-X-Y/ResNeXt-DenseNet), which RobustBench's ``Hendrycks2020AugMix_ResNeXt`` also uses. Key names:
``conv_1_3x3``, ``bn_1``, ``stage_{1,2,3}.{i}.{conv_reduce,bn_reduce,conv_conv,bn,conv_expand,bn_expand}``,
``stage_{1,2,3}.0.downsample.{0,1}`` (1x1 projection + BN), ``classifier``.

Three stages of ``(depth - 2) / 9`` bottlenecks with ``planes`` 64, 128, 256 and 4x expansion (outputs
256, 512, 1024). A bottleneck's grouped 3x3 convolution has ``cardinality`` groups of
``floor(planes * base_width / 64)`` channels. Note that AugMix's ``resnext29()`` (and RobustBench) build
it with ``cardinality=4, base_width=32``: that is the default of :func:`resnext29_32x4d` so that its
weights load; ``cardinality=32, base_width=4`` gives the paper's ResNeXt-29 32x4d layout (same key
names and shapes except ``conv_conv``, whose input channels per group change).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_arch

__all__ = ["CifarResNeXt", "ResNeXtBottleneck"]


class ResNeXtBottleneck(nn.Module):
    """ResNeXt bottleneck, type C: 1x1 reduce, grouped 3x3, 1x1 expand (x4), plus shortcut, then ReLU."""

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        cardinality: int,
        base_width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dim = int(math.floor(planes * (base_width / 64.0))) * cardinality
        out_chs = planes * self.expansion
        self.conv_reduce = nn.Conv2d(in_chs, dim, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_reduce = nn.BatchNorm2d(dim)
        self.conv_conv = nn.Conv2d(
            dim, dim, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False
        )
        self.bn = nn.BatchNorm2d(dim)
        self.conv_expand = nn.Conv2d(dim, out_chs, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_chs)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn_reduce(self.conv_reduce(x)))
        out = F.relu(self.bn(self.conv_conv(out)))
        out = self.bn_expand(self.conv_expand(out))
        return F.relu(shortcut + out)


class CifarResNeXt(nn.Module):
    """ResNeXt for 32x32 inputs with ``depth = 9n + 2`` layers.

    Args:
        depth: total depth, ``9n + 2`` (29, 38, 47, 56, ...).
        cardinality: number of groups in the 3x3 convolutions.
        base_width: channels per group in the first stage, for ``planes = 64``.
        num_classes: number of output logits.

    Raises:
        ValueError: ``depth`` is not ``9n + 2``, or ``cardinality``/``base_width`` is not positive.
    """

    def __init__(
        self, depth: int = 29, cardinality: int = 4, base_width: int = 32, num_classes: int = 10
    ) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"depth must be 9n+2 (29, 38, 47, 56, ...), got {depth}")
        if cardinality < 1 or base_width < 1:
            raise ValueError(f"cardinality and base_width must be positive, got {cardinality}, {base_width}")
        n = (depth - 2) // 9
        self.cardinality = cardinality
        self.base_width = base_width
        self.num_classes = num_classes

        self.conv_1_3x3 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self.in_chs = 64
        self.stage_1 = self._make_stage(64, n, stride=1)
        self.stage_2 = self._make_stage(128, n, stride=2)
        self.stage_3 = self._make_stage(256, n, stride=2)
        self.num_features = self.in_chs
        self.classifier = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        out_chs = planes * ResNeXtBottleneck.expansion
        downsample = None
        if stride != 1 or self.in_chs != out_chs:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        blocks = [
            ResNeXtBottleneck(self.in_chs, planes, self.cardinality, self.base_width, stride, downsample)
        ]
        self.in_chs = out_chs
        for _ in range(1, num_blocks):
            blocks.append(ResNeXtBottleneck(self.in_chs, planes, self.cardinality, self.base_width))
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map, ``[N, 1024, H/4, W/4]``."""
        x = F.relu(self.bn_1(self.conv_1_3x3(x)))
        x = self.stage_1(x)
        x = self.stage_2(x)
        return self.stage_3(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool (``AvgPool2d(8)`` on 32x32 inputs) and classifier."""
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_arch
def resnext29_32x4d(*, num_classes: int = 10, cardinality: int = 4, base_width: int = 32) -> CifarResNeXt:
    """ResNeXt-29 of AugMix (6.8M parameters with the defaults, which match its weights)."""
    return CifarResNeXt(depth=29, cardinality=cardinality, base_width=base_width, num_classes=num_classes)

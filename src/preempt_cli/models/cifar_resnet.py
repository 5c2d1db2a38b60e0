"""CIFAR ResNet of He et al. 2016 (depth 6n+2: ResNet-20/32/44/56).

Paper: "Deep Residual Learning for Image Recognition", He, Zhang, Ren, Sun, CVPR 2016, section 4.2.

Three stages of ``n`` basic blocks (widths 16, 32, 64) on 32x32 inputs. A shortcut that changes shape has
no parameters ("option A"): it subsamples ``x[:, :, ::2, ::2]`` and fills the new channels with zeros.
Public checkpoints disagree on *where* the zero channels go, and the outputs differ, so the choice is an
argument:

* ``"pad_both"``: half the zero channels before the old ones and half after
  (akamaster/pytorch_resnet_cifar10).
* ``"pad_end"``: all zero channels after the old ones (``cat([x, zeros])``, e.g. the PNI code).

Canonical ``state_dict`` keys: ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``fc``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ._layout import memory_layout
from ._registry import register_arch

__all__ = ["CifarResNet", "BasicBlock", "PadShortcut", "ShortcutType"]

ShortcutType = Literal["pad_both", "pad_end"]
_SHORTCUTS: tuple[str, ...] = get_args(ShortcutType)


class PadShortcut(nn.Module):
    """Parameter-free shortcut ("option A"): spatial subsampling plus zero channels.

    Args:
        in_chs: channels of the input.
        out_chs: channels of the output (``>= in_chs``).
        stride: spatial subsampling step.
        mode: ``"pad_both"`` splits the zero channels before and after; ``"pad_end"`` appends them.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, mode: ShortcutType) -> None:
        super().__init__()
        self.stride = stride
        extra = out_chs - in_chs
        if mode == "pad_both":
            self.pad = (extra // 2, extra - extra // 2)
        else:
            self.pad = (0, extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_shortcut(x, self.stride, self.pad)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


@torch.fx.wrap  # one node in a traced graph: fx would otherwise record the slice and pad, and lose the backward
def pad_shortcut(x: torch.Tensor, stride: int, pad: tuple[int, int]) -> torch.Tensor:
    """``x[:, :, ::stride, ::stride]`` with ``pad`` zero channels before and after."""
    return _PadShortcutFunction.apply(x, stride, pad)


class _PadShortcutFunction(torch.autograd.Function):
    """The shortcut, whose gradient keeps the input's memory layout. Autograd's own (through the slice's
    backward) comes back in NCHW for a channels-last input, and every pass over it and a channels-last
    tensor after it is slower: about 3% of the engine's time on 2 CPU cores (ResNet-20, 0.15.0)."""

    @staticmethod
    def forward(ctx, x, stride, pad):  # type: ignore[override]
        ctx.meta = (x.shape, stride, pad, memory_layout(x))
        return F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, *pad))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        shape, stride, pad, layout = ctx.meta
        grad_x = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=layout).zero_()
        grad_x[:, :, ::stride, ::stride] = grad[:, pad[0] : grad.shape[1] - pad[1]]
        return grad_x, None, None


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, shortcut: ShortcutType = "pad_both"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        if stride != 1 or in_chs != out_chs:
            self.shortcut: nn.Module = PadShortcut(in_chs, out_chs, stride, shortcut)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``depth = 6n + 2`` layers.

    Args:
        depth: total depth, ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: number of output logits.
        shortcut: where the zero channels of the parameter-free shortcut go (see module docstring).
        widths: channels of the three stages.

    Raises:
        ValueError: ``depth`` is not ``6n + 2`` or ``shortcut`` is unknown.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        shortcut: ShortcutType = "pad_both",
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        if shortcut not in _SHORTCUTS:
            raise ValueError(f"shortcut must be one of {', '.join(_SHORTCUTS)}, got {shortcut!r}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = widths[-1]

        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_chs = widths[0]
        stages = []
        for i, out_chs in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_chs, out_chs, stride if j == 0 else 1, shortcut))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map, ``[N, 64, H/4, W/4]``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and classifier."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cifar_resnet(depth: int, *, num_classes: int, shortcut: ShortcutType) -> CifarResNet:
    return CifarResNet(depth=depth, num_classes=num_classes, shortcut=shortcut)


@register_arch
def cifar_resnet20(*, num_classes: int = 10, shortcut: ShortcutType = "pad_both") -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters)."""
    return _create_cifar_resnet(20, num_classes=num_classes, shortcut=shortcut)


@register_arch
def cifar_resnet32(*, num_classes: int = 10, shortcut: ShortcutType = "pad_both") -> CifarResNet:
    """CIFAR ResNet-32 (0.46M parameters)."""
    return _create_cifar_resnet(32, num_classes=num_classes, shortcut=shortcut)


@register_arch
def cifar_resnet44(*, num_classes: int = 10, shortcut: ShortcutType = "pad_both") -> CifarResNet:
    """CIFAR ResNet-44 (0.66M parameters)."""
    return _create_cifar_resnet(44, num_classes=num_classes, shortcut=shortcut)


@register_arch
def cifar_resnet56(*, num_classes: int = 10, shortcut: ShortcutType = "pad_both") -> CifarResNet:
    """CIFAR ResNet-56 (0.85M parameters)."""
    return _create_cifar_resnet(56, num_classes=num_classes, shortcut=shortcut)

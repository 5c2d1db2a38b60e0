"""DeepMind's WideResNet and PreActResNet for CIFAR, as RobustBench builds them (``DMWideResNet``,
``DMPreActResNet`` in ``robustbench/model_zoo/architectures/dm_wide_resnet.py``, from
``deepmind-research/adversarial_robustness``).

They differ from the TRADES-style nets of :mod:`.wide_resnet` and :mod:`.preact_resnet` in ways that change
the outputs, not just the key names:

* the input is normalized *inside* the net, by ``mean``/``std`` buffers of shape ``[C, 1, 1]`` that are part of
  the state dict (so the registry row's own ``mean``/``std`` must be ``"none"``);
* the activation is a parameter, SiLU (Swish) for the models of Gowal et al. 2021 and Bartoldson et al. 2024;
* the first 3x3 convolution of each block pads by hand like TensorFlow's ``SAME``: one pixel on every side at
  stride 1, but only right and bottom at stride 2;
* PreActResNet's projection shortcut is a 3x3 convolution of the raw (not pre-activated) input.

Key names are RobustBench's, so a converted RobustBench checkpoint (``preempt models convert``) loads with
``strict=True``: ``mean``, ``std``, ``init_conv``, ``layer.{g}.block.{i}.{batchnorm_0,conv_0,batchnorm_1,
conv_1,shortcut}``, ``batchnorm``, ``logits`` for the WideResNet; ``conv_2d``, ``layer_{s}.{i}.{batchnorm_0,
conv_2d_1,batchnorm_1,conv_2d_2,shortcut}``, ``batchnorm``, ``logits`` for the PreActResNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_arch

__all__ = ["DMWideResNet", "DMPreActResNet", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

_ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU}


def _activation(name: str) -> type[nn.Module]:
    try:
        return _ACTIVATIONS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {name!r}") from None


def _same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorFlow ``SAME`` padding of a 3x3 convolution: (1, 1, 1, 1) at stride 1, (0, 1, 0, 1) at stride 2."""
    if stride == 1:
        return F.pad(x, (1, 1, 1, 1))
    if stride == 2:
        return F.pad(x, (0, 1, 0, 1))
    raise ValueError(f"unsupported stride {stride}")


class _Normalize(nn.Module):
    """Shared by both nets: the ``mean``/``std`` buffers (``[C, 1, 1]``, in the state dict)."""

    #: the net normalizes its input itself: the wrapper must not (see ``models._load``)
    normalizes_input = True

    def _init_normalize(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std need one value per input channel, got {list(mean)} and {list(std)}")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(len(mean), 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(len(std), 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class DMWideBlock(nn.Module):
    """Pre-activation basic block. With a projection (the width changes), both branches start from the
    activated input; otherwise the identity shortcut takes the raw input."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(in_chs)
        self.relu_0 = act()  # named relu_* whatever the activation, as in the reference
        self.conv_0 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_chs)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_chs != out_chs
        self.shortcut = (
            nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, padding=0, bias=False) if self.has_shortcut else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu_0(self.batchnorm_0(x))
        out = self.conv_0(_same_pad(pre, self.stride))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return (self.shortcut(pre) if self.shortcut is not None else x) + out


class DMBlockGroup(nn.Module):
    """``num_blocks`` blocks under ``.block``; the first changes width and stride."""

    def __init__(self, num_blocks: int, in_chs: int, out_chs: int, stride: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.block = nn.Sequential(*[
            DMWideBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, act) for i in range(num_blocks)
        ])  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(_Normalize):
    """DeepMind's WRN-``depth``-``width`` for 32x32 inputs, normalizing its input itself.

    Args:
        depth: total depth, ``6n + 4`` (28, 34, 70, 94, 106, ...).
        width: width multiplier.
        num_classes: number of output logits.
        activation: ``silu`` (also ``swish``) or ``relu``.
        mean, std: per-channel normalization (the buffers a checkpoint overwrites).

    Raises:
        ValueError: ``depth`` is not ``6n + 4``, ``width`` is not positive, or an unknown activation.
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        activation: str = "silu",
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 (28, 34, 70, 94, ...), got {depth}")
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        act = _activation(activation)
        self._init_normalize(mean, std)
        n = (depth - 4) // 6
        chs = [16, 16 * width, 32 * width, 64 * width]
        self.num_classes = num_classes
        self.num_features = chs[3]
        self.init_conv = nn.Conv2d(len(mean), chs[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            DMBlockGroup(n, chs[0], chs[1], 1, act),
            DMBlockGroup(n, chs[1], chs[2], 2, act),
            DMBlockGroup(n, chs[2], chs[3], 2, act),
        )
        self.batchnorm = nn.BatchNorm2d(chs[3])
        self.relu = act()
        self.logits = nn.Linear(chs[3], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize, then the last feature map after the final BN-activation, ``[N, 64 width, H/4, W/4]``."""
        x = self.layer(self.init_conv(self.normalize(x)))
        return self.relu(self.batchnorm(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool (the reference's ``avg_pool2d(8)`` on 32x32 inputs) and classifier."""
        return self.logits(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class DMPreActBlock(nn.Module):
    """Pre-activation basic block whose projection shortcut is a padded 3x3 convolution of the raw input."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(in_chs)
        self.relu_0 = act()
        self.conv_2d_1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_chs)
        self.relu_1 = act()
        self.conv_2d_2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.has_shortcut = stride != 1 or in_chs != out_chs
        if self.has_shortcut:  # no attribute otherwise: no key, as in the reference
            self.shortcut = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu_0(self.batchnorm_0(x))
        shortcut = self.shortcut(_same_pad(x, self.stride)) if self.has_shortcut else x
        out = self.conv_2d_1(_same_pad(out, self.stride))
        out = self.conv_2d_2(self.relu_1(self.batchnorm_1(out)))
        return out + shortcut


class DMPreActResNet(_Normalize):
    """DeepMind's PreActResNet-18/34 for 32x32 inputs, normalizing its input itself.

    Args:
        depth: 18 (blocks 2-2-2-2) or 34 (3-4-6-3).
        num_classes: number of output logits.
        activation: ``silu`` (also ``swish``) or ``relu``.
        mean, std: per-channel normalization (the buffers a checkpoint overwrites).

    Raises:
        ValueError: another depth, or an unknown activation.
    """

    def __init__(
        self,
        depth: int = 18,
        num_classes: int = 10,
        activation: str = "silu",
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}.get(depth)
        if blocks is None:
            raise ValueError(f"depth must be 18 or 34, got {depth}")
        act = _activation(activation)
        self._init_normalize(mean, std)
        self.num_classes = num_classes
        self.num_features = 512
        self.conv_2d = nn.Conv2d(len(mean), 64, kernel_size=3, stride=1, padding=1, bias=False)
        widths = (64, 128, 256, 512)
        in_chs = 64
        for s, (n, out_chs) in enumerate(zip(blocks, widths)):
            stride = 1 if s == 0 else 2
            layers = [DMPreActBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, act) for i in range(n)]
            setattr(self, f"layer_{s}", nn.Sequential(*layers))
            in_chs = out_chs
        self.batchnorm = nn.BatchNorm2d(512)
        self.relu = act()
        self.logits = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize, then the last feature map after the final BN-activation, ``[N, 512, H/8, W/8]``."""
        x = self.conv_2d(self.normalize(x))
        x = self.layer_3(self.layer_2(self.layer_1(self.layer_0(x))))
        return self.relu(self.batchnorm(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool (the reference's ``avg_pool2d(4)`` on 32x32 inputs) and classifier."""
        return self.logits(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_arch
def dm_wide_resnet(
    *,
    depth: int = 28,
    width: int = 10,
    activation: str = "silu",
    num_classes: int = 10,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> DMWideResNet:
    """DeepMind WRN of any ``depth`` (6n+4) and ``width`` (RobustBench's ``DMWideResNet``)."""
    return DMWideResNet(depth=depth, width=width, num_classes=num_classes, activation=activation, mean=mean, std=std)


@register_arch
def dm_preact_resnet18(
    *,
    activation: str = "silu",
    num_classes: int = 10,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> DMPreActResNet:
    """DeepMind PreActResNet-18 (RobustBench's ``DMPreActResNet(depth=18)``; 11.2M parameters)."""
    return DMPreActResNet(depth=18, num_classes=num_classes, activation=activation, mean=mean, std=std)

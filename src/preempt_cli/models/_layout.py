"""The memory layout of a 4-d tensor, for backward passes that give their gradients the layout of the
tensors they come from (see :mod:`._fusion` and :func:`.cifar_resnet.pad_shortcut` for why)."""

from __future__ import annotations

import torch


def memory_layout(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a channels-last tensor (one that is not also contiguous, as a tensor with
    one channel or one pixel is), else ``torch.contiguous_format``."""
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format

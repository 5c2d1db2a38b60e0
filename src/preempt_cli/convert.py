"""Converting PyTorch checkpoints to safetensors, without running pickled code."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .hub import save_safetensors, sha256_file

__all__ = ["convert_checkpoint"]

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema")


def _find_state(obj: Any, key: str | None) -> dict[str, torch.Tensor]:
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise ConfigError(f"checkpoint has no entry {key!r}")
        obj = obj[key]
    elif isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = next((k for k in _STATE_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if found is None:
            raise ConfigError(f"cannot find the state dict in the checkpoint (entries: {', '.join(map(str, obj))}); "
                              "name it with --key")  # fmt: skip
        obj = obj[found]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError("the checkpoint entry is not a state dict of tensors")
    return obj


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _load_refusal(checkpoint: Path, error: Exception) -> str:
    """One plain line for a checkpoint ``torch.load(weights_only=True)`` refused: torch's own message spans
    lines, with terminal escapes, and advises turning the protection off."""
    text = _ANSI.sub("", str(error))
    detail = text.partition("WeightsUnpickler error:")[2] or text
    detail = next((line.strip() for line in detail.splitlines() if line.strip()), type(error).__name__)
    detail = detail.split(". ")[0].rstrip(".")
    if "Unsupported global" in detail:
        return (f"{checkpoint}: refused by torch.load(weights_only=True): it holds pickled objects other than "
                f"tensors ({detail}); only if you trust the file, load it with weights_only=False in Python, "
                "torch.save its state dict alone and convert that file")  # fmt: skip
    return f"{checkpoint}: cannot be loaded safely with weights_only=True ({detail}): not a PyTorch checkpoint?"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def convert_checkpoint(
    checkpoint: Path,
    output: Path,
    *,
    key: str | None = None,
    strip_prefixes: tuple[str, ...] = ("module.",),
    overwrite: bool = False,
) -> tuple[int, str]:
    """Write the state dict of ``checkpoint`` to ``output`` as safetensors; return (tensors, sha256).

    The checkpoint is read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
    Tensors that share memory (tied weights) are written as separate copies, so every key loads. An existing
    ``output`` is replaced only with ``overwrite``; the checkpoint itself never.

    Raises:
        ConfigError: ``output`` is the checkpoint, or exists without ``overwrite``; unreadable checkpoint, no
            state dict in it, or two keys that are the same once a prefix is stripped.
        ImageWriteError: the output cannot be written.
    """
    if _same_file(checkpoint, output) or (not output.exists() and checkpoint.absolute() == output.absolute()):
        raise ConfigError(f"{output}: is the checkpoint itself; name another output file")
    if output.exists() and not overwrite:
        raise ConfigError(f"{output}: exists; pass --force to replace it")
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{checkpoint}: no such file") from None
    except Exception as e:  # weights_only refusals are UnpicklingError; corrupt files vary
        raise ConfigError(_load_refusal(checkpoint, e)) from e
    state = _find_state(obj, key)
    clean: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in state.items():
        name = key
        for prefix in strip_prefixes:
            if prefix and name.startswith(prefix):
                name = name[len(prefix) :]
        if name in clean:
            raise ConfigError(f"{checkpoint}: keys {origin[name]!r} and {key!r} both become {name!r} once "
                              f"{', '.join(repr(p) for p in strip_prefixes if p)} is stripped; convert with "
                              "--strip-prefix '' (or --key naming one state dict)")  # fmt: skip
        clean[name], origin[name] = tensor.detach(), key
    save_safetensors(clean, output, {"converted_from": checkpoint.name})
    return len(clean), sha256_file(output)

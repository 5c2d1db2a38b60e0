"""Converting PyTorch checkpoints to safetensors, without running pickled code."""

from __future__ import annotations

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


def convert_checkpoint(
    checkpoint: Path, output: Path, *, key: str | None = None, strip_prefixes: tuple[str, ...] = ("module.",)
) -> tuple[int, str]:
    """Write the state dict of ``checkpoint`` to ``output`` as safetensors; return (tensors, sha256).

    The checkpoint is read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
    Tensors that share memory (tied weights) are written as separate copies, so every key loads.

    Raises:
        ConfigError: unreadable checkpoint, no state dict in it, or two keys that are the same once a prefix
            is stripped.
        ImageWriteError: the output cannot be written.
    """
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{checkpoint}: no such file") from None
    except Exception as e:  # weights_only refusals are UnpicklingError; corrupt files vary
        raise ConfigError(f"{checkpoint}: cannot be loaded safely with weights_only=True ({e})") from e
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

"""preempt: protect images against adversarial attacks before they are published (Fast Preemption).

The Python API (the ``preempt`` command is a thin layer over it)::

    from preempt_cli import load_model, Protector, ForeBackConfig, collect_inputs, RunOptions  # protect
    from preempt_cli import Reverter  # revert
    from preempt_cli import Evaluator, load_dataset, DefenseSpec, AttackSpec, reversion_protocol  # eval
    from preempt_cli import PreemptError, InputError, ImageReadError  # errors: every class of preempt_cli.errors

The names below load their module on first use (PEP 562), so that importing one torch-free module of
the package (``preempt_cli.imageio`` in the I/O worker processes) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.28.0"

#: public name -> the module that defines it
_EXPORTS = {
    "PRESETS": "engine",
    "FastPreemption": "engine",
    "ForeBackConfig": "engine",
    "parse_eps": "engine",
    "PreemptError": "errors",
    "ConfigError": "errors",
    "InputError": "errors",
    "InputConfigError": "errors",
    "InputLabelError": "errors",
    "ImageReadError": "errors",
    "ImageWriteError": "errors",
    "LabelError": "errors",
    "RegistryError": "errors",
    "UnknownModelError": "errors",
    "WeightsNotFoundError": "errors",
    "OfflineWeightsError": "errors",
    "HashMismatchError": "errors",
    "UnsafeWeightsError": "errors",
    "UnreadableWeightsError": "errors",
    "WeightsMismatchError": "errors",
    "WeightsMetadataMismatchError": "errors",
    "NonFiniteWeightsError": "errors",
    "MissingDependencyError": "errors",
    "AttackSpec": "evaluate",
    "DefenseSpec": "evaluate",
    "Evaluator": "evaluate",
    "load_dataset": "evaluate",
    "reversion_protocol": "evaluate",
    "Picture": "imageio",
    "read_image": "imageio",
    "write_png": "imageio",
    "InputFile": "inputs",
    "collect_inputs": "inputs",
    "ImageModel": "models",
    "load_model": "models",
    "FileResult": "protect",
    "Protector": "protect",
    "RunOptions": "protect",
    "Reverter": "revert",
    "ModelConfig": "registry",
    "get_model_config": "registry",
    "list_models": "registry",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .engine import PRESETS, FastPreemption, ForeBackConfig, parse_eps
    from .errors import (ConfigError, HashMismatchError, ImageReadError, ImageWriteError, InputConfigError,
                         InputError, InputLabelError, LabelError, MissingDependencyError, NonFiniteWeightsError,
                         OfflineWeightsError, PreemptError, RegistryError, UnknownModelError, UnreadableWeightsError,
                         UnsafeWeightsError, WeightsMetadataMismatchError, WeightsMismatchError, WeightsNotFoundError)
    from .evaluate import AttackSpec, DefenseSpec, Evaluator, load_dataset, reversion_protocol
    from .imageio import Picture, read_image, write_png
    from .inputs import InputFile, collect_inputs
    from .models import ImageModel, load_model
    from .protect import FileResult, Protector, RunOptions
    from .registry import ModelConfig, get_model_config, list_models
    from .revert import Reverter


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""preempt: protect images against adversarial attacks before they are published (Fast Preemption).

The Python API (the ``preempt`` command is a thin layer over it)::

    from preempt_cli import load_model, Protector, ForeBackConfig, collect_inputs, RunOptions
"""

__version__ = "0.4.0"

from .engine import PRESETS, FastPreemption, ForeBackConfig, parse_eps  # noqa: E402
from .errors import PreemptError  # noqa: E402
from .imageio import Picture, read_image, write_png  # noqa: E402
from .inputs import InputFile, collect_inputs  # noqa: E402
from .models import ImageModel, load_model  # noqa: E402
from .protect import FileResult, Protector, RunOptions  # noqa: E402
from .registry import ModelConfig, get_model_config, list_models  # noqa: E402

__all__ = [
    "__version__",
    "PRESETS",
    "FastPreemption",
    "ForeBackConfig",
    "parse_eps",
    "PreemptError",
    "Picture",
    "read_image",
    "write_png",
    "InputFile",
    "collect_inputs",
    "ImageModel",
    "load_model",
    "FileResult",
    "Protector",
    "RunOptions",
    "ModelConfig",
    "get_model_config",
    "list_models",
]

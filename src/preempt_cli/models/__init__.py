"""Models: a registry of architecture builders (``create_arch``) for the CIFAR nets timm lacks, and
``load_model``, which builds a registered model, loads its weights safely and wraps it to take [0, 1]
images of any size."""

from . import cifar_resnet, dm_resnet, preact_resnet, resnet_cifar, resnext, wide_resnet  # noqa: F401 (register)
from ._load import ImageModel, build_model, load_model, state_sha256, weights_sha256, weights_sha256_of
from ._registry import create_arch, is_arch, list_archs, register_arch

__all__ = ["ImageModel", "build_model", "load_model", "state_sha256", "weights_sha256", "weights_sha256_of",
           "create_arch", "is_arch", "list_archs", "register_arch"]

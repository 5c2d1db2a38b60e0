"""Visual quality of protected images: SSIM, LPIPS (when available offline) and perturbation maps.

* :func:`ssim`: the structural similarity of Wang et al. (2004), per image (Gaussian 11x11 window,
  sigma 1.5, valid positions, each colour channel on its own, no downsampling: see its docstring).
* :func:`lpips_status` / :func:`lpips_distance`: LPIPS (Zhang et al., 2018) through the optional package
  ``lpips``. That package ships its linear layers but takes its backbone (AlexNet, VGG16 or SqueezeNet)
  from torchvision, which downloads it into the torch hub cache. Nothing here ever downloads: LPIPS is
  used only when the package imports and the backbone checkpoint is already in the cache.
* :func:`perturbation_map` and :func:`save_perturbation_figure`: the paper's perturbation maps (Eq. 14)
  and a figure of originals, protected images and their maps.

All functions take NCHW float images in [0, 1] (C = 1 or 3).
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .device import model_device
from .engine import check_images
from .errors import ConfigError, InputConfigError, MissingDependencyError
from .imageio import atomic_write

__all__ = [
    "ssim",
    "SSIM_WINDOW",
    "LPIPS_NETS",
    "LpipsUnavailableError",
    "lpips_status",
    "load_lpips",
    "lpips_distance",
    "perturbation_map",
    "save_perturbation_figure",
    "NTSC_WEIGHTS",
]

_logger = logging.getLogger(__name__)

# -- SSIM ---------------------------------------------------------------------------------------------------

#: The side of :func:`ssim`'s Gaussian window: the least height and width of the images it scores.
SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    """Two floating-point NCHW tensors of the same shape (the engine's checks, in their words).

    Raises:
        InputConfigError: otherwise (an ``InputError``, and the ``ConfigError`` it was before 0.22.0).
    """
    check_images(x, error=InputConfigError)
    check_images(y, error=InputConfigError)
    if x.shape != y.shape:
        raise InputConfigError(f"images must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def _check_gray_or_rgb(x: torch.Tensor, what: str) -> None:
    """Raises InputConfigError for images of another count of channels than 1 or 3 (``what`` needs those)."""
    if x.shape[1] not in (1, 3):
        raise InputConfigError(f"{what} need 1 or 3 channels, got {x.shape[1]}")


def _gaussian_window(size: int, sigma: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A normalized 1-D Gaussian of ``size`` taps."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (Wang et al., 2004) of each pair of images.

    The standard setting: an 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``, ``K2 = 0.03``,
    ``C1 = (K1 * data_range)**2``, ``C2 = (K2 * data_range)**2``, population (not sample) statistics.
    The window slides over *valid* positions only (no padding: an H x W image gives an
    (H-10) x (W-10) SSIM map, as in Wang et al.'s reference code and ``pytorch_msssim``). Each channel is
    treated as a grayscale image; the SSIM maps are averaged over positions and channels. Images are
    compared at their own size (Wang et al.'s later ``ssim.m`` first averages an image down by
    ``round(min(H, W) / 256)``, which scores large photos higher: a 512x512 photo with +-4/255 noise reads
    0.953 here, 0.983 downsampled). Computed in float64.

    This is ``skimage.metrics.structural_similarity(x, y, data_range=1, channel_axis=0,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` (equal to float precision on CIFAR-10
    test images, protected ones and photos); scikit-image's *defaults* (a 7x7 uniform window, sample
    covariance) give other values (0.952 for 0.956 on protected CIFAR-10 images), and so does SSIM of the
    luma channel alone (0.968).

    Args:
        x, y: images, [B, C, H, W] floating point, H and W at least 11.
        data_range: the range of pixel values (1 for [0, 1] images).

    Returns:
        [B] SSIM values in ``x``'s dtype (1 for identical images; symmetric in ``x`` and ``y``).

    Raises:
        InputConfigError: images that are not floating-point NCHW tensors of one shape, or smaller than
            11x11 (an ``InputError``, and the ``ConfigError`` it was before 0.22.0).
        ConfigError: a non-positive ``data_range``.
    """
    _check_pair(x, y)
    if not (isinstance(data_range, (int, float)) and not isinstance(data_range, bool)) or not (
        math.isfinite(data_range) and data_range > 0
    ):
        raise ConfigError(f"data_range must be positive and finite, got {data_range!r}")
    b, c, h, w = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise InputConfigError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    if b == 0:  # no pairs, no values (the maps below cannot be shaped for an empty batch)
        return x.new_empty((0,))
    a = x.detach().to(torch.float64).reshape(b * c, 1, h, w)
    d = y.detach().to(a.device, torch.float64).reshape(b * c, 1, h, w)
    g = _gaussian_window(SSIM_WINDOW, _SSIM_SIGMA, dtype=a.dtype, device=a.device)
    gh, gw = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        return F.conv2d(F.conv2d(t, gh), gw)

    mu_a, mu_d = blur(a), blur(d)
    var_a = blur(a * a) - mu_a**2
    var_d = blur(d * d) - mu_d**2
    cov = blur(a * d) - mu_a * mu_d
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_d + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_d**2 + c1) * (var_a + var_d + c2))
    return ssim_map.view(b, c, -1).mean(dim=(1, 2)).to(x.dtype)


# -- LPIPS --------------------------------------------------------------------------------------------------

#: LPIPS backbones -> the torchvision checkpoint file each one loads from ``<torch hub dir>/checkpoints``.
LPIPS_NETS: dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}

_LPIPS_VERSION = "0.1"


class LpipsUnavailableError(MissingDependencyError):
    """LPIPS cannot run here: the ``lpips`` package is missing, or its backbone weights are not cached.

    Carries ``package`` (``"lpips"``) and ``reason`` (what is missing and how to fix it).
    """

    def __init__(self, reason: str) -> None:
        super().__init__("lpips", "LPIPS")
        self.reason = reason
        self.msg = f"LPIPS is not available: {reason}"
        self.args = (self.msg,)

    def __str__(self) -> str:
        return str(self.args[0])


def _check_lpips_net(net: str) -> str:
    """Raises ConfigError for a backbone LPIPS does not offer."""
    if net not in LPIPS_NETS:
        raise ConfigError(f"unknown LPIPS network {net!r}: choose one of {', '.join(LPIPS_NETS)}")
    return net


def _lpips_checkpoint(net: str) -> Path:
    """Where torchvision looks for (and would download) the backbone of ``net``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_NETS[net]


def _lpips_module_or_reason(net: str) -> tuple[Any | None, str]:
    """``(the lpips module, "")`` when LPIPS with ``net`` can run offline, else ``(None, reason)``."""
    try:
        module = importlib.import_module("lpips")
    except ImportError:
        return None, "the package 'lpips' is not installed (pip install lpips)"
    except Exception as e:  # a broken install (e.g. an incompatible torchvision) must not crash a status query
        return None, f"the package 'lpips' cannot be imported: {type(e).__name__}: {e}"
    package_dir = Path(getattr(module, "__file__", None) or ".").parent
    linear = package_dir / "weights" / f"v{_LPIPS_VERSION}" / f"{net}.pth"
    if not linear.is_file():
        return None, f"the 'lpips' package lacks its linear-layer weights ({linear}); reinstall it"
    checkpoint = _lpips_checkpoint(net)
    if not checkpoint.is_file():
        return None, (
            f"the {net} backbone weights are not in the torch hub cache ({checkpoint}) and nothing is "
            "downloaded here; copy that torchvision checkpoint there (or set TORCH_HOME to a cache holding it)"
        )
    return module, ""


def lpips_status(net: str = "alex") -> tuple[bool, str]:
    """Whether LPIPS with backbone ``net`` can run here without network access, and if not, why.

    Checks that the package ``lpips`` imports, that it has its linear-layer weights, and that the
    torchvision checkpoint of the backbone is already in the torch hub cache (``torch.hub.get_dir()``).
    Never downloads anything and never raises for a missing piece.

    Returns:
        ``(True, "")`` when usable, else ``(False, reason)``.

    Raises:
        ConfigError: ``net`` is not one of :data:`LPIPS_NETS`.
    """
    _check_lpips_net(net)
    module, reason = _lpips_module_or_reason(net)
    return module is not None, reason


def load_lpips(net: str = "alex", *, device: torch.device | str = "cpu") -> nn.Module:
    """The LPIPS metric (package ``lpips``, version 0.1 linear layers) in eval mode, parameters frozen.

    Build it once and pass it to :func:`lpips_distance` as ``model`` to score many batches.

    Raises:
        ConfigError: ``net`` is not one of :data:`LPIPS_NETS`.
        LpipsUnavailableError: LPIPS cannot run offline here (see :func:`lpips_status`).
    """
    _check_lpips_net(net)
    module, reason = _lpips_module_or_reason(net)
    if module is None:
        raise LpipsUnavailableError(reason)
    try:
        model = module.LPIPS(net=net, version=_LPIPS_VERSION, pretrained=True, verbose=False)
    except Exception as e:
        raise LpipsUnavailableError(f"building LPIPS ({net}) failed: {type(e).__name__}: {e}") from e
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lpips_distance(
    x: torch.Tensor, y: torch.Tensor, net: str = "alex", *, model: nn.Module | None = None
) -> torch.Tensor:
    """LPIPS distance of each pair of images (lower = more similar; 0 for identical images).

    Images in [0, 1] are mapped to [-1, 1] by the package (``normalize=True``); grayscale images are
    repeated to three channels. The distance is the package's spatial mean, at the images' own size (no
    resizing: 32x32 CIFAR-10 images are scored as they are).

    Args:
        x, y: images, [B, C, H, W] floating point in [0, 1], C = 1 or 3.
        net: the backbone (``"alex"``, the usual choice, ``"vgg"`` or ``"squeeze"``); ignored with ``model``.
        model: an LPIPS module from :func:`load_lpips` (else one is built for this call).

    Returns:
        [B] distances, float32, on ``x``'s device.

    Raises:
        InputConfigError: images that are not floating-point NCHW tensors of one shape with 1 or 3 channels
            (an ``InputError``, and the ``ConfigError`` it was before 0.22.0).
        ConfigError: an unknown ``net``.
        LpipsUnavailableError: LPIPS cannot run offline here (a :class:`MissingDependencyError`).
    """
    _check_pair(x, y)
    _check_gray_or_rgb(x, "LPIPS images")
    if model is None:
        model = load_lpips(net)
    device = model_device(model)
    a = x.detach().to(device, torch.float32)
    b = y.detach().to(device, torch.float32)
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    with torch.no_grad():
        dist = model(a, b, normalize=True)
    return dist.reshape(x.shape[0]).to(x.device, torch.float32)


# -- perturbation maps --------------------------------------------------------------------------------------

#: NTSC (ITU-R BT.601) luma weights of R, G, B.
NTSC_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


def perturbation_map(x: torch.Tensor, x_protected: torch.Tensor, eps: float) -> torch.Tensor:
    """The paper's perturbation map (Eq. 14) of each image.

    ``delta = x_protected - x`` is mapped from [-eps, eps] to [0, 1] as ``(delta / eps + 1) / 2`` (clipped,
    so 0.5 is "unchanged"), then RGB is converted to gray with the NTSC weights 0.299 R + 0.587 G + 0.114 B;
    a grayscale map passes through.

    Args:
        x: the original images, [B, C, H, W] floating point, C = 1 or 3.
        x_protected: the protected images, same shape.
        eps: the budget the perturbation was made with.

    Returns:
        [B, 1, H, W] float32 maps in [0, 1], on ``x``'s device.

    Raises:
        InputConfigError: images that are not floating-point NCHW tensors of one shape with 1 or 3 channels
            (an ``InputError``, and the ``ConfigError`` it was before 0.22.0).
        ConfigError: ``eps`` not positive.
    """
    _check_pair(x, x_protected)
    _check_gray_or_rgb(x, "perturbation maps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"eps must be positive and finite, got {eps!r}")
    delta = x_protected.detach().to(x.device, torch.float32) - x.detach().to(torch.float32)
    mapped = ((delta / eps + 1) / 2).clamp_(0.0, 1.0)
    if mapped.shape[1] == 1:
        return mapped
    weights = torch.tensor(NTSC_WEIGHTS, dtype=mapped.dtype, device=mapped.device).view(1, 3, 1, 1)
    return (mapped * weights).sum(dim=1, keepdim=True).clamp_(0.0, 1.0)


def _to_rgb_uint8(images: torch.Tensor, scale: int) -> np.ndarray:
    """[N, C, H, W] in [0, 1] (C = 1 or 3) -> [N, H*scale, W*scale, 3] uint8, nearest-neighbour upscaled."""
    t = images.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    if scale > 1:
        t = t.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return (t * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_perturbation_figure(
    path: Path | str,
    originals: torch.Tensor,
    protected: torch.Tensor,
    eps: float,
    *,
    max_images: int = 8,
    scale: int = 4,
    gap: int = 2,
) -> Path:
    """Write a PNG grid: originals (row 1), protected images (row 2), perturbation maps (row 3).

    The first ``min(B, max_images)`` images form the columns. Every cell is upscaled ``scale`` times with
    nearest-neighbour sampling (the default 4 suits 32x32 CIFAR images; use 1 for large images); cells
    are separated and framed by ``gap`` white pixels. The figure is RGB, of width
    ``n * W * scale + (n + 1) * gap`` and height ``3 * H * scale + 4 * gap``. It is written atomically (a
    temporary file beside ``path``, renamed over it once complete); missing folders are created.

    Args:
        path: the PNG to write.
        originals: [B, C, H, W] images in [0, 1], C = 1 or 3.
        protected: their protected versions, same shape.
        eps: the budget, for the perturbation maps (:func:`perturbation_map`).
        max_images: at most this many columns.
        scale: the integer upscaling factor.
        gap: white pixels between and around cells.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InputConfigError: images as :func:`perturbation_map` refuses them, or none (an ``InputError``, and the
            ``ConfigError`` it was before 0.22.0).
        ConfigError: an invalid ``eps``, ``max_images``, ``scale`` or ``gap``.
        ImageWriteError: the file or its folder cannot be written.
    """
    for name, value, minimum in (("max_images", max_images, 1), ("scale", scale, 1), ("gap", gap, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    maps = perturbation_map(originals, protected, eps)  # validates shapes, channels and eps
    n = min(originals.shape[0], max_images)
    if n == 0:
        raise InputConfigError("no images to draw")
    rows = [
        _to_rgb_uint8(originals[:n], scale),
        _to_rgb_uint8(protected[:n], scale),
        _to_rgb_uint8(maps[:n], scale),
    ]
    ch, cw = rows[0].shape[1:3]
    canvas = np.full((3 * ch + 4 * gap, n * cw + (n + 1) * gap, 3), 255, dtype=np.uint8)
    for r, cells in enumerate(rows):
        top = gap + r * (ch + gap)
        for i in range(n):
            left = gap + i * (cw + gap)
            canvas[top : top + ch, left : left + cw] = cells[i]

    path = Path(path)
    with atomic_write(path) as f:
        Image.fromarray(canvas).save(f, format="PNG")
    _logger.debug("perturbation figure of %d images written to %s", n, path)
    return path

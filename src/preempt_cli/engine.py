"""The Fore-Back engine: Algorithm 1 of *Fast Preemption* (forward-backward cascade learning).

Given images ``x`` in [0, 1] (NCHW, any size) and labels ``y`` (from a classifier, or ground truth), the
backbone ``f_b`` shapes a perturbation inside the L-inf ball of radius ``eps`` around ``x``:

* forward propagation (``forward_steps`` times): N noisy copies each take one FGSM step that *decreases*
  ``CE(f_b(.), y)``; the iterate moves ``eta`` times the averaged step.
* backward propagation (``backward_steps`` times): N noisy copies each take one FGSM step that
  *increases* the loss (a predicted attack); the iterate moves ``eta`` times *against* the averaged step.

The N samples of a step run as one batch (all images of a batch together), and gradients are taken with
respect to the input only. Each image's noise depends only on the seed and its own noise seed (derived
from the image's own pixels: :func:`content_seeds`), so an image's result does not depend on which other images
share its batch, nor on the batch size: images at the backbone's input size draw it from a counter-based
hash of (seed, noise seed, step, sample, pixel), computed for the whole batch at once and bit-identical on
CPU and CUDA; images the backbone resizes (photos) from one generator per image and sample.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .device import resolve_device, to_device
from .errors import ConfigError, InputError, excerpt
from .graphs import GraphedFunction
from .imageio import content_seed, divide_levels_, levels_to_float

__all__ = ["ForeBackConfig", "FastPreemption", "PRESETS", "PRECISIONS", "COMPILE_MODES", "parse_eps", "refuse_int_levels", "default_eps", "eval_mode", "project",
           "native_bf16", "resolve_precision", "content_seeds", "check_seed", "autograd_usable", "check_images",
           "check_batch", "check_channels", "check_unit_range", "check_cuda_graphs", "MAX_SEED"]

#: Named settings. ``paper``: Table 3 of the paper. ``mspd``: the authors' later public code, which also
#: projects each FGSM sample around the current iterate before the outer projection.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(eta=0.7, forward_steps=1, backward_steps=2, samples=20, sample_projection="original"),
    "mspd": dict(eta=1.0, forward_steps=1, backward_steps=1, samples=20, sample_projection="iterate"),
}

#: Images the backbone resizes (photos) go through it this many elements (images x samples x C x H x W)
#: at a time at most, per device type: their N samples at full resolution, with the gradients and the
#: resize's intermediates, would otherwise need about 2.5 x N x the photo in memory (7 GB for one
#: 12-megapixel photo at N = 20, and the kernel kills a CPU process that runs out). 2^25 float32 elements
#: are 128 MiB per buffer; a GPU gets 8x that, so that a photo's samples still go through in batches (one
#: sample per pass would leave it waiting on kernel launches). The noise does not depend on these values,
#: but the bits do: the samples are summed a chunk at a time, and a last bit of that sum can flip a gradient's
#: sign in a later step (one sample per pass instead of 3 changed 0.17% of a 2.9-megapixel photo's levels, by up
#: to 2). Held at once: a chunk of samples and its gradient (up to 2 x 128 MiB on a CPU), and the input, the
#: iterate and the samples' sum (3 buffers of the photo's size): 600 MB for a 10-megapixel photo.
SAMPLE_CHUNK_ELEMENTS: dict[str, int] = {"cpu": 1 << 25, "cuda": 1 << 28}

#: Images at the backbone's input size go through the backbone this many elements (images x samples x C x
#: H x W) at a time by default, per device type: 16 CIFAR images x 20 samples on a CPU, 16x that on a GPU
#: (what ``Protector`` batches by; see there). An image whose samples alone need more goes through in
#: chunks of samples (at least :data:`MIN_SAMPLES_PER_PASS`), so that a large N takes longer instead of all
#: the memory: at N = 100,000 one CIFAR image's activations in ResNet-20 were 130 GB.
SAMPLE_PASS_ELEMENTS: dict[str, int] = {"cpu": 16 * 20 * 3 * 32 * 32, "cuda": 16 * 16 * 20 * 3 * 32 * 32}
#: Samples per pass never fewer than this (an ImageNet-size image at the paper's N = 20 goes in one pass).
MIN_SAMPLES_PER_PASS = 64

#: Images the backbone resizes (photos) are clipped to their budget this many elements (images x samples x C
#: x H x W) at a time, its bounds computed from the original image for each block instead of held: held, the
#: two bounds of a 12-megapixel photo were 2 x 140 MiB of the 1.2 GB of tensors protecting it peaked at, and
#: a CPU's block of them stays in cache. Results do not depend on these values.
BOUND_BLOCK_ELEMENTS: dict[str, int] = {"cpu": 1 << 18, "cuda": 1 << 24}

#: Images at the backbone's input size draw their noise in blocks of at most this many elements (images x
#: samples x C x H x W; int64 while hashed), per device type: a CPU block stays in cache, and a GPU batch
#: of 256 CIFAR-10 images at N = 20 is one block. Results do not depend on these values.
NOISE_BLOCK_ELEMENTS: dict[str, int] = {"cpu": 1 << 20, "cuda": 1 << 24}

_MASK32 = 0xFFFFFFFF
#: An ``ignore_index`` no label takes (a label outside the classes then fails, as -1 does).
_NO_IGNORED_LABEL = -(1 << 62)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (C. Wellons' lowbias32), in place, on int64 values in [0, 2^32). Both
    multipliers are below 2^31, so no product leaves int64: CPU and CUDA compute the same bits."""
    x.bitwise_xor_(x >> 16).mul_(0x21F0AAAD).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15).mul_(0x735A2D97).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 15)


def noise_keys(image_keys: torch.Tensor, steps: int, samples: int) -> torch.Tensor:
    """The key of each image's noise at each cascade step and sample, [B, steps, samples] int64 in
    [0, 2^32), from the images' 64-bit keys (``image_keys``: [B, 2] int64, low and high 32 bits)."""
    device = image_keys.device
    step_keys = _mix32_(torch.arange(steps, device=device, dtype=torch.int64))
    keys = _mix32_((torch.arange(samples, device=device, dtype=torch.int64) + step_keys[:, None]).bitwise_and_(_MASK32))
    keys = _mix32_(keys[None] ^ image_keys[:, :1, None])
    return _mix32_(keys.bitwise_xor_(image_keys[:, 1:, None]))


def hash_noise(keys: torch.Tensor, numel: int, eps: float, *, block: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """U(-eps, eps) noise, [B, S, numel]: element e of row (b, s) is a hash of ``keys[b, s]`` (see
    :func:`noise_keys`) and e.

    Each value depends on its own key and element alone, so any part of the noise (some images, some
    samples) is drawn alone the same as within the whole, in a fixed number of tensor operations per
    ``block`` elements, and integer arithmetic gives the same bits on every device. (Per-image generators
    took two Python-level calls per image and step and drew other numbers on CUDA than on the CPU; the
    fewer calls did not measurably change ``preempt protect``'s speed on an H200: see benchmarks/RESULTS.md.)
    """
    rows, count = keys.shape
    out = torch.empty((rows, count, numel), device=keys.device, dtype=dtype)
    if out.numel() == 0:
        return out
    span = min(numel, max(1, block // rows))  # elements per block
    per = max(1, block // (rows * span))  # samples per block
    for first in range(0, numel, span):
        elements = _mix32_(torch.arange(first, min(numel, first + span), device=keys.device, dtype=torch.int64))
        for j in range(0, count, per):
            bits = _mix32_(elements ^ keys[:, j : j + per, None])
            # the top 24 bits, exact in float32, times 2 eps / 2^24: U(-eps, eps) on a grid of 2^24 values
            out[:, j : j + per, first : first + span] = bits.bitwise_right_shift_(8).to(dtype).mul_(2 * eps * 2.0**-24).sub_(eps)
    return out


def seeded_image_keys(seed: int, noise_seeds: Sequence[int], *, stream: int = 0) -> torch.Tensor:
    """The images' 64-bit noise keys, [B, 2] int64 (low and high 32 bits) on the host, from a base ``seed``
    and each image's noise seed: what :func:`noise_keys` takes. Another ``stream`` (0: the engine's) gives
    other keys for the same seeds, so that what else draws noise this way (PGD's random starts) never draws
    the engine's."""
    keys = [(seed * 0x9E3779B97F4A7C15 + int(s) + stream * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1) for s in noise_seeds]
    return torch.tensor([[k & _MASK32, k >> 32] for k in keys], dtype=torch.int64).view(-1, 2)


def content_seeds(x: torch.Tensor) -> list[int]:
    """Each image's noise seed from its own pixels, as the file pipeline derives it: ``x`` [B, C, H, W] in
    [0, 1] is read back as the 8-bit levels it holds exactly (a tensor decoded from an 8-bit file, or
    ``levels / 255``), else as 16-bit levels, and hashed as :func:`~preempt_cli.imageio.content_seed` hashes
    a decoded file's; other values (off both grids) hash their float32 bytes. So a tensor decoded from a
    file gets that file's noise, on any device, and an image's result never depends on its place in a batch.
    (A 16-bit file whose levels are all multiples of 257 reads as 8-bit and gets other noise than ``protect``
    gives it. Levels divided on a GPU by a number, ``levels.cuda() / 255``, are not all exact there: CUDA
    multiplies by the reciprocal, a bit off for 126 of the 256 levels, so they read as other values.)

    The levels are read for many images at once, on ``x``'s device (:data:`CONTENT_SEED_CHUNK_ELEMENTS` at a
    time), and only the hashing runs image by image: 256 CIFAR-10 images take 6 ms on a shared 2-core CPU,
    11.5 ms read image by image, and PGD hashes every batch it attacks (a GPU's batch went to the host whole
    before).
    """
    x = x.detach()
    if x.shape[0] == 0:
        return []
    per_chunk = max(1, CONTENT_SEED_CHUNK_ELEMENTS // max(1, x[0].numel()))
    return [seed for chunk in x.split(per_chunk) for seed in _content_seeds(chunk)]


#: :func:`content_seeds` reads at most this many elements of a batch at a time (whole images, at least
#: one), so that its few temporary copies are of a part of a batch of photos, not all of it.
CONTENT_SEED_CHUNK_ELEMENTS = 1 << 22


def _content_seeds(x: torch.Tensor) -> list[int]:
    x = x.to(torch.float32)
    seeds: list[int] = [0] * x.shape[0]
    rest = torch.arange(x.shape[0], device=x.device)  # the images not read as levels yet
    for max_value, dtype, as_dtype in ((255, torch.uint8, np.uint8), (65535, torch.int32, np.uint16)):
        part = x if rest.numel() == x.shape[0] else x[rest]
        levels = part.mul(max_value).round_().clamp_(0, max_value)
        # exactly the floats Picture.to_tensor makes, on any device (a GPU's levels / 255 is not: divide_levels_)
        exact = torch.eq(divide_levels_(levels.clone(), max_value), part).flatten(1).all(1)
        found = exact.nonzero().squeeze(1)
        hwc_levels = levels.to(dtype)[found].permute(0, 2, 3, 1).contiguous().cpu().numpy()
        for i, image in zip(rest[found].tolist(), hwc_levels):
            seeds[i] = content_seed(image.astype(as_dtype, copy=False))
        rest = rest[~exact]
        if rest.numel() == 0:
            return seeds
    for i, image in zip(rest.tolist(), x[rest].permute(0, 2, 3, 1).contiguous().cpu().numpy()):
        seeds[i] = content_seed(image)
    return seeds


#: Seeds are 64-bit: a larger one (or a negative one) would draw the same noise as the seed it wraps to.
MAX_SEED = (1 << 64) - 1


def check_seed(seed: Any) -> int:
    """``seed`` as an int in [0, :data:`MAX_SEED`].

    Raises:
        ConfigError: not an int (a float, a string or a bool was silently truncated, and recorded as given),
            or out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"seed must be an int, got {excerpt(seed)} ({type(seed).__name__})")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be in 0..2**64-1, got {excerpt(seed)}")
    return int(seed)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with every submodule in eval mode (BatchNorm on its running statistics, never updating
    them; dropout off), then give the modules that were training their mode back. A model already in eval
    mode (as loaded) is not touched, so a compiled one is not specialised again.

    Threads that share a model share its eval mode: the modes come back when the last of them leaves (the
    first to leave gave a training model its train mode back while another thread was still computing with
    it: its BatchNorm then mixed that thread's images and updated its running statistics)."""
    key = id(model)
    with _EVAL_MODE_LOCK:
        users, turned = _EVAL_MODE_USERS.get(key, (0, []))
        if users == 0:
            turned = [m for m in model.modules() if m.training]
            for m in turned:
                m.training = False
        _EVAL_MODE_USERS[key] = (users + 1, turned)
    try:
        yield
    finally:
        with _EVAL_MODE_LOCK:
            users, turned = _EVAL_MODE_USERS.pop(key)
            if users > 1:
                _EVAL_MODE_USERS[key] = (users - 1, turned)
            else:
                for m in turned:
                    m.training = True


_EVAL_MODE_LOCK = threading.Lock()
#: id of a model inside eval_mode -> (how many callers are, the modules the first one turned to eval mode)
_EVAL_MODE_USERS: dict[int, tuple[int, list[nn.Module]]] = {}


def default_eps(dataset: str) -> float:
    """The paper's budget for a backbone's dataset (Table 3): 4/255 on ImageNet, 8/255 otherwise (CIFAR-10)."""
    return 4 / 255 if dataset.lower().startswith("imagenet") else 8 / 255


def parse_eps(text: str | float) -> float:
    """An L-inf budget as a float in (0, 1]: a fraction ``8/255`` (taken as written), a number below 1
    (``0.0314``), or a whole number from 1 to 255 read as that many 8-bit levels (``8`` = 8/255, ``1`` = 1/255).

    A bare ``1`` means one level, not the whole range: no one protects a photo with a budget that lets
    every pixel take any value, and reading it as 1.0 destroyed images without a word.

    Raises:
        ConfigError: not a number or fraction, a number of levels that is not whole (``1.5``), or out of
            range (above 255 levels, or a fraction above 1).
    """
    if isinstance(text, (int, float)):
        value, written_as_fraction = float(text), False
        at_least_one = value >= 1
    else:
        try:
            exact = Fraction(text.strip())
            value = float(exact)
        except (ValueError, ZeroDivisionError, OverflowError) as e:  # OverflowError: 1e400
            raise ConfigError(f"invalid eps {excerpt(text)}: use a fraction like 8/255 or a number like 0.0314") from e
        written_as_fraction = "/" in text
        at_least_one = exact >= 1  # as written: 0.99999999999999999 rounds to the float 1.0, one level
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"eps must be positive, got {excerpt(text)}")
    if at_least_one and not written_as_fraction:  # "8" means 8/255
        if value != int(value):  # 1.5 levels: a typo for 1.5/255, or for 0.15? Neither is safe to guess
            raise ConfigError(f"eps {excerpt(text)}: a value of 1 or more is a whole number of levels (8 = 8/255); "
                              "write a fraction like 3/510 or a number below 1")  # fmt: skip
        if value > 255:
            raise ConfigError(f"eps {excerpt(text)} is more than 255 levels: use a fraction like 8/255")
        value /= 255
    if value > 1:
        raise ConfigError(f"eps must be at most 1 (255/255), got {excerpt(text)}")
    return value


def refuse_int_levels(name: str, value: Any) -> None:
    """Refuse an int of 1 or more as an L-inf budget or step on [0, 1] images: ``1`` is one 8-bit level to
    :func:`parse_eps` and the CLI, and the whole range as a fraction (every pixel free); neither is safe to
    guess. Floats are fractions; 0 and negative ints are left to the caller's range check.

    Raises:
        ConfigError: ``value`` is such an int.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        raise ConfigError(f"{name}={value!r} is an int: give a fraction of the range ({value}/255 for {value} "
                          f"level{'s' if value != 1 else ''})")  # fmt: skip


@dataclass(frozen=True)
class ForeBackConfig:
    """Settings of Algorithm 1. Defaults are the paper's (Table 3) for CIFAR-10.

    ``eps``: a float, a fraction of the [0, 1] range (``8 / 255``), or a string as the CLI's ``--eps``
    takes it (``"8/255"``, ``"8"`` for 8 levels: :func:`parse_eps`). An int is refused: ``eps=1`` was read
    as the whole range, where :func:`parse_eps` and the CLI read a bare 1 as one level.

    Raises:
        ConfigError: a setting of the wrong type (steps and samples are ints) or out of range.
    """

    eps: float = 8 / 255
    eta: float = 0.7
    forward_steps: int = 1
    backward_steps: int = 2
    samples: int = 20
    sample_projection: str = "original"  # "original" (paper) or "iterate" (mspd)
    inner_steps: int = 1  # 1 = FGSM samples (the method); K > 1 = averaged PGD-K samples (ablation)
    #: the preset these settings started from (:meth:`from_preset` sets it; a protector records it), not
    #: a setting: two configs of equal settings are equal whatever their names
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.eps, str):  # "8/255", "8" or "0.0314", as the CLI's --eps takes it
            object.__setattr__(self, "eps", parse_eps(self.eps))
        refuse_int_levels("eps", self.eps)
        for name in ("eps", "eta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"{name} must be a number, got {excerpt(value)} ({type(value).__name__})")
            object.__setattr__(self, name, float(value))
        for name in ("forward_steps", "backward_steps", "samples", "inner_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name} must be an int, got {excerpt(value)} ({type(value).__name__})")
            object.__setattr__(self, name, int(value))
        if not 0 < self.eps <= 1:
            raise ConfigError(f"eps must be in (0, 1], got {self.eps}")
        if not (math.isfinite(self.eta) and self.eta > 0):  # NaN passes "<= 0" and then wrecks every pixel
            raise ConfigError(f"eta must be a positive number, got {self.eta}")
        if self.forward_steps < 0 or self.backward_steps < 0:
            raise ConfigError("forward and backward steps must be >= 0")
        if self.forward_steps + self.backward_steps == 0:
            raise ConfigError("at least one forward or backward step is needed")
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {excerpt(self.samples)}")
        if self.sample_projection not in ("original", "iterate"):
            raise ConfigError("sample_projection must be 'original' or 'iterate'")
        if self.inner_steps < 1:
            raise ConfigError("inner_steps must be >= 1")

    @classmethod
    def from_preset(cls, preset: str = "paper", *, dataset: str | None = None, **overrides: Any) -> "ForeBackConfig":
        """The named preset with some settings overridden (``None`` values are ignored); without ``eps``,
        the paper's budget for the backbone's ``dataset`` (:func:`default_eps`)."""
        if not (isinstance(preset, str) and preset in PRESETS):  # a name, not a dict of settings
            raise ConfigError(f"unknown preset {excerpt(preset)}: choose one of {', '.join(PRESETS)}")
        names = [f.name for f in fields(cls) if f.name != "preset"]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ConfigError(f"unknown setting {', '.join(unknown)}: the settings are {', '.join(names)}")
        if overrides.get("eps") is None and dataset is not None:
            overrides["eps"] = default_eps(dataset)
        settings = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**settings, preset=preset)

    def with_(self, **changes: Any) -> "ForeBackConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def step_directions(self) -> list[float]:
        """The cascade's steps in order: -1 for each forward step (descend the loss), then +1 for each
        backward step (attack)."""
        return [-1.0] * self.forward_steps + [+1.0] * self.backward_steps

    @property
    def passes_per_image(self) -> int:
        """Forward+backward passes of the backbone per image."""
        return (self.forward_steps + self.backward_steps) * self.samples * self.inner_steps


PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls/convolutions natively (CUDA with bf16 support; CPUs whose oneDNN
    has AVX512-BF16 or AMX). Elsewhere bf16 would be emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what ``precision`` (fp32, bf16 or auto) means on ``device``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {excerpt(precision)}")
    if precision == "auto":
        return "bf16" if native_bf16(torch.device(device)) else "fp32"
    return precision


#: ``compile`` settings of :class:`FastPreemption`: ``off`` (eager), or a ``torch.compile`` mode for the
#: backbone's forward and (input-only) backward: ``default`` (Inductor: fused elementwise kernels),
#: ``reduce-overhead`` (the same, replayed as CUDA graphs: fewer launches), ``max-autotune`` (also tunes
#: the matmul/convolution kernels; long compiles).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def project(x: torch.Tensor, center: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``x`` to the L-inf ball of radius ``eps`` around ``center`` and to [0, 1]."""
    return torch.minimum(torch.maximum(x, center - eps), center + eps).clamp_(0.0, 1.0)


def _ball(center: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounds of the L-inf ball of radius ``eps`` around ``center`` intersected with [0, 1]."""
    return (center - eps).clamp_(min=0.0), (center + eps).clamp_(max=1.0)


def _clip_(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Clip ``x`` in place to [lo, hi] (broadcast); for a center in [0, 1] the same as :func:`project`."""
    torch.maximum(x, lo, out=x)
    return torch.minimum(x, hi, out=x)


class _Ball:
    """The L-inf ball of radius ``eps`` around images ``center`` [B, 1, C, H, W] intersected with [0, 1]: where
    their samples [B, k, C, H, W] and iterates may go (:meth:`clip_`).

    Its bounds (:func:`_ball`) are held as two tensors of the images' size, or, with ``block`` (elements),
    computed from ``center`` a block of rows at a time where they are used: the same values, and so the same
    bits, without two full-size tensors for photos (see :data:`BOUND_BLOCK_ELEMENTS`). With ``max_value`` (and
    ``block``), ``center`` is the images' integer levels, each block's floats those of :func:`levels_to_float`:
    the images need not be held as floats (see :meth:`FastPreemption.perturb_levels`).
    """

    def __init__(self, center: torch.Tensor, eps: float, *, block: int | None = None,
                 bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                 max_value: int | None = None) -> None:  # fmt: skip
        if max_value is not None and block is None:
            raise ValueError("a ball around levels computes its bounds in blocks")
        self.center, self.eps, self.block, self.max_value = center, eps, block, max_value
        if block is None and bounds is None:
            bounds = _ball(center, eps)
        self.bounds = None if block is not None else bounds  # held: (low, high)

    def part(self, images: slice) -> "_Ball":
        """The ball of some of the images."""
        held = None if self.bounds is None else (self.bounds[0][images], self.bounds[1][images])
        return _Ball(self.center[images], self.eps, block=self.block, bounds=held, max_value=self.max_value)

    def clip_(self, x: torch.Tensor) -> torch.Tensor:
        """Clip ``x`` (of the center's shape, or broadcast to it) into the ball, in place."""
        if self.bounds is not None:
            return _clip_(x, *self.bounds)
        rows = max(1, self.block // max(1, x[..., :1, :].numel()))  # whole rows of all images and samples
        for top in range(0, x.shape[-2], rows):
            part, center = x[..., top : top + rows, :], self.center[..., top : top + rows, :]
            if self.max_value is not None:  # levels: the floats levels_to_float makes of them
                center = divide_levels_(center.to(torch.float32), self.max_value)
            # _ball's bounds, one at a time
            torch.maximum(part, (center - self.eps).clamp_(min=0.0), out=part)
            torch.minimum(part, (center + self.eps).clamp_(max=1.0), out=part)
        return x


class FastPreemption:
    """Fast Preemption (Algorithm 1) with a given backbone.

    Construction is keyword-only and explicit (AutoAttack style); :meth:`perturb` maps NCHW images in
    [0, 1] and their labels to protected images within ``eps`` of them.

    Args:
        backbone: a model taking [0, 1] images (normalization inside), e.g. ``load_model(...)``.
        config: the algorithm's settings.
        seed: base seed of the noise; combined with each image's noise seed.
        device: where to compute (defaults to the backbone's device).
        precision: ``"fp32"``, or ``"bf16"`` to run the backbone's passes under bf16 autocast (the images,
            the averaging and the projections stay fp32; only the sign of each gradient is used, which bf16
            rarely flips); ``"auto"`` is bf16 where the hardware runs it natively (CUDA; CPUs with
            AVX512-BF16 or AMX), else fp32. See ``benchmarks/RESULTS.md`` for speed and accuracy.
        compile: one of :data:`COMPILE_MODES`. Compiling costs seconds to minutes once per input shape
            (the first batch, and again for a last, smaller one), so it pays only on long runs of
            equal-size images; results match eager up to float rounding (a gradient sign near zero can
            differ), not bit for bit.
        cuda_graphs: on a GPU, replay each batch shape's kernels as one CUDA graph (captured the second
            time a shape comes; see :mod:`preempt_cli.graphs`), taking the launches of some 700 kernels per
            batch off the host. The same kernels run, so the same bits come out. Images the backbone
            resizes (photos) run eagerly. Off a GPU it does nothing (with a warning); it excludes
            ``compile`` (``reduce-overhead`` is compiled kernels in CUDA graphs).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        config: ForeBackConfig | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        precision: str = "fp32",
        compile: str = "off",
        cuda_graphs: bool = False,
    ) -> None:
        if not isinstance(backbone, nn.Module):
            raise ConfigError(f"backbone must be a torch.nn.Module (load_model's), got {type(backbone).__name__}")
        if config is not None and not isinstance(config, ForeBackConfig):  # a dict failed deep inside
            raise ConfigError(f"config must be a ForeBackConfig (ForeBackConfig(**settings)), got {type(config).__name__}")
        self.backbone = backbone
        self.config = config or ForeBackConfig.from_preset(dataset=getattr(getattr(backbone, "config", None), "dataset", None))
        self.seed = check_seed(seed)
        if device is None:
            param = next(backbone.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = resolve_device(device)  # a name checked ("gpu" was torch's RuntimeError)
        self.precision = resolve_precision(precision, self.device)
        if compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        # the mode asked for, before a CPU's reduce-overhead becomes default (and before any compiling)
        self.cuda_graphs = check_cuda_graphs(cuda_graphs, compile, self.device)
        if compile == "reduce-overhead" and self.device.type != "cuda":
            # its CUDA graphs need a GPU: elsewhere torch compiles as ``default`` would without saying so
            # (its "No CUDA runtime is found", where a CUDA toolkit is installed, comes at import, not here)
            logging.getLogger(__name__).warning(
                "--compile reduce-overhead replays CUDA graphs, which need a GPU: compiling as 'default' on %s",
                self.device)
            compile = "default"
        self.compile = compile
        self._net: nn.Module = backbone
        if compile != "off":
            # dynamic=False: one specialised graph per batch shape (a run sees one or two shapes)
            self._net = torch.compile(backbone, mode=None if compile == "default" else compile, dynamic=False)
        self._graphed = GraphedFunction(FastPreemption._graph_body, self.device, owner=self, name="the engine") \
            if self.cuda_graphs else None  # fmt: skip

    # -- noise -----------------------------------------------------------------------------------------
    def _image_seeds(self, count: int, noise_seeds: Sequence[int] | None) -> list[int]:
        """One noise seed per image, each a whole number in 0..2**64-1 (as ``seed``: -1 aliased 2**64-1,
        and 1.9 was taken as 1).

        Raises:
            InputError: another count of seeds than images, or a seed that is no such number.
        """
        if noise_seeds is None:
            return list(range(count))
        if isinstance(noise_seeds, (str, bytes)) or not hasattr(noise_seeds, "__len__"):
            raise InputError(f"noise_seeds must be a sequence of whole numbers, one per image, got {noise_seeds!r}")
        seeds = list(noise_seeds.tolist() if isinstance(noise_seeds, torch.Tensor) else noise_seeds)
        if len(seeds) != count:
            raise InputError(f"{len(seeds)} noise seeds for {count} images")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s <= MAX_SEED:
                raise InputError(f"noise seeds must be whole numbers in 0..2**64-1, got {s!r}")
        return [int(s) for s in seeds]

    def _generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed % (1 << 63))
        return g

    def image_keys(self, noise_seeds: Sequence[int]) -> torch.Tensor:
        """The images' 64-bit noise keys, [B, 2] int64 (low and high 32 bits) on the host, from the base seed
        and each image's noise seed: what :meth:`perturb_keyed` takes."""
        return seeded_image_keys(self.seed, noise_seeds)

    def _sample_generators(self, count: int, noise_seeds: Sequence[int] | None) -> list[list[torch.Generator]]:
        """One generator per image and sample (full-resolution images): any chunk of samples then draws
        the same noise as the whole, so the chunk size (memory) never changes a result."""
        return [[self._generator(self.seed * 0x9E3779B97F4A7C15 + s * 0xBF58476D1CE4E5B9 + j)
                 for j in range(self.config.samples)] for s in self._image_seeds(count, noise_seeds)]  # fmt: skip

    def _sample_noise(self, like: torch.Tensor, generators: list[list[torch.Generator]],
                      samples: range) -> torch.Tensor:  # fmt: skip
        """U(-eps, eps) noise of ``samples`` (a range of sample indices), [B, len(samples), C, H, W]."""
        eps = self.config.eps
        out = torch.empty((like.shape[0], len(samples), *like.shape[1:]), device=self.device, dtype=like.dtype)
        for i, row in enumerate(generators):
            for k, j in enumerate(samples):
                out[i, k].uniform_(-eps, eps, generator=row[j])
        return out

    def _noise(self, like: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """U(-eps, eps) noise, [B, S, C, H, W], from one step's keys ([B, S]: a slice of :func:`noise_keys`)."""
        block = NOISE_BLOCK_ELEMENTS.get(self.device.type, NOISE_BLOCK_ELEMENTS["cpu"])
        noise = hash_noise(keys, like[0].numel(), self.config.eps, block=block, dtype=like.dtype)
        return noise.view(like.shape[0], keys.shape[1], *like.shape[1:])

    # -- one step --------------------------------------------------------------------------------------
    def _loss_grad(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        xs = xs.detach().requires_grad_(True)
        if self.compile == "reduce-overhead":
            # a new CUDA-graph step: the previous step's graph outputs (already consumed) may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with torch.enable_grad():
            if self.precision == "bf16":
                # no cache of cast weights: one forward per context gains nothing from it, and a CUDA graph
                # must not keep casts made at capture (torch's make_graphed_callables refuses cached autocast)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False):
                    logits = self._net(xs)
            else:
                logits = self._net(xs)
            # no label is ignored: cross_entropy's default ignores -100, and that image then took no step
            loss = F.cross_entropy(logits.float(), ys, reduction="sum", ignore_index=_NO_IGNORED_LABEL)
            (grad,) = torch.autograd.grad(loss, xs)
        return grad

    def _move_samples(self, sample: torch.Tensor, y_rep: torch.Tensor, x_t: torch.Tensor, bounds: _Ball,
                      direction: float) -> None:  # fmt: skip
        """The FGSM (or PGD-K) moves of samples [B, k, C, H, W] along ``direction``, then their projections,
        in place."""
        cfg = self.config
        b, k, shape = sample.shape[0], sample.shape[1], sample.shape[2:]
        step_size = cfg.eps if cfg.inner_steps == 1 else 2.5 * cfg.eps / cfg.inner_steps
        if cfg.inner_steps > 1:  # PGD samples stay within eps of where they started (blocked: a copy of them)
            start = _Ball(sample if bounds.block is None else sample.clone(), cfg.eps, block=bounds.block)
        # channels-last is the layout oneDNN/cuDNN convolutions prefer; for inputs that the model resizes
        # first, the copy would only cost time at full resolution
        to_net = tuple(shape[-2:]) == tuple(getattr(self.backbone, "input_hw", ()))
        for _ in range(cfg.inner_steps):
            xs = sample.view(b * k, *shape)
            if to_net:
                xs = xs.contiguous(memory_format=torch.channels_last)
            grad = self._loss_grad(xs, y_rep).view(b, k, *shape)
            # in place saves a buffer; a compiled graph's output is left alone (CUDA graphs own that memory)
            sign = grad.sign_() if self.compile == "off" else grad.sign()
            del grad
            sample.add_(sign, alpha=direction * step_size)
            del sign  # freed before the projections (and the next PGD step's gradient)
            if cfg.inner_steps > 1:
                start.clip_(sample)
        if cfg.sample_projection == "iterate":
            _Ball(x_t.unsqueeze(1), cfg.eps, block=bounds.block).clip_(sample)
        bounds.clip_(sample)

    def _step(
        self,
        x_t: torch.Tensor,
        bounds: _Ball,
        y_rep: torch.Tensor,
        keys: torch.Tensor,
        direction: float,
    ) -> torch.Tensor:
        """One cascade step, its noise from ``keys`` ([B, N]); ``direction`` -1 = forward (descend the loss),
        +1 = backward (attack).

        The N samples of each image live in one [B, N, C, H, W] buffer that is updated in place, and the
        per-image quantities (the iterate, the budget's bounds) broadcast over N instead of being copied N
        times: at full resolution (photos) this elementwise traffic, not the backbone, is most of the time.

        Each noisy copy ``x_t + delta_n`` is clipped to [0, 1] before its gradient: the model sees images,
        as a PGD random start is clipped (METHOD.md's step 1 does not clip; the README gives the measured
        difference).
        """
        # bounds: the eps-ball around the original [B, 1, C, H, W] intersected with [0, 1]
        samples, numel = keys.shape[1], x_t[0].numel()
        budget = SAMPLE_PASS_ELEMENTS.get(self.device.type, SAMPLE_PASS_ELEMENTS["cpu"])
        # sized by the image alone (as in _step_in_chunks): a batch's size never changes an image's bits
        chunk = max(MIN_SAMPLES_PER_PASS, budget // numel)
        if samples <= chunk:
            sample = self._noise(x_t, keys).add_(x_t.unsqueeze(1)).clamp_(0.0, 1.0)
            self._move_samples(sample, y_rep, x_t, bounds, direction)
            mean = sample.mean(dim=1)
            del sample
            return self._outer_step(x_t, mean, bounds, direction)
        # more samples than one pass holds: chunks of them; the hashed noise of a chunk of keys is that of
        # the same samples drawn whole
        labels = y_rep.view(x_t.shape[0], samples)
        total = self._sample_sum_in_chunks(x_t, bounds, direction, samples, chunk, budget,
                                           noise=lambda part, picked: self._noise(x_t[part], keys[part, picked]),
                                           labels=lambda part, picked: labels[part, picked].reshape(-1))  # fmt: skip
        return self._outer_step(x_t, total.div_(samples), bounds, direction)

    def _outer_step(self, x_t: torch.Tensor, mean_sample: torch.Tensor, bounds: _Ball,
                    direction: float) -> torch.Tensor:  # fmt: skip
        """The iterate's move from the samples' mean, projected onto the budget around the original: the new
        iterate, in ``mean_sample``'s memory (``x_t`` is left as it was)."""
        # forward: x + eta * delta_r; backward: x - eta * delta_a  (delta points along the attack). Each
        # operation is the one x_t - direction * eta * (mean - x_t) makes, in place: the same bits without
        # two more full-size temporaries (the peak of a photo's memory)
        step = mean_sample.sub_(x_t).mul_(direction * self.config.eta)
        x_next = torch.sub(x_t, step, out=step)
        bounds.clip_(x_next.unsqueeze(1))
        return x_next

    def _step_in_chunks(
        self,
        x_t: torch.Tensor,
        bounds: _Ball,
        y: torch.Tensor,
        generators: list[list[torch.Generator]],
        direction: float,
    ) -> torch.Tensor:
        """:meth:`_step` for images the backbone resizes: the samples go through in chunks of at most
        ``SAMPLE_CHUNK_ELEMENTS`` elements and only their sum is kept, so memory does not grow with N.
        Their noise comes from one generator per image and sample, whose streams carry on from step to
        step: at full resolution :func:`hash_noise` costs more than these few calls per step save (one
        sample of a 12-megapixel photo on the 2-core EPYC: 225-253 ms hashed, 150 ms from a generator)."""
        cfg = self.config
        numel = x_t[0].numel()
        budget = SAMPLE_CHUNK_ELEMENTS.get(self.device.type, SAMPLE_CHUNK_ELEMENTS["cpu"])
        # An image's chunk of samples is sized by the image alone, and as many images as fit go through
        # together: sized by the whole batch, the chunks (and so the order of their sum, and the result's
        # bits) depended on how many images shared the batch.
        chunk = max(1, min(cfg.samples, budget // numel))

        def noise(part: slice, picked: slice) -> torch.Tensor:
            return self._sample_noise(x_t[part], generators[part], range(picked.start, picked.stop))

        def labels(part: slice, picked: slice) -> torch.Tensor:
            return y[part].repeat_interleave(picked.stop - picked.start)

        total = self._sample_sum_in_chunks(x_t, bounds, direction, cfg.samples, chunk, budget, noise=noise,
                                           labels=labels)  # fmt: skip
        return self._outer_step(x_t, total.div_(cfg.samples), bounds, direction)

    def _sample_sum_in_chunks(
        self,
        x_t: torch.Tensor,
        bounds: _Ball,
        direction: float,
        samples: int,
        chunk: int,
        budget: int,
        *,
        noise: Callable[[slice, slice], torch.Tensor],
        labels: Callable[[slice, slice], torch.Tensor],
    ) -> torch.Tensor:
        """The sum over each image's ``samples`` moved samples, [B, C, H, W], computed ``chunk`` samples of
        as many images as ``budget`` elements hold at a time. ``noise(images, samples)`` draws the noise of
        those images and samples ([b, k, C, H, W]); ``labels(images, samples)`` gives their labels ([b * k]).
        The chunks are sized by the caller from the image alone, so a batch never changes an image's bits."""
        images = max(1, budget // (chunk * x_t[0].numel()))
        total = torch.zeros_like(x_t)
        for lo in range(0, x_t.shape[0], images):
            part = slice(lo, lo + images)
            x_part, bounds_part = x_t[part], bounds.part(part)
            for first in range(0, samples, chunk):
                picked = slice(first, min(samples, first + chunk))
                sample = noise(part, picked).add_(x_part.unsqueeze(1)).clamp_(0.0, 1.0)
                self._move_samples(sample, labels(part, picked), x_part, bounds_part, direction)
                # one sample (a large photo's chunk) is added as it is: its sum over one sample is a copy of
                # it, as large as the photo, with the same bits
                total[part].add_(sample[:, 0] if sample.shape[1] == 1 else sample.sum(dim=1))
                del sample
        return total

    def perturb(
        self, x: torch.Tensor, y: torch.Tensor, *, noise_seeds: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Protect a batch.

        Args:
            x: images, [B, C, H, W] floats in [0, 1] (C = 1 or 3; any H, W the backbone accepts). Any float
                dtype: the computation, and the result, are float32. Their values are not checked here (that
                would wait for the device): :meth:`preempt_cli.protect.Protector.protect` checks them.
            y: labels, [B] integers (the classifier's, or ground truth).
            noise_seeds: one int per image (default: :func:`content_seeds`, from each image's own pixels, as
                the file pipeline gives them: an image's result does not depend on its batch).

        Returns:
            The protected images, float32, same shape, within ``eps`` of ``x`` in L-inf (up to float32
            rounding) and in [0, 1]. Also inside ``torch.inference_mode()``, which this leaves for the
            gradients it takes.

        Raises:
            InputError: ``x`` or ``y`` is not a tensor, or of the wrong dtype or shape.
        """
        check_batch(x, y)
        with torch.inference_mode(False), torch.no_grad():
            return self._perturb(x, y, noise_seeds)

    def perturb_levels(self, levels: torch.Tensor, max_value: int, y: torch.Tensor, *,
                       noise_seeds: Sequence[int] | None = None) -> torch.Tensor:  # fmt: skip
        """:meth:`perturb` of the images that integer ``levels`` [B, C, H, W] hold (uint8, or int32 for 16-bit;
        ``max_value`` 255 or 65535): of ``levels_to_float(levels, max_value)``, the same bits, with a float32
        buffer of a photo's size fewer. A caller of :meth:`perturb` holds its images while they are protected;
        here a photo's floats are the engine's own, its first iterate, freed once the first step has made the
        next, and the budget's bounds are computed from the 8-bit levels where used (see :class:`_Ball`): 4
        float32 buffers of the photo's size at once instead of 5 (one sample at a time), 6 instead of 7 (two),
        and a quarter of one for the levels. 16-bit levels (int32) are as large as the floats, which then stay
        the center, as in :meth:`perturb`. What the file pipeline protects with
        (:meth:`~preempt_cli.protect.Protector.transform_levels`).

        Raises:
            InputError: ``levels`` is not an integer [B, C, H, W] tensor, or ``y`` not one label per image.
        """
        if not isinstance(levels, torch.Tensor):
            raise InputError(f"levels must be an integer [B, C, H, W] tensor, got {type(levels).__name__}")
        if levels.is_floating_point() or levels.is_complex() or levels.dtype == torch.bool or levels.ndim != 4:
            raise InputError(f"levels must be an integer [B, C, H, W] tensor, got {levels.dtype} {tuple(levels.shape)}")
        with torch.inference_mode(False), torch.no_grad():
            levels = levels.to(self.device)
            x = levels_to_float(levels, max_value)
            check_batch(x, y)
            if x.shape[0] == 0 or self.at_input_size(x) or levels.element_size() > 1:
                return self._perturb(x, y, noise_seeds)
            (y,) = autograd_usable(y.to(self.device, torch.long))
            generators = self._sample_generators(x.shape[0], content_seeds(x) if noise_seeds is None else noise_seeds)
            block = BOUND_BLOCK_ELEMENTS.get(self.device.type, BOUND_BLOCK_ELEMENTS["cpu"])
            # in the samples' layout: a block of the pipeline's (NHWC) levels took twice the time of the floats
            # it replaces to convert (on a CPU, 0.39 s against 0.18 s a clip of a 12-megapixel sample)
            bounds = _Ball(levels.contiguous().unsqueeze(1), self.config.eps, block=block, max_value=max_value)
            # x is the first iterate, and its only holder: the first step's iterate replaces it (_perturb's
            # cascade, without the float center its caller and its bounds hold)
            x_t = x
            del x
            with eval_mode(self.backbone):
                for direction in self.config.step_directions:
                    x_t = self._step_in_chunks(x_t, bounds, y, generators, direction=direction)
            return x_t

    def _perturb(self, x: torch.Tensor, y: torch.Tensor, noise_seeds: Sequence[int] | None) -> torch.Tensor:
        x0 = x.to(self.device, torch.float32)
        y = y.to(self.device, torch.long)
        x0, y = autograd_usable(x0, y)
        if x0.shape[0] == 0:
            return x0.clone()
        if noise_seeds is None:
            noise_seeds = content_seeds(x0)
        if self.at_input_size(x0):
            image_keys = to_device(self.image_keys(self._image_seeds(x0.shape[0], noise_seeds)), self.device)
            if self._graphed is not None:
                return self._graphed(x0, y, image_keys)[0]
            return self.perturb_keyed(x0, y, image_keys)
        # resized by the model (photos): one noise stream per image and sample
        generators = self._sample_generators(x0.shape[0], noise_seeds)
        # the budget's bounds computed where used, and no copy of x0: each step's iterate is new (see
        # _outer_step), so x0 is never written
        block = BOUND_BLOCK_ELEMENTS.get(self.device.type, BOUND_BLOCK_ELEMENTS["cpu"])
        bounds = _Ball(x0.unsqueeze(1), self.config.eps, block=block)
        x_t = x0
        # in train mode, BatchNorm would mix the images of a batch (and update its statistics)
        with eval_mode(self.backbone):
            for direction in self.config.step_directions:
                x_t = self._step_in_chunks(x_t, bounds, y, generators, direction=direction)
        return x_t

    def at_input_size(self, x: torch.Tensor) -> bool:
        """Whether images ``x`` [B, C, H, W] are at the backbone's input size (or it has none): those go
        through :meth:`perturb_keyed`; others the backbone resizes (photos), with noise of their own."""
        input_hw = getattr(self.backbone, "input_hw", None)
        return input_hw is None or tuple(x.shape[-2:]) == tuple(input_hw)

    def perturb_keyed(self, x: torch.Tensor, y: torch.Tensor, image_keys: torch.Tensor) -> torch.Tensor:
        """:meth:`perturb` of images at the backbone's input size, their noise from ``image_keys`` ([B, 2] int64
        on the device, as :meth:`image_keys` gives them): tensors in, a tensor out, and nothing that waits for
        the device, so that a CUDA graph can capture it (see :mod:`preempt_cli.graphs`). Nothing is checked."""
        with torch.inference_mode(False), torch.no_grad():
            x0, y = autograd_usable(x.to(self.device, torch.float32), y.to(self.device, torch.long))
            cfg = self.config
            bounds = _Ball(x0.unsqueeze(1), cfg.eps)
            keys = noise_keys(image_keys, cfg.forward_steps + cfg.backward_steps, cfg.samples)
            labels = y.repeat_interleave(cfg.samples)
            x_t = x0.clone()
            with eval_mode(self.backbone):  # in train mode, BatchNorm would mix the images of a batch
                for i, direction in enumerate(cfg.step_directions):
                    x_t = self._step(x_t, bounds, labels, keys[:, i], direction=direction)
            return x_t

    def _graph_body(self, x: torch.Tensor, y: torch.Tensor, image_keys: torch.Tensor) -> tuple[torch.Tensor]:
        """What the engine's CUDA graphs capture: :meth:`perturb_keyed`, its output as a tuple."""
        return (self.perturb_keyed(x, y, image_keys),)


def check_cuda_graphs(cuda_graphs: Any, compile: str, device: torch.device) -> bool:
    """Whether CUDA graphs are used: ``cuda_graphs`` on a GPU, without ``compile``.

    Raises:
        ConfigError: ``cuda_graphs`` is not a bool, or comes with a ``compile`` mode.
    """
    if not isinstance(cuda_graphs, bool):
        raise ConfigError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    if cuda_graphs and compile == "reduce-overhead":  # it was told to use the one it was given
        raise ConfigError("--compile reduce-overhead already replays its compiled kernels in CUDA graphs: drop "
                          "--cuda-graphs, which replays the eager kernels")  # fmt: skip
    if cuda_graphs and compile != "off":
        raise ConfigError(f"CUDA graphs replay the eager kernels; with --compile {compile} use --compile "
                          "reduce-overhead (compiled kernels in CUDA graphs) instead")  # fmt: skip
    if cuda_graphs and device.type != "cuda":
        logging.getLogger(__name__).warning("--cuda-graphs needs a GPU: running eagerly on %s", device)
        return False
    return cuda_graphs


def autograd_usable(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor, copied when it was made under ``torch.inference_mode()``: autograd cannot use those, a
    copy made outside that mode it can."""
    return tuple(t.clone() if t.is_inference() else t for t in tensors)


def check_images(x: Any, *, error: type[InputError] = InputError) -> None:
    """Refuse images :meth:`FastPreemption.perturb` cannot take, by their type, dtype and shape alone (not
    their values: that would wait for the device).

    ``error`` is the class raised: :class:`~preempt_cli.errors.InputConfigError` where an API refused such
    images with ``ConfigError`` before (the attacks, the quality metrics), so its callers still catch it.

    Raises:
        InputError: ``x`` is not a floating-point [B, C, H, W] tensor.
    """
    if not isinstance(x, torch.Tensor):
        raise error(f"images must be a torch.Tensor [B, C, H, W] of floats in [0, 1], got {type(x).__name__}"
                    " (for a numpy array: torch.from_numpy(a))")  # fmt: skip
    if x.ndim != 4:
        raise error(f"images must be a [B, C, H, W] tensor (NCHW), got shape {tuple(x.shape)}"
                    + (" (one image: add a batch dimension with x[None])" if x.ndim == 3 else ""))  # fmt: skip
    if not x.is_floating_point():
        raise error(f"images must be float in [0, 1], got dtype {x.dtype}; for uint8 use x.float() / 255")
    if x.shape[0] and 0 in x.shape[1:]:  # an empty batch is fine; an image without pixels is not an image
        raise error(f"images must have channels, height and width, got shape {tuple(x.shape)}")


def check_batch(x: Any, y: Any, *, error: type[InputError] = InputError) -> None:
    """:func:`check_images`, and refuse labels that are not one integer per image (``error``: as there).

    Raises:
        InputError: ``x`` is not a floating-point [B, C, H, W] tensor, or ``y`` not an integer [B] tensor.
    """
    check_images(x, error=error)
    if not isinstance(y, torch.Tensor):
        raise error(f"labels must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise error(f"labels must be integer class indices, got dtype {y.dtype}")
    if tuple(y.shape) != (x.shape[0],):
        raise error(f"expected {x.shape[0]} labels (one per image), got shape {tuple(y.shape)}")


def check_channels(x: torch.Tensor, channels: int, *, model: str = "the backbone",
                   error: type[InputError] = InputError) -> None:  # fmt: skip
    """Refuse [B, C, H, W] images ``x`` of another channel count than ``channels``, or 1 (gray, which the
    model wrappers repeat); ``model`` names what takes them, for the message; ``error``: as in
    :func:`check_images`.

    Raises:
        InputError: ``x`` has another count of channels.
    """
    if x.shape[1] not in (1, channels):  # before the model fails on it, with its own words
        raise error(f"images have {x.shape[1]} channels but {model} takes {channels}"
                    + (" (or 1)" if channels != 1 else "")  # a gray model was said to take "1 (or 1)"
                    + ("; NHWC images: x.permute(0, 3, 1, 2)" if x.shape[-1] in (1, channels) else ""))  # fmt: skip


def check_unit_range(x: torch.Tensor, *, error: type[InputError] = InputError) -> None:
    """Refuse images ``x`` with a value outside [0, 1], or NaN (this waits for the device); ``error``: as in
    :func:`check_images`.

    Raises:
        InputError: a value outside [0, 1] or NaN.
    """
    if x.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(x.detach()))  # a caller's requires_grad input: no warning
    if not 0 <= low <= high <= 1:  # NaN fails every comparison
        raise error(f"images must be floats in [0, 1], got values from {low:.4g} to {high:.4g}"
                    + _unit_range_hint(low, high))


def _unit_range_hint(low: float, high: float) -> str:
    """What images of values from ``low`` to ``high`` most likely are, for :func:`check_unit_range`'s message."""
    if -math.inf < low < 0:  # mean/std-normalized images, as a torchvision pipeline gives them (above 1 too)
        return "; give [0, 1] images, not normalized ones (the models normalize inside their wrapper)"
    if 1 < high < math.inf:
        return "; for 0..255 values use x / 255"
    return ""

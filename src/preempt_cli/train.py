"""Training backbones and classifiers: standard training, fast adversarial training and PGD-AT.

A backbone is the user-side key of Fast Preemption: in the paper's threat model whoever holds its exact
weights and settings can revert a protected image (white-box reversion) and anyone else has to guess (on
the models measured here reversion fails with or without the key: benchmarks/RESULTS.md). This module
lets users make their own keys instead of picking a public model an attacker can pick too:

* :func:`train` - training from scratch or fine-tuning from a registered model, with one of
  ``standard`` (clean cross-entropy), ``fgsm-rs`` (fast adversarial training: one FGSM step from a random
  start, step 1.25 eps; Wong, Rice & Kolter 2020) or ``pgd`` (PGD-AT with a random start; Madry et al.
  2018), a one-cycle or cosine learning-rate schedule, per-epoch clean and PGD accuracy on a held-out
  split, checkpoints to resume from, and weights written as safetensors with their metadata;
* :func:`keygen` - a private backbone derived from a public base by a short adversarial fine-tune whose
  data order, augmentation and re-initialized last layer all come from a secret seed.

Images are [0, 1] NCHW float32; normalization belongs to the model wrapper. Training data is an ImageFolder
directory or a zip of one (e.g. CIFAR-10's ``train/<class>/NNNN.jpg``), decoded once into memory as uint8.
Checkpoints are safetensors too (weights, optimizer buffers, random state; progress as JSON metadata), so
resuming never unpickles anything.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import logging
import math
import os
import secrets
import threading
import time
import zipfile
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .attacks import PGD
from .engine import MAX_SEED, eval_mode, native_bf16, refuse_int_levels
from .errors import ConfigError, ImageReadError, clip, excerpt, first_line, value_text
from .hub import save_safetensors, sha256_file
from ._paths import PRIVATE_FILE_MODE, expand_home, owner_only
from ._signals import stops_held
from .imageio import DEFAULT_MAX_PIXELS, gray16_levels, levels_to_float, max_file_bytes
from .inputs import is_hidden_name
from .models import ImageModel, build_model, load_model
from .registry import ModelConfig, Source

__all__ = [
    "TrainData",
    "load_train_data",
    "TrainConfig",
    "EpochStats",
    "TrainResult",
    "train",
    "keygen",
    "KEYGEN_DEFAULTS",
    "augment",
    "evaluate_accuracy",
    "arch_config",
    "checkpoint_path",
    "new_secret_seed",
    "resolve_amp",
]

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
METHODS = ("standard", "fgsm-rs", "pgd")
SCHEDULES = ("onecycle", "cosine")


# -- data -------------------------------------------------------------------------------------------------
@dataclass
class TrainData:
    """Labelled training images held in memory: uint8 NCHW pixels, int64 labels, class names."""

    source: Path
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def training_size(self, holdout: int) -> int:
        """How many images :meth:`split` leaves to train on once ``holdout`` are set aside.

        Raises:
            ConfigError: none would be left.
        """
        if holdout > 0 and holdout >= len(self):
            raise ConfigError(f"--holdout {holdout} leaves no training images ({len(self)} in {self.source})")
        return len(self) - max(holdout, 0)

    def split(self, holdout: int, seed: int = 0) -> tuple[TrainData, TrainData]:
        """(train, held-out): a fixed random ``holdout`` images are set aside (the same for every training
        seed, so epochs of different runs are measured on the same images).

        Raises:
            ConfigError: ``holdout`` leaves no training images.
        """
        self.training_size(holdout)
        if holdout <= 0:
            return self, replace(self, images=self.images[:0], labels=self.labels[:0])
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        # the held-out images in their random order: the first --eval-images of them are the ones measured,
        # and in index order (the data's class order) they were nearly all of the first few classes
        held, kept = order[:holdout], order[holdout:].sort().values
        return (replace(self, images=self.images[kept], labels=self.labels[kept]),
                replace(self, images=self.images[held], labels=self.labels[held]))  # fmt: skip


def _to_8_bits(im: Image.Image, name: str) -> Image.Image:
    """``im`` as 8-bit grayscale when it is 16-bit (or 32-bit integer) grayscale, scaled: Pillow's
    ``convert`` clips those values to 255, so a 16-bit photo came out nearly white. Read as protect reads
    them (:func:`~preempt_cli.imageio.gray16_levels`): 16-bit or nothing."""
    levels = gray16_levels(im, name)
    if levels is None:
        return im
    return Image.fromarray(((levels.astype(np.int64) + 128) // 257).astype(np.uint8), "L")  # round(v / 257)


def _decode(data: bytes, name: str, size: tuple[int, int] | None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            _refuse_too_many_pixels(im, name)
            im = _to_8_bits(im, name).convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except ImageReadError:
        raise
    except UnidentifiedImageError:  # its message names an in-memory buffer (<_io.BytesIO object at 0x...>)
        raise ImageReadError(name, "cannot decode training image: not an image Pillow can read") from None
    except Exception as e:  # PIL raises many types for damaged files
        raise ImageReadError(name, f"cannot decode training image: {first_line(e)}") from e


def _refuse_too_many_pixels(im: Image.Image, name: str) -> None:
    """Refuse, undecoded, an image of more pixels than protect takes by default: Pillow decodes up to twice
    its limit (179 megapixels, gigabytes on each decoding thread) and a crafted PNG of that many is a few
    kilobytes.

    Raises:
        ImageReadError: the image is over the limit.
    """
    width, height = im.size
    if width * height > DEFAULT_MAX_PIXELS:
        raise ImageReadError(name, f"training image of {width}x{height} = {width * height:,} pixels exceeds the "
                                   f"limit of {DEFAULT_MAX_PIXELS:,} (decompression-bomb protection)")  # fmt: skip


#: How much more than its compressed members a zip of training images may inflate to (beyond
#: :data:`_ZIP_SLACK_BYTES`): image files are compressed already (PNG, JPEG, WebP: deflate gains about
#: nothing; BMP or PPM photos a few times), where a zip bomb's members of one byte repeated inflate 1,000x.
_MAX_ZIP_RATIO = 100
_ZIP_SLACK_BYTES = 64 << 20


def _refuse_a_zip_bomb(archive: zipfile.ZipFile, names: Sequence[str], source: Path) -> None:
    """Refuse a zip whose members ``names`` would inflate to more than a file of an image can hold, or to
    far more than image files do, before any is read: each is inflated into memory as its size in the zip
    says, and all are kept until decoded.

    Raises:
        ImageReadError: a member is larger than any image within the pixel limit can take.
        ConfigError: the members inflate more than :data:`_MAX_ZIP_RATIO` times.
    """
    members = [archive.getinfo(n) for n in names]
    cap = max_file_bytes(DEFAULT_MAX_PIXELS)
    for member in members:
        if member.file_size > cap:
            raise ImageReadError(f"{source}:{member.filename}", f"{member.file_size:,} bytes inflated, more than an "
                                 f"image within the pixel limit of {DEFAULT_MAX_PIXELS:,} can take (at most {cap:,})")  # fmt: skip
    inflated, compressed = sum(m.file_size for m in members), sum(m.compress_size for m in members)
    if inflated > _MAX_ZIP_RATIO * compressed + _ZIP_SLACK_BYTES:
        raise ConfigError(f"{source}: its images inflate to {inflated:,} bytes from {compressed:,} in the zip, over "
                          f"{_MAX_ZIP_RATIO}x, which image files never do (a zip bomb?); if it is trusted, unzip it "
                          "and give the folder")  # fmt: skip


def _decode_all(raw: list[bytes], names: list[str], size: tuple[int, int], workers: int) -> list[np.ndarray]:
    """``raw`` decoded by :func:`_decode` on ``workers`` threads, in order; the first file (in order) that
    cannot be decoded raises its :class:`ImageReadError` once all are done.

    Not a ``ThreadPoolExecutor``: Ctrl-C and SIGTERM reach a command as a ``KeyboardInterrupt`` raised in
    the main thread wherever it is, and one raised while ``submit`` or ``result`` held the pool's internal
    lock (taken by a ``with`` that had not begun) left that lock taken: the workers waited on it forever and
    the pool's shutdown on them, so ``preempt train``/``keygen`` hung for good after a single SIGTERM while
    decoding (5 of 12 tries on the 50,000-image zip). Here the main thread only starts daemon threads and
    joins them (``Thread.join`` survives an interrupt); on one the workers stop after their current image.
    """
    n = max(1, min(workers, len(raw)))
    arrays: list[np.ndarray | None] = [None] * len(raw)
    errors: dict[int, BaseException] = {}
    stop = threading.Event()

    def work(first: int) -> None:
        for i in range(first, len(raw), n):
            if stop.is_set():
                return
            try:
                arrays[i] = _decode(raw[i], names[i], size)
            except BaseException as e:  # raised in the caller's thread, the first in file order
                errors[i] = e

    threads = [threading.Thread(target=work, args=(k,), name=f"preempt-decode-{k}", daemon=True) for k in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.25)
    except BaseException:
        stop.set()
        raise
    if errors:
        raise errors[min(errors)]
    return arrays  # type: ignore[return-value]  # every entry set: no error


def _common_size(raw: list[bytes], source: Path) -> tuple[int, int]:
    """The (height, width) most of the images have (the first in file order among equals), read from their
    headers; a warning when some differ, as they are resized to it. It was the first file's size: one
    photo sorted first among 32x32 images trained at its 512x512 (60x the time) and registered that size."""
    sizes: collections.Counter[tuple[int, int]] = collections.Counter()
    for data in raw:
        try:
            with Image.open(io.BytesIO(data)) as im:
                sizes[(im.height, im.width)] += 1
        except Exception:  # its decoding says why, naming the file
            continue
    if not sizes:
        return _decode(raw[0], str(source), None).shape[:2]  # raises the first file's reason
    (height, width), count = sizes.most_common(1)[0]  # ties: the first seen (Counter keeps insertion order)
    if count < len(raw):
        _logger.warning("%s: %d of %d training images are not %dx%d, the most common size: they are resized to "
                        "it (--input-size sets another)", source, len(raw) - count, len(raw), width, height)  # fmt: skip
    return height, width


def _read_image_bytes(read: Callable[[str], bytes], name: str, shown: str) -> bytes:
    """``read(name)``, a file that cannot be read an :class:`ImageReadError` naming it as ``shown``: a damaged
    zip member (a partial download fails its CRC, or inflating it) or a file this process may not read
    were internal errors that named neither the zip nor the file.

    Raises:
        ImageReadError: ``name`` cannot be read.
    """
    try:
        return read(name)
    except OSError as e:
        reason = e.strerror or first_line(e)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as e:
        reason = first_line(e)  # a damaged member; an encrypted one, or one of an unsupported compression
    raise ImageReadError(shown, f"cannot read training image: {reason}") from None


def _is_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (a name ``os.fsdecode`` gave surrogates, in another encoding,
    cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_train_data(
    source: Path | str, *, input_hw: Sequence[int] | None = None, classes: Sequence[str] | None = None, workers: int = 4
) -> TrainData:
    """An ImageFolder directory ``ROOT/<class>/<file>`` or a zip of one (optionally under one top folder,
    e.g. ``train/<class>/<file>``), decoded into memory and resized to ``input_hw`` (default: the size
    most of them have, see :func:`_common_size`) where needed.

    Labels are class-folder names; with ``classes`` (the model's class names) they are mapped to the model's
    indices, and a folder that is not one of them is an error. Files are taken in sorted order.

    Raises:
        ConfigError: the source is missing, empty, or its classes do not match the model's; a zip that
            inflates as no image files do (see :func:`_refuse_a_zip_bomb`).
        ImageReadError: a file cannot be read or decoded, or has more pixels than protect takes by default.
    """
    source = expand_home(source)
    entries: list[tuple[str, str]] = []  # (class, member name)
    if os.path.isdir(source):
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            if (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and len(rel.parts) == 2
                    and not any(is_hidden_name(p) for p in rel.parts)):  # fmt: skip
                entries.append((rel.parts[0], str(path)))
        read = lambda name: Path(name).read_bytes()  # noqa: E731
        label = str
        archive = None
    elif os.path.isfile(source) and zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        # macOS's archiver adds __MACOSX/ and ._name resource forks: not images of the set (nor hidden ones)
        names = sorted(n for n in archive.namelist() if not n.endswith("/") and n.lower().endswith(IMAGE_SUFFIXES)
                       and not any(is_hidden_name(p) for p in n.split("/")))  # fmt: skip
        depths = {len(n.split("/")) for n in names}
        if not names or not depths <= {2, 3} or len(depths) != 1:
            raise ConfigError(f"{source}: expected an ImageFolder layout <class>/<file> (or <top>/<class>/<file>)")
        tops = {n.split("/")[0] for n in names} if depths == {3} else set()
        if len(tops) > 1:  # train/ and test/ in one zip: merged by class name, the test set would be trained on
            raise ConfigError(f"{source}: several top folders ({', '.join(sorted(tops))}); expected one "
                              "<top>/<class>/<file> tree: zip the one to train on")  # fmt: skip
        _refuse_a_zip_bomb(archive, names, source)
        entries = [(n.split("/")[-2], n) for n in names]
        read = archive.read
        label = lambda name: f"{source}:{name}"  # noqa: E731  (a member is named with its zip)
    elif os.path.exists(source):
        raise ConfigError(f"{source}: neither a folder nor a zip file")
    else:
        raise ConfigError(f"{source}: no such file or folder")
    if not entries:
        raise ConfigError(f"{source}: no images found (expected ROOT/<class>/<image>)")
    found = sorted({c for c, _ in entries})
    if len(found) < 2:  # one class: a model that answers it whatever the input, nothing learnt (a base too)
        raise ConfigError(f"{source}: {len(found)} class folder ({found[0]}); training needs at least 2")
    if classes is not None:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise ConfigError(f"{source}: class folders {unknown[:5]} are not classes of the model {list(classes)[:10]}")
        names = tuple(classes)
    else:
        # the weights record their classes as UTF-8 text: a name in another encoding failed once trained
        other = next((c for c in found if not _is_utf8(c)), None)
        if other is not None:
            raise ConfigError(f"{source}: class folder {excerpt(other)} is not named in UTF-8 (another encoding?): "
                              "the model records its class names as text; rename the folder")  # fmt: skip
        names = tuple(found)
    index = {c: i for i, c in enumerate(names)}
    try:
        raw = [_read_image_bytes(read, name, label(name)) for _, name in entries]  # zip reads are not thread-safe
    finally:  # closed when a member cannot be read too
        if archive is not None:
            archive.close()
    if input_hw is None:
        input_hw = _common_size(raw, source)
    size = (int(input_hw[0]), int(input_hw[1]))
    arrays = _decode_all(raw, [label(n) for _, n in entries], size, workers)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([index[c] for c, _ in entries], dtype=torch.int64)
    return TrainData(source, images, labels, names)


def augment(x: torch.Tensor, generator: torch.Generator, *, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, drawn from ``generator``."""
    n, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mirror = (torch.rand(n, generator=generator, device=generator.device) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


# -- configuration ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (the defaults are fast adversarial training at L-inf 8/255)."""

    method: str = "fgsm-rs"
    eps: float = 8 / 255
    step_size: float | None = None  # fgsm-rs: 1.25 eps; pgd: eps / 4
    attack_steps: int = 7  # PGD-AT steps per batch
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.2  # peak learning rate
    schedule: str = "onecycle"
    warmup: float = 0.4  # one-cycle: fraction of the run spent rising to ``lr``
    momentum: float = 0.9
    weight_decay: float = 5e-4
    holdout: int = 1000
    eval_images: int = 500
    eval_steps: int = 10
    seed: int = 0  # None only in the result of a keygen whose seed was secret
    reinit_last: bool = False  # re-initialize the final linear layer (keygen)
    amp: str = "auto"  # "auto" (bf16 where the hardware runs it natively), "bf16", "off"
    max_batches_per_epoch: int | None = None  # shorter epochs (keygen, tests)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown training method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"--amp must be auto, bf16 or off, got {self.amp!r}")
        refuse_int_levels("eps", self.eps)
        refuse_int_levels("step_size", self.step_size)
        if not 0 <= self.eps <= 1:
            raise ConfigError(f"eps must be in [0, 1], got {self.eps}")
        for name in ("epochs", "batch_size", "attack_steps", "eval_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        # NaN passes every comparison, and a NaN or infinite rate trains NaN weights that then get saved
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight-decay must be a number >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.step_size is not None and not 0 < self.step_size <= 1:
            raise ConfigError(f"step-size must be in (0, 1], got {self.step_size}")
        if self.holdout < 0 or self.eval_images < 0:
            raise ConfigError("holdout and eval-images must be >= 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.max_batches_per_epoch is not None and self.max_batches_per_epoch < 1:  # the CLI's --max-batches
            raise ConfigError(f"max-batches must be >= 1, got {self.max_batches_per_epoch}")
        _check_seed(self.seed)

    @property
    def effective_step_size(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return 1.25 * self.eps if self.method == "fgsm-rs" else self.eps / 4

    def learning_rate(self, progress: float) -> float:
        """The learning rate at ``progress`` in [0, 1] of the run."""
        if self.schedule == "onecycle":  # triangular, as in fast adversarial training
            if progress < self.warmup:
                return self.lr * progress / self.warmup
            return self.lr * max(0.0, 1 - progress) / (1 - self.warmup)
        return 0.5 * self.lr * (1 + math.cos(math.pi * progress))

    def describe(self) -> str:
        if self.method == "standard":
            how = "standard training"
        elif self.method == "fgsm-rs":
            how = f"fast adversarial training (FGSM-RS, L-inf {self.eps * 255:.4g}/255, step {self.effective_step_size * 255:.4g}/255)"
        else:
            how = f"PGD-AT (L-inf {self.eps * 255:.4g}/255, {self.attack_steps} steps of {self.effective_step_size * 255:.4g}/255)"
        epochs = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        if self.max_batches_per_epoch:  # shorter epochs: a run of the same epochs that is not the same training
            epochs += f" of at most {self.max_batches_per_epoch} batch{'es' if self.max_batches_per_epoch != 1 else ''}"
        return f"{how}, {epochs}, {self.schedule} lr {self.lr:g}, batch {self.batch_size}, wd {self.weight_decay:g}"


def _check_seed(seed: int | None) -> None:
    """Refuse a seed torch would fail on (beyond 64 bits) or take for another (negative: torch takes seeds
    modulo 2**64, and -5 made the same key as 2**64 - 5). :func:`~preempt_cli.engine.check_seed`'s range,
    but the message leaves the value out: keygen's seed is a secret. None: a keygen result's, whose seed is
    not kept."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError("seed must be a whole number from 0 to 2**64 - 1")


@dataclass
class EpochStats:
    """One epoch's statistics. The schedule sets the learning rate at every step, so an epoch has no one
    rate: ``lr_first`` and ``lr_last`` are those of its first and last steps (one-cycle's peak can fall
    between them)."""

    epoch: int
    lr_first: float
    lr_last: float
    train_loss: float
    train_acc: float
    heldout_clean: float | None
    heldout_pgd: float | None
    seconds: float


@dataclass
class TrainResult:
    output: Path
    sha256: str
    config: TrainConfig
    history: list[EpochStats] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> EpochStats | None:
        return self.history[-1] if self.history else None


# -- training ---------------------------------------------------------------------------------------------
def resolve_amp(device: torch.device, amp: str) -> str:
    """The precision ``auto`` means on ``device``: bf16 on CUDA and on CPUs with native bf16, else off."""
    if amp != "auto":
        return amp
    if native_bf16(device):  # about 1.8x faster training on a 2-core EPYC with AVX512-BF16
        return "bf16"
    return "off"


def _autocast(device: torch.device, amp: str):
    amp = resolve_amp(device, amp)
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _adversarial(model: ImageModel, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                 generator: torch.Generator, amp: str) -> torch.Tensor:  # fmt: skip
    """Training-time adversarial examples (the model stays in train mode, as in the reference recipes);
    gradients are taken for the perturbation only."""
    eps, step = cfg.eps, cfg.effective_step_size
    delta = (torch.rand(x.shape, generator=generator, device=generator.device).to(x.device) * 2 - 1) * eps
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    steps = 1 if cfg.method == "fgsm-rs" else cfg.attack_steps
    for _ in range(steps):
        with _autocast(x.device, amp):
            loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta + step * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
        delta.requires_grad_(True)
    return (x + delta).detach()


@torch.no_grad()
def _clean_accuracy(model: ImageModel, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return 100.0 * correct / max(1, len(y))


def evaluate_accuracy(model: ImageModel, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 8 / 255,
                      steps: int = 10, batch_size: int = 256, device: torch.device | str = "cpu") -> tuple[float, float]:  # fmt: skip
    """(clean, PGD) accuracy in % of ``model`` on uint8 ``images``: PGD L-inf ``eps``, ``steps`` steps of
    eps/4 from a random start, on 8-bit images."""
    with eval_mode(model):
        x = levels_to_float(images.to(device), 255)  # the same floats on every device: PGD draws its starts from them
        y = labels.to(device)
        clean = _clean_accuracy(model, x, y, batch_size)
        pgd = PGD(model, eps=eps, steps=steps, quantize=True, seed=0, device=device)
        robust = 0
        for i in range(0, len(y), batch_size):
            adv = pgd.perturb(x[i : i + batch_size], y[i : i + batch_size])
            with torch.no_grad():
                robust += int((model(adv).argmax(1) == y[i : i + batch_size]).sum())
        return clean, 100.0 * robust / max(1, len(y))


def _trainable(base: str | ModelConfig | None, arch_cfg: ModelConfig | None, models_dir: Path | None,
               registry: Sequence[Path | str] | Path | str, device: torch.device) -> ImageModel:  # fmt: skip
    if base is not None:
        model = load_model(base, device="cpu", models_dir=models_dir, registry=registry, fuse=False)
    elif arch_cfg is not None:
        model = build_model(arch_cfg)
    else:
        raise ConfigError("give a base model to fine-tune or an architecture to train from scratch")
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(device, memory_format=torch.channels_last).train()


def _last_linear(model: ImageModel) -> torch.nn.Linear:
    linears = [m for m in model.net.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ConfigError(f"model {model.name}: no final linear layer to re-initialize")
    return linears[-1]


def _optimizer(model: ImageModel, cfg: TrainConfig) -> torch.optim.SGD:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BatchNorm and biases
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=True)  # fmt: skip


def checkpoint_path(output: Path) -> Path:
    """Where the checkpoint of a run writing ``output`` lives (beside it)."""
    return output.with_name(output.name + ".ckpt")


def _save_checkpoint(path: Path, model: ImageModel, opt: torch.optim.Optimizer, generator: torch.Generator,
                     epoch: int, history: list[EpochStats], fingerprint: str, *, mode: int | None = None) -> None:  # fmt: skip
    tensors = {f"model.{k}": v for k, v in model.net.state_dict().items()}
    names = {id(p): n for n, p in model.net.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{names[id(p)]}"] = buf
    tensors["rng"] = generator.get_state()
    # torch's global generators, those of dropout and other stochastic layers (see _own_global_generators)
    tensors["rng.global"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    meta = {"epoch": str(epoch), "history": json.dumps([asdict(h) for h in history]), "fingerprint": fingerprint}
    save_safetensors(tensors, path, meta, mode=mode)


def _owner_only(path: str | None) -> bool:
    """Whether the file ``path`` is readable by its owner alone (a key as :func:`keygen` writes it); False for
    no file (timm's own weights), or one that cannot be looked at."""
    try:
        return path is not None and owner_only(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _load_checkpoint(path: Path, model: ImageModel, opt: torch.optim.Optimizer, generator: torch.Generator,
                     fingerprint: str, first_lr: Callable[[int], float]) -> tuple[int, list[EpochStats]]:  # fmt: skip
    """Restore the run saved in ``path``: (epochs done, their statistics). ``first_lr(epoch)``: the learning
    rate of that epoch's first step (from 1), for the statistics of a checkpoint of 0.26.0 or earlier, whose
    ``lr`` is that of each epoch's last step.

    Raises:
        ConfigError: the checkpoint is of a run with other settings (named), or damaged.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                raise ConfigError(f"{path}: checkpoint of a run with other settings "
                                  f"({_differences(meta.get('fingerprint'), fingerprint)}); resume with those settings, or "
                                  "delete it (or run with --overwrite instead of --resume) to start over")  # fmt: skip
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        device = next(model.parameters()).device
        model.net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        params = dict(model.net.named_parameters())
        for key, value in tensors.items():
            if key.startswith("momentum."):
                opt.state[params[key[9:]]]["momentum_buffer"] = value.to(device)
        generator.set_state(tensors["rng"])
        if "rng.global" in tensors:  # (a checkpoint of 0.25.0 or earlier has none: its run did not seed them)
            torch.set_rng_state(tensors["rng.global"])
        if "rng.cuda" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        history = [EpochStats(**_epoch_stats_now(h, first_lr)) for h in json.loads(meta.get("history", "[]"))]
        return int(meta["epoch"]), history
    except ConfigError:
        raise
    except Exception as e:  # safetensors, torch and json raise many types for a damaged file
        reason = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = clip(reason, 200)  # it can quote the file's metadata (a key of its history), of any length
        raise ConfigError(f"{path}: damaged checkpoint ({reason}); delete it, or run with --overwrite instead of "
                          "--resume, to start over") from None  # fmt: skip


def _epoch_stats_now(entry: dict[str, Any], first_lr: Callable[[int], float]) -> dict[str, Any]:
    """An epoch's statistics from a checkpoint's history, in :class:`EpochStats`'s fields: one of 0.26.0 or
    earlier has ``lr``, the rate of the epoch's last step, and no ``lr_first`` (the schedule's, recomputed)."""
    if "lr" not in entry:
        return entry
    now = {k: v for k, v in entry.items() if k != "lr"}
    return now | {"lr_first": first_lr(int(entry["epoch"])), "lr_last": entry["lr"]}


def _differences(saved: str | None, now: str) -> str:
    """What differs between the fingerprint of a checkpoint's run and this run's, e.g.
    ``epochs 3 there, 4 here``."""
    try:
        old, new = json.loads(saved or "{}"), json.loads(now)
    except ValueError:
        return "unreadable settings"
    labels = {"data": "the training images", "n": "the number of training images", "base": "the base model",
              "arch": "the architecture"}  # fmt: skip
    found = []
    for key in sorted(set(old.get("config", {})) | set(new["config"])):
        a, b = old.get("config", {}).get(key), new["config"].get(key)
        if a != b:
            option = {"max_batches_per_epoch": "max-batches"}.get(key, key.replace("_", "-"))
            # the checkpoint's side is its file's to say: shown escaped and cut (see value_text)
            found.append(f"{value_text(option)} {value_text(a)} there, {value_text(b)} here")
    found += [labels[k] for k in labels if old.get(k) != new.get(k)]
    return "; ".join(found) or "unknown"


def _metadata(model: ImageModel, cfg: TrainConfig, base: str | None, history: list[EpochStats], extra: dict[str, str]) -> dict[str, str]:
    mc = model.config
    meta = {
        "arch": mc.arch,
        "arch_args": json.dumps(dict(mc.arch_args)),
        "mean": ",".join(f"{v:g}" for v in mc.mean) if mc.mean else "none",
        "std": ",".join(f"{v:g}" for v in mc.std) if mc.std else "none",
        "dataset": mc.dataset,
        "input_size": ",".join(str(v) for v in mc.input_size),
        "num_classes": str(mc.num_classes),
        "classes": ",".join(mc.classes) if mc.classes else "",
        "training": cfg.describe() + (f", fine-tuned from {base}" if base else ", from scratch")
        + f", {resolve_amp(next(model.parameters()).device, cfg.amp)} autocast",
        "source": "preempt train",
    }
    if "shortcut" in mc.arch_args:
        meta["shortcut"] = str(mc.arch_args["shortcut"])
    if history and history[-1].heldout_clean is not None:
        meta["heldout_clean"] = f"{history[-1].heldout_clean:.2f}"
        meta["heldout_pgd"] = f"{history[-1].heldout_pgd:.2f}"
    return meta | extra


def _own_global_generators(train_fn: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """``train_fn`` run with torch's global generators (the CPU's, and the training device's where it is a GPU)
    forked: the run seeds them from its seed, and the caller gets them back as they were.

    Dropout and other stochastic layers (timm's ``rexnet_100`` and ``ghostnet_100`` have dropout by default)
    draw from them: unseeded, the same seed gave other weights from run to run, a resumed run others than an
    uninterrupted one, and each run advanced the caller's generators."""

    @functools.wraps(train_fn)
    def run(*args: Any, **kwargs: Any) -> TrainResult:
        device = torch.device(kwargs.get("device", "cpu"))
        with torch.random.fork_rng(devices=[_gpu_index(device)] if device.type == "cuda" else []):
            return train_fn(*args, **kwargs)

    return run


def _seed_global_generators(seed: int, device: torch.device) -> None:
    """Seed the global generators of the CPU and of ``device`` (a GPU) for the stochastic layers of a run of
    ``seed``: from a seed derived from it, so that their draws are not those of the initialization or of the
    run's own generator (seeded with ``seed`` itself)."""
    derived = int.from_bytes(hashlib.sha256(f"preempt train: stochastic layers {seed}".encode()).digest()[:8], "little")
    torch.default_generator.manual_seed(derived)
    if device.type == "cuda":
        torch.cuda.default_generators[_gpu_index(device)].manual_seed(derived)


def _gpu_index(device: torch.device) -> int:
    """The index of the CUDA device ``device`` (``cuda``: the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@_own_global_generators
def train(
    data: TrainData,
    output: Path | str,
    *,
    config: TrainConfig = TrainConfig(),
    base: str | ModelConfig | None = None,
    arch: ModelConfig | None = None,
    models_dir: Path | str | None = None,
    registry: Sequence[Path | str] | Path | str = (),
    device: torch.device | str = "cpu",
    resume: bool = False,
    keep_checkpoint: bool = False,
    checkpoints: bool = True,
    private: bool = False,
    overwrite: bool = True,
    metadata: dict[str, str] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    on_written: Callable[[TrainResult], None] | None = None,
) -> TrainResult:
    """Train a model on ``data`` and write its weights to ``output`` (safetensors with metadata).

    Args:
        data: the training images (a held-out split of ``config.holdout`` is set aside from them).
        output: the weights file to write.
        config: method, budget, schedule and seed.
        base: a registered model to fine-tune (its architecture, preprocessing and weights).
        arch: the config of a model to train from scratch (when ``base`` is None).
        resume: continue from the checkpoint beside ``output`` when its settings match.
        keep_checkpoint: keep the checkpoint after the run (else it is deleted once the weights are written).
        checkpoints: write a checkpoint after every epoch (``keygen`` writes none: one holds the state of the
            secret-seeded generator, and an interrupted run would leave it on disk).
        private: write the weights readable by their owner alone (mode ``0o600``; ``keygen``'s key), not with
            a new file's permissions (``0o666`` less the umask: readable by every user, as a model to share).
            A ``base`` whose weights file only its owner can read (a key) makes it so, checkpoints included.
        overwrite: replace a file at ``output``; False (the CLI without ``--overwrite``, which found none there):
            one that appeared during the training (another run writing it) is left as it is.
        metadata: extra metadata entries for the weights file.
        on_epoch: called with each epoch's statistics.
        on_batch: called with (batch, batches) of the current epoch.
        on_epoch_start: called with each epoch's number (from 1; after a resume, the first epoch not done)
            before its first batch.
        on_written: called with the result once the weights are written (to register them). A stop signal
            (Ctrl-C, SIGTERM) that comes from the start of the write to its return takes effect after it:
            see :func:`~preempt_cli._signals.stops_held`.

    Raises:
        ConfigError: bad settings, or data whose classes the model does not have.
        ImageWriteError: the weights cannot be written, or (``overwrite`` False) ``output`` appeared meanwhile.
    """
    device = torch.device(device)
    output = expand_home(output, existing_literal=False)
    models_dir = expand_home(models_dir) if models_dir is not None else None
    # a seeded initialization (the global generators are the run's own: see _own_global_generators), on the CPU's
    # generator alone, where the net is built: torch.manual_seed seeded every CUDA device's too, which the fork
    # gave back only where training used it, so torch.cuda.initial_seed() told keygen's secret seed to the process
    torch.default_generator.manual_seed(config.seed)
    model = _trainable(base, arch, models_dir, registry, device)
    if not private and base is not None and _owner_only(model.weights_path):
        # a model fine-tuned from a private key is as secret as the key: it was written readable by every user
        _logger.info("the weights of %s are readable by their owner alone: %s and its checkpoints are written so "
                     "too", model.config.name, output)  # fmt: skip
        private = True
    mc = model.config
    if data.classes and mc.classes and tuple(data.classes) != tuple(mc.classes):
        raise ConfigError(f"data classes {list(data.classes)[:5]}... do not match model {mc.name} classes {list(mc.classes)[:5]}...")
    if len(data.classes) > mc.num_classes:
        raise ConfigError(f"data has {len(data.classes)} classes, model {mc.name} outputs {mc.num_classes}")
    train_set, held = data.split(config.holdout)
    held_x, held_y = held.images[: config.eval_images], held.labels[: config.eval_images]

    generator = torch.Generator().manual_seed(config.seed)
    _seed_global_generators(config.seed, device)  # (a resumed run's are restored from its checkpoint below)
    if config.reinit_last:
        fc = _last_linear(model)
        with torch.no_grad():
            bound = 1 / math.sqrt(fc.in_features)
            fc.weight.copy_(torch.empty_like(fc.weight).uniform_(-bound, bound, generator=_cpu_like(generator, fc.weight)))
            if fc.bias is not None:
                fc.bias.copy_(torch.empty_like(fc.bias).uniform_(-bound, bound, generator=_cpu_like(generator, fc.bias)))
    opt = _optimizer(model, config)
    # what a checkpoint must have been made with to be resumed: the settings (autocast as resolved on this
    # device), the model, and the training images themselves (other data of the same size is another run)
    data_digest = hashlib.sha256(train_set.images.numpy().tobytes())
    data_digest.update(train_set.labels.numpy().tobytes())
    fingerprint = json.dumps({"config": asdict(config) | {"amp": resolve_amp(torch.device(device), config.amp)},
                              "base": str(getattr(base, "name", base)), "arch": mc.arch, "n": len(train_set),
                              "data": data_digest.hexdigest()}, sort_keys=True)  # fmt: skip
    n = len(train_set)
    per_epoch = n // config.batch_size
    if config.max_batches_per_epoch:
        per_epoch = min(per_epoch, config.max_batches_per_epoch)
    if per_epoch < 1:
        raise ConfigError(f"{n} training images are fewer than one batch of {config.batch_size}")
    total = per_epoch * config.epochs

    def step_lr(epoch: int, step: int) -> float:
        """The learning rate of step ``step`` of epoch ``epoch`` (both from 0)."""
        return config.learning_rate((epoch * per_epoch + step) / total)

    ckpt = checkpoint_path(output)
    start, history = 0, []
    if resume and ckpt.is_file():
        start, history = _load_checkpoint(ckpt, model, opt, generator, fingerprint, lambda e: step_lr(e - 1, 0))
        _logger.info("resuming %s after epoch %d", output, start)

    images = train_set.images.pin_memory() if device.type == "cuda" else train_set.images
    for epoch in range(start, config.epochs):
        if on_epoch_start:
            on_epoch_start(epoch + 1)
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        seen = correct = 0
        loss_sum = 0.0
        lr_first = step_lr(epoch, 0)  # the rate its first step trains with (below), reported with the last's
        for b in range(per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            x = images[idx].to(device, non_blocking=True).float().div_(255)
            y = train_set.labels[idx].to(device, non_blocking=True)
            x = augment(x, generator).contiguous(memory_format=torch.channels_last)
            lr = step_lr(epoch, b)
            for group in opt.param_groups:
                group["lr"] = lr
            if config.method != "standard" and config.eps > 0:
                x = _adversarial(model, x, y, config, generator, config.amp)
            with _autocast(device, config.amp):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            batch_loss = float(loss.detach())
            if not math.isfinite(batch_loss):
                raise ConfigError(f"training diverged at epoch {epoch + 1} (loss {batch_loss}); lower --lr")
            seen += len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
            loss_sum += batch_loss * len(y)
            if on_batch:
                on_batch(b + 1, per_epoch)
        # the loss checked above is the one before each step: the last step can still make the weights NaN
        _refuse_non_finite(model, f"at epoch {epoch + 1}")
        clean = pgd = None
        if len(held_y):
            clean, pgd = evaluate_accuracy(model, held_x, held_y, eps=config.eps or 8 / 255,
                                           steps=config.eval_steps, device=device)  # fmt: skip
        stats = EpochStats(epoch + 1, lr_first, lr, loss_sum / seen, 100.0 * correct / seen, clean, pgd,
                           time.perf_counter() - t0)  # fmt: skip
        history.append(stats)
        if checkpoints:
            _save_checkpoint(ckpt, model, opt, generator, epoch + 1, history, fingerprint,
                             mode=PRIVATE_FILE_MODE if private else None)  # fmt: skip
        if on_epoch:
            on_epoch(stats)

    model.eval()
    _refuse_non_finite(model, f"after epoch {config.epochs}")  # e.g. a checkpoint written before this check
    meta = _metadata(model, config, getattr(base, "name", base), history, metadata or {})
    # a stop between writing the weights and registering them (on_written) left them on disk unregistered,
    # unknown to --backbone: both are done before it takes effect (a stop during the write waits for it too)
    with stops_held():
        save_safetensors(dict(model.net.state_dict()), output, meta, mode=PRIVATE_FILE_MODE if private else None,
                         replace=overwrite)  # fmt: skip
        if checkpoints and not keep_checkpoint and ckpt.exists():  # (not another run's, which keygen never wrote)
            ckpt.unlink()
        result = TrainResult(output, sha256_file(output), config, history, meta)
        if on_written:
            on_written(result)
    return result


def _refuse_non_finite(model: ImageModel, when: str) -> None:
    """Raise when a weight or buffer of ``model`` is NaN or infinite: such a model would be written,
    registered and then used, predicting the same class whatever the input."""
    bad = [k for k, v in model.net.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"training diverged {when}: {len(bad)} tensors of weights are not finite ({bad[0]}, ...); "
                          "not written; lower --lr")  # fmt: skip


def _cpu_like(generator: torch.Generator, t: torch.Tensor) -> torch.Generator:
    """``generator`` when it can draw on ``t``'s device, else a CPU one seeded from it (reproducible)."""
    if t.device.type == generator.device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=t.device).manual_seed(seed)


# -- keygen -----------------------------------------------------------------------------------------------
KEYGEN_DEFAULTS = TrainConfig(
    method="fgsm-rs", epochs=1, batch_size=128, lr=0.02, schedule="cosine", holdout=1000, eval_images=500,
    reinit_last=True,
)  # fmt: skip


def new_secret_seed() -> int:
    """A seed from the operating system's secure random source (63 bits)."""
    return secrets.randbits(63)


def keygen(
    base: str | ModelConfig,
    data: TrainData,
    output: Path | str,
    *,
    seed: int | None = None,
    config: TrainConfig = KEYGEN_DEFAULTS,
    models_dir: Path | str | None = None,
    registry: Sequence[Path | str] | Path | str = (),
    device: torch.device | str = "cpu",
    overwrite: bool = True,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    on_written: Callable[[TrainResult], None] | None = None,
) -> TrainResult:
    """Derive a private backbone from the public ``base``: a short adversarial fine-tune whose data order,
    augmentation, attack starts and re-initialized final layer all come from a secret ``seed`` (a fresh
    one from the OS when None). The seed is never written anywhere: the weights file *is* the key, written
    readable by its owner alone (mode ``0o600``).

    The result's ``config.seed`` is ``seed`` when given, else None: the drawn seed is not returned either
    (a repr of the result, a log of it, would hold it). ``overwrite``, ``on_written``: see :func:`train`."""
    secret = seed is None
    seed = new_secret_seed() if secret else seed
    config = replace(config, seed=seed)
    result = train(data, output, config=config, base=base, models_dir=models_dir, registry=registry, device=device,
                 checkpoints=False, private=True, overwrite=overwrite,
                 metadata={"training": f"preempt keygen: {config.describe()} from {getattr(base, 'name', base)}, "
                           "final layer re-initialized; secret seed (not stored)"},
                 on_epoch=on_epoch, on_batch=on_batch, on_epoch_start=on_epoch_start,
                 on_written=_without_seed(on_written) if secret else on_written)  # fmt: skip
    if secret:
        result.config = replace(result.config, seed=None)  # type: ignore[arg-type]
    return result


def _without_seed(on_written: Callable[[TrainResult], None] | None) -> Callable[[TrainResult], None] | None:
    """``on_written``, called with a result whose config holds no seed: a drawn secret seed is returned to
    no one (see :func:`keygen`)."""
    if on_written is None:
        return None

    def call(result: TrainResult) -> None:
        on_written(replace(result, config=replace(result.config, seed=None)))  # type: ignore[arg-type]

    return call


def arch_config(arch: str, *, classes: Sequence[str], input_size: tuple[int, int, int] = (3, 32, 32),
                dataset: str = "custom", arch_args: dict[str, Any] | None = None, name: str = "new-model") -> ModelConfig:  # fmt: skip
    """A config for a model trained from scratch on raw [0, 1] input."""
    return ModelConfig(name=name, arch=arch, source=Source("file", f"{name}.safetensors"), dataset=dataset,
                       input_size=input_size, num_classes=len(classes), classes=tuple(classes),
                       arch_args=dict(arch_args or {}))  # fmt: skip

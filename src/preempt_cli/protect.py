"""Protecting (and reverting) image files: the batch pipeline behind ``preempt protect`` and ``revert``.

Files are decoded on worker threads ahead of the compute, grouped into batches of equal size, labelled,
transformed on the device, rounded to the file's integer levels within the budget, and written as PNGs on
worker threads while the next batch computes. Every input yields one :class:`FileResult`; a bad file
fails alone and the batch goes on.

Batch jobs use this module directly::

    from preempt_cli import load_model, Protector, ForeBackConfig, collect_inputs, RunOptions
    backbone = load_model("cifar10-resnet20-pgdat-a", models_dir="models/")
    classifier = load_model("cifar10-resnet18-std", models_dir="models/")
    protector = Protector(backbone, classifier, config=ForeBackConfig())
    for result in protector.run(collect_inputs(["photos/"]), RunOptions()):
        print(result.as_dict())
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import gc
import hashlib
import json
import logging
import math
import os
import stat
import sys
import threading
from contextlib import contextmanager
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from . import __version__
from .engine import (PRESETS, SAMPLE_PASS_ELEMENTS, FastPreemption, ForeBackConfig, check_batch, check_channels,
                     check_images, check_seed, check_unit_range, eval_mode)  # fmt: skip
from .batches import ComputeThread, QueuedTransfer
from .device import default_io_workers, model_device, to_device
from .errors import ConfigError, InputError, LabelError, excerpt, first_line, reason_of, value_text
from .graphs import GraphedFunction, empty_cache
from ._paths import OutputFolderField
from .hub import sha256_file
from .imageio import (
    DEFAULT_MAX_PIXELS,
    NAME_MAX,
    DecodedSize,
    Picture,
    content_seed,
    decoded_size,
    file_digests,
    display_name,
    folder_write_problem,
    is_fifo,
    levels_to_float,
    lift_pillow_pixel_limit,
    png_is_whole,
    remove_stale_temps,
    nhwc_levels_to_arrays,
    quantize_batch,
    quantize_batch_on_device,
    read_images,
    read_png_text,
    stack_levels,
    start_io_worker,
    write_pngs,
)
from .inputs import (OUTPUT_MARKERS, PROTECTED_SUFFIX, InputFile, as_input_files, assign_outputs, in_shard,
                     read_failure)  # fmt: skip
from .labels import LabelMap, folder_label, resolve_label
from .models import ImageModel, weights_sha256, weights_sha256_of
from .registry import ModelConfig

__all__ = ["FileResult", "RunOptions", "Protector", "METADATA_KEY", "read_preempt_metadata", "content_seed",
           "run_on_devices"]

_logger = logging.getLogger(__name__)

#: PNG text chunk holding preempt's JSON metadata.
METADATA_KEY = "preempt"

#: Image elements (samples x C x H x W) per batch by default: 16 CIFAR images x 20 samples on CPU, where
#: larger batches get memory-bound (measured: 62 ms/image at 16, 76 at 32, 100+ at 50 with ResNet-20 on
#: 2 cores), and 16x that on a GPU (256 CIFAR images: PreActResNet-18 then took 17 GiB in fp32 on an
#: H100, and the rate was flat from 64 to 512 images; larger models that run out of memory back off to
#: half the batch).
_CPU_BATCH_ELEMENTS = SAMPLE_PASS_ELEMENTS["cpu"]
_GPU_BATCH_ELEMENTS = SAMPLE_PASS_ELEMENTS["cuda"]
#: Image sizes waiting at once for their batches to fill; beyond, the oldest partial batch is computed.
_MAX_PARTIAL_BATCHES = 16
#: Files decoded ahead of the device hold at most this many bytes of levels (more only where two batches of
#: one file take more, or that file alone does: it still goes), each file counted by the size its header
#: gives before it is queued, whatever the order of sizes. 64 files were decoded ahead whatever their size:
#: 2.3 GB of 12-megapixel photos (17 GB of 89-megapixel scans) waiting while a CPU computed one photo a
#: minute; in 0.23.0 the bound followed the latest image decoded, and the 64 files queued after small ones
#: could all be photos, decoded at once. 64 CIFAR-size files take 200 KB.
_DECODED_AHEAD_BYTES = 256 << 20
#: The outputs computed and waiting to be written (each its levels and its picture) hold at most this many
#: bytes when a batch's outputs join them (more only where two of its batches take more: one batch is
#: written while the next computes, and a batch over the bound still goes): before, the oldest writes are
#: waited for, and the device waits with them. Unbounded, a device faster than the PNG encoders (a GPU with
#: photos: a 12-megapixel output takes ~4.8 s of CPU to encode) left every batch computed waiting, its
#: outputs in memory (2 GB for 16 photos with a stand-in engine of 1 s a photo).
_WRITES_PENDING_BYTES = 256 << 20
#: The run's first and last batches go in pieces of at least this many images (up to 4 pieces; ResNet-20
#: computes batches of 64 at 92% of its rate at 256 on an H100). The first piece goes to the device as
#: soon as its files are decoded, not once a whole batch is; the files of one piece of the last batch are
#: written while the next computes, so the run does not end waiting for a whole batch's files (on an H100,
#: 2048 PNGs: the time after the last batch fell from 0.05-0.23 s to 0.03-0.12 s).
_MIN_PIECE = 64
#: Batches queued on a GPU at once: the next batch's work is queued before the previous one is waited
#: for, so the device does not idle while the host prepares a batch (see batches.ComputeThread). 1 on a
#: CPU, where queueing a batch is computing it.
_QUEUED_BATCHES = 2
#: How often the main thread, waiting for a batch or a file, wakes to take a Ctrl-C that did not wake it
#: (see :func:`_wait`).
_WAKE_S = 0.1


@dataclass
class FileResult:
    """What happened to one input file."""

    input: Path
    status: str  # "done", "skipped" or "failed"
    output: Path | None = None
    reason: str = ""
    label: int | None = None
    label_name: str | None = None
    confidence_before: float | None = None  # backbone's softmax probability of the label
    confidence_after: float | None = None
    linf: float | None = None  # L-inf distance of the written file to the input, in [0, 1] units
    linf_levels: int | None = None  # the same in integer levels of the file (of 255 or 65535)
    seconds: float | None = None  # compute time of this image (its share of its batch)
    warnings: list[str] | None = None  # what a done file's user should know (its other frames were left out)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def as_dict(self) -> dict[str, Any]:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        return {k: v for k, v in d.items() if v is not None and v != ""}


@dataclass
class RunOptions:
    """How files are found, named and written."""

    #: the folder outputs are written to (None: beside their inputs); given as a ``str`` or ``os.PathLike``,
    #: it is read as a ``Path``, ``~`` expanded
    out_dir: OutputFolderField = OutputFolderField()
    #: the output name's marker (``a.protected.png``); None: the run's own (:attr:`Protector.output_suffix`:
    #: ``.protected``, ``.reverted`` for :class:`~preempt_cli.revert.Reverter`)
    suffix: str | None = None
    overwrite: bool = False
    batch_size: int | None = None  # images per batch at the backbone's input size; None = automatic
    #: images of more pixels fail unread (decompression bombs); above Pillow's own limit, that limit
    #: (``PIL.Image.MAX_IMAGE_PIXELS``, process-wide: Pillow has none per call) is raised to it for the process
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = field(default_factory=default_io_workers)  # decoding/encoding threads or processes
    #: flush each output to disk before it is renamed into place; off, a power loss can leave empty
    #: outputs (which a re-run redoes), and slow disks stop limiting a fast GPU
    fsync: bool = True
    #: where files are decoded and encoded: ``threads``, ``processes`` (no shared GIL: for small images on
    #: a GPU), or ``auto`` (processes when computing on CUDA with 4 or more workers, where a fork server can
    #: start them, so not on Windows; the CLI's default).
    #: Processes start from a fork server that imports the ``__main__`` module again: a script that uses
    #: them needs the ``if __name__ == "__main__":`` guard, as with any multiprocessing code.
    io: str = "threads"
    #: (K, N): only the inputs of shard K of N, K from 1 to N (``--shard K/N``; see ``inputs.in_shard``)
    shard: tuple[int, int] | None = None
    #: (i, k): of the inputs (after ``shard``), take every k-th starting at i (one device worker's share),
    #: i from 0 to k - 1
    partition: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("overwrite", "fsync"):
            if not isinstance(getattr(self, name), bool):  # "no" is true: outputs were replaced unasked
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.shard is not None and not _int_pair_within(self.shard, low=1, high_offset=0):
            raise ConfigError(f"shard must be (K, N) with 1 <= K <= N (K counts from 1), got {self.shard!r}")
        if self.partition is not None and not _int_pair_within(self.partition, low=0, high_offset=1):
            raise ConfigError(f"partition must be (i, k) with 0 <= i < k, got {self.partition!r}")
        for name in ("max_pixels", "workers") + (("batch_size",) if self.batch_size is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {value!r}")
        if self.max_pixels < 1:
            raise ConfigError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.io not in ("auto", "threads", "processes"):
            raise ConfigError(f"--io must be auto, threads or processes, got {self.io!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if self.workers < 1:
            raise ConfigError("--workers must be >= 1")
        if self.suffix is not None and (not isinstance(self.suffix, str) or not self.suffix or "\0" in self.suffix
                                        or "/" in self.suffix or "\\" in self.suffix):
            raise ConfigError(f"invalid --suffix {self.suffix!r}: it must be non-empty with no path separator")
        if self.suffix is not None and (length := _name_length(self.suffix)) + len("a.png") > NAME_MAX:
            # no output name could hold it: refused once, not as a failure of every file
            raise ConfigError(f"--suffix is {length} {'bytes' if _NAMES_IN_BYTES else 'characters'} long: "
                              f"with a stem of one letter and .png, more than the {NAME_MAX} a file name can have")  # fmt: skip


#: Linux counts the length of file names in bytes of their encoding; macOS and Windows in characters
_NAMES_IN_BYTES = sys.platform.startswith("linux")


def _name_length(name: str) -> int:
    """Length of ``name`` as this platform's file systems count it (see :data:`NAME_MAX`)."""
    if not _NAMES_IN_BYTES:
        return len(name)
    try:
        return len(os.fsencode(name))
    except UnicodeEncodeError:  # not encodable: as long as it would be in UTF-8 with its escapes
        return len(name.encode("utf-8", "surrogatepass"))


def _int_pair_within(pair: Any, *, low: int, high_offset: int) -> bool:
    """Whether ``pair`` is two ints (a, b) with low <= a <= b - high_offset."""
    return (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            and low <= pair[0] <= pair[1] - high_offset)  # fmt: skip


def parse_preempt_metadata(raw: str | None) -> dict[str, Any] | None:
    """preempt's metadata from the text of its PNG chunk, else None (absent or not a JSON object)."""
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON; or nested past the parser's depth (a file made to break it)
        return None
    return meta if isinstance(meta, dict) else None


def read_preempt_metadata(picture: Picture) -> dict[str, Any] | None:
    """preempt's metadata of a picture written by preempt, else None."""
    return parse_preempt_metadata(picture.text.get(METADATA_KEY))


def has_preempt_metadata(path: Path) -> bool:
    """Whether ``path`` is a PNG carrying preempt's metadata chunk (an output of an earlier run; read without
    decoding its pixels)."""
    return METADATA_KEY in read_png_text(path, key=METADATA_KEY)


def read_preempt_metadata_file(path: Path) -> dict[str, Any] | None:
    """preempt's metadata of a PNG file written by preempt (read without decoding its pixels), else None."""
    return parse_preempt_metadata(read_png_text(path, key=METADATA_KEY).get(METADATA_KEY))


# What makes two runs' outputs of one original differ. A re-run with other values must not keep an output
# made with the old ones: a protect with the public model, then with one's own key (the README's order),
# would otherwise keep the public-key outputs, which anyone holding that model can attack. The backbone is
# compared by its weights' sha256 where both runs know it. Left out: the precision (``--precision auto``
# picks by hardware, and bf16 keeps the result: see benchmarks/RESULTS.md) and the preset's name (its
# values are compared).
_RUN_SETTINGS = ("backbone", "backbone_setup", "classifier", "classifier_setup", "labels", "eps", "eta",
                 "forward_steps", "backward_steps", "samples", "sample_projection", "inner_steps", "seed")  # fmt: skip


def _setup_sha256(model: Any) -> str | None:
    """The digest of how ``model``'s registry row builds and feeds its weights (see
    :attr:`~preempt_cli.registry.ModelConfig.setup_sha256`); None without a row (tests' bare modules)."""
    config = getattr(model, "config", None)
    return getattr(config, "setup_sha256", None) if config is not None else None


def differing_settings(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The run settings (``_RUN_SETTINGS``) in which an output's recorded metadata differs from a run's, as
    ``"name recorded -> current"``; a setting one side does not record (older versions) is not compared."""

    def show(meta: Mapping[str, Any], key: str) -> str:
        value = meta[key]
        return f"{value * 255:.4g}/255" if key == "eps" and isinstance(value, float) else value_text(value)

    changed = []
    for key in _RUN_SETTINGS:
        sha = f"{key}_sha256"
        by_hash = key in ("backbone", "classifier") and bool(recorded.get(sha)) and bool(current.get(sha))
        if by_hash:
            same = recorded[sha] == current[sha]  # a renamed model is the same; retrained, another
        elif key == "labels" and key in recorded and key in current:  # "file:NAME" before 0.19.0
            same = str(recorded[key]).partition(":")[0] == str(current[key]).partition(":")[0]
        elif key in recorded and key in current:
            same = recorded[key] == current[key]
        else:
            continue
        if same:
            continue
        was, now = show(recorded, key), show(current, key)
        if was == now and by_hash:  # one name, other weights: tell them apart by their hashes
            was, now = f"{was} (sha256 {recorded[sha][:12]})", f"{now} (sha256 {current[sha][:12]})"
        elif was == now:  # values too close to show apart (eps 0.031372 and 8/255)
            was, now = excerpt(recorded[key]), excerpt(current[key])
        changed.append(f"{key} {was} -> {now}")
    return changed


def regular_file_sha256(path: Path) -> str | None:
    """The sha256 of a regular file's bytes; None for anything else (a device such as /dev/zero would be
    read forever; its own read refuses it, with the reason) or a file gone or unreadable."""
    return _if_regular_file(path, sha256_file)


def regular_file_digests(path: Path) -> tuple[str, bytes] | None:
    """:func:`~preempt_cli.imageio.file_digests` of a regular file (as :func:`regular_file_sha256`)."""
    return _if_regular_file(path, file_digests)


def _if_regular_file(path: Path, read: Callable[[Path], Any]) -> Any:
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        return read(path)
    except OSError:  # gone or unreadable: its own read reports that
        return None


def label_digest(label: int, source_label_key: bytes) -> str:
    """What an output records of the label a file or folder gave it: a digest keyed by its original's
    bytes (see :func:`~preempt_cli.imageio.source_label_key`), which a re-run compares."""
    return hashlib.blake2b(str(int(label)).encode(), key=source_label_key, digest_size=16).hexdigest()


_gc_lock = threading.Lock()
#: runs of this process going on, and whether the first of them froze the objects alive then (see below)
_runs_going_on = 0
_runs_froze = False
#: whether a run of this process has collected the garbage there was before its freeze (once per process)
_garbage_collected_once = False


@contextlib.contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """While runs go on, the objects alive at the first one's start are out of the garbage collector's full
    collections; when the last run ends, they are back in them, as they were.

    A process that has imported torch and loaded models holds some 400,000 objects that live as long as
    it does; a run's per-file objects trigger a full collection every few thousand files, and each one
    walks all of them while holding the GIL (117-176 ms measured in runs of 2048 files on an H100
    machine, 147 ms on a 2-core EPYC): a pause in which no batch is launched and no file collected.
    Frozen, they are skipped (``gc.freeze``); objects made later are collected as before. The first run of a
    process first frees what is already garbage (a caller's unreachable cycle would be held for the run).

    They are unfrozen after (``gc.unfreeze``): frozen for good, a caller's object in a reference cycle (a
    notebook's, a service's) that was alive at the run's start and dropped after it was never freed. Where
    objects are frozen already at the start (the caller's own ``gc.freeze()``), the collector is left alone.
    """
    global _runs_going_on, _runs_froze, _garbage_collected_once
    with _gc_lock:
        if _runs_going_on == 0:
            _runs_froze = gc.get_freeze_count() == 0
            if _runs_froze:
                if not _garbage_collected_once:
                    # a cycle already unreachable (a caller's garbage, not yet collected) would be frozen with
                    # the rest, and kept for the run: collected once per process, a full collection's cost
                    gc.collect()
                    _garbage_collected_once = True
                gc.freeze()
        _runs_going_on += 1
    try:
        yield
    finally:
        with _gc_lock:
            _runs_going_on -= 1
            if _runs_going_on == 0 and _runs_froze:
                gc.unfreeze()
                _runs_froze = False


def _piece_size(images: int) -> int:
    """Images per piece of a batch of ``images`` computed in pieces (see ``_MIN_PIECE``)."""
    pieces = min(4, images // _MIN_PIECE)
    return math.ceil(images / pieces) if pieces > 1 else images


def _stats(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, the confidence before and after and the label, as one [3, B] float64 tensor (exact for
    all three): one transfer from the device."""
    return torch.stack([before.double(), after.double(), labels.double()])


class _Launched:
    """A batch's results on their way from the device (:meth:`Protector._compute`): per image the
    confidence before and after and the label, and the rounded levels, NHWC (or, for a batch mixing 8- and
    16-bit pictures, one array per image, already on the host). Several of them joined: a batch computed in
    halves after running out of memory; one image that ran out of memory even alone is its failure's
    reason (:meth:`failed`), so that the rest of its batch is still written."""

    def __init__(self, transfer: QueuedTransfer | None, levels: list[np.ndarray] | None = None,
                 parts: Sequence["_Launched"] = (), failure: str | None = None) -> None:  # fmt: skip
        self.transfer, self.levels, self.parts, self.failure = transfer, levels, list(parts), failure

    @classmethod
    def joined(cls, parts: Sequence["_Launched"]) -> "_Launched":
        return cls(None, parts=parts)

    @classmethod
    def failed(cls, reason: str) -> "_Launched":
        """One image that could not be computed, and why."""
        return cls(None, failure=reason)

    def done(self) -> bool:
        if self.transfer is None:
            return all(p.done() for p in self.parts)
        return self.transfer.done()

    def results(self) -> list[tuple[np.ndarray, float, float, int] | str]:
        """Per image (levels HWC, confidence before, after, label), once they are on the host (waits); or,
        for an image that could not be computed, the reason."""
        if self.failure is not None:
            return [self.failure]
        if self.transfer is None:
            return [r for p in self.parts for r in p.results()]
        stats, *levels = self.transfer.wait()
        arrays = self.levels if self.levels is not None else nhwc_levels_to_arrays(levels[0])
        before, after, labels = stats.tolist()
        return [(lv, b, a, int(lab)) for lv, b, a, lab in zip(arrays, before, after, labels)]


#: Write errors after which a run writes nothing more to that file system: later outputs there would fail
#: alike, each after its compute (a full disk of 100 CIFAR-10 outputs: 75 computed only to fail). What each
#: says, of the folder whose write failed, and what to do.
_FILE_SYSTEM_ERRORS = {
    errno.ENOSPC: ("no space left on the file system of {}", "free space and re-run"),
    errno.EROFS: ("the file system of {} is read-only", "make it writable, or write elsewhere (--out-dir), and re-run"),
    **({errno.EDQUOT: ("disk quota exceeded on the file system of {}", "free space and re-run")}
       if hasattr(errno, "EDQUOT") else {}),  # not on Windows
}  # fmt: skip


def _file_system_of(folder: Path) -> int | None:
    """The device number (``st_dev``) of the file system that holds ``folder``, or would once it is created
    (its nearest existing folder's); None when none can be looked at."""
    while True:
        try:
            return os.stat(folder).st_dev
        except FileNotFoundError:
            if folder == folder.parent:
                return None
            folder = folder.parent
        except (OSError, ValueError):  # unreadable; a name the system refuses
            return None


class _OutputFolders:
    """What one run knows of where its outputs go, so that a file whose output cannot be written fails
    before its compute, not after: each output folder is probed once (a file created and removed there:
    :func:`~preempt_cli.imageio.folder_write_problem`), and a write that fails as a full (ENOSPC, EDQUOT) or
    read-only (EROFS) file system stops the run's writes to that file system (the outputs in folders of the
    same ``st_dev``); other file systems go on. Its methods may be called from any thread; the runs of one
    call (:func:`run_on_devices`' devices, the defenses of ``revert --white-box``) share one."""

    def __init__(self) -> None:
        self._problems: dict[Path, str | None] = {}  # per output folder: why no file can be created there
        self._file_systems: dict[Path, int | None] = {}  # per output folder: its file system's st_dev
        self._stopped: dict[int, str] = {}  # st_dev -> why its outputs are not attempted
        self._probing = threading.Lock()  # runs judging at once (devices) probe a folder once

    def problem(self, output: Path) -> str | None:
        """Why ``output`` cannot be written (its folder probed, once per folder), as a file's reason; None
        when it can."""
        folder = output.parent
        with self._probing:
            if folder not in self._problems:
                self._problems[folder] = folder_write_problem(output)  # missing folders: their nearest existing one
            problem = self._problems[folder]
        return None if problem is None else f"output {output}: not attempted: {problem}"

    def wrote(self, output: Path, outcome: tuple[str | None, int, int | None]) -> None:
        """Take note of a write's outcome (:func:`~preempt_cli.imageio.write_pngs`'): one that failed as a
        full or read-only file system stops the later writes there."""
        error, _, number = outcome
        if error is None or number not in _FILE_SYSTEM_ERRORS:
            return
        device = self._file_system(output.parent)
        if device is not None:  # the first failure there says why (another thread's may come at once)
            what, advice = _FILE_SYSTEM_ERRORS[number]
            self._stopped.setdefault(device, f"not attempted: {what.format(output.parent)} (an earlier write "
                                             f"there failed); {advice}")  # fmt: skip

    def stopped(self, output: Path) -> str | None:
        """Why ``output`` is not attempted (an earlier write failed on its file system), as a file's reason;
        None when it is."""
        if not self._stopped:  # (most runs: no look at the file system)
            return None
        device = self._file_system(output.parent)
        reason = None if device is None else self._stopped.get(device)
        return None if reason is None else f"output {output}: {reason}"

    def _file_system(self, folder: Path) -> int | None:
        if folder not in self._file_systems:
            self._file_systems[folder] = _file_system_of(folder)
        return self._file_systems[folder]


class _NotAttempted(Exception):
    """A batch left uncomputed: its outputs' file system was found full or read-only (see _OutputFolders)."""


@dataclass
class _Pending:
    item: InputFile
    output: Path
    picture: Picture
    label: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _checked_logits(model: ImageModel, logits: torch.Tensor, images: int) -> torch.Tensor:
    """``logits``, which ``model`` gave for ``images`` images, once they are what its config says: one row of
    ``num_classes`` per image (a net of one's own wrapped with another config's classes had its labels taken
    for the caller's, or passed unseen).

    Raises:
        ConfigError: logits of another shape than ``[images, num_classes]``.
    """
    classes = model.config.num_classes
    if logits.ndim == 2 and logits.shape[0] == images and logits.shape[1] != classes:
        raise ConfigError(f"model {model.name} returns {logits.shape[1]} logits per image but its ModelConfig says "
                          f"num_classes {classes}: wrap it with the config of the classes it outputs")  # fmt: skip
    if logits.ndim != 2 or logits.shape[0] != images:
        raise ConfigError(f"model {model.name} returns logits of shape {tuple(logits.shape)} for {images} images, "
                          f"not [{images}, num_classes {classes}]: a backbone or classifier gives one row of "
                          f"logits per image")  # fmt: skip
    return logits


class Protector:
    """Fast Preemption applied to files (and tensors).

    Each image's noise comes from the seed and a hash of the image's own pixels, never from its place in
    a batch: protecting a batch gives the same bits as protecting its images one by one, and a tensor
    decoded from a file (``Picture.to_tensor``) gets the bits :meth:`run` writes for that file (before
    rounding). The float output of :meth:`protect` is within ``eps`` of the input up to float32 rounding;
    a file :meth:`run` saves is exactly within ``floor(eps * 255)`` levels of the original (8-bit).

    One protector may be shared by threads (:meth:`protect` and :meth:`run` alike, with ``compile="off"``):
    no state it keeps between calls changes a result, so each call gives the bits it would give alone.

    Args:
        backbone: the robust model that shapes the perturbation (the user-side key): an
            :class:`~preempt_cli.models.ImageModel`, as :func:`~preempt_cli.models.load_model` gives.
        classifier: labels the images (argmax); ``None`` with ``labels="classifier"`` uses the backbone.
        config: Algorithm 1 settings.
        seed: base seed, an int in 0..2**64-1; the same seed, device and input give the same output bits.
        labels: ``"classifier"``, ``"backbone"``, ``"folders"`` (ImageFolder parent folder names), or a
            :class:`~preempt_cli.labels.LabelMap` read from a CSV/JSON file.
        preset: name of the preset the config came from (recorded in the metadata); default: the one
            :meth:`ForeBackConfig.from_preset` made it from.
        precision: ``fp32``, ``bf16`` or ``auto`` for the backbone's passes (see :class:`FastPreemption`).
        compile: ``off`` or a ``torch.compile`` mode for the backbone (see :class:`FastPreemption`).
        cuda_graphs: on a GPU, replay each batch's device work (labels, confidences, the cascade, the
            rounding) as one CUDA graph per batch shape (see :mod:`preempt_cli.graphs`); the same bits.

    Raises:
        InputError: a model that is not a loaded model (a name: load it with ``load_model``), or a
            ``config`` that is not a :class:`ForeBackConfig` (a ``TypeError`` too, as before).
        ConfigError: an invalid setting (a seed that is not an int in range, mismatched models, ...).
    """

    kind = "protected"
    #: The marker of this class's output names (``a.protected.png``), unless :class:`RunOptions` gives one.
    output_suffix = PROTECTED_SUFFIX
    #: Names of files this class writes, never taken as inputs again (unless --overwrite).
    skip_markers: tuple[str, ...] = OUTPUT_MARKERS
    #: files whose metadata says they are outputs of these kinds of run are skipped, whatever their names
    #: (a reversion's output under ``revert --suffix .rv`` is no original to protect)
    skipped_kinds: tuple[str, ...] = ("protected", "reverted")
    verb = "protects"

    def __init__(
        self,
        backbone: ImageModel,
        classifier: ImageModel | None = None,
        *,
        config: ForeBackConfig | None = None,
        seed: int = 0,
        labels: str | LabelMap = "classifier",
        preset: str | None = None,
        precision: str = "fp32",
        compile: str = "off",
        cuda_graphs: bool = False,
    ) -> None:
        for role, model in (("backbone", backbone), ("classifier", classifier)):
            if model is not None and not isinstance(model, torch.nn.Module):
                raise InputError(f"{role} must be a model, got {type(model).__name__} {model!r}: load it with "
                                 f"preempt_cli.load_model({model!r}, models_dir=...)")  # fmt: skip
            # its ModelConfig says the classes, input size and dataset that labels, budgets and metadata need
            # (an ImageModel, or one torch.compile wrapped, which passes its attributes through)
            if model is not None and not isinstance(getattr(model, "config", None), ModelConfig):
                raise InputError(f"{role} must be a loaded model (preempt_cli.load_model, or ImageModel(net, "
                                 f"ModelConfig(...)) for a net of your own), got a bare {type(model).__name__}; "
                                 f"FastPreemption takes bare nets")  # fmt: skip
        if config is not None and not isinstance(config, ForeBackConfig):
            raise InputError(f"config must be a ForeBackConfig, got {type(config).__name__}")
        self.backbone = backbone
        self.classifier = classifier
        self.config = config or ForeBackConfig.from_preset(dataset=backbone.config.dataset)
        self.seed = check_seed(seed)
        self.preset = preset if preset is not None else self.config.preset
        # recorded in every output: a name it has (edited metadata may give a dict, which no set holds)
        if self.preset is not None and not (isinstance(self.preset, str) and self.preset in PRESETS):
            raise ConfigError(f"unknown preset {excerpt(self.preset)}: choose one of {', '.join(PRESETS)}")
        if (labels not in ("classifier", "backbone", "folders") if isinstance(labels, str)
                else not isinstance(labels, LabelMap)):  # fmt: skip
            # None, a number or a list passed, and the run failed deep inside (AttributeError)
            raise ConfigError(f"labels must be classifier, backbone, folders or a LabelMap (a label file: "
                              f"labels.read_label_file), got {labels!r}")  # fmt: skip
        self.labels = labels
        if labels == "classifier" and classifier is None:
            self.labels = "backbone"
        if classifier is not None and classifier.config.num_classes != backbone.config.num_classes:
            raise ConfigError(
                f"classifier {classifier.name} has {classifier.config.num_classes} classes but backbone "
                f"{backbone.name} has {backbone.config.num_classes}: they must label the same classes"
            )
        if classifier is not None and None not in (classifier.config.class_names, backbone.config.class_names) and \
                classifier.config.class_names != backbone.config.class_names:  # fmt: skip
            raise ConfigError(f"classifier {classifier.name} and backbone {backbone.name} name their classes in a "
                              "different order: a label of one would be another class for the other")  # fmt: skip
        if self.config.eps * 255 < 1:  # the files' levels round it away: the run would "protect" nothing
            _logger.warning("eps %.4g is under one level of an 8-bit image (1/255): 8-bit outputs will equal "
                            "their originals", self.config.eps)  # fmt: skip
        reach = self.config.eta * (self.config.forward_steps + self.config.backward_steps)
        if reach <= 1:  # METHOD.md's rule for the settings: below it the steps cannot add up to the budget
            _logger.warning("eta x (forward + backward steps) = %.3g is not above 1, as the method's settings "
                            "need (the paper's: 0.7 x 3 = 2.1): the cascade cannot move an image the whole "
                            "budget", reach)  # fmt: skip
        self.device = model_device(backbone)  # a net of one's own may have no parameters
        self.engine = FastPreemption(backbone, config=self.config, seed=seed, device=self.device, precision=precision,
                                     compile=compile, cuda_graphs=cuda_graphs)  # fmt: skip
        self.cuda_graphs = self.engine.cuda_graphs
        # a batch's device work as CUDA graphs, per (labels from a model, levels' maximum) (see _compute)
        self._graphed: dict[tuple[bool, int], GraphedFunction] = {}
        self.precision = self.engine.precision
        self._batch_cap: dict[tuple[int, ...], int] = {}  # images per batch an image shape ran out of memory above
        # worker processes by their number: a run asking for another number (another thread's, sharing
        # this Protector) gets a pool of its own, rather than the pool under the other run shut down
        self._pools: dict[int, ProcessPoolExecutor] = {}
        self._pools_lock = threading.Lock()
        self._pool_users: dict[int, int] = {}  # runs using each pool
        self._last_workers = 0
        self._weights_digests: dict[int, str] = {}  # by id() of the backbone and classifier (see _weights_sha256)

    # -- tensors ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Labels by the classifier (by the backbone when ``labels="backbone"`` or no classifier is given).

        With labels from folders or a label file, files take theirs from there; images given as tensors
        without labels have no folder, and are labelled by the classifier as :meth:`protect` says (they
        were labelled by the backbone)."""
        check_images(x)  # a uint8 batch gave labels of its 0..255 values, without a word
        model = self.classifier if (self.labels != "backbone" and self.classifier is not None) else self.backbone
        with eval_mode(model):
            return _checked_logits(model, model(x.to(self.device)), x.shape[0]).argmax(dim=1)

    @torch.inference_mode()
    def confidence(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Backbone softmax probability of ``y`` (types and shapes checked, as :meth:`transform`'s)."""
        check_batch(x, y)
        with eval_mode(self.backbone):
            probs = _checked_logits(self.backbone, self.backbone(x.to(self.device)), x.shape[0]).softmax(dim=1)
        return probs.gather(1, y.to(self.device).view(-1, 1)).squeeze(1)

    def transform(self, x: torch.Tensor, y: torch.Tensor, noise_seeds: Sequence[int] | None = None) -> torch.Tensor:
        """The protected images of ``x`` with labels ``y`` (see :meth:`FastPreemption.perturb`): their types
        and shapes are checked, not their values (the pipeline's inner step: :meth:`protect` checks them).
        On CUDA a label outside the classes is a device-side assert, after which the process cannot use the
        GPU: labels from elsewhere go through :meth:`protect`."""
        return self.engine.perturb(x, y, noise_seeds=noise_seeds)

    def transform_levels(self, levels: torch.Tensor, max_value: int, y: torch.Tensor,
                         noise_seeds: Sequence[int] | None = None) -> torch.Tensor:  # fmt: skip
        """:meth:`transform` of the images that integer ``levels`` [B, C, H, W] hold (``levels_to_float(levels,
        max_value)``), the same bits: the file pipeline's step, whose caller holds no float copy of the images
        meanwhile (a photo's floats are then the engine's alone: see :meth:`FastPreemption.perturb_levels`)."""
        return self.engine.perturb_levels(levels, max_value, y, noise_seeds=noise_seeds)

    def transform_keyed(self, x: torch.Tensor, y: torch.Tensor, image_keys: torch.Tensor) -> torch.Tensor:
        """:meth:`transform` of images at the backbone's input size, their noise from ``image_keys`` (see
        :meth:`FastPreemption.perturb_keyed`): nothing waits for the device, so a CUDA graph captures it."""
        return self.engine.perturb_keyed(x, y, image_keys)

    def protect(self, x: torch.Tensor, y: torch.Tensor | None = None, *,
                noise_seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Label (when ``y`` is None) and protect a batch of images (a :class:`~preempt_cli.revert.Reverter`
        reverts it: ``2 x - D(x)``, labelled with its own labeller).

        Args:
            x: [B, C, H, W] floats in [0, 1] (float16, bfloat16 and float64 are computed, and returned, as
                float32). For 8-bit images, ``x.float() / 255``.
            y: labels, [B] integers in [0, classes); default: the classifier's.
            noise_seeds: one int per image (default: from each image's pixels, see :class:`Protector`).

        Returns:
            The protected images, float32 [B, C, H, W] on the backbone's device (an empty batch: empty).

        Raises:
            InputError: ``x`` or ``y`` of the wrong type, dtype or shape, images with values outside
                [0, 1] (or NaN), labels outside the backbone's classes, ``noise_seeds`` that are not one
                whole number in 0..2**64-1 per image.
            ConfigError: a model (labelling ``x``) whose logits are not ``[B, num_classes]`` of its config.
        """
        check_images(x)
        check_channels(x, self.backbone.config.input_size[0])  # before the classifier fails on it, in its words
        if y is not None:
            check_batch(x, y)
        x = x.to(self.device, torch.float32)
        if x.shape[0] == 0:
            return x.clone()
        check_unit_range(x)
        y = self.predict(x) if y is None else y.to(self.device)
        classes = self.backbone.config.num_classes
        if not bool(((y >= 0) & (y < classes)).all()):
            raise InputError(f"labels must be class indices in [0, {classes}), got values from "
                             f"{int(y.min())} to {int(y.max())}")  # fmt: skip
        return self.transform(x, y, noise_seeds=noise_seeds)

    # -- metadata --------------------------------------------------------------------------------------
    def run_settings(self) -> dict[str, Any]:
        """The settings this run records in each output (the part of :meth:`metadata` common to all files)."""
        cfg = self.config
        labeller = self.classifier if (self.labels == "classifier" and self.classifier) else None
        return {
            "backbone": self.backbone.name,
            "backbone_sha256": self._weights_sha256(self.backbone),
            # its weights file's sha256, or its state's (timm's own weights): no file has the latter
            "backbone_sha256_of": weights_sha256_of(self.backbone),
            "backbone_setup": _setup_sha256(self.backbone),
            "classifier": labeller.name if labeller is not None else None,
            "classifier_sha256": self._weights_sha256(labeller),
            "classifier_sha256_of": weights_sha256_of(labeller) if labeller is not None else None,
            "classifier_setup": _setup_sha256(labeller),
            # a label file's name is not recorded: each file's label is (see label_digest), and the same
            # labels from a renamed file or a pipe (--labels <(...)) are the same setting
            "labels": self.labels if isinstance(self.labels, str) else "file",
            "preset": self.preset,
            "eps": cfg.eps,
            "eta": cfg.eta,
            "forward_steps": cfg.forward_steps,
            "backward_steps": cfg.backward_steps,
            "samples": cfg.samples,
            "sample_projection": cfg.sample_projection,
            "inner_steps": cfg.inner_steps,
            "seed": self.seed,
            "precision": self.precision,
        }

    def _weights_sha256(self, model: torch.nn.Module | None) -> str | None:
        """What tells ``model``'s weights apart (:func:`~preempt_cli.models.weights_sha256`): its file's
        sha256, else its state's, found once per protector. Without a file (a net of the caller's, timm's own
        weights) nothing was recorded, and a re-run with other weights under the same name skipped the
        outputs of the old ones as done."""
        if model is None:
            return None
        digest = self._weights_digests.get(id(model))
        if digest is None:  # two threads may both compute it: the same value
            digest = self._weights_digests[id(model)] = weights_sha256(model)
        return digest

    def metadata(self, pending: _Pending) -> dict[str, Any]:
        return {
            "tool": "preempt",
            "version": __version__,
            "kind": self.kind,
            **self.run_settings(),
            "source_sha256": pending.picture.source_sha256,
            # not the label, which the file is published with (see label_digest); a model's is not recorded
            **({"label_digest": label_digest(pending.label, pending.picture.source_label_key)}
               if self._labels_from_files and pending.label is not None and pending.picture.source_label_key
               else {}),  # fmt: skip
            **pending.extra,
        }

    @property
    def _labels_from_files(self) -> bool:
        return isinstance(self.labels, LabelMap) or self.labels == "folders"

    # -- files -----------------------------------------------------------------------------------------
    def _file_label(self, item: InputFile) -> int | None:
        """Ground-truth label of a file (None when labels come from a model). Raises LabelError."""
        if isinstance(self.labels, LabelMap):
            raw = self.labels.lookup(item)
        elif self.labels == "folders":
            raw = folder_label(item)
            try:
                return resolve_label(raw, self.backbone.config, str(item.path))
            except LabelError as e:  # a folder of photos given alone: its own name is no class
                after = " " if str(e).endswith("?") else ": "  # after "Did you mean 'cat'?", a sentence of its own
                raise LabelError(f"{e}{after}--labels folders takes a file's class from its folder "
                                 "(ROOT/<class>/<file>)") from None  # fmt: skip
        else:
            return None
        return resolve_label(raw, self.backbone.config, str(item.path))

    def _batch_limit(self, picture: Picture, options: RunOptions) -> int:
        """Images of ``picture``'s shape per batch: by this run's ``batch_size`` (each run's own, for a
        Protector that runs again), and never more than ran out of device memory before."""
        return self._shape_batch_limit(picture.channels, picture.size[1], picture.size[0], options)

    def _shape_batch_limit(self, c: int, h: int, w: int, options: RunOptions) -> int:
        """:meth:`_batch_limit` of pictures of ``c`` channels, ``h`` x ``w`` pixels."""
        bh, bw = self.backbone.input_hw
        if options.batch_size is not None:
            limit = max(1, options.batch_size * bh * bw // (h * w))
        else:
            budget = _GPU_BATCH_ELEMENTS if self.device.type == "cuda" else _CPU_BATCH_ELEMENTS
            limit = max(1, min(1024, budget // (self.config.samples * 3 * h * w)))
        return min(limit, self._batch_cap.get((c, h, w), limit))

    def _decode_ahead_cost(self, size: DecodedSize | None, options: RunOptions) -> tuple[int, int]:
        """What a file of ``size`` (:func:`~preempt_cli.imageio.decoded_size`) counts for among the files
        decoded ahead of the device, in bytes, and the most bytes those may hold with it queued: about
        :data:`_DECODED_AHEAD_BYTES`, or two of its batches where those are more. A file of unknown size
        (a pipe) counts as the whole bound: it is decoded with nothing else waiting."""
        if size is None:
            return _DECODED_AHEAD_BYTES, _DECODED_AHEAD_BYTES
        if size.nbytes == 0:  # its read fails before decoding anything
            return 0, _DECODED_AHEAD_BYTES
        limit = self._shape_batch_limit(size.channels, size.height, size.width, options)
        return size.nbytes, max(_DECODED_AHEAD_BYTES, 2 * limit * size.nbytes)

    def _skip_reason(self, item: InputFile, output: Path, options: RunOptions) -> FileResult | Path | None:
        """Why ``item`` is not processed (skipped), None when it is, or its existing output, which
        :meth:`_existing_output` judges (that reads the original: on a thread)."""
        if options.overwrite:
            return None
        marker = next((m for m in self.skip_markers if item.path.stem.endswith(m)), None)
        # the name alone does not make an output: a photo of the user's may be named holiday.protected.png
        # (a file that cannot be read has no metadata here: it fails with its reason when decoded)
        if marker and item.path.suffix.lower() == ".png" and read_preempt_metadata_file(item.path) is not None:
            # no output: the one it would have (a.protected.protected.png) does not exist, and --json
            # listed it as if it did
            return FileResult(item.path, "skipped",
                              reason=f"already a preempt output ({marker}.png with preempt's metadata; "
                                     f"--overwrite processes it again)")  # fmt: skip
        try:
            if output.stat().st_size == 0:  # what a crash (or a power loss without fsync) can leave: redo it
                return None
        except OSError:  # no output yet, or a link of the user's to nowhere (a disk not mounted now): judged
            return output if os.path.islink(output) else None
        return output

    def _existing_output(self, item: InputFile, output: Path) -> FileResult | None:
        """Skipped when ``output`` was made by this kind of run, with these settings, from ``item``'s
        current bytes; failed otherwise (``--overwrite`` replaces it), saying why; None (processed) when the
        input is gone or cannot be read: its read fails with the reason, the output kept."""
        if output.is_dir():  # --overwrite cannot replace a folder: no advice to use it
            return FileResult(item.path, "failed", reason=f"output {output} is a folder: move it, or write the "
                                                          f"outputs elsewhere (--out-dir, --suffix)")  # fmt: skip
        redo = "use --overwrite to replace it"
        if os.path.islink(output) and not os.path.exists(output):  # the user's, which a write would replace unasked
            return FileResult(item.path, "failed", reason=f"output {output} is a symbolic link to nowhere (its "
                                                          f"target does not exist): move it, or {redo}")  # fmt: skip
        meta = read_preempt_metadata_file(output)
        if meta is None or meta.get("kind", self.kind) != self.kind:
            # not ours (a file of the user's, a leftover): it does not show that this input was done
            return FileResult(item.path, "failed", reason=f"output {output} exists and is not a file preempt "
                                                          f"{self.kind}: move it, or {redo}")  # fmt: skip
        if not png_is_whole(output):  # ours, cut short (its metadata comes first): made again, as an empty one is
            _logger.warning("%s: output %s is cut short: it is made again", display_name(item.path),
                            display_name(output))  # fmt: skip
            return None
        # the label's key only where a file's label is compared (below); a model's is not recorded
        recorded, label_key = meta.get("source_sha256"), None
        if self._labels_from_files:
            current, label_key = regular_file_digests(item.path) or (None, None)
        else:
            current = regular_file_sha256(item.path)
        if current is None:
            # not a file whose bytes can be compared: a missing input with an output of its name had been
            # "skipped" (exit 0), as if done; a pipe is read once, and would replace the output unasked
            if is_fifo(item.path):
                return FileResult(item.path, "failed", reason=f"output {output} exists, and a pipe cannot be "
                                                              f"compared with the original it was made from: {redo}")  # fmt: skip
            return None
        if isinstance(recorded, str) and recorded != current:
            # a re-run after the original was edited, or another input of the same name in an earlier run
            return FileResult(item.path, "failed", reason=(
                f"output {output} exists but was made from other content (the original changed, or another "
                f"file of this name was {self.kind} into it): {redo}"))  # fmt: skip
        changed = differing_settings(meta, self.run_settings())
        try:  # a label file (or folder) edited since: the output was pushed toward another class
            label = self._file_label(item)
        except LabelError:  # none now: its read says so
            return None
        names = self.backbone.config.class_name
        if label is not None and isinstance(meta.get("label_digest"), str):
            if meta["label_digest"] != label_digest(label, label_key):
                changed.append(f"label now {names(label)}")
        elif label is not None and isinstance(meta.get("label"), int) and meta["label"] != label:  # before 0.19.0
            changed.append(f"label {names(meta['label'])} -> {names(label)}")
        if changed:
            return FileResult(item.path, "failed", reason=f"output {output} exists but was made with other "
                                                          f"settings ({'; '.join(changed)}): {redo}")  # fmt: skip
        remove_stale_temps(output)  # what a killed write of it left: removed as its write would (none comes)
        return FileResult(item.path, "skipped", output=output, reason=f"output exists: {output} ({redo})")

    def _prepare(self, item: InputFile, output: Path, options: RunOptions) -> _Pending | FileResult:
        """Decode and label one file (on a worker thread)."""
        return self._decoded(item, output, options, read_images([str(item.path)], options.max_pixels)[0])

    def _decoded(self, item: InputFile, output: Path, options: RunOptions, picture: Picture | str) -> _Pending | FileResult:
        """What to do with a decoded file (``picture``; a string: why it could not be read)."""
        if isinstance(picture, str):
            return FileResult(item.path, "failed", reason=read_failure(item, picture))
        try:
            meta = read_preempt_metadata(picture)
            if meta and meta.get("kind") in self.skipped_kinds and not options.overwrite:
                extra = "" if meta["kind"] == self.kind else f" (a reversion's output; --overwrite {self.verb} it anyway)"
                return FileResult(item.path, "skipped", reason=f"already {meta['kind']} by preempt{extra}")
            return _Pending(item, output, picture, self._file_label(item), self._extra_metadata(meta))
        except LabelError as e:
            return FileResult(item.path, "failed", reason=reason_of(e, item.path))

    def _extra_metadata(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        return {}

    def _compute(self, batch: list[_Pending]) -> _Launched:
        """Queue one equal-shape batch's work on the device (on a GPU nothing waits for it; see
        :class:`~preempt_cli.batches.ComputeThread`); its results come from the returned handle."""
        colors = [p.picture.color for p in batch]
        seeds = [p.picture.content_seed for p in batch]  # hashed where the files were decoded
        known = [p.label for p in batch]
        # labels from a model (None) for every file of a run, or from folders or a file (see _file_label)
        y = None if None in known else to_device(torch.tensor(known), self.device)
        reference = stack_levels(colors, self.device)  # None: 8- and 16-bit pictures of one size
        if reference is None:  # rounded image by image, on each one's grid (waits for the device)
            x = to_device(torch.stack([p.picture.to_tensor() for p in batch]), self.device)
            y = self.predict(x).clone() if y is None else y
            before = self.confidence(x, y)
            levels, saved = quantize_batch(self.transform(x, y, noise_seeds=seeds), colors, self.config.eps)
            return _Launched(QueuedTransfer([_stats(before, self.confidence(saved, y), y)]), levels)
        max_value = batch[0].picture.max_value
        if self.cuda_graphs and self.engine.at_input_size(reference):
            return self._compute_graphed(reference, y, max_value, seeds)

        def perturb(levels: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.transform_levels(levels, max_value, y, noise_seeds=seeds)

        return _Launched(QueuedTransfer(list(self._device_work(reference, y, max_value, perturb))))

    def _compute_graphed(self, reference: torch.Tensor, y: torch.Tensor | None, max_value: int,
                         seeds: list[int]) -> _Launched:  # fmt: skip
        """:meth:`_compute` of a batch at the backbone's input size, its device work replayed as a CUDA graph
        (one launch instead of some 1,000)."""
        predicted = y is None
        graphed = self._graphed.get((predicted, max_value))
        if graphed is None:
            body = partial(Protector._graph_body, predicted=predicted, max_value=max_value)
            graphed = self._graphed[(predicted, max_value)] = GraphedFunction(body, self.device, owner=self,
                                                                              name="a batch")  # fmt: skip
        if y is None:  # a placeholder: the graph's labels come from the model
            y = torch.zeros(reference.shape[0], dtype=torch.long, device=self.device)
        image_keys = to_device(self.engine.image_keys(seeds), self.device)
        return _Launched(QueuedTransfer(list(graphed(reference, y, image_keys))))

    def _graph_body(self, levels: torch.Tensor, y: torch.Tensor, image_keys: torch.Tensor, *, predicted: bool,
                    max_value: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """What a batch's CUDA graph captures: :meth:`_device_work`, with labels from the model when
        ``predicted`` (``y`` is then a placeholder) and :meth:`transform_keyed`."""
        def perturb(levels: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.transform_keyed(levels_to_float(levels, max_value), y, image_keys)

        return self._device_work(levels, None if predicted else y, max_value, perturb)

    def _device_work(self, levels: torch.Tensor, y: torch.Tensor | None, max_value: int,
                     perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A batch's work on the device, from its levels [B, C, H, W] (uint8, or int32 for 16-bit) to per image
        the confidences before and after and the label ([3, B] float64: one transfer), and the levels to
        save, NHWC; labels from the model when ``y`` is None; ``perturb(levels, y)``: the protected images of the
        levels' floats. Nothing here waits for the device (on a GPU, nor does ``perturb_keyed``: a CUDA graph
        replays it)."""
        x = levels_to_float(levels, max_value)
        y = self.predict(x).clone() if y is None else y  # clone: a normal tensor (autograd refuses inference ones)
        before = self.confidence(x, y)
        # not held while the images are protected (perturb makes them again: a photo's are then held only by
        # the engine, until its first step) nor while the rounding's buffers are made: 12 bytes a pixel
        del x
        protected = perturb(levels, y)
        device_levels, saved = quantize_batch_on_device(protected, levels, self.config.eps, max_value)
        stats = _stats(before, self.confidence(saved, y), y)
        return stats, device_levels.permute(0, 2, 3, 1).contiguous()

    def _compute_with_backoff(self, batch: list[_Pending]) -> _Launched:
        """:meth:`_compute`, in halves (recursively) where the batch runs out of GPU memory; an image that
        runs out of it even alone fails alone: the rest of its batch is computed and written all the same."""
        try:
            return self._compute(batch)
        except torch.cuda.OutOfMemoryError as e:
            alone = len(batch) == 1
            if alone:  # what torch says (the bytes it tried for) goes to the log: its message runs on for lines
                _logger.debug("out of GPU memory with one image of %s: %s", batch[0].item.path, first_line(e))
        # Retry outside the except block: the exception's traceback holds the frames of the failed attempt,
        # and with them its activations; inside the block the retry ran out of memory again, down to batch 1
        # (seen on an H100 under a memory cap). Not during another thread's CUDA-graph capture: it fails there.
        empty_cache()
        if alone:
            width, height = batch[0].picture.size
            return _Launched.failed(f"out of GPU memory even alone ({width}x{height} pixels): free GPU memory or "
                                    "use another device (--device cpu); a lower --max-pixels refuses images this "
                                    "large before they are computed")  # fmt: skip
        half = len(batch) // 2
        p = batch[0].picture
        shape = (p.channels, p.size[1], p.size[0])
        # never raised: a later, larger half that fails (memory comes and goes) allowed again a size that had
        # already run out of memory
        self._batch_cap[shape] = min(half, self._batch_cap.get(shape, half))
        _logger.warning("out of GPU memory with %d images per batch; retrying with %d", len(batch), half)
        return _Launched.joined([self._compute_with_backoff(batch[:half]), self._compute_with_backoff(batch[half:])])

    def _finish_batch(self, batch: list[_Pending],
                      launched: _Launched) -> list[tuple[np.ndarray, float, float, int] | FileResult]:  # fmt: skip
        """Per image of a batch queued by :meth:`_compute`: (levels, confidence before, after, label),
        once the device has them; the failed result of an image that could not be computed."""
        computed = launched.results()
        if len(computed) != len(batch):
            raise RuntimeError(f"{len(computed)} results for a batch of {len(batch)}")
        return [FileResult(p.item.path, "failed", reason=c) if isinstance(c, str) else c
                for p, c in zip(batch, computed)]  # fmt: skip

    def _write(self, pending: _Pending, levels: np.ndarray, before: float, after: float, label: int,
               seconds: float, fsync: bool = True, replace: bool = True,
               folders: _OutputFolders | None = None) -> FileResult:  # fmt: skip
        """Write one output (on a worker thread), its outcome noted in the run's ``folders``."""
        outcome = write_pngs([self._write_task(pending, levels, label, fsync, replace)])[0]
        if folders is not None:  # as soon as it failed: the files not yet computed need not be
            folders.wrote(pending.output, outcome)
        return self._finish_write(pending, before, after, label, seconds, outcome)

    def _write_task(self, pending: _Pending, levels: np.ndarray, label: int, fsync: bool, replace: bool) -> tuple:
        """One task of :func:`~preempt_cli.imageio.write_pngs`: the output, its picture, levels and text;
        ``replace``: whether the output existed when the run chose to write it (else one that appears
        meanwhile, another run's, is not replaced)."""
        return pending.output, pending.picture, levels, self._output_text(pending, label), fsync, replace

    def _output_text(self, pending: _Pending, label: int) -> dict[str, str]:
        """The PNG text chunks of an output: preempt's metadata as JSON."""
        pending.label = label
        meta = self.metadata(pending)
        return {METADATA_KEY: json.dumps(meta, sort_keys=True), "Software": f"preempt {__version__}"}

    def _finish_write(self, pending: _Pending, before: float, after: float, label: int, seconds: float,
                      outcome: tuple[str | None, int, int | None]) -> FileResult:  # fmt: skip
        """The result of an output, from what :func:`~preempt_cli.imageio.write_pngs` said of it."""
        error, linf_levels, number = outcome
        if error is not None and number == errno.EEXIST:  # another run wrote it first
            return self._made_meanwhile(pending) or FileResult(pending.item.path, "failed", reason=error)
        if error is not None:
            return FileResult(pending.item.path, "failed", reason=error)
        return FileResult(
            pending.item.path,
            "done",
            output=pending.output,
            label=label,
            label_name=self.backbone.config.class_name(label),
            confidence_before=round(before, 6),
            confidence_after=round(after, 6),
            linf=linf_levels / pending.picture.max_value,
            linf_levels=linf_levels,
            seconds=round(seconds, 6),
            warnings=list(pending.picture.notes) or None,
        )

    def _made_meanwhile(self, pending: _Pending) -> FileResult | None:
        """Skipped, where the output that another run put in place while this one computed it is one a
        re-run would skip (made from this input, with these settings: two tasks of a job array given the same
        shard); None otherwise (the caller fails the file: that output is left as it is)."""
        judged = self._existing_output(pending.item, pending.output)
        if judged is None or judged.status != "skipped":
            return None
        return FileResult(pending.item.path, "skipped", output=pending.output,
                          reason=f"output exists: {pending.output} (made meanwhile by another run with these settings)")

    @classmethod
    def run_options(cls, options: RunOptions | None = None) -> RunOptions:
        """``options`` (default: :class:`RunOptions`'s) with this class's output suffix where none is given.

        Raises:
            ConfigError: a suffix that is the other command's output marker.
            InputError: ``options`` that are not a :class:`RunOptions` (a dict of them failed with
                AttributeError); a ``TypeError`` too.
        """
        if options is not None and not isinstance(options, RunOptions):
            raise InputError(f"options must be a RunOptions (RunOptions(out_dir=..., ...)), got "
                             f"{type(options).__name__}")  # fmt: skip
        options = options or RunOptions()
        if options.out_dir is not None and os.path.exists(options.out_dir) and not os.path.isdir(options.out_dir):
            # each file failed after its work ("cannot write: File exists"); the CLI refuses it up front too
            raise ConfigError(f"out_dir {options.out_dir}: not a folder")
        if options.suffix is None:
            return dataclasses.replace(options, suffix=cls.output_suffix)
        other = next((m for m in OUTPUT_MARKERS if m != cls.output_suffix and options.suffix.endswith(m)), None)
        if other is not None:
            # names ending so are the other command's outputs to folder walks: revert's outputs named
            # a.protected.protected.png would be taken for protected files, and protect's a_v.reverted.png
            # left out of revert's walks
            owner = "protect" if other == PROTECTED_SUFFIX else "revert"
            raise ConfigError(f"--suffix {options.suffix} ends with {other}, which marks the outputs of preempt "
                              f"{owner}: choose another suffix for {cls.kind} files")  # fmt: skip
        return options

    def run(self, items: Iterable[InputFile | str | os.PathLike], options: RunOptions | None = None, *,
            outputs: Mapping[InputFile, Path | str] | None = None,
            folders: _OutputFolders | None = None) -> Iterator[FileResult]:  # fmt: skip
        """Process files, yielding one result per input (done, skipped or failed), as they finish.

        ``items``: :func:`~preempt_cli.inputs.collect_inputs`'s inputs, or paths (files, folders, globs),
        which it expands.

        Outputs that cannot be written fail before their compute: each output folder is tried once (a file
        created and removed there), its files failing as ``output PATH: not attempted: WHY``; once a write
        finds a file system full (ENOSPC, EDQUOT) or read-only (EROFS), the files still to come whose outputs
        lie on it fail as ``not attempted: ...`` (those being computed already are written, or fail to be);
        other file systems go on.

        ``outputs``: the output of each item (:func:`~preempt_cli.inputs.assign_outputs`: a ``Path``, or a
        ``str`` saying why the item gets none, which fails it with that reason), when the items are
        part of a larger set run in several calls (``revert --white-box`` runs one per recorded defense):
        names assigned within each part alone could give two parts' files one output. ``folders``: what the
        other runs of such a call found of the output folders (an ``_OutputFolders``, shared: a folder is
        probed once, and a file system found full stops them all).
        """
        options = self.run_options(options)
        lift_pillow_pixel_limit(options.max_pixels)  # before the metadata of inputs and outputs is read
        items = as_input_files(items, skip_markers=self.skip_markers, suffix=options.suffix, kind=self.kind)
        if outputs is None:
            outputs = assign_outputs(items, suffix=options.suffix, out_dir=options.out_dir)
        verdicts: list[tuple[InputFile, FileResult | Path | None]] = []
        for item in _share(items, outputs, options):
            output = outputs[item]
            if isinstance(output, str):  # no output of its own (see assign_outputs)
                verdicts.append((item, FileResult(item.path, "failed", reason=output)))
            else:
                verdicts.append((item, self._skip_reason(item, output, options)))
        existing = [(i, item, v) for i, (item, v) in enumerate(verdicts) if isinstance(v, Path)]
        if existing:  # a re-run: each existing output's original is hashed, on threads (hashing frees the GIL)
            with ThreadPoolExecutor(options.workers, thread_name_prefix="preempt-check") as pool:
                judged = pool.map(lambda job: self._existing_output(job[1], job[2]), existing)
                for (i, item, _), result in zip(existing, judged):
                    verdicts[i] = (item, result)
        todo: list[InputFile] = []
        replacing: set[Path] = set()  # outputs there when judged (--overwrite, or empty): replaced
        folders = _OutputFolders() if folders is None else folders
        for item, verdict in verdicts:
            if verdict is None and (problem := folders.problem(outputs[item])) is not None:  # type: ignore[arg-type]
                # an output folder that cannot take a file (read-only, not a folder): each of its files failed
                # after its compute ("cannot write: Read-only file system")
                yield FileResult(item.path, "failed", reason=problem)
            elif verdict is None:
                todo.append(item)
                if os.path.lexists(outputs[item]):
                    replacing.add(outputs[item])  # type: ignore[arg-type]  # a Path: no reason of its own
            else:
                yield verdict  # type: ignore[misc]  # every Path was judged above
        if not todo:
            return
        processes = self._process_pool(options, use=True) if self._io_processes(options) else None
        if processes is not None:
            try:
                yield from self._run_pipeline(todo, outputs, options,
                                              _ProcessIO(self, options, processes, replacing, folders))  # fmt: skip
            finally:
                with self._pools_lock:
                    self._pool_users[options.workers] -= 1
            return
        pool = ThreadPoolExecutor(options.workers, thread_name_prefix="preempt-io")
        try:
            yield from self._run_pipeline(todo, outputs, options, _ThreadIO(self, options, pool, replacing, folders))
        finally:  # stopped early (Ctrl-C, an error, a caller that stops iterating): drop the queued work
            pool.shutdown(wait=True, cancel_futures=True)

    def _io_processes(self, options: RunOptions) -> bool:
        if options.io == "auto":  # a GPU outruns what threads (one GIL) decode and encode, given CPUs to spare
            # ... where worker processes can start: without a fork server (Windows) every run warned about it
            return self.device.type == "cuda" and options.workers >= 4 and _has_forkserver()
        return options.io == "processes"

    def _process_pool(self, options: RunOptions, *, use: bool = False) -> ProcessPoolExecutor | None:
        """Worker processes for decoding and encoding, started once and kept for later runs; None where
        they cannot start and ``io`` is ``auto`` (the run then uses threads). ``use``: a run takes the pool
        (and gives it back, counted in ``_pool_users``); a pool of another size that no run uses is shut down
        then, so that runs of many sizes do not keep every pool they ever started.

        Raises:
            ConfigError: ``io="processes"`` and no worker process starts.
        """
        with self._pools_lock:
            for workers in [w for w in self._pools if w != options.workers and not self._pool_users.get(w)]:
                self._pools.pop(workers).shutdown(wait=False, cancel_futures=True)
            pool = self._process_pool_locked(options)
            if pool is not None and use:
                self._pool_users[options.workers] = self._pool_users.get(options.workers, 0) + 1
            return pool

    @property
    def _processes(self) -> ProcessPoolExecutor | None:
        """The pool of the latest run that asked for one (tests, benchmarks)."""
        return self._pools.get(self._last_workers)

    def _process_pool_locked(self, options: RunOptions) -> ProcessPoolExecutor | None:
        self._last_workers = options.workers
        current = self._pools.get(options.workers)
        if current is None or getattr(current, "_broken", False):
            if current is not None:  # its workers are being torn down already: not waited for
                current.shutdown(wait=False, cancel_futures=True)
                del self._pools[options.workers]
            import multiprocessing

            # forkserver: workers fork from a clean server process (no CUDA context, no threads of ours),
            # which imports the codecs once (without torch: see imageio), and the caller's main module
            # once, not once per worker (not at all for the ``preempt`` command: see cli.main)
            pool = None
            try:
                if not _has_forkserver():
                    raise ConfigError("this platform has no fork server to start them from (Windows): use --io "
                                      "threads")  # fmt: skip
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["__main__", "preempt_cli.imageio", "preempt_cli._forkserver"])
                with _interrupts_held():
                    pool = ProcessPoolExecutor(options.workers, mp_context=context, initializer=start_io_worker,
                                               initargs=(os.getpid(),))  # the workers end with this process
                    started = pool.submit(os.getpid)
                started.result(timeout=300)  # started, or why not
            except Exception as e:
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
                if options.io == "processes":
                    raise ConfigError(f"--io processes: cannot start worker processes ({type(e).__name__}: {e})") from e
                _logger.warning("cannot start I/O worker processes (%s: %s); using threads", type(e).__name__, e)
                return None
            self._pools[options.workers] = pool
        return self._pools[options.workers]

    def close(self) -> None:
        """Stop the worker processes, if any (they also stop when the interpreter exits)."""
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            # a pool whose worker died cannot be waited for (its workers are being torn down already)
            pool.shutdown(wait=not getattr(pool, "_broken", False), cancel_futures=True)

    def __enter__(self) -> "Protector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run_pipeline(self, todo: list[InputFile], outputs: dict[InputFile, Path | str], options: RunOptions,
                      io: "_ThreadIO | _ProcessIO") -> Iterator[FileResult]:  # fmt: skip
        # The batches compute on a thread of their own (kernels and GPU waits release the GIL), so that this
        # thread goes on collecting decoded files and written results meanwhile: on a GPU, that per-file
        # bookkeeping otherwise adds to the compute time instead of hiding behind it.
        with long_lived_objects_frozen():
            compute = ComputeThread(partial(self._launch_batch, io.folders), self._finish_batch,
                                    depth=self._queued_batches(), initializer=self._start_compute_thread)  # fmt: skip
            try:
                yield from self._pipeline(todo, outputs, options, io, compute)
            finally:
                compute.shutdown(cancel_futures=True)

    def _launch_batch(self, folders: _OutputFolders, batch: list[_Pending]) -> _Launched:
        """:meth:`_compute_with_backoff`, unless every output of the batch lies on a file system that a write
        found full or read-only while the batch waited its turn (:class:`_NotAttempted`)."""
        if all(folders.stopped(p.output) is not None for p in batch):
            raise _NotAttempted
        return self._compute_with_backoff(batch)

    def _queued_batches(self) -> int:
        return _QUEUED_BATCHES if self.device.type == "cuda" else 1

    def _start_compute_thread(self) -> None:
        if self.device.type == "cuda" and self.device.index is not None:  # a call that uses the current
            torch.cuda.set_device(self.device)  # device (a new thread's is cuda:0) uses ours

    def _pipeline(self, todo: list[InputFile], outputs: dict[InputFile, Path | str], options: RunOptions,
                  io: "_ThreadIO | _ProcessIO", compute: ComputeThread) -> Iterator[FileResult]:  # fmt: skip
        # decode at least two batches ahead, so that a GPU never waits for the next batch's files: as many
        # files as two batches hold, or 64 (before the first is decoded, as many as the workers decode at
        # once), and of those only as many as hold about _DECODED_AHEAD_BYTES of levels, each file's size
        # read from its header before it is queued (few large photos: they are big, wherever they come)
        max_prefetch = max(64, 4 * options.workers)
        prefetch = options.workers
        # (handle, bytes the file counts for): .result() -> _Pending | FileResult
        decoded: collections.deque[tuple[Any, int]] = collections.deque()
        ahead_bytes = 0  # what the files in `decoded` count for
        upcoming: tuple[InputFile, int, int] | None = None  # the next file, its cost and bound: waiting to fit
        # (handle, bytes its output holds until written): .done(), .result() -> FileResult
        writes: collections.deque[tuple[Any, int]] = collections.deque()
        computing: collections.deque[tuple[list[_Pending], Future]] = collections.deque()
        buckets: dict[tuple[int, ...], list[_Pending]] = {}  # partial batches, oldest first
        queue = iter(todo)
        queued_all = False
        in_flight = compute.depth + 1  # batches on the device, and the next one waiting
        sent = 0  # images sent to the device so far
        folders = io.folders  # what the writes found of the file systems: files there fail uncomputed

        def send(jobs: list[tuple[InputFile, Path | str]], costs: list[int]) -> None:
            nonlocal ahead_bytes
            if jobs:
                decoded.extend(zip(io.decode(jobs), costs))
                ahead_bytes += sum(costs)

        def submit_decodes() -> None:
            nonlocal queued_all, upcoming
            while len(decoded) < prefetch and not queued_all:
                # a worker process's chunk: its share of the bound, so that all of them decode at once (a chunk
                # of the whole bound, a few photos, went to one worker while the others idled); 32 small images
                most = min(io.decode_chunk, max(1, prefetch // options.workers))
                jobs: list[tuple[InputFile, Path | str]] = []
                costs: list[int] = []
                chunk_bytes = 0
                for _ in range(most):
                    if upcoming is None:
                        item = next(queue, None)
                        if item is None:
                            queued_all = True
                            break
                        if (reason := folders.stopped(outputs[item])) is not None:  # type: ignore[arg-type]
                            send(jobs, costs)  # those before it first: results in the files' order
                            jobs, costs, chunk_bytes = [], [], 0
                            # not even decoded
                            decoded.append((_done(FileResult(item.path, "failed", reason=reason)), 0))
                            continue
                        size = decoded_size(item.path, options.max_pixels)
                        upcoming = (item, *self._decode_ahead_cost(size, options))
                    item, cost, bound = upcoming
                    held = ahead_bytes + chunk_bytes
                    if held and held + cost > bound:  # it waits for files to be taken (one always goes)
                        send(jobs, costs)
                        return
                    if jobs and chunk_bytes + cost > bound // options.workers:  # this chunk holds its share
                        break
                    jobs.append((item, outputs[item]))
                    costs.append(cost)
                    chunk_bytes += cost
                    upcoming = None
                send(jobs, costs)

        def flush(batch: list[_Pending], last: bool = False) -> Iterator[FileResult]:
            nonlocal sent
            kept = []  # files that waited in a partial batch while a write failed there fail uncomputed
            for p in batch:
                if (reason := folders.stopped(p.output)) is None:
                    kept.append(p)
                else:
                    yield FileResult(p.item.path, "failed", reason=reason)
            if not kept:
                return
            batch = kept
            sent += len(batch)
            size = _piece_size(len(batch)) if last else len(batch)
            for start in range(0, len(batch), size):
                piece = batch[start : start + size]
                computing.append((piece, compute.submit(piece)))
                # the batches the device holds and one more waiting: the device never idles, and memory
                # stays bounded
                yield from collect(block=len(computing) > in_flight)

        def collect(block: bool, finishing: bool = False) -> Iterator[FileResult]:
            """Write the batches the device has finished (``block``: waiting for the oldest). ``finishing``:
            the run was interrupted, and a batch that was itself interrupted is dropped, not raised again."""
            while computing and (block or computing[0][1].done()):
                block = False  # wait for the oldest batch only
                batch, future = computing[0]
                try:
                    # left in the queue while waited for: an interrupt meanwhile still finds it (see below)
                    _wait(future)
                    computed, seconds = future.result()
                except CancelledError:  # never started, as the run was interrupted: not a failure
                    computing.popleft()
                    continue
                except _NotAttempted:  # its outputs' file system was found full or read-only: not computed
                    computing.popleft()
                    for p in batch:
                        yield FileResult(p.item.path, "failed", reason=folders.stopped(p.output) or "not attempted")
                    continue
                except Exception as e:  # a failing batch must not stop the run: report each of its files
                    computing.popleft()
                    _logger.debug("batch failed", exc_info=True)
                    for p in batch:
                        yield FileResult(p.item.path, "failed", reason=f"processing failed: {type(e).__name__}: {e}")
                    continue
                except BaseException as e:
                    if future.done() and not future.cancelled() and future.exception() is e:
                        computing.popleft()  # the batch's own interrupt (raised in its computation): no results
                        if finishing:
                            continue
                    raise  # else an interrupt of this wait: the batch is still the device's (see below)
                # images that could not be computed even alone fail alone: the rest of the batch is written
                failed = [c for c in computed if isinstance(c, FileResult)]
                kept = [(p, c) for p, c in zip(batch, computed) if not isinstance(c, FileResult)]
                costs = [_output_bytes(p, levels) for p, (levels, *_) in kept]
                # the batch stays queued while the writes before it finish: an interrupt meanwhile still finds it
                yield from make_room(sum(costs))
                computing.popleft()
                # reported among the writes (taken off the queue only once had, as they are): an interrupt
                # while one is given neither loses nor repeats the others
                writes.extend((_done(result), 0) for result in failed)
                per_image = seconds / max(1, len(kept))  # each written file's share of its batch's time
                io.write([(p, *c, per_image) for p, c in kept], costs, writes)

        def make_room(cost: int) -> Iterator[FileResult]:
            """Wait for the oldest writes (their results given, as :func:`drain` gives them) until a batch's
            outputs of ``cost`` bytes fit among those pending (see ``_WRITES_PENDING_BYTES``)."""
            bound = max(_WRITES_PENDING_BYTES, 2 * cost)
            pending = sum(b for _, b in writes)
            while writes and pending + cost > bound:
                pending -= writes[0][1]
                yield from drain(block=True, most=1)

        def drain(block: bool, most: int | None = None) -> Iterator[FileResult]:
            taken = 0
            while writes and (block or writes[0][0].done()) and (most is None or taken < most):
                # taken off the queue only once had: an interrupt while waiting for it (the main thread waits
                # here most of a run's end) lost a written file's result, and stdout did not list that file
                _wait(writes[0][0])
                result = writes[0][0].result()
                writes.popleft()
                taken += 1
                yield result

        try:
            submit_decodes()
            while decoded:
                handle, cost = decoded[0]
                _wait(handle)  # left in the queue while waited for: an interrupt meanwhile cancels it with the rest
                decoded.popleft()
                ahead_bytes -= cost
                prepared = handle.result()
                submit_decodes()
                if isinstance(prepared, FileResult):
                    yield prepared
                    continue
                if (reason := folders.stopped(prepared.output)) is not None:  # decoded before a write failed
                    yield FileResult(prepared.item.path, "failed", reason=reason)
                    continue
                pic = prepared.picture
                key = (pic.channels, pic.size[1], pic.size[0])
                bucket = buckets.setdefault(key, [])
                bucket.append(prepared)
                limit = self._batch_limit(pic, options)
                prefetch = max(2 * limit, max_prefetch)  # files; their bytes are bounded as they are queued
                if sent < limit:  # the run's first batch, in pieces: the device starts after the first piece
                    limit = _piece_size(limit)
                if len(bucket) >= limit:
                    del buckets[key]
                    yield from flush(bucket, last=queued_all and not decoded and not buckets)
                # Many sizes, none filling its batch (web images): the oldest partial batches go now, so that
                # memory stays bounded (two batches' worth at most wait) and outputs appear as the run goes
                while len(buckets) > _MAX_PARTIAL_BATCHES or sum(
                    len(b) / self._batch_limit(b[0].picture, options) for b in buckets.values()
                ) > 2:  # fmt: skip
                    yield from flush(buckets.pop(next(iter(buckets))))
                yield from collect(block=False)
                yield from drain(block=False)
            for bucket in buckets.values():
                yield from flush(bucket, last=True)
                yield from drain(block=False)
            while computing:
                yield from collect(block=True)
                yield from drain(block=False)
            yield from drain(block=True)
        except KeyboardInterrupt:
            # Ctrl-C: nothing more is decoded or computed, but the files already being written are finished
            # and reported, so that the results name every output on disk (a re-run skips those silently)
            for handle, _ in decoded:
                getattr(handle, "future", handle).cancel()  # a file's decode, or its worker's chunk
            decoded.clear()
            # A batch the device has started cannot be cut short: the run waits for it anyway (a large photo
            # on a CPU: seconds), and then threw it away. Its files are written and reported instead; the
            # batches not started are dropped.
            compute.cancel_pending()
            while computing:  # (another interrupt here, the library's second Ctrl-C: stop now)
                yield from collect(block=True, finishing=True)
            yield from drain(block=True)
            raise


def _share(items: list[InputFile], outputs: Mapping[InputFile, Path | str], options: RunOptions) -> Iterator[InputFile]:
    """The items of a run's shard (``options.shard``) and, of those, its device's (``options.partition``)."""
    for position, item in enumerate(i for i in items if in_shard(i, options.shard, outputs[i], options.out_dir)):
        if not options.partition or position % options.partition[1] == options.partition[0]:
            yield item


def _output_bytes(pending: _Pending, levels: np.ndarray) -> int:
    """The bytes an output waiting to be written holds: its levels and its picture's."""
    return levels.nbytes + pending.picture.nbytes


def _done(result: Any) -> Future:
    """A handle of the pipeline's queues that already holds ``result``."""
    future: Future = Future()
    future.set_result(result)
    return future


def _wait(handle: Any) -> None:
    """Return once ``handle`` (a future, or a :class:`_Part` of one) is done, waking every ``_WAKE_S``.

    A Ctrl-C whose signal came just before the main thread blocked waiting (or reached another of the
    process's threads) does not wake it, and Python raises the ``KeyboardInterrupt`` only where the main
    thread runs again: a run waiting for a batch took the interrupt once the batch was done (a large photo
    on a CPU: seconds), after the next batch had started, which the run then waited for too. Waking, the
    main thread takes it (raised here, the handle left as it was)."""
    future = getattr(handle, "future", handle)
    while not future.done():
        _take_device_interrupt()
        try:
            future.exception(_WAKE_S)  # waits, but never raises the future's own error
        except (FutureTimeoutError, CancelledError):  # not done yet (or cancelled meanwhile: done)
            pass


#: The Ctrl-C of :func:`run_on_devices`' caller, as each device worker's thread sees it: ``interrupted`` (the
#: run's event) and ``taken`` (raised in this thread already). A signal reaches the main thread alone.
_device_interrupt = threading.local()


def _take_device_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` once in a device worker whose caller was interrupted, where its run waits
    (see :func:`_wait`): there a single device's run takes a Ctrl-C and drops the batches not started. Taken
    at the worker's next result instead, it came once the batch on the device was written, after the next
    had started, which the run then waited for too (on each device)."""
    interrupted = getattr(_device_interrupt, "interrupted", None)
    if interrupted is not None and interrupted.is_set() and not _device_interrupt.taken:
        _device_interrupt.taken = True  # once: a second one, while its run finishes, would stop that short
        raise KeyboardInterrupt


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT held (blocked: not lost) in this thread, and so in the processes it starts meanwhile: the fork
    server (and the workers it forks, which let go of it). A Ctrl-C reaches the terminal's whole process
    group, and one that came while Python was starting in the fork server printed "Fatal Python error:
    init_import_site ... KeyboardInterrupt" under preempt's own words (it ignores SIGINT once started). A
    press meanwhile reaches this process when the block ends. SIGTERM is not held: the pool stops its
    workers with it."""
    import signal
    from multiprocessing import resource_tracker

    if not hasattr(signal, "pthread_sigmask"):  # Windows (no fork server either)
        yield
        return
    # The resource tracker holds SIGINT and SIGTERM itself while it starts, then lets both go in this
    # thread, which ended the hold before the fork server started: it starts first
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _has_forkserver() -> bool:
    """Whether worker processes can start as :class:`_ProcessIO` starts them (not on Windows)."""
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods()


class _ThreadIO:
    """Decoding and encoding on threads: one file per task."""

    decode_chunk = 1

    def __init__(self, protector: Protector, options: RunOptions, pool: ThreadPoolExecutor, replacing: set[Path],
                 folders: _OutputFolders) -> None:  # fmt: skip
        self.protector, self.options, self.pool, self.replacing = protector, options, pool, replacing
        self.folders = folders  # the run's: each write's outcome is noted there

    def decode(self, items: list[tuple[InputFile, Path]]) -> list[Future]:
        return [self.pool.submit(self.protector._prepare, item, output, self.options) for item, output in items]

    def write(self, jobs: list[tuple[_Pending, np.ndarray, float, float, int, float]], costs: list[int],
              into: collections.deque) -> None:  # fmt: skip
        """Submit the writes, each handle put ``into`` the queue with its job's cost (bytes) as soon as it is
        submitted (an interrupt between the two would leave a file written that the run does not report)."""
        for (p, levels, before, after, label, seconds), cost in zip(jobs, costs):
            handle = self.pool.submit(self.protector._write, p, levels, before, after, label, seconds,
                                      self.options.fsync, p.output in self.replacing, self.folders)  # fmt: skip
            into.append((handle, cost))


class _Part:
    """One file of a chunk done by a worker process; ``finish`` turns its share of the chunk's result into
    the pipeline's object (in the calling thread)."""

    def __init__(self, future: Future, index: int, finish: Callable[[Any], Any], path: Path) -> None:
        self.future, self.index, self.finish, self.path = future, index, finish, path

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> Any:
        try:
            outcome = self.future.result()[self.index]
        except Exception as e:  # a worker that died (killed, out of memory) fails its files, not the run
            return FileResult(self.path, "failed", reason=f"worker process failed: {type(e).__name__}: {e}")
        return self.finish(outcome)


class _ProcessIO:
    """Decoding and encoding in worker processes, files in chunks (few round trips): for small images
    on a GPU, Python's per-file work under one GIL would otherwise set the pace (measured on an H100
    with 16 CPUs: 600 32x32 PNGs/s through threads against 2,500 images/s of compute)."""

    decode_chunk = 32

    def __init__(self, protector: Protector, options: RunOptions, pool: ProcessPoolExecutor, replacing: set[Path],
                 folders: _OutputFolders) -> None:  # fmt: skip
        self.protector, self.options, self.pool, self.replacing = protector, options, pool, replacing
        self.folders = folders  # the run's: each write's outcome is noted there

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        try:
            return self.pool.submit(fn, *args)
        except BrokenProcessPool:
            # A worker died (killed, out of memory, a crashing decoder): the files it held fail with that
            # reason (see _Part), and the rest of the run goes on in new workers.
            _logger.warning("an I/O worker process died; starting new ones")
            pool = self.protector._process_pool(self.options)  # ConfigError if none start (--io processes)
            if pool is None:  # none start (--io auto): the remaining files are done in this process
                done: Future = Future()
                done.set_result(fn(*args))
                return done
            self.pool = pool
            return self.pool.submit(fn, *args)

    def decode(self, items: list[tuple[InputFile, Path]]) -> list[_Part]:
        future = self._submit(read_images, [str(item.path) for item, _ in items], self.options.max_pixels)
        return [_Part(future, i, partial(self.protector._decoded, item, output, self.options), item.path)
                for i, (item, output) in enumerate(items)]  # fmt: skip

    def write(self, jobs: list[tuple[_Pending, np.ndarray, float, float, int, float]], costs: list[int],
              into: collections.deque) -> None:  # fmt: skip
        """Submit the writes in chunks, each chunk's handles put ``into`` the queue with their jobs' costs as
        soon as it is submitted (see :meth:`_ThreadIO.write`)."""
        size = max(1, math.ceil(len(jobs) / self.options.workers))
        for start in range(0, len(jobs), size):
            chunk = jobs[start : start + size]
            tasks = [self.protector._write_task(p, levels, label, self.options.fsync, p.output in self.replacing)
                     for p, levels, _, _, label, _ in chunk]  # fmt: skip
            future = self._submit(write_pngs, tasks)
            # noted as soon as the chunk is back (on the pool's thread), not once the run takes its results
            future.add_done_callback(partial(self._wrote, [p.output for p, *_ in chunk]))
            into.extend((_Part(future, i, partial(self.protector._finish_write, p, before, after, label, seconds),
                               p.item.path), cost)
                        for i, ((p, _, before, after, label, seconds), cost)
                        in enumerate(zip(chunk, costs[start : start + size])))  # fmt: skip

    def _wrote(self, outputs: list[Path], future: Future) -> None:
        """Note a chunk's outcomes in the run's folders (a chunk whose worker died wrote nothing)."""
        if future.cancelled() or future.exception() is not None:
            return
        for output, outcome in zip(outputs, future.result()):
            self.folders.wrote(output, outcome)


def finish_interrupted(run: Iterator[FileResult]) -> Iterator[FileResult]:
    """The results a run (of :meth:`Protector.run`) still gives when interrupted (Ctrl-C) while its caller,
    not the run, held the thread: the run gets the ``KeyboardInterrupt`` where it waits, finishes the files
    being written and gives their results (a run that got the interrupt itself has ended, and gives none)."""
    throw = getattr(run, "throw", None)
    if throw is None:
        return
    try:
        yield throw(KeyboardInterrupt())
        yield from run
    except (KeyboardInterrupt, StopIteration):
        return


class _DeviceMessages:
    """What the device workers of :func:`run_on_devices` send the caller's thread (results, the error
    that ended a run), oldest first, and how many workers still run.

    The caller takes a message off only once it has handled it: it reads :meth:`oldest`, handles it, then
    calls ``pending.popleft()`` itself (a method of ours would start a Python frame, where a signal handler
    runs, between the two). A Ctrl-C's ``KeyboardInterrupt`` lands between any two steps of the main thread;
    ``queue.Queue.get`` took the message off before its ``notify()`` ran Python code, and one landing there
    lost that message: a result (a file on disk that stdout did not list) or a worker's "done", after which
    the run waited for good for a worker that had ended. The workers count their own end here (no message
    to lose)."""

    def __init__(self, workers: int, bound: int = 256) -> None:
        self.pending: collections.deque[tuple[str, Any]] = collections.deque()
        self.running = workers
        self._bound = bound  # a caller that takes results slowly holds the workers back, not memory
        self._changed = threading.Condition()

    def put(self, message: tuple[str, Any], stop: threading.Event) -> None:
        """Send ``message`` (a worker), once there is room for it or the run stops."""
        with self._changed:
            while len(self.pending) >= self._bound and not stop.is_set():
                self._changed.wait(0.05)  # polled: the caller makes room without a call of ours
            self.pending.append(message)
            self._changed.notify_all()

    def worker_ended(self) -> None:
        with self._changed:
            self.running -= 1
            self._changed.notify_all()

    def oldest(self) -> tuple[str, Any] | None:
        """The oldest message, left in place, once there is one (None: every worker has ended and every
        message was taken). An interrupt while waiting takes nothing; the wait wakes every ``_WAKE_S`` to take
        one that did not wake it (see :func:`_wait`)."""
        with self._changed:
            while not self.pending and self.running:
                self._changed.wait(_WAKE_S)
            return self.pending[0] if self.pending else None


def run_on_devices(protectors: Sequence[Protector], items: Iterable[InputFile | str | os.PathLike],
                   options: RunOptions | None = None, *,
                   outputs: Mapping[InputFile, Path | str] | None = None) -> Iterator[FileResult]:  # fmt: skip
    """Process files with one worker thread per protector (typically one per GPU, each holding its own
    copies of the models), yielding results as they finish.

    Worker i takes every k-th input (after ``options.shard``) starting at i, so the split is deterministic
    and each output is written exactly once; outputs, names and skips are as in :meth:`Protector.run`.
    GPU kernels run outside the GIL, so threads keep several devices busy. A device whose run raises fails
    the files of its share that it had not reported, with the error as their reason; the others go on.
    ``outputs``: the output of each item where the caller assigned them already (see :meth:`Protector.run`).

    Raises:
        ConfigError: no protector, or ``options.partition`` given (the split across devices is this
            function's to make: it was silently replaced).
    """
    if not protectors:
        raise ConfigError("run_on_devices needs at least one protector (one per device)")
    if options is not None and options.partition is not None:
        raise ConfigError("options.partition is run_on_devices' to set (one share per protector): leave it out, "
                          "or use options.shard to split the inputs across jobs")  # fmt: skip
    options = protectors[0].run_options(options)
    lift_pillow_pixel_limit(options.max_pixels)  # before the walk reads the metadata of suffixed outputs
    # expanded once here, not by each worker (each share is taken from the same list)
    items = as_input_files(items, skip_markers=protectors[0].skip_markers, suffix=options.suffix,
                           kind=protectors[0].kind)  # fmt: skip
    if len(protectors) == 1:
        yield from protectors[0].run(items, options, outputs=outputs)
        return
    folders = _OutputFolders()  # the devices' outputs share folders and file systems: one probe each, one stop
    messages = _DeviceMessages(len(protectors))
    stop, interrupted = threading.Event(), threading.Event()

    # assigned once for all the devices: each fails the files of its share that it never reported
    if outputs is None:
        outputs = assign_outputs(items, suffix=options.suffix, out_dir=options.out_dir)

    def work(index: int, protector: Protector) -> None:
        share = dataclasses.replace(options, partition=(index, len(protectors)))
        reported: set[Path] = set()
        _device_interrupt.interrupted, _device_interrupt.taken = interrupted, False
        try:
            run = protector.run(items, share, outputs=outputs, folders=folders)
            for result in run:
                reported.add(result.input)
                messages.put(("result", result), stop)
                if interrupted.is_set() and not _device_interrupt.taken:  # Ctrl-C: as a single run stops
                    _device_interrupt.taken = True
                    for result in finish_interrupted(run):
                        reported.add(result.input)
                        messages.put(("result", result), stop)
                    return
                if stop.is_set():
                    return
        except KeyboardInterrupt:  # the caller's Ctrl-C, taken where the run waited: its files being written
            pass  # were finished and reported (the caller raises the interrupt)
        except Exception as e:  # this device's failure, not the run's: the other devices go on
            _logger.debug("the run on %s failed", protector.device, exc_info=True)
            reason = f"the run on {protector.device} failed: {type(e).__name__}: {e}"
            for item in _share(items, outputs, share):
                if item.path not in reported:
                    messages.put(("result", FileResult(item.path, "failed", reason=reason)), stop)
        except BaseException as e:  # re-raised in the caller's thread
            messages.put(("error", e), stop)
        finally:
            messages.worker_ended()

    threads = [threading.Thread(target=work, args=(i, p), name=f"preempt-device-{i}", daemon=True)
               for i, p in enumerate(protectors)]  # fmt: skip
    for t in threads:
        t.start()
    interrupt: KeyboardInterrupt | None = None
    try:
        while True:
            try:
                message = messages.oldest()
                if message is None:
                    break
                kind, payload = message
                if kind == "error" and interrupt is None:  # once interrupted, the interrupt is what is raised
                    raise payload
                if kind == "result":
                    try:
                        yield payload  # (an interrupt thrown in here comes after the caller had the result)
                    finally:
                        messages.pending.popleft()
                else:
                    messages.pending.popleft()
            except KeyboardInterrupt as e:
                if interrupt is not None:  # again, while the devices stop: stop now
                    raise
                interrupt = e
                interrupted.set()  # each device's run finishes the files it is writing, still reported here
        if interrupt is not None:
            raise interrupt
    finally:
        stop.set()  # (workers waiting for room in the messages go on, and stop at their next result)
        for t in threads:
            t.join()

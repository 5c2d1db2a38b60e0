"""Shared fixtures: the ``../shared`` folder, a tiny frozen backbone, real CIFAR-10 images, isolated config.

The real weights and images live in ``/work/shared`` (``../shared`` from the repository root) and are never
copied into the project: fixtures that need them skip with a clear reason when the folder is absent.

Reusable helpers (importable from tests as ``from conftest import ...``):

* :func:`make_tiny_model` builds a small 2-conv CNN wrapped in :class:`ImageModel` (any input size,
  class count, optional mean/std), deterministically from a seed.
* :func:`make_per_image_model` builds a small classifier whose output for an image is the same bits in any
  batch (no matrix product or convolution), for bit-for-bit checks of per-image properties.
* :func:`load_cifar_images` reads CIFAR-10 test PNGs from the shared folder into a float tensor + labels.
* :func:`engine_noise_keys` gives the noise keys an engine draws for given noise seeds.
* :func:`randomized_batchnorm` gives a net's BatchNorm layers non-trivial statistics, in eval mode.
* :func:`raised_without_waiting_on` runs a call that must not block on a FIFO, and gives what it raised.
* :class:`CudaLikeDivision` divides floats by a number as CUDA does (times its reciprocal), on the CPU.
* :class:`LiveBuffers` counts the tensor buffers of at least a given size alive at once while torch computes.
* :class:`StandInDevice` stands in for a GPU's asynchronous work on any machine: ``queue(seconds, payload)``
  returns a :class:`QueuedWork` (``done()``, ``ready_at``, ``payload``) at once, each queued piece runs after
  the ones before it, and ``wait(work)`` sleeps until it is done.

The device the tests compute on is ``$PREEMPT_TEST_DEVICE`` (default ``cpu``): ``PREEMPT_TEST_DEVICE=cuda
python -m pytest tests/test_engine.py ...`` runs the engine, attack, CLI and real-model checks on a GPU
(``tests/test_cuda.py`` adds GPU-only ones). On CUDA the tests run in strict fp32 (no TF32) with
deterministic cuDNN kernels: they check the algorithm, not the speed settings.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import types
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from preempt_cli.device import default_cpu_threads
from preempt_cli.models import ImageModel
from preempt_cli.registry import ModelConfig, Source

def _test_device() -> torch.device:
    spec = os.environ.get("PREEMPT_TEST_DEVICE", "cpu").strip().lower() or "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"PREEMPT_TEST_DEVICE={spec} but CUDA is not available")
        device = torch.device("cuda", device.index or 0)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return device


#: Where the tests compute (``$PREEMPT_TEST_DEVICE``, default cpu); ``TEST_DEVICE_ARG`` is its ``--device``.
TEST_DEVICE = _test_device()
TEST_DEVICE_ARG = str(TEST_DEVICE)


# -- running the tests in parallel: ``python -m pytest -n auto`` (pytest-xdist) ----------------------------------


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per CPU this process may use, counted as preempt counts them for its threads
    (affinity mask, cgroup quota, Slurm: xdist counts the machine's), at most 4: each worker imports torch and
    loads its own models, and beyond 4 the longest real-model tests bound the run. None on CUDA: the GPU
    checks provoke real out-of-memory errors and measure memory, which a worker beside them would upset."""
    if TEST_DEVICE.type == "cuda":
        return 0
    return min(4, default_cpu_threads())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker (each collects all the tests, in one order), the ``slow`` tests first: xdist hands the
    first tests out in turns, so the few that take minutes start at once, on different workers, instead of
    last on one of them while the others wait."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the rest keep their order


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "tx", None) and not hasattr(config, "workerinput"):
        # Before the workers start (and import torch, which reads it): OpenMP threads that wait for one
        # another by spinning, as they do by default, slowed the engine 2-8 times on cores shared with other
        # busy processes (the README's notes on the CPU), and here every worker is such a process.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


#: ``../shared`` relative to the repository root.
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: The few CIFAR-10 test images of ``cifar_batch``: (class, index) pairs, one per class for the first 8.
CIFAR_BATCH_FILES = (
    ("airplane", "00003"),
    ("automobile", "00006"),
    ("bird", "00025"),
    ("cat", "00000"),
    ("deer", "00022"),
    ("dog", "00012"),
    ("frog", "00004"),
    ("horse", "00013"),
)


def _missing_shared_reason(*parts: str) -> str:
    where = SHARED_DIR.joinpath(*parts)
    return f"shared test data not available: {where} is missing (real weights/images live in ../shared)"


def require_shared(*parts: str) -> Path:
    """``SHARED_DIR / parts``; skips the calling test when it does not exist."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(_missing_shared_reason(*parts))
    return path


# -- tiny model --------------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """conv3x3(C->8) - ReLU - conv3x3 stride 2 (8->16) - ReLU - global average pool - linear(16->classes)."""

    def __init__(self, in_chs: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_config(
    name: str = "tiny-cnn",
    *,
    input_size: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ModelConfig:
    """A hand-made registry row for :class:`TinyCNN` (its arch is not registered: only the wrapper uses it)."""
    return ModelConfig(
        name=name,
        arch="tiny_cnn",
        source=Source("file", f"{name}.safetensors"),
        dataset="cifar10" if num_classes == 10 else "unknown",
        input_size=input_size,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        num_classes=num_classes,
        classes=CIFAR10_CLASSES if num_classes == 10 else None,
    )


def make_tiny_model(
    seed: int = 0,
    *,
    input_size: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    frozen: bool = True,
    name: str = "tiny-cnn",
) -> ImageModel:
    """A tiny CNN in :class:`ImageModel`, initialised from ``seed`` (eval mode; params frozen if ``frozen``)."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = TinyCNN(input_size[0], num_classes)
    finally:
        torch.random.set_rng_state(gen_state)
    cfg = tiny_config(name, input_size=input_size, num_classes=num_classes, mean=mean, std=std)
    model = ImageModel(net, cfg).eval()
    for p in model.parameters():
        p.requires_grad_(not frozen)
    return model


class PerImageNet(nn.Module):
    """A small nonlinear classifier whose output for an image is the same bits in any batch: elementwise
    products summed over each image's own values, no matrix product or convolution (whose CPU and GPU
    kernels can change in the last bit with the batch size: :class:`TinyCNN`'s logits do at batches of 1 or
    3 against 8). What a test of a per-image property needs to compare bit for bit."""

    def __init__(self, features: int, hidden: int = 8, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(hidden, features, generator=g) * 4 / features**0.5, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(num_classes, hidden, generator=g), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh((x.flatten(1)[:, None, :] * self.w1).sum(-1))
        return (hidden[:, None, :] * self.w2).sum(-1)


def make_per_image_model(seed: int = 0, *, input_size: tuple[int, int, int] = (3, 16, 16),
                         name: str = "per-image") -> ImageModel:  # fmt: skip
    """:class:`PerImageNet` in :class:`ImageModel` (10 classes, raw [0, 1] input), eval mode, on the CPU."""
    features = input_size[0] * input_size[1] * input_size[2]
    return ImageModel(PerImageNet(features, seed=seed), tiny_config(name, input_size=input_size)).eval()


@pytest.fixture
def tiny_backbone() -> ImageModel:
    """A tiny CNN backbone (3x32x32 input, 10 classes, raw [0, 1] input), eval mode, params frozen, seed 0,
    on the test device."""
    return make_tiny_model(0).to(TEST_DEVICE)


@pytest.fixture
def tiny_classifier() -> ImageModel:
    """Another tiny CNN (seed 1), e.g. as a classifier distinct from ``tiny_backbone``; on the test device."""
    return make_tiny_model(1, name="tiny-classifier").to(TEST_DEVICE)


def randomized_batchnorm(net: nn.Module, seed: int = 0) -> nn.Module:
    """``net`` in eval mode with non-trivial BatchNorm statistics and affine parameters (so that eval mode,
    and folding BatchNorm into convolutions, matter); convolutions as initialised."""
    gen = torch.Generator().manual_seed(seed)
    ranges = {"weight": (0.5, 1.5), "bias": (-0.1, 0.1), "running_mean": (-0.2, 0.2), "running_var": (0.5, 2.0)}
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                for key, (lo, hi) in ranges.items():
                    t = getattr(module, key)
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return net.eval()


class CudaLikeDivision(TorchDispatchMode):
    """Divides float32 tensors by a Python number as CUDA does: times the number's float32 reciprocal (torch's
    ``div_true_kernel_cuda`` takes a host scalar divisor so: ``levels / 255`` is a last bit off for 126 of the
    256 levels), where the CPU divides. A division by a tensor passes through, as on either device. For CPU
    tests of what a GPU's division would change."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in (torch.ops.aten.div.Tensor, torch.ops.aten.div_.Tensor) and not kwargs
                and isinstance(args[1], (int, float)) and args[0].dtype == torch.float32):  # fmt: skip
            reciprocal = float(np.float32(1) / np.float32(args[1]))
            return args[0].mul_(reciprocal) if func is torch.ops.aten.div_.Tensor else args[0].mul(reciprocal)
        return func(*args, **kwargs)


class LiveBuffers(TorchDispatchMode):
    """Within ``with LiveBuffers(min_bytes) as live:``, the tensor buffers (storages) of at least ``min_bytes``
    that torch's operators make, alive at once: ``live.count()`` now, ``live.peak`` the most after any operator
    (``track(t)`` adds one made before). A buffer is alive while any tensor of it is, in Python or inside
    torch (autograd's saved tensors, a gradient being computed). Views and in-place results are the buffer
    they are of. The count does not depend on timing, only on which buffers the code keeps."""

    def __init__(self, min_bytes: int) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.peak = 0
        self._buffers: dict[int, list[weakref.ref]] = {}  # storage address -> its tensors

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.nbytes() < self.min_bytes:
            return
        refs = self._buffers.get(storage.data_ptr())
        if refs is None or not any(r() is not None for r in refs):  # a new buffer (or a freed one's address)
            refs = self._buffers[storage.data_ptr()] = []
        refs.append(weakref.ref(t))

    def count(self) -> int:
        self._buffers = {k: refs for k, refs in self._buffers.items() if any(r() is not None for r in refs)}
        return len(self._buffers)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.peak = max(self.peak, self.count())
        return out


def engine_noise_keys(engine: Any, seeds: Sequence[int]) -> torch.Tensor:
    """The noise keys a :class:`~preempt_cli.engine.FastPreemption` draws for images of these noise seeds,
    [B, steps, samples], on its device (a step's keys: ``[:, step]``)."""
    from preempt_cli.engine import noise_keys

    cfg = engine.config
    return noise_keys(engine.image_keys(seeds).to(engine.device), cfg.forward_steps + cfg.backward_steps, cfg.samples)


def write_random_pngs(folder: Path, n: int = 4, size: tuple[int, int] = (32, 32), *, name: str = "img{i}.png",
                      seed: int = 0) -> list[Path]:  # fmt: skip
    """``n`` RGB PNGs of random pixels, ``size`` = (width, height), named ``name.format(i=i)``, in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / name.format(i=i)
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def avif_without_its_image() -> bytes:
    """An AVIF whose primary item names no image in it: Pillow's AVIF plugin raises RuntimeError as it opens
    it, none of the errors a broken file of the other formats raises. Needs a Pillow that writes AVIF."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 12, 3), 90, np.uint8)).save(buf, format="AVIF")
    data = bytearray(buf.getvalue())
    primary = data.index(b"pitm") + 8  # past the box's type, version and flags: the primary item's ID
    data[primary : primary + 2] = b"\x77\x77"
    return bytes(data)


class ThresholdModel(nn.Module):
    """Class 1 when the mean pixel exceeds ``t`` (a steep margin), else class 0."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([self.t - m, m - self.t], dim=1) * 1000


class FakeReferenceAutoAttack:
    """A stand-in for pyautoattack's ``AutoAttack`` with the reference's cascade: each attack runs on the
    points still robust, and stops attacking a point once its (unrounded) output fools the model. ``nudge``
    moves a point 0.4 of a level (just across a threshold: FAB's minimal margin), ``push`` 4 levels.
    ``runs`` records each attack and how many points it was run on."""

    STEPS = {"nudge": 0.4 / 255, "push": 4 / 255}
    runs: list[tuple[str, int]] = []

    def __init__(self, model, *, norm, eps, version, device, seed) -> None:
        self.model, self.attacks_to_run, self.verbose = model, ["nudge", "push"], False

    def run_standard_evaluation(self, x, y, *, batch_size=250, state_path=None):
        with torch.no_grad():
            adv = x.clone()
            robust = self.model(x).argmax(1) == y
            for name in self.attacks_to_run:
                FakeReferenceAutoAttack.runs.append((name, int(robust.sum())))
                candidate = (x + self.STEPS[name]).clamp(0, 1)
                fooled = robust & (self.model(candidate).argmax(1) != y)
                adv[fooled] = candidate[fooled]
                robust &= ~fooled
            return adv, self.model(adv).argmax(1)


#: What ``import autoattack`` gives, with the stand-in.
FAKE_AUTOATTACK_MODULE = types.SimpleNamespace(AutoAttack=FakeReferenceAutoAttack)


# -- a stand-in for a GPU's asynchronous work ---------------------------------------------------------------


class QueuedWork:
    """Work queued on a :class:`StandInDevice`: done at ``ready_at`` (``time.monotonic``); ``payload`` is
    what the caller queued with it (e.g. the batch it launched)."""

    def __init__(self, ready_at: float, payload: Any = None) -> None:
        self.ready_at, self.payload = ready_at, payload

    def done(self) -> bool:
        return time.monotonic() >= self.ready_at


class StandInDevice:
    """A stand-in for a GPU, so that tests of the order of asynchronous work run on any machine: work queued
    on it runs after the work queued before it (or at once when it is idle) and takes ``seconds`` (the
    device's default, or the piece's own); the host is not held up until it waits for a piece.

    Each instance has its own clock of when it is free: tests (and threads) do not share one device."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self._free_at = 0.0
        self._lock = threading.Lock()  # work may be queued from more than one thread

    def queue(self, seconds: float | None = None, payload: Any = None) -> QueuedWork:
        """Queue a piece of ``seconds`` (default: the device's) and return its handle at once."""
        with self._lock:
            self._free_at = max(time.monotonic(), self._free_at) + (self.seconds if seconds is None else seconds)
            return QueuedWork(self._free_at, payload)

    @staticmethod
    def wait(work: QueuedWork) -> None:
        """Sleep until ``work`` is done (what waiting for a GPU's event does: the GIL released)."""
        while not work.done():
            time.sleep(max(0.0, work.ready_at - time.monotonic()))


# -- shared data -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (skips the test when absent)."""
    if not SHARED_DIR.is_dir():
        pytest.skip(_missing_shared_reason())
    return SHARED_DIR


@pytest.fixture(scope="session")
def shared_models_dir(shared_dir: Path) -> Path:
    """``../shared/models`` with the real pretrained CIFAR-10 weights (skips when absent)."""
    return require_shared("models")


@pytest.fixture(scope="session")
def cifar_test_dir(shared_dir: Path) -> Path:
    """``../shared/data/cifar10/test`` (ImageFolder layout; skips when absent)."""
    return require_shared("data", "cifar10", "test")


@pytest.fixture(scope="session")
def photos_dir(shared_dir: Path) -> Path:
    """``../shared/data/photos`` (real photographs of various sizes and modes; skips when absent)."""
    return require_shared("data", "photos")


def cifar_test_files(cifar_test_dir: Path) -> list[tuple[Path, int]]:
    """Every (path, label) of the CIFAR-10 test folder, ordered by the image's index in the test set."""
    files = [
        (p, label)
        for label, cls in enumerate(CIFAR10_CLASSES)
        for p in (cifar_test_dir / cls).glob("*.png")
    ]
    return sorted(files, key=lambda item: item[0].stem)


def load_cifar_images(paths: Sequence[Path]) -> torch.Tensor:
    """32x32 RGB PNGs -> float32 NCHW in [0, 1]."""
    arrays = []
    for p in paths:
        with Image.open(p) as img:
            arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    stacked = torch.from_numpy(np.stack(arrays))
    return stacked.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


@pytest.fixture(scope="session")
def cifar_batch_paths(cifar_test_dir: Path) -> list[Path]:
    """The paths of the images in ``cifar_batch``."""
    paths = [cifar_test_dir / cls / f"{index}.png" for cls, index in CIFAR_BATCH_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"shared CIFAR-10 test images missing: {', '.join(missing)}")
    return paths


@pytest.fixture
def cifar_batch(cifar_batch_paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): 8 real CIFAR-10 test images, [8, 3, 32, 32] float32 in [0, 1], and their true labels [8] int64,
    on the test device."""
    x = load_cifar_images(cifar_batch_paths)
    y = torch.tensor([CIFAR10_CLASSES.index(p.parent.name) for p in cifar_batch_paths], dtype=torch.long)
    return x.to(TEST_DEVICE), y.to(TEST_DEVICE)


# -- environment isolation -----------------------------------------------------------------------------------


@pytest.fixture
def isolated_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No user registry, no models dir from the environment, the Hugging Face Hub offline on an empty cache.

    Returns the (empty) ``XDG_CONFIG_HOME`` used; write ``<it>/preempt/models.toml`` for a user registry.
    """
    root = tmp_path_factory.mktemp("isolated")
    config_home = root / "config"
    config_home.mkdir()
    hf_cache = root / "hf-cache"
    hf_cache.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    monkeypatch.delenv("PREEMPT_REGISTRY", raising=False)
    monkeypatch.delenv("PREEMPT_MODELS_DIR", raising=False)
    set_hf_cache(monkeypatch, hf_cache, offline=True)
    return config_home


def raised_without_waiting_on(fifo: Path, call: Any, what: str) -> BaseException | None:
    """What ``call()`` raised (None if it returned), the test failed where it still waits after 10 s: a blocking
    open of the FIFO ``fifo`` waits for a writer, forever; opening it for writing then releases the call, so
    that the test run can end. ``what`` names the call in the failure."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():
        with open(fifo, "wb"):
            pass
        worker.join(10)
        pytest.fail(f"{what} waited on a FIFO")
    return outcome[0] if outcome else None


def interrupt_run_once(started: threading.Event, release: Callable[[], None], monkeypatch: pytest.MonkeyPatch, *,
                       deadline: float, after: float = 0.0, to_thread: bool = False) -> threading.Timer:  # fmt: skip
    """Ctrl-C for a ``Protector.run`` in this process: SIGINT (to the main thread, which runs it) once
    ``started`` is set and ``after`` seconds more; ``release`` is called once the run has taken the interrupt
    (when it cancels the batches not started, ``ComputeThread.cancel_pending``), or at the latest
    ``deadline`` seconds after ``started`` (code that never cancels them then shows what it does with them;
    counted from the run's start, a run slow to start on a busy machine was released before the signal).
    ``to_thread``: the signal goes to the interrupting thread, whose C handler then takes it: the main
    thread, blocked, is not woken, as by a Ctrl-C that lands just before it blocks or that the kernel hands
    to another of the process's threads. Returns the deadline's timer, to cancel once the run is over."""
    import preempt_cli.batches as batches_module

    timer = threading.Timer(deadline, release)
    timer.daemon = True

    def interrupt() -> None:
        if started.wait(30):
            timer.start()
            time.sleep(after)
            if to_thread:
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGINT)

    cancel_pending = batches_module.ComputeThread.cancel_pending

    def cancelled(compute: Any) -> None:
        cancel_pending(compute)
        release()

    monkeypatch.setattr(batches_module.ComputeThread, "cancel_pending", cancelled, raising=False)
    threading.Thread(target=interrupt, daemon=True).start()
    return timer


def set_hf_cache(monkeypatch: pytest.MonkeyPatch, cache: Path, *, offline: bool = True) -> None:
    """Point huggingface_hub at ``cache`` (env and its import-time constants) and set its offline mode."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture(autouse=True)
def _library_logger_restored() -> Iterator[None]:
    """The ``preempt_cli`` logger as it was before each test: a command run in the test process sets its
    level, handlers and ``propagate = False`` (see ``cli._common``), which hid later tests' records from
    ``caplog``, so that a test passed or failed by the tests run before it."""
    logger = logging.getLogger("preempt_cli")
    state = (logger.level, list(logger.handlers), logger.propagate, logger.disabled)
    yield
    logger.setLevel(state[0])
    logger.handlers[:] = state[1]
    logger.propagate, logger.disabled = state[2], state[3]


@pytest.fixture(autouse=True)
def _no_log_file_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``PREEMPT_LOG`` of the shell running the tests would log every test's run there."""
    monkeypatch.delenv("PREEMPT_LOG", raising=False)


@pytest.fixture(autouse=True)
def _no_network_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach a model hub, whatever the environment says."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if os.environ.get("HF_HUB_DISABLE_TELEMETRY") is None:
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

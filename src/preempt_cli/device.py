"""Choosing the compute device and CPU threads."""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import platform
from pathlib import Path, PurePosixPath

import torch

from .errors import ConfigError

__all__ = ["resolve_device", "resolve_devices", "default_cpu_threads", "default_io_workers", "configure_cpu",
           "tune_malloc", "to_device", "model_device"]

_logger = logging.getLogger(__name__)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:I``, ``mps``.

    Raises:
        ConfigError: the device is unknown or not available.
    """
    if isinstance(spec, torch.device):  # checked as a name is: torch.device("cuda") without a GPU failed late
        spec = str(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"device must be a name (auto, cpu, cuda, cuda:I, mps) or a torch.device, got {spec!r}")
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:I, mps, a list such as cuda:0,cuda:1, "
                          "or all") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {spec!r}")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s first parameter (or, for a net without parameters, buffer) lives; the CPU for a model
    with neither."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)  # not every tensor gathered
    return first.device if first is not None else torch.device("cpu")


def resolve_devices(spec: str) -> list[torch.device]:
    """One device or several: ``auto``, ``cpu``, ``cuda:0``, a comma-separated list (``cuda:0,cuda:1``),
    or ``all`` (every GPU; the CPU where there is none).

    Raises:
        ConfigError: a device is unknown, unavailable or listed twice.
    """
    spec = spec.strip().lower()
    if spec == "all":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:  # a run meant for every GPU of a node whose GPUs CUDA cannot see: not at a CPU's pace unsaid
            _logger.warning("--device all: no GPU found (CUDA is not available); computing on the CPU")
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    devices = [resolve_device(part) for part in spec.split(",") if part.strip()]
    if not devices:
        raise ConfigError(f"no device in {spec!r}")
    if len(devices) > 1 and any(d.type == "cuda" and d.index is None for d in devices):
        raise ConfigError(f"name each GPU by index in a device list, e.g. cuda:0,cuda:1 (got {spec!r})")
    gpus = [d for d in devices if d.type != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"device listed twice in {spec!r}")
    if len({d.type for d in devices}) > 1:  # allowed (a GPU and the CPU beside it), but not without a word
        _logger.warning("--device %s mixes device kinds: each takes a fixed share of the files, so the slowest sets "
                        "the run's pace, and an image's output depends on which device computed it (their "
                        "arithmetic differs in the last bits)", spec)  # fmt: skip
    return devices


def default_cpu_threads() -> int:
    """Threads for CPU work: the CPUs this process may use. That is its affinity mask (``taskset``, a Slurm
    job's binding, a cpuset), capped by its cgroups' CPU quota rounded up (``docker --cpus``, a Kubernetes CPU
    limit, systemd's ``CPUQuota``) and by ``SLURM_CPUS_PER_TASK`` (a Slurm job that is not bound to its CPUs).

    A quota limits time, not which CPUs: a container given 2 CPUs of a 64-core host sees all 64 in its
    mask, and 64 threads there take turns at two CPUs' worth of time, each waiting for the others at every
    parallel operation."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    for limit in (_cgroup_cpu_limit(), _positive_int(os.environ.get("SLURM_CPUS_PER_TASK"))):
        if limit is not None:
            cpus = min(cpus, limit)
    return max(1, cpus)


#: where the kernel's files are read from: the root, but for the tests
_ROOT = Path("/")


def _cgroup_cpu_limit() -> int | None:
    """Whole CPUs' worth of time this process's cgroups allow (each quota over its period, rounded up; the
    lowest of its cgroup and those above it, in v2's hierarchy and v1's ``cpu`` one), or None where none is
    set or can be read.

    The cgroups are read from ``/proc/self/cgroup`` under ``/sys/fs/cgroup``, each path and its parents: in
    a container with a cgroup namespace of its own, or whose cgroups are mounted at their root (v1), the
    path it is given is not there, and its quota is at the root."""
    try:
        lines = (_ROOT / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    mount = _ROOT / "sys/fs/cgroup"
    limits = []
    for line in lines:
        fields = line.split(":", 2)  # hierarchy id, controllers, path
        if len(fields) != 3:
            continue
        controllers, path = fields[1], fields[2].strip().lstrip("/")
        if controllers == "":  # v2: one hierarchy, its controllers' files in each cgroup
            limits += [_v2_cpu_limit(d / "cpu.max") for d in _self_and_parents(mount, path)]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's hierarchy, named as it is mounted
            for name in dict.fromkeys((controllers, "cpu", "cpu,cpuacct")):
                limits += [_v1_cpu_limit(d) for d in _self_and_parents(mount / name, path)]
    return min((limit for limit in limits if limit is not None), default=None)


def _self_and_parents(mount: Path, path: str) -> list[Path]:
    parts = PurePosixPath(path).parts if path else ()
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_cpu_limit(cpu_max: Path) -> int | None:
    """``cpu.max``: "QUOTA PERIOD" in microseconds, or "max PERIOD" for none."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return _whole_cpus(quota, period)


def _v1_cpu_limit(cgroup: Path) -> int | None:
    """``cpu.cfs_quota_us`` (-1 for none) over ``cpu.cfs_period_us``."""
    try:
        quota = (cgroup / "cpu.cfs_quota_us").read_text()
        period = (cgroup / "cpu.cfs_period_us").read_text()
    except OSError:
        return None
    return _whole_cpus(quota, period)


def _whole_cpus(quota: str, period: str) -> int | None:
    """A quota over its period, rounded up (1.5 CPUs' worth of time keeps two threads busy part of the time)."""
    quota_us, period_us = _positive_int(quota), _positive_int(period)
    if quota_us is None or period_us is None:  # "max", -1: no quota
        return None
    return -(-quota_us // period_us)


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text.strip()) if text is not None else 0
    except ValueError:
        return None
    return value if value > 0 else None


def configure_cpu() -> None:
    """Set up this process for work on the CPU: :func:`default_cpu_threads` threads for torch, and
    :func:`tune_malloc`. What ``preempt`` commands do before computing on the CPU; batch jobs that use the
    Python API on a CPU may call it too.

    The thread count replaces any set before with ``torch.set_num_threads`` (call that after this one to
    choose your own), but not one chosen with ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``: where either holds
    a count, torch's threads are left as torch read them (when imported).

    How OpenMP's threads wait for one another it cannot set (``OMP_WAIT_POLICY``, read when torch is
    imported): on cores shared with other busy processes, their spinning made the engine 2-8 times slower,
    whichever thread called it (see the README's notes on the CPU)."""
    if not _users_thread_choice():
        torch.set_num_threads(default_cpu_threads())
    tune_malloc()


def _users_thread_choice() -> bool:
    """Whether ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` holds a thread count (of a list, as "4,2" for nested
    levels, the first), as torch reads them: other values it ignores, with a warning."""
    return any(_positive_int(os.environ.get(name, "").split(",")[0]) is not None
               for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))  # fmt: skip


#: what :func:`tune_malloc` sets: glibc's ``mallopt`` parameter (malloc.h) and value, by name. 32 MiB is the
#: largest mmap threshold glibc takes on 64 bits: blocks above it are still mapped and unmapped
_MALLOPT_SETTINGS = {"M_TRIM_THRESHOLD": (-1, 1 << 30), "M_MMAP_THRESHOLD": (-3, 32 << 20), "M_ARENA_MAX": (-8, 1)}


@functools.cache
def tune_malloc() -> bool:
    """Keep freed memory of up to 32 MiB blocks in this process (glibc), instead of returning it to the system.

    The engine allocates tensors of a few to 32 MiB (activations and their gradients) hundreds of times per
    batch. glibc maps such blocks freshly and unmaps them when freed, or trims them off its heap, so every
    use touches new pages, which the kernel zeroes at their first write. Three settings keep them: blocks up
    to 32 MiB come from the heap, the heap keeps up to 1 GiB free at its top, and threads created from now on
    allocate from the main heap. The last is for the compute thread of :meth:`Protector.run
    <preempt_cli.protect.Protector.run>`: a thread's own arena is made of heaps of at most 64 MiB, and glibc
    unmaps such a heap once it is empty, whatever the trim threshold. ``preempt protect`` of 512 CIFAR-10
    PNGs on 2 Xeon cores (0.15.0): 2.9-3.0 million page faults and 23.4 s untuned, 1.5-3.7 million with
    only the two thresholds set, 0.2 million and 20.8-21.0 s with all three; the fp32 engine alone 43.3
    against 34.8-35.7 ms per image (``benchmarks/RESULTS.md``). PyTorch's CPU tuning guide gives the same
    advice as jemalloc or tcmalloc, preloaded.

    Call it before starting threads: glibc gives a new thread the arena of one that has ended, whatever the
    limit. Changes nothing, and returns False, off glibc, or where the user chose for themselves: a
    ``MALLOC_*`` variable, ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``, ``LD_PRELOAD`` (another
    allocator), or ``PREEMPT_TUNE_MALLOC=0``. The cost is memory kept after a peak (up to 1 GiB free; 145-210
    MB more at the peak of the run above), and threads that wait for one another's allocations (few and
    large here). Process-wide; the first call decides, later ones return its result.
    """
    if _users_allocator_choice() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # setting either threshold also stops glibc's own raising of the mmap threshold (to the largest block freed)
    refused = [name for name, (param, value) in _MALLOPT_SETTINGS.items() if mallopt(param, value) != 1]
    if refused:  # never seen: the values are within glibc's limits
        _logger.warning("glibc refused mallopt %s; the allocator is tuned in part", ", ".join(refused))
    else:
        _logger.debug("glibc malloc tuned: %s", _MALLOPT_SETTINGS)
    return not refused


def _users_allocator_choice() -> bool:
    env = os.environ
    return (env.get("PREEMPT_TUNE_MALLOC", "1").strip() == "0" or bool(env.get("LD_PRELOAD"))
            or any(name.startswith("MALLOC_") for name in env) or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""))  # fmt: skip


def default_io_workers() -> int:
    """Threads decoding and encoding image files: one per usable CPU, at least 2 and at most 8 (Pillow
    releases the GIL while it codes, so more threads help, but the compute thread needs the GIL too)."""
    return min(8, max(2, default_cpu_threads()))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. To a GPU it goes through pinned memory, without waiting: a copy from
    ordinary (pageable) memory makes the host wait until the device has run everything queued before it."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)

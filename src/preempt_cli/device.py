"""Choosing the compute device and CPU threads."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

__all__ = ["resolve_device", "resolve_devices", "default_cpu_threads", "default_io_workers", "to_device"]


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:I``, ``mps``.

    Raises:
        ConfigError: the device is unknown or not available.
    """
    if isinstance(spec, torch.device):
        return spec
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


def resolve_devices(spec: str) -> list[torch.device]:
    """One device or several: ``auto``, ``cpu``, ``cuda:0``, a comma-separated list (``cuda:0,cuda:1``),
    or ``all`` (every GPU; the CPU where there is none).

    Raises:
        ConfigError: a device is unknown, unavailable or listed twice.
    """
    spec = spec.strip().lower()
    if spec == "all":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    devices = [resolve_device(part) for part in spec.split(",") if part.strip()]
    if not devices:
        raise ConfigError(f"no device in {spec!r}")
    if len(devices) > 1 and any(d.type == "cuda" and d.index is None for d in devices):
        raise ConfigError(f"name each GPU by index in a device list, e.g. cuda:0,cuda:1 (got {spec!r})")
    gpus = [d for d in devices if d.type != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"device listed twice in {spec!r}")
    return devices


def default_cpu_threads() -> int:
    """Threads for CPU work: the CPUs this process may use (cgroup/affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


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

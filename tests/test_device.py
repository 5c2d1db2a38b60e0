"""How many CPU threads preempt takes (``device.default_cpu_threads``, ``default_io_workers``, ``configure_cpu``)
in containers and batch jobs: the affinity mask, a cgroup's CPU quota, Slurm's count and the user's own
``OMP_NUM_THREADS``. The kernel's files are faked under a folder of the test's, the affinity mask by a stand-in
for ``os.sched_getaffinity``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from preempt_cli import device

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="affinity masks are Linux's")

_HOST_CPUS = 64


@pytest.fixture(autouse=True)
def host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A 64-CPU host whose kernel files lie under the returned root (none yet: no cgroup, no quota), and no
    thread count in the environment, whatever the one running the tests holds (a Slurm job, OMP_NUM_THREADS)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(_HOST_CPUS)))
    monkeypatch.setattr(device, "_ROOT", tmp_path, raising=False)  # (raising: the old code had none)
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1), ("800000 50000", 16), ("max 100000", 64)],
)
def test_a_cgroup_v2_quota_caps_the_threads(host: Path, cpu_max: str, cpus: int) -> None:
    # docker run --cpus=2 on cgroup v2, in the container's own cgroup namespace: its cgroup is the root
    _write(host, {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": cpu_max + "\n"})
    assert device.default_cpu_threads() == cpus
    assert device.default_io_workers() == min(8, max(2, cpus))


def test_the_lowest_quota_of_a_cgroup_and_its_parents_counts(host: Path) -> None:
    # a Kubernetes pod's limit on the pod's cgroup, none on the container's below it (host's cgroup namespace)
    _write(host, {"proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
                  "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",
                  "sys/fs/cgroup/kubepods/pod1/cpu.max": "300000 100000\n",
                  "sys/fs/cgroup/kubepods/cpu.max": "max 100000\n"})  # fmt: skip
    assert device.default_cpu_threads() == 3


@pytest.mark.parametrize("controllers", ["cpu,cpuacct", "cpu"])
def test_a_cgroup_v1_quota_caps_the_threads(host: Path, controllers: str) -> None:
    # docker --cpus=2 on cgroup v1: the container's cgroup mounted as the hierarchy's root, and
    # /proc/self/cgroup naming its path on the host (not there in the container)
    _write(host, {"proc/self/cgroup": f"12:memory:/docker/abc\n4:{controllers}:/docker/abc\n0::/docker/abc\n",
                  f"sys/fs/cgroup/{controllers}/cpu.cfs_quota_us": "200000\n",
                  f"sys/fs/cgroup/{controllers}/cpu.cfs_period_us": "100000\n"})  # fmt: skip
    assert device.default_cpu_threads() == 2


def test_no_quota_leaves_the_affinity_mask(host: Path) -> None:
    # this project's CI machine: cgroup v1 and v2 side by side, v1's cpu quota -1 (none), v2 without cpu.max
    _write(host, {"proc/self/cgroup": "4:memory:/job\n1:cpu:/\n0::/\n",
                  "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
                  "sys/fs/cgroup/unified/cgroup.procs": ""})  # fmt: skip
    assert device.default_cpu_threads() == _HOST_CPUS
    assert device.default_io_workers() == 8


def test_unreadable_cgroup_files_leave_the_affinity_mask(host: Path) -> None:
    _write(host, {"proc/self/cgroup": "garbage\n0::/\n", "sys/fs/cgroup/cpu.max": "nonsense\n"})
    assert device.default_cpu_threads() == _HOST_CPUS


def test_the_affinity_mask_counts(monkeypatch: pytest.MonkeyPatch, host: Path) -> None:
    # taskset -c 0-3, or a Slurm job bound to 4 CPUs; a quota above it changes nothing
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    _write(host, {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "800000 100000\n"})
    assert device.default_cpu_threads() == 4


def test_slurm_cpus_per_task_caps_a_job_not_bound_to_its_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert device.default_cpu_threads() == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "128")  # a cap, never more than the mask
    assert device.default_cpu_threads() == _HOST_CPUS
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "four")
    assert device.default_cpu_threads() == _HOST_CPUS


@pytest.fixture
def torch_threads_set(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """What configure_cpu passes to torch.set_num_threads (not passed on: the test process keeps its threads),
    with the allocator left as it is."""
    calls: list[int] = []
    monkeypatch.setattr(device.torch, "set_num_threads", calls.append)
    monkeypatch.setattr(device, "tune_malloc", lambda: False)
    return calls


@pytest.mark.parametrize(("name", "value"), [("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "3"),
                                             ("OMP_NUM_THREADS", "4,2")])  # fmt: skip
def test_configure_cpu_leaves_the_users_thread_count(
    monkeypatch: pytest.MonkeyPatch, torch_threads_set: list[int], name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    device.configure_cpu()
    assert torch_threads_set == []  # torch read the variable when imported; it stays


@pytest.mark.parametrize("value", [None, "", "0", "many"])
def test_configure_cpu_sets_the_threads_without_a_users_count(
    monkeypatch: pytest.MonkeyPatch, torch_threads_set: list[int], value: str | None
) -> None:
    if value is not None:  # a value torch ignores (with a warning) is no choice
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    device.configure_cpu()
    assert torch_threads_set == [3]


def test_a_device_list_mixing_the_cpu_and_a_gpu_says_what_it_costs(monkeypatch, caplog) -> None:
    """Allowed, but the CPU's fixed share sets the pace, and which device computes an image changes its bits."""
    from preempt_cli.device import resolve_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="preempt_cli.device"):
        assert resolve_devices("cuda:0,cuda:1") == [torch.device("cuda", 0), torch.device("cuda", 1)]
        assert resolve_devices("cpu,cpu") == [torch.device("cpu")] * 2
        assert not caplog.records
        assert resolve_devices("cuda:0,cpu") == [torch.device("cuda", 0), torch.device("cpu")]
    (record,) = caplog.records
    assert "mixes device kinds" in record.getMessage() and "cuda:0,cpu" in record.getMessage()

"""The benchmark scripts still run and report consistent numbers (tiny settings; the real runs are minutes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_shared

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_pipeline():
    require_shared("data", "cifar10", "test")
    sys.path.insert(0, str(BENCHMARKS))
    threads = torch.get_num_threads()  # the script sets 1 for itself
    try:
        import bench_pipeline

        yield bench_pipeline
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCHMARKS))


def test_bench_pipeline_splits_each_run_into_its_parts(bench_pipeline, capsys: pytest.CaptureFixture) -> None:
    assert bench_pipeline.main(["--files", "40", "--batch-size", "16", "--repeats", "1", "--workers", "2",
                                "--engine-ms", "2", "--io", "threads,processes"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["modes"]) == {"threads", "processes"}
    for mode in report["modes"].values():
        split = mode["split_s"]
        assert split["batches"] == 3  # 16 + 16 + 8 files
        # one compute thread: its spans never overlap, and they lie inside the run
        assert split["between_s"] >= -1e-3 and split["head_s"] > 0 and split["tail_s"] >= 0
        assert split["compute_s"] >= 40 * 2e-3 * 0.9  # the stand-in's waits happen inside the compute spans
        assert split["compute_s"] <= split["wall_s"]
        assert mode["files_per_s"] == pytest.approx(40 / mode["runs_s"][0], rel=1e-2)
        assert mode["main_process_cpu_ms_per_file"] > 0
    processes = report["modes"]["processes"]
    assert processes["workers_cpu_ms_per_file"] > 0  # the workers' CPU time is read from /proc
    assert processes["projected_files_per_s"] <= report["engine_images_per_s"]

#!/usr/bin/env python
"""How fast ``preempt protect``'s file pipeline can feed an engine of a given speed, on any machine.

The end-to-end target (files in, PNGs out at >= 80% of the engine's rate) is hardest on a GPU, where the
engine is fast and each small file still costs Python work. GPU time is scarce, so this benchmark puts a
stand-in for the device in the real pipeline (``Protector.run``: decoding, labels, batching, rounding to
the files' levels, metadata, atomic PNG writes): a device that runs ``--engine-ms`` per image after the
batch is queued, asynchronously, as a GPU does (``--queued``: batches queued on it at once; the compute
thread waits for a batch with the GIL released). The rest of ``Protector._compute`` runs for real on the
CPU (the labelling and confidence models are stubbed: on a GPU they are part of the device's time).

For each I/O mode (threads, processes) it reports files/s and the fraction of the stand-in engine's rate
(``1000 / engine_ms`` images/s), and the CPU time per file of the main process (all its threads: they share
one GIL) and, with ``--io processes``, of the worker processes. Those two say what a machine with more
CPUs than this one can reach: at most ``1000 / main_ms`` files/s from the main process, and
``workers * 1000 / worker_ms`` from the workers when each has a CPU of its own (a projection, printed as
such, not a measurement). Output: a table, then one JSON line.

    python benchmarks/bench_pipeline.py --engine-ms 0.39 --files 2048     # ResNet-20 fp32 on an H100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ContextManager, NamedTuple, Sequence

import torch

import _checkout  # benchmarks/ is on sys.path

_checkout.put_checkout_src_first()  # the checkout's code, installed or not (no PYTHONPATH=src needed)
from preempt_cli import ForeBackConfig, Protector, RunOptions, collect_inputs  # noqa: E402
from preempt_cli.device import default_io_workers  # noqa: E402
from preempt_cli.imageio import levels_to_float  # noqa: E402
from preempt_cli.models import ImageModel  # noqa: E402
from preempt_cli.registry import ModelConfig, Source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10" / "test"


class _OnStandInDevice:
    """A batch queued on the stand-in device: done at ``ready_at`` (``time.perf_counter``)."""

    def __init__(self, launched: Any, ready_at: float) -> None:
        self.launched, self.ready_at = launched, ready_at

    def done(self) -> bool:
        return time.perf_counter() >= self.ready_at


class StandInEngine(Protector):
    """A Protector whose device runs ``engine_ms`` per image of a batch, one batch after another, from
    the time each is queued; waiting for a batch sleeps (the GIL released) until the device is done."""

    def __init__(self, engine_ms: float, queued: int = 2) -> None:
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10))
        net(torch.zeros(1, 3, 32, 32))
        config = ModelConfig(name="stand-in", arch="stand_in", source=Source("file", "none"), dataset="cifar10",
                             input_size=(3, 32, 32), num_classes=10)  # fmt: skip
        super().__init__(ImageModel(net, config).eval(), labels="backbone", config=ForeBackConfig(samples=1))
        self.engine_ms, self.queued = engine_ms, queued
        self._device_free_at = 0.0

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], dtype=torch.long)

    def confidence(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0])

    def transform_levels(self, levels: torch.Tensor, max_value: int, y: torch.Tensor,
                         noise_seeds: Sequence[int] | None = None) -> torch.Tensor:  # fmt: skip
        # the device starts the batch when it is free (after the batches queued before) or now
        self._device_free_at = max(time.perf_counter(), self._device_free_at) + self.engine_ms * levels.shape[0] / 1000
        return levels_to_float(levels, max_value)

    def _queued_batches(self) -> int:
        return self.queued

    def _compute_with_backoff(self, batch: list) -> _OnStandInDevice:
        return _OnStandInDevice(super()._compute_with_backoff(batch), self._device_free_at)

    def _finish_batch(self, batch: list, launched: _OnStandInDevice) -> Any:
        time.sleep(max(0.0, launched.ready_at - time.perf_counter()))
        return super()._finish_batch(batch, launched.launched)


class BatchSpan(NamedTuple):
    """One batch as the compute thread ran it: from its launch to its finish (``time.perf_counter``; with
    batches queued on a device, spans overlap), its images, the host's seconds to launch it, and the CPU
    seconds the compute thread used on it (launch and finish)."""

    start: float
    end: float
    images: int
    launch_s: float
    cpu_s: float


class PipelineTrace:
    """Where the wall time of ``Protector.run`` goes. Each batch's span, from its launch to its finish,
    splits a run into: before the first batch computes (``head``: decoding it), batches computing
    (``compute``: the time some batch's span covers; overlapping spans count once), waits between batches
    (``between``: the compute thread starved of full batches), and after the last batch (``tail``: its
    files written). Wraps the protector's compute steps on this one instance; ``batches`` holds the
    :class:`BatchSpan` of each batch of the last run, in the order they finished."""

    def __init__(self, protector: Protector) -> None:
        self.protector = protector
        self.batches: list[BatchSpan] = []
        launch, finish = protector._compute_with_backoff, protector._finish_batch
        launches: dict[int, tuple[float, float, float]] = {}  # id(batch): start, launch seconds, its CPU s

        def traced_launch(batch: list) -> Any:
            cpu, start = time.thread_time(), time.perf_counter()
            try:
                with self._batch_step():
                    return launch(batch)
            finally:
                launches[id(batch)] = (start, time.perf_counter() - start, time.thread_time() - cpu)

        def traced_finish(batch: list, launched: Any) -> Any:
            cpu = time.thread_time()
            try:
                with self._batch_step():
                    return finish(batch, launched)
            finally:
                start, launch_s, launch_cpu = launches.pop(id(batch))
                self.batches.append(BatchSpan(start, time.perf_counter(), len(batch), launch_s,
                                              launch_cpu + time.thread_time() - cpu))  # one thread: no lock

        protector._compute_with_backoff = traced_launch  # type: ignore[method-assign]
        protector._finish_batch = traced_finish  # type: ignore[method-assign]

    def _batch_step(self) -> ContextManager[Any]:
        """What each launch and finish of a batch runs in (a subclass's marker for a profiler): nothing here,
        so that the pipeline's numbers carry no cost of one."""
        return contextlib.nullcontext()

    def _timed_run(self, items: list, options: RunOptions) -> tuple[list, float, float]:
        """The run's results, and when it started and ended (``time.perf_counter``)."""
        self.batches.clear()
        start = time.perf_counter()
        results = list(self.protector.run(items, options))
        return results, start, time.perf_counter()

    def run(self, items: list, options: RunOptions) -> tuple[list, dict[str, Any]]:
        """The run's results and its split in seconds (wall, head, compute, between, tail, batches)."""
        results, start, end = self._timed_run(items, options)
        spans = [(b.start, b.end) for b in self.batches]
        split: dict[str, Any] = {"wall_s": end - start, "batches": len(spans)}
        if spans:
            compute = covered(spans)
            first, last = min(s for s, _ in spans), max(e for _, e in spans)
            split.update(head_s=first - start, compute_s=compute, between_s=(last - first) - compute, tail_s=end - last)
        return results, {k: round(v, 4) if isinstance(v, float) else v for k, v in split.items()}


def covered(spans: list[tuple[float, float]]) -> float:
    """The time some span covers (overlaps counted once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def median_split(splits: list[dict[str, float]]) -> dict[str, float]:
    """The split of the run of median wall time."""
    return sorted(splits, key=lambda s: s["wall_s"])[len(splits) // 2]


def workers_cpu_s(protector: Protector) -> float:
    """CPU seconds (user + system) used so far by the protector's I/O worker processes (0 without any)."""
    pool = protector._processes
    if pool is None:
        return 0.0
    total = 0
    for pid in list(getattr(pool, "_processes", None) or {}):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # not Linux, or the worker is gone
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> dict[str, Any]:
    sources = sorted(CIFAR.glob("*/*.png"))
    if not sources:
        raise SystemExit(f"no CIFAR-10 test PNGs under {CIFAR}")
    protector = StandInEngine(args.engine_ms, args.queued)
    trace = PipelineTrace(protector)
    engine_rate = 1000 / args.engine_ms
    results: dict[str, Any] = {"benchmark": "bench_pipeline", "engine_ms": args.engine_ms,
                               "engine_images_per_s": round(engine_rate, 1), "files": args.files,
                               "batch_size": args.batch_size, "workers": args.workers, "queued": args.queued,
                               "cpus": len(os.sched_getaffinity(0)), "modes": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i in range(args.files):
            shutil.copy2(sources[i % len(sources)], folder / f"{i:05d}.png")
        items = collect_inputs([folder])
        for io in args.io:
            options = RunOptions(out_dir=Path(tmp) / io, overwrite=True, batch_size=args.batch_size,
                                 workers=args.workers, io=io)  # fmt: skip
            times, main_cpu, worker_cpu, splits = [], [], [], []
            for run_index in range(args.repeats + 1):  # the first run warms up (and starts the processes)
                workers_before = workers_cpu_s(protector)
                cpu_start = time.process_time()
                outcomes, split = trace.run(items, options)
                statuses = [r.status for r in outcomes]
                if run_index:
                    times.append(split["wall_s"])
                    splits.append(split)
                    main_cpu.append(time.process_time() - cpu_start)
                    worker_cpu.append(workers_cpu_s(protector) - workers_before)
            assert statuses.count("done") == args.files, statuses[:3]
            rate = args.files / statistics.median(times)
            main_ms = 1000 * statistics.median(main_cpu) / args.files
            mode: dict[str, Any] = {"files_per_s": round(rate, 1), "runs_s": [round(t, 3) for t in times],
                                    "fraction_of_engine": round(rate / engine_rate, 3),
                                    "main_process_cpu_ms_per_file": round(main_ms, 4),
                                    "split_s": median_split(splits)}  # fmt: skip
            if io == "processes":
                worker_ms = 1000 * statistics.median(worker_cpu) / args.files
                mode["workers_cpu_ms_per_file"] = round(worker_ms, 4)
                # with a CPU per worker and one for the main process: the slower of the two sides
                ceiling = min(1000 / main_ms, args.workers * 1000 / worker_ms if worker_ms else float("inf"))
                mode["projected_files_per_s"] = round(min(ceiling, engine_rate), 1)
                mode["projected_fraction_of_engine"] = round(mode["projected_files_per_s"] / engine_rate, 3)
            results["modes"][io] = mode
            print(f"[bench] {io}: {rate:.0f} files/s", file=sys.stderr, flush=True)
    protector.close()
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-ms", type=float, default=0.39, help="stand-in engine time per image (default 0.39: "
                   "ResNet-20 fp32 on an H100)")  # fmt: skip
    p.add_argument("--files", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=default_io_workers())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--io", default="threads,processes", help="comma-separated I/O modes")
    p.add_argument("--queued", type=int, choices=(1, 2), default=2, help="batches queued on the stand-in device "
                   "at once (2: what a GPU gets; 1: each batch waited for before the next is queued)")  # fmt: skip
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON line's report to this file")
    args = p.parse_args(argv)
    # refused here, in a line, rather than as a traceback after the files are copied (no runs: no median)
    if not (math.isfinite(args.engine_ms) and args.engine_ms > 0):  # its rate, 1000 / engine_ms, is reported
        p.error(f"--engine-ms must be a positive number of milliseconds, got {args.engine_ms}")
    for option in ("files", "batch_size", "workers", "repeats"):
        value = getattr(args, option)
        if value < 1:
            p.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    args.io = [m.strip() for m in args.io.split(",") if m.strip()]
    if not args.io or not set(args.io) <= {"threads", "processes"}:
        p.error(f"--io takes threads and processes, comma-separated, got {','.join(args.io) or 'none'}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the stand-in needs none; leave the CPUs to the pipeline
    results = run(args)
    print(f"pipeline vs a stand-in engine of {args.engine_ms} ms/image ({results['engine_images_per_s']} images/s), "
          f"{args.files} 32x32 PNGs, batch {args.batch_size}, {args.queued} queued, {args.workers} I/O workers, "
          f"{results['cpus']} CPUs")  # fmt: skip
    print(f"{'I/O':<10} {'files/s':>9} {'of engine':>10} {'main CPU ms/file':>17} {'workers CPU ms/file':>20}"
          f" {'projected files/s':>18}")  # fmt: skip
    for io, r in results["modes"].items():
        workers = f"{r['workers_cpu_ms_per_file']:.3f}" if "workers_cpu_ms_per_file" in r else "-"
        projected = (f"{r['projected_files_per_s']:.0f} ({r['projected_fraction_of_engine']:.2f})"
                     if "projected_files_per_s" in r else "-")  # fmt: skip
        print(f"{io:<10} {r['files_per_s']:>9.0f} {r['fraction_of_engine']:>10.2f} "
              f"{r['main_process_cpu_ms_per_file']:>17.3f} {workers:>20} {projected:>18}")
    print(f"projected: with a CPU for each of the {args.workers} workers and one for the main process "
          "(engine rate the cap); not a measurement")
    print(f"{'I/O':<10} {'wall s':>8} {'head':>7} {'compute':>8} {'between':>8} {'tail':>7}   (run of median wall time)")
    for io, r in results["modes"].items():
        sp = r["split_s"]
        if "compute_s" in sp:
            print(f"{io:<10} {sp['wall_s']:>8.3f} {sp['head_s']:>7.3f} {sp['compute_s']:>8.3f} {sp['between_s']:>8.3f} "
                  f"{sp['tail_s']:>7.3f}")  # fmt: skip
    print(json.dumps(results))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

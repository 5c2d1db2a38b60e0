#!/usr/bin/env python
"""Where the end-to-end time of ``Protector.run`` goes on a device: a diagnostic, not a benchmark.

``bench_protect.py`` shows that files in, PNGs out run at 0.55-0.60 of the engine's rate on an H100/H200
(2048 32x32 PNGs, ResNet-20, ``--io processes``), and splits each run into head, compute and tail. This
script asks why, on the same work, in one short run (device time is scarce):

1. the engine alone, timed on a worker thread (where ``Protector.run`` computes; before, on the main
   thread); and its device's busy time (kernels and copies, from the CUDA profiler);
2. the pipeline, timed, with a trace of each run: when the first decode is submitted (after the run has
   named every output) and the first file decoded, when the first batch starts, each batch's wall time in
   the compute thread and the CPU time that thread used, the main thread's CPU time, the garbage
   collector's pauses (full collections listed), and the device's busy time from the profiler;
3. the engine alone again while another thread holds the GIL for a fixed share of the time (``--gil-duty``):
   how much of the pipeline's slower compute a busy main thread explains;
4. the pipeline with other numbers of I/O worker processes (``--workers``), and with 1 or 2 batches queued
   on the GPU at once (``--queued 1,2``: each batch waited for before the next is queued, or not).

``--host-trace`` adds one engine run and one pipeline run under ``torch.profiler`` with host activities: the
CUDA runtime calls (and synchronisations) by thread, and what each thread was doing in the device's
longest idle gaps. ``--gc-freeze on|off`` runs with the long-lived objects frozen beforehand, or keeps the pipeline from
freezing them, for an A/B of that alone. Output: a summary on stdout and one JSON line (also ``--json-out``).
Measured runs: ``results/gpu-h100/run6`` (see RESULTS.md).

    python benchmarks/trace_e2e.py --device cuda --files 2048
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkout  # noqa: E402

_checkout.put_checkout_src_first()  # the checkout's code, installed or not (no PYTHONPATH=src needed)
from bench_pipeline import PipelineTrace, covered  # noqa: E402
from bench_protect import (  # noqa: E402
    SHARED,
    cifar_paths,
    engine_run,
    engine_warmup,
    graph_counts,
    load_backbones,
    load_images,
    log,
    on_worker_thread,
    rate,
    sync,
    timed,
)
from preempt_cli import ForeBackConfig, Protector, RunOptions, collect_inputs  # noqa: E402
from preempt_cli.device import resolve_device  # noqa: E402
import preempt_cli.protect as protect_module  # noqa: E402

#: The pipeline's own piece size, before --min-piece changes it
DEFAULT_MIN_PIECE = protect_module._MIN_PIECE


#: The name of a batch's span in :func:`host_trace`'s profile.
BATCH_ANNOTATION = "preempt:batch"


def idle_gaps(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (start, end) of each stretch between the first and the last of ``spans`` (intervals of device
    work, in any order, overlapping or not) that none of them covers."""
    gaps: list[tuple[float, float]] = []
    ordered = sorted(spans)
    end = ordered[0][1] if ordered else 0.0
    for s, e in ordered[1:]:
        if s > end:
            gaps.append((end, s))
        end = max(end, e)
    return gaps


def device_busy(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Run ``fn`` once under the CUDA profiler: wall seconds, the union of the device's kernel and copy
    intervals (busy), and the idle gaps between them."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - start
    spans: list[tuple[float, float]] = []
    try:
        for e in prof.profiler.kineto_results.events():
            if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0:
                spans.append((e.start_ns() / 1e9, (e.start_ns() + e.duration_ns()) / 1e9))
    except Exception as err:  # an API that moved between torch versions: say so, keep the rest
        return {"wall_s": round(wall, 4), "error": f"{type(err).__name__}: {err}"}
    if not spans:
        return {"wall_s": round(wall, 4), "error": "no device events"}
    gaps = [b - a for a, b in idle_gaps(spans)]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    busy = last - first - sum(gaps)
    big = sorted(gaps, reverse=True)
    return {
        "wall_s": round(wall, 4),
        "busy_s": round(busy, 4),
        "first_to_last_s": round(last - first, 4),
        "idle_within_s": round(sum(gaps), 4),
        "gaps_over_1ms": sum(g > 1e-3 for g in gaps),
        "idle_in_gaps_over_1ms_s": round(sum(g for g in gaps if g > 1e-3), 4),
        "idle_in_gaps_under_1ms_s": round(sum(g for g in gaps if g <= 1e-3), 4),
        "largest_gaps_ms": [round(g * 1000, 2) for g in big[:12]],
        "kernels_and_copies": len(spans),
    }


def host_trace(fn: Callable[[], Any], device: torch.device, top: int = 12) -> dict[str, Any]:
    """Run ``fn`` once under ``torch.profiler`` with host activities too (every thread, CUDA sync events
    where the torch version has them): the CUDA runtime calls by total time, and for the device's longest
    idle gaps, what each thread was doing (the shortest host events that cover most of the gap). Threads:
    ``compute`` (ran a batch), ``autograd`` (ran backward functions), else torch's thread number."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    config, enabled = None, []
    try:
        from torch._C._profiler import _ExperimentalConfig

        for options in ({"profile_all_threads": True, "enable_cuda_sync_events": True},
                        {"enable_cuda_sync_events": True}, {}):  # fmt: skip
            try:
                config, enabled = _ExperimentalConfig(**options), sorted(options)
                break
            except TypeError:  # an option this torch does not have
                continue
    except ImportError:
        pass
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities, experimental_config=config) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - start
    events = prof.profiler.kineto_results.events()
    host = [e for e in events if e.device_type() != torch.autograd.DeviceType.CUDA]
    compute = {e.start_thread_id() for e in host if e.name() == BATCH_ANNOTATION}
    backward = {e.start_thread_id() for e in host if e.name().startswith("autograd::engine::evaluate_function")}

    def thread(e: Any) -> str:
        tid = e.start_thread_id()
        return "compute" if tid in compute else "autograd" if tid in backward else f"t{tid}"

    calls: dict[tuple[str, str, str], list[float]] = {}
    for e in host:
        kind = str(e.activity_type())
        if "runtime" in kind or "driver" in kind or "sync" in kind:
            calls.setdefault((kind, e.name(), thread(e)), []).append(e.duration_ns() / 1e6)
    runtime = sorted(({"activity": k, "name": n, "thread": t, "calls": len(v), "total_ms": round(sum(v), 2),
                       "max_ms": round(max(v), 2)} for (k, n, t), v in calls.items()),
                     key=lambda r: -r["total_ms"])  # fmt: skip
    out: dict[str, Any] = {"wall_s": round(wall, 4), "experimental": enabled, "threads": {
        "compute": sorted(compute), "autograd": sorted(backward - compute)}, "runtime_calls": runtime[:20]}
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
                   if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0)  # fmt: skip
    if not spans:
        return out
    gaps = idle_gaps(spans)
    busy = max(e for _, e in spans) - spans[0][0] - sum(b - a for a, b in gaps)
    out.update(busy_s=round(busy / 1e9, 4), idle_s=round(sum(b - a for a, b in gaps) / 1e9, 4),
               idle_in_gaps_over_1ms_s=round(sum(b - a for a, b in gaps if b - a > 1e6) / 1e9, 4))
    first = spans[0][0]
    report = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        covering = []
        for e in host:
            s, t = e.start_ns(), e.start_ns() + e.duration_ns()
            overlap = min(b, t) - max(a, s)
            if overlap > 0.5 * (b - a) and e.name() != BATCH_ANNOTATION:
                covering.append((e.duration_ns(), thread(e), e.name()))
        by_thread: dict[str, tuple[int, str]] = {}
        for duration, name_of_thread, name in sorted(covering):  # the shortest covering event per thread
            by_thread.setdefault(name_of_thread, (duration, name))
        report.append({"gap_ms": round((b - a) / 1e6, 2), "at_s": round((a - first) / 1e9, 4),
                       "threads": {k: f"{n} ({d / 1e6:.1f} ms)" for k, (d, n) in by_thread.items()}})  # fmt: skip
    out["largest_gaps"] = report
    return out


class RunTrace(PipelineTrace):
    """Time stamps of one ``Protector.run``: decoded files, batches (a :class:`PipelineTrace`'s spans: from
    launch to finish, with two batches queued on a GPU these overlap; the host's time to queue each; the
    compute thread's CPU time), the garbage collector's pauses, and the main thread's CPU time. Wraps the
    protector's methods on this one instance; each batch step is marked for :func:`host_trace`."""

    def __init__(self, protector: Protector) -> None:
        super().__init__(protector)
        self.decoded: list[float] = []
        decoded = protector._decoded

        def traced_decoded(*args: Any) -> Any:
            out = decoded(*args)
            self.decoded.append(time.perf_counter())
            return out

        protector._decoded = traced_decoded  # type: ignore[method-assign]
        self.decode_calls: list[float] = []
        for io_class in (protect_module._ThreadIO, protect_module._ProcessIO):
            if not hasattr(io_class, "_untraced_decode"):
                io_class._untraced_decode = io_class.decode

                def traced_decode(io: Any, items: list, _trace: RunTrace = self) -> Any:
                    _trace.decode_calls.append(time.perf_counter())
                    return io._untraced_decode(items)

                io_class.decode = traced_decode
        self.collections: list[tuple[int, float]] = []  # generation, seconds
        self._gc_start = 0.0

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                self._gc_start = time.perf_counter()
            else:
                self.collections.append((info["generation"], time.perf_counter() - self._gc_start))

        self.on_gc = on_gc

    def _batch_step(self) -> ContextManager[Any]:
        return torch.profiler.record_function(BATCH_ANNOTATION)  # marks the compute thread for host_trace

    def run(self, items: list, options: RunOptions) -> tuple[list, dict[str, Any]]:
        """The run's results and its time stamps (seconds from its start) and CPU times."""
        self.decoded.clear()
        self.decode_calls.clear()
        self.collections.clear()
        gc.callbacks.append(self.on_gc)
        try:
            cpu, process_cpu = time.thread_time(), time.process_time()
            results, start, end = self._timed_run(items, options)
        finally:
            gc.callbacks.remove(self.on_gc)
        full = [t for g, t in self.collections if g == 2]
        main_cpu, process_cpu = time.thread_time() - cpu, time.process_time() - process_cpu
        done = sum(r.status == "done" for r in results)
        batches = self.batches
        first_batch = batches[0].images if batches else 0
        out = {
            "wall_s": end - start,
            "done": done,
            "main_thread_cpu_s": main_cpu,
            "process_cpu_s": process_cpu,
            "first_decode_submitted_s": self.decode_calls[0] - start if self.decode_calls else None,
            "first_decoded_s": self.decoded[0] - start if self.decoded else None,
            "first_batch_decoded_s": self.decoded[first_batch - 1] - start if len(self.decoded) >= first_batch > 0 else None,
            "head_s": batches[0].start - start if batches else None,
            "tail_s": end - max(b.end for b in batches) if batches else None,
            "batches": len(batches),
            "batch_sizes": sorted({b.images for b in batches}),
            "compute_wall_s": covered([(b.start, b.end) for b in batches]),
            "compute_thread_cpu_s": sum(b.cpu_s for b in batches),
            "batch_wall_ms": [round((b.end - b.start) * 1000, 1) for b in batches],
            "launch_ms": [round(b.launch_s * 1000, 1) for b in batches],
            "gc_collections": len(self.collections),
            "gc_s": sum(t for _, t in self.collections),
            "gc_full_ms": [round(t * 1000, 1) for t in full],
        }
        return results, {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def gil_holder(duty: float, stop: threading.Event, period_s: float = 0.001) -> None:
    """Hold the GIL (a pure-Python loop) for ``duty`` of each ``period_s``, sleep the rest: a stand-in
    for the main thread's per-file work."""
    busy = duty * period_s
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < busy:
            pass
        time.sleep(period_s - busy)


def trace_engine(protector: Protector, x: torch.Tensor, y: torch.Tensor, seeds: list[int], args: argparse.Namespace,
                 device: torch.device) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:  # fmt: skip
    """The engine alone on ``x``: its rate and its device's busy time (and host trace, with ``--host-trace``),
    and its rate while another thread holds the GIL for each ``--gil-duty``. Every call runs on a worker
    thread, as ``Protector.run`` computes (see ``bench_protect.on_worker_thread``): timed on the main thread,
    the engine ran under other conditions (OpenMP's waiting threads, malloc's arena) than the pipeline it is
    the baseline of."""

    def engine() -> None:
        on_worker_thread(partial(engine_run, protector, x, y, seeds, args.batch_size))

    def warmup() -> None:
        on_worker_thread(partial(engine_warmup, protector, x, y, seeds, args.batch_size))

    log("engine alone (on a worker thread)")
    alone = rate(timed(engine, device, args.repeats, warmup), x.shape[0])
    alone["on"] = "a worker thread, as Protector.run computes"
    alone["device"] = device_busy(engine, device)
    if args.host_trace:
        log("engine alone under the profiler with host activities")
        alone["host_trace"] = host_trace(engine, device)

    with_busy_thread: dict[str, dict[str, Any]] = {}
    for duty in args.gil_duty:
        log(f"engine alone, another thread holding the GIL {duty:.0%} of the time")
        stop = threading.Event()
        holder = threading.Thread(target=gil_holder, args=(duty, stop), daemon=True)
        holder.start()
        try:
            t = timed(engine, device, args.repeats)
        finally:
            stop.set()
            holder.join()
        r = rate(t, x.shape[0])
        r["vs_engine"] = round(r["images_per_s"] / alone["images_per_s"], 3)
        with_busy_thread[f"{duty:g}"] = r
    return alone, with_busy_thread


def _comma_separated(text: str, convert: Callable[[str], Any]) -> list[Any]:
    """The values of a comma-separated option (empty items skipped), each through ``convert``."""
    return [convert(v.strip()) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--files", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="8", help="comma-separated I/O worker counts for --io processes (first: traced)")
    p.add_argument("--io", default="processes", help="comma-separated I/O modes traced with the first worker count")
    p.add_argument("--gil-duty", default="0.1,0.25", help="comma-separated GIL shares held by a busy thread")
    p.add_argument("--models-dir", type=Path, default=SHARED / "models")
    p.add_argument("--data-dir", type=Path, default=SHARED / "data" / "cifar10")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--queued", default=str(protect_module._QUEUED_BATCHES),
                   help="comma-separated numbers of batches queued on a GPU at once (1: each waited for before the "
                        "next is queued), each with every pipeline configuration")  # fmt: skip
    p.add_argument("--host-trace", action="store_true",
                   help="also run the engine and one pipeline run under the profiler with host activities "
                        "(CUDA runtime calls, what each thread did in the device's longest idle gaps)")
    p.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the backbone, for the engine alone and the pipeline alike (reduce-overhead: "
                        "CUDA graphs, which take the host's launches of each batch off the compute thread)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each batch as a CUDA graph (eager kernels, one launch), for the engine alone and the "
                        "pipeline alike")
    p.add_argument("--min-piece", type=int, default=DEFAULT_MIN_PIECE,
                   help="the run's first and last batches go in pieces of at least this many images "
                        f"(default {DEFAULT_MIN_PIECE}; a batch's size or more: no pieces)")
    p.add_argument("--gc-freeze", choices=["auto", "on", "off"], default="auto",
                   help="on: gc.freeze() before the runs; off: keep the pipeline from freezing (where it does)")
    args = p.parse_args(argv)
    # refused here, in a line, rather than as a traceback after the model is loaded (no runs: no median)
    for option in ("files", "batch_size", "repeats", "min_piece"):  # a piece of 0 images divides by zero
        value = getattr(args, option)
        if value < 1:
            p.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    for option, convert, wanted in (("workers", int, "whole numbers of at least 1"),
                                    ("queued", int, "whole numbers of at least 1"),
                                    ("gil_duty", float, "shares from 0 to 1")):  # fmt: skip
        flag = f"--{option.replace('_', '-')}"
        try:
            values = _comma_separated(getattr(args, option), convert)
        except ValueError:
            p.error(f"{flag} takes {wanted}, comma-separated, got {getattr(args, option)!r}")
        if convert is int and (not values or min(values) < 1):
            p.error(f"{flag} takes {wanted}, comma-separated, got {getattr(args, option)!r}")
        if convert is float and not all(0 <= v <= 1 for v in values):  # also refuses nan
            p.error(f"{flag} takes {wanted}, comma-separated, got {getattr(args, option)!r}")
        setattr(args, option, values)
    args.io = _comma_separated(args.io, str)
    if not args.io or not set(args.io) <= {"threads", "processes"}:
        p.error(f"--io takes threads and processes, comma-separated, got {','.join(args.io) or 'none'}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.gc_freeze == "off" and hasattr(protect_module, "long_lived_objects_frozen"):
        protect_module.long_lived_objects_frozen = contextlib.nullcontext
    workers, queued = args.workers, args.queued
    cfg = ForeBackConfig()
    model = load_backbones(["resnet20"], args.models_dir, device)["resnet20"][0]
    protector = Protector(model, None, labels="backbone", config=cfg, compile=args.compile,
                          cuda_graphs=args.cuda_graphs)  # fmt: skip
    protect_module._MIN_PIECE = args.min_piece
    out: dict[str, Any] = {"benchmark": "trace_e2e", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "files": args.files, "batch_size": args.batch_size, "gc_freeze": args.gc_freeze,
                           "queued": ",".join(map(str, queued)), "compile": args.compile,
                           "cuda_graphs": protector.cuda_graphs,
                           "min_piece": args.min_piece,
                           "source": str(Path(protect_module.__file__).parent)}  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="trace-e2e-") as tmp:
        sources = cifar_paths(args.data_dir, min(932, args.files))
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i in range(args.files):
            shutil.copy2(sources[i % len(sources)], folder / f"{i:05d}.png")
        items = collect_inputs([folder])
        x, seeds = load_images([i.path for i in items])
        x = x.to(device)
        y = protector.predict(x).clone()
        if args.gc_freeze == "on":
            gc.freeze()

        out["engine"], out["engine_with_busy_thread"] = trace_engine(protector, x, y, seeds, args, device)

        trace = RunTrace(protector)
        out["pipeline"] = {}
        runs = [(io, workers[0]) for io in args.io] + [("processes", w) for w in workers[1:]]
        for q, (io, count) in [(q, run) for run in runs for q in queued]:
            protect_module._QUEUED_BATCHES = q
            label = f"{io}-{count}" + (f"-q{q}" if len(queued) > 1 else "")
            log(f"pipeline: --io {io}, {count} workers, {q} batches queued")
            options = RunOptions(out_dir=Path(tmp) / "out", overwrite=True, batch_size=args.batch_size, workers=count,
                                 io=io)  # fmt: skip
            trace.run(items, options)  # warm-up: starts the worker processes
            traces = [trace.run(items, options)[1] for _ in range(args.repeats)]
            median = sorted(traces, key=lambda t: t["wall_s"])[len(traces) // 2]
            entry = rate([t["wall_s"] for t in traces], args.files)
            entry["vs_engine"] = round(entry["images_per_s"] / out["engine"]["images_per_s"], 3)
            entry["trace"] = median
            if io == args.io[0] and count == workers[0] and q == queued[0]:
                entry["device"] = device_busy(lambda: trace.run(items, options), device)
                if args.host_trace:
                    log(f"pipeline {label} under the profiler with host activities")
                    entry["host_trace"] = host_trace(lambda: trace.run(items, options), device)
            out["pipeline"][label] = entry
        if protector.cuda_graphs:  # whether the graphs were used, or failed (and why)
            out["graphs"] = graph_counts(protector)
        protector.close()

    print(f"trace_e2e on {out['device']}: {args.files} PNGs of 32x32, batch {args.batch_size}, ResNet-20 fp32"
          + (f", compile {args.compile}" if args.compile != "off" else "")
          + (", CUDA graphs" if protector.cuda_graphs else "")
          + (f", pieces of >= {args.min_piece}" if args.min_piece != DEFAULT_MIN_PIECE else ""))
    e = out["engine"]
    print(f"engine alone: {e['images_per_s']:.0f} images/s ({e['median_s']:.3f} s); device {e['device']}")
    for name, g in out.get("graphs", {}).items():
        print(f"CUDA graphs of {name}: {g['captures']} captured, {g['replays']} replays"
              + (f"; failed: {g['failure']}" if g["failure"] else ""))
    for duty, r in out["engine_with_busy_thread"].items():
        print(f"engine, a thread holding the GIL {float(duty):.0%}: {r['images_per_s']:.0f} images/s = {r['vs_engine']:.2f}")
    for label, r in out["pipeline"].items():
        t = r["trace"]
        print(f"pipeline {label}: {r['images_per_s']:.0f} images/s = {r['vs_engine']:.2f} of engine (runs {r['runs_s']}); "
              f"median run: head {t['head_s']} (first decode submitted {t['first_decode_submitted_s']}, first decoded "
              f"{t['first_decoded_s']}), compute {t['compute_wall_s']}, tail {t['tail_s']}, batches {t['batches']}, "
              f"main thread CPU {t['main_thread_cpu_s']}, full collections {t['gc_full_ms']} ms; batches' wall ms "
              f"{t['batch_wall_ms']}, host's time to queue each {t['launch_ms']}")
        if "host_trace" in r:
            h = r["host_trace"]
            print(f"   host trace ({h['experimental']}): threads {h['threads']}; idle {h.get('idle_s')} s of which "
                  f"{h.get('idle_in_gaps_over_1ms_s')} in gaps over 1 ms")
            for call in h["runtime_calls"][:8]:
                print(f"     {call['thread']:>8} {call['name'][:40]:40s} {call['calls']:6d} calls {call['total_ms']:9.1f} ms "
                      f"(max {call['max_ms']:.1f})")
            for gap in h.get("largest_gaps", [])[:8]:
                print(f"     gap {gap['gap_ms']} ms at {gap['at_s']} s: {gap['threads']}")
        if "device" in r:
            d = r["device"]
            print(f"   device: busy {d.get('busy_s')} of {d.get('wall_s')} s; idle in gaps > 1 ms {d.get('idle_in_gaps_over_1ms_s')} "
                  f"({d.get('gaps_over_1ms')}), under {d.get('idle_in_gaps_under_1ms_s')}; largest {d.get('largest_gaps_ms', [])[:6]}")
    print(json.dumps(out))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

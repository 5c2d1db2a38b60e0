#!/usr/bin/env python
"""Speed of ``preempt``'s Fast Preemption engine, measured in one run on one machine.

What it measures (medians over ``--repeats`` timed runs, each after a warm-up; what a ratio compares is
timed in turns, one run of each per round: see ``timed_in_turns``):

1. **engine vs reference**: our engine (``Protector.transform``: batched images x N samples, gradients
   with respect to the input only, BatchNorm folded, convolutions fused with their ReLU, channels-last)
   against a *reference* written below
   that follows the authors' public code literally: one image at a time, its N noisy copies as one batch,
   full autograd including weight gradients (``requires_grad=True`` parameters, ``loss.backward()``,
   then ``x.grad``), fp32, NCHW, BatchNorm not folded. Both run Algorithm 1 with the paper's settings
   (F1-B2, N = 20, eta = 0.7, eps = 8/255). Reported: ms/image, images/s, the speed-up, and a check that
   both stay within the L-inf budget and in [0, 1].
2. **backbones**: ``cifar10-resnet20-pgdat-a`` (real weights from ``--models-dir``) and a PreActResNet-18
   (the paper's backbone architecture) with random weights, on the first ``--images`` CIFAR-10 test
   images (the reference on the first ``--ref-images`` of them: it is slow).
3. **photos**: the 512x512 photos ``astronaut.png`` (RGB) and ``camera.png`` (grayscale) through the
   resize path (perturbed at full resolution, resized inside the model), engine vs reference.
4. **end to end**: the file pipeline ``Protector.run`` (decode, label, protect, quantize, write PNGs) on a
   temporary folder holding the same CIFAR-10 PNGs, against the engine alone on the same images; the
   ratio of their rates says what I/O costs (target >= 0.8). Also the ``preempt protect`` command in a
   subprocess (start-up included), unless ``--skip-cli``.
5. **Bi-Level** (Moon et al. 2022, ``steps`` x PGD-``inner`` = 2000 passes per image by default) on
   ``--bilevel-images`` images: the Bi-Level / Fast Preemption time ratio (the paper reports ~700x).
6. **FLOPs**: one forward and one input-only backward of each backbone at 32x32 counted with
   ``torch.utils.flop_counter.FlopCounterMode``; the engine's achieved GFLOP/s
   ((T-> + T<-) x N x (forward + input backward) per image / time) as a fraction of the machine's fp32
   matmul peak (the fastest of 10 large matmuls).
7. **bf16** (where the device runs bf16 natively: GPUs, CPUs with AVX512-BF16 or AMX): the engine with
   ``precision="bf16"`` (autocast for the backbone passes), its speed against fp32 and the reference, and
   whether it keeps the result: the robust-accuracy gain (PGD-20 L-inf 8/255 on victims pgdat-b and
   pgdat-c, ``--accuracy-images`` test images) of bf16 protection against fp32's (bar: within 0.5 point).

8. **GPU variants** (on CUDA, or anywhere with ``--variants``): the engine over ``--batch-sweep`` in fp32 and
   bf16 with its peak GPU memory; at the fastest bf16 batch, cuDNN autotuning (on CUDA only: elsewhere it
   changes nothing); at the fastest batch of each
   of ``--compile-precisions`` (bf16 and fp32), each ``torch.compile`` mode of ``--compile-modes`` (warm-up,
   i.e. compile, time apart; the share of pixels equal to eager's at that precision).
9. **fusion** (``--unfused``): the engine against the same net with only its BatchNorm folded (as before
   0.15.0), timed in turns, and whether their protected images are equal.
10. **allocator** (CPU): glibc malloc as ``preempt`` tunes it (``device.tune_malloc``) unless ``--malloc
   default``; it holds for the whole process, reference included, so compare the two in separate runs.

Output: a table on stdout, then ONE final line of JSON with every number and the machine (CPU model,
cores, torch version, threads, GPU name). Progress goes to stderr.

Run from the repository root::

    . .venv/bin/activate
    python benchmarks/bench_protect.py                      # full run (minutes on 2 CPU cores)
    python benchmarks/bench_protect.py --images 8 --ref-images 2 --bilevel-images 1 --repeats 1 \\
        --bilevel-steps 3 --bilevel-inner 2 --accuracy-images 8   # smoke test (minutes)
    python benchmarks/bench_protect.py --device cuda        # GPU

The engine's numbers depend on the batch size (``--batch-size``; default 16 images on CPU, 256 on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import _checkout  # benchmarks/ is on sys.path

_checkout.put_checkout_src_first()  # the checkout's code, installed or not (no PYTHONPATH=src needed)
from bench_pipeline import PipelineTrace, median_split  # noqa: E402
from preempt_cli import ForeBackConfig, Protector, RunOptions, collect_inputs, load_model, read_image  # noqa: E402
from preempt_cli.device import default_cpu_threads, resolve_device, tune_malloc  # noqa: E402
from preempt_cli.engine import native_bf16  # noqa: E402
from preempt_cli.models import ImageModel, build_model  # noqa: E402
from preempt_cli.models._fusion import ConvReLU2d, fuse_conv_bn, fuse_model  # noqa: E402
from preempt_cli.models.dm_resnet import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from preempt_cli.protect import content_seed  # noqa: E402
from preempt_cli.registry import get_model_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_BACKBONE = "cifar10-resnet20-pgdat-a"
#: ``preact18``: the classic PreActResNet-18 (He et al., ReLU), which the GPU figures so far were measured
#: on; ``dm-preact18``: the registry row ``preact18``, DeepMind's variant that the paper's backbone
#: (Gowal et al. 2021) uses (SiLU, TensorFlow "SAME" padding, 3x3 shortcut convolutions).
BACKBONES = {"resnet20": REAL_BACKBONE, "preact18": "PreActResNet-18 (ReLU; random weights)",
             "dm-preact18": "preact18 (DeepMind PreActResNet-18, SiLU; random weights)"}  # fmt: skip
PHOTOS = ("astronaut.png", "camera.png")
BUDGET_TOL = 1e-6  # float slack when checking |x_adv - x| <= eps


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- timing ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: Callable[[], Any] | None = None
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after one call of ``warmup`` (default: ``fn``)."""
    (warmup or fn)()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def timed_in_turns(runs: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]], device: torch.device,
                   repeats: int) -> dict[str, list[float]]:  # fmt: skip
    """Seconds of ``repeats`` calls of each of ``runs`` (name -> (fn, warm-up; None: a call of fn)), after
    each one's warm-up, timed in turns: one call of each, then the next round. Their ratios are what is
    reported (engine against reference, pipeline and CLI against engine): timed one after the other, a
    change in the machine's load between them (another process starting or ending) fell on one side only
    (on a shared 2-core machine the engine came out at 0.63x the reference on PreActResNet-18, where in
    turns it was 1.4-1.7x)."""
    for fn, warmup in runs.values():
        (warmup or fn)()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (fn, _) in runs.items():
            times[name] += timed(fn, device, 1, warmup=lambda: None)
    return times


def rate(times: list[float], images: int) -> dict[str, Any]:
    """Median seconds over runs of ``images`` images -> ms/image, images/s (plus the raw runs and the fastest)."""
    if images < 1 or not times:  # parse_args refuses the options that lead here
        raise ValueError(f"a rate needs images and runs, got {images} image(s) and {len(times)} run(s)")
    med = statistics.median(times)
    return {
        "images": images,
        "runs_s": [round(t, 4) for t in times],
        "median_s": round(med, 4),
        "min_s": round(min(times), 4),
        "ms_per_image": round(1000 * med / images, 3),
        "images_per_s": round(images / med, 3),
    }


def budget(x0: torch.Tensor, x_adv: torch.Tensor, eps: float) -> dict[str, Any]:
    """Whether ``x_adv`` lies within ``eps`` of ``x0`` (L-inf) and in [0, 1]."""
    d = (x_adv.float() - x0.float()).abs()
    linf = float(d.max()) if d.numel() else 0.0
    in_range = bool(x_adv.min() >= 0) and bool(x_adv.max() <= 1)
    return {
        "linf": round(linf, 6),
        "linf_levels": round(linf * 255, 3),
        "mean_abs": round(float(d.mean()), 6),
        "within_budget": linf <= eps + BUDGET_TOL and in_range,
    }


# -- the reference: Algorithm 1 as the authors' public code writes it -----------------------------------
def reference_protect_one(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ForeBackConfig) -> torch.Tensor:
    """Fast Preemption on ONE image ``x`` [1, C, H, W], the straightforward way: the N noisy copies are
    one batch, ``loss.backward()`` through a model whose parameters require grad, then ``x.grad``. Each
    FGSM sample is projected around the original (``paper``), or first around the current iterate
    (``sample_projection="iterate"``: ``mspd``, the authors' later code), as the engine does."""
    if cfg.inner_steps != 1:
        raise ValueError("the reference takes FGSM samples only (inner_steps=1)")
    eps, n = cfg.eps, cfg.samples
    x_ori = x.clone().detach()
    x_t = x_ori.clone()
    labels = y.repeat(n)
    directions = [-1.0] * cfg.forward_steps + [1.0] * cfg.backward_steps  # -1 descend, +1 ascend the loss
    for direction in directions:
        x_rep = x_t.repeat(n, 1, 1, 1)
        noise = torch.empty_like(x_rep).uniform_(-eps, eps)
        x_noisy = torch.clamp(x_rep + noise, 0, 1).detach()
        x_noisy.requires_grad = True
        model.zero_grad()
        loss = F.cross_entropy(model(x_noisy), labels)
        loss.backward()
        grad = x_noisy.grad.detach()
        x_s = x_noisy.detach() + direction * eps * grad.sign()
        if cfg.sample_projection == "iterate":
            x_s = torch.min(torch.max(x_s, x_t - eps), x_t + eps)
        x_s = torch.min(torch.max(x_s, x_ori - eps), x_ori + eps).clamp(0, 1)
        delta = x_s.mean(dim=0, keepdim=True) - x_t
        x_t = x_t - direction * cfg.eta * delta  # forward: x + eta*delta_r; backward: x - eta*delta_a
        x_t = torch.min(torch.max(x_t, x_ori - eps), x_ori + eps).clamp(0, 1).detach()
    return x_t


def reference_protect(model: nn.Module, images: list[torch.Tensor], labels: list[torch.Tensor],
                      cfg: ForeBackConfig) -> list[torch.Tensor]:  # fmt: skip
    """The reference over a list of [1, C, H, W] images, one at a time."""
    return [reference_protect_one(model, x, y, cfg) for x, y in zip(images, labels)]


def as_reference_model(model: ImageModel) -> ImageModel:
    """Unfused, NCHW, parameters requiring grad (the authors' setting)."""
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(memory_format=torch.contiguous_format)


def as_engine_model(model: ImageModel, device: torch.device, fuse: Callable[[nn.Module], nn.Module] = fuse_model
                    ) -> ImageModel:  # fmt: skip
    """What ``load_model`` gives the engine: BN folded, convolutions fused with their ReLU (``fuse``), frozen,
    channels-last."""
    model.net = fuse(model.net.eval())
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device, memory_format=torch.channels_last)


# -- data and models -------------------------------------------------------------------------------------
def cifar_paths(data_dir: Path, count: int) -> list[Path]:
    """The first ``count`` CIFAR-10 test PNGs by index (``test/<class>/<index>.png``)."""
    paths = sorted((data_dir / "test").glob("*/*.png"), key=lambda p: int(p.stem))
    if len(paths) < count:
        raise SystemExit(f"need {count} CIFAR-10 test images under {data_dir / 'test'}, found {len(paths)}")
    return paths[:count]


def load_images(paths: list[Path]) -> tuple[torch.Tensor, list[int]]:
    """Equal-size images as one [B, C, H, W] tensor in [0, 1], and their content seeds."""
    pictures = [read_image(p) for p in paths]
    return torch.stack([p.to_tensor() for p in pictures]), [content_seed(p.color) for p in pictures]


def load_backbones(keys: list[str], models_dir: Path, device: torch.device) -> dict[str, tuple[ImageModel, ImageModel]]:
    """``key -> (engine model, reference model)``; the reference one is an unfused twin with the same weights."""
    out = {}
    for key in keys:
        if key == "resnet20":
            ours = load_model(REAL_BACKBONE, models_dir=models_dir, device=device)
            ref = as_reference_model(load_model(REAL_BACKBONE, models_dir=models_dir, device=device, fuse=False))
        elif key in ("preact18", "dm-preact18"):
            torch.manual_seed(0)
            row = get_model_config("preact18")
            if key == "preact18":  # the classic network, normalizing in the wrapper as the DeepMind one does inside
                row = replace(row, arch="preact_resnet18", arch_args={}, mean=CIFAR10_MEAN, std=CIFAR10_STD)
            base = build_model(row).eval()
            ref = as_reference_model(copy.deepcopy(base).to(device))
            ours = as_engine_model(base, device)
        else:
            raise SystemExit(f"unknown backbone {key!r}: choose from {', '.join(BACKBONES)}")
        out[key] = (ours, ref)
    return out


def make_protector(model: ImageModel, cfg: ForeBackConfig, precision: str = "fp32",
                   cuda_graphs: bool = False) -> Protector:  # fmt: skip
    return Protector(model, None, labels="backbone", config=cfg, precision=precision, cuda_graphs=cuda_graphs)


def graph_counts(protector: Protector) -> dict[str, dict[str, Any]]:
    """Whether ``--cuda-graphs`` was used: per graphed function (the engine's, the pipeline's per labels
    source and bit depth), its captures and replays, or why a capture failed."""
    graphed = {"engine": protector.engine._graphed, **{f"pipeline-{k}": g for k, g in protector._graphed.items()}}
    return {name: {"captures": g.captures, "replays": g.replays, "failure": g.failure}
            for name, g in graphed.items() if g is not None}  # fmt: skip


def engine_run(protector: Protector, x: torch.Tensor, y: torch.Tensor, seeds: list[int], batch: int) -> torch.Tensor:
    """Our engine over ``x`` in batches of ``batch`` images."""
    outs = []
    for i in range(0, x.shape[0], batch):
        outs.append(protector.transform(x[i : i + batch], y[i : i + batch], noise_seeds=seeds[i : i + batch]))
    return torch.cat(outs)


def on_worker_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a new thread, waited for: where ``Protector.run`` computes (see ``batches.ComputeThread``)."""
    import threading

    outcome: list[Any] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            outcome.append(fn())
        except BaseException as e:  # re-raised on the caller's thread
            failure.append(e)

    worker = threading.Thread(target=body, name="bench-engine")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def engine_warmup(protector: Protector, x: torch.Tensor, y: torch.Tensor, seeds: list[int], batch: int) -> None:
    """One call per batch shape the timed run will see (the full batch and the last, partial one); two with
    CUDA graphs, which capture a shape the second time it comes."""
    n = x.shape[0]
    sizes = {min(batch, n)} | ({n % batch} if n % batch else set())
    for size in sorted(sizes):
        for _ in range(2 if protector.cuda_graphs else 1):
            engine_run(protector, x[-size:], y[-size:], seeds[-size:], batch)


# -- 1-2. engine vs reference on CIFAR-10 ----------------------------------------------------------------
def bench_engine_vs_reference(
    key: str,
    ours: ImageModel,
    ref: ImageModel,
    x: torch.Tensor,
    seeds: list[int],
    args: argparse.Namespace,
    cfg: ForeBackConfig,
    device: torch.device,
) -> dict[str, Any]:
    protector = make_protector(ours, cfg)
    x = x.to(device)
    y = protector.predict(x).clone()  # a normal tensor (not an inference one)
    log(f"{key}: engine on {x.shape[0]} images (batch {args.batch_size})")
    result: dict[str, Any] = {"backbone": BACKBONES[key], "batch_size": args.batch_size}
    out = None

    def run_ours() -> None:
        nonlocal out
        out = engine_run(protector, x, y, seeds, args.batch_size)

    # name -> (timed call, its warm-up): timed in turns, so that their ratios compare like with like
    runs: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {
        "engine": (run_ours, partial(engine_warmup, protector, x, y, seeds, args.batch_size))}
    out16 = None
    if args.bf16 and native_bf16(device):
        log(f"{key}: engine with --precision bf16 (autocast for the backbone passes)")
        protector16 = make_protector(ours, cfg, "bf16")

        def run_bf16() -> None:
            nonlocal out16
            out16 = engine_run(protector16, x, y, seeds, args.batch_size)

        runs["engine_bf16"] = (run_bf16, partial(engine_warmup, protector16, x, y, seeds, args.batch_size))

    k = min(args.ref_images, x.shape[0])
    ref_out: list[torch.Tensor] = []
    if not args.skip_reference:
        imgs = [x[i : i + 1] for i in range(k)]
        labs = [y[i : i + 1] for i in range(k)]
        log(f"{key}: reference on {k} images, one at a time, in turns with the engine")
        torch.manual_seed(0)

        def run_ref() -> None:
            nonlocal ref_out
            ref_out = reference_protect(ref, imgs, labs, cfg)

        runs["reference"] = (run_ref, partial(reference_protect, ref, imgs[:1], labs[:1], cfg))

    times = timed_in_turns(runs, device, args.repeats)
    result["engine"] = rate(times["engine"], x.shape[0])
    result["engine"]["check"] = budget(x, out, cfg.eps)
    result["engine"]["backbone_keeps_label"] = round(float((protector.predict(out) == y).float().mean()), 4)
    if "engine_bf16" in times:
        r16 = rate(times["engine_bf16"], x.shape[0])
        r16["check"] = budget(x, out16, cfg.eps)
        r16["speedup_vs_fp32"] = round(result["engine"]["median_s"] / r16["median_s"], 3)
        result["engine_bf16"] = r16

    if args.unfused:
        result["fusion"] = bench_fusion(key, protector, ref, x, y, seeds, args, cfg, device)

    if "reference" in times:
        rr = rate(times["reference"], k)
        x_ref = torch.cat(ref_out)
        rr["check"] = budget(x[:k], x_ref, cfg.eps)
        rr["backbone_keeps_label"] = round(float((protector.predict(x_ref) == y[:k]).float().mean()), 4)
        result["reference"] = rr
        result["speedup"] = round(result["reference"]["ms_per_image"] / result["engine"]["ms_per_image"], 2)
        if "engine_bf16" in result:
            result["speedup_bf16"] = round(result["reference"]["ms_per_image"] / result["engine_bf16"]["ms_per_image"], 2)
    return result


def bench_fusion(key: str, fused: Protector, ref: ImageModel, x: torch.Tensor, y: torch.Tensor, seeds: list[int],
                 args: argparse.Namespace, cfg: ForeBackConfig, device: torch.device) -> dict[str, Any]:  # fmt: skip
    """The engine with convolutions fused with their ReLU (0.15.0) against the net with only its BatchNorm
    folded (before): timed in turns, ``--repeats`` runs each, in this process; and whether their protected
    images are equal (they should be, bit for bit)."""
    unfused = make_protector(as_engine_model(copy.deepcopy(ref), device, fuse=fuse_conv_bn), cfg)
    runs = {"fused": fused, "unfused": unfused}
    log(f"{key}: engine fused and BatchNorm-folded only, in turns")
    outs = {name: engine_run(p, x, y, seeds, args.batch_size) for name, p in runs.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, p in runs.items():
            times[name] += timed(partial(engine_run, p, x, y, seeds, args.batch_size), device, 1, warmup=lambda: None)
    result = {name: rate(t, x.shape[0]) for name, t in times.items()}
    result["fused_convolutions"] = sum(isinstance(m, ConvReLU2d) for m in fused.engine.backbone.modules())
    result["speedup"] = round(result["unfused"]["median_s"] / result["fused"]["median_s"], 3)
    result["outputs_equal"] = bool(torch.equal(outs["fused"], outs["unfused"]))
    return result


# -- 1b. does bf16 keep the result? --------------------------------------------------------------------------
def bench_precision_accuracy(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Robust-accuracy gain of protection made in fp32 vs bf16 (backbone cifar10-resnet20-pgdat-a, classifier
    cifar10-resnet18-std, victims pgdat-b and pgdat-c, PGD-20 L-inf 8/255 on the first N test images): the
    issue's bar is a gain within 0.5 point of fp32's."""
    import tempfile

    from preempt_cli.evaluate import AttackSpec, DefenseSpec, Evaluator, load_dataset
    cache: dict[str, ImageModel] = {}

    def load(name: str) -> ImageModel:
        if name not in cache:
            cache[name] = load_model(name, device=device, models_dir=args.models_dir)
        return cache[name]

    data = load_dataset(args.data_dir / "test", classes=load("cifar10-resnet20-pgdat-a").config.classes,
                        limit=args.accuracy_images)  # fmt: skip
    victims = ["cifar10-resnet20-pgdat-b", "cifar10-resnet20-pgdat-c"]
    variants = {"fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"}}
    for mode in [m.strip() for m in args.accuracy_compile.split(",") if m.strip()]:
        variants[f"bf16+compile-{mode}"] = {"precision": "bf16", "compile": mode}
    specs = [DefenseSpec("none")] + [
        DefenseSpec("fast-preemption", tuple(sorted({"backbone": "cifar10-resnet20-pgdat-a", "classifier":
                    "cifar10-resnet18-std", **v, "name": name}.items()))) for name, v in variants.items()]  # fmt: skip
    log(f"precision: fp32 vs bf16 protection of {len(data)} test images, PGD-20 on {', '.join(victims)}")
    with tempfile.TemporaryDirectory() as tmp:
        ev = Evaluator(data, load=load, device=device, out_dir=Path(tmp))
        rows = list(ev.grid(victims, specs, [AttackSpec.parse("pgd")]))
    out: dict[str, Any] = {"images": len(data), "victims": {}}
    for v in victims:
        acc = {r["defense"]: r for r in rows if r["victim"] == v}
        gains = {p: round(acc[p]["robust_acc"] - acc["none"]["robust_acc"], 2) for p in variants}
        out["victims"][v] = {"robust_none": acc["none"]["robust_acc"], "robust_fp32": acc["fp32"]["robust_acc"],
                             "robust_bf16": acc["bf16"]["robust_acc"], "gain_fp32": gains["fp32"],
                             "gain_bf16": gains["bf16"], "gain_difference": round(gains["bf16"] - gains["fp32"], 2),
                             "within_0_5": abs(gains["bf16"] - gains["fp32"]) <= 0.5,
                             "seconds_per_image_fp32": acc["fp32"]["seconds_per_image"],
                             "seconds_per_image_bf16": acc["bf16"]["seconds_per_image"]}  # fmt: skip
        for name in variants:
            if name not in ("fp32", "bf16"):
                out["victims"][v][name] = {"robust": acc[name]["robust_acc"], "gain": gains[name],
                                           "gain_difference": round(gains[name] - gains["fp32"], 2),
                                           "within_0_5": abs(gains[name] - gains["fp32"]) <= 0.5,
                                           "seconds_per_image": acc[name]["seconds_per_image"]}  # fmt: skip
    return out


# -- 1c. GPU: batch size, precision, cuDNN autotuning, torch.compile -----------------------------------------
def _engine_rate(protector: Protector, x: torch.Tensor, y: torch.Tensor, seeds: list[int], batch: int,
                 args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:  # fmt: skip
    """Rate of the engine over ``x`` in batches of ``batch``, its peak GPU memory, and its output; the
    warm-up (and so compiling and cuDNN autotuning) timed apart."""
    out: list[torch.Tensor] = []

    def run() -> None:
        out[:] = [engine_run(protector, x, y, seeds, batch)]

    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    engine_warmup(protector, x, y, seeds, batch)
    sync(device)
    warm_s = time.perf_counter() - start
    r = rate(timed(run, device, args.repeats, warmup=lambda: None), x.shape[0])
    r["warmup_s"] = round(warm_s, 2)
    r["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if on_gpu else None
    r["check"] = budget(x, out[0], protector.config.eps)
    return r, out[0]


def variant_name(device_type: str) -> str:
    """How the batch/precision/compile part names its rows: the "GPU variants" run on a CPU too (``--variants``),
    and a CPU's rows must not read as a GPU's."""
    return "GPU engine" if device_type == "cuda" else f"{device_type.upper()} engine"


def bench_gpu_variants(key: str, ours: ImageModel, x: torch.Tensor, seeds: list[int], args: argparse.Namespace,
                       cfg: ForeBackConfig, device: torch.device, peak: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The engine on a GPU over batch sizes and precisions; then, at the fastest bf16 batch, cuDNN autotuning
    (``cudnn.benchmark``); and, at each precision's fastest batch (``--compile-precisions``), each
    ``torch.compile`` mode of ``--compile-modes`` (the compile time reported apart, with the fraction of
    output pixels equal to eager's at that precision)."""
    x = x.to(device)
    y = make_protector(ours, cfg).predict(x).clone()
    result: dict[str, Any] = {"backbone": BACKBONES[key], "images": x.shape[0], "sweep": []}
    what = variant_name(device.type)
    flops = count_flops(ours)
    # fp32 convolutions run as TF32 on the GPU's matrix units unless cudnn.allow_tf32 is off
    peak_of = {"fp32": "tf32" if "tf32" in peak else "fp32", "bf16": "bf16" if "bf16" in peak else "fp32"}

    def add_flops(r: dict[str, Any], precision: str) -> None:
        kind = peak_of[precision]
        a = achieved(flops, cfg, r["images_per_s"], peak[kind]["gflops"], kind)
        r["gflops"], r["fraction_of_peak"], r["peak"] = a["gflops"], a["fraction_of_peak"], kind

    eager_out: dict[tuple[str, int], torch.Tensor] = {}
    for precision in ("fp32", "bf16"):
        for batch in args.batch_sweep:
            log(f"{key}: {what} {precision}, batch {batch}")
            row: dict[str, Any] = {"precision": precision, "batch_size": batch}
            try:
                r, out = _engine_rate(make_protector(ours, cfg, precision), x, y, seeds, batch, args, device)
                add_flops(r, precision)
                row.update(r)
                eager_out[(precision, batch)] = out
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of GPU memory"
                torch.cuda.empty_cache()
            result["sweep"].append(row)
    ok = [r for r in result["sweep"] if "error" not in r]
    for precision in ("fp32", "bf16"):
        rows = [r for r in ok if r["precision"] == precision]
        if rows:
            result[f"best_{precision}"] = max(rows, key=lambda r: r["images_per_s"])
    best = result.get("best_bf16") or result.get("best_fp32")
    if not best:
        return result
    batch, precision = best["batch_size"], best["precision"]

    def agree(out: torch.Tensor, eager: torch.Tensor) -> float:
        """The fraction of output pixels equal to ``eager``'s."""
        return round(float(((out - eager).abs() <= 1e-5).float().mean()), 5)

    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        # cuDNN's autotuning changes nothing off CUDA: timing it there would only report the machine's noise
        if device.type == "cuda":
            log(f"{key}: {what} {precision}, batch {batch}, cudnn.benchmark")
            r, out = _engine_rate(make_protector(ours, cfg, precision), x, y, seeds, batch, args, device)
            r.update(precision=precision, batch_size=batch,
                     pixels_equal_to_eager=agree(out, eager_out[(precision, batch)]),
                     speedup_vs_eager=round(best["median_s"] / r["median_s"], 3))  # fmt: skip
            add_flops(r, precision)
            result["cudnn_benchmark"] = r
    finally:
        torch.backends.cudnn.benchmark = saved
    # torch.compile at the best batch of each precision of --compile-precisions: bf16's under "compile"
    # (as before 0.10.0), fp32's under "compile_fp32" (fused elementwise kernels, TF32 convolutions as eager's)
    for compile_precision in args.compile_precisions if key in args.compile_backbones else ():
        best_p = result.get(f"best_{compile_precision}")
        if not best_p:
            continue
        batch_p, eager_p = best_p["batch_size"], eager_out[(compile_precision, best_p["batch_size"])]
        compiled: dict[str, Any] = {}
        result["compile" if compile_precision == "bf16" else f"compile_{compile_precision}"] = compiled
        for mode in args.compile_modes:
            log(f"{key}: {what} {compile_precision}, batch {batch_p}, torch.compile mode {mode}")
            try:
                protector = Protector(ours, None, labels="backbone", config=cfg, precision=compile_precision,
                                      compile=mode)  # fmt: skip
                r, out = _engine_rate(protector, x, y, seeds, batch_p, args, device)
                r.update(precision=compile_precision, batch_size=batch_p, pixels_equal_to_eager=agree(out, eager_p),
                         speedup_vs_eager=round(best_p["median_s"] / r["median_s"], 3))  # fmt: skip
                add_flops(r, compile_precision)
            except Exception as e:  # a compiler failure is a result to report, not a crash of the benchmark
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            compiled[mode] = r
            torch._dynamo.reset()
    return result


# -- 3. 512x512 photos through the resize path -----------------------------------------------------------
def bench_photos(ours: ImageModel, ref: ImageModel, args: argparse.Namespace, cfg: ForeBackConfig,
                 device: torch.device) -> dict[str, Any]:  # fmt: skip
    paths = [args.photos_dir / name for name in PHOTOS]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        return {"skipped": f"missing {', '.join(missing)}"}
    pictures = [read_image(p) for p in paths]
    xs = [p.to_tensor().unsqueeze(0).to(device) for p in pictures]  # RGB and gray: one batch each
    seeds = [[content_seed(p.color)] for p in pictures]
    protector = make_protector(ours, cfg)
    ys = [protector.predict(x).clone() for x in xs]
    log(f"photos: engine on {len(xs)} images ({', '.join(f'{tuple(x.shape[1:])}' for x in xs)})")
    outs: list[torch.Tensor] = []

    def run_ours() -> None:
        outs[:] = [protector.transform(x, y, noise_seeds=s) for x, y, s in zip(xs, ys, seeds)]

    result: dict[str, Any] = {"backbone": REAL_BACKBONE, "photos": list(PHOTOS),
                              "sizes": [list(x.shape[1:]) for x in xs]}  # fmt: skip
    runs: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {"engine": (run_ours, None)}
    ref_out: list[torch.Tensor] = []
    if not args.skip_reference:
        log(f"photos: reference on {len(xs)} images, in turns with the engine")
        torch.manual_seed(0)

        def run_ref() -> None:
            ref_out[:] = reference_protect(ref, xs, ys, cfg)

        runs["reference"] = (run_ref, lambda: reference_protect(ref, xs[:1], ys[:1], cfg))
    times = timed_in_turns(runs, device, args.repeats)
    result["engine"] = rate(times["engine"], len(xs))
    result["engine"]["check"] = [budget(x, o, cfg.eps) for x, o in zip(xs, outs)]
    if "reference" in times:
        result["reference"] = rate(times["reference"], len(xs))
        result["reference"]["check"] = [budget(x, o, cfg.eps) for x, o in zip(xs, ref_out)]
        result["speedup"] = round(result["reference"]["ms_per_image"] / result["engine"]["ms_per_image"], 2)
    return result


# -- 4. end to end: files in, PNGs out --------------------------------------------------------------------
def bench_end_to_end(ours: ImageModel, paths: list[Path], args: argparse.Namespace, cfg: ForeBackConfig,
                     device: torch.device) -> dict[str, Any]:  # fmt: skip
    protector = make_protector(ours, cfg, cuda_graphs=args.cuda_graphs)
    with tempfile.TemporaryDirectory(prefix="bench-protect-") as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        count = args.e2e_images or len(paths)
        for i in range(count):  # more files than test images: copies under other names
            p = paths[i % len(paths)]
            shutil.copy2(p, src / (f"{p.parent.name}_{p.name}" if i < len(paths) else f"copy{i}_{p.parent.name}_{p.name}"))
        items = collect_inputs([src])
        options = RunOptions(out_dir=Path(tmp) / "out", overwrite=True, batch_size=args.batch_size)

        # the engine alone on the same images (decoded once, outside the timing)
        x, seeds = load_images([i.path for i in items])
        x = x.to(device)
        y = protector.predict(x).clone()  # a normal tensor (not an inference one)
        # on a thread of its own, as Protector.run (and so the CLI) computes: timed on the main thread, the
        # engine ran under other conditions (OpenMP's waiting threads, malloc's arena) than the pipeline it
        # is the baseline of, and the ratio measured more than the cost of the files
        engine_alone = partial(engine_run, protector, x, y, seeds, args.batch_size)
        engine_alone_warmup = partial(engine_warmup, protector, x, y, seeds, args.batch_size)
        runs: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {
            "engine": (partial(on_worker_thread, engine_alone), partial(on_worker_thread, engine_alone_warmup))}

        statuses: dict[str, list[str]] = {}
        trace = PipelineTrace(protector)  # where each run's time goes (see bench_pipeline.py)
        splits: dict[str, list[dict[str, float]]] = {"threads": [], "no_fsync": [], "processes": [], "switch": []}

        def run_pipeline(variant: str, run_options: RunOptions) -> None:
            outcomes, split = trace.run(items, run_options)
            statuses[variant] = [r.status for r in outcomes]
            splits[variant].append(split)

        def run_pipeline_switch() -> None:  # an experiment: a thread waiting for the GIL asks for it sooner
            default_interval = sys.getswitchinterval()
            sys.setswitchinterval(args.e2e_switch_interval)
            try:
                run_pipeline("switch", replace(options, io="processes"))
            finally:
                sys.setswitchinterval(default_interval)

        # each variant's first call (its warm-up) is the first of its splits
        runs["threads"] = (partial(run_pipeline, "threads", options), None)
        runs["no_fsync"] = (partial(run_pipeline, "no_fsync", replace(options, fsync=False)), None)
        runs["processes"] = (partial(run_pipeline, "processes", replace(options, io="processes")), None)
        variants = "I/O threads, fsync off, --io processes"
        if args.e2e_switch_interval:
            runs["switch"] = (run_pipeline_switch, None)
            variants += f", --io processes with a switch interval of {args.e2e_switch_interval * 1000:g} ms"
        if not args.skip_cli:
            one = Path(tmp) / "one"
            one.mkdir()
            shutil.copy2(items[0].path, one / items[0].path.name)

            def run_cli(folder: Path) -> None:
                cmd = [sys.executable, "-m", "preempt_cli", "protect", str(folder), "--backbone", REAL_BACKBONE,
                       "--labels", "backbone", "--models-dir", str(args.models_dir), "--out-dir",
                       str(Path(tmp) / "cli"), "--overwrite", "--quiet", "--device", str(device), "--batch-size",
                       str(args.batch_size)] + (["--cuda-graphs"] if args.cuda_graphs else [])  # fmt: skip
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=cli_environment(device, args))

            # no warm-up: every call pays the start-up, as a user does
            runs["cli"] = (partial(run_cli, src), lambda: None)
            runs["cli_one"] = (partial(run_cli, one), lambda: None)
            variants += f"; `preempt protect` in a subprocess ({len(items)} images, and 1 for the start-up)"
        log(f"end to end: the engine alone on {len(items)} images (on a worker thread) and Protector.run on a "
            f"folder of them ({variants}), in turns")
        times = timed_in_turns(runs, device, args.repeats)
        t_engine, t_pipe, t_no_sync, t_processes = (times[k] for k in ("engine", "threads", "no_fsync", "processes"))
        t_switch = times.get("switch")
        written = sorted((Path(tmp) / "out").rglob("*.png"))
        protector.close()
        io_costs = file_costs([i.path for i in items[:200]], Path(tmp) / "io")
        result: dict[str, Any] = {
            "backbone": REAL_BACKBONE,
            "cuda_graphs": protector.cuda_graphs,
            "graphs": graph_counts(protector),
            "engine_only": rate(t_engine, len(items)),
            "engine_only_on": "a worker thread, as Protector.run computes",
            "pipeline": rate(t_pipe, len(items)),
            "pipeline_done": statuses["threads"].count("done"),  # the run reported beside it
            "pngs_written": len(written),
        }
        engine_rate = result["engine_only"]["images_per_s"]
        result["pipeline_vs_engine"] = round(result["pipeline"]["images_per_s"] / engine_rate, 3)
        result["target_met"] = result["pipeline_vs_engine"] >= 0.8
        result["pipeline_no_fsync"] = rate(t_no_sync, len(items))
        result["pipeline_processes"] = rate(t_processes, len(items))
        result["pipeline_processes_vs_engine"] = round(result["pipeline_processes"]["images_per_s"] / engine_rate, 3)
        if t_switch is not None:
            result["pipeline_processes_switch"] = rate(t_switch, len(items))
            result["pipeline_processes_switch"]["switch_interval_s"] = args.e2e_switch_interval
            result["pipeline_processes_switch_vs_engine"] = round(result["pipeline_processes_switch"]["images_per_s"] / engine_rate, 3)
        result["target_met_processes"] = result["pipeline_processes_vs_engine"] >= 0.8
        result["pipeline_no_fsync_vs_engine"] = round(result["pipeline_no_fsync"]["images_per_s"] / engine_rate, 3)
        result["workers"] = options.workers
        result["io_ms_per_file"] = io_costs
        # the timed runs (not the warm-up): head, compute, between batches, tail of the median one
        result["split_s"] = {k: median_split(v[1:]) for k, v in splits.items() if len(v) > 1}

        if "cli" in times:
            t_cli, t_one = times["cli"], times["cli_one"]
            result["cli"] = rate(t_cli, len(items))
            result["cli_vs_engine"] = round(result["cli"]["images_per_s"] / engine_rate, 3)
            # the command's start-up (interpreter, torch, device, model, workers) is paid once per call;
            # what it does per image after that is the difference of a long and a one-image call
            startup = statistics.median(t_one)
            result["cli_one_image_s"] = round(startup, 3)
            extra = statistics.median(t_cli) - startup
            if extra > 0 and len(items) > 1:
                result["cli_after_startup_images_per_s"] = round((len(items) - 1) / extra, 1)
                result["cli_after_startup_vs_engine"] = round(result["cli_after_startup_images_per_s"] / engine_rate, 3)
    return result


def cli_environment(device: torch.device, args: argparse.Namespace) -> dict[str, str]:
    """The environment of the ``preempt protect`` subprocess, whose rate is compared with the engine's in this
    process: on a CPU, this process's thread count (``OMP_NUM_THREADS``, which the command keeps) and
    allocator (``PREEMPT_TUNE_MALLOC=0`` where this one left malloc as the system's). Without them the command
    took every usable CPU (or the environment's ``OMP_NUM_THREADS``) and tuned malloc, whatever ``--threads``
    and ``--malloc default`` gave the engine."""
    env = dict(os.environ)
    if device.type == "cpu":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch.get_num_threads())
        if not getattr(args, "malloc_tuned", True):
            env["PREEMPT_TUNE_MALLOC"] = "0"
    return env


def file_costs(paths: list[Path], folder: Path) -> dict[str, float]:
    """Milliseconds per file, on one thread: decode, and write a PNG atomically with and without fsync."""
    from preempt_cli.imageio import write_png

    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pictures = [read_image(p) for p in paths]
    costs = {"read": (time.perf_counter() - start) / len(paths)}
    for fsync in (True, False):
        start = time.perf_counter()
        for i, pic in enumerate(pictures):
            write_png(folder / f"{i}.png", pic, fsync=fsync)
        costs[f"write_{'fsync' if fsync else 'no_fsync'}"] = (time.perf_counter() - start) / len(paths)
    return {k: round(1000 * v, 4) for k, v in costs.items()}


# -- 5. Bi-Level baseline --------------------------------------------------------------------------------
def bench_bilevel(key: str, ours: ImageModel, x: torch.Tensor, seeds: list[int], args: argparse.Namespace,
                  cfg: ForeBackConfig, device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Bi-Level on the first ``--bilevel-images`` images as one batch, and its time per image over Fast
    Preemption's: the engine on the same images in one batch, timed in turns with it (see
    ``timed_in_turns``; its time from the engine-vs-reference part came from other images, batches and
    minutes)."""
    from preempt_cli.baselines import BiLevel

    x = x[: args.bilevel_images].to(device)
    seeds = seeds[: x.shape[0]]
    protector = make_protector(ours, cfg)
    y = protector.predict(x).clone()
    bl = BiLevel(ours, eps=cfg.eps, eta=0.1, steps=args.bilevel_steps, inner_steps=args.bilevel_inner)
    warm = BiLevel(ours, eps=cfg.eps, eta=0.1, steps=1, inner_steps=args.bilevel_inner)
    log(f"{key}: Bi-Level {args.bilevel_steps} x PGD-{args.bilevel_inner} on {x.shape[0]} image(s) (one batch), "
        "in turns with the engine on them")
    out = None

    def run() -> None:
        nonlocal out
        out = bl.perturb(x, y)

    engine = partial(engine_run, protector, x, y, seeds, x.shape[0])
    times = timed_in_turns({"bilevel": (run, lambda: warm.perturb(x, y)), "engine": (engine, None)}, device,
                           args.repeats)  # fmt: skip
    result: dict[str, Any] = {
        "backbone": BACKBONES[key],
        "steps": args.bilevel_steps,
        "inner_steps": args.bilevel_inner,
        "passes_per_image": bl.passes_per_image,
        "batch": x.shape[0],  # images per batch, of Bi-Level and of the engine it is compared with
    }
    result.update(rate(times["bilevel"], x.shape[0]))
    result["check"] = budget(x, out, cfg.eps)
    result["engine"] = rate(times["engine"], x.shape[0])
    full_passes = 100 * 20
    result["ms_per_image_at_100x20"] = round(result["ms_per_image"] * full_passes / bl.passes_per_image, 3)
    result["bilevel_over_fp"] = round(result["ms_per_image_at_100x20"] / result["engine"]["ms_per_image"], 1)
    if bl.passes_per_image != full_passes:
        result["note"] = "bilevel_over_fp extrapolated linearly to 100 x PGD-20 from the steps run"
    return result


# -- 6. FLOPs and the machine's peak ---------------------------------------------------------------------
def count_flops(model: ImageModel, hw: tuple[int, int] = (32, 32)) -> dict[str, int]:
    """FLOPs of one forward and of one backward (w.r.t. the input only, and with weight gradients) of one image.

    Counted with oneDNN off: a fused convolution-ReLU (``models._fusion``) runs oneDNN's own operator, which
    ``FlopCounterMode`` does not count (PreActResNet-18's forward came out 27% low); off, the same
    convolutions run as ``aten.convolution``, which it counts."""
    enabled = torch.backends.mkldnn.enabled  # set directly: mkldnn.flags() warns about Intel GPUs' TF32
    torch.backends.mkldnn.enabled = False
    try:
        return _count_flops(model, hw)
    finally:
        torch.backends.mkldnn.enabled = enabled


def _count_flops(model: ImageModel, hw: tuple[int, int]) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, 3, *hw, requires_grad=True)
    y = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as fc:
        loss = F.cross_entropy(m(x), y)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        torch.autograd.grad(loss, x)
    bwd_input = fc.get_total_flops()
    for p in m.parameters():
        p.requires_grad_(True)
    loss = F.cross_entropy(m(x), y)
    with FlopCounterMode(display=False) as fc:
        loss.backward()
    return {"forward": fwd, "backward_input": bwd_input, "backward_full": fc.get_total_flops()}


def matmul_peak(device: torch.device, size: int, runs: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """GFLOP/s of a ``size`` x ``size`` matmul over ``runs`` runs after a warm-up: ``gflops`` from the
    fastest run (the peak; least disturbed by other processes), ``gflops_median`` from the median."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = timed(lambda: a @ b, device, runs)
    med, best = statistics.median(times), min(times)
    return {
        "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "median_s": round(med, 5),
        "min_s": round(best, 5),
        "gflops_median": round(2 * size**3 / med / 1e9, 1),
        "gflops": round(2 * size**3 / best / 1e9, 1),  # the peak: the fastest run
    }


def bench_peak(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    runs = max(10, args.repeats)
    log(f"peak: {size}x{size} matmuls on {device}")
    peak: dict[str, Any] = {}
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            peak["fp32"] = matmul_peak(device, size, runs)
            torch.backends.cuda.matmul.allow_tf32 = True
            peak["tf32"] = matmul_peak(device, size, runs)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        peak["bf16"] = matmul_peak(device, size, runs, torch.bfloat16)
        peak["note"] = f"cuDNN convolutions may use TF32 (cudnn.allow_tf32={torch.backends.cudnn.allow_tf32})"
    else:
        peak["fp32"] = matmul_peak(device, size, runs)
        if native_bf16(device):  # AMX / AVX512-BF16: bf16 runs have their own, higher peak
            peak["bf16"] = matmul_peak(device, size, runs, torch.bfloat16)
    return peak


def achieved(flops: dict[str, int], cfg: ForeBackConfig, images_per_s: float, peak_gflops: float, peak_kind: str,
             full_backward: bool = False) -> dict[str, Any]:  # fmt: skip
    """GFLOP/s of the engine (input-only backward) or the reference (backward with weight gradients), and
    their fraction of the ``peak_kind`` (fp32, tf32, bf16) matmul peak ``peak_gflops``."""
    per_pass = flops["forward"] + flops["backward_full" if full_backward else "backward_input"]
    per_image = (cfg.forward_steps + cfg.backward_steps) * cfg.samples * per_pass
    gflops = per_image * images_per_s / 1e9
    return {"gflop_per_image": round(per_image / 1e9, 3), "gflops": round(gflops, 2), "peak": peak_kind,
            "fraction_of_peak": round(gflops / peak_gflops, 4) if peak_gflops else None}  # fmt: skip


# -- machine and output ----------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": default_cpu_threads(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def split_note(split: dict[str, float] | None) -> str:
    """'; wall = head + compute + between + tail' of a traced pipeline run, in seconds."""
    if not split or "compute_s" not in split:
        return ""
    return (f"; {split['wall_s']:.2f} s = {split['head_s']:.2f} before the first batch + {split['compute_s']:.2f} "
            f"computing + {split['between_s']:.2f} between batches + {split['tail_s']:.2f} after the last")  # fmt: skip


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """[measurement, backbone, images, ms/image, images/s, notes]."""
    rows: list[list[str]] = []

    def row(name: str, backbone: str, r: dict[str, Any], note: str = "") -> None:
        rows.append([name, backbone, str(r["images"]), f"{r['ms_per_image']:.2f}", f"{r['images_per_s']:.2f}", note])

    def check(r: dict[str, Any]) -> str:
        c = r["check"]
        checks = c if isinstance(c, list) else [c]
        ok = all(cc["within_budget"] for cc in checks)
        return f"{'ok' if ok else 'OUT OF BUDGET'} linf={max(cc['linf_levels'] for cc in checks):.2f}/255"

    for key, r in results.get("engine_vs_reference", {}).items():
        fl = results.get("flops", {}).get(key, {})
        gf = ""
        if fl.get("engine"):
            gf = (f"; {fl['engine']['gflops']:.1f} GFLOP/s ({100 * fl['engine']['fraction_of_peak']:.1f}% of the "
                  f"{fl['engine']['peak']} peak)")  # fmt: skip
        row("engine", key, r["engine"], check(r["engine"]) + gf)
        if "engine_bf16" in r:
            vs_ref = f"; {r['speedup_bf16']}x the reference" if "speedup_bf16" in r else ""
            row("engine --precision bf16", key, r["engine_bf16"],
                check(r["engine_bf16"]) + f"; {r['engine_bf16']['speedup_vs_fp32']}x vs fp32" + vs_ref)  # fmt: skip
        if "fusion" in r:
            f = r["fusion"]
            row("engine, fused (in turns)", key, f["fused"], f"{f['fused_convolutions']} convolutions fused with their ReLU")
            row("engine, BN folded only (in turns)", key, f["unfused"],
                f"fused {f['speedup']}x faster; outputs {'equal' if f['outputs_equal'] else 'DIFFER'}")  # fmt: skip
        if "reference" in r:
            note = check(r["reference"]) + f"; engine {r['speedup']}x faster"
            row("reference (authors' style)", key, r["reference"], note)
    what = variant_name(torch.device(results.get("machine", {}).get("device") or "cuda").type)  # cuda:0 too
    for key, g in results.get("gpu", {}).items():
        for r in g.get("sweep", []):
            if "error" in r:
                rows.append([f"{what} {r['precision']} batch {r['batch_size']}", key, "", "", "", r["error"]])
            else:
                memory = f"; {r['peak_memory_gib']} GiB peak" if r.get("peak_memory_gib") is not None else ""
                row(f"{what} {r['precision']} batch {r['batch_size']}", key, r,
                    check(r) + f"{memory}; {r['gflops'] / 1000:.2f} TFLOP/s = "
                    f"{100 * r['fraction_of_peak']:.1f}% of the {r['peak']} matmul peak")  # fmt: skip
        extra = [("cudnn.benchmark", g["cudnn_benchmark"])] if "cudnn_benchmark" in g else []
        extra += [(f"torch.compile {m}", r) for m, r in g.get("compile", {}).items()]
        extra += [(f"torch.compile {m}", r) for m, r in g.get("compile_fp32", {}).items()]
        for name, r in extra:
            if "error" in r:
                rows.append([f"{what} + {name}", key, "", "", "", r["error"]])
                continue
            row(f"{what} {r['precision']} b{r['batch_size']} + {name}", key, r,
                check(r) + f"; {r['speedup_vs_eager']}x eager; warm-up {r['warmup_s']} s; "
                f"{100 * r['pixels_equal_to_eager']:.2f}% pixels = eager")  # fmt: skip
    for victim, a in results.get("precision_accuracy", {}).get("victims", {}).items():
        rows.append(["accuracy: PGD-20 gain fp32 vs bf16", victim.replace("cifar10-", ""),
                     str(results["precision_accuracy"]["images"]), "", "",
                     f"robust {a['robust_none']:.2f} -> fp32 {a['robust_fp32']:.2f} / bf16 {a['robust_bf16']:.2f}; "
                     f"gain difference {a['gain_difference']:+.2f} (within 0.5: {'yes' if a['within_0_5'] else 'NO'})"])  # fmt: skip
        for name, c in a.items():
            if isinstance(c, dict):
                rows.append([f"accuracy: PGD-20 gain fp32 vs {name}", victim.replace("cifar10-", ""),
                             str(results["precision_accuracy"]["images"]), "", "",
                             f"robust {c['robust']:.2f}; gain difference {c['gain_difference']:+.2f} "
                             f"(within 0.5: {'yes' if c['within_0_5'] else 'NO'})"])  # fmt: skip
    ph = results.get("photos", {})
    if "engine" in ph:
        row("photos 512x512: engine", "resnet20", ph["engine"], check(ph["engine"]))
        if "reference" in ph:
            note = check(ph["reference"]) + f"; engine {ph['speedup']}x faster"
            row("photos 512x512: reference", "resnet20", ph["reference"], note)
    e2e = results.get("end_to_end", {})
    if "pipeline" in e2e:
        row("e2e: engine alone", "resnet20", e2e["engine_only"])
        met = "met" if e2e["target_met"] else "NOT met"
        note = f"{e2e['pipeline_vs_engine']:.2f} of engine rate (target >= 0.8: {met})"
        io = e2e.get("io_ms_per_file", {})
        note += f"; {e2e.get('workers', '?')} I/O threads; per file on one thread: read {io.get('read', '?')} ms, "
        note += f"write {io.get('write_fsync', '?')} ms ({io.get('write_no_fsync', '?')} without fsync)"
        splits = e2e.get("split_s", {})
        row("e2e: Protector.run (files, I/O threads)", "resnet20", e2e["pipeline"], note + split_note(splits.get("threads")))
        if "pipeline_processes" in e2e:
            met = "met" if e2e["target_met_processes"] else "NOT met"
            row("e2e: Protector.run --io processes", "resnet20", e2e["pipeline_processes"],
                f"{e2e['pipeline_processes_vs_engine']:.2f} of engine rate (target >= 0.8: {met})"
                + split_note(splits.get("processes")))  # fmt: skip
        if "pipeline_processes_switch" in e2e:
            sw = e2e["pipeline_processes_switch"]
            row("e2e: --io processes, shorter GIL switch", "resnet20", sw,
                f"{e2e['pipeline_processes_switch_vs_engine']:.2f} of engine rate; sys.setswitchinterval"
                f"({sw['switch_interval_s']:g})" + split_note(splits.get("switch")))  # fmt: skip
        if "pipeline_no_fsync" in e2e:
            row("e2e: Protector.run --no-fsync", "resnet20", e2e["pipeline_no_fsync"],
                f"{e2e['pipeline_no_fsync_vs_engine']:.2f} of engine rate" + split_note(splits.get("no_fsync")))  # fmt: skip
        if "cli" in e2e:
            note = f"{e2e['cli_vs_engine']:.2f} of engine rate, start-up included ({e2e['cli_one_image_s']:.2f} s for one image)"
            if "cli_after_startup_images_per_s" in e2e:
                note += (f"; after the start-up {e2e['cli_after_startup_images_per_s']:.0f} images/s = "
                         f"{e2e['cli_after_startup_vs_engine']:.2f} of engine rate")  # fmt: skip
            row("e2e: preempt protect (CLI)", "resnet20", e2e["cli"], note)
    for key, r in results.get("bilevel", {}).items():
        note = f"{r['steps']}xPGD-{r['inner_steps']}; " + check(r)
        if "bilevel_over_fp" in r:
            at_full = r["ms_per_image_at_100x20"] / 1000
            note += f"; {at_full:.2f} s/img at 100xPGD-20 = {r['bilevel_over_fp']}x Fast Preemption"
            if "engine" in r:  # timed in turns with it, on the same images (before: from the engine's row)
                note += f" ({r['engine']['ms_per_image']:.2f} ms/img on them)"
        row("Bi-Level", key, r, note)
    return rows


def checkpoint(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the results so far to ``--json-out`` (a long GPU run keeps what it measured if cut short)."""
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, sort_keys=False) + "\n")


def print_table(results: dict[str, Any]) -> None:
    headers = ["measurement", "backbone", "images", "ms/image", "images/s", "notes"]
    rows = table_rows(results)
    m = results["machine"]
    title = (
        f"preempt protect benchmark: {m['cpu_model']} ({m['torch_threads']} threads), "
        f"{m['device_name'] or 'CPU'}, torch {m['torch']}"
        + ("" if "malloc_tuned" not in m else f", malloc {'tuned' if m['malloc_tuned'] else 'default'}")
    )
    peak = results.get("peak", {})
    caption = "; ".join(f"{k} matmul peak {v['gflops']} GFLOP/s" for k, v in peak.items() if isinstance(v, dict))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        print(caption)
        return
    table = Table(title=title, caption=caption)
    for h in headers:
        table.add_column(h, justify="right" if h in ("images", "ms/image", "images/s") else "left")
    for r in rows:
        table.add_row(*r)
    Console(file=sys.stdout, width=max(160, shutil.get_terminal_size().columns)).print(table)


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the CPUs this process may use)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; medians reported (default 3)")
    p.add_argument("--images", type=int, default=None,
                   help="CIFAR-10 images for the engine and end to end (default 64; 512 on CUDA)")  # fmt: skip
    p.add_argument("--ref-images", type=int, default=8, help="images for the (slow) reference (default 8)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="engine batch in images (default 16 on CPU, 256 on CUDA)")  # fmt: skip
    p.add_argument("--backbones", default="resnet20,preact18",
                   help="comma-separated: resnet20, preact18, dm-preact18 (default: resnet20,preact18)")  # fmt: skip
    p.add_argument("--bilevel-images", type=int, default=None,
                   help="images for Bi-Level, run as one batch (default: the engine's --batch-size, so that the "
                        "ratio compares equal batching; before 0.17.0 it was 2)")
    p.add_argument("--bilevel-steps", type=int, default=100,
                   help="Bi-Level outer steps (default 100; lower only to smoke-test)")  # fmt: skip
    p.add_argument("--bilevel-inner", type=int, default=20, help="Bi-Level PGD iterations per step (default 20)")
    p.add_argument("--bilevel-backbones", default="resnet20", help="backbones for Bi-Level (default resnet20)")
    p.add_argument("--matmul-size", type=int, default=None, help="peak matmul size (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--models-dir", type=Path, default=SHARED / "models")
    p.add_argument("--data-dir", type=Path, default=SHARED / "data" / "cifar10",
                   help="CIFAR-10 folder holding test/<class>/<index>.png")  # fmt: skip
    p.add_argument("--photos-dir", type=Path, default=SHARED / "data" / "photos")
    p.add_argument("--skip-reference", action="store_true", help="no reference runs (engine, photos)")
    p.add_argument("--skip-bilevel", action="store_true")
    p.add_argument("--skip-photos", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-cli", action="store_true", help="in the end-to-end part, no `preempt protect` subprocess")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="do not time --precision bf16 (timed where native)")
    p.add_argument("--batch-sweep", default="64,128,256,512",
                   help="on CUDA or with --variants: engine batch sizes (images) timed in fp32 and bf16 (default 64,128,256,512)")  # fmt: skip
    p.add_argument("--compile-modes", default="default,reduce-overhead",
                   help="on CUDA or with --variants: torch.compile modes timed at the best batch ('' for none)")  # fmt: skip
    p.add_argument("--compile-precisions", default="bf16,fp32",
                   help="on CUDA or with --variants: precisions whose compiled engine is timed, each at its best batch (default bf16,fp32)")  # fmt: skip
    p.add_argument("--compile-backbones", default="preact18",
                   help="on CUDA or with --variants: backbones whose compiled engine is timed (default preact18)")  # fmt: skip
    p.add_argument("--e2e-switch-interval", type=float, default=None,
                   help="also time --io processes end to end under this sys.setswitchinterval (seconds; an experiment)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="end to end: the engine alone, the pipeline and the CLI replay each batch as a CUDA graph")
    p.add_argument("--e2e-images", type=int, default=None,
                   help="PNG files for the end-to-end part (default --images; beyond the 932 test images, copies)")
    p.add_argument("--accuracy-compile", default="",
                   help="torch.compile modes whose bf16 protection also gets the robust-accuracy check (default none)")
    p.add_argument("--variants", action="store_true",
                   help="run the batch/precision/compile part on the CPU too (it runs on CUDA anyway)")
    p.add_argument("--json-out", type=Path, default=None,
                   help="also write the results here, rewritten after each part (kept if a later part fails)")  # fmt: skip
    p.add_argument("--unfused", action="store_true",
                   help="also time the engine with the net only BatchNorm-folded (before 0.15.0), in turns with the "
                        "fused one, and compare their outputs")  # fmt: skip
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="CPU: glibc malloc as `preempt` sets it (tuned: freed blocks kept; device.tune_malloc) or "
                        "left as the system's (default); engine and reference run under the same one")  # fmt: skip
    p.add_argument("--accuracy-images", type=int, default=932,
                   help="test images for the fp32-vs-bf16 robust-accuracy check (0: skip; default 932)")
    args = p.parse_args(argv)
    for option in ("repeats", "images", "ref_images", "bilevel_images", "batch_size", "e2e_images"):
        value = getattr(args, option)
        if value is not None and value < 1:  # a rate of no images divided by zero
            p.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or default_cpu_threads())
        # as `preempt` does on a CPU (device.configure_cpu); the reference loop runs in this process too
        args.malloc_tuned = tune_malloc() if args.malloc == "tuned" else False
    args.images = args.images or (512 if device.type == "cuda" else 64)
    args.batch_size = args.batch_size or (256 if device.type == "cuda" else 16)
    args.bilevel_images = args.bilevel_images or args.batch_size
    keys = [k.strip() for k in args.backbones.split(",") if k.strip()]
    args.batch_sweep = [int(v) for v in args.batch_sweep.split(",") if v.strip()]
    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    args.compile_backbones = [k.strip() for k in args.compile_backbones.split(",") if k.strip()]
    args.compile_precisions = [q.strip() for q in args.compile_precisions.split(",") if q.strip()]
    bad = sorted(set(args.compile_precisions) - {"fp32", "bf16"})
    if bad:
        raise SystemExit(f"bench_protect: --compile-precisions takes fp32 and bf16, got {', '.join(bad)}")
    cfg = ForeBackConfig()  # the paper's settings: F1-B2, N 20, eta 0.7, eps 8/255
    torch.manual_seed(0)

    results: dict[str, Any] = {"benchmark": "bench_protect", "machine": machine_info(device)}
    if device.type == "cpu":
        results["machine"]["malloc_tuned"] = args.malloc_tuned
    results["settings"] = {
        "config": cfg.as_dict(), "passes_per_image": cfg.passes_per_image, "repeats": args.repeats,
        "images": args.images, "ref_images": args.ref_images, "batch_size": args.batch_size, "backbones": keys,
    }  # fmt: skip

    paths = cifar_paths(args.data_dir, args.images)
    x, seeds = load_images(paths)
    models = load_backbones(sorted(set(keys) | ({"resnet20"} if not (args.skip_photos and args.skip_e2e) else set())),
                            args.models_dir, device)  # fmt: skip

    results["peak"] = bench_peak(device, args)
    peak_kind = "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"  # convolutions as TF32
    peak_fp32 = results["peak"][peak_kind]["gflops"]

    results["engine_vs_reference"] = {}
    results["flops"] = {}
    for key in keys:
        ours, ref = models[key]
        r = bench_engine_vs_reference(key, ours, ref, x, seeds, args, cfg, device)
        results["engine_vs_reference"][key] = r
        flops = count_flops(ours)
        fl: dict[str, Any] = {"per_image_pass": flops}
        fl["engine"] = achieved(flops, cfg, r["engine"]["images_per_s"], peak_fp32, peak_kind)
        if "reference" in r:
            fl["reference"] = achieved(flops, cfg, r["reference"]["images_per_s"], peak_fp32, peak_kind,
                                       full_backward=True)  # fmt: skip
        results["flops"][key] = fl

    checkpoint(results, args)

    if args.bf16 and native_bf16(device) and args.accuracy_images > 0:
        results["precision_accuracy"] = bench_precision_accuracy(args, device)
        checkpoint(results, args)
    if not args.skip_photos:
        results["photos"] = bench_photos(*models["resnet20"], args, cfg, device)
        checkpoint(results, args)
    if not args.skip_e2e:
        e2e_paths = cifar_paths(args.data_dir, min(932, max(args.images, args.e2e_images or 0)))
        results["end_to_end"] = bench_end_to_end(models["resnet20"][0], e2e_paths, args, cfg, device)
        checkpoint(results, args)
    if not args.skip_bilevel:
        results["bilevel"] = {}
        for key in [k.strip() for k in args.bilevel_backbones.split(",") if k.strip()]:
            if key not in models:
                models.update(load_backbones([key], args.models_dir, device))
            results["bilevel"][key] = bench_bilevel(key, models[key][0], x, seeds, args, cfg, device)
        checkpoint(results, args)
    # last: compiling takes minutes, and a time-limited GPU session keeps what came before
    if device.type == "cuda" or args.variants:
        results["gpu"] = {}
        for key in keys:
            results["gpu"][key] = bench_gpu_variants(key, models[key][0], x, seeds, args, cfg, device, results["peak"])
            checkpoint(results, args)

    results["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    checkpoint(results, args)
    print_table(results)
    print(json.dumps(results, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

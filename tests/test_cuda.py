"""What only a GPU can check: CUDA against the CPU, bf16 autocast and ``torch.compile`` on CUDA, the file
pipeline on a GPU (pinned memory, several devices, a real out-of-memory and its back-off).

Skipped where CUDA is missing (CI has no GPU). On a GPU machine ``benchmarks/gpu_check.sh`` runs this file
together with the device-aware part of the suite (``PREEMPT_TEST_DEVICE=cuda``).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CIFAR10_CLASSES, engine_noise_keys, load_cifar_images, make_tiny_model, write_random_pngs
from preempt_cli import ForeBackConfig, Protector, RunOptions, collect_inputs, load_model
from preempt_cli.device import resolve_devices
from preempt_cli.engine import FastPreemption
from preempt_cli.protect import content_seed, read_preempt_metadata, run_on_devices
from preempt_cli.imageio import levels_to_float, quantize_batch, read_image, stack_levels

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available: GPU-only checks (benchmarks/gpu_check.sh runs them)"
)

CUDA = torch.device("cuda", 0)
EPS = 8 / 255


@pytest.fixture(autouse=True)
def _strict_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls without TF32, deterministic cuDNN: CUDA and the CPU then compute the
    same function up to float rounding (the speed settings are the benchmark's business)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved  # fmt: skip


@pytest.fixture
def batch(cifar_batch_paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 real CIFAR-10 images of ``cifar_batch``, on the CPU."""
    x = load_cifar_images(cifar_batch_paths)
    y = torch.tensor([CIFAR10_CLASSES.index(p.parent.name) for p in cifar_batch_paths])
    return x, y


@pytest.fixture(scope="module")
def resnet20(shared_models_dir: Path) -> dict[str, torch.nn.Module]:
    """The real robust backbone on each device."""
    return {str(d): load_model("cifar10-resnet20-pgdat-a", models_dir=shared_models_dir, device=d)
            for d in ("cpu", "cuda:0")}  # fmt: skip


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of pixels equal up to float rounding."""
    return float(((a.cpu() - b.cpu()).abs() <= 1e-5).float().mean())


def test_cuda_computes_what_the_cpu_computes(batch, resnet20) -> None:
    x, y = batch
    cfg = ForeBackConfig()
    engines = {d: FastPreemption(m, config=cfg, seed=5) for d, m in resnet20.items()}
    # The noise is integer arithmetic: the same bits on both devices, for every step
    steps = cfg.forward_steps + cfg.backward_steps
    keys = {d: engine_noise_keys(e, range(len(x))) for d, e in engines.items()}
    for step in range(steps):
        noise = {d: e._noise(x.to(d), keys[d][:, step]).cpu() for d, e in engines.items()}
        assert torch.equal(noise["cpu"], noise["cuda:0"]), step
    out = {d: e.perturb(x, y) for d, e in engines.items()}
    assert out["cuda:0"].device.type == "cuda"
    # Only a gradient sign flipped by rounding can differ (one sample of 20 moves: a pixel by 2 eps / 20),
    # and a flip in one step changes the next steps' gradients a little: 97.6% of the pixels came out equal
    # on an H100 (2% when the two devices were wrongly served different noise).
    share = _agree(out["cpu"], out["cuda:0"])
    assert share > 0.95, share
    mean_diff = (out["cpu"] - out["cuda:0"].cpu()).abs().mean().item()
    assert mean_diff < 0.1 * EPS, mean_diff / EPS  # 5% of the pixels off by at most 2 eps
    for o in out.values():
        assert (o.cpu() - x).abs().max() <= EPS + 1e-6 and o.min() >= 0 and o.max() <= 1


def test_cuda_results_are_reproducible_and_batch_invariant(batch, resnet20) -> None:
    x, y = batch
    model = resnet20["cuda:0"]
    seeds = [11 * i + 3 for i in range(len(x))]
    engine = FastPreemption(model, seed=2)
    a = engine.perturb(x, y, noise_seeds=seeds)
    b = FastPreemption(model, seed=2).perturb(x, y, noise_seeds=seeds)
    assert torch.equal(a, b)  # same seed, same device, same input: the same bits
    # An image's noise does not depend on its batch; its result only up to float rounding of batched kernels.
    alone = engine._noise(x[3:5].to(CUDA), engine_noise_keys(engine, seeds[3:5])[:, 0])
    together = engine._noise(x.to(CUDA), engine_noise_keys(engine, seeds)[:, 0])
    assert torch.equal(alone, together[3:5])
    single = torch.cat([engine.perturb(x[i : i + 1], y[i : i + 1], noise_seeds=[seeds[i]]) for i in range(len(x))])
    share = _agree(single, a)
    assert share > 0.99, share


def test_cuda_results_are_reproducible_with_the_speed_settings_protect_runs_with(batch, resnet20) -> None:
    """``preempt protect`` leaves PyTorch's defaults: TF32 convolutions and cuDNN's heuristic (not
    necessarily deterministic) kernels. The same files and seed must still give the same bits twice."""
    x, y = batch
    model = resnet20["cuda:0"]
    seeds = [11 * i + 3 for i in range(len(x))]
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic)
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = True, False  # torch's defaults
    try:
        a = FastPreemption(model, seed=2).perturb(x, y, noise_seeds=seeds)
        b = FastPreemption(model, seed=2).perturb(x, y, noise_seeds=seeds)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = saved
    assert torch.equal(a, b)
    assert (a.cpu() - x).abs().max() <= EPS + 1e-6


def test_bf16_autocast_on_cuda_keeps_the_budget_and_the_direction(batch, resnet20) -> None:
    x, y = batch
    model = resnet20["cuda:0"]
    fp32 = FastPreemption(model, precision="fp32").perturb(x, y)
    bf16 = FastPreemption(model, precision="bf16").perturb(x, y)
    assert FastPreemption(model, precision="auto").precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert torch.equal(bf16, FastPreemption(model, precision="bf16").perturb(x, y))
    assert (bf16.cpu() - x).abs().max() <= EPS + 1e-6
    cos = F.cosine_similarity((fp32.cpu() - x).flatten(1), (bf16.cpu() - x).flatten(1))
    assert cos.min() > 0.8, cos
    # both lower the backbone's loss on the label (the protection's aim)
    with torch.no_grad():
        loss = {k: F.cross_entropy(model(v.to(CUDA)), y.to(CUDA)).item() for k, v in
                (("x", x), ("fp32", fp32), ("bf16", bf16))}  # fmt: skip
    assert loss["bf16"] < loss["x"] and loss["fp32"] < loss["x"]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_backbone_on_cuda_matches_eager(mode: str, batch) -> None:
    x, y = batch
    model = make_tiny_model(0).to(CUDA)
    cfg = ForeBackConfig(samples=4)
    eager = FastPreemption(model, config=cfg).perturb(x, y)
    engine = FastPreemption(model, config=cfg, compile=mode)
    first = engine.perturb(x, y)
    second = engine.perturb(x, y)  # a replay (CUDA graphs with reduce-overhead)
    assert torch.equal(first, second)
    assert (first.cpu() - x).abs().max() <= cfg.eps + 1e-6
    shares = [_agree(first, eager)]
    partial = engine.perturb(x[:3], y[:3])  # another batch shape: compiled again, same per-image results
    shares.append(_agree(partial, first[:3]))
    assert min(shares) > 0.99, shares


def _pngs(folder: Path, n: int) -> list[Path]:
    return write_random_pngs(folder, n, name="img{i:02d}.png")


def test_file_pipeline_on_cuda_writes_budgeted_pngs(tmp_path: Path, resnet20) -> None:
    originals = _pngs(tmp_path / "in", 24)
    before = {p: p.read_bytes() for p in originals}
    protector = Protector(resnet20["cuda:0"], labels="backbone", config=ForeBackConfig(samples=4), precision="auto")
    results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", batch_size=8)))
    assert [r.status for r in results] == ["done"] * 24
    assert {p: p.read_bytes() for p in originals} == before
    for r in results:
        a = np.asarray(Image.open(r.input), dtype=np.int64)
        b = np.asarray(Image.open(r.output), dtype=np.int64)
        assert 0 < np.abs(a - b).max() <= 8 and np.abs(a - b).max() == r.linf_levels
        meta = read_preempt_metadata(read_image(r.output))
        assert meta["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


def test_pipeline_on_cuda_writes_what_each_batch_computes(tmp_path: Path, resnet20) -> None:
    # Each file holds exactly what its batch computed (the same batches, computed one at a time here):
    # nothing of another batch, of a stale buffer, or rounded twice
    originals = _pngs(tmp_path / "in", 24)
    cfg = ForeBackConfig(samples=20)
    protector = Protector(resnet20["cuda:0"], labels="backbone", config=cfg)
    results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", batch_size=8)))
    assert [r.status for r in results] == ["done"] * 24
    for first in range(0, 24, 8):  # the same batches (8 files each, in order), computed one at a time
        pictures = [read_image(p) for p in originals[first : first + 8]]
        # the pipeline's inputs, built as it builds them (the CPU's floats: see levels_to_float)
        x = levels_to_float(stack_levels([p.color for p in pictures], CUDA), 255)
        y = protector.predict(x).clone()
        x_new = protector.transform(x, y, noise_seeds=[content_seed(p.color) for p in pictures])
        levels, _ = quantize_batch(x_new, [p.color for p in pictures], cfg.eps)
        for path, expected in zip(originals[first : first + 8], levels):
            written = np.asarray(Image.open(tmp_path / "out" / path.name.replace(".png", ".protected.png")))
            assert np.array_equal(written, expected), path.name


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("labels", ["backbone", "folders"])
def test_queueing_a_batch_never_waits_for_the_device(tmp_path: Path, resnet20, labels: str, graphs: bool) -> None:
    """``Protector._compute`` queues a batch on the GPU without one synchronising call (labels from a
    model or known, noise keys, levels and results all travel asynchronously): only then can the next
    batch be queued while this one computes; with ``cuda_graphs``, a replay neither. Its results are those
    of the tensor API."""
    from preempt_cli.protect import _Pending
    from preempt_cli.imageio import read_images

    _pngs(tmp_path / "in" / "airplane", 8)  # a class folder (--labels folders)
    protector = Protector(resnet20["cuda:0"], labels=labels, config=ForeBackConfig(samples=4), cuda_graphs=graphs)
    items = collect_inputs([tmp_path / "in"])
    pictures = read_images([str(item.path) for item in items])
    batch = [_Pending(item, tmp_path / f"{i}.out.png", pic, protector._file_label(item))
             for i, (item, pic) in enumerate(zip(items, pictures))]  # fmt: skip
    # warm-up: cuDNN and the allocator set themselves up; with graphs, the second call captures
    for _ in range(2 if graphs else 1):
        protector._compute(batch).results()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = protector._compute(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if graphs:
        [graphed] = protector._graphed.values()
        assert (graphed.captures, graphed.replays, graphed.failure) == (1, 1, None)
    computed = launched.results()
    x = levels_to_float(stack_levels([p.color for p in pictures], CUDA), 255)
    y = protector.predict(x).clone() if labels == "backbone" else torch.zeros(8, dtype=torch.long, device=CUDA)
    x_new = protector.transform(x, y, noise_seeds=[content_seed(p.color) for p in pictures])
    levels, _ = quantize_batch(x_new, [p.color for p in pictures], protector.config.eps)
    for (got, before, after, label), expected, want in zip(computed, levels, y.tolist()):
        assert np.array_equal(got, expected) and label == want and 0 <= before <= 1 and 0 <= after <= 1


def test_batches_queued_two_at_a_time_write_what_one_at_a_time_writes(tmp_path: Path, resnet20,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import preempt_cli.protect as protect

    _pngs(tmp_path / "in", 40)
    protector = Protector(resnet20["cuda:0"], labels="backbone", config=ForeBackConfig(samples=20))
    items = collect_inputs([tmp_path / "in"])
    for queued in (1, 2):
        monkeypatch.setattr(protect, "_QUEUED_BATCHES", queued)
        results = list(protector.run(items, RunOptions(out_dir=tmp_path / f"q{queued}", batch_size=8)))
        assert [r.status for r in results] == ["done"] * 40
    for one in sorted((tmp_path / "q1").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(tmp_path / "q2" / one.name))), one.name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("settings", ["strict", "protect's"])
def test_cuda_graphs_write_the_files_eager_kernels_write(tmp_path: Path, resnet20, precision: str,
                                                          settings: str) -> None:  # fmt: skip
    """A run in CUDA graphs (``--cuda-graphs``) writes the very files of a run without, in strict fp32 and
    with the settings ``preempt protect`` runs with (TF32, cuDNN's heuristic kernels): a replay runs the
    kernels the capture recorded, which are the eager ones of that shape. 1068 files in batches of 256:
    the first batch goes in 4 pieces of 64 (run, captured, replayed twice), then 3 batches of 256 (run,
    captured, replayed), then the last 44 (run once)."""
    _pngs(tmp_path / "in", 1068)
    items = collect_inputs([tmp_path / "in"])
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic)
    if settings != "strict":
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = True, False  # torch's defaults
    try:
        for graphs in (False, True):
            protector = Protector(resnet20["cuda:0"], labels="backbone", config=ForeBackConfig(samples=20),
                                  precision=precision, cuda_graphs=graphs)  # fmt: skip
            results = list(protector.run(items, RunOptions(out_dir=tmp_path / f"graphs-{graphs}")))
            assert [r.status for r in results] == ["done"] * 1068
            if graphs:
                [graphed] = protector._graphed.values()
                assert (graphed.captures, graphed.replays, graphed.failure) == (2, 3, None), vars(graphed)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = saved
    for eager in sorted((tmp_path / "graphs-False").glob("*.png")):
        graphed_file = tmp_path / "graphs-True" / eager.name
        assert np.array_equal(np.asarray(Image.open(eager)), np.asarray(Image.open(graphed_file))), eager.name


def test_an_engine_in_cuda_graphs_gives_the_eager_bits(batch, resnet20) -> None:
    x, y = batch
    eager = FastPreemption(resnet20["cuda:0"], seed=6)
    graphed = FastPreemption(resnet20["cuda:0"], seed=6, cuda_graphs=True)
    for x_part, y_part in ((x, y), (x, y), (x.flip(0), y.flip(0)), (x[:3], y[:3]), (x[:3], y[:3]), (x[:3], y[:3])):
        assert torch.equal(graphed.perturb(x_part, y_part), eager.perturb(x_part, y_part))
    assert (graphed._graphed.captures, graphed._graphed.replays, graphed._graphed.failure) == (2, 2, None)


_FAILED_CAPTURE = """
import torch
from preempt_cli.graphs import GraphCaptureError, GraphedFunction

graphed = GraphedFunction(lambda a: (a * 2 + a.sum().item(),), torch.device("cuda"), name="a sync")
x = torch.rand(8, device="cuda")
print("eager", bool(torch.equal(graphed(x)[0], x * 2 + x.sum().item())))
for call in (2, 3):
    try:
        graphed(x)
    except GraphCaptureError as e:
        print("refused", call, str(e).splitlines()[0])
print("stream back", torch.cuda.current_stream() == torch.cuda.default_stream())
"""


def test_a_capture_that_waits_for_the_device_is_refused_from_then_on() -> None:
    """A real failed capture (``.item()`` inside), in a process of its own: PyTorch's allocator cannot be
    trusted after one, so it would not be in this one. The call and every later one fail, saying what to
    do, and the thread has its stream back."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FAILED_CAPTURE], capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert lines[0] == "eager True", done.stdout + done.stderr[-2000:]
    for call, line in zip((2, 3), lines[1:3]):
        assert line.startswith(f"refused {call} CUDA graphs could not capture a sync (") and line.endswith(
            "run without --cuda-graphs"), line
    assert lines[3] == "stream back True"


def test_a_transfer_from_the_gpu_waits_for_the_work_before_it() -> None:
    from preempt_cli.batches import QueuedTransfer

    a = torch.randn(2048, 2048, device=CUDA)
    for _ in range(20):  # a few milliseconds of work queued before the copy
        a = (a @ a).clamp_(-1, 1)
    transfer = QueuedTransfer([a])
    got = transfer.wait()[0]
    assert transfer.done() and got.is_pinned() and torch.equal(got, a.cpu())


def test_workers_on_cuda_and_cpu_write_each_file_once(tmp_path: Path, resnet20) -> None:
    _pngs(tmp_path / "in", 10)
    cfg = ForeBackConfig(samples=3)
    both = [Protector(resnet20[d], labels="backbone", config=cfg) for d in ("cuda:0", "cpu")]
    results = list(run_on_devices(both, collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "two")))
    assert sorted(r.input.name for r in results) == [f"img{i:02d}.png" for i in range(10)]
    assert all(r.status == "done" for r in results)
    # each worker's files are exactly what that device alone makes of them
    for i, d in enumerate(("cuda:0", "cpu")):
        alone = Protector(resnet20[d], labels="backbone", config=cfg)
        list(alone.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / d)))
        for k in range(i, 10, 2):
            name = f"img{k:02d}.protected.png"
            assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / name)),
                                  np.asarray(Image.open(tmp_path / d / name)))  # fmt: skip


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_a_real_out_of_memory_halves_the_batch(tmp_path: Path, resnet20, graphs: bool) -> None:
    """Cap this process's share of the GPU so that 64 images x 20 samples do not fit but a few do. With CUDA
    graphs, a graph that does not fit beside the eager memory leaves its shape eager: every file is done."""
    _pngs(tmp_path / "in", 64)
    protector = Protector(resnet20["cuda:0"], labels="backbone", config=ForeBackConfig(), cuda_graphs=graphs)
    x4 = torch.rand(4, 3, 32, 32, device=CUDA)
    gc.collect()  # earlier tests' protectors, and the private memory pools of their CUDA graphs
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(CUDA)
    base = torch.cuda.memory_allocated(CUDA)
    protector.transform(x4, torch.zeros(4, dtype=torch.long, device=CUDA))
    per_4_images = torch.cuda.max_memory_allocated(CUDA) - base
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.empty_cache()
    # The cap bounds the memory the allocator holds (reserved), not the tensors' (allocated): memory held
    # but not allocatable here (a live graph's pool) counts against it. Room for about 16 images beyond
    # it: 64 and 32 run out of memory.
    held = torch.cuda.memory_reserved(CUDA)
    torch.cuda.set_per_process_memory_fraction(min(1.0, (held + 4.5 * per_4_images + 64e6) / total), CUDA)
    try:
        results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out",
                                                                                  batch_size=64)))  # fmt: skip
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
        torch.cuda.empty_cache()
    assert [r.status for r in results] == ["done"] * 64, (
        [r.reason for r in results if r.status != "done"][:1], f"held {held / 2**20:.0f} MiB, allocated "
        f"{base / 2**20:.0f} MiB, 4 images {per_4_images / 2**20:.0f} MiB")  # fmt: skip
    cap = protector._batch_cap[(3, 32, 32)]
    assert cap < 64  # it ran out of memory at 64 and went on with smaller batches


def test_resize_inside_the_model_matches_the_cpu(photos_dir: Path, resnet20) -> None:
    picture = read_image(photos_dir / "astronaut.png")
    x = picture.to_tensor().unsqueeze(0)
    with torch.no_grad():
        cpu = resnet20["cpu"](x)
        cuda = resnet20["cuda:0"](x.to(CUDA)).cpu()
    torch.testing.assert_close(cuda, cpu, atol=1e-3, rtol=1e-3)


def test_a_long_photo_resizes_into_a_32x32_model_on_cuda() -> None:
    """Scales of hundreds (a 20000-pixel side into 32): CUDA's antialiased kernel keeps an output's weights
    in shared memory and refuses them, so the resize matrices are read off on the CPU; the resize and its
    gradient on CUDA match the CPU's."""
    from preempt_cli.models._load import resize

    x = torch.rand(1, 3, 300, 20000, generator=torch.Generator().manual_seed(0))
    x_cuda = x.to(CUDA).requires_grad_(True)
    out = resize(x_cuda, (32, 32))
    torch.testing.assert_close(out.cpu(), resize(x, (32, 32)), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert x_cuda.grad is not None and bool(torch.isfinite(x_cuda.grad).all())

def test_device_all_means_every_gpu() -> None:
    assert resolve_devices("all") == [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    assert resolve_devices("cuda:0,cpu") == [CUDA, torch.device("cpu")]


# -- what changed since the last GPU run (0.19.0), each against the CPU: bit for bit where the code says so ------
def test_hashed_noise_and_its_keys_are_the_same_bits_on_cuda_and_the_cpu() -> None:
    """``noise_keys`` and ``hash_noise`` (the engine's noise, PGD's starts) are integer arithmetic and one
    float rounding: the same bits on both devices, for keys at the ends of their range, in blocks of any size."""
    from preempt_cli.engine import hash_noise, noise_keys, seeded_image_keys

    image_keys = seeded_image_keys(2**64 - 1, [0, 1, 2**64 - 1, 12345], stream=1)
    keys = {d: noise_keys(image_keys.to(d), 3, 5) for d in ("cpu", "cuda:0")}
    assert torch.equal(keys["cpu"], keys["cuda:0"].cpu())
    assert int(keys["cpu"].min()) >= 0 and int(keys["cpu"].max()) < 2**32
    for eps, block in ((EPS, 1 << 20), (1.0, 1000), (0.3, 7)):
        noise = {d: hash_noise(k[:, 1], 3 * 17 * 13, eps, block=block) for d, k in keys.items()}
        assert torch.equal(noise["cpu"], noise["cuda:0"].cpu()), (eps, block)
        assert noise["cpu"].abs().max() <= eps


def _picture_floats(levels: np.ndarray) -> torch.Tensor:
    """``levels`` (HWC) as the CHW floats ``Picture.to_tensor`` gives, on the CPU."""
    return torch.from_numpy(levels.astype(np.float32)).permute(2, 0, 1).contiguous().div_(np.iinfo(levels.dtype).max)


def test_content_seeds_on_cuda_are_the_cpu_s() -> None:
    """A tensor decoded on the host and sent to the GPU gets its file's seed there: its levels were checked
    with CUDA's ``levels / 255`` (a product with the reciprocal, a bit off for 126 of the 256 levels), and half
    its pixels read as other values. Floats off the grids hash their bytes on both devices alike."""
    from preempt_cli.engine import content_seeds

    rng = np.random.default_rng(7)
    levels8 = (np.arange(16 * 16 * 3) % 256).reshape(16, 16, 3).astype(np.uint8)  # every level
    levels16 = rng.integers(0, 65536, (16, 16, 3), dtype=np.uint16)
    other = rng.random((16, 16, 3), dtype=np.float32)
    x = torch.stack([_picture_floats(levels8), _picture_floats(levels16), torch.from_numpy(other).permute(2, 0, 1)])
    expected = [content_seed(levels8), content_seed(levels16), content_seed(other)]
    assert content_seeds(x) == expected
    assert content_seeds(x.to(CUDA)) == expected


@pytest.mark.parametrize("max_value", [255, 65535])
def test_levels_become_the_cpu_s_floats_on_cuda(max_value: int) -> None:
    """The pipeline's levels -> floats on the device, and the rounded levels' floats (what the files hold):
    ``Picture.to_tensor``'s floats, every level, where CUDA's ``levels / 255`` is a bit off for 126 of 256."""
    from preempt_cli.imageio import quantize_batch_on_device

    levels = torch.arange(max_value + 1, dtype=torch.int32).view(1, 1, 1, -1)
    if max_value == 255:
        levels = levels.to(torch.uint8)
    cpu = levels_to_float(levels, max_value)
    assert torch.equal(cpu, levels.double().div(max_value).float())  # correctly rounded
    cuda = levels_to_float(levels.to(CUDA), max_value)
    assert torch.equal(cuda.cpu(), cpu)
    _, saved = quantize_batch_on_device(cuda, levels.to(CUDA), EPS, max_value)
    assert torch.equal(saved.cpu(), cpu)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_starts_on_cuda_are_each_image_s_own_and_the_cpu_s(norm: str) -> None:
    """PGD draws each image's start from its pixels (the CPU's seeds: see above), the seed and the restart,
    by the engine's hash: an L-inf start is the same bits on both devices and in any batch. An L2 start
    divides by each image's norm, a sum whose order on CUDA may follow the batch size: equal up to rounding."""
    from preempt_cli.attacks import PGD

    levels = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    x = levels.float() / 255
    attacks = {d: PGD(make_tiny_model(0).to(d), norm=norm, eps=EPS if norm == "Linf" else 0.5, restarts=2, seed=4)
               for d in ("cpu", "cuda:0")}  # fmt: skip
    keys = {d: a._start_keys(x.to(d)) for d, a in attacks.items()}
    assert torch.equal(keys["cpu"], keys["cuda:0"].cpu())
    attack, x_cuda = attacks["cuda:0"], x.to(CUDA)
    for restart in range(2):
        whole = attack._random_start(x_cuda, keys["cuda:0"][:, restart])
        for size in (1, 3):
            pieces = torch.cat([attack._random_start(x_cuda[i : i + size], keys["cuda:0"][i : i + size, restart])
                                for i in range(0, len(x), size)])  # fmt: skip
            if norm == "Linf":
                assert torch.equal(pieces, whole), (restart, size)
            else:
                torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-7)
        on_cpu = attacks["cpu"]._random_start(x, keys["cpu"][:, restart])
        if norm == "Linf":
            assert torch.equal(whole.cpu(), on_cpu)
        else:  # erfinv is the CPU's or CUDA's own
            torch.testing.assert_close(whole.cpu(), on_cpu, rtol=1e-4, atol=1e-6)


def test_outer_step_in_place_and_blocked_bounds_give_the_cpu_s_bits_on_cuda() -> None:
    """The outer step runs in place in the samples' mean, and a photo's budget is computed a block of rows at a
    time where it is clipped to: elementwise operations only, so on CUDA the bits of the out-of-place step
    with held bounds, and of the CPU's."""
    from preempt_cli import engine as engine_module

    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 40, 56, generator=g)
    x_t = (x0 + (torch.rand(x0.shape, generator=g) - 0.5) * 2 * EPS).clamp(0, 1)
    mean = (x_t + (torch.rand(x0.shape, generator=g) - 0.5) * 4 * EPS).clamp(0, 1)
    samples = (x0.unsqueeze(1) + (torch.rand(2, 4, 3, 40, 56, generator=g) - 0.5) * 4 * EPS).clamp(0, 1)
    cfg = ForeBackConfig()
    reference = {}
    for d in ("cpu", "cuda:0"):
        engine = FastPreemption(make_tiny_model(0).to(d), config=cfg, device=d)
        lo, hi = engine_module._ball(x0.to(d).unsqueeze(1), cfg.eps)
        for direction in (-1.0, 1.0):
            # the step as 0.19.0 computed it: out of place, with held bounds
            old = engine_module._clip_(x_t.to(d) - direction * cfg.eta * (mean.to(d) - x_t.to(d)), lo.squeeze(1),
                                       hi.squeeze(1))  # fmt: skip
            reference.setdefault(direction, old.cpu())
            assert torch.equal(old.cpu(), reference[direction]), (d, direction)
            for block in (None, 1, 7 * 56 * 3, 1 << 24):
                ball = engine_module._Ball(x0.to(d).unsqueeze(1), cfg.eps, block=block)
                x_in, mean_in = x_t.to(d), mean.to(d).clone()
                new = engine._outer_step(x_in, mean_in, ball, direction)
                assert torch.equal(new.cpu(), reference[direction]), (d, direction, block)
                assert new.data_ptr() == mean_in.data_ptr() and torch.equal(x_in.cpu(), x_t)  # in place; x_t kept
                clipped = ball.clip_(samples.to(d).clone())
                assert torch.equal(clipped.cpu(), engine_module._clip_(samples.clone(), lo.cpu(), hi.cpu()))


def test_a_photo_on_cuda_is_protected_alike_in_any_bound_blocks_and_its_input_kept(monkeypatch) -> None:
    """A photo's budget computed in blocks (``BOUND_BLOCK_ELEMENTS``, 2^24 elements on CUDA) gives the bits
    of one row at a time and of the whole; the input, the first iterate without a copy, is never written."""
    from preempt_cli import engine as engine_module

    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(5)).to(CUDA)
    y = torch.tensor([1, 2], device=CUDA)
    x_before = x.clone()
    cfg = ForeBackConfig(samples=3)
    results = []
    for block in (engine_module.BOUND_BLOCK_ELEMENTS["cuda"], 56 * 3, x.numel() * cfg.samples):
        monkeypatch.setitem(engine_module.BOUND_BLOCK_ELEMENTS, "cuda", block)
        engine = FastPreemption(make_tiny_model(0).to(CUDA), config=cfg, seed=3)
        results.append(engine.perturb(x, y, noise_seeds=[11, 12]))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert torch.equal(x, x_before)
    assert (results[0] - x).abs().max() <= cfg.eps + 1e-6 and not torch.equal(results[0], x)

"""The benchmark scripts still run and report consistent numbers (tiny settings; the real runs are minutes)."""

from __future__ import annotations

import json
import os
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


def test_a_partial_rerun_of_the_tables_keeps_what_it_does_not_redo() -> None:
    """bench_eval.py --update and bench_keys.py --reversion-only: the sections, settings and run time of
    the tables on disk are kept, and the re-run's settings are recorded as a dated update."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_eval import merge_update
    finally:
        sys.path.remove(str(BENCHMARKS))
    previous = {"sections": {"table2": [1], "reversion": [2]}, "settings": {"images": 932}, "seconds": 900,
                "updates": [{"date": "2026-11-20", "settings": {"images": 100}}]}  # fmt: skip
    rerun = {"sections": {}, "settings": {"images": 200}, "seconds": None}
    merge_update(rerun, previous, "2026-11-26")
    assert rerun["sections"] == {"table2": [1], "reversion": [2]}
    assert rerun["settings"] == {"images": 932} and rerun["seconds"] == 900
    assert rerun["updates"] == [{"date": "2026-11-20", "settings": {"images": 100}},
                                {"date": "2026-11-26", "settings": {"images": 200}}]  # fmt: skip


def test_overlapping_spans_count_once(bench_pipeline) -> None:
    assert bench_pipeline.covered([(1.0, 3.0), (0.0, 2.0), (5.0, 6.0), (5.5, 5.7)]) == pytest.approx(4.0)
    assert bench_pipeline.covered([]) == 0.0


@pytest.mark.parametrize("queued", [1, 2])
def test_bench_pipeline_splits_each_run_into_its_parts(bench_pipeline, capsys: pytest.CaptureFixture,
                                                       tmp_path: Path, queued: int) -> None:  # fmt: skip
    assert bench_pipeline.main(["--files", "40", "--batch-size", "16", "--repeats", "1", "--workers", "2",
                                "--engine-ms", "2", "--io", "threads,processes", "--queued", str(queued),
                                "--json-out", str(tmp_path / "pipe.json")]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "pipe.json").read_text()) == report
    assert set(report["modes"]) == {"threads", "processes"} and report["queued"] == queued
    for mode in report["modes"].values():
        split = mode["split_s"]
        assert split["batches"] == 3  # 16 + 16 + 8 files
        # the batches' spans (overlapping ones counted once) lie inside the run
        assert split["between_s"] >= -1e-3 and split["head_s"] > 0 and split["tail_s"] >= 0
        assert split["compute_s"] >= 40 * 2e-3 * 0.9  # the stand-in's waits happen inside the compute spans
        assert split["compute_s"] <= split["wall_s"]
        assert mode["files_per_s"] == pytest.approx(40 / mode["runs_s"][0], rel=1e-2)
        assert mode["main_process_cpu_ms_per_file"] > 0
    processes = report["modes"]["processes"]
    assert processes["workers_cpu_ms_per_file"] > 0  # the workers' CPU time is read from /proc
    assert processes["projected_files_per_s"] <= report["engine_images_per_s"]


BENCHMARK_SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))

# Started in the interpreter below, it reports at exit where preempt_cli came from ("-": never imported).
_REPORT_PREEMPT_CLI_AT_EXIT = """
import atexit, sys

def _report():
    module = sys.modules.get("preempt_cli")
    sys.stderr.write("\\npreempt_cli from: %s\\n" % (getattr(module, "__file__", None) or "-"))

atexit.register(_report)
"""


@pytest.fixture(scope="module")
def python_without_preempt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interpreter with this one's packages (torch, ...) and no preempt_cli: a virtual environment whose
    one .pth lists this interpreter's site-packages. Python reads the .pth files of its own site-packages
    only, so an install of preempt_cli there (an editable one, as in CI: a .pth of its own) is not seen,
    as on a lent GPU machine where nothing is installed."""
    import site
    import sysconfig
    import venv

    site_dirs = [Path(d) for d in [*site.getsitepackages(), site.getusersitepackages()] if Path(d).is_dir()]
    installed = [d for d in site_dirs if (d / "preempt_cli" / "__init__.py").is_file()]
    if installed:
        pytest.skip(f"preempt_cli is installed as a package (not editable) in {installed[0]}, beside torch")
    env = tmp_path_factory.mktemp("no-preempt-venv")
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env)
    python = env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    own_site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    assert own_site.is_dir(), own_site  # the environment's site-packages, as venv made it
    (own_site / "this_interpreters_packages.pth").write_text("".join(f"{d}\n" for d in site_dirs))
    (own_site / "sitecustomize.py").write_text(_REPORT_PREEMPT_CLI_AT_EXIT)
    return python


def _run_python(python: Path, *args: str, cwd: Path | None = None):
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # no PYTHONPATH=src
    # -E: PYTHON* variables ignored all the same; -s: no user site-packages (-I would also leave out the
    # script's folder, which `python benchmarks/NAME.py` puts first on sys.path)
    return subprocess.run([str(python), "-E", "-s", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)  # fmt: skip


@pytest.mark.parametrize("script", BENCHMARK_SCRIPTS)
def test_every_benchmark_imports_the_checkouts_source_where_nothing_is_installed(
    python_without_preempt: Path, tmp_path: Path, script: str
) -> None:
    """A lent GPU machine has no preempt_cli installed and a command may not set PYTHONPATH=src:
    bench_eval.py and bench_keys.py stopped at their first import of preempt_cli. Every script takes the
    checkout's src/ beside it, from any working folder."""
    not_installed = _run_python(python_without_preempt, "-c", "import preempt_cli.protect", cwd=tmp_path)
    assert not_installed.returncode != 0 and "ModuleNotFoundError" in not_installed.stderr  # the premise

    done = _run_python(python_without_preempt, str(BENCHMARKS / script), "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
    imported_from = Path(done.stderr.strip().splitlines()[-1].removeprefix("preempt_cli from: "))
    assert imported_from == BENCHMARKS.parent / "src" / "preempt_cli" / "__init__.py"


def test_bench_protect_runs_every_part_on_a_few_images(tmp_path: Path) -> None:
    """Every part of bench_protect.py on 4-8 images (a minute's run cut to seconds): the outputs keep the
    budget, the files get written, the pipeline split and the CLI's start-up are reported."""
    import subprocess

    require_shared("models", "cifar10_resnet20_pgdat_a.safetensors")
    require_shared("data", "cifar10", "test")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_protect.py"), "--backbones", "resnet20", "--images", "4",
         "--ref-images", "1", "--bilevel-images", "1", "--bilevel-steps", "1", "--bilevel-inner", "1",
         "--repeats", "1", "--accuracy-images", "0", "--e2e-images", "8", "--matmul-size", "256",
         "--batch-size", "4", "--skip-photos", "--device", "cpu", "--unfused", "--json-out", str(out),
         "--variants", "--batch-sweep", "4", "--compile-modes", ""],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report  # the JSON line is the file's content
    engine = report["engine_vs_reference"]["resnet20"]
    assert engine["engine"]["check"]["within_budget"] and engine["speedup"] > 0
    fusion = engine["fusion"]  # the fused net protects as the BatchNorm-folded one did, bit for bit
    assert fusion["outputs_equal"] and fusion["fused_convolutions"] == 19 and fusion["speedup"] > 0
    assert isinstance(report["machine"]["malloc_tuned"], bool)  # what it does: tests/test_fusion.py
    assert engine["reference"]["check"]["within_budget"]
    e2e = report["end_to_end"]
    assert e2e["pipeline_done"] == 8 and e2e["pngs_written"] == 8
    assert {v["batches"] for v in e2e["split_s"].values()} == {2}  # 8 files in batches of 4
    assert e2e["cli_one_image_s"] > 0 and e2e["cli"]["images"] == 8
    assert report["bilevel"]["resnet20"]["check"]["within_budget"]
    flops = report["flops"]["resnet20"]
    assert 0 < flops["engine"]["fraction_of_peak"] and flops["engine"]["peak"] == "fp32"
    assert report["bilevel"]["resnet20"]["batch"] == 1
    assert e2e["engine_only_on"].startswith("a worker thread")
    # --variants on a CPU: its rows say so, and cuDNN's autotuning (a no-op there) is not timed
    variants = report["gpu"]["resnet20"]
    assert [(r["precision"], r["batch_size"]) for r in variants["sweep"]] == [("fp32", 4), ("bf16", 4)]
    assert all(r["check"]["within_budget"] for r in variants["sweep"]) and "cudnn_benchmark" not in variants
    sys.path.insert(0, str(BENCHMARKS))  # the table's rows as printed (rich wraps them in a narrow terminal)
    try:
        import bench_protect
    finally:
        sys.path.remove(str(BENCHMARKS))
    rows = [r for r in bench_protect.table_rows(report) if r[0].startswith(("CPU engine", "GPU engine"))]
    assert [r[0] for r in rows] == ["CPU engine fp32 batch 4", "CPU engine bf16 batch 4"]
    assert not any("GiB" in r[-1] for r in rows)  # no GPU memory to report


def test_flops_are_counted_through_fused_convolutions() -> None:
    """Counted on the fused net, oneDNN's fused convolution-ReLU was not counted: PreActResNet-18's
    forward came out 27% low (808.9 against 1,110.8 MFLOP), and so its GFLOP/s and share of the peak."""

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_protect import count_flops, load_backbones
    finally:
        sys.path.remove(str(BENCHMARKS))

    ours, reference = load_backbones(["preact18"], BENCHMARKS, torch.device("cpu"))["preact18"]
    assert any(type(m).__name__ == "ConvReLU2d" for m in ours.modules())  # the engine's net is the fused one
    counted = count_flops(ours)
    assert counted == count_flops(reference)
    assert counted["forward"] == counted["backward_input"] == 1_110_845_440


@pytest.mark.skipif(sys.platform == "win32", reason="bash scripts")
def test_the_gpu_scripts_parse_and_the_next_call_stops_at_once_without_its_pieces(tmp_path: Path) -> None:
    """GPU time is scarce: a piece missing on the lent machine (a test that cannot find ../shared skips; no
    preempt_cli where nothing is installed) stops gpu_next.sh before any step, naming it, with the log and
    a run.tgz in OUT; a SHARED_COPY that is not there is said, not linked (a dangling link stays on a warm
    machine and kept the right copy from being linked by the next call)."""
    import shutil
    import subprocess

    for script in sorted(BENCHMARKS.glob("gpu_*.sh")):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
    repo = tmp_path / "repo"  # a tree with the scripts and neither src/ nor ../shared
    (repo / "benchmarks").mkdir(parents=True)
    for script in ("gpu_next.sh", "gpu_env.sh", "gpu_graphs.sh"):
        shutil.copy(BENCHMARKS / script, repo / "benchmarks" / script)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(["bash", "benchmarks/gpu_next.sh", str(out), ".no-such-copy"], cwd=repo, timeout=120,
                          capture_output=True, text=True, env=dict(env, DEVICE="cpu", PY=sys.executable,
                                                                   WORK=str(work)))  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert "SHARED_COPY '.no-such-copy' is not a folder here" in done.stderr
    assert not (tmp_path / "shared").exists() and not (tmp_path / "shared").is_symlink()
    log = (out / "log.txt").read_text()
    assert "MISSING: preempt_cli" in log and "cifar10/test holds 0 PNGs" in log and "pgdat_a.safetensors is missing" in log
    assert "1-alike" not in log and sorted(p.name for p in out.iterdir()) == ["log.txt", "run.tgz"]


def test_trace_e2e_traces_each_part_of_a_run(tmp_path: Path) -> None:
    """trace_e2e.py on 8 images on the CPU: every traced run did all files, its time stamps come in the
    order a run makes them, and the host trace finds the thread that computed the batches."""
    import subprocess

    require_shared("models", "cifar10_resnet20_pgdat_a.safetensors")
    require_shared("data", "cifar10", "test")
    out = tmp_path / "trace.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "trace_e2e.py"), "--device", "cpu", "--files", "8", "--batch-size", "4",
         "--repeats", "1", "--workers", "2", "--io", "processes,threads", "--gil-duty", "0.25", "--host-trace",
         "--queued", "1,2", "--json-out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["engine"]["images"] == 8 and report["engine_with_busy_thread"]["0.25"]["vs_engine"] > 0
    assert set(report["pipeline"]) == {f"{io}-2-q{q}" for io in ("processes", "threads") for q in (1, 2)}
    for entry in report["pipeline"].values():
        trace = entry["trace"]
        assert trace["done"] == 8 and trace["batches"] == 2 and trace["batch_sizes"] == [4]
        assert len(trace["launch_ms"]) == 2 and all(0 < ms <= w for ms, w in zip(trace["launch_ms"], trace["batch_wall_ms"]))
        assert 0 <= trace["first_decode_submitted_s"] <= trace["first_decoded_s"] <= trace["head_s"]
        assert trace["head_s"] + trace["compute_wall_s"] + trace["tail_s"] <= trace["wall_s"] + 1e-3
        assert trace["gc_collections"] >= len(trace["gc_full_ms"]) >= 0
    host = report["pipeline"]["processes-2-q1"]["host_trace"]
    if "profile_all_threads" in host["experimental"]:  # the compute thread starts after the profiler
        assert len(host["threads"]["compute"]) == 1


@pytest.mark.parametrize("preset", ["paper", "mspd"])
def test_the_reference_loop_equals_the_engine_with_the_same_noise(preset: str, monkeypatch) -> None:
    """bench_protect's reference (the authors' code written out) and the engine, served the same noise, give
    the same images for every preset: the reference ignored ``sample_projection`` and ran mspd's settings
    with the paper's projection of the samples around the original (a fifth of the pixels differed)."""
    from conftest import TEST_DEVICE, make_tiny_model
    from preempt_cli import FastPreemption, ForeBackConfig

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_protect
    finally:
        sys.path.remove(str(BENCHMARKS))
    model = make_tiny_model(0).to(TEST_DEVICE)
    cfg = ForeBackConfig.from_preset(preset, samples=4)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g).to(TEST_DEVICE)
    y = torch.tensor([1, 7], device=TEST_DEVICE)
    steps = cfg.forward_steps + cfg.backward_steps
    noises = [torch.empty(2, cfg.samples, 3, 32, 32).uniform_(-cfg.eps, cfg.eps, generator=g).to(TEST_DEVICE)
              for _ in range(steps)]  # fmt: skip
    served = iter(noises)
    monkeypatch.setattr(FastPreemption, "_noise", lambda self, like, keys: next(served).clone())
    engine = FastPreemption(model, config=cfg).perturb(x, y)

    class Served:  # what the reference's torch.empty_like(...).uniform_(-eps, eps) draws: the same noise
        def __init__(self, noise: torch.Tensor) -> None:
            self.noise = noise

        def uniform_(self, low: float, high: float) -> torch.Tensor:
            return self.noise.clone()

    for i in range(2):
        per_step = iter([noise[i] for noise in noises])
        with monkeypatch.context() as m:
            m.setattr(bench_protect.torch, "empty_like", lambda t, *a, **k: Served(next(per_step)))
            reference = bench_protect.reference_protect_one(model, x[i : i + 1], y[i : i + 1], cfg)
        assert next(per_step, None) is None  # one draw per step
        torch.testing.assert_close(reference[0], engine[i], atol=1e-5, rtol=0)
    assert not torch.equal(engine, x)


class _RecordingProtector:
    """A stand-in for bench_protect's protectors: labels nothing and protects nothing, but records each batch
    it is asked to protect (``calls``), so that the order of the timed runs can be checked."""

    cuda_graphs = False

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], dtype=torch.long)

    def transform(self, x: torch.Tensor, y: torch.Tensor, noise_seeds=None) -> torch.Tensor:
        self.calls.append("engine")
        return x.clone()


@pytest.mark.parametrize("part", ["cifar", "photos"])
def test_the_engine_and_the_reference_are_timed_in_turns(part: str, monkeypatch) -> None:
    """Their ratio is the benchmark's headline: timed one after the other (every engine run, then every
    reference run), a change in a shared machine's load fell on one side only (the engine came out 0.63x the
    reference on PreActResNet-18, 1.4-1.7x in turns). Each repeat now runs one of each, after both warm-ups."""
    import argparse

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_protect
    finally:
        sys.path.remove(str(BENCHMARKS))
    from preempt_cli import ForeBackConfig

    calls: list[str] = []
    monkeypatch.setattr(bench_protect, "make_protector", lambda *a, **k: _RecordingProtector(calls))
    monkeypatch.setattr(bench_protect, "reference_protect",
                        lambda ref, images, labels, cfg: calls.append("reference") or [x.clone() for x in images])
    args = argparse.Namespace(batch_size=4, repeats=3, bf16=False, unfused=False, skip_reference=False, ref_images=2)
    cfg = ForeBackConfig()
    if part == "cifar":
        x = torch.rand(4, 3, 32, 32)
        result = bench_protect.bench_engine_vs_reference("resnet20", None, None, x, [0, 1, 2, 3], args, cfg,
                                                         torch.device("cpu"))  # fmt: skip
        engine_calls = 1  # the 4 images in one batch
    else:
        args.photos_dir = require_shared("data", "photos")
        result = bench_protect.bench_photos(None, None, args, cfg, torch.device("cpu"))
        engine_calls = len(bench_protect.PHOTOS)  # a batch per photo
    # the warm-ups, then the rounds
    assert calls == (["engine"] * engine_calls + ["reference"]) * (1 + args.repeats)
    assert len(result["engine"]["runs_s"]) == len(result["reference"]["runs_s"]) == 3
    assert result["reference"]["check"] and result["speedup"] > 0


def _end_to_end_with_stand_ins(monkeypatch, calls: list[str], cli_envs: list[dict[str, str]], **options):
    """bench_protect's end-to-end part on 4 CIFAR-10 files with stand-ins for the engine, the pipeline and the
    CLI's subprocess, which record their calls (``calls``) and the subprocess's environment (``cli_envs``)."""
    import argparse

    data = require_shared("data", "cifar10")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_protect
    finally:
        sys.path.remove(str(BENCHMARKS))
    from preempt_cli import ForeBackConfig

    class Trace:
        def __init__(self, protector) -> None:
            pass

        def run(self, items, options):
            calls.append("processes" if options.io == "processes" else "threads" if options.fsync else "no_fsync")
            return [], {"wall_s": 1.0, "batches": 1}

    def subprocess_run(cmd, **kwargs):
        calls.append("cli " + Path(cmd[4]).name)  # the folder protected: "in" (all files) or "one"
        cli_envs.append(kwargs.get("env"))

    protector = _RecordingProtector(calls)
    protector.close = lambda: None
    monkeypatch.setattr(bench_protect, "make_protector", lambda *a, **k: protector)
    monkeypatch.setattr(bench_protect, "graph_counts", lambda protector: {})
    monkeypatch.setattr(bench_protect, "PipelineTrace", Trace)
    monkeypatch.setattr(bench_protect.subprocess, "run", subprocess_run)
    args = argparse.Namespace(**{"batch_size": 4, "repeats": 2, "e2e_images": 4, "e2e_switch_interval": None,
                                 "skip_cli": False, "models_dir": BENCHMARKS, "cuda_graphs": False, **options})
    return bench_protect.bench_end_to_end(None, bench_protect.cifar_paths(data, 4), args, ForeBackConfig(),
                                          torch.device("cpu"))  # fmt: skip


def test_the_engine_alone_the_pipeline_and_the_cli_are_timed_in_turns(monkeypatch) -> None:
    """End to end, the pipeline's and the CLI's rates are reported as fractions of the engine alone's: each
    repeat runs the engine alone, each pipeline variant and the CLI (on the folder, then on one image) once,
    after the warm-ups (none for the CLI, which pays its start-up as a user does)."""
    calls: list[str] = []
    result = _end_to_end_with_stand_ins(monkeypatch, calls, [])
    warmups = ["engine", "threads", "no_fsync", "processes"]
    assert calls == warmups + (warmups + ["cli in", "cli one"]) * 2
    assert len(result["engine_only"]["runs_s"]) == len(result["cli"]["runs_s"]) == 2


@pytest.mark.parametrize(("threads", "malloc_tuned"), [(1, False), (2, True)])
def test_the_cli_is_timed_with_the_threads_and_allocator_of_the_engine_it_is_compared_with(
    monkeypatch, threads: int, malloc_tuned: bool
) -> None:
    """`preempt protect` took every usable CPU (or the environment's OMP_NUM_THREADS) and tuned malloc, whatever
    --threads and --malloc default gave the engine alone in the benchmark's process: its ratio to the engine
    compared two thread counts or allocators. Its subprocess now gets this process's count and allocator."""
    envs: list[dict[str, str]] = []
    monkeypatch.setenv("OMP_NUM_THREADS", str(3 - threads))  # another count than the benchmark's
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # as --threads does
    try:
        _end_to_end_with_stand_ins(monkeypatch, [], envs, malloc_tuned=malloc_tuned)
    finally:
        torch.set_num_threads(before)
    assert len(envs) == 4 and all(env is not None for env in envs)  # the folder and one image, twice each
    for env in envs:
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(threads)
        # --malloc default: the CLI leaves malloc as the system's too; tuned: as it does by itself
        assert env.get("PREEMPT_TUNE_MALLOC") == ("0" if not malloc_tuned else os.environ.get("PREEMPT_TUNE_MALLOC"))
        assert env["PATH"] == os.environ["PATH"]  # the rest of the environment as it was


def test_bilevel_is_timed_in_turns_with_the_engine_on_the_same_images(monkeypatch) -> None:
    """Bi-Level's time over Fast Preemption's divided its time by the engine's from the engine-vs-reference
    part: other images and batches, minutes apart on a machine whose load changes. The engine now runs on
    Bi-Level's images, as one batch, in turns with it."""
    import argparse

    import preempt_cli.baselines

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_protect
    finally:
        sys.path.remove(str(BENCHMARKS))
    from preempt_cli import ForeBackConfig

    calls: list[str] = []
    batches: list[int] = []

    class BiLevel:
        def __init__(self, model, *, eps, eta, steps, inner_steps) -> None:
            self.passes_per_image = steps * inner_steps

        def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls.append("bilevel")
            return x.clone()

    protector = _RecordingProtector(calls)
    transform = protector.transform
    protector.transform = lambda x, y, noise_seeds=None: batches.append(x.shape[0]) or transform(x, y)
    monkeypatch.setattr(bench_protect, "make_protector", lambda *a, **k: protector)
    monkeypatch.setattr(preempt_cli.baselines, "BiLevel", BiLevel)
    args = argparse.Namespace(bilevel_images=3, bilevel_steps=2, bilevel_inner=2, repeats=2)
    result = bench_protect.bench_bilevel("resnet20", None, torch.rand(8, 3, 32, 32), list(range(8)), args,
                                         ForeBackConfig(), torch.device("cpu"))  # fmt: skip
    assert calls == ["bilevel", "engine"] * 3  # the warm-ups, then the rounds
    assert set(batches) == {3} and result["batch"] == 3  # Bi-Level's images, as one batch
    assert len(result["engine"]["runs_s"]) == len(result["runs_s"]) == 2
    expected = result["ms_per_image_at_100x20"] / result["engine"]["ms_per_image"]
    assert result["bilevel_over_fp"] == pytest.approx(expected, abs=0.051)


def _import_benchmark(name: str):
    """A script of benchmarks/ as a module (its imports find their neighbours; sys.path left as it was)."""
    import importlib

    path = list(sys.path)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = path


@pytest.mark.parametrize(("script", "argv", "refusal"), [
    ("bench_pipeline", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    ("bench_pipeline", ["--engine-ms", "0"], "--engine-ms must be a positive number of milliseconds, got 0.0"),
    ("bench_pipeline", ["--engine-ms", "nan"], "--engine-ms must be a positive number"),
    ("bench_pipeline", ["--files", "0"], "--files must be at least 1, got 0"),
    ("bench_pipeline", ["--batch-size", "-4"], "--batch-size must be at least 1, got -4"),
    ("bench_pipeline", ["--workers", "0"], "--workers must be at least 1, got 0"),
    ("bench_pipeline", ["--io", "thread"], "--io takes threads and processes, comma-separated, got thread"),
    ("bench_pipeline", ["--io", ","], "--io takes threads and processes, comma-separated, got none"),
    ("trace_e2e", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    ("trace_e2e", ["--files", "0"], "--files must be at least 1, got 0"),
    ("trace_e2e", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("trace_e2e", ["--min-piece", "0"], "--min-piece must be at least 1, got 0"),
    ("trace_e2e", ["--workers", "8,x"], "--workers takes whole numbers of at least 1, comma-separated, got '8,x'"),
    ("trace_e2e", ["--workers", "0"], "--workers takes whole numbers of at least 1"),
    ("trace_e2e", ["--workers", ""], "--workers takes whole numbers of at least 1"),
    ("trace_e2e", ["--queued", "0,2"], "--queued takes whole numbers of at least 1"),
    ("trace_e2e", ["--gil-duty", "0.1,1.5"], "--gil-duty takes shares from 0 to 1, comma-separated, got '0.1,1.5'"),
    ("trace_e2e", ["--gil-duty", "nan"], "--gil-duty takes shares from 0 to 1"),
    ("trace_e2e", ["--io", "processes,proc"], "--io takes threads and processes, comma-separated, got processes,proc"),
])  # fmt: skip
def test_the_pipeline_benchmarks_refuse_settings_that_cannot_run(script: str, argv: list[str], refusal: str,
                                                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """bench_pipeline.py and trace_e2e.py took any value: --repeats 0 ended in a traceback from the median of no
    runs after the files were copied (or the model loaded), --engine-ms 0 in a division by zero, --gil-duty 1.5
    in a negative sleep. They now refuse such values at once, in one line (exit 2), as bench_protect.py does."""
    module = _import_benchmark(script)
    with pytest.raises(SystemExit) as stopped:
        module.parse_args(argv)
    assert stopped.value.code == 2
    assert f"error: {refusal}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_pipeline_benchmarks_take_their_defaults_and_lists() -> None:
    """What the refusals leave: the defaults, and comma-separated lists parsed into their values."""
    pipeline = _import_benchmark("bench_pipeline").parse_args(["--engine-ms", "0.39", "--io", "processes"])
    assert pipeline.engine_ms == 0.39 and pipeline.io == ["processes"] and pipeline.repeats >= 1
    trace = _import_benchmark("trace_e2e").parse_args(["--workers", "8, 4", "--queued", "2,1", "--gil-duty", "0,1",
                                                       "--io", "processes,threads"])  # fmt: skip
    assert trace.workers == [8, 4] and trace.queued == [2, 1] and trace.gil_duty == [0.0, 1.0]
    assert trace.io == ["processes", "threads"]


def test_trace_e2e_runs_the_engine_alone_on_a_worker_thread(monkeypatch) -> None:
    """trace_e2e.py timed the engine alone on the main thread, where Protector.run (and the CLI) computes on a
    worker thread: its baseline ran under other conditions (OpenMP's waiting threads, malloc's arena) than the
    pipeline compared with it, as bench_protect.py's did before 0.17.0. Every engine call (warm-ups, timed runs,
    runs beside a thread holding the GIL) now runs on a worker thread. Times are not checked, only threads."""
    import argparse
    import threading

    trace_e2e = _import_benchmark("trace_e2e")
    threads: list[threading.Thread] = []

    class OnWhichThread(_RecordingProtector):
        def transform(self, x: torch.Tensor, y: torch.Tensor, noise_seeds=None) -> torch.Tensor:
            threads.append(threading.current_thread())
            return super().transform(x, y, noise_seeds)

    calls: list[str] = []
    args = argparse.Namespace(batch_size=2, repeats=2, host_trace=False, gil_duty=[0.0, 0.5])
    engine, with_busy_thread = trace_e2e.trace_engine(OnWhichThread(calls), torch.rand(4, 3, 32, 32),
                                                      torch.zeros(4, dtype=torch.long), [0, 1, 2, 3], args,
                                                      torch.device("cpu"))  # fmt: skip
    # 2 batches a run: the warm-up (one batch shape) and 2 timed runs alone, then each duty's warm-up and 2 runs
    assert len(threads) == 1 + 2 * 2 + 2 * (3 * 2)
    assert threading.main_thread() not in threads
    assert engine["images"] == 4 and len(engine["runs_s"]) == 2 and engine["on"].startswith("a worker thread")
    assert set(with_busy_thread) == {"0", "0.5"}


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_graphs.sh", "gpu_next.sh"])
def test_gpu_scripts_take_help_and_refuse_an_option_for_an_output_folder(script) -> None:
    """``--help`` was taken for the output folder and the script started its runs (minutes of device time)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    shown = subprocess.run(["bash", f"benchmarks/{script}", "--help"], cwd=repo, timeout=30, capture_output=True,
                           text=True)  # fmt: skip
    assert shown.returncode == 0 and "usage" in shown.stdout.lower(), shown
    refused = subprocess.run(["bash", f"benchmarks/{script}", "--out"], cwd=repo, timeout=30, capture_output=True,
                             text=True)  # fmt: skip
    assert refused.returncode == 2 and "unknown option --out" in refused.stderr, refused
    assert not (repo / "--help").exists() and not (repo / "--out").exists()

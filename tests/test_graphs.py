"""CUDA graphs (``--cuda-graphs``): what a graph replays is what the eager code computes.

On a CPU the graphs are emulated (:class:`GraphedFunction` with ``emulate=True``: a "replay" calls the
function on the static inputs), which checks the copies in and out, the shapes' bookkeeping and what
happens when a capture fails; with ``PREEMPT_TEST_DEVICE=cuda`` the same tests capture and replay real
graphs. What the emulation cannot show, that the captured functions never wait for the device, is
checked on fake tensors: an operation that reads a value back to the host has no fake result.
"""

from __future__ import annotations

import gc
import logging
import weakref
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import preempt_cli.graphs as graphs_module
import preempt_cli.protect as protect_module
from conftest import TEST_DEVICE, write_random_pngs
from preempt_cli import FastPreemption, ForeBackConfig, Protector, RunOptions, collect_inputs
from preempt_cli.revert import Reverter
from preempt_cli.engine import check_cuda_graphs
from preempt_cli.errors import ConfigError
from preempt_cli.imageio import levels_to_float
from preempt_cli.graphs import MAX_GRAPHS, GraphCaptureError, GraphedFunction

FAST = ForeBackConfig(samples=3)
ON_CUDA = TEST_DEVICE.type == "cuda"


@pytest.fixture(autouse=True)
def _no_failed_capture_before(monkeypatch) -> None:
    """Each test starts, and leaves the next, without a failed capture in the process (tests here fail
    captures on purpose; a real failure, in tests/test_cuda.py, runs in a process of its own)."""
    monkeypatch.setattr(graphs_module, "_process_failure", None)


def _graphed(fn, **kw) -> GraphedFunction:
    """Real graphs on a GPU, emulated ones elsewhere."""
    return GraphedFunction(fn, TEST_DEVICE, emulate=not ON_CUDA, **kw)


def _toy(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return a * 2 + b, a.sum(dim=0)


def _inputs(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, 5, generator=g).to(TEST_DEVICE), torch.rand(rows, 5, generator=g).to(TEST_DEVICE)


# -- GraphedFunction ------------------------------------------------------------------------------------------
def test_a_shape_is_captured_the_second_time_and_replayed_after() -> None:
    graphed = _graphed(_toy)
    for call, seed in enumerate(range(5)):
        a, b = _inputs(4, seed)
        out = graphed(a, b)
        for got, want in zip(out, _toy(a, b)):
            assert torch.equal(got, want), call
        assert (graphed.captures, graphed.replays) == ((0, 0), (1, 0), (1, 1), (1, 2), (1, 3))[call]
    # another shape, dtype or layout is another graph, the first time run as it is
    graphed(*_inputs(3, 0))
    graphed(*_inputs(3, 1))
    a, b = _inputs(4, 2)
    graphed(a.double(), b.double())
    graphed(a.t().contiguous().t(), b)  # same shape, other strides
    assert graphed.captures == 2 and graphed.replays == 3


def test_calls_get_tensors_of_their_own() -> None:
    graphed = _graphed(_toy)
    a, b = _inputs(4, 0)
    graphed(a, b), graphed(a, b)
    first = graphed(a, b)
    kept = first[0].clone()
    second = graphed(*_inputs(4, 1))  # a replay over the graph's buffers
    assert graphed.replays == 2
    assert torch.equal(first[0], kept) and not torch.equal(first[0], second[0])
    first[0].zero_()  # a caller writing into its result does not touch the next
    assert torch.equal(graphed(a, b)[0], kept)


def test_a_replay_whose_outputs_cannot_be_copied_still_orders_the_next_call() -> None:
    # the replay is queued on the device when copying its outputs runs out of memory: a later call (another
    # thread's, on another stream) must still wait for it before it overwrites the graph's static inputs
    graphed = _graphed(_toy)
    a, b = _inputs(4, 0)
    graphed(a, b), graphed(a, b)  # seen, then captured
    marks = []
    graphed._mark_call = lambda: marks.append(True)  # type: ignore[method-assign]

    class _NoMemoryToCopy(torch.Tensor):
        def clone(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("no memory for the copy")

    graph = next(iter(graphed._graphs.values()))
    graph.outputs = tuple(t.as_subclass(_NoMemoryToCopy) for t in graph.outputs)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        graphed(a, b)
    assert marks == [True]


def test_only_so_many_shapes_are_captured() -> None:
    graphed = _graphed(_toy)
    for rows in range(1, MAX_GRAPHS + 3):
        for seed in range(3):
            a, b = _inputs(rows, seed)
            assert torch.equal(graphed(a, b)[0], _toy(a, b)[0])
    assert graphed.captures == MAX_GRAPHS


def test_a_capture_that_fails_stops_every_later_call() -> None:
    # PyTorch cannot clean up after a capture that failed (other than for memory): going on eagerly would
    # go on in a state it does not trust, so this call and all later ones fail, saying what to do
    calls = []

    def flaky(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(len(calls))
        if len(calls) == 3:  # the capture (after the first call and the warm-up)
            raise RuntimeError("operation not permitted when stream is capturing\nmore lines of CUDA's")
        return _toy(a, b)

    graphed = _graphed(flaky, name="the toy")
    a, b = _inputs(4, 0)
    graphed(a, b)
    for _ in range(2):
        with pytest.raises(GraphCaptureError, match=r"^CUDA graphs could not capture the toy \(RuntimeError: "
                           r"operation not permitted when stream is capturing\); run without --cuda-graphs$"):
            graphed(a, b)
    assert len(calls) == 3 and graphed.captures == 0
    if ON_CUDA:  # the thread has its own stream back
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
    # nor does any other graphed function of the process go on (a protector's, another GPU's)
    other = _graphed(_toy)
    with pytest.raises(GraphCaptureError, match="could not capture the toy"):
        other(a, b)
    assert other.captures == other.replays == 0


def test_a_shape_without_memory_for_its_graph_stays_eager(caplog) -> None:
    emulated_capture = [False]

    def capturing() -> bool:
        return torch.cuda.is_current_stream_capturing() if ON_CUDA else emulated_capture[0]

    def hungry(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(a) == 4 and capturing():  # a graph of 4 rows does not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return _toy(a, b)

    graphed = _graphed(hungry, name="the toy")
    if not ON_CUDA:
        record = graphed._record

        def emulated_record(static):
            emulated_capture[0] = True
            try:
                return record(static)
            finally:
                emulated_capture[0] = False

        graphed._record = emulated_record
    with caplog.at_level(logging.WARNING, logger="preempt_cli.graphs"):
        for rows in (4, 4, 4, 4, 3, 3, 3):
            a, b = _inputs(rows, rows)
            assert torch.equal(graphed(a, b)[0], _toy(a, b)[0]), rows
    assert graphed.captures == 1 and graphed.replays == 1 and graphed.failure is None  # the 3-row shape
    [warning] = [r.getMessage() for r in caplog.records if r.name == "preempt_cli.graphs"]
    assert "no memory for a CUDA graph of the toy of shape (4, 5): that shape runs eagerly" in warning
    assert "\n" not in warning


@pytest.mark.skipif(ON_CUDA, reason="off a GPU only")
def test_off_a_gpu_nothing_is_captured() -> None:
    graphed = GraphedFunction(_toy, "cpu")
    for seed in range(3):
        graphed(*_inputs(4, seed))
    assert not graphed.enabled and graphed.captures == graphed.replays == 0


# -- what the engine and the pipeline give a graph ------------------------------------------------------------
def _no_host_reads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``fn`` run on fake copies of ``inputs``: raises where it reads a tensor's value on the host."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        return fn(*(mode.from_tensor(t) for t in inputs))


def test_the_captured_functions_never_read_values_back(tiny_backbone, tiny_classifier) -> None:
    engine = FastPreemption(tiny_backbone, config=FAST, seed=1)
    x, y = torch.rand(4, 3, 32, 32, device=TEST_DEVICE), torch.arange(4, device=TEST_DEVICE)
    keys = engine.image_keys([11, 12, 13, 14]).to(TEST_DEVICE)
    out = _no_host_reads(engine.perturb_keyed, x, y, keys)
    assert out.shape == x.shape
    # the check catches what a capture refuses
    for read_back in (lambda t: t.sum().item(), lambda t: bool((t > 0.5).any()), lambda t: t.max().tolist()):
        with pytest.raises(DataDependentOutputException):
            _no_host_reads(read_back, x)
    protector = Protector(tiny_backbone, tiny_classifier, config=FAST, seed=1)
    levels8 = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, device=TEST_DEVICE).permute(0, 3, 1, 2)
    levels16 = torch.randint(0, 65536, (4, 3, 32, 32), dtype=torch.int32, device=TEST_DEVICE)
    for levels, max_value in ((levels8, 255), (levels16, 65535)):
        work = partial(protector._device_work, max_value=max_value,
                       perturb=lambda lv, y, mv=max_value: engine.perturb_keyed(levels_to_float(lv, mv), y, keys))
        for stats, saved in (_no_host_reads(lambda lv: work(lv, None), levels),  # labels from the classifier
                             _no_host_reads(work, levels, y)):  # fmt: skip
            assert stats.shape == (3, 4) and saved.shape == (4, 32, 32, 3)


def _graphed_engine(backbone, **kw) -> FastPreemption:
    engine = FastPreemption(backbone, cuda_graphs=ON_CUDA, **kw)
    if not ON_CUDA:  # the engine's own graphed function, emulated
        engine._graphed = GraphedFunction(FastPreemption._graph_body, TEST_DEVICE, owner=engine, emulate=True)
    return engine


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_engine_in_graphs_gives_the_eager_bits(tiny_backbone, precision) -> None:
    if precision == "bf16" and not ON_CUDA and not torch.backends.mkldnn.is_available():
        pytest.skip("no bf16 on this CPU")
    eager = FastPreemption(tiny_backbone, config=FAST, seed=3, precision=precision)
    graphed = _graphed_engine(tiny_backbone, config=FAST, seed=3, precision=precision)
    g = torch.Generator().manual_seed(0)
    for rows in (6, 6, 6, 6, 2, 2, 2):
        x = torch.rand(rows, 3, 32, 32, generator=g).to(TEST_DEVICE)
        y = torch.randint(0, 10, (rows,), generator=g).to(TEST_DEVICE)
        assert torch.equal(graphed.perturb(x, y), eager.perturb(x, y)), rows
    assert graphed._graphed.captures == 2 and graphed._graphed.replays == 3
    # images the backbone resizes take the eager path
    photo = torch.rand(1, 3, 40, 48, generator=g).to(TEST_DEVICE)
    label = torch.tensor([3], device=TEST_DEVICE)
    assert torch.equal(graphed.perturb(photo, label), eager.perturb(photo, label))
    assert graphed._graphed.captures == 2


@pytest.fixture
def graphs_in_protect(monkeypatch):
    """Protectors (or reverters) whose batches run in graphs: emulated off a GPU, real on one."""
    if not ON_CUDA:
        monkeypatch.setattr(protect_module, "GraphedFunction", partial(GraphedFunction, emulate=True))

    def protector(*args, kind: type[Protector] = Protector, **kw) -> Protector:
        p = kind(*args, cuda_graphs=ON_CUDA, **kw)
        p.cuda_graphs = True
        return p

    return protector


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


@pytest.mark.parametrize("kind, labels", [(Protector, "classifier"), (Protector, "folders"), (Reverter, "classifier")],
                         ids=["protect", "protect-folders", "revert"])  # fmt: skip
def test_a_run_in_graphs_writes_the_eager_files(tmp_path: Path, tiny_backbone, tiny_classifier, graphs_in_protect,
                                                kind, labels) -> None:  # fmt: skip
    for i, cls in enumerate(("cat", "dog")):
        write_random_pngs(tmp_path / "in" / cls, n=7, name=f"{cls}{{i}}.png", seed=i)
    for i in range(9):  # 16-bit: a graph of their own (3 batches: run, captured, replayed)
        gray16 = (np.random.default_rng(5 + i).integers(0, 65536, (32, 32))).astype(np.uint16)
        Image.fromarray(gray16).save(tmp_path / "in" / "cat" / f"deep{i}.png")
    write_random_pngs(tmp_path / "in" / "dog", n=1, size=(40, 36), name="photo{i}.png")  # resized: eager
    options = dict(batch_size=3, workers=2, io="threads")
    runs = {}
    for name, make in (("eager", kind), ("graphs", partial(graphs_in_protect, kind=kind))):
        protector = make(tiny_backbone, tiny_classifier, config=FAST, seed=4, labels=labels)
        results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / name, **options)))
        assert sorted(r.status for r in results) == ["done"] * 24, [(r.input, r.reason) for r in results]
        runs[name] = (_pixels(tmp_path / name), {r.input.name: (r.label, r.confidence_before, r.confidence_after)
                                                 for r in results})  # fmt: skip
        if name == "graphs":  # 14 8-bit images in batches of 3 (2 replays), 9 16-bit ones (1)
            replays = {max_value: g.replays for (_, max_value), g in protector._graphed.items()}
            assert replays == {255: 2, 65535: 1}, replays
        protector.close()
    assert runs["graphs"][1] == runs["eager"][1]
    assert runs["graphs"][0].keys() == runs["eager"][0].keys() and len(runs["eager"][0]) == 24
    for name, pixels in runs["eager"][0].items():
        assert np.array_equal(runs["graphs"][0][name], pixels), name


def test_graphs_do_not_keep_their_engine_or_protector_alive(tiny_backbone, graphs_in_protect, tmp_path: Path) -> None:
    # Their device memory goes with them when the caller lets go, not at a later garbage collection (or
    # not while a run goes on: it freezes the objects alive at its start, see protect.long_lived_objects_frozen)
    write_random_pngs(tmp_path / "in", n=6)
    gc.collect()
    gc.disable()
    try:
        engine = _graphed_engine(tiny_backbone, config=FAST)
        x, y = torch.rand(2, 3, 32, 32, device=TEST_DEVICE), torch.zeros(2, dtype=torch.long, device=TEST_DEVICE)
        for _ in range(3):
            engine.perturb(x, y)
        protector = graphs_in_protect(tiny_backbone, config=FAST, labels="backbone")
        list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", batch_size=2,
                                                                         io="threads")))  # fmt: skip
        assert engine._graphed.replays == 1 and sum(g.replays for g in protector._graphed.values()) >= 1
        protector.close()
        refs = [weakref.ref(engine), weakref.ref(protector), weakref.ref(protector.engine)]
        del engine, protector
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()


# -- settings ---------------------------------------------------------------------------------------------------
def test_cuda_graphs_setting_is_checked(tiny_backbone, caplog) -> None:
    with pytest.raises(ConfigError, match="must be True or False"):
        check_cuda_graphs("yes", "off", TEST_DEVICE)
    with pytest.raises(ConfigError, match="reduce-overhead"):
        FastPreemption(tiny_backbone, cuda_graphs=True, compile="default")
    with caplog.at_level(logging.WARNING, logger="preempt_cli.engine"):
        assert check_cuda_graphs(True, "off", torch.device("cpu")) is False
    assert "needs a GPU" in caplog.text
    assert check_cuda_graphs(False, "off", TEST_DEVICE) is False
    if ON_CUDA:
        assert check_cuda_graphs(True, "off", TEST_DEVICE) is True


@pytest.mark.parametrize("device", sorted({"cpu", str(TEST_DEVICE)}))
def test_cuda_graphs_with_compile_reduce_overhead_are_refused_saying_what_to_drop(tiny_backbone, monkeypatch,
                                                                                 device: str) -> None:  # fmt: skip
    # it told the user to "use --compile reduce-overhead instead" of the reduce-overhead they gave (on a CPU,
    # of "--compile default", the mode it had made of theirs), and compiled the backbone before refusing
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled before the settings were checked"))
    with pytest.raises(ConfigError) as refused:
        FastPreemption(tiny_backbone, device=device, cuda_graphs=True, compile="reduce-overhead")
    message = str(refused.value)
    assert "drop --cuda-graphs" in message and "--compile default" not in message, message
    assert "use --compile reduce-overhead" not in message, message

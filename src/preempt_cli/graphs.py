"""CUDA graphs: a function of tensors captured once per input shape, then replayed with one launch.

A batch of the Fore-Back cascade is some 700-1,000 small kernels (ResNet-20, F1-B2, N = 20, with the
labels, confidences and rounding of ``preempt protect``). On an H100 the host needs 25-30 ms to queue them
while nothing else runs, and 95-120 ms in the middle of a run of files, when the I/O takes the GIL, for a
batch the device computes in about 100 ms: the host, not the device, sets the pace
(benchmarks/RESULTS.md). A CUDA graph replays all of a batch's kernels with one launch, so the host's
share of a batch is a few copies.

:class:`GraphedFunction` captures a graph for an input shape the second time it sees that shape: the
first batch of a shape runs as it would without graphs, so shapes seen once (the last batch of a run)
cost nothing; the second also runs eagerly (the warm-up a capture needs; its results are that batch's),
and is then captured; later ones replay. A replay runs the very kernels the eager function runs on
that shape, so it gives the same bits. The graphs of one function share one memory pool: they hold the
memory of the largest, not the sum.

What a captured function may do: tensor operations on the device only. Nothing may wait for the device
(``.item()``, ``bool(tensor)``, ``.cpu()``), allocate pinned memory or draw from a random generator, and
its Python control flow must not depend on tensor values: a graph replays what happened at capture.

A capture that fails otherwise than for want of memory leaves PyTorch's allocator in a state it cannot
leave (its own comment in ``CUDAGraph::reset``): :class:`GraphCaptureError` then fails that call and every
later call of any graphed function in the process, and says to run without graphs (work that never used
graphs, such as photos the backbone resizes, goes on). Only one capture may run in a process at a time (PyTorch's
rule; its capture also empties the allocator's cache, which fails during another capture), so captures,
and :func:`empty_cache`, take one lock.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Callable, Sequence

import torch

__all__ = ["GraphedFunction", "GraphCaptureError", "MAX_GRAPHS", "empty_cache"]

_logger = logging.getLogger(__name__)

#: Input shapes captured per function at most; others run eagerly. A run of files sees one or two batch
#: shapes per image size (full batches, and the pieces of the first and last: see protect._MIN_PIECE).
MAX_GRAPHS = 8

#: Held by every capture of the process, and by :func:`empty_cache`.
_CAPTURE_LOCK = threading.Lock()
#: Why a capture of this process failed (see the module's docstring); None while none has.
_process_failure: str | None = None


class GraphCaptureError(RuntimeError):
    """A CUDA graph could not be captured, and the process's CUDA state is no longer trusted."""


def empty_cache() -> None:
    """``torch.cuda.empty_cache()``, never during a capture (where it fails)."""
    with _CAPTURE_LOCK:
        torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


_Key = tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype], ...]


def _key(inputs: Sequence[torch.Tensor]) -> _Key:
    # strides too: the kernels chosen (and the static inputs' layout) follow them
    return tuple((tuple(t.shape), t.stride(), t.dtype) for t in inputs)


class _Graph:
    """One captured shape: its static inputs and outputs, and how to replay it."""

    __slots__ = ("inputs", "outputs", "replay")

    def __init__(self, inputs: list[torch.Tensor], outputs: tuple[torch.Tensor, ...],
                 replay: Callable[[], None]) -> None:  # fmt: skip
        self.inputs, self.outputs, self.replay = inputs, outputs, replay


class GraphedFunction:
    """``fn`` (tensors in, a tuple of tensors out), replayed as CUDA graphs, one per input shape.

    Calls give what ``fn`` gives, as new tensors (copies of the graph's outputs, so that a later call does
    not overwrite them). A shape whose capture runs out of memory runs eagerly from then on (one warning;
    that call still gives its result, from the warm-up). A capture that fails otherwise (an operation that
    waits for the device, say) raises :class:`GraphCaptureError`, then and at every later call of any
    instance. One instance may be shared by threads: calls are serialised, and a call on another stream
    waits for the previous one.

    Args:
        fn: the function; its inputs and outputs are tensors on ``device``. With ``owner``, it is called as
            ``fn(owner, *inputs)``.
        owner: the object ``fn`` works for (an engine, a protector; typically it holds this instance), held
            weakly: it, and with it its graphs' device memory, goes when its last user lets go of it, not
            at some later garbage collection, or not before the runs end, which freeze the objects alive at
            their start (see :func:`~preempt_cli.protect.long_lived_objects_frozen`).
        device: a CUDA device. On any other device ``fn`` runs eagerly (no graphs), unless ``emulate``.
        name: what a warning calls the function.
        emulate: capture and replay by calling ``fn`` on the static inputs (no CUDA), so that the copies in
            and out, the shapes' bookkeeping and the fallback can be tested on a CPU.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], device: torch.device | str, *,
                 owner: object | None = None, name: str = "function", emulate: bool = False) -> None:  # fmt: skip
        self.fn, self.device, self.name, self.emulate = fn, torch.device(device), name, emulate
        self._owner = weakref.ref(owner) if owner is not None else None
        self.enabled = emulate or self.device.type == "cuda"
        self._seen: set[_Key] = set()
        self._eager: set[_Key] = set()  # shapes whose capture ran out of memory
        self._graphs: dict[_Key, _Graph] = {}
        self._pool: tuple[int, int] | None = None
        self._stream: torch.cuda.Stream | None = None
        self._last_call: torch.cuda.Event | None = None
        self._lock = threading.Lock()
        #: Counters, for tests and benchmarks: graphs captured, and calls answered by a replay.
        self.captures = 0
        self.replays = 0
        #: Why a capture failed (None while none has).
        self.failure: str | None = None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.enabled:
            return self._run(inputs)
        key = _key(inputs)
        with self._lock:
            if self.failure is not None or _process_failure is not None:
                raise GraphCaptureError(self.failure or _process_failure)
            capturable = key not in self._graphs and key not in self._eager and len(self._graphs) < MAX_GRAPHS
            if capturable and key in self._seen:  # its second call
                return self._capture(key, inputs)
            graph = self._graphs.get(key)
            if graph is None:
                self._seen.add(key)
                return self._run(inputs)
            self._wait_for_last_call()
            for static, value in zip(graph.inputs, inputs):
                static.copy_(value)
            try:
                graph.replay()
                outputs = tuple(t.clone() for t in graph.outputs)
            finally:  # the replay is queued even when a copy of its outputs runs out of memory: the next
                self._mark_call()  # call (another stream's) must wait for it before overwriting its inputs
            self.replays += 1
            return outputs

    def _run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``fn`` on ``inputs``, eagerly (or, during a capture, recorded)."""
        return self.fn(*inputs) if self._owner is None else self.fn(self._owner(), *inputs)

    # -- capture ---------------------------------------------------------------------------------------
    def _capture(self, key: _Key, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run ``fn`` eagerly on this call's inputs (the warm-up a capture needs: this call's result), then
        capture it for their shape."""
        global _process_failure
        self._wait_for_last_call()
        static = [t.clone() for t in inputs]  # clone keeps a dense tensor's strides
        result = tuple(self._warm_up(static))  # an error here (out of memory) is the call's, as eagerly
        try:
            with _CAPTURE_LOCK:
                self._graphs[key] = self._record(static)
        except torch.cuda.OutOfMemoryError as e:  # the capture ended cleanly: this shape stays eager
            self._eager.add(key)
            _logger.warning("no memory for a CUDA graph of %s of shape %s: that shape runs eagerly (%s)",
                            self.name, tuple(inputs[0].shape), _first_line(e))  # fmt: skip
        except Exception as e:
            self.failure = (f"CUDA graphs could not capture {self.name} ({type(e).__name__}: {_first_line(e)}); "
                            "run without --cuda-graphs")  # fmt: skip
            _process_failure = _process_failure or self.failure
            self._graphs.clear()
            raise GraphCaptureError(self.failure) from e
        else:
            self.captures += 1
        self._mark_call()
        return result

    def _warm_up(self, static: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.emulate:
            return tuple(t.clone() for t in self._run(static))
        current = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        # on the capture stream (as torch's make_graphed_callables warms up): libraries set up their
        # per-stream state (cuBLAS workspaces) there before the capture, not during it
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            result = self._run(static)
        current.wait_stream(self._stream)
        for t in result:
            t.record_stream(current)  # used there next: its memory must not go back to the capture stream before
        return tuple(result)

    def _record(self, static: list[torch.Tensor]) -> _Graph:
        if self.emulate:  # a "replay" calls fn on the static inputs and copies its results into the outputs
            outputs = tuple(t.clone() for t in self._run(static))

            def replay() -> None:
                for out, new in zip(outputs, self._run(static)):
                    out.copy_(new)

            return _Graph(static, outputs, replay)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's calls during the capture (a second GPU's worker allocating pinned
        # memory) are not errors of this capture. The outer stream context gives this thread its stream
        # back even when the capture fails (torch.cuda.graph's own then stays entered).
        with torch.cuda.stream(self._stream):
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                outputs = tuple(self._run(static))
        if self._pool is None:
            self._pool = graph.pool()  # the next shapes' graphs reuse this one's memory
        return _Graph(static, outputs, graph.replay)

    # -- ordering between calls ------------------------------------------------------------------------
    def _wait_for_last_call(self) -> None:
        """On a CUDA device: this call's stream waits until the previous call (maybe another thread's, on
        another stream) has copied the static outputs, before the static inputs are overwritten."""
        if self._last_call is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_call)

    def _mark_call(self) -> None:
        if not self.emulate:
            self._last_call = torch.cuda.Event()
            self._last_call.record(torch.cuda.current_stream(self.device))

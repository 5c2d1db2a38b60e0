"""Batches in flight on a device: results on their way to the host, and the thread that feeds the device.

A GPU runs a batch's kernels long after the Python calls that queue them return. Waiting for one batch's
results before queueing the next leaves the device idle while the host prepares the next batch (stacking
its pixels, uploading them, queueing the first kernels); on an H100 with ResNet-20 those idle stretches
took 20-30% of ``preempt protect``'s time (benchmarks/RESULTS.md). :class:`ComputeThread` queues the next
batch, when one is waiting, before it waits for the previous one, so the device always has work queued;
:class:`QueuedTransfer` brings a batch's results back without stopping the host.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

import torch

from .errors import error_chain

__all__ = ["QueuedTransfer", "ComputeThread"]

#: How often the compute thread, with a batch on the device and none waiting, looks again whether the
#: device has finished (it otherwise waits for the next batch to come).
_POLL_S = 0.0005


class QueuedTransfer:
    """Tensors copied to the host behind the work queued on their device, without waiting for it.

    On a GPU the copies go into pinned (page-locked) memory, asynchronously, on the device's current
    stream, and an event marks their end: :meth:`done` asks the device without waiting, :meth:`wait`
    waits. Tensors on the CPU are on the host already: that transfer is done when it is made.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._event: torch.cuda.Event | None = None
        if tensors and tensors[0].device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                          for t in tensors]  # fmt: skip
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensors[0].device))  # that device's, whichever is current
        else:
            self._host = [t.cpu() for t in tensors]

    def done(self) -> bool:
        """Whether the tensors have arrived (never waits)."""
        return self._event is None or self._event.query()

    def wait(self) -> list[torch.Tensor]:
        """The tensors on the host, once they have arrived."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


class Launched(Protocol):
    """What :class:`ComputeThread`'s ``launch`` returns: a batch's work queued on a device."""

    def done(self) -> bool: ...


B = TypeVar("B")
L = TypeVar("L", bound=Launched)
R = TypeVar("R")

_STOP = object()


def _done(handle: Launched) -> bool:
    try:
        return handle.done()
    except Exception:  # a device error: finishing the batch raises it, into its future
        return True


def _fail(future: Future, error: BaseException) -> None:
    """Give ``error`` to ``future`` without what its finished frames hold: the tensors of a failed attempt
    (an out-of-memory error's activations) must not stay alive on the device while the next batches run."""
    for e in error_chain(error):  # the errors it was raised from hold frames too
        traceback.clear_frames(e.__traceback__)
    future.set_exception(error)


class _InFlight:
    """A launched batch: its future and device handle, when its launch started, and how long the host
    spent launching it (``credit``, when that happened in an earlier batch's time) or later batches
    within its time (``debit``)."""

    __slots__ = ("batch", "future", "handle", "start", "credit", "debit")

    def __init__(self, batch: Any, future: Future, handle: Any, start: float, credit: float) -> None:
        self.batch, self.future, self.handle, self.start = batch, future, handle, start
        self.credit, self.debit = credit, 0.0


class ComputeThread(Generic[B, L, R]):
    """A thread that computes batches one after the other, in the order they are submitted.

    Each batch goes through ``launch(batch)``, which queues its work on the device and returns a handle
    (whose ``done()`` says, without waiting, whether the device has finished it), then ``finish(batch,
    handle)``, which waits for it and gives the batch's result. With ``depth`` 2 the thread launches the
    next batch, when it is already waiting, before it finishes the previous one, so the device never
    idles while the host prepares a batch; a finished batch is finished before anything else is launched,
    so its results never wait for the next batch's compute (on a CPU, where launching is computing). With
    ``depth`` 1 each batch is finished before the next is launched.

    :meth:`submit` returns a future of ``(result, seconds)``: ``seconds`` is the batch's share of the
    thread's time, from its launch (or the previous batch's finish, when later) to its finish, with the
    host's time launching a later batch meanwhile moved to that batch; the seconds of all batches add up
    to the thread's busy time. An exception of ``launch`` or ``finish`` (any, ``KeyboardInterrupt``
    included) goes to the batch's future, without the locals of its finished frames (a failed attempt's
    tensors are freed at once), and the thread goes on with the next batch.
    """

    def __init__(self, launch: Callable[[B], L], finish: Callable[[B, L], R], *, depth: int = 2,
                 name: str = "preempt-compute", initializer: Callable[[], Any] | None = None) -> None:  # fmt: skip
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._launch, self._finish, self.depth, self._initializer = launch, finish, depth, initializer
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, batch: B) -> Future[tuple[R, float]]:
        """Queue a batch; its future gives ``(finish's result, seconds)``."""
        if self._stopped:
            raise RuntimeError("cannot submit a batch after shutdown")
        future: Future[tuple[R, float]] = Future()
        self._jobs.put((batch, future))
        return future

    def cancel_pending(self) -> None:
        """Cancel the batches not launched yet, without waiting: those launched still finish (a batch on
        the device cannot be cut short), and their futures give their results."""
        self._cancelled.set()

    def shutdown(self, *, cancel_futures: bool = True) -> None:
        """Stop after the batches submitted so far (with ``cancel_futures``: after those already launched,
        cancelling the others), and wait for the thread."""
        self._stopped = True
        if cancel_futures:
            self._cancelled.set()
        self._jobs.put(_STOP)
        self._thread.join()

    # -- the thread ------------------------------------------------------------------------------------
    def _serve(self) -> None:
        failed_start: BaseException | None = None
        try:
            if self._initializer is not None:
                self._initializer()
        except BaseException as e:  # every batch fails with it (none would otherwise ever finish)
            failed_start = e
        launched: collections.deque[_InFlight] = collections.deque()  # oldest first
        last_finish = 0.0
        stopping = False
        while launched or not stopping:
            if launched and (_done(launched[0].handle) or len(launched) >= self.depth or stopping):
                last_finish = self._finish_oldest(launched, last_finish)
                continue
            job = self._jobs.get() if not launched else self._next_or_none(launched[0].handle)
            if job is None:  # the oldest batch finished before another came
                continue
            if job is _STOP:
                stopping = True
                continue
            batch, future = job
            if self._cancelled.is_set():
                future.cancel()
            if not future.set_running_or_notify_cancel():
                continue
            if failed_start is not None:
                future.set_exception(failed_start)
                continue
            start = time.perf_counter()
            try:
                handle = self._launch(batch)
            except BaseException as e:  # the caller's to handle (or to re-raise: KeyboardInterrupt)
                _fail(future, e)
                continue
            credit = 0.0
            if launched:  # launched within the oldest batch's time: the time is this batch's own
                credit = time.perf_counter() - start
                launched[0].debit += credit
            launched.append(_InFlight(batch, future, handle, start, credit=credit))
        while True:  # what was submitted after the stop
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                job[1].cancel()

    def _next_or_none(self, oldest: L) -> Any:
        """The next job if it comes before ``oldest`` is done on the device; None otherwise."""
        while True:
            try:
                return self._jobs.get(timeout=_POLL_S)
            except queue.Empty:
                if _done(oldest):
                    return None

    def _finish_oldest(self, launched: collections.deque[_InFlight], last_finish: float) -> float:
        oldest = launched.popleft()
        try:
            result = self._finish(oldest.batch, oldest.handle)
        except BaseException as e:
            _fail(oldest.future, e)
            return time.perf_counter()
        end = time.perf_counter()
        seconds = end - max(oldest.start, last_finish) - oldest.debit + oldest.credit
        oldest.future.set_result((result, seconds))
        return end

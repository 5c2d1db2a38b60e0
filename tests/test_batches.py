"""The compute thread's order of work: batches launched on a device before the previous one is waited
for, results in order, errors to their own batch, and a clean stop. The device is a stand-in (a batch is
done some time after its launch), so these run on any machine; tests/test_cuda.py runs the real one."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import QueuedWork, StandInDevice
from preempt_cli.batches import ComputeThread, QueuedTransfer


class RecordedDevice(StandInDevice):
    """A stand-in device driven as the compute thread drives one: ``launch(i)`` queues batch ``i`` (``seconds``
    each), ``finish(i, work)`` waits for it and returns ``i * 10``; ``events`` records each step in the order
    it happened, for the tests of that order."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.events: list[tuple[str, int]] = []

    def launch(self, batch: int) -> QueuedWork:
        self.events.append(("launch", batch))
        return self.queue()

    def finish(self, batch: int, work: QueuedWork) -> int:
        self.wait(work)
        self.events.append(("finish", batch))
        return batch * 10


def test_with_two_queued_each_batch_is_launched_before_the_previous_is_finished() -> None:
    device = RecordedDevice(0.05)
    thread = ComputeThread(device.launch, device.finish, depth=2)
    futures = [thread.submit(i) for i in range(5)]
    results = [f.result(timeout=10) for f in futures]
    thread.shutdown()
    assert [r for r, _ in results] == [0, 10, 20, 30, 40]
    for i in range(1, 5):  # the device always had the next batch before the host waited for one
        assert device.events.index(("launch", i)) < device.events.index(("finish", i - 1))
    # never more than two on the device
    on_device = 0
    for kind, _ in device.events:
        on_device += 1 if kind == "launch" else -1
        assert on_device <= 2
    # each batch's seconds are its share of the thread's time: together, about the whole run
    assert 0.2 <= sum(s for _, s in results) <= 1.0


def test_with_one_queued_each_batch_is_finished_before_the_next_is_launched() -> None:
    device = RecordedDevice(0.01)
    thread = ComputeThread(device.launch, device.finish, depth=1)
    assert [f.result(timeout=10)[0] for f in [thread.submit(i) for i in range(3)]] == [0, 10, 20]
    thread.shutdown()
    assert device.events == [(k, i) for i in range(3) for k in ("launch", "finish")]


def test_a_batch_done_on_the_device_is_finished_before_the_next_is_launched() -> None:
    """Where launching is computing (a CPU), the results of a batch must not wait for the next one."""
    device = RecordedDevice(0.0)
    thread = ComputeThread(device.launch, device.finish, depth=2)
    assert [f.result(timeout=10)[0] for f in [thread.submit(i) for i in range(4)]] == [0, 10, 20, 30]
    thread.shutdown()
    assert device.events == [(k, i) for i in range(4) for k in ("launch", "finish")]


def test_without_a_next_batch_the_thread_finishes_the_one_on_the_device() -> None:
    device = RecordedDevice(0.05)
    thread = ComputeThread(device.launch, device.finish, depth=2)
    assert thread.submit(7).result(timeout=10)[0] == 70  # no second batch ever comes: no deadlock
    thread.shutdown()


@pytest.mark.parametrize("where", ["launch", "finish"])
def test_an_error_goes_to_its_batch_and_the_next_batches_go_on(where: str) -> None:
    device = RecordedDevice(0.01)

    def launch(batch: int) -> QueuedWork:
        if where == "launch" and batch == 1:
            raise RuntimeError("boom")
        return device.launch(batch)

    def finish(batch: int, work: QueuedWork) -> int:
        if where == "finish" and batch == 1:
            raise KeyboardInterrupt  # any exception, Ctrl-C included, is the caller's to handle
        return device.finish(batch, work)

    thread = ComputeThread(launch, finish, depth=2)
    futures = [thread.submit(i) for i in range(3)]
    assert futures[0].result(timeout=10)[0] == 0
    with pytest.raises(RuntimeError if where == "launch" else KeyboardInterrupt):
        futures[1].result(timeout=10)
    assert futures[2].result(timeout=10)[0] == 20
    thread.shutdown()


@pytest.mark.parametrize("where", ["launch", "finish"])
def test_a_failed_batch_frees_what_it_held_before_the_next_batch_runs(where: str) -> None:
    """An out-of-memory error's traceback holds the failed attempt's activations; kept alive in the batch's
    future, they would crowd the device while the next batches run (and make those fail too)."""
    import weakref

    device = RecordedDevice(0.01)
    held: list[weakref.ref] = []
    alive_during_next: list[bool] = []

    def fail(batch: int) -> None:
        activations = torch.empty(1000)  # what the failed attempt had allocated
        held.append(weakref.ref(activations))
        try:
            raise RuntimeError("out of memory")
        except RuntimeError:  # raised again from a handler: the chain's frames hold it as well
            raise RuntimeError(f"batch {batch} failed") from None

    def launch(batch: int) -> QueuedWork:
        if where == "launch" and batch == 0:
            fail(batch)
        return device.launch(batch)

    def finish(batch: int, work: QueuedWork) -> int:
        if batch == 0 and where == "finish":
            fail(batch)
        if batch == 1:
            alive_during_next.append(held[0]() is not None)
        return device.finish(batch, work)

    thread = ComputeThread(launch, finish, depth=2)
    futures = [thread.submit(i) for i in range(2)]
    with pytest.raises(RuntimeError, match="batch 0 failed"):
        futures[0].result(timeout=10)
    assert futures[1].result(timeout=10)[0] == 10
    thread.shutdown()
    assert alive_during_next == [False]


def test_the_host_time_of_launching_a_batch_counts_for_that_batch() -> None:
    """A launch that takes the host's time (a batch that must wait for the device to be prepared) happens
    while an earlier batch is on the device; it is still the launched batch's time, not the earlier one's."""

    device = StandInDevice(0.05)

    def launch(batch: int) -> QueuedWork:
        time.sleep(0.2)
        return device.queue()  # the device is idle by then: done 0.05 s after this launch

    def finish(batch: int, work: QueuedWork) -> int:
        device.wait(work)
        return batch

    thread = ComputeThread(launch, finish, depth=2)
    start = time.monotonic()
    futures = [thread.submit(i) for i in range(3)]
    seconds = [f.result(timeout=10)[1] for f in futures]
    wall = time.monotonic() - start
    thread.shutdown()
    assert all(0.15 <= s <= 0.5 for s in seconds), seconds  # were [0.4, 0.2, 0.05]
    assert sum(seconds) <= wall + 0.01


def test_shutdown_finishes_what_is_on_the_device_and_cancels_what_waits() -> None:
    release = threading.Event()
    device = RecordedDevice(0.0)

    def launch(batch: int) -> QueuedWork:
        if batch == 0:
            release.wait(10)
        return device.launch(batch)

    thread = ComputeThread(launch, device.finish, depth=2)
    futures = [thread.submit(i) for i in range(4)]
    while not futures[0].running():
        time.sleep(0.001)
    stopper = threading.Thread(target=thread.shutdown)
    stopper.start()
    time.sleep(0.05)
    release.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert futures[0].result(timeout=0)[0] == 0
    assert all(f.cancelled() for f in futures[1:])
    with pytest.raises(RuntimeError, match="shutdown"):
        thread.submit(5)


def test_a_thread_that_cannot_start_fails_every_batch() -> None:
    def initializer() -> None:
        raise RuntimeError("no such device")

    thread = ComputeThread(lambda b: b, lambda b, h: b, initializer=initializer)
    for future in [thread.submit(i) for i in range(2)]:
        with pytest.raises(RuntimeError, match="no such device"):
            future.result(timeout=10)
    thread.shutdown()


def test_shutdown_without_cancelling_computes_every_batch_submitted() -> None:
    device = RecordedDevice(0.01)
    thread = ComputeThread(device.launch, device.finish, depth=2)
    futures = [thread.submit(i) for i in range(4)]
    thread.shutdown(cancel_futures=False)
    assert [f.result(timeout=0)[0] for f in futures] == [0, 10, 20, 30]
    with pytest.raises(RuntimeError, match="shutdown"):
        thread.submit(5)


def test_depth_is_checked() -> None:
    with pytest.raises(ValueError, match="depth"):
        ComputeThread(lambda b: b, lambda b, h: b, depth=0)


def test_a_transfer_from_the_cpu_is_done_at_once() -> None:
    a, b = torch.arange(6).view(2, 3), torch.ones(4, dtype=torch.uint8)
    transfer = QueuedTransfer([a, b])
    assert transfer.done()
    got = transfer.wait()
    assert torch.equal(got[0], a) and torch.equal(got[1], b)

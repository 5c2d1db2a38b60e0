"""Holding off Ctrl-C, SIGTERM and SIGHUP over a short step that must be done whole or not begun."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

#: The signals that stop a command as Ctrl-C does: SIGTERM is what ``kill``, ``timeout``, Slurm, Kubernetes and
#: systemd send, SIGHUP what a closed terminal sends (without a handler either killed the run mid-write,
#: leaving temporary files, and its I/O worker processes).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

#: The signals during a hold that deliver it at once: a user who insists can still stop a step that hangs.
INSISTING = 3


@contextmanager
def stops_held() -> Iterator[None]:
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) that comes during the block takes effect once the block is
    done: the first one is then delivered to the handler that was in place (the CLI's, which stops the
    command; Python's, which raises KeyboardInterrupt; the default, which ends the process). The third one
    during the block is delivered at once. A block that raises keeps its own error: the signals it held are
    dropped (the caller is stopping anyway, and its error says why).

    A handler is swapped in rather than the signals blocked (``pthread_sigmask``): blocked in the main
    thread alone, a signal still reaches the process through another thread (torch's), whose C handler
    then has the main thread run the Python one. Signals reach Python's handlers in the main thread only:
    elsewhere nothing is held. A signal the process ignores stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}

    def release() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        previous.clear()

    def hold(signum: int, frame: Any) -> None:
        caught.append(signum)
        if len(caught) >= INSISTING:
            release()
            signal.raise_signal(caught[0])

    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN and handler is not None:  # None: a handler not set from Python
            previous[signum] = signal.signal(signum, hold)
    try:
        yield
    except BaseException:
        release()
        raise
    held = bool(previous) and bool(caught)  # (none left held when the third one was delivered)
    release()
    if held:
        signal.raise_signal(caught[0])

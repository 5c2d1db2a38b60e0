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


#: The stop signal that ended the command before it began (see :func:`stop_as_interrupts`), None if none did.
stopped_before_start: int | None = None


def stop_as_interrupts() -> None:
    """Until a command installs its own handlers, SIGTERM and SIGHUP end the process as Ctrl-C does then, a
    KeyboardInterrupt that the entry point reports, noting the signal in :data:`stopped_before_start` (its
    exit code is 128 + its number). Their default action killed the process at once with nothing said:
    a Slurm job cancelled while torch was imported left no line in its log. A signal ignored (``nohup``'s
    SIGHUP) or given a handler by whoever started the process is left as it is. For the ``preempt``
    command's entry point only: a program importing the library keeps its signals."""
    for signum in STOP_SIGNALS:
        if signum != signal.SIGINT and signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _interrupt)


def _interrupt(signum: int, frame: Any) -> None:
    global stopped_before_start
    stopped_before_start = signum
    raise KeyboardInterrupt


def restore_default_stops() -> None:
    """Hand SIGTERM and SIGHUP back to their default action (the process's exit: a KeyboardInterrupt then
    would be "Exception ignored in atexit callback")."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is _interrupt:
            signal.signal(signum, signal.SIG_DFL)


def exit_code(signum: int | None) -> int:
    """The exit code of a command that the stop signal ``signum`` ended (None: Ctrl-C's): 128 + its number,
    as shells report it (130 for Ctrl-C)."""
    return 128 + (signum or signal.SIGINT)


def said_by(signum: int | None) -> str:
    """How an ``interrupted`` line names the stop signal ``signum``: " by SIGTERM" (or SIGHUP); "" for Ctrl-C
    (or None)."""
    return "" if signum in (None, signal.SIGINT) else f" by {signal.Signals(signum).name}"

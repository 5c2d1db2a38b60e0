"""``python -m preempt_cli``, and the ``preempt`` command (pip's launcher calls :func:`main`)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable


def main() -> None:
    """Console entry point. The CLI's imports (torch) take a second or two; Ctrl-C meanwhile ends the
    command as Ctrl-C does later (exit 130), not with a traceback of the import machinery."""
    # what a script asks first (-V as pip and ruff take it), answered without importing torch (~1.5 s)
    if sys.argv[1:] in (["--version"], ["-V"]):
        from . import __version__

        try:
            print(f"preempt {__version__}", flush=True)
        except BrokenPipeError:  # `preempt --version | true`: as the commands do (141), without a traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        return
    from . import _signals

    _signals.stop_as_interrupts()  # SIGTERM (scancel, timeout) meanwhile: said as Ctrl-C is, not a silent kill
    try:
        run_cli = _import_cli()
    except KeyboardInterrupt:
        # as the CLI says it (cli._common.INTERRUPTED_BEFORE_START), which this import did not reach
        stopped = _signals.stopped_before_start
        by = _signals.said_by(stopped)
        sys.stderr.write(f"error: interrupted{by}: before the command started, nothing was done\n")
        sys.exit(_signals.exit_code(stopped))
    run_cli()


def _import_cli() -> Callable[[], None]:
    """The CLI's entry point, imported with Ctrl-C (SIGTERM, SIGHUP) held until it is in: torch's C code
    imports numpy and drops an error raised meanwhile, so a press that landed there was lost (the command
    then ran, numpy unusable from torch). A press held is delivered once the import is over, as a
    KeyboardInterrupt here."""
    from ._signals import STOP_SIGNALS

    hold = hasattr(signal, "pthread_sigmask")
    if hold:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        from .cli import main as run_cli
    finally:
        if hold:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))
    return run_cli


if __name__ == "__main__":
    main()

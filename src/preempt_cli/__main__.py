"""``python -m preempt_cli``, and the ``preempt`` command (pip's launcher calls :func:`main`)."""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Console entry point. The CLI's imports (torch) take a second or two; Ctrl-C meanwhile ends the
    command as Ctrl-C does later (exit 130), not with a traceback of the import machinery."""
    if sys.argv[1:] == ["--version"]:  # what a script asks first, answered without importing torch (~1.5 s)
        from . import __version__

        try:
            print(f"preempt {__version__}", flush=True)
        except BrokenPipeError:  # `preempt --version | true`: as the commands do (141), without a traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        return
    try:
        from .cli import main as run_cli
    except KeyboardInterrupt:
        # as the CLI says it (cli._common.INTERRUPTED_BEFORE_START), which this import did not reach
        sys.stderr.write("error: interrupted: before the command started, nothing was done\n")
        sys.exit(130)
    run_cli()


if __name__ == "__main__":
    main()

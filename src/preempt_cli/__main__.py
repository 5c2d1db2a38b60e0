"""``python -m preempt_cli``, and the ``preempt`` command (pip's launcher calls :func:`main`)."""

from __future__ import annotations

import sys


def main() -> None:
    """Console entry point. The CLI's imports (torch) take a second or two; Ctrl-C meanwhile ends the
    command as Ctrl-C does later (exit 130), not with a traceback of the import machinery."""
    try:
        from .cli import main as run_cli
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted: before the command started, nothing was done\n")  # as later presses say
        sys.exit(130)
    run_cli()


if __name__ == "__main__":
    main()

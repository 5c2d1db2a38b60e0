"""What every command shares: options defined once, output streams, and the error -> exit code table."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from ..errors import (
    ConfigError,
    HashMismatchError,
    ImageReadError,
    ImageWriteError,
    LabelError,
    MissingDependencyError,
    OfflineWeightsError,
    PreemptError,
    RegistryError,
    UnknownModelError,
    UnsafeWeightsError,
    WeightsMismatchError,
    WeightsNotFoundError,
)

# Exit codes, as pip and ruff: 0 all done, 1 some inputs failed, 2 usage, configuration or setup error.
EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C

#: One table maps library errors to exit codes (anything else is an internal error: 2, with a hint).
ERROR_EXIT_CODES: dict[type[BaseException], int] = {
    ConfigError: EXIT_USAGE,
    RegistryError: EXIT_USAGE,
    UnknownModelError: EXIT_USAGE,
    WeightsNotFoundError: EXIT_USAGE,
    OfflineWeightsError: EXIT_USAGE,
    HashMismatchError: EXIT_USAGE,
    UnsafeWeightsError: EXIT_USAGE,
    WeightsMismatchError: EXIT_USAGE,
    LabelError: EXIT_USAGE,
    MissingDependencyError: EXIT_USAGE,
    ImageReadError: EXIT_FAILURES,
    ImageWriteError: EXIT_FAILURES,
}

stdout = Console(soft_wrap=True, highlight=False)
stderr = Console(stderr=True, soft_wrap=True, highlight=False)


def debug_enabled() -> bool:
    return os.environ.get("PREEMPT_DEBUG", "") not in ("", "0")


def setup_logging(verbose: int, quiet: bool) -> None:
    """Route the library's logging to stderr through rich (the library itself never prints)."""
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    root = logging.getLogger("preempt_cli")
    root.handlers.clear()
    handler = RichHandler(console=stderr, show_time=False, show_path=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def error_line(message: str) -> None:
    """``error: MESSAGE`` on stderr (red on a terminal)."""
    if stderr.is_terminal:
        stderr.print(f"[bold red]error[/]: {escape(message)}")
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)


@contextmanager
def handle_errors() -> Iterator[None]:
    """Turn library errors into one ``error:`` line on stderr and the table's exit code."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        # outputs written so far are complete (atomic writes); a re-run skips them and does the rest
        error_line("interrupted: outputs written so far are complete; run again to do the rest")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except PreemptError as e:
        if debug_enabled():
            raise
        error_line(str(e))
        code = next((c for t, c in ERROR_EXIT_CODES.items() if isinstance(e, t)), EXIT_USAGE)
        raise typer.Exit(code) from None
    except Exception as e:  # an internal error: say so plainly, traceback on request
        if debug_enabled():
            raise
        error_line(f"internal error: {type(e).__name__}: {e} (set PREEMPT_DEBUG=1 for the traceback)")
        raise typer.Exit(EXIT_USAGE) from None


def print_json(obj: Any) -> None:
    """One JSON object per line on stdout."""
    print_line(json.dumps(obj, sort_keys=False, default=str))


def print_line(text: str) -> None:
    """One line on stdout, flushed (a pipeline downstream sees each result as it comes). Plain writes, not
    rich's: rendering a line took ~35 us, a tenth of what an H100 spends on a small image."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# -- options shared by several commands ---------------------------------------------------------------
ModelsDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--models-dir",
        envvar="PREEMPT_MODELS_DIR",
        help="Folder holding local weights files named in the registry.",
        show_envvar=True,
    ),
]
RegistryOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--registry", help="Extra registry file (TOML) adding or overriding models; repeatable."),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda or cuda:I.", envvar="PREEMPT_DEVICE", show_envvar=True)
]
DevicesOpt = Annotated[
    str,
    typer.Option("--device", help="auto, cpu, cuda, cuda:I, a list cuda:0,cuda:1 or all (one worker per device).",
                 envvar="PREEMPT_DEVICE", show_envvar=True),
]  # fmt: skip
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per result on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary; errors only.")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")]

"""What every command shares: options defined once, output streams, and the error -> exit code table."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, NoReturn, Optional

import torch
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import Progress
from rich.text import Text

from ..device import resolve_devices
from .._paths import expand_home
from .. import _signals
from .._signals import STOP_SIGNALS
from ..imageio import display_name, name_max, quiet_pillow_warnings
from ..inputs import kernel_folder
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
from . import _logfile
from ._logfile import one_line

# Exit codes, as pip and ruff: 0 all done, 1 some inputs failed, 2 usage, configuration or setup error.
EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
# 128 + SIGPIPE: the reader of stdout went away (``preempt ... | head -1``). Python ignores SIGPIPE, so the
# write fails with BrokenPipeError instead of killing the process; exiting quietly with the status a shell
# reports for a tool killed by SIGPIPE (``find / | head -1``) keeps ``set -o pipefail`` scripts truthful
# without claiming, as 1 would, that some inputs failed.
EXIT_BROKEN_PIPE = 141

#: What each exit code means, for the last line of a ``--log`` file.
EXIT_MEANINGS = {EXIT_OK: "all done", EXIT_FAILURES: "some inputs failed", EXIT_USAGE: "usage, setup or internal error",
                 EXIT_INTERRUPTED: "interrupted", EXIT_BROKEN_PIPE: "stdout closed by its reader"}  # fmt: skip


def exit_status(exit_: SystemExit) -> int:
    """The exit code of a command that ended with ``exit_``: Click's and rich's 1 for a closed stdout met
    outside the commands (``preempt --help | head -1``) is 141, as the commands exit then (see ``main``)."""
    code = exit_.code
    if code is None:
        return EXIT_OK
    if not isinstance(code, int):  # sys.exit("message"): Python prints it and exits 1
        return 1
    if code == 1 and isinstance(exit_.__context__, BrokenPipeError):
        return EXIT_BROKEN_PIPE
    return code


def exit_meaning(code: int) -> str:
    """What exit code ``code`` means (128 + N: stopped by signal N)."""
    if code in EXIT_MEANINGS:
        return EXIT_MEANINGS[code]
    if 128 < code < 128 + 65:
        try:
            return f"stopped by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return ""


class StdoutWriteError(PreemptError):
    """The results cannot be written to stdout (``> /dev/full``, a full disk): the run failed where it
    was (exit 1), not at its use (exit 2 says the command line or the setup is wrong; a re-run with the
    same command line on a disk with room works)."""


#: One table maps library errors to exit codes (anything else is an internal error: 2, with a hint).
ERROR_EXIT_CODES: dict[type[BaseException], int] = {
    StdoutWriteError: EXIT_FAILURES,
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


class _StderrConsole(Console):
    """rich's Console, for stderr. rich answers a broken pipe by pointing *stdout* at /dev/null and exiting 1
    (read as 141, "stdout closed by its reader"), whichever stream broke: a reader of stderr gone
    (``preempt protect ... 2>&1 >results | head -1``) turned a finished run's 0 or 1 into 141 at its summary
    line (with ``-q``, which prints none, the run kept its 0 or 1), and ``train`` stopped at its first epoch
    line, its later output sent to /dev/null. Here it is an ``OSError`` that :func:`note` drops, as
    :func:`error_line` drops its own: nothing more can be said there; stdout and the exit code still say how
    the run went."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more is said there
        raise BrokenPipeError(errno.EPIPE, "stderr closed by its reader")


stdout = Console(soft_wrap=True, highlight=False)
stderr = _StderrConsole(stderr=True, soft_wrap=True, highlight=False)

#: Width of tables written to a pipe or file: wide enough that no row is wrapped or cut (a terminal's own
#: width is used on a terminal).
UNWRAPPED_WIDTH = 10_000


def debug_enabled() -> bool:
    return os.environ.get("PREEMPT_DEBUG", "") not in ("", "0")


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def stdout_is_terminal() -> bool:
    """Whether the results on stdout are shown on a terminal (not sent to a pipe or a file)."""
    return _is_tty(sys.stdout)


class _OneLineFormatter(logging.Formatter):
    """The message with its control characters escaped (:func:`one_line`), as the ``error:`` lines: a file
    name in it (a file skipped, a link not followed) must not reach a terminal as an escape code, nor split
    the line. A traceback (``exc_info``, at ``-vv``) keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


class _PlainFormatter(_OneLineFormatter):
    """``level: message`` on one line, as the ``error:`` lines (for logs written to a pipe or a file)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def setup_logging(verbose: int, quiet: bool) -> None:
    """Route the library's logging to stderr: through rich on a terminal, as plain unwrapped lines to a pipe
    or a file (rich pads and wraps its log lines to 80 columns there, breaking long paths); and, with
    ``--log``, all of it to that file (see :mod:`._logfile`)."""
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    root = logging.getLogger("preempt_cli")
    root.handlers.clear()
    handler: logging.Handler
    if stderr.is_terminal:
        handler = RichHandler(console=stderr, show_time=False, show_path=False, markup=False)
        handler.setFormatter(_OneLineFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter("%(message)s"))
    handler.setLevel(level)
    root.addHandler(handler)
    log_file = _logfile.current()
    if log_file is not None:  # the logger at debug for the file while the run lasts, at level after it
        root.addHandler(log_file)
        log_file.level_after = level
    root.setLevel(logging.DEBUG if log_file is not None else level)
    root.propagate = False
    quiet_pillow_warnings()


#: An ``error:`` line says at most this many characters of its reason (as escaped), then ``…`` and the
#: reason's length: an exception's message can hold text of any size (a decoder's, a value read from a file),
#: and 10 kB of it flooded the terminal and the ``--log`` file. What the line is about (a file's or a model's
#: name) is said whole before it: a path is bounded by the system (``PATH_MAX``).
ERROR_REASON_CHARS = 1000


def error_line(message: str, *, head: str | None = None, tail: str | None = None) -> None:
    """``error: [HEAD: ]MESSAGE[ (TAIL)]`` on stderr (red on a terminal), on one line; and into the ``--log``
    file. ``head`` (what the error is about: a file's or a model's name) and ``tail`` (a hint) are said whole,
    ``message`` (the reason) cut to :data:`ERROR_REASON_CHARS` characters (:func:`cut_reason`)."""
    message = cut_reason(message)
    if head is not None:
        message = f"{one_line(head)}: {message}"
    if tail is not None:
        message = f"{message} ({one_line(tail)})"
    _logfile.say(message, logging.ERROR)
    try:
        if stderr.is_terminal:
            stderr.print(f"[bold red]error[/]: {escape(message)}")
        else:
            print(f"error: {message}", file=sys.stderr, flush=True)
    except OSError:  # stderr on a full disk (a cron job's log), or closed: nowhere to say it; the exit code does
        pass


def cut_reason(text: str, limit: int = ERROR_REASON_CHARS) -> str:
    """``text`` on one line (:func:`one_line`); where that takes more than ``limit`` characters, as many of
    its escaped characters as fit in ``limit`` (an escape such as ``\\x1b`` is never split), ``…`` and the
    length of ``text``."""
    escaped = one_line(text[: limit + 1])  # escaping only lengthens: one character more tells a cut
    if len(escaped) <= limit:
        return escaped
    kept: list[str] = []
    used = 0
    for char in text[:limit]:
        piece = one_line(char)
        if used + len(piece) > limit:
            break
        kept.append(piece)
        used += len(piece)
    return f"{''.join(kept)}… ({len(text):,} characters)"


def note(line: str, *, shown: bool = True) -> None:
    """A line for the user on stderr (above a progress bar on a terminal; not ``shown`` with ``-q``), and
    always into the ``--log`` file: a summary, a note. Its control characters are escaped, as the
    ``error:`` lines': it names files and registries (``Report: DIR``, ``registries: FILE``)."""
    line = one_line(line)
    _logfile.say(line)
    if shown:
        try:
            stderr.print(line, markup=False, highlight=False)
        except OSError:  # stderr closed or on a full disk: nowhere to say it (as error_line); the run goes on
            pass


def log_only(line: str, level: int = logging.INFO) -> None:
    """A line into the ``--log`` file alone (what stderr leaves out with ``-q`` or ``--json``)."""
    _logfile.say(line, level)


class _Stop:
    """What stopped a command: the first stop signal's number (None: none came); and whether the main
    thread is listing a result (see :func:`listing`), when the stop waits until that is done."""

    signum: int | None = None
    listing: bool = False
    deferred: bool = False

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as shells report a command the signal killed (130 for Ctrl-C)."""
        return _signals.exit_code(self.signum)


def _line_start() -> bytes:
    """Where a line said from a signal handler starts: on a terminal, over the progress bar's line (the
    bar draws itself again below it), not after its text."""
    return b"\r\x1b[2K" if stderr.is_terminal else b""


def _say(message: str, start: bytes | None = None) -> None:
    """``message``, a line, on stderr from a signal handler (after ``start``: by default
    :func:`_line_start`), and into the ``--log`` file; a terminal hung up (the SIGHUP that stops the run)
    or a closed pipe must not raise inside the clean-up the handler interrupted."""
    _logfile.say(message, logging.WARNING)
    try:
        os.write(2, (_line_start() if start is None else start) + f"{message}\n".encode(errors="replace"))
    except OSError:
        pass


#: The stop of the command running in this process (None: no command, as where the library is used).
_current_stop: _Stop | None = None


def stop_signalled() -> bool:
    """Whether a stop signal (Ctrl-C, SIGTERM, SIGHUP) has come to the running command."""
    return _current_stop is not None and _current_stop.signum is not None


@contextmanager
def listing() -> Iterator[None]:
    """A result being listed on stdout: a stop (Ctrl-C, SIGTERM) that comes meanwhile takes effect once it
    is listed. Raised in the middle, it cut a JSON line in two (half written, the rest left in the buffer)
    or lost the line of a file on disk."""
    stop = _current_stop
    if stop is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    stop.listing = True
    try:
        yield
    finally:
        stop.listing = False
        if stop.deferred:
            stop.deferred = False
            raise KeyboardInterrupt


@contextmanager
def _stop_on_interrupt(stopping: str | None = None) -> Iterator[_Stop]:
    """Ctrl-C in stages. The first stops the command (``KeyboardInterrupt``): a run finishes the files being
    written, so that none is left half-written. Another press while it does so says that it is stopping,
    instead of interrupting that clean-up (which left threads running into the interpreter's exit: a C++
    abort, exit 134); a third quits at once (temporary files may be left; a re-run redoes those files).
    ``stopping``, if given, is said at the first press: a command that finishes work before it stops.
    SIGTERM and SIGHUP count as presses; the one that came first sets the exit code (see :class:`_Stop`).
    A signal the command was started ignoring stays ignored: ``nohup`` (SIGHUP), a background job of a
    script (SIGINT)."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return
    presses = 0

    def on_interrupt(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        _logfile.say(f"{signal.Signals(signum).name} received ({presses} so far)", logging.WARNING)
        if presses == 1:
            stop.signum = signum
            if stopping:
                by = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
                _say(f"preempt{by}: {stopping}")
            if stop.listing:  # raised once the result is listed (see listing)
                stop.deferred = True
                return
            raise KeyboardInterrupt
        # os.write, not print: a handler that prints while the main thread is printing raises "reentrant call"
        if presses == 2:
            _say("preempt: still stopping, finishing the files being computed and written (Ctrl-C again to quit "
                 "at once)")  # fmt: skip
            return
        restore_cursor = b"\x1b[?25h" if stderr.is_terminal else b""  # the progress bar hid it
        _say("preempt: quit before the files being written were finished", start=restore_cursor)
        _logfile.end(stop.exit_code, exit_meaning(stop.exit_code))
        os._exit(stop.exit_code)

    global _current_stop
    previous = {signum: signal.signal(signum, on_interrupt) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    _current_stop = stop
    try:
        yield stop
    finally:
        _current_stop = None
        if not presses:  # once interrupted, the stages last until the process has exited (its threads joined)
            for signum, handler in previous.items():
                if hold_late_stops:  # the command's entry point gives them back (release_late_stops)
                    _held_handlers.setdefault(signum, handler)
                    handler = _late_stop
                signal.signal(signum, handler)


#: Set by the ``preempt`` command's entry point (``cli.main``) while it runs a command: a stop (Ctrl-C,
#: SIGTERM, SIGHUP) that comes once the command has ended is then :func:`_late_stop`'s.
hold_late_stops = False
#: The handlers :func:`_late_stop` stands in for, by signal (:func:`release_late_stops` puts them back).
_held_handlers: dict[int, Any] = {}
#: The stop signals that came once the command had ended, in order.
_late_stops: list[int] = []


def _late_stop(signum: int, frame: Any) -> None:
    """A stop that comes once the command has ended (its summary said, its exit code chosen), while the
    process exits: its work is done, so its exit code stands, and a line says the stop came late. Given
    back to the handler in place before (Python's, which raises ``KeyboardInterrupt``; the one that says a
    stop before the command started), it was said as "interrupted: before the command started, nothing
    was done", with exit 130 or 143 and no exit code in the ``--log`` file. The third quits at once."""
    _late_stops.append(signum)
    name = signal.Signals(signum).name
    _logfile.say(f"{name} received after the command ended ({len(_late_stops)} so far)", logging.WARNING)
    if len(_late_stops) == 1:
        _say(f"preempt: {name} came after the command had ended: nothing was interrupted")
    elif len(_late_stops) >= _signals.INSISTING:  # a user who insists: the exit stops at once
        code = _signals.exit_code(_late_stops[0])
        _logfile.end(code, exit_meaning(code))
        os._exit(code)


def release_late_stops() -> None:
    """The command's entry point is done: its stop signals go back to the handlers they had (a caller of
    it that goes on, a notebook, keeps its Ctrl-C)."""
    global hold_late_stops
    hold_late_stops = False
    if threading.current_thread() is threading.main_thread():
        for signum, handler in _held_handlers.items():
            if signal.getsignal(signum) is _late_stop:
                signal.signal(signum, handler)
    _held_handlers.clear()
    _late_stops.clear()


#: Said of a Ctrl-C that comes before a command has begun its work (see :func:`handle_errors`).
INTERRUPTED_BEFORE_START = "interrupted: before the command started, nothing was done"


class CommandRun:
    """A command under :func:`handle_errors`: what a stop (Ctrl-C, SIGTERM) then says (``interrupted``),
    which the command changes as its work gets done (once its output is written and registered, "a re-run
    starts over" is no longer true)."""

    def __init__(self, interrupted: str) -> None:
        self.interrupted = interrupted


#: Whether a command of this process has begun its work (entered :func:`handle_errors`); until then a
#: Ctrl-C is said as :data:`INTERRUPTED_BEFORE_START` (``preempt_cli.cli.main``).
command_started = False


#: What a stop of a command that writes outputs says (see :func:`handle_errors`) once one is written ...
OUTPUTS_COMPLETE = "outputs written so far are complete; run again to do the rest"
#: ... and before (protect and revert): "outputs written so far are complete" of a stop before the first
#: output sent the user looking for files that were not there.
NOTHING_WRITTEN = "no output was written; run again to do the rest"


@contextmanager
def handle_errors(interrupted: str = OUTPUTS_COMPLETE, stopping: str | None = None) -> Iterator[CommandRun]:
    """Turn library errors into one ``error:`` line on stderr and the table's exit code; Ctrl-C (SIGTERM,
    SIGHUP) in stages (see :func:`_stop_on_interrupt`; ``stopping`` is said at the first), then
    ``interrupted`` says what a re-run does (the command may change it as its work gets done: see
    :class:`CommandRun`)."""
    global command_started
    _logfile.settings()
    stop = _Stop()
    run = CommandRun(interrupted)
    try:
        with _stop_on_interrupt(stopping) as stop:
            # begun once its handlers are in place: a stop before (SIGTERM while the settings were logged) then
            # ends it as one before it started, not with a silent exit 130 (Typer's, of any KeyboardInterrupt)
            command_started = True
            yield run
    except (KeyboardInterrupt, BrokenPipeError) as e:
        _end_stopped(e, stop, run.interrupted)
    except (typer.Exit, typer.Abort):
        raise
    except PreemptError as e:
        if debug_enabled():  # the traceback too, and the same exit code: a usage error stays 2
            traceback.print_exc(file=sys.stderr)
        _logfile.say(traceback.format_exc(), logging.DEBUG)
        error_line(str(e))
        code = next((c for t, c in ERROR_EXIT_CODES.items() if isinstance(e, t)), EXIT_USAGE)
        raise typer.Exit(code) from None
    except Exception as e:  # an internal error: say so plainly, traceback on request (always in a --log file)
        if debug_enabled():
            traceback.print_exc(file=sys.stderr)
        _logfile.say(traceback.format_exc(), logging.ERROR)
        error_line(str(e), head=f"internal error: {type(e).__name__}", tail="set PREEMPT_DEBUG=1 for the traceback")
        raise typer.Exit(EXIT_USAGE) from None


def _end_stopped(error: KeyboardInterrupt | BrokenPipeError, stop: _Stop, interrupted: str) -> NoReturn:
    """Exit a command that a stop signal (``KeyboardInterrupt``) or the reader of stdout going away
    (``BrokenPipeError``) ended."""
    if isinstance(error, BrokenPipeError):
        # The reader of stdout went away: stop quietly, as Unix tools do. Pointing stdout at /dev/null keeps
        # the interpreter's final flush from failing again (the recipe of Python's signal module docs).
        _silence_stdout()
        if stop.signum is None:
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        # else the Ctrl-C (SIGTERM) that stopped the run ended its reader too
    _interrupted_exit(stop, interrupted)


def _interrupted_exit(stop: _Stop, interrupted: str) -> NoReturn:
    """Say that the command was interrupted (``interrupted``: what a re-run does) and exit with the stop's
    code: outputs written so far are complete (atomic writes); a re-run skips them and does the rest."""
    try:
        error_line(f"interrupted{_signals.said_by(stop.signum)}: {interrupted}")
    except OSError:  # stderr was the terminal that hung up
        pass
    raise typer.Exit(stop.exit_code) from None


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, ValueError, OSError):  # stdout without a file descriptor (tests capture it)
        pass


def progress_bar(*columns: Any, quiet: bool) -> Progress | _NoProgress:
    """A progress bar on stderr, shown only on a terminal and without ``--quiet``.

    Results printed while it runs stay on stdout: rich moves stdout writes above the bar only when stdout
    is that terminal too; redirected (``> file``, ``| cat``), stdout is left alone, else its lines would go
    to the terminal instead of the file. Writes to stderr are moved above the bar (the same stream).
    """
    if quiet or not stderr.is_terminal:
        # no Progress at all: rich before 14.3 wrote an empty line to stderr when a disabled one stopped (a
        # stray line in a -q run's log, and an error on a full disk)
        return _NoProgress()
    return Progress(*columns, console=stderr, transient=True, redirect_stdout=_is_tty(sys.stdout),
                    redirect_stderr=True)  # fmt: skip


class _NoProgress:
    """What :func:`progress_bar` gives where no bar is shown: the calls of a :class:`~rich.progress.Progress`
    that the commands make, doing nothing."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None

    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None

    def remove_task(self, *args: Any, **kwargs: Any) -> None:
        return None


def print_table(table: Any) -> None:
    """A rich table on stdout: fitted to a terminal; to a pipe or a file, unwrapped (cells kept whole) and
    without the blanks that pad each line to the table's width."""
    if stdout.is_terminal:
        stdout.print(table)
        if _logfile.current() is not None:  # the --log file has the results as a pipe would
            _log_result(_unwrapped(table))
        return
    print_line(_unwrapped(table))


def table_cell(value: str) -> Text:
    """A string for a rich table (a cell, a title): its control characters escaped (a registry copied from
    elsewhere may hold escape codes, and a newline would split the row) and its brackets kept as written
    (rich reads a plain string as markup: a name's ``[bold]`` would vanish, ``[link=...]`` become a link)."""
    return Text(one_line(value))


def _unwrapped(table: Any) -> str:
    wide = Console(file=io.StringIO(), width=UNWRAPPED_WIDTH, highlight=False, soft_wrap=True, color_system=None)
    with wide.capture() as captured:
        wide.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


def folder_path(value: str) -> Path:
    """An output folder's path, ``~`` expanded as in input paths (a quoted ``'~/out'``: the folder checked
    is the folder written). An empty value (``-o "$OUT"`` with ``OUT`` unset) is refused: as ``Path("")``
    it would silently mean the current folder; so is ``-``, which elsewhere means stdout."""
    if not value:
        raise typer.BadParameter("empty (an unset variable?): give a folder, or leave the option out")
    if value == "-":
        raise typer.BadParameter("'-' is no folder: outputs are files; give a folder (./- if you mean one named so)")
    return expand_home(value, existing_literal=False)


def check_out_dir(path: Path | None, option: str = "--out-dir") -> None:
    """Refuse an output folder that cannot be used, before any work: a file of that name (or above it), or
    a folder that cannot be written or created.

    Raises:
        ConfigError: the folder cannot hold outputs.
    """
    if path is None:
        return
    path = expand_home(path, existing_literal=False)
    existing = path
    # os.path's tests, not Path's: they say False where the name cannot even be looked up (too long)
    while not os.path.exists(existing) and existing != existing.parent:
        if os.path.islink(existing):  # a link to nowhere: creating the folder would fail on every file
            raise ConfigError(f"{option} {path}: {existing} is a symbolic link to {os.readlink(existing)}, "
                              f"which does not exist")  # fmt: skip
        existing = existing.parent
    if kernel := kernel_folder(existing):
        raise ConfigError(f"{option} {path}: it leads into {kernel}, the kernel's, which holds no files")
    if os.path.exists(existing) and not os.path.isdir(existing):
        where = "" if existing == path else f" ({existing} is a file)"
        raise ConfigError(f"{option} {path}: not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "cannot be written" if existing == path else f"cannot be created ({existing} is not writable)"
        raise ConfigError(f"{option} {path}: {what}")
    longest = name_max(existing)
    for part in path.relative_to(existing).parts if longest is not None else ():
        if len(os.fsencode(part)) > longest:  # else every file fails, each blaming its own name
            raise ConfigError(f"{option} {path}: a folder name of {len(os.fsencode(part))} bytes, more than the "
                              f"{longest} a name can have here")  # fmt: skip


def one_device(spec: str) -> torch.device:
    """The device of a command that computes on one: ``spec`` as ``--device`` of protect takes it (a list, or
    ``all``, as ``PREEMPT_DEVICE`` may hold for protect), its first device.

    Raises:
        ConfigError: a device is unknown or unavailable.
    """
    devices = resolve_devices(spec)
    if len(devices) > 1:
        logging.getLogger("preempt_cli.cli").info("computing on %s, the first device of %r", devices[0], spec)
    return devices[0]


def print_json(obj: Any, *, allow_nan: bool = True) -> None:
    """One JSON object per line on stdout (``allow_nan=False``: strict JSON, a NaN raises ``ValueError``)."""
    print_line(json.dumps(obj, sort_keys=False, default=str, allow_nan=allow_nan))


def given_on_command_line(ctx: typer.Context, options: dict[str, str]) -> list[str]:
    """The options of ``options`` (parameter name: option) typed on the command line, not defaults nor
    taken from the environment."""
    # by name: typer vendors its own copy of click, whose ParameterSource is not click's
    return [option for name, option in options.items()
            if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]  # fmt: skip


def check_stdout() -> None:
    """Refuse a stdout that is closed (started with ``>&-``): the results would have nowhere to go.

    Raises:
        ConfigError: stdout is closed.
    """
    if sys.stdout is None:
        raise ConfigError("stdout is closed: the results have nowhere to go (send them to /dev/null to drop them)")


def print_result(text: str) -> None:
    """A result line on stdout through rich (``models show``, ``verify``, ``convert``), and into the
    ``--log`` file at debug level. Its control characters are escaped: it shows registry strings (a
    name, a description, a weights path) that must not reach a terminal as escape codes, nor split the line."""
    text = one_line(text)
    _log_result(text)
    try:
        stdout.print(text, markup=False)
    except BrokenPipeError:  # the reader went away: handle_errors stops quietly
        raise
    except OSError as e:  # a full disk: as print_line says it, not an internal error
        raise _stdout_failed(e) from e


def shown_path(path: str | os.PathLike[str]) -> str:
    """A result's path for stdout: as it is for the next command of a pipeline; on a terminal quoted where
    it holds control characters, as ``ls`` quotes it (a crafted name's escape codes must not reach it)."""
    return display_name(path) if stdout_is_terminal() else os.fspath(path)


def _log_result(text: str) -> None:
    if _logfile.current() is not None:  # the results too, at debug level
        _logfile.say("\n".join(f"stdout: {line}" for line in text.splitlines() or [""]), logging.DEBUG)


def print_line(text: str, end: str = "\n") -> None:
    """One line on stdout (ended by ``end``: ``"\\0"`` for ``--print0``), flushed (a pipeline downstream sees
    each result as it comes). Plain writes, not rich's: rendering a line took ~35 us, a tenth of what an
    H100 spends on a small image.

    Raises:
        ConfigError: stdout is closed.
        StdoutWriteError: stdout fails otherwise than by a reader gone (a full disk).
    """
    check_stdout()
    _log_result(text)
    line = text + end
    try:
        try:
            sys.stdout.write(line)
        except UnicodeEncodeError:
            # a name whose bytes are not of stdout's codec (os.fsdecode keeps them as surrogates): written
            # as those bytes, as ls and find write it, so that the next command of the pipeline finds it
            raw = getattr(sys.stdout, "buffer", None)
            encoding = sys.stdout.encoding or "utf-8"
            if raw is None:
                sys.stdout.write(line.encode(encoding, "backslashreplace").decode(encoding))
            else:
                sys.stdout.flush()
                try:
                    data = line.encode(encoding, "surrogateescape")
                except UnicodeEncodeError:  # a name stdout's codec has no letters for (ASCII, a code page)
                    data = os.fsencode(line)
                raw.write(data)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away: handle_errors stops quietly
        raise
    except OSError as e:
        raise _stdout_failed(e) from e


def _stdout_failed(error: OSError) -> StdoutWriteError:
    return StdoutWriteError(f"cannot write the results to stdout: {error.strerror or error}")


# -- options shared by several commands ---------------------------------------------------------------
ModelsDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--models-dir",
        metavar="DIR",
        envvar="PREEMPT_MODELS_DIR",
        help="Folder holding local weights files named in the registry.",
        show_envvar=True,
    ),
]
RegistryOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--registry", metavar="FILE", help="Extra registry file (TOML) adding or overriding models; repeatable."),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda or cuda:I (a list or all, as protect takes: the first "
                      "of them; this command computes on one device).", envvar="PREEMPT_DEVICE", show_envvar=True)
]
DevicesOpt = Annotated[
    str,
    typer.Option("--device", help="auto, cpu, cuda, cuda:I, a list cuda:0,cuda:1 or all (one worker per device).",
                 envvar="PREEMPT_DEVICE", show_envvar=True),
]  # fmt: skip
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per result on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress, summary, notes or warnings on stderr, "
                                        "only errors; the results still go to stdout.")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")]


def _log_option(ctx: typer.Context, value: Optional[str]) -> Optional[str]:
    """``--log FILE``: opened (appending) as soon as it is read, before the other options, so that their
    usage errors are recorded too; one that cannot be opened is a usage error (exit 2)."""
    if value is None or ctx.resilient_parsing:  # resilient: shell completion, nothing runs
        return value
    try:
        _logfile.check_log_name(value)
        _logfile.start(expand_home(value, existing_literal=False), ctx)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None  # Click names PREEMPT_LOG beside --log
    return value


LogOpt = Annotated[
    Optional[str],
    typer.Option("--log", metavar="FILE", envvar="PREEMPT_LOG", show_envvar=True, is_eager=True, callback=_log_option,
                 help="Append a full log to FILE (its folder created): the version, command line and settings, "
                 "every log line at debug level and every error, warning and summary line, whatever -q/-v say for "
                 "stderr, the results, and the exit code; timestamped, whole lines (several runs can share one "
                 "file)."),
]  # fmt: skip

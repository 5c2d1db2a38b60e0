"""``--log FILE`` (env ``PREEMPT_LOG``): all that a command says, at debug level whatever ``-q``/``-v`` say
for stderr, appended to a file (as ``pip --log``): a start line with the version, the command line, the
settings, the library's log records, each ``error:`` and ``warning:`` line, the summary, and the exit code.

Batch jobs (job arrays, cron, ``xargs -P``) lose stderr or interleave it, and several runs may share one
file: it is opened with ``O_APPEND``, and each record, a traceback included, is written whole by one
``write``, so that the lines of concurrent processes never cut into each other. Each line starts with a
timestamp, the process id and the level (``2026-11-27T14:03:12.511+01:00 [8123] error: a.png: ...``);
control characters are escaped, as on stderr. Only the CLI installs it (the library logs, never to files).
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError
from ..imageio import UNPRINTABLE, is_fifo

_LIBRARY = "preempt_cli"


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): a file name holding a newline
    must not split an error into two lines for whoever parses them, nor an escape code reach a terminal (that
    shows the log, or the ``error:`` lines of ``_common``, which uses this one)."""
    return UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


class LogFile(logging.Handler):
    """Writes the records of the library's loggers, and the lines the CLI says (:meth:`say`), to a file
    opened for appending (see the module's doc). A write that fails (a full disk) is dropped, and said
    once on stderr: the log must not fail the run it records, nor end without a word."""

    def __init__(self, path: Path, fd: int) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self._fd: int | None = fd
        self._cut = False  # a record was cut short by a failed write: the next one starts on a line of its own
        self._warned = False  # a failed write was said on stderr (once)
        #: the level the library's logger is left at when the log closes: the one it had, or the one
        #: ``setup_logging`` gave it for stderr (a log must not leave it at debug for a later run, or for
        #: the caller's own handlers, in a process that goes on)
        self.level_after = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # a record that cannot be formatted: as logging's own handlers report it
            self.handleError(record)
            return
        self.say(text, record.levelno, record.created)

    def say(self, text: str, level: int = logging.INFO, created: float | None = None) -> None:
        """``text`` as lines of ``level``, each with the timestamp, the process id and the level, in one
        write (a traceback stays in one piece among the lines of other processes)."""
        fd = self._fd
        if fd is None:
            return
        stamp = datetime.datetime.fromtimestamp(time.time() if created is None else created).astimezone()
        head = f"{stamp.isoformat(timespec='milliseconds')} [{os.getpid()}] {logging.getLevelName(level).lower()}: "
        data = "".join(f"{head}{one_line(line)}\n" for line in text.splitlines() or [""])
        raw = (b"\n" if self._cut else b"") + data.encode("utf-8", "backslashreplace")
        whole = len(raw)
        try:
            while raw:  # one write on a local file system; the loop covers a short one (a disk filling up)
                raw = raw[os.write(fd, raw):]
            self._cut = False
        except OSError as e:  # a full disk: the run goes on, its log incomplete (said once)
            self._cut = self._cut or len(raw) < whole
            if not self._warned:
                self._warned = True
                try:
                    sys.stderr.write(f"warning: --log {one_line(str(self.path))}: cannot write ({e.strerror or e}); "
                                     "the log is incomplete from here\n")  # fmt: skip
                    sys.stderr.flush()
                except (OSError, ValueError):  # stderr closed too
                    pass

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        super().close()


def check_log_name(value: str) -> None:
    """Refuse a ``--log`` value that names no file: empty (an unset variable), ``-`` (not stdout), or ending
    with a path separator (``--log logs/``: a folder, where a :class:`~pathlib.Path` of it drops the
    separator, and the log went to a file named as the folder, which then refused ``--log logs/run.log``).

    Raises:
        ConfigError: ``value`` names no file (says why).
    """
    if not value:
        raise ConfigError("empty (an unset variable?): give a file, or leave the option out")
    if value == "-":
        raise ConfigError("'-' is no file: the log goes to a file (./- if you mean one named so)")
    if value.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        raise ConfigError(f"{one_line(value)}: names a folder; name a file in it")


def open_log_file(path: Path) -> LogFile:
    """A :class:`LogFile` appending to ``path``, its folder created where missing.

    Raises:
        ConfigError: the file cannot be opened for appending (says the file and why).
    """
    shown = one_line(str(path))
    folder = path.parent
    if not os.path.isdir(folder):
        existing = folder
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if os.path.lexists(existing) and not os.path.isdir(existing):
            why = "it is a file" if existing == folder else f"{one_line(str(existing))} is a file"
            raise ConfigError(f"{shown}: cannot create its folder {one_line(str(folder))} ({why})")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{shown}: cannot create its folder {one_line(str(folder))} ({e.strerror or e})") from e
    if os.path.isdir(path):
        raise ConfigError(f"{shown}: is a folder; name a file in it")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)  # no child process inherits it
    # A named pipe that nothing reads would hold the opening until something does: refused at once instead
    no_wait = getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | no_wait, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO and is_fifo(path):
            raise ConfigError(f"{shown}: a named pipe that nothing reads (start its reader first)") from e
        raise ConfigError(f"{shown}: cannot be opened for appending ({e.strerror or e})") from e
    if no_wait:
        os.set_blocking(fd, True)  # a reader slower than the run makes it wait, as a file system does
    return LogFile(path, fd)


class _Run:
    """The ``--log`` of the command this process runs: its file (None: none), the command line, the
    context whose settings it records, and a usage error said before the file was opened."""

    file: LogFile | None = None
    argv: list[str] | None = None
    started: float = 0.0
    context: Any = None
    usage_error: str | None = None


_run = _Run()


def begin(argv: list[str]) -> None:
    """A command line is about to be parsed (``preempt``'s group): no log yet."""
    if _run.file is not None:  # a run that never ended (a caller of the group's main that went on)
        _detach(_run.file)
    _run.file, _run.argv, _run.started, _run.context, _run.usage_error = None, list(argv), time.monotonic(), None, None


def start(path: Path, context: Any = None) -> LogFile:
    """Open ``path`` (see :func:`open_log_file`) as this run's log: the library's records go to it at
    debug level, and it starts with the version, the host, the folder and the command line.

    Raises:
        ConfigError: the file cannot be opened.
    """
    log = open_log_file(path)
    if _run.file is not None:  # given twice (--log on the command line beside PREEMPT_LOG is one value)
        _detach(_run.file)
    _run.file, _run.context = log, context
    if _run.argv is None:
        _run.argv, _run.started = sys.argv[1:], time.monotonic()
    library = logging.getLogger(_LIBRARY)
    log.level_after = library.level
    library.addHandler(log)
    library.setLevel(logging.DEBUG)
    torch = sys.modules.get("torch")
    try:
        where = os.getcwd()
    except OSError as e:  # a folder removed under the run
        where = f"a folder that cannot be named ({e.strerror or e})"
    log.say(f"preempt {__version__} (Python {platform.python_version()}"
            f"{f', torch {torch.__version__}' if torch is not None else ''}, {platform.platform(terse=True)}) "
            f"on {platform.node() or 'an unnamed host'}, in {where}")  # fmt: skip
    log.say(f"command line: {shlex.join(['preempt', *_without_secrets(_run.argv)])}")
    shown = {k: v for k, v in os.environ.items() if k.startswith("PREEMPT_")}
    if shown:
        log.say("environment: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(shown.items())))
    if _run.usage_error is not None:  # said before the file was opened
        log.say(_run.usage_error, logging.ERROR)
        _run.usage_error = None
    return log


def current() -> LogFile | None:
    return _run.file


def say(text: str, level: int = logging.INFO) -> None:
    """``text`` into this run's log, if it has one (lines the CLI says on stderr, or keeps from it)."""
    if _run.file is not None:
        _run.file.say(text, level)


def usage_error(line: str) -> None:
    """A usage error of the parser (``error: ...``): into the log, or kept until :func:`end` opens it (an
    unknown option stops the parser before ``--log`` is read)."""
    if _run.file is not None:
        _run.file.say(line.removeprefix("error: "), logging.ERROR)
    else:
        _run.usage_error = line.removeprefix("error: ")


def _shown(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else [_shown(v) for v in value] if isinstance(value, (list, tuple)) else value


def settings() -> None:
    """The settings of the command about to run, as its parameters hold them (defaults filled in), and
    those taken from the environment. A secret (``keygen --secret-seed``) is said to be given, not shown."""
    context, log = _run.context, _run.file
    if log is None or context is None:
        return
    params = {name: "(secret)" if "secret" in name and value is not None else _shown(value)
              for name, value in context.params.items() if name != "log"}  # fmt: skip
    names, at = [], context
    while at is not None and at.parent is not None:  # the command's names, not the program's (python -m ...)
        names.insert(0, at.info_name)
        at = at.parent
    log.say(f"settings of {' '.join(names) or context.info_name}: {json.dumps(params, default=str)}", logging.DEBUG)
    envvars = {p.name: p.envvar for p in context.command.params}
    taken = [f"{name} ({envvars.get(name)})" for name in context.params
             if getattr(context.get_parameter_source(name), "name", None) == "ENVIRONMENT"]  # fmt: skip
    if taken:
        log.say(f"from the environment: {', '.join(taken)}", logging.DEBUG)


def end(code: int, meaning: str = "") -> None:
    """The run is over with exit code ``code``: say so in its log, and close it. Without a log but with a
    usage error of the parser, the log that the command line or ``PREEMPT_LOG`` names is opened to say
    it (else a job array with a typo in its options left an empty log)."""
    log = _run.file
    if log is None and _run.usage_error is not None:
        target = _log_named(_run.argv or [])
        if target:
            try:
                check_log_name(target)  # (refused, it may be the usage error: `--log -` made a file named -)
                log = start(Path(os.path.expanduser(target)))
            except ConfigError:  # stderr said the usage error
                pass
    if log is not None:
        elapsed = time.monotonic() - _run.started
        level = logging.INFO if code == 0 else logging.WARNING if code == 1 else logging.ERROR
        log.say(f"exit code {code}{f' ({meaning})' if meaning else ''} after {elapsed:.1f} s", level)
        _detach(log)
    _run.file, _run.context, _run.usage_error = None, None, None


#: Options whose value is a secret: the log says they were given, not what (``keygen --secret-seed``).
SECRET_OPTIONS = ("--secret-seed",)


def _without_secrets(argv: list[str]) -> list[str]:
    shown, hide_next = [], False
    for arg in argv:
        name = arg.partition("=")[0]
        if hide_next:
            arg, hide_next = "(secret)", False
        elif name in SECRET_OPTIONS:
            arg, hide_next = (f"{name}=(secret)", False) if "=" in arg else (arg, True)
        shown.append(arg)
    return shown


def _log_named(argv: list[str]) -> str | None:
    """The ``--log`` a command line the parser refused gives (the last), else ``PREEMPT_LOG``."""
    named = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--log" and i + 1 < len(argv):
            named = argv[i + 1]
        elif arg.startswith("--log="):
            named = arg.removeprefix("--log=")
    return named or os.environ.get("PREEMPT_LOG") or None


def _detach(log: LogFile) -> None:
    library = logging.getLogger(_LIBRARY)
    library.removeHandler(log)
    library.setLevel(log.level_after)  # records the handlers left do not take are not made
    log.close()


__all__ = ["LogFile", "begin", "current", "end", "open_log_file", "say", "settings", "start", "usage_error"]

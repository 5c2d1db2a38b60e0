"""The ``preempt`` command: a thin Typer layer over the library (each command parses, validates, makes
one library call and prints; results on stdout, progress and errors on stderr)."""

from __future__ import annotations

import atexit
import importlib.util
import logging
import signal
import sys
import threading
import traceback
from typing import Annotated, Any, NoReturn, Optional

import typer
import typer.core
import typer.rich_utils

from .. import __version__, _signals
from . import _common, _eval, _files, _logfile, _models, _train
from ._common import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED

_rich_format_error = typer.rich_utils.rich_format_error


def _usage_error_line(error: Exception) -> None:
    """Click's usage errors (an unknown option, a missing argument, a bad value) in one line on stderr, as
    preempt's own errors are, instead of rich's panel of five lines (also drawn into a pipe or a log).
    (``error`` is a ClickException of the click that Typer bundles, not necessarily the installed one.)"""
    if type(error).__name__ == "NoArgsIsHelpError":  # the help was shown: nothing to add
        return
    ctx = getattr(error, "ctx", None)
    # another Typer app in this process (the name of the command, not the program: python -m preempt_cli)
    if ctx is not None and ctx.find_root().command.name != "preempt":
        _rich_format_error(error)
        return
    line = _usage_error_text(error)
    _logfile.usage_error(line)
    sys.stderr.write(f"{line}\n")


def _usage_error_text(error: Exception) -> str:
    """``error: MESSAGE (see 'preempt CMD --help')``: a usage error of the parser, on one line, its control
    characters escaped: some Clicks (8.1) quote an unknown option as it was typed, and a script's arguments
    can be file names."""
    ctx = getattr(error, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    message = _common.one_line(" ".join(error.format_message().split()))
    return f"error: {message.rstrip('.') if hint else message}{hint}"


def _is_click_exception(error: BaseException) -> bool:
    """Whether ``error`` is one of Click's (a usage error, exit 2): by name, as the click that Typer bundles
    is not necessarily the installed one."""
    return any(cls.__name__ == "ClickException" for cls in type(error).__mro__)


# Typer formats click's usage errors with this function (it looks it up when one happens)
typer.rich_utils.rich_format_error = _usage_error_line


class _MetavarArgument(typer.core.TyperArgument):
    """An argument shown by its metavar alone (``PATH...``, ``NAME``, ``DATA``), as the options show theirs
    (``DIR``, ``FILE``, ``NAME``): Typer put the argument's name in braces in the usage line
    (``{paths}...``) and its Python type beside the metavar in the help (``<list[str]>``: as if it took a
    list in one value; ``<path>``). The metavar holds the ``...`` of a repeatable argument, as Click's do."""

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        return [self.metavar if self.required else f"[{self.metavar}]"]

    def display_type_rich(self, ctx: Any) -> None:
        """No Python type in the help's type column (Typer 0.29 and later; 0.28 shows Click's type name)."""
        return None


class _FlagOption(typer.core.TyperOption):
    """A flag (``--json``, ``--overwrite/--no-...``) or a counted option (``-v``, ``-vv``) shown by its names
    alone: Typer 0.29 put a type beside them, ``--json <bool>``, ``--verbose <int>``, as if they took a value
    (``--json true`` and ``-v 2`` read the value as a path)."""

    def display_type_rich(self, ctx: Any) -> None:
        return None

    def make_metavar(self, *args: Any, **kwargs: Any) -> str:  # Typer 0.28's help shows this in the type column
        return ""


def _show_arguments_by_metavar(command: Any) -> None:
    """Show the arguments of ``command`` and its subcommands that are given a metavar by it alone (see
    :class:`_MetavarArgument`), and its flags by their names alone (:class:`_FlagOption`). Typer builds every
    argument as a ``TyperArgument`` and every option as a ``TyperOption``, with no way to name another class."""
    for sub in getattr(command, "commands", {}).values():
        _show_arguments_by_metavar(sub)
    for param in command.params:
        if type(param) is typer.core.TyperArgument and param.metavar is not None:
            param.__class__ = _MetavarArgument
        elif type(param) is typer.core.TyperOption and (param.is_flag or param.count):
            param.__class__ = _FlagOption
    make_help_option = command.get_help_option

    def get_help_option(ctx: Any) -> Any:  # -h/--help, made when a help is first shown
        option = make_help_option(ctx)
        if type(option) is typer.core.TyperOption:
            option.__class__ = _FlagOption
        return option

    command.get_help_option = get_help_option


class _Preempt(typer.core.TyperGroup):
    """The ``preempt`` command: each run ends its ``--log`` file with its exit code (the commands open it,
    see ``_common.LogOpt``), whichever way it ends: an exit code, Ctrl-C, an error escaping the commands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _show_arguments_by_metavar(self)

    def main(self, args: Any = None, *more: Any, **kwargs: Any) -> Any:
        global _said_before_start
        _said_before_start = False
        _logfile.begin(list(sys.argv[1:] if args is None else args))
        try:
            result = super().main(args, *more, **kwargs)
        except SystemExit as exit_:
            if _stopped_while_parsing(exit_):  # its line and the stop's own code (143 for SIGTERM) in the log too
                code = _interrupted_before_start_code()
                _logfile.end(code, _common.exit_meaning(code))
                raise SystemExit(code) from None
            code = _common.exit_status(exit_)
            _logfile.end(code, _common.exit_meaning(code))
            raise
        except KeyboardInterrupt:  # as main() ends it
            _logfile.end(EXIT_INTERRUPTED, _common.exit_meaning(EXIT_INTERRUPTED))
            raise
        except BaseException as e:
            if _is_click_exception(e):
                # standalone_mode=False (a caller in Python): Click raises its usage error instead of printing it
                # and exiting with its code (2); the log says it as the command line's run does, not "exit 1"
                _logfile.usage_error(_usage_error_text(e))
                _logfile.end(e.exit_code, _common.exit_meaning(e.exit_code))
            else:  # Python ends the process with the traceback and 1
                _logfile.say(traceback.format_exc(), logging.ERROR)
                _logfile.end(1)
            raise
        code = result if isinstance(result, int) else _common.EXIT_OK  # standalone_mode=False
        _logfile.end(code, _common.exit_meaning(code))
        return result


app = typer.Typer(
    cls=_Preempt,
    name="preempt",
    help="Protect images against adversarial attacks before publishing them (Fast Preemption).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    epilog="[bold]Examples[/]\n\n  preempt protect ./photos\n\n"
    "  preempt protect ./photos --backbone preact18 --classifier resnext29-augmix\n"
    "      (the paper's models: convert their weights first, see 'preempt models convert --help')\n\n"
    "  preempt revert ./photos --white-box\n\n  preempt models list",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("protect", epilog=_files.PROTECT_EPILOG)(_files.protect)
app.command("revert", epilog=_files.REVERT_EPILOG)(_files.revert)
app.command("eval", epilog=_eval.EVAL_EPILOG)(_eval.eval_cmd)
app.command("train", epilog=_train.TRAIN_EPILOG)(_train.train_cmd)
app.command("keygen", epilog=_train.KEYGEN_EPILOG)(_train.keygen_cmd)
app.add_typer(_models.app, name="models")


def _version(value: bool) -> None:
    if value:
        print(f"preempt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        # -V as pip and ruff take it
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version."),
    ] = None,
) -> None:
    """Protect images against adversarial attacks before publishing them (Fast Preemption)."""


def main() -> None:
    """Console entry point."""
    global _said_before_start
    _launched_as_the_package()
    _common.command_started = False
    _said_before_start = False
    _common.hold_late_stops = True  # a stop once the command has ended leaves its exit code (see _common._late_stop)
    try:
        app()
    except KeyboardInterrupt:  # while Typer builds the command, before its own handling of Ctrl-C
        _interrupted_before_start()
    except SystemExit as exit_:
        # Click and rich answer a closed stdout met outside the commands (``preempt --help | head -1``) with
        # exit 1, raised while they handle the BrokenPipeError; exit as the commands do then (141: a closed
        # pipe, not a failed input), so ``set -o pipefail`` scripts tell the two apart.
        if _common.exit_status(exit_) == EXIT_BROKEN_PIPE and exit_.code != EXIT_BROKEN_PIPE:
            raise SystemExit(EXIT_BROKEN_PIPE) from None
        # Typer ends a Ctrl-C while it parses the arguments with a silent exit 130; later presses say what
        # they stopped, and so does this one (said already where the group's main saw it)
        if _stopped_while_parsing(exit_):
            _interrupted_before_start()
        raise
    finally:
        _common.release_late_stops()
        _ignore_interrupts_at_exit()


def _stopped_while_parsing(exit_: SystemExit) -> bool:
    """Whether ``exit_`` is Typer's silent exit 130 of a stop that came before the command began (while
    the arguments were parsed), not yet said."""
    return (exit_.code == EXIT_INTERRUPTED and not _common.command_started and not _said_before_start
            and _from_an_interrupt(exit_))  # fmt: skip


def _from_an_interrupt(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _interrupted_before_start() -> NoReturn:
    raise SystemExit(_interrupted_before_start_code()) from None


def _interrupted_before_start_code() -> int:
    """Say that a stop ended the command before it began (on stderr, and in the ``--log`` file where one is
    open: it said "exit code 130" of a SIGTERM that exited 143, without this line), once; its exit code."""
    global _said_before_start
    stopped = _signals.stopped_before_start  # SIGTERM, SIGHUP: see _signals.stop_as_interrupts
    if not _said_before_start:
        _said_before_start = True
        by = _signals.said_by(stopped)
        _common.error_line(_common.INTERRUPTED_BEFORE_START.replace("interrupted", f"interrupted{by}", 1))
    return _signals.exit_code(stopped)


#: Whether this run's stop before the command began has been said (the group's main says it where a log is open).
_said_before_start = False


def _ignore_interrupts_at_exit() -> None:
    """The command is over: a Ctrl-C while the interpreter exits (torch's atexit clean-up) printed
    "Exception ignored in atexit callback ... KeyboardInterrupt" after a run that had finished. So the
    exit ignores it: an atexit handler registered now runs before those registered earlier (torch's), and
    only at the exit (a caller of ``main`` that goes on keeps its Ctrl-C). Not after a press during the
    command: its stages of Ctrl-C (see ``_common``) last until the exit."""
    global _exit_handler_registered
    if not _exit_handler_registered:
        atexit.register(_ignore_interrupts)
        _exit_handler_registered = True


def _ignore_interrupts() -> None:
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if main_thread:  # SIGTERM and SIGHUP kill the exit as they would any process's
        _signals.restore_default_stops()


_exit_handler_registered = False


def _launched_as_the_package() -> None:
    # The ``preempt`` launcher script is ``python -m preempt_cli`` under another name. Saying so (a module
    # spec on it) keeps multiprocessing from running the launcher again in each I/O worker process of
    # ``--io processes``, where its ``import preempt_cli.cli`` would import torch: 1.5 s and hundreds of
    # MB per worker that only read and write image files.
    from .. import __main__ as package_main

    launcher = sys.modules.get("__main__")
    # pip's launcher calls the package's main (this one, in launchers written before 0.10.0)
    launched = getattr(launcher, "main", None) in (main, package_main.main)
    if launcher is not None and getattr(launcher, "__spec__", None) is None and launched:
        launcher.__spec__ = importlib.util.find_spec("preempt_cli.__main__")


__all__ = ["app", "main"]

"""Paths as users write them: a quoted ``~`` expanded as the shell would have (no heavy imports here:
``preempt models list`` needs this without Pillow or torch)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, overload

from .errors import InputConfigError

__all__ = ["expand_home", "file_kind", "open_regular_file", "output_folder", "OutputFolderField"]


def expand_home(path: str | os.PathLike[str], *, existing_literal: bool = True) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded, as a shell does for a word it was given quoted
    (``'~/photos'``). Not where the user is unknown or there is no home (``Path.expanduser`` raises
    RuntimeError then, which ended whole runs), nor, with ``existing_literal`` (inputs), where ``path``
    names an existing file as it is (``~x.png``): those stay literal, as the shell leaves them. Outputs
    pass ``existing_literal=False``: a ``./~/out`` left by an earlier mistake must not keep getting them."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.startswith("~") or (existing_literal and os.path.lexists(text)):
        return Path(text)
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def file_kind(mode: int) -> str:
    """What a file that is no regular file is, by its ``st_mode``, for a message ("a FIFO (a named pipe)")."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (a named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))  # fmt: skip
    return next((kind for is_kind, kind in kinds if is_kind(mode)), "not a regular file")


def open_regular_file(path: Path) -> tuple[int | None, int]:
    """``(fd, st_mode)``: ``path`` opened read-only, and what it is. Opened without blocking, then looked at on
    the open file, so that what is checked is what is read: a blocking open of a FIFO waits for a writer,
    forever, and a regular file checked by name could be a FIFO by the time it is opened. ``fd`` is None (and
    nothing is left open) where the file is no regular file; ``st_mode`` says what it is (:func:`file_kind`).

    Raises:
        OSError: it cannot be opened (missing, a looping link, no permission).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return fd, mode
    os.close(fd)
    return None, mode


def output_folder(value: Any, name: str = "out_dir") -> Path | None:
    """``value``, the path of a folder to write into (a ``str`` or ``os.PathLike``), as a Path with a
    leading ``~`` expanded (as :func:`~preempt_cli.inputs.collect_inputs` and ``load_model`` read one);
    None stays None. ``name`` names the argument in the message.

    Raises:
        InputConfigError: anything else, or an empty path (a ``ConfigError``, as ``RunOptions`` raised, and
            a ``TypeError``, as ``Evaluator`` did).
    """
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        # 3 wrote into ./3/, "" into the current folder
        raise InputConfigError(f"{name} must be a folder's path, got {value!r}")
    return expand_home(value, existing_literal=False)


class OutputFolderField:
    """A dataclass field holding :func:`output_folder` of what it is set to, None by default.

    Set from a ``str`` or ``os.PathLike[str]`` (README passes ``RunOptions(out_dir="out")``), read as a
    ``Path``. A descriptor, so that type checkers take the ``__init__`` argument's type from :meth:`__set__`
    and the attribute's from :meth:`__get__` (mypy and pyright do for dataclass fields): a plain
    ``Path | None`` field refused the documented ``str``, a ``str | Path`` one made every read a union.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> None: ...

    @overload
    def __get__(self, instance: object, owner: type) -> Path | None: ...

    def __get__(self, instance: object | None, owner: type) -> Path | None:
        if instance is None:
            return None  # what dataclass reads as the field's default
        try:
            # kept under the field's own name: vars(), copy and pickle see the Path
            return instance.__dict__[self.name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, instance: object, value: str | os.PathLike[str] | None) -> None:
        instance.__dict__[self.name] = output_folder(value, self.name)

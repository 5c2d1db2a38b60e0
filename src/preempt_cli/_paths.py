"""Paths as users write them: a quoted ``~`` expanded as the shell would have (no heavy imports here:
``preempt models list`` needs this without Pillow or torch)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["expand_home", "file_kind", "open_regular_file"]


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

"""Paths as users write them: a quoted ``~`` expanded as the shell would have (no heavy imports here:
``preempt models list`` needs this without Pillow or torch)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, overload

from .errors import InputConfigError

__all__ = ["expand_home", "file_kind", "folder_blocker", "make_folders", "open_regular_file", "output_folder",
           "owner_only", "OutputFolderField", "PRIVATE_FILE_MODE"]


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


#: A private file's permissions: read and written by its owner alone, as ssh-keygen writes a private key.
PRIVATE_FILE_MODE = 0o600


def owner_only(mode: int) -> bool:
    """Whether a file of ``st_mode`` ``mode`` is readable by its owner alone (a key, as ``keygen`` writes it):
    what is made from it is written so too."""
    return stat.S_IMODE(mode) & 0o077 == 0


def file_kind(mode: int) -> str:
    """What a file that is no regular file is, by its ``st_mode``, for a message ("a FIFO (a named pipe)")."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (a named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))  # fmt: skip
    return next((kind for is_kind, kind in kinds if is_kind(mode)), "not a regular file")


def folder_blocker(folder: Path) -> str | None:
    """What stands where ``folder`` or a missing folder above it would be created, or None: a file (``out`` of
    ``out/sub``: "out is a file, not a folder") or a symbolic link to nowhere. Nothing is created here."""
    existing = folder
    # os.path's tests, not Path's: they say False where the name cannot even be looked up (under a file)
    while not os.path.exists(existing) and existing != existing.parent:
        if os.path.islink(existing):  # exists() follows it: a link to nowhere is "missing", yet mkdir fails on it
            return f"{existing} is a symbolic link to nowhere (its target does not exist)"
        existing = existing.parent
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    return None


def make_folders(folder: Path) -> None:
    """Create ``folder`` and the missing folders above it (none where it exists).

    Raises:
        NotADirectoryError: a file or a link to nowhere stands where one of them goes; errno ENOTDIR, and a
            ``strerror`` that says so ("cannot create folder out/sub: out is a file, not a folder"). mkdir
            answers "File exists" (EEXIST) there, which a writer takes for its output having appeared
            meanwhile (another run's), and which names neither the folder nor the file in the way.
        OSError: the folder cannot be created for another reason (no permission, a full disk).
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTDIR):
            raise
        # the file may be gone by now (another process): still no EEXIST, which says the output exists
        blocker = folder_blocker(folder) or "something that is not a folder was in the way"
        raise NotADirectoryError(errno.ENOTDIR, f"cannot create folder {folder}: {blocker}") from e


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

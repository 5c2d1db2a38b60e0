"""Writes that fail as on a full or read-only disk, for tests: in this process (``failing_png_writes``, set
with monkeypatch) and in I/O worker processes (``write_pngs_failing``, which a worker unpickles by name:
this module imports nothing heavy, so a worker imports it at once); and slow writes (``write_pngs_slowly``,
in either), as a PNG encoder slower than the device makes them.

A failing output starts as a real one does (its temporary file beside it, see
:func:`~preempt_cli.imageio.write_png`), and its first bytes are written before the error, as when a disk
fills up mid-file."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Collection

from preempt_cli import imageio


def failing_png_writes(folders: Collection[str], error_number: int, real: Callable[..., Any],
                       marker: str | None = None) -> Callable[..., Any]:  # fmt: skip
    """``real`` (``imageio._png_in_temporary``, the start of every PNG write), except that outputs in
    ``folders`` fail with ``OSError(error_number)`` while their bytes are written; each failure creates the
    file ``marker`` (a sign that other processes see)."""

    def png_in_temporary(path: Path, picture: Any, color: Any, text: Any) -> Any:
        if str(Path(path).parent) in folders:
            with imageio._write_errors(path):
                temp = imageio._Temporary(path)
                try:
                    temp.file.write(b"\x89PNG\r\n\x1a\n")
                    if marker is not None:
                        Path(marker).touch()
                    raise OSError(error_number, os.strerror(error_number))
                finally:
                    temp.discard()
        return real(path, picture, color, text)

    return png_in_temporary


def write_pngs_failing(folders: Collection[str], error_number: int, marker: str | None, tasks: Any) -> Any:
    """:func:`~preempt_cli.imageio.write_pngs` in an I/O worker process, outputs in ``folders`` failing (see
    :func:`failing_png_writes`; a worker runs one chunk at a time, so the swap is its alone)."""
    real = imageio._png_in_temporary
    imageio._png_in_temporary = failing_png_writes(folders, error_number, real, marker)
    try:
        return imageio.write_pngs(tasks)
    finally:
        imageio._png_in_temporary = real


def write_pngs_slowly(seconds: float, gate: str | None, tasks: Any) -> Any:
    """:func:`~preempt_cli.imageio.write_pngs`, each task ``seconds`` late, and none before the file ``gate``
    exists (at most 30 s): on I/O threads or in I/O worker processes alike."""
    deadline = time.monotonic() + 30
    while gate is not None and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(seconds * len(tasks))
    return imageio.write_pngs(tasks)

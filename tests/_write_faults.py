"""Writes that fail as on a full or read-only disk, for tests: in this process (``failing_write_png``, set
with monkeypatch) and in I/O worker processes (``write_pngs_failing``, which a worker unpickles by name:
this module imports nothing heavy, so a worker imports it at once).

A failing output goes through :func:`~preempt_cli.imageio.atomic_write` as a real one does, and its first
bytes are written before the error, as when a disk fills up mid-file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Collection

from preempt_cli import imageio


def failing_write_png(folders: Collection[str], error_number: int, real: Callable[..., None],
                      marker: str | None = None) -> Callable[..., None]:  # fmt: skip
    """``real`` (:func:`~preempt_cli.imageio.write_png`), except that outputs in ``folders`` fail with
    ``OSError(error_number)`` while their bytes are written; each failure creates the file ``marker``
    (a sign that other processes see)."""

    def write_png(path: Any, picture: Any, color: Any = None, text: Any = None, *, fsync: bool = True,
                  replace: bool = True) -> None:  # fmt: skip
        if str(Path(path).parent) in folders:
            with imageio.atomic_write(Path(path), fsync=fsync, replace=replace) as f:
                f.write(b"\x89PNG\r\n\x1a\n")
                if marker is not None:
                    Path(marker).touch()
                raise OSError(error_number, os.strerror(error_number))
        real(path, picture, color, text, fsync=fsync, replace=replace)

    return write_png


def write_pngs_failing(folders: Collection[str], error_number: int, marker: str | None, tasks: Any) -> Any:
    """:func:`~preempt_cli.imageio.write_pngs` in an I/O worker process, outputs in ``folders`` failing (see
    :func:`failing_write_png`; a worker runs one chunk at a time, so the swap is its alone)."""
    real = imageio.write_png
    imageio.write_png = failing_write_png(folders, error_number, real, marker)
    try:
        return imageio.write_pngs(tasks)
    finally:
        imageio.write_png = real

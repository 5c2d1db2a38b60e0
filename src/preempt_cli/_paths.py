"""Paths as users write them: a quoted ``~`` expanded as the shell would have (no heavy imports here:
``preempt models list`` needs this without Pillow or torch)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["expand_home"]


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

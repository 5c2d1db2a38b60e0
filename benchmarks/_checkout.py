"""The checkout's ``src/`` first on ``sys.path``, for every script in ``benchmarks/``.

A benchmark in a checkout measures that checkout's code: with no ``PYTHONPATH=src`` and nothing installed
(a lent GPU machine), or with another checkout installed (an editable install elsewhere), the scripts
import ``preempt_cli`` from the ``src/`` beside them. ``python benchmarks/NAME.py`` puts ``benchmarks/``
first on ``sys.path``, so each script imports this module by name before it imports ``preempt_cli``.
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def put_checkout_src_first() -> None:
    """Put ``SRC`` first on ``sys.path`` where it holds ``preempt_cli`` (a copy of ``benchmarks/`` alone
    keeps whatever is installed). Call it before the first ``import preempt_cli``: a package already
    imported keeps the files it came from."""
    if not (SRC / "preempt_cli" / "__init__.py").is_file():
        return
    if sys.path[:1] != [str(SRC)]:
        sys.path.insert(0, str(SRC))

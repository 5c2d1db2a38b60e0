"""Percentages as preempt reports them: from exact counts, rounded by one rule.

Every accuracy, gain and share that ``preempt eval`` (its rows, paired tests and reversion protocol) writes or
prints is :func:`percent` of two integers. A figure computed from a float instead (a float32 mean of per-image
correctness, as 0.27.0 and earlier did) rounds a true x.xx5 by the float's error: 1 image of 160 (0.625%) gave
0.63 as a row's accuracy and 0.62 as a paired test's gain, and above about 2,000 images the float32 mean is
off by 0.01 points now and then even where the figure is no tie (1298 of 2011: 64.54, for 64.5450...).
"""

from __future__ import annotations

import math

__all__ = ["percent"]


def percent(count: int, total: int, decimals: int = 2) -> float:
    """``count`` of ``total`` in percent, rounded to ``decimals`` decimals half to even (as Python's ``round``
    rounds a number it holds exactly), in integer arithmetic: a true tie (1 of 800, 0.125%) rounds to the
    even last digit (0.12), never by a float's error. ``count`` may be negative (a loss, in points): one
    that rounds to zero gives -0.0, as ``round`` does.

    Returns:
        The float nearest the rounded decimal: its ``repr`` and ``f"{value:.{decimals}f}"`` give it exactly.

    Raises:
        ValueError: ``total`` below 1, or ``decimals`` negative.
    """
    if total < 1 or decimals < 0:
        raise ValueError(f"a percentage needs a total of at least 1 and decimals >= 0, not {total} and {decimals}")
    scale = 10**decimals
    quotient, remainder = divmod(100 * scale * count, total)  # floored: the same rule either side of zero
    if 2 * remainder > total or (2 * remainder == total and quotient % 2):
        quotient += 1
    return math.copysign(quotient / scale, count)  # int / int: the float nearest the exact quotient

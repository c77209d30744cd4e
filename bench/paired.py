"""Paired ratios: a contender over its reference, measured in the same round, and their spread."""

from __future__ import annotations

import statistics
from typing import Any


def spread(values: list[float]) -> dict[str, Any]:
    """The median of ``values``, their quartiles and their range."""
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4)
        # Of two values the quartiles are extrapolated past them (a ratio's q1 can even be
        # negative); from three on they lie within the values already.
        q1, q3 = max(q1, min(values)), min(q3, max(values))
    else:
        q1 = q3 = values[0]
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def ratios(values: list[float], base: list[float]) -> dict[str, Any]:
    """The spread of ``value / base`` over rounds, each pair measured in the same round."""
    return spread([v / b for v, b in zip(values, base, strict=True)])

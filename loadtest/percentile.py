"""Nearest-rank percentiles: every figure reported is a value that was observed."""

from __future__ import annotations

import math


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: always a value that was observed."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def stats(values: list[float], prefix: str = "") -> dict[str, float | None]:
    """p50, p99 and max of ``values`` (seconds, to the millisecond), keys prefixed; None for an empty list."""

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)
    return {f"{prefix}p50_s": r(percentile(values, 50)), f"{prefix}p99_s": r(percentile(values, 99)),
            f"{prefix}max_s": r(max(values) if values else None)}

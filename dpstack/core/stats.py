"""One summary of a set of timings, with the same keys in every JSON dpstack writes.

    {"n": 1000, "mean_ms": 1.2, "p50_ms": 1.1, "p99_ms": 3.4, "max_ms": 9.8}

Percentiles interpolate linearly between samples (numpy's default). No values gives
n 0 and None for the rest: every summary has the same keys and stays plain JSON.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

Summary = dict[str, float | None]  # "n" is an int


def summarize_ms(values: Iterable[float], scale: float = 1.0) -> Summary:
    """n, mean, p50, p99 and max of `values` times `scale`, in milliseconds
    (`scale=1e3` for values in seconds)."""
    return {k if k == "n" else f"{k}_ms": v for k, v in summarize(values, scale).items()}


def summarize(values: Iterable[float], scale: float = 1.0) -> Summary:
    """n, mean, p50, p99 and max of `values` times `scale` (counts, sizes: anything not a time)."""
    a = np.fromiter(values, dtype=np.float64) * scale
    if a.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(a, [50, 99])
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(p50), "p99": float(p99), "max": float(a.max())}


def format_ms(value: float | None, spec: str = ".2f") -> str:
    """A summary figure for a printed table: '-' where there were no values."""
    return "-" if value is None else format(value, spec)

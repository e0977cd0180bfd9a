"""Timing shared by the benchmarks (each is run as a script, so this folder is on ``sys.path``)."""

from __future__ import annotations

import time


def best_of(fn, repeats: int) -> float:
    """The shortest of ``repeats`` wall-clock timings of ``fn()``, in seconds: the least disturbed by other work."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)

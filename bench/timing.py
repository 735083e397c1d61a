"""Side-by-side timing: every variant of a comparison runs once per round, in turn, so that whatever else the
machine does (another process, the CPU clock) hits all of them alike; one warm-up round is not counted.

    times = interleave({"fp32": lambda i: f(i), "bf16": lambda i: g(i)}, reps=5)   # i = the round's index
    ratio(times, "fp32", "bf16")                          # median over rounds of fp32[r] / bf16[r]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


def interleave(variants: Mapping[str, Callable[[int], Any]], reps: int, warmup: int = 1,
               outputs: dict[str, list[Any]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each variant, `reps` rounds after `warmup` rounds; each call gets its round index.
    With `outputs`, what each timed call returned is kept there (e.g. scores, to compare variants)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            out = fn(max(0, r - warmup))
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
                if outputs is not None:
                    outputs.setdefault(name, []).append(out)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(times: Mapping[str, list[float]], slow: str, fast: str) -> float:
    """How many times faster `fast` is: the median over rounds of slow[r] / fast[r]. Both ran on the same input in
    the same round, so the round's request length and the machine's state at that moment cancel in each ratio
    (a ratio of the two medians can pair a long request's time with a short one's); lists of different lengths
    fall back to median(slow) / median(fast)."""
    a, b = times[slow], times[fast]
    if len(a) != len(b) or not a:
        return median(a) / median(b)
    return median([x / y for x, y in zip(a, b, strict=True)])

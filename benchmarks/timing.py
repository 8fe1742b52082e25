"""Wall-clock helpers shared by the latency, memory and overhead measurements."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List

import torch

__all__ = ["median_seconds", "seconds_list", "zero_predictor"]


def seconds_list(fn: Callable[[], object], repeats: int, warmup: int = 1) -> List[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (under no_grad)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The median of :func:`seconds_list`."""
    return statistics.median(seconds_list(fn, repeats, warmup))


def zero_predictor() -> Callable[..., torch.Tensor]:
    """A predictor that costs nothing: it returns a cached zero tensor shaped like its input.

    With it, a sampler's wall-clock is its own overhead (the operator math, the scheduler's
    bookkeeping, the executor), with no model time in it.
    """
    cache = {}

    def f(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        z = cache.get(key)
        if z is None:
            z = cache[key] = torch.zeros_like(x)
        return z

    return f

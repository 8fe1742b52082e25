"""Wall-clock helpers shared by the latency, memory and overhead measurements."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, List, Tuple, TypeVar

import torch

__all__ = ["median_seconds", "timed_runs", "zero_predictor"]

T = TypeVar("T")


def timed_runs(fn: Callable[[], T], repeats: int, warmup: int = 1) -> Tuple[List[float], T]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (under no_grad),
    and the last call's result."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        out, result = [], None
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            result = fn()
            out.append(time.perf_counter() - t0)
    return out, result


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The median wall-clock of :func:`timed_runs`."""
    return statistics.median(timed_runs(fn, repeats, warmup)[0])


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


@contextlib.contextmanager
def one_thread():
    """Run the block with one torch CPU thread (tiny tensors: thread wake-ups would cost more than the ops, 10x
    on a busy machine), then restore the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

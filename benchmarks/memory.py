"""The method's extra memory: peak tensor bytes of a DRiffusion run beyond the serial sampler's.

How it is measured (on the CPU, where torch has no allocator statistics): torch's profiler records
every tensor allocation and free of the run (``profile_memory=True``); replaying them in order gives
the live bytes over time, and the peak is taken over allocations made *during* the run (the model's
weights and the starting state, allocated before, are not counted). So the number is the peak of
tensor memory the sampler allocates: states, drafts, predictions, noise and the model's
activations, at op granularity (an allocator's scratch space inside one kernel is not seen). Where
a CUDA device is used, ``torch.cuda.max_memory_allocated`` gives the same quantity directly.

The analytical part of the extra: beside the anchor's state and prediction (which the serial
sampler holds too), a round of width n holds n drafts and their n predictions (and, for a
stochastic sampler, the n per-step noises): about ``(2 or 3) * n * state bytes``. With ``BatchedExecutor`` the
model also runs on n times the rows, so its activations grow n-fold; across n devices each holds one
share, which is what ``SerialExecutor`` shows here.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Callable, Iterator, List, Optional

import torch

from backends import BatchedExecutor, SerialExecutor
from benchmarks.cases import family
from benchmarks.config import BenchConfig
from benchmarks.latency import latency_models
from driffusion_core import DraftRefineScheduler, NoiseSource
from solvers import sample_serial

__all__ = ["peak_cpu_tensor_bytes", "run_memory", "METHOD"]

METHOD = (
    "CPU: peak live tensor bytes allocated during the run, replayed from torch.profiler's allocation "
    "events (profile_memory=True); the model's weights and the starting state are not counted."
)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines) for the block."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced (e.g. captured by pytest)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def peak_cpu_tensor_bytes(fn: Callable[[], object], warmup: int = 1) -> Optional[int]:
    """Peak bytes of CPU tensors allocated and still alive at any point while ``fn`` runs.

    ``fn`` is called ``warmup`` times first, untracked, so one-time allocations (kernel caches,
    lazily built buffers) are not charged to it. Returns None where the profiler's memory
    timeline is unavailable in this torch build.
    """
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action
    except ImportError:  # pragma: no cover - depends on the torch build
        return None
    with torch.no_grad():
        for _ in range(warmup):
            fn()
    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")
        with torch.no_grad(), profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            fn()
        timeline = prof._memory_profile().timeline
    live, current, peak = {}, 0, 0
    for _, action, (key, _version), size in timeline:
        if action == Action.CREATE:
            current += size - live.get(key, 0)  # a key created again was freed unseen: count it once
            live[key] = size
        elif action == Action.DESTROY and key in live:
            current -= live.pop(key)
        peak = max(peak, current)
    return peak


def _cuda_peak(fn: Callable[[], object]) -> int:
    with torch.no_grad():
        fn()  # warm-up: kernel workspaces and caches are not the method's memory
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_memory(cfg: BenchConfig, tick: Callable[[str], None] = lambda _: None) -> dict:
    """Peak bytes of the serial sampler and of DRiffusion per executor and width, on the timed models."""
    rows: List[dict] = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for fam in cfg.memory_families:
        transition, grid, _ = family(fam, cfg.memory_steps)
        for m in latency_models(cfg):
            for device in devices:
                f = m["predictor"].to(device)
                x = NoiseSource(cfg.seed_x).initial(m["shape"], device=device)
                noise = NoiseSource(cfg.seed_noise)
                state_bytes = x.numel() * x.element_size()
                measure = peak_cpu_tensor_bytes if device == "cpu" else _cuda_peak
                serial = measure(lambda: sample_serial(f, x, transition, grid, noise=noise))
                tick(m["name"])
                rows.append({"family": fam, "model": m["name"], "device": device, "method": "serial sampler",
                             "executor": "-", "width": 1, "peak_bytes": serial, "extra_bytes": 0,
                             "state_bytes": state_bytes, "analytic_extra_bytes": 0})
                per_draft = 3 if transition.stochastic else 2
                for width in memory_widths(cfg):
                    sched = DraftRefineScheduler(transition, grid, width=width)
                    for ex in (SerialExecutor(), BatchedExecutor()):
                        peak = measure(lambda: sched.sample(f, x, executor=ex, noise=noise))
                        tick(m["name"])
                        rows.append({
                            "family": fam, "model": m["name"], "device": device, "method": "DRiffusion aggressive",
                            "executor": type(ex).__name__, "width": width, "peak_bytes": peak,
                            "extra_bytes": None if peak is None or serial is None else peak - serial,
                            "state_bytes": state_bytes, "analytic_extra_bytes": per_draft * width * state_bytes,
                        })
                m["predictor"].to("cpu")
    return {"num_steps": cfg.memory_steps, "method": METHOD + (" CUDA: torch.cuda.max_memory_allocated." if len(devices) > 1 else ""),
            "rows": rows}


def memory_widths(cfg: BenchConfig) -> List[int]:
    """The largest timed width (the extra grows linearly in n; one width shows it)."""
    return [max(cfg.latency_widths)] if max(cfg.latency_widths) > 1 else []


def memory_runs(cfg: BenchConfig) -> int:
    wide = memory_widths(cfg)
    devices = 1 + (1 if torch.cuda.is_available() else 0)
    return len(cfg.memory_families) * 2 * devices * (1 + 2 * len(wide))

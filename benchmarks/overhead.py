"""The scheduler's own cost per step: wall-clock with a zero-cost predictor, against diffusers.

With a predictor that returns a cached zero tensor, a sampler's time is all outside the model:
the skip-transition math, the scheduler's bookkeeping and checks, the executor. Per step means
divided by T (every sampler here advances T levels). The reference is diffusers' DDIMScheduler
(same linear schedule, trailing spacing, eta = 0): ``set_timesteps(T)`` once, then T calls of
``step(model_output, t, sample)`` on the same tensors, timed in the same run. diffusers is optional;
without it that row says so.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from backends import BatchedExecutor, SerialExecutor
from benchmarks.cases import family
from benchmarks.config import BenchConfig
from benchmarks.timing import median_seconds, zero_predictor
from driffusion_core import DraftRefineScheduler, NoiseSource
from solvers import sample_serial

__all__ = ["run_overhead", "SHAPES"]

SHAPES = ((16, 1, 8, 8), (4, 4, 64, 64))


def _diffusers_loop(num_steps: int) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    try:
        from diffusers import DDIMScheduler
    except Exception:  # diffusers is an optional extra
        return None
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)

    def loop(x: torch.Tensor) -> torch.Tensor:
        sched.set_timesteps(num_steps)
        eps = torch.zeros_like(x)
        for t in sched.timesteps:
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x

    return loop


def run_overhead(cfg: BenchConfig, tick: Callable[[str], None] = lambda _: None) -> dict:
    """Per-step wall-clock of each sampler with a zero-cost predictor, for each state shape."""
    transition, grid, _ = family("ddim", cfg.overhead_steps)
    T = len(grid)
    f = zero_predictor()
    ref = _diffusers_loop(T)
    rows: List[dict] = []
    checks: List[dict] = []
    for shape in SHAPES:
        x = NoiseSource(cfg.seed_x).initial(shape)
        name = "x".join(map(str, shape))
        reps = cfg.overhead_repeats

        def add(method: str, executor: str, width: int, fn: Optional[Callable[[], object]]):
            sec = median_seconds(fn, reps) if fn is not None else None
            tick(name)
            rows.append({"shape": name, "method": method, "executor": executor, "width": width,
                         "us_per_step": None if sec is None else 1e6 * sec / T})

        add("diffusers DDIMScheduler.step", "-", 1, (lambda: ref(x)) if ref is not None else None)
        if ref is not None:  # the two loops walk the same grid: same output from the same zero predictions
            ours, theirs = sample_serial(f, x, transition, grid).x, ref(x)
            checks.append({"check": f"overhead {name}: serial DDIM sampler equals diffusers' DDIM loop (zero predictor)",
                           "ok": bool(torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)),
                           "got": float((ours - theirs).abs().max()), "want": 0.0})
        add("serial sampler (DDIMSkip)", "-", 1, lambda: sample_serial(f, x, transition, grid))
        for width in cfg.latency_widths:
            sched = DraftRefineScheduler(transition, grid, width=width)
            for ex in (SerialExecutor(), BatchedExecutor()):
                add("DRiffusion aggressive", type(ex).__name__, width, lambda: sched.sample(f, x, executor=ex))
    return {"num_steps": T, "repeats": cfg.overhead_repeats, "diffusers": ref is not None, "rows": rows, "checks": checks}


def overhead_runs(cfg: BenchConfig) -> int:
    return len(SHAPES) * (2 + 2 * len(cfg.latency_widths))

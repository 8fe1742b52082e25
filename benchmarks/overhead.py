"""The scheduler's own cost per step: wall-clock with a zero-cost predictor, against diffusers.

With a predictor that returns a cached zero tensor, a sampler's time is all outside the model:
the skip-transition math, the scheduler's bookkeeping and checks, the executor. Per step means
divided by T (every sampler here advances T levels). The references are diffusers' DDIMScheduler
(same linear schedule, trailing spacing, eta = 0) for DDIM and DPMSolverMultistepScheduler (2M,
midpoint, trailing spacing, final sigma 0) for DPM-Solver++: ``set_timesteps(T)``, then T calls of
``step(model_output, t, sample)`` on the same tensors, timed in the same run. diffusers is optional;
without it those rows say so.
"""
from __future__ import annotations

import warnings
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


DIFFUSERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}
SAMPLERS = {"ddim": "DDIMSkip", "dpm": "DPMSolverSkip 2M"}


def _probe_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A cheap predictor that depends on the state and the model time, for the self-check."""
    return 0.1 * torch.tanh(x) + (t.to(x.dtype) / 1000).reshape(-1, *[1] * (x.dim() - 1))


def _diffusers_loop(kind: str, num_steps: int) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    try:
        import diffusers
    except Exception:  # diffusers is an optional extra
        return None
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  timestep_spacing="trailing")
    if kind == "ddim":
        sched = diffusers.DDIMScheduler(**common, set_alpha_to_one=True, clip_sample=False)
        kw = {"eta": 0.0}
    else:
        sched = diffusers.DPMSolverMultistepScheduler(**common)
        kw = {}

    def loop(x: torch.Tensor, model: Optional[Callable] = None) -> torch.Tensor:
        """diffusers' loop with zero predictions (timed), or with ``model(x, t)`` (the self-check)."""
        with warnings.catch_warnings():  # diffusers' own numpy-2 DeprecationWarning in set_timesteps
            warnings.simplefilter("ignore", DeprecationWarning)
            sched.set_timesteps(num_steps)
        eps = torch.zeros_like(x)
        for t in sched.timesteps:
            out = eps if model is None else model(x, t.reshape(1).expand(x.shape[0]))
            x = sched.step(out, t, x, **kw).prev_sample
        return x

    return loop


def run_overhead(cfg: BenchConfig, tick: Callable[[str], None] = lambda _: None) -> dict:
    """Per-step wall-clock of each sampler with a zero-cost predictor, for each state shape and family."""
    f = zero_predictor()
    rows: List[dict] = []
    checks: List[dict] = []
    have_diffusers = True
    for kind in ("ddim", "dpm"):
        transition, grid, _ = family(kind, cfg.overhead_steps)
        T = len(grid)
        ref = _diffusers_loop(kind, T)
        have_diffusers = have_diffusers and ref is not None
        for shape in SHAPES:
            x = NoiseSource(cfg.seed_x).initial(shape)
            name = "x".join(map(str, shape))
            reps = cfg.overhead_repeats

            def add(method: str, executor: str, width: int, fn: Optional[Callable[[], object]]):
                sec = median_seconds(fn, reps) if fn is not None else None
                tick(name)
                rows.append({"family": kind, "shape": name, "method": method, "executor": executor, "width": width,
                             "us_per_step": None if sec is None else 1e6 * sec / T})

            add(f"diffusers {DIFFUSERS[kind]}.step", "-", 1, (lambda: ref(x)) if ref is not None else None)
            if ref is not None:  # the timed loops walk the same grid with the same update: checked with a
                # predictor that depends on the state and the time (zero predictions would only rescale x, so
                # another grid with the same end points would pass)
                ours, theirs = sample_serial(_probe_model, x, transition, grid).x, ref(x, _probe_model)
                scale = float(theirs.abs().max())
                checks.append({"check": f"overhead {name}: serial {SAMPLERS[kind]} sampler equals diffusers' "
                                        f"{DIFFUSERS[kind]} loop (a state- and time-dependent predictor)",
                               "ok": bool(torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * scale)),
                               "got": float((ours - theirs).abs().max()), "want": 0.0})
            add(f"serial sampler ({SAMPLERS[kind]})", "-", 1, lambda: sample_serial(f, x, transition, grid))
            for width in cfg.latency_widths:
                sched = DraftRefineScheduler(transition, grid, width=width)
                for ex in (SerialExecutor(), BatchedExecutor()):
                    add("DRiffusion aggressive", type(ex).__name__, width, lambda: sched.sample(f, x, executor=ex))
    return {"num_steps": cfg.overhead_steps, "repeats": cfg.overhead_repeats, "diffusers": have_diffusers,
            "rows": rows, "checks": checks}


def overhead_runs(cfg: BenchConfig) -> int:
    return 2 * len(SHAPES) * (2 + 2 * len(cfg.latency_widths))

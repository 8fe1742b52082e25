"""Rounds and wall-clock per executor, on compute-bound models, as medians over repeats.

Models: the digits UNet at a small batch (an image model whose one call does not fill the machine)
and a wide MLP (time-conditioned, random weights: timing does not depend on training). For each,
the serial sampler, then DRiffusion (aggressive and conservative) at each width with
``SerialExecutor`` (the drafts one after another: same work, no parallelism, so it shows the
method's bookkeeping cost) and ``BatchedExecutor`` (the drafts of a round as one batched call: the
speedup one device gets when a call does not saturate it). The speedup column is the serial
sampler's median wall-clock over the row's; ``rounds speedup`` is T / rounds, what n devices give
when a round costs one model call. Multi-process numbers come from ``benchmarks.distributed_speedup``.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from backends import BatchedExecutor, SerialExecutor
from benchmarks.cases import family
from benchmarks.config import BenchConfig
from benchmarks.timing import median_seconds
from driffusion_core import DraftRefineScheduler, NoiseSource
from solvers import sample_serial

__all__ = ["TimeMLP", "latency_models", "run_latency"]

MODES = ("aggressive", "conservative")


class TimeMLP(nn.Module):
    """A wide time-conditioned MLP ``f(x: [B, D], t: [B]) -> [B, D]`` (random weights, for timing).

    Input: x concatenated with a sinusoidal embedding of t; ``depth`` hidden layers of ``hidden`` units.
    """

    def __init__(self, dim: int, hidden: int, depth: int, t_dim: int = 32, seed: int = 0):
        super().__init__()
        from benchmarks.models.common import timestep_embedding

        self._embed = timestep_embedding
        self.t_dim = t_dim
        torch.manual_seed(seed)
        layers: List[nn.Module] = [nn.Linear(dim + t_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers).eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, self._embed(t.float(), self.t_dim)], dim=1))


def _digits_unet() -> Tuple[nn.Module, str]:
    from benchmarks.models import load_digits_unet

    try:
        return load_digits_unet(), "trained weights"
    except FileNotFoundError:
        from benchmarks.models.digits import DigitsUNet

        torch.manual_seed(0)
        return DigitsUNet().eval().requires_grad_(False), "random weights (trained weights missing; timing is the same)"


def latency_models(cfg: BenchConfig) -> List[dict]:
    """The timed models: name, predictor, state shape, a note."""
    unet, note = _digits_unet()
    mlp = TimeMLP(cfg.mlp_dim, cfg.mlp_hidden, cfg.mlp_depth)
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    return [
        {"name": f"digits UNet, batch {cfg.latency_digits_batch}", "predictor": unet,
         "shape": (cfg.latency_digits_batch, 1, 8, 8), "note": f"{n_params(unet) / 1e6:.2f} M parameters, {note}"},
        {"name": f"MLP {cfg.mlp_depth}x{cfg.mlp_hidden}, batch {cfg.mlp_batch}", "predictor": mlp,
         "shape": (cfg.mlp_batch, cfg.mlp_dim), "note": f"{n_params(mlp) / 1e6:.2f} M parameters, random weights"},
    ]


def _cpu_executors(width: int) -> List[Tuple[str, object]]:
    return [("SerialExecutor", SerialExecutor()), ("BatchedExecutor", BatchedExecutor())]


def configs(
    transition, grid, widths, executors: Callable[[int], List[Tuple[str, object]]] = _cpu_executors
) -> List[Tuple[str, str, int, Optional[DraftRefineScheduler], object]]:
    """(method, executor name, width, scheduler, executor) of every timed run; the first is the serial sampler.

    ``executors(width)`` gives the (name, executor) pairs timed at that width, for both modes.
    """
    out = [("serial sampler", "-", 1, None, None)]
    for width in widths:
        for mode in MODES:
            if width == 1 and mode == "conservative":
                continue
            sched = DraftRefineScheduler(transition, grid, width=width, mode=mode)
            for name, ex in executors(width):
                out.append((f"DRiffusion {mode}", name, width, sched, ex))
    return out


def run_latency(cfg: BenchConfig, tick: Callable[[str], None] = lambda _: None) -> dict:
    """The executor table: for each model, the serial sampler and DRiffusion per executor and width.

    The repeats are interleaved (every configuration once, then again...), so a burst of load
    from elsewhere on the machine spreads over the configurations instead of hitting one.
    """
    transition, grid, _ = family("ddim", cfg.latency_steps)
    T = len(grid)
    rows: List[dict] = []
    models = latency_models(cfg)
    for m in models:
        f, x = m["predictor"], NoiseSource(cfg.seed_x).initial(m["shape"])
        m["call_seconds"] = median_seconds(lambda: f(x, grid.model_times[:1].expand(x.shape[0])), max(5, cfg.latency_repeats))
        runs_cfg = configs(transition, grid, cfg.latency_widths)
        runs = [(lambda: sample_serial(f, x, transition, grid)) if sched is None
                else (lambda sched=sched, ex=ex: sched.sample(f, x, executor=ex)) for _, _, _, sched, ex in runs_cfg]
        times: List[List[float]] = [[] for _ in runs]
        rounds: List[int] = [0] * len(runs)
        with torch.no_grad():
            for fn in runs:  # warm-up
                fn()
            for _ in range(max(1, cfg.latency_repeats)):
                for k, fn in enumerate(runs):
                    t0 = time.perf_counter()
                    rounds[k] = fn().rounds
                    times[k].append(time.perf_counter() - t0)
                    tick(m["name"])
        serial = statistics.median(times[0])
        for (method, executor, width, _, _), ts, r in zip(runs_cfg, times, rounds):
            sec = statistics.median(ts)
            rows.append({"model": m["name"], "method": method, "executor": executor, "width": width, "rounds": r,
                         "seconds": sec, "speedup": serial / sec, "rounds_speedup": T / r})
    return {
        "num_steps": T,
        "repeats": cfg.latency_repeats,
        "threads": torch.get_num_threads(),
        "models": [{"name": m["name"], "note": m["note"], "call_seconds": m["call_seconds"]} for m in models],
        "rows": rows,
    }


def latency_runs(cfg: BenchConfig) -> int:
    """Timed runs (for the progress bar's total)."""
    per_model = 1 + sum(2 * (1 if w == 1 else 2) for w in cfg.latency_widths)
    return 2 * per_model * max(1, cfg.latency_repeats)

r"""k-diffusion-style samplers: DRiffusion's Euler, Euler ancestral and DPM++ 2M against step skipping on Karras
sigmas.

``python -m benchmarks.kdiffusion_study [--batch 2000] [--steps 20,40]`` prints one table (a few seconds).

Problem: the exact 2-D ring oracle (``solvers.ring_mixture``, float64) as a k-diffusion denoiser
D(x, sigma) = E[x0 | x0 + sigma eps = x], on Karras et al.'s sigmas (``get_sigmas_karras``: sigma_min 0.002,
sigma_max 80, rho 7, a final 0), starting state ``NoiseSource(1).initial((batch, 2)) * sigmas[0]``. For each
sampler (``solvers.sample_driffusion``: Euler; ``solvers.sample_driffusion_ancestral``: Euler ancestral at
eta 1 and 0.5, its per-step noise ``NoiseSource(2)`` shared by the serial run, DRiffusion and step skipping;
``solvers.sample_driffusion_dpmpp_2m``: DPM++ 2M), width and mode: ratio = RMSE(DRiffusion - serial) / RMSE(step skipping - serial), the serial run being the sampler at
width 1 and step skipping the same sampler on every k-th sigma with DRiffusion's number of rounds (below 1:
DRiffusion is closer to the serial sample at equal latency).
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.cli import count, count_list
from benchmarks.metrics import rmse
from benchmarks.report import fmt, md_table
from driffusion_core import NoiseSource, WideWindowWarning
from solvers import (
    DPMSolverSkip, VEAncestralSkip, VEEulerSkip, VESchedule, ring_mixture, sample_driffusion, sample_driffusion_ancestral,
    sample_driffusion_dpmpp_2m, sample_step_skipping,
)
from solvers.interop import sigmas_grid

__all__ = ["SAMPLERS", "SETTINGS", "karras_sigmas", "run", "markdown", "main"]

SEED_NOISE = 2


def _ancestral(eta: float):
    """The Euler ancestral entry of :data:`SAMPLERS` at ``eta``: one NoiseSource for DRiffusion and step skipping."""
    noise = NoiseSource(SEED_NOISE)
    return (functools.partial(sample_driffusion_ancestral, eta=eta, noise=noise),
            lambda: VEAncestralSkip(VESchedule(), eta=eta), noise)


#: name -> (DRiffusion sampler, the transition step skipping uses on the coarse grid, the per-step noise or None)
SAMPLERS = {
    "Euler": (sample_driffusion, lambda: VEEulerSkip(VESchedule()), None),
    "Euler a (eta 1)": _ancestral(1.0),
    "Euler a (eta 0.5)": _ancestral(0.5),
    "DPM++ 2M": (sample_driffusion_dpmpp_2m,
                 lambda: DPMSolverSkip(VESchedule(), prediction="sample", lower_order_final=False), None),
}
#: (width, mode)
SETTINGS = ((2, "aggressive"), (4, "aggressive"), (4, "conservative"))
SEED_X = 1


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """k-diffusion's ``get_sigmas_karras(n, sigma_min, sigma_max, rho)`` (Karras et al. 2022, eq. 5), the final 0
    appended, computed in float64 and cast to ``dtype``."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def run(batch: int = 2000, steps: Sequence[int] = (20, 40)) -> List[Dict[str, object]]:
    """One row per (sampler, T, width, mode): rounds, both RMSEs to serial and their ratio (WideWindowWarning
    silenced inside: the short grids are part of the study)."""
    mix = ring_mixture()

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return mix.x0_eps(x, torch.ones_like(sigma), sigma)[0]

    rows = []
    with warnings.catch_warnings():  # width 4 at T = 20 is at the warning's threshold: studied here
        warnings.simplefilter("ignore", WideWindowWarning)
        for name, (sampler, transition, noise) in SAMPLERS.items():
            rows += _rows(name, sampler, transition, noise, denoiser, batch, steps)
    return rows


def _rows(name, sampler, transition, noise, denoiser, batch: int, steps: Sequence[int]) -> List[Dict[str, object]]:
    """The rows of one sampler."""
    rows = []
    for t in steps:
        sigmas = karras_sigmas(t)
        x = NoiseSource(SEED_X).initial((batch, 2), torch.float64) * sigmas[0]
        serial = sampler(denoiser, x, sigmas, width=1, disable=True)
        for width, mode in SETTINGS:
            out = sampler(denoiser, x, sigmas, width=width, mode=mode, disable=True, return_output=True)
            skip = sample_step_skipping(denoiser, x, transition(), sigmas_grid(sigmas, x.dtype), out.rounds, noise=noise).x
            d, s = rmse(out.x, serial), rmse(skip, serial)
            rows.append({"sampler": name, "steps": t, "width": width, "mode": mode, "rounds": out.rounds,
                         "driffusion_rmse": d, "skipping_rmse": s, "ratio": d / s if s > 0 else math.nan})
    return rows


def markdown(rows: List[Dict[str, object]]) -> str:
    return md_table(
        ["sampler", "T", "width", "mode", "rounds", "RMSE to serial", "step skipping", "ratio"],
        [[r["sampler"], str(r["steps"]), str(r["width"]), r["mode"], str(r["rounds"]), f"{r['driffusion_rmse']:.3g}",
          f"{r['skipping_rmse']:.3g}", fmt(r["ratio"], "x")] for r in rows],
    )


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kdiffusion_study", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--batch", type=count(), default=2000, help="samples per run (default 2000)")
    p.add_argument("--steps", type=count_list(minimum=3), default=[20, 40],
                   help="comma-separated step counts (>= 3: with 2, every method takes all 2 rounds)")
    a = p.parse_args(argv)
    print(f"ring oracle as a k-diffusion denoiser, float64, batch {a.batch}, seed {SEED_X}, Karras sigmas "
          "(0.002 .. 80, rho 7); ratio = DRiffusion's RMSE to serial / step skipping's at the same rounds")
    print(markdown(run(a.batch, a.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

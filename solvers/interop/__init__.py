"""Interop with the diffusers and k-diffusion ecosystems.

None of these modules imports diffusers at import time (a pipeline call or a scheduler *config*
imports it when used), so ``import solvers`` works without the optional extra.

* :func:`from_diffusers` -- a diffusers scheduler (or config) to ``(transition, grid)``
  (:func:`euler_state_scales`: the state's scaling for ``EulerDiscreteScheduler`` and its ancestral variant,
  whose transitions are :class:`EulerDiscreteAsDDIM` / :class:`EulerAncestralAsDDIM` on a
  :class:`SigmaGridSchedule`; flow grids called at other times than sigma * N get a :class:`FlowGridSchedule`).
* :class:`DiffusersPredictor` -- UNet2D / UNet2DCondition / SD3 transformer as ``f(x, t, **cond)``, CFG in one call.
* :class:`DRiffusionPipeline` -- run a DDPM / DDIM / Stable Diffusion / SDXL / SD3 / Flux pipeline with DRiffusion
  (DDIM, DDPM, DPM-Solver++ multistep, UniPC, Euler and Euler ancestral (Stable Diffusion) or flow-matching Euler
  scheduler).
* :func:`sample_driffusion` / :func:`sample_driffusion_ancestral` / :func:`sample_driffusion_dpmpp_2m` --
  k-diffusion-style samplers (Euler, Euler ancestral, DPM++ 2M) for denoisers ``D(x, sigma) -> x0``.
"""
from solvers.interop.diffusers_models import DiffusersPredictor
from solvers.interop.diffusers_schedulers import (
    EulerAncestralAsDDIM, EulerDiscreteAsDDIM, FlowGridSchedule, SigmaGridSchedule, euler_state_scales, from_diffusers,
)
from solvers.interop.kdiffusion import (
    sample_driffusion, sample_driffusion_ancestral, sample_driffusion_dpmpp_2m, sigmas_grid,
)
from solvers.interop.pipelines import DRiffusionPipeline, calculate_shift

__all__ = [
    "from_diffusers",
    "euler_state_scales",
    "EulerDiscreteAsDDIM",
    "EulerAncestralAsDDIM",
    "SigmaGridSchedule",
    "FlowGridSchedule",
    "DiffusersPredictor",
    "DRiffusionPipeline",
    "calculate_shift",
    "sample_driffusion",
    "sample_driffusion_ancestral",
    "sample_driffusion_dpmpp_2m",
    "sigmas_grid",
]

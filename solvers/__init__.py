"""Concrete skip-transition families, the serial reference sampler, baselines and oracles."""
from solvers.ddim import DDIMSkip
from solvers.ddpm import DDPMSkip
from solvers.dpm import DPMSolverSkip
from solvers.flow import FlowEulerSkip
from solvers.unipc import UniPCSkip
from solvers.oracles import GaussianMixture, ring_mixture
from solvers.picard import PicardScheduler, fewest_rounds
from solvers.serial import coarse_indices, sample_serial, sample_step_skipping
from solvers.ve import VEAncestralSkip, VEEulerSkip, VESchedule
# interop never imports diffusers at import time (only when a pipeline or a scheduler config is used)
from solvers.interop import from_diffusers, sample_driffusion, sample_driffusion_ancestral, sample_driffusion_dpmpp_2m

__all__ = [
    "DDIMSkip",
    "DDPMSkip",
    "DPMSolverSkip",
    "UniPCSkip",
    "FlowEulerSkip",
    "sample_serial",
    "sample_step_skipping",
    "coarse_indices",
    "GaussianMixture",
    "ring_mixture",
    "VESchedule",
    "VEEulerSkip",
    "VEAncestralSkip",
    "from_diffusers",
    "sample_driffusion",
    "sample_driffusion_ancestral",
    "sample_driffusion_dpmpp_2m",
    "PicardScheduler",
    "fewest_rounds",
]

"""Concrete skip-transition families, the serial reference sampler, baselines and oracles."""
from solvers.ddim import DDIMSkip
from solvers.ddpm import DDPMSkip
from solvers.flow import FlowEulerSkip
from solvers.oracles import GaussianMixture, ring_mixture
from solvers.serial import coarse_indices, sample_serial, sample_step_skipping

__all__ = [
    "DDIMSkip",
    "DDPMSkip",
    "FlowEulerSkip",
    "sample_serial",
    "sample_step_skipping",
    "coarse_indices",
    "GaussianMixture",
    "ring_mixture",
]

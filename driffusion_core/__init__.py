"""driffusion_core: the math contract of DRiffusion (draft-and-refine parallel diffusion sampling).

Schedules, time grids, parameterizations, the abstract SkipTransition, NoiseSource, the
Executor protocol and the DraftRefineScheduler. Depends on torch and numpy (sympy only for symbolic
inputs to the coefficient functions).
"""
from driffusion_core import coefficients
from driffusion_core.errors import (
    DeviceMismatchError,
    DriffusionError,
    ExecutorError,
    InvalidArgumentError,
    InvalidTimestepsError,
    InvalidWidthError,
    PredictorOutputError,
    SamplingError,
    UnexpectedArgumentError,
    MeanStepWarning,
    TrainingModeWarning,
    WideWindowWarning,
)
from driffusion_core.executor import Executor, SerialExecutor
from driffusion_core.grid import TimeGrid
from driffusion_core.noise import NoiseSource
from driffusion_core.parameterization import ClipSample, DynamicThreshold, Prediction, reparameterize
from driffusion_core.scheduler import DraftRefineScheduler, DraftRefineState, Round, SampleOutput, expected_rounds
from driffusion_core.schedules import FlowSchedule, Schedule, VPSchedule
from driffusion_core.transition import History, SkipTransition

__version__ = "0.1.0"

__all__ = [
    "coefficients",
    "VPSchedule",
    "FlowSchedule",
    "Schedule",
    "TimeGrid",
    "Prediction",
    "reparameterize",
    "ClipSample",
    "DynamicThreshold",
    "SkipTransition",
    "History",
    "NoiseSource",
    "Executor",
    "SerialExecutor",
    "DraftRefineScheduler",
    "DraftRefineState",
    "Round",
    "SampleOutput",
    "expected_rounds",
    "DriffusionError",
    "InvalidTimestepsError",
    "InvalidWidthError",
    "InvalidArgumentError",
    "DeviceMismatchError",
    "PredictorOutputError",
    "ExecutorError",
    "SamplingError",
    "UnexpectedArgumentError",
    "MeanStepWarning",
    "TrainingModeWarning",
    "WideWindowWarning",
]

"""Built-in diffusion models for the benchmarks, trained by
``python -m benchmarks.models.train`` (weights committed in ``weights/``).

All are eps-prediction models for the linear DDPM schedule with 1000
training timesteps (see :mod:`benchmarks.models.common`), called as
``model(x: Tensor[B, ...], t: Tensor[B]) -> Tensor[B, ...]``.
"""
from .common import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    alphas_cumprod,
    betas,
    timestep_embedding,
)
from .digits import (
    digits_data,
    digits_frechet,
    frechet_distance,
    load_digits_classifier,
    load_digits_unet,
)
from .timeseries import load_timeseries_model, sliced_wasserstein, timeseries_data

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "add_noise",
    "alphas_cumprod",
    "betas",
    "timestep_embedding",
    "digits_data",
    "digits_frechet",
    "frechet_distance",
    "load_digits_classifier",
    "load_digits_unet",
    "load_timeseries_model",
    "sliced_wasserstein",
    "timeseries_data",
]

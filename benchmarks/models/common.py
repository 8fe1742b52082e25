"""What all built-in benchmark models share: the noise schedule, the time
embedding, the dtype/time-argument conventions and the weight files.

Noise schedule (standard DDPM linear schedule, in float64)::

    betas          = linspace(1e-4, 0.02, 1000)
    alphas_cumprod = cumprod(1 - betas)            # abar_t, t = 0 .. 999
    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps

Every model predicts ``eps`` and is called as ``model(x, t)`` with
``x: Tensor[B, ...]`` and ``t: Tensor[B]`` holding *training timesteps* in
``[0, 999]``; ``t`` may be an int or a float tensor (non-integer values are
fine: the sinusoidal embedding is continuous in ``t``), a 0-dim tensor or a
Python number (broadcast over the batch).

Dtypes: the weights are float32 and are never cast implicitly. Inputs of any
floating dtype are accepted: ``x`` is cast to the parameters' dtype, the
network runs in that dtype (float32 unless you called ``model.double()``)
and the output is cast back to the dtype of ``x``. So a float64 solver gets
float64 outputs, but they carry float32 precision.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import torch
from torch import nn

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def betas(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``Tensor[1000]``: the linear DDPM betas (computed in float64)."""
    return torch.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=torch.float64).to(dtype)


def alphas_cumprod(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``Tensor[1000]``: ``abar_t = prod_{s<=t} (1 - beta_s)`` (computed in float64)."""
    return torch.cumprod(1.0 - betas(torch.float64), dim=0).to(dtype)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward process at integer timesteps ``t: Tensor[B]``:
    ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (in the dtype of ``x0``)."""
    abar = alphas_cumprod().to(x0.device)[t.long()].to(x0.dtype)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return abar.sqrt().view(shape) * x0 + (1.0 - abar).sqrt().view(shape) * eps


def as_time_tensor(t: Union[torch.Tensor, float, int], batch: int, device: torch.device) -> torch.Tensor:
    """Normalise a time argument to a float32 ``Tensor[batch]``."""
    t = torch.as_tensor(t, device=device)
    t = t.to(torch.float32)
    if t.dim() == 0:
        t = t.expand(batch)
    t = t.reshape(-1)
    if t.shape[0] != batch:
        if t.shape[0] == 1:
            t = t.expand(batch)
        else:
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {batch}")
    return t


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``Tensor[B, dim]`` of float timesteps ``t: Tensor[B]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a 2-layer MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.dim).to(self.mlp[0].weight.dtype))


class EpsModel(nn.Module):
    """Base class handling the call conventions (dtype and time argument).

    Subclasses implement ``_forward(x, t)`` with ``x`` in the parameter dtype
    and ``t`` a float32 ``Tensor[B]``.
    """

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: Union[torch.Tensor, float, int]) -> torch.Tensor:
        p = next(self.parameters())
        in_dtype = x.dtype
        tt = as_time_tensor(t, x.shape[0], x.device)
        out = self._forward(x.to(p.dtype), tt)
        return out.to(in_dtype) if in_dtype.is_floating_point else out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_weights(model: nn.Module, filename: str, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load ``WEIGHTS_DIR / filename`` into ``model``; return it in eval mode,
    on ``device``, with gradients of the parameters switched off."""
    path = WEIGHTS_DIR / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python -m benchmarks.models.train`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


class EMA:
    """Exponential moving average of a model's parameters and buffers
    (decay warmed up as ``min(decay, (1 + n) / (10 + n))``)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.n = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.shadow.items()}

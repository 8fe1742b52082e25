"""A non-image diffusion model: synthetic 1-D time series of length 32.

Data (our own generator, seeded numpy RNG): each series is the sum of 1 or 2
(equally likely) sinusoids

    a * sin(2 pi f s / 32 + phi),   s = 0 .. 31,
    f ~ U(1, 4) cycles per window, phi ~ U(0, 2 pi), a ~ U(0.5, 1.5),

plus i.i.d. N(0, 0.05^2) noise, divided by ``TS_SCALE`` (the analytic std,
~0.90) so that the data has roughly unit scale. Shape ``[N, 1, 32]``
(channel dim 1, like a one-channel image row), float32.

The model is a dilated 1-D conv ResNet (GroupNorm, SiLU, time embedding
added per block) predicting eps, with the conventions of
:mod:`benchmarks.models.common` (linear DDPM schedule, ``model(x, t)`` with
``t`` an int or float ``Tensor[B]`` of training timesteps in [0, 999]).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from .common import EpsModel, TimeEmbedding, load_weights

LENGTH = 32
NOISE_STD = 0.05
# E[var] = E[#components] * E[a^2] / 2 + noise^2 = 1.5 * (13/12) / 2 + 0.05^2
TS_SCALE = math.sqrt(1.5 * (13.0 / 12.0) / 2.0 + NOISE_STD ** 2)
MODEL_FILE = "timeseries.pt"

TRAIN_SEED = 1234  # seed of the data stream used in training (fresh data every step)


def timeseries_data(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` series from the generator, ``Tensor[n, 1, 32]`` float32, reproducible per ``seed``."""
    rng = np.random.default_rng(seed)
    s = np.arange(LENGTH, dtype=np.float64)[None, :]
    n_comp = rng.integers(1, 3, size=n)  # 1 or 2
    x = np.zeros((n, LENGTH), dtype=np.float64)
    for k in range(2):
        f = rng.uniform(1.0, 4.0, size=(n, 1))
        phi = rng.uniform(0.0, 2.0 * math.pi, size=(n, 1))
        a = rng.uniform(0.5, 1.5, size=(n, 1))
        active = (n_comp > k).astype(np.float64)[:, None]
        x += active * a * np.sin(2.0 * math.pi * f * s / LENGTH + phi)
    x += NOISE_STD * rng.standard_normal((n, LENGTH))
    return torch.from_numpy((x / TS_SCALE).astype(np.float32))[:, None, :]


class ResBlock1d(nn.Module):
    def __init__(self, ch: int, t_dim: int, dilation: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, ch)
        self.conv1 = nn.Conv1d(ch, ch, 3, padding=dilation, dilation=dilation)
        self.temb = nn.Linear(t_dim, ch)
        self.norm2 = nn.GroupNorm(groups, ch)
        self.conv2 = nn.Conv1d(ch, ch, 3, padding=dilation, dilation=dilation)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class TimeSeriesNet(EpsModel):
    """Dilated 1-D conv ResNet, ``[B, 1, 32] -> [B, 1, 32]`` (eps prediction)."""

    def __init__(self, ch: int = 48, t_dim: int = 128, dilations: Sequence[int] = (1, 2, 4, 8)):
        super().__init__()
        self.time = TimeEmbedding(t_dim)
        self.conv_in = nn.Conv1d(1, ch, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock1d(ch, t_dim, d) for d in dilations])
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv1d(ch, 1, 3, padding=1)

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(t)
        h = self.conv_in(x)
        for blk in self.blocks:
            h = blk(h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def load_timeseries_model(device: Union[str, torch.device] = "cpu") -> TimeSeriesNet:
    """The trained time-series model (EMA weights), eval mode, grads off."""
    return load_weights(TimeSeriesNet(), MODEL_FILE, device)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two sample sets ``[N, ...]`` and
    ``[M, ...]`` (flattened to vectors; computed in float64).

    Averages the squared 1-D W2 distance over ``n_projections`` random unit
    directions (fixed by ``seed``) and returns its square root. 1-D W2 is
    computed from quantiles at ``(i + 0.5) / K``, ``K = max(N, M)``, so the
    sets may have different sizes. Identical sets give 0; a pure shift by
    ``v`` gives ``sqrt(mean_dir (v . dir)^2) = ||v|| / sqrt(D)`` in
    expectation over directions. Note the finite-sample bias: two
    independent sets from the same law give a small positive value.
    """
    a = torch.as_tensor(a).detach().cpu().double().reshape(len(a), -1)
    b = torch.as_tensor(b).detach().cpu().double().reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dimension mismatch: {a.shape[1]} vs {b.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = a @ dirs, b @ dirs  # [N, P], [M, P]
    k = max(len(a), len(b))
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    qa = pa.sort(dim=0).values if len(a) == k else torch.quantile(pa, q, dim=0)
    qb = pb.sort(dim=0).values if len(b) == k else torch.quantile(pb, q, dim=0)
    return float(((qa - qb) ** 2).mean().sqrt())

r"""Exact Gaussian-mixture oracles: predictors with no training error.

Data x0 ~ sum_m w_m N(mu_m, diag(v_m)). On the interpolant x = alpha x0 + sigma eps the noisy
marginal is a mixture too, p(x) = sum_m w_m N(alpha mu_m, alpha^2 v_m + sigma^2), so the ideal
predictions have closed forms, per component m with responsibility r_m(x):

    E[x0 | x, m] = mu_m + alpha v_m (x - alpha mu_m) / (alpha^2 v_m + sigma^2)
    x0*(x) = sum_m r_m(x) E[x0 | x, m],   eps*(x) = (x - alpha x0*(x)) / sigma,
    v*(x) (flow velocity) = eps*(x) - x0*(x),   v-prediction = alpha eps* - sigma x0*.

A sampler driven by such a predictor has only discretisation error, so its error to the serial
sampler and its distance to the true distribution can be measured against the truth.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from driffusion_core.errors import InvalidArgumentError
from driffusion_core.parameterization import Prediction
from driffusion_core.schedules import Schedule
from driffusion_core import coefficients as C

__all__ = ["GaussianMixture", "ring_mixture"]


class GaussianMixture:
    """A mixture of diagonal Gaussians with exact denoisers.

    Arguments:
        means: ``[M, D]`` component means.
        variances: ``[M, D]``, ``[M]`` or a float: per-component diagonal variances.
        weights: ``[M]`` mixture weights (default uniform).
    """

    def __init__(self, means: Union[Sequence, torch.Tensor], variances: Union[float, Sequence, torch.Tensor] = 0.01,
                 weights: Optional[Union[Sequence, torch.Tensor]] = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2 or self.means.numel() == 0:
            raise InvalidArgumentError(f"means must be a non-empty [M, D], got shape {tuple(self.means.shape)}.")
        if not bool(torch.isfinite(self.means).all()):
            raise InvalidArgumentError("means must be finite.")
        m, d = self.means.shape
        v = torch.as_tensor(variances, dtype=torch.float64)
        shapes = {0: (), 1: (m,), 2: (m, d)}
        if v.dim() > 2 or tuple(v.shape) != shapes[v.dim()]:
            raise InvalidArgumentError(
                f"variances must be a float, [M] = [{m}] or [M, D] = [{m}, {d}], got shape {tuple(v.shape)}."
            )
        if v.dim() == 0:
            v = v.expand(m, d)
        elif v.dim() == 1:
            v = v[:, None].expand(m, d)
        self.variances = v.clone()
        if not bool((torch.isfinite(self.variances) & (self.variances > 0)).all()):
            raise InvalidArgumentError("variances must be finite and > 0 (a component needs a spread to have a density).")
        w = torch.full((m,), 1.0 / m, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if tuple(w.shape) != (m,):
            raise InvalidArgumentError(f"weights must be [M] = [{m}], one per component, got shape {tuple(w.shape)}.")
        if not bool((torch.isfinite(w) & (w >= 0)).all()) or float(w.sum()) <= 0:
            raise InvalidArgumentError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}.")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        """D, the dimension of a sample."""
        return int(self.means.shape[1])

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n exact samples of x0 (float64)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.variances[comp].sqrt() * z

    def x0_eps(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x0*, eps*) = (E[x0 | x], E[eps | x]) at interpolant (alpha, sigma), in float64."""
        if x.dim() < 1 or x[0].numel() != self.dim:
            raise InvalidArgumentError(
                f"This mixture lives in {self.dim} dimensions: its states are [B, {self.dim}] (B samples), got x "
                f"of shape {tuple(x.shape)}. The first dimension is the batch, even for one sample: x[None]."
            )
        xd = x.to(torch.float64).reshape(x.shape[0], -1)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1).to(xd.device)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1).to(xd.device)
        mu, v = self.means.to(xd.device)[None], self.variances.to(xd.device)[None]  # [1, M, D]
        var = a**2 * v + s**2  # [B, M, D]
        diff = xd[:, None, :] - a * mu
        logp = -0.5 * ((diff**2 / var) + torch.log(2 * math.pi * var)).sum(-1) + torch.log(self.weights.to(xd.device))
        r = torch.softmax(logp, dim=1)[..., None]  # [B, M, 1]
        x0 = (r * (mu + a * v * diff / var)).sum(1)
        eps = (r * (s * diff / var)).sum(1)
        return x0, eps

    def predictor(self, schedule: Schedule, prediction: Union[str, Prediction] = "epsilon") -> Callable[..., torch.Tensor]:
        """A predictor ``f(x, t_model) -> Tensor`` for models called with ``schedule``'s model time."""
        prediction = Prediction.parse(prediction)

        def f(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
            level = schedule.level_of_model_time(t)
            alpha, sigma = schedule.alpha_sigma(level)
            x0, eps = self.x0_eps(x, alpha, sigma)
            a, s = alpha.reshape(-1, 1).to(x0.device), sigma.reshape(-1, 1).to(x0.device)
            c_x0, c_eps = C.prediction_coefficients(prediction.value, a, s)
            out = c_x0 * x0 + c_eps * eps
            return out.reshape(x.shape).to(x.dtype)

        return f


def ring_mixture(num_modes: int = 8, radius: float = 2.0, variance: float = 0.02) -> GaussianMixture:
    """The 2-D ring: ``num_modes`` equal Gaussians evenly spaced on a circle."""
    ang = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    return GaussianMixture(torch.stack([radius * ang.cos(), radius * ang.sin()], 1), variance)

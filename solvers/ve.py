r"""Variance-exploding (EDM / k-diffusion) schedule and its Euler skip transition.

Key (Karras et al. 2022, k-diffusion): the level *is* the noise level sigma,

    x_sigma = x0 + sigma eps,           (alpha, sigma) = (1, sigma),   clean end sigma = 0;
    D(x, sigma) = x0_hat                 a denoiser; eps_hat = (x - x0_hat) / sigma = d, the ODE slope;
    x_s = x_t + (s - t) eps_hat          the Euler step of dx/dsigma = eps_hat (k-diffusion's sample_euler).

With a frozen eps_hat the big step composes exactly: (s - t) + (u - s) = u - t, and
x_t + (s - t) eps_hat = x0_hat + s eps_hat, so a draft is DDIM written in VE form. The step is
the same "Euler coefficient" s - t as the flow-matching step
(:func:`driffusion_core.coefficients.flow_euler_coefficient`), applied to eps_hat instead of v.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from driffusion_core import coefficients as C
from driffusion_core.errors import InvalidArgumentError, is_real
from driffusion_core.parameterization import Prediction, X0Transform, broadcast_coef, upcast
from driffusion_core.schedules import Schedule, TimeLike, refuse_levels_outside
from driffusion_core.transition import Levels, SkipTransition, zero_length_identity
from solvers.ddim import EtaNoise

__all__ = ["VESchedule", "VEEulerSkip", "VEAncestralSkip"]


def _levels(t: TimeLike) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)


class VESchedule(Schedule):
    r"""The variance-exploding interpolant :math:`x_\sigma = x_0 + \sigma\epsilon`; levels are sigmas.

    Arguments:
        sigma_max: the largest level a grid may start from (default: no bound).

    The predictor is called with sigma itself (``model_time(sigma) = sigma``, in float32 on the grids this
    schedule makes), as k-diffusion's denoisers ``D(x, sigma)`` are; the k-diffusion-style functions
    (:func:`solvers.sample_driffusion`, ``sigmas_grid``) pass sigma in the state's dtype instead.
    """

    terminal_level = 0.0
    kind = "ve"
    predictions = ("sample", "epsilon")

    def __init__(self, sigma_max: float = math.inf):
        if not is_real(sigma_max) or not float(sigma_max) > 0:
            raise InvalidArgumentError(f"sigma_max must be a positive number (or math.inf, no bound), got {sigma_max!r}.")
        self.sigma_max = float(sigma_max)

    def level_range(self) -> Tuple[float, float]:
        return 0.0, self.sigma_max

    def alpha_sigma(self, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """:math:`(\\alpha, \\sigma) = (1, t)` in float64."""
        t = _levels(t)
        refuse_levels_outside(t, *self.level_range(), self)
        return C.ve_alpha_sigma(t)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64).to(torch.float32)

    def level_of_model_time(self, t: torch.Tensor) -> torch.Tensor:
        levels = _levels(t)
        # model times are float32: sigma_max itself comes back up to a float32 rounding above it
        above = (levels > self.sigma_max) & (levels <= self.sigma_max * (1 + 2.0**-22))
        return torch.where(above, torch.full_like(levels, self.sigma_max), levels)

    def __repr__(self) -> str:
        return f"VESchedule(sigma_max={self.sigma_max:g})"


class VEEulerSkip(SkipTransition):
    """The Euler step of the probability-flow ODE in sigma, across any pair of sigmas.

    Arguments:
        schedule: a :class:`VESchedule`.
        prediction: ``"sample"`` (a denoiser D(x, sigma) -> x0, the default) or ``"epsilon"``.
        x0_transform: optional clipping / thresholding of x0_hat. The Euler slope is then taken from the
            transformed denoiser output, as k-diffusion's ``to_d`` of a clamped ``denoised``:
            ``eps_hat = (x - T(x0_hat)) / sigma`` (the slope is the step's only input, so keeping the
            model's own eps_hat, as DDIM does without ``use_clipped_model_output``, would ignore ``T``).
    """

    stochastic = False
    composes_exactly = True

    def __init__(
        self,
        schedule: VESchedule,
        prediction: Union[str, Prediction] = "sample",
        x0_transform: Optional[X0Transform] = None,
    ):
        if not isinstance(schedule, VESchedule):
            raise InvalidArgumentError(f"VEEulerSkip needs a VESchedule, got {type(schedule).__name__}.")
        # recompute_eps: the slope comes from the transformed x0_hat (it only acts with an x0_transform)
        super().__init__(schedule, prediction, x0_transform, recompute_eps=True)

    def __call__(self, x: torch.Tensor, pred: torch.Tensor, t_from: Levels, t_to: Levels,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""The probability-flow Euler skip of a VE model from sigma_t to sigma_s (``t_from`` -> ``t_to``):

        .. math:: x_s = x_t + (\sigma_s - \sigma_t)\,\hat\epsilon,

        with eps_hat = (x_t - x0_hat) / sigma_t converted from ``pred`` at sigma_t (after the x0 transform).
        Exact for a frozen x0_hat, so skips compose. Deterministic: ``noise`` is ignored. A zero-length skip
        returns x."""
        t_from, t_to = self.operands(x, pred, t_from, t_to, noise)
        dtype, (x, pred) = x.dtype, upcast(x, pred)  # float16 / bfloat16: in float32, cast once
        _, eps_hat = self.to_x0_eps(x, pred, t_from)
        out = x + broadcast_coef(self.cached(t_from, t_to, self._euler), x) * eps_hat
        return zero_length_identity(out, x, t_from, t_to).to(dtype)


class VEAncestralSkip(EtaNoise, SkipTransition):
    r"""k-diffusion's Euler ancestral step (``sample_euler_ancestral``) across any pair of sigmas.

    .. math:: x_s = \hat x_0 + \sigma_{down}\,\hat\epsilon + \sigma_{up} z,\qquad
              \sigma_{up} = \eta\,\sigma_s\sqrt{\sigma_t^2 - \sigma_s^2}/\sigma_t,\quad
              \sigma_{down} = \sqrt{\sigma_s^2 - \sigma_{up}^2}

    (:func:`~driffusion_core.coefficients.ve_ancestral_coefficients`): DDIM(eta) in VE variables, so a
    one-level step is k-diffusion's ``x + (sigma_down - sigma) d + sigma_up z`` with ``d = (x - D) / sigma``
    (``proofs``: ``kdiffusion.sample_euler_ancestral_step``). Its drafts are the one-level chain with x0_hat
    frozen, each step with its own pre-drawn noise, as DDPM's are.

    Arguments:
        schedule: a :class:`VESchedule`.
        eta: in [0, 1]; 1 is k-diffusion's default, 0 the Euler step (deterministic).
        prediction: ``"sample"`` (a denoiser D(x, sigma), the default) or ``"epsilon"``.
        x0_transform: optional clipping / thresholding of x0_hat; the slope is then taken from the
            transformed x0_hat (``eps_hat = (x - T(x0_hat)) / sigma``), as k-diffusion's ``to_d`` of a
            clamped ``denoised``.
    """

    def __init__(
        self,
        schedule: VESchedule,
        eta: float = 1.0,
        prediction: Union[str, Prediction] = "sample",
        x0_transform: Optional[X0Transform] = None,
    ):
        if not isinstance(schedule, VESchedule):
            raise InvalidArgumentError(f"VEAncestralSkip needs a VESchedule, got {type(schedule).__name__}.")
        super().__init__(schedule, prediction, x0_transform, recompute_eps=True)
        self.eta = eta

    def __setattr__(self, name: str, value) -> None:
        if name == "eta":
            if isinstance(value, str) and value in {p.value for p in Prediction}:
                raise InvalidArgumentError(
                    f"eta must be a number in [0, 1], got the string {value!r}: VEAncestralSkip(schedule, eta, "
                    f"prediction) takes eta second; pass prediction={value!r} by keyword."
                )
            if not is_real(value) or not 0 <= float(value) <= 1:
                raise InvalidArgumentError(
                    f"eta must be a number in [0, 1] (1: k-diffusion's ancestral default, 0: the Euler step), got "
                    f"{value!r}; above 1 k-diffusion clamps sigma_up to sigma_next, which this step does not model."
                )
            value = float(value)
        super().__setattr__(name, value)

    def _coefficients(self, t_from: torch.Tensor, t_to: torch.Tensor):
        return C.ve_ancestral_coefficients(t_from, t_to, self.eta)

    def __call__(self, x: torch.Tensor, pred: torch.Tensor, t_from: Levels, t_to: Levels,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""The ancestral step from sigma_t to sigma_s (``t_from`` -> ``t_to``): :math:`x_s = \hat x_0 +
        \sigma_{down}\hat\epsilon + \sigma_{up} z`, with (x0_hat, eps_hat) from ``pred`` at sigma_t (after the x0
        transform); ``noise`` is z (without it, or at eta = 0, the step is its mean). A zero-length skip returns x."""
        t_from, t_to = self.operands(x, pred, t_from, t_to, noise)
        down, up = self.cached(t_from, t_to, self._coefficients)
        dtype, (x, pred, noise) = x.dtype, upcast(x, pred, noise)  # float16 / bfloat16: in float32, cast once
        x0_hat, eps_hat = self.to_x0_eps(x, pred, t_from)
        out = x0_hat + broadcast_coef(down, x) * eps_hat
        if self.stochastic and noise is not None:
            out = out + broadcast_coef(up, x) * noise
        return zero_length_identity(out, x, t_from, t_to).to(dtype)

    def chain_factors(self, t_from: torch.Tensor, t_to: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x_s = (1 - sigma_down / sigma_t) x0_hat + (sigma_down / sigma_t) x_t + sigma_up z`` per step."""
        return C.ve_ancestral_chain_coefficients(t_from.to(torch.float64), t_to.to(torch.float64), self.eta)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", eta={self.eta:g})"

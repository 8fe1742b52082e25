r"""DDIM skip transition (Song et al. 2021), deterministic (eta = 0) or stochastic.

Key: abar_t = alpha-bar at level t; x0_hat, eps_hat the prediction converted at t_from;
sigma_{t->s} = eta sqrt((1-abar_s)/(1-abar_t)) sqrt(1 - abar_t/abar_s).

    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma_{t->s}^2) eps_hat + sigma_{t->s} z

At eta = 0 the skip composes exactly with a frozen (x0_hat, eps_hat). For 0 < eta the big step
is *marginal-consistent* (the marginal variance is 1 - abar_s) but not a composition of small
steps; at eta = 1 it is the DDPM posterior.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from driffusion_core import coefficients as C
from driffusion_core.errors import InvalidArgumentError, is_real
from driffusion_core.parameterization import Prediction, X0Transform, broadcast_coef, upcast
from driffusion_core.schedules import VPSchedule
from driffusion_core.transition import Levels, SkipTransition, zero_length_identity

__all__ = ["DDIMSkip"]


class EtaNoise:
    """For a transition whose ``eta`` scales the noise its step adds (DDIM, k-diffusion's Euler ancestral):
    stochastic when eta > 0, composing exactly (the deterministic step) when eta = 0."""

    eta: float

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether the step adds noise: eta > 0."""
        return self.eta > 0

    @property
    def composes_exactly(self) -> bool:  # type: ignore[override]
        """Whether skips compose exactly with a frozen prediction: eta = 0."""
        return self.eta == 0


class DDIMSkip(EtaNoise, SkipTransition):
    r"""DDIM's update across any pair of levels t -> s (Song et al. 2021, eq. 12):

    .. math:: x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma_{t\to s}^2}\,\hat\epsilon
              + \sigma_{t\to s} z,\qquad
              \sigma_{t\to s} = \eta\sqrt{\tfrac{1-\bar\alpha_s}{1-\bar\alpha_t}}\sqrt{1-\tfrac{\bar\alpha_t}{\bar\alpha_s}}

    with (x0_hat, eps_hat) converted from the prediction at t (``ddim_coefficients``).

    Arguments:
        schedule: a :class:`~driffusion_core.VPSchedule`.
        prediction: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        eta: 0 for deterministic DDIM, 1 for the DDPM posterior, in between for both.
        x0_transform: optional :class:`~driffusion_core.ClipSample` / :class:`~driffusion_core.DynamicThreshold`.
        recompute_eps: re-derive eps_hat from the transformed x0_hat (diffusers' ``use_clipped_model_output``).
    """

    def __init__(
        self,
        schedule: VPSchedule,
        prediction: Union[str, Prediction] = "epsilon",
        eta: float = 0.0,
        x0_transform: Optional[X0Transform] = None,
        recompute_eps: bool = False,
    ):
        if not isinstance(schedule, VPSchedule):
            raise InvalidArgumentError(f"DDIMSkip needs a VPSchedule, got {type(schedule).__name__}.")
        super().__init__(schedule, prediction, x0_transform, recompute_eps)
        self.eta = eta

    def __setattr__(self, name: str, value) -> None:
        if name == "eta":  # checked when set later too: stochastic and composes_exactly follow it
            if not is_real(value) or not 0 <= float(value) <= 1:
                if not is_real(value) or float(value) != float(value):
                    why = "it must be a real number"
                elif float(value) < 0:
                    why = "it scales the step's noise standard deviation, which cannot be negative"
                else:
                    why = "above 1 the step variance exceeds 1 - abar_s and the skip is undefined"
                raise InvalidArgumentError(
                    f"eta must lie in [0, 1] (0: deterministic DDIM, 1: the DDPM posterior), got {value!r}: {why}."
                )
            value = float(value)
        super().__setattr__(name, value)

    def _coefficients(self, t_from: torch.Tensor, t_to: torch.Tensor):
        """((alpha_t, sigma_t), (c_x0, c_eps, sigma_ts)) of the skip t_from -> t_to."""
        abar_t, abar_s = self.schedule.alpha_bar(t_from), self.schedule.alpha_bar(t_to)
        return C.vp_alpha_sigma(abar_t), C.ddim_coefficients(abar_t, abar_s, self.eta)

    def __call__(self, x: torch.Tensor, pred: torch.Tensor, t_from: Levels, t_to: Levels,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""The DDIM skip from level t to level s (``t_from`` -> ``t_to``, one level or one per row):

        .. math:: x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma_{t\to s}^2}\,\hat\epsilon
                  + \sigma_{t\to s} z, \quad
                  \sigma_{t\to s} = \eta \sqrt{\frac{1 - \bar\alpha_s}{1 - \bar\alpha_t}}
                  \sqrt{1 - \frac{\bar\alpha_t}{\bar\alpha_s}},

        with (x0_hat, eps_hat) converted from ``pred`` at level t; ``noise`` is z (ignored at eta = 0; without it
        the step is its mean). A zero-length skip returns x."""
        t_from, t_to = self.operands(x, pred, t_from, t_to, noise)
        alpha_sigma, (c_x0, c_eps, sigma) = self.cached(t_from, t_to, self._coefficients)
        dtype, (x, pred, noise) = x.dtype, upcast(x, pred, noise)  # float16 / bfloat16: in float32, cast once
        x0_hat, eps_hat = self.to_x0_eps(x, pred, t_from, alpha_sigma)
        out = broadcast_coef(c_x0, x) * x0_hat + broadcast_coef(c_eps, x) * eps_hat
        if self.stochastic and noise is not None:
            out = out + broadcast_coef(sigma, x) * noise
        return zero_length_identity(out, x, t_from, t_to).to(dtype)

    def steps_within_pure_noise(self) -> bool:
        """eta > 0 takes alpha-bar_t / alpha-bar_s in sigma_{t->s}: 0 / 0 between two pure-noise levels."""
        return self.eta == 0

    def steps_from_sigma_zero(self) -> bool:
        """At sigma = 0 an epsilon model's x0_hat is x itself and the deterministic step is finite (diffusers'
        DDIM takes it: a table whose first beta is 0, leading spacing); eta > 0, x0 / v models and
        ``recompute_eps`` divide by sigma."""
        return self.prediction is Prediction.EPSILON and not self.recompute_eps and self.eta == 0

    def chain_factors(self, t_from: torch.Tensor, t_to: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return C.ddim_chain_coefficients(self.schedule.alpha_bar(t_from), self.schedule.alpha_bar(t_to), self.eta)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", eta={self.eta:g})"

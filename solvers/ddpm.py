r"""DDPM skip transition: the closed-form posterior q(x_s | x_t, x0_hat) for any s < t.

Key: alpha_{t|s} = abar_t / abar_s, beta_{t|s} = 1 - alpha_{t|s}.

    mean = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x0_hat + sqrt(alpha_{t|s}) (1 - abar_s) / (1 - abar_t) x_t
    var  = beta_{t|s} (1 - abar_s) / (1 - abar_t)   ("fixed_small")   or   beta_{t|s}   ("fixed_large")
    x_s  = mean + sqrt(var) z          (no noise when t = 0, as diffusers)

With x0_hat frozen, the multi-level posterior equals the chain of one-level posteriors in
distribution ("fixed_small"). A *draft* is the chain itself, pathwise, for both variance types
(``SkipTransition.drafts``: the chain unrolled, on the chain's own per-step noise); a fixed_large
multi-level *skip* is noisier than the chain (variance beta_{t|s}).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from driffusion_core import coefficients as C
from driffusion_core.errors import InvalidArgumentError
from driffusion_core.parameterization import Prediction, X0Transform, broadcast_coef, upcast
from driffusion_core.schedules import VPSchedule
from driffusion_core.transition import Levels, SkipTransition, zero_length_identity

__all__ = ["DDPMSkip"]

VARIANCE_TYPES = ("fixed_small", "fixed_large")


class DDPMSkip(SkipTransition):
    r"""DDPM's ancestral step across any pair of levels t -> s: a draw from the posterior
    :math:`q(x_s \mid x_t, \hat x_0)` (Ho et al. 2020, eq. 7; ``ddpm_posterior_coefficients``),

    .. math:: x_s = \frac{\sqrt{\bar\alpha_s}\,\beta_{t|s}}{1-\bar\alpha_t}\hat x_0
              + \frac{\sqrt{\alpha_{t|s}}\,(1-\bar\alpha_s)}{1-\bar\alpha_t} x_t + s_{t\to s} z,
              \qquad \alpha_{t|s} = \bar\alpha_t/\bar\alpha_s,\ \beta_{t|s} = 1 - \alpha_{t|s},

    with :math:`s_{t\to s}^2 = \beta_{t|s}(1-\bar\alpha_s)/(1-\bar\alpha_t)` (``"fixed_small"``, the posterior
    variance) or :math:`\beta_{t|s}` (``"fixed_large"``) and :math:`z \sim N(0, I)` the step's noise;

    a multi-level draft is the chain of one-level steps with x0_hat frozen and each step's noise.

    Arguments:
        schedule: a :class:`~driffusion_core.VPSchedule`.
        prediction: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        variance_type: ``"fixed_small"`` (the posterior variance) or ``"fixed_large"`` (beta_{t|s}).
        x0_transform: optional clipping / dynamic thresholding of x0_hat.
    """

    stochastic = True
    composes_exactly = False  # in distribution (fixed_small), see the module doc

    def __init__(
        self,
        schedule: VPSchedule,
        prediction: Union[str, Prediction] = "epsilon",
        variance_type: str = "fixed_small",
        x0_transform: Optional[X0Transform] = None,
    ):
        if not isinstance(schedule, VPSchedule):
            raise InvalidArgumentError(f"DDPMSkip needs a VPSchedule, got {type(schedule).__name__}.")
        super().__init__(schedule, prediction, x0_transform)
        self.variance_type = variance_type

    def __setattr__(self, name: str, value) -> None:
        if name == "variance_type" and value not in VARIANCE_TYPES:  # checked when set later too
            raise InvalidArgumentError(f"variance_type must be one of {VARIANCE_TYPES}, got {value!r}.")
        super().__setattr__(name, value)

    def steps_within_pure_noise(self) -> bool:
        """The posterior takes alpha-bar_t / alpha-bar_s: 0 / 0 between two pure-noise levels."""
        return False

    def _std(self, abar_t, abar_s, t_from, var):
        if self.variance_type == "fixed_large":
            var = C.ddpm_large_variance(abar_t, abar_s)
        return torch.where(t_from > 0, var.clamp(min=0).sqrt(), torch.zeros_like(var))

    def _coefficients(self, t_from: torch.Tensor, t_to: torch.Tensor):
        """((alpha_t, sigma_t), (c_x0, c_xt, std)) of the posterior step t_from -> t_to."""
        abar_t, abar_s = self.schedule.alpha_bar(t_from), self.schedule.alpha_bar(t_to)
        c_x0, c_xt, var = C.ddpm_posterior_coefficients(abar_t, abar_s)
        return C.vp_alpha_sigma(abar_t), (c_x0, c_xt, self._std(abar_t, abar_s, t_from, var))

    def __call__(self, x: torch.Tensor, pred: torch.Tensor, t_from: Levels, t_to: Levels,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""The DDPM posterior step from level t to level s (``t_from`` -> ``t_to``, one level or one per row):

        .. math:: x_s = \frac{\sqrt{\bar\alpha_s}\,(1 - \bar\alpha_t/\bar\alpha_s)}{1 - \bar\alpha_t}\,\hat x_0
                  + \frac{\sqrt{\bar\alpha_t/\bar\alpha_s}\,(1 - \bar\alpha_s)}{1 - \bar\alpha_t}\,x_t + \sigma z,

        the mean of q(x_s | x_t, x0 = x0_hat), with x0_hat converted from ``pred`` at level t and sigma from
        ``variance_type`` (fixed_small: the posterior variance; fixed_large: 1 - alpha_bar_t / alpha_bar_s).
        ``noise`` is z; without it the step is its mean. A zero-length skip returns x."""
        t_from, t_to = self.operands(x, pred, t_from, t_to, noise)
        alpha_sigma, (c_x0, c_xt, std) = self.cached(t_from, t_to, self._coefficients)
        dtype, (x, pred, noise) = x.dtype, upcast(x, pred, noise)  # float16 / bfloat16: in float32, cast once
        x0_hat, _ = self.to_x0_eps(x, pred, t_from, alpha_sigma)
        out = broadcast_coef(c_x0, x) * x0_hat + broadcast_coef(c_xt, x) * x
        if noise is not None:
            out = out + broadcast_coef(std, x) * noise
        return zero_length_identity(out, x, t_from, t_to).to(dtype)

    def chain_factors(self, t_from: torch.Tensor, t_to: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._coefficients(t_from, t_to)[1]  # the step x_s = c_x0 x0_hat + c_xt x_t + std z

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", variance_type={self.variance_type!r})"

r"""The operators' ``__call__`` on sympy symbols, composed from the same coefficient functions.

The torch operators in ``solvers/`` cannot run on symbols, so each is mirrored here line for line:
the mirror calls exactly the ``driffusion_core.coefficients`` functions the operator calls, in the
same way, and nothing else. ``proofs.operator_checks`` checks numerically that each torch operator
agrees with its mirror; the symbolic proofs are about the mirrors.

Key: x the state at level t (VP: :math:`\bar\alpha_t`; flow: sigma t), p the model output of kind
``prediction``, s the target level, z the step's standard normal noise.
"""
from __future__ import annotations

from typing import Any, Tuple

from driffusion_core import coefficients as C

__all__ = ["vp_x0_eps", "flow_x0_eps", "ddim_step", "ddpm_std", "ddpm_step", "flow_velocity", "flow_step"]


def _x0_eps(prediction: str, x: Any, pred: Any, alpha: Any, sigma: Any) -> Tuple[Any, Any]:
    # driffusion_core.parameterization.to_x0_eps (no x0 transform)
    (a_x, a_p), (b_x, b_p) = C.x0_eps_coefficients(prediction, alpha, sigma)
    return a_x * x + a_p * pred, b_x * x + b_p * pred


def vp_x0_eps(prediction: str, x: Any, pred: Any, abar_t: Any) -> Tuple[Any, Any]:
    """``SkipTransition.to_x0_eps`` on a VPSchedule: (x0_hat, eps_hat) at level t."""
    return _x0_eps(prediction, x, pred, *C.vp_alpha_sigma(abar_t))


def flow_x0_eps(prediction: str, x: Any, pred: Any, t: Any) -> Tuple[Any, Any]:
    """``SkipTransition.to_x0_eps`` on a FlowSchedule: (x0_hat, eps_hat) at sigma t."""
    return _x0_eps(prediction, x, pred, *C.flow_alpha_sigma(t))


def ddim_step(prediction: str, x: Any, pred: Any, abar_t: Any, abar_s: Any, eta: Any = 0, z: Any = 0) -> Any:
    """``solvers.ddim.DDIMSkip.__call__``: x_s = c_x0 x0_hat + c_eps eps_hat + sigma_{t->s} z."""
    x0_hat, eps_hat = vp_x0_eps(prediction, x, pred, abar_t)
    c_x0, c_eps, sigma = C.ddim_coefficients(abar_t, abar_s, eta)
    return c_x0 * x0_hat + c_eps * eps_hat + sigma * z


def ddpm_std(abar_t: Any, abar_s: Any, variance_type: str = "fixed_small") -> Any:
    """``solvers.ddpm.DDPMSkip._std`` for t_from > 0 (its clamp(min=0) is the identity where var >= 0)."""
    _, _, var = C.ddpm_posterior_coefficients(abar_t, abar_s)
    if variance_type == "fixed_large":
        var = C.ddpm_large_variance(abar_t, abar_s)
    return C.sqrt(var)


def ddpm_step(
    prediction: str, x: Any, pred: Any, abar_t: Any, abar_s: Any, z: Any = 0, variance_type: str = "fixed_small"
) -> Any:
    """``solvers.ddpm.DDPMSkip.__call__``: x_s = c_x0 x0_hat + c_xt x_t + std z."""
    x0_hat, _ = vp_x0_eps(prediction, x, pred, abar_t)
    c_x0, c_xt, _ = C.ddpm_posterior_coefficients(abar_t, abar_s)
    return c_x0 * x0_hat + c_xt * x + ddpm_std(abar_t, abar_s, variance_type) * z


def flow_velocity(prediction: str, x: Any, pred: Any, t: Any) -> Any:
    """``solvers.flow.FlowEulerSkip.velocity``: the output itself, or eps_hat - x0_hat."""
    if prediction == "velocity":
        return pred
    x0_hat, eps_hat = flow_x0_eps(prediction, x, pred, t)
    return eps_hat - x0_hat


def flow_step(prediction: str, x: Any, pred: Any, t: Any, s: Any) -> Any:
    """``solvers.flow.FlowEulerSkip.__call__``: x_s = x_t + (s - t) v."""
    return x + C.flow_euler_coefficient(t, s) * flow_velocity(prediction, x, pred, t)

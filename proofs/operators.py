r"""The operators' ``__call__`` on sympy symbols, composed from the same coefficient functions.

The torch operators in ``solvers/`` cannot run on symbols, so each is mirrored here line for line:
the mirror calls exactly the ``driffusion_core.coefficients`` functions the operator calls, in the
same way, and nothing else. ``proofs.operator_checks`` checks numerically that each torch operator
agrees with its mirror; the symbolic proofs are about the mirrors.

Key: x the state at level t (VP: :math:`\bar\alpha_t`; flow: sigma t), p the model output of kind
``prediction``, s the target level, z the step's standard normal noise. DPM-Solver++'s 2M step follows
``dpm_solver_pp_2m_coefficients`` instead: previous level p, current level s, target level t.
"""
from __future__ import annotations

from typing import Any, Tuple

import sympy as sp

from driffusion_core import coefficients as C

__all__ = [
    "vp_x0_eps",
    "flow_x0_eps",
    "ddim_step",
    "ddpm_std",
    "ddpm_step",
    "flow_velocity",
    "flow_step",
    "ve_x0_eps",
    "ve_euler_step",
    "ve_ancestral_step",
    "dpm_step",
    "dpm_2m_step",
    "unipc_corrected",
    "unipc_step",
]


def _x0_eps(prediction: str, x: Any, pred: Any, alpha: Any, sigma: Any) -> Tuple[Any, Any]:
    # driffusion_core.parameterization.to_x0_eps (no x0 transform)
    (a_x, a_p), (b_x, b_p) = C.x0_eps_coefficients(prediction, alpha, sigma)
    return a_x * x + a_p * pred, b_x * x + b_p * pred


def _clipped(x0_eps: Tuple[Any, Any], x: Any, alpha: Any, sigma: Any, clip: Any, recompute: bool) -> Tuple[Any, Any]:
    """The x0 transform ``ClipSample(clip)`` (None: none) on (x0_hat, eps_hat): x0_hat clamped to [-clip, clip], and
    with ``recompute`` eps_hat re-derived from it as from a "sample" prediction (diffusers'
    ``use_clipped_model_output``; FlowEulerSkip always)."""
    if clip is None:
        return x0_eps
    x0 = sp.Max(-clip, sp.Min(clip, x0_eps[0]))
    return x0, (_x0_eps("sample", x, x0, alpha, sigma)[1] if recompute else x0_eps[1])


def vp_x0_eps(prediction: str, x: Any, pred: Any, abar_t: Any, clip: Any = None,
              recompute: bool = False) -> Tuple[Any, Any]:
    """``SkipTransition.to_x0_eps`` on a VPSchedule: (x0_hat, eps_hat) at level t (optionally clipped)."""
    alpha, sigma = C.vp_alpha_sigma(abar_t)
    return _clipped(_x0_eps(prediction, x, pred, alpha, sigma), x, alpha, sigma, clip, recompute)


def flow_x0_eps(prediction: str, x: Any, pred: Any, t: Any, clip: Any = None) -> Tuple[Any, Any]:
    """``SkipTransition.to_x0_eps`` on a FlowSchedule: (x0_hat, eps_hat) at sigma t (optionally clipped; eps_hat
    then re-derived, as FlowEulerSkip does)."""
    alpha, sigma = C.flow_alpha_sigma(t)
    return _clipped(_x0_eps(prediction, x, pred, alpha, sigma), x, alpha, sigma, clip, True)


def ddim_step(prediction: str, x: Any, pred: Any, abar_t: Any, abar_s: Any, eta: Any = 0, z: Any = 0,
              clip: Any = None, recompute: bool = False) -> Any:
    """``solvers.ddim.DDIMSkip.__call__``: x_s = c_x0 x0_hat + c_eps eps_hat + sigma_{t->s} z (``clip``,
    ``recompute``: its ``x0_transform=ClipSample(clip)`` and ``recompute_eps``)."""
    x0_hat, eps_hat = vp_x0_eps(prediction, x, pred, abar_t, clip, recompute)
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


def flow_velocity(prediction: str, x: Any, pred: Any, t: Any, clip: Any = None) -> Any:
    """``solvers.flow.FlowEulerSkip.velocity``: the output itself, or eps_hat - x0_hat (with an x0 transform
    ``ClipSample(clip)``, always the latter, from the clipped x0_hat)."""
    if prediction == "velocity" and clip is None:
        return pred
    x0_hat, eps_hat = flow_x0_eps(prediction, x, pred, t, clip)
    return eps_hat - x0_hat


def flow_step(prediction: str, x: Any, pred: Any, t: Any, s: Any, clip: Any = None) -> Any:
    """``solvers.flow.FlowEulerSkip.__call__``: x_s = x_t + (s - t) v (``clip``: its ``x0_transform=ClipSample(clip)``)."""
    return x + C.flow_euler_coefficient(t, s) * flow_velocity(prediction, x, pred, t, clip)


def ve_x0_eps(prediction: str, x: Any, pred: Any, sigma: Any) -> Tuple[Any, Any]:
    """``SkipTransition.to_x0_eps`` on a VESchedule: (x0_hat, eps_hat) at level sigma."""
    return _x0_eps(prediction, x, pred, *C.ve_alpha_sigma(sigma))


def ve_euler_step(prediction: str, x: Any, pred: Any, sigma_t: Any, sigma_s: Any) -> Any:
    """``solvers.ve.VEEulerSkip.__call__`` (no x0 transform): x_s = x_t + (sigma_s - sigma_t) eps_hat."""
    _, eps_hat = ve_x0_eps(prediction, x, pred, sigma_t)
    return x + C.flow_euler_coefficient(sigma_t, sigma_s) * eps_hat


def ve_ancestral_step(prediction: str, x: Any, pred: Any, sigma_t: Any, sigma_s: Any, eta: Any = 1, z: Any = 0) -> Any:
    """``solvers.ve.VEAncestralSkip.__call__`` (no x0 transform): x_s = x0_hat + sigma_down eps_hat + sigma_up z,
    ``(sigma_down, sigma_up) = ve_ancestral_coefficients`` (its ``recompute_eps`` acts only with an x0 transform)."""
    x0_hat, eps_hat = ve_x0_eps(prediction, x, pred, sigma_t)
    down, up = C.ve_ancestral_coefficients(sigma_t, sigma_s, eta)
    return x0_hat + down * eps_hat + up * z


_ALPHA_SIGMA = {"vp": C.vp_alpha_sigma, "flow": C.flow_alpha_sigma, "ve": C.ve_alpha_sigma}


def dpm_step(prediction: str, x: Any, pred: Any, level_t: Any, level_s: Any, interpolant: str = "vp") -> Any:
    """``solvers.dpm.DPMSolverSkip.__call__`` (first order, the skip t -> s): x_s = c_x x_t + c_x0 x0_hat,
    ``(c_x, c_x0) = dpm_solver_pp_coefficients`` (levels: abar on ``"vp"``, sigma t on ``"flow"``)."""
    alpha_sigma = _ALPHA_SIGMA[interpolant]
    a_t, s_t = alpha_sigma(level_t)
    a_s, s_s = alpha_sigma(level_s)
    x0_hat, _ = _x0_eps(prediction, x, pred, a_t, s_t)
    c_x, c_x0 = C.dpm_solver_pp_coefficients(a_t, s_t, a_s, s_s)
    return c_x * x + c_x0 * x0_hat


def dpm_2m_step(
    prediction: str,
    x: Any,
    pred: Any,
    history: Tuple[Any, Any, Any],
    level_s: Any,
    level_t: Any,
    solver_type: str = "midpoint",
    interpolant: str = "vp",
) -> Any:
    """``solvers.dpm.DPMSolverSkip.multistep`` s -> t with ``history = (x_p, pred_p, level_p)``, the previous
    step: x_t = c_x x_s + c_x0 x0_hat_s + c_prev x0_hat_p (``dpm_solver_pp_2m_coefficients``), each x0_hat
    converted at its own level; to sigma_t = 0 the first-order coefficients (``DPMSolverSkip._second``).
    ``interpolant``: ``"vp"`` (levels abar), ``"flow"`` (sigma t) or ``"ve"`` (sigma)."""
    x_p, pred_p, level_p = history
    alpha_sigma = _ALPHA_SIGMA[interpolant]
    a_p, s_p = alpha_sigma(level_p)
    a_s, s_s = alpha_sigma(level_s)
    a_t, s_t = alpha_sigma(level_t)
    if s_t == 0:  # the operator's torch.where(clean, first order, 2M)
        (c_x, c_x0), c_p = C.dpm_solver_pp_coefficients(a_s, s_s, a_t, s_t), 0
    else:
        c_x, c_x0, c_p = C.dpm_solver_pp_2m_coefficients(a_p, s_p, a_s, s_s, a_t, s_t, solver_type)
    x0_p, _ = _x0_eps(prediction, x_p, pred_p, a_p, s_p)
    x0_s, _ = _x0_eps(prediction, x, pred, a_s, s_s)
    return c_x * x + c_x0 * x0_s + c_p * x0_p


def unipc_corrected(
    prediction: str, x: Any, pred: Any, history: Tuple[Tuple[Any, Any, Any], ...], level_s: Any, corrector: int,
    solver_type: str = "bh2", interpolant: str = "vp",
) -> Any:
    """The corrected state of ``solvers.unipc.UniPCSkip.multistep``: the predicted x at s plus
    K = k_s m_s + k_p m_p + k_pp m_pp (``unipc_corrector_coefficients`` of order ``corrector``; 0: no
    corrector), ``history`` the earlier steps ``(x_i, pred_i, level_i)`` oldest first, each x0_hat m
    converted at its own level from its own state."""
    if not corrector:
        return x
    alpha_sigma = _ALPHA_SIGMA[interpolant]
    a_s, s_s = alpha_sigma(level_s)
    m_s, _ = _x0_eps(prediction, x, pred, a_s, s_s)
    earlier = [(_x0_eps(prediction, x_h, p_h, *alpha_sigma(l_h))[0], alpha_sigma(l_h)) for x_h, p_h, l_h in history]
    m_p, (a_p, s_p) = earlier[-1]
    m_pp, (a_pp, s_pp) = earlier[-2] if corrector == 2 else (0, (None, None))
    k_s, k_p, k_pp = C.unipc_corrector_coefficients(a_pp, s_pp, a_p, s_p, a_s, s_s, corrector, solver_type)
    return x + k_s * m_s + k_p * m_p + k_pp * m_pp


def unipc_step(
    prediction: str,
    x: Any,
    pred: Any,
    history: Tuple[Tuple[Any, Any, Any], ...],
    level_s: Any,
    level_t: Any,
    orders: Tuple[int, int],
    solver_type: str = "bh2",
    interpolant: str = "vp",
) -> Any:
    """``solvers.unipc.UniPCSkip.multistep`` s -> t with ``orders = (predictor, corrector)``: the predicted
    state x corrected (:func:`unipc_corrected`), then UniP from it (``unipc_predictor_coefficients`` with the
    previous step's x0_hat, or the first-order ``dpm_solver_pp_coefficients``)."""
    predictor, corrector = orders
    alpha_sigma = _ALPHA_SIGMA[interpolant]
    a_s, s_s = alpha_sigma(level_s)
    a_t, s_t = alpha_sigma(level_t)
    m_s, _ = _x0_eps(prediction, x, pred, a_s, s_s)
    x_c = unipc_corrected(prediction, x, pred, history, level_s, corrector, solver_type, interpolant)
    if predictor == 2:
        x_h, p_h, l_h = history[-1]
        a_p, s_p = alpha_sigma(l_h)
        m_p, _ = _x0_eps(prediction, x_h, p_h, a_p, s_p)
        c_x, c_s, c_p = C.unipc_predictor_coefficients(a_p, s_p, a_s, s_s, a_t, s_t, solver_type)
        return c_x * x_c + c_s * m_s + c_p * m_p
    c_x, c_x0 = C.dpm_solver_pp_coefficients(a_s, s_s, a_t, s_t)
    return c_x * x_c + c_x0 * m_s

r"""k-diffusion's samplers are our operators on the variance-exploding schedule.

Key (Karras et al. 2022, k-diffusion ``sampling.py``): the level is sigma, :math:`x = x_0 + \sigma\epsilon`
(``VESchedule``, ``ve_alpha_sigma``: alpha = 1); a denoiser :math:`D(x, \sigma)` returns x0_hat
(prediction ``"sample"``), an epsilon model :math:`\hat\epsilon` with :math:`D = x - \sigma\hat\epsilon`.
k-diffusion's updates are written out below from its published code, in its own variables
(``t = -log(sigma)`` for DPM++ 2M), against the mirrors of ``VEEulerSkip`` and ``DPMSolverSkip`` on the VE
interpolant (:mod:`proofs.operators`), which ``solvers.sample_driffusion`` and
``solvers.sample_driffusion_dpmpp_2m`` use. The 2M levels are a ``"ve"`` :class:`~proofs.algebra.LambdaLevels`
chain, :math:`\sigma = 1/q = e^{-\lambda}`.
"""
from __future__ import annotations

import sympy as sp

from proofs.algebra import Domain, LambdaLevels, check, real
from driffusion_core import coefficients as C
from proofs.operators import dpm_2m_step, dpm_step, ve_ancestral_step, ve_euler_step
from proofs.registry import Result, identity

__all__ = ["kdiffusion_euler_step", "kdiffusion_euler_ancestral_step", "kdiffusion_dpmpp_2m_step"]


def kdiffusion_euler_step(x, denoised, sigma, sigma_next):
    """k-diffusion ``sample_euler`` (s_churn = 0): ``d = to_d(x, sigma, denoised)``, ``x + d * (sigma_next - sigma)``."""
    d = (x - denoised) / sigma
    return x + d * (sigma_next - sigma)


def kdiffusion_dpmpp_2m_step(x, denoised, old_denoised, sigma_prev, sigma, sigma_next):
    """k-diffusion ``sample_dpmpp_2m``, one step: ``sigma_fn(t) = exp(-t)``, ``t_fn(sigma) = -log(sigma)``;
    first order without an earlier step (``old_denoised`` None) or to sigma = 0."""
    sigma_fn = lambda t: sp.exp(-t)  # noqa: E731
    t_fn = lambda s: -sp.log(s)  # noqa: E731
    t, t_next = t_fn(sigma), t_fn(sigma_next) if sigma_next != 0 else sp.oo
    h = t_next - t
    if old_denoised is None or sigma_next == 0:
        ratio = sigma_next / sigma if sigma_next == 0 else sigma_fn(t_next) / sigma_fn(t)
        return ratio * x - (sp.exp(-h) - 1) * denoised  # (-h).expm1()
    h_last = t - t_fn(sigma_prev)
    r = h_last / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return sigma_fn(t_next) / sigma_fn(t) * x - (sp.exp(-h) - 1) * denoised_d


@identity(
    "kdiffusion.sample_euler_step",
    "k-diffusion",
    "VEEulerSkip's one-level step x_s = x_t + (s - t) eps_hat (flow_euler_coefficient, eps_hat converted on "
    "ve_alpha_sigma) equals k-diffusion's sample_euler step x + (sigma_next - sigma) (x - D) / sigma, for a "
    "denoiser (prediction sample) and an epsilon model (D = x - sigma eps), to sigma_next > 0 and to 0.",
)
def euler_step_matches() -> Result:
    s_t, r = sp.symbols("sigma_t r", positive=True)
    s_s = r * s_t  # 0 < sigma_s < sigma_t on the domain (0 < r < 1)
    x, p = real("x p")
    res = {}
    for kind, denoised in (("sample", p), ("epsilon", x - s_t * p)):
        res[f"{kind}, to sigma_s"] = ve_euler_step(kind, x, p, s_t, s_s) - kdiffusion_euler_step(x, denoised, s_t, s_s)
        res[f"{kind}, to 0"] = ve_euler_step(kind, x, p, s_t, sp.Integer(0)) - kdiffusion_euler_step(x, denoised, s_t, sp.Integer(0))
    return check(res, _sigma_domain(s_t, r) & Domain.free([x, p]))


@identity(
    "kdiffusion.sample_dpmpp_2m_step",
    "k-diffusion",
    "DPMSolverSkip on the VE schedule (2M midpoint: dpm_solver_pp_2m_coefficients with alpha = 1, each "
    "x0_hat converted at its own sigma; first order: dpm_solver_pp_coefficients) equals k-diffusion's "
    "sample_dpmpp_2m step in t = -log(sigma): (sigma_next / sigma) x - expm1(-h) ((1 + 1/(2r)) D - D_old / (2r)) "
    "with h = t_next - t, r = (t - t_prev) / h, and its first-order step (the first step, and the step to "
    "sigma = 0, which returns D), for a denoiser and an epsilon model.",
)
def dpmpp_2m_step_matches() -> Result:
    lv = LambdaLevels(["p", "s", "t"], "ve")
    s_p, s_s, s_t = (lv.level[n] for n in "pst")
    x_p, p_p, x, p = real("x_p p_p x p")
    res = {}
    for kind in ("sample", "epsilon"):
        den_p = p_p if kind == "sample" else x_p - s_p * p_p
        den = p if kind == "sample" else x - s_s * p
        theirs = kdiffusion_dpmpp_2m_step(x, den, den_p, s_p, s_s, s_t)
        res[f"{kind}, 2M"] = lv.form(dpm_2m_step(kind, x, p, (x_p, p_p, s_p), s_s, s_t, "midpoint", "ve") - theirs)
        theirs = kdiffusion_dpmpp_2m_step(x, den, None, None, s_s, s_t)
        res[f"{kind}, first order"] = lv.form(dpm_step(kind, x, p, s_s, s_t, "ve") - theirs)
        theirs = kdiffusion_dpmpp_2m_step(x, den, den_p, s_p, s_s, sp.Integer(0))
        res[f"{kind}, to sigma = 0"] = dpm_2m_step(kind, x, p, (x_p, p_p, s_p), s_s, sp.Integer(0), "midpoint", "ve") - theirs
    return check(res, lv.domain & Domain.free([x_p, p_p, x, p]))


def kdiffusion_euler_ancestral_step(x, denoised, sigma, sigma_next, z, eta):
    """k-diffusion ``sample_euler_ancestral``, one step (``get_ancestral_step`` with eta <= 1, where its
    ``min(sigma_next, ...)`` is the second argument): ``x + d * (sigma_down - sigma) + z * sigma_up``."""
    sigma_up = eta * sp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = sp.sqrt(sigma_next**2 - sigma_up**2)
    d = (x - denoised) / sigma
    return x + d * (sigma_down - sigma) + z * sigma_up


def _sigma_domain(s_t, r, eta=None) -> Domain:
    """sigma_t > 0, sigma_s = r sigma_t with 0 < r < 1 (so 0 < sigma_s < sigma_t), and 0 < eta <= 1 when given:
    random rationals, and a readable point."""
    import random

    def sample(rng: random.Random):
        vals = {s_t: sp.Rational(rng.randint(1, 400), 20), r: sp.Rational(rng.randint(1, 96), 97)}
        if eta is not None:
            vals[eta] = sp.Rational(rng.randint(1, 97), 97)
        shown = {"sigma_t": vals[s_t], "sigma_s": vals[s_t] * vals[r]}
        return vals, {**shown, **({"eta": vals[eta]} if eta is not None else {})}

    fixed = {s_t: sp.Integer(3), r: sp.Rational(1, 2)}
    shown = {"sigma_t": sp.Integer(3), "sigma_s": sp.Rational(3, 2)}
    if eta is not None:
        fixed[eta] = shown["eta"] = sp.Rational(2, 3)
    return Domain(sample, (fixed, shown))


@identity(
    "kdiffusion.sample_euler_ancestral_step",
    "k-diffusion",
    "VEAncestralSkip's one-level step x0_hat + sigma_down eps_hat + sigma_up z (ve_ancestral_coefficients; the "
    "mirror ve_ancestral_step) equals "
    "k-diffusion's sample_euler_ancestral step x + (sigma_down - sigma) (x - D) / sigma + sigma_up z with "
    "get_ancestral_step's sigma_up = eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2), for 0 < eta <= 1, "
    "a denoiser and an epsilon model; ve_ancestral_chain_coefficients (VEAncestralSkip.chain_factors, which its "
    "drafts unroll) is that step written against (x0_hat, x_t); and it is DDIM(eta) in VE variables: with abar = "
    "vp_abar_of_sigma = 1 / (1 + sigma^2) and "
    "x = sqrt(1 + sigma^2) x_VP, sqrt(1 + sigma_s^2) times ddim_coefficients(abar_t, abar_s, eta) is "
    "(1, sigma_down, sigma_up).",
)
def euler_ancestral_step_matches() -> Result:
    s_t, r, eta = sp.symbols("sigma_t r eta", positive=True)
    s_s = r * s_t
    x, p, z = real("x p z")
    down, up = C.ve_ancestral_coefficients(s_t, s_s, eta)
    res = {}
    for kind, denoised in (("sample", p), ("epsilon", x - s_t * p)):
        ours = ve_ancestral_step(kind, x, p, s_t, s_s, eta, z)
        res[f"{kind}, step"] = ours - kdiffusion_euler_ancestral_step(x, denoised, s_t, s_s, z, eta)
        c_x0, c_x, c_z = C.ve_ancestral_chain_coefficients(s_t, s_s, eta)
        res[f"{kind}, chain factors: c_x0 x0_hat + c_x x + c_z z - step"] = c_x0 * denoised + c_x * x + c_z * z - ours
    c_x0, c_eps, sigma_ts = C.ddim_coefficients(C.vp_abar_of_sigma(s_t), C.vp_abar_of_sigma(s_s), eta)
    scale = sp.sqrt(1 + s_s**2)
    res["DDIM: x0 coefficient"] = scale * c_x0 - 1
    res["DDIM: eps coefficient = sigma_down"] = scale * c_eps - down
    res["DDIM: noise = sigma_up"] = scale * sigma_ts - up
    return check(res, _sigma_domain(s_t, r, eta) & Domain.free([x, p, z]))

r"""Parameterizations: ``x0_eps_coefficients`` and ``prediction_coefficients`` are mutual inverses.

Key: a state :math:`x = \alpha x_0 + \sigma\epsilon`; a model output :math:`p = c_{x_0} x_0 + c_\epsilon \epsilon`
(``prediction_coefficients``); the conversion back :math:`\hat x_0 = a_x x + a_p p`,
:math:`\hat\epsilon = b_x x + b_p p` (``x0_eps_coefficients``). The pair of 2x2 linear maps
(x0, eps) -> (x, p) and (x, p) -> (x0_hat, eps_hat) are inverses in both orders, given the schedule:
VP (:math:`\alpha^2+\sigma^2=1`) for ``v_prediction``, flow (:math:`\alpha = 1-t, \sigma = t`) for ``velocity``.
"""
from __future__ import annotations

import sympy as sp

from driffusion_core import coefficients as C
from proofs.algebra import Domain, Levels, canon, check, real
from proofs.display import show
from proofs.registry import Result, identity

__all__ = ["roundtrip"]


def roundtrip(prediction: str, alpha, sigma):
    """Residuals of both compositions of the two conversions (zero when they are inverses)."""
    x0, eps, x, p = real("x0 eps x p")
    c_x0, c_eps = C.prediction_coefficients(prediction, alpha, sigma)
    (a_x, a_p), (b_x, b_p) = C.x0_eps_coefficients(prediction, alpha, sigma)
    # (x0, eps) -> (x, p) -> (x0_hat, eps_hat)
    x_of, p_of = alpha * x0 + sigma * eps, c_x0 * x0 + c_eps * eps
    # (x, p) -> (x0_hat, eps_hat) -> (x', p')
    x0_hat, eps_hat = a_x * x + a_p * p, b_x * x + b_p * p
    return {
        "x0_hat(x(x0,eps), p(x0,eps)) - x0": a_x * x_of + a_p * p_of - x0,
        "eps_hat(x(x0,eps), p(x0,eps)) - eps": b_x * x_of + b_p * p_of - eps,
        "alpha x0_hat + sigma eps_hat - x": alpha * x0_hat + sigma * eps_hat - x,
        "p(x0_hat, eps_hat) - p": c_x0 * x0_hat + c_eps * eps_hat - p,
    }


def _vp(prediction: str) -> Result:
    lv = Levels(["t"])
    alpha, sigma = C.vp_alpha_sigma(lv.abar["t"])
    return check(roundtrip(prediction, alpha, sigma), lv.domain & Domain.free(real("x0 eps x p")))


def _needs(prediction: str, constraint: str) -> str:
    """What the residual becomes with free (alpha, sigma): shows which schedule the kind needs."""
    alpha, sigma = sp.symbols("alpha sigma", positive=True)
    res = roundtrip(prediction, alpha, sigma)["x0_hat(x(x0,eps), p(x0,eps)) - x0"]
    return f"With free alpha, sigma the x0 residual is {show(sp.factor(canon(res)))}: it needs {constraint}."


@identity(
    "param.epsilon",
    "Parameterizations",
    "epsilon: p = eps; x0_eps_coefficients and prediction_coefficients are mutual inverses on VP (both orders).",
)
def param_epsilon() -> Result:
    return _vp("epsilon")


@identity(
    "param.sample",
    "Parameterizations",
    "sample: p = x0; the two conversions are mutual inverses on VP (both orders).",
)
def param_sample() -> Result:
    return _vp("sample")


@identity(
    "param.v_prediction",
    "Parameterizations",
    "v_prediction: p = alpha eps - sigma x0 with (alpha, sigma) = vp_alpha_sigma(abar); the two "
    "conversions are mutual inverses (both orders).",
)
def param_v_prediction() -> Result:
    out = _vp("v_prediction")
    out.detail = (out.detail + " " + _needs("v_prediction", "alpha^2 + sigma^2 = 1 (VP)")).strip()
    return out


@identity(
    "param.velocity",
    "Parameterizations",
    "velocity: p = eps - x0 with (alpha, sigma) = flow_alpha_sigma(t) = (1-t, t); the two conversions "
    "are mutual inverses (both orders), for every t in (0, 1).",
)
def param_velocity() -> Result:
    t = sp.Symbol("t", positive=True)
    alpha, sigma = C.flow_alpha_sigma(t)
    out = check(roundtrip("velocity", alpha, sigma), Domain.free([t], 0, 1) & Domain.free(real("x0 eps x p")))
    out.detail = (out.detail + " " + _needs("velocity", "alpha + sigma = 1 (flow)")).strip()
    return out

r"""Flow matching: the Euler skip composes and is exact on the conditional path.

Key: sigmas t > s > u in (0, 1) (t the noisiest), :math:`x_t = (1-t) x_0 + t\,\epsilon`
(``flow_alpha_sigma``), velocity :math:`v = \epsilon - x_0`; the step is
:func:`proofs.operators.flow_step` (``FlowEulerSkip.__call__``: :math:`x_s = x_t + (s - t) v`, with v the
output itself or :math:`\hat\epsilon - \hat x_0` for epsilon / sample models).
"""
from __future__ import annotations

import random

import sympy as sp

from driffusion_core import coefficients as C
from proofs.algebra import Domain, check, real
from proofs.operators import flow_step
from proofs.registry import Result, identity

__all__ = ["FLOW_PREDICTIONS", "flow_times"]

FLOW_PREDICTIONS = ("velocity", "epsilon", "sample")


def flow_times(names: str = "t s u") -> tuple:
    """Positive sigmas and the domain 1 > t > s > u > 0 (fixed point 3/4, 1/2, 1/4)."""
    syms = sp.symbols(names, positive=True)

    def point(vals):
        vals = [sp.Rational(v) for v in vals]
        return dict(zip(syms, vals)), {str(s): v for s, v in zip(syms, vals)}

    def sample(rng: random.Random):
        return point(sorted((sp.Rational(v, 1000) for v in rng.sample(range(1, 1000), len(syms))), reverse=True))

    n = len(syms)
    fixed = point([sp.Rational(n - i, n + 1) for i in range(n)])
    return syms, Domain(sample, fixed)


@identity(
    "flow.euler_composes",
    "Flow",
    "Frozen prediction: S(S(x, p, t->s), p, s->u) = S(x, p, t->u) for a velocity, epsilon or sample model "
    "(for epsilon / sample the output is re-converted at s; (s-t) + (u-s) = u-t).",
)
def euler_composes() -> Result:
    (t, s, u), domain = flow_times()
    x, p = real("x p")
    res = {}
    for kind in FLOW_PREDICTIONS:
        two = flow_step(kind, flow_step(kind, x, p, t, s), p, s, u)
        res[kind] = two - flow_step(kind, x, p, t, u)
    return check(res, domain & Domain.free([x, p]))


@identity(
    "flow.conditional_path_exact",
    "Flow",
    "On the conditional path x_t = (1-t) x0 + t eps with the true prediction (v = eps - x0, or eps, or x0) "
    "the skip lands exactly on (1-s) x0 + s eps, for any s < t.",
)
def conditional_path_exact() -> Result:
    (t, s), domain = flow_times("t s")
    x0, eps = real("x0 eps")
    alpha_t, sigma_t = C.flow_alpha_sigma(t)
    alpha_s, sigma_s = C.flow_alpha_sigma(s)
    res = {}
    for kind in FLOW_PREDICTIONS:
        c_x0, c_eps = C.prediction_coefficients(kind, alpha_t, sigma_t)
        x_s = flow_step(kind, alpha_t * x0 + sigma_t * eps, c_x0 * x0 + c_eps * eps, t, s)
        res[kind] = x_s - (alpha_s * x0 + sigma_s * eps)
    return check(res, domain & Domain.free([x0, eps]))

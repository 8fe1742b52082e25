r"""DPM-Solver++ (data prediction): the first-order step is DDIM and composes, 2M with a frozen prediction is
first order, UniPC's predictor UniP-2 with bh2 is 2M midpoint, 2M heun is exact for x0_hat linear in lambda
(midpoint is not), and both land on the conditional path.

Key: :math:`\lambda = \log(\alpha/\sigma)`. The first-order identities follow DDIM's notation, levels
t (noisy) -> s -> u (clean), the step :func:`proofs.operators.dpm_step` (``DPMSolverSkip.__call__``:
``dpm_solver_pp_coefficients``). The 2M identities follow ``dpm_solver_pp_2m_coefficients``: previous
level p, current level s, target level t, :math:`h = \lambda_t - \lambda_s`, :math:`h_0 = \lambda_s - \lambda_p`,
the step :func:`proofs.operators.dpm_2m_step` (``DPMSolverSkip.multistep``). Their levels are a
:class:`~proofs.algebra.LambdaLevels` chain: :math:`q = e^\lambda = \alpha/\sigma` per level, the lambdas a
real symbol plus the gaps :math:`h_0 =` ``h_p`` and :math:`h =` ``h_s``; the library's ``log(alpha) - log(sigma)``
is turned into the lambdas before the zero test (:meth:`~proofs.algebra.LambdaLevels.form`).

The reference for exactness is the variation-of-constants solution of the diffusion ODE with a data
prediction x0(lambda) (Lu et al. 2022, DPM-Solver++), for any interpolant:

.. math:: x_t = \frac{\sigma_t}{\sigma_s} x_s + \sigma_t \int_{\lambda_s}^{\lambda_t} e^\lambda x_0(\lambda)\,d\lambda,

integrated by sympy.
"""
from __future__ import annotations

import sympy as sp

from driffusion_core import coefficients as C
from proofs.algebra import Domain, LambdaLevels, Levels, canon, check, real
from proofs.display import show
from proofs.flow import FLOW_PREDICTIONS
from proofs.operators import ddim_step, dpm_2m_step, dpm_step
from proofs.registry import Result, identity

__all__ = ["SOLVER_TYPES", "exact_data_prediction", "midpoint_defect_coefficients"]

VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")
SOLVER_TYPES = ("midpoint", "heun")


def _two_m(lv: LambdaLevels, solver_type: str, x_s, x0_s, x0_p):
    """The 2M step p, s -> t written against (x_s, x0_hat_s, x0_hat_p)."""
    args = [v for n in "pst" for v in (lv.alpha[n], lv.sigma[n])]
    c_x, c_x0, c_prev = C.dpm_solver_pp_2m_coefficients(*args, solver_type)
    return c_x * x_s + c_x0 * x0_s + c_prev * x0_p


def _first(lv: LambdaLevels, x_s, x0_s):
    c_x, c_x0 = C.dpm_solver_pp_coefficients(lv.alpha["s"], lv.sigma["s"], lv.alpha["t"], lv.sigma["t"])
    return c_x * x_s + c_x0 * x0_s


def exact_data_prediction(lv: LambdaLevels, x_s, x0_of):
    r""":math:`\frac{\sigma_t}{\sigma_s} x_s + \sigma_t \int_{\lambda_s}^{\lambda_t} e^\lambda x_0(\lambda) d\lambda`,
    the exact solution s -> t for a given :math:`x_0(\lambda)` (sympy's integral)."""
    lam = sp.Dummy("lambda", real=True)
    integral = sp.integrate(sp.exp(lam) * x0_of(lam), (lam, lv.lam["s"], lv.lam["t"]))
    return lv.sigma["t"] / lv.sigma["s"] * x_s + lv.sigma["t"] * integral


def _linear_x0(lv: LambdaLevels, x0_s, x0_p):
    """x0(lambda) linear in lambda through x0_p at lambda_p and x0_s at lambda_s."""
    slope = (x0_s - x0_p) / lv.gaps["p"]
    return lambda lam: x0_s + (lam - lv.lam["s"]) * slope


def midpoint_defect_coefficients(order: int = 6) -> dict:
    r"""The Taylor coefficients {k: c_k}, c_k != 0, of :math:`\phi(h) = h(1 - e^{-h})/2 - (h - 1 + e^{-h})`
    (2M midpoint minus the exact step, per :math:`\alpha_t D`) up to :math:`h^{order-1}`, by sympy's series."""
    h = sp.Symbol("h", positive=True)
    phi = h * (1 - sp.exp(-h)) / 2 - (h - 1 + sp.exp(-h))
    poly = sp.Poly(sp.series(phi, h, 0, order).removeO(), h)
    return {k: c for (k,), c in sorted(poly.terms()) if c != 0}


@identity(
    "dpm.first_order_is_ddim",
    "DPM-Solver++",
    "First order (DPMSolverSkip.__call__: x_s = (sigma_s/sigma_t) x_t + (alpha_s - alpha_t sigma_s/sigma_t) "
    "x0_hat, dpm_solver_pp_coefficients) is the DDIM eta = 0 step (ddim_coefficients) on VP, the same "
    "function of (x_t, model output) for epsilon / sample / v_prediction; its (c_x, c_x0) are DDIM's "
    "ddim_chain_coefficients.",
)
def first_order_is_ddim() -> Result:
    lv = Levels(["t", "s"])
    a_t, a_s = lv.abar["t"], lv.abar["s"]
    x, p, x0 = real("x p x0")
    res = {f"{kind}: DPM - DDIM": dpm_step(kind, x, p, a_t, a_s) - ddim_step(kind, x, p, a_t, a_s)
           for kind in VP_PREDICTIONS}
    c_x, c_x0 = C.dpm_solver_pp_coefficients(*C.vp_alpha_sigma(a_t), *C.vp_alpha_sigma(a_s))
    A, B, _ = C.ddim_chain_coefficients(a_t, a_s)
    res["(c_x, c_x0) - ddim_chain_coefficients"] = (c_x - B) * x + (c_x0 - A) * x0  # both, by linearity
    return check(res, lv.domain & Domain.free([x, p, x0]))


@identity(
    "dpm.first_order_composes",
    "DPM-Solver++",
    "First order, x0_hat frozen: S(S(x, x0, t->s), x0, s->u) = S(x, x0, t->u) exactly, for every interpolant "
    "(alpha, sigma > 0 free; sigma_u/sigma_s * sigma_s/sigma_t = sigma_u/sigma_t), and on VP with a frozen "
    "epsilon or sample output re-converted at s: why a draft is the first-order skip from one state.",
)
def first_order_composes() -> Result:
    lv = LambdaLevels(["t", "s", "u"], "any")
    x, x0, p = real("x x0 p")
    A, S = lv.alpha, lv.sigma

    def step(a, b, state):
        c_x, c_x0 = C.dpm_solver_pp_coefficients(A[a], S[a], A[b], S[b])
        return c_x * state + c_x0 * x0

    res = {"frozen x0_hat, any interpolant": step("s", "u", step("t", "s", x)) - step("t", "u", x)}
    vp = Levels(["t", "s", "u"])
    a_t, a_s, a_u = (vp.abar[n] for n in "tsu")
    for kind in ("epsilon", "sample"):
        two = dpm_step(kind, dpm_step(kind, x, p, a_t, a_s), p, a_s, a_u)
        res[f"frozen {kind} output, VP"] = two - dpm_step(kind, x, p, a_t, a_u)
    return check(res, lv.domain & vp.domain & Domain.free([x, x0, p]))


@identity(
    "dpm.2m_frozen_is_first_order",
    "DPM-Solver++",
    "2M (midpoint and heun) with x0_hat_p = x0_hat_s (a frozen prediction: D_1 = 0) is the first-order "
    "step, for every interpolant: c_x is the same and c_x0 + c_prev is the first-order c_x0. So a draft "
    "after the anchor's own 2M step is the first-order chain, which composes (dpm.first_order_composes).",
)
def two_m_frozen_is_first_order() -> Result:
    lv = LambdaLevels(["p", "s", "t"], "any")
    x, x0 = real("x x0")
    res = {f"{st}: 2M - first order": lv.form(_two_m(lv, st, x, x0, x0) - _first(lv, x, x0)) for st in SOLVER_TYPES}
    return check(res, lv.domain & Domain.free([x, x0]))


@identity(
    "dpm.unipc_bh2_is_2m_midpoint",
    "DPM-Solver++",
    "UniPC's predictor UniP-2 with bh2 (unipc_predictor_coefficients(..., 'bh2'): B(h) = e^-h - 1, weight 1/2 on "
    "(m_p - m_s)/r, r = (lambda_p - lambda_s)/h) is DPM-Solver++ 2M midpoint (dpm_solver_pp_2m_coefficients(..., "
    "'midpoint')) for every interpolant: c_x x_s + c_s m_s + c_p m_p is the same step for every x_s and distinct "
    "x0_hat m_s, m_p (D_1 != 0), i.e. (c_x, c_s, c_p) = (c_x, c_x0, c_prev). So UniPCSkip's step (bh2) is its "
    "corrector followed by a 2M midpoint step.",
)
def unipc_bh2_is_2m_midpoint() -> Result:
    lv = LambdaLevels(["p", "s", "t"], "any")
    args = [v for n in "pst" for v in (lv.alpha[n], lv.sigma[n])]
    x_s, m_s, m_p = real("x_s m_s m_p")
    states = (x_s, m_s, m_p)
    uni = C.unipc_predictor_coefficients(*args, "bh2")
    two_m = C.dpm_solver_pp_2m_coefficients(*args, "midpoint")
    res = {"UniP-2 (bh2) - 2M midpoint": lv.form(sum(c * v for c, v in zip(uni, states))
                                                 - sum(c * v for c, v in zip(two_m, states)))}
    return check(res, lv.domain & Domain.free(states))


@identity(
    "dpm.2m_heun_exact_linear_x0",
    "DPM-Solver++",
    "2M heun integrates the data-prediction ODE exactly when x0_hat is linear in lambda: with x0(lambda) = "
    "x0_s + (lambda - lambda_s)(x0_s - x0_p)/h0 it lands on (sigma_t/sigma_s) x_s + sigma_t "
    "Integral_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda, for every interpolant. For constant x0 "
    "(x0_p = x0_s) midpoint, heun and the first-order step are all exact.",
)
def two_m_heun_exact_linear_x0() -> Result:
    lv = LambdaLevels(["p", "s", "t"], "any")
    x_s, x0_s, x0_p = real("x_s x0_s x0_p")
    linear = exact_data_prediction(lv, x_s, _linear_x0(lv, x0_s, x0_p))
    constant = exact_data_prediction(lv, x_s, lambda lam: x0_s)
    res = {"heun, x0 linear in lambda": _two_m(lv, "heun", x_s, x0_s, x0_p) - linear}
    for st in SOLVER_TYPES:
        res[f"{st}, constant x0"] = _two_m(lv, st, x_s, x0_s, x0_s) - constant
    res["first order, constant x0"] = _first(lv, x_s, x0_s) - constant
    return check({k: lv.form(v) for k, v in res.items()}, lv.domain & Domain.free([x_s, x0_s, x0_p]))


@identity(
    "dpm.2m_midpoint_not_exact",
    "DPM-Solver++",
    "2M midpoint is NOT exact for x0_hat linear in lambda (heun is: dpm.2m_heun_exact_linear_x0): its "
    "defect is alpha_t D (h (1 - e^-h)/2 - (h - 1 + e^-h)) with D = (x0_s - x0_p)/h0, leading term "
    "-(h^3/12) alpha_t D: still a local error O(h^3) (second order), but not exact on this class.",
    expect_holds=False,
)
def two_m_midpoint_not_exact() -> Result:
    lv = LambdaLevels(["p", "s", "t"], "any")
    x_s, x0_s, x0_p = real("x_s x0_s x0_p")
    defect = _two_m(lv, "midpoint", x_s, x0_s, x0_p) - exact_data_prediction(lv, x_s, _linear_x0(lv, x0_s, x0_p))
    out = check({"midpoint - exact": lv.form(defect)}, lv.domain & Domain.free([x_s, x0_s, x0_p]),
                simplify_failures=True)
    h, D, e_minus_h = lv.gaps["s"], (x0_s - x0_p) / lv.gaps["p"], sp.exp(-lv.gaps["s"])
    shape = lv.alpha["t"] * D * (h * (1 - e_minus_h) / 2 - (h - 1 + e_minus_h))
    proved = canon(lv.form(defect - shape)) == 0
    coeffs = midpoint_defect_coefficients()
    h_ = sp.Symbol("h")
    terms = " ".join(f"{'-' if c < 0 else '+'} {show(abs(c) * h_**k)}" for k, c in coeffs.items())
    terms = terms[2:] if terms.startswith("+ ") else "-" + terms[2:]
    lead_k, lead_c = next(iter(coeffs.items()))
    out.defect_checks = {
        "midpoint - exact = alpha_t D phi(h)": proved,
        "phi(h) = -h^3/12 + O(h^4)": (lead_k, lead_c) == (3, sp.Rational(-1, 12)),
    }
    out.detail = (
        f"midpoint - exact = alpha_t D phi(h), D = (x0_s - x0_p)/h0, phi(h) = h (1 - e^-h)/2 - (h - 1 + e^-h) "
        f"({'proved' if proved else 'NOT proved'}); phi(h) = {terms} + O(h^{max(coeffs) + 1}) (sympy series): "
        f"leading term ({show(lead_c * h_**lead_k)}) alpha_t D. " + out.detail
    )
    return out


@identity(
    "dpm.conditional_path_exact",
    "DPM-Solver++",
    "On the conditional path x = alpha x0 + sigma eps with the true prediction at every level (x0_hat = x0), "
    "the first-order step and the 2M step (midpoint, heun; its previous state and output on the path too) "
    "land exactly on alpha_t x0 + sigma_t eps: on VP for epsilon / sample / v_prediction, on the flow "
    "interpolant for velocity / epsilon / sample.",
)
def conditional_path_exact() -> Result:
    x0, eps = real("x0 eps")
    res, domain = {}, Domain.free([x0, eps])
    on_path = {"vp": VP_PREDICTIONS, "flow": FLOW_PREDICTIONS}
    for interp, kinds in on_path.items():
        lv = LambdaLevels(["p", "s", "t"], interp)
        domain = domain & lv.domain
        A, S, L = lv.alpha, lv.sigma, lv.level

        def state(n, kind):
            c_x0, c_eps = C.prediction_coefficients(kind, A[n], S[n])
            return A[n] * x0 + S[n] * eps, c_x0 * x0 + c_eps * eps

        target = A["t"] * x0 + S["t"] * eps
        for kind in kinds:
            (x_p, p_p), (x_s, p_s) = state("p", kind), state("s", kind)
            res[f"{interp}, {kind}, first order"] = dpm_step(kind, x_s, p_s, L["s"], L["t"], interp) - target
            for st in SOLVER_TYPES:
                two = dpm_2m_step(kind, x_s, p_s, (x_p, p_p, L["p"]), L["s"], L["t"], st, interp)
                res[f"{interp}, {kind}, 2M {st}"] = lv.form(two - target)
    return check(res, domain)

r"""DDIM: exact composition at eta = 0, the DDPM posterior at eta = 1, the marginal at any eta,
and the failure of composition at 0 < eta < 1.

Key: levels t (noisy) -> s -> u (clean); the step is :func:`proofs.operators.ddim_step`
(``DDIMSkip.__call__``: convert the output at t, then ``ddim_coefficients``). With x0_hat frozen
and eps_hat re-derived from the state, one step is :math:`x_s = A x_0 + B x_t + \sigma_{t\to s} z`,
``(A, B, sigma) = ddim_chain_coefficients`` (``DDIMSkip.chain_factors``: the chain its drafts unroll).
"""
from __future__ import annotations

import sympy as sp

from driffusion_core import coefficients as C
from proofs.algebra import Domain, EtaInUnitInterval, Levels, canon, check, real
from proofs.display import nice
from proofs.operators import ddim_step, ddpm_std, ddpm_step, vp_x0_eps
from proofs.registry import Result, Status, identity

__all__ = []

VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")


@identity(
    "ddim.eta0_composes",
    "DDIM",
    "eta = 0, prediction frozen: S(S(x, p, t->s), p, s->u) = S(x, p, t->u) exactly, with x0_hat frozen and "
    "eps_hat re-derived from the state (ddim_chain_coefficients), and with a frozen epsilon or sample output "
    "re-converted at s. With (x0_hat, eps_hat) frozen it holds by definition (at eta = 0 ddim_coefficients' "
    "c_x0 = sqrt(abar_s), c_eps = sqrt(1 - abar_s) do not depend on the source level; checked against the code, "
    "which would fail if they did).",
)
def eta0_composes() -> Result:
    lv = Levels(["t", "s", "u"])
    a_t, a_s, a_u = (lv.abar[n] for n in "tsu")
    x, x0, eps, p = real("x x0 eps p")
    res = {}
    # frozen pair (definitional): at eta = 0 the step is x_s = c_x0 x0 + c_eps eps with c_x0, c_eps of the target
    # level alone, so s -> u and t -> u build the same expression; kept under a name that says so
    c0_su, ce_su, _ = C.ddim_coefficients(a_s, a_u)
    c0_tu, ce_tu, _ = C.ddim_coefficients(a_t, a_u)
    res["frozen pair (definitional: no source level at eta = 0)"] = (c0_su * x0 + ce_su * eps) - (c0_tu * x0 + ce_tu * eps)
    # frozen x0_hat: x_{k+1} = A x0 + B x_k
    A1, B1, _ = C.ddim_chain_coefficients(a_t, a_s)
    A2, B2, _ = C.ddim_chain_coefficients(a_s, a_u)
    A, B, _ = C.ddim_chain_coefficients(a_t, a_u)
    res["frozen x0_hat"] = (A2 * x0 + B2 * (A1 * x0 + B1 * x)) - (A * x0 + B * x)
    for kind in ("epsilon", "sample"):
        two = ddim_step(kind, ddim_step(kind, x, p, a_t, a_s), p, a_s, a_u)
        res[f"frozen {kind} output"] = two - ddim_step(kind, x, p, a_t, a_u)
    detail = ("The frozen x0_hat and frozen output residuals are proved; the frozen (x0_hat, eps_hat) one is 0 by "
              "construction (eta = 0's c_x0, c_eps do not depend on the source level), so it is definitional.")
    return check(res, lv.domain & Domain.free([x, x0, eps, p]), detail=detail)


@identity(
    "ddim.frozen_v_does_not_compose",
    "DDIM",
    "eta = 0 with a frozen v_prediction output re-converted at s does NOT compose (v means a different "
    "(x0, eps) pair at each level): why drafts freeze (x0_hat, eps_hat) at the anchor instead. With "
    "(alpha, sigma) = (cos theta, sin theta) a v step t->s is the rotation x_s = cos(a) x - sin(a) v, "
    "a = theta_t - theta_s, so two steps - one step = sin(b) (sin(a) x - (1 - cos(a)) v), b = theta_s - theta_u.",
    expect_holds=False,
)
def frozen_v_does_not_compose() -> Result:
    lv = Levels(["t", "s", "u"])
    a_t, a_s, a_u = (lv.abar[n] for n in "tsu")
    x, p = real("x p")
    two = ddim_step("v_prediction", ddim_step("v_prediction", x, p, a_t, a_s), p, a_s, a_u)
    res = {"two steps - one step": two - ddim_step("v_prediction", x, p, a_t, a_u)}
    out = check(res, lv.domain & Domain.free([x, p]), simplify_failures=True)
    (al_t, si_t), (al_s, si_s), (al_u, si_u) = (C.vp_alpha_sigma(a) for a in (a_t, a_s, a_u))
    cos_a, sin_a = al_t * al_s + si_t * si_s, si_t * al_s - al_t * si_s  # cos, sin of theta_t - theta_s
    sin_b = si_s * al_u - al_s * si_u  # sin(theta_s - theta_u)
    shape = sin_b * (sin_a * x - (1 - cos_a) * p)
    rotation = ddim_step("v_prediction", x, p, a_t, a_s) - (cos_a * x - sin_a * p)
    out.defect_checks = {
        "a v step is the rotation cos(a) x - sin(a) v": canon(rotation) == 0,
        "two steps - one step = sin(b) (sin(a) x - (1 - cos(a)) v)": canon(res["two steps - one step"] - shape) == 0,
    }
    ok = all(out.defect_checks.values())
    out.detail = (
        "two steps - one step = sin(b) (sin(a) x - (1 - cos(a)) v), cos(a) = sqrt(abar_t abar_s) + sqrt((1 - "
        "abar_t)(1 - abar_s)), sin(a) = sqrt((1 - abar_t) abar_s) - sqrt(abar_t (1 - abar_s)), sin(b) likewise "
        f"for s -> u ({'proved' if ok else 'NOT proved'}). " + out.detail
    )
    return out


@identity(
    "ddim.eta1_is_ddpm_posterior",
    "DDIM",
    "eta = 1: the DDIM step is the DDPM posterior step (fixed_small) pathwise, for the same z: with "
    "eps_hat = (x_t - sqrt(abar_t) x0_hat)/sqrt(1 - abar_t) its x0 and x_t coefficients are c_x0, c_xt and "
    "sigma_{t->s}^2 is the posterior variance; for every VP prediction type. Its chain factors "
    "(ddim_chain_coefficients) are DDPM's, so eta = 1 drafts are DDPM drafts.",
)
def eta1_is_ddpm_posterior() -> Result:
    lv = Levels(["t", "s"])
    a_t, a_s = lv.abar["t"], lv.abar["s"]
    x, p, z = real("x p z")
    _, _, sigma = C.ddim_coefficients(a_t, a_s, 1)
    _, _, var = C.ddpm_posterior_coefficients(a_t, a_s)
    res = {"sigma_{t->s}^2 - Var": sigma**2 - var}
    # the chain factors DDIMSkip couples noise with are DDPMSkip's, so eta = 1 drafts are DDPM drafts
    A, B, s = C.ddim_chain_coefficients(a_t, a_s, 1)
    c_x0, c_xt, _ = C.ddpm_posterior_coefficients(a_t, a_s)
    res["chain factors (A, B, sigma) - (c_x0, c_xt, std)"] = (
        (A - c_x0) * x + (B - c_xt) * p + (s - ddpm_std(a_t, a_s)) * z  # three residuals in one, by linearity
    )
    for kind in VP_PREDICTIONS:
        res[f"{kind}: DDIM(eta=1) - DDPM"] = ddim_step(kind, x, p, a_t, a_s, 1, z) - ddpm_step(kind, x, p, a_t, a_s, z)
    return check(res, lv.domain & Domain.free([x, p, z]))


@identity(
    "ddim.marginal_preserved",
    "DDIM",
    "Any 0 <= eta <= 1: on the conditional path x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps with the true "
    "eps, the step lands in law on q(x_s|x0) = N(sqrt(abar_s) x0, 1 - abar_s): mean sqrt(abar_s) x0 and "
    "variance c_eps^2 + sigma_{t->s}^2 = 1 - abar_s.",
)
def marginal_preserved() -> Result:
    lv = Levels(["t", "s"])
    a_t, a_s = lv.abar["t"], lv.abar["s"]
    eta = sp.Symbol("eta", nonnegative=True)
    x0, eps, z = real("x0 eps z")
    alpha, sigma = C.vp_alpha_sigma(a_t)
    x_s = ddim_step("epsilon", alpha * x0 + sigma * eps, eps, a_t, a_s, eta, z)
    m_s, sd_s = C.vp_alpha_sigma(a_s)
    # x_s = m x0 + e eps + n z with eps, z independent N(0, 1): law given x0 is N(m x0, e^2 + n^2)
    e, n = sp.diff(x_s, eps), sp.diff(x_s, z)
    res = {
        "mean - sqrt(abar_s) x0": x_s.subs({eps: 0, z: 0}) - m_s * x0,
        "variance - (1 - abar_s)": e**2 + n**2 - sd_s**2,
    }
    domain = lv.domain & Domain.free([x0]) & Domain(
        lambda rng: ({eta: sp.Rational(rng.randint(0, 100), 100)}, {}), ({eta: sp.Rational(1, 2)}, {})
    )
    return check(res, domain, Status.IN_DISTRIBUTION)


@identity(
    "ddim.conditional_path_exact",
    "DDIM",
    "eta = 0 on the conditional path: x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps with the true prediction "
    "(epsilon, sample or v_prediction of (x0, eps)) lands exactly on sqrt(abar_s) x0 + sqrt(1-abar_s) eps.",
)
def conditional_path_exact() -> Result:
    lv = Levels(["t", "s"])
    a_t, a_s = lv.abar["t"], lv.abar["s"]
    x0, eps = real("x0 eps")
    alpha_t, sigma_t = C.vp_alpha_sigma(a_t)
    alpha_s, sigma_s = C.vp_alpha_sigma(a_s)
    res = {}
    for kind in VP_PREDICTIONS:
        c_x0, c_eps = C.prediction_coefficients(kind, alpha_t, sigma_t)
        x_s = ddim_step(kind, alpha_t * x0 + sigma_t * eps, c_x0 * x0 + c_eps * eps, a_t, a_s)
        res[kind] = x_s - (alpha_s * x0 + sigma_s * eps)
    return check(res, lv.domain & Domain.free([x0, eps]))


@identity(
    "ddim.eta_composition_not_exact",
    "DDIM",
    "0 < eta < 1, x0_hat frozen: two steps t->s->u do NOT have the law of the one step t->u given "
    "(x_t, x0_hat), so a multi-level DDIM(eta) skip is not the chain even in distribution (drafts are the "
    "chain itself: ddim.chain_drafts_3). The defect vanishes at "
    "eta = 0 and eta = 1. Both the chain and the one step are marginal-consistent: the chain's larger "
    "variance is balanced by a smaller x_t coefficient B, so B^2 (1 - abar_t) + variance is 1 - abar_u for both.",
    expect_holds=False,
)
def eta_composition_not_exact() -> Result:
    lv = Levels(["t", "s", "u"])
    eta = EtaInUnitInterval()
    res = _eta_chain_residuals(lv, eta.eta)
    out = check(res, lv.domain & eta.domain, simplify_failures=True)
    # the defect in the reader's symbols (squares only: rational in abar, eta)
    P, e = lv.plain, eta.plain
    _, B1p, s1p = C.ddim_chain_coefficients(P["t"], P["s"], e)
    _, B2p, s2p = C.ddim_chain_coefficients(P["s"], P["u"], e)
    _, Bp, sp_ = C.ddim_chain_coefficients(P["t"], P["u"], e)
    dvar = B2p**2 * s1p**2 + s2p**2 - sp_**2
    shape = e**2 * (1 - e**2) * (P["s"] - P["t"]) * (P["u"] - P["s"]) * (1 - P["u"]) / (
        P["s"] * P["u"] * (1 - P["s"]) * (1 - P["t"])
    )
    dB2 = B2p**2 * B1p**2 - Bp**2
    ends = {end: check(_eta_chain_residuals(lv, end), lv.domain).status is Status.PROVED for end in (0, 1)}
    out.defect_checks = {
        "variance defect = eta^2 (1 - eta^2) (...)": canon(dvar - shape) == 0,
        "(x_t coefficient)^2 defect = -(variance defect)/(1 - abar_t)": canon(dB2 + shape / (1 - P["t"])) == 0,
        "eta = 0: residuals 0": ends[0],
        "eta = 1: residuals 0": ends[1],
        "chain: B^2 (1 - abar_t) + variance = 1 - abar_u": canon(
            (B2p * B1p) ** 2 * (1 - P["t"]) + B2p**2 * s1p**2 + s2p**2 - (1 - P["u"])) == 0,
        "one step: B^2 (1 - abar_t) + variance = 1 - abar_u": canon(Bp**2 * (1 - P["t"]) + sp_**2 - (1 - P["u"])) == 0,
    }
    out.detail = (
        f"Variance of chain - one step = {nice(dvar, shape)} > 0; "
        f"(x_t coefficient)^2 of chain - one step = {nice(dB2, -shape / (1 - P['t']))}. "
        f"At eta = 0 and eta = 1 the residuals are {'0 (proved)' if all(ends.values()) else 'NOT all 0'}. "
        + out.detail
    )
    return out


def _eta_chain_residuals(lv: Levels, eta):
    """Two DDIM(eta) steps t->s->u with x0_hat frozen against one step t->u: coefficients and variance."""
    a_t, a_s, a_u = (lv.abar[n] for n in "tsu")
    A1, B1, s1 = C.ddim_chain_coefficients(a_t, a_s, eta)
    A2, B2, s2 = C.ddim_chain_coefficients(a_s, a_u, eta)
    A, B, s = C.ddim_chain_coefficients(a_t, a_u, eta)
    return {
        "x0 coefficient": A2 + B2 * A1 - A,
        "x_t coefficient": B2 * B1 - B,
        "variance": B2**2 * s1**2 + s2**2 - s**2,
    }


@identity(
    "ddim.chain_factors_are_step",
    "DDIM",
    "ddim_chain_coefficients (A, B, sigma) is the DDIM(eta) step itself (ddim_step: x0_eps_coefficients + "
    "ddim_coefficients, as DDIMSkip.__call__): A x0_hat + B x_t + sigma z = the step from x_t with the output "
    "p, x0_hat the conversion of p at t, for epsilon / sample / v_prediction (eps_hat re-derived from x_t and "
    "x0_hat is the model's), for eta = 0, eta = 1 and every 0 < eta < 1: the factors DDIMSkip.chain_factors "
    "unrolls into drafts and coupled noise are the real step's.",
)
def chain_factors_are_step() -> Result:
    lv = Levels(["t", "s"])
    a_t, a_s = lv.abar["t"], lv.abar["s"]
    x, p, z = real("x p z")
    eta = EtaInUnitInterval()
    res = {}
    for label, e in (("0 < eta < 1", eta.eta), ("eta = 0", 0), ("eta = 1", 1)):
        A, B, s = C.ddim_chain_coefficients(a_t, a_s, e)
        for kind in VP_PREDICTIONS:
            x0_hat, _ = vp_x0_eps(kind, x, p, a_t)
            res[f"{label}, {kind}: A x0_hat + B x_t + sigma z - step"] = (
                A * x0_hat + B * x + s * z - ddim_step(kind, x, p, a_t, a_s, e, z)
            )
    return check(res, lv.domain & eta.domain & Domain.free([x, p, z]))


@identity(
    "ddim.chain_drafts_3",
    "DDIM",
    "Any eta, x0_hat frozen: the draft of SkipTransition.drafts (chain_draft_coefficients of the "
    "ddim_chain_coefficients steps: A~ x0 + B~ x_t + sum_k W_k z_k) is the chain of three one-level DDIM(eta) "
    "steps (ddim_step with the output x0_hat frozen as a sample prediction, eps re-derived from each state) on "
    "the same z_k, pathwise, although the one big skip is not (ddim.eta_composition_not_exact).",
)
def chain_drafts_3() -> Result:
    names = ["t0", "t1", "t2", "t3"]
    lv = Levels(names)
    eta = EtaInUnitInterval()
    steps = [C.ddim_chain_coefficients(lv.abar[a], lv.abar[b], eta.eta) for a, b in zip(names, names[1:])]
    x0, xt = real("x0 x_t")
    zs = real("z0 z1 z2")
    At, Bt, W = C.chain_draft_coefficients(*(list(col) for col in zip(*steps)))
    res, state = {}, xt
    for j in range(3):  # every row of the window
        state = ddim_step("sample", state, x0, lv.abar[names[j]], lv.abar[names[j + 1]], eta.eta, zs[j])
        draft = At[j] * x0 + Bt[j] * xt + sum(w * z for w, z in zip(W[j], zs))
        res[f"draft {j} - chain of {j + 1} DDIM steps"] = draft - state
    return check(res, lv.domain & eta.domain & Domain.free([x0, xt, *zs]))

r"""DDPM: the posterior is Bayes' rule, kernels compose, multi-level skips equal chains.

Key: levels t (noisy) -> s -> u (clean), :math:`\alpha_{t|s} = \bar\alpha_t/\bar\alpha_s`,
:math:`\beta_{t|s} = 1 - \alpha_{t|s}`. Forward kernels
:math:`q(x_t \mid x_s) = N(\sqrt{\alpha_{t|s}}\,x_s, \beta_{t|s})` are ``vp_alpha_sigma(abar_t/abar_s)``
(mean coefficient and std). The posterior :math:`q(x_s \mid x_t, x_0) = N(c_{x_0} x_0 + c_{x_t} x_t, \mathrm{Var})`
is ``ddpm_posterior_coefficients``; one step of the chain with x0_hat frozen is
:math:`x_{k+1} = A_k \hat x_0 + B_k x_k + s_k z_k` with :math:`(A_k, B_k) = (c_{x_0}, c_{x_t})` and
:math:`s_k` = ``DDPMSkip._std`` (:func:`proofs.operators.ddpm_std`).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import sympy as sp

from driffusion_core import coefficients as C
from proofs.algebra import Domain, Levels, canon, check, real
from proofs.display import nice
from proofs.operators import ddpm_std
from proofs.registry import Result, Status, identity

__all__ = ["chain_unrolled"]


def _log_normal_quadratic(x, mean, var):
    """The x-dependent part of log N(x; mean, var)."""
    return -((x - mean) ** 2) / (2 * var)


@identity(
    "ddpm.posterior_bayes",
    "DDPM",
    "Completing the square in x_s of q(x_t|x_s) q(x_s|x0) gives exactly the mean c_x0 x0 + c_xt x_t and the "
    "variance of ddpm_posterior_coefficients; what is left over is log q(x_t|x0) (exponent and normalizer).",
)
def posterior_bayes() -> Result:
    lv = Levels(["t", "s"])
    a_t, a_s = lv.abar["t"], lv.abar["s"]
    x0, xs, xt = real("x0 x_s x_t")
    m_ts, sd_ts = C.vp_alpha_sigma(a_t / a_s)  # q(x_t | x_s)
    m_s, sd_s = C.vp_alpha_sigma(a_s)  # q(x_s | x0)
    m_t, sd_t = C.vp_alpha_sigma(a_t)  # q(x_t | x0)
    log_joint = _log_normal_quadratic(xt, m_ts * xs, sd_ts**2) + _log_normal_quadratic(xs, m_s * x0, sd_s**2)
    quad = sp.Poly(sp.expand(log_joint), xs)
    A, B, rest = (quad.coeff_monomial(xs**2), quad.coeff_monomial(xs), quad.coeff_monomial(1))
    bayes_var, bayes_mean = -1 / (2 * A), -B / (2 * A)
    c_x0, c_xt, var = C.ddpm_posterior_coefficients(a_t, a_s)
    residuals = {
        "mean": bayes_mean - (c_x0 * x0 + c_xt * xt),
        "variance": bayes_var - var,
        # log q(x_t|x_s) + log q(x_s|x0) = log N(x_s; mean, var) + log q(x_t|x0): the exponents ...
        "leftover exponent - log q(x_t|x0)": rest - B**2 / (4 * A) - _log_normal_quadratic(xt, m_t * x0, sd_t**2),
        # ... and the normalizers 1/sqrt(2 pi v): v_ts v_s = var v_t
        "normalizer": sd_ts**2 * sd_s**2 - var * sd_t**2,
    }
    return check(residuals, lv.domain & Domain.free([x0, xt]))


@identity(
    "ddpm.forward_kernels_compose",
    "DDPM",
    "q(x_t|x_s) composed with q(x_s|x_u) is q(x_t|x_u) for any u < s < t (Chapman-Kolmogorov; with u the "
    "data level, q(x_t|x_s) composed with q(x_s|x0) is q(x_t|x0)).",
)
def forward_kernels_compose() -> Result:
    lv = Levels(["t", "s", "u"])
    a_t, a_s, a_u = (lv.abar[n] for n in "tsu")

    def composed(a_far, a_mid, a_near):
        # x_mid = m1 x_near + sd1 e1, x_far = m2 x_mid + sd2 e2 against x_far = m x_near + sd e
        m1, sd1 = C.vp_alpha_sigma(a_mid / a_near)
        m2, sd2 = C.vp_alpha_sigma(a_far / a_mid)
        m, sd = C.vp_alpha_sigma(a_far / a_near)
        return m2 * m1 - m, m2**2 * sd1**2 + sd2**2 - sd**2

    dm, dv = composed(a_t, a_s, a_u)
    dm0, dv0 = composed(a_t, a_s, sp.Integer(1))
    residuals = {"mean u->t": dm, "variance u->t": dv, "mean x0->t": dm0, "variance x0->t": dv0}
    return check(residuals, lv.domain, Status.IN_DISTRIBUTION, "Gaussian kernels: equal mean and variance.")


def chain_unrolled(steps: Sequence[tuple], x0, xt, zs) -> sp.Expr:
    """x after the chain x_{k+1} = A_k x0 + B_k x_k + s_k z_k from x_t (steps: (A_k, B_k, s_k))."""
    x = xt
    for (A, B, s), z in zip(steps, zs):
        x = A * x0 + B * x + s * z
    return x


def _chain(lv: Levels, variance_type: str) -> List[tuple]:
    names = lv.names
    out = []
    for a, b in zip(names, names[1:]):
        c_x0, c_xt, _ = C.ddpm_posterior_coefficients(lv.abar[a], lv.abar[b])
        out.append((c_x0, c_xt, ddpm_std(lv.abar[a], lv.abar[b], variance_type)))
    return out


def _two_level(variance_type: str) -> Tuple[Levels, Dict[str, sp.Expr]]:
    lv = Levels(["t", "s", "u"])
    (A1, B1, s1), (A2, B2, s2) = _chain(lv, variance_type)
    A, B, _ = C.ddpm_posterior_coefficients(lv.abar["t"], lv.abar["u"])
    s = ddpm_std(lv.abar["t"], lv.abar["u"], variance_type)
    # x_u = (A2 + B2 A1) x0 + B2 B1 x_t + (B2 s1 z1 + s2 z2): Gaussian given (x_t, x0)
    return lv, {
        "x0 coefficient": A2 + B2 * A1 - A,
        "x_t coefficient": B2 * B1 - B,
        "variance": B2**2 * s1**2 + s2**2 - s**2,
    }


@identity(
    "ddpm.two_level_in_distribution",
    "DDPM",
    "fixed_small, x0_hat frozen: two one-level posteriors t->s->u have the law of the one-step posterior "
    "t->u given (x_t, x0_hat): same mean coefficients, same variance.",
)
def two_level_in_distribution() -> Result:
    lv, residuals = _two_level("fixed_small")
    return check(residuals, lv.domain, Status.IN_DISTRIBUTION)


@identity(
    "ddpm.fixed_large_not_composable",
    "DDPM",
    "fixed_large (variance beta_{t|s}): the mean composes, but the two-level chain's variance "
    "B_{s->u}^2 beta_{t|s} + beta_{s|u} is not beta_{t|u}, so a fixed_large multi-level skip is not the chain.",
    expect_holds=False,
)
def fixed_large_not_composable() -> Result:
    lv, residuals = _two_level("fixed_large")
    out = check(residuals, lv.domain, simplify_failures=True)
    P = lv.plain
    shape = -(P["s"] - P["t"]) * (P["u"] - P["s"]) * (2 - P["s"] - P["u"]) / (P["u"] * (1 - P["s"]) ** 2)
    defect = nice(lv.to_plain(residuals["variance"]), shape)
    out.defect_checks = {
        "mean composes: x0 coefficient residual 0": out.residuals["x0 coefficient"] == 0,
        "mean composes: x_t coefficient residual 0": out.residuals["x_t coefficient"] == 0,
        "variance defect = -(abar_s - abar_t)(abar_u - abar_s)(2 - abar_s - abar_u)/(abar_u (1 - abar_s)^2)":
            canon(lv.to_plain(residuals["variance"]) - shape) == 0,
    }
    out.detail = f"Variance of chain - one step = {defect} < 0. " + out.detail
    return out


def _coupled(m: int, variance_type: str = "fixed_small") -> Result:
    names = ["t%d" % k for k in range(m + 1)]
    lv = Levels(names)
    steps = _chain(lv, variance_type)
    x0, xt = real("x0 x_t")
    zs = real(" ".join(f"z{k}" for k in range(m)))
    # SkipTransition.drafts: the chain unrolled, A~ x0 + B~ x_t + sum_k W_k z_k (last row)
    At, Bt, W = C.chain_draft_coefficients(*(list(col) for col in zip(*steps)))
    draft = At[-1] * x0 + Bt[-1] * xt + sum(wk * zk for wk, zk in zip(W[-1], zs))
    chain = chain_unrolled(steps, x0, xt, zs)
    A, B, var = C.ddpm_posterior_coefficients(lv.abar[names[0]], lv.abar[names[-1]])
    residuals = {
        "draft - chain (pathwise)": draft - chain,
        "x_t coefficient - one-step posterior's": Bt[-1] - B,
        "x0 coefficient - one-step posterior's": At[-1] - A,
    }
    if variance_type == "fixed_small":  # the chain's noise variance is the one-step posterior's
        residuals["sum w_k^2 - Var"] = sum(wk**2 for wk in W[-1]) - var
    return check(residuals, lv.domain & Domain.free([x0, xt, *zs]))


@identity(
    "ddpm.coupled_noise_2",
    "DDPM",
    "Coupled noise, 2 steps, fixed_small: the draft (chain_draft_coefficients: A~ x0 + B~ x_t + sum w_k z_k) "
    "is the chain of one-level posteriors on the same z_k, pathwise; its mean coefficients are the one-step "
    "posterior's and sum w_k^2 its variance, so the multi-level skip on unit coupled noise has the same law.",
)
def coupled_noise_2() -> Result:
    return _coupled(2)


@identity(
    "ddpm.coupled_noise_3",
    "DDPM",
    "Coupled noise, 3 steps: the same, for a chain of three one-level posteriors.",
)
def coupled_noise_3() -> Result:
    return _coupled(3)


@identity(
    "ddpm.coupled_noise_fixed_large_3",
    "DDPM",
    "Coupled noise, 3 steps, fixed_large: the draft is the chain pathwise, and its mean coefficients are "
    "still the one-step posterior's (the mean does not depend on the variance type), although the "
    "multi-level fixed_large skip is noisier than the chain.",
)
def coupled_noise_fixed_large_3() -> Result:
    return _coupled(3, "fixed_large")


@identity(
    "ddpm.posterior_variance_general",
    "DDPM",
    "posterior_variance = sigma_s^2 (1 - SNR_t / SNR_s) is Bayes' rule's variance of q(x_s | x_t, x0) for any "
    "interpolant x = alpha x0 + sigma eps (VP, flow, VE); for VP it is the fixed_small variance of "
    "ddpm_posterior_coefficients, for VE k-diffusion's sigma_up^2 at eta = 1. PicardScheduler(norm='posterior') "
    "divides by it.",
)
def posterior_variance_any_interpolant() -> Result:
    # alpha_t = k alpha_s (0 < k), sigma_t^2 = k^2 sigma_s^2 + w (w > 0: the forward kernel's variance)
    a_s, s_s, k, w = sp.symbols("alpha_s sigma_s k w", positive=True)
    a_t, s_t = k * a_s, sp.sqrt(k**2 * s_s**2 + w)
    x0, xs, xt = real("x0 x_s x_t")
    log_joint = _log_normal_quadratic(xt, k * xs, w) + _log_normal_quadratic(xs, a_s * x0, s_s**2)
    quad = sp.Poly(sp.expand(log_joint), xs)
    bayes_var = -1 / (2 * quad.coeff_monomial(xs**2))
    residuals = {"Bayes' rule, any (alpha, sigma)": bayes_var - C.posterior_variance(a_t, s_t, a_s, s_s)}
    lv = Levels(["t", "s"])
    (at, st), (as_, ss) = C.vp_alpha_sigma(lv.abar["t"]), C.vp_alpha_sigma(lv.abar["s"])
    residuals["VP: fixed_small variance"] = (
        C.posterior_variance(at, st, as_, ss) - C.ddpm_posterior_coefficients(lv.abar["t"], lv.abar["s"])[2]
    )
    sig_t, r = sp.symbols("sigma_t r", positive=True)  # VE: sigma_s = r sigma_t, 0 < r < 1
    (vt, vst), (vs, vss) = C.ve_alpha_sigma(sig_t), C.ve_alpha_sigma(r * sig_t)
    residuals["VE: sigma_up^2 at eta = 1"] = (
        C.posterior_variance(vt, vst, vs, vss) - C.ve_ancestral_coefficients(sig_t, r * sig_t, 1)[1] ** 2
    )

    def sample(rng):
        vals = {a_s: sp.Rational(rng.randint(1, 97), 97), s_s: sp.Rational(rng.randint(1, 300), 97),
                k: sp.Rational(rng.randint(1, 96), 97), w: sp.Rational(rng.randint(1, 300), 97),
                sig_t: sp.Rational(rng.randint(1, 400), 20), r: sp.Rational(rng.randint(1, 96), 97)}
        return vals, {str(s): v for s, v in vals.items()}

    fixed = {a_s: sp.Rational(4, 5), s_s: sp.Rational(3, 5), k: sp.Rational(1, 2), w: sp.Rational(1, 2),
             sig_t: sp.Integer(3), r: sp.Rational(1, 2)}
    domain = Domain(sample, (fixed, {str(s): v for s, v in fixed.items()})) & lv.domain & Domain.free([x0, xt])
    return check(residuals, domain)

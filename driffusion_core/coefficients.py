r"""Every coefficient formula of the library, written once.

Each function takes schedule values and returns coefficients. The functions
work on Python floats, on float64 torch tensors (one value per row) and on
sympy expressions alike, so the operators in ``solvers/`` and the proofs in
``proofs/`` use the very same formulas: a proof cannot drift from the code.

Notation (DRiffusion, arXiv 2603.25872, and DDIM/DDPM):

* ``abar_t``  :math:`\bar\alpha_t`, the cumulative signal level at level t.
* ``alpha, sigma``  the interpolant coefficients, :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon`.
  VP: :math:`\alpha_t = \sqrt{\bar\alpha_t}, \sigma_t = \sqrt{1-\bar\alpha_t}`;
  flow matching: :math:`\alpha_t = 1 - t, \sigma_t = t`; variance exploding (k-diffusion, EDM): the
  level is sigma itself, :math:`\alpha = 1`.
* ``t -> s``  a (possibly multi-level) skip from level t to the later, cleaner level s.
* ``x0_hat, eps_hat``  the prediction converted to clean sample and noise at the source level.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

__all__ = [
    "sqrt",
    "vp_alpha_sigma",
    "flow_alpha_sigma",
    "ve_alpha_sigma",
    "vp_abar_of_sigma",
    "ve_ancestral_coefficients",
    "ve_ancestral_chain_coefficients",
    "x0_eps_coefficients",
    "prediction_coefficients",
    "ddim_coefficients",
    "ddpm_posterior_coefficients",
    "ddpm_large_variance",
    "posterior_variance",
    "ddim_chain_coefficients",
    "flow_euler_coefficient",
    "log",
    "dpm_solver_pp_coefficients",
    "dpm_solver_pp_2m_coefficients",
    "unipc_predictor_coefficients",
    "unipc_corrector_coefficients",
    "chain_noise_weights",
    "chain_draft_coefficients",
]


def _is_sympy(v: Any) -> bool:
    return type(v).__module__.startswith("sympy")


def _keep_type(v: Any, name: str) -> Any:
    """``name`` ("sqrt", "log") of v, keeping its type: math for floats, torch for tensors, exact for sympy."""
    if _is_sympy(v):
        import sympy

        return getattr(sympy, name)(v)
    if hasattr(v, name) and not isinstance(v, (int, float)):
        return getattr(v, name)()
    return getattr(math, name)(v)


def sqrt(v: Any) -> Any:
    """Square root that keeps the type: math for floats, torch for tensors, exact for sympy."""
    return _keep_type(v, "sqrt")


def log(v: Any) -> Any:
    """Natural logarithm that keeps the type: math for floats, torch for tensors, exact for sympy."""
    return _keep_type(v, "log")


# --------------------------------------------------------------------------- interpolants


def vp_alpha_sigma(abar: Any) -> Tuple[Any, Any]:
    r"""VP interpolant: :math:`(\alpha, \sigma) = (\sqrt{\bar\alpha}, \sqrt{1-\bar\alpha})`."""
    return sqrt(abar), sqrt(1 - abar)


def flow_alpha_sigma(t: Any) -> Tuple[Any, Any]:
    r"""Rectified-flow interpolant :math:`x_t = (1-t) x_0 + t\,\epsilon`: :math:`(\alpha, \sigma) = (1-t, t)`."""
    return 1 - t, t


def ve_alpha_sigma(sigma: Any) -> Tuple[Any, Any]:
    r"""Variance-exploding interpolant :math:`x_\sigma = x_0 + \sigma\,\epsilon` (k-diffusion, EDM): the level
    is :math:`\sigma` and :math:`(\alpha, \sigma) = (1, \sigma)` (a tensor of ones for a tensor of levels)."""
    if hasattr(sigma, "new_ones"):  # torch: one alpha per level, as the other interpolants give
        return sigma.new_ones(sigma.shape), sigma
    if _is_sympy(sigma):  # an exact one, so log(alpha) is exactly 0
        import sympy

        return sympy.Integer(1), sigma
    return 1.0, sigma


def vp_abar_of_sigma(sigma: Any) -> Any:
    r"""The VP level of a VE (k-diffusion / diffusers Euler) noise level:
    :math:`\bar\alpha = 1 / (1 + \sigma^2)`, the inverse of :math:`\sigma = \sqrt{(1-\bar\alpha)/\bar\alpha}`;
    the VP state is :math:`x / \sqrt{1 + \sigma^2}`. ``from_diffusers`` builds its tables for Euler and for
    DPM-Solver++ on Karras-type sigmas with it."""
    return 1 / (1 + sigma * sigma)


def ve_ancestral_coefficients(sigma_t: Any, sigma_s: Any, eta: Any = 1) -> Tuple[Any, Any]:
    r"""k-diffusion's Euler ancestral step from :math:`\sigma_t` to :math:`\sigma_s` (``get_ancestral_step``,
    :math:`0 \le \eta \le 1`):

    .. math:: \sigma_{up} = \eta\,\sigma_s\frac{\sqrt{\sigma_t^2 - \sigma_s^2}}{\sigma_t},\qquad
              \sigma_{down} = \sqrt{\sigma_s^2 - \sigma_{up}^2},\qquad
              x_s = \hat x_0 + \sigma_{down}\,\hat\epsilon + \sigma_{up} z.

    Returns ``(sigma_down, sigma_up)``. It is DDIM(eta) in VE variables (alpha-bar = 1 / (1 + sigma^2),
    x_VP = x / sqrt(1 + sigma^2)); eta = 0 is the Euler step (sigma_down = sigma_s)."""
    if isinstance(eta, (int, float)) and eta == 0:
        return sigma_s, sigma_s * 0
    sigma_up = eta * sigma_s * sqrt(sigma_t * sigma_t - sigma_s * sigma_s) / sigma_t
    # sigma_s^2 - sigma_up^2 = sigma_s^2 ((1 - eta^2) + eta^2 sigma_s^2 / sigma_t^2): two non-negative terms, no
    # cancellation (the difference of squares loses every digit when sigma_s << sigma_t)
    r = sigma_s / sigma_t
    return sigma_s * sqrt((1 - eta * eta) + eta * eta * r * r), sigma_up


def ve_ancestral_chain_coefficients(sigma_t: Any, sigma_s: Any, eta: Any = 1) -> Tuple[Any, Any, Any]:
    r"""One Euler ancestral step written against (x0_hat, x_t) instead of (x0_hat, eps_hat): substituting
    :math:`\hat\epsilon = (x_t - \hat x_0)/\sigma_t`,
    :math:`x_s = (1 - \sigma_{down}/\sigma_t)\,\hat x_0 + (\sigma_{down}/\sigma_t)\,x_t + \sigma_{up} z`.
    Returns ``(c_x0, c_x, sigma_up)``, the per-step factors of the chain with x0_hat frozen."""
    down, up = ve_ancestral_coefficients(sigma_t, sigma_s, eta)
    c_x = down / sigma_t
    return 1 - c_x, c_x, up


# --------------------------------------------------------------------------- parameterizations


def x0_eps_coefficients(prediction: str, alpha: Any, sigma: Any) -> Tuple[Tuple[Any, Any], Tuple[Any, Any]]:
    r"""Coefficients turning a model output into (x0_hat, eps_hat) at one level.

    Returns ``((a_x, a_p), (b_x, b_p))`` with

    .. math:: \hat x_0 = a_x x + a_p\,p, \qquad \hat\epsilon = b_x x + b_p\,p,

    where ``p`` is the model output of kind ``prediction`` at a state ``x`` on the
    interpolant :math:`x = \alpha x_0 + \sigma \epsilon`. Structural zeros and ones
    are the Python ints 0 and 1, so the epsilon of an epsilon model passes through
    bit for bit.

    * ``epsilon``:      :math:`p = \epsilon`.
    * ``sample``:       :math:`p = x_0`.
    * ``v_prediction``: :math:`p = \alpha\epsilon - \sigma x_0` (VP only: needs :math:`\alpha^2+\sigma^2=1`).
    * ``velocity``:     :math:`p = \epsilon - x_0` (flow only: needs :math:`\alpha+\sigma=1`).
    """
    if prediction == "epsilon":
        return (1 / alpha, -sigma / alpha), (0, 1)
    if prediction == "sample":
        return (0, 1), (1 / sigma, -alpha / sigma)
    if prediction == "v_prediction":
        return (alpha, -sigma), (sigma, alpha)
    if prediction == "velocity":
        return (1, -sigma), (1, alpha)
    raise ValueError(f"unknown prediction type {prediction!r}")


def prediction_coefficients(prediction: str, alpha: Any, sigma: Any) -> Tuple[Any, Any]:
    r"""Inverse of :func:`x0_eps_coefficients`: ``(c_x0, c_eps)`` with :math:`p = c_{x_0} x_0 + c_\epsilon \epsilon`."""
    if prediction == "epsilon":
        return 0, 1
    if prediction == "sample":
        return 1, 0
    if prediction == "v_prediction":
        return -sigma, alpha
    if prediction == "velocity":
        return -1, 1
    raise ValueError(f"unknown prediction type {prediction!r}")


# --------------------------------------------------------------------------- DDIM


def ddim_coefficients(abar_t: Any, abar_s: Any, eta: Any = 0) -> Tuple[Any, Any, Any]:
    r"""DDIM skip t -> s (Song et al. 2021, eq. 12), marginal-consistent across a big step.

    .. math::
        \sigma_{t\to s} = \eta \sqrt{\tfrac{1-\bar\alpha_s}{1-\bar\alpha_t}}\sqrt{1-\tfrac{\bar\alpha_t}{\bar\alpha_s}},\qquad
        x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1-\bar\alpha_s-\sigma_{t\to s}^2}\,\hat\epsilon + \sigma_{t\to s} z.

    Returns ``(c_x0, c_eps, sigma_ts)``. With ``eta = 0`` the skip is deterministic and
    composes exactly for a frozen (x0_hat, eps_hat); with ``eta = 1`` it is the DDPM posterior.
    """
    sigma_ts = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s)
    c_x0 = sqrt(abar_s)
    if isinstance(eta, (int, float)) and eta == 0:
        c_eps = sqrt(1 - abar_s)
    else:
        # 1 - abar_s - sigma_ts^2 as a sum of non-negative terms (for eta <= 1): written as the
        # difference it cancels to a tiny negative number when abar_t << abar_s and eta = 1 (NaN).
        c_eps = sqrt(
            (1 - abar_s) * ((1 - eta**2) * (1 - abar_t / abar_s) + abar_t * (1 - abar_s) / abar_s) / (1 - abar_t)
        )
    return c_x0, c_eps, sigma_ts


def ddim_chain_coefficients(abar_t: Any, abar_s: Any, eta: Any = 0) -> Tuple[Any, Any, Any]:
    r"""One DDIM step written against (x0_hat, x_t) instead of (x0_hat, eps_hat).

    Substituting :math:`\hat\epsilon = (x_t - \sqrt{\bar\alpha_t}\hat x_0)/\sqrt{1-\bar\alpha_t}`:
    :math:`x_s = c_{x_0}\hat x_0 + c_x x_t + \sigma_{t\to s} z`. Returns ``(c_x0, c_x, sigma_ts)``;
    these are the per-step factors of the chain with x0_hat frozen (used to couple noise).
    """
    c_x0, c_eps, sigma_ts = ddim_coefficients(abar_t, abar_s, eta)
    c_x = c_eps / sqrt(1 - abar_t)
    return c_x0 - c_x * sqrt(abar_t), c_x, sigma_ts


# --------------------------------------------------------------------------- DDPM


def ddpm_posterior_coefficients(abar_t: Any, abar_s: Any) -> Tuple[Any, Any, Any]:
    r"""DDPM posterior :math:`q(x_s \mid x_t, x_0)` for any pair of levels s < t (Ho et al. 2020, eq. 7).

    With :math:`\alpha_{t|s} = \bar\alpha_t/\bar\alpha_s` and :math:`\beta_{t|s} = 1-\alpha_{t|s}`:

    .. math::
        \mu = \frac{\sqrt{\bar\alpha_s}\,\beta_{t|s}}{1-\bar\alpha_t} x_0
              + \frac{\sqrt{\alpha_{t|s}}\,(1-\bar\alpha_s)}{1-\bar\alpha_t} x_t,\qquad
        \mathrm{Var} = \beta_{t|s}\frac{1-\bar\alpha_s}{1-\bar\alpha_t}\ (\text{"fixed_small"}).

    Returns ``(c_x0, c_xt, variance)``.
    """
    alpha_ts = abar_t / abar_s
    beta_ts = 1 - alpha_ts
    c_x0 = sqrt(abar_s) * beta_ts / (1 - abar_t)
    c_xt = sqrt(alpha_ts) * (1 - abar_s) / (1 - abar_t)
    variance = beta_ts * (1 - abar_s) / (1 - abar_t)
    return c_x0, c_xt, variance


def ddpm_large_variance(abar_t: Any, abar_s: Any) -> Any:
    r"""The "fixed_large" variance :math:`\beta_{t|s} = 1 - \bar\alpha_t/\bar\alpha_s`."""
    return 1 - abar_t / abar_s


def posterior_variance(alpha_t: Any, sigma_t: Any, alpha_s: Any, sigma_s: Any) -> Any:
    r"""Variance of the posterior :math:`q(x_s \mid x_t, x_0)` of any Gaussian interpolant
    :math:`x = \alpha x_0 + \sigma\epsilon` (VP, flow, VE), for a level s cleaner than t:

    .. math:: v = \sigma_s^2\Big(1 - \frac{\mathrm{SNR}_t}{\mathrm{SNR}_s}\Big),\qquad
              \mathrm{SNR} = \alpha^2/\sigma^2.

    VP: the "fixed_small" variance of ``ddpm_posterior_coefficients``; VE: k-diffusion's
    :math:`\sigma_{up}^2` at eta = 1 (proofs ``ddpm.posterior_variance_general``). ParaDiGMS
    normalises a level's change by it (``PicardScheduler(norm="posterior")``)."""
    ratio = alpha_t * sigma_s / (sigma_t * alpha_s)  # sqrt(SNR_t / SNR_s)
    return sigma_s * sigma_s * (1 - ratio * ratio)


# --------------------------------------------------------------------------- flow


def flow_euler_coefficient(t: Any, s: Any) -> Any:
    r"""Euler big step of a flow: :math:`x_s = x_t + (s - t)\,v`. Returns :math:`s - t`."""
    return s - t


# --------------------------------------------------------------------------- DPM-Solver++


def dpm_solver_pp_coefficients(alpha_s: Any, sigma_s: Any, alpha_t: Any, sigma_t: Any) -> Tuple[Any, Any]:
    r"""First-order DPM-Solver++ (Lu et al. 2022, data prediction) from level s to the cleaner level t.

    With :math:`\lambda = \log(\alpha/\sigma)`, :math:`h = \lambda_t - \lambda_s` and so
    :math:`\alpha_t e^{-h} = \sigma_t\alpha_s/\sigma_s`:

    .. math:: x_t = \frac{\sigma_t}{\sigma_s} x_s + \alpha_t (1 - e^{-h})\,\hat x_0
              = \frac{\sigma_t}{\sigma_s} x_s + \Big(\alpha_t - \frac{\sigma_t\alpha_s}{\sigma_s}\Big)\hat x_0 .

    Returns ``(c_x, c_x0)``. It is DDIM (eta = 0) written against (x_s, x0_hat), finite at
    :math:`\sigma_t = 0` (the step to the clean end returns x0_hat).
    """
    c_x = sigma_t / sigma_s
    return c_x, alpha_t - alpha_s * c_x


def dpm_solver_pp_2m_coefficients(
    alpha_p: Any, sigma_p: Any, alpha_s: Any, sigma_s: Any, alpha_t: Any, sigma_t: Any, solver_type: str = "midpoint"
) -> Tuple[Any, Any, Any]:
    r"""Second-order multistep DPM-Solver++ (2M) step s -> t, using the previous level p > s too.

    With :math:`h = \lambda_t - \lambda_s`, :math:`h_0 = \lambda_s - \lambda_p`, :math:`r_0 = h_0/h`,
    :math:`D_0 = \hat x_0^{(s)}` and :math:`D_1 = (\hat x_0^{(s)} - \hat x_0^{(p)})/r_0`
    (diffusers' ``multistep_dpm_solver_second_order_update``):

    .. math::
        \text{midpoint: } x_t = \tfrac{\sigma_t}{\sigma_s} x_s + \alpha_t(1-e^{-h}) D_0
                             + \tfrac12\alpha_t(1-e^{-h}) D_1,\qquad
        \text{heun: } x_t = \tfrac{\sigma_t}{\sigma_s} x_s + \alpha_t(1-e^{-h}) D_0
                             + \alpha_t\Big(1 - \tfrac{1-e^{-h}}{h}\Big) D_1 .

    Returns ``(c_x, c_x0, c_prev)`` with :math:`x_t = c_x x_s + c_{x_0}\hat x_0^{(s)} + c_{prev}\hat x_0^{(p)}`.
    With :math:`\hat x_0^{(p)} = \hat x_0^{(s)}` it is the first-order step (:func:`dpm_solver_pp_coefficients`).
    """
    c_x, c_0 = dpm_solver_pp_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
    lam = lambda a, s: log(a) - log(s)
    h = lam(alpha_t, sigma_t) - lam(alpha_s, sigma_s)
    h0 = lam(alpha_s, sigma_s) - lam(alpha_p, sigma_p)
    if solver_type == "midpoint":
        d = c_0 * h / (2 * h0)
    elif solver_type == "heun":
        d = (alpha_t * h - c_0) / h0  # alpha_t (1 - (1 - e^{-h})/h) * h / h0
    else:
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return c_x, c_0 + d, -d


# --------------------------------------------------------------------------- UniPC


def _unipc_b(alpha_from: Any, sigma_from: Any, alpha_to: Any, sigma_to: Any, solver_type: str):
    r"""UniPC's (h, alpha_to B(h)) of the step from -> to (data prediction: hh = -h, h = lambda_to - lambda_from):
    :math:`\alpha B(h) = \alpha(e^{-h} - 1) = \sigma_{to}\alpha_{from}/\sigma_{from} - \alpha_{to}` for bh2,
    :math:`-\alpha h` for bh1."""
    lam = lambda a, s: log(a) - log(s)  # noqa: E731
    h = lam(alpha_to, sigma_to) - lam(alpha_from, sigma_from)
    if solver_type == "bh2":
        return h, sigma_to * alpha_from / sigma_from - alpha_to
    if solver_type == "bh1":
        return h, -alpha_to * h
    raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")


#: |hh| below which UniPC's phi_1, phi_2 are summed as series (16 terms: below float64 rounding there)
_PHI_SERIES_BELOW = 0.5
_PHI_TERMS = 16


def _unipc_phi(ratio: Any, hh: Any) -> Tuple[Any, Any]:
    r""":math:`\varphi_1 = (e^{hh} - 1)/hh - 1` and :math:`\varphi_2 = \varphi_1/hh - 1/2` (UniPC's, diffusers'
    ``h_phi_k``), given ``ratio`` :math:`= e^{hh}` as the caller computes it from the levels.

    On sympy the closed forms, as written. On floats and tensors the closed forms cancel (phi_1 ~ hh/2,
    phi_2 ~ hh/6: their error grows like eps/hh^2 and eps/hh^3, all digits gone at hh ~ 1e-6); where
    :math:`|hh| < 1/2` they are the Taylor series :math:`\sum_{k\ge1} hh^k/(k+1)!` and
    :math:`\sum_{k\ge1} hh^k/(k+2)!`, with hh = log(ratio) (accurate to the ratio's rounding; the ``hh``
    given, from differences of log-SNRs, is used on sympy only)."""
    if _is_sympy(ratio) or _is_sympy(hh):
        import sympy

        phi_1 = (ratio - 1) / hh - 1
        return phi_1, phi_1 / hh - sympy.Rational(1, 2)
    hh = log(ratio)

    def series(z: Any, shift: int) -> Any:  # sum_{k>=1} z^k / (k + shift)!, by Horner
        acc = 1 / math.factorial(_PHI_TERMS + shift)
        for k in range(_PHI_TERMS - 1, 0, -1):
            acc = 1 / math.factorial(k + shift) + z * acc
        return z * acc

    if type(hh).__module__.startswith("torch"):
        import torch

        small = hh.abs() < _PHI_SERIES_BELOW
        safe = torch.where(small, torch.ones_like(hh), hh)  # the closed form away from 0 only
        closed = torch.expm1(safe) / safe - 1
        return torch.where(small, series(hh, 1), closed), torch.where(small, series(hh, 2), closed / safe - 0.5)
    if abs(hh) < _PHI_SERIES_BELOW:
        return series(hh, 1), series(hh, 2)
    phi_1 = math.expm1(hh) / hh - 1
    return phi_1, phi_1 / hh - 0.5


def unipc_predictor_coefficients(
    alpha_p: Any, sigma_p: Any, alpha_s: Any, sigma_s: Any, alpha_t: Any, sigma_t: Any, solver_type: str = "bh2"
) -> Tuple[Any, Any, Any]:
    r"""UniP-2 (Zhao et al. 2023, UniPC, data prediction; diffusers' ``multistep_uni_p_bh_update``, order 2)
    from level s to t, with the previous level p > s.

    With :math:`h = \lambda_t - \lambda_s`, :math:`r = (\lambda_p - \lambda_s)/h` (negative),
    :math:`m` the x0_hat of a level and :math:`B(h) = e^{-h} - 1` (bh2) or :math:`-h` (bh1):

    .. math:: x_t = \frac{\sigma_t}{\sigma_s} x_s + \alpha_t(1 - e^{-h})\,m_s
              - \tfrac12\,\alpha_t B(h)\,\frac{m_p - m_s}{r},

    the first-order step (:func:`dpm_solver_pp_coefficients`) plus a correction of weight
    :math:`\rho_p = 1/2`. With bh2 it is DPM-Solver++ 2M midpoint (:func:`dpm_solver_pp_2m_coefficients`).

    Returns ``(c_x, c_s, c_p)``: :math:`x_t = c_x x_s + c_s m_s + c_p m_p`.
    """
    c_x, c_0 = dpm_solver_pp_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
    h, a_b = _unipc_b(alpha_s, sigma_s, alpha_t, sigma_t, solver_type)
    r = (log(alpha_p) - log(sigma_p) - (log(alpha_s) - log(sigma_s))) / h
    c_p = -a_b / (2 * r)
    return c_x, c_0 - c_p, c_p


def unipc_corrector_coefficients(
    alpha_pp: Any, sigma_pp: Any, alpha_p: Any, sigma_p: Any, alpha_s: Any, sigma_s: Any, order: int,
    solver_type: str = "bh2",
) -> Tuple[Any, Any, Any]:
    r"""UniC-``order`` (diffusers' ``multistep_uni_c_bh_update``) at level s, reached from level p by the
    predictor of the same order, as a change to the predicted state: :math:`x_s^c = x_s + K`,
    :math:`K = k_s m_s + k_p m_p + k_{pp} m_{pp}`, with :math:`m_s` the x0_hat of the model called at the
    predicted :math:`x_s` (levels pp > p > s; pp is unused for order 1, where :math:`k_{pp} = 0`).

    With :math:`h = \lambda_s - \lambda_p`, :math:`\alpha_s B(h)` as for the predictor, order 1:
    :math:`K = -\tfrac12 \alpha_s B(h)(m_s - m_p)`. Order 2: :math:`r = (\lambda_{pp} - \lambda_p)/h`,
    :math:`D_1 = (m_{pp} - m_p)/r`, :math:`\rho` solving :math:`\begin{pmatrix}1 & 1\\ r & 1\end{pmatrix}\rho = b`,
    :math:`b_k = k!\,\varphi_k / B(h)` with :math:`\varphi_1 = (e^{-h} - 1)/(-h) - 1`,
    :math:`\varphi_2 = \varphi_1/(-h) - 1/2`, and

    .. math:: x_s^c = \Big[\tfrac{\sigma_s}{\sigma_p} x_p^c + \alpha_s(1 - e^{-h}) m_p\Big]
              - \alpha_s B(h)\big(\rho_1 D_1 + \rho_2 (m_s - m_p)\big),

    which is the order-2 predicted :math:`x_s` (weight 1/2 on :math:`D_1`) plus
    :math:`K = -\alpha_s B(h)\big((\rho_1 - \tfrac12) D_1 + \rho_2 (m_s - m_p)\big)`. K vanishes when the three
    x0_hat agree. Returns ``(k_s, k_p, k_pp)``.
    """
    h, a_b = _unipc_b(alpha_p, sigma_p, alpha_s, sigma_s, solver_type)
    if order == 1:
        return -a_b / 2, a_b / 2, 0 * a_b
    if order != 2:
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    phi_1, phi_2 = _unipc_phi(sigma_s * alpha_p / (sigma_p * alpha_s), -h)  # the ratio is e^{hh}, hh = -h
    b_h = a_b / alpha_s
    b1, b2 = phi_1 / b_h, 2 * phi_2 / b_h  # b_k = k! phi_k / B(h)
    r = (log(alpha_pp) - log(sigma_pp) - (log(alpha_p) - log(sigma_p))) / h
    rho_1 = (b1 - b2) / (1 - r)
    rho_2 = b1 - rho_1
    k_s = -a_b * rho_2
    k_pp = -a_b * (2 * rho_1 - 1) / (2 * r)  # -alpha_s B(h) (rho_1 - 1/2) / r, exact on sympy symbols
    return k_s, -(k_s + k_pp), k_pp


# --------------------------------------------------------------------------- coupled noise


def chain_draft_coefficients(A: Sequence[Any], B: Sequence[Any], s: Sequence[Any]) -> Tuple[list, list, list]:
    r"""The chain :math:`x_{k+1} = A_k \hat x_0 + B_k x_k + s_k z_k` (k = 0..n-1, x0_hat frozen), unrolled.

    .. math:: x_{j+1} = \tilde A_j \hat x_0 + \tilde B_j x_0' + \textstyle\sum_{k \le j} W_{jk} z_k,\qquad
              \tilde B_j = \prod_{k \le j} B_k,\quad \tilde A_j = \tilde A_{j-1} B_j + A_j,\quad
              W_{jk} = s_k \prod_{k < m \le j} B_m .

    Returns ``(A~, B~, W)``: two lists of n values and a list of n rows (row j has j+1 entries, the
    :func:`chain_noise_weights` of the first j+1 steps). A stochastic transition's drafts are this.

    The rows follow the recurrence :math:`W_{j\cdot} = (W_{j-1,\cdot} B_j,\ s_j)`, which multiplies in
    :func:`chain_noise_weights`' order (so its values are bit for bit the same) in O(n^2) operations instead
    of O(n^3). Given 1-D tensors ``B`` and ``s`` (the operators' float64 factors) a row is one tensor and
    costs one vector multiply: a window of 500 levels takes milliseconds.
    """
    n = len(A)
    At, Bt, W = [], [], []
    a, b = 0, 1
    vector = all(type(v).__module__.startswith("torch") and getattr(v, "ndim", 0) == 1 for v in (B, s))
    if vector:
        import torch
    row: Any = s[:0] if vector else []
    for j in range(n):
        a = a * B[j] + A[j]
        b = b * B[j]
        At.append(a)
        Bt.append(b)
        row = torch.cat([row * B[j], s[j : j + 1]]) if vector else [w * B[j] for w in row] + [s[j]]
        W.append(row)
    return At, Bt, W


def chain_noise_weights(c_x: Sequence[Any], std: Sequence[Any]) -> list:
    r"""Noise weights of a chain of one-level steps with x0_hat frozen.

    The chain :math:`x_{k+1} = A_k \hat x_0 + B_k x_k + s_k z_k`, k = 0..n-1, unrolls to

    .. math:: x_n = (\textstyle\prod_k B_k) x_0' + (\dots)\hat x_0 + \sum_k w_k z_k,\qquad
              w_k = s_k \prod_{m>k} B_m .

    ``c_x`` are the :math:`B_k`, ``std`` the :math:`s_k`; returns ``[w_0, ..., w_{n-1}]``.
    A draft adds :math:`\sum_k w_k z_k` itself (:func:`chain_draft_coefficients`) and so *equals* the
    chain (not only in distribution); a big skip over the window takes the unit noise
    :math:`\sum_k w_k z_k / \|w\|`.
    """
    n = len(c_x)
    weights = []
    for k in range(n):
        w = std[k]
        for m in range(k + 1, n):
            w = w * c_x[m]
        weights.append(w)
    return weights

r"""Each family's one-level step equals the update of the matching diffusers scheduler.

EulerDiscreteScheduler (``scheduling_euler_discrete.py``) and EulerAncestralDiscreteScheduler
(``scheduling_euler_ancestral_discrete.py``) step the unscaled latents ``sample`` in their sigmas; the model sees
``scale_model_input(sample)``, which is the state DRiffusion samples (``from_diffusers``).

The diffusers updates are transcribed below, symbol for symbol, from diffusers 0.42
(``src/diffusers/schedulers/``); ``** 0.5`` is written ``** HALF``. Names follow diffusers:
``alpha_prod_t`` is :math:`\bar\alpha_t`, ``alpha_prod_t_prev`` is :math:`\bar\alpha_s` of the next
level s (``final_alpha_cumprod`` / ``one`` at the clean end), ``sample`` the state x_t,
``model_output`` the prediction, ``variance_noise`` / ``noise`` the step's z. Thresholding and
clipping act on ``pred_original_sample`` only, identically on both sides (our ``x0_transform``).

DPMSolverMultistepScheduler (``scheduling_dpmsolver_multistep.py``, ``algorithm_type="dpmsolver++"``) works
in its sigmas ``((1 - alphas_cumprod) / alphas_cumprod) ** 0.5``; ``self.sigmas[self.step_index - 1]``,
``[self.step_index]``, ``[self.step_index + 1]`` are passed as ``sigma_s1``, ``sigma_s0`` / ``sigma_s``,
``sigma_t``; ``torch.log`` / ``torch.exp`` are sympy's (the stand-in ``torch`` below), and the float
literals ``1.0`` / ``0.5`` are ``ONE`` / ``HALF``.

UniPCMultistepScheduler (``scheduling_unipc_multistep.py``, ``predict_x0=True``) works in the same sigmas;
its ``multistep_uni_p_bh_update`` and ``multistep_uni_c_bh_update`` are transcribed with the model outputs
(converted x0_pred) ``model_output_list`` newest last, ``torch.linalg.solve(R, b)`` as sympy's exact solve.
"""
from __future__ import annotations

import sympy as sp

from driffusion_core import coefficients as C
from proofs.algebra import Domain, EtaInUnitInterval, LambdaLevels, Levels, check, real
from proofs.flow import flow_times
from proofs.operators import (
    ddim_step, ddpm_step, dpm_2m_step, dpm_step, flow_step, unipc_corrected, unipc_step, vp_x0_eps,
)
from proofs.registry import Result, identity

__all__ = [
    "diffusers_ddim_step",
    "diffusers_ddpm_step",
    "diffusers_flow_euler_step",
    "diffusers_euler_discrete_step",
    "diffusers_euler_scale_model_input",
    "diffusers_euler_ancestral_step",
    "diffusers_dpm_sigma",
    "diffusers_dpm_convert_model_output",
    "diffusers_dpm_first_order_update",
    "diffusers_dpm_second_order_update",
    "diffusers_unipc_p_update",
    "diffusers_unipc_c_update",
]

HALF = sp.Rational(1, 2)
ONE = sp.Integer(1)


class torch:  # noqa: N801  (so that the transcriptions below read as diffusers' lines)
    """``torch.log`` / ``torch.exp`` of the diffusers code, on sympy expressions."""

    log = staticmethod(sp.log)
    exp = staticmethod(sp.exp)
    expm1 = staticmethod(lambda v: sp.exp(v) - 1)
    pow = staticmethod(lambda v, k: v**k)
VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def _diffusers_pred_original_sample(prediction_type, sample, model_output, alpha_prod_t):
    # scheduling_ddim.py DDIMScheduler.step, "3. compute predicted original sample" (the same lines
    # appear in scheduling_ddpm.py DDPMScheduler.step, "2. compute predicted original sample")
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (HALF) * model_output) / alpha_prod_t ** (HALF)
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (HALF) * pred_original_sample) / beta_prod_t ** (HALF)
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**HALF) * sample - (beta_prod_t**HALF) * model_output
        pred_epsilon = (alpha_prod_t**HALF) * model_output + (beta_prod_t**HALF) * sample
    else:
        raise ValueError(prediction_type)
    return pred_original_sample, pred_epsilon


def diffusers_ddim_step(prediction_type, sample, model_output, alpha_prod_t, alpha_prod_t_prev, eta, variance_noise):
    """scheduling_ddim.py: ``DDIMScheduler.step`` with ``DDIMScheduler._get_variance``."""
    pred_original_sample, pred_epsilon = _diffusers_pred_original_sample(
        prediction_type, sample, model_output, alpha_prod_t
    )
    # _get_variance(timestep, prev_timestep)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    # 5. compute variance: "sigma_t(eta)"
    std_dev_t = eta * variance ** (HALF)
    # 6. compute "direction pointing to x_t"
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (HALF) * pred_epsilon
    # 7. compute x_t without "random noise"
    prev_sample = alpha_prod_t_prev ** (HALF) * pred_original_sample + pred_sample_direction
    if eta != 0:  # `if eta > 0:` (eta is a symbol here)
        prev_sample = prev_sample + std_dev_t * variance_noise
    return prev_sample


def diffusers_ddim_clipped_eps(sample, pred_original_sample, alpha_prod_t):
    """scheduling_ddim.py ``DDIMScheduler.step``, ``if use_clipped_model_output:`` (eps from the clipped x0)."""
    beta_prod_t = 1 - alpha_prod_t
    return (sample - alpha_prod_t ** (HALF) * pred_original_sample) / beta_prod_t ** (HALF)


def diffusers_ddpm_step(prediction_type, sample, model_output, alpha_prod_t, alpha_prod_t_prev, variance_type, noise):
    """scheduling_ddpm.py: ``DDPMScheduler.step`` with ``DDPMScheduler._get_variance`` (t > 0)."""
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample, _ = _diffusers_pred_original_sample(prediction_type, sample, model_output, alpha_prod_t)
    # 4. Compute coefficients for pred_original_sample x_0 and current sample x_t
    pred_original_sample_coeff = (alpha_prod_t_prev ** (HALF) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (HALF) * beta_prod_t_prev / beta_prod_t
    # 5. Compute predicted previous sample mu_t
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
    # _get_variance(t): torch.clamp(variance, min=1e-20) is the identity where variance > 0
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
    if variance_type == "fixed_small":
        variance = variance
    elif variance_type == "fixed_large":
        variance = current_beta_t
    else:
        raise ValueError(variance_type)
    # 6. Add noise (t > 0): variance = (self._get_variance(t, ...) ** 0.5) * variance_noise
    return pred_prev_sample + (variance**HALF) * noise


def diffusers_flow_euler_step(sample, model_output, sigma, sigma_next):
    """scheduling_flow_match_euler_discrete.py: ``FlowMatchEulerDiscreteScheduler.step`` (deterministic)."""
    dt = sigma_next - sigma
    prev_sample = sample + dt * model_output
    return prev_sample


@identity(
    "diffusers.ddim_step",
    "diffusers",
    "DDIMSkip's one-level step (x0_eps_coefficients + ddim_coefficients) equals DDIMScheduler.step for "
    "prediction_type epsilon / sample / v_prediction and eta = 0, eta = 1 and every 0 < eta < 1, noise "
    "included; its eps re-derived from a clipped x0 equals use_clipped_model_output.",
)
def ddim_step_matches() -> Result:
    lv = Levels(["t", "s"])
    a_t, a_s = lv.abar["t"], lv.abar["s"]
    eta = EtaInUnitInterval()
    x, p, z, x0c = real("x p z x0_clipped")
    res = {}
    for kind in VP_PREDICTIONS:
        for name, e in (("0", 0), ("1", 1), ("in (0,1)", eta.eta)):
            ours = ddim_step(kind, x, p, a_t, a_s, e, z)
            res[f"{kind}, eta {name}"] = ours - diffusers_ddim_step(kind, x, p, a_t, a_s, e, z)
    _, eps_from_clipped = vp_x0_eps("sample", x, x0c, a_t)  # DDIMSkip(recompute_eps=True)
    res["use_clipped_model_output"] = eps_from_clipped - diffusers_ddim_clipped_eps(x, x0c, a_t)
    return check(res, lv.domain & eta.domain & Domain.free([x, p, z, x0c]))


@identity(
    "diffusers.ddpm_step",
    "diffusers",
    "DDPMSkip's one-level step (ddpm_posterior_coefficients, _std) equals DDPMScheduler.step with "
    "_get_variance, for variance_type fixed_small and fixed_large and prediction_type epsilon / sample / "
    "v_prediction, noise included (t > 0; at t = 0 both add no noise).",
)
def ddpm_step_matches() -> Result:
    lv = Levels(["t", "s"])
    a_t, a_s = lv.abar["t"], lv.abar["s"]
    x, p, z = real("x p z")
    res = {}
    for vt in ("fixed_small", "fixed_large"):
        for kind in VP_PREDICTIONS:
            ours = ddpm_step(kind, x, p, a_t, a_s, z, vt)
            res[f"{vt}, {kind}"] = ours - diffusers_ddpm_step(kind, x, p, a_t, a_s, vt, z)
    return check(res, lv.domain & Domain.free([x, p, z]))


@identity(
    "diffusers.flow_euler_step",
    "diffusers",
    "FlowEulerSkip's one-level step (flow_euler_coefficient) equals FlowMatchEulerDiscreteScheduler.step "
    "(stochastic_sampling=False, per_token_timesteps=None: the branch from_diffusers accepts): "
    "prev_sample = sample + (sigma_next - sigma) model_output.",
)
def flow_euler_step_matches() -> Result:
    (t, s), domain = flow_times("t s")
    x, v = real("x v")
    res = {"velocity": flow_step("velocity", x, v, t, s) - diffusers_flow_euler_step(x, v, t, s)}
    return check(res, domain & Domain.free([x, v]))


def diffusers_euler_discrete_step(prediction_type, sample, model_output, sigma, sigma_next):
    """scheduling_euler_discrete.py: ``EulerDiscreteScheduler.step`` with s_churn = 0 (so gamma = 0)."""
    gamma = 0
    sigma_hat = sigma * (gamma + 1)
    if prediction_type == "original_sample" or prediction_type == "sample":
        pred_original_sample = model_output
    elif prediction_type == "epsilon":
        pred_original_sample = sample - sigma_hat * model_output
    elif prediction_type == "v_prediction":
        # denoised = model_output * c_out + input * c_skip
        pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** HALF) + (sample / (sigma**2 + 1))
    else:
        raise ValueError(prediction_type)
    derivative = (sample - pred_original_sample) / sigma_hat
    dt = sigma_next - sigma_hat
    prev_sample = sample + derivative * dt
    return prev_sample


def diffusers_euler_scale_model_input(sample, sigma):
    """``EulerDiscreteScheduler.scale_model_input``: ``sample / ((sigma**2 + 1) ** 0.5)``."""
    return sample / ((sigma**2 + 1) ** HALF)


def _euler_sigmas():
    """Positive sigmas sigma > sigma_next > 0 (EulerDiscreteScheduler's range: up to ~157, or 4096 at zero terminal SNR)."""
    sig, nxt = sp.symbols("sigma sigma_next", positive=True)

    def point(a, b):
        return {sig: a, nxt: b}, {"sigma": a, "sigma_next": b}

    def sample(rng):
        a, b = sorted(rng.sample(range(1, 20000), 2), reverse=True)
        return point(sp.Rational(a, 100), sp.Rational(b, 100))

    return sig, nxt, Domain(sample, point(sp.Rational(7, 2), sp.Rational(3, 4)))


@identity(
    "diffusers.euler_discrete_step",
    "diffusers",
    "EulerDiscreteScheduler.step (s_churn = 0) is DDIM (eta = 0): on the model's input x = sample / "
    "sqrt(sigma^2 + 1) (scale_model_input), with abar = 1 / (1 + sigma^2), DDIMSkip's step to the next "
    "sigma is the Euler step sample + (sigma_next - sigma) (sample - x0_hat) / sigma, scaled the same way, "
    "for prediction_type epsilon / sample / v_prediction, to sigma_next > 0 and to sigma_next = 0 "
    "(solvers.interop.from_diffusers builds it so).",
)
def euler_discrete_step_matches() -> Result:
    sig, nxt, domain = _euler_sigmas()
    x, p = real("x p")
    abar = C.vp_abar_of_sigma  # the table from_diffusers builds from the sigmas
    res = {}
    for kind in VP_PREDICTIONS:
        for name, to in (("sigma_next > 0", nxt), ("sigma_next = 0", sp.Integer(0))):
            ours = ddim_step(kind, diffusers_euler_scale_model_input(x, sig), p, abar(sig), abar(to))
            theirs = diffusers_euler_scale_model_input(diffusers_euler_discrete_step(kind, x, p, sig, to), to)
            res[f"{kind}, {name}"] = ours - theirs
    return check(res, domain & Domain.free([x, p]))


def diffusers_euler_ancestral_step(prediction_type, sample, model_output, sigma_from, sigma_to, noise):
    """scheduling_euler_ancestral_discrete.py: ``EulerAncestralDiscreteScheduler.step`` (``noise`` is its
    ``randn_tensor`` draw)."""
    sigma = sigma_from
    if prediction_type == "epsilon":
        pred_original_sample = sample - sigma * model_output
    elif prediction_type == "v_prediction":
        # * c_out + input * c_skip
        pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** HALF) + (sample / (sigma**2 + 1))
    else:
        raise ValueError(prediction_type)  # diffusers: NotImplementedError for "sample"
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** HALF
    sigma_down = (sigma_to**2 - sigma_up**2) ** HALF
    derivative = (sample - pred_original_sample) / sigma
    dt = sigma_down - sigma
    prev_sample = sample + derivative * dt
    prev_sample = prev_sample + noise * sigma_up
    return prev_sample


@identity(
    "diffusers.euler_ancestral_step",
    "diffusers",
    "EulerAncestralDiscreteScheduler.step is DDIM with eta = 1 (the DDPM posterior): on the model's input "
    "x = sample / sqrt(sigma^2 + 1), with abar = 1 / (1 + sigma^2), DDIMSkip(eta=1)'s step with noise z is the "
    "ancestral step sample + (sigma_down - sigma) (sample - x0_hat) / sigma + sigma_up z, scaled the same way "
    "and with the same z, for prediction_type epsilon / v_prediction, to sigma_to > 0 and to sigma_to = 0.",
)
def euler_ancestral_step_matches() -> Result:
    sig, nxt, domain = _euler_sigmas()
    x, p, z = real("x p z")
    abar = C.vp_abar_of_sigma  # the table from_diffusers builds from the sigmas
    res = {}
    for kind in ("epsilon", "v_prediction"):
        for name, to in (("sigma_to > 0", nxt), ("sigma_to = 0", sp.Integer(0))):
            ours = ddim_step(kind, diffusers_euler_scale_model_input(x, sig), p, abar(sig), abar(to), 1, z)
            theirs = diffusers_euler_scale_model_input(diffusers_euler_ancestral_step(kind, x, p, sig, to, z), to)
            res[f"{kind}, {name}"] = ours - theirs
    return check(res, domain & Domain.free([x, p, z]))


def diffusers_dpm_sigma(alpha_prod):
    """scheduling_dpmsolver_multistep.py ``__init__`` / ``set_timesteps``:
    ``sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5``."""
    return ((1 - alpha_prod) / alpha_prod) ** HALF


def _sigma_to_alpha_sigma_t(sigma):
    # DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t (use_flow_sigmas=False)
    alpha_t = 1 / ((sigma**2 + 1) ** HALF)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t


def diffusers_dpm_convert_model_output(prediction_type, model_output, sample, sigma):
    """``DPMSolverMultistepScheduler.convert_model_output``, ``algorithm_type="dpmsolver++"`` (no thresholding);
    ``sigma`` is ``self.sigmas[self.step_index]``."""
    if prediction_type == "epsilon":
        alpha_t, sigma_t = _sigma_to_alpha_sigma_t(sigma)
        x0_pred = (sample - sigma_t * model_output) / alpha_t
    elif prediction_type == "sample":
        x0_pred = model_output
    elif prediction_type == "v_prediction":
        alpha_t, sigma_t = _sigma_to_alpha_sigma_t(sigma)
        x0_pred = alpha_t * sample - sigma_t * model_output
    else:
        raise ValueError(prediction_type)
    return x0_pred


def diffusers_dpm_first_order_update(model_output, sample, sigma_t, sigma_s):
    """``DPMSolverMultistepScheduler.dpm_solver_first_order_update``, ``"dpmsolver++"`` (``model_output`` is
    the converted x0_pred)."""
    alpha_t, sigma_t = _sigma_to_alpha_sigma_t(sigma_t)
    alpha_s, sigma_s = _sigma_to_alpha_sigma_t(sigma_s)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s = torch.log(alpha_s) - torch.log(sigma_s)

    h = lambda_t - lambda_s
    x_t = (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - ONE)) * model_output
    return x_t


def diffusers_dpm_second_order_update(model_output_list, sample, sigma_t, sigma_s0, sigma_s1, solver_type):
    """``DPMSolverMultistepScheduler.multistep_dpm_solver_second_order_update``, ``"dpmsolver++"``, ``solver_type``
    midpoint or heun (``model_output_list[-2:]``: the converted x0_pred of the previous and current steps)."""
    alpha_t, sigma_t = _sigma_to_alpha_sigma_t(sigma_t)
    alpha_s0, sigma_s0 = _sigma_to_alpha_sigma_t(sigma_s0)
    alpha_s1, sigma_s1 = _sigma_to_alpha_sigma_t(sigma_s1)

    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)

    m0, m1 = model_output_list[-1], model_output_list[-2]

    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    D0, D1 = m0, (ONE / r0) * (m0 - m1)
    if solver_type == "midpoint":
        x_t = (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (torch.exp(-h) - ONE)) * D0
            - HALF * (alpha_t * (torch.exp(-h) - ONE)) * D1
        )
    elif solver_type == "heun":
        x_t = (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (torch.exp(-h) - ONE)) * D0
            + (alpha_t * ((torch.exp(-h) - ONE) / h + ONE)) * D1
        )
    else:
        raise ValueError(solver_type)
    return x_t


@identity(
    "diffusers.dpm_solver_pp_step",
    "diffusers",
    "DPMSolverSkip's first-order step (__call__) and 2M step (multistep, midpoint and heun) equal "
    "DPMSolverMultistepScheduler's dpmsolver++ updates (dpm_solver_first_order_update, "
    "multistep_dpm_solver_second_order_update, after convert_model_output at each step's own level, "
    "_sigma_to_alpha_sigma_t of sigma = sqrt((1 - abar)/abar)), for prediction_type epsilon / sample / "
    "v_prediction.",
)
def dpm_solver_pp_step_matches() -> Result:
    lv = LambdaLevels(["p", "s", "t"], "vp")
    a_p, a_s, a_t = (lv.level[n] for n in "pst")
    sig_p, sig_s, sig_t = (diffusers_dpm_sigma(a) for a in (a_p, a_s, a_t))
    x_p, p_p, x, p = real("x_p p_p x p")
    res = {}
    for kind in VP_PREDICTIONS:
        m1 = diffusers_dpm_convert_model_output(kind, p_p, x_p, sig_p)  # the previous step's, at its level
        m0 = diffusers_dpm_convert_model_output(kind, p, x, sig_s)
        theirs = diffusers_dpm_first_order_update(m0, x, sig_t, sig_s)
        res[f"{kind}, first order"] = lv.form(dpm_step(kind, x, p, a_s, a_t) - theirs)
        for st in ("midpoint", "heun"):
            theirs = diffusers_dpm_second_order_update([m1, m0], x, sig_t, sig_s, sig_p, st)
            res[f"{kind}, 2M {st}"] = lv.form(dpm_2m_step(kind, x, p, (x_p, p_p, a_p), a_s, a_t, st) - theirs)
    return check(res, lv.domain & Domain.free([x_p, p_p, x, p]))


def _unipc_common(model_output_list, sigmas, order):
    """The lines both UniPC updates open with (``m0``, the levels, ``h``, ``rks``, ``D1s``): ``sigmas`` ends with
    ``sigma_s0, sigma_t``, the earlier ones before them."""
    m0 = model_output_list[-1]
    sigma_t, sigma_s0 = sigmas[-1], sigmas[-2]
    alpha_t, sigma_t = _sigma_to_alpha_sigma_t(sigma_t)
    alpha_s0, sigma_s0 = _sigma_to_alpha_sigma_t(sigma_s0)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    rks, D1s = [], []
    for i in range(1, order):
        mi = model_output_list[-(i + 1)]
        alpha_si, sigma_si = _sigma_to_alpha_sigma_t(sigmas[-2 - i])
        lambda_si = torch.log(alpha_si) - torch.log(sigma_si)
        rk = (lambda_si - lambda_s0) / h
        rks.append(rk)
        D1s.append((mi - m0) / rk)
    return m0, alpha_t, sigma_t, sigma_s0, h, rks, D1s


def diffusers_unipc_p_update(model_output_list, sample, sigmas, order, solver_type):
    """``UniPCMultistepScheduler.multistep_uni_p_bh_update`` (predict_x0): ``sigmas = [..., sigma_s0, sigma_t]``
    (``self.sigmas[: step_index + 2]``), ``model_output_list`` the converted x0_pred, newest last."""
    x = sample
    m0, alpha_t, sigma_t, sigma_s0, h, rks, D1s = _unipc_common(model_output_list, sigmas, order)
    hh = -h
    h_phi_1 = torch.expm1(hh)
    B_h = hh if solver_type == "bh1" else torch.expm1(hh)
    rhos_p = [HALF] if order == 2 else []  # "for order 2, we use a simplified version"
    x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    pred_res = sum(r * d for r, d in zip(rhos_p, D1s)) if D1s else 0
    return x_t_ - alpha_t * B_h * pred_res


def diffusers_unipc_c_update(this_model_output, model_output_list, last_sample, sigmas, order, solver_type):
    """``UniPCMultistepScheduler.multistep_uni_c_bh_update`` (predict_x0): ``sigmas = [..., sigma_s0, sigma_t]``
    (``self.sigmas[: step_index + 1]``: the last the corrected level), ``last_sample`` the previous corrected
    state, ``model_output_list`` the earlier converted x0_pred, newest last."""
    x = last_sample
    model_t = this_model_output
    m0, alpha_t, sigma_t, sigma_s0, h, rks, D1s = _unipc_common(model_output_list, sigmas, order)
    rks.append(ONE)
    R, b = [], []
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = hh if solver_type == "bh1" else torch.expm1(hh)
    for i in range(1, order + 1):
        R.append([torch.pow(r, i - 1) for r in rks])
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - ONE / factorial_i
    rhos_c = [HALF] if order == 1 else list(sp.Matrix(R).LUsolve(sp.Matrix(b)))
    x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    corr_res = sum(r * d for r, d in zip(rhos_c[:-1], D1s)) if D1s else 0
    D1_t = model_t - m0
    return x_t_ - alpha_t * B_h * (corr_res + rhos_c[-1] * D1_t)


@identity(
    "diffusers.unipc_step",
    "diffusers",
    "UniPCSkip.multistep equals UniPCMultistepScheduler.step, part by part: its corrected state (the predicted "
    "state plus unipc_corrector_coefficients' K, orders 1 and 2) is diffusers' multistep_uni_c_bh_update from the "
    "previous corrected state, where the predicted state is diffusers' multistep_uni_p_bh_update of the same "
    "order from that state; and its predictor from a corrected state (unipc_predictor_coefficients, or first "
    "order) is multistep_uni_p_bh_update of order 2 (or 1); for bh1 and bh2, on x0_pred model outputs. The step "
    "is the predictor applied to the corrected state on both sides.",
)
def unipc_step_matches() -> Result:
    lv = LambdaLevels(["pp", "p", "s", "t"], "vp")
    sig = {n: diffusers_dpm_sigma(lv.level[n]) for n in ("pp", "p", "s", "t")}
    x_pc, m_pp, m_p, m_s, x_h = real("x_pc m_pp m_p m_s x_h")
    res = {}
    for st in ("bh1", "bh2"):
        for q in (1, 2):  # the corrector at s, of the order of the predictor that reached s from x_pc at p
            levels, outputs = [sig[n] for n in ("pp", "p", "s")][2 - q:], [m_pp, m_p][2 - q:]
            x_s = diffusers_unipc_p_update(outputs, x_pc, levels, q, st)
            theirs = diffusers_unipc_c_update(m_s, outputs, x_pc, levels, q, st)
            history = [(x_h, m_pp, lv.level["pp"]), (x_h, m_p, lv.level["p"])][2 - q:]
            res[f"{st}, corrector {q}"] = lv.form(unipc_corrected("sample", x_s, m_s, history, lv.level["s"], q, st)
                                                 - theirs)
        for p in (1, 2):  # the predictor s -> t from a corrected state x_pc
            theirs = diffusers_unipc_p_update([m_p, m_s][2 - p:], x_pc, [sig[n] for n in ("p", "s", "t")][2 - p:], p, st)
            history = [(x_h, m_p, lv.level["p"])][: p - 1]
            res[f"{st}, predictor {p}"] = lv.form(unipc_step("sample", x_pc, m_s, history, lv.level["s"], lv.level["t"],
                                                             (p, 0), st) - theirs)
    return check(res, lv.domain & Domain.free([x_pc, m_pp, m_p, m_s, x_h]))

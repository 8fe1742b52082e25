r"""Quality on the exact Gaussian-mixture oracle: the oracle itself, then DRiffusion against the truth.

The oracle (``solvers.GaussianMixture``) gives closed-form x0*(x, t) and eps*(x, t). It is checked
against an independent reference: the noised mixture's log-density written here with
``torch.distributions`` and differentiated by autograd (Tweedie: eps* = -sigma grad log p_t,
x0* = (x + sigma^2 grad log p_t) / alpha).

With an error-free predictor, sampler error is discretisation error only, so:

* at equal sequential rounds, DRiffusion (aggressive, width 4, 50 steps) is much closer to the
  serial output than the step-skipping baseline (serial on a coarser grid with as many rounds);
* its distance to the true distribution (sliced Wasserstein against exact samples) stays close to
  the serial sampler's, within a margin set by the Monte Carlo noise of two serial runs.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from backends import BatchedExecutor
from driffusion_core import DraftRefineScheduler, FlowSchedule, NoiseSource, VPSchedule
from solvers import DDIMSkip, DDPMSkip, FlowEulerSkip, GaussianMixture, ring_mixture, sample_serial, sample_step_skipping

from _metrics import one_torch_thread, rmse, sliced_wasserstein  # noqa: F401  (autouse fixture)

F64 = torch.float64


def six_d_mixture() -> GaussianMixture:
    """A 6-D mixture of 4 components with unequal weights and unequal per-dimension variances."""
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(torch.randn(4, 6, generator=g, dtype=F64) * 1.2, torch.rand(4, 6, generator=g, dtype=F64) * 0.45 + 0.05, [0.1, 0.2, 0.3, 0.4])


MIXTURES = [pytest.param(ring_mixture, id="ring2d"), pytest.param(six_d_mixture, id="mixture6d")]


# --------------------------------------------------------------------------- the oracle itself


def noised_density(mix: GaussianMixture, alpha: float, sigma: float) -> D.Distribution:
    """p_t(x) of x = alpha x0 + sigma eps, x0 ~ the mixture: a mixture of N(alpha mu_m, alpha^2 v_m + sigma^2)."""
    comp = D.Independent(D.Normal(alpha * mix.means, (alpha**2 * mix.variances + sigma**2).sqrt()), 1)
    return D.MixtureSameFamily(D.Categorical(probs=mix.weights), comp)


def test_weights_are_normalised():
    """Weights are relative: [1, 2, 3, 4] is the mixture [0.1, 0.2, 0.3, 0.4] (same weights, same predictions)."""
    ref = six_d_mixture()
    scaled = GaussianMixture(ref.means, ref.variances, [1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(scaled.weights, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64), rtol=1e-15, atol=0)
    x, alpha, sigma = torch.randn(7, 6, generator=torch.Generator().manual_seed(1), dtype=F64), torch.full((7,), 0.6, dtype=F64), torch.full((7,), 0.8, dtype=F64)
    for got, want in zip(scaled.x0_eps(x, alpha, sigma), ref.x0_eps(x, alpha, sigma)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def tweedie(mix: GaussianMixture, x: torch.Tensor, alpha: float, sigma: float):
    """(x0*, eps*) from the autograd score of the noised density."""
    x = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(noised_density(mix, alpha, sigma).log_prob(x).sum(), x)
    return (x + sigma**2 * score).detach() / alpha, -sigma * score


@pytest.mark.parametrize("make_mixture", MIXTURES)
@pytest.mark.parametrize("kind,levels", [("vp", [0, 10, 300, 700, 999]), ("flow", [0.02, 0.3, 0.7, 0.98])])
def test_oracle_matches_autograd_score_of_the_noised_density(make_mixture, kind, levels):
    mix = make_mixture()
    sched = VPSchedule.linear() if kind == "vp" else FlowSchedule(shift=3.0)
    x = torch.randn(64, mix.dim, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    predictions = ("epsilon", "sample", "v_prediction") if kind == "vp" else ("epsilon", "sample", "velocity")
    predictors = {p: mix.predictor(sched, p) for p in predictions}
    for level in levels:
        alpha, sigma = (float(v) for v in sched.alpha_sigma(torch.tensor(float(level), dtype=F64)))
        x0_ref, eps_ref = tweedie(mix, x, alpha, sigma)
        x0, eps = mix.x0_eps(x, torch.tensor(alpha, dtype=F64), torch.tensor(sigma, dtype=F64))
        torch.testing.assert_close(eps, eps_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x0, x0_ref, rtol=1e-9, atol=1e-9)
        t_model = sched.model_time(torch.full((x.shape[0],), float(level), dtype=F64))
        expected = {
            "epsilon": eps_ref,
            "sample": x0_ref,
            "v_prediction": alpha * eps_ref - sigma * x0_ref,
            "velocity": eps_ref - x0_ref,
        }
        for p, f in predictors.items():
            out = f(x, t_model)
            assert out.dtype == F64 and out.shape == x.shape
            torch.testing.assert_close(out, expected[p], rtol=1e-6, atol=1e-6, msg=f"{p} at level {level}")


@pytest.mark.parametrize("make_mixture", MIXTURES)
def test_oracle_samples_have_the_mixture_moments(make_mixture):
    """Exact samples: mean sum_m w_m mu_m and covariance sum_m w_m (diag v_m + mu_m mu_m^T) - mean mean^T."""
    mix = make_mixture()
    n = 20000
    s = mix.sample(n, torch.Generator().manual_seed(3))
    w = mix.weights[:, None]
    mean = (w * mix.means).sum(0)
    second = sum(mix.weights[m] * (torch.diag(mix.variances[m]) + torch.outer(mix.means[m], mix.means[m])) for m in range(len(w)))
    cov = second - torch.outer(mean, mean)
    assert ((s.mean(0) - mean).abs() <= 5 * (cov.diagonal() / n).sqrt()).all()
    centred = s - s.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    stderr = products.std(0) / math.sqrt(n)  # standard error of each covariance entry
    assert ((torch.cov(s.T) - cov).abs() <= 5 * stderr).all()


# --------------------------------------------------------------------------- DRiffusion against the truth

VP = VPSchedule.linear()
FLOW = FlowSchedule(shift=1.0)
FAMILIES = {
    "ddim": (DDIMSkip(VP), VP.timesteps(50, "trailing", step_to="stride"), "epsilon", None),
    "ddpm": (DDPMSkip(VP), VP.timesteps(50, "leading"), "epsilon", 3),
    "flow": (FlowEulerSkip(FLOW), FLOW.timesteps(50), "velocity", None),
}
# RMSE(DRiffusion, serial) / RMSE(step skipping, serial) must stay below this at equal rounds (width 4:
# 14 rounds aggressive, 20 conservative). Measured on seeds 1-3 (2026-12-05):
#   aggressive   DDIM 0.25-0.26 ring, 0.10-0.15 6-D; flow 0.21-0.23 ring, 0.11-0.28 6-D;
#                DDPM 0.58-0.65 ring, 0.47-0.49 6-D
#   conservative DDIM 0.62-0.64 ring, 0.11 6-D;      flow 0.23-0.24 ring, 0.10-0.36 6-D;
#                DDPM 0.59-0.61 ring, 0.38-0.45 6-D
# (the issue expects about a third at width 4 for 50-step DDIM). DDPM's per-step noise moves x0_hat from
# level to level, so its frozen-x0 drafts (which equal the chain with x0_hat frozen and the same noise
# exactly, see test_transitions) sit further from the serial states than DDIM's. Conservative mode spends
# 20 rounds, where step skipping is much better than at 14; on the ring DDIM keeps less of its lead.
RMSE_RATIO_BOUND = {
    ("ddim", "aggressive"): 0.35, ("flow", "aggressive"): 0.35, ("ddpm", "aggressive"): 0.7,
    ("ddim", "conservative"): 0.75, ("flow", "conservative"): 0.45, ("ddpm", "conservative"): 0.7,
}
N = 2000


def _noise(seed):
    return None if seed is None else NoiseSource(seed)


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
@pytest.mark.parametrize("make_mixture", MIXTURES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_driffusion_beats_step_skipping_and_keeps_the_serial_distribution(make_mixture, family, mode):
    mix = make_mixture()
    tr, grid, prediction, noise_seed = FAMILIES[family]
    f = mix.predictor(tr.schedule, prediction)
    x = NoiseSource(1).initial((N, mix.dim))
    serial = sample_serial(f, x, tr, grid, noise=_noise(noise_seed)).x
    out = DraftRefineScheduler(tr, grid, width=4, mode=mode).sample(
        f, x, executor=BatchedExecutor(), noise=_noise(noise_seed)
    )
    assert out.rounds == {"aggressive": 14, "conservative": 20}[mode] and out.evals == 50
    skipping = sample_step_skipping(f, x, tr, grid, out.rounds, noise=_noise(noise_seed)).x

    # 1. at equal rounds, much closer to the serial output than the baseline
    ratio = rmse(out.x, serial) / rmse(skipping, serial)
    assert ratio < RMSE_RATIO_BOUND[family, mode], f"RMSE ratio {ratio:.3f} (DRiffusion / step skipping)"

    # 2. as close to the true distribution as the serial sampler, up to Monte Carlo noise,
    #    estimated from a second serial run with other seeds (same exact samples, same directions)
    exact = mix.sample(N, torch.Generator().manual_seed(100)).to(x.dtype)
    sw = lambda a: sliced_wasserstein(a, exact, generator=torch.Generator().manual_seed(0))
    other = sample_serial(f, NoiseSource(2).initial((N, mix.dim)), tr, grid, noise=_noise(None if noise_seed is None else noise_seed + 10)).x
    sw_serial, sw_other, sw_driff = sw(serial), sw(other), sw(out.x)
    bound = max(1.5 * sw_serial, sw_serial + 3 * abs(sw_serial - sw_other))
    assert sw_driff <= bound, f"SW to the truth: DRiffusion {sw_driff:.4f}, serial {sw_serial:.4f} / {sw_other:.4f}"
    # the bound is not vacuous: two coarse steps to the clean end are far outside it
    crude = sample_step_skipping(f, x, tr, grid, 2, noise=_noise(noise_seed)).x
    assert sw(crude) > bound, f"2-step baseline SW {sw(crude):.4f} within the bound {bound:.4f}"


class MarginalDrafts(DDIMSkip):
    """The drafts DDIM(eta) used to make: the marginal-consistent big skip from the anchor to each level,
    on unit noise coupled to the chain's (``SkipTransition.skip`` per draft), instead of the chain."""

    def drafts(self, x, pred, t_from, t_to, noises=None):
        return torch.stack([self.skip(x, pred, t_from[: j + 1], t_to[: j + 1], None if noises is None else noises[: j + 1])
                            for j in range(t_from.shape[0])])


@pytest.mark.parametrize("eta", [0.3, 0.6])
@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_ddim_eta_chain_drafts_beat_marginal_big_skips(eta, mode):
    """DDIM at 0 < eta < 1: drafting with the chain itself (x0_hat frozen, the chain's own noise) stays
    closer to the serial output than drafting with the marginal-consistent big skip, which does not
    compose (proofs: ddim.eta_composition_not_exact). 50 steps, width 4, ring oracle, two seeds."""
    VP = VPSchedule.linear()
    grid = VP.timesteps(50, "trailing")
    f = ring_mixture().predictor(VP, "epsilon")
    err = {"chain": 0.0, "marginal": 0.0}
    for seed in (0, 1):
        x = NoiseSource(seed).initial((1000, 2), F64)
        for name, tr in (("chain", DDIMSkip(VP, eta=eta)), ("marginal", MarginalDrafts(VP, eta=eta))):
            ref = sample_serial(f, x, tr, grid, noise=NoiseSource(100 + seed)).x
            out = DraftRefineScheduler(tr, grid, 4, mode).sample(f, x, executor=BatchedExecutor(), noise=NoiseSource(100 + seed))
            err[name] += rmse(out.x, ref)
    assert err["chain"] < 0.95 * err["marginal"], err


@pytest.mark.parametrize(
    "schedule,spacing,transition,source,target",
    [
        (VP, "leading", DDIMSkip, "sample", "epsilon"),
        (VPSchedule.scaled_linear(), "leading", DDIMSkip, "sample", "v_prediction"),
        (FlowSchedule(shift=3.0), None, FlowEulerSkip, "sample", "velocity"),
    ],
)
def test_an_x0_model_wrapped_as_epsilon_or_velocity_drafts_better(schedule, spacing, transition, source, target):
    """``reparameterize``: the serial sample is unchanged (to rounding), the wrapper returns the oracle's own
    target-parameterized output, and DRiffusion, whose refinement applies a draft's prediction at the
    refined state, carries an eps_hat / velocity over better than an x0_hat: with the x0 model conservative
    width 4 is worse than step skipping on these grids, wrapped it is well below."""
    from driffusion_core import reparameterize

    mix = ring_mixture()
    grid = schedule.timesteps(50, spacing) if spacing else schedule.timesteps(50)
    f, tr = mix.predictor(schedule, source), transition(schedule, source)
    g, tr_g = reparameterize(f, schedule, source, target), transition(schedule, target)
    x = NoiseSource(3).initial((512, 2), torch.float64)
    t = grid.model_times[7].expand(512)
    torch.testing.assert_close(g(x, t), mix.predictor(schedule, target)(x, t), rtol=1e-6, atol=1e-6)
    ref = sample_serial(f, x, tr, grid).x
    assert rmse(sample_serial(g, x, tr_g, grid).x, ref) < 1e-6
    raw = DraftRefineScheduler(tr, grid, width=4, mode="conservative").sample(f, x)
    wrapped = DraftRefineScheduler(tr_g, grid, width=4, mode="conservative").sample(g, x)
    skip = rmse(sample_step_skipping(f, x, tr, grid, raw.rounds).x, ref)
    assert rmse(raw.x, ref) > skip  # the x0 model's drafts carry over badly here ...
    assert rmse(wrapped.x, ref) < 0.7 * skip  # ... its eps_hat / velocity well

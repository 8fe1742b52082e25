r"""Laws of every skip transition, checked over a list of all operator families.

In the style of PyTorch's ``test/distributions/test_transforms.py``: one list of operator
constructors (:data:`CASES`: each family with each prediction type it supports), and each law a
property test over random schedules (linear / scaled_linear / squaredcos_cap_v2 betas with random
ranges, zero-terminal-SNR rescale where the parameterization allows it) and random levels:

* a one-level skip is the step: ``drafts(...)[0] == S(...)`` bit for bit, and both equal
  ``sample_serial``'s step;
* DDIM (eta = 0) and flow compose exactly, S(S(x,p,t->s),p,s->u) == S(x,p,t->u), for
  epsilon / sample / velocity; a frozen v_prediction does *not* (documented);
* a draft is the chain of one-level steps with x0_hat frozen and the chain's own per-step noise
  (every family: DDPM fixed_small and fixed_large, DDIM at any eta, flow);
* DDIM eta = 1 is DDPM fixed_small; DDIM is marginal-consistent for any eta;
* a zero-length skip is the identity; dtypes; per-row levels.

Plus a diffrax-style convergence-order test of the serial DDIM, flow, DPM-Solver++ 2M and UniPC samplers on
the exact Gaussian-mixture oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from driffusion_core import FlowSchedule, NoiseSource, TimeGrid, VPSchedule
from driffusion_core import coefficients as C
from solvers import DDIMSkip, DDPMSkip, DPMSolverSkip, FlowEulerSkip, GaussianMixture, UniPCSkip, sample_serial

from _metrics import one_torch_thread, ulp  # noqa: F401  (one_torch_thread: autouse fixture)

SETTINGS = settings(max_examples=20, deadline=None)
F64 = torch.float64


# --------------------------------------------------------------------------- the operator list


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable
    kind: str  # "vp" or "flow"
    predictions: Tuple[str, ...]


VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")
FLOW_PREDICTIONS = ("velocity", "epsilon", "sample")

FAMILIES = [
    Family("ddim_eta0", lambda s, p: DDIMSkip(s, p, eta=0.0), "vp", VP_PREDICTIONS),
    Family("ddim_eta0.3", lambda s, p: DDIMSkip(s, p, eta=0.3), "vp", VP_PREDICTIONS),
    Family("ddim_eta1", lambda s, p: DDIMSkip(s, p, eta=1.0), "vp", VP_PREDICTIONS),
    Family("ddpm_fixed_small", lambda s, p: DDPMSkip(s, p, "fixed_small"), "vp", VP_PREDICTIONS),
    Family("ddpm_fixed_large", lambda s, p: DDPMSkip(s, p, "fixed_large"), "vp", VP_PREDICTIONS),
    Family("flow_euler", lambda s, p: FlowEulerSkip(s, p), "flow", FLOW_PREDICTIONS),
    # DPM-Solver++ at first order (its one-step skip); the 2M multistep update is tested in test_multistep.py
    Family("dpm_solver_pp", lambda s, p: DPMSolverSkip(s, p, order=1), "vp", VP_PREDICTIONS),
    Family("dpm_solver_pp_flow", lambda s, p: DPMSolverSkip(s, p, order=1), "flow", FLOW_PREDICTIONS),
]
CASES = [pytest.param(f, p, id=f"{f.name}-{p}") for f in FAMILIES for p in f.predictions]
BY_NAME = {f.name: f for f in FAMILIES}

# families whose draft equals the chain of one-level steps with x0_hat frozen and the same noise
CHAIN_EXACT = [
    pytest.param(BY_NAME[n], p, id=f"{n}-{p}")
    for n in ("ddim_eta0", "ddim_eta0.3", "ddim_eta1", "ddpm_fixed_small", "ddpm_fixed_large", "flow_euler",
              "dpm_solver_pp", "dpm_solver_pp_flow")
    for p in BY_NAME[n].predictions
]
COMPOSING = [
    pytest.param(BY_NAME[n], p, id=f"{n}-{p}")
    for n in ("ddim_eta0", "flow_euler", "dpm_solver_pp", "dpm_solver_pp_flow")
    for p in BY_NAME[n].predictions
    if p != "v_prediction"
]


# --------------------------------------------------------------------------- random schedules and levels


@st.composite
def vp_schedules(draw, prediction: str) -> VPSchedule:
    """A random VP schedule; zero terminal SNR only where the parameterization is defined there."""
    kind = draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]))
    n = draw(st.sampled_from([100, 1000]))
    if kind == "linear":
        sched = VPSchedule.linear(n, draw(st.floats(1e-5, 1e-3)), draw(st.floats(5e-3, 4e-2)))
    elif kind == "scaled_linear":
        sched = VPSchedule.scaled_linear(n, draw(st.floats(1e-4, 2e-3)), draw(st.floats(5e-3, 3e-2)))
    else:
        sched = VPSchedule.squaredcos_cap_v2(n, draw(st.sampled_from([0.999, 0.99])))
    # epsilon is undefined at zero SNR (x0_hat = (x - eps) / 0), so rescale only for sample / v
    if prediction != "epsilon" and draw(st.booleans()):
        sched = sched.rescaled_zero_terminal_snr()
    if draw(st.booleans()):  # diffusers' set_alpha_to_one=False
        sched = VPSchedule(sched.alphas_cumprod, float(sched.alphas_cumprod[0]))
    return sched


def source_range(family: Family, prediction: str, schedule) -> Tuple[float, float]:
    """Levels a skip may start from (where the prediction can be converted to (x0_hat, eps_hat))."""
    if family.kind == "vp":
        return 0.0, float(schedule.num_train_timesteps - 1)
    lo = 0.01 if prediction == "sample" else 1e-3  # sample needs sigma = t > 0
    hi = 0.99 if prediction == "epsilon" else 1.0  # epsilon needs alpha = 1 - t > 0
    return lo, hi


@st.composite
def setups(draw, family: Family, prediction: str):
    """(transition, schedule, source level range, clean end) for a random schedule."""
    if family.kind == "vp":
        sched = draw(vp_schedules(prediction))
        end = -1.0
    else:
        sched = FlowSchedule(shift=draw(st.floats(0.5, 5.0)))
        end = 0.0
    lo, hi = source_range(family, prediction, sched)
    return family.make(sched, prediction), sched, (lo, hi), end


@st.composite
def decreasing_levels(draw, lo: float, hi: float, end: float, k: int, integer: bool):
    """k strictly decreasing source levels in [lo, hi], then one target level in [end, last)."""
    if integer:
        vals = draw(st.lists(st.integers(int(math.ceil(lo)), int(hi)), min_size=k, max_size=k, unique=True))
        levels = sorted((float(v) for v in vals), reverse=True)
        target = float(draw(st.integers(int(end), int(levels[-1]) - 1)))
    else:
        vals = draw(st.lists(st.floats(lo, hi), min_size=k, max_size=k, unique=True))
        levels = sorted(vals, reverse=True)
        target = draw(st.sampled_from([end, (end + levels[-1]) / 2, end + (levels[-1] - end) * 0.999]))
    if len(set(levels)) < k or not target < levels[-1]:
        reject()
    return levels + [target]


def consistent_prediction(transition, x0_hat: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """The model output at state x, level t, whose x0_hat is ``x0_hat`` (eps_hat re-derived from x)."""
    alpha, sigma = transition.schedule.alpha_sigma(torch.tensor(t, dtype=F64))
    eps = (x - alpha * x0_hat) / sigma
    c_x0, c_eps = C.prediction_coefficients(transition.prediction.value, alpha, sigma)
    return c_x0 * x0_hat + c_eps * eps


def scale_of(transition, x, p, t) -> float:
    """Magnitude of the terms a skip combines (the float64 error is relative to it)."""
    x0_hat, eps_hat = transition.to_x0_eps(x, p, t)
    return 1.0 + max(float(v.abs().max()) for v in (x, p, x0_hat, eps_hat))


def randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- one-level skip == step


@pytest.mark.parametrize("family,prediction", CASES)
@SETTINGS
@given(data=st.data())
def test_one_level_skip_is_the_serial_step(family, prediction, data):
    """drafts(...)[0] == S(x, p, t_i -> t_{i+1}, z_i) == sample_serial's x_{i+1}, bit for bit."""
    tr, sched, (lo, hi), end = data.draw(setups(family, prediction))
    T = data.draw(st.integers(1, 6))
    dtype = data.draw(st.sampled_from([torch.float32, F64, torch.float16, torch.bfloat16]))
    if family.kind == "vp":
        grid = sched.timesteps(
            T, data.draw(st.sampled_from(["leading", "trailing", "linspace"])), step_to=data.draw(st.sampled_from(["next", "stride"]))
        )
        if prediction == "epsilon" and float(sched.alpha_bar(grid.t_from[0])) == 0.0:
            return
    else:
        grid = sched.timesteps(T)
        if prediction == "epsilon":  # epsilon is undefined at sigma = 1: start just below
            grid = sched.grid(grid.t_from.clamp(max=hi) - torch.arange(T, dtype=F64) * 1e-6)
    oracle = GaussianMixture(randn(3, 2, seed=1), [0.05, 0.2, 0.5])
    f = oracle.predictor(sched, prediction)
    noise = NoiseSource(data.draw(st.integers(0, 1000)))
    x = noise.initial((3, 2), dtype)
    out = sample_serial(f, x, tr, grid, noise=noise, return_trajectory=True)
    for i in range(T):
        xi = out.trajectory[i]
        p = f(xi, grid.model_times[i : i + 1].expand(3))
        z = noise(i, xi.shape, dtype) if tr.stochastic else None
        step = tr(xi, p, grid.t_from[i], grid.t_to[i], z)
        assert step.dtype == dtype
        assert torch.equal(step, out.trajectory[i + 1]), f"S(t_{i} -> t_{i+1}) is not sample_serial's step {i}"
        m = T - i
        zs = noise.steps(i, i + m, xi.shape, dtype) if tr.stochastic else None
        drafts = tr.drafts(xi, p, grid.t_from[i:], grid.t_to[i:], zs)
        assert drafts.shape == (m, 3, 2)
        assert torch.equal(drafts[0], step), f"drafts row 0 differs from the one-level skip at step {i}"


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("family,prediction", COMPOSING)
@SETTINGS
@given(data=st.data())
def test_deterministic_skips_compose_exactly(family, prediction, data):
    """S(S(x, p, t -> s), p, s -> u) == S(x, p, t -> u) for a frozen epsilon / sample / velocity."""
    tr, sched, (lo, hi), end = data.draw(setups(family, prediction))
    integer = family.kind == "vp" and data.draw(st.booleans())
    t, s, u = data.draw(decreasing_levels(lo, hi, end, 2, integer))
    seed = data.draw(st.integers(0, 2**31))
    x, p = randn(4, 3, seed=seed), randn(4, 3, seed=seed + 1)
    two = tr(tr(x, p, t, s), p, s, u)
    one = tr(x, p, t, u)
    tol = 1e-10 * scale_of(tr, x, p, t)
    assert (two - one).abs().max() <= tol, f"{tr} does not compose over {t} -> {s} -> {u}"


@SETTINGS
@given(data=st.data())
def test_frozen_v_prediction_does_not_compose_but_frozen_x0_eps_does(data):
    """A frozen v is not a frozen (x0_hat, eps_hat): v's meaning depends on the level.

    A skip converts v at its source level; re-expressing the *same* (x0_hat, eps_hat) as a v at the
    intermediate level s composes exactly, while reusing the raw v does not (by an O(1) amount for
    well separated levels).
    """
    sched = data.draw(vp_schedules("v_prediction"))
    tr = DDIMSkip(sched, "v_prediction")
    t = float(data.draw(st.integers(600, 999)))
    s = float(data.draw(st.integers(300, 450)))
    u = float(data.draw(st.integers(-1, 150)))
    n = sched.num_train_timesteps
    t, s, u = min(t * n / 1000, n - 1.0), s * n / 1000, u * n / 1000 if u >= 0 else -1.0  # levels lie in [-1, n - 1]
    seed = data.draw(st.integers(0, 2**31))
    x, v = randn(4, 3, seed=seed), randn(4, 3, seed=seed + 1)
    one = tr(x, v, t, u)
    x_s = tr(x, v, t, s)
    x0_hat, _ = tr.to_x0_eps(x, v, t)
    v_s = consistent_prediction(tr, x0_hat, x_s, s)  # the same (x0_hat, eps_hat) as a v at level s
    tol = 1e-10 * scale_of(tr, x, v, t)
    assert (tr(x_s, v_s, s, u) - one).abs().max() <= tol
    frozen_v = tr(x_s, v, s, u)
    assert (frozen_v - one).abs().max() > 1e-2, "a frozen v_prediction should not compose"


@pytest.mark.parametrize("family,prediction", CHAIN_EXACT)
@SETTINGS
@given(data=st.data())
def test_draft_equals_chain_with_x0_frozen_and_same_noise(family, prediction, data):
    """drafts(x, p, t_from, t_to, z)[j] == the chain of j+1 one-level steps with x0_hat frozen.

    The chain re-derives eps from its own state at each level and adds the same per-step noise
    z_a .. z_{a+j} the serial sampler uses (DDPM fixed_small and fixed_large, DDIM eta > 0: the chain
    unrolled; DDIM eta = 0 and flow: deterministic).
    """
    tr, sched, (lo, hi), end = data.draw(setups(family, prediction))
    n = data.draw(st.integers(1, 5))
    integer = family.kind == "vp" and data.draw(st.booleans())
    levels = torch.tensor(data.draw(decreasing_levels(lo, hi, end, n, integer)), dtype=F64)
    t_from, t_to = levels[:-1], levels[1:]
    seed = data.draw(st.integers(0, 2**31))
    x, p = randn(3, 2, seed=seed), randn(3, 2, seed=seed + 1)
    z = randn(n, 3, 2, seed=seed + 2)
    drafts = tr.drafts(x, p, t_from, t_to, z)
    x0_hat, _ = tr.to_x0_eps(x, p, t_from[0])
    tol = 1e-9 * scale_of(tr, x, p, t_from[0])
    y, pk = x, p
    for k in range(n):
        y = tr(y, pk, t_from[k], t_to[k], z[k] if tr.stochastic else None)
        err = (drafts[k] - y).abs().max()
        assert err <= tol, f"draft {k} differs from the chain by {err:.3g} over levels {levels.tolist()}"
        if k + 1 < n:
            pk = consistent_prediction(tr, x0_hat, y, float(t_from[k + 1]))


@pytest.mark.parametrize("recompute_eps", [False, True])
@pytest.mark.parametrize("transform", ["clip", "threshold"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [1e-9, 0.4, 1.0])
def test_stochastic_drafts_continue_from_the_serial_step_under_an_x0_transform(eta, prediction, transform, recompute_eps):
    """With a clipped or thresholded x0_hat the model's eps_hat is not the one re-derived from x0_hat (unless
    recompute_eps), so the chain's first step, the serial step, must be taken with the model's own
    prediction; the later drafts continue from it with x0_hat frozen. As eta -> 0 they tend to the
    deterministic drafts (the skips from the anchor with (x0_hat, eps_hat) frozen)."""
    from driffusion_core import ClipSample, DynamicThreshold

    VP = VPSchedule.linear()
    x0t = ClipSample(1.0) if transform == "clip" else DynamicThreshold(0.9, 2.0)
    tr = DDIMSkip(VP, prediction, eta=eta, x0_transform=x0t, recompute_eps=recompute_eps)
    grid = VP.timesteps(10, "trailing")
    t_from, t_to = grid.t_from[3:7], grid.t_to[3:7]
    n = t_from.shape[0]
    x, p, z = 2.0 * randn(3, 2, seed=1), 1.5 * randn(3, 2, seed=2), randn(n, 3, 2, seed=3)
    drafts = tr.drafts(x, p, t_from, t_to, z)
    x0_hat, _ = tr.to_x0_eps(x, p, t_from[0])
    tol = 1e-9 * scale_of(tr, x, p, t_from[0])
    y, pk = x, p
    for k in range(n):
        y = tr(y, pk, t_from[k], t_to[k], z[k])
        err = (drafts[k] - y).abs().max()
        assert err <= tol, f"draft {k} differs from the chain by {err:.3g}"
        if k + 1 < n:
            pk = consistent_prediction(tr, x0_hat, y, float(t_from[k + 1]))
    if eta < 1e-6:
        flat = DDIMSkip(VP, prediction, eta=0.0, x0_transform=x0t, recompute_eps=recompute_eps)
        torch.testing.assert_close(drafts, flat.drafts(x, p, t_from, t_to), rtol=0, atol=1e-6)


COUPLED = [pytest.param(BY_NAME[n], id=n)
           for n in ("ddim_eta0", "ddim_eta0.3", "ddim_eta1", "ddpm_fixed_small", "ddpm_fixed_large")]


@pytest.mark.parametrize("n", [1, 2, 3, 17, 120])
def test_chain_draft_coefficients_on_tensors_are_the_generic_ones_bit_for_bit(n):
    """The operators pass 1-D float64 tensors and get one vector multiply per row (O(n^2) work; a 500-level
    window was O(n^3) scalar products, 30 s); floats (the proofs' path) go element by element. Both must be
    chain_noise_weights of each prefix, in the same order of products: equal bit for bit."""
    g = torch.Generator().manual_seed(n)
    A, B, s = (torch.rand(n, dtype=F64, generator=g) + 0.5 for _ in range(3))
    At, Bt, W = C.chain_draft_coefficients(A, B, s)
    At_f, Bt_f, W_f = C.chain_draft_coefficients(A.tolist(), B.tolist(), s.tolist())
    assert [float(v) for v in At] == At_f and [float(v) for v in Bt] == Bt_f
    for j in range(n):
        reference = C.chain_noise_weights(B.tolist()[: j + 1], s.tolist()[: j + 1])
        assert W[j].tolist() == reference == W_f[j], f"row {j}"


@pytest.mark.parametrize("family", COUPLED)
@SETTINGS
@given(data=st.data())
def test_coupled_noise_is_the_chains_noise_normalised(family, data):
    """coupled_noise(t_from, t_to, z)[j] = sum_{k <= j} w_jk z_k / |w_j|: unit rows, and |w_j| times it is the
    noise the chain of one-level steps (x0_hat frozen) accumulates over steps 0..j on the same z.

    The weights are read off the operator's own step, not its chain_factors: with x0_hat given (a "sample"
    model) the step is x_s = A x0_hat + B x + s z, so B = S(1, 0, t -> s, 0) and s = S(0, 0, t -> s, 1);
    w_j = chain_noise_weights(B_0..B_j, s_0..s_j). A noiseless row (|w_j| = 0, e.g. DDIM eta = 0, or a
    window ending at the clean end, where B = s = 0) is e_j: its own step's noise. skip() is the one big
    step on the last row.
    """
    sched = data.draw(vp_schedules("sample"))
    tr, probe = family.make(sched, "sample"), family.make(sched, "sample")
    n = data.draw(st.integers(1, 6))
    integer = data.draw(st.booleans())
    levels = torch.tensor(data.draw(decreasing_levels(0.0, float(sched.num_train_timesteps - 1), -1.0, n, integer)),
                          dtype=F64)
    t_from, t_to = levels[:-1], levels[1:]
    one, zero = torch.ones(1, 1, dtype=F64), torch.zeros(1, 1, dtype=F64)
    B = [float(probe(one, zero, t_from[k], t_to[k], zero)) for k in range(n)]
    s = [float(probe(zero, zero, t_from[k], t_to[k], one)) if probe.stochastic else 0.0 for k in range(n)]
    seed = data.draw(st.integers(0, 2**31))
    x0_hat, x, z = randn(3, 2, seed=seed), randn(3, 2, seed=seed + 1), randn(n, 3, 2, seed=seed + 2)
    u = tr._coupling(t_from, t_to)
    coupled = tr.coupled_noise(t_from, t_to, z)
    assert torch.equal(coupled[0], z[0]), "row 0 of the coupled noise must be z_a itself"
    torch.testing.assert_close(torch.linalg.vector_norm(u, dim=1), torch.ones(n, dtype=F64), rtol=0, atol=1e-12)
    assert torch.equal(u, u.tril()), "the coupling is lower triangular (row j uses z_0..z_j)"
    noisy, quiet = x, x
    for j in range(n):
        w = torch.tensor(C.chain_noise_weights(B[: j + 1], s[: j + 1]), dtype=F64)
        norm = float(torch.linalg.vector_norm(w))
        expected_row = torch.zeros(n, dtype=F64)
        if norm > 0:
            expected_row[: j + 1] = w / norm
        else:
            expected_row[j] = 1.0
        torch.testing.assert_close(u[j], expected_row, rtol=0, atol=1e-12)
        torch.testing.assert_close(coupled[j], torch.einsum("k,k...->...", expected_row, z), rtol=0, atol=1e-12)
        # the chain's own accumulated noise: (chain on z) - (chain without noise) = |w_j| coupled[j]
        noisy = probe(noisy, x0_hat, t_from[j], t_to[j], z[j] if probe.stochastic else None)
        quiet = probe(quiet, x0_hat, t_from[j], t_to[j], torch.zeros_like(z[j]) if probe.stochastic else None)
        if norm > 0:
            torch.testing.assert_close(noisy - quiet, norm * coupled[j], rtol=0, atol=1e-10 * (1 + norm))
    p = randn(3, 2, seed=seed + 3)
    big = tr.skip(x, p, t_from, t_to, z)
    torch.testing.assert_close(big, tr(x, p, t_from[0], t_to[-1], coupled[-1] if tr.stochastic else None),
                               rtol=0, atol=0)


@pytest.mark.parametrize("transform", ["clip", "threshold"])
def test_flow_velocity_model_under_an_x0_transform(transform):
    """A velocity model with an x0 transform: the step is the closed form on (x0_hat, eps_hat) converted at t,
    x0_hat = T(x - t v), eps_hat re-derived from it, (x - (1 - t) x0_hat) / t, and
    x_s = x + (s - t)(eps_hat - x0_hat) = (1 - s) x0_hat + s eps_hat; the transform is not skipped for velocity
    models, and the step to sigma 0 lands on T(x0_hat) (with the model's own eps_hat it would land on
    (1 - t) x0 + t T(x0): the clipping would barely act)."""
    from driffusion_core import ClipSample, DynamicThreshold

    x0t = ClipSample(1.0) if transform == "clip" else DynamicThreshold(0.9, 1.5)
    tr = FlowEulerSkip(FlowSchedule(shift=3.0), "velocity", x0_transform=x0t)
    x, v = randn(5, 3, seed=11) * 2, randn(5, 3, seed=12) * 2
    for t, s in ((0.9, 0.6), (0.5, 0.0)):
        x0 = x0t(x - t * v)
        assert not torch.equal(x0, x - t * v)  # the transform acts here
        eps = (x - (1 - t) * x0) / t
        want = x + (s - t) * (eps - x0)
        torch.testing.assert_close(tr(x, v, t, s), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(want, (1 - s) * x0 + s * eps, rtol=1e-12, atol=1e-12)
        if s == 0.0:
            torch.testing.assert_close(tr(x, v, t, s), x0, rtol=1e-12, atol=1e-12)
        window = tr.drafts(x, v, torch.tensor([t, (t + s) / 2], dtype=F64), torch.tensor([(t + s) / 2, s], dtype=F64))
        torch.testing.assert_close(window[-1], want, rtol=1e-12, atol=1e-12)


def test_step_skipping_couples_its_noise_to_the_fine_chain():
    """sample_step_skipping on a stochastic transition: each coarse step is, pathwise, the fine chain over
    its window with the coarse step's x0_hat frozen and the fine grid's own noise z_{i_k} .. z_{i_{k+1}-1}
    (DDPM fixed_small: the big posterior step on the coupled noise is that chain, see the test above)."""
    from solvers import ring_mixture, sample_step_skipping
    from solvers.serial import coarse_indices

    sched = VPSchedule.linear()
    tr = DDPMSkip(sched, "sample")
    grid = sched.timesteps(12, "trailing")
    f = ring_mixture(4).predictor(sched, "sample")  # an x0 model: a frozen output is a frozen x0_hat
    noise = NoiseSource(9)
    x = NoiseSource(1).initial((8, 2), F64)
    for rounds in (3, 5):
        y = x
        idx = coarse_indices(12, rounds)
        for a, b in zip(idx[:-1], idx[1:]):
            p = f(y, grid.model_times[a : a + 1].expand(y.shape[0]))
            for k in range(a, b):
                y = tr(y, p, grid.t_from[k], grid.t_to[k], noise(k, y.shape, y.dtype, y.device))
        out = sample_step_skipping(f, x, tr, grid, rounds, noise=noise)
        torch.testing.assert_close(out.x, y, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- DDIM eta


@pytest.mark.parametrize("prediction", VP_PREDICTIONS)
@SETTINGS
@given(data=st.data())
def test_ddim_eta1_is_ddpm_fixed_small(prediction, data):
    """DDIM with eta = 1 is the DDPM posterior (fixed_small), for one step and for drafts."""
    sched = data.draw(vp_schedules(prediction))
    ddim, ddpm = DDIMSkip(sched, prediction, eta=1.0), DDPMSkip(sched, prediction, "fixed_small")
    n = data.draw(st.integers(1, 4))
    levels = torch.tensor(
        data.draw(decreasing_levels(0.0, float(sched.num_train_timesteps - 1), -1.0, n, data.draw(st.booleans()))), dtype=F64
    )
    seed = data.draw(st.integers(0, 2**31))
    x, p, z = randn(3, 2, seed=seed), randn(3, 2, seed=seed + 1), randn(n, 3, 2, seed=seed + 2)
    tol = 1e-9 * scale_of(ddim, x, p, levels[0])
    a, b = ddim(x, p, levels[0], levels[-1], z[0]), ddpm(x, p, levels[0], levels[-1], z[0])
    assert a.isfinite().all() and (a - b).abs().max() <= tol
    a, b = ddim.drafts(x, p, levels[:-1], levels[1:], z), ddpm.drafts(x, p, levels[:-1], levels[1:], z)
    assert a.isfinite().all() and (a - b).abs().max() <= tol


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@SETTINGS
@given(data=st.data())
def test_ddim_is_marginal_consistent(eta, data):
    r"""On the interpolant with the exact eps, x_s = sqrt(abar_s) x0 + c eps + sigma_{t->s} z with
    c^2 + sigma_{t->s}^2 = 1 - abar_s: the skip keeps the marginal N(sqrt(abar_s) x0, 1 - abar_s). The three
    parts are read off the step as a linear map of (x0, eps, z): the x0 coefficient (eps = z = 0) must be
    sqrt(abar_s), and c, sigma_{t->s} those of eps and z."""
    sched = data.draw(vp_schedules("v_prediction"))
    tr = DDIMSkip(sched, "v_prediction", eta=eta)
    t, s = data.draw(decreasing_levels(0.0, float(sched.num_train_timesteps - 1), -1.0, 1, False))
    alpha_t, sigma_t = sched.alpha_sigma(torch.tensor(t, dtype=F64))
    alpha_s, sigma_s = sched.alpha_sigma(torch.tensor(s, dtype=F64))
    one, zero = torch.ones(1, 1, dtype=F64), torch.zeros(1, 1, dtype=F64)

    def step(x0, eps, z):  # the state on the interpolant, the exact v there, one step with noise z
        return tr(alpha_t * x0 + sigma_t * eps, alpha_t * eps - sigma_t * x0, t, s, z)

    a = step(one, zero, zero)
    c = step(zero, one, zero)
    sig = step(zero, zero, one)
    assert a.isfinite().all() and c.isfinite().all() and sig.isfinite().all()
    assert abs(float(a) - float(alpha_s)) <= 1e-12
    assert abs(float(c**2 + sig**2) - float(sigma_s**2)) <= 1e-12
    # linear: any (x0, eps, z) is the sum of the parts
    x0, eps, z = 0.7 * one, -1.3 * one, 0.4 * one
    assert abs(float(step(x0, eps, z) - (0.7 * a - 1.3 * c + 0.4 * sig))) <= 1e-12
    if eta == 0.0:
        assert float(sig) == 0.0


# --------------------------------------------------------------------------- identity, dtypes, rows


@pytest.mark.parametrize("family,prediction", CASES)
@SETTINGS
@given(data=st.data())
def test_zero_length_skip_is_identity(family, prediction, data):
    """S(x, p, t -> t, z) is x itself, bit for bit, also row by row next to non-zero skips."""
    tr, sched, (lo, hi), end = data.draw(setups(family, prediction))
    t, s = data.draw(decreasing_levels(lo, hi, end, 1, False))
    dtype = data.draw(st.sampled_from([torch.float32, F64, torch.bfloat16]))
    seed = data.draw(st.integers(0, 2**31))
    x, p, z = (randn(4, 3, seed=seed + k, dtype=torch.float32).to(dtype) for k in range(3))
    assert torch.equal(tr(x, p, t, t, z), x)
    t_from = torch.tensor([t, t, t, t], dtype=F64)
    t_to = torch.tensor([t, s, t, s], dtype=F64)
    out = tr(x, p, t_from, t_to, z)
    assert torch.equal(out[0::2], x[0::2])
    assert torch.equal(out[1], tr(x[1:2], p[1:2], t, s, z[1:2])[0])


@pytest.mark.parametrize("family,prediction", CASES)
@SETTINGS
@given(data=st.data())
def test_dtype_preserved_and_coefficients_in_float64(family, prediction, data):
    """The output has the state's dtype; float32 / bfloat16 match the float64 result on the same
    inputs to the dtype's precision (the coefficients are float64, cast once)."""
    tr, sched, (lo, hi), end = data.draw(setups(family, prediction))
    t, s = data.draw(decreasing_levels(lo, hi, end, 1, family.kind == "vp" and data.draw(st.booleans())))
    seed = data.draw(st.integers(0, 2**31))
    for dtype, rtol in ((torch.float32, 2e-6), (torch.bfloat16, 3e-2)):
        x, p, z = (randn(4, 3, seed=seed + k).to(dtype) for k in range(3))
        out = tr(x, p, t, s, z)
        assert out.dtype == dtype
        ref = tr(x.to(F64), p.to(F64), t, s, z.to(F64))
        tol = rtol * scale_of(tr, x.to(F64), p.to(F64), t) * 4
        assert (out.to(F64) - ref).abs().max() <= tol, f"{dtype} result is off by more than its precision"
    for v in sched.alpha_sigma(torch.tensor([t, s], dtype=torch.float32)):
        assert v.dtype == F64


@pytest.mark.parametrize("family,prediction", CASES)
@SETTINGS
@given(data=st.data())
def test_low_precision_skip_is_the_float64_skip_rounded_once(family, prediction, data):
    """A float16 / bfloat16 skip is computed in float32 and rounded once: on the same low-precision inputs
    it is the float64 skip rounded to the dtype, within one unit in the last place (plus float32's own
    rounding of the terms). Computed in the state's dtype it was not: every coefficient rounded to float16
    is off by up to 2.4e-4 relative (bfloat16: 2e-3), the same way at every element and every step."""
    tr, sched, (lo, hi), end = data.draw(setups(family, prediction))
    t, s = data.draw(decreasing_levels(lo, hi, end, 1, family.kind == "vp" and data.draw(st.booleans())))
    seed = data.draw(st.integers(0, 2**31))
    for dtype in (torch.float16, torch.bfloat16):
        x, p, z = (randn(64, 3, seed=seed + k).to(dtype) for k in range(3))
        out = tr(x, p, t, s, z)
        assert out.dtype == dtype
        x64, p64, z64 = x.to(F64), p.to(F64), z.to(F64)
        ref = tr(x64, p64, t, s, z64)
        # values past the dtype's largest finite number round to inf (a skip from alpha-bar ~ 1e-9 to the clean
        # end takes x0_hat ~ 1e5, beyond float16's 65504): that is the float64 skip rounded to the dtype too
        info = torch.finfo(dtype)
        overflow = ref.abs() >= info.max + ulp(torch.tensor([info.max], dtype=F64), dtype) / 2
        assert torch.isinf(out[overflow]).all() and torch.isfinite(out[~overflow]).all()
        ref = torch.where(overflow, torch.zeros_like(ref), ref)
        slack = 1e-5 * scale_of(tr, x64, p64, t)
        err = torch.where(overflow, torch.zeros_like(ref), (out.to(F64) - ref).abs() - ulp(ref, dtype))
        assert err.max() <= slack, f"{dtype}: {float((err / ulp(ref, dtype)).max()) + 1:.2f} ulp from the float64 skip"


@pytest.mark.filterwarnings("ignore::driffusion_core.errors.MeanStepWarning")  # the mean step is not the point here
def test_ddpm_coefficients_need_float64():
    """Sensitivity of the dtype test: near t = 0, 1 - abar is ~1e-4, so posterior coefficients
    computed in float32 would be off by ~1e-4 relative, far outside the float32 tolerance that
    the operator meets with float64 coefficients."""
    sched = VPSchedule.linear()
    tr = DDPMSkip(sched, "epsilon")
    x, p = randn(64, 4, seed=0, dtype=torch.float32), randn(64, 4, seed=1, dtype=torch.float32)
    ref = tr(x.double(), p.double(), 2.0, 1.0)
    out = tr(x, p, 2.0, 1.0)
    assert (out.double() - ref).abs().max() <= 1e-5
    abar_t, abar_s = sched.alpha_bar(2.0).float(), sched.alpha_bar(1.0).float()
    c_x0, c_xt, _ = C.ddpm_posterior_coefficients(abar_t, abar_s)
    x0 = (x - (1 - abar_t).sqrt() * p) / abar_t.sqrt()
    naive = c_x0 * x0 + c_xt * x
    assert (naive.double() - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family,prediction", CASES)
@SETTINGS
@given(data=st.data())
def test_per_row_levels_equal_separate_calls(family, prediction, data):
    """K level pairs as K*B rows of one call == K calls with scalar levels, bit for bit."""
    tr, sched, (lo, hi), end = data.draw(setups(family, prediction))
    K, B = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    integer = family.kind == "vp" and data.draw(st.booleans())
    pairs = [data.draw(decreasing_levels(lo, hi, end, 1, integer)) for _ in range(K)]
    dtype = data.draw(st.sampled_from([torch.float32, F64]))
    seed = data.draw(st.integers(0, 2**31))
    x, p, z = (randn(K * B, 2, seed=seed + k, dtype=dtype) for k in range(3))
    t_from = torch.tensor([t for t, _ in pairs], dtype=F64).repeat_interleave(B)
    t_to = torch.tensor([s for _, s in pairs], dtype=F64).repeat_interleave(B)
    rows = tr(x, p, t_from, t_to, z)
    for k, (t, s) in enumerate(pairs):
        sl = slice(k * B, (k + 1) * B)
        assert torch.equal(rows[sl], tr(x[sl], p[sl], t, s, z[sl])), f"rows of level pair {k} differ"


# --------------------------------------------------------------------------- convergence order


@pytest.mark.parametrize("kind,order", [("ddim", 1), ("flow", 1), ("dpm_2m", 2), ("dpm_2m_heun", 2), ("unipc", 3)])
def test_serial_sampler_converges_at_its_order(kind, order):
    """diffrax-style: the error to a fine-grid reference halves (order 1), quarters (order 2) or falls
    eightfold (order 3) as the steps double.

    DDIM (eta = 0) is the first-order exponential integrator of the probability-flow ODE, flow's
    Euler step the first-order integrator of dx/dt = v, DPM-Solver++ 2M (midpoint or heun) the
    second-order multistep one (Lu et al. 2022), UniPC (UniP-2 with the corrector UniC-2, bh2) third order
    (Zhao et al. 2023: UniC raises the predictor's order by one); all driven by the exact Gaussian-mixture
    oracle on uniform grids, ending where the ODE is smooth (t = 10 for VP, sigma = 0.05 for flow).
    The reference is the same sampler on the finest grid (every training level for VP; 1024 steps
    for flow; 3072 for UniPC), which biases the last observed order by at most ~5%.
    """
    mix = GaussianMixture(randn(4, 2, seed=3) * 1.5, [[0.3, 0.1], [0.2, 0.2], [0.1, 0.4], [0.25, 0.25]], [0.1, 0.2, 0.3, 0.4])
    x = NoiseSource(7).initial((64, 2), F64)
    if kind != "flow":
        sched = VPSchedule.linear()
        # UniPC without lower_order_final: with it (diffusers' default) the last step is UniP-1, whose O(h^2)
        # local error makes the global order 2, against the O(h^3) of the other steps and of the opposite
        # sign: the observed orders then wander (2.49 then 1.66 from 32 to 128 steps), no clean order
        tr = {"ddim": DDIMSkip(sched, "epsilon"), "dpm_2m": DPMSolverSkip(sched, "epsilon"),
              "dpm_2m_heun": DPMSolverSkip(sched, "epsilon", solver_type="heun"),
              "unipc": UniPCSkip(sched, "epsilon", lower_order_final=False)}[kind]
        prediction, start, stop, finest = "epsilon", 999.0, 10.0, 989
    else:
        sched = FlowSchedule()
        tr, prediction, start, stop, finest = FlowEulerSkip(sched, "velocity"), "velocity", 1.0, 0.05, 1024
    # UniPC's third order shows from about 128 steps on (2.2 to 2.6 below that), finer than the 989 integer
    # training levels allow: its grids keep the fractional levels (alpha-bar interpolated in log-SNR between them)
    rounded = kind not in ("flow", "unipc")
    if kind == "unipc":
        finest = 3072
    f = mix.predictor(sched, prediction)

    def grid(T: int) -> TimeGrid:
        levels = torch.linspace(start, stop, T + 1, dtype=F64)
        if rounded:
            levels = levels.round()
        if kind != "flow":
            return TimeGrid(levels[:-1], levels[1:], levels[:-1])
        return TimeGrid(levels[:-1], levels[1:], levels[:-1] * sched.num_train_timesteps)

    ref = sample_serial(f, x, tr, grid(finest)).x
    # 2M's first doubling is not asymptotic yet from 8 steps, UniPC's not below 128
    steps = {1: [8, 16, 32, 64], 2: [16, 32, 64, 128], 3: [128, 256, 512, 1024]}[order]
    errors = [float((sample_serial(f, x, tr, grid(T)).x - ref).pow(2).mean().sqrt()) for T in steps]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(0.85 * order <= o <= 1.2 * order for o in orders), f"errors {errors}, observed orders {orders}"


@pytest.mark.parametrize(
    "make,noise",
    [
        pytest.param(lambda: DDIMSkip(VPSchedule.linear(), eta=0.3), NoiseSource(3), id="ddim_eta0.3"),
        pytest.param(lambda: DDPMSkip(VPSchedule.linear(), variance_type="fixed_large"), NoiseSource(3), id="ddpm"),
        pytest.param(lambda: DDIMSkip(VPSchedule.scaled_linear(), "v_prediction"), None, id="ddim_v"),
    ],
)
def test_coefficient_cache_changes_no_bit(make, noise):
    """Transitions remember a step's (or a window of drafts') coefficients and a window's noise coupling;
    a warm cache, a cold one and an evicting one give the bits of no cache, serial and draft-and-refine alike."""
    from driffusion_core import DraftRefineScheduler

    grid = VPSchedule.linear().timesteps(12, "trailing")
    x, f = randn(5, 3, seed=1), (lambda x, t: torch.tanh(x) * (t.to(x.dtype)[:, None] / 1000))
    warm = make()
    runs = [sample_serial(f, x, warm, grid, noise=noise).x for _ in range(2)]
    runs.append(sample_serial(f, x, make(), grid, noise=noise).x)
    tiny = make()
    tiny._CACHE_SIZE = 3  # evicts all the time
    runs.append(sample_serial(f, x, tiny, grid, noise=noise).x)
    assert len(tiny._coefficient_cache[1]) <= 3
    nocache = make()  # the reference: every coefficient computed afresh
    nocache.cached = lambda t_from, t_to, compute: compute(t_from, t_to)
    nocache._memo = lambda key, make_value: make_value()
    runs.append(sample_serial(f, x, nocache, grid, noise=noise).x)
    assert all(torch.equal(r, runs[0]) for r in runs)
    wide = [DraftRefineScheduler(tr, grid, width=4).sample(f, x, noise=noise).x for tr in (nocache, warm, warm, make(), tiny)]
    assert all(torch.equal(r, wide[0]) for r in wide)
    # the scalar step equals a per-row step (never cached) bit for bit
    p = randn(5, 3, seed=2)
    z = randn(5, 3, seed=4)
    t, s = torch.tensor(523.0, dtype=F64), torch.tensor(311.0, dtype=F64)
    assert torch.equal(warm(x, p, t, s, z), warm(x, p, t.expand(5), s.expand(5), z))
    assert torch.equal(warm(x, p, t, s, z), warm(x, p, t, s, z))


def test_coefficient_cache_follows_changed_settings():
    """Changing a transition's settings, a copy's, or its schedule's table after use gives what a fresh
    transition with those settings gives, never the cached coefficients of the old ones."""
    import copy

    grid = VPSchedule.linear().timesteps(8, "trailing")
    x, f = randn(4, 2, seed=3), (lambda x, t: torch.tanh(x))
    run = lambda tr: sample_serial(f, x, tr, grid, noise=NoiseSource(1)).x  # noqa: E731
    tr = DDIMSkip(VPSchedule.linear(), eta=0.3)
    run(tr)
    twin = copy.copy(tr)
    tr.eta = 1.0
    assert torch.equal(run(tr), run(DDIMSkip(VPSchedule.linear(), eta=1.0)))
    assert torch.equal(run(twin), run(DDIMSkip(VPSchedule.linear(), eta=0.3)))  # the copy kept its own
    ddpm = DDPMSkip(VPSchedule.linear())
    run(ddpm)
    ddpm.variance_type = "fixed_large"
    assert torch.equal(run(ddpm), run(DDPMSkip(VPSchedule.linear(), variance_type="fixed_large")))
    schedule = VPSchedule.linear()
    tr = DDIMSkip(schedule, eta=0.3)
    run(tr)
    schedule.alphas_cumprod.mul_(0.99)  # edited in place
    fresh = VPSchedule(schedule.alphas_cumprod.clone())
    assert torch.equal(run(tr), run(DDIMSkip(fresh, eta=0.3)))
    # replaced twice between samples: the second new table may reuse the first one's freed id (and has
    # version 0), so the token also counts attribute sets
    for _ in range(5):
        schedule.alphas_cumprod = schedule.alphas_cumprod ** 1.05  # frees the table the cache was made from
        schedule.alphas_cumprod = schedule.alphas_cumprod.clamp(min=1e-6)  # made while the other is alive
        assert torch.equal(run(tr), run(DDIMSkip(VPSchedule(schedule.alphas_cumprod.clone()), eta=0.3)))
    # a pickle or deep copy of a used transition carries no cache (it could not be reused there) and samples alike
    import pickle

    for used in (tr, DPMSolverSkip(VPSchedule.linear())):
        run(used)
        assert "_coefficient_cache" in used.__dict__
        for twin in (pickle.loads(pickle.dumps(used)), copy.deepcopy(used)):
            assert "_coefficient_cache" not in twin.__dict__ and "_x0_memo" not in twin.__dict__
            assert torch.equal(run(twin), run(used))
    # eta 0 <-> > 0 switches the noise on and off, as a fresh transition would
    tr = DDIMSkip(VPSchedule.linear(), eta=0.0)
    run(tr)
    tr.eta = 0.5
    assert tr.stochastic and not tr.composes_exactly
    assert torch.equal(run(tr), run(DDIMSkip(VPSchedule.linear(), eta=0.5)))
    tr.eta = 0
    assert not tr.stochastic and tr.composes_exactly
    assert torch.equal(run(tr), run(DDIMSkip(VPSchedule.linear())))


def test_drafts_remembered_alpha_sigma_follows_changed_settings():
    """A stochastic window's drafts convert the anchor's prediction with the schedule's (alpha, sigma) at its level,
    remembered per level: warm, after an in-place edit of the table, or after a change of prediction, a sample is
    the bits of a fresh transition's; a flow model of another parameterization (its velocity converted at every
    step) alike."""
    from driffusion_core import DraftRefineScheduler

    grid = VPSchedule.linear().timesteps(12, "trailing")
    x, f = randn(4, 3, seed=5), (lambda x, t: torch.tanh(x) * (t.to(x.dtype)[:, None] / 1000))
    run = lambda tr, g=grid: DraftRefineScheduler(tr, g, width=4).sample(f, x, noise=NoiseSource(2)).x  # noqa: E731
    schedule = VPSchedule.linear()
    tr = DDPMSkip(schedule)
    first = run(tr)
    assert torch.equal(run(tr), first) and torch.equal(first, run(DDPMSkip(VPSchedule.linear())))
    schedule.alphas_cumprod.mul_(0.99)  # edited in place
    assert torch.equal(run(tr), run(DDPMSkip(VPSchedule(schedule.alphas_cumprod.clone()))))
    tr = DDIMSkip(VPSchedule.linear(), eta=0.5)
    run(tr)
    tr.prediction = "sample"
    assert torch.equal(run(tr), run(DDIMSkip(VPSchedule.linear(), "sample", eta=0.5)))
    flow = FlowSchedule(shift=3.0)
    tr = FlowEulerSkip(flow, "sample")
    warm = [run(tr, flow.timesteps(12)) for _ in range(2)]
    assert torch.equal(warm[0], warm[1]) and torch.equal(warm[0], run(FlowEulerSkip(FlowSchedule(shift=3.0), "sample"), flow.timesteps(12)))


def test_settings_changed_later_are_checked_as_in_the_constructor():
    from driffusion_core.errors import InvalidArgumentError

    tr, ddpm, dpm = DDIMSkip(VPSchedule.linear()), DDPMSkip(VPSchedule.linear()), DPMSolverSkip(FlowSchedule())
    for bad in (3.0, -0.1, True, "0.5"):
        with pytest.raises(InvalidArgumentError, match=r"eta must lie in \[0, 1\]"):
            tr.eta = bad
    with pytest.raises(InvalidArgumentError, match=r"variance_type must be one of"):
        ddpm.variance_type = "bogus"
    with pytest.raises(InvalidArgumentError, match=r"a VPSchedule takes .*got 'velocity'"):
        tr.prediction = "velocity"
    with pytest.raises(InvalidArgumentError, match=r"a FlowSchedule takes .*got 'v_prediction'"):
        dpm.prediction = "v_prediction"
    assert tr.eta == 0.0 and ddpm.variance_type == "fixed_small" and tr.prediction.value == "epsilon"
    tr.prediction = "sample"  # an allowed change is parsed
    assert tr.prediction.value == "sample"


def test_schedule_tables_are_float64_products_of_the_betas():
    """alpha-bar_t = prod_{s <= t} (1 - beta_s), in float64 (numpy's closed form): a table made in float32 is
    off by ~1e-7 relative, which a float64 sampler would carry."""
    import numpy as np

    n = 1000
    cos = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    cases = [
        (VPSchedule.linear(), np.linspace(1e-4, 0.02, n)),
        (VPSchedule.scaled_linear(), np.linspace(0.00085**0.5, 0.012**0.5, n) ** 2),
        (VPSchedule.squaredcos_cap_v2(), np.array([min(1 - cos((i + 1) / n) / cos(i / n), 0.999) for i in range(n)])),
    ]
    for sched, betas in cases:
        assert sched.alphas_cumprod.dtype == F64
        np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1.0 - betas), rtol=1e-12, atol=0)


@pytest.mark.parametrize("make", [VPSchedule.linear, VPSchedule.scaled_linear, VPSchedule.squaredcos_cap_v2])
def test_fractional_levels_interpolate_the_log_snr_linearly(make):
    """Between training timesteps k and k + 1, log(abar / (1 - abar)) is linear in t (closed form), so it
    joins the table at both ends."""
    sched = make()
    ac = sched.alphas_cumprod
    lam = torch.log(ac / (1 - ac))
    k = torch.tensor([0, 1, 17, 250, 611, 997], dtype=torch.long)
    for frac in (0.25, 0.5, 0.9, 1 - 1e-9):
        t = k.to(F64) + frac
        want = torch.sigmoid(lam[k] + frac * (lam[k + 1] - lam[k]))
        torch.testing.assert_close(sched.alpha_bar(t), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("final", [1.0, None])
@pytest.mark.parametrize("make,n", [(VPSchedule.scaled_linear, 1000), (VPSchedule.linear, 1000),
                                    (VPSchedule.scaled_linear, 999), (VPSchedule.squaredcos_cap_v2, 4000),
                                    (VPSchedule.linear, 3)])
def test_rescaled_zero_terminal_snr_is_the_constructors_rescale(final, make, n):
    """schedule.rescaled_zero_terminal_snr() is the schedule built with rescale_betas_zero_snr=True: the same
    table and the same clean end (final_alpha_cumprod kept, alphas_cumprod[0] for None, also where the
    rescale's round trip moves alphas_cumprod[0] up by an ulp: linear(1000) and others were refused)."""
    a = make(n, final_alpha_cumprod=final).rescaled_zero_terminal_snr()
    b = make(n, final_alpha_cumprod=final, rescale_betas_zero_snr=True)
    torch.testing.assert_close(a.alphas_cumprod, b.alphas_cumprod, rtol=1e-12, atol=1e-15)
    assert float(a.alphas_cumprod[-1]) == 0.0
    assert a.final_alpha_cumprod == pytest.approx(b.final_alpha_cumprod, rel=1e-12)
    if final is None:
        assert a.final_alpha_cumprod == float(a.alphas_cumprod[0])


@pytest.mark.parametrize("schedule", [VPSchedule.linear(), FlowSchedule(shift=3.0)], ids=["vp", "flow"])
def test_a_grid_from_explicit_levels_calls_the_model_at_timesteps_model_times(schedule):
    """schedule.grid(levels) gives the model the times schedule.timesteps() gives it at those levels: int64
    training timesteps for VP, float32 sigma * N for flow (as diffusers passes them)."""
    ref = schedule.timesteps(12)
    grid = schedule.grid(ref.t_from)
    assert grid.model_times.dtype == ref.model_times.dtype
    assert torch.equal(grid.model_times, ref.model_times)
    assert torch.equal(grid.t_from, ref.t_from) and torch.equal(grid.t_to[-1:], ref.t_to[-1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_clip_range_beyond_the_dtype_is_no_clipping(dtype):
    """ClipSample(c) and DynamicThreshold(max_value=c) with c past the dtype's largest value (sys.float_info.max,
    to switch clipping off) clamp nothing there, as a c just at that value does (torch refused the conversion)."""
    import sys

    from driffusion_core import ClipSample, DynamicThreshold

    big = sys.float_info.max
    x0 = (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    assert torch.equal(ClipSample(big)(x0), x0)
    top = float(torch.finfo(x0.dtype if dtype == torch.float64 else torch.float32).max)
    assert torch.equal(DynamicThreshold(0.9, big)(x0), DynamicThreshold(0.9, top)(x0))
    assert not torch.equal(DynamicThreshold(0.9, big)(x0), x0)  # it still divides by the row's quantile


@pytest.mark.parametrize("ratio", [0.995, 0.5, 1.0])
def test_dynamic_threshold_on_rows_past_torch_quantiles_limit(ratio):
    """torch.quantile (and so diffusers' thresholding) refuses rows of more than 2**24 elements; the
    threshold is then taken by selection, and equals the float64 linear-interpolation quantile (numpy's)."""
    import numpy as np

    from driffusion_core import DynamicThreshold
    from driffusion_core.parameterization import QUANTILE_MAX

    n = QUANTILE_MAX + 3
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, n, generator=g, dtype=torch.float32) * 3.0
    with pytest.raises(RuntimeError, match="too large"):  # why the selection path exists
        torch.quantile(x0.abs(), ratio, dim=1)
    out = DynamicThreshold(ratio, max_value=100.0)(x0.reshape(1, 1, n))
    s = float(np.clip(np.quantile(x0.abs().double().numpy()[0], ratio), 1.0, 100.0))
    assert 1.0 < s < 100.0  # the quantile itself is the threshold, so the check below can fail
    want = (x0.double().clamp(-s, s) / s).float()
    assert out.shape == (1, 1, n) and out.dtype == torch.float32
    assert torch.allclose(out.reshape(1, n), want, rtol=2e-7, atol=0), (out.reshape(1, n) - want).abs().max()
    # the quantile itself, in float64 (where a rank off by one element would show: neighbours differ by ~1e-7)
    from driffusion_core.parameterization import row_quantile

    a = x0.abs().double()
    q, ref = float(row_quantile(a, ratio)[0]), float(np.quantile(a.numpy()[0], ratio))
    assert q == pytest.approx(ref, rel=1e-14, abs=0)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.995, 1.0])
def test_row_quantile_selection_path_equals_torch_quantile(ratio, monkeypatch):
    """The selection path (forced on small rows) gives torch.quantile's linear-interpolation quantile."""
    from driffusion_core import parameterization as P

    flat = torch.randn(4, 1001, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want = torch.quantile(flat, ratio, dim=1)
    monkeypatch.setattr(P, "QUANTILE_MAX", 10)
    got = P.row_quantile(flat, ratio)
    assert torch.allclose(got, want, rtol=1e-15, atol=0), (got - want).abs().max()


# ----------------------------------------------------------------- review: reparameterize, x0_transform, bool levels
import re  # noqa: E402

import numpy as np  # noqa: E402


def _review_setup():
    sched = VPSchedule.linear()
    return sched, sched.timesteps(10, "trailing"), NoiseSource(0).initial((8, 2))


@pytest.mark.parametrize("out", [lambda x: torch.zeros(8, 1), lambda x: torch.zeros(1, 2), lambda x: torch.tensor(0.0),
                                 lambda x: torch.zeros(16)], ids=["B1", "1D", "0d", "flat"])
def test_reparameterize_refuses_an_output_not_shaped_like_x(out):
    """A wrapped model's (B, 1) output would broadcast silently, a (1, D) one be taken for per-row levels, a
    0-d one fail with an IndexError: each is refused, naming the output's and the state's shapes."""
    from driffusion_core import PredictorOutputError, reparameterize

    sched, g, x = _review_setup()
    wrapped = reparameterize(lambda x, t: out(x), sched, "sample", "epsilon")
    shape = tuple(out(x).shape)
    with pytest.raises(PredictorOutputError, match=rf"wrapped model returned shape {re.escape(str(shape))} for state "
                                                   r"shape \(8, 2\)"):
        sample_serial(wrapped, x, DDIMSkip(sched), g)


def test_reparameterize_refuses_a_non_tensor_output_and_a_non_schedule():
    from driffusion_core import InvalidArgumentError, PredictorOutputError, reparameterize

    sched, g, x = _review_setup()
    with pytest.raises(PredictorOutputError, match=r"wrapped model returned tuple .*must return a tensor.*return_dict"):
        reparameterize(lambda x, t: (x,), sched, "sample", "epsilon")(x, g.model_times[0].expand(8))
    for bad in (None, "linear", 1000):
        with pytest.raises(InvalidArgumentError, match=r"reparameterize: schedule must be a Schedule"):
            reparameterize(lambda x, t: x, bad, "sample", "epsilon")
    with pytest.raises(InvalidArgumentError, match=r"looks like a transition: pass its \.schedule"):
        reparameterize(lambda x, t: x, DDIMSkip(sched), "sample", "epsilon")
    with pytest.raises(InvalidArgumentError, match=r"predictor must be a callable"):
        reparameterize(None, sched, "sample", "epsilon")


def test_reparameterize_checks_leave_the_result_unchanged():
    """The checks change no arithmetic: the wrapper gives the oracle's own target-parameterized output, and
    sampling through it matches the unwrapped sampler to rounding."""
    from driffusion_core import reparameterize
    from solvers import ring_mixture

    sched, g, _ = _review_setup()
    x = NoiseSource(0).initial((8, 2), F64)
    mix = ring_mixture()
    f = mix.predictor(sched, "sample")
    w = reparameterize(f, sched, "sample", "epsilon")
    t = g.model_times[3].expand(8)
    torch.testing.assert_close(w(x, t), mix.predictor(sched, "epsilon")(x, t), rtol=1e-9, atol=1e-9)
    ref = sample_serial(f, x, DDIMSkip(sched, "sample"), g).x
    torch.testing.assert_close(sample_serial(w, x, DDIMSkip(sched), g).x, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bad", [3, "clip", 1.0])
def test_x0_transform_must_be_callable_or_none(bad):
    from driffusion_core import InvalidArgumentError

    sched, _, _ = _review_setup()
    for make in (lambda: DDIMSkip(sched, x0_transform=bad), lambda: DDPMSkip(sched, x0_transform=bad),
                 lambda: FlowEulerSkip(FlowSchedule(), x0_transform=bad)):
        with pytest.raises(InvalidArgumentError, match=r"x0_transform must be a callable .*or None"):
            make()
    tr = DDIMSkip(sched)
    with pytest.raises(InvalidArgumentError, match=r"x0_transform must be a callable"):  # set later: checked too
        tr.x0_transform = bad
    tr.x0_transform = None  # None stays allowed


@pytest.mark.parametrize("transform, got", [
    (lambda z: z[:1], r"shape \(1, 2\)"), (lambda z: None, "NoneType"), (lambda z: z.sum(), r"shape \(\)"),
    (lambda z: z.reshape(-1), r"shape \(16,\)"),
], ids=["row", "None", "0d", "flat"])
@pytest.mark.filterwarnings("ignore::driffusion_core.errors.MeanStepWarning")  # the mean step is not the point here
@pytest.mark.parametrize("family", ["ddim", "ddim_eta", "ddpm", "flow", "dpm"])
def test_x0_transform_output_must_be_shaped_like_x0_hat(transform, got, family):
    """A transform returning one row would be broadcast (every row identical); None would fail deep in the
    step with a TypeError. Both are refused where the transform is applied, for the step and the drafts."""
    from driffusion_core import InvalidArgumentError

    sched, g, x = _review_setup()
    if family == "flow":
        sched = FlowSchedule()
        g = sched.timesteps(10)
        tr = FlowEulerSkip(sched, x0_transform=transform)
    else:
        tr = {"ddim": lambda: DDIMSkip(sched, x0_transform=transform),
              "ddim_eta": lambda: DDIMSkip(sched, eta=0.5, x0_transform=transform),
              "ddpm": lambda: DDPMSkip(sched, x0_transform=transform),
              "dpm": lambda: DPMSolverSkip(sched, x0_transform=transform)}[family]()
    want = rf"x0_transform .* returned {got} for x0_hat of shape \(8, 2\)"
    with pytest.raises(InvalidArgumentError, match=want):
        tr(x, x, g.t_from[0], g.t_to[0])
    with pytest.raises(InvalidArgumentError, match=r"x0_transform .* returned .* for x0_hat of shape \(\d+, 2\)"):
        tr.drafts(x, x, g.t_from[:3], g.t_to[:3], NoiseSource(1).steps(0, 3, x.shape) if tr.stochastic else None)
    with pytest.raises(InvalidArgumentError, match=want):
        sample_serial(lambda x, t: x, x, tr, g)


def test_x0_transform_checks_leave_clipping_unchanged():
    """A valid transform gives the same step as before: clip x0_hat, then DDIM with the clipped x0_hat."""
    from driffusion_core import ClipSample

    sched, g, _ = _review_setup()
    x = NoiseSource(0).initial((8, 2), F64) * 3
    p = NoiseSource(1).initial((8, 2), F64)
    t, s = g.t_from[2], g.t_to[2]
    out = DDIMSkip(sched, x0_transform=ClipSample(1.0))(x, p, t, s)
    abar_t, abar_s = sched.alpha_bar(t), sched.alpha_bar(s)
    x0 = ((x - (1 - abar_t).sqrt() * p) / abar_t.sqrt()).clamp(-1, 1)
    torch.testing.assert_close(out, abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("levels", [
    (True, False), (np.bool_(True), 0.5), (torch.tensor(True), torch.tensor(False)), (999.0, [False] * 8),
    (999.0, np.zeros(8, dtype=bool)), (torch.tensor(999.0 + 0j), 500.0), ([1.0 + 1j] * 8, 0.0),
], ids=["bool", "np_bool", "tensor_bool", "list_bool", "array_bool", "complex", "list_complex"])
@pytest.mark.filterwarnings("ignore::driffusion_core.errors.MeanStepWarning")  # the mean step is not the point here
def test_operator_levels_refuse_bools_and_complex(levels):
    """``S(x, p, True, False)`` would run as the step from level 1 to 0: refused, naming the argument."""
    from driffusion_core import InvalidTimestepsError

    sched, _, x = _review_setup()
    which = "t_from" if not isinstance(levels[0], float) else "t_to"
    for tr in (DDIMSkip(sched), DDPMSkip(sched), DPMSolverSkip(sched)):
        with pytest.raises(InvalidTimestepsError, match=rf"{type(tr).__name__}: {which} must be real numbers"):
            tr(x, x, *levels)
    with pytest.raises(InvalidTimestepsError, match=r"FlowEulerSkip: t_from must be real numbers"):
        FlowEulerSkip(FlowSchedule())(x, x, True, 0.0)


# ------------------------------------------------------------------ coefficient casts


def test_coefficient_casts_and_conversions_are_remembered_and_usable_with_gradients_after_inference_mode():
    """broadcast_coef casts a cached float64 coefficient once per (device, dtype), and to_x0_eps converts with the
    (a_x, a_p), (b_x, b_p) of a cached (alpha, sigma) once: later rounds reuse them (on a GPU, no blocking
    host-to-device copy per round), and an in-place write remakes them. The caches are filled outside
    torch.inference_mode, so a first sample under it does not leave inference tensors that a later sample with
    gradients would fail on ("Inference tensors cannot be saved for backward"), in float64 as in float32."""
    from driffusion_core import DraftRefineScheduler, Prediction
    from driffusion_core.parameterization import broadcast_coef, to_x0_eps

    c = torch.tensor([0.5, 0.25], dtype=torch.float64)
    x = torch.zeros(2, 3)
    first = broadcast_coef(c, x)
    assert first.dtype == torch.float32 and broadcast_coef(c, x).data_ptr() == first.data_ptr()
    assert broadcast_coef(c, x.double()).data_ptr() == c.data_ptr()  # same dtype and device: c itself
    c.mul_(2)  # written in place: the copy is remade
    assert torch.equal(broadcast_coef(c, x), torch.tensor([[1.0], [0.5]]))
    alpha, sigma = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    xs, ps = torch.randn(2, 3), torch.randn(2, 3)
    once = to_x0_eps(Prediction.EPSILON, xs, ps, alpha, sigma)
    assert all(torch.equal(u, v) for u, v in zip(once, to_x0_eps(Prediction.EPSILON, xs, ps, alpha, sigma)))
    alpha.fill_(0.8), sigma.fill_(0.6)  # both written in place: converted anew
    torch.testing.assert_close(to_x0_eps(Prediction.EPSILON, xs, ps, alpha, sigma)[0], (xs - 0.6 * ps) / 0.8)
    vp = VPSchedule.linear()
    grid = vp.timesteps(8)
    mixture = GaussianMixture([[1.0, 0.0], [-1.0, 0.0]], 0.1)
    for dtype in (torch.float64, torch.float32):
        for transition in (DDIMSkip(vp), DDPMSkip(vp), DDIMSkip(vp, prediction="v_prediction")):
            predictor = mixture.predictor(vp, transition.prediction)
            samplers = [lambda x: sample_serial(predictor, x, transition, grid, noise=NoiseSource(1)),
                        lambda x: DraftRefineScheduler(transition, grid, width=3).sample(predictor, x, noise=NoiseSource(1))]
            for sample in samplers:
                with torch.inference_mode():
                    plain = sample(NoiseSource(0).initial((4, 2), dtype=dtype)).x
                x1 = NoiseSource(0).initial((4, 2), dtype=dtype).requires_grad_(True)
                out = sample(x1).x
                out.sum().backward()
                assert x1.grad is not None and torch.isfinite(x1.grad).all()
                assert torch.equal(out.detach(), plain)


@pytest.mark.parametrize("make", [
    pytest.param(lambda s: DDPMSkip(s), id="ddpm"), pytest.param(lambda s: DDIMSkip(s, eta=0.5), id="ddim-eta"),
])
def test_a_stochastic_step_without_noise_warns_once_and_is_the_mean(make):
    """In a hand-written loop a forgotten noise= gives the posterior mean at every step (samples lose their
    spread): a MeanStepWarning at the caller's line, once per transition; the step is then the step with
    zero noise, and noise=torch.zeros_like(x) (the mean on purpose) does not warn. A deterministic transition
    never warns."""
    import warnings

    from driffusion_core import InvalidTimestepsError, MeanStepWarning

    sched = VPSchedule.linear()
    tr = make(sched)
    x, p = randn(4, 2, seed=1), randn(4, 2, seed=2)
    with warnings.catch_warnings(record=True) as refused:
        warnings.simplefilter("always")
        with pytest.raises(InvalidTimestepsError):  # refused (going up): the one warning is not spent on it
            tr(x, p, 500, 600)
    assert not [w for w in refused if issubclass(w.category, MeanStepWarning)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mean = tr(x, p, 600, 500)
        tr(x, p, 500, 400)
        tr(x, p, 600, 500, torch.zeros_like(x))
        DDIMSkip(sched)(x, p, 600, 500)
    got = [w for w in seen if issubclass(w.category, MeanStepWarning)]
    assert len(got) == 1, [str(w.message) for w in seen]
    assert got[0].filename == __file__ and "noise=torch.zeros_like(x)" in str(got[0].message)
    torch.testing.assert_close(mean, tr(x, p, 600, 500, torch.zeros_like(x)), rtol=0, atol=0)
    fresh = make(sched)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fresh(x, p, 600, 500, torch.zeros_like(x))
    assert not [w for w in seen if issubclass(w.category, MeanStepWarning)]
    # drafts without noises: the same warning, at the caller's line, naming noises
    window = torch.tensor([600.0, 500.0], dtype=F64), torch.tensor([500.0, 400.0], dtype=F64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fresh.drafts(x, p, *window)
        fresh.drafts(x, p, *window)
    got = [w for w in seen if issubclass(w.category, MeanStepWarning)]
    assert len(got) == 1 and got[0].filename == __file__ and "without noises" in str(got[0].message)

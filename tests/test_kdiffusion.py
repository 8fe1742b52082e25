"""k-diffusion conventions: sample_driffusion(model, x, sigmas, ...) and the VE Euler skip, and
sample_driffusion_dpmpp_2m (DPM-Solver++ 2M on the VE schedule).

The references are k-diffusion's published ``sample_euler`` (s_churn = 0) and ``sample_dpmpp_2m``, written
out inline below from their algorithms, driven by an exact Gaussian-mixture denoiser
D(x, sigma) = E[x0 | x0 + sigma eps = x].
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from backends import BatchedExecutor, SerialExecutor
from benchmarks import kdiffusion_study
from driffusion_core import InvalidArgumentError, InvalidTimestepsError, InvalidWidthError, NoiseSource, expected_rounds
from solvers import (
    DPMSolverSkip, VEAncestralSkip, VEEulerSkip, VESchedule, ring_mixture, sample_driffusion, sample_driffusion_ancestral,
    sample_driffusion_dpmpp_2m, sample_step_skipping,
)
from solvers.interop import sigmas_grid

MIXTURE = ring_mixture()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors run fastest on one thread (and do not fight the other tests for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def denoiser(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
    """The exact denoiser of the ring mixture in VE form (alpha = 1), one sigma per row."""
    s = sigma.to(torch.float64)
    return MIXTURE.x0_eps(x, torch.ones_like(s), s)[0].to(x.dtype)


def cond_denoiser(x, sigma, shift):
    """A denoiser with a per-sample conditioning tensor (k-diffusion's extra_args)."""
    return denoiser(x - shift, sigma) + shift


def sample_euler_reference(model, x, sigmas, extra_args=None, callback=None):
    """k-diffusion's sample_euler with s_churn = 0: x <- x + (sigma_next - sigma) (x - D(x, sigma)) / sigma."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - denoised) / sigmas[i]
    return x


def dpmpp_2m_update(x, denoised, old_denoised, sigma_prev, sigma, sigma_next):
    """One step of k-diffusion's sample_dpmpp_2m: in t = -log(sigma), h = t_next - t, r = h_last / h,
    x <- (sigma_next / sigma) x - expm1(-h) ((1 + 1/(2r)) D - D_old / (2r)); first order without an earlier
    step (``old_denoised`` None) and to sigma = 0."""
    t, t_next = -sigma.log(), -sigma_next.log()
    h = t_next - t
    if old_denoised is None or sigma_next == 0:
        return (sigma_next / sigma) * x - (-h).expm1() * denoised
    r = (t + sigma_prev.log()) / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (sigma_next / sigma) * x - (-h).expm1() * denoised_d


def sample_dpmpp_2m_reference(model, x, sigmas, extra_args=None, callback=None):
    """k-diffusion's sample_dpmpp_2m (:func:`dpmpp_2m_update` at every step)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = dpmpp_2m_update(x, denoised, old_denoised, sigmas[i - 1] if i else None, sigmas[i], sigmas[i + 1])
        old_denoised = denoised
    return x


SAMPLERS = {"euler": sample_driffusion, "dpmpp_2m": sample_driffusion_dpmpp_2m}
REFERENCES = {"euler": sample_euler_reference, "dpmpp_2m": sample_dpmpp_2m_reference}


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, dtype=torch.float32):
    """k-diffusion's get_sigmas_karras with the final 0 appended (the benchmark study's), float32 by default."""
    return kdiffusion_study.karras_sigmas(n, sigma_min, sigma_max, rho, dtype)


def _start(sigmas, batch=128, dtype=torch.float32):
    return NoiseSource(0).initial((batch, 2), dtype) * sigmas[0].to(dtype)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigmas_kind", ["karras", "ending_above_zero", "linear"])
def test_width1_equals_sample_euler(dtype, sigmas_kind):
    if sigmas_kind == "karras":
        sigmas = karras_sigmas(12, dtype=dtype)
    elif sigmas_kind == "ending_above_zero":
        sigmas = karras_sigmas(12, dtype=dtype)[:-1]  # stops at sigma_min > 0
    else:
        sigmas = torch.linspace(14.6, 0.0, 16, dtype=dtype)
    x = _start(sigmas, dtype=dtype)
    ref = sample_euler_reference(denoiser, x, sigmas)
    out = sample_driffusion(denoiser, x, sigmas, width=1, disable=True, return_output=True)
    assert out.rounds == out.evals == len(sigmas) - 1
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.x, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_sample_euler_churn_arguments_are_taken_and_only_no_churn_is_run():
    """A call written for sample_euler works unchanged: s_churn = 0 with any s_tmin / s_tmax / s_noise (which
    have no effect there, as in sample_euler) gives the same sample; churn is refused by name."""
    from driffusion_core.errors import InvalidArgumentError

    sigmas = karras_sigmas(10)
    x = _start(sigmas)
    plain = sample_driffusion(denoiser, x, sigmas, width=3, disable=True)
    same = sample_driffusion(denoiser, x, sigmas, width=3, disable=True, s_churn=0.0, s_tmin=0.05, s_tmax=50.0,
                             s_noise=1.003)
    assert torch.equal(plain, same)
    torch.testing.assert_close(sample_driffusion(denoiser, x, sigmas, width=1, disable=True, s_churn=0.0),
                               sample_euler_reference(denoiser, x, sigmas), rtol=1e-5, atol=1e-4)
    with pytest.raises(InvalidArgumentError, match=r"s_churn = 1\.0 is not supported.*sample_driffusion_ancestral"):
        sample_driffusion(denoiser, x, sigmas, disable=True, s_churn=1.0)
    with pytest.raises(InvalidArgumentError, match=r"s_noise must be a real number, got 'x'"):
        sample_driffusion(denoiser, x, sigmas, disable=True, s_noise="x")
    with pytest.raises(InvalidArgumentError, match=r"s_tmin must be a real number, got nan"):
        sample_driffusion(denoiser, x, sigmas, disable=True, s_tmin=float("nan"))


def test_extra_args_and_executors():
    """extra_args reach the model per sample; batched drafts give the serial executor's result."""
    sigmas = karras_sigmas(10)
    x = _start(sigmas, batch=8)
    shift = torch.linspace(-1, 1, 8)[:, None].expand(8, 2).contiguous()
    ref = sample_euler_reference(cond_denoiser, x, sigmas, {"shift": shift})
    w1 = sample_driffusion(cond_denoiser, x, sigmas, {"shift": shift}, width=1, disable=True)
    torch.testing.assert_close(w1, ref, rtol=1e-5, atol=1e-5)
    for mode in ("aggressive", "conservative"):
        rows = []

        def counting(x, sigma, **kw):
            rows.append(x.shape[0])
            return cond_denoiser(x, sigma, **kw)

        serial = sample_driffusion(cond_denoiser, x, sigmas, {"shift": shift}, width=3, mode=mode, disable=True,
                                   executor=SerialExecutor(), return_output=True)
        batched = sample_driffusion(cond_denoiser, x, sigmas, {"shift": shift}, width=3, mode=mode, disable=True,
                                    executor=BatchedExecutor(), return_output=True)
        default = sample_driffusion(counting, x, sigmas, {"shift": shift}, width=3, mode=mode, disable=True,
                                    return_output=True)
        assert serial.rounds == batched.rounds == default.rounds == expected_rounds(10, 3, mode)
        torch.testing.assert_close(batched.x, serial.x, rtol=1e-6, atol=1e-6)
        # the default executor is the batched one: one call per round, a round's drafts stacked (3 x 8 rows)
        assert len(rows) == default.rounds and max(rows) == 3 * 8 and sum(rows) == 10 * 8, rows
        assert torch.equal(default.x, batched.x)


def test_runs_without_autograd_like_k_diffusion():
    """k-diffusion's samplers are @torch.no_grad(): a module denoiser keeps no graph of the T calls,
    while a denoiser may still turn gradients on inside (e.g. for guidance)."""
    sigmas = karras_sigmas(6)
    x = _start(sigmas, batch=4)
    scale = torch.nn.Parameter(torch.ones(()))
    inside = []

    def module_like(x, sigma):
        inside.append(torch.is_grad_enabled())
        with torch.enable_grad():
            probe = (scale * x).sum()  # a graph may be built inside
            assert probe.requires_grad
        return scale * denoiser(x, sigma)

    assert torch.is_grad_enabled()
    for width in (1, 3):
        out = sample_driffusion(module_like, x, sigmas, width=width, disable=True)
        assert not out.requires_grad and out.grad_fn is None
    assert inside and not any(inside)
    assert torch.is_grad_enabled()  # restored for the caller


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_callback_follows_k_diffusion(name):
    """Width 1: the same callback dicts as k-diffusion's sampler; wider: every step once, in order."""
    sampler, reference = SAMPLERS[name], REFERENCES[name]
    sigmas = karras_sigmas(8)
    x = _start(sigmas, batch=16)
    seen_ref, seen = [], []
    reference(denoiser, x, sigmas, callback=seen_ref.append)
    sampler(denoiser, x, sigmas, callback=seen.append, width=1, disable=True)
    assert [d["i"] for d in seen] == list(range(8))
    for a, b in zip(seen, seen_ref):
        assert set(a) == set(b) and a["sigma"] == b["sigma"] == a["sigma_hat"]
        torch.testing.assert_close(a["x"], b["x"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(a["denoised"], b["denoised"], rtol=1e-5, atol=1e-4)
    wide = []
    sampler(denoiser, x, sigmas, callback=wide.append, width=3, disable=True)
    assert [d["i"] for d in wide] == list(range(8)) and torch.equal(wide[0]["x"], x)


def test_wide_callback_dicts_are_the_refined_euler_steps():
    """Wider: each dict's denoised is the x0_hat its step used (a draft's, not D at the refined x), so
    sample_euler's update from the dict's x reaches the next dict's x, and the last one the returned sample."""
    sigmas = karras_sigmas(8)
    x = _start(sigmas, batch=4)
    seen = []
    out = sample_driffusion(denoiser, x, sigmas, callback=seen.append, width=3, disable=True)
    assert [d["i"] for d in seen] == list(range(8))
    for d, after in zip(seen, [d["x"] for d in seen[1:]] + [out]):
        i = d["i"]
        euler = d["x"] + (sigmas[i + 1] - sigmas[i]) * (d["x"] - d["denoised"]) / sigmas[i]
        torch.testing.assert_close(euler, after, rtol=1e-5, atol=1e-5)
    # drafts: some steps used an x0_hat made at another state than the refined one
    assert any((d["denoised"] - denoiser(d["x"], d["sigma"] * x.new_ones(4))).abs().max() > 1e-3 for d in seen)


@pytest.mark.parametrize("sampler, at_most", [("euler", 1.0), ("dpmpp_2m", 0.8)])
def test_wide_beats_step_skipping_and_converges(sampler, at_most):
    """Against the serial run (width 1): at 40 Karras steps DRiffusion is closer than the same sampler on the
    coarse grid with the same rounds (by the factor ``at_most``; measured 0.29 to 0.59 for Euler and 0.40 to 0.51
    for 2M, ``python -m benchmarks.kdiffusion_study``), and its gap to serial shrinks as the grid is refined."""
    gaps = []
    coarse = {"euler": VEEulerSkip(VESchedule()),
              "dpmpp_2m": DPMSolverSkip(VESchedule(), prediction="sample", lower_order_final=False)}[sampler]
    sampler = SAMPLERS[sampler]
    for steps in (20, 40):
        sigmas = karras_sigmas(steps)
        x = _start(sigmas)
        serial = sampler(denoiser, x, sigmas, width=1, disable=True)
        for width, mode in ((2, "aggressive"), (4, "aggressive"), (4, "conservative")):
            out = sampler(denoiser, x, sigmas, width=width, mode=mode, disable=True, return_output=True)
            skip = sample_step_skipping(denoiser, x, coarse, sigmas_grid(sigmas), out.rounds)
            if steps == 40:
                assert _rel(out.x, serial) < at_most * _rel(skip.x, serial), (width, mode)
            if (width, mode) == (2, "aggressive"):
                gaps.append(_rel(out.x, serial))
    assert gaps[1] < gaps[0] / 2


def test_ve_skip_composes_and_drafts_are_frozen_euler():
    S = VEEulerSkip(VESchedule(), prediction="epsilon")
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(S(S(x, eps, 10.0, 3.0), eps, 3.0, 0.5), S(x, eps, 10.0, 0.5), rtol=1e-12, atol=1e-12)
    D = VEEulerSkip(VESchedule())  # a denoiser: x0_hat frozen at the anchor means d frozen
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t_from, t_to = torch.tensor([8.0, 5.0, 2.0], dtype=torch.float64), torch.tensor([5.0, 2.0, 0.0], dtype=torch.float64)
    drafts = D.drafts(x, x0, t_from, t_to)
    d = (x - x0) / 8.0
    for j in range(3):
        torch.testing.assert_close(drafts[j], x + (t_to[j] - 8.0) * d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(drafts[-1], x0, rtol=1e-12, atol=1e-12)  # a frozen-x0 jump to sigma = 0 lands on x0


def test_bad_input_says_what_is_wrong():
    x = torch.zeros(2, 2)
    with pytest.raises(InvalidTimestepsError, match="strictly decrease"):
        sample_driffusion(denoiser, x, torch.tensor([1.0, 2.0, 0.0]), disable=True)
    with pytest.raises(InvalidTimestepsError, match="1-D"):
        sample_driffusion(denoiser, x, torch.tensor([[1.0, 0.0]]), disable=True)
    with pytest.raises(InvalidTimestepsError, match="non-negative"):
        sample_driffusion(denoiser, x, torch.tensor([1.0, -1.0]), disable=True)
    with pytest.raises(InvalidArgumentError, match="leading dimension"):
        sample_driffusion(cond_denoiser, x, karras_sigmas(4), {"shift": torch.zeros(3, 2)}, disable=True)
    with pytest.raises(InvalidArgumentError, match="v_prediction"):
        VEEulerSkip(VESchedule(), prediction="v_prediction")


@pytest.mark.parametrize("width", [1, 3])
def test_model_misbehaving_is_caught_as_in_the_scheduler(width):
    """sample_driffusion has the scheduler's guards: a model writing into its input is refused (serial
    and parallel runs would part ways silently), and a model's own error keeps its type and says where."""
    import sys as _sys

    from driffusion_core.errors import PredictorOutputError

    sigmas = karras_sigmas(8)
    x = _start(sigmas, batch=4)

    def in_place(x, sigma):
        return denoiser(x.mul_(0.5), sigma)

    with pytest.raises(PredictorOutputError, match=r"modified its input x in place at step 0"):
        sample_driffusion(in_place, x.clone(), sigmas, width=width, disable=True)

    def broken(x, sigma):
        if float(sigma[0]) < float(sigmas[2]) * 1.0001:
            raise ZeroDivisionError("model fell over")
        return denoiser(x, sigma)

    with pytest.raises(ZeroDivisionError, match="model fell over") as info:  # one call per draft: names the step
        sample_driffusion(broken, x, sigmas, width=width, disable=True, executor=SerialExecutor())
    if _sys.version_info >= (3, 11):
        notes = " ".join(getattr(info.value, "__notes__", []))
        assert "driffusion: raised while evaluating step" in notes and "step 2" in notes, notes

    def broken_row(x, sigma):  # any row at sigmas[2] or below: the default (batched) executor names the round's steps
        if (sigma < float(sigmas[2]) * 1.0001).any():
            raise ZeroDivisionError("model fell over")
        return denoiser(x, sigma)

    with pytest.raises(ZeroDivisionError, match="model fell over") as info:
        sample_driffusion(broken_row, x, sigmas, width=width, disable=True)
    if _sys.version_info >= (3, 11):
        notes = " ".join(getattr(info.value, "__notes__", []))
        first = 2 if width == 1 else 1  # width 3, aggressive: rounds evaluate steps 0, 1..3, ...
        expect = "step 2 " if width == 1 else f"steps {first}..{first + width - 1} "
        assert "driffusion: raised while evaluating" in notes and expect in notes, notes


def test_import_solvers_does_not_import_diffusers():
    code = "import sys, solvers; assert 'diffusers' not in sys.modules, 'solvers imported diffusers'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ve_epsilon_model_steps_with_its_own_output():
    """An epsilon model on the VE schedule: eps_hat is the output itself, x_s = x_t + (s - t) eps (closed
    form), and it steps as the denoiser D = x - sigma eps does (the two parameterizations agree)."""
    g = torch.Generator().manual_seed(1)
    x, eps = (torch.randn(4, 3, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    E, D = VEEulerSkip(VESchedule(), prediction="epsilon"), VEEulerSkip(VESchedule(), prediction="sample")
    for t, s in ((10.0, 4.0), (2.5, 0.0), (0.7, 0.3)):
        torch.testing.assert_close(E(x, eps, t, s), x + (s - t) * eps, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(E(x, eps, t, s), D(x, x - t * eps, t, s), rtol=1e-12, atol=1e-12)


def test_ve_schedule_sigma_max_bounds_the_grid():
    """VESchedule(sigma_max): a grid may start at sigma_max, not above it."""
    S = VEEulerSkip(VESchedule(sigma_max=10.0))
    grid = S.make_grid(torch.tensor([10.0, 5.0], dtype=torch.float64))
    assert grid.t_from.tolist() == [10.0, 5.0] and grid.t_to.tolist() == [5.0, 0.0]
    for too_high in (torch.tensor([20.0, 5.0], dtype=torch.float64), sigmas_grid(torch.tensor([20.0, 5.0, 0.0]))):
        with pytest.raises(InvalidTimestepsError, match="out of range"):
            S.make_grid(too_high)
    assert VEEulerSkip(VESchedule()).make_grid(torch.tensor([1e4, 5.0], dtype=torch.float64)).t_from[0] == 1e4
    # a grid starting at sigma_max: its float32 model time maps back to sigma_max (not a rounding above it)
    schedule = VESchedule(sigma_max=14.6)
    grid = schedule.grid([14.6, 5.0, 1.0])
    assert schedule.level_of_model_time(grid.model_times)[0] == 14.6
    f = MIXTURE.predictor(schedule, "sample")
    from solvers import sample_serial

    x = _start(torch.tensor([14.6]), batch=4, dtype=torch.float64)
    assert torch.isfinite(sample_serial(f, x, VEEulerSkip(schedule), grid).x).all()


@pytest.mark.parametrize("prediction", ["sample", "epsilon"])
def test_ve_x0_transform_sets_the_slope(prediction):
    """With an x0 transform T the VE Euler slope is k-diffusion's to_d of the transformed denoiser output,
    d = (x - T(x0_hat)) / sigma, so x_s = x + (s - t) d; the drafts of a window are the same big steps."""
    from driffusion_core import ClipSample, DynamicThreshold

    g = torch.Generator().manual_seed(4)
    x, out = (torch.randn(5, 3, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    for T in (ClipSample(1.0), DynamicThreshold(0.9, 1.5)):
        tr = VEEulerSkip(VESchedule(), prediction=prediction, x0_transform=T)
        for t, s in ((10.0, 4.0), (2.5, 0.0)):
            x0 = out if prediction == "sample" else x - t * out
            assert not torch.equal(T(x0), x0)  # the transform acts here
            want = x + (s - t) * (x - T(x0)) / t
            torch.testing.assert_close(tr(x, out, t, s), want, rtol=1e-12, atol=1e-12)
            window = tr.drafts(x, out, torch.tensor([t, (t + s) / 2], dtype=torch.float64),
                               torch.tensor([(t + s) / 2, s], dtype=torch.float64))
            torch.testing.assert_close(window[-1], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width", [1, 3])
def test_a_slope_beyond_float16_does_not_overflow_the_step(width):
    """x - D = 1.2e5 lies beyond float16's range, but each Euler step's result (between x and D) does not:
    computed in float32 and rounded once, the sample is the float64 run's to float16's rounding (it was inf
    when computed in the state's dtype)."""
    x = torch.full((2, 3), 6e4, dtype=torch.float16)
    big = lambda x, sigma, **kw: torch.full_like(x, -6e4)  # noqa: E731
    sigmas = torch.tensor([5e4, 2e4, 0.0])
    out = sample_driffusion(big, x, sigmas, width=width, disable=True)
    assert out.dtype == torch.float16
    wide = sample_driffusion(big, x.double(), sigmas, width=width, disable=True)
    torch.testing.assert_close(out.double(), wide, rtol=torch.finfo(torch.float16).eps, atol=0)


@pytest.mark.parametrize("width", [1, 3])
def test_a_state_that_overflows_is_reported(width, monkeypatch):
    """A sample gone inf is refused as every other sampler refuses it (the scheduler on the same grid is the
    reference). A denoiser's Euler steps interpolate between x and D, so finite float16 inputs cannot
    overflow them: the last step's result is made inf here."""
    from driffusion_core import DraftRefineScheduler, SamplingError

    step = VEEulerSkip.__call__

    def overflowing(self, x, pred, t_from, t_to, noise=None):
        out = step(self, x, pred, t_from, t_to, noise)
        return out * math.inf if float(torch.as_tensor(t_to).reshape(-1)[0]) == 0.0 else out

    monkeypatch.setattr(VEEulerSkip, "__call__", overflowing)
    x = torch.full((2, 3), 1.0, dtype=torch.float16)
    den = lambda x, sigma, **kw: 0.5 * x  # noqa: E731
    sigmas = torch.tensor([5.0, 2.0, 0.0])
    with pytest.raises(SamplingError, match="DraftRefineScheduler: the sample holds NaN or inf"):
        DraftRefineScheduler(VEEulerSkip(VESchedule(), prediction="sample"), sigmas_grid(sigmas, x.dtype), width).sample(den, x)
    with pytest.raises(SamplingError, match="sample_driffusion: the sample holds NaN or inf"):
        sample_driffusion(den, x, sigmas, width=width, disable=True)


# ------------------------------------------------------------------------------ DPM-Solver++ 2M


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigmas_kind", ["karras", "ending_above_zero", "linear"])
def test_dpmpp_2m_width1_equals_sample_dpmpp_2m(dtype, sigmas_kind):
    if sigmas_kind == "karras":
        sigmas = karras_sigmas(12, dtype=dtype)
    elif sigmas_kind == "ending_above_zero":
        sigmas = karras_sigmas(12, dtype=dtype)[:-1]  # the last step is 2M, to sigma_min > 0
    else:
        sigmas = torch.linspace(14.6, 0.0, 16, dtype=dtype)
    x = _start(sigmas, dtype=dtype)
    ref = sample_dpmpp_2m_reference(denoiser, x, sigmas)
    euler = sample_euler_reference(denoiser, x, sigmas)
    assert _rel(euler, ref) > 1e-3  # the two samplers differ here: the comparison can tell them apart
    out = sample_driffusion_dpmpp_2m(denoiser, x, sigmas, width=1, disable=True, return_output=True)
    assert out.rounds == out.evals == len(sigmas) - 1
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.x, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_dpmpp_2m_executors_rounds_and_callback():
    """Batched drafts give the serial executor's result in the scheduler's rounds with T calls; wider than 1,
    each callback dict with the one before it gives the 2M step to the next dict's x (its denoised is the x0_hat
    its step used), the last one the returned sample."""
    sigmas = karras_sigmas(10)
    x = _start(sigmas, batch=8)
    shift = torch.linspace(-1, 1, 8)[:, None].expand(8, 2).contiguous()
    for mode in ("aggressive", "conservative"):
        calls = []

        def counting(x, sigma, **kw):
            calls.append(x.shape[0])
            return cond_denoiser(x, sigma, **kw)

        serial = sample_driffusion_dpmpp_2m(cond_denoiser, x, sigmas, {"shift": shift}, width=3, mode=mode,
                                            disable=True, executor=SerialExecutor(), return_output=True)
        batched = sample_driffusion_dpmpp_2m(counting, x, sigmas, {"shift": shift}, width=3, mode=mode,
                                             disable=True, return_output=True)
        assert serial.rounds == batched.rounds == len(calls) == expected_rounds(10, 3, mode)
        assert serial.evals == batched.evals == 10 and sum(calls) == 10 * 8
        torch.testing.assert_close(batched.x, serial.x, rtol=1e-6, atol=1e-6)

    wide = []
    out = sample_driffusion_dpmpp_2m(denoiser, x, sigmas, callback=wide.append, width=3, disable=True)
    assert [d["i"] for d in wide] == list(range(10)) and torch.equal(wide[0]["x"], x)
    for k, (d, after) in enumerate(zip(wide, [d["x"] for d in wide[1:]] + [out])):
        i = d["i"]
        old, prev = (wide[k - 1]["denoised"], sigmas[i - 1]) if k else (None, None)
        replay = dpmpp_2m_update(d["x"], d["denoised"], old, prev, sigmas[i], sigmas[i + 1])
        torch.testing.assert_close(replay, after, rtol=1e-5, atol=1e-5)
    assert any((d["denoised"] - denoiser(d["x"], d["sigma"] * x.new_ones(8))).abs().max() > 1e-3 for d in wide)


def test_dpmpp_2m_bad_input_and_misbehaving_model_are_named():
    x = _start(karras_sigmas(6), batch=4)
    with pytest.raises(InvalidTimestepsError, match="strictly decrease"):
        sample_driffusion_dpmpp_2m(denoiser, x, torch.tensor([1.0, 2.0, 0.0]), disable=True)
    with pytest.raises(InvalidArgumentError, match="leading dimension"):
        sample_driffusion_dpmpp_2m(cond_denoiser, x, karras_sigmas(4), {"shift": torch.zeros(3, 2)}, disable=True)
    from driffusion_core.errors import PredictorOutputError

    nan_late = lambda x, sigma: denoiser(x, sigma) * (math.nan if float(sigma[0]) < 1.0 else 1.0)  # noqa: E731
    with pytest.raises(PredictorOutputError, match="NaN"):
        sample_driffusion_dpmpp_2m(nan_late, x, karras_sigmas(6), width=2, disable=True)


def sample_euler_ancestral_reference(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None):
    """k-diffusion's sample_euler_ancestral: get_ancestral_step (sigma_up = min(sigma_next, eta sqrt(sigma_next^2
    (sigma^2 - sigma_next^2) / sigma^2)), sigma_down = sqrt(sigma_next^2 - sigma_up^2)), then
    x <- x + d (sigma_down - sigma) and, unless sigma_next = 0, x <- x + noise_sampler(sigma, sigma_next) s_noise sigma_up
    (default noise: torch.randn_like(x), drawn after the step's model call)."""
    noise_sampler = noise_sampler or (lambda sigma, sigma_next: torch.randn_like(x))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_up = min(sigmas[i + 1], eta * (sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) / sigmas[i] ** 2) ** 0.5)
        sigma_down = (sigmas[i + 1] ** 2 - sigma_up**2) ** 0.5
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eta, s_noise", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_ancestral_width1_equals_sample_euler_ancestral(dtype, eta, s_noise):
    """Width 1 with k-diffusion's default noise (torch.randn_like from the global generator, one draw per step
    in order) and the same seed is sample_euler_ancestral, and leaves the generator where k-diffusion does (at
    eta = 0 too, where k-diffusion draws and multiplies by 0); so is a custom noise_sampler's sequence."""
    sigmas = karras_sigmas(12, dtype=dtype)
    x = _start(sigmas, dtype=dtype)
    torch.manual_seed(3)
    ref = sample_euler_ancestral_reference(denoiser, x, sigmas, eta, s_noise)
    after_ref = torch.rand(4)
    torch.manual_seed(3)
    out = sample_driffusion_ancestral(denoiser, x, sigmas, eta=eta, s_noise=s_noise, width=1, disable=True,
                                      return_output=True)
    assert torch.equal(torch.rand(4), after_ref), "the global generator ends elsewhere than k-diffusion's"
    assert out.rounds == out.evals == len(sigmas) - 1
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.x, ref, rtol=tol, atol=tol * ref.abs().max().item())
    fixed = {}
    sampler = lambda s, s_next: fixed.setdefault(float(s), torch.sin(float(s) * torch.arange(x.numel(), dtype=dtype)).reshape(x.shape))  # noqa: E731
    ref = sample_euler_ancestral_reference(denoiser, x, sigmas, eta, s_noise, sampler)
    out = sample_driffusion_ancestral(denoiser, x, sigmas, eta=eta, s_noise=s_noise, noise_sampler=sampler, width=1, disable=True)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_ancestral_drafts_rounds_and_executors():
    """The drafts are the one-level ancestral chain with x0_hat frozen and each step's own noise; the rounds
    are the scheduler's closed form, the model calls T, and the batched executor gives the serial one's result."""
    tr = VEAncestralSkip(VESchedule(), eta=0.7)
    levels = torch.tensor([9.0, 4.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    x, p = NoiseSource(1).initial((6, 2), torch.float64) * 9, NoiseSource(2).initial((6, 2), torch.float64)
    zs = NoiseSource(3).steps(0, 4, (6, 2), torch.float64)
    drafts, y = tr.drafts(x, p, levels[:-1], levels[1:], zs), x
    for k in range(4):
        y = tr(y, p, levels[k], levels[k + 1], zs[k])  # a sample prediction: x0_hat frozen is p itself
        torch.testing.assert_close(drafts[k], y, rtol=1e-12, atol=1e-12)
    sigmas = karras_sigmas(20)
    x = _start(sigmas, batch=16)
    for mode in ("aggressive", "conservative"):
        outs = [sample_driffusion_ancestral(denoiser, x, sigmas, width=3, mode=mode, executor=ex, noise=NoiseSource(5),
                                            disable=True, return_output=True)
                for ex in (SerialExecutor(), BatchedExecutor())]
        assert outs[0].rounds == expected_rounds(20, 3, mode) and outs[0].evals == 20
        torch.testing.assert_close(outs[1].x, outs[0].x, rtol=1e-5, atol=1e-5)


def test_ancestral_converges_and_beats_step_skipping_below_eta_one():
    """Against its own serial run (same NoiseSource): the gap at width 2 shrinks as the Karras grid is refined
    (eta 1 and 0.5), and at eta = 0.5 and 40 steps DRiffusion is closer than step skipping at the same rounds
    (``python -m benchmarks.kdiffusion_study``, batch 2000: 0.45 to 0.63). At eta = 1 it is not (0.85 to 1.10):
    a drafted prediction moves a path that full ancestral noise makes chaotic onto a neighbouring one, as with DDPM."""
    for eta in (1.0, 0.5):
        gaps = []
        for steps in (20, 40):
            sigmas = karras_sigmas(steps)
            x = _start(sigmas)
            serial = sample_driffusion_ancestral(denoiser, x, sigmas, eta=eta, width=1, noise=NoiseSource(7), disable=True)
            for width, mode in ((2, "aggressive"), (4, "aggressive"), (4, "conservative")):
                if steps == 20 and width == 4:
                    continue
                out = sample_driffusion_ancestral(denoiser, x, sigmas, eta=eta, width=width, mode=mode,
                                                  noise=NoiseSource(7), disable=True, return_output=True)
                if width == 2:
                    gaps.append(_rel(out.x, serial))
                if eta < 1 and steps == 40:
                    skip = sample_step_skipping(denoiser, x, VEAncestralSkip(VESchedule(), eta=eta), sigmas_grid(sigmas),
                                                out.rounds, noise=NoiseSource(7))
                    assert _rel(out.x, serial) < 0.8 * _rel(skip.x, serial), (width, mode)
        assert gaps[1] < 0.8 * gaps[0], (eta, gaps)


def test_ancestral_bad_input_is_named_before_any_model_call():
    calls = []

    def model(x, sigma):
        calls.append(1)
        return 0 * x

    sigmas, x = karras_sigmas(6), _start(karras_sigmas(6), batch=4)
    for kwargs, message in (
        (dict(eta=1.5), "eta must be a number in \\[0, 1\\]"),
        (dict(s_noise=-1.0), "s_noise must be a finite number >= 0"),
        (dict(noise=NoiseSource(0), noise_sampler=lambda s, n: torch.randn_like(x)), "not both"),
        (dict(noise_sampler=3), "noise_sampler must be a function"),
        (dict(noise_sampler=lambda s, n: torch.zeros(3)), "must return a finite real tensor shaped like x"),
        (dict(noise=7), "noise must be a NoiseSource"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            sample_driffusion_ancestral(model, x, sigmas, disable=True, **kwargs)
    with pytest.raises(InvalidTimestepsError, match="strictly decrease"):
        sample_driffusion_ancestral(model, x, torch.tensor([1.0, 2.0, 0.0]), disable=True)
    drawn = []
    with pytest.raises(InvalidWidthError, match="width"):  # refused before any noise is drawn
        sample_driffusion_ancestral(model, x, sigmas, width=0, noise_sampler=lambda s, n: drawn.append(1) or torch.randn_like(x))
    assert calls == [] and drawn == []


def test_ancestral_noise_sampler_refilling_one_buffer():
    """A noise_sampler that refills one tensor in place (buf.normal_()) gives each step its own draw: width 1 is
    k-diffusion's loop with the same sampler."""
    sigmas = karras_sigmas(10, dtype=torch.float64)
    x = _start(sigmas, batch=8, dtype=torch.float64)

    def refilling(seed):
        g, buf = torch.Generator().manual_seed(seed), torch.empty_like(x)
        return lambda s, s_next: buf.normal_(generator=g)

    ref = sample_euler_ancestral_reference(denoiser, x, sigmas, noise_sampler=refilling(4))
    out = sample_driffusion_ancestral(denoiser, x, sigmas, noise_sampler=refilling(4), width=1, disable=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_sigmas_grid_is_refused_by_a_vp_or_flow_transition():
    """sigmas_grid's levels are VE sigmas (kind "ve"): a VP / flow transition handed them is refused (they were
    read as training timesteps or flow times, a finite but meaningless sample); VE transitions take it."""
    from driffusion_core import FlowSchedule, VPSchedule
    from solvers import DDIMSkip, DPMSolverSkip, FlowEulerSkip, sample_serial

    grid = sigmas_grid(torch.tensor([14.6, 3.0, 0.5, 0.0]))
    assert grid.kind == VESchedule.kind
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    for tr in (DPMSolverSkip(VPSchedule.linear()), DDIMSkip(VPSchedule.linear()), FlowEulerSkip(FlowSchedule())):
        with pytest.raises(InvalidTimestepsError, match="'ve' levels"):
            sample_serial(lambda x, t: x, x, tr, grid)
    assert torch.isfinite(sample_serial(lambda x, t: 0.5 * x, x, VEEulerSkip(VESchedule()), grid).x).all()

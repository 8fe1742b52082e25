"""Multistep transitions (DPM-Solver++ 2M; UniPC in the shared tests below and in tests/test_unipc.py) in the
draft-and-refine scheduler.

* The 2M step with a frozen prediction (previous x0_hat == this one) is the first-order step, and
  the first-order step is DDIM (eta = 0).
* ``drafts(..., history=...)``: row 0 is the serial 2M step bit for bit; row j is the chain of
  j+1 serial steps with the anchor's x0_hat frozen (each later step a 2M step too).
* Width 1 reproduces ``sample_serial`` exactly in both modes; rounds and evals follow the closed
  forms; every executor gives the serial executor's result; step skipping at R == T is the serial
  sampler.
* Where the order drops to one: the first step, the last on short grids (``lower_order_final``),
  always with ``euler_at_final``, and every step to sigma = 0.
* On the exact Gaussian-mixture oracle DRiffusion is well below the step-skipping baseline.
* Bad settings are refused with a message.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from backends import BatchedExecutor, SerialExecutor
from driffusion_core import DraftRefineScheduler, FlowSchedule, NoiseSource, TimeGrid, VPSchedule
from driffusion_core import coefficients as C
from driffusion_core.errors import InvalidArgumentError
from solvers import (
    DDIMSkip, DPMSolverSkip, FlowEulerSkip, GaussianMixture, UniPCSkip, ring_mixture, sample_serial, sample_step_skipping,
)

from _metrics import one_torch_thread, ulp  # noqa: F401  (one_torch_thread: autouse fixture)

F64 = torch.float64
MODES = ["aggressive", "conservative"]
VP = VPSchedule.linear()
FLOW = FlowSchedule(shift=3.0)
PREDICTIONS = ("epsilon", "sample", "v_prediction")


def randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def consistent_prediction(tr, x0_hat: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """The model output at (x, t) whose x0_hat is ``x0_hat``."""
    alpha, sigma = tr.schedule.alpha_sigma(torch.tensor(t, dtype=F64))
    c_x0, c_eps = C.prediction_coefficients(tr.prediction.value, alpha, sigma)
    return c_x0 * x0_hat + c_eps * (x - alpha * x0_hat) / sigma


@st.composite
def window(draw, n_max: int = 5):
    """(previous level, the window's n+1 decreasing levels): training timesteps in [1, 999] then a target."""
    n = draw(st.integers(1, n_max))
    vals = draw(st.lists(st.integers(0, 999), min_size=n + 2, max_size=n + 2, unique=True))
    levels = sorted((float(v) for v in vals), reverse=True)
    if draw(st.booleans()):
        levels[-1] = -1.0  # to the clean end (sigma = 0)
    return torch.tensor(levels, dtype=F64)


# --------------------------------------------------------------------------- the step


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_2m_with_a_frozen_prediction_is_the_first_order_step_which_is_ddim(solver_type, prediction, data):
    levels = data.draw(window(1))
    t_p, t_s, t_t = levels[0], levels[1], levels[2]
    if float(t_t) == -1.0:
        reject()  # the step to sigma = 0 is always first order (history_at), and lambda_t = inf there
    tr = DPMSolverSkip(VP, prediction, solver_type=solver_type)
    seed = data.draw(st.integers(0, 2**31))
    x0, x, x_p = randn(4, 3, seed=seed), randn(4, 3, seed=seed + 1), randn(4, 3, seed=seed + 2)
    p = consistent_prediction(tr, x0, x, float(t_s))
    p_prev = consistent_prediction(tr, x0, x_p, float(t_p))  # the same x0_hat at the previous step
    two = tr.multistep(x, p, t_s, t_t, [(x_p, p_prev, t_p)])
    one = tr(x, p, t_s, t_t)
    ddim = DDIMSkip(VP, prediction)(x, p, t_s, t_t)
    scale = 1 + float(max(v.abs().max() for v in (x, x0, p)))
    assert (two - one).abs().max() <= 1e-9 * scale
    assert (one - ddim).abs().max() <= 1e-9 * scale


@pytest.mark.parametrize("prediction", PREDICTIONS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_low_precision_2m_step_and_drafts_are_the_float64_ones_rounded_once(prediction, data):
    """A float16 / bfloat16 2M step (and the drafts after it) is computed in float32 and rounded once: on the
    same low-precision inputs it is the float64 one rounded to the dtype, within one unit in the last place
    (plus float32's rounding of the terms), as diffusers' step upcasts to float32."""
    levels = data.draw(window(3))
    t_prev, t_from, t_to = levels[0], levels[1:-1], levels[2:]
    tr = DPMSolverSkip(VP, prediction, lower_order_final=False)
    seed = data.draw(st.integers(0, 2**31))
    for dtype in (torch.float16, torch.bfloat16):
        x, p, x_p, p_p = (randn(64, 3, seed=seed + k).to(dtype) for k in range(4))
        wide = [v.to(F64) for v in (x, p, x_p, p_p)]
        out = tr.drafts(x, p, t_from, t_to, history=[(x_p, p_p, t_prev)])
        ref = tr.drafts(wide[0], wide[1], t_from, t_to, history=[(wide[2], wide[3], t_prev)])
        assert out.dtype == dtype
        spacing = ulp(ref, dtype)
        x0s = [tr.to_x0_eps(wide[2 * k], wide[2 * k + 1], t)[0] for k, t in ((0, t_from[0]), (1, t_prev))]
        slack = 1e-5 * (1 + float(max(v.abs().max() for v in wide + x0s)))
        err = (out[0].to(F64) - ref[0]).abs() - spacing[0]  # the serial step, from the same inputs
        assert err.max() <= slack, f"{dtype}: the 2M step is {float((err / spacing[0]).max()) + 1:.2f} ulp off"
        # later drafts continue from the rounded row 0: half an ulp of it more, carried by sigma_t / sigma_s <= 1
        err = (out[1:].to(F64) - ref[1:]).abs() - 1.5 * spacing[1:]
        assert len(err) == 0 or err.max() <= slack + 0.5 * float(spacing[0].max()), f"{dtype}: a draft is off by more"


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_drafts_are_the_chain_with_x0_frozen_and_row0_is_the_serial_step(solver_type, prediction, data):
    levels = data.draw(window())
    t_prev, t_from, t_to = levels[0], levels[1:-1], levels[2:]
    n = int(t_from.shape[0])
    tr = DPMSolverSkip(VP, prediction, solver_type=solver_type, lower_order_final=False)
    seed = data.draw(st.integers(0, 2**31))
    x, p, x_p, p_p = (randn(3, 2, seed=seed + k) for k in range(4))
    history = [(x_p, p_p, t_prev)]
    drafts = tr.drafts(x, p, t_from, t_to, history=history)
    assert drafts.shape == (n, 3, 2)
    assert torch.equal(drafts[0], tr.multistep(x, p, t_from[0], t_to[0], history)), "row 0 is not the serial step"
    # the chain: every step a serial step (2M where it can be), the prediction at each new state the one
    # meaning the anchor's x0_hat
    grid = TimeGrid(torch.cat([levels[:1], t_from]), torch.cat([levels[1:2], t_to]), torch.cat([levels[:1], t_from]))
    x0_hat = tr.to_x0_eps(x, p, t_from[0])[0]
    hist, y, pk = history, x, p
    for k in range(n):
        y_next = tr.grid_step(y, pk, grid, k + 1, hist)
        hist = [(y, pk, t_from[k])]
        y = y_next
        scale = 1 + float(max(v.abs().max() for v in (x, p, x0_hat, x_p, p_p)))
        err = float((drafts[k] - y).abs().max())
        assert err <= 1e-8 * scale, f"draft {k} differs from the chain by {err:.3g} over levels {levels.tolist()}"
        if k + 1 < n:
            pk = consistent_prediction(tr, x0_hat, y, float(t_from[k + 1]))


def test_where_the_order_drops_to_one():
    long, short = VP.timesteps(20, "trailing"), VP.timesteps(10, "trailing")
    tr = DPMSolverSkip(VP)
    assert [tr.history_at(long, i) for i in range(20)] == [0] + [1] * 18 + [0]  # to sigma = 0 at the end
    ends_above_zero = TimeGrid(long.t_from[:-1], long.t_to[:-1], long.model_times[:-1])
    assert tr.history_at(ends_above_zero, 18) == 1  # 19 steps >= 15: the last step stays second order ...
    assert DPMSolverSkip(VP, euler_at_final=True).history_at(ends_above_zero, 18) == 0  # ... unless euler_at_final
    short_above_zero = TimeGrid(short.t_from[:-1], short.t_to[:-1], short.model_times[:-1])
    assert tr.history_at(short_above_zero, 8) == 0  # lower_order_final on fewer than 15 steps
    assert DPMSolverSkip(VP, lower_order_final=False).history_at(short_above_zero, 8) == 1
    for n, order in ((15, 1), (14, 0)):  # diffusers: lower_order_final applies to len(timesteps) < 15 only
        g = VP.timesteps(n + 1, "trailing")
        above_zero = TimeGrid(g.t_from[:-1], g.t_to[:-1], g.model_times[:-1])
        assert len(above_zero) == n and tr.history_at(above_zero, n - 1) == order, n
    assert all(DPMSolverSkip(VP, order=1).history_at(long, i) == 0 for i in range(20))


def test_order_one_samples_as_ddim():
    f = ring_mixture(4).predictor(VP, "epsilon")
    x = NoiseSource(3).initial((16, 2), F64)
    grid = VP.timesteps(12, "trailing")
    a = sample_serial(f, x, DPMSolverSkip(VP, order=1), grid).x
    b = sample_serial(f, x, DDIMSkip(VP), grid).x
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(sample_serial(f, x, DPMSolverSkip(VP), grid).x, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- in the scheduler

SETUPS = [
    pytest.param(DPMSolverSkip(VP), VP.timesteps(20, "trailing"), "epsilon", id="2m-midpoint-20"),
    pytest.param(DPMSolverSkip(VP, "v_prediction", solver_type="heun"), VP.timesteps(9, "linspace"), "v_prediction",
                 id="2m-heun-v-9"),
    pytest.param(DPMSolverSkip(VP, "sample", lower_order_final=False), VP.timesteps(7, "leading", step_to="stride"),
                 "sample", id="2m-sample-stride"),
    pytest.param(DPMSolverSkip(FLOW, "velocity"), FLOW.timesteps(16), "velocity", id="2m-flow"),
    pytest.param(UniPCSkip(VP), VP.timesteps(20, "trailing"), "epsilon", id="unipc-bh2-20"),
    pytest.param(UniPCSkip(VP, "v_prediction", solver_type="bh1"), VP.timesteps(9, "linspace"), "v_prediction",
                 id="unipc-bh1-v-9"),
    pytest.param(UniPCSkip(VP, "sample", order=1), VP.timesteps(7, "leading", step_to="stride"), "sample",
                 id="unipc-order1-sample-stride"),
    pytest.param(UniPCSkip(FLOW, "velocity"), FLOW.timesteps(16), "velocity", id="unipc-flow"),
]


@pytest.mark.parametrize("transition,grid,prediction", SETUPS)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_width_one_reproduces_sample_serial_exactly(transition, grid, prediction, dtype, mode):
    f = ring_mixture(4).predictor(transition.schedule, prediction)
    x = NoiseSource(0).initial((5, 2), dtype)
    ref = sample_serial(f, x, transition, grid, return_trajectory=True)
    assert ref.x.dtype == dtype and torch.isfinite(ref.x).all()
    for executor in (SerialExecutor(), BatchedExecutor()):
        out = DraftRefineScheduler(transition, grid, width=1, mode=mode).sample(f, x, executor=executor, return_trajectory=True)
        assert out.x.dtype == dtype and torch.equal(out.x, ref.x)
        assert all(torch.equal(a, b) for a, b in zip(out.trajectory, ref.trajectory))


class Recording:
    def __init__(self, f):
        self.f, self.calls, self.rows = f, 0, 0

    def __call__(self, x, t):
        self.calls += 1
        self.rows += x.shape[0]
        return self.f(x, t)


@pytest.mark.parametrize("make", [DPMSolverSkip, UniPCSkip], ids=["2m", "unipc"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,n", [(1, 3), (2, 2), (7, 3), (15, 4), (20, 6)])
def test_rounds_evals_and_executors(T, n, mode, make):
    tr = make(VP)
    grid = VP.timesteps(T, "trailing")
    f = ring_mixture(4).predictor(VP, "epsilon")
    x = NoiseSource(1).initial((3, 2))
    sched = DraftRefineScheduler(tr, grid, width=n, mode=mode)
    rec = Recording(f)
    out = sched.sample(rec, x, executor=BatchedExecutor())
    assert out.rounds == rec.calls == sched.expected_rounds() and out.evals == T and rec.rows == 3 * T
    ref = sched.sample(f, x, executor=SerialExecutor())
    torch.testing.assert_close(out.x, ref.x, rtol=1e-5, atol=1e-6)
    for ex in (BatchedExecutor(max_batch=2), BatchedExecutor(max_batch=5)):
        torch.testing.assert_close(sched.sample(f, x, executor=ex).x, ref.x, rtol=1e-5, atol=1e-6)


def test_step_skipping_at_every_level_is_the_serial_sampler():
    tr, grid = DPMSolverSkip(VP), VP.timesteps(12, "trailing")
    f = ring_mixture(4).predictor(VP, "epsilon")
    x = NoiseSource(2).initial((6, 2), F64)
    assert torch.equal(sample_step_skipping(f, x, tr, grid, 12).x, sample_serial(f, x, tr, grid).x)


@pytest.mark.parametrize("make", [lambda: (DDIMSkip(VP), VP.timesteps(23, "trailing", step_to="stride")),
                                  lambda: (FlowEulerSkip(FlowSchedule(shift=3.0)), FlowSchedule(shift=3.0).timesteps(23)),
                                  lambda: (DPMSolverSkip(VP), VP.timesteps(23, "trailing"))],
                         ids=["ddim", "flow", "dpm-2m"])
def test_step_skipping_is_the_serial_sampler_on_evenly_spread_levels(make):
    """The baseline at R < T rounds: the serial sampler on R + 1 evenly spread fine-grid indices
    (round(linspace(0, T, R + 1)), gaps differing by at most one), built here from the grid directly."""
    tr, grid = make()
    f = ring_mixture(4).predictor(tr.schedule, tr.prediction.value)
    x = NoiseSource(3).initial((6, 2), F64)
    T = len(grid)
    for R in (1, 2, 5, 7, 12, 22):
        idx = [round(T * k / R) for k in range(R + 1)]
        gaps = [b - a for a, b in zip(idx[:-1], idx[1:])]
        assert idx[0] == 0 and idx[-1] == T and min(gaps) >= 1 and max(gaps) - min(gaps) <= 1
        starts, ends = torch.tensor(idx[:-1]), torch.tensor(idx[1:]) - 1
        coarse = TimeGrid(grid.t_from[starts], grid.t_to[ends], grid.model_times[starts], grid.kind)
        out = sample_step_skipping(f, x, tr, grid, R)
        assert out.rounds == out.evals == R
        torch.testing.assert_close(out.x, sample_serial(f, x, tr, coarse).x, rtol=0, atol=1e-12)


# (width, mode) -> the largest DRiffusion / step skipping RMSE ratio allowed, for (epsilon, sample) prediction
ORACLE_BOUNDS = {
    # 2M, measured: 0.14 and 0.22 (epsilon), 0.29 and 0.53 (sample)
    "2m": {(2, "aggressive"): (0.7, 0.7), (4, "aggressive"): (0.7, 0.7)},
    # UniPC, measured: epsilon 0.19 / 0.20 aggressive and 0.31 conservative; sample 0.28 / 0.44 and 0.81: like
    # 2M, the multistep update extrapolates from a drafted x0_hat in a refined window, and conservative mode
    # gains little there
    "unipc": {(2, "aggressive"): (0.6, 0.6), (4, "aggressive"): (0.6, 0.6), (4, "conservative"): (0.5, 0.95)},
}


@pytest.mark.parametrize("name,make", [("2m", DPMSolverSkip), ("unipc", UniPCSkip)], ids=["2m", "unipc"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_driffusion_beats_step_skipping_on_the_oracle(prediction, name, make):
    """50 steps on the exact mixture oracle: DRiffusion's RMSE to the serial output is well below step skipping's
    at the same rounds (the same solver on the coarse grid), by the bounds of ORACLE_BOUNDS."""
    mix = GaussianMixture(torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=F64), 0.05)
    f = mix.predictor(VP, prediction)
    tr = make(VP, prediction)
    grid = VP.timesteps(50, "trailing")
    x = NoiseSource(0).initial((256, 2), F64)
    ref = sample_serial(f, x, tr, grid).x
    rmse = lambda a: float((a - ref).pow(2).mean().sqrt())  # noqa: E731
    for (n, mode), bounds in ORACLE_BOUNDS[name].items():
        out = DraftRefineScheduler(tr, grid, width=n, mode=mode).sample(f, x, executor=BatchedExecutor())
        base = sample_step_skipping(f, x, tr, grid, out.rounds)
        bound = bounds[PREDICTIONS.index(prediction)]
        assert rmse(out.x) < bound * rmse(base.x), (n, mode, rmse(out.x), rmse(base.x))


# --------------------------------------------------------------------------- errors


def test_bad_settings_are_refused():
    with pytest.raises(InvalidArgumentError, match="order"):
        DPMSolverSkip(VP, order=3)
    with pytest.raises(InvalidArgumentError, match="solver_type"):
        DPMSolverSkip(VP, solver_type="bh2")
    tr = DPMSolverSkip(VP)
    x = torch.zeros(2, 3)
    with pytest.raises(InvalidArgumentError, match="previous step"):
        tr.multistep(x, x, 500.0, 400.0, [])
    with pytest.raises(InvalidArgumentError, match="one-step"):
        DDIMSkip(VP).drafts(x, x, torch.tensor([500.0]), torch.tensor([400.0]), history=[(x, x, 600.0)])
    with pytest.raises(InvalidArgumentError, match="previous step's state"):
        tr.multistep(x, x, 500.0, 400.0, [(x.double(), x.double(), 600.0)])
    with pytest.raises(InvalidArgumentError, match="order"):
        tr.order = 3
    tr.order = 1  # settable, and history follows
    assert tr.history == 0 and DPMSolverSkip(VP).history == 1
    with pytest.raises(InvalidArgumentError, match="solver_type"):
        tr.solver_type = "bh2"


def test_a_previous_level_not_above_t_from_is_refused():
    """A multistep divides by the previous step's length: a history level equal to t_from (h_prev = 0) is refused
    by name (it gave NaN), for 2M and for UniPC's corrector (t_prev = t_from, and t_pp = t_prev)."""
    from driffusion_core.errors import InvalidTimestepsError

    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    for tr, history in ((DPMSolverSkip(VP), [(x, x, 500.0)]), (UniPCSkip(VP), [(x, x, 600.0), (x, x, 500.0)]),
                        (UniPCSkip(VP), [(x, x, 600.0), (x, x, 600.0)])):
        with pytest.raises(InvalidTimestepsError, match="equals the previous level .*, so it does not lie below it"):
            tr.multistep(x, x, 500.0, 400.0, history)
    # strictly above: finite
    assert torch.isfinite(DPMSolverSkip(VP).multistep(x, x, 500.0, 400.0, [(x, x, 600.0)])).all()


def test_unipc_final_level_is_checked():
    """final_level: one finite level of the schedule's range (it was a bare float(): 'abc' and a 2-element tensor
    raised ValueError, NaN silently disabled lower_order_final, 5000 and True were taken)."""
    for bad, words in (("abc", "one finite number"), (torch.tensor([1.0, 2.0]), "one finite number"),
                       (float("nan"), "one finite number"), (True, "one finite number"), (5000.0, "outside")):
        with pytest.raises(InvalidArgumentError, match=words):
            UniPCSkip(VP, final_level=bad)
    assert UniPCSkip(VP, final_level=torch.tensor(-1.0)).final_level == -1.0
    tr = UniPCSkip(VP)
    with pytest.raises(InvalidArgumentError, match="outside"):
        tr.final_level = 1000.0
    tr.final_level = None


def test_unipc_bh1_from_alpha_zero_is_refused():
    """UniPC bh1's corrector multiplies by B(h) = h, infinite after a step from alpha = 0 (flow's sigma = 1): the
    grid is refused by name (it gave NaN, reported as an overflow) unless nothing combines that step; bh2 and a
    grid starting below sigma = 1 sample."""
    flow = FlowSchedule()
    predictor = lambda x, t: -x  # noqa: E731
    x = NoiseSource(0).initial((4, 3))
    for order in (1, 2):
        with pytest.raises(InvalidArgumentError, match="bh1.*alpha = 0.*solver_type='bh2'"):
            DraftRefineScheduler(UniPCSkip(flow, "velocity", order, "bh1"), flow.timesteps(12))
    out = sample_serial(predictor, x, UniPCSkip(flow, "velocity", 2, "bh2"), flow.timesteps(12))
    assert torch.isfinite(out.x).all()
    below = flow.grid(torch.linspace(0.95, 0.05, 12, dtype=torch.float64))
    out = sample_serial(predictor, x, UniPCSkip(flow, "velocity", 2, "bh1"), below)
    assert torch.isfinite(out.x).all()
    DraftRefineScheduler(UniPCSkip(flow, "velocity", 2, "bh1"), flow.timesteps(1))  # one step: no corrector


def test_a_state_started_mid_grid_needs_the_history_before():
    from driffusion_core import DraftRefineState

    tr, grid = DPMSolverSkip(VP), VP.timesteps(20, "trailing")
    f = ring_mixture(4).predictor(VP, "epsilon")
    x = NoiseSource(0).initial((4, 2), F64)
    ref = sample_serial(f, x, tr, grid, return_trajectory=True)
    with pytest.raises(InvalidArgumentError, match="history"):
        DraftRefineState(tr, grid, 2, "aggressive", ref.trajectory[5], None, start=5)
    with pytest.raises(InvalidArgumentError, match="history"):  # the wrong level
        DraftRefineState(tr, grid, 2, "aggressive", ref.trajectory[5], None, start=5,
                         history=[(ref.trajectory[2], ref.trajectory[2], grid.t_from[2])])
    p4 = f(ref.trajectory[4], grid.model_times[4:5].expand(4))
    st = DraftRefineState(tr, grid, 1, "aggressive", ref.trajectory[5], None, start=5,
                          history=[(ref.trajectory[4], p4, grid.t_from[4])])
    while (rnd := st.plan()) is not None:
        st.absorb(rnd, torch.stack([f(xk, grid.model_times[k : k + 1].expand(4)) for xk, k in zip(rnd.xs, rnd.steps)]))
    assert torch.equal(st.x, ref.x)


def test_2m_under_inference_mode_equals_grad_mode():
    f = ring_mixture(4).predictor(VP, "epsilon")
    grid = VP.timesteps(10, "trailing")
    x = NoiseSource(0).initial((4, 2))
    ref = DraftRefineScheduler(DPMSolverSkip(VP), grid, width=3).sample(f, x).x
    with torch.inference_mode():
        assert torch.equal(sample_serial(f, x, DPMSolverSkip(VP), grid).x,
                           sample_serial(f, x.clone(), DPMSolverSkip(VP), grid).x)
        out = DraftRefineScheduler(DPMSolverSkip(VP), grid, width=3).sample(f, x).x
    assert torch.equal(out, ref)


def test_remembered_x0_forgets_a_changed_setting():
    tr = DPMSolverSkip(VP, "sample")
    x, p = randn(3, 2, seed=1), randn(3, 2, seed=2)
    tr.multistep(x, p, 500.0, 400.0, [(randn(3, 2, seed=3), randn(3, 2, seed=4), 600.0)])
    y, q = randn(3, 2, seed=5), randn(3, 2, seed=6)
    from driffusion_core import ClipSample

    tr.x0_transform = ClipSample(0.1)
    fresh = DPMSolverSkip(VP, "sample", x0_transform=ClipSample(0.1))
    assert torch.equal(tr.multistep(y, q, 400.0, 300.0, [(x, p, 500.0)]), fresh.multistep(y, q, 400.0, 300.0, [(x, p, 500.0)]))


def test_remembered_x0_is_not_stale_after_an_in_place_change():
    """The 2M step reuses the previous step's x0_hat only for the very same, unmodified tensors."""
    tr, fresh = DPMSolverSkip(VP), DPMSolverSkip(VP)
    x, p = randn(3, 2, seed=1), randn(3, 2, seed=2)
    tr.multistep(x, p, 500.0, 400.0, [(randn(3, 2, seed=3), randn(3, 2, seed=4), 600.0)])
    y, q = randn(3, 2, seed=5), randn(3, 2, seed=6)
    before = tr.multistep(y, q, 400.0, 300.0, [(x, p, 500.0)])
    assert torch.equal(before, fresh.multistep(y, q, 400.0, 300.0, [(x, p, 500.0)]))
    x.mul_(2.0)  # a caller reusing its buffer
    after = tr.multistep(y, q, 400.0, 300.0, [(x, p, 500.0)])
    assert torch.equal(after, DPMSolverSkip(VP).multistep(y, q, 400.0, 300.0, [(x, p, 500.0)]))
    assert not torch.equal(after, before)


def test_remembered_x0_is_only_used_at_its_own_level():
    """The x0_hat remembered from a step is for that step's level: the same tensors coming back as history at
    another level are converted there (an x0_hat depends on the level), as a fresh transition does."""
    tr = DPMSolverSkip(VP)
    x, p = randn(3, 2, seed=1), randn(3, 2, seed=2)
    tr.multistep(x, p, 500.0, 400.0, [(randn(3, 2, seed=3), randn(3, 2, seed=4), 600.0)])  # remembers (x, p) at 500
    y, q = randn(3, 2, seed=5), randn(3, 2, seed=6)
    got = tr.multistep(y, q, 400.0, 300.0, [(x, p, 450.0)])
    assert torch.equal(got, DPMSolverSkip(VP).multistep(y, q, 400.0, 300.0, [(x, p, 450.0)]))
    assert not torch.equal(got, DPMSolverSkip(VP).multistep(y, q, 400.0, 300.0, [(x, p, 500.0)]))


def test_transition_lets_go_of_the_batch_after_sampling():
    """The x0_hat memo holds the states weakly: once a sampler returns, the transition keeps no batch tensor
    (a GPU batch would otherwise stay allocated for as long as the transition lives); copies carry no memo."""
    import copy
    import gc
    import pickle

    f = ring_mixture(4).predictor(VP, "epsilon")
    grid = VP.timesteps(12, "trailing")
    x = NoiseSource(0).initial((5, 2), dtype=F64)
    for run in (lambda tr: sample_serial(f, x, tr, grid),
                lambda tr: DraftRefineScheduler(tr, grid, width=3).sample(f, x)):
        tr = DPMSolverSkip(VP)
        out = run(tr)
        gc.collect()
        assert "_x0_memo" not in tr.__dict__
        assert not [v for v in vars(tr).values() if isinstance(v, torch.Tensor) and v.shape[:1] == (5,)]
        again = run(DPMSolverSkip(VP))
        assert torch.equal(again.x, out.x)
    tr = DPMSolverSkip(VP)
    a, p = randn(3, 2, seed=1), randn(3, 2, seed=2)
    tr.multistep(a, p, 500.0, 400.0, [(randn(3, 2, seed=3), randn(3, 2, seed=4), 600.0)])
    assert "_x0_memo" in tr.__dict__  # alive while its inputs are
    for twin in (copy.deepcopy(tr), pickle.loads(pickle.dumps(tr))):
        assert "_x0_memo" not in twin.__dict__ and twin.order == tr.order
        y, q = randn(3, 2, seed=5), randn(3, 2, seed=6)
        assert torch.equal(twin.multistep(y, q, 400.0, 300.0, [(a, p, 500.0)]),
                           tr.multistep(y, q, 400.0, 300.0, [(a, p, 500.0)]))
    del a, p
    gc.collect()
    assert "_x0_memo" in tr.__dict__  # the last call's inputs y, q are still alive here


def test_remembered_x0_is_not_used_for_a_history_changed_in_place():
    """The x0_hat remembered from a step is not reused when that step's state or prediction was changed in
    place before it comes back as the next step's history (torch's version counters tell)."""
    hist0 = [(randn(3, 2, seed=3), randn(3, 2, seed=4), 600.0)]
    y, q = randn(3, 2, seed=5), randn(3, 2, seed=6)
    for which in (0, 1):
        tr = DPMSolverSkip(VP)
        x, p = randn(3, 2, seed=1), randn(3, 2, seed=2)
        tr.multistep(x, p, 500.0, 400.0, hist0)  # remembers the x0_hat of (x, p)
        (x, p)[which].mul_(2.0)  # a caller reusing its buffer
        got = tr.multistep(y, q, 400.0, 300.0, [(x, p, 500.0)])
        assert torch.equal(got, DPMSolverSkip(VP).multistep(y, q, 400.0, 300.0, [(x, p, 500.0)])), which


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_drafts_on_a_grid_whose_steps_do_not_join_are_the_frozen_x0_hats_states(prediction):
    """On a grid whose steps do not join (t_to[k] != t_from[k+1]: diffusers' DDIM stride), row j of the 2M drafts
    is, as for the one-step transitions, the state the anchor's frozen x0_hat puts at t_to[j]: DDIM (eta = 0,
    the first-order step) with that x0_hat from row 0, the serial 2M step, which lies at t_to[0] (not t_from[1])."""
    grid = VP.timesteps(7, "trailing", step_to="stride")
    assert not torch.equal(grid.t_to[:-1], grid.t_from[1:]), "the grid's steps join: this test checks nothing"
    tr = DPMSolverSkip(VP, prediction, lower_order_final=False)
    a, n = 2, 4
    x, p, x_p, p_p = (randn(3, 2, seed=40 + k) for k in range(4))
    history = [(x_p, p_p, grid.t_from[a - 1])]
    drafts = tr.drafts(x, p, grid.t_from[a : a + n], grid.t_to[a : a + n], history=history)
    assert torch.equal(drafts[0], tr.grid_step(x, p, grid, a, history)), "row 0 is not the serial step"
    x0_hat = tr.to_x0_eps(x, p, grid.t_from[a])[0]
    ddim = DDIMSkip(VP, "sample")
    scale = 1 + float(max(v.abs().max() for v in (x, p, x0_hat, drafts[0])))
    for j in range(1, n):
        ref = ddim(drafts[0], x0_hat, grid.t_to[a], grid.t_to[a + j])
        err = float((drafts[j] - ref).abs().max())
        assert err <= 1e-9 * scale, f"draft {j} is {err:.3g} from the frozen x0_hat's state at t_to[{a + j}]"


@pytest.mark.parametrize("solver", ["dpm", "unipc"])
@pytest.mark.parametrize("shift", [0.46, 0.66, 0.91])
def test_flow_sigma_a_few_ulps_above_one_is_alpha_zero(solver, shift):
    """The float32 shift puts the first sigma of these grids a few ulps above 1 (1.0000001 at shift 0.91):
    alpha = 1 - sigma must read 0 there, not -1e-7, or log(alpha) is NaN in the half-log-SNR and the sample is
    NaN. The reference is the same grid with its first level set to 1 exactly."""
    sched = FlowSchedule(shift=shift)
    g = sched.timesteps(28)
    assert g.t_from[0] > 1  # the case under test
    assert sched.alpha_sigma(g.t_from[:1])[0].item() == 0.0
    exact = TimeGrid.from_levels(torch.cat([torch.ones(1, dtype=F64), g.t_from[1:]]), 0.0, g.model_times)
    make = {"dpm": DPMSolverSkip, "unipc": UniPCSkip}[solver]
    tr = make(sched, prediction="velocity")
    model = lambda x, t: 0.3 * x - 0.2  # noqa: E731
    x = randn(4, 3, seed=shift_seed(shift))
    got = sample_serial(model, x, tr, g).x
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, sample_serial(model, x, tr, exact).x, rtol=1e-6, atol=1e-6)
    out = DraftRefineScheduler(tr, g, width=3).sample(model, x)
    assert torch.isfinite(out.x).all()


def shift_seed(shift: float) -> int:
    return int(shift * 100)

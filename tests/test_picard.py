"""PicardScheduler: sliding-window Picard iteration (ParaDiGMS) and its skip-drafted variant.

Every check compares with a reference computed in the test: ``sample_serial`` (the fixed
point), ``DraftRefineScheduler`` (DRiffusion at the same width and rounds), the ParaDiGMS
baseline (``init="frozen"``), the step-skipping baseline, or a counting predictor.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _metrics import one_torch_thread  # noqa: F401  (autouse fixture)
from backends import BatchedExecutor, SerialExecutor
from driffusion_core import (
    DraftRefineScheduler,
    FlowSchedule,
    InvalidArgumentError,
    InvalidWidthError,
    NoiseSource,
    PredictorOutputError,
    VPSchedule,
    expected_rounds,
)
from solvers import (
    DDIMSkip,
    DDPMSkip,
    DPMSolverSkip,
    UniPCSkip,
    FlowEulerSkip,
    PicardScheduler,
    ring_mixture,
    sample_serial,
    sample_step_skipping,
)
from solvers.picard import NORMS, fewest_rounds

RING = ring_mixture()
VP = VPSchedule.linear()
FLOW = FlowSchedule(shift=3.0)


def family(name: str, num_steps: int = None):
    """(transition, grid, predictor, noise) of one family on the exact ring oracle."""
    if name == "ddim":
        return DDIMSkip(VP), VP.timesteps(num_steps or 50, "trailing", step_to="stride"), RING.predictor(VP, "epsilon"), None
    if name == "ddpm":
        return DDPMSkip(VP), VP.timesteps(num_steps or 50, "trailing"), RING.predictor(VP, "epsilon"), NoiseSource(7)
    if name == "dpm":  # DPM-Solver++ 2M: a multistep transition (each step combines the previous one)
        return DPMSolverSkip(VP), VP.timesteps(num_steps or 50, "trailing"), RING.predictor(VP, "epsilon"), None
    if name == "unipc":  # UniPC: each step combines the two before it (its corrector)
        grid = VP.timesteps(num_steps or 50, "trailing")
        return UniPCSkip(VP, final_level=float(grid.t_to[-1])), grid, RING.predictor(VP, "epsilon"), None
    return FlowEulerSkip(FLOW), FLOW.timesteps(num_steps or 28), RING.predictor(FLOW, "velocity"), None


def start(batch: int = 64, dtype=torch.float64) -> torch.Tensor:
    return NoiseSource(0).initial((batch, 2), dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def picard(name, width, tolerance, init="skip", max_rounds=None, x=None, executor=None, num_steps=None, **kw):
    tr, grid, f, noise = family(name, num_steps)
    x = start() if x is None else x
    sched = PicardScheduler(tr, grid, width, tolerance, max_rounds=max_rounds, init=init)
    return sched.sample(f, x, executor=executor or BatchedExecutor(), noise=noise, **kw)


def serial(name, x=None, num_steps=None, **kw):
    tr, grid, f, noise = family(name, num_steps)
    return sample_serial(f, start() if x is None else x, tr, grid, noise=noise, **kw)


# --------------------------------------------------------------------------- fixed point


@pytest.mark.parametrize("name", ["ddim", "ddpm", "flow", "dpm", "unipc"])
@pytest.mark.parametrize("init", ["skip", "frozen"])
def test_tolerance_zero_is_the_serial_sampler(name, init):
    """tau = 0, no budget: the serial result (same per-step noise), in at most T rounds."""
    ref = serial(name, num_steps=20, return_trajectory=True)
    for width in (2, 3, 4):
        out = picard(name, width, 0.0, init, num_steps=20, return_trajectory=True)
        assert out.rounds <= 20
        torch.testing.assert_close(out.x, ref.x, rtol=1e-12, atol=1e-12)
        for a, b in zip(out.trajectory, ref.trajectory):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert out.info["converged"] and out.info["calls_beyond_T"] == out.evals - 20 >= 0


def test_tolerance_zero_float32_serial_executor_bit_for_bit():
    """With the reference executor the fixed point is reached bit for bit, in float32 too."""
    x = start(dtype=torch.float32)
    ref = serial("ddpm", x=x, num_steps=16)
    out = picard("ddpm", 3, 0.0, x=x, num_steps=16, executor=SerialExecutor())
    assert torch.equal(out.x, ref.x)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "flow", "dpm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_fixed_point_and_loose_tolerances(name, dtype):
    """float16 / bfloat16 states: tau = 0 is sample_serial bit for bit (the fixed point is reached exactly,
    the change measured in float64), and a loose tolerance (its drafts re-frozen where the anchor moved)
    stays in the state's dtype and is the float64 run with that tolerance, to the dtype's rounding."""
    x = start(16, dtype)
    ref = serial(name, x=x, num_steps=12).x
    exact = picard(name, 3, 0.0, x=x, num_steps=12, executor=SerialExecutor())
    assert exact.x.dtype == dtype and torch.equal(exact.x, ref) and exact.rounds <= 12
    loose = picard(name, 3, 10.0, x=x, num_steps=12)
    wide = picard(name, 3, 10.0, x=x.double(), num_steps=12)
    assert loose.x.dtype == dtype and loose.rounds == wide.rounds < 12
    assert rel(loose.x.double(), wide.x) <= 0.1


@pytest.mark.parametrize("name", ["ddim", "ddpm", "flow", "dpm", "unipc"])
def test_width_one_is_the_serial_sampler(name):
    ref = serial(name, num_steps=12)
    for init in ("skip", "frozen"):
        for tol in (0.0, 0.1, math.inf):
            out = picard(name, 1, tol, init, num_steps=12, executor=SerialExecutor())
            assert torch.equal(out.x, ref.x)
            assert out.rounds == out.evals == 12


@pytest.mark.parametrize("name", ["ddim", "ddpm", "flow", "dpm", "unipc"])
def test_tiny_grids_and_windows_wider_than_the_grid(name):
    """T = 1, 2, 3 and widths 1 .. T+2 (the window never reaches past the grid): tolerance 0 is
    sample_serial in at most T rounds, and evals is the number of calls the predictor saw."""
    x = start(16)
    for T in (1, 2, 3):
        tr, grid, f, noise = family(name, T)
        ref = sample_serial(f, x, tr, grid, noise=noise)
        for width in range(1, T + 3):
            for init in ("skip", "frozen"):
                calls = {"n": 0}

                def counting(xx, t, **kw):
                    calls["n"] += 1
                    return f(xx, t, **kw)

                out = PicardScheduler(tr, grid, width, 0.0, init=init).sample(counting, x, executor=SerialExecutor(), noise=noise)
                assert torch.equal(out.x, ref.x), (T, width, init)
                assert out.rounds <= T and out.evals == calls["n"] >= T, (T, width, init, out.rounds, out.evals, calls)
                assert out.info["converged"] and out.info["calls_beyond_T"] == out.evals - T


@pytest.mark.parametrize("name", ["ddim", "ddpm", "flow", "dpm"])
@pytest.mark.parametrize("tol", [1.0, 0.1, 0.01])
def test_what_the_tolerance_guarantees(name, tol):
    """Without a budget, every final level x_{k+1} is the serial step from the final x_k with a
    prediction taken within tau sigma_k of x_k (the module doc's "what tau guarantees"). It is not
    true that every level's last change is below tau sigma: each round also finalises its first
    level that did not converge, and on 50-step DDIM at tau = 0.01 some do exceed it."""
    from driffusion_core.scheduler import evaluate_round

    tr, grid, f, noise = family(name, 30)
    x = start()
    st = PicardScheduler(tr, grid, 4, tol).start(x, noise, keep_trajectory=True)
    ex = BatchedExecutor()
    while (rnd := st.plan()) is not None:
        st.absorb(rnd, evaluate_round(ex, f, rnd, grid, {}, x))
    assert st.fallback is None
    for k in range(st.T):
        d = (st.xs[k] - st.at[k]).reshape(x.shape[0], -1).pow(2).mean(dim=1).max()
        assert d <= tol**2 * st.sigma2[k] * (1 + 1e-9), (k, float(d), float(st.sigma2[k]))
        # the serial step, from the transition itself (the previous final level as a multistep's history)
        hist = [(st.xs[k - 1], st.preds[k - 1], grid.t_from[k - 1])] if tr.history and tr.history_at(grid, k) else []
        z = noise(k, x.shape, x.dtype, x.device) if tr.stochastic else None
        assert torch.equal(tr.grid_step(st.xs[k], st.preds[k], grid, k, hist, z), st.xs[k + 1]), k
    if name == "ddim" and tol == 0.01:  # the level's own last change: not bounded by tau sigma
        tr, grid, f, _ = family("ddim")
        st = PicardScheduler(tr, grid, 4, tol).start(start(512))
        last = {}
        while (rnd := st.plan()) is not None:
            st.absorb(rnd, evaluate_round(ex, f, rnd, grid, {}, start(512)))
            last.update(st.moved)
        assert any(v > tol**2 for v in last.values())


# --------------------------------------------------------------------------- the claims


TOLERANCE_GRID = (math.inf, 1.0, 0.3, 0.1, 0.03, 0.01)


@pytest.mark.parametrize("name", ["ddim", "flow", "dpm"])
def test_skip_beats_driffusion_and_paradigms_at_driffusion_rounds(name):
    """Same width, same rounds as DRiffusion (aggressive): skip-drafted Picard is closest to serial.

    Both Picard inits run under ``max_rounds = R`` (DRiffusion's rounds) at every tolerance of
    one grid, and each is scored by its best tolerance, picked against the serial output (tuned
    the same way for both; DRiffusion has no knob). That is the claim's scope: at one *fixed*
    tolerance skip-Picard can lose to DRiffusion under this budget (solvers/PICARD.md).
    DDIM and DPM-Solver++ 2M 50 steps and flow 28 steps, widths 2..4.
    """
    tr, grid, f, noise = family(name)
    x = start(128)
    ref = sample_serial(f, x, tr, grid, noise=noise).x
    ex = BatchedExecutor()
    for width in (2, 3, 4):
        d = DraftRefineScheduler(tr, grid, width).sample(f, x, executor=ex, noise=noise)
        best = {}
        for init in ("skip", "frozen"):
            errs = []
            for tol in TOLERANCE_GRID:
                out = PicardScheduler(tr, grid, width, tol, max_rounds=d.rounds, init=init).sample(f, x, executor=ex, noise=noise)
                assert out.rounds <= d.rounds
                errs.append(rel(out.x, ref))
            best[init] = min(errs)
        e_d = rel(d.x, ref)
        assert best["skip"] < e_d, f"{name} n={width}: skip-Picard {best['skip']:.3e} vs DRiffusion {e_d:.3e}"
        assert best["skip"] < best["frozen"], f"{name} n={width}: skip {best['skip']:.3e} vs frozen {best['frozen']:.3e}"


@pytest.mark.parametrize("name", ["ddim", "ddpm", "flow", "dpm"])
def test_skip_needs_no_more_rounds_than_frozen(name):
    """At the *same* tolerance, skip drafts finish in no more rounds than ParaDiGMS' copies on
    30-step grids here (tolerances 1 to 1e-4, widths 2 and 4); on short grids (T = 8 and 16,
    widths 2..5) never more than one round more in any setting, and within 2 % in total.

    That is what is checked; it is not a theorem (a better initial guess need not converge in
    fewer sweeps): ``benchmarks/picard_study.py`` finds one setting of its 50-step grids
    (DDIM n = 4 at tolerance 0) and a few short-grid settings where skip takes one round more,
    and short-grid totals within 1 % either way (solvers/PICARD.md). Equal tolerance is not
    equal error either; rounds to reach an error against serial is the fair comparison, and the
    study measures it.
    """
    for width in (2, 4):
        for tol in (1.0, 0.1, 1e-2, 1e-3, 1e-4):
            skip = picard(name, width, tol, "skip", num_steps=30)
            frozen = picard(name, width, tol, "frozen", num_steps=30)
            assert skip.rounds <= frozen.rounds, f"{name} n={width} tau={tol}: {skip.rounds} > {frozen.rounds}"
    total = {"skip": 0, "frozen": 0}
    for num_steps in (8, 16):
        for width in (2, 3, 4, 5):
            for tol in (1.0, 0.3, 0.1, 1e-2, 1e-3):
                rounds = {init: picard(name, width, tol, init, num_steps=num_steps, x=start(32)).rounds for init in total}
                assert rounds["skip"] <= rounds["frozen"] + 1, (name, num_steps, width, tol, rounds)
                for init in total:
                    total[init] += rounds[init]
    # measured on this start: ddim 251 vs 251, ddpm 462 vs 463, flow 271 vs 277, dpm 278 vs 276
    assert total["skip"] <= 1.02 * total["frozen"], total


def test_skip_reaches_an_error_in_fewer_rounds_than_frozen_on_the_study_setting():
    """The fair comparison (README, solvers/PICARD.md): the fewest rounds, over the study's tolerance sweep,
    whose result is within 1e-3 of the serial output (relative). On the Picard study's own setting (its
    four families and grids, widths 2 to 4, its 512-sample start) skip drafts need fewer rounds than
    ParaDiGMS' copies every time. (It depends on the sample: PICARD.md records that from 64 samples of
    the same seed flow at width 4 needs one round more, 12 against 11; that is context, not checked here.)"""
    from benchmarks.picard_study import SEED_NOISE, SEED_X, SWEEP_TOLERANCES, _families

    ex = BatchedExecutor()
    for fam, (tr, grid, f, stochastic) in _families().items():
        x = NoiseSource(SEED_X).initial((512, 2), torch.float64)
        noise = NoiseSource(SEED_NOISE) if stochastic else None
        ref = sample_serial(f, x, tr, grid, noise=noise).x
        for width in (2, 3, 4):
            fewest = {}
            for init in ("frozen", "skip"):
                hits = []
                for tol in SWEEP_TOLERANCES:
                    out = PicardScheduler(tr, grid, width, tol, init=init).sample(f, x, executor=ex, noise=noise)
                    if rel(out.x, ref) <= 1e-3:
                        hits.append(out.rounds)
                fewest[init] = min(hits)  # tolerance 0 is the serial sample: always a hit
            assert fewest["skip"] < fewest["frozen"], (fam, width, fewest)


def test_tighter_tolerance_is_closer_to_serial():
    """The dial: error to the serial result shrinks with the tolerance, rounds grow."""
    ref = serial("ddim", num_steps=30).x
    outs = [picard("ddim", 4, tol, num_steps=30) for tol in (1.0, 1e-2, 1e-4, 0.0)]
    errs = [rel(o.x, ref) for o in outs]
    assert errs[0] > errs[1] > errs[2] > errs[3] == 0.0
    assert [o.rounds for o in outs] == sorted(o.rounds for o in outs)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "flow"])
def test_loose_tolerance_skip_drafts_do_not_blow_up(name):
    """tolerance = inf accepts every window after one sweep, so levels finalise far from their
    predictions' states; skip drafts must then stay of the order of ParaDiGMS' copies (DDPM's drafts
    once amplified the mismatch by sigma/alpha into an error 80x the copies'). Measured over widths 2
    to 5 and several seeds the ratio ranged from 0.3 (widths 2 and 5) to about 2.1 (DDPM, width 3)."""
    ref = serial(name, num_steps=20).x
    for width in (2, 3, 4, 5):
        skip = picard(name, width, math.inf, "skip", num_steps=20)
        frozen = picard(name, width, math.inf, "frozen", num_steps=20)
        assert torch.isfinite(skip.x).all()
        assert rel(skip.x, ref) <= 2.5 * rel(frozen.x, ref), (width, rel(skip.x, ref), rel(frozen.x, ref))


@pytest.mark.parametrize(
    "kind,prediction",
    [("vp", "epsilon"), ("vp", "sample"), ("vp", "v_prediction"), ("flow", "velocity"), ("flow", "sample")],
)
def test_refreeze_keeps_the_x0_hat_the_prediction_meant(kind, prediction):
    """_refreeze(y, x, p) is the output that, converted at y, gives the x0_hat p gave at x."""
    from solvers.picard import _refreeze

    schedule = VP if kind == "vp" else FLOW
    tr = DDIMSkip(VP, prediction=prediction) if kind == "vp" else FlowEulerSkip(FLOW, prediction=prediction)
    g = torch.Generator().manual_seed(5)
    x, y, p = (torch.randn(6, 3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    grid = schedule.timesteps(10)
    for i in (0, 4, 9):
        level = grid.t_from[i]
        want, _ = tr.to_x0_eps(x, p, level)
        got, _ = tr.to_x0_eps(y, _refreeze(tr, y, x, p, level), level)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("init", ["skip", "frozen"])
def test_levels_entering_the_window_get_the_documented_guesses(init):
    """After each round, the levels hi+1 .. top that enter the window hold the module doc's initial guesses:
    ``"frozen"``, copies of the window's last state x_hi; ``"skip"``, the serial chain from the latest final
    level c with a prediction, that prediction frozen, on the serial chain's own per-step noise z_c, z_{c+1}, ...
    (DDPM with an x0 model: a frozen output is a frozen x0_hat, so the draft is that chain pathwise)."""
    from driffusion_core.scheduler import evaluate_round

    tr, grid = DDPMSkip(VP, "sample"), VP.timesteps(20, "trailing")
    f, noise, x = RING.predictor(VP, "sample"), NoiseSource(7), start(16)
    st = PicardScheduler(tr, grid, 4, 0.1, init=init).start(x, noise, keep_trajectory=True)
    ex, seeded = BatchedExecutor(), 0
    while (rnd := st.plan()) is not None:
        hi = rnd.steps[-1] + 1
        st.absorb(rnd, evaluate_round(ex, f, rnd, grid, {}, x))
        top = min(st.a + st.width, st.T)
        if st.done or top <= hi:
            continue
        c = st.a if st.preds[st.a] is not None else st.a - 1
        y, chain = st.xs[c], {}
        for i in range(c, top):
            y = tr(y, st.preds[c], grid.t_from[i], grid.t_to[i], noise(i, y.shape, y.dtype, y.device))
            chain[i + 1] = y
        for k in range(hi + 1, top + 1):
            want = st.xs[hi] if init == "frozen" else chain[k]
            torch.testing.assert_close(st.xs[k], want, rtol=1e-12, atol=1e-12, msg=f"level {k}")
            seeded += 1
    assert seeded > 0


# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize("name", ["ddim", "ddpm", "flow", "dpm"])
@pytest.mark.parametrize("init", ["skip", "frozen"])
def test_budget_is_respected_and_beats_step_skipping(name, init):
    """rounds <= max_rounds for every budget; below T/2 the result beats step skipping at equal rounds."""
    tr, grid, f, noise = family(name, 30)
    x = start()
    ref = sample_serial(f, x, tr, grid, noise=noise).x
    width = 3
    low = fewest_rounds(30, width)
    assert low == expected_rounds(30, width, "aggressive")
    for budget in range(low, 31, 2):
        out = PicardScheduler(tr, grid, width, 0.1, max_rounds=budget, init=init).sample(f, x, noise=noise)
        assert out.rounds <= budget
        assert out.info["picard_rounds"] + out.info["fallback_rounds"] == out.rounds
        if budget < 15:  # below T/2 (at T/2 a stochastic DDPM run with tau = 0.1 may go either way)
            ss = sample_step_skipping(f, x, tr, grid, budget, noise=noise)
            assert rel(out.x, ref) < rel(ss.x, ref), f"budget {budget}"


def test_budget_that_does_not_bind_changes_nothing():
    free = picard("flow", 4, 1e-2)
    bound = picard("flow", 4, 1e-2, max_rounds=free.rounds)
    assert torch.equal(free.x, bound.x) and bound.rounds == free.rounds and bound.info["converged"]


def test_budget_fallback_runs_draft_and_refine():
    """A binding budget hands the rest to draft-and-refine: trajectory stays whole, counts add up."""
    ref = serial("ddpm", num_steps=30, return_trajectory=True)
    out = picard("ddpm", 4, 1e-3, max_rounds=fewest_rounds(30, 4) + 1, num_steps=30, return_trajectory=True)
    assert not out.info["converged"] and out.info["fallback_from"] is not None
    assert out.rounds <= fewest_rounds(30, 4) + 1
    assert len(out.trajectory) == 31 and torch.equal(out.trajectory[-1], out.x)
    c = out.info["fallback_from"]
    for a, b in zip(out.trajectory[: c + 1], ref.trajectory[: c + 1]):  # tau = 1e-3 before the anchor
        assert rel(a, b) < 1e-2


# --------------------------------------------------------------------------- executors and counts


@pytest.mark.parametrize("init", ["skip", "frozen"])
def test_every_executor_gives_the_same_result(init):
    for name in ("ddim", "ddpm", "dpm"):
        outs = [picard(name, 3, 1e-2, init, max_rounds=14, num_steps=30, executor=ex)
                for ex in (SerialExecutor(), BatchedExecutor(), BatchedExecutor(max_batch=64))]
        for o in outs[1:]:
            torch.testing.assert_close(o.x, outs[0].x, rtol=1e-10, atol=1e-10)
            assert (o.rounds, o.evals) == (outs[0].rounds, outs[0].evals)


@pytest.mark.parametrize("max_rounds", [None, 12])
def test_evals_count_every_model_call(max_rounds):
    tr, grid, f, noise = family("ddpm", 30)
    calls = {"n": 0}

    def counting(x, t, **kw):
        calls["n"] += 1
        return f(x, t, **kw)

    out = PicardScheduler(tr, grid, 4, 1e-2, max_rounds=max_rounds).sample(counting, start(), executor=SerialExecutor(), noise=noise)
    assert calls["n"] == out.evals
    assert out.info["calls_beyond_T"] == out.evals - 30 > 0
    rows = {"n": 0}

    def counting_rows(x, t, **kw):
        rows["n"] += x.shape[0]
        return f(x, t, **kw)

    out2 = PicardScheduler(tr, grid, 4, 1e-2, max_rounds=max_rounds).sample(counting_rows, start(), executor=BatchedExecutor(), noise=noise)
    assert rows["n"] == out2.evals * 64 and out2.evals == out.evals


def test_conditioning_reaches_the_predictor():
    tr, grid, f, _ = family("flow", 10)
    seen = []

    def g(x, t, scale=None):
        seen.append(scale.shape[0])
        return f(x, t) * scale[:, None]

    scale = torch.full((64,), 1.0, dtype=torch.float64)
    out = PicardScheduler(tr, grid, 3, 0.0).sample(g, start(), cond={"scale": scale})
    torch.testing.assert_close(out.x, sample_serial(f, start(), tr, grid).x)
    assert set(seen) == {64}


# --------------------------------------------------------------------------- bad input


def test_bad_arguments_say_what_is_wrong():
    tr, grid, f, _ = family("ddim", 20)
    for width in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidWidthError, match="width"):
            PicardScheduler(tr, grid, width)
    for tol in (-1e-3, float("nan"), "1e-3", None, True):
        with pytest.raises(InvalidArgumentError, match="tolerance"):
            PicardScheduler(tr, grid, 2, tol)
    with pytest.raises(InvalidArgumentError, match="init"):
        PicardScheduler(tr, grid, 2, init="copy")
    with pytest.raises(InvalidArgumentError, match=f"fewest rounds that finish at every tolerance are {expected_rounds(20, 4)}"):
        PicardScheduler(tr, grid, 4, max_rounds=expected_rounds(20, 4) - 1)
    for bad in (10.0, True, 0, -3, "10"):
        with pytest.raises(InvalidArgumentError, match="max_rounds"):
            PicardScheduler(tr, grid, 4, max_rounds=bad)
    with pytest.raises(InvalidArgumentError, match="SkipTransition"):
        PicardScheduler("ddim", grid, 2)
    with pytest.raises(PredictorOutputError, match="NaN"):
        PicardScheduler(tr, grid, 2).sample(lambda x, t: torch.full_like(x, float("nan")), start())
    with pytest.raises(PredictorOutputError, match="shape"):
        PicardScheduler(tr, grid, 2).sample(lambda x, t: x[:, :1], start())


def test_integer_like_width_and_max_rounds_are_accepted_as_by_draft_and_refine():
    """numpy integers and 0-d integer tensors pass as DraftRefineScheduler accepts them; the budget
    is compared as an int, so a numpy budget gets the right verdict."""
    tr, grid, f, _ = family("ddim", 20)
    for width in (np.int64(4), torch.tensor(4), np.int32(4)):
        DraftRefineScheduler(tr, grid, width)  # the reference behaviour
        sched = PicardScheduler(tr, grid, width, max_rounds=np.int64(10))
        assert type(sched.width) is int and sched.width == 4
        assert type(sched.max_rounds) is int and sched.max_rounds == 10
    assert PicardScheduler(tr, grid, 4, max_rounds=torch.tensor(6)).max_rounds == 6 == fewest_rounds(20, 4)
    with pytest.raises(InvalidArgumentError, match="fewest rounds that finish at every tolerance are 6"):
        PicardScheduler(tr, grid, 4, max_rounds=np.int64(5))
    for width in (torch.tensor(4.0), np.float64(4.0), np.bool_(True), torch.tensor(True)):
        with pytest.raises(InvalidWidthError, match="width"):
            PicardScheduler(tr, grid, width)
    out = PicardScheduler(tr, grid, np.int64(3), 0.0, max_rounds=np.int64(20)).sample(f, start())
    torch.testing.assert_close(out.x, sample_serial(f, start(), tr, grid).x, rtol=1e-12, atol=1e-12)


def test_fewest_rounds_checks_its_arguments():
    """fewest_rounds is public: DRiffusion's aggressive round count, with expected_rounds' checks."""
    for T in range(1, 12):
        for n in range(1, 14):
            assert fewest_rounds(T, n) == expected_rounds(T, n, "aggressive")
    assert fewest_rounds(np.int64(10), torch.tensor(3)) == 4
    for width in (0, -1, 1.5, True, "2", None):
        with pytest.raises(InvalidWidthError, match="width"):
            fewest_rounds(10, width)
    for num_steps in (0, -1, 2.5, True, "10", None):
        with pytest.raises(InvalidArgumentError, match="num_steps"):
            fewest_rounds(num_steps, 2)


# --------------------------------------------------------------------------- the round, step by step


def _drive(st, f, grid, x, after=None, executor=None):
    """Run a state machine (PicardState, DraftRefineState) to the end round by round; ``after(st, rnd,
    before)`` sees each absorbed round of a PicardState (``before``: its iterates before the round's sweep)."""
    from driffusion_core.scheduler import evaluate_round

    ex = executor if executor is not None else BatchedExecutor()
    while (rnd := st.plan()) is not None:
        before = {k: xk.clone() for k, xk in enumerate(st.xs) if xk is not None} if after is not None else None
        st.absorb(rnd, evaluate_round(ex, f, rnd, grid, {}, x))
        if after is not None:
            after(st, rnd, before)
    return st


def _entering_window(st, rnd):
    """For a round after which new levels enter the window: (c, hi, top), with c the anchor whose prediction
    seeds them, hi the last level the round's sweep reached and top the window's end; else None."""
    hi = rnd.steps[-1] + 1
    top = min(st.a + st.width, st.T)
    if st.done or top <= hi:
        return None
    return (st.a if st.preds[st.a] is not None else st.a - 1), hi, top


def _x_free(x, t):
    """A predictor that ignores the state: a sweep recomputes every level whose predecessor is final
    bit for bit, so at tolerance 0 such levels have converged exactly (change 0 <= 0)."""
    return torch.cos(t / 300.0).to(x.dtype)[:, None].expand_as(x).clone()


@pytest.mark.parametrize("name,tol", [("ddim", 0.1), ("ddpm", 1.0), ("flow", 0.3), ("dpm", 0.1), ("x-free", 0.0),
                                      ("ddim-21", 0.1)])
def test_each_round_measures_the_documented_norm_and_slides_by_the_rule(name, tol):
    """Round by round, against the module doc computed here: the window is a .. a+m-1; level k's change
    is max_b ||y_k - x_k||^2 / (D sigma_k^2) with sigma_k from ``schedule.alpha_sigma`` at level k
    (``t_to[k-1]``; inf at the clean end when it moved); the window moves past the leading levels with
    change <= tau^2 and the first one that is not. ``ddim-21``: 21 steps of DDIM's stride 1000 // 21 = 47 on
    trailing timesteps 47 or 48 apart, a grid whose steps do not join (level k is ``t_to[k-1]``, not
    ``t_from[k]``)."""
    if name == "x-free":
        tr, grid, _, noise = family("ddim", 20)
        f = _x_free
    elif name == "ddim-21":
        tr, grid, f, noise = family("ddim", 21)
        assert not torch.equal(grid.t_to[:-1], grid.t_from[1:]), "the steps join: the case checks nothing more"
    else:
        tr, grid, f, noise = family(name, 20)
    x, width, T = start(8), 4, len(grid)
    slides = []

    def check(st, rnd, before):
        a, hi = rnd.steps[0], rnd.steps[-1] + 1
        assert rnd.steps == list(range(a, min(a + width, T)))
        want = {}
        for k in range(a + 1, hi + 1):
            sigma = float(tr.schedule.alpha_sigma(grid.t_to[k - 1 : k])[1])
            change = float((st.xs[k] - before[k]).pow(2).mean(dim=1).max())  # D = 2, worst row
            want[k] = change / sigma**2 if sigma > 0 else (math.inf if change > 0 else 0.0)
        assert st.moved.keys() == want.keys()
        for k, v in want.items():
            assert st.moved[k] == pytest.approx(v, rel=1e-9, abs=1e-300), (k, st.moved[k], v)
        lead = 0
        while a + 1 + lead <= hi and want[a + 1 + lead] <= tol**2:
            lead += 1
        assert st.a == a + min(1 + lead, hi - a), (a, hi, lead, st.a)
        slides.append((st.a - a, hi - a))

    st = _drive(PicardScheduler(tr, grid, width, tol).start(x, noise, keep_trajectory=True), f, grid, x, check)
    assert st.done and st.rounds == len(slides) == len(st.advances) and sum(st.advances) == T
    # the rule was exercised both ways: some rounds slid the whole window, some only part of it
    assert any(s == m for s, m in slides) and any(1 <= s < m for s, m in slides), slides
    assert any(s > 1 for s, m in slides) or name != "x-free", slides  # exact zeros count as converged


@pytest.mark.parametrize("T", [1, 7, 10, 12])
@pytest.mark.parametrize("width", [1, 3, 4])
def test_infinite_tolerance_slides_full_windows_closed_form_counts(T, width):
    """tau = inf accepts every level: ceil(T/n) rounds of full windows (the last one what is left), T
    calls, each level evaluated once; the counts in ``info`` say so."""
    out = picard("ddim", width, math.inf, num_steps=T, x=start(8))
    full, rest = divmod(T, width)
    assert out.info["advances"] == [width] * full + ([rest] if rest else [])
    assert out.rounds == out.info["picard_rounds"] == math.ceil(T / width)
    assert out.evals == T and out.info["calls_beyond_T"] == 0
    assert out.info["fallback_rounds"] == 0 and out.info["fallback_from"] is None and out.info["converged"]


def test_info_counts_add_up_without_a_budget():
    """No budget: every round is a Picard round, and the advances finalise the T levels."""
    out = picard("ddpm", 4, 1e-2, num_steps=30, x=start(16))
    assert out.info["picard_rounds"] == out.rounds == len(out.info["advances"])
    assert out.info["fallback_rounds"] == 0 and sum(out.info["advances"]) == 30
    assert all(1 <= s <= 4 for s in out.info["advances"])


@pytest.mark.parametrize("name", ["ddim", "dpm", "unipc"])
def test_states_no_longer_needed_are_dropped(name):
    """Without a trajectory the state keeps nothing before level a-2 (a multistep anchor a-1 needs a-2; UniPC's
    a-3 too)."""
    tr, grid, f, noise = family(name, 30)
    x = start(8)
    keep = 3 if name == "unipc" else 2

    def check(st, rnd, before):
        if not st.done:
            assert all(st.xs[k] is None and st.preds[k] is None and st.at[k] is None for k in range(st.a - keep)), st.a

    st = _drive(PicardScheduler(tr, grid, 4, 0.1).start(x, noise), f, grid, x, check)
    assert st.done and st.x is not None


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm", "unipc"])
def test_budget_fallback_is_draft_and_refine_from_the_anchor(name):
    """tau = 0 under a binding budget: Picard stops at the first round that might leave draft-and-refine
    too few rounds (the module doc's worst case, checked round by round from ``advances``); the rest is
    draft-and-refine from the anchor c = a-1, i.e. a fresh DraftRefineState started at the serial x_c
    (tau = 0: Picard's levels up to c are serial), less its anchor call, which Picard already made."""
    from driffusion_core import DraftRefineState

    T, width = 20, 3
    tr, grid, f, noise = family(name, T)
    x = start(8)
    ref = sample_serial(f, x, tr, grid, noise=noise, return_trajectory=True)
    refine = lambda a: math.ceil((T - 1 - a) / width) if a < T - 1 else 0  # noqa: E731
    for budget in range(fewest_rounds(T, width), fewest_rounds(T, width) + 4):
        out = PicardScheduler(tr, grid, width, 0.0, max_rounds=budget).sample(
            f, x, executor=SerialExecutor(), noise=noise, return_trajectory=True
        )
        a = 0
        for r, adv in enumerate(out.info["advances"]):
            assert r + 1 + refine(a) <= budget, (budget, r, a)  # this Picard round fitted
            a += adv
        assert out.info["picard_rounds"] == len(out.info["advances"])
        assert out.info["picard_rounds"] + 1 + refine(a) > budget  # the next one would not have
        c = out.info["fallback_from"]
        assert c == a - 1 and not out.info["converged"]
        for k in range(c + 1):
            torch.testing.assert_close(out.trajectory[k], ref.trajectory[k], rtol=1e-12, atol=1e-12)
        h = tr.history_at(grid, c) if tr.history else 0
        hist = [(ref.trajectory[j], f(ref.trajectory[j], grid.model_times[j].expand(x.shape[0])), grid.t_from[j])
                for j in range(c - h, c)]
        dr = DraftRefineState(tr, grid, width, "aggressive", ref.trajectory[c], noise, True, start=c, history=hist)
        dr = _drive(dr, f, grid, x, executor=SerialExecutor())
        assert out.info["fallback_rounds"] == dr.rounds - 1 == out.rounds - out.info["picard_rounds"]
        assert out.rounds <= budget
        for k, xk in enumerate(dr.trajectory):
            torch.testing.assert_close(out.trajectory[c + k], xk, rtol=1e-12, atol=1e-12, msg=f"level {c + k}")
        picard_evals = sum(min(width, T - a) for a in np.cumsum([0] + out.info["advances"][:-1]))
        assert out.evals == picard_evals + dr.evals - 1


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm"])
def test_budget_keeps_what_picard_finalised(name):
    """tau > 0: up to the fallback a budgeted run is the unbudgeted one, and draft-and-refine keeps its final
    levels 0 .. a (it starts from the final x_{a-1} and its first refine step recomputes x_a)."""
    T, width = 20, 3
    tr, grid, f, noise = family(name, T)
    x = start(8)
    free = PicardScheduler(tr, grid, width, 0.1).sample(f, x, noise=noise, return_trajectory=True)
    bound = 0
    for budget in range(fewest_rounds(T, width), fewest_rounds(T, width) + 4):
        out = PicardScheduler(tr, grid, width, 0.1, max_rounds=budget).sample(f, x, noise=noise, return_trajectory=True)
        if out.info["converged"]:
            continue
        bound += 1
        a = sum(out.info["advances"])
        assert out.info["advances"] == free.info["advances"][: len(out.info["advances"])]
        for k in range(a + 1):
            torch.testing.assert_close(out.trajectory[k], free.trajectory[k], rtol=1e-12, atol=1e-12, msg=f"level {k}")
    assert bound > 0


def test_budget_above_tolerance_one_refreezes_the_fallback_anchor():
    """Tolerance above 1 (the documented exception): x_{a-1} may move by more than one noise std in its last
    sweep; the fallback then re-freezes p_{a-1} (the x0_hat it meant, at x_{a-1}) before recomputing x_a. Levels
    0 .. a-1 are still the unbudgeted run's, x_a is recomputed, and the re-freeze keeps the sample closer to the
    serial one than keeping the stale prediction would (DDPM, T = 20, width 4, tolerance 3, 7 rounds)."""
    import solvers.picard as P

    T, width, tol, budget = 20, 4, 3.0, 7
    tr, grid, f, noise = family("ddpm", T)
    x = start(8)
    serial = sample_serial(f, x, tr, grid, noise=noise)
    free = PicardScheduler(tr, grid, width, tol).sample(f, x, noise=noise, return_trajectory=True)
    out = PicardScheduler(tr, grid, width, tol, max_rounds=budget).sample(f, x, noise=noise, return_trajectory=True)
    assert not out.info["converged"] and out.rounds <= budget
    a = sum(out.info["advances"])
    for k in range(a):
        torch.testing.assert_close(out.trajectory[k], free.trajectory[k], rtol=1e-12, atol=1e-12, msg=f"level {k}")
    assert not torch.allclose(out.trajectory[a], free.trajectory[a])  # the re-frozen anchor moved x_a

    original = P.PicardState._start_fallback

    def stale(self):  # the fallback without the re-freeze: p_{a-1} as the last sweep took it
        moved, self.moved = self.moved, {}
        try:
            original(self)
        finally:
            self.moved = moved

    P.PicardState._start_fallback = stale
    try:
        kept = PicardScheduler(tr, grid, width, tol, max_rounds=budget).sample(f, x, noise=noise, return_trajectory=True)
    finally:
        P.PicardState._start_fallback = original
    torch.testing.assert_close(kept.trajectory[a], free.trajectory[a], rtol=1e-12, atol=1e-12)
    assert rel(out.x, serial.x) < 0.5 * rel(kept.x, serial.x)


def test_absorb_finishes_the_fallback_itself():
    """Driven by hand, the state is done right after the absorb of the fallback's last round."""
    from driffusion_core.scheduler import evaluate_round

    tr, grid, f, noise = family("ddpm", 20)
    x = start(8)
    st = PicardScheduler(tr, grid, 3, 1e-3, max_rounds=fewest_rounds(20, 3) + 1).start(x, noise)
    while not st.done:
        rnd = st.plan()
        assert rnd is not None, "plan() had to finish what absorb() left"
        st.absorb(rnd, evaluate_round(BatchedExecutor(), f, rnd, grid, {}, x))
    assert st.fallback is not None and st.plan() is None and st.x is not None


@pytest.mark.parametrize("budget", [None, fewest_rounds(20, 3) + 1], ids=["sliding", "fallback"])
def test_absorb_takes_only_the_round_plan_returned(budget):
    """A round absorbed twice, before any plan, or a stale one is refused (in the sliding window and in the
    budget's draft-and-refine fallback) instead of sweeping against the wrong iterate."""
    from driffusion_core.scheduler import evaluate_round

    tr, grid, f, noise = family("ddpm", 20)
    x = start(8)
    st = PicardScheduler(tr, grid, 3, 1e-3, max_rounds=budget).start(x, noise)
    preds = lambda rnd: evaluate_round(SerialExecutor(), f, rnd, grid, {}, x)  # noqa: E731
    first = st.plan()
    with pytest.raises(InvalidArgumentError, match="no round is planned now"):
        PicardScheduler(tr, grid, 3, 1e-3).start(x, noise).absorb(first, preds(first))
    while st.fallback is None if budget else st.rounds < 2:
        rnd = st.plan() if st.rounds else first
        st.absorb(rnd, preds(rnd))
    rnd = st.plan()
    with pytest.raises(InvalidArgumentError, match="this one is another"):
        st.absorb(first, preds(first))  # stale
    st.absorb(rnd, preds(rnd))
    with pytest.raises(InvalidArgumentError, match="no round is planned now"):
        st.absorb(rnd, preds(rnd))  # twice
    with pytest.raises(InvalidArgumentError, match="no round is planned now"):
        st.absorb(None, preds(rnd))  # None is no round either
    rnd = st.plan()
    with pytest.raises(InvalidArgumentError, match=r"got None, not a Round"):
        st.absorb(None, preds(rnd))


@pytest.mark.parametrize("tol,width", [(1.0, 2), (0.3, 4)])
def test_skip_drafts_freeze_the_x0_hat_the_prediction_meant_when_the_anchor_moved(tol, width):
    """DDPM with an epsilon model: the drafts entering the window are the serial step from the anchor c
    with an output meaning (x0, eps) there, then the chain with x0 frozen on the same per-step noise.
    When c moved by more than one noise std in the sweep (computed here from x_c and the state p_c was
    taken at), x0 is what p_c meant at that state and eps the one that puts x_c on it; otherwise the
    output is p_c itself."""
    tr, tr_x0, grid = DDPMSkip(VP), DDPMSkip(VP, "sample"), VP.timesteps(20, "trailing")
    f, noise, x = RING.predictor(VP, "epsilon"), NoiseSource(7), start(16)
    branches = set()

    def check(st, rnd, before):
        window = _entering_window(st, rnd)
        if window is None:
            return
        c, hi, top = window
        level = grid.t_from[c]
        al, sg = (float(v) for v in VP.alpha_sigma(level.reshape(1)))
        moved = float((st.xs[c] - before[c]).pow(2).mean(dim=1).max()) / sg**2 if c > rnd.steps[0] else 0.0
        z = lambda i: noise(i, x.shape, x.dtype, x.device)  # noqa: E731
        if moved > 1.0:
            x0, _ = tr.to_x0_eps(before[c], st.preds[c], level)  # p_c was taken at the state before the sweep
            y = tr(st.xs[c], (st.xs[c] - al * x0) / sg, level, grid.t_to[c], z(c))
        else:
            x0, _ = tr.to_x0_eps(st.xs[c], st.preds[c], level)
            y = tr(st.xs[c], st.preds[c], level, grid.t_to[c], z(c))
        branches.add(moved > 1.0)
        for i in range(c + 1, top):
            y = tr_x0(y, x0, grid.t_from[i], grid.t_to[i], z(i))
            if i + 1 > hi:
                torch.testing.assert_close(st.xs[i + 1], y, rtol=1e-9, atol=1e-9, msg=f"level {i + 1}")

    _drive(PicardScheduler(tr, grid, width, tol).start(x, noise, keep_trajectory=True), f, grid, x, check)
    assert branches == {True, False}, branches


def test_multistep_drafts_start_with_the_two_step_update():
    """DPM-Solver++ 2M with an x0 model: the drafts entering the window are the serial 2M step from the
    anchor c (level c-1 as its history) followed by first-order steps with c's x0_hat frozen."""
    tr, grid = DPMSolverSkip(VP, "sample"), VP.timesteps(20, "trailing")
    f, x = RING.predictor(VP, "sample"), start(16)
    seeded = []

    def check(st, rnd, before):
        window = _entering_window(st, rnd)
        if window is None:
            return
        c, hi, top = window
        hist = [(st.xs[c - 1], st.preds[c - 1], grid.t_from[c - 1])] if tr.history_at(grid, c) else []
        y = tr.grid_step(st.xs[c], st.preds[c], grid, c, hist)
        for i in range(c + 1, top):
            y = tr(y, st.preds[c], grid.t_from[i], grid.t_to[i])
            if i + 1 > hi:
                torch.testing.assert_close(st.xs[i + 1], y, rtol=1e-9, atol=1e-9, msg=f"level {i + 1}")
                seeded.append(bool(hist))

    _drive(PicardScheduler(tr, grid, 4, 0.1).start(x, None, keep_trajectory=True), f, grid, x, check)
    assert any(seeded), seeded  # some drafts started from a 2M step


# --------------------------------------------------------------------------- plumbing


def test_the_given_executor_runs_every_round():
    """Every round, Picard's and the budget's draft-and-refine ones, is one call of the given executor."""

    class Recording(BatchedExecutor):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def evaluate(self, predictor, xs, ts, cond=None):
            self.sizes.append(xs.shape[0])
            return super().evaluate(predictor, xs, ts, cond)

        def describe(self, width=None):
            return "recording"

    for max_rounds in (None, fewest_rounds(30, 4) + 1):
        ex = Recording()
        out = picard("ddim", 4, 1e-2, max_rounds=max_rounds, num_steps=30, executor=ex)
        assert len(ex.sizes) == out.rounds and sum(ex.sizes) == out.evals and max(ex.sizes) <= 4
        assert out.info["executor"] == "recording"


def test_stochastic_sampling_without_a_noise_source_draws_one_as_the_serial_sampler_does():
    """noise=None: a fresh NoiseSource seeded from torch's RNG, as ``sample_serial`` draws it."""
    tr, grid, f, _ = family("ddpm", 12)
    x = start(8)
    torch.manual_seed(11)
    ref = sample_serial(f, x, tr, grid)
    torch.manual_seed(11)
    out = PicardScheduler(tr, grid, 3, 0.0).sample(f, x)
    torch.testing.assert_close(out.x, ref.x, rtol=1e-12, atol=1e-12)
    torch.manual_seed(12)
    other = PicardScheduler(tr, grid, 3, 0.0).sample(f, x)
    assert not torch.allclose(other.x, out.x)


def test_a_state_that_overflows_is_reported():
    """Finite model outputs, but the float16 state overflows: refused as sample_serial refuses it."""
    from driffusion_core import SamplingError

    huge = lambda x, t: torch.full_like(x, 6e4)  # noqa: E731  (x0_hat = (x - sigma eps) / alpha overflows)
    tr, grid, x = DDIMSkip(VP), VP.timesteps(5), start(8).half()
    with pytest.raises(SamplingError, match="sample_serial: the sample holds NaN or inf"):
        sample_serial(huge, x, tr, grid)
    with pytest.raises(SamplingError, match="PicardScheduler: the sample holds NaN or inf"):
        PicardScheduler(tr, grid, 2, 0.1).sample(huge, x)


@pytest.mark.parametrize("tau", [1e155, 1e300, np.float64(1e200)])
def test_a_tolerance_whose_square_overflows_acts_as_inf(tau):
    """tau**2 beyond float range: every change passes, as with tau = inf (not an OverflowError after a round)."""
    tr, grid, model, _ = family("ddim", 10)
    got = PicardScheduler(tr, grid, 3, tau).sample(model, start(8))
    ref = PicardScheduler(tr, grid, 3, math.inf).sample(model, start(8))
    assert torch.equal(got.x, ref.x) and (got.rounds, got.evals) == (ref.rounds, ref.evals)


def test_repr_states_the_settings():
    tr, grid, _, _ = family("ddim", 20)
    sched = PicardScheduler(tr, grid, 3, 0.25, max_rounds=9, init="frozen")
    assert repr(sched) == f"PicardScheduler({tr!r}, T=20, width=3, tolerance=0.25, max_rounds=9, init='frozen')"
    assert "max_rounds" not in repr(PicardScheduler(tr, grid, 3, 0.0))


def test_tolerance_as_a_tensor_or_numpy_number_and_states_without_values():
    """The tolerance may be a 0-d tensor or numpy number (as width, max_rounds and DDIM's eta may) and gives the
    float's result; a state with no values per sample ([B, 0]) is refused (its mean change is NaN, so no level
    would ever count as converged and the window would never slide)."""
    tr, grid, model, _ = family("ddim", 12)
    ref = PicardScheduler(tr, grid, 3, 0.1).sample(model, start(8))
    for tol in (torch.tensor(0.1), np.float64(0.1)):
        got = PicardScheduler(tr, grid, 3, tol).sample(model, start(8))
        assert torch.equal(got.x, ref.x) and got.rounds == ref.rounds
    with pytest.raises(InvalidArgumentError, match="tolerance must be a number >= 0"):
        PicardScheduler(tr, grid, 3, torch.tensor([0.1, 0.2]))
    with pytest.raises(InvalidArgumentError, match="x holds no values per sample"):
        PicardScheduler(tr, grid, 3, math.inf).sample(model, torch.zeros(4, 0))


@pytest.mark.diffusers
def test_posterior_norm_is_diffusers_ddpm_variance_and_tolerance_zero_is_still_serial():
    """norm="posterior" (ParaDiGMS' rule) divides a level's change by the variance a DDPM step from it adds:
    diffusers' DDPMScheduler._get_variance at that timestep, 0 at the end. It is stricter than the default
    sigma^2 norm, and at tolerance 0 the result is still the serial sample."""
    from solvers.picard import posterior_variances

    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000)
    ref.set_timesteps(20)
    ref.alphas_cumprod = ref.alphas_cumprod.double()  # its formula in float64, on its own table
    table = VPSchedule(ref.alphas_cumprod)
    grid = table.timesteps(20)
    assert torch.equal(grid.t_from.long(), ref.timesteps)
    v = posterior_variances(table, grid)
    want = torch.tensor([float(ref._get_variance(int(t))) for t in ref.timesteps] + [0.0], dtype=torch.float64)
    torch.testing.assert_close(v, want, rtol=1e-10, atol=1e-15)
    sigma2 = table.alpha_sigma(torch.cat([grid.t_from, grid.t_to[-1:]]))[1] ** 2
    assert bool((v <= sigma2).all()) and bool((v[:-2] < sigma2[:-2]).all())

    tr, grid = DDPMSkip(VP), VP.timesteps(20)

    f, noise, x = RING.predictor(VP, "epsilon"), NoiseSource(3), start(16)
    serial = sample_serial(f, x, tr, grid, noise=noise).x
    exact = PicardScheduler(tr, grid, 4, 0.0, norm="posterior").sample(f, x, noise=noise)
    torch.testing.assert_close(exact.x, serial, rtol=1e-12, atol=1e-12)
    loose = {n: PicardScheduler(tr, grid, 4, 0.1, norm=n).sample(f, x, noise=noise).rounds for n in NORMS}
    assert loose["posterior"] > loose["sigma"]  # the stricter test finalises fewer levels per round here
    with pytest.raises(InvalidArgumentError, match="norm must be 'sigma'"):
        PicardScheduler(tr, grid, 4, 0.1, norm="l2")


def test_a_non_bool_return_trajectory_is_refused_before_any_call():
    """return_trajectory goes through the same flag check with or without a budget (the budget's
    draft-and-refine fallback would otherwise refuse it only after Picard rounds)."""
    tr, grid, f, noise = family("ddim", 20)
    calls = []
    counted = lambda x, t: calls.append(1) or f(x, t)  # noqa: E731
    for budget in (None, fewest_rounds(20, 3)):
        with pytest.raises(InvalidArgumentError, match="return_trajectory / keep_trajectory must be True or False"):
            PicardScheduler(tr, grid, 3, 1e-3, max_rounds=budget).sample(counted, start(4), return_trajectory=None)
    assert calls == []

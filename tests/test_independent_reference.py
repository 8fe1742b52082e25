"""Checks against references written independently of the library's own code paths.

* VP time grids: ``VPSchedule.timesteps`` lists the timesteps diffusers' ``DDIMScheduler`` / ``DDPMScheduler``
  list after ``set_timesteps(T)`` for linspace, leading and trailing spacing at step counts whose ratio to the
  1000 training steps is not whole (7, 333) or is (20, 50), and each step goes where diffusers' step goes (DDIM:
  ``t - N // T``, below 0 the final alpha-bar; DDPM: the next listed timestep).
* ``VPSchedule.alpha_bar`` below level 0 is the clean end, ``final_alpha_cumprod`` (1, or alphas_cumprod[0] =
  1 - beta_start), and at level 0 it is the table's first entry.
* Zero terminal SNR: between the last two training timesteps alpha-bar is linear in the level (the log-SNR is
  -inf at the end), as ``alpha_bar``'s docstring promises; one interval earlier it is still log-SNR linear.
* Draft-and-refine: a hand-written loop from DESIGN.md section 1 (drafts, one parallel round, serial refine,
  the anchor's prediction carried (aggressive) or re-evaluated (conservative), the window shrinking at the
  grid's end), using only a transition's single step / skip, equals ``DraftRefineScheduler.sample`` for DDIM
  (eta 0 and eta > 0), DDPM and flow Euler, widths 2..4, both modes, on grids of 7 and 11 steps; the rounds
  it needs equal ``SampleOutput.rounds``.
"""
from __future__ import annotations

import copy
import math
from typing import List, Optional, Tuple

import pytest
import torch

from driffusion_core import DraftRefineScheduler, FlowSchedule, NoiseSource, VPSchedule
from solvers import DDIMSkip, DDPMSkip, FlowEulerSkip, ring_mixture

from _metrics import one_torch_thread  # noqa: F401  (autouse fixture)

F64 = torch.float64

# ============================================================================ VP time grids against diffusers

STEP_COUNTS = [7, 20, 50, 333]


def _diffusers(name: str, **config):
    diffusers = pytest.importorskip("diffusers")
    return getattr(diffusers, name)(**config)


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("spacing,steps_offset", [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)])
def test_vp_timesteps_are_diffusers_ddim_timesteps(spacing, steps_offset, num_steps):
    """The model times, levels and DDIM step targets of ``VPSchedule.timesteps(T, spacing, step_to="stride")`` are
    DDIMScheduler's: ``set_timesteps(T)``'s list, and each step to ``t - 1000 // T`` (diffusers' prev_timestep;
    below 0 it uses final_alpha_cumprod, which is level -1 here)."""
    scheduler = _diffusers("DDIMScheduler", timestep_spacing=spacing, steps_offset=steps_offset)
    scheduler.set_timesteps(num_steps)
    listed = scheduler.timesteps.tolist()
    assert len(listed) == num_steps  # diffusers' own listing, checked, not assumed

    grid = VPSchedule.linear().timesteps(num_steps, spacing, steps_offset=steps_offset, step_to="stride")
    assert grid.model_times.dtype == torch.int64 and grid.model_times.tolist() == listed
    assert grid.t_from.tolist() == [float(t) for t in listed]
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    assert grid.t_to.tolist() == [float(t - stride) if t - stride >= 0 else -1.0 for t in listed]


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_vp_timesteps_next_are_diffusers_ddpm_steps(spacing, num_steps):
    """``step_to="next"`` is DDPMScheduler's loop: its listed timesteps, each step to ``previous_timestep(t)``
    (the next listed one; -1, the clean end, after the last)."""
    scheduler = _diffusers("DDPMScheduler", timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    listed = scheduler.timesteps.tolist()
    grid = VPSchedule.linear().timesteps(num_steps, spacing)
    assert grid.model_times.tolist() == listed and grid.t_from.tolist() == [float(t) for t in listed]
    assert grid.t_to.tolist() == [float(scheduler.previous_timestep(t)) for t in scheduler.timesteps]


# ============================================================================ alpha-bar at and below the clean end


@pytest.mark.parametrize("final,expected", [(1.0, 1.0), (None, 1.0 - 1e-4), (0.99995, 0.99995)],
                         ids=["set_alpha_to_one", "alphas_cumprod0", "explicit"])
def test_alpha_bar_below_level_zero_is_the_final_alpha_cumprod(final, expected):
    """``alpha_bar``'s contract: "levels below 0 are the clean end" with alpha-bar = ``final_alpha_cumprod``: 1 by
    default (diffusers' set_alpha_to_one), ``alphas_cumprod[0]`` = 1 - beta_start (here 1 - 1e-4, the first linear
    beta) for ``final_alpha_cumprod=None``, or the value given. Level 0 itself is the table's first entry."""
    sched = VPSchedule.linear(final_alpha_cumprod=final)
    assert sched.final_alpha_cumprod == expected
    below = torch.tensor([-0.5, -1.0, -3.0, -1e-6, -999.0], dtype=F64)
    assert torch.equal(sched.alpha_bar(below), torch.full((5,), expected, dtype=F64))
    for level in (-0.5, -1, -3):
        assert float(sched.alpha_bar(level)) == expected  # scalar levels, ints too
    # mixed with levels at and above 0 (elementwise): level 0 is 1 - beta_start, not the clean end
    got = sched.alpha_bar(torch.tensor([-1.0, 0.0, -0.25, 1.0], dtype=F64)).tolist()
    assert got[0] == got[2] == expected
    assert got[1] == 1.0 - 1e-4 and got[3] == pytest.approx((1.0 - 1e-4) * (1.0 - (1e-4 + (0.02 - 1e-4) / 999)), rel=1e-14)


def test_alpha_bar_below_level_zero_matches_diffusers_final_alpha_cumprod():
    """The same against diffusers' DDIMScheduler.final_alpha_cumprod (float32 there) for both set_alpha_to_one."""
    for set_alpha_to_one, final in ((True, 1.0), (False, None)):
        ref = float(_diffusers("DDIMScheduler", set_alpha_to_one=set_alpha_to_one).final_alpha_cumprod)
        got = VPSchedule.linear(final_alpha_cumprod=final).alpha_bar(torch.tensor([-0.5, -1.0, -3.0], dtype=F64))
        torch.testing.assert_close(got, torch.full((3,), ref, dtype=F64), rtol=1e-7, atol=0)


# ============================================================================ zero terminal SNR: the last interval

ZSNR = [
    pytest.param(lambda: VPSchedule.linear(rescale_betas_zero_snr=True), id="linear"),
    pytest.param(lambda: VPSchedule.scaled_linear(rescale_betas_zero_snr=True), id="scaled_linear"),
    pytest.param(lambda: VPSchedule.squaredcos_cap_v2(rescale_betas_zero_snr=True), id="squaredcos_cap_v2"),
    pytest.param(lambda: VPSchedule.linear(num_train_timesteps=50, rescale_betas_zero_snr=True), id="linear-N50"),
]
FRACTIONS = [0.125, 0.25, 0.5, 0.75, 0.9375]  # dyadic: N - 2 + f is exact, so f is the level's fraction exactly


@pytest.mark.parametrize("make", ZSNR)
def test_zero_terminal_snr_last_interval_is_linear_in_alpha_bar(make):
    """``alpha_bar``'s docstring: "log-SNR interpolation between (linear in alpha-bar next to a zero-terminal-SNR
    end)". Between training timesteps N-2 and N-1 (alpha-bar 0, log-SNR -inf) alpha_bar(N-2+f) is
    (1-f) ac[N-2] + f ac[N-1], computed here in Python floats; the interval before is log-SNR linear still."""
    sched = make()
    ac = sched.alphas_cumprod.tolist()
    n = len(ac)
    assert ac[-1] == 0.0 and ac[-2] > 0.0  # zero terminal SNR: the last entry is exactly 0
    for f in FRACTIONS:
        want = (1 - f) * ac[n - 2] + f * ac[n - 1]
        assert float(sched.alpha_bar(n - 2 + f)) == want, f
        # batched with other levels, the same value bit for bit
        got = sched.alpha_bar(torch.tensor([n - 1.0, n - 2 + f, 0.5], dtype=F64))
        assert got[1].item() == want and got[0].item() == 0.0
    # one interval earlier both ends have finite log-SNR: sigmoid of the linear log-SNR (not linear in alpha-bar)
    lam = lambda a: math.log(a) - math.log1p(-a)
    for f in FRACTIONS:
        mid = lam(ac[n - 3]) + f * (lam(ac[n - 2]) - lam(ac[n - 3]))
        assert float(sched.alpha_bar(n - 3 + f)) == pytest.approx(1 / (1 + math.exp(-mid)), rel=1e-12, abs=0)
    # and the two rules meet at level N - 2
    assert float(sched.alpha_bar(n - 2)) == ac[n - 2]


# ============================================================================ the draft-and-refine loop, by hand

VP = VPSchedule.linear()
FLOW = FlowSchedule(shift=3.0)


def reference_draft_refine(
    transition, grid, width: int, mode: str, predictor, x: torch.Tensor, noise: Optional[NoiseSource],
    drafts_by: str = "chain",
) -> Tuple[torch.Tensor, List[List[int]], List[bool]]:
    """DESIGN.md section 1, written out: returns the sample, the steps evaluated in each parallel round, and
    for each round whether it was an exact anchor call (else a round of drafts).

    Levels t_0 > ... > t_T (``grid.t_from``, contiguous, then ``grid.t_to[-1]``); ``step(x, p, i)`` is the serial
    step t_i -> t_{i+1} with the per-step noise z_i. A draft x~_{a+j} is the serial chain of j steps from the
    anchor with its prediction frozen and the same z_a .. z_{a+j-1}: for a deterministic transition the one
    skip S(x_a, p_a, t_a -> t_{a+j}); for a stochastic one the serial step from the anchor, then steps with
    x0_hat (converted at t_a) frozen. ``drafts_by="transition.drafts"``: the transition's own closed form of
    the same drafts instead (so the loop itself is compared bit for bit for stochastic transitions too).
    """
    T, B = len(grid), x.shape[0]
    rounds: List[List[int]] = []
    anchors: List[bool] = []

    def parallel_round(states: List[torch.Tensor], steps: List[int], anchor: bool) -> List[torch.Tensor]:
        rounds.append(list(steps))
        anchors.append(anchor)
        return [predictor(s, grid.model_times[i].repeat(B)) for s, i in zip(states, steps)]

    def z(i: int) -> Optional[torch.Tensor]:
        return noise(i, x.shape, x.dtype) if transition.stochastic else None

    def step(xi: torch.Tensor, pi: torch.Tensor, i: int) -> torch.Tensor:
        return transition(xi, pi, grid.t_from[i], grid.t_to[i], z(i))

    def drafts(xa: torch.Tensor, pa: torch.Tensor, a: int, m: int) -> List[torch.Tensor]:
        if drafts_by == "transition.drafts":
            zs = torch.stack([z(i) for i in range(a, a + m)]) if transition.stochastic else None
            return list(transition.drafts(xa, pa, grid.t_from[a:a + m], grid.t_to[a:a + m], zs))
        if not transition.stochastic:
            return [transition(xa, pa, grid.t_from[a], grid.t_from[a + j]) for j in range(1, m + 1)]
        x0_hat = transition.to_x0_eps(xa, pa, grid.t_from[a])[0]
        frozen = copy.copy(transition)
        frozen.prediction = "sample"  # a step fed x0_hat itself: the chain with x0_hat frozen
        out = [step(xa, pa, a)]
        for k in range(a + 1, a + m):
            out.append(frozen(out[-1], x0_hat, grid.t_from[k], grid.t_to[k], z(k)))
        return out

    a, xa, pa = 0, x, None
    while a < T:
        if pa is None:  # the first anchor, and every conservative anchor: one exact call, a round of its own
            (pa,) = parallel_round([xa], [a], anchor=True)
        m = min(width, T - 1 - a)  # the window shrinks at the end: never evaluates past t_{T-1}
        if m == 0:  # the last level's prediction is known: the last step needs no call
            xa, a = step(xa, pa, a), a + 1
            break
        preds = parallel_round(drafts(xa, pa, a, m), list(range(a + 1, a + m + 1)), anchor=False)
        # refine: x_{a+1} = step(x_a, p_a); x_{a+j+1} = step(x_{a+j}, p~_{a+j})
        refine = m if mode == "conservative" else m - 1
        xa = step(xa, pa, a)
        for j in range(1, refine + 1):
            xa = step(xa, preds[j - 1], a + j)
        a += refine + 1
        pa = preds[-1] if mode == "aggressive" else None  # aggressive: the new anchor (x_{a+m}, p~_{a+m})
    assert a == T
    return xa, rounds, anchors


# (id, transition, grid maker, prediction, noise seed, dtype); stochastic ones in float64 (see the test)
FAMILIES = [
    ("ddim_eta0", DDIMSkip(VP), lambda T: VP.timesteps(T, "trailing"), "epsilon", None, torch.float32),
    ("ddim_eta0.6_v", DDIMSkip(VP, "v_prediction", eta=0.6), lambda T: VP.timesteps(T, "trailing"), "v_prediction", 21,
     F64),
    ("ddpm_small", DDPMSkip(VP), lambda T: VP.timesteps(T, "leading"), "epsilon", 22, F64),
    ("ddpm_large_x0", DDPMSkip(VP, "sample", "fixed_large"), lambda T: VP.timesteps(T, "linspace"), "sample", 23, F64),
    ("flow_euler", FlowEulerSkip(FLOW), lambda T: FLOW.timesteps(T), "velocity", None, torch.float32),
]
MIXTURE = ring_mixture(4)


@pytest.mark.parametrize("drafts_by", ["chain", "transition.drafts"])
@pytest.mark.parametrize("num_steps", [7, 11])
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
@pytest.mark.parametrize("family", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_scheduler_equals_hand_written_draft_refine(family, mode, width, num_steps, drafts_by):
    """``DraftRefineScheduler.sample`` equals the hand-written loop, and takes the rounds the loop needs (the
    design's closed forms too), with every level evaluated once in those rounds.

    Deterministic transitions, and every transition with ``drafts_by="transition.drafts"``: bit for bit
    (``torch.equal``), the same float operations in the same order. A stochastic transition's hand-chained
    drafts are the closed form unrolled step by step (``x_{k+1} = A_k x0_hat + B_k x_k + s_k z_k`` iterated, where
    the library sums ``A~ x0_hat + B~ x_{a+1} + W z`` in one go), so they differ in the last bits; those runs
    are in float64 and compared to 1e-11 relative (measured: 6e-14) (any mistake in the loop moves the sample by O(1))."""
    _, transition, make_grid, prediction, seed, dtype = family
    assert num_steps % width != 0  # the last window is shorter than the width in at least one mode
    grid = make_grid(num_steps)
    assert grid.is_contiguous  # the design's t_{a+j} is the grid's t_from[a+j]
    predictor = MIXTURE.predictor(transition.schedule, prediction)
    x = NoiseSource(3).initial((3, 2), dtype)
    noise = NoiseSource(seed) if seed is not None else None

    want, rounds, anchors = reference_draft_refine(transition, grid, width, mode, predictor, x, noise, drafts_by)
    out = DraftRefineScheduler(transition, grid, width=width, mode=mode).sample(predictor, x, noise=noise)

    if transition.stochastic and drafts_by == "chain":
        torch.testing.assert_close(out.x, want, rtol=1e-11, atol=1e-12)
    else:
        assert torch.equal(out.x, want), (out.x - want).abs().max()
    # the rounds: as many as the loop needs, the design's formula, each level evaluated exactly once
    assert out.rounds == len(rounds)
    closed = {"aggressive": 1 + math.ceil((num_steps - 1) / width),
              "conservative": 2 * math.ceil(num_steps / (width + 1)) - (num_steps % (width + 1) == 1)}[mode]
    assert len(rounds) == closed
    assert sorted(i for r in rounds for i in r) == list(range(num_steps)) and out.evals == num_steps
    assert out.info["drafts_per_round"] == [len(r) for r, anchor in zip(rounds, anchors) if not anchor]

"""UniPC (UniPCSkip: the predictor UniP with the corrector UniC) in the draft-and-refine scheduler.

* ``drafts(..., history=...)``: row 0 is the serial UniPC step bit for bit; row j is the chain of j + 1 serial
  steps (each corrected, then predicted) with the anchor's x0_hat frozen.
* The step's orders: the corrector takes the order of the predictor that reached the state (1 after the
  first step), the predictor drops to first order into ``final_level`` and into sigma = 0.
* Bad settings are refused with a message.

Width 1 against ``sample_serial`` (every dtype, both modes), the rounds, evals and executors, and the exact
oracle against step skipping are the multistep tests of ``tests/test_multistep.py``, run for UniPC too.
diffusers' own loop is the reference in ``tests/test_interop_diffusers.py`` (UniPC section).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from driffusion_core import TimeGrid
from driffusion_core import coefficients as C
from driffusion_core.errors import InvalidArgumentError, InvalidTimestepsError
from solvers import DPMSolverSkip, UniPCSkip

from _metrics import one_torch_thread  # noqa: F401  (autouse fixture)

# shared with the DPM-Solver++ tests: the schedules, randn and the prediction meaning a given x0_hat
from test_multistep import F64, PREDICTIONS, VP, consistent_prediction, randn  # noqa: E402


@st.composite
def window(draw, n_max: int = 5):
    """(h, levels): h earlier levels (1 or 2), then the window's n + 1 decreasing levels, training timesteps in
    [0, 999], the last possibly the clean end (-1)."""
    h = draw(st.integers(1, 2))
    n = draw(st.integers(1, n_max))
    vals = draw(st.lists(st.integers(0, 999), min_size=n + h + 1, max_size=n + h + 1, unique=True))
    levels = sorted((float(v) for v in vals), reverse=True)
    if draw(st.booleans()):
        levels[-1] = -1.0
    return h, torch.tensor(levels, dtype=F64)


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_drafts_are_the_chain_with_x0_frozen_and_row0_is_the_serial_step(solver_type, prediction, data):
    h, levels = data.draw(window())
    earlier, t_from, t_to = levels[:h], levels[h:-1], levels[h + 1:]
    n = int(t_from.shape[0])
    # lower_order_final=False: the chain's grid ends with the window, and a scheduler's window never holds the
    # grid's last step (that one is always grid_step's), which lower_order_final takes at first order
    tr = UniPCSkip(VP, prediction, solver_type=solver_type, lower_order_final=False)
    seed = data.draw(st.integers(0, 2**31))
    x, p = randn(3, 2, seed=seed), randn(3, 2, seed=seed + 1)
    history = [(randn(3, 2, seed=seed + 2 + 2 * k), randn(3, 2, seed=seed + 3 + 2 * k), earlier[k]) for k in range(h)]
    drafts = tr.drafts(x, p, t_from, t_to, history=history)
    assert drafts.shape == (n, 3, 2)
    assert torch.equal(drafts[0], tr.multistep(x, p, t_from[0], t_to[0], history)), "row 0 is not the serial step"
    # the chain: the grid's steps h, h + 1, ... are the window's; every step corrects, then predicts; the
    # prediction at each new state is the one meaning the anchor's x0_hat
    grid = TimeGrid(levels[:-1], levels[1:], levels[:-1])
    x0_hat = tr.to_x0_eps(x, p, t_from[0])[0]
    hist, y, pk = history, x, p
    for k in range(n):
        y_next = tr.grid_step(y, pk, grid, k + h, hist)
        hist = (list(hist) + [(y, pk, t_from[k])])[-2:]
        y = y_next
        scale = 1 + float(max(v.abs().max() for v in (x, p, x0_hat, *[e for s in history for e in s[:2]])))
        err = float((drafts[k] - y).abs().max())
        assert err <= 1e-8 * scale, f"draft {k} differs from the chain by {err:.3g} over levels {levels.tolist()}"
        if k + 1 < n:
            pk = consistent_prediction(tr, x0_hat, y, float(t_from[k + 1]))


def test_the_orders_of_each_step():
    """diffusers' warm-up and lower_order_final: step 0 is first order without a corrector, step 1 predicts at
    second order and corrects at first, later steps at second; into final_level and into sigma = 0 the
    predictor is first order; order 1 corrects at first order from step 1 on."""
    tr = UniPCSkip(VP, final_level=0.0)
    t = torch.tensor(500.0, dtype=F64)
    assert [tr.orders(c, t) for c in (0, 1, 2)] == [(1, 0), (2, 1), (2, 2)]
    assert tr.orders(2, torch.tensor(0.0, dtype=F64)) == (1, 2) and tr.orders(2, torch.tensor(-1.0, dtype=F64)) == (1, 2)
    assert UniPCSkip(VP, final_level=0.0, lower_order_final=False).orders(2, torch.tensor(0.0, dtype=F64)) == (2, 2)
    assert [UniPCSkip(VP, order=1).orders(c, t) for c in (0, 1)] == [(1, 0), (1, 1)]
    grid = VP.timesteps(6, "trailing")
    assert [tr.history_at(grid, i) for i in range(6)] == [0, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("order", [1, 2])
def test_lower_order_final_acts_on_the_grids_last_step_without_final_level(order):
    """A UniPCSkip built without final_level takes the grid's last step with a first-order predictor
    (diffusers' lower_order_final for any grid length) in the serial sampler and in every round's refinement,
    as the transition with final_level = grid.t_to[-1] does; lower_order_final=False keeps the second order."""
    from driffusion_core import DraftRefineScheduler
    from solvers import sample_serial

    levels = torch.tensor([900.0, 780.0, 640.0, 500.0, 380.0, 260.0, 150.0, 60.0, 20.0], dtype=F64)
    grid = TimeGrid(levels[:-1], levels[1:], levels[:-1])  # ends above the clean end (not first order by itself)
    w = randn(3, 3, seed=7)

    def model(x, t, **_):
        return torch.tanh(x @ w) * (0.5 + t.reshape(-1, 1) / 1000)

    x = randn(4, 3, seed=3)
    bare = UniPCSkip(VP, order=order)
    ref = sample_serial(model, x, UniPCSkip(VP, order=order, final_level=float(grid.t_to[-1])), grid).x
    assert torch.equal(sample_serial(model, x, bare, grid).x, ref)
    for mode in ("aggressive", "conservative"):
        wide = DraftRefineScheduler(UniPCSkip(VP, order=order, final_level=float(grid.t_to[-1])), grid, 3, mode)
        assert torch.equal(DraftRefineScheduler(bare, grid, 3, mode).sample(model, x).x, wide.sample(model, x).x)
    second = sample_serial(model, x, UniPCSkip(VP, order=order, lower_order_final=False), grid).x
    assert (order == 2) == bool((second - ref).abs().max() > 1e-6)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_corrector_changes_the_step_and_bh2_predicts_as_dpm_2m(prediction):
    """The UniPC step is UniC, then UniP: x_s^c = x_s + K with K = k_s m_s + k_p m_p + k_pp m_pp
    (unipc_corrector_coefficients, order 2 after two earlier steps), then UniP-2 from x_s^c. With bh2 that
    predictor is DPM-Solver++ 2M midpoint: the step equals DPMSolverSkip's 2M midpoint step from the corrected
    state (its output meaning the same m_s there), with three distinct x0_hat, so D_1 = (m_p - m_s)/r != 0 and
    UniP-2's second-order weight counts (the first-order step from x_s^c is far off). The corrector moves the
    state: 2M from the uncorrected x_s is not the UniPC step."""
    levels = [torch.tensor(v, dtype=F64) for v in (700.0, 600.0, 500.0, 400.0)]
    uni_op, dpm_op = UniPCSkip(VP, prediction), DPMSolverSkip(VP, prediction)  # bh2, midpoint (the defaults)
    assert (uni_op.solver_type, dpm_op.solver_type, uni_op.orders(2, levels[3])) == ("bh2", "midpoint", (2, 2))
    # the x0_hat m_pp, m_p, m_s at 700, 600, 500: m_p at least 1 above m_s and m_pp at least 1 below m_p elementwise
    # (D_1 != 0 in every element), and the outputs meaning them at their states
    x_pp, x_p, x, m_s = (randn(4, 3, seed=k) for k in range(4))
    m_p = m_s + 1 + randn(4, 3, seed=4).abs()
    m_pp = m_p - 1 - randn(4, 3, seed=5).abs()
    p_pp, p_p, p = (consistent_prediction(uni_op, m, y, float(t)) for m, y, t in ((m_pp, x_pp, levels[0]),
                                                                                  (m_p, x_p, levels[1]), (m_s, x, levels[2])))
    hist = [(x_pp, p_pp, levels[0]), (x_p, p_p, levels[1])]
    uni = uni_op.multistep(x, p, levels[2], levels[3], hist)
    for m, (y, q, t) in zip((m_pp, m_p, m_s), (*hist, (x, p, levels[2]))):
        torch.testing.assert_close(uni_op.to_x0_eps(y, q, t)[0], m, rtol=1e-12, atol=1e-12)
    (a_pp, s_pp), (a_p, s_p), (a_s, s_s) = (VP.alpha_sigma(t) for t in levels[:3])
    k_s, k_p, k_pp = C.unipc_corrector_coefficients(a_pp, s_pp, a_p, s_p, a_s, s_s, 2, "bh2")
    x_c = x + k_s * m_s + k_p * m_p + k_pp * m_pp
    p_c = consistent_prediction(dpm_op, m_s, x_c, float(levels[2]))  # the output whose x0_hat at x_c is m_s
    two_m = dpm_op.multistep(x_c, p_c, levels[2], levels[3], hist[-1:])
    torch.testing.assert_close(uni, two_m, rtol=1e-10, atol=1e-10)
    assert (uni - dpm_op(x_c, p_c, levels[2], levels[3])).abs().max() > 1e-2, "D_1 too small to test UniP-2's weight"
    assert (uni - dpm_op.multistep(x, p, levels[2], levels[3], hist[-1:])).abs().max() > 1e-3, "K = 0: no corrector"


def test_bad_settings_are_refused():
    with pytest.raises(InvalidArgumentError, match="order must be 1 or 2"):
        UniPCSkip(VP, order=3)
    with pytest.raises(InvalidArgumentError, match="'bh1' or 'bh2'"):
        UniPCSkip(VP, solver_type="midpoint")
    tr = UniPCSkip(VP)
    x = randn(2, 2, seed=0)
    t = [torch.tensor(v, dtype=F64) for v in (700.0, 600.0, 500.0, 400.0)]
    with pytest.raises(InvalidArgumentError, match="same batch"):
        tr.multistep(x, x, t[2], t[3], [(x[:1], x[:1], t[0]), (x, x, t[1])])
    with pytest.raises(InvalidTimestepsError, match="previous level"):  # history below the step's level
        tr.multistep(x, x, t[2], t[3], [(x, x, t[0]), (x, x, torch.tensor(450.0, dtype=F64))])
    # no history: the first step (first order, no corrector), as sample_serial takes it
    assert torch.equal(tr.multistep(x, x, t[2], t[3], []), tr(x, x, t[2], t[3]))


@pytest.mark.parametrize("gap", [0.2, 0.1, 1e-2, 1e-4, 1e-6, 1e-8])
def test_corrector_coefficients_keep_their_digits_on_close_levels(gap):
    """UniC-2's phi_1 = (e^hh - 1)/hh - 1 and phi_2 = phi_1/hh - 1/2 cancel for small hh; written as closed
    forms their error grew like eps/hh^3 (all digits gone at a gap of 1e-6). Against an independent 60-digit
    evaluation (mpmath, diffusers' formulas, from the same float64 inputs) the coefficients are within the
    inputs' own conditioning, ~eps / gap, on floats and on tensors alike, on both sides of the series' range."""
    import mpmath as mp

    mp.mp.dps = 60
    a = lambda v: (1 - v, v)  # noqa: E731  (a flow interpolant: alpha = 1 - sigma)
    args = (*a(0.5 + 2 * gap), *a(0.5 + gap), *a(0.5))  # levels pp > p > s
    a_pp, s_pp, a_p, s_p, a_s, s_s = map(mp.mpf, args)
    lam = lambda al, si: mp.log(al) - mp.log(si)  # noqa: E731
    h = lam(a_s, s_s) - lam(a_p, s_p)
    B = mp.expm1(-h)
    phi_1 = mp.expm1(-h) / -h - 1
    b1, b2 = phi_1 / B, 2 * (phi_1 / -h - mp.mpf(1) / 2) / B
    r = (lam(a_pp, s_pp) - lam(a_p, s_p)) / h
    rho_1 = (b1 - b2) / (1 - r)
    k_s, k_pp = -a_s * B * (b1 - rho_1), -a_s * B * (2 * rho_1 - 1) / (2 * r)
    want = [k_s, -(k_s + k_pp), k_pp]
    scale = max(abs(float(w)) for w in want)
    for got in (C.unipc_corrector_coefficients(*args, 2),
                C.unipc_corrector_coefficients(*[torch.tensor([v], dtype=F64) for v in args], 2)):
        err = max(abs(float(g) - float(w)) for g, w in zip(got, want)) / scale
        assert err <= 100 * 2.2e-16 / gap, (gap, err)


def test_unipc_phi_on_tensor_rows_mixing_the_series_and_the_closed_form():
    """One tensor of rows on both sides of |hh| = 1/2 (and hh = 0) gives each row what the float path gives for
    it, and phi_1 = phi_2 = 0 at hh = 0 (their limits), without NaN from the closed form's 0 / 0."""
    import math

    from driffusion_core.coefficients import _unipc_phi

    hh = torch.tensor([-2.0, -0.6, -0.5, -0.3, -1e-3, -1e-9, 0.0], dtype=F64)
    ratio = torch.exp(hh)
    phi_1, phi_2 = _unipc_phi(ratio, hh)
    assert torch.isfinite(phi_1).all() and torch.isfinite(phi_2).all()
    assert phi_1[-1] == 0 and phi_2[-1] == 0
    for j, h in enumerate(hh.tolist()):
        f1, f2 = _unipc_phi(math.exp(h), h)
        assert abs(float(phi_1[j]) - f1) <= 1e-15 * max(abs(f1), 1e-300) + 1e-300
        assert abs(float(phi_2[j]) - f2) <= 1e-15 * max(abs(f2), 1e-300) + 1e-300
        if abs(h) > 1e-2:  # the closed forms are accurate here: the same values
            c1 = math.expm1(h) / h - 1
            assert abs(f1 - c1) <= 1e-13 * abs(c1) and abs(f2 - (c1 / h - 0.5)) <= 1e-12 * abs(c1 / h - 0.5)

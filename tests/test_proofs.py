"""The proofs package: every identity comes out as recorded, and `python -m proofs` exits 0.

`python -m proofs` runs once (writing its results as JSON too). The identities themselves compare
the library's code with references (Bayes' rule, diffusers' update formulas, the closed-form round
counts, the scheduler's own plan). Here each result is checked: the expected-to-hold ones hold (symbolic
ones are PROVED, not merely numeric; only the float checks of the torch code may be NUMERIC), the known
non-identities (DDIM composition at 0 < eta < 1, ...) are reported as failing with a counterexample and
with their documented defect proved. The zero test is itself checked not to be vacuous, and mutating a
coefficient, the drafts or the coupled noise makes the identities that use it fail.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import sympy as sp

import proofs
from proofs.algebra import Domain, LambdaLevels, Levels, canon, check, real
from proofs.registry import Status
from proofs.report import result_label

from _metrics import one_torch_thread  # noqa: F401  (autouse fixture)
from conftest import proofs_run


# identities checked symbolically must be proved symbolically, not only numerically
SYMBOLIC_FAMILIES = ("param.", "ddpm.", "ddim.", "flow.", "dpm.", "diffusers.", "kdiffusion.", "rounds.aggressive_limit",
                     "rounds.conservative_limit")
KNOWN_NON_IDENTITIES = {"ddim.eta_composition_not_exact", "ddim.frozen_v_does_not_compose",
                        "ddpm.fixed_large_not_composable", "dpm.2m_midpoint_not_exact"}
#: float checks of the torch code, NUMERICALLY VERIFIED by nature (every other identity must not be NUMERIC)
NUMERIC_IDENTITIES = {"operators.match_symbolic_mirrors", "operators.dpm_2m_matches_mirror", "operators.unipc_matches_mirror",
                      "operators.drafts_are_the_chain", "operators.coupled_noise_composed",
                      "operators.multistep_drafts_are_the_chain"}
DPM_IDENTITIES = {"dpm.first_order_is_ddim", "dpm.first_order_composes", "dpm.2m_frozen_is_first_order",
                  "dpm.unipc_bh2_is_2m_midpoint", "dpm.2m_heun_exact_linear_x0", "dpm.2m_midpoint_not_exact",
                  "dpm.conditional_path_exact", "diffusers.dpm_solver_pp_step", "operators.dpm_2m_matches_mirror"}


@pytest.fixture(scope="module")
def run():
    """One run of `python -m proofs` (the command users run), with every result also written as JSON; started
    in the background when collection selected this module (conftest.proofs_run)."""
    code, out, err, path = proofs_run()
    done = SimpleNamespace(returncode=code, stdout=out, stderr=err)
    results = {r["name"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    return done, results


@pytest.fixture(scope="module")
def outcomes(run):
    return run[1]


def test_python_m_proofs_exits_zero(run):
    done, _ = run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "All as expected." in done.stdout
    assert "ddim.eta_composition_not_exact" in done.stdout and "FAILS (known non-identity" in done.stdout


def test_registry_is_complete(outcomes):
    assert set(outcomes) == {i.name for i in proofs.load()}
    families = {r["family"] for r in outcomes.values()}
    assert {"DDPM", "DDIM", "Flow", "DPM-Solver++", "Parameterizations", "diffusers", "k-diffusion", "Rounds"} <= families
    assert {n for n, r in outcomes.items() if not r["expect_holds"]} == KNOWN_NON_IDENTITIES
    assert {n for n, r in outcomes.items() if r["numeric"]} == NUMERIC_IDENTITIES
    assert DPM_IDENTITIES <= set(outcomes)


@pytest.mark.parametrize("name", [i.name for i in proofs.load()])
def test_identity_is_as_recorded(outcomes, name):
    r = outcomes[name]
    assert r["status"] != "ERROR", r["detail"]
    if r["expect_holds"]:
        assert r["holds"], f"{name}: {r['status']}: {r['detail']}"
        if name.startswith(SYMBOLIC_FAMILIES):
            assert r["status"] in ("PROVED", "IN_DISTRIBUTION"), f"{name} only {r['status']}: {r['detail']}"
            assert all(v == "0" for v in r["residuals"].values()), r["residuals"]
        if not r["numeric"]:
            assert r["status"] != "NUMERIC", f"{name} is only numerically verified: {r['detail']}"
    else:
        assert r["status"] == "FAILS", f"{name} is a known non-identity but came out {r['status']}"
        cx = r["counterexample"]
        assert cx and cx["point"], "a failure must come with a counterexample"
        assert any(abs(float(v)) > 1e-6 for v in cx["residuals"].values())
        # it fails in the documented way: every documented part of its defect is proved
        assert r["defect_checks"] and all(r["defect_checks"].values()), r["defect_checks"]
    assert r["as_expected"]


def test_ddim_eta_composition_defect_is_reported(outcomes):
    r = outcomes["ddim.eta_composition_not_exact"]
    assert r["status"] == "FAILS"
    assert r["residuals"]["variance"] != "0" and r["residuals"]["x_t coefficient"] != "0"
    assert "At eta = 0 and eta = 1 the residuals are 0 (proved)" in r["detail"]
    assert r["counterexample"]["point"] == {"abar_t": "1/4", "abar_s": "1/2", "abar_u": "3/4", "eta": "1/2"}
    assert float(r["counterexample"]["residuals"]["variance"]) > 0


def test_dpm_midpoint_defect_is_reported(outcomes):
    """2M midpoint minus the exact step for x0_hat linear in lambda: alpha_t D phi(h), phi = -h^3/12 + O(h^4)."""
    from proofs.dpm import midpoint_defect_coefficients

    assert midpoint_defect_coefficients() == {3: sp.Rational(-1, 12), 4: sp.Rational(1, 24), 5: sp.Rational(-1, 80)}
    r = outcomes["dpm.2m_midpoint_not_exact"]
    assert r["status"] == "FAILS"
    assert "(proved); phi(h) = -h^3/12 + h^4/24 - h^5/80 + O(h^6)" in r["detail"]
    assert "leading term (-h^3/12) alpha_t D" in r["detail"]
    assert r["counterexample"]["point"]["lambda_t"] == "log(3)"
    # h = h0 = log 3, alpha_t = 1/4, D = (x0_s - x0_p)/h0 = (-1 - 4/3)/log 3: the defect alpha_t D phi(h) there
    h = sp.log(3)
    phi = h * (1 - sp.exp(-h)) / 2 - (h - 1 + sp.exp(-h))
    expected = sp.Rational(1, 4) * (-1 - sp.Rational(4, 3)) / h * phi
    assert abs(float(r["counterexample"]["residuals"]["midpoint - exact"]) - float(expected)) < 1e-5
    heun = outcomes["dpm.2m_heun_exact_linear_x0"]
    assert heun["status"] == "PROVED" and set(heun["residuals"]) == {
        "heun, x0 linear in lambda", "midpoint, constant x0", "heun, constant x0", "first order, constant x0"}


def test_lambda_levels_form():
    """LambdaLevels.form turns the library's log(alpha) - log(sigma) into lambda and exp(-h) into q_s/q_t,
    and refuses a logarithm it cannot write in the lambdas."""
    from driffusion_core import coefficients as C

    for interpolant in ("vp", "flow", "any"):
        lv = LambdaLevels(["s", "t"], interpolant)
        for n in "st":
            assert lv.form(C.log(lv.alpha[n]) - C.log(lv.sigma[n])) == lv.lam[n]
            assert canon(lv.alpha[n] / lv.sigma[n] - lv.q[n]) == 0
        assert lv.form(sp.exp(-(lv.lam["t"] - lv.lam["s"]))) == lv.q["s"] / lv.q["t"]
        with pytest.raises(ValueError):
            lv.form(sp.log(1 + lv.q["s"]))
    lv = LambdaLevels(["s", "t"])
    (subs, shown) = lv.domain.fixed
    assert shown == {"lambda_s": sp.log(sp.Rational(1, 2)), "lambda_t": sp.log(2)}
    assert subs[lv.gaps["s"]] == sp.log(4) and subs[lv.q["t"]] == 2
    # a near miss: the first-order coefficient against exp(-h) in place of e^{-2h} is caught
    c_x, c_x0 = C.dpm_solver_pp_coefficients(lv.alpha["s"], lv.sigma["s"], lv.alpha["t"], lv.sigma["t"])
    h = lv.gaps["s"]
    assert check({"ok": lv.form(c_x0 - lv.alpha["t"] * (1 - sp.exp(-h)))}, lv.domain).status is Status.PROVED
    miss = check({"miss": lv.form(c_x0 - lv.alpha["t"] * (1 - sp.exp(-2 * h)))}, lv.domain)
    assert miss.status is Status.FAILS


def test_zero_test_is_not_vacuous():
    """canon/check must tell a true identity from a near miss built from the same coefficients."""
    from driffusion_core import coefficients as C

    lv = Levels(["t", "s"])
    a_t, a_s = lv.abar["t"], lv.abar["s"]
    _, _, small = C.ddpm_posterior_coefficients(a_t, a_s)
    large = C.ddpm_large_variance(a_t, a_s)
    _, _, sigma = C.ddim_coefficients(a_t, a_s, 1)
    assert canon(sigma**2 - small) == 0
    assert canon(sp.sqrt(large) - sp.sqrt(small)) != 0
    miss = check({"sigma - sqrt(large)": sigma - sp.sqrt(large)}, lv.domain)
    assert miss.status is Status.FAILS and miss.counterexample is not None
    x = real("x")
    hit = check({"x * (sigma^2 - Var)": x * (sigma**2 - small)}, lv.domain & Domain.free([x]))
    assert hit.status is Status.PROVED


def test_a_wrong_coefficient_is_caught(monkeypatch):
    """Mutate the posterior variance the operators use: the identities built on it must fail."""
    from driffusion_core import coefficients as C

    right = C.ddpm_posterior_coefficients

    def wrong(abar_t, abar_s):
        c_x0, c_xt, var = right(abar_t, abar_s)
        return c_x0, c_xt, var * (1 + (1 - abar_s) / 1000)

    monkeypatch.setattr(C, "ddpm_posterior_coefficients", wrong)
    for name in ("ddpm.posterior_bayes", "ddpm.coupled_noise_2", "ddim.eta1_is_ddpm_posterior", "diffusers.ddpm_step"):
        (o,) = proofs.run_all(name)
        assert o.result.status is Status.FAILS and not o.as_expected, name


def test_a_wrong_posterior_variance_is_caught(monkeypatch):
    """PicardScheduler(norm='posterior')'s variance, mutated (its SNR ratio not squared): its identity fails."""
    from driffusion_core import coefficients as C

    def wrong(alpha_t, sigma_t, alpha_s, sigma_s):
        return sigma_s * sigma_s * (1 - alpha_t * sigma_s / (sigma_t * alpha_s))

    monkeypatch.setattr(C, "posterior_variance", wrong)
    (o,) = proofs.run_all("ddpm.posterior_variance_general")
    assert o.result.status is Status.FAILS and not o.as_expected


def test_a_wrong_dpm_coefficient_is_caught(monkeypatch):
    """Heun's 2M coefficients swapped for midpoint's, or a perturbed first-order step: the DPM identities fail."""
    from driffusion_core import coefficients as C

    right_2m, right_1 = C.dpm_solver_pp_2m_coefficients, C.dpm_solver_pp_coefficients
    monkeypatch.setattr(C, "dpm_solver_pp_2m_coefficients",
                        lambda *args: right_2m(*args[:6], "midpoint"))
    for name in ("dpm.2m_heun_exact_linear_x0", "diffusers.dpm_solver_pp_step"):
        (o,) = proofs.run_all(name)
        assert o.result.status is Status.FAILS and not o.as_expected, name
    monkeypatch.setattr(C, "dpm_solver_pp_2m_coefficients", right_2m)

    def wrong(alpha_s, sigma_s, alpha_t, sigma_t):
        c_x, c_x0 = right_1(alpha_s, sigma_s, alpha_t, sigma_t)
        return c_x, c_x0 * (1 + sigma_t / 1000)

    monkeypatch.setattr(C, "dpm_solver_pp_coefficients", wrong)
    for name in ("dpm.first_order_is_ddim", "dpm.first_order_composes", "dpm.2m_heun_exact_linear_x0",
                 "dpm.conditional_path_exact", "diffusers.dpm_solver_pp_step"):
        (o,) = proofs.run_all(name)
        assert o.result.status is Status.FAILS and not o.as_expected, name


def test_a_wrong_unipc_predictor_coefficient_is_caught(monkeypatch):
    """UniP-2's second-order weight 1/2 made 1/3 (c_p = -alpha_t B(h) / (3 r)): it is no longer 2M midpoint
    (dpm.unipc_bh2_is_2m_midpoint) nor diffusers' multistep_uni_p_bh_update (diffusers.unipc_step)."""
    from driffusion_core import coefficients as C

    right = C.unipc_predictor_coefficients

    def wrong(*args):
        c_x, c_s, c_p = right(*args)
        bent = c_p * 2 / 3  # -a_b / (2 r) -> -a_b / (3 r)
        return c_x, c_s + c_p - bent, bent

    monkeypatch.setattr(C, "unipc_predictor_coefficients", wrong)
    ran = {}
    for name in ("dpm.unipc_bh2_is_2m_midpoint", "diffusers.unipc_step"):
        (ran[name],) = proofs.run_all(name)
        assert ran[name].result.status is Status.FAILS and not ran[name].as_expected, name
    cx = ran["dpm.unipc_bh2_is_2m_midpoint"].result.counterexample
    assert abs(float(cx["residuals"]["UniP-2 (bh2) - 2M midpoint"])) > 1e-3, cx
    assert set(ran["diffusers.unipc_step"].result.counterexample["residuals"]) == {"bh1, predictor 2", "bh2, predictor 2"}


def test_a_non_finite_operator_output_is_a_failure_not_an_error(monkeypatch):
    """DPMSolverSkip.multistep giving NaN in one element, or a 2M coefficient that is NaN in torch and nan in the
    exact mirror: operators.dpm_2m_matches_mirror FAILS naming the operator and the point (the latter once raised
    TypeError: cannot create mpf from nan); _Tally takes a non-finite value on either side as a failure."""
    from driffusion_core import coefficients as C
    from proofs.operator_checks import _Tally
    from solvers import DPMSolverSkip

    right = DPMSolverSkip.multistep

    def nan_in_row_1(self, *args, **kwargs):
        out = right(self, *args, **kwargs).clone()
        out[1, 2] = float("nan")
        return out

    monkeypatch.setattr(DPMSolverSkip, "multistep", nan_in_row_1)
    (o,) = proofs.run_all("operators.dpm_2m_matches_mirror")
    assert o.result.status is Status.FAILS and not o.as_expected, o.result.detail
    assert "not finite (torch nan" in o.result.detail and "DPMSolverSkip(vp, epsilon, midpoint)" in o.result.detail
    assert "row 1, channel 2" in o.result.detail, o.result.detail
    monkeypatch.setattr(DPMSolverSkip, "multistep", right)
    right_2m = C.dpm_solver_pp_2m_coefficients

    def nan_both_sides(*args):  # c_prev * 0/0: NaN in torch, nan in sympy (the mirror calls it too)
        c_x, c_x0, c_prev = right_2m(*args)
        zero = args[0] - args[0]
        return c_x, c_x0, c_prev * zero / zero

    monkeypatch.setattr(C, "dpm_solver_pp_2m_coefficients", nan_both_sides)
    (o,) = proofs.run_all("operators.dpm_2m_matches_mirror")
    assert o.result.status is Status.FAILS and "not finite (torch nan, exact mirror nan)" in o.result.detail, o.result.detail
    tally = _Tally()
    tally.add(0.25, sp.Rational(1, 4), "fine")
    assert tally.result().status is Status.NUMERIC
    for got, exact in ((1.0, sp.nan), (1.0, sp.zoo), (float("inf"), sp.Float(1)), (0.5, sp.Float(float("nan"), 40))):
        tally = _Tally()
        tally.add(0.25, sp.Rational(1, 4), "fine")
        tally.add(got, exact, "the bad point")
        r = tally.result()
        assert r.status is Status.FAILS and "the bad point: not finite" in r.detail, (got, exact, r.detail)


def test_numeric_fallback_is_labelled():
    """An identity sympy's exact test cannot close is reported as numerically verified, not proved."""
    lv = Levels(["t"])
    y = lv.abar["t"]
    r = check({"sin^2 + cos^2 - 1": sp.sin(y) ** 2 + sp.cos(y) ** 2 - 1}, lv.domain, points=5)
    assert r.status is Status.NUMERIC
    assert "numerically verified at 6 points" in r.detail


def test_rounds_are_read_from_sample():
    """The enumeration drives the state machine as DraftRefineScheduler.sample does."""
    import torch

    from driffusion_core import DraftRefineScheduler, FlowSchedule
    from proofs.rounds import drive
    from solvers import FlowEulerSkip

    schedule = FlowSchedule()
    for T, n, mode in ((7, 3, "aggressive"), (9, 2, "conservative"), (1, 4, "conservative"), (12, 5, "aggressive")):
        out = DraftRefineScheduler(FlowEulerSkip(schedule), schedule.timesteps(T), width=n, mode=mode).sample(
            lambda x, t: torch.zeros_like(x), torch.zeros(1, 1, dtype=torch.float64)
        )
        rounds, evals, _ = drive(T, n, mode)
        assert (out.rounds, out.evals) == (rounds, evals)


def test_a_wrong_ddim_chain_factor_is_caught(monkeypatch):
    """ddim_chain_coefficients' c_x off by a factor that is 1 at eta = 0 and eta = 1: the chain factors are no
    longer the DDIM step (for 0 < eta < 1), and the documented eta-composition defect no longer holds."""
    from driffusion_core import coefficients as C

    right = C.ddim_chain_coefficients

    def wrong(abar_t, abar_s, eta=0):
        c_x0, c_x, sigma = right(abar_t, abar_s, eta)
        bent = c_x * (1 + eta * (1 - eta) / 10)
        return c_x0 + (c_x - bent) * C.sqrt(abar_t), bent, sigma

    monkeypatch.setattr(C, "ddim_chain_coefficients", wrong)
    ran = {}
    for name in ("ddim.chain_factors_are_step", "ddim.chain_drafts_3", "ddim.eta_composition_not_exact",
                 "operators.drafts_are_the_chain"):
        (ran[name],) = proofs.run_all(name)
        assert not ran[name].as_expected, name
    o = ran["ddim.eta_composition_not_exact"]
    assert o.result.status is Status.FAILS and not o.result.defect_proved
    assert "UNEXPECTED" in result_label(o) and "documented defect NOT proved" in result_label(o)


def test_a_wrong_midpoint_coefficient_breaks_the_documented_defect(monkeypatch):
    """Dropping the 1/2 of the 2M midpoint correction: the midpoint is still not exact (it FAILS), but not in the
    documented way (alpha_t D phi(h)), so the known non-identity is not as expected."""
    from driffusion_core import coefficients as C

    right = C.dpm_solver_pp_2m_coefficients

    def wrong(*args):
        c_x, c_x0, c_prev = right(*args)
        if (args[6] if len(args) > 6 else "midpoint") != "midpoint":
            return c_x, c_x0, c_prev
        return c_x, c_x0 - c_prev, 2 * c_prev  # d -> 2 d

    monkeypatch.setattr(C, "dpm_solver_pp_2m_coefficients", wrong)
    (o,) = proofs.run_all("dpm.2m_midpoint_not_exact")
    assert o.result.status is Status.FAILS
    assert o.result.defect_checks["midpoint - exact = alpha_t D phi(h)"] is False
    assert not o.as_expected


def _ddim_chain_factors_at_eta0(op, t_from, t_to):
    """DDIMSkip.chain_factors with eta forced to 0 (a mutation)."""
    from driffusion_core import coefficients as C

    return C.ddim_chain_coefficients(op.schedule.alpha_bar(t_from), op.schedule.alpha_bar(t_to), 0.0)


def test_wrong_drafts_and_coupled_noise_are_caught(monkeypatch):
    """The torch drafts / coupled noise checked against the proved chain: DDIMSkip.chain_factors at eta 0, or
    coupling rows scaled by 1.1, make operators.drafts_are_the_chain / operators.coupled_noise_composed fail; a
    noiseless one-step window's coupling left 0 (not its own noise z_a) fails operators.one_level_draft_is_step
    (a convention no sample can see, pinned so that _coupling stays what the proofs describe)."""
    import torch

    from driffusion_core.transition import SkipTransition
    from solvers import DDIMSkip

    right_factors, right_coupling = DDIMSkip.chain_factors, SkipTransition._coupling
    monkeypatch.setattr(DDIMSkip, "chain_factors", _ddim_chain_factors_at_eta0)
    for name in ("operators.drafts_are_the_chain", "operators.coupled_noise_composed"):
        (o,) = proofs.run_all(name)
        assert o.result.status is Status.FAILS and not o.as_expected, name
    monkeypatch.setattr(DDIMSkip, "chain_factors", right_factors)
    monkeypatch.setattr(SkipTransition, "_coupling", lambda self, t_from, t_to: 1.1 * right_coupling(self, t_from, t_to))
    (o,) = proofs.run_all("operators.coupled_noise_composed")
    assert o.result.status is Status.FAILS and not o.as_expected

    def no_noiseless_row(self, t_from, t_to):  # a noiseless row left 0 instead of e_j (its step's own noise)
        _, _, W = self._chain(t_from, t_to)
        norms = torch.linalg.vector_norm(W, dim=1, keepdim=True)
        return W / torch.where(norms > 0, norms, torch.ones_like(norms))

    monkeypatch.setattr(SkipTransition, "_coupling", no_noiseless_row)
    (o,) = proofs.run_all("operators.one_level_draft_is_step")
    assert o.result.status is Status.FAILS and "s_0 = 0" in o.result.detail, o.result.detail


def test_a_wrong_euler_ancestral_step_and_wrong_multistep_drafts_are_caught(monkeypatch):
    """VEAncestralSkip with sigma_down 10 % too large (in the solver, not in the shared coefficient function)
    fails the mirror and chain checks; DPMSolverSkip's drafts after a 2M anchor step with x0_hat 1 % off fail
    operators.multistep_drafts_are_the_chain (both once passed every identity)."""
    from solvers import dpm, ve

    right = ve.VEAncestralSkip._coefficients
    monkeypatch.setattr(ve.VEAncestralSkip, "_coefficients",
                        lambda self, a, b: (lambda d, u: (1.1 * d, u))(*right(self, a, b)))
    for name in ("operators.match_symbolic_mirrors", "operators.drafts_are_the_chain"):
        (o,) = proofs.run_all(name)
        assert o.result.status is Status.FAILS and "VEAncestralSkip" in o.result.detail, (name, o.result.detail)
    monkeypatch.setattr(ve.VEAncestralSkip, "_coefficients", right)
    first_order = dpm.DPMSolverSkip._first_order_from
    monkeypatch.setattr(dpm.DPMSolverSkip, "_first_order_from",
                        lambda self, s, x0, a, b: first_order(self, s, 1.01 * x0, a, b))
    (o,) = proofs.run_all("operators.multistep_drafts_are_the_chain")
    assert o.result.status is Status.FAILS and "DPMSolverSkip" in o.result.detail, o.result.detail


def test_numeric_is_not_enough_and_a_known_failure_needs_its_defect():
    """A symbolic identity that only reaches NUMERICALLY VERIFIED is not as expected (only identities
    registered numeric=True, the float checks of the code, may be); a known non-identity that fails without
    its documented defect proved is not as expected either."""
    from proofs.registry import Identity, Outcome, Result

    def outcome(status, expect_holds=True, numeric=False, defect=None):
        ident = Identity("x.y", "X", "a claim", expect_holds, lambda: None, numeric)
        return Outcome(ident, Result(status, defect_checks=defect or {}), 0.0)

    assert not outcome(Status.NUMERIC).as_expected
    assert "UNEXPECTED" in result_label(outcome(Status.NUMERIC))
    assert outcome(Status.NUMERIC, numeric=True).as_expected
    assert outcome(Status.PROVED).as_expected
    assert not outcome(Status.FAILS, expect_holds=False).as_expected  # no documented defect
    assert not outcome(Status.FAILS, expect_holds=False, defect={"formula": True, "end points": False}).as_expected
    assert outcome(Status.FAILS, expect_holds=False, defect={"formula": True}).as_expected
    assert not outcome(Status.PROVED, expect_holds=False, defect={"formula": True}).as_expected


def test_a_wrong_clipped_eps_euler_ancestral_eta0_or_refine_is_caught(monkeypatch):
    """Three paths a reviewer's mutations once slipped past: eps_hat re-derived from the clipped x0_hat with the
    wrong conversion (recompute_eps), VEAncestralSkip's own eta = 0 branch, and a refinement that steps with the
    anchor's prediction instead of each level's own."""
    from driffusion_core import DraftRefineState
    from driffusion_core import coefficients as C

    import types

    from driffusion_core import parameterization

    # the torch side only (the mirrors read the true module): re-derive eps_hat as if x0_hat were an eps
    wrong_module = types.SimpleNamespace(**vars(C))
    wrong_module.x0_eps_coefficients = lambda kind, alpha, sigma: C.x0_eps_coefficients(
        "epsilon" if kind == "sample" else kind, alpha, sigma)
    monkeypatch.setattr(parameterization, "C", wrong_module)
    (o,) = proofs.run_all("operators.match_symbolic_mirrors")
    assert o.result.status is Status.FAILS and "ClipSample" in o.result.detail, o.result.detail
    monkeypatch.setattr(parameterization, "C", C)

    right_ancestral = C.ve_ancestral_coefficients

    def wrong_eta0(sigma_t, sigma_s, eta=1.0):
        down, up = right_ancestral(sigma_t, sigma_s, eta)
        return (down * 1.01, up) if isinstance(eta, float) and eta == 0 else (down, up)  # the operator's float eta

    monkeypatch.setattr(C, "ve_ancestral_coefficients", wrong_eta0)
    (o,) = proofs.run_all("operators.match_symbolic_mirrors")
    assert o.result.status is Status.FAILS and not o.as_expected
    monkeypatch.setattr(C, "ve_ancestral_coefficients", right_ancestral)

    right_step = DraftRefineState.step
    monkeypatch.setattr(DraftRefineState, "step", lambda self, x, pred, i: right_step(self, x, self.pred, i))
    (o,) = proofs.run_all("rounds.refine_replays_the_serial_steps")
    assert o.result.status is Status.FAILS and not o.as_expected

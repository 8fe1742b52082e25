r"""The torch operators against the symbolic proofs: mirrors agree, drafts are the chain, coupled noise
is the composed noise.

The symbolic proofs are about :mod:`proofs.operators`, mirrors of the operators' ``__call__``
composed from the same coefficient functions. Here the real operators (``solvers.DDIMSkip``,
``DDPMSkip``, ``FlowEulerSkip``, ``VEEulerSkip``, ``VEAncestralSkip``, ``DPMSolverSkip``, float64, per-row levels
in one batched call) are
evaluated against the exact mirror at the same schedule values (DPM-Solver++'s 2M step, which takes the
previous step too, in its own identity), and a window's first draft is compared bit for bit with
the serial step (``DraftRefineState.step`` is exactly ``transition(x, p, t_from[i], t_to[i], z_i)``).
For the stochastic operators (DDPM, DDIM with eta > 0, VE ancestral) every row of ``SkipTransition.drafts`` is
compared with the chain of the operator's own one-level steps with x0_hat frozen on the same per-step
noise, and ``chain_factors``, ``_coupling``, ``coupled_noise`` and ``skip`` with the proved
``ddim_chain_coefficients`` / ``ddpm_posterior_coefficients`` / ``ve_ancestral_chain_coefficients`` factors and
``chain_noise_weights``; the multistep operators' drafts after a multistep anchor step (DPM-Solver++ 2M,
UniPC) with the chain of their own ``multistep`` steps, x0_hat frozen.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import mpmath
import sympy as sp
import torch

from driffusion_core import FlowSchedule, NoiseSource, VPSchedule
from driffusion_core import coefficients as C
from proofs.operators import (
    ddim_step, ddpm_std, ddpm_step, dpm_2m_step, dpm_step, flow_step, unipc_step, ve_ancestral_step, ve_euler_step,
    flow_x0_eps, ve_x0_eps, vp_x0_eps,
)
from proofs.registry import Result, Status, identity

__all__ = ["operator_cases", "chain_cases"]

F64 = torch.float64
#: relative agreement required between the float64 operator and the exact mirror
REL_TOL = 1e-12

VP_LEVEL_PAIRS = [(999.0, 979.0), (999.0, -1.0), (500.0, 250.0), (500.5, 10.25), (37.0, 36.0), (1.0, 0.0), (0.0, -1.0)]
FLOW_LEVEL_PAIRS = [(1.0, 0.98), (1.0, 0.0), (0.7, 0.2), (0.5, 0.4999), (0.03, 0.0)]
# an epsilon-parameterized flow cannot recover x0 at sigma = 1 (x0_hat = (x - eps)/0): skip that level
FLOW_EPSILON_LEVEL_PAIRS = [(t, s) for t, s in FLOW_LEVEL_PAIRS if t < 1.0]
# DPM-Solver++ 2M: (previous, current, target) levels; a target at sigma = 0 takes the first-order step, and
# a previous level at flow's sigma = 1 has lambda = -inf (h_0 = inf: the step is first order there too)
VP_LEVEL_TRIPLES = [(999.0, 979.0, 959.0), (999.0, 500.0, 1.0), (500.5, 250.0, 10.25), (37.0, 36.0, 35.0),
                    (2.0, 1.0, 0.0), (3.0, 1.0, -1.0), (100.0, 50.0, -1.0)]
# VE (k-diffusion): levels are sigmas, the clean end 0
VE_LEVEL_PAIRS = [(80.0, 60.0), (80.0, 0.0), (14.6, 0.03), (1.0, 0.999), (0.5, 0.0), (0.002, 0.0)]
#: VEAncestralSkip's etas (k-diffusion's sample_euler_ancestral: 1; eta = 0 is the Euler step, VEEulerSkip's)
VE_ANCESTRAL_ETAS = (0.5, 1.0)
VE_LEVEL_TRIPLES = [(80.0, 60.0, 40.0), (14.6, 1.0, 0.03), (0.5, 0.499, 0.498), (2.0, 1.0, 0.0)]
FLOW_LEVEL_TRIPLES = [(1.0, 0.7, 0.4), (0.9, 0.6, 0.3), (0.5, 0.4999, 0.4998), (0.3, 0.2, 0.0), (0.2, 0.1, 0.05)]


def operator_cases() -> List[Tuple[str, object, Callable, str]]:
    """(label, torch operator, symbolic mirror(x, p, level_t, level_s, z), "vp" | "flow" | "ve")."""
    from driffusion_core import ClipSample
    from solvers import DDIMSkip, DDPMSkip, DPMSolverSkip, FlowEulerSkip, VEAncestralSkip, VEEulerSkip, VESchedule

    vp, flow, ve = VPSchedule.linear(), FlowSchedule(), VESchedule()
    cases = []
    for kind in ("epsilon", "sample", "v_prediction"):
        for eta in (0.0, 0.3, 1.0):
            cases.append((f"DDIMSkip({kind}, eta={eta:g})", DDIMSkip(vp, kind, eta=eta),
                          lambda x, p, a, b, z, k=kind, e=eta: ddim_step(k, x, p, a, b, sp.nsimplify(e), z), "vp"))
        # the x0 transform (clip_sample), with and without use_clipped_model_output: the clamp acts at the
        # noisy levels, where x0_hat of unit-scale x and p is far outside [-1, 1]
        for eta in (0.0, 1.0):
            for recompute in (False, True):
                cases.append((f"DDIMSkip({kind}, eta={eta:g}, ClipSample(1), recompute_eps={recompute})",
                              DDIMSkip(vp, kind, eta=eta, x0_transform=ClipSample(1.0), recompute_eps=recompute),
                              lambda x, p, a, b, z, k=kind, e=eta, r=recompute:
                                  ddim_step(k, x, p, a, b, sp.nsimplify(e), z, clip=1, recompute=r), "vp"))
        for vt in ("fixed_small", "fixed_large"):
            cases.append((f"DDPMSkip({kind}, {vt})", DDPMSkip(vp, kind, variance_type=vt),
                          lambda x, p, a, b, z, k=kind, v=vt: ddpm_step(k, x, p, a, b, z, v), "vp"))
        cases.append((f"DPMSolverSkip({kind})", DPMSolverSkip(vp, kind),
                      lambda x, p, a, b, z, k=kind: dpm_step(k, x, p, a, b), "vp"))
    for kind in ("velocity", "epsilon", "sample"):
        cases.append((f"FlowEulerSkip({kind})", FlowEulerSkip(flow, kind),
                      lambda x, p, a, b, z, k=kind: flow_step(k, x, p, a, b), "flow"))
        cases.append((f"FlowEulerSkip({kind}, ClipSample(1))", FlowEulerSkip(flow, kind, x0_transform=ClipSample(1.0)),
                      lambda x, p, a, b, z, k=kind: flow_step(k, x, p, a, b, clip=1), "flow"))
        cases.append((f"DPMSolverSkip(flow, {kind})", DPMSolverSkip(flow, kind),
                      lambda x, p, a, b, z, k=kind: dpm_step(k, x, p, a, b, "flow"), "flow"))
    for kind in ("sample", "epsilon"):
        cases.append((f"VEEulerSkip({kind})", VEEulerSkip(ve, kind),
                      lambda x, p, a, b, z, k=kind: ve_euler_step(k, x, p, a, b), "ve"))
        cases.append((f"DPMSolverSkip(ve, {kind})", DPMSolverSkip(ve, kind),
                      lambda x, p, a, b, z, k=kind: dpm_step(k, x, p, a, b, "ve"), "ve"))
        for eta in (0.0, *VE_ANCESTRAL_ETAS):  # eta = 0: the Euler step, through its own branch
            cases.append((f"VEAncestralSkip({kind}, eta={eta:g})", VEAncestralSkip(ve, prediction=kind, eta=eta),
                          lambda x, p, a, b, z, k=kind, e=eta: ve_ancestral_step(k, x, p, a, b, sp.nsimplify(e), z), "ve"))
    return cases


def _numeric(detail: str, bad: list, how: str) -> Result:
    """NUMERIC when no value is off by more than ``REL_TOL`` (or not finite), else FAILS naming the first one."""
    if bad:
        return Result(Status.FAILS, {}, f"{detail}; above {REL_TOL:g} or not finite: {bad[0]}", {"failures": bad})
    return Result(Status.NUMERIC, {}, f"{detail} ({how}; tolerance {REL_TOL:g}).")


class _Tally:
    """Float64 values of the torch code against 40-digit exact mirror values: the relative differences
    |got - exact| / (1 + |exact|), their largest, their count, and where one exceeds ``REL_TOL``. A value that is
    not finite on either side (NaN or inf from the torch code, nan / zoo from the mirror) is a failure at its
    point, not an error."""

    def __init__(self) -> None:
        self.worst, self.points, self.bad = 0.0, 0, []

    def add(self, got: float, exact, where: str) -> None:
        """``exact``: an mpmath number, or a sympy number (converted at 40 digits when finite)."""
        if isinstance(exact, sp.Basic):
            exact = mpmath.mpf(sp.Float(exact, 40)) if exact.is_finite and exact.is_real else exact
        finite = not isinstance(exact, sp.Basic) and mpmath.isfinite(exact) and mpmath.isfinite(got)
        if not finite:
            self.points += 1
            self.bad.append(f"{where}: not finite (torch {got!r}, exact mirror {exact})")
            return
        rel = float(abs(mpmath.mpf(got) - exact) / (1 + abs(exact)))
        self.worst = max(self.worst, rel)
        self.points += 1
        if not rel <= REL_TOL:
            self.bad.append(f"{where}: relative error {rel:.2e}")

    def result(self, what: str = "") -> Result:
        detail = f"{self.points} values{what}, max relative difference {self.worst:.1e}"
        return _numeric(detail, self.bad, "float64 against 40-digit exact")


def _exact(v: torch.Tensor) -> sp.Float:
    """A float64 tensor element as a 40-digit sympy number (exactly its value)."""
    return sp.Float(mpmath.mpf(v.item()), 40)


def _per_case(errors: Dict[str, float], what: str) -> Result:
    """:func:`_numeric` over one relative difference per case (``where -> error``), float64 checks."""
    worst = max(errors.values(), default=0.0)
    bad = [f"{where}: relative difference {err:.2e}" for where, err in errors.items() if not err <= REL_TOL]
    return _numeric(f"{len(errors)} {what}, max relative difference {worst:.1e}", bad, "float64")


@identity(
    "operators.match_symbolic_mirrors",
    "Operators (code)",
    "The torch operators DDIMSkip (eta 0, 0.3, 1; and eta 0, 1 with x0_transform=ClipSample(1), recompute_eps "
    "off and on), DDPMSkip (fixed_small, fixed_large), FlowEulerSkip (also with ClipSample(1)), VEEulerSkip, "
    "VEAncestralSkip (eta 0, 0.5, 1), DPMSolverSkip (first order, VP, flow and VE), every prediction type, "
    "float64 with per-row levels, equal the "
    "symbolic steps proved above, evaluated exactly at the same schedule values (no noise at t_from = 0 for "
    "DDPM, as the operator and diffusers; an epsilon flow is undefined at sigma = 1 and skipped there).",
    numeric=True,
)
def match_symbolic_mirrors() -> Result:
    xs, ps, zs, at, as_ = sp.symbols("x p z abar_t abar_s", real=True)
    tally = _Tally()
    for label, op, mirror, family in operator_cases():
        pairs = {"vp": VP_LEVEL_PAIRS, "flow": FLOW_LEVEL_PAIRS, "ve": VE_LEVEL_PAIRS}[family]
        if family == "flow" and "epsilon" in label:
            pairs = FLOW_EPSILON_LEVEL_PAIRS
        t_from = torch.tensor([a for a, _ in pairs], dtype=F64)
        t_to = torch.tensor([b for _, b in pairs], dtype=F64)
        n = len(pairs)
        g = torch.Generator().manual_seed(0)
        x, p, z = (torch.randn(n, 3, generator=g, dtype=F64) for _ in range(3))
        out = op(x, p, t_from, t_to, z if op.stochastic else None)
        if family == "vp":
            lv_t, lv_s = op.schedule.alpha_bar(t_from), op.schedule.alpha_bar(t_to)
        else:
            lv_t, lv_s = t_from, t_to
        f = sp.lambdify((xs, ps, at, as_, zs), mirror(xs, ps, at, as_, zs), modules="mpmath")
        with mpmath.workdps(40):
            for i in range(n):
                noisy = op.stochastic and not (family == "vp" and "DDPM" in label and t_from[i] <= 0)
                for c in range(3):
                    exact = f(mpmath.mpf(x[i, c].item()), mpmath.mpf(p[i, c].item()), mpmath.mpf(lv_t[i].item()),
                              mpmath.mpf(lv_s[i].item()), mpmath.mpf(z[i, c].item()) if noisy else 0)
                    tally.add(out[i, c].item(), exact, f"{label} at {pairs[i]}")
    return tally.result(f" from {len(operator_cases())} operators")


@identity(
    "operators.dpm_2m_matches_mirror",
    "Operators (code)",
    "The torch DPMSolverSkip.multistep (2M, midpoint and heun, VP, flow and VE, every prediction type, float64, "
    "per-row levels, history = the previous state, output and level) equals the symbolic 2M step proved "
    "above, evaluated exactly at the same schedule values, including its first-order step to sigma = 0.",
    numeric=True,
)
def dpm_2m_matches_mirror() -> Result:
    from solvers import DPMSolverSkip, VESchedule

    tally = _Tally()
    with mpmath.workdps(40):
        for family, schedule, kinds, triples in (
            ("vp", VPSchedule.linear(), ("epsilon", "sample", "v_prediction"), VP_LEVEL_TRIPLES),
            ("flow", FlowSchedule(), ("velocity", "epsilon", "sample"), FLOW_LEVEL_TRIPLES),
            ("ve", VESchedule(), ("sample", "epsilon"), VE_LEVEL_TRIPLES),
        ):
            for kind in kinds:
                rows = [tr for tr in triples if not (kind == "epsilon" and family == "flow" and tr[0] >= 1.0)]
                t_p, t_s, t_t = (torch.tensor(col, dtype=F64) for col in zip(*rows))
                if family == "vp":
                    lv_p, lv_s, lv_t = (schedule.alpha_bar(t) for t in (t_p, t_s, t_t))
                else:
                    lv_p, lv_s, lv_t = t_p, t_s, t_t
                g = torch.Generator().manual_seed(1)
                x_p, p_p, x, p = (torch.randn(len(rows), 3, generator=g, dtype=F64) for _ in range(4))
                for solver_type in ("midpoint", "heun"):
                    op = DPMSolverSkip(schedule, kind, solver_type=solver_type)
                    out = op.multistep(x, p, t_s, t_t, [(x_p, p_p, t_p)])
                    for i in range(len(rows)):
                        for c in range(3):
                            history = (_exact(x_p[i, c]), _exact(p_p[i, c]), _exact(lv_p[i]))
                            exact = dpm_2m_step(kind, _exact(x[i, c]), _exact(p[i, c]), history, _exact(lv_s[i]),
                                                _exact(lv_t[i]), solver_type, family)
                            tally.add(out[i, c].item(), exact,
                                      f"DPMSolverSkip({family}, {kind}, {solver_type}) at {rows[i]}, row {i}, "
                                      f"channel {c}")
    return tally.result()


# UniPC: (pp, p, s, t). Its order-2 corrector weights (phi_2 = phi_1 / (-h) - 1/2) lose about log10(1/h^2)
# digits to cancellation as the steps shrink (diffusers' formula, there in float32): steps of h >= 0.01 here
VP_LEVEL_QUADS = [(999.0, 979.0, 959.0, 939.0), (999.0, 700.0, 500.0, 1.0), (600.0, 500.5, 250.0, 10.25),
                  (44.0, 40.0, 36.0, 32.0), (5.0, 3.0, 1.0, -1.0)]
FLOW_LEVEL_QUADS = [(0.95, 0.7, 0.4, 0.2), (0.5, 0.49, 0.48, 0.47), (0.4, 0.3, 0.2, 0.0)]


@identity(
    "operators.unipc_matches_mirror",
    "Operators (code)",
    "The torch UniPCSkip.multistep (bh1 and bh2, VP and flow, every prediction type, float64, per-row levels, "
    "history = the two earlier steps' states, outputs and levels) equals the symbolic UniPC step proved above "
    "(diffusers.unipc_step: corrector, then predictor), evaluated exactly at the same schedule values, for every "
    "(predictor, corrector) order pair a step takes, including the first-order step into sigma = 0.",
    numeric=True,
)
def unipc_matches_mirror() -> Result:
    from solvers import UniPCSkip

    tally = _Tally()
    with mpmath.workdps(40):
        for family, schedule, kinds, quads in (
            ("vp", VPSchedule.linear(), ("epsilon", "sample", "v_prediction"), VP_LEVEL_QUADS),
            ("flow", FlowSchedule(), ("velocity", "epsilon", "sample"), FLOW_LEVEL_QUADS),
        ):
            cols = [torch.tensor(c, dtype=F64) for c in zip(*quads)]
            lv = [schedule.alpha_bar(c) if family == "vp" else c for c in cols]
            g = torch.Generator().manual_seed(2)
            x_pp, p_pp, x_p, p_p, x, p = (torch.randn(len(quads), 3, generator=g, dtype=F64) for _ in range(6))
            for kind in kinds:
                for solver_type in ("bh1", "bh2"):
                    for order, n_hist in ((2, 1), (2, 2), (1, 1)):
                        op = UniPCSkip(schedule, kind, order=order, solver_type=solver_type)
                        hist = [(x_pp, p_pp, cols[0]), (x_p, p_p, cols[1])][2 - n_hist:]
                        out = op.multistep(x, p, cols[2], cols[3], hist)
                        for i in range(len(quads)):
                            orders = op.orders(n_hist, cols[3][i])
                            for c in range(3):
                                h = [(_exact(a[i, c]), _exact(b[i, c]), _exact(lv[k][i])) for k, (a, b) in
                                     enumerate([(x_pp, p_pp), (x_p, p_p)])][2 - n_hist:]
                                exact = unipc_step(kind, _exact(x[i, c]), _exact(p[i, c]), h, _exact(lv[2][i]),
                                                   _exact(lv[3][i]), orders, solver_type, family)
                                tally.add(out[i, c].item(), exact,
                                          f"UniPCSkip({family}, {kind}, {solver_type}, order {order}, "
                                          f"{n_hist} earlier) at {quads[i]}")
    return tally.result()


@identity(
    "operators.one_level_draft_is_step",
    "Operators (code)",
    "A window's first draft is the serial step: drafts(x, p, t_from[a:a+n], t_to[a:a+n], z)[0] == "
    "S(x, p, t_from[a] -> t_to[a], z_a) bit for bit for every operator of operators.match_symbolic_mirrors, "
    "float32 and float64; and the unit coupled noise of a one-step window is z_a itself: chain_noise_weights of "
    "one step is [s_0] (evaluated on symbols), the stochastic operators' _coupling of every one-step window of "
    "the grid is [[1]] exactly, for a noisy step (w_0/|w_0| with w_0 = s_0 > 0) and a noiseless one (s_0 = 0: "
    "the e_0 row), and coupled_noise's row is z_a bit for bit. (The noiseless case pins _coupling's convention for "
    "a zero-norm row: samples cannot see it, coupled_noise writes row 0 and a noiseless step scales it by 0.)",
)
def one_level_draft_is_step() -> Result:
    B, s = sp.symbols("B_0 s_0", real=True)
    weights = C.chain_noise_weights([B], [s])
    residuals = {"chain_noise_weights([B_0], [s_0]) - [s_0]": sp.expand(weights[0] - s) if len(weights) == 1 else sp.nan}
    if residuals["chain_noise_weights([B_0], [s_0]) - [s_0]"] != 0:
        return Result(Status.FAILS, residuals, f"chain_noise_weights([B_0], [s_0]) = {weights}, not [s_0].")
    cases, mismatches, windows, noiseless = 0, [], 0, 0
    for label, op, _, family in operator_cases():
        # flow levels below sigma = 1, where an epsilon model cannot give x0_hat
        grid = op.schedule.timesteps(12, "trailing") if family == "vp" else op.schedule.grid(
            torch.linspace(0.95, 0.05, 12, dtype=F64))
        noise = NoiseSource(7)
        if op.stochastic:  # the coupling of each one-step window, against its step's own std s_0
            for a in range(len(grid)):
                t_f, t_t = grid.t_from[a : a + 1], grid.t_to[a : a + 1]
                std = float(torch.as_tensor(op.chain_factors(t_f, t_t)[2], dtype=F64).reshape(-1)[0])
                z = noise(a, (1, 4, 3), F64)
                u, row = op._coupling(t_f, t_t), op.coupled_noise(t_f, t_t, z)
                windows += 1
                noiseless += std == 0
                if not (torch.equal(u, torch.ones(1, 1, dtype=F64)) and torch.equal(row[0], z[0])):
                    mismatches.append(f"{label} one-step window at step {a} (s_0 = {std:g}): _coupling = {u.tolist()}"
                                      f"{'' if torch.equal(row[0], z[0]) else ', coupled noise is not z_a'}")
        for dtype in (torch.float32, F64):
            x = noise.initial((4, 3), dtype)
            p = noise(100, (4, 3), dtype)
            for a, n in ((0, 1), (0, 5), (6, 6), (11, 1)):
                zs = torch.stack([noise(a + k, x.shape, dtype) for k in range(n)]) if op.stochastic else None
                row0 = op.drafts(x, p, grid.t_from[a : a + n], grid.t_to[a : a + n], zs)[0]
                step = op(x, p, grid.t_from[a], grid.t_to[a], zs[0] if zs is not None else None)
                cases += 1
                if not torch.equal(row0, step):
                    mismatches.append(f"{label} {dtype} a={a} n={n}: max diff {(row0 - step).abs().max().item():.2e}")
    if mismatches:
        return Result(Status.FAILS, residuals, f"{len(mismatches)} of {cases} draft cases and {windows} one-step "
                      f"couplings differ: {mismatches[0]}", {"failures": mismatches})
    if not noiseless or noiseless == windows:
        return Result(Status.FAILS, residuals, f"{noiseless} of {windows} one-step windows are noiseless: the check "
                      f"needs noisy and noiseless steps")
    return Result(Status.VERIFIED, residuals,
                  f"Row 0 bit for bit on the code in {cases} cases (operators x dtypes x windows); one-step coupling "
                  f"[[1]] and coupled noise z_a bit for bit in {windows} windows ({noiseless} noiseless, s_0 = 0); "
                  f"chain_noise_weights of one step is [s_0] by evaluation (no later factor: nothing to prove).")


# ----------------------------------------------------------------------------- drafts and coupled noise

#: DDIM etas of the chain checks: deterministic, in between (where the big skip is not the chain), DDPM's
CHAIN_ETAS = (0.0, 0.3, 0.7, 1.0)
#: (first step a, width n) of the windows on a 12-step grid; (6, 6) ends at the last step (leading: t_from = 0)
CHAIN_WINDOWS = ((0, 3), (2, 6), (6, 6), (0, 12))
#: the two 12-step grids of each family: diffusers' trailing and leading spacings (VP); for VE, Karras
#: sigmas (rho = 7) from 14.6 to 0.03 and evenly spaced sigmas from 10 to 0.5, both then 0
CHAIN_SPACINGS = {"vp": ("trailing", "leading"), "ve": ("karras", "linear")}


def _ve_levels(spacing: str) -> torch.Tensor:
    ramp = torch.linspace(0, 1, 12, dtype=F64)
    if spacing == "karras":
        lo, hi, rho = 0.03 ** (1 / 7), 14.6 ** (1 / 7), 7
        sig = (hi + ramp * (lo - hi)) ** rho
    else:
        sig = 10 + ramp * (0.5 - 10)
    return sig  # Schedule.grid appends the clean end, sigma = 0


def chain_cases() -> List[Tuple[str, object, object, Callable, str]]:
    """(label, torch operator, its sibling with prediction "sample" (the step with x0_hat given), reference
    factors(t_from, t_to) -> (A, B, s) of the one-level step from the proved coefficient functions,
    "vp" | "ve")."""
    from solvers import DDIMSkip, DDPMSkip, VEAncestralSkip, VESchedule

    vp, ve = VPSchedule.linear(), VESchedule()
    cases = []
    for kind in ("epsilon", "sample", "v_prediction"):
        for eta in CHAIN_ETAS:
            cases.append((f"DDIMSkip({kind}, eta={eta:g})", DDIMSkip(vp, kind, eta=eta), DDIMSkip(vp, "sample", eta=eta),
                          lambda t, s, e=eta: C.ddim_chain_coefficients(vp.alpha_bar(t), vp.alpha_bar(s), e), "vp"))
        for vt in ("fixed_small", "fixed_large"):
            def ddpm_factors(t, s, v=vt):  # DDPMSkip adds no noise from t = 0 (as diffusers)
                a, b = vp.alpha_bar(t), vp.alpha_bar(s)
                c_x0, c_xt, _ = C.ddpm_posterior_coefficients(a, b)
                return c_x0, c_xt, torch.where(t > 0, ddpm_std(a, b, v), torch.zeros_like(a))

            cases.append((f"DDPMSkip({kind}, {vt})", DDPMSkip(vp, kind, variance_type=vt),
                          DDPMSkip(vp, "sample", variance_type=vt), ddpm_factors, "vp"))
    for kind in ("sample", "epsilon"):
        for eta in VE_ANCESTRAL_ETAS:
            cases.append((f"VEAncestralSkip({kind}, eta={eta:g})", VEAncestralSkip(ve, prediction=kind, eta=eta),
                          VEAncestralSkip(ve, prediction="sample", eta=eta),
                          lambda t, s, e=eta: C.ve_ancestral_chain_coefficients(t.to(F64), s.to(F64), e), "ve"))
    return cases


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / (1 + b.abs())).max())


def _chain_windows():
    """(where, op, sample_op, factors, family, a, n, t_from, t_to) for every operator of :func:`chain_cases`
    and every window the chain checks use."""
    for label, op, sample_op, factors, family in chain_cases():
        for spacing in CHAIN_SPACINGS[family]:
            grid = op.schedule.timesteps(12, spacing) if family == "vp" else op.schedule.grid(_ve_levels(spacing))
            for a, n in CHAIN_WINDOWS:
                yield (f"{label} {spacing} a={a} n={n}", op, sample_op, factors, family, a, n,
                       grid.t_from[a : a + n], grid.t_to[a : a + n])


def _mirror_x0(op, x: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0_hat of output ``p`` at level ``t`` of ``op``'s schedule, by the mirrors' conversion (VP: alpha-bar of t;
    flow and VE: t itself)."""
    kind = op.prediction.value
    if isinstance(op.schedule, VPSchedule):
        return vp_x0_eps(kind, x, p, op.schedule.alpha_bar(t))[0]
    return (flow_x0_eps if isinstance(op.schedule, FlowSchedule) else ve_x0_eps)(kind, x, p, t.to(F64))[0]


def _anchor(seed: int) -> Tuple[NoiseSource, torch.Tensor, torch.Tensor]:
    """The noise source, anchor state x and model output p the chain checks use (float64)."""
    noise = NoiseSource(seed)
    return noise, noise.initial((4, 3), F64), noise(100, (4, 3), F64)


@identity(
    "operators.drafts_are_the_chain",
    "Operators (code)",
    "Every row of SkipTransition.drafts (row 0 the step, rows j >= 1 A~ x0_hat + B~ x_{a+1} + W z, "
    "transition.py) is the chain of the operator's own one-level steps from the anchor with x0_hat frozen (the "
    "step with x0_hat as a sample prediction, eps re-derived from each state) on the same per-step noise z_a.., "
    "for DDPMSkip (fixed_small, fixed_large), DDIMSkip (eta 0, 0.3, 0.7, 1) and VEAncestralSkip (eta 0.5, 1; Karras "
    "and linear sigma grids), every prediction type, float64, "
    "windows of 3 to 12 steps on trailing and leading grids (to t = 0); and chain_factors is the proved "
    "one-level step (ddim_chain_coefficients, ddpm_posterior_coefficients with DDPMSkip's std, "
    "ve_ancestral_chain_coefficients).",
    numeric=True,
)
def drafts_are_the_chain() -> Result:
    errors: Dict[str, float] = {}
    noise, x, p = _anchor(11)
    for where, op, sample_op, factors, _, a, n, t_from, t_to in _chain_windows():
        ref = factors(t_from, t_to)
        got = op.chain_factors(t_from, t_to)
        err = max(_rel(torch.as_tensor(g, dtype=F64), torch.as_tensor(r, dtype=F64)) for g, r in zip(got, ref))
        zs = noise.steps(a, a + n, x.shape, F64) if op.stochastic else None
        rows = op.drafts(x, p, t_from, t_to, zs)
        x0_hat = _mirror_x0(op, x, p, t_from[0])  # the anchor's, frozen
        state = op(x, p, t_from[0], t_to[0], zs[0] if zs is not None else None)
        for j in range(n):
            if j:
                state = sample_op(state, x0_hat, t_from[j], t_to[j], zs[j] if zs is not None else None)
            err = max(err, _rel(rows[j], state))
        errors[where] = err
    return _per_case(errors, f"windows ({len(chain_cases())} operators x {2 * len(CHAIN_WINDOWS)} windows each)")


@identity(
    "operators.coupled_noise_composed",
    "Operators (code)",
    "SkipTransition._coupling row j is w_j/|w_j|, w_j = chain_noise_weights of the proved one-level factors "
    "of steps 0..j (a unit row; a noiseless row, |w_j| = 0, is e_j: its step's own noise), "
    "coupled_noise(...)[j] = sum_k w_jk z_k / |w_j| (row 0 z_a bit for bit), and skip over the window is the "
    "one big step on the last row, for the operators and windows of operators.drafts_are_the_chain, float64.",
    numeric=True,
)
def coupled_noise_is_composed() -> Result:
    errors: Dict[str, float] = {}
    zero_rows = 0
    noise, x, p = _anchor(13)
    for where, op, _, factors, _, a, n, t_from, t_to in _chain_windows():
        _, B, s = factors(t_from, t_to)
        B, s = [float(v) for v in torch.as_tensor(B, dtype=F64)], [float(v) for v in torch.as_tensor(s, dtype=F64)]
        ref = torch.zeros(n, n, dtype=F64)
        for j in range(n):
            w = torch.tensor(C.chain_noise_weights(B[: j + 1], s[: j + 1]), dtype=F64)
            norm = torch.linalg.vector_norm(w)
            if norm > 0:
                ref[j, : j + 1] = w / norm
            else:  # documented: a noiseless row passes its own step's noise on
                ref[j, j] = 1.0
                zero_rows += 1
        u = op._coupling(t_from, t_to)
        err = _rel(u, ref)
        err = max(err, float((torch.linalg.vector_norm(u, dim=1) - 1).abs().max()))
        zs = noise.steps(a, a + n, x.shape, F64)
        coupled = op.coupled_noise(t_from, t_to, zs)
        composed = (ref @ zs.reshape(n, -1)).reshape(zs.shape)
        err = max(err, _rel(coupled, composed))
        if not torch.equal(coupled[0], zs[0]):
            err = max(err, 1.0)
        big = op.skip(x, p, t_from, t_to, zs)
        one = op(x, p, t_from[0], t_to[-1], composed[-1] if op.stochastic else None)
        errors[where] = max(err, _rel(big, one))
    return _per_case(errors, f"windows ({zero_rows} noiseless rows)")


#: (anchor a, width n) of the multistep windows on a 12-step grid: after one earlier step (UniPC order 2: its
#: corrector at order 1) and after several; (5, 6) drafts up to the grid's last model call
MULTISTEP_WINDOWS = ((1, 3), (2, 6), (5, 6))


def multistep_cases() -> List[Tuple[str, object, object]]:
    """(label, multistep torch operator, its sibling with prediction "sample") for the multistep drafts check."""
    from solvers import DPMSolverSkip, UniPCSkip

    vp, flow = VPSchedule.linear(), FlowSchedule()
    cases = []
    for schedule, kinds in ((vp, ("epsilon", "sample", "v_prediction")), (flow, ("velocity", "sample"))):
        for kind in kinds:
            for st in ("midpoint", "heun"):
                cases.append((f"DPMSolverSkip({schedule.kind}, {kind}, 2M {st})", DPMSolverSkip(schedule, kind, 2, st),
                              DPMSolverSkip(schedule, "sample", 2, st)))
            for st in ("bh1", "bh2"):
                for order in (1, 2):
                    cases.append((f"UniPCSkip({schedule.kind}, {kind}, {st}, order {order})",
                                  UniPCSkip(schedule, kind, order, st), UniPCSkip(schedule, "sample", order, st)))
    return cases


@identity(
    "operators.multistep_drafts_are_the_chain",
    "Operators (code)",
    "With a history (a multistep anchor), every row of drafts is the serial chain with the anchor's x0_hat "
    "frozen: row 0 is the anchor's own multistep step bit for bit, row j >= 1 the multistep step of the "
    "operator's 'sample' sibling from row j-1 with output x0_hat_a and the chain's own history (the earlier "
    "steps' x0_hat converted from their outputs, then x0_hat_a), for DPMSolverSkip 2M (midpoint, heun) and "
    "UniPCSkip (bh1, bh2, order 1 and 2), VP and flow, every prediction type, float64, windows after one and "
    "after several earlier steps, on a 12-step grid.",
    numeric=True,
)
def multistep_drafts_are_the_chain() -> Result:
    errors: Dict[str, float] = {}
    noise, x, p = _anchor(17)
    for label, op, sample_op in multistep_cases():
        # flow: below sigma = 1, where UniPC bh1's corrector is infinite (UniPCSkip.make_grid refuses it)
        grid = (op.schedule.timesteps(12, "trailing") if isinstance(op.schedule, VPSchedule)
                else op.schedule.grid(torch.linspace(0.95, 0.05, 12, dtype=F64)))
        for a, n in MULTISTEP_WINDOWS:
            where = f"{label} a={a} n={n}"
            earlier = [(noise(200 + k, (4, 3), F64), noise(300 + k, (4, 3), F64), grid.t_from[k]) for k in range(a)]
            history = earlier[len(earlier) - op.history_at(grid, a):]
            t_from, t_to = grid.t_from[a : a + n], grid.t_to[a : a + n]
            rows = op.drafts(x, p, t_from, t_to, None, history=history)
            first = op.multistep(x, p, t_from[0], t_to[0], history) if history else op(x, p, t_from[0], t_to[0])
            err = 0.0 if torch.equal(rows[0], first) else 1.0
            # the frozen chain, in the sample sibling's terms: each earlier step's output as its x0_hat
            chain = [(xh, _mirror_x0(op, xh, ph, th), th) for xh, ph, th in history]
            chain.append((x, _mirror_x0(op, x, p, t_from[0]), t_from[0]))
            x0_a, state = chain[-1][1], first
            for j in range(1, n):
                need = sample_op.history_at(grid, a + j)
                state_next = sample_op.multistep(state, x0_a, t_from[j], t_to[j], chain[len(chain) - need:])
                chain.append((state, x0_a, t_from[j]))
                state = state_next
                err = max(err, _rel(rows[j], state))
            errors[where] = err
    return _per_case(errors, "windows")

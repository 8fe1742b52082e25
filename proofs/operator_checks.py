r"""The torch operators against the symbolic proofs: mirrors agree, a one-level draft is the step.

The symbolic proofs are about :mod:`proofs.operators`, mirrors of the operators' ``__call__``
composed from the same coefficient functions. Here the real operators (``solvers.DDIMSkip``,
``DDPMSkip``, ``FlowEulerSkip``, ``DPMSolverSkip``, float64, per-row levels in one batched call) are
evaluated against the exact mirror at the same schedule values (DPM-Solver++'s 2M step, which takes the
previous step too, in its own identity), and a window's first draft is compared bit for bit with
the serial step (``DraftRefineState.step`` is exactly ``transition(x, p, t_from[i], t_to[i], z_i)``).
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import mpmath
import sympy as sp
import torch

from driffusion_core import FlowSchedule, NoiseSource, VPSchedule
from driffusion_core import coefficients as C
from proofs.algebra import Domain, check
from proofs.operators import ddim_step, ddpm_step, dpm_2m_step, dpm_step, flow_step
from proofs.registry import Result, Status, identity

__all__ = ["operator_cases"]

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
FLOW_LEVEL_TRIPLES = [(1.0, 0.7, 0.4), (0.9, 0.6, 0.3), (0.5, 0.4999, 0.4998), (0.3, 0.2, 0.0), (0.2, 0.1, 0.05)]


def operator_cases() -> List[Tuple[str, object, Callable, str]]:
    """(label, torch operator, symbolic mirror(x, p, level_t, level_s, z), "vp" | "flow")."""
    from solvers import DDIMSkip, DDPMSkip, DPMSolverSkip, FlowEulerSkip

    vp, flow = VPSchedule.linear(), FlowSchedule()
    cases = []
    for kind in ("epsilon", "sample", "v_prediction"):
        for eta in (0.0, 0.3, 1.0):
            cases.append((f"DDIMSkip({kind}, eta={eta:g})", DDIMSkip(vp, kind, eta=eta),
                          lambda x, p, a, b, z, k=kind, e=eta: ddim_step(k, x, p, a, b, sp.nsimplify(e), z), "vp"))
        for vt in ("fixed_small", "fixed_large"):
            cases.append((f"DDPMSkip({kind}, {vt})", DDPMSkip(vp, kind, variance_type=vt),
                          lambda x, p, a, b, z, k=kind, v=vt: ddpm_step(k, x, p, a, b, z, v), "vp"))
        cases.append((f"DPMSolverSkip({kind})", DPMSolverSkip(vp, kind),
                      lambda x, p, a, b, z, k=kind: dpm_step(k, x, p, a, b), "vp"))
    for kind in ("velocity", "epsilon", "sample"):
        cases.append((f"FlowEulerSkip({kind})", FlowEulerSkip(flow, kind),
                      lambda x, p, a, b, z, k=kind: flow_step(k, x, p, a, b), "flow"))
        cases.append((f"DPMSolverSkip(flow, {kind})", DPMSolverSkip(flow, kind),
                      lambda x, p, a, b, z, k=kind: dpm_step(k, x, p, a, b, "flow"), "flow"))
    return cases


@identity(
    "operators.match_symbolic_mirrors",
    "Operators (code)",
    "The torch operators DDIMSkip (eta 0, 0.3, 1), DDPMSkip (fixed_small, fixed_large), FlowEulerSkip, "
    "DPMSolverSkip (first order, VP and flow), every prediction type, float64 with per-row levels, equal the "
    "symbolic steps proved above, evaluated exactly at the same schedule values (no noise at t_from = 0 for "
    "DDPM, as the operator and diffusers; an epsilon flow is undefined at sigma = 1 and skipped there).",
)
def match_symbolic_mirrors() -> Result:
    xs, ps, zs, at, as_ = sp.symbols("x p z abar_t abar_s", real=True)
    worst, points, bad = 0.0, 0, []
    for label, op, mirror, family in operator_cases():
        pairs = VP_LEVEL_PAIRS if family == "vp" else FLOW_LEVEL_PAIRS
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
                    rel = float(abs(mpmath.mpf(out[i, c].item()) - exact) / (1 + abs(exact)))
                    worst = max(worst, rel)
                    points += 1
                    if rel > REL_TOL:
                        bad.append(f"{label} at {pairs[i]}: relative error {rel:.2e}")
    detail = f"{points} values from {len(operator_cases())} operators, max relative difference {worst:.1e}"
    if bad:
        return Result(Status.FAILS, {}, f"{detail}; above {REL_TOL:g}: {bad[0]}", {"failures": bad})
    return Result(Status.NUMERIC, {}, f"{detail} (float64 against 40-digit exact; tolerance {REL_TOL:g}).")


@identity(
    "operators.dpm_2m_matches_mirror",
    "Operators (code)",
    "The torch DPMSolverSkip.multistep (2M, midpoint and heun, VP and flow, every prediction type, float64, "
    "per-row levels, history = the previous state, output and level) equals the symbolic 2M step proved "
    "above, evaluated exactly at the same schedule values, including its first-order step to sigma = 0.",
)
def dpm_2m_matches_mirror() -> Result:
    from solvers import DPMSolverSkip

    worst, points, bad = 0.0, 0, []
    with mpmath.workdps(40):
        for family, schedule, kinds, triples in (
            ("vp", VPSchedule.linear(), ("epsilon", "sample", "v_prediction"), VP_LEVEL_TRIPLES),
            ("flow", FlowSchedule(), ("velocity", "epsilon", "sample"), FLOW_LEVEL_TRIPLES),
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
                        f = lambda v: sp.Float(mpmath.mpf(v.item()), 40)
                        for c in range(3):
                            exact = dpm_2m_step(kind, f(x[i, c]), f(p[i, c]), (f(x_p[i, c]), f(p_p[i, c]), f(lv_p[i])),
                                                f(lv_s[i]), f(lv_t[i]), solver_type, family)
                            exact = mpmath.mpf(sp.Float(exact, 40))
                            rel = float(abs(mpmath.mpf(out[i, c].item()) - exact) / (1 + abs(exact)))
                            worst = max(worst, rel)
                            points += 1
                            if not rel <= REL_TOL:
                                bad.append(f"DPMSolverSkip({family}, {kind}, {solver_type}) at {rows[i]}: "
                                           f"relative error {rel:.2e}")
    detail = f"{points} values, max relative difference {worst:.1e}"
    if bad:
        return Result(Status.FAILS, {}, f"{detail}; above {REL_TOL:g}: {bad[0]}", {"failures": bad})
    return Result(Status.NUMERIC, {}, f"{detail} (float64 against 40-digit exact; tolerance {REL_TOL:g}).")


@identity(
    "operators.one_level_draft_is_step",
    "Operators (code)",
    "A window's first draft is the serial step: chain_noise_weights of one step is [s_0] (the unit coupled "
    "noise of one step is z_a itself), and drafts(x, p, t_from[a:a+n], t_to[a:a+n], z)[0] == "
    "S(x, p, t_from[a] -> t_to[a], z_a) bit for bit for every operator, float32 and float64.",
)
def one_level_draft_is_step() -> Result:
    B, s = sp.symbols("B_0 s_0", positive=True)
    (w,) = C.chain_noise_weights([B], [s])
    symbolic = check({"w_0/|w_0| - 1": w / sp.sqrt(w**2) - 1}, Domain.free([]))
    if symbolic.status is not Status.PROVED:
        return symbolic
    cases, mismatches = 0, []
    for label, op, _, family in operator_cases():
        # flow levels below sigma = 1, where an epsilon model cannot give x0_hat
        grid = op.schedule.timesteps(12, "trailing") if family == "vp" else op.schedule.grid(
            torch.linspace(0.95, 0.05, 12, dtype=F64))
        noise = NoiseSource(7)
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
        return Result(Status.FAILS, symbolic.residuals, f"{len(mismatches)}/{cases} differ: {mismatches[0]}",
                      {"failures": mismatches})
    return Result(Status.VERIFIED, symbolic.residuals,
                  f"w_0/|w_0| = 1 proved; bit for bit on the code in {cases} cases (operators x dtypes x windows).")

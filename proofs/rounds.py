r"""Round counts of the scheduler's actual plan, and their limits.

Key: T model calls (grid steps), width n, R the sequential rounds (the latency in model calls).

* aggressive:   :math:`R_a(T, n) = 1 + \lceil (T-1)/n \rceil`
* conservative: :math:`R_c(T, n) = 2\lceil T/(n+1) \rceil - [T \bmod (n+1) = 1]`

The counts are read from the scheduler itself: :class:`~driffusion_core.DraftRefineState` is driven
through ``plan`` / ``absorb`` with a dummy predictor (zeros) for every T <= T_MAX and n <= N_MAX, and for
long grids (:data:`SPOT`: T up to 1000), as ``DraftRefineScheduler.sample`` drives it, and compared with the
closed forms above and with ``driffusion_core.expected_rounds``. The limits :math:`T/R \to n` and
:math:`(n+1)/2` are proved with sympy for the closed forms, directly and by squeezing R between bounds
without the ceiling; that the plan keeps matching them past the enumeration is checked, not proved.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Dict, List, Tuple

import sympy as sp
import torch

from driffusion_core import DraftRefineScheduler, FlowSchedule, WideWindowWarning, expected_rounds
from proofs.registry import Result, Status, identity

__all__ = ["T_MAX", "N_MAX", "SPOT", "closed_form", "drive", "plans"]

T_MAX, N_MAX = 60, 10
#: long grids checked besides the enumeration: (T, n)
SPOT = tuple((T, n) for T in (101, 1000) for n in (3, 8, 16))
MODES = ("aggressive", "conservative")

_T, _N = sp.symbols("T n", positive=True, integer=True)


def closed_form(mode: str) -> sp.Expr:
    """The claimed round count as a sympy expression of T and n."""
    if mode == "aggressive":
        return 1 + sp.ceiling((_T - 1) / _N)
    return 2 * sp.ceiling(_T / (_N + 1)) - sp.Piecewise((1, sp.Eq(sp.Mod(_T, _N + 1), 1)), (0, True))


def drive(num_steps: int, width: int, mode: str) -> Tuple[int, int, List[List[int]]]:
    """Run the state machine with a zero predictor: (rounds it counted, model calls, steps of each round)."""
    from solvers import FlowEulerSkip

    schedule = FlowSchedule()
    with warnings.catch_warnings():  # every (T, n), wide windows included: only the counts matter here
        warnings.simplefilter("ignore", WideWindowWarning)
        scheduler = DraftRefineScheduler(FlowEulerSkip(schedule), schedule.timesteps(num_steps), width=width, mode=mode)
    state = scheduler.start(torch.zeros(1, 1, dtype=torch.float64))
    planned = []
    while True:
        rnd = state.plan()
        if rnd is None:
            break
        planned.append(list(rnd.steps))
        state.absorb(rnd, torch.zeros_like(rnd.xs))
    if len(planned) != state.rounds:
        raise AssertionError(f"T={num_steps} n={width} {mode}: {len(planned)} rounds planned, {state.rounds} counted")
    return state.rounds, state.evals, planned


@lru_cache(maxsize=None)
def plans() -> Dict[Tuple[int, int, str], Tuple[int, int, Tuple[Tuple[int, ...], ...]]]:
    """Every (T, n, mode) for T <= T_MAX, n <= N_MAX, and :data:`SPOT`, driven once (shared by the identities)."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread wake-ups would cost more than the ops
    try:
        pairs = [(T, n) for n in range(1, N_MAX + 1) for T in range(1, T_MAX + 1)] + list(SPOT)
        for mode in MODES:
            for T, n in pairs:
                rounds, evals, planned = drive(T, n, mode)
                out[(T, n, mode)] = (rounds, evals, tuple(tuple(p) for p in planned))
    finally:
        torch.set_num_threads(threads)
    return out


def _rounds_identity(mode: str) -> Result:
    form = closed_form(mode)
    mismatches = []
    for (T, n, m), (rounds, _, _) in plans().items():
        if m != mode:
            continue
        claimed = int(form.xreplace({_T: sp.Integer(T), _N: sp.Integer(n)}))
        if not rounds == claimed == expected_rounds(T, n, mode):
            mismatches.append({"T": T, "n": n, "rounds": rounds, "closed form": claimed,
                               "expected_rounds": expected_rounds(T, n, mode)})
    cases = T_MAX * N_MAX + len(SPOT)
    if mismatches:
        first = mismatches[0]
        return Result(Status.FAILS, {}, f"{len(mismatches)}/{cases} (T, n) differ, first: {first}", first)
    return Result(Status.VERIFIED, {"R(T, n)": form},
                  f"all {cases} pairs T = 1..{T_MAX}, n = 1..{N_MAX}, and {len(SPOT)} with T = 101 and 1000: the state "
                  f"machine's count = closed form = driffusion_core.expected_rounds.")


@identity(
    "rounds.aggressive",
    "Rounds",
    "Aggressive mode: the scheduler's plan takes R = 1 + ceil((T-1)/n) rounds (drive DraftRefineState with a "
    "dummy predictor over every T <= 60, n <= 10, and T = 101, 1000 with n = 3, 8, 16).",
)
def rounds_aggressive() -> Result:
    return _rounds_identity("aggressive")


@identity(
    "rounds.conservative",
    "Rounds",
    "Conservative mode: R = 2 ceil(T/(n+1)) - [T mod (n+1) = 1] rounds (same enumeration).",
)
def rounds_conservative() -> Result:
    return _rounds_identity("conservative")


@identity(
    "rounds.each_level_once",
    "Rounds",
    "Both modes make exactly T model calls: the rounds' steps are 0, 1, ..., T-1, each exactly once, in "
    "order, and never past t_{T-1} (same enumeration).",
)
def each_level_once() -> Result:
    bad = []
    for (T, n, mode), (_, evals, planned) in plans().items():
        steps = [i for rnd in planned for i in rnd]
        if evals != T or steps != list(range(T)):
            bad.append({"T": T, "n": n, "mode": mode, "evals": evals, "steps": steps})
    if bad:
        return Result(Status.FAILS, {}, f"{len(bad)} cases differ, first: {bad[0]}", bad[0])
    return Result(Status.VERIFIED, {}, f"all {len(plans())} (T, n, mode) cases.")


#: (T, n) of the refine check: every width up to past the grid, both modes
REFINE_T, REFINE_N = 16, 6


@identity(
    "rounds.refine_replays_the_serial_steps",
    "Rounds",
    "Refinement replays the serial update with each level's own prediction: for a predictor whose output "
    "depends on the level only (so a draft's prediction is the serial chain's), DraftRefineScheduler at every "
    "width and mode equals sample_serial bit for bit (DDIM eta = 0 and eta = 1 with shared noise, and flow; "
    "T = 1..16, n = 1..6, float64).",
)
def refine_replays_the_serial_steps() -> Result:
    from driffusion_core import NoiseSource, VPSchedule
    from solvers import DDIMSkip, FlowEulerSkip, sample_serial

    vp = VPSchedule.linear()
    flow = FlowSchedule()
    families = [("DDIM eta=0", DDIMSkip(vp), lambda T: vp.timesteps(T, spacing="trailing")),
                ("DDIM eta=1", DDIMSkip(vp, eta=1.0), lambda T: vp.timesteps(T, spacing="trailing")),
                ("flow", FlowEulerSkip(flow), flow.timesteps)]
    bad, cases = [], 0

    def level_only(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # exact at any state: depends on t alone
        return torch.cos(t.to(x.dtype)[:, None] / 97.0 + torch.arange(x.shape[1], dtype=x.dtype)[None, :])

    x = NoiseSource(5).initial((2, 3), torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WideWindowWarning)
            for name, transition, grid_of in families:
                for T in range(1, REFINE_T + 1):
                    grid = grid_of(T)
                    serial = sample_serial(level_only, x, transition, grid, noise=NoiseSource(7)).x
                    for n in range(1, REFINE_N + 1):
                        for mode in MODES:
                            cases += 1
                            got = DraftRefineScheduler(transition, grid, width=n, mode=mode).sample(
                                level_only, x, noise=NoiseSource(7)).x
                            if not torch.equal(got, serial):
                                bad.append({"family": name, "T": T, "n": n, "mode": mode,
                                            "max |diff|": float((got - serial).abs().max())})
    finally:
        torch.set_num_threads(threads)
    if bad:
        return Result(Status.FAILS, {}, f"{len(bad)}/{cases} cases differ from the serial sampler, first: {bad[0]}",
                      bad[0])
    return Result(Status.VERIFIED, {}, f"all {cases} (family, T, n, mode) cases equal sample_serial bit for bit; a "
                  f"refinement that used another level's prediction (the anchor's) would differ.")


def _limit_identity(mode: str, target: sp.Expr) -> Result:
    R = closed_form(mode)
    if mode == "aggressive":
        lo, hi = 1 + (_T - 1) / _N, 2 + (_T - 1) / _N  # x <= ceil(x) < x + 1
        direct = sp.limit(_T / R, _T, sp.oo)
    else:
        lo, hi = 2 * _T / (_N + 1) - 1, 2 * _T / (_N + 1) + 2  # 2c - 1 <= R <= 2c, x <= c < x + 1
        direct = sp.limit(_T / R, _T, sp.oo)  # the Piecewise closed form itself
    squeeze = (sp.limit(_T / hi, _T, sp.oo), sp.limit(_T / lo, _T, sp.oo))
    res = {
        "lim T/R (sympy, with ceiling) - target": sp.simplify(direct - target),
        "lim T/upper bound - target": sp.simplify(squeeze[0] - target),
        "lim T/lower bound - target": sp.simplify(squeeze[1] - target),
    }
    # the bounds themselves, checked on the enumeration (they follow from x <= ceil(x) < x + 1)
    for (T, n, m), (rounds, _, _) in plans().items():
        at = {_T: sp.Integer(T), _N: sp.Integer(n)}
        if m == mode and not (lo.xreplace(at) <= rounds <= hi.xreplace(at)):
            res["bounds"] = sp.Integer(1)
    ok = all(v == 0 for v in res.values())
    detail = (f"{sp.sstr(lo)} <= R <= {sp.sstr(hi)} (from x <= ceil(x) < x + 1, and checked on the enumeration); "
              f"both bounds give T/R -> {target} (sympy), so does the squeeze, and sympy's limit of T/R on the "
              f"closed form itself agrees.")
    return Result(Status.PROVED if ok else Status.FAILS, res, detail)


@identity(
    "rounds.aggressive_limit",
    "Rounds",
    "Aggressive speed-up: the closed form R_a(T, n) of rounds.aggressive (which the plan matches on its "
    "enumeration) gives T / R_a -> n as T -> oo.",
)
def aggressive_limit() -> Result:
    return _limit_identity("aggressive", _N)


@identity(
    "rounds.conservative_limit",
    "Rounds",
    "Conservative speed-up: the closed form R_c(T, n) of rounds.conservative gives T / R_c -> (n+1)/2 as "
    "T -> oo.",
)
def conservative_limit() -> Result:
    return _limit_identity("conservative", (_N + 1) / 2)

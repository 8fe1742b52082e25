r"""Picard study: DRiffusion, ParaDiGMS and skip-drafted Picard on the exact 2-D ring oracle.

Key: T the grid length; n the width (model calls per round); R = 1 + ceil((T-1)/n), DRiffusion's
(aggressive) rounds; tau the Picard tolerance (``solvers.PicardScheduler``: a level has converged
when its change is at most tau sigma_t). Error = relative error to the serial output from the same
starting noise and per-step noise, ``||x - x_serial||_F / ||x_serial||_F`` over the batch.

Families: DDIM 50 steps (trailing, diffusers' stride), DDPM 50 steps (coupled per-step noise),
flow matching 28 steps (shift 3), DPM-Solver++ 2M 50 steps (trailing; a multistep transition), all
with the exact ring predictor (no training error, so every difference is the sampler's). Widths 2..4.

Measured (``run()``):

* ``at_driffusion_rounds``: the error at DRiffusion's own round count R. Both Picard inits run
  with ``max_rounds=R`` at every tolerance of ``BUDGET_TOLERANCES`` and each is scored by its best
  tolerance (the same tuning for both; DRiffusion has no knob); every tolerance's error is kept
  in ``budget_sweep``.
* ``rounds_to_tolerance``: the fewest rounds (over a fine tolerance sweep, no budget) that bring
  the error below 1e-3 and 1e-5, with the model calls spent beyond T at that run.
* ``same_tolerance``: per family and width, how often skip drafts needed fewer / as many / more
  rounds (and model calls) than ParaDiGMS' copies at the *same* tolerance of the fine sweep, and
  how often they ended further from serial. (Equal tolerance is not equal error: the fair
  comparison is ``rounds_to_tolerance``, rounds to reach an error.)
* ``budget_vs_driffusion``: per family, the range over widths and ``BUDGET_TOLERANCES`` of
  skip-Picard's error under ``max_rounds=R`` at one *fixed* tolerance, divided by DRiffusion's.
* ``short_grids``: the same-tolerance round counts on short grids (T in ``SHORT_STEPS``, widths
  ``SHORT_WIDTHS``, tolerances ``SHORT_TOLERANCES``): settings where skip took fewer / as many /
  more rounds, the settings with more, and the total rounds per init (per family and over DDIM,
  DDPM and flow together).
* ``last_change``: per family at width 4 and each tolerance of ``LAST_CHANGE_TOLERANCES`` (no
  budget), how many levels (the clean end, where sigma = 0, left out) had a last measured change
  above tau sigma_t, and the largest such change in units of tau sigma_t: the slide also
  finalises each round's first unconverged level.
* ``curves``: every (rounds, error, model calls) point, for the plot.

``plot_error_vs_rounds(results, path)`` draws error against rounds, one panel per family.
Self-contained: the main suite calls ``run(quick)`` and the plot function and nothing else.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from backends import BatchedExecutor
from benchmarks.cli import plot_file
from benchmarks.timing import one_thread
from driffusion_core import DraftRefineScheduler, FlowSchedule, NoiseSource, VPSchedule
from driffusion_core.scheduler import evaluate_round
from solvers import DDIMSkip, DDPMSkip, DPMSolverSkip, FlowEulerSkip, PicardScheduler, ring_mixture, sample_serial

__all__ = [
    "run", "plot_error_vs_rounds", "BUDGET_TOLERANCES", "SWEEP_TOLERANCES", "TARGETS",
    "SHORT_STEPS", "SHORT_WIDTHS", "SHORT_TOLERANCES", "LAST_CHANGE_TOLERANCES",
]

INITS = ("frozen", "skip")
LABELS = {"driffusion": "DRiffusion (aggressive)", "frozen": "ParaDiGMS (Picard, frozen init)", "skip": "skip-drafted Picard"}
BUDGET_TOLERANCES: Tuple[float, ...] = (math.inf, 1.0, 0.3, 0.1, 0.03, 0.01)
SWEEP_TOLERANCES: Tuple[float, ...] = (math.inf,) + tuple(10 ** (-k / 2) for k in range(0, 13)) + (0.0,)
TARGETS: Tuple[float, ...] = (1e-3, 1e-5)
SHORT_STEPS: Tuple[int, ...] = (8, 16)
SHORT_WIDTHS: Tuple[int, ...] = (2, 3, 4, 5)
SHORT_TOLERANCES: Tuple[float, ...] = (1.0, 0.3, 0.1, 1e-2, 1e-3)
LAST_CHANGE_TOLERANCES: Tuple[float, ...] = (0.1, 0.01)
FLOW_SHIFT = 3.0
SEED_X, SEED_NOISE = 1, 2


def _families(steps: Dict[str, int] = None) -> Dict[str, tuple]:
    """family -> (transition, grid, predictor, stochastic); ``steps`` overrides the grid lengths."""
    ring, vp, flow = ring_mixture(), VPSchedule.linear(), FlowSchedule(shift=FLOW_SHIFT)
    T = {"ddim": 50, "ddpm": 50, "flow": 28, "dpm": 50, **(steps or {})}
    return {
        "ddim": (DDIMSkip(vp), vp.timesteps(T["ddim"], "trailing", step_to="stride"), ring.predictor(vp, "epsilon"), False),
        "ddpm": (DDPMSkip(vp), vp.timesteps(T["ddpm"], "trailing"), ring.predictor(vp, "epsilon"), True),
        "flow": (FlowEulerSkip(flow), flow.timesteps(T["flow"]), ring.predictor(flow, "velocity"), False),
        "dpm": (DPMSolverSkip(vp), vp.timesteps(T["dpm"], "trailing"), ring.predictor(vp, "epsilon"), False),
    }


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(torch.float64) - ref.to(torch.float64)).norm() / ref.to(torch.float64).norm())


def _tol(t: float) -> str:
    return "inf" if math.isinf(t) else f"{t:g}"


def run(quick: bool = False) -> dict:
    """Run the study; returns plain data (JSON-ready): ``rows`` tables and the plot's curves.

    Arguments:
        quick: a smaller batch (64 instead of 512), widths 2 and 4, a coarser budget grid, and
            the short-grid sweep at T = 8 only.
    """
    t0 = time.perf_counter()
    with one_thread():
        return _run(quick, t0)


def _run(quick: bool, t0: float) -> dict:
    batch = 64 if quick else 512
    widths = (2, 4) if quick else (2, 3, 4)
    sweep = SWEEP_TOLERANCES
    budget_tols = (1.0, 0.3, 0.1) if quick else BUDGET_TOLERANCES
    ex = BatchedExecutor()
    at_r: List[dict] = []
    budget_rows: List[dict] = []
    to_tol: List[dict] = []
    curves: Dict[str, dict] = {}
    with torch.no_grad():
        for fam, (tr, grid, f, stochastic) in _families().items():
            T = len(grid)
            x = NoiseSource(SEED_X).initial((batch, 2), torch.float64)
            noise = NoiseSource(SEED_NOISE) if stochastic else None
            ref = sample_serial(f, x, tr, grid, noise=noise).x
            fam_curves: Dict[str, list] = {"driffusion": []}
            for n in widths:
                d = DraftRefineScheduler(tr, grid, width=n).sample(f, x, executor=ex, noise=noise)
                e_d = _rel(d.x, ref)
                fam_curves["driffusion"].append({"width": n, "rounds": d.rounds, "evals": d.evals, "error": e_d})
                best: Dict[str, Tuple[float, float, int]] = {}
                for init in INITS:
                    for tol in budget_tols:
                        out = PicardScheduler(tr, grid, n, tol, max_rounds=d.rounds, init=init).sample(f, x, executor=ex, noise=noise)
                        e = _rel(out.x, ref)
                        budget_rows.append({"family": fam, "width": n, "init": init, "tolerance": _tol(tol), "rounds": out.rounds,
                                            "max_rounds": d.rounds, "error": e, "calls_beyond_T": out.info["calls_beyond_T"],
                                            "picard_rounds": out.info["picard_rounds"], "fallback_rounds": out.info["fallback_rounds"]})
                        if init not in best or e < best[init][0]:
                            best[init] = (e, tol, out.info["calls_beyond_T"])
                    points = []
                    for tol in sweep:
                        out = PicardScheduler(tr, grid, n, tol, init=init).sample(f, x, executor=ex, noise=noise)
                        points.append({"tolerance": _tol(tol), "rounds": out.rounds, "evals": out.evals, "error": _rel(out.x, ref)})
                    fam_curves[f"{init}:{n}"] = points
                    row = {"family": fam, "T": T, "width": n, "init": init}
                    for target in TARGETS:
                        ok = [p for p in points if p["error"] <= target]
                        hit = min(ok, key=lambda p: (p["rounds"], p["evals"])) if ok else None
                        key = f"{target:g}"
                        row[f"rounds@{key}"] = hit["rounds"] if hit else None
                        row[f"beyond_T@{key}"] = hit["evals"] - T if hit else None
                        row[f"tau@{key}"] = hit["tolerance"] if hit else None
                    to_tol.append(row)
                eb_s, eb_f = best["skip"][0], best["frozen"][0]
                at_r.append({
                    "family": fam, "T": T, "width": n, "rounds": d.rounds,
                    "DRiffusion": e_d, "ParaDiGMS": eb_f, "ParaDiGMS_tau": _tol(best["frozen"][1]),
                    "skip_Picard": eb_s, "skip_tau": _tol(best["skip"][1]),
                    "DRiffusion/skip": e_d / eb_s if eb_s > 0 else None,
                    "ParaDiGMS/skip": eb_f / eb_s if eb_s > 0 else None,
                    "beyond_T_ParaDiGMS": best["frozen"][2], "beyond_T_skip": best["skip"][2],
                })
            curves[fam] = {"T": T, "points": fam_curves}
    for row in to_tol:  # rounds saved by the skip drafts against ParaDiGMS, same family and width
        if row["init"] == "skip":
            other = next(r for r in to_tol if r["init"] == "frozen" and r["family"] == row["family"] and r["width"] == row["width"])
            for target in TARGETS:
                k = f"{target:g}"
                a, b = row[f"rounds@{k}"], other[f"rounds@{k}"]
                row[f"saved@{k}"] = (b - a) if (a is not None and b is not None) else None
    same_tol = _same_tolerance(curves)
    budget_vs_dr = _budget_vs_driffusion(budget_rows, at_r)
    short = _short_grids(batch, SHORT_STEPS[:1] if quick else SHORT_STEPS, widths if quick else SHORT_WIDTHS, ex)
    last_change = _last_change(batch, ex)
    return {
        "oracle": "exact 2-D ring (8 modes), float64",
        "batch": batch,
        "error": "||x - x_serial||_F / ||x_serial||_F, same starting and per-step noise",
        "protocol_at_R": "Picard with max_rounds = DRiffusion's rounds R, best tolerance of "
                         + ", ".join(_tol(t) for t in budget_tols) + " for each init",
        "seconds": round(time.perf_counter() - t0, 1),
        "at_driffusion_rounds": at_r,
        "rounds_to_tolerance": to_tol,
        "same_tolerance": same_tol,
        "budget_vs_driffusion": budget_vs_dr,
        "short_grids": short,
        "last_change": last_change,
        "budget_sweep": budget_rows,
        "curves": curves,
    }


def _same_tolerance(curves: Dict[str, dict]) -> List[dict]:
    """Skip against frozen at the same tolerance of the fine sweep: settings with fewer / as many / more
    rounds and model calls (tolerance 0 and inf included)."""
    rows = []
    for fam, c in curves.items():
        for key, pts in c["points"].items():
            if not key.startswith("skip:"):
                continue
            other = c["points"]["frozen:" + key.split(":")[1]]
            row = {"family": fam, "T": c["T"], "width": int(key.split(":")[1]), "tolerances": len(pts)}
            for what in ("rounds", "evals"):
                d = [p[what] - q[what] for p, q in zip(pts, other)]
                row[f"{what}: skip fewer"] = sum(v < 0 for v in d)
                row[f"{what}: same"] = sum(v == 0 for v in d)
                row[f"{what}: skip more"] = sum(v > 0 for v in d)
            row["error: skip larger"] = sum(p["error"] > q["error"] for p, q in zip(pts, other))
            rows.append(row)
    return rows


def _budget_vs_driffusion(budget_rows: List[dict], at_r: List[dict]) -> Dict[str, dict]:
    """Per family: skip-Picard's error under max_rounds = R at each fixed tolerance, divided by DRiffusion's."""
    out: Dict[str, dict] = {}
    for fam in dict.fromkeys(r["family"] for r in at_r):
        dr = {r["width"]: r["DRiffusion"] for r in at_r if r["family"] == fam}
        ratios = [(r["error"] / dr[r["width"]], r["width"], r["tolerance"]) for r in budget_rows
                  if r["family"] == fam and r["init"] == "skip" and dr[r["width"]] > 0]
        lo, hi = min(ratios), max(ratios)
        out[fam] = {"min": lo[0], "min_at": f"n={lo[1]} tau={lo[2]}", "max": hi[0], "max_at": f"n={hi[1]} tau={hi[2]}",
                    "settings": len(ratios), "worse_than_DRiffusion": sum(r[0] > 1 for r in ratios),
                    "ratios": {f"n={w} tau={t}": q for q, w, t in ratios}}
    return out


def _last_change(batch: int, ex, width: int = 4) -> List[dict]:
    """Levels whose last measured change exceeded tau sigma_t (``PicardState.moved``, the squared ratio)."""
    rows = []
    for fam, (tr, grid, f, stochastic) in _families().items():
        x = NoiseSource(SEED_X).initial((batch, 2), torch.float64)
        noise = NoiseSource(SEED_NOISE) if stochastic else None
        for tol in LAST_CHANGE_TOLERANCES:
            st = PicardScheduler(tr, grid, width, tol).start(x, noise)
            last: Dict[int, float] = {}
            while (rnd := st.plan()) is not None:
                st.absorb(rnd, evaluate_round(ex, f, rnd, grid, {}, x))
                last.update(st.moved)
            ex.finish(st.x)
            last = {k: v for k, v in last.items() if float(st.sigma2[k]) > 0}  # the clean end (sigma = 0) left out
            over = [math.sqrt(v) / tol for v in last.values() if v > tol**2]
            rows.append({"family": fam, "T": len(grid), "width": width, "tolerance": _tol(tol), "levels": len(last),
                         "above tau sigma": len(over), "largest / (tau sigma)": max(over, default=None)})
    return rows


def _short_grids(batch: int, steps: Tuple[int, ...], widths: Tuple[int, ...], ex) -> dict:
    """Rounds to finish at the same tolerance on short grids, skip against frozen (no budget)."""
    per: Dict[str, dict] = {}
    for T in steps:
        for fam, (tr, grid, f, stochastic) in _families({k: T for k in ("ddim", "ddpm", "flow", "dpm")}).items():
            x = NoiseSource(SEED_X).initial((batch, 2), torch.float64)
            noise = NoiseSource(SEED_NOISE) if stochastic else None
            d = per.setdefault(fam, {"fewer": 0, "same": 0, "more": 0, "rounds_skip": 0, "rounds_frozen": 0, "largest_gap": 0, "more_at": []})
            for n in widths:
                for tol in SHORT_TOLERANCES:
                    r = {init: PicardScheduler(tr, grid, n, tol, init=init).sample(f, x, executor=ex, noise=noise).rounds
                         for init in INITS}
                    d["rounds_skip"] += r["skip"]
                    d["rounds_frozen"] += r["frozen"]
                    k = "fewer" if r["skip"] < r["frozen"] else "same" if r["skip"] == r["frozen"] else "more"
                    d[k] += 1
                    d["largest_gap"] = max(d["largest_gap"], abs(r["skip"] - r["frozen"]))
                    if k == "more":
                        d["more_at"].append(f"T={T} n={n} tau={_tol(tol)}: {r['skip']} vs {r['frozen']}")
    one_step = ("ddim", "ddpm", "flow")
    together = {k: sum(per[f][k] for f in one_step) for k in ("fewer", "same", "more", "rounds_skip", "rounds_frozen")}
    together["largest_gap"] = max(per[f]["largest_gap"] for f in one_step)
    together["more_at"] = [f"{f} {s}" for f in one_step for s in per[f]["more_at"]]
    return {"steps": list(steps), "widths": list(widths), "tolerances": [_tol(t) for t in SHORT_TOLERANCES],
            "batch": batch, "families": per, "ddim+ddpm+flow": together}


def _envelope(points: List[dict]) -> Tuple[List[int], List[float]]:
    """Best error reachable within r rounds (the lower envelope of a sweep), zero errors left out."""
    rs, es, best = [], [], math.inf
    for p in sorted(points, key=lambda p: (p["rounds"], p["error"])):
        if p["error"] < best and p["error"] > 0:
            best = p["error"]
            rs.append(p["rounds"])
            es.append(best)
    return rs, es


def plot_error_vs_rounds(results: dict, path) -> None:
    """Error to the serial output against rounds: one panel per family, two panels a row.

    DRiffusion: one point per width, joined; its widths label the top axis at its rounds R. ParaDiGMS
    and skip-drafted Picard: per width, the best error reached within r rounds over the tolerance sweep
    (no budget), and at DRiffusion's rounds the best budgeted run (triangle, diamond). Each panel's title
    gives its grid length T. One legend for the figure. Exact results (tau = 0) are off the log scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = results["curves"]
    fams = list(curves)
    ncols = min(2, len(fams))
    nrows = (len(fams) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.4 * nrows), squeeze=False)
    color = {"driffusion": "C0", "frozen": "C2", "skip": "C4"}
    styles = ["-", "--", ":", "-."]
    budget_label = {"frozen": "ParaDiGMS capped at DRiffusion's rounds R (best τ)",
                    "skip": "skip-drafted Picard capped at DRiffusion's rounds R (best τ)"}
    handles: Dict[str, object] = {}
    for k, fam in enumerate(fams):
        ax = axes[k // ncols, k % ncols]
        pts = curves[fam]["points"]
        dr = pts["driffusion"]
        (h,) = ax.plot([p["rounds"] for p in dr], [p["error"] for p in dr], "o-", color=color["driffusion"], zorder=3)
        handles.setdefault(LABELS["driffusion"], h)
        for row in results["at_driffusion_rounds"]:
            if row["family"] == fam:
                (h,) = ax.plot(row["rounds"], row["ParaDiGMS"], "^", color=color["frozen"], markersize=8, zorder=4)
                handles.setdefault(budget_label["frozen"], h)
                (h,) = ax.plot(row["rounds"], row["skip_Picard"], "D", color=color["skip"], markersize=7, zorder=4)
                handles.setdefault(budget_label["skip"], h)
        widths = [p["width"] for p in dr]
        for i, n in enumerate(widths):
            for init in INITS:
                rs, es = _envelope(pts[f"{init}:{n}"])
                (h,) = ax.step(rs, es, where="post", color=color[init], linestyle=styles[i % len(styles)], alpha=0.9)
                handles.setdefault(f"{LABELS[init]}, n={n}", h)
        # DRiffusion's widths on the top axis, at its rounds: no label on the lines
        top = ax.secondary_xaxis("top")
        top.set_xticks([p["rounds"] for p in dr], [f"n={p['width']}" for p in dr], fontsize=8, color=color["driffusion"])
        top.tick_params(axis="x", colors=color["driffusion"], length=4)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        if k // ncols == nrows - 1 or k + ncols >= len(fams):
            ax.set_xlabel("rounds (sequential model calls)")
        if k % ncols == 0:
            ax.set_ylabel("relative error to the serial output")
        ax.set_title(f"{fam}: T = {curves[fam]['T']} steps", fontsize=11, fontweight="bold")
        ax.grid(True, which="both", alpha=0.3)
    for k in range(len(fams), nrows * ncols):
        axes[k // ncols, k % ncols].axis("off")
    steps: Dict[int, List[str]] = {}
    for fam in fams:
        steps.setdefault(curves[fam]["T"], []).append(fam)
    grids = "" if len(steps) < 2 else "; grid lengths differ: " + ", ".join(
        f"T = {T} for {', '.join(fs)}" for T, fs in sorted(steps.items(), key=lambda kv: len(kv[1])))
    fig.suptitle("Exact ring oracle: error against rounds" + grids + "\nlines: Picard's best error within r rounds over "
                 "its tolerance sweep (no cap); top axis: DRiffusion's width n at its rounds R", fontsize=10)
    fig.tight_layout()
    # legend columns: DRiffusion and the capped runs; ParaDiGMS by width; skip-drafted Picard by width
    order = [LABELS["driffusion"], budget_label["frozen"], budget_label["skip"]]
    order += [lab for init in INITS for lab in handles if lab.startswith(LABELS[init] + ", n=")]
    order += [lab for lab in handles if lab not in order]
    fig.legend([handles[lab] for lab in order], order, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=3, fontsize=9.5, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m benchmarks.picard_study [--quick] [--plot PATH]``: the study's summary as JSON (and the plot)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.picard_study", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run")
    parser.add_argument("--plot", metavar="PATH", type=plot_file, default=None,
                        help="also save the error-against-rounds plot (PNG) here")
    args = parser.parse_args(argv)
    res = run(args.quick)
    if args.plot:
        plot_error_vs_rounds(res, args.plot)
    print(json.dumps({k: v for k, v in res.items() if k != "curves" and k != "budget_sweep"}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover - manual use
    sys.exit(main())

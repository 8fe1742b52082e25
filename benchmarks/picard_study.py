r"""Picard study: DRiffusion, ParaDiGMS and skip-drafted Picard on the exact 2-D ring oracle.

Key: T the grid length; n the width (model calls per round); R = 1 + ceil((T-1)/n), DRiffusion's
(aggressive) rounds; tau the Picard tolerance (``solvers.PicardScheduler``: a level has converged
when its change is at most tau sigma_t). Error = relative error to the serial output from the same
starting noise and per-step noise, ``||x - x_serial||_F / ||x_serial||_F`` over the batch.

Families: DDIM 50 steps (trailing, diffusers' stride), DDPM 50 steps (coupled per-step noise),
flow matching 28 steps (shift 3), all with the exact ring predictor (no training error, so every
difference is the sampler's). Widths 2..4.

Measured (``run()``):

* ``at_driffusion_rounds``: the error at DRiffusion's own round count R. Both Picard inits run
  with ``max_rounds=R`` at every tolerance of ``BUDGET_TOLERANCES`` and each is scored by its best
  tolerance (the same tuning for both; DRiffusion has no knob); every tolerance's error is kept
  in ``budget_sweep``.
* ``rounds_to_tolerance``: the fewest rounds (over a fine tolerance sweep, no budget) that bring
  the error below 1e-3 and 1e-5, with the model calls spent beyond T at that run.
* ``curves``: every (rounds, error, model calls) point, for the plot.

``plot_error_vs_rounds(results, path)`` draws error against rounds, one panel per family.
Self-contained: the main suite calls ``run(quick)`` and the plot function and nothing else.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Tuple

import torch

from backends import BatchedExecutor
from driffusion_core import DraftRefineScheduler, FlowSchedule, NoiseSource, VPSchedule
from solvers import DDIMSkip, DDPMSkip, FlowEulerSkip, PicardScheduler, ring_mixture, sample_serial

__all__ = ["run", "plot_error_vs_rounds", "BUDGET_TOLERANCES", "SWEEP_TOLERANCES", "TARGETS"]

INITS = ("frozen", "skip")
LABELS = {"driffusion": "DRiffusion (aggressive)", "frozen": "ParaDiGMS (Picard, frozen init)", "skip": "skip-drafted Picard"}
BUDGET_TOLERANCES: Tuple[float, ...] = (math.inf, 1.0, 0.3, 0.1, 0.03, 0.01)
SWEEP_TOLERANCES: Tuple[float, ...] = (math.inf,) + tuple(10 ** (-k / 2) for k in range(0, 13)) + (0.0,)
TARGETS: Tuple[float, ...] = (1e-3, 1e-5)
FLOW_SHIFT = 3.0
SEED_X, SEED_NOISE = 1, 2


def _families() -> Dict[str, tuple]:
    ring, vp, flow = ring_mixture(), VPSchedule.linear(), FlowSchedule(shift=FLOW_SHIFT)
    return {
        "ddim": (DDIMSkip(vp), vp.timesteps(50, "trailing", step_to="stride"), ring.predictor(vp, "epsilon"), False),
        "ddpm": (DDPMSkip(vp), vp.timesteps(50, "trailing"), ring.predictor(vp, "epsilon"), True),
        "flow": (FlowEulerSkip(flow), flow.timesteps(28), ring.predictor(flow, "velocity"), False),
    }


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(torch.float64) - ref.to(torch.float64)).norm() / ref.to(torch.float64).norm())


def _tol(t: float) -> str:
    return "inf" if math.isinf(t) else f"{t:g}"


def run(quick: bool = False) -> dict:
    """Run the study; returns plain data (JSON-ready): ``rows`` tables and the plot's curves.

    Arguments:
        quick: a smaller batch (64 instead of 512), widths 2 and 4, and a coarser budget grid.
    """
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread wake-ups would cost more than the ops
    try:
        return _run(quick, t0)
    finally:
        torch.set_num_threads(threads)


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
    return {
        "oracle": "exact 2-D ring (8 modes), float64",
        "batch": batch,
        "error": "||x - x_serial||_F / ||x_serial||_F, same starting and per-step noise",
        "protocol_at_R": "Picard with max_rounds = DRiffusion's rounds R, best tolerance of "
                         + ", ".join(_tol(t) for t in budget_tols) + " for each init",
        "seconds": round(time.perf_counter() - t0, 1),
        "at_driffusion_rounds": at_r,
        "rounds_to_tolerance": to_tol,
        "budget_sweep": budget_rows,
        "curves": curves,
    }


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
    """Error to the serial output against rounds: one panel per family.

    DRiffusion: one point per width, joined. ParaDiGMS and skip-drafted Picard: per width, the
    best error reached within r rounds over the tolerance sweep (no budget), and at DRiffusion's
    rounds the best budgeted run (larger markers). Exact results (tau = 0) are off the log scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results["curves"]
    fams = list(curves)
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.2), squeeze=False)
    color = {"driffusion": "C0", "frozen": "C2", "skip": "C4"}
    styles = ["-", "--", ":", "-."]
    for ax, fam in zip(axes[0], fams):
        pts = curves[fam]["points"]
        dr = pts["driffusion"]
        ax.plot([p["rounds"] for p in dr], [p["error"] for p in dr], "o-", color=color["driffusion"], label=LABELS["driffusion"])
        for p in dr:
            ax.annotate(f"n={p['width']}", (p["rounds"], p["error"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        widths = [p["width"] for p in dr]
        for i, n in enumerate(widths):
            for init in INITS:
                rs, es = _envelope(pts[f"{init}:{n}"])
                ax.step(rs, es, where="post", color=color[init], linestyle=styles[i % len(styles)], alpha=0.9,
                        label=f"{LABELS[init]}, n={n}")
        for row in results["at_driffusion_rounds"]:
            if row["family"] == fam:
                ax.plot(row["rounds"], row["ParaDiGMS"], "^", color=color["frozen"], markersize=8)
                ax.plot(row["rounds"], row["skip_Picard"], "D", color=color["skip"], markersize=7)
        ax.set_yscale("log")
        ax.set_xlabel("rounds (sequential model calls)")
        ax.set_ylabel("relative error to the serial output")
        ax.set_title(f"{fam}, T = {curves[fam]['T']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6.5, loc="lower left")
    fig.suptitle("Exact ring oracle: markers at DRiffusion's rounds are the budgeted Picard runs (best tolerance)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover - manual use: python -m benchmarks.picard_study [--quick]
    import json
    import sys

    res = run("--quick" in sys.argv)
    plot_error_vs_rounds(res, "picard_error_vs_rounds.png")
    print(json.dumps({k: v for k, v in res.items() if k != "curves" and k != "budget_sweep"}, indent=1))

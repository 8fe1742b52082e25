r"""Grid study: where DRiffusion's gain over step skipping holds, by grid length, spacing, width and mode.

Key: T the grid length; n the width; R DRiffusion's rounds (``expected_rounds(T, n, mode)``); the
baseline is step skipping with R rounds (serial sampling on R of the T levels, the same per-step
noise). Ratio = RMSE(DRiffusion - serial) / RMSE(step skipping - serial), from the same starting noise:
below 1 DRiffusion is closer to the serial sample at equal latency; above 1 step skipping is.

Problem: the exact 2-D ring oracle (``solvers.ring_mixture``, float64, batch ``BATCH``), epsilon model,
linear betas (1e-4 .. 0.02, 1000 steps). Families: DDIM (eta = 0; leading and linspace grids step as
diffusers' DDIM, to t - 1000 // T) and DPM-Solver++ 2M (midpoint), on diffusers' three spacings.

Measured (``run()``):

* ``rows``: every (family, spacing, T, width, mode) with rounds and both errors and the ratio.
* ``worse_than_skipping``: the settings with ratio > 1.
* ``by_window``: the ratio's range over families, spacings and modes, per n / T (how far a window
  reaches along the grid); the gain fades as n / T grows.
* ``clipping``: DDIM, T = 50, n = 4, trailing, on a ring of radius 1.4 with x0 clipped to [-1, 1]
  (``ClipSample``, diffusers' ``clip_sample``), with and without ``recompute_eps`` (diffusers'
  ``use_clipped_model_output``); a ring of radius 0.7 (inside the range); radius 1.4 unclipped.

Self-contained: the main suite calls ``run(quick)`` and ``markdown(result)`` and nothing else.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
import warnings
from typing import Dict, List, Tuple

import torch

from benchmarks.metrics import rmse
from benchmarks.report import md_table
from benchmarks.timing import one_thread
from driffusion_core import ClipSample, DraftRefineScheduler, NoiseSource, VPSchedule, WideWindowWarning, expected_rounds
from solvers import DDIMSkip, DPMSolverSkip, ring_mixture, sample_serial, sample_step_skipping

__all__ = ["run", "markdown", "STEPS", "WIDTHS", "SPACINGS", "BATCH"]

STEPS: Tuple[int, ...] = (10, 20, 30, 50)
WIDTHS: Tuple[int, ...] = (2, 4, 8)
SPACINGS: Tuple[str, ...] = ("trailing", "leading", "linspace")
MODES: Tuple[str, ...] = ("aggressive", "conservative")
BATCH = 512
SEED_X = 1


def _setting(family: str, spacing: str, steps: int, schedule: VPSchedule, **transition_kw):
    """(transition, grid): DDIM steps as diffusers' DDIMScheduler (to t - N // T), 2M between listed timesteps."""
    if family == "ddim":
        return DDIMSkip(schedule, **transition_kw), schedule.timesteps(steps, spacing, step_to="stride")
    return DPMSolverSkip(schedule), schedule.timesteps(steps, spacing)


def _ratio_row(transition, grid, predictor, x, width: int, mode: str, serial: torch.Tensor) -> dict:
    with warnings.catch_warnings():  # the study measures exactly the wide windows the warning is about
        warnings.simplefilter("ignore", WideWindowWarning)
        sched = DraftRefineScheduler(transition, grid, width, mode)
    out = sched.sample(predictor, x)
    skip = sample_step_skipping(predictor, x, transition, grid, out.rounds).x
    d, s = rmse(out.x, serial), rmse(skip, serial)
    return {"rounds": out.rounds, "evals": out.evals, "driffusion_rmse": d, "skipping_rmse": s,
            "ratio": d / s if s > 0 else math.nan}


def run(quick: bool = False, steps: Tuple[int, ...] = None, widths: Tuple[int, ...] = None,
        spacings: Tuple[str, ...] = None, batch: int = None) -> dict:
    """The study (``quick``: T in (20, 50), widths (2, 4), trailing and leading, batch 128); the keyword
    arguments override either preset."""
    with one_thread():  # a 2-D ring
        return _run(quick, steps, widths, spacings, batch)


def _run(quick: bool, steps, widths, spacings, batch) -> dict:
    t0 = time.perf_counter()
    steps = steps or ((20, 50) if quick else STEPS)
    widths = widths or ((2, 4) if quick else WIDTHS)
    spacings = spacings or (("trailing", "leading") if quick else SPACINGS)
    batch = batch or (128 if quick else BATCH)
    schedule = VPSchedule.linear(1000, 1e-4, 0.02)
    ring = ring_mixture()
    predictor = ring.predictor(schedule, "epsilon")
    x = NoiseSource(SEED_X).initial((batch, 2), torch.float64)

    rows: List[dict] = []
    for family, spacing, T in itertools.product(("ddim", "dpm"), spacings, steps):
        transition, grid = _setting(family, spacing, T, schedule)
        serial = sample_serial(predictor, x, transition, grid).x
        for width, mode in itertools.product(widths, MODES):
            if width >= T:
                continue
            row = {"family": family, "spacing": spacing, "T": T, "width": width, "mode": mode}
            row.update(_ratio_row(transition, grid, predictor, x, width, mode, serial))
            assert row["rounds"] == expected_rounds(T, width, mode) and row["evals"] == T
            rows.append(row)

    worse = [{k: r[k] for k in ("family", "spacing", "T", "width", "mode", "ratio")} for r in rows if r["ratio"] > 1]
    by_window: Dict[float, List[float]] = {}
    for r in rows:
        by_window.setdefault(round(r["width"] / r["T"], 3), []).append(r["ratio"])
    window_rows = [{"n/T": k, "settings": len(v), "min ratio": min(v), "median ratio": statistics.median(v),
                    "max ratio": max(v), "worse than skipping": sum(r > 1 for r in v)}
                   for k, v in sorted(by_window.items())]

    clipping = []
    for radius, clip in ((1.4, True), (0.7, True), (1.4, False)):
        data = ring_mixture(radius=radius)
        f = data.predictor(schedule, "epsilon")
        options = [False, True] if clip else [False]
        for recompute in options:
            kw = {"x0_transform": ClipSample(1.0), "recompute_eps": recompute} if clip else {}
            transition, grid = _setting("ddim", "trailing", 50, schedule, **kw)
            serial = sample_serial(f, x, transition, grid).x
            row = {"ring radius": radius, "clip to [-1, 1]": clip, "recompute_eps": recompute if clip else None}
            row.update(_ratio_row(transition, grid, f, x, 4, "aggressive", serial))
            clipping.append(row)

    return {
        "batch": batch, "steps": list(steps), "widths": list(widths), "spacings": list(spacings),
        "settings": len(rows), "worse_count": len(worse),
        "rows": rows, "worse_than_skipping": worse, "by_window": window_rows, "clipping": clipping,
        "seconds": time.perf_counter() - t0,
    }


def _f(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2e}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}"
    return str(v)


def markdown(res: dict) -> str:
    """The ratio per setting as a pivot (rows: family, spacing, T; columns: width and mode), the window
    summary, and the clipping rows."""
    cols = [(w, m) for w in res["widths"] for m in MODES]
    index = {(r["family"], r["spacing"], r["T"], r["width"], r["mode"]): r["ratio"] for r in res["rows"]}
    pivot = []
    for family, spacing, T in itertools.product(("ddim", "dpm"), res["spacings"], res["steps"]):
        cells = [index.get((family, spacing, T, w, m)) for w, m in cols]
        pivot.append([{"ddim": "DDIM", "dpm": "DPM-Solver++ 2M"}[family], spacing, str(T)]
                     + [_f(c) if c is None or c <= 1 else f"**{_f(c)}**" for c in cells])
    header = ["family", "spacing", "T"] + [f"n={w} {m[:4]}." for w, m in cols]
    window = md_table(list(res["by_window"][0]), [[_f(v) for v in r.values()] for r in res["by_window"]]) if res["by_window"] else ""
    clip = md_table(list(res["clipping"][0]), [[_f(v) for v in r.values()] for r in res["clipping"]]) if res["clipping"] else ""
    return "\n\n".join([
        f"DRiffusion's RMSE to the serial sample ÷ step skipping's at the same rounds (bold: above 1, step "
        f"skipping closer). {res['worse_count']} of {res['settings']} settings above 1.",
        md_table(header, pivot),
        "*By window reach n / T* (over families, spacings and modes):",
        window,
        "*x0 clipping* (DDIM, T = 50, n = 4, aggressive, trailing):",
        clip,
    ])


if __name__ == "__main__":  # pragma: no cover - manual use: python -m benchmarks.grid_study [--quick]
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.grid_study", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run")
    result = run(parser.parse_args().quick)
    print(markdown(result))
    print(f"\n{result['seconds']:.0f} s")

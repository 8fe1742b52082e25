"""The quality table of one problem: every method from the same starting noise and per-step noise.

Rows (T = the grid length, n = the width, R = a DRiffusion row's rounds):

* ``serial``: the reference, T rounds of one call;
* ``data floor``: an independent set of true data scored like the samples (the metric's floor);
* ``DRiffusion aggressive`` / ``conservative``, widths n (width 1 is the serial sampler, exactly);
* ``step skipping``: serial sampling on R of the T levels, at the rounds of the DRiffusion row above it;
* ``Picard (frozen)``: ParaDiGMS's sliding-window Picard iteration with its usual initialisation
  (every level starts from the state of the window's first level), window n, stopped after R rounds;
* ``Picard (skip)``: the same, seeded with DRiffusion's skip drafts, stopped after R rounds;
* both Picard variants again run to convergence (tolerance ``cfg.picard_tolerance``).

Columns: rounds, model calls, RMSE to the serial output, the distances to the data, and on each
baseline row DRiffusion's error as a fraction of the baseline's (the DRiffusion row it is matched
with: the same rounds and width; the aggressive row of the same width for converged Picard).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import solvers
from backends import BatchedExecutor
from benchmarks.cases import Case
from benchmarks.config import BenchConfig
from benchmarks.metrics import rmse
from driffusion_core import DraftRefineScheduler, NoiseSource, SampleOutput, expected_rounds
from solvers import sample_serial, sample_step_skipping

__all__ = ["run_case", "picard_available", "MODES", "PICARD_INITS", "row_label"]

MODES = ("aggressive", "conservative")
PICARD_INITS = ("frozen", "skip")


def picard_available() -> bool:
    """Whether ``solvers.PicardScheduler`` exists (the Picard rows are left out, and said so, if not)."""
    return hasattr(solvers, "PicardScheduler")


def row_label(method: str, width: Optional[int] = None) -> str:
    """Short name of a DRiffusion row, e.g. ``a4`` / ``c2``."""
    return f"{method[0]}{width}"


def _sample_picard(case: Case, x, noise, width: int, init: str, tolerance: float, max_rounds: Optional[int]) -> SampleOutput:
    sched = solvers.PicardScheduler(case.transition, case.grid, width, tolerance, max_rounds=max_rounds, init=init)
    return sched.sample(case.predictor, x, executor=BatchedExecutor(), noise=noise)


def run_case(
    case: Case, cfg: BenchConfig, tick: Callable[[str], None] = lambda _: None
) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Run every row of ``case``'s quality table.

    Arguments:
        tick: called after each sampler run with a short description (drives the progress bar).

    Returns:
        (table, samples): the table as plain data (JSON-ready), and the final samples (for the
        sample-grid plot): ``"serial"``, each DRiffusion row's label (``"a4"``; its rounds under
        ``"a4:rounds"``) and the step-skipping run matched with it (``"skip:a4"``).
    """
    T = len(case.grid)
    x = NoiseSource(cfg.seed_x).initial(case.shape, case.dtype)
    noise = NoiseSource(cfg.seed_noise)
    rows: List[dict] = []
    checks: List[dict] = []
    samples: Dict[str, torch.Tensor] = {}

    def add(method: str, out: Optional[SampleOutput], seconds: float, **extra) -> dict:
        row = {"method": method, **extra}
        if out is not None:
            row.update(rounds=out.rounds, evals=out.evals, rmse=rmse(out.x, serial.x), seconds=seconds)
            row.update(case.score(out.x))
        rows.append(row)
        return row

    def timed(fn):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn()
        tick(case.name)
        return out, time.perf_counter() - t0

    serial, sec = timed(lambda: sample_serial(case.predictor, x, case.transition, case.grid, noise=noise))
    samples["serial"] = serial.x
    add("serial", serial, sec, width=1)
    add("data floor", None, 0.0, **case.floor)

    skip_cache: Dict[int, Tuple[SampleOutput, float]] = {}
    picard_cache: Dict[Tuple[int, int, str], Tuple[SampleOutput, float]] = {}
    drift_rows: Dict[Tuple[str, int], dict] = {}
    for width in cfg.widths:
        for mode in MODES:
            sched = DraftRefineScheduler(case.transition, case.grid, width=width, mode=mode)
            out, sec = timed(lambda: sched.sample(case.predictor, x, executor=BatchedExecutor(), noise=noise))
            label = row_label(mode, width)
            samples[label], samples[label + ":rounds"] = out.x, out.rounds
            d = add(f"DRiffusion {mode}", out, sec, width=width, label=label)
            drift_rows[(mode, width)] = d
            want = expected_rounds(T, width, mode)
            checks.append({"check": f"{label}: rounds == expected_rounds({T}, {width}, {mode!r})",
                           "ok": out.rounds == want, "got": out.rounds, "want": want})
            checks.append({"check": f"{label}: model calls == T", "ok": out.evals == T, "got": out.evals, "want": T})
            if width == 1:
                checks.append({"check": f"{label}: width 1 equals the serial sample bit for bit",
                               "ok": bool(torch.equal(out.x, serial.x)), "got": d["rmse"], "want": 0.0})
                continue  # every baseline at T rounds is the serial sampler itself
            R = out.rounds
            if R not in skip_cache:
                skip_cache[R] = timed(lambda: sample_step_skipping(case.predictor, x, case.transition, case.grid, R, noise=noise))
            add("step skipping", skip_cache[R][0], skip_cache[R][1], width=1, matched=label)
            samples["skip:" + label] = skip_cache[R][0].x
            if picard_available():
                for init in PICARD_INITS:
                    key = (width, R, init)
                    if key not in picard_cache:
                        picard_cache[key] = timed(
                            lambda: _sample_picard(case, x, noise, width, init, cfg.picard_tolerance, R))
                    add(f"Picard ({init})", picard_cache[key][0], picard_cache[key][1], width=width, matched=label)
    if picard_available():
        for width in [w for w in cfg.widths if w > 1]:
            for init in PICARD_INITS:
                out, sec = timed(lambda: _sample_picard(case, x, noise, width, init, cfg.picard_tolerance, None))
                add(f"Picard ({init}) converged", out, sec, width=width, matched=row_label("aggressive", width))
    for row in rows:
        if "matched" in row:
            d = next(r for r in rows if r.get("label") == row["matched"])
            row["ratio"] = d["rmse"] / row["rmse"] if row["rmse"] > 0 else None
    table = {
        "model": case.model,
        "family": case.family,
        "transition": repr(case.transition),
        "num_steps": T,
        "batch": case.shape[0],
        "metrics": case.metric_names,
        "rows": rows,
        "checks": checks,
        "notes": list(case.notes) + ([] if picard_available() else [PICARD_MISSING]),
    }
    return table, samples


PICARD_MISSING = (
    "Picard rows missing: solvers.PicardScheduler is not available in this checkout "
    "(INTEGRATION POINT: benchmarks/quality.py adds its rows as soon as it exists)."
)


def runs_per_case(cfg: BenchConfig) -> int:
    """Sampler runs in one table (for the progress bar's total)."""
    wide = [w for w in cfg.widths if w > 1]
    rounds = {expected_rounds(cfg.num_steps, w, m) for w in wide for m in MODES}
    n = 1 + 2 * len(cfg.widths) + len(rounds)
    if picard_available():
        n += len({(w, expected_rounds(cfg.num_steps, w, m)) for w in wide for m in MODES}) * 2 + 2 * len(wide)
    return n

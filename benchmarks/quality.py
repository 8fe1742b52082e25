"""The quality table of one problem: every method from the same starting noise and per-step noise.

Rows (T = the grid length, n = the width, R = a DRiffusion row's rounds):

* ``serial``: the reference, T rounds of one call;
* ``data floor``: an independent set of true data scored like the samples (the metric's floor);
* ``DRiffusion aggressive`` / ``conservative``, widths n (width 1 is the serial sampler, exactly);
* ``step skipping``: serial sampling on R of the T levels, at the rounds of the DRiffusion row above it;
* ``Picard (frozen)``: ParaDiGMS's sliding-window Picard iteration (``solvers.PicardScheduler``) with
  its usual initialisation (new window levels start as copies of the window's last state), window n;
* ``Picard (skip)``: the same, new window levels seeded with DRiffusion's skip drafts.

Picard's knob is its tolerance: a looser one slides the window further per round (fewer rounds,
larger error). "At equal rounds" is therefore the best (smallest RMSE to serial) of a sweep of
tolerances among the runs that finish within R rounds, with window n: a choice that favours the
baseline, since it uses the serial output to pick. The runs are pure Picard (``max_rounds=None``):
``PicardScheduler``'s own ``max_rounds`` budget would finish with draft-and-refine, i.e. DRiffusion.
"At convergence" runs each variant to ``cfg.picard_tolerance``, whatever rounds that takes.

Columns: rounds, model calls, RMSE to the serial output, the distances to the data, and on each
baseline row DRiffusion's RMSE as a fraction of the baseline's (for the DRiffusion row it is matched
with: the same rounds and width; the aggressive row of the same width for converged Picard).
"""
from __future__ import annotations

import math
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

__all__ = ["run_case", "picard_available", "picard_widths", "runs_per_case", "MODES", "PICARD_INITS", "row_label"]

MODES = ("aggressive", "conservative")
PICARD_INITS = ("frozen", "skip")

PICARD_MISSING = (
    "Picard rows missing: solvers.PicardScheduler is not available in this checkout "
    "(INTEGRATION POINT: benchmarks/quality.py adds its rows as soon as it exists)."
)


def picard_available() -> bool:
    """Whether ``solvers.PicardScheduler`` exists (the Picard rows are left out, and said so, if not)."""
    return hasattr(solvers, "PicardScheduler")


def row_label(mode: str, width: int) -> str:
    """Short name of a DRiffusion row, e.g. ``a4`` / ``c2``."""
    return f"{mode[0]}{width}"


def picard_widths(case: Case, cfg: BenchConfig) -> List[int]:
    """The widths that get Picard rows in ``case``'s table."""
    wide = [w for w in cfg.widths if w > 1]
    return wide if case.picard_widths is None else [w for w in wide if w in case.picard_widths]


def runs_per_case(case: Case, cfg: BenchConfig) -> int:
    """Sampler runs in one table (for the progress bar's total)."""
    wide = [w for w in cfg.widths if w > 1]
    n = 1 + 2 * len(cfg.widths) + len({expected_rounds(cfg.num_steps, w, m) for w in wide for m in MODES})
    if picard_available():
        n += len(picard_widths(case, cfg)) * len(PICARD_INITS) * (len(case.picard_sweep) + 1)
    return n


def _picard(case: Case, x, noise, width: int, init: str, tolerance: float) -> SampleOutput:
    sched = solvers.PicardScheduler(case.transition, case.grid, width, tolerance, max_rounds=None, init=init)
    return sched.sample(case.predictor, x, executor=BatchedExecutor(), noise=noise)


def _tol(t: float) -> str:
    return "∞" if math.isinf(t) else f"{t:g}"


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
    scores: Dict[int, Tuple[torch.Tensor, Dict[str, float]]] = {}

    def timed(fn) -> Tuple[SampleOutput, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn()
        tick(case.name)
        return out, time.perf_counter() - t0

    def add(method: str, run: Optional[Tuple[SampleOutput, float]], **extra) -> dict:
        row = {"method": method, **extra}
        if run is not None:
            out, seconds = run
            row.update(rounds=out.rounds, evals=out.evals, rmse=rmse(out.x, serial.x), seconds=seconds)
            key = id(out.x)  # a run matched with several DRiffusion rows is scored once
            if key not in scores:  # the sample is kept with its score: a freed one's id could be reused
                scores[key] = (out.x, case.score(out.x))
            row.update(scores[key][1])
        rows.append(row)
        return row

    serial_run = timed(lambda: sample_serial(case.predictor, x, case.transition, case.grid, noise=noise))
    serial = serial_run[0]
    samples["serial"] = serial.x
    add("serial", serial_run, width=1)
    add("data floor", None, **case.floor)["sd"] = dict(case.floor_sd)

    # Picard: a tolerance sweep per (width, init), pure Picard iteration
    sweeps: Dict[Tuple[int, str], List[Tuple[float, Tuple[SampleOutput, float]]]] = {}
    if picard_available():
        for width in picard_widths(case, cfg):
            for init in PICARD_INITS:
                sweeps[(width, init)] = [(tol, timed(lambda: _picard(case, x, noise, width, init, tol)))
                                         for tol in case.picard_sweep]

    skip_cache: Dict[int, Tuple[SampleOutput, float]] = {}
    for width in cfg.widths:
        for mode in MODES:
            sched = DraftRefineScheduler(case.transition, case.grid, width=width, mode=mode)
            rows_seen = [0]  # rows the predictor was called on (one batched call per round holds its drafts)

            def counted(xx, tt, **c):
                rows_seen[0] += xx.shape[0]
                return case.predictor(xx, tt, **c)

            run = timed(lambda: sched.sample(counted, x, executor=BatchedExecutor(), noise=noise))
            out, label = run[0], row_label(mode, width)
            samples[label], samples[label + ":rounds"] = out.x, out.rounds
            d = add(f"DRiffusion {mode}", run, width=width, label=label)
            want = expected_rounds(T, width, mode)
            checks.append({"check": f"{label}: rounds == expected_rounds({T}, {width}, {mode!r})",
                           "ok": out.rounds == want, "got": out.rounds, "want": want})
            calls = rows_seen[0] // x.shape[0]  # model calls on the batch, counted at the predictor
            checks.append({"check": f"{label}: model calls == T (counted at the predictor; SampleOutput.evals agrees)",
                           "ok": rows_seen[0] == T * x.shape[0] and out.evals == T,
                           "got": calls, "want": T})
            if width == 1:
                checks.append({"check": f"{label}: width 1 equals the serial sample bit for bit",
                               "ok": bool(torch.equal(out.x, serial.x)), "got": d["rmse"], "want": 0.0})
                continue  # every baseline at T rounds is the serial sampler itself
            R = out.rounds
            if R not in skip_cache:
                skip_cache[R] = timed(lambda: sample_step_skipping(case.predictor, x, case.transition, case.grid, R, noise=noise))
            add("step skipping", skip_cache[R], width=1, matched=label)
            samples["skip:" + label] = skip_cache[R][0].x
            for init in PICARD_INITS:
                sweep = sweeps.get((width, init))
                if not sweep:
                    continue
                fits = [(tol, r) for tol, r in sweep if r[0].rounds <= R]
                if fits:
                    tol, r = min(fits, key=lambda tr: rmse(tr[1][0].x, serial.x))
                else:  # even the loosest tolerance needs more rounds: show it, over the budget
                    tol, r = min(sweep, key=lambda tr: tr[1][0].rounds)
                add(f"Picard ({init})", r, width=width, matched=label, tolerance=_tol(tol), within_rounds=bool(fits))
    for (width, init) in sweeps:
        run = timed(lambda: _picard(case, x, noise, width, init, cfg.picard_tolerance))
        add(f"Picard ({init}) converged", run, width=width, matched=row_label("aggressive", width),
            tolerance=_tol(cfg.picard_tolerance))
    for row in rows:
        if "matched" in row:
            d = next(r for r in rows if r.get("label") == row["matched"])
            row["ratio"] = d["rmse"] / row["rmse"] if row["rmse"] > 0 else None
    sweep_points = [
        {"init": init, "width": width, "tolerance": _tol(tol), "rounds": r[0].rounds, "evals": r[0].evals,
         "rmse": rmse(r[0].x, serial.x)}
        for (width, init), sweep in sweeps.items() for tol, r in sweep
    ]
    notes = list(case.notes)
    if not picard_available():
        notes.append(PICARD_MISSING)
    elif case.picard_widths is not None:
        notes.append(f"Picard rows at width {', '.join(map(str, picard_widths(case, cfg)))} only (cost); "
                     f"tolerance sweep {', '.join(map(_tol, case.picard_sweep))}.")
    else:
        notes.append(f"Picard tolerance sweep: {', '.join(map(_tol, case.picard_sweep))}.")
    table = {
        "model": case.model,
        "family": case.family,
        "transition": repr(case.transition),
        "num_steps": T,
        "batch": case.shape[0],
        "metrics": case.metric_names,
        "rows": rows,
        "picard_sweep": sweep_points,
        "checks": checks,
        "notes": notes,
    }
    return table, samples

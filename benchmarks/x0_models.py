r"""x0 ("sample") models: how well DRiffusion carries their drafts over, raw and wrapped by ``reparameterize``.

``python -m benchmarks.x0_models [--batch 2000] [--steps 50] [--width 4]`` prints one table (a few seconds).

Problem: the exact 2-D ring oracle (``solvers.ring_mixture``, float64) asked for x0 (``predictor(schedule,
"sample")``), starting noise ``NoiseSource(1).initial((batch, 2))`` (the benchmark suite's seed). Settings:

* ``trailing DDIM``: the suite's DDIM family (linear betas 1e-4 .. 0.02, trailing grid, DDIM's stride);
* ``flow (shift 3)``: the suite's flow family (SD3's shifted sigmas, Euler);
* ``leading DDIM``: the same DDIM on diffusers' default leading grid.

Each runs raw (the transition told ``prediction="sample"``) and wrapped
(``reparameterize(model, schedule, "sample", "epsilon")``, ``"velocity"`` for flow, with the transition
told that). Ratio = RMSE(DRiffusion - serial) / RMSE(step skipping - serial) at DRiffusion's rounds, both
from the same noise (below 1: DRiffusion is closer to the serial sample at equal latency). The serial
sample is the same raw or wrapped (to rounding).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Dict, List, Optional

import torch

from benchmarks.cases import family
from benchmarks.cli import count
from benchmarks.metrics import rmse
from benchmarks.report import fmt, md_table
from driffusion_core import DraftRefineScheduler, NoiseSource, reparameterize
from solvers import DDIMSkip, FlowEulerSkip, ring_mixture, sample_serial, sample_step_skipping

__all__ = ["SETTINGS", "MODES", "run", "markdown", "main"]

SETTINGS = ("trailing DDIM", "flow (shift 3)", "leading DDIM")
MODES = ("aggressive", "conservative")
SEED_X = 1


def _setting(name: str, steps: int):
    """(schedule, grid, transition class, wrapped-to parameterization) of a setting."""
    if name == "trailing DDIM":
        _, grid, schedule = family("ddim", steps)
        return schedule, grid, DDIMSkip, "epsilon"
    if name == "flow (shift 3)":
        _, grid, schedule = family("flow", steps)
        return schedule, grid, FlowEulerSkip, "velocity"
    if name == "leading DDIM":
        _, _, schedule = family("ddim", steps)
        return schedule, schedule.timesteps(steps, "leading", step_to="stride"), DDIMSkip, "epsilon"
    raise ValueError(f"unknown setting {name!r}; choose from {SETTINGS}")


def run(batch: int = 2000, steps: int = 50, width: int = 4) -> List[Dict[str, object]]:
    """One row per (setting, model, mode): rounds, both RMSEs to serial and their ratio."""
    mix = ring_mixture()
    x = NoiseSource(SEED_X).initial((batch, 2), torch.float64)
    rows = []
    for name in SETTINGS:
        schedule, grid, transition, target = _setting(name, steps)
        raw = mix.predictor(schedule, "sample")
        for model, (f, tr) in (
            ("x0 model", (raw, transition(schedule, "sample"))),
            (f"wrapped as {target}", (reparameterize(raw, schedule, "sample", target), transition(schedule, target))),
        ):
            serial = sample_serial(f, x, tr, grid).x
            for mode in MODES:
                out = DraftRefineScheduler(tr, grid, width, mode).sample(f, x)
                skip = sample_step_skipping(f, x, tr, grid, out.rounds).x
                d, s = rmse(out.x, serial), rmse(skip, serial)
                rows.append({"setting": name, "model": model, "mode": mode, "rounds": out.rounds,
                             "driffusion_rmse": d, "skipping_rmse": s, "ratio": d / s if s > 0 else math.nan})
    return rows


def markdown(rows: List[Dict[str, object]]) -> str:
    return md_table(
        ["setting", "model", "mode", "rounds", "RMSE to serial", "step skipping", "ratio"],
        [[r["setting"], r["model"], r["mode"], str(r["rounds"]), f"{r['driffusion_rmse']:.3g}",
          f"{r['skipping_rmse']:.3g}", fmt(r["ratio"], "x")] for r in rows],
    )


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.x0_models", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=count(), default=2000)
    p.add_argument("--steps", type=count(), default=50)
    p.add_argument("--width", type=count(), default=4)
    a = p.parse_args(argv)
    print(f"ring oracle, float64, batch {a.batch}, seed {SEED_X}, T = {a.steps}, width {a.width}; "
          "ratio = DRiffusion's RMSE to serial / step skipping's at the same rounds")
    print(markdown(run(a.batch, a.steps, a.width)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

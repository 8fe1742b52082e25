"""A tour of the public API, written as a researcher's script would use it.

It runs (``python examples/typed_usage.py``; tests/test_readme.py runs it too) and it type-checks under
``mypy --strict`` against the package's own hints (``make typecheck``): the packages ship ``py.typed``,
so a user's type checker sees the same hints.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from backends import BatchedExecutor, SerialExecutor, per_sample
from driffusion_core import (
    ClipSample,
    DraftRefineScheduler,
    DraftRefineState,
    DriffusionError,
    DynamicThreshold,
    FlowSchedule,
    NoiseSource,
    Prediction,
    SampleOutput,
    TimeGrid,
    VPSchedule,
    WideWindowWarning,
    expected_rounds,
    reparameterize,
)
from solvers import (
    DDIMSkip,
    DDPMSkip,
    DPMSolverSkip,
    FlowEulerSkip,
    GaussianMixture,
    PicardScheduler,
    UniPCSkip,
    fewest_rounds,
    ring_mixture,
    sample_serial,
    sample_step_skipping,
)


def shrink(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
    """A stand-in predictor: any f(x, t, **cond) -> tensor of x's shape."""
    return 0.1 * x


def tour() -> dict[str, float]:
    """Each public entry point once; returns each result's RMSE to the serial sampler's."""
    warnings.simplefilter("ignore", WideWindowWarning)  # the short grids below are for speed
    schedule = VPSchedule.scaled_linear(1000, rescale_betas_zero_snr=False)
    grid: TimeGrid = schedule.timesteps(20, spacing="trailing")
    x = NoiseSource(seed=0).initial((8, 2))
    noise = NoiseSource(seed=1)  # per-step noise for the stochastic samplers, shared by all of them

    def rmse(a: SampleOutput, b: SampleOutput) -> float:
        return float((a.x - b.x).pow(2).mean().sqrt())

    # DDIM with eta > 0 and x0 clipping: conservative draft-and-refine against the serial sampler
    ddim = DDIMSkip(schedule, prediction=Prediction.EPSILON, eta=0.5, x0_transform=ClipSample(1.0))
    ref = sample_serial(shrink, x, ddim, grid, noise=noise)
    out = DraftRefineScheduler(ddim, grid, width=3, mode="conservative").sample(
        shrink, x, executor=BatchedExecutor(), noise=noise, return_trajectory=True
    )
    assert out.rounds == expected_rounds(20, 3, "conservative") and out.evals == 20
    errors = {"ddim conservative": rmse(out, ref)}
    errors["step skipping"] = rmse(sample_step_skipping(shrink, x, ddim, grid, rounds=out.rounds, noise=noise), ref)

    # DDPM with dynamic thresholding, by skip-drafted Picard under a round budget
    ddpm = DDPMSkip(schedule, variance_type="fixed_large", x0_transform=DynamicThreshold())
    ddpm_ref = sample_serial(shrink, x, ddpm, grid, noise=noise)
    picard = PicardScheduler(ddpm, grid, width=4, tolerance=1e-3, max_rounds=fewest_rounds(20, 4) + 2, init="skip")
    errors["ddpm picard"] = rmse(picard.sample(shrink, x, executor=SerialExecutor(), noise=noise), ddpm_ref)

    # multistep solvers, and a model for one sample at a time batched by vmap
    for name, solver in (("dpm-solver++ 2m", DPMSolverSkip(schedule)), ("unipc", UniPCSkip(schedule))):
        one = sample_serial(shrink, x, solver, grid)
        errors[name] = rmse(DraftRefineScheduler(solver, grid, 2).sample(shrink, x, BatchedExecutor(vmap=True)), one)
    errors["per_sample"] = rmse(sample_serial(per_sample(shrink), x, ddim, grid, noise=noise), ref)

    # a v-prediction model from an epsilon one, and the exact mixture oracle
    v_model = reparameterize(shrink, schedule, "epsilon", "v_prediction")
    v_ddim = DDIMSkip(schedule, prediction="v_prediction")
    errors["v_prediction"] = rmse(sample_serial(v_model, x, v_ddim, grid), sample_serial(shrink, x, DDIMSkip(schedule), grid))
    mixture: GaussianMixture = ring_mixture()
    oracle = mixture.predictor(schedule, "epsilon")
    errors["oracle"] = rmse(
        DraftRefineScheduler(DDIMSkip(schedule), grid, 1).sample(oracle, x), sample_serial(oracle, x, DDIMSkip(schedule), grid)
    )

    # flow matching, and a state machine driven round by round
    flow = FlowSchedule(shift=3.0)
    euler = FlowEulerSkip(flow, prediction="velocity")
    fgrid = flow.timesteps(10)
    state: DraftRefineState = DraftRefineScheduler(euler, fgrid, 2).start(x)
    while (rnd := state.plan()) is not None:
        state.absorb(rnd, torch.stack([shrink(z, torch.zeros(())) for z in rnd.xs]))
    errors["flow, by hand"] = float((state.x - sample_serial(shrink, x, euler, fgrid).x).pow(2).mean().sqrt())

    # k-diffusion's calling convention: a Tensor by default, the SampleOutput with return_output=True
    from solvers.interop import sample_driffusion

    sigmas = torch.tensor([10.0, 4.0, 1.5, 0.5, 0.0])
    denoised: torch.Tensor = sample_driffusion(lambda z, s: 0.5 * z, x * 10.0, sigmas, disable=True)
    counted: SampleOutput = sample_driffusion(lambda z, s: 0.5 * z, x * 10.0, sigmas, disable=True, return_output=True)
    errors["k-diffusion style"] = float((denoised - counted.x).pow(2).mean().sqrt())

    try:
        DraftRefineScheduler(ddim, grid, width=0)
    except DriffusionError as e:  # every refusal is a DriffusionError subclass with a message that says the fix
        assert "width" in str(e)
    return errors


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help; no options
    for name, err in tour().items():
        print(f"{name:>18}: RMSE to serial {err:.3g}")

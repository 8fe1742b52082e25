"""Models that reuse memory: one output buffer handed back on every call (a CUDA graph's static output, a
preallocated result), or writes into their time argument t. Every sampler and executor gives what the
same model returning fresh tensors gives, bit for bit, and the time grid is never changed.

The reference is the same sampler, executor and noise with the model's output copied on every call.
"""
from __future__ import annotations

import pytest
import torch

from _metrics import one_torch_thread  # noqa: F401  (autouse fixture)
from backends import BatchedExecutor, SerialExecutor
from driffusion_core import DraftRefineScheduler, FlowSchedule, NoiseSource, VPSchedule
from driffusion_core.executor import stack_calls
from solvers import (
    DDIMSkip, DDPMSkip, DPMSolverSkip, FlowEulerSkip, PicardScheduler, ring_mixture, sample_serial,
    sample_step_skipping,
)

RING = ring_mixture()
VP = VPSchedule.linear()
FLOW = FlowSchedule(shift=3.0)
T = 12


def family(name: str):
    """(transition, grid, model, noise) on the exact ring oracle."""
    if name == "ddim":
        return DDIMSkip(VP), VP.timesteps(T, "trailing"), RING.predictor(VP, "epsilon"), None
    if name == "ddim_eta":
        return DDIMSkip(VP, eta=0.6), VP.timesteps(T, "trailing"), RING.predictor(VP, "epsilon"), NoiseSource(3)
    if name == "ddpm":
        return DDPMSkip(VP), VP.timesteps(T, "trailing"), RING.predictor(VP, "epsilon"), NoiseSource(3)
    if name == "dpm":  # multistep: each step combines the previous step's prediction, kept past a model call
        return DPMSolverSkip(VP), VP.timesteps(T, "trailing"), RING.predictor(VP, "epsilon"), None
    return FlowEulerSkip(FLOW), FLOW.timesteps(T), RING.predictor(FLOW, "velocity"), None


FAMILIES = ["ddim", "ddim_eta", "ddpm", "dpm", "flow"]


class StaticOutput:
    """``f`` returning one buffer per output shape and dtype, refilled on every call."""

    def __init__(self, f):
        self.f, self.buffers = f, {}

    def __call__(self, x, t, **cond):
        y = self.f(x, t, **cond)
        buf = self.buffers.setdefault((tuple(y.shape), y.dtype), torch.empty_like(y))
        return buf.copy_(y)


class NegatesTime:
    """``f`` called after negating t in place (``t.neg_()``, then ``f(x, -t)``: the same values, exactly)."""

    def __init__(self, f):
        self.f = f

    def __call__(self, x, t, **cond):
        t.neg_()
        return self.f(x, -t, **cond)


def fresh(f):
    return lambda x, t, **cond: f(x, t, **cond).clone()


def runs(name: str, executor):
    """Every sampler of the library on one family: name -> callable(model) -> final state."""
    tr, grid, _, noise = family(name)
    x = NoiseSource(0).initial((6, 2), torch.float64)
    out = {
        "serial": lambda m: sample_serial(m, x, tr, grid, noise=noise).x,
        "step skipping": lambda m: sample_step_skipping(m, x, tr, grid, 5, noise=noise).x,
    }
    for mode in ("aggressive", "conservative"):
        for width in (1, 3):
            sched = DraftRefineScheduler(tr, grid, width=width, mode=mode)
            out[f"{mode} w{width}"] = (lambda s: lambda m: s.sample(m, x, executor=executor, noise=noise).x)(sched)
    for init in ("skip", "frozen"):
        sched = PicardScheduler(tr, grid, width=3, tolerance=1e-3, init=init)
        out[f"picard {init}"] = (lambda s: lambda m: s.sample(m, x, executor=executor, noise=noise).x)(sched)
    return out


EXECUTORS = [pytest.param(SerialExecutor(), id="serial"), pytest.param(BatchedExecutor(), id="batched"),
             pytest.param(BatchedExecutor(max_batch=6), id="batched-chunks")]


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("name", FAMILIES)
def test_a_reused_output_buffer_gives_the_fresh_outputs_result(name, executor):
    model = family(name)[2]
    for sampler, run in runs(name, executor).items():
        got, ref = run(StaticOutput(model)), run(fresh(model))
        assert torch.equal(got, ref), f"{sampler}: {float((got - ref).abs().max()):.3g} from the fresh model's result"


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm", "flow"])
@pytest.mark.parametrize("batch", [1, 4])
def test_a_model_writing_into_t_changes_neither_the_result_nor_the_grid(name, executor, batch):
    tr, grid, model, noise = family(name)
    before = grid.model_times.clone()
    x = NoiseSource(0).initial((batch, 2), torch.float64)
    for run in (lambda m: sample_serial(m, x, tr, grid, noise=noise).x,
                lambda m: sample_step_skipping(m, x, tr, grid, 5, noise=noise).x,
                lambda m: DraftRefineScheduler(tr, grid, width=3).sample(m, x, executor=executor, noise=noise).x,
                lambda m: PicardScheduler(tr, grid, width=3, tolerance=1e-3).sample(m, x, executor=executor, noise=noise).x):
        got = run(NegatesTime(model))
        assert torch.equal(grid.model_times, before), "the model's write into t reached the time grid"
        assert torch.equal(got, run(model))


def test_stack_calls_copies_each_output_as_it_comes():
    """The executors' collector: alike outputs are stacked as they come (a reused buffer is copied before the
    next call overwrites it); unlike ones come back as the list of outputs, earlier alike ones as copies."""
    buf = torch.empty(3)
    got = stack_calls(lambda j: buf.fill_(float(j)), 4)
    assert torch.equal(got, torch.arange(4.0)[:, None].expand(4, 3))
    outs = stack_calls(lambda j: buf.fill_(float(j)) if j < 2 else torch.zeros(5), 3)
    assert isinstance(outs, list) and [o.shape for o in outs] == [(3,), (3,), (5,)]
    assert torch.equal(outs[0], torch.zeros(3)) and torch.equal(outs[1], torch.ones(3))
    assert stack_calls(lambda j: "no tensor", 2) == ["no tensor", "no tensor"]
    x = torch.randn(2, 3, requires_grad=True)  # gradients flow through the copies
    stack_calls(lambda j: x[j] * (j + 1), 2).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0] * 3, [2.0] * 3]))

"""The samplers with states, models and grids on a CUDA device: the invariants of the CPU suite, on the GPU.

Each test runs on the CPU too (so the suite checks the tests themselves); the CUDA runs are marked ``gpu`` and
skipped (with the reason) where CUDA is absent; ``benchmarks/gpu_check.sh`` runs them on a lent GPU. They
check what only a GPU run exercises: grids made from CUDA timesteps (diffusers'
``set_timesteps(..., device="cuda")``), coefficients passed to CUDA kernels as CPU scalars, the noise drawn
on the CPU and moved, the in-place-write fingerprint of inference tensors, and autocast around the sampler.
"""
from __future__ import annotations

import pytest
import torch

from backends import BatchedExecutor, SerialExecutor
from driffusion_core import DraftRefineScheduler, FlowSchedule, NoiseSource, PredictorOutputError, VPSchedule
from solvers import DDIMSkip, DDPMSkip, DPMSolverSkip, FlowEulerSkip, PicardScheduler, UniPCSkip, sample_serial

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda:0", id="cuda", marks=[pytest.mark.gpu, needs_cuda])]


def _predictor(x, t):
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.sin(1.3 * x + 0.001 * tt) + 0.1 * torch.tanh(x) * x  # bounded growth: finite on every grid


def _cases():
    vp, flow = VPSchedule.linear(), FlowSchedule()
    return [
        ("ddim", DDIMSkip(vp), vp.timesteps(12, "trailing")),
        ("ddim-eta", DDIMSkip(vp, eta=0.5), vp.timesteps(12, "trailing")),
        ("ddpm", DDPMSkip(vp), vp.timesteps(12, "trailing")),
        ("flow", FlowEulerSkip(flow), flow.timesteps(12)),
        ("dpm", DPMSolverSkip(vp), vp.timesteps(12, "trailing")),
        ("unipc", UniPCSkip(vp), vp.timesteps(12, "trailing")),
    ]


@pytest.mark.parametrize("name,transition,grid", _cases(), ids=[c[0] for c in _cases()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dev", DEVICES)
def test_width1_is_the_serial_sampler_and_executors_agree_on_cuda(name, transition, grid, dtype, dev):
    x = NoiseSource(0).initial((4, 3, 8), dtype=dtype, device=dev)
    noise = NoiseSource(1)
    ref = sample_serial(_predictor, x, transition, grid, noise=noise)
    assert ref.x.device == x.device and ref.x.dtype == dtype
    for mode in ("aggressive", "conservative"):
        one = DraftRefineScheduler(transition, grid, width=1, mode=mode).sample(_predictor, x, noise=noise)
        assert torch.equal(one.x, ref.x), (name, mode)
        serial = DraftRefineScheduler(transition, grid, width=3, mode=mode).sample(
            _predictor, x, executor=SerialExecutor(), noise=noise)
        batched = DraftRefineScheduler(transition, grid, width=3, mode=mode).sample(
            _predictor, x, executor=BatchedExecutor(), noise=noise)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(batched.x, serial.x, rtol=tol, atol=tol)


@pytest.mark.parametrize("dev", DEVICES)
def test_the_same_seed_gives_the_same_noise_and_samples_on_cpu_and_cuda(dev):
    """NoiseSource draws on the CPU and moves the noise: a CUDA run sees the CPU run's noise bit for bit."""
    vp = VPSchedule.linear()
    src = NoiseSource(3)
    assert torch.equal(src(5, (2, 3), device=dev).cpu(), src(5, (2, 3)))
    x = NoiseSource(0).initial((4, 3))
    cpu = sample_serial(_predictor, x, DDPMSkip(vp), vp.timesteps(10), noise=NoiseSource(1)).x
    gpu = sample_serial(_predictor, x.to(dev), DDPMSkip(vp), vp.timesteps(10), noise=NoiseSource(1)).x
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
def test_grids_from_cuda_timesteps(dev):
    """diffusers' scheduler.set_timesteps(n, device="cuda") leaves CUDA timesteps: they make the same grid."""
    vp = VPSchedule.linear()
    levels = [999.0, 799.0, 599.0, 399.0, 199.0]
    cpu = DraftRefineScheduler(DDIMSkip(vp), levels, width=2)
    gpu = DraftRefineScheduler(DDIMSkip(vp), torch.tensor(levels, device=dev), width=2)
    assert torch.equal(cpu.grid.t_from, gpu.grid.t_from) and gpu.grid.t_from.device.type == "cpu"
    x = NoiseSource(0).initial((2, 3), device=dev)
    assert torch.equal(cpu.sample(_predictor, x).x, gpu.sample(_predictor, x).x)


@pytest.mark.parametrize("dev", DEVICES)
def test_picard_on_cuda_converges_to_the_serial_sample(dev):
    vp = VPSchedule.linear()
    grid = vp.timesteps(12, "trailing")
    x = NoiseSource(0).initial((4, 3), device=dev)
    ref = sample_serial(_predictor, x, DDIMSkip(vp), grid)
    out = PicardScheduler(DDIMSkip(vp), grid, width=4, tolerance=0.0).sample(_predictor, x, executor=BatchedExecutor())
    torch.testing.assert_close(out.x, ref.x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dev", DEVICES)
def test_inference_mode_on_cuda_refuses_in_place_writes_only(dev):
    """Under torch.inference_mode the version counters are gone: the values' fingerprint (on the device) shows
    a write into x, and gives no false alarm on a model that only reads (its sample is the one made outside
    inference mode)."""
    vp = VPSchedule.linear()
    grid = vp.timesteps(8)
    outside = DraftRefineScheduler(DDIMSkip(vp), grid, width=3).sample(
        _predictor, NoiseSource(0).initial((3, 2), device=dev), executor=BatchedExecutor()).x
    with torch.inference_mode():
        x = NoiseSource(0).initial((3, 2), device=dev)
        got = DraftRefineScheduler(DDIMSkip(vp), grid, width=3).sample(_predictor, x, executor=BatchedExecutor()).x
        assert torch.equal(got, outside)

        def halves(x, t):
            x.mul_(0.5)
            return 0.1 * x

        with pytest.raises(PredictorOutputError, match="in place"):
            DraftRefineScheduler(DDIMSkip(vp), grid, width=3).sample(halves, x)


@pytest.mark.parametrize("dev", DEVICES)
def test_autocast_around_the_sampler_keeps_the_drafts(dev):
    """A float32 model sampled inside torch.autocast (bfloat16): the library's own matmuls (the drafts' coupled
    noise) stay float32, so the sample equals the one outside."""
    vp = VPSchedule.linear()
    grid = vp.timesteps(12, "trailing")
    x = NoiseSource(0).initial((4, 3), device=dev)
    outside = DraftRefineScheduler(DDPMSkip(vp), grid, width=3).sample(_predictor, x, noise=NoiseSource(1)).x
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        inside = DraftRefineScheduler(DDPMSkip(vp), grid, width=3).sample(_predictor, x, noise=NoiseSource(1)).x
    assert torch.equal(inside, outside)

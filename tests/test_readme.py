"""The README's Python examples run as written, and print what their comments say.

Blocks that need objects the README does not build (a diffusers pipeline ``pipe``, a k-diffusion
``denoiser``, ``latents``) are left to tests/test_interop_diffusers.py and tests/test_kdiffusion.py,
which run the same calls on tiny models.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_OUTSIDE_OBJECTS = ("pipe", "denoiser", "latents", "k_diffusion")
CLAIM = r"^print\(.*\)\s+#\s*([\d .]+)$"
APPROX = r"^print\(.*\)\s+#\s*~([\d.]+)\b"  # `print(...)  # ~0.05 of ...`: within a factor 1.5 of it


def python_blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def runnable_blocks():
    return [b for b in python_blocks() if not any(re.search(rf"\b{n}\b", b) for n in NEEDS_OUTSIDE_OBJECTS)]


def test_the_readme_has_the_examples_it_promises():
    blocks = python_blocks()
    assert len(blocks) >= 5  # quick start, custom sampler, non-image model, pipeline, k-diffusion
    assert len(runnable_blocks()) >= 3
    # the round-count claims checked below exist (quick start and non-image model)
    assert sum(len(re.findall(CLAIM, b, flags=re.M)) for b in runnable_blocks()) >= 2
    assert sum(len(re.findall(APPROX, b, flags=re.M)) for b in runnable_blocks()) >= 1


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_example_runs_and_prints_what_it_says(index):
    block = runnable_blocks()[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    printed = out.getvalue().splitlines()
    # `print(...)   # 50 14 50`: an exact claim about the output (numbers only) must hold
    claims = [m.group(1).strip() for m in re.finditer(CLAIM, block, flags=re.M)]
    for claim in claims:
        assert claim in [p.strip() for p in printed], f"README block {index} claims {claim!r}, printed {printed}"
    approx = [float(m.group(1)) for m in re.finditer(APPROX, block, flags=re.M)]
    numbers = [float(p) for p in printed if re.fullmatch(r"\s*[-+\d.eE]+\s*", p)]
    for value in approx:
        assert any(value / 1.5 <= v <= value * 1.5 for v in numbers), f"README block {index}: ~{value}, printed {printed}"


def _fake_k_diffusion(rows_seen: list):
    """A stand-in for the parts of k-diffusion the README's block uses: get_sigmas_karras as k-diffusion
    writes it (ending in an appended 0) and a CompVisDenoiser-shaped wrapper around a model whose x0 is a
    pull toward its conditioning's mean (so the sample depends on c)."""
    import types

    import torch

    def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
        ramp = torch.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
        return torch.cat([sigmas, sigmas.new_zeros([1])]).to(device)

    class CompVisDenoiser:
        def __init__(self, model):
            self.model = model

        def __call__(self, x, sigma, cond):
            rows_seen.append(x.shape[0])
            s = sigma.reshape(-1, 1, 1, 1)
            return cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + (x - cond.mean()) / (1 + s**2)

    class LatentDiffusion:
        def get_learned_conditioning(self, prompts):
            return torch.full((len(prompts), 77, 8), 0.5)

    k = types.ModuleType("k_diffusion")
    k.sampling = types.SimpleNamespace(get_sigmas_karras=get_sigmas_karras)
    k.external = types.SimpleNamespace(CompVisDenoiser=CompVisDenoiser)
    return k, LatentDiffusion()


@pytest.mark.parametrize("readme", [README, README.parent / "solvers" / "interop" / "README.md"])
def test_the_k_diffusion_block_runs_and_batches_its_drafts(readme, monkeypatch):
    """The k-diffusion block, with stand-ins for k-diffusion and the LatentDiffusion model: it runs, ends with
    sample_euler's result to float rounding at width 1, and evaluates a round's drafts in one call (the
    sampler's default executor, BatchedExecutor; with one call per draft a copied snippet gains nothing)."""
    import sys

    import torch

    from solvers import sample_driffusion

    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S) if "sample_driffusion(" in b]
    assert len(blocks) == 1, blocks
    rows: list = []
    fake, model = _fake_k_diffusion(rows)
    monkeypatch.setitem(sys.modules, "k_diffusion", fake)
    torch.manual_seed(0)
    scope = {"__name__": "__readme__", "model": model}
    exec(compile(blocks[0], f"{readme.name} k-diffusion block", "exec"), scope)
    assert scope["x"].shape == (1, 4, 64, 64)
    # 50 steps at width 4, aggressive: 14 rounds, the first of one draft, then up to 4 drafts in one call
    assert len(rows) == 14 and max(rows) == 4 and sum(rows) == 50, rows
    torch.manual_seed(0)
    x = torch.randn(1, 4, 64, 64) * scope["sigmas"][0]
    sigmas, denoiser, c = scope["sigmas"], scope["denoiser"], scope["c"]
    euler = x.clone()
    for i in range(len(sigmas) - 1):  # k-diffusion's sample_euler (no churn)
        d = (euler - denoiser(euler, sigmas[i] * euler.new_ones(1), cond=c)) / sigmas[i]
        euler = euler + d * (sigmas[i + 1] - sigmas[i])
    width1 = sample_driffusion(denoiser, x, sigmas, extra_args={"cond": c}, width=1, disable=True)
    assert torch.allclose(width1, euler, atol=1e-5), (width1 - euler).abs().max()
    assert (scope["x"] - euler).abs().max() < 0.1 * euler.abs().max()


def test_typed_usage_tour_runs():
    """examples/typed_usage.py (the API tour `make typecheck` checks with mypy --strict) runs as written,
    and its invariants hold: width 1 and per_sample are the serial sampler exactly, and DRiffusion is
    closer to serial than step skipping at the same rounds."""
    import runpy

    tour = runpy.run_path(str(README.parent / "examples" / "typed_usage.py"))["tour"]
    errors = tour()
    assert errors["oracle"] == 0.0 and errors["per_sample"] == 0.0
    assert errors["ddim conservative"] < errors["step skipping"]
    assert all(e == e and e < 0.1 for k, e in errors.items() if k != "step skipping"), errors

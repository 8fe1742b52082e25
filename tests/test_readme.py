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

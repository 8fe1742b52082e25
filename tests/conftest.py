"""Shared pytest configuration (the markers are declared in pyproject.toml).

Hypothesis runs derandomized by default, so `make test` (and CI) is reproducible: the same examples
on every run. `HYPOTHESIS_PROFILE=explore make test` draws fresh examples each run, to hunt for
new counterexamples.
"""
import os

from hypothesis import settings

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_sessionstart(session):
    # Small tensors: one thread is faster and immune to a loaded machine (2 cores in CI).
    import torch

    torch.set_num_threads(1)

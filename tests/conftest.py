"""Shared pytest configuration (the markers are declared in pyproject.toml)."""


def pytest_sessionstart(session):
    # Small tensors: one thread is faster and immune to a loaded machine (2 cores in CI).
    import torch

    torch.set_num_threads(1)

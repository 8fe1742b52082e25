"""Shared pytest configuration."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")
    config.addinivalue_line("markers", "distributed: spawns torch.distributed (gloo) processes on this machine")


def pytest_sessionstart(session):
    # Small tensors: one thread is faster and immune to a loaded machine (2 cores in CI).
    import torch

    torch.set_num_threads(1)

"""Shared pytest configuration."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")
    config.addinivalue_line("markers", "distributed: spawns torch.distributed (gloo) processes on this machine")

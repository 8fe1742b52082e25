"""Helpers shared by the core test files: sample-distance metrics, float spacing and a one-thread fixture."""
from __future__ import annotations

from typing import Optional

import pytest
import torch

__all__ = ["one_torch_thread", "sliced_wasserstein", "rmse", "ulp"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a module's tests with one intra-op thread (restored afterwards).

    The tests use tiny tensors; on a loaded 2-core machine OpenMP's thread wake-up costs
    ~20 ms per op (a [3, 3] softmax), a thousand times the op itself.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at the float64 values ``ref`` (subnormal spacing near zero)."""
    info = torch.finfo(dtype)
    return info.eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=info.tiny))))


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square of a - b over all entries (float64)."""
    return float((a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt())


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, generator: Optional[torch.Generator] = None
) -> float:
    r"""Sliced 2-Wasserstein distance between two equally sized samples ``[N, D]``.

    .. math:: SW_2(a, b)^2 = \mathbb{E}_{\theta \sim U(S^{D-1})} W_2^2(\theta^\top a, \theta^\top b),

    with the expectation over ``num_projections`` random directions and each 1-D W_2 computed
    exactly from sorted projections. Pass the same ``generator`` seed to compare several
    samples on the same directions.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"need two [N, D] samples of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = (a.to(torch.float64) @ theta).sort(dim=0).values
    pb = (b.to(torch.float64) @ theta).sort(dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())

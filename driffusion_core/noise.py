"""Pre-drawn per-step noise, keyed by (seed, step index).

Operators never draw random numbers. A :class:`NoiseSource` gives the noise z_i of step i
deterministically, so the serial sampler, every executor, every width and every rank
see the same noise and their results can be compared exactly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["NoiseSource"]

_MIX = 0x9E3779B97F4A7C15


class NoiseSource:
    """Standard normal noise keyed by (seed, step index).

    Arguments:
        seed: any int.
        per_sample: if True, row b of step i is drawn from its own key (seed, i, b), so a
            sample's noise does not depend on how a batch is split (as EDM's
            ``StackedRandomGenerator``); slower for large batches.

    ``noise(i, shape, dtype, device)`` is z_i; ``noise.initial(shape, ...)`` the starting
    state x_T ~ N(0, I) (key -1).
    """

    def __init__(self, seed: int = 0, per_sample: bool = False):
        self.seed = int(seed)
        self.per_sample = bool(per_sample)

    def _key(self, step: int, row: int = -1) -> int:
        k = (self.seed * _MIX + (step + 2) * 1_000_003 + (row + 1) * 7919) % (2**63 - 1)
        return k

    def _draw(self, key: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(key)
        draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        return torch.randn(tuple(shape), generator=g, dtype=draw_dtype)

    def __call__(
        self,
        step: int,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        if self.per_sample:
            z = torch.stack([self._draw(self._key(step, b), shape[1:], dtype) for b in range(shape[0])])
        else:
            z = self._draw(self._key(step), shape, dtype)
        return z.to(device=device, dtype=dtype)

    def initial(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The starting noise x_T, keyed by step -1."""
        return self(-1, shape, dtype, device)

    def steps(self, start: int, stop: int, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        """z_start .. z_{stop-1} stacked: ``Tensor[stop - start, *shape]``."""
        return torch.stack([self(i, shape, dtype, device) for i in range(start, stop)])

    def __repr__(self) -> str:
        return f"NoiseSource(seed={self.seed}{', per_sample=True' if self.per_sample else ''})"

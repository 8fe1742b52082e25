"""Pre-drawn per-step noise, keyed by (seed, step index).

Operators never draw random numbers. A :class:`NoiseSource` gives the noise z_i of step i
deterministically, so the serial sampler, every executor, every width and every rank
see the same noise and their results can be compared exactly.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Union

import torch

from .errors import InvalidArgumentError, as_count, as_flag, is_bool

__all__ = ["NoiseSource"]

_MIX = 0x9E3779B97F4A7C15


#: added to "noise must be a NoiseSource" errors
NOISE_HINT = " (make one with driffusion_core.NoiseSource(seed); a torch.Generator or a bare seed is not one)"


class NoiseSource:
    """Standard normal noise keyed by (seed, step index).

    Arguments:
        seed: any int.
        per_sample: if True, row b of step i is drawn from its own key (seed, i, b): row b's noise
            depends on b, the seed and the step only, not on the batch size, so the leading rows of a
            batch keep their noise when the batch grows (``ns(i, (8, ...))[:5]`` is ``ns(i, (5, ...))``).
            It is keyed by row *position*: a slice that does not start at row 0 gets other noise than
            the same rows drawn as a batch of their own (``ns(i, (8, ...))[3:]`` is not
            ``ns(i, (5, ...))``); to split a batch, draw the whole batch and slice it. Slower for large
            batches.

    ``noise(i, shape, dtype, device)`` is z_i; ``noise.initial(shape, ...)`` the starting
    state at t_0 ~ N(0, I) (key -1; x_T in the DDPM papers' notation, x_0 in a trajectory).

    The noise is drawn in float32 and cast, so every floating dtype sees the same noise: a float64 run
    is the float32 run carried out in higher precision (torch draws float64 normals along another
    path, which would give unrelated noise), and float16 / bfloat16 are its rounding.
    """

    def __init__(self, seed: int = 0, per_sample: bool = False):
        if is_bool(seed):
            raise InvalidArgumentError(
                f"NoiseSource(seed) takes an int, got the bool {seed!r}; for per-sample noise write "
                f"NoiseSource(seed, per_sample=True)."
            )
        try:
            self.seed = operator.index(seed)
        except TypeError:
            raise InvalidArgumentError(
                f"NoiseSource(seed) takes an int (e.g. NoiseSource(0)), got {type(seed).__name__} {seed!r}."
            ) from None
        self.per_sample = as_flag(per_sample, "per_sample")

    def _key(self, step: int, row: int = -1) -> int:
        k = (self.seed * _MIX + (step + 2) * 1_000_003 + (row + 1) * 7919) % (2**63 - 1)
        return k

    def _draw(self, key: int, shape: Sequence[int]) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(key)
        return torch.randn(tuple(shape), generator=g, dtype=torch.float32)

    def __call__(
        self,
        step: int,
        shape: Union[int, Sequence[int]],
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        """z_step ~ N(0, I) of ``shape``: the same numbers for the same (seed, step, shape) on every device and
        dtype (drawn in float32 on the CPU, then cast and moved). ``step`` -1 is the initial noise x_T."""
        step = _step(step)
        shape = _shape(shape)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InvalidArgumentError(
                f"NoiseSource draws Gaussian noise, so dtype must be a floating dtype (torch.float32, float64, "
                f"float16, bfloat16), got {dtype!r}."
            )
        if self.per_sample:
            if not shape:
                raise InvalidArgumentError("NoiseSource(per_sample=True) needs a batch dimension: shape (B, ...).")
            rows = [self._draw(self._key(step, b), shape[1:]) for b in range(shape[0])]
            z = torch.stack(rows) if rows else torch.empty(shape)
        else:
            z = self._draw(self._key(step), shape)
        # to a CUDA GPU without a stream synchronisation (pageable memory is staged before the call returns)
        cuda = device is not None and torch.device(device).type == "cuda"
        return z.to(device=device, dtype=dtype, non_blocking=cuda)

    def initial(self, shape: Union[int, Sequence[int]], dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None) -> torch.Tensor:
        """The starting noise (the state at t_0, x_T in the DDPM papers' notation), keyed by step -1."""
        return self(-1, shape, dtype, device)

    def steps(self, start: int, stop: int, shape: Union[int, Sequence[int]], dtype: torch.dtype = torch.float32,
              device: Optional[torch.device] = None) -> torch.Tensor:
        """z_start .. z_{stop-1} stacked: ``Tensor[stop - start, *shape]`` (empty for stop == start)."""
        start = as_count(start, "NoiseSource.steps: start (the first step index)", 0)
        stop = as_count(stop, "NoiseSource.steps: stop (one past the last step index)", start)
        if stop == start:
            return torch.empty(0, *_shape(shape), dtype=dtype, device=device)
        return torch.stack([self(i, shape, dtype, device) for i in range(start, stop)])

    def __repr__(self) -> str:
        return f"NoiseSource(seed={self.seed}{', per_sample=True' if self.per_sample else ''})"


def _step(step) -> int:
    """``step`` as the int index of a step (-1: the initial noise x_T)."""
    try:
        return as_count(step, "step", -1)
    except InvalidArgumentError:
        raise InvalidArgumentError(
            f"NoiseSource: the step index must be an int >= 0 (the sampler's step i; -1 is the initial noise "
            f"x_T, see initial()), got {type(step).__name__} {step!r}."
        ) from None


def _shape(shape) -> tuple:
    """``shape`` as a tuple of non-negative ints (an int is a 1-D shape, as in torch.randn)."""
    if isinstance(shape, torch.Size):
        return tuple(shape)
    if is_bool(shape) or (isinstance(shape, (tuple, list)) and any(is_bool(d) for d in shape)):
        raise InvalidArgumentError(
            f"NoiseSource: shape must be a sequence of ints such as (batch, 3, 64, 64) or x.shape, got {shape!r} "
            f"(a bool is not a dimension)."
        )
    try:
        dims = (operator.index(shape),)
    except TypeError:
        try:
            dims = tuple(operator.index(d) for d in shape)
        except TypeError:
            raise InvalidArgumentError(
                f"NoiseSource: shape must be a sequence of ints such as (batch, 3, 64, 64) or x.shape, got {shape!r}."
            ) from None
    if any(d < 0 for d in dims):
        raise InvalidArgumentError(f"NoiseSource: shape {dims} has a negative dimension.")
    return dims

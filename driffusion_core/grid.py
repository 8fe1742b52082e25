"""Time grids: per step, the level a step starts from, the level it goes to, and the model time.

A sampler walks levels ``t_0 > t_1 > ... > t_T``; step ``i`` calls the model at
``t_from[i]`` (with the model time ``model_times[i]``) and moves the state to
``t_to[i]``. Usually ``t_to[i] == t_from[i + 1]`` (a *contiguous* grid), but
diffusers' DDIM steps to ``t - num_train_timesteps // N``, which is not always
the next listed timestep; the grid keeps both so that case is reproduced. A step
never lands below the level the next one starts from (``t_to[i] >= t_from[i + 1]``).
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import numpy as np
import torch

from driffusion_core.errors import InvalidTimestepsError, exception_text, is_bool

__all__ = ["TimeGrid"]


def first_step_below_next(t_from: torch.Tensor, t_to: torch.Tensor) -> Optional[int]:
    """The first step i whose ``t_to[i]`` lies below ``t_from[i + 1]`` (the state would have to get noisier
    before the next step), or None: consecutive steps must join or overlap."""
    if t_from.shape[0] < 2:  # one step (or none): nothing to join
        return None
    below = t_to[:-1] < t_from[1:]
    return int(torch.nonzero(below)[0]) if bool(below.any()) else None


@dataclass(frozen=True)
class TimeGrid:
    """The steps of a sampler.

    Attributes:
        t_from: ``Tensor[T]`` float64, the level each step starts from (strictly decreasing).
        t_to: ``Tensor[T]`` float64, the level each step goes to (``t_to[i] < t_from[i]``).
        model_times: ``Tensor[T]``, the time the predictor is called with at each step
            (int64 training timesteps for VP, float32 ``sigma * num_train_timesteps`` for flow).
        kind: what the levels mean, set by the schedule that made the grid (``Schedule.kind``:
            ``"vp/1000"``, ``"flow/1000"``, ``"ve"``); a transition refuses a grid of another kind.
            ``None`` (a grid built by hand) is not checked.
        model_times_from_schedule: True when ``model_times`` were not given (:meth:`from_levels` without
            them): they then hold the levels as placeholders, and a transition's ``make_grid`` (the
            schedule's ``grid``) replaces them with its schedule's model times, as for a plain list of levels.
    """

    t_from: torch.Tensor
    t_to: torch.Tensor
    model_times: torch.Tensor
    kind: Optional[str] = None
    model_times_from_schedule: bool = field(default=False, compare=False)

    def __post_init__(self):
        for name in ("t_from", "t_to", "model_times"):
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor) or v.dim() != 1:
                raise InvalidTimestepsError(f"TimeGrid.{name} must be a 1-D tensor, got {v!r}.")
            refuse_bool_or_complex(v, f"TimeGrid.{name}")
        for name in ("t_from", "t_to", "model_times"):  # a grid lives on the CPU (levels on a GPU come here)
            v = getattr(self, name)
            if v.device.type != "cpu" or v.requires_grad:
                object.__setattr__(self, name, v.detach().to("cpu"))
        for name in ("t_from", "t_to"):  # levels are float64 (integer tensors: no unsigned wrap-around below)
            v = getattr(self, name)
            if v.dtype != torch.float64:
                object.__setattr__(self, name, v.to(torch.float64))
        n = self.t_from.shape[0]
        if n == 0:
            raise InvalidTimestepsError("The time grid is empty: a sampler needs at least one step.")
        if self.t_to.shape[0] != n or self.model_times.shape[0] != n:
            raise InvalidTimestepsError(
                f"TimeGrid fields disagree in length: t_from {n}, t_to {self.t_to.shape[0]}, "
                f"model_times {self.model_times.shape[0]}."
            )
        if not (torch.isfinite(self.t_from).all() and torch.isfinite(self.t_to).all()):
            raise InvalidTimestepsError("The time grid holds NaN or inf levels.")
        if self.model_times.is_floating_point() and not bool(torch.isfinite(self.model_times).all()):
            i = int(torch.nonzero(~torch.isfinite(self.model_times))[0])
            raise InvalidTimestepsError(
                f"TimeGrid.model_times[{i}] is {self.model_times[i].item()}: the model would be called with a "
                f"NaN or inf time. Give finite model times (e.g. the grid a schedule's timesteps() makes)."
            )
        diffs = self.t_from[1:] - self.t_from[:-1]
        if (diffs >= 0).any():
            i = int(torch.nonzero(diffs >= 0)[0])
            raise InvalidTimestepsError(
                f"Timesteps must strictly decrease (noisy to clean), but step {i} is at level "
                f"{self.t_from[i].item():g} and step {i + 1} at {self.t_from[i + 1].item():g}. "
                f"Pass them in sampling order, noisiest first (e.g. [999, 979, ...] on a VP schedule's "
                f"timesteps, [1.0, 0.95, ...] on a flow schedule's sigmas)."
            )
        bad = self.t_to >= self.t_from
        if bad.any():
            i = int(torch.nonzero(bad)[0])
            raise InvalidTimestepsError(
                f"Step {i} goes from level {self.t_from[i].item():g} to {self.t_to[i].item():g}; "
                f"every step must go to a strictly cleaner (smaller) level."
            )
        i = first_step_below_next(self.t_from, self.t_to)
        if i is not None:
            raise InvalidTimestepsError(
                f"Step {i} goes to level {self.t_to[i].item():g}, below level {self.t_from[i + 1].item():g} where "
                f"step {i + 1} starts: the state would have to get noisier between the steps, which no step does. "
                f"Give each t_to[i] at or above t_from[i + 1] (usually equal to it; diffusers' DDIM stride lands at "
                f"or above the next timestep), e.g. TimeGrid.from_levels(levels, final)."
            )

    def __len__(self) -> int:
        return int(self.t_from.shape[0])

    @property
    def is_contiguous(self) -> bool:
        """True when each step ends where the next one starts."""
        return bool(torch.equal(self.t_to[:-1], self.t_from[1:]))

    @classmethod
    def from_levels(
        cls,
        levels: Union[Sequence[float], torch.Tensor],
        final: float,
        model_times: Union[Sequence[float], torch.Tensor, None] = None,
    ) -> "TimeGrid":
        """A contiguous grid: step i goes from ``levels[i]`` to ``levels[i+1]`` (the last to ``final``).

        ``final`` is where the last step lands: the clean end is ``schedule.terminal_level`` (VP: -1, the
        final alpha-bar; flow and VE: 0). On a VP schedule ``final=0`` stops at alpha-bar = alphas_cumprod[0],
        one training step short of clean (diffusers' DDIM with ``set_alpha_to_one=False``).

        ``model_times``: the time the model is called with at each step, passed through as given. Without
        them the grid is marked ``model_times_from_schedule``: the transition it is sampled with (its
        ``make_grid``) fills them from its schedule exactly as for a plain list of levels (VP: the int64
        training timesteps; flow: float32 ``sigma * num_train_timesteps``; VE: sigma). Until then
        ``model_times`` hold the levels as placeholders.
        """
        refuse_bool_or_complex(levels, "TimeGrid.from_levels: levels")
        try:
            t_from = torch.as_tensor(levels.detach() if isinstance(levels, torch.Tensor) else levels,
                                     dtype=torch.float64, device="cpu").flatten().clone()
            t_end = torch.tensor([float(final)], dtype=torch.float64)
        except Exception as e:  # strings, ragged lists, a final that is not a number ...
            raise InvalidTimestepsError(
                f"TimeGrid.from_levels takes a 1-D sequence of numbers (levels, noisiest first) and a number "
                f"(final, the clean end), got levels={reprlib.repr(levels)}, final={final!r} ({exception_text(e)})."
            ) from None
        if t_from.numel() == 0:
            raise InvalidTimestepsError("The time grid is empty: a sampler needs at least one step.")
        t_to = torch.cat([t_from[1:], t_end])
        if model_times is None:
            return cls(t_from, t_to, t_from.clone(), model_times_from_schedule=True)
        refuse_bool_or_complex(model_times, "TimeGrid.from_levels: model_times")
        try:
            mt = torch.as_tensor(model_times.detach() if isinstance(model_times, torch.Tensor) else model_times,
                                 device="cpu").flatten().clone()
        except Exception as e:
            raise InvalidTimestepsError(
                f"TimeGrid.from_levels: model_times must be a 1-D sequence of numbers (one model time per level), "
                f"got {reprlib.repr(model_times)} ({exception_text(e)})."
            ) from None
        return cls(t_from, t_to, mt)

    def sub(self, start: int, stop: int) -> "TimeGrid":
        """Steps ``start .. stop - 1`` as a grid of their own."""
        return TimeGrid(self.t_from[start:stop], self.t_to[start:stop], self.model_times[start:stop], self.kind,
                        self.model_times_from_schedule)

    def with_kind(self, kind: Optional[str]) -> "TimeGrid":
        """This grid, marked as made of ``kind`` levels."""
        return self if kind == self.kind else replace(self, kind=kind)

    def __repr__(self) -> str:
        head = ", ".join(f"{v:g}" for v in self.t_from[:4].tolist())
        return f"TimeGrid(T={len(self)}, t_from=[{head}{', ...' if len(self) > 4 else ''}], final={self.t_to[-1].item():g})"


def refuse_bool_or_complex(values, what: str, meaning: str = "floats or ints",
                           instead: str = " Pass e.g. schedule.timesteps(num_steps).t_from.") -> None:
    """Refuse levels or model times given as booleans or complex numbers (a Python / numpy scalar, a tensor,
    numpy array or list of them): torch would take a bool as 0 / 1 and drop a complex number's imaginary part
    (or fail comparing complex levels). Anything else is left to the caller's own conversion. ``what`` names
    the argument, ``meaning`` what its numbers are, ``instead`` what to pass."""
    if isinstance(values, torch.Tensor):
        odd = str(values.dtype) if values.dtype == torch.bool or values.is_complex() else None
    else:
        items = list(values) if isinstance(values, (list, tuple)) else []
        odd = next((type(v).__name__ for v in items if is_bool(v) or isinstance(v, (complex, np.complexfloating))
                    or (isinstance(v, torch.Tensor) and v.is_complex())), None)
        if odd is None:
            try:
                dtype = np.asarray(values).dtype
            except Exception:  # ragged, or not numbers: the caller's conversion says so
                dtype = None
            odd = str(dtype) if dtype is not None and dtype.kind in ("b", "c") else None
    if odd is not None:
        shown = repr(values) if isinstance(values, torch.Tensor) else reprlib.repr(values)
        raise InvalidTimestepsError(
            f"{what} must be real numbers ({meaning}), got {odd} values {shown}: a bool would be taken as 0 / 1 "
            f"and a complex number would lose its imaginary part.{instead}"
        )

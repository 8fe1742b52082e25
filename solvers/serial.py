"""The reference serial sampler and the step-skipping baseline.

``sample_serial`` walks the grid one model call at a time:
``p_i = f(x_i, t_i); x_{i+1} = S(x_i, p_i, t_from[i] -> t_to[i], z_i)``. Every parallel sampler
is measured against it, from the same starting state and the same per-step noise.

``sample_step_skipping`` is the naive way to spend fewer sequential rounds: serial sampling on a
coarser grid (R of the T levels, evenly spaced), each coarse step a skip transition whose noise is
coupled to the fine grid's per-step noise, so it is compared from the same noise.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from driffusion_core.errors import InvalidArgumentError, as_count, as_flag, check_predictor
from driffusion_core.executor import Predictor
from driffusion_core.grid import TimeGrid
from driffusion_core.modules import warn_random_layers
from driffusion_core.noise import NoiseSource
from driffusion_core.scheduler import (
    SampleOutput,
    check_finite_sample,
    check_input_untouched,
    input_version,
    check_inputs,
    check_predictions,
    default_noise,
    note_where,
    progress_bar,
)
from driffusion_core.transition import SkipTransition, check_transition

__all__ = ["sample_serial", "sample_step_skipping", "coarse_indices"]


class _Track:
    """A serial loop's trajectory (when kept) and progress bar: ``step(x)`` after each step, ``close()`` at the end."""

    def __init__(self, x: torch.Tensor, return_trajectory: Any, progress: Any, total: int, desc: str):
        self.trajectory = [x] if as_flag(return_trajectory, "return_trajectory") else None
        self.bar = progress_bar(progress, total, desc)

    def step(self, x: torch.Tensor) -> None:
        if self.trajectory is not None:
            self.trajectory.append(x)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _call(predictor, x, grid: TimeGrid, i: int, cond: dict) -> torch.Tensor:
    t = grid.model_times[i : i + 1].to(x.device).repeat(x.shape[0])  # its own memory: the model may write into t
    version = input_version(x, cond)
    try:
        pred = predictor(x, t, **cond)
    except Exception as e:
        note_where(e, grid, [i], x, cond)
        raise
    check_input_untouched(x, version, grid, [i])
    return check_predictions([pred], x.unsqueeze(0), [i], grid)[0]


def sample_serial(
    predictor: Predictor,
    x: torch.Tensor,
    transition: SkipTransition,
    timesteps: Union[TimeGrid, torch.Tensor, list, tuple],
    noise: Optional[NoiseSource] = None,
    cond: Optional[Mapping[str, Any]] = None,
    progress: bool = False,
    return_trajectory: bool = False,
) -> SampleOutput:
    """The serial sampler: T sequential model calls on the grid.

    Arguments:
        predictor: ``f(x, t, **cond) -> Tensor`` shaped like x.
        x: the starting state at ``t_0``.
        transition: the step (a SkipTransition; its one-level skip is the step).
        timesteps: a TimeGrid or decreasing levels.
        noise: per-step noise for stochastic transitions (default: a random seed).
        cond: keyword arguments for the predictor.

    Returns:
        :class:`~driffusion_core.SampleOutput` with ``rounds == evals == T``.
    """
    check_transition(transition, "sample_serial(predictor, x, transition, timesteps)")
    check_predictor(predictor)
    cond = check_inputs(x, cond)
    grid = transition.make_grid(timesteps)
    noise = default_noise(transition, noise)
    x = x.clone()  # the caller's x stays intact even if the model writes into its input (refused after the call)
    track = _Track(x, return_trajectory, progress, len(grid), "serial")
    history: list = []  # (x_i, p_i, t_i) of the last steps, for a multistep transition
    with warn_random_layers(predictor, "sample_serial"):
        for i in range(len(grid)):
            pred = _call(predictor, x, grid, i, cond)
            if transition.history:  # kept past the next call: not the model's buffer, which that call may overwrite
                pred = pred.clone()
            z = noise(i, x.shape, x.dtype, x.device) if (transition.stochastic and noise is not None) else None
            x_next = transition.grid_step(x, pred, grid, i, history, z)
            history = transition.remember(history, x, pred, grid.t_from[i])
            x = x_next
            track.step(x)
    track.close()
    return SampleOutput(check_finite_sample(x, "sample_serial"), len(grid), len(grid), track.trajectory)


def coarse_indices(num_steps: int, rounds: int) -> list:
    """R + 1 evenly spread fine-grid indices 0 = i_0 < ... < i_R = T (a coarse grid of R steps)."""
    rounds = as_count(rounds, "rounds", 1, num_steps)
    idx = np.round(np.linspace(0, num_steps, rounds + 1)).astype(int).tolist()
    return idx


def sample_step_skipping(
    predictor: Predictor,
    x: torch.Tensor,
    transition: SkipTransition,
    timesteps: Union[TimeGrid, torch.Tensor, list, tuple],
    rounds: int,
    noise: Optional[NoiseSource] = None,
    cond: Optional[Mapping[str, Any]] = None,
    progress: bool = False,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Serial sampling on R of the T levels: the baseline at equal sequential rounds.

    Coarse step k jumps from fine level i_k to i_{k+1} with one model call, as the skip
    transition (its noise coupled to z_{i_k} .. z_{i_{k+1}-1}, the fine grid's noise). A multistep
    transition (DPM-Solver++ 2M) is :func:`sample_serial` on that coarse grid, its own update combining
    the coarse steps. With ``rounds == T`` it is :func:`sample_serial`.

    With ``return_trajectory``, ``trajectory`` holds the R + 1 states at the coarse levels
    ``i_0 = 0 < i_1 < ... < i_R = T`` of :func:`coarse_indices` (the start state first), not the
    T + 1 states of the fine grid. ``progress`` shows a bar of R steps.
    """
    check_transition(transition, "sample_step_skipping(predictor, x, transition, timesteps, rounds)")
    check_predictor(predictor)
    cond = check_inputs(x, cond)
    grid = transition.make_grid(timesteps)
    noise = default_noise(transition, noise)
    idx = coarse_indices(len(grid), rounds)
    if transition.history:  # a multistep solver runs its own update on the coarse grid
        if transition.stochastic:
            raise InvalidArgumentError(
                f"sample_step_skipping: {type(transition).__name__} is stochastic and multistep; the coarse grid "
                f"cannot couple its noise to the fine grid's."
            )
        starts, ends = torch.tensor(idx[:-1]), torch.tensor(idx[1:]) - 1
        coarse = TimeGrid(grid.t_from[starts], grid.t_to[ends], grid.model_times[starts], grid.kind)
        return sample_serial(
            predictor, x, transition, coarse, cond=cond, progress=progress, return_trajectory=return_trajectory
        )
    x = x.clone()  # as in sample_serial: the caller's x stays intact whatever the model does
    track = _Track(x, return_trajectory, progress, len(idx) - 1, f"step skipping R={len(idx) - 1}")
    with warn_random_layers(predictor, "sample_step_skipping"):
        for a, b in zip(idx[:-1], idx[1:]):
            pred = _call(predictor, x, grid, a, cond)
            noises = None
            if transition.stochastic and noise is not None:
                noises = noise.steps(a, b, x.shape, x.dtype, x.device)
            x = transition.skip(x, pred, grid.t_from[a:b], grid.t_to[a:b], noises)
            track.step(x)
    track.close()
    return SampleOutput(check_finite_sample(x, "sample_step_skipping"), len(idx) - 1, len(idx) - 1, track.trajectory)

r"""Sliding-window Picard iteration (ParaDiGMS, Shih et al. 2023), seeded with skip drafts.

Key: levels t_0 > ... > t_T; x_k the state at level k (x_0 at ``t_from[0]``, x_{k+1} at
``t_to[k]``); f the predictor; S the skip transition; z_k the pre-drawn noise of step k;
n the width; a the window start (x_0 .. x_a are final); tau the tolerance.

**One round** (ParaDiGMS, Algorithm 1). The window holds the levels a .. a+m-1, m = min(n, T-a).
Evaluate p_k = f(x_k, t_k) for all of them in *one* parallel round, then recompute the window
with the serial update, starting from the final x_a (the Picard iterate)::

    y_a = x_a,   y_{k+1} = S(y_k, p_k, t_from[k] -> t_to[k], z_k),   k = a .. a+m-1.

A fixed point of this map is the serial chain, so with the same z_k it converges to
``sample_serial``'s output for that noise; y_{a+1} is exact after the round.

**Tolerance (the norm).** The change of level k in a round is measured per sample row b and
normalised by the noise variance of the interpolant x = alpha x0 + sigma eps at that level,
sigma_k = ``schedule.alpha_sigma(level_k)[1]``, and the worst row counts (the batch moves in lock-step)::

    err_k = max_b  ||y_k^(b) - x_k^(b)||^2 / (D sigma_k^2)        (D = numel of one sample)

Level k counts as converged when err_k <= tau^2. At the clean end sigma = 0, and any change counts
as not converged. That is the default, ``norm="sigma"``: one definition for every family,
deterministic or not.

``norm="posterior"`` is ParaDiGMS' own rule: it divides by the variance of the noise a stochastic
(DDPM) step from level k adds, the posterior variance of q(x_{k+1} | x_k, x0),

    v_k = sigma_{k+1}^2 (1 - SNR_k / SNR_{k+1}),   SNR = alpha^2 / sigma^2,

which for VP is diffusers' ``DDPMScheduler._get_variance`` (the fixed_small beta-tilde of the step;
ParaDiGMS uses it for its DDIM too) and extends to flow and VE; v_T = 0 (the sample itself), and
v_{T-1} = 0 when the grid ends at sigma = 0. As v_k <= sigma_{k+1}^2 < sigma_k^2 it is the stricter
test: the same tau means fewer converged levels per round.

**Slide.** Let j be the number of leading levels a+1, a+2, ... that converged in this round's
sweep. The window moves to a' = a + min(1 + j, m): levels a+1 .. a+j, and also the first level
that did *not* converge, a+1+j (when j < m), are final. That level is final because it is the
serial update of the converged x_{a+j} with a prediction taken within tolerance of it. At least
one level advances per round, so tau = 0 finishes in at most T rounds with the serial result.

**What tau guarantees** (without a budget fallback). Every final x_{k+1} is the serial update
of the final x_k with p_k taken at a state x'_k within tau sigma_k of x_k, in the norm above
(x'_k = x_k exactly when k was the window start). A multistep update's history, the final
x_{k-1} and p_{k-1}, meets the same bound. A final level's own last change need *not* be below
tau sigma: each round also finalises its first level that did not converge. So tau is a
convergence tolerance, a stopping test on each round's changes. It bounds these local
mismatches, not the distance to the serial result, which they can compound along the chain.
The one exact statement is tau = 0: every mismatch is zero, and the result is the serial sample.

**Initial guesses.** Before the first model call nothing is known: the first window holds
copies of x_0 for both inits. Levels that enter the window later get

* ``init="frozen"`` (ParaDiGMS' usual init): copies of the window's last state;
* ``init="skip"`` (DRiffusion's drafts): ``S.drafts(x_c, p_c, t_c -> ...)`` from the latest
  final level c that has a prediction (c = a' when a' was in the window, else a'-1), with the
  same per-step noise coupled as the serial chain would use it: the serial chain with the
  prediction frozen, a far better guess than a frozen state. When x_c moved by more than one
  noise std in the latest sweep (a loose tolerance, or c the first level that did not converge),
  p_c was taken at a state far from x_c and would mean a wrong x0_hat there (the error amplified
  by sigma_c / alpha_c); the draft then freezes the x0_hat p_c meant at the state it was taken at.

**Multistep transitions** (DPM-Solver++ 2M, UniPC): step k of the sweep also combines the steps
before it of the same iterate (2M: k-1; UniPC: k-2 and k-1; for k = a, the final levels and their
predictions), drafts from c take the multistep step with the levels before c as history, and the
budget's draft-and-refine finish starts with that history.

**Budget.** ``max_rounds`` bounds the rounds. Before each Picard round the scheduler checks
that, even if this round finalised one level only, draft-and-refine (aggressive, same width)
could still finish within the budget; when it could not, it stops iterating and finishes with
:class:`~driffusion_core.DraftRefineState` from the anchor (x_{a-1}, p_{a-1}): the last final level
whose prediction was taken at its final state (to tolerance; exactly when a-1 was the window
start). Its first refine step recomputes x_a with p_{a-1}, so levels 0 .. a are those the run without a
budget makes, with one exception: when x_{a-1} moved by more than one noise std in its last sweep
(possible only with a tolerance above 1), p_{a-1} is re-frozen first, as for drafts (the x0_hat it
meant, at x_{a-1}), and x_a changes with it; on DDPM at tolerance 3 keeping x_a instead left the final
sample about 12 times further from the serial one. The call therefore always
ends within ``max_rounds``; the smallest budget accepted is DRiffusion's own round count
1 + ceil((T-1)/n).

Counts are honest: ``rounds`` are parallel rounds of model calls for the whole batch, ``evals``
every model call made, including the repeated ones (``info["calls_beyond_T"] = evals - T``).

When to use which (measured on the exact 2-D ring oracle by ``benchmarks/picard_study.py``;
``solvers/PICARD.md`` has the figures, and this docstring repeats none of them):

* **DRiffusion** (:class:`~driffusion_core.DraftRefineScheduler`) gives the fewest rounds at fixed
  compute: exactly T model calls in 1 + ceil((T-1)/n) rounds, no tuning. It gives no control of
  the distance to the serial result. (Picard at tau = inf also makes T calls, in ceil(T/n) rounds,
  its first round evaluating the first window's copies of x_0; ``solvers/PICARD.md`` compares.)
* **The tolerance dial** (``PicardScheduler(init="skip")``) trades model calls (up to n per round)
  for closeness to the serial result. tau = 0 *is* the serial sampler (at most T rounds); a
  smaller tau generally ends closer to serial, in more rounds. tau > 0 is a convergence
  tolerance, not a bound on the distance to serial.
* **A latency budget** (``max_rounds``): Picard where the budget allows, then draft-and-refine.
  Use a loose tolerance (0.1 to 1) with a budget. At DRiffusion's own round count, with the
  tolerance picked against the serial output, it ended closer to serial than DRiffusion on DDIM,
  flow and DPM-Solver++ 2M for a few extra model calls. There was little gain on DDPM, whose chain
  is chaotic on this oracle. At a fixed, untuned tolerance it can lose to DRiffusion.
* ``init="frozen"`` is the ParaDiGMS baseline. Equal tolerance is not equal error: compare rounds
  to reach a given error against serial. By that measure ``"skip"`` needed fewer rounds and fewer
  model calls in every family and width of the study.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from driffusion_core.errors import InvalidArgumentError, as_count, as_flag, is_real
from driffusion_core.executor import Executor, Predictor, float64_values
from driffusion_core.grid import TimeGrid
from driffusion_core.noise import NoiseSource
from driffusion_core.scheduler import (
    DraftRefineState,
    Round,
    SampleOutput,
    _check_width,
    check_finite_sample,
    check_planned,
    check_predictions,
    default_noise,
    run_rounds,
)
from driffusion_core.coefficients import posterior_variance, prediction_coefficients
from driffusion_core.parameterization import broadcast_coef, lincomb, upcast
from driffusion_core.transition import SkipTransition, as_levels, check_transition

__all__ = ["PicardScheduler", "PicardState", "INITS", "NORMS", "fewest_rounds"]

INITS = ("skip", "frozen")
NORMS = ("sigma", "posterior")


def _refine_rounds(num_steps: int, anchor: int, width: int) -> int:
    """Rounds draft-and-refine (aggressive) needs from level ``anchor`` when its prediction is known."""
    if anchor >= num_steps - 1:
        return 0  # the last step needs no model call
    return math.ceil((num_steps - 1 - anchor) / width)


#: what Picard's width means, for the width check it shares with DraftRefineScheduler
_WIDTH_MEANING = "the levels in the window, i.e. model calls per round"


def fewest_rounds(num_steps: int, width: int) -> int:
    """The smallest ``max_rounds`` that always finishes: DRiffusion's aggressive round count.

    The first Picard round evaluates x_0 exactly (and finalises x_1); in the worst case every
    later level is left to draft-and-refine from level 0 with that prediction:
    1 + ceil((T-1)/n) rounds.

    Raises :class:`~driffusion_core.InvalidWidthError` unless ``width`` is an int >= 1 and
    :class:`~driffusion_core.InvalidArgumentError` unless ``num_steps`` is an int >= 1 (numpy and
    0-d tensor integers are accepted, bools are not), as ``expected_rounds`` does.
    """
    n = _check_width(width, _WIDTH_MEANING)
    T = as_count(num_steps, "num_steps", 1)
    return 1 + _refine_rounds(T, 0, n)


class PicardState:
    """The sliding-window Picard state machine: ``plan()`` a round, ``absorb()`` its predictions.

    Holds the iterates x_0 .. x_T (``None`` where not needed any more), the latest prediction of
    every level evaluated so far, the window start a, and once the budget forced it the
    draft-and-refine state that finishes the run.
    """

    def __init__(
        self,
        transition: SkipTransition,
        grid: TimeGrid,
        width: int,
        tolerance: float,
        max_rounds: Optional[int],
        init: str,
        x: torch.Tensor,
        noise: Optional[NoiseSource],
        keep_trajectory: bool = False,
        norm: str = "sigma",
    ):
        self.transition, self.grid, self.width = transition, grid, width
        self.norm = _check_norm(norm)
        keep_trajectory = as_flag(keep_trajectory, "return_trajectory / keep_trajectory")
        self.tolerance, self.max_rounds, self.init = tolerance, max_rounds, init
        self.noise = noise
        self.keep_trajectory = keep_trajectory
        self.T = len(grid)
        self.a = 0
        self.rounds = 0
        self.evals = 0
        self.picard_rounds = 0
        self.advances: List[int] = []
        self.fallback: Optional[DraftRefineState] = None
        self.fallback_from: Optional[int] = None
        self._inner: Optional[Round] = None  # the fallback's own round, while one is planned
        self._planned: Optional[Round] = None  # the round plan() returned and absorb() has not taken yet
        self.xs: List[Optional[torch.Tensor]] = [None] * (self.T + 1)
        self.preds: List[Optional[torch.Tensor]] = [None] * self.T
        self.at: List[Optional[torch.Tensor]] = [None] * self.T  # the state each prediction was taken at
        self.moved: Dict[int, float] = {}  # level -> its normalised change in the latest sweep
        self.xs[0] = x = x.clone()  # the trajectory keeps its own copy of the start, as sample_serial
        for k in range(1, min(width, self.T) + 1):
            self.xs[k] = x  # nothing is known before the first call: copies of x_0
        levels = torch.cat([grid.t_from[:1], grid.t_to])
        self.sigma2 = transition.schedule.alpha_sigma(levels)[1].to(torch.float64) ** 2  # [T + 1]
        # what a level's change is measured against: sigma_k^2, or the posterior variance of step k (ParaDiGMS)
        self.norm_var = self.sigma2 if self.norm == "sigma" else posterior_variances(transition.schedule, grid)

    # ----------------------------------------------------------------- helpers
    @property
    def done(self) -> bool:
        return self.a >= self.T

    @property
    def x(self) -> Optional[torch.Tensor]:
        """The final sample once done."""
        return self.xs[self.T]

    def _z(self, i: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        if self.noise is None or not self.transition.stochastic:
            return None
        return self.noise(i, like.shape, like.dtype, like.device)

    def step(self, x: torch.Tensor, pred: torch.Tensor, i: int, history=()) -> torch.Tensor:
        """The serial update x_{i+1} = S(x_i, p_i, t_from[i] -> t_to[i], z_i) (a multistep transition
        also combines ``history``, the earlier steps of the same iterate)."""
        return self.transition.grid_step(x, pred, self.grid, i, history, self._z(i, x))

    def _history(self, k: int) -> list:
        """What step k of a multistep transition combines: ``[(x_j, p_j, t_from[j])]`` for the
        ``history_at(grid, k)`` steps j before k, oldest first (2M: k-1; UniPC: k-2 and k-1; or nothing)."""
        h = self.transition.history_at(self.grid, k) if self.transition.history else 0
        return [(self.xs[j], self.preds[j], self.grid.t_from[j]) for j in range(k - h, k)]

    def _anchor(self) -> int:
        """The latest final level with a prediction: a if a was evaluated, else a - 1 (or a = 0, none)."""
        a = self.a
        return a if (a == 0 or self.preds[a] is not None) else a - 1

    def _picard_fits(self) -> bool:
        """Whether one more Picard round still leaves draft-and-refine enough rounds (worst case)."""
        if self.max_rounds is None:
            return True
        a = self.a
        if a + 1 >= self.T:
            return self.rounds + 1 <= self.max_rounds
        # worst case: the round finalises level a+1 only; draft-and-refine then starts from level a
        return self.rounds + 1 + _refine_rounds(self.T, a, self.width) <= self.max_rounds

    # ----------------------------------------------------------------- budget fallback
    def _start_fallback(self) -> None:
        c = max(self.a - 1, 0)  # its prediction was taken at its final state (to tolerance)
        self.fallback_from = c
        x_c, p_c = self.xs[c], self.preds[c]
        if self.moved.get(c, 0.0) > 1.0 and self.at[c] is not None:  # as in _seed: keep the x0_hat p_c meant
            p_c = _refreeze(self.transition, x_c, self.at[c], p_c, self.grid.t_from[c])
        st = DraftRefineState(
            self.transition, self.grid, self.width, "aggressive", x_c, self.noise, self.keep_trajectory,
            start=c, history=self._history(c),
        )
        st.pred = p_c
        self.fallback = st

    def _finish_fallback(self) -> None:
        st, c = self.fallback, self.fallback_from
        if st.trajectory is not None:
            for j, xj in enumerate(st.trajectory):
                self.xs[c + j] = xj
        self.xs[self.T] = st.x
        self.a = self.T

    # ----------------------------------------------------------------- the state machine
    def plan(self) -> Optional[Round]:
        """The next round (``steps`` are global step indices), or None when sampling is done."""
        if self.done:
            return None
        if self.fallback is None and not self._picard_fits():
            self._start_fallback()
        if self.fallback is not None:
            inner = self.fallback.plan()
            if inner is None:  # pragma: no cover - the fallback starts at a-1 <= T-2, and absorb finishes it
                self._finish_fallback()
                return None
            self._inner = self._planned = inner
            return inner
        a, m = self.a, min(self.width, self.T - self.a)
        steps = list(range(a, a + m))
        self._planned = Round(steps, torch.stack([self.xs[k] for k in steps]), anchor_call=False)
        return self._planned

    def absorb(self, rnd: Round, preds: torch.Tensor) -> None:
        """Take the predictions of the round the last :meth:`plan` returned: one Picard sweep, the slide,
        new guesses."""
        check_planned(self, rnd)
        self._planned = None
        preds = check_predictions(preds, rnd.xs, rnd.steps, self.grid)
        if self.fallback is not None:
            st = self.fallback
            r0, e0 = st.rounds, st.evals
            st.absorb(self._inner, preds)
            self.rounds += st.rounds - r0
            self.evals += st.evals - e0
            if st.done:
                self._finish_fallback()
            return
        self.rounds += 1
        self.picard_rounds += 1
        self.evals += len(rnd.steps)
        a, hi = self.a, rnd.steps[-1] + 1
        for k, p, xk in zip(rnd.steps, preds, rnd.xs):
            self.preds[k] = p
            self.at[k] = xk
        # the Picard sweep from the final x_a, and each level's normalised change
        y, changes = self.xs[a], []
        hist = self._history(a)
        for k in range(a, hi):
            y_next = self.step(y, self.preds[k], k, hist)
            hist = self.transition.remember(hist, y, self.preds[k], self.grid.t_from[k])  # of the same iterate
            y = y_next
            old = self.xs[k + 1]
            d = float64_values(y - old).reshape(y.shape[0], -1)
            changes.append(d.pow(2).mean(dim=1).max())
            self.xs[k + 1] = y
        change = torch.stack(changes).cpu()

        def over(var: torch.Tensor) -> torch.Tensor:
            return torch.where(var > 0, change / var.clamp(min=1e-300), torch.where(change > 0, math.inf, 0.0))

        moved = over(self.sigma2[a + 1 : hi + 1])  # in noise stds, for the re-freeze of _seed
        ratio = moved if self.norm == "sigma" else over(self.norm_var[a + 1 : hi + 1])
        ok = (ratio <= self.tolerance * self.tolerance).tolist()  # a float product overflows to inf, ** raises
        self.moved = {a + 1 + j: float(r) for j, r in enumerate(moved.tolist())}
        lead = next((j for j, good in enumerate(ok) if not good), len(ok))
        new_a = a + min(1 + lead, hi - a)
        self.advances.append(new_a - a)
        self.a = new_a
        if new_a >= self.T:
            return
        self._seed(hi)
        self._forget()

    def _seed(self, hi: int) -> None:
        """Initial guesses for the levels hi+1 .. top that enter the window."""
        top = min(self.a + self.width, self.T)
        if top <= hi:
            return
        if self.init == "frozen":
            for k in range(hi + 1, top + 1):
                self.xs[k] = self.xs[hi]
            return
        c, g = self._anchor(), self.grid
        x_c, p_c = self.xs[c], self.preds[c]
        if self.moved.get(c, 0.0) > 1.0 and self.at[c] is not None:
            # x_c moved by more than one noise std since p_c was taken at at[c]: p_c would mean
            # a far-off x0_hat at x_c (amplified by sigma_c / alpha_c), so keep the x0_hat it meant
            p_c = _refreeze(self.transition, x_c, self.at[c], p_c, g.t_from[c])
        noises = None
        if self.transition.stochastic and self.noise is not None:
            noises = torch.stack([self._z(i, x_c) for i in range(c, top)])
        hist = self._history(c)
        extra = {"history": hist} if hist else {}
        drafts = self.transition.drafts(x_c, p_c, g.t_from[c:top], g.t_to[c:top], noises, **extra)
        for k in range(hi + 1, top + 1):
            self.xs[k] = drafts[k - c - 1]

    def _forget(self) -> None:
        """Drop states and predictions no longer needed (levels before a - 1), unless keeping the trajectory."""
        if self.keep_trajectory:
            return
        keep = 1 + self.transition.history  # a multistep anchor a-1 needs the levels before it too
        for k in range(max(0, self.a - keep)):
            self.xs[k] = None
            self.preds[k] = None
            self.at[k] = None

    @property
    def trajectory(self) -> Optional[List[torch.Tensor]]:
        """The final states x_0 .. x_T when the state keeps them (``keep_trajectory``), else None, as
        :class:`~driffusion_core.scheduler.DraftRefineState`'s."""
        return list(self.xs) if self.keep_trajectory else None


def _refreeze(transition: SkipTransition, y: torch.Tensor, x_eval: torch.Tensor, pred: torch.Tensor, level) -> torch.Tensor:
    r"""The model output that means, at state y, the x0_hat that ``pred`` meant at ``x_eval`` (same level).

    With :math:`\hat x_0` from (x_eval, pred) and :math:`\epsilon' = (y - \alpha\hat x_0)/\sigma`, returns
    :math:`c_{x_0}\hat x_0 + c_\epsilon\epsilon'` (``prediction_coefficients``), so a draft from y
    freezes that x0_hat. (The x0 transforms are idempotent, so converting again changes nothing.)
    """
    alpha, sigma = transition.schedule.alpha_sigma(as_levels(level, y.shape[0]))
    dtype, (y, x_eval, pred) = pred.dtype, upcast(y, x_eval, pred)  # float16 / bfloat16: in float32, cast once
    x0, _ = transition.to_x0_eps(x_eval, pred, level)
    eps = (y - broadcast_coef(alpha, y) * x0) / broadcast_coef(sigma, y)
    c_x0, c_eps = prediction_coefficients(transition.prediction.value, alpha, sigma)
    return lincomb(x0, c_x0, eps, c_eps).to(dtype)


def _check_norm(norm: Any) -> str:
    if not isinstance(norm, str) or norm not in NORMS:
        raise InvalidArgumentError(
            f"norm must be 'sigma' (a level's change over its sigma^2) or 'posterior' (over the posterior variance "
            f"of its step, ParaDiGMS' rule), got {norm!r}."
        )
    return norm


def posterior_variances(schedule: Any, grid: TimeGrid) -> torch.Tensor:
    r"""``[T + 1]`` float64: for the state at level k < T, the variance of the noise a stochastic step from it adds,
    :math:`v_k = \sigma_{k+1}^2 (1 - \mathrm{SNR}_k / \mathrm{SNR}_{k+1})` (the posterior q(x_{k+1} | x_k, x0);
    VP: diffusers' ``DDPMScheduler._get_variance``); :math:`v_T = 0`."""
    a_t, s_t = (v.to(torch.float64) for v in schedule.alpha_sigma(grid.t_from))
    a_s, s_s = (v.to(torch.float64) for v in schedule.alpha_sigma(grid.t_to))
    # sigma_s = 0 (a step to the clean end): v = 0
    v = torch.where(s_s > 0, posterior_variance(a_t, s_t, a_s, s_s), torch.zeros_like(s_s))
    return torch.cat([v.clamp(min=0), v.new_zeros(1)])


def _check_tolerance(tolerance: Any) -> float:
    """``tolerance`` as a float >= 0 (inf allowed): a Python, numpy or 0-d tensor real number."""
    if not is_real(tolerance) or math.isnan(float(tolerance)) or float(tolerance) < 0:
        raise InvalidArgumentError(
            f"tolerance must be a number >= 0 (the largest accepted change of a level, in units of that "
            f"level's noise std sigma_t), got {tolerance!r}. Use 0 for the exact serial result, "
            f"float('inf') to slide the full window every round."
        )
    return float(tolerance)


class PicardScheduler:
    """ParaDiGMS-style sliding-window Picard iteration, optionally seeded with skip drafts.

    Arguments:
        transition: the skip transition (``DDIMSkip``, ``DDPMSkip``, ``FlowEulerSkip``...).
        timesteps: a :class:`~driffusion_core.TimeGrid` or decreasing levels.
        width: window size n >= 1: model calls per round (n devices, or one batched call of n).
            Width 1 is the serial sampler.
        tolerance: tau >= 0, a convergence tolerance. A level has converged when its change in
            a round is at most tau * sigma_t (root mean square over the sample, worst row of the
            batch). The window slides past the leading converged levels and one more (see the
            module doc). It is a stopping test, not a bound on the distance to the serial result.
            0 gives the serial result exactly; ``float('inf')`` slides the full window. The changes are
            measured in float64; in float16 / bfloat16 a tolerance below the state's rounding (about
            1e-3 / 8e-3 of its magnitude, over sigma_t) cannot be met short of the exact fixed point and
            acts as 0 (coarse iterates reach that fixed point in fewer rounds than float32 ones).
        max_rounds: optional latency budget; Picard stops in time to finish with draft-and-refine
            rounds of the same width. Must be at least :func:`fewest_rounds` (T, width).
        init: ``"skip"`` (drafts from the latest anchor) or ``"frozen"`` (ParaDiGMS: copies).
        norm: what a level's change is divided by: ``"sigma"`` (default, sigma_t^2 of its level) or
            ``"posterior"`` (ParaDiGMS' rule: the posterior variance of the step from that level, the
            noise a DDPM step adds there; stricter). The module doc gives both.

    Example::

        sched = PicardScheduler(DDIMSkip(schedule), schedule.timesteps(50, "trailing"), width=4, tolerance=1e-2)
        out = sched.sample(model, x, executor=BatchedExecutor())
        out.x, out.rounds, out.evals, out.info["calls_beyond_T"]
    """

    def __init__(
        self,
        transition: SkipTransition,
        timesteps: Union[TimeGrid, torch.Tensor, list, tuple],
        width: int,
        tolerance: float = 1e-3,
        max_rounds: Optional[int] = None,
        init: str = "skip",
        norm: str = "sigma",
    ):
        check_transition(transition, "PicardScheduler(transition, timesteps, width, tolerance)")
        width = _check_width(width, _WIDTH_MEANING)
        if not isinstance(init, str) or init not in INITS:
            raise InvalidArgumentError(
                f"init must be 'skip' (skip-transition drafts) or 'frozen' (ParaDiGMS' copies of the last state), got {init!r}."
            )
        self.transition = transition
        self.grid = transition.make_grid(timesteps)
        self.width = width
        self.tolerance = _check_tolerance(tolerance)
        self.init = init
        self.norm = _check_norm(norm)
        if max_rounds is not None:
            max_rounds = as_count(max_rounds, "max_rounds (the latency budget in rounds, or None)", 1)
            low = fewest_rounds(self.num_steps, width)
            if max_rounds < low:
                raise InvalidArgumentError(
                    f"max_rounds={max_rounds!r} cannot finish {self.num_steps} steps at width {width}: the fewest "
                    f"rounds that finish at every tolerance are {low} (DRiffusion's own round count: one Picard "
                    f"round, then draft-and-refine in the worst case). Raise max_rounds or the width, or pass None."
                )
        self.max_rounds = max_rounds

    @property
    def num_steps(self) -> int:
        """T, the number of steps of the grid (the serial sampler's model calls)."""
        return len(self.grid)

    def start(
        self, x: torch.Tensor, noise: Optional[NoiseSource] = None, keep_trajectory: bool = False
    ) -> PicardState:
        """A fresh state machine at x (for callers that drive rounds themselves)."""
        return PicardState(
            self.transition,
            self.grid,
            self.width,
            self.tolerance,
            self.max_rounds,
            self.init,
            x,
            default_noise(self.transition, noise),
            keep_trajectory,
            self.norm,
        )

    def sample(
        self,
        predictor: Predictor,
        x: torch.Tensor,
        executor: Optional[Executor] = None,
        noise: Optional[NoiseSource] = None,
        cond: Optional[Mapping[str, Any]] = None,
        progress: bool = False,
        return_trajectory: bool = False,
    ) -> SampleOutput:
        """Sample from x (the state at ``t_0``) by sliding-window Picard iteration.

        Arguments:
            predictor: ``f(x: Tensor[B, ...], t: Tensor[B], **cond) -> Tensor[B, ...]``.
            x: the starting state ``Tensor[B, ...]``.
            executor: how a round runs (default :class:`SerialExecutor`); every executor gives the
                same result.
            noise: per-step noise for stochastic transitions (default: a random seed); with the
                same NoiseSource the converged result is ``sample_serial``'s.
            cond: keyword arguments for the predictor; tensors need a leading batch dim B.
            progress: show a tqdm progress bar (levels finalised).
            return_trajectory: keep the final states x_0 .. x_T.

        Returns:
            :class:`~driffusion_core.SampleOutput` with honest ``rounds`` and ``evals``; ``info``
            holds ``calls_beyond_T``; ``converged``, True when Picard finalised every level
            itself, i.e. the budget never handed the rest to draft-and-refine, so every level meets
            the module doc's "what tau guarantees" (it does not mean every level's last change
            passed the tolerance test: each round also finalises its first unconverged level);
            ``picard_rounds``, ``fallback_rounds``, ``fallback_from`` (the anchor
            level draft-and-refine started from, or None), ``advances`` (levels finalised per
            Picard round), and the settings.
        """
        state, executor = run_rounds(lambda: self.start(x, noise, return_trajectory), self.grid, predictor, x, executor, cond, progress, f"Picard {self.init} n={self.width}")
        info = {
            "calls_beyond_T": state.evals - self.num_steps,
            "converged": state.fallback_from is None,
            "picard_rounds": state.picard_rounds,
            "fallback_rounds": state.rounds - state.picard_rounds,
            "fallback_from": state.fallback_from,
            "advances": state.advances,
            "tolerance": self.tolerance,
            "init": self.init,
            "width": self.width,
            "max_rounds": self.max_rounds,
            "executor": executor.describe(),
        }
        return SampleOutput(check_finite_sample(state.x, "PicardScheduler"), state.rounds, state.evals, state.trajectory, info)

    def __repr__(self) -> str:
        budget = f", max_rounds={self.max_rounds}" if self.max_rounds is not None else ""
        return (
            f"PicardScheduler({self.transition!r}, T={self.num_steps}, width={self.width}, "
            f"tolerance={self.tolerance:g}{budget}, init={self.init!r}"
            + (f", norm={self.norm!r})" if self.norm != "sigma" else ")")
        )

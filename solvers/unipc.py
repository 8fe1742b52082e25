r"""UniPC (Zhao et al. 2023): the multistep predictor UniP-2 with the corrector UniC, data prediction.

Key: :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon`, :math:`\lambda = \log(\alpha/\sigma)`, :math:`m_i` the
prediction of step i converted to x0_hat at its level. The model is called on the *predicted* state
:math:`x_i`; its output :math:`m_i` first corrects that state, then predicts the next one
(diffusers' ``UniPCMultistepScheduler.step``):

.. math::
    x_i^c = x_i + K(m_i, m_{i-1}, m_{i-2}) \quad\text{(UniC; none at step 0)},\qquad
    x_{i+1} = P(x_i^c, m_i, m_{i-1}) \quad\text{(UniP; first order at step 0)},

with the coefficients of :func:`driffusion_core.coefficients.unipc_corrector_coefficients` and
:func:`~driffusion_core.coefficients.unipc_predictor_coefficients` (``bh1`` or ``bh2``; UniP-2 with bh2 is
DPM-Solver++ 2M midpoint). The corrector of step i has the order of the predictor that reached
:math:`x_i` (1 after the first step, then 2), so it is written as a change K of the predicted state and
needs no corrected state from earlier steps: a step combines the two earlier steps' (x, prediction,
level), as :meth:`UniPCSkip.multistep` does. The sampler's state is the predicted :math:`x_i`, the
model's input, and the sample the last predicted state (no corrector after the last step).

**Drafts.** With the anchor's x0_hat :math:`m_a` frozen, the chain after the anchor's own step is: the
corrector at a + 1 with :math:`m_{a+1} = m_a` (only its :math:`m_{a-1}` term is left), then first-order
predictors (their correction :math:`m_{j} - m_{j-1}` is 0), whose correctors vanish too. So draft 1 is the
serial step, and draft j > 1 the first-order skip from the corrected draft 1 with x0_hat frozen: the
chain itself, one batched call.
"""
from __future__ import annotations

import math
import reprlib
from typing import Optional, Tuple, Union

import torch

from driffusion_core import coefficients as C
from driffusion_core.errors import InvalidArgumentError, as_count, as_flag, is_real
from driffusion_core.grid import TimeGrid
from driffusion_core.parameterization import Prediction, X0Transform, broadcast_coef, upcast
from driffusion_core.schedules import Schedule
from driffusion_core.transition import History, Levels, as_levels, zero_length_identity
from solvers.dpm import LogSNRSolver, check_order

__all__ = ["UniPCSkip"]

SOLVER_TYPES = ("bh1", "bh2")


class UniPCSkip(LogSNRSolver):
    """UniPC (data prediction): the predictor UniP of order 1 or 2 and the corrector UniC.

    Arguments:
        schedule: a :class:`~driffusion_core.VPSchedule` or :class:`~driffusion_core.FlowSchedule`.
        prediction: ``"epsilon"``, ``"sample"``, ``"v_prediction"`` (VP) or ``"velocity"`` (flow).
        order: the predictor's order, 1 or 2 (diffusers' ``solver_order``; its default 2).
        solver_type: ``"bh2"`` (diffusers' default) or ``"bh1"``, the B(h) of UniPC.
        lower_order_final: the predictor of the grid's last step is first order (diffusers'
            ``lower_order_final``, its default): of the step into ``final_level`` where that is set, else of
            step ``len(grid) - 1`` wherever the step is taken on a grid (:meth:`grid_step`: the serial
            sampler, the refinement of every round).
        final_level: the last level of the grid this transition is for (``grid.t_to[-1]``;
            :func:`solvers.from_diffusers` sets it), so that a bare :meth:`multistep` into it is first
            order too. A step to sigma = 0 is always first order (the second-order weights diverge there).
        x0_transform: optional :class:`~driffusion_core.ClipSample` / :class:`~driffusion_core.DynamicThreshold`
            (diffusers' ``thresholding``), applied to every x0_hat.

    ``__call__`` is the first-order step (DDIM with eta = 0, the skip); :meth:`multistep` the UniPC step.
    """

    def __init__(
        self,
        schedule: Schedule,
        prediction: Union[str, Prediction] = "epsilon",
        order: int = 2,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        final_level: Optional[float] = None,
        x0_transform: Optional[X0Transform] = None,
    ):
        super().__init__(schedule, prediction, x0_transform)
        self.order = order
        self.solver_type = solver_type
        self.lower_order_final = as_flag(lower_order_final, "lower_order_final")
        self.final_level = final_level  # checked (__setattr__)

    @property
    def history(self) -> int:
        """Earlier steps a step combines: the corrector of order 2 takes two (order 1: one)."""
        return self.order

    def __setattr__(self, name: str, value) -> None:
        if name == "order":
            value = check_order("UniPCSkip", value, "three")
        if name == "solver_type" and value not in SOLVER_TYPES:
            raise InvalidArgumentError(f"UniPCSkip solver_type must be 'bh1' or 'bh2', got {value!r}.")
        if name == "final_level" and value is not None:
            value = self._checked_final_level(value)
        super().__setattr__(name, value)

    def _checked_final_level(self, value) -> float:
        """``final_level``: one finite level of the schedule's range (the grid's last ``t_to``)."""
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not is_real(value) or not math.isfinite(float(value)):
            raise InvalidArgumentError(
                f"UniPCSkip final_level must be one finite number, the grid's last level (grid.t_to[-1]), or None; "
                f"got {reprlib.repr(value)}."
            )
        lo, hi = self.schedule.level_range()
        if not lo <= float(value) <= hi:
            raise InvalidArgumentError(
                f"UniPCSkip final_level = {float(value):g} lies outside {type(self.schedule).__name__}'s levels "
                f"[{lo:g}, {hi:g}]; pass the grid's last level (grid.t_to[-1])."
            )
        return float(value)

    def make_grid(self, timesteps: Union[TimeGrid, torch.Tensor, list, tuple]) -> TimeGrid:
        """:meth:`LogSNRSolver.make_grid`, and with ``solver_type="bh1"`` refusing a step from a level where
        alpha = 0 (log-SNR -inf: flow's sigma = 1, a zero-terminal-SNR table) that the next step's corrector
        combines: bh1's B(h) = h is infinite there (bh2's e^h - 1 stays finite)."""
        grid = super().make_grid(timesteps)
        if self.solver_type != "bh1" or len(grid) < 2:
            return grid
        alpha = self.schedule.alpha_sigma(grid.t_from[:-1])[0]
        for i in torch.nonzero(alpha <= 0).flatten().tolist():
            if self.history_at(grid, i + 1) > 0:
                raise InvalidArgumentError(
                    f"UniPCSkip(solver_type='bh1'): step {i} starts at level {grid.t_from[i].item():g}, where alpha = 0 "
                    f"(log-SNR -inf: sigma = 1 in flow matching, or zero terminal SNR), and step {i + 1}'s corrector "
                    f"multiplies by bh1's B(h) = h = inf there (NaN). Use solver_type='bh2' (diffusers' default: "
                    f"B(h) = e^h - 1 stays finite), or start the grid below that level (diffusers' use_flow_sigmas "
                    f"grid starts at 1 - 1/N)."
                )
        return grid

    def history_at(self, grid: TimeGrid, i: int) -> int:
        return min(int(i), self.order)

    @staticmethod
    def _combine(terms) -> torch.Tensor:
        """sum of c * v over ``terms = [(c, v), ...]``, each coefficient a scalar or one per row."""
        out = None
        for c, v in terms:
            term = broadcast_coef(c, v) * v
            out = term if out is None else out + term
        return out

    # ----------------------------------------------------------------- UniPC
    def orders(self, n_history: int, t_to: torch.Tensor) -> Tuple[int, int]:
        """(predictor order, corrector order) of a step with ``n_history`` earlier steps going to ``t_to``:
        the corrector takes the order of the predictor that reached this step's state (diffusers' warm-up: 1
        after the first step, then ``order``), the predictor is ``order`` once an earlier step exists, first
        order into ``final_level`` (``lower_order_final``) and into sigma = 0 (per row: with per-row levels
        those rows take the first-order step, see :meth:`_first_order_rows`)."""
        corrector = min(n_history, self.order)
        predictor = self.order if n_history >= 1 else 1
        if bool(self._first_order_rows(t_to).all()):
            predictor = 1
        return predictor, corrector

    def _first_order_rows(self, t_to: torch.Tensor) -> torch.Tensor:
        """Which levels ``t_to`` the predictor reaches at first order: sigma = 0, and ``final_level`` with
        ``lower_order_final``."""
        t_to = torch.as_tensor(t_to, dtype=torch.float64)
        rows = self.schedule.alpha_sigma(t_to)[1] == 0
        if self.lower_order_final and self.final_level is not None:
            rows = rows | (t_to == self.final_level)
        return rows

    def _coefficients(self, levels, predictor: int, corrector: int):
        """Corrector (k_s, k_p, k_pp) and predictor ((c_x, c_s, c_p) or (c_x, c_s)) coefficients for
        ``levels = (t_pp, t_p, t_s, t_t)`` (the earlier ones None where unused)."""
        t_pp, t_p, t_s, t_t = levels
        self.check_levels(t_s, t_t, t_prev=t_p)
        if t_pp is not None:
            self.check_levels(t_p, t_s, t_prev=t_pp)
        a_s, s_s = self.schedule.alpha_sigma(t_s)
        a_t, s_t = self.schedule.alpha_sigma(t_t)
        a_p, s_p = self.schedule.alpha_sigma(t_p) if t_p is not None else (None, None)
        a_pp, s_pp = self.schedule.alpha_sigma(t_pp) if t_pp is not None else (None, None)
        k = None
        if corrector:
            k = C.unipc_corrector_coefficients(a_pp, s_pp, a_p, s_p, a_s, s_s, corrector, self.solver_type)
        first = C.dpm_solver_pp_coefficients(a_s, s_s, a_t, s_t)
        if predictor == 1:
            return k, first
        c_x, c_s, c_p = C.unipc_predictor_coefficients(a_p, s_p, a_s, s_s, a_t, s_t, self.solver_type)
        rows = self._first_order_rows(t_t)
        if bool(rows.any()):  # some rows (per-row levels) go to sigma = 0 or final_level: first order there
            c_s = torch.where(rows, first[1], c_s)
            c_p = torch.where(rows, torch.zeros_like(c_p), c_p)
        return k, (c_x, c_s, c_p)

    def _x0s(self, x: torch.Tensor, pred: torch.Tensor, t_s: torch.Tensor, history: History):
        """x0_hat of this step and of the history's steps (newest first), in float32 or wider."""
        x0s = [self.to_x0_eps(*upcast(x, pred), t_s)[0]]
        for x_h, p_h, t_h in reversed(list(history)):
            x0s.append(self.to_x0_eps(*upcast(x_h, p_h), as_levels(t_h, x.shape[0]))[0])
        return x0s

    def _check_history(self, x: torch.Tensor, history: History, need: int) -> None:
        if len(history) < need:
            raise InvalidArgumentError(
                f"UniPCSkip.multistep needs the {need} earlier step(s) (x_i, p_i, t_from[i]), oldest first, got "
                f"{len(history)}."
            )
        for x_h, p_h, _ in history:
            if not (isinstance(x_h, torch.Tensor) and isinstance(p_h, torch.Tensor)) or any(
                v.shape != x.shape or v.dtype != x.dtype or v.device != x.device for v in (x_h, p_h)
            ):
                raise InvalidArgumentError(
                    "UniPCSkip.multistep: history holds (x_i, p_i, t_from[i]) of the same batch, shaped like x, "
                    f"in its dtype and device; x is {x.dtype} {tuple(x.shape)} on {x.device}."
                )

    def _step(self, x: torch.Tensor, pred: torch.Tensor, t_from: Levels, t_to: Levels, history: History,
              last: bool = False):
        """The UniPC step in float32 or wider (before the cast to x's dtype), the x0_hat of this step and of the
        history's steps it used (newest first), and the predictor's order: what :meth:`multistep` returns and
        :meth:`drafts` continues from. ``last``: the grid's last step (first order with ``lower_order_final``)."""
        history = list(history)[-self.order:] if history else []
        n = x.shape[0]
        t_from, t_to = self.operands(x, pred, t_from, t_to)
        predictor, corrector = self.orders(len(history), t_to)
        if last and self.lower_order_final:
            predictor = 1
        need = max(corrector, predictor - 1)
        self._check_history(x, history, need)
        hist_levels = [as_levels(h[2], n) for h in history]
        t_p = hist_levels[-1] if need >= 1 else None
        t_pp = hist_levels[-2] if corrector == 2 else None
        levels = (t_pp, t_p, t_from, t_to)
        if all(t is None or t.dim() == 0 for t in levels):
            key = ("unipc", self.solver_type, predictor, corrector) + tuple(None if t is None else t.item() for t in levels)
            k, c = self._memo(key, lambda: self._coefficients(levels, predictor, corrector))
        else:
            k, c = self._coefficients(levels, predictor, corrector)
        x0s = self._x0s(x, pred, t_from, history[len(history) - need:] if need else [])
        (x_up,) = upcast(x)
        x_c = x_up  # UniC: the predicted state corrected by K = k_s m_s + k_p m_p (+ k_pp m_pp)
        if k is not None:
            x_c = x_up + self._combine(list(zip(k, x0s))[: corrector + 1])
        out = self._combine(list(zip(c, [x_c] + x0s)))  # UniP from the corrected state
        return zero_length_identity(out, x_up, t_from, t_to), x0s, predictor

    def multistep(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        t_from: Levels,
        t_to: Levels,
        history: History,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The UniPC step from the predicted state ``x`` at ``t_from`` with its model output ``pred``:
        correct x (UniC, with the x0_hat of ``history``'s steps, ``[(x_i, p_i, t_from[i])]`` oldest first),
        then predict the state at ``t_to`` (UniP). Deterministic: ``noise`` is ignored."""
        return self._step(x, pred, t_from, t_to, history)[0].to(x.dtype)

    def grid_step(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        grid: TimeGrid,
        i: int,
        history: History = (),
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """:meth:`SkipTransition.grid_step`; the grid's last step has a first-order predictor with
        ``lower_order_final`` (diffusers' ``min(solver_order, len(timesteps) - step_index)``), also when
        ``final_level`` is not set."""
        try:
            last = as_count(i, "i", 0, len(grid) - 1) == len(grid) - 1
        except InvalidArgumentError:
            last = False  # the base method names the bad index
        h = self.history_at(grid, i) if last else 0
        if not (last and h and self.lower_order_final and self.final_level is None):
            return super().grid_step(x, pred, grid, i, history, noise)
        return self._step(x, pred, grid.t_from[i], grid.t_to[i], list(history)[-h:], last=True)[0].to(x.dtype)

    def drafts(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        t_from: torch.Tensor,
        t_to: torch.Tensor,
        noises: Optional[torch.Tensor] = None,
        history: Optional[History] = None,
    ) -> torch.Tensor:
        """The chain with the anchor's x0_hat frozen: row 0 the serial UniPC step (with ``history``), row j > 0
        the first-order skip to ``t_to[j]`` from row 0 corrected with the frozen x0_hat."""
        if not history:  # the anchor's step is first order, and the frozen chain's correctors vanish
            return super().drafts(x, pred, t_from, t_to, noises)
        t_from, t_to = self.check_window(x, t_from, t_to, noises)
        n, b = int(t_from.shape[0]), x.shape[0]
        step, x0s, predictor = self._step(x, pred, t_from[0], t_to[0], history)
        first = step.to(x.dtype)
        if n == 1:
            return first.unsqueeze(0)
        m_a = x0s[0]
        (start,) = upcast(first)
        if predictor == 2:
            # the corrector at t_to[0] (order 2) with m_{a+1} = m_a keeps only its m_{a-1} term: k_pp (m_{a-1} - m_a)
            levels = (as_levels(history[-1][2], b), t_from[0].to(torch.float64), t_to[0].to(torch.float64),
                      t_to[1].to(torch.float64))
            k, _ = self._coefficients(levels, 1, 2)
            start = start + self._combine([(k[2], x0s[1] - m_a)])
        rest = self._first_order_from(start, m_a, t_to[0], t_to[1:])
        return torch.cat([first.unsqueeze(0), rest.to(x.dtype)])

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f", order={self.order}, solver_type={self.solver_type!r}, "
                f"lower_order_final={self.lower_order_final}, final_level={self.final_level})")

r"""DPM-Solver++ (Lu et al. 2022): first order, and the second-order multistep solver 2M.

Key: :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon`, :math:`\lambda_t = \log(\alpha_t/\sigma_t)` (half the
log-SNR), :math:`\hat x_0^{(i)}` the prediction converted to x0 at step i (data prediction).

**First order** (one step, the skip): from level s to any later level t,

.. math:: x_t = \frac{\sigma_t}{\sigma_s} x_s + \alpha_t(1 - e^{-h})\,\hat x_0^{(s)},\qquad h = \lambda_t - \lambda_s,

which is DDIM (eta = 0): it composes exactly with a frozen x0_hat.

**2M** (multistep): step i also combines the previous step's x0_hat, with
:math:`h_0 = \lambda_{t_i} - \lambda_{t_{i-1}}`, :math:`r_0 = h_0/h` and
:math:`D_1 = (\hat x_0^{(i)} - \hat x_0^{(i-1)})/r_0` (midpoint: :math:`+\tfrac12\alpha_t(1-e^{-h})D_1`;
heun: :math:`+\alpha_t(1 - (1-e^{-h})/h)D_1`). The first step is first order (there is no previous
one), and so is the last where diffusers' ``lower_order_final`` / ``euler_at_final`` ask for it or where
it goes to sigma = 0.

**Drafts.** The anchor's own step is the 2M step (it needs no model call beyond the anchor's); the
chain after it, with the anchor's x0_hat frozen, has :math:`D_1 = 0` at every step, so it is the
first-order chain, which composes exactly: draft j is the first-order skip from the first draft to
:math:`t_{a+j}` with x0_hat frozen, one batched call.
"""
from __future__ import annotations

import weakref
from typing import Optional, Union

import torch

from driffusion_core import coefficients as C
from driffusion_core.errors import InvalidArgumentError, as_count, as_flag
from driffusion_core.grid import TimeGrid
from driffusion_core.parameterization import Prediction, X0Transform, broadcast_coef, upcast
from driffusion_core.schedules import Schedule
from driffusion_core.transition import History, Levels, SkipTransition, as_levels, repeat_rows, zero_length_identity

__all__ = ["DPMSolverSkip", "LogSNRSolver", "refuse_flat_log_snr"]

SOLVER_TYPES = ("midpoint", "heun")


def check_order(owner: str, value, earlier: str) -> int:
    """A multistep solver's ``order``: 1 or 2 (``earlier``: how many earlier steps diffusers' third order needs)."""
    if isinstance(value, bool) or value not in (1, 2):
        raise InvalidArgumentError(
            f"{owner} order must be 1 or 2, got {value!r} (third order is not implemented; diffusers' "
            f"solver_order=3 needs {earlier} earlier steps)."
        )
    return int(value)


def refuse_flat_log_snr(transition: SkipTransition, grid: TimeGrid) -> TimeGrid:
    r"""``grid``, after refusing, for a second-order (multistep) solver, a step whose two levels have the same
    :math:`\lambda = \log(\alpha/\sigma)` (a flat stretch of the alpha-bar table) and whose next step combines
    it (``history_at``): that step's 2M extrapolation or UniPC corrector divides by the previous step's
    :math:`h = \lambda_t - \lambda_s = 0`, so it would give NaN after every model call had been made. A flat
    step is the identity at first order, and as the last step (DDIM's ``set_alpha_to_one=False``: level 0 to
    the final alpha-bar, which is alphas_cumprod[0])."""
    if getattr(transition, "order", 1) < 2 or len(grid) < 2:
        return grid
    a_s, s_s = transition.schedule.alpha_sigma(grid.t_from[:-1])
    a_t, s_t = transition.schedule.alpha_sigma(grid.t_to[:-1])
    flat = (a_s * s_t == a_t * s_s) & (s_t > 0)  # lambda_t == lambda_s (sigma_t = 0: lambda_t = inf, a real step)
    for i in torch.nonzero(flat).flatten().tolist():
        if transition.history_at(grid, i + 1) > 0:  # the next step combines this one (2M / UniPC's corrector)
            raise InvalidArgumentError(
                f"{type(transition).__name__}: step {i} goes from level {grid.t_from[i].item():g} to "
                f"{grid.t_to[i].item():g}, which have the same alpha-bar (log-SNR), and step {i + 1} of this "
                f"second-order solver divides by that step's length h = 0. Drop one of the two levels, use a table "
                f"whose alpha-bar strictly decreases, or order=1."
            )
    return grid


class LogSNRSolver(SkipTransition):
    """What DPM-Solver++ and UniPC share: their skip is the first-order step (DPM-Solver++ 1, DDIM with
    eta = 0 in data-prediction form), which composes exactly; their multistep updates add to it."""

    stochastic = False
    composes_exactly = True  # the one-step skip (first order) is DDIM

    def make_grid(self, timesteps) -> TimeGrid:
        """:meth:`SkipTransition.make_grid`, refusing a step between two levels of equal log-SNR."""
        return refuse_flat_log_snr(self, super().make_grid(timesteps))

    # ----------------------------------------------------------------- first order (the skip)
    def _first(self, t_from: torch.Tensor, t_to: torch.Tensor):
        """((alpha_s, sigma_s), (c_x, c_x0)) of the first-order step t_from -> t_to."""
        a_s, s_s = self.schedule.alpha_sigma(t_from)
        a_t, s_t = self.schedule.alpha_sigma(t_to)
        return (a_s, s_s), C.dpm_solver_pp_coefficients(a_s, s_s, a_t, s_t)

    def x0_hat(self, x: torch.Tensor, pred: torch.Tensor, t: Levels, alpha_sigma=None) -> torch.Tensor:
        """The model output converted to x0_hat at level t (with the x0 transform)."""
        return self.to_x0_eps(x, pred, t, alpha_sigma)[0]

    def _from_x0(self, x: torch.Tensor, x0_hat: torch.Tensor, c) -> torch.Tensor:
        c_x, c_x0 = c
        return broadcast_coef(c_x, x) * x + broadcast_coef(c_x0, x) * x0_hat

    def _first_order_from(self, start: torch.Tensor, x0_hat: torch.Tensor, t_from: torch.Tensor,
                          t_to: torch.Tensor) -> torch.Tensor:
        """``Tensor[n, B, ...]``: the first-order skips from ``start`` at level ``t_from`` to each of the n levels
        ``t_to`` with ``x0_hat`` frozen, one batched call (the drafts after a window's multistep first step)."""
        n, b = int(t_to.shape[0]), start.shape[0]
        _, c = self.cached(t_from.expand(n * b), t_to.to(torch.float64).repeat_interleave(b), self._first)
        return self._from_x0(repeat_rows(start, n), repeat_rows(x0_hat, n), c).reshape(n, *start.shape)

    def __call__(self, x: torch.Tensor, pred: torch.Tensor, t_from: Levels, t_to: Levels,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""The first-order DPM-Solver++ step (DDIM with eta = 0 in the data-prediction form) from level s to t:

        .. math:: x_t = \frac{\sigma_t}{\sigma_s} x_s + \alpha_t\,(1 - e^{-h})\,\hat x_0, \quad
                  h = \lambda_t - \lambda_s, \ \lambda = \log(\alpha / \sigma),

        with x0_hat converted from ``pred`` at level s. Deterministic: ``noise`` is ignored. A zero-length
        skip returns x. The higher-order steps (DPM-Solver++ 2M, UniPC's predictor and corrector) combine
        earlier predictions: see each subclass's :meth:`multistep`."""
        t_from, t_to = self.operands(x, pred, t_from, t_to, noise)
        alpha_sigma, c = self.cached(t_from, t_to, self._first)
        dtype, (x, pred) = x.dtype, upcast(x, pred)  # float16 / bfloat16: in float32, cast once
        out = self._from_x0(x, self.x0_hat(x, pred, t_from, alpha_sigma), c)
        return zero_length_identity(out, x, t_from, t_to).to(dtype)


class DPMSolverSkip(LogSNRSolver):
    r"""DPM-Solver++ (data prediction), first order or the second-order multistep 2M (Lu et al. 2022).

    First order, with :math:`h = \lambda_s - \lambda_t`, :math:`\lambda = \log(\alpha/\sigma)`:
    :math:`x_s = \frac{\sigma_s}{\sigma_t} x_t + \alpha_s (1 - e^{-h})\,\hat x_0^{(t)}`; 2M adds
    :math:`\alpha_s (1 - e^{-h})\,\frac{1}{2 r}(\hat x_0^{(t)} - \hat x_0^{(p)})`, :math:`r = h_{prev}/h`
    (midpoint; ``dpm_solver_pp_2m_coefficients``).

    Arguments:
        schedule: a :class:`~driffusion_core.VPSchedule` or :class:`~driffusion_core.FlowSchedule`
            (any interpolant with :math:`\lambda = \log(\alpha/\sigma)`).
        prediction: ``"epsilon"``, ``"sample"``, ``"v_prediction"`` (VP) or ``"velocity"`` (flow).
        order: 1 (DDIM in DPM-Solver++ form) or 2 (2M, diffusers' default ``solver_order=2``).
        solver_type: ``"midpoint"`` (diffusers' default) or ``"heun"``.
        lower_order_final: take the last step at first order on grids of fewer than 15 steps.
        euler_at_final: take the last step at first order always.
        num_inference_steps: the step count the lower_order_final rule compares with 15, as diffusers'
            ``len(scheduler.timesteps)``: None (default) counts the grid being sampled; set it to the full
            grid's length when sampling a slice of it (img2img: ``grid.sub(t_start, T)``, whose last step
            is then second order on a long grid, as diffusers takes it). ``from_diffusers`` sets it.
        x0_transform: optional :class:`~driffusion_core.ClipSample` / :class:`~driffusion_core.DynamicThreshold`.

    The step to a level with sigma = 0 (the clean end) is always first order (it returns x0_hat), as in
    diffusers' ``final_sigmas_type="zero"``.
    """

    def __init__(
        self,
        schedule: Schedule,
        prediction: Union[str, Prediction] = "epsilon",
        order: int = 2,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        x0_transform: Optional[X0Transform] = None,
        num_inference_steps: Optional[int] = None,
    ):
        super().__init__(schedule, prediction, x0_transform)
        self.order = order
        self.solver_type = solver_type
        self.lower_order_final = as_flag(lower_order_final, "lower_order_final")
        self.euler_at_final = as_flag(euler_at_final, "euler_at_final")
        self.num_inference_steps = num_inference_steps

    @property
    def history(self) -> int:
        """Earlier steps a step combines: ``order - 1``."""
        return self.order - 1

    def __setattr__(self, name: str, value) -> None:
        if name == "order":
            value = check_order("DPMSolverSkip", value, "two")
        if name == "solver_type" and value not in SOLVER_TYPES:
            raise InvalidArgumentError(f"solver_type must be 'midpoint' or 'heun', got {value!r}.")
        if name == "num_inference_steps" and value is not None:
            value = as_count(value, "DPMSolverSkip num_inference_steps (the full grid's step count, or None)", 1)
        super().__setattr__(name, value)
        if not name.startswith("_"):  # the remembered x0_hat depends on prediction, x0_transform, schedule
            self.__dict__.pop("_x0_memo", None)

    # ----------------------------------------------------------------- 2M
    def history_at(self, grid: TimeGrid, i: int) -> int:
        if self.order == 1 or i == 0:
            return 0
        last = i == len(grid) - 1
        steps = self.num_inference_steps if self.num_inference_steps is not None else len(grid)
        if last and (self.euler_at_final or (self.lower_order_final and steps < 15)):
            return 0
        if float(self.schedule.alpha_sigma(grid.t_to[i : i + 1])[1][0]) == 0.0:  # to the clean end: x0_hat
            return 0
        return 1

    def _second(self, t_prev: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor):
        a_p, s_p = self.schedule.alpha_sigma(t_prev)
        a_s, s_s = self.schedule.alpha_sigma(t_from)
        a_t, s_t = self.schedule.alpha_sigma(t_to)
        c_x, c_x0, c_p = C.dpm_solver_pp_2m_coefficients(a_p, s_p, a_s, s_s, a_t, s_t, self.solver_type)
        clean = s_t == 0  # h = inf: the step to sigma = 0 is first order (it returns x0_hat)
        if bool(clean.any()):
            _, c_first = C.dpm_solver_pp_coefficients(a_s, s_s, a_t, s_t)
            c_x0 = torch.where(clean, c_first, c_x0)
            c_p = torch.where(clean, torch.zeros_like(c_p), c_p)
        return (a_p, s_p), (a_s, s_s), (c_x, c_x0, c_p)

    def multistep(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        t_from: Levels,
        t_to: Levels,
        history: History,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The 2M step :math:`x_t = c_x x_s + c_{x_0}\\hat x_0^{(s)} + c_{prev}\\hat x_0^{(p)}` with
        ``history = [(x_p, p_p, t_p)]``, the previous step (its x0_hat is converted again, bit for bit).
        A step to sigma = 0 is the first-order one (2M's coefficients diverge there)."""
        if len(history) != 1:
            raise InvalidArgumentError(f"DPMSolverSkip.multistep takes the one previous step, got {len(history)}.")
        x_p, p_p, t_p = history[0]
        t_from, t_to = self.operands(x, pred, t_from, t_to, noise)
        if not (isinstance(x_p, torch.Tensor) and isinstance(p_p, torch.Tensor)) or any(
            v.shape != x.shape or v.dtype != x.dtype or v.device != x.device for v in (x_p, p_p)
        ):
            def desc(v):
                return f"{v.dtype} {tuple(v.shape)} on {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__

            raise InvalidArgumentError(
                f"DPMSolverSkip.multistep: the previous step's state is {desc(x_p)} (prediction {desc(p_p)}), but "
                f"x is {desc(x)}; history holds (x_prev, p_prev, t_prev) of the same batch."
            )
        t_p = as_levels(t_p, x.shape[0])

        def second():
            self.check_levels(t_from, t_to, t_prev=t_p)
            return self._second(t_p, t_from, t_to)

        if t_p.dim() == 0 and t_from.dim() == 0 and t_to.dim() == 0:
            key = ("2m", self.solver_type, t_p.item(), t_from.item(), t_to.item())
            as_p, as_s, (c_x, c_x0, c_p) = self._memo(key, second)
        else:
            as_p, as_s, (c_x, c_x0, c_p) = second()
        # float16 / bfloat16 in float32, cast once; the memo is keyed on the caller's tensors
        x0_p = self._remembered_x0(x_p, p_p, t_p)
        if x0_p is None:
            x0_p = self.x0_hat(*upcast(x_p, p_p), t_p, as_p)
        x_in, pred_in, (x, pred) = x, pred, upcast(x, pred)
        x0_s = self.x0_hat(x, pred, t_from, as_s)
        self._remember_x0(x_in, pred_in, t_from, x0_s)
        out = self._from_x0(x, x0_s, (c_x, c_x0)) + broadcast_coef(c_p, x) * x0_p
        return zero_length_identity(out, x, t_from, t_to).to(x_in.dtype)

    def _remember_x0(self, x: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> None:
        """Keep ``x0`` for the next step's history. The memo holds ``x`` and ``pred`` weakly and dies with
        either, so the transition holds no batch-sized tensor once the sampler has let go of its states."""
        self.__dict__.pop("_x0_memo", None)
        if x.is_inference() or pred.is_inference():  # no version counters to tell an in-place change
            return
        owner = weakref.ref(self)

        def drop(ref) -> None:  # x or pred was freed: forget the memo if it is still this one
            me = owner()
            if me is not None:
                memo = me.__dict__.get("_x0_memo")
                if memo is not None and (memo[0] is ref or memo[1] is ref):
                    me.__dict__.pop("_x0_memo", None)

        self._x0_memo = (weakref.ref(x, drop), weakref.ref(pred, drop), t, x0, x._version, pred._version,
                         self.schedule.cache_token())

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # copies and pickles of the transition carry no memo (it holds weakrefs)
        state.pop("_x0_memo", None)
        return state

    def _remembered_x0(self, x: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> Optional[torch.Tensor]:
        """The x0_hat the last :meth:`multistep` computed, if it was for these very tensors (``is``, not
        modified in place since: torch's version counters) and level: a serial chain converts each
        prediction once, not again as the next step's history (the same inputs give the same bits either way)."""
        memo = self.__dict__.get("_x0_memo")
        if memo is None or memo[0]() is not x or memo[1]() is not pred or x.is_inference() or pred.is_inference():
            return None
        if memo[4] != x._version or memo[5] != pred._version or memo[6] != self.schedule.cache_token():
            return None
        return memo[3] if torch.equal(memo[2], t) else None

    def drafts(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        t_from: torch.Tensor,
        t_to: torch.Tensor,
        noises: Optional[torch.Tensor] = None,
        history: Optional[History] = None,
    ) -> torch.Tensor:
        """The chain with the anchor's x0_hat frozen. With ``history`` the anchor's step is the 2M step
        (row 0, the serial step bit for bit) and every later draft the first-order skip from row 0 with
        that x0_hat (the chain's D_1 is 0 once the prediction is frozen)."""
        if not history:
            return super().drafts(x, pred, t_from, t_to, noises)
        t_from, t_to = self.check_window(x, t_from, t_to, noises)
        n = int(t_from.shape[0])
        first = self.multistep(x, pred, t_from[0], t_to[0], history)
        if n == 1:
            return first.unsqueeze(0)
        x0_a = self.x0_hat(*upcast(x, pred), t_from[0])  # float16 / bfloat16: in float32, cast once
        (first_up,) = upcast(first)
        rest = self._first_order_from(first_up, x0_a, t_to[0], t_to[1:])
        return torch.cat([first.unsqueeze(0), rest.to(x.dtype)])

    def __repr__(self) -> str:
        steps = f", num_inference_steps={self.num_inference_steps}" if self.num_inference_steps is not None else ""
        return super().__repr__()[:-1] + f", order={self.order}, solver_type={self.solver_type!r}{steps})"

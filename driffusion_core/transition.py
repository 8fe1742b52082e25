r"""The abstract skip transition :math:`S(x, p, t \to s, z)`.

A skip transition jumps from level t straight to any later level s with one prediction,
in closed form. A one-level skip **is** the sampler's step. Operators never call the
model and never draw random numbers (noise is an argument), and they are batched from
the start: ``t_from`` and ``t_to`` may hold one level per row, so K drafts of a batch of B
are K*B rows of a single call.

A *draft* of level a+j from the anchor (x_a, p_a) is the serial chain of j steps with the
anchor's prediction frozen (converted at the anchor's level) and the same per-step noise
z_a .. z_{a+j-1}; :meth:`SkipTransition.drafts` computes all of them in one call, in closed form.
Deterministic transitions (DDIM at eta = 0, flow) compose exactly, so a draft is the skip
``S(x_a, p_a, t_a -> t_to[a+j-1])`` with (x0_hat, eps_hat) frozen. Stochastic ones (DDPM, DDIM at
eta > 0) take the serial step itself as the first draft, :math:`x_{a+1} = S(x_a, p_a, t_a \to t_{a+1}, z_a)`
(with the model's own eps_hat), and unroll the rest of the chain with x0_hat frozen,
:math:`x_{k+1} = A_k \hat x_0 + B_k x_k + s_k z_k`, from it: draft j >= 1 is
:math:`\tilde A_j \hat x_0 + \tilde B_j x_{a+1} + \sum_{k \le j} W_{jk} z_{a+k}`, with the chain factors of
steps a+1 .. a+j (:func:`~driffusion_core.coefficients.chain_draft_coefficients`), pathwise the chain, whatever the
multi-level skip's own variance (DDIM's big skip at 0 < eta < 1 and DDPM's fixed_large one are not
the chain).
"""
from __future__ import annotations

import abc
import contextlib
import math
import warnings
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

from driffusion_core import coefficients as C
from driffusion_core.errors import (
    DeviceMismatchError, InvalidArgumentError, InvalidTimestepsError, MeanStepWarning, as_count, as_flag,
)
from driffusion_core.grid import TimeGrid, first_step_below_next, refuse_bool_or_complex
from driffusion_core.parameterization import (
    Prediction, X0Transform, cast_coef, check_prediction, check_x0_transform, to_x0_eps, upcast,
)
from driffusion_core.schedules import Schedule

__all__ = ["SkipTransition", "History", "as_levels", "check_transition", "repeat_rows", "zero_length_identity"]

Levels = Union[float, int, torch.Tensor]
History = Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""A multistep transition's earlier steps, oldest first: ``(x_i, p_i, t_i)``, a state, the model's prediction
there and its level ``t_from[i]`` (what :meth:`SkipTransition.remember` keeps and :meth:`SkipTransition.multistep`
combines)."""


def _refuse_bool_levels(t: Any, what: str) -> None:
    """Refuse an operator's levels given as booleans or complex numbers, naming the argument."""
    refuse_bool_or_complex(t, what, "noise levels, e.g. grid.t_from[i] and grid.t_to[i]", "")


def as_levels(t: Levels, batch: int, what: str = "Levels") -> torch.Tensor:
    """Levels as a float64 CPU tensor: a 0-d scalar, or one level per row (``Tensor[batch]``; a list,
    tuple or numpy array of per-row levels is taken too). Booleans and complex numbers are refused
    (``what`` names the argument in the error)."""
    if isinstance(t, torch.Tensor):
        if t.dtype == torch.bool or t.is_complex():
            _refuse_bool_levels(t, what)
        t = t.detach().to("cpu", torch.float64)
    else:
        _refuse_bool_levels(t, what)
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentError(
                f"Levels must be numbers: a float, or a tensor or list with one level per row, got {t!r}."
            ) from None
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise InvalidArgumentError(
            f"Levels must be a scalar or hold one level per row ({batch}), got shape {tuple(t.shape)}."
        )
    return t[0] if t.dim() == 1 and t.shape[0] == 1 and batch != 1 else t


def _require_like(v: Any, shape: Sequence[int], x: torch.Tensor, who: str, what: str, hint: str) -> None:
    """``v`` a tensor of ``shape`` in x's dtype and device, else an error saying which and why."""
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(shape):
        got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise InvalidArgumentError(f"{who}: {what} must have shape {tuple(shape)}, got {got} ({hint}).")
    if v.dtype != x.dtype or v.device != x.device:
        raise DeviceMismatchError(
            f"{who}: {what} is {v.dtype} on {v.device} but x is {x.dtype} on {x.device}; give both in one dtype "
            f"and device (the result is in x's)."
        )


def _first_moving_step(t_from: torch.Tensor, t_to: torch.Tensor, flag: torch.Tensor) -> Optional[Tuple[float, float, str]]:
    """``(t_from, t_to, " (row i)")`` of the first step of nonzero length where ``flag`` (levels broadcast
    like the steps) holds, or None."""
    moving = torch.broadcast_to(t_to != t_from, torch.broadcast_shapes(t_from.shape, t_to.shape))
    hit = torch.broadcast_to(flag, moving.shape) & moving
    if not bool(hit.any()):
        return None
    i = int(torch.nonzero(hit.reshape(-1))[0])
    pick = lambda t: torch.broadcast_to(t, hit.shape).reshape(-1)[i].item()  # noqa: E731
    return pick(t_from), pick(t_to), (f" (row {i})" if hit.dim() else "")


class SkipTransition(abc.ABC):
    """A closed-form jump ``S(x, pred, t_from -> t_to, noise)`` between noise levels.

    Subclasses set the class attributes and implement :meth:`__call__` (and, if stochastic,
    :meth:`chain_factors`).

    Attributes:
        stochastic: whether the step adds noise (then the sampler passes per-step noise).
        composes_exactly: whether ``S(S(x,p,t->s),p,s->u) == S(x,p,t->u)`` for a frozen prediction.
            Descriptive: a deterministic transition's drafts are its skips from the anchor
            (:meth:`drafts`), which DRiffusion defines them to be; when this is True they also equal the
            chain of serial steps with the prediction frozen. A custom deterministic step that does not
            compose (say ``x + h v (1 - h)``) still drafts with its own big skip; override
            :meth:`drafts` to draft along the chain instead.
        history: how many earlier steps a step may combine with its own prediction (0 for one-step
            samplers; 1 for a second-order multistep solver such as DPM-Solver++ 2M, which then
            implements :meth:`history_at` and :meth:`multistep`).
        schedule: the noise schedule.
        prediction: what the predictor returns.
        x0_transform: optional clipping / thresholding of x0_hat.
    """

    stochastic: bool = False
    composes_exactly: bool = False
    history: int = 0

    def __init__(
        self,
        schedule: Schedule,
        prediction: Union[str, Prediction] = "epsilon",
        x0_transform: Optional[X0Transform] = None,
        recompute_eps: bool = False,
    ):
        if not isinstance(schedule, Schedule):
            raise InvalidArgumentError(
                f"schedule must be a Schedule (VPSchedule, FlowSchedule, solvers.VESchedule), got {type(schedule).__name__}."
            )
        self.schedule = schedule
        self.prediction = prediction  # parsed and checked against the schedule (__setattr__)
        self.x0_transform = x0_transform
        self.recompute_eps = as_flag(recompute_eps, "recompute_eps")

    # ----------------------------------------------------------------- the operator
    @abc.abstractmethod
    def __call__(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        t_from: Levels,
        t_to: Levels,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Jump from level ``t_from`` to level ``t_to``.

        Arguments:
            x: ``Tensor[B, ...]``, the state at ``t_from``.
            pred: ``Tensor[B, ...]``, the model output at (x, t_from).
            t_from, t_to: levels, scalars or ``Tensor[B]`` (one per row).
            noise: ``Tensor[B, ...]`` standard normal, for stochastic transitions; ``None``
                gives the mean of the jump.

        Returns:
            ``Tensor[B, ...]``, the state at ``t_to``, in x's dtype.
        """

    # ----------------------------------------------------------------- multistep solvers
    def history_at(self, grid: TimeGrid, i: int) -> int:
        """How many earlier steps step ``i`` of ``grid`` combines (0: the one-step :meth:`__call__`).

        At most ``min(i, self.history)``: a multistep solver starts at first order and may drop back to
        it at the end of the grid (diffusers' ``lower_order_final``).
        """
        return 0

    def multistep(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        t_from: Levels,
        t_to: Levels,
        history: History,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The step from ``t_from`` to ``t_to`` that also uses the earlier steps' ``history``
        (``(x_i, p_i, t_from[i])``, oldest first, as many as :meth:`history_at` asked for)."""
        raise NotImplementedError(f"{type(self).__name__} is a one-step transition; it has no multistep update.")

    def remember(self, history: History, x: torch.Tensor, pred: torch.Tensor, level: torch.Tensor) -> list:
        """``history`` with step ``(x, pred, level)`` appended, keeping the last :attr:`history` steps
        (empty for a one-step transition): what the next :meth:`grid_step` combines."""
        return (list(history) + [(x, pred, level)])[-self.history :] if self.history else []

    def grid_step(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        grid: TimeGrid,
        i: int,
        history: History = (),
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Step ``i`` of ``grid``, as a serial sampler takes it: ``S(x_i, p_i, t_from[i] -> t_to[i], z_i)``,
        or the :meth:`multistep` update where :meth:`history_at` asks for earlier steps (``history``
        holds at least that many, oldest first)."""
        try:
            i = as_count(i, "i", 0, len(grid) - 1)
        except InvalidArgumentError:
            raise InvalidArgumentError(
                f"{type(self).__name__}.grid_step: i must be a step index 0..{len(grid) - 1} of this {len(grid)}-step "
                f"grid, got {i!r}."
            ) from None
        h = self.history_at(grid, i) if self.history else 0
        if h:
            return self.multistep(x, pred, grid.t_from[i], grid.t_to[i], list(history)[-h:], noise)
        return self(x, pred, grid.t_from[i], grid.t_to[i], noise)

    def to_x0_eps(
        self, x: torch.Tensor, pred: torch.Tensor, t: Levels, alpha_sigma: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) of a model output at level t (with the x0 transform applied).

        ``alpha_sigma``: the interpolant's (alpha, sigma) at t, when the caller has them already.
        """
        alpha, sigma = alpha_sigma if alpha_sigma is not None else self._alpha_sigma(as_levels(t, x.shape[0]))
        return to_x0_eps(self.prediction, x, pred, alpha, sigma, self.x0_transform, self.recompute_eps)

    def _alpha_sigma(self, levels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``self.schedule.alpha_sigma(levels)`` (float64 CPU levels), remembered per level like :meth:`cached`'s
        values (scalars, or up to :attr:`_CACHE_ROWS` per-row levels): a stochastic window's drafts convert the
        anchor's prediction at its level in every round, and the conversion coefficients
        (:func:`~driffusion_core.parameterization.to_x0_eps`) are then remembered on the same alpha too. The
        values are the schedule's own (computed on a copy of the levels, which the interpolant may return as
        sigma), so results are bit for bit those without the memo; a level the schedule refuses raises every
        time (nothing is kept)."""
        if levels.numel() > self._CACHE_ROWS:
            return self.schedule.alpha_sigma(levels)
        key = ("alpha_sigma", tuple(levels.shape), levels.numpy().tobytes())
        make = lambda: self.schedule.alpha_sigma(levels.clone())  # noqa: E731
        return self._memo(key, make, rows=True) if levels.dim() else self._memo(key, make)

    # ----------------------------------------------------------------- coefficient cache
    _CACHE_SIZE = 4096  # entries for scalar steps and windows (a few small tensors each)
    _CACHE_ROWS = 1024  # per-row levels up to this many rows are cached too ...
    _CACHE_ROW_ENTRIES = 256  # ... in at most this many entries (about 56 KB each at 1024 rows)

    def __setattr__(self, name: str, value: Any) -> None:
        # the cache holds values computed from the public settings (eta, variance_type, schedule, ...):
        # changing one starts a fresh cache (a shallow copy then no longer shares it either)
        if name == "prediction":  # a later change is checked as the constructor's argument is
            value = Prediction.parse(value)
            check_prediction(self.__dict__.get("schedule"), value, type(self).__name__)
        elif name == "x0_transform":  # likewise: a callable or None, refused here rather than at the first step
            check_x0_transform(value)
        object.__setattr__(self, name, value)
        if not name.startswith("_"):
            self.__dict__.pop("_coefficient_cache", None)

    def __getstate__(self) -> dict:
        # a pickle or deepcopy carries no coefficient cache: its token (tensor identities) would not match in
        # the copy, which would discard it at its first step, after paying to copy up to megabytes of it
        state = self.__dict__.copy()
        state.pop("_coefficient_cache", None)
        return state

    # ----------------------------------------------------------------- argument checks
    def operands(self, x: torch.Tensor, pred: torch.Tensor, t_from: Levels, t_to: Levels,
                 noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Check an operator call's tensors and return its levels (:func:`as_levels`).

        ``x`` a floating ``Tensor[B, ...]``; ``pred`` and ``noise`` shaped like it, same dtype and device
        (torch would otherwise promote a float64 prediction or broadcast a row of noise silently). The
        levels are checked where their coefficients are computed and cached (:meth:`check_levels`: once per
        pair of levels, every call for more than :attr:`_CACHE_ROWS` per-row levels). A stochastic transition
        without ``noise`` warns once (:class:`~driffusion_core.MeanStepWarning`: the step is its mean)."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or not isinstance(pred, torch.Tensor):
            raise InvalidArgumentError(
                f"{name}: x and pred must be tensors, got {type(x).__name__} and {type(pred).__name__}."
            )
        if not x.is_floating_point() or x.dim() < 1:
            raise InvalidArgumentError(
                f"{name}: x must be a floating tensor [B, ...] with a batch dimension, got {x.dtype} of shape "
                f"{tuple(x.shape)}."
            )
        for what, v in (("pred", pred), ("noise", noise)):
            if v is not None:
                _require_like(v, x.shape, x, name, what, f"shaped like x: one {what} per element of x; a row would "
                              f"be broadcast over the batch")
        b = x.shape[0]
        levels = as_levels(t_from, b, f"{name}: t_from"), as_levels(t_to, b, f"{name}: t_to")
        # (not for a call about to be refused for going up in noise: the one warning would be spent on it)
        if noise is None and self.stochastic and not self.__dict__.get("_warned_mean_step", False) \
                and bool((levels[1] <= levels[0]).all()):
            self._warn_mean_step("noise", "torch.randn_like(x)", "NoiseSource(seed)(i, x.shape, x.dtype)",
                                 "torch.zeros_like(x)", stacklevel=4)
        return levels

    def _warn_mean_step(self, what: str, random: str, source: str, zeros: str, stacklevel: int) -> None:
        """Warn once per transition that a stochastic step without noise is its mean (in a hand-written loop
        a forgotten ``noise=`` would silently give the posterior mean at every step)."""
        if not self.stochastic or self.__dict__.get("_warned_mean_step", False):
            return
        object.__setattr__(self, "_warned_mean_step", True)
        warnings.warn(
            f"{type(self).__name__} is stochastic but was called without {what}: the step returns its mean, not a "
            f"sample (samples made so lose their spread). Pass {what}={random}, or the samplers' {source}; "
            f"{what}={zeros} takes the mean on purpose. (Warned once per transition.)",
            MeanStepWarning,
            stacklevel=stacklevel,
        )

    def check_window(self, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor,
                     noises: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """A window for :meth:`drafts`: ``t_from`` and ``t_to`` 1-D of one length n >= 1, and ``noises``
        (if given) ``Tensor[n, *x.shape]`` in x's dtype and device. Returns the levels as float64 CPU tensors
        (levels on a GPU, or of another dtype, are taken as a grid's are)."""
        name = type(self).__name__
        if not (isinstance(t_from, torch.Tensor) and isinstance(t_to, torch.Tensor)) or t_from.dim() != 1 \
                or t_to.shape != t_from.shape or t_from.shape[0] < 1:
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (t_from, t_to)]
            raise InvalidArgumentError(
                f"{name}.drafts: t_from and t_to must be 1-D tensors of the window's n >= 1 levels, got {shapes[0]} "
                f"and {shapes[1]} (e.g. grid.t_from[a:a + n], grid.t_to[a:a + n])."
            )
        if noises is not None:
            _require_like(noises, (t_from.shape[0], *x.shape), x, f"{name}.drafts", "noises",
                          "one noise per step of the window, e.g. NoiseSource.steps(a, a + n, x.shape)")
        else:
            self._warn_mean_step("noises", "torch.randn(n, *x.shape)", "NoiseSource(seed).steps(a, a + n, x.shape, x.dtype)",
                                 "torch.zeros(n, *x.shape)", stacklevel=4)
        for label, t in (("t_from", t_from), ("t_to", t_to)):
            if t.dtype == torch.bool or t.is_complex():
                _refuse_bool_levels(t, f"{name}.drafts: {label}")
        # levels are float64 on the CPU, where the coefficients are computed and cached (a grid's are)
        t_from, t_to = t_from.detach().to("cpu", torch.float64), t_to.detach().to("cpu", torch.float64)
        j = first_step_below_next(t_from, t_to)
        if j is not None:
            raise InvalidTimestepsError(
                f"{name}.drafts: step {j} of the window goes to level {t_to[j].item():g}, below level "
                f"{t_from[j + 1].item():g} where step {j + 1} starts; a window is consecutive steps of a grid "
                f"(grid.t_from[a:a + n], grid.t_to[a:a + n]), each landing at or above the next one's level."
            )
        return t_from, t_to

    def check_levels(self, t_from: torch.Tensor, t_to: torch.Tensor, t_prev: Optional[torch.Tensor] = None) -> None:
        """Refuse levels a skip cannot take: NaN or inf, outside the schedule's range, going back to a
        noisier level (``t_to > t_from``; equal levels are the identity), or leaving a level where sigma = 0
        (unless :meth:`steps_from_sigma_zero`). ``t_prev``: a multistep's previous level, which must lie
        strictly above ``t_from`` (the multistep divides by the previous step's length)."""
        name = type(self).__name__
        named = [("t_from", t_from), ("t_to", t_to)] + ([("the previous level", t_prev)] if t_prev is not None else [])
        for label, t in named:
            if not bool(torch.isfinite(t).all()):
                raise InvalidTimestepsError(f"{name}: {label} holds NaN or inf: {t.tolist()}.")
        try:
            lo, hi = self.schedule.level_range()
        except NotImplementedError:  # a custom schedule without a declared range
            lo, hi = -math.inf, math.inf
        for label, t in named:
            bad = (t < lo) | (t > hi)
            if bool(bad.any()):
                v = t.reshape(-1)[int(torch.nonzero(bad.reshape(-1))[0])].item()
                raise InvalidTimestepsError(
                    f"{name}: {label} = {v:g} is out of range for {type(self.schedule).__name__}: levels lie in "
                    f"[{lo:g}, {hi:g}] (the clean end is {lo:g})."
                )
        pairs = [("t_from", t_from, "t_to", t_to)]
        if t_prev is not None:
            pairs.insert(0, ("the previous level", t_prev, "t_from", t_from))
        for a_name, a, b_name, b in pairs:
            strict = a_name == "the previous level"
            back = torch.broadcast_to(b >= a if strict else b > a, torch.broadcast_shapes(a.shape, b.shape))
            if bool(back.any()):
                i = int(torch.nonzero(back.reshape(-1))[0])
                av = torch.broadcast_to(a, back.shape).reshape(-1)[i].item()
                bv = torch.broadcast_to(b, back.shape).reshape(-1)[i].item()
                row = f" (row {i})" if back.dim() else ""
                if strict and bv == av:
                    raise InvalidTimestepsError(
                        f"{name}: t_from = {bv:g} equals the previous level {av:g}{row}, so it does not lie below it; "
                        f"a multistep combines the previous step, from a noisier level, and divides by its length (0 here). "
                        f"Pass history = the steps before t_from, oldest first."
                    )
                raise InvalidTimestepsError(
                    f"{name}: {b_name} = {bv:g} lies above {a_name} = {av:g}{row}; a skip goes from a noisier level "
                    f"to a cleaner one ({b_name} <= {a_name}, equal levels being the identity)."
                )
        if not self.steps_from_sigma_zero():
            hit = _first_moving_step(t_from, t_to, self.schedule.alpha_sigma(t_from)[1] <= 0)
            if hit is not None:
                a, _, row = hit
                raise InvalidTimestepsError(
                    f"{name}: t_from = {a:g}{row} has sigma = 0 (alpha-bar = 1, e.g. a table whose first beta is 0): "
                    f"the state is already clean there, and this step divides by sigma. End at that level instead "
                    f"of leaving it."
                )
        if not self.steps_within_pure_noise():
            hit = _first_moving_step(t_from, t_to, self.schedule.alpha_sigma(t_to)[0] <= 0)
            if hit is not None:
                a, b, row = hit
                raise InvalidTimestepsError(self._pure_noise_message(f"the step from t_from = {a:g} to t_to = {b:g}{row}"))

    @staticmethod
    def _euler(t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
        """The Euler step's coefficient t_to - t_from (flow and VE steps go through :meth:`cached` with it)."""
        return C.flow_euler_coefficient(t_from, t_to)

    def cached(self, t_from: torch.Tensor, t_to: torch.Tensor, compute: Callable[[torch.Tensor, torch.Tensor], Any]) -> Any:
        """``compute(t_from, t_to)``, remembered per pair of levels (scalars, or up to
        :attr:`_CACHE_ROWS` per-row levels, as a window's drafts have).

        A sampler takes the same steps on every call (and the same step in every batch), so the
        float64 schedule arithmetic of a step or a window of drafts is done once per transition.
        The cached values are the ones ``compute`` returns, so results are bit for bit those
        without the cache. Setting a public attribute of the transition, or changing its schedule
        (``Schedule.cache_token``), starts a fresh cache.
        """
        def make():
            self.check_levels(t_from, t_to)  # once per pair of levels: a cache hit was checked before
            return compute(t_from, t_to)

        if t_from.dim() == 0 and t_to.dim() == 0:
            return self._memo((compute.__name__, t_from.item(), t_to.item()), make)
        if t_from.numel() <= self._CACHE_ROWS and t_to.numel() <= self._CACHE_ROWS:
            return self._memo((compute.__name__, *_levels_key(t_from, t_to)), make, rows=True)
        return make()

    def _memo(self, key, make, rows: bool = False):
        token = self.schedule.cache_token()
        caches = self.__dict__.get("_coefficient_cache")
        if caches is None or caches[0] != token:
            caches = (token, {}, {})
            object.__setattr__(self, "_coefficient_cache", caches)
        cache, limit = (caches[2], self._CACHE_ROW_ENTRIES) if rows else (caches[1], self._CACHE_SIZE)
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= limit:
                cache.clear()
            # normal tensors even when the first sample runs under torch.inference_mode: a later sample that
            # tracks gradients reuses them, and autograd refuses to save inference tensors
            with torch.inference_mode(False):
                hit = cache[key] = make()
        return hit

    # ----------------------------------------------------------------- drafts
    def chain_factors(self, t_from: torch.Tensor, t_to: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-step ``(A_k, B_k, s_k)``, each ``Tensor[n]`` float64, of the one-level chain with x0_hat
        frozen: ``x_{k+1} = A_k x0_hat + B_k x_k + s_k z_k``.

        Only stochastic transitions need it (their drafts are this chain, their coupled noise its noise).
        """
        if self.stochastic:
            raise NotImplementedError(
                f"{type(self).__name__} is stochastic but does not define chain_factors(t_from, t_to) -> (A, B, s): "
                f"its drafts (the one-level chain with x0_hat frozen, x_{{k+1}} = A_k x0_hat + B_k x_k + s_k z_k) "
                f"and their coupled noise are built from them. Implement it (float64 tensors of one entry per "
                f"step; see DDPMSkip.chain_factors), or use width 1 (the serial sampler needs only the step)."
            )
        raise NotImplementedError(f"{type(self).__name__} is deterministic; it has no chain noise.")

    def coupled_noise(self, t_from: torch.Tensor, t_to: torch.Tensor, noises: torch.Tensor) -> torch.Tensor:
        """Unit noise for a skip over a window, coupled to the chain's per-step noise.

        ``noises[k]`` is z_{a+k}; returns ``Tensor[n, B, ...]`` whose row j is
        :math:`\\sum_{k \\le j} w_{jk} z_k / \\|w_j\\|` (row 0 is z_a itself, bit for bit): the noise
        the chain accumulates over steps 0..j, normalised. :meth:`skip` gives it to the one big step.
        """
        n = noises.shape[0]
        u = self._memo(("coupling", *_levels_key(t_from, t_to)), lambda: self._coupling(t_from, t_to))
        (flat,) = upcast(noises.reshape(n, -1))  # float16 / bfloat16: in float32, cast once
        with full_precision(flat.device):
            out = (u.to(device=flat.device, dtype=flat.dtype) @ flat).reshape(noises.shape).to(noises.dtype)
        out[0] = noises[0]
        return out

    def _coupling(self, t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
        """The lower-triangular ``[n, n]`` float64 matrix of :meth:`coupled_noise`: row j is w_j / |w_j|."""
        _, _, W = self._chain(t_from, t_to)
        norms = torch.linalg.vector_norm(W, dim=1, keepdim=True)
        u = W / torch.where(norms > 0, norms, torch.ones_like(norms))  # a noiseless row stays 0 ...
        zero = (norms[:, 0] == 0).nonzero().flatten()
        u[zero, zero] = 1.0  # ... and passes its own step's noise on (its std is 0 anyway)
        return u

    def _chain(self, t_from: torch.Tensor, t_to: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A~ [n], B~ [n], W [n, n]) of the window's chain, float64, remembered per window."""

        def make():
            from driffusion_core.coefficients import chain_draft_coefficients

            self.check_levels(t_from, t_to)
            A, B, s = self.chain_factors(t_from, t_to)
            A, B, s = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (A, B, s))
            At, Bt, W = chain_draft_coefficients(A, B, s)  # tensors: one vector multiply per row
            n = len(At)
            mat = torch.zeros(n, n, dtype=torch.float64)
            for j, row in enumerate(W):
                mat[j, : j + 1] = row
            return torch.stack(At), torch.stack(Bt), mat

        return self._memo(("chain", *_levels_key(t_from, t_to)), make)

    def skip(self, x: torch.Tensor, pred: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor,
             noises: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The one big step over a window, ``S(x, pred, t_from[0] -> t_to[-1], z~)``, its unit noise z~
        coupled to the window's per-step noise (:meth:`coupled_noise`): serial sampling on a coarser grid
        that still sees the fine grid's noise (the step-skipping baseline). One step is the serial step."""
        z = None
        if self.stochastic and noises is not None:
            z = noises[0] if noises.shape[0] == 1 else self.coupled_noise(t_from, t_to, noises)[-1]
        return self(x, pred, t_from[0], t_to[-1], z)

    def drafts(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        t_from: torch.Tensor,
        t_to: torch.Tensor,
        noises: Optional[torch.Tensor] = None,
        history: Optional[History] = None,
    ) -> torch.Tensor:
        """All drafts of a window, in one batched call: the skips from the anchor with its prediction frozen.

        Arguments:
            x, pred: the anchor state and its prediction, ``Tensor[B, ...]``.
            t_from, t_to: ``Tensor[n]``, the levels of the window's n steps (``t_from[0]`` is the anchor's).
            noises: ``Tensor[n, B, ...]``, the per-step noise z_a .. z_{a+n-1} (stochastic only; without
                it a stochastic transition gives the chain's mean).
            history: for multistep transitions, the earlier steps the anchor's own step combines
                (:meth:`history_at`); a one-step transition takes none.

        Returns:
            ``Tensor[n, B, ...]``; row j is the state after j+1 steps with the prediction frozen.
            Row 0 equals the serial step ``S(x, pred, t_from[0], t_to[0], z_a)`` bit for bit.

        A deterministic transition's row j is the skip ``S(x, pred, t_from[0] -> t_to[j])``: the state the
        frozen pair (x0_hat, eps_hat) put at level ``t_to[j]``. On a contiguous grid, for a transition that
        composes exactly (:attr:`composes_exactly`: DDIM at eta = 0, flow Euler, VE), that is the
        chain of steps; on a grid whose steps do not join (``t_to[k] != t_from[k+1]``, diffusers' DDIM
        stride) it is still the frozen pair's state at ``t_to[j]`` (DDIM's chain with the pair frozen, whose
        step does not depend on the state), not a chain of Euler steps each restarted at ``t_from[k]``.
        """
        if history:
            if not self.history:
                raise InvalidArgumentError(
                    f"{type(self).__name__} is a one-step transition (history = 0): its drafts take no history."
                )
            raise NotImplementedError(
                f"{type(self).__name__} is multistep (history = {self.history}): it must implement "
                f"drafts(..., history=...)."
            )
        t_from, t_to = self.check_window(x, t_from, t_to, noises)
        n, b = int(t_from.shape[0]), x.shape[0]
        if not self.stochastic:  # composes exactly: the skips from the anchor, one batched call
            if n == 1:
                return self(x, pred, t_from[0], t_to[0], None).unsqueeze(0)
            src = t_from[0].expand(n * b)
            dst = t_to.to(torch.float64).repeat_interleave(b)
            return self(repeat_rows(x, n), repeat_rows(pred, n), src, dst, None).reshape(n, *x.shape)
        # row 0 is the serial step itself (with the model's own prediction: its eps_hat need not be the one
        # re-derived from x0_hat, e.g. under clipping without recompute_eps); rows 1.. continue from it along
        # the chain with x0_hat frozen, unrolled: A~_j x0_hat + B~_j x_{a+1} + sum_k W_jk z_{a+1+k}
        out = torch.empty(n, *x.shape, dtype=x.dtype, device=x.device)
        out[0] = self(x, pred, t_from[0], t_to[0], noises[0] if noises is not None else None)
        if n > 1:
            At, Bt, W = self._chain(t_from[1:], t_to[1:])
            x_up, pred_up, first = upcast(x, pred, out[0])  # float16 / bfloat16: in float32, cast once
            x0_hat, _ = self.to_x0_eps(x_up, pred_up, t_from[0])
            per_draft = lambda c: cast_coef(c, x.device, first.dtype).reshape(n - 1, *([1] * x.dim()))
            rest = per_draft(At) * x0_hat + per_draft(Bt) * first
            if noises is not None:
                (flat,) = upcast(noises[1:].reshape(n - 1, -1))
                with full_precision(flat.device):
                    rest = rest + (cast_coef(W, flat.device, flat.dtype) @ flat).reshape(rest.shape)
            out[1:] = rest
        return out

    # ----------------------------------------------------------------- grids
    def steps_from_sigma_zero(self) -> bool:
        """Whether a step may start at a level with sigma = 0 (alpha-bar = 1) and stay finite; by default not
        (:meth:`make_grid` refuses such a grid). Deterministic DDIM with an epsilon model can: x0_hat = x."""
        return False

    def steps_within_pure_noise(self) -> bool:
        """Whether a step may go to a level where alpha-bar = 0 (pure noise; then it starts at one as well) and
        stay finite; by default yes. DDPM's posterior and DDIM with eta > 0 take alpha-bar_t / alpha-bar_s,
        0 / 0 there (a table whose betas reach 1, or whose alpha-bar underflows to 0 in float64)."""
        return True

    def _pure_noise_message(self, where: str) -> str:
        return (f"{type(self).__name__}: {where} stays at pure noise (alpha-bar = 0 at both levels: betas of 1, or "
                f"an alpha-bar table that underflows to 0), where its step takes alpha-bar_t / alpha-bar_s = 0 / 0. "
                f"Start the grid at the cleanest level where alpha-bar is 0, or below it (deterministic DDIM, eta = 0, "
                f"takes such steps).")

    def make_grid(self, timesteps: Union[TimeGrid, torch.Tensor, list, tuple]) -> TimeGrid:
        """A validated TimeGrid from a TimeGrid or a sequence of decreasing levels.

        Besides the schedule's checks, an epsilon model must not be asked for x0_hat where alpha = 0
        (zero terminal SNR, or sigma = 1 in flow matching): :math:`\\hat x_0 = (x - \\sigma\\hat\\epsilon)/\\alpha`.
        """
        grid = self.schedule.grid(timesteps)
        alpha, sigma = self.schedule.alpha_sigma(grid.t_from)
        clean = sigma <= 0
        if bool(clean.any()) and not self.steps_from_sigma_zero():
            i = int(torch.nonzero(clean)[0])
            raise InvalidTimestepsError(
                f"{type(self).__name__}: step {i} starts at level {grid.t_from[i].item():g}, where sigma = 0 (alpha-bar "
                f"= 1, e.g. a table whose first beta is 0): the state is already clean there, and this step divides "
                f"by sigma (eps_hat = (x - alpha x0_hat) / sigma, the DDPM posterior variance, the log-SNR step). End "
                f"the grid with the step *to* that level, or use a table whose betas are positive."
            )
        if not self.steps_within_pure_noise():
            pure = self.schedule.alpha_sigma(grid.t_to)[0] <= 0
            if bool(pure.any()):
                i = int(torch.nonzero(pure)[0])
                raise InvalidTimestepsError(self._pure_noise_message(
                    f"step {i}, from level {grid.t_from[i].item():g} to {grid.t_to[i].item():g},"))
        if self.prediction is Prediction.EPSILON:
            bad = alpha <= 0
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                raise InvalidArgumentError(
                    f"{type(self).__name__}: an epsilon-prediction model cannot give x0_hat at step {i} (level "
                    f"{grid.t_from[i].item():g}), where alpha = 0 (zero terminal SNR, or sigma = 1 in flow "
                    f"matching): x0_hat = (x - sigma * eps) / 0. Use a v_prediction, sample or velocity model "
                    f"(zero-terminal-SNR schedules are meant for v_prediction), or start the grid below that level."
                )
        return grid

    def __repr__(self) -> str:
        extra = f", x0_transform={self.x0_transform!r}" if self.x0_transform is not None else ""
        return f"{type(self).__name__}({self.schedule!r}, prediction={self.prediction.value!r}{extra})"


def repeat_rows(v: torch.Tensor, n: int) -> torch.Tensor:
    """``Tensor[B, ...]`` -> ``Tensor[n * B, ...]``: n copies of the batch, one per draft (as per-row levels)."""
    return v.unsqueeze(0).expand(n, *v.shape).reshape(n * v.shape[0], *v.shape[1:])


def full_precision(device: torch.device):
    """A context in which the library's own matmuls keep the state's dtype: a caller's ``torch.autocast``
    (common around a diffusers model) would run them in float16 / bfloat16 (float64 coefficients)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except Exception:  # noqa: BLE001 - a device type autocast does not know: nothing to switch off
        return contextlib.nullcontext()


def _levels_key(t_from: torch.Tensor, t_to: torch.Tensor) -> tuple:
    """A cache key for float64 CPU levels (scalars or per-row): their shapes and bytes."""
    return (tuple(t_from.shape), t_from.numpy().tobytes(), tuple(t_to.shape), t_to.numpy().tobytes())


def zero_length_identity(out: torch.Tensor, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
    """Rows whose skip has zero length (t_from == t_to) return x itself, exactly."""
    if t_from.dim() == 0 and t_to.dim() == 0:  # one level each (a serial step): compared as Python floats
        return x.clone() if t_from.item() == t_to.item() else out
    same = t_from == t_to
    if not bool(same.any()):
        return out
    if same.dim() == 0:
        return x.clone()
    return torch.where(same.to(x.device).reshape(-1, *([1] * (x.dim() - 1))), x, out)


def check_transition(transition: Any, call: str) -> None:
    """Refuse anything but a :class:`SkipTransition` as ``transition``, naming the call's argument order
    (``call``, e.g. ``"sample_serial(predictor, x, transition, timesteps)"``) when a grid, a schedule or a
    list of levels came in its place: the samplers take their arguments in different orders."""
    if isinstance(transition, SkipTransition):
        return
    from driffusion_core.schedules import Schedule  # (the schedules module does not import this one)

    swapped = ""
    if isinstance(transition, (TimeGrid, Schedule, list, tuple, torch.Tensor)):
        swapped = (f" A {type(transition).__name__} in its place: check the argument order, {call}; a schedule "
                   f"goes into the transition, solvers.DDIMSkip(schedule), and its timesteps(...) into timesteps.")
    raise InvalidArgumentError(
        f"transition must be a SkipTransition (e.g. solvers.DDIMSkip(schedule)), got {type(transition).__name__}."
        + swapped
    )

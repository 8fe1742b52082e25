r"""Noise schedules: variance-preserving (DDPM/DDIM) and flow matching.

Key (DDPM / DDIM / rectified flow):

* VP: :math:`x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t}\epsilon`, t a training
  timestep in ``[0, N-1]``; level ``-1`` is the clean end with :math:`\bar\alpha = ` ``final_alpha_cumprod``.
  Fractional t interpolates the log-SNR :math:`\lambda = \log\frac{\bar\alpha}{1-\bar\alpha}` linearly.
* Flow: :math:`x_\sigma = (1-\sigma) x_0 + \sigma\epsilon`, :math:`\sigma \in [0, 1]`; the model is called
  with :math:`\sigma N` as diffusers does.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from driffusion_core import coefficients as C
from driffusion_core.errors import InvalidArgumentError, InvalidTimestepsError, as_count, as_flag, exception_text, is_real
from driffusion_core.grid import TimeGrid, refuse_bool_or_complex

__all__ = ["Schedule", "VPSchedule", "FlowSchedule", "rescale_zero_terminal_snr"]

TimeLike = Union[float, int, torch.Tensor]


def _levels(t: TimeLike) -> torch.Tensor:
    refuse_bool_or_complex(t, "levels", "noise levels (numbers)", "")
    return torch.as_tensor(t, dtype=torch.float64).cpu() if not isinstance(t, torch.Tensor) else t.detach().to("cpu", torch.float64)


def refuse_levels_outside(t: torch.Tensor, lo: float, hi: float, schedule: "Schedule") -> None:
    """Refuse levels that are NaN or outside [lo, hi]: a value there would be extrapolated or clamped,
    a silent wrong answer (typically model times, or another schedule's levels, passed as levels)."""
    bad = torch.isnan(t) | (t < lo) | (t > hi)
    if bool(bad.any()):
        v = t[bad][0].item()
        raise InvalidTimestepsError(
            f"Level {v!r} is outside {type(schedule).__name__}'s levels [{lo:g}, {hi:g}]. Levels above the range "
            f"are usually model times or another schedule's levels: map model times back with "
            f"schedule.level_of_model_time(t), and use the schedule the grid was made with."
        )


def _sigmoid(v: float) -> float:
    """The logistic function on a Python float, without overflow."""
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


class Schedule:
    """Common interface of a schedule: the interpolant at any level, and time grids."""

    #: level of the clean end of the grid
    terminal_level: float = 0.0
    #: what a level means (``TimeGrid.kind`` of the grids this schedule makes)
    kind: str = ""
    #: the model parameterizations (``Prediction`` values) this interpolant defines; None: not checked
    predictions: Optional[Tuple[str, ...]] = None

    def alpha_sigma(self, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Interpolant coefficients (float64) at level(s) t: :math:`x_t = \\alpha x_0 + \\sigma\\epsilon`."""
        raise NotImplementedError

    def __setattr__(self, name: str, value: Any) -> None:
        # every attribute set counts (``_generation``, part of the cache token): a new tensor may reuse the id
        # of the one it replaced once that is freed, so identity and version alone would not show the change
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_generation", self.__dict__.get("_generation", 0) + 1)

    def cache_token(self) -> tuple:
        """What the values a transition caches depend on; when it changes (an attribute set, a table
        edited in place), transitions recompute. Default: every attribute, tensors by identity and
        in-place version, and the count of attribute sets."""
        return tuple(
            (k, (id(v), v._version) if isinstance(v, torch.Tensor) else v) for k, v in sorted(vars(self).items())
        )

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the predictor is called with at level(s) t."""
        raise NotImplementedError

    def level_range(self) -> Tuple[float, float]:
        """(lowest, highest) level a grid may use; the lowest is the clean end."""
        raise NotImplementedError

    def level_of_model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`model_time`: the level (float64) a model time stands for."""
        raise NotImplementedError

    def grid(self, levels: Union[Sequence[float], torch.Tensor, TimeGrid]) -> TimeGrid:
        """A validated grid from explicit levels or a TimeGrid.

        Levels are the ones the model is evaluated at, noisiest first, strictly decreasing and all above the
        clean end: the grid adds the last step, to the clean end, itself (a trailing clean level is refused,
        saying so; k-diffusion's sigmas with their trailing 0 go to ``sample_driffusion``, which drops it).

        A TimeGrid whose model times were not given (``TimeGrid.from_levels(levels, final)``,
        ``model_times_from_schedule``) gets this schedule's model times (:meth:`model_time`) and kind,
        as a plain list of the same levels does; explicit model times are kept as they are.
        """
        if isinstance(levels, TimeGrid):
            g = levels
            if g.model_times_from_schedule:
                self.validate(g)
                return dataclasses.replace(
                    g, model_times=self.model_time(g.t_from), kind=self.kind if g.kind is None else g.kind,
                    model_times_from_schedule=False,
                )
        else:
            refuse_bool_or_complex(levels, "Timesteps")
            try:
                # levels on a GPU (diffusers' set_timesteps(..., device="cuda")) come to the CPU, where grids live
                given = torch.as_tensor(levels.detach() if isinstance(levels, torch.Tensor) else levels,
                                        dtype=torch.float64, device="cpu")
            except Exception as e:  # a generator, strings, ragged lists, ...
                raise InvalidTimestepsError(
                    f"Timesteps must be a 1-D sequence of numbers (a list, tuple, numpy array or tensor of "
                    f"levels, noisiest first), got {type(levels).__name__} {reprlib.repr(levels)} ({exception_text(e)})."
                ) from e
            if given.dim() == 0:
                v = given.item()
                steps = (f"For a grid of that many steps pass transition.schedule.timesteps({int(v)}); "
                         if v >= 1 and v == int(v) else "")
                raise InvalidTimestepsError(
                    f"Timesteps must be a 1-D sequence of levels, got the single number {v!r}. {steps}For a "
                    f"one-step grid from that level pass a list of one level, [{v!r}]."
                )
            if given.dim() > 1:
                raise InvalidTimestepsError(
                    f"Timesteps must be a 1-D sequence of levels, got shape {tuple(given.shape)}; pass one "
                    f"level per step (e.g. [999, 799, ...]), not a batch of grids."
                )
            flat = given.flatten()
            last = flat[-1].item() if flat.numel() else None
            if last is not None and last < self.terminal_level:
                try:
                    span = "; levels lie in [{:g}, {:g}]".format(*self.level_range())
                except NotImplementedError:  # a custom schedule without a declared range
                    span = ""
                raise InvalidTimestepsError(
                    f"The last level {last!r} is out of range: below the clean end "
                    f"({self.terminal_level:g}){span}. Pass the levels the model is evaluated at, noisiest "
                    f"first, all above the clean end (the grid adds the step to it)."
                )
            if last is not None and last == self.terminal_level:
                raise InvalidTimestepsError(
                    f"The last level {last!r} is the clean end. Pass the levels the model is "
                    f"evaluated at; the grid adds the final step to the clean end "
                    f"({self.terminal_level:g}) itself, so drop the trailing {last!r}."
                )
            g = TimeGrid.from_levels(flat, self.terminal_level, self.model_time(flat)).with_kind(self.kind)
        self.validate(g)
        return g

    def _range_hint(self, level: float) -> str:
        """A sentence added to the out-of-range error for ``level`` (subclasses: the likely mix-up)."""
        return ""

    def validate(self, grid: TimeGrid) -> None:
        """Refuse a grid this schedule cannot sample, with an InvalidTimestepsError naming the step: levels of
        another kind of schedule, levels out of :meth:`level_range`, or levels that do not strictly decrease
        (each step must go to a lower noise level). Subclasses add their own checks."""
        if grid.kind is not None and self.kind and grid.kind != self.kind:
            raise InvalidTimestepsError(
                f"This grid holds {grid.kind!r} levels (made by another schedule: kind / number of training "
                f"timesteps), but the transition's schedule is a {type(self).__name__} with {self.kind!r} "
                f"levels: the same numbers mean other noise levels (or model times) there. Make the grid with "
                f"the transition's own schedule, e.g. transition.schedule.timesteps(num_steps)."
            )
        lo, hi = self.level_range()
        for name, v in (("t_from", grid.t_from), ("t_to", grid.t_to)):
            bad = (v < lo) | (v > hi)
            if bad.any():
                i = int(torch.nonzero(bad)[0])
                raise InvalidTimestepsError(
                    f"Level {v[i].item()!r} ({name}[{i}]) is out of range for {type(self).__name__}: "
                    f"levels must lie in [{lo!r}, {hi!r}].{self._range_hint(v[i].item())}"
                )
        if (grid.t_from <= lo).any():
            raise InvalidTimestepsError(
                f"A step starts at the clean end (level {lo:g}); the model is never evaluated there. "
                f"End the grid with a step *to* {lo:g}."
            )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas to zero terminal SNR (Lin et al. 2024, Algorithm 1), as diffusers does."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _check_betas_range(beta_start: Any, beta_end: Any) -> None:
    for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not is_real(v) or not 0 <= v < 1:
            raise InvalidArgumentError(f"{name} must be a number in [0, 1), got {v!r}.")


class VPSchedule(Schedule):
    r"""Variance-preserving schedule given by its :math:`\bar\alpha_t` table (float64).

    Arguments:
        alphas_cumprod: :math:`\bar\alpha_t` for training timesteps t = 0..N-1 (decreasing, in [0, 1]).
        final_alpha_cumprod: :math:`\bar\alpha` at level -1, the clean end (diffusers' DDIM
            ``set_alpha_to_one``: 1.0, else ``alphas_cumprod[0]``; DDPM always uses 1.0).
    """

    terminal_level = -1.0
    predictions = ("epsilon", "sample", "v_prediction")  # v = alpha eps - sigma x0 needs alpha^2 + sigma^2 = 1

    @property
    def kind(self) -> str:
        """``"vp/N"``: levels are training timesteps of an N-step table."""
        return f"vp/{self.num_train_timesteps}"

    def __init__(self, alphas_cumprod: Union[Sequence[float], torch.Tensor], final_alpha_cumprod: float = 1.0):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().flatten().clone()
        if ac.numel() < 2:
            raise InvalidArgumentError("alphas_cumprod needs at least two training timesteps.")
        if not torch.isfinite(ac).all() or (ac < 0).any() or (ac > 1).any():
            raise InvalidArgumentError("alphas_cumprod must be finite and lie in [0, 1].")
        if (ac[1:] > ac[:-1]).any():
            raise InvalidArgumentError("alphas_cumprod must not increase with t (t = 0 is the clean end).")
        if not is_real(final_alpha_cumprod) or not 0 < final_alpha_cumprod <= 1:
            raise InvalidArgumentError(f"final_alpha_cumprod must be a number in (0, 1], got {final_alpha_cumprod!r}.")
        if float(final_alpha_cumprod) < float(ac[0]):
            raise InvalidArgumentError(
                f"final_alpha_cumprod = {float(final_alpha_cumprod)!r} is below alphas_cumprod[0] = {float(ac[0])!r}: the "
                f"clean end (level -1) would be noisier than level 0, and the last step would add noise. Use 1 "
                f"(diffusers' set_alpha_to_one=True) or alphas_cumprod[0] (set_alpha_to_one=False)."
            )
        self.alphas_cumprod = ac
        self.final_alpha_cumprod = float(final_alpha_cumprod)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_betas(cls, betas: Union[Sequence[float], torch.Tensor], final_alpha_cumprod: Optional[float] = 1.0, rescale_betas_zero_snr: bool = False) -> "VPSchedule":
        """From per-step betas; ``final_alpha_cumprod=None`` means ``alphas_cumprod[0]``."""
        rescale_betas_zero_snr = as_flag(rescale_betas_zero_snr, "rescale_betas_zero_snr")
        given = betas
        try:
            # numpy keeps Python floats in float64 (torch.as_tensor would make float32) and bools / complex as such
            raw = betas if isinstance(betas, torch.Tensor) else torch.as_tensor(np.asarray(betas))
            odd = raw.dtype == torch.bool or raw.is_complex() or raw.dim() != 1
            betas = raw if odd else raw.to(torch.float64)
        except Exception as e:
            raise InvalidArgumentError(
                f"betas must be a sequence or tensor of numbers in [0, 1], got {type(betas).__name__} "
                f"{reprlib.repr(betas)} ({exception_text(e)})."
            ) from e
        if odd:
            raise InvalidArgumentError(
                f"betas must be a 1-D sequence or tensor of real numbers in [0, 1], got {raw.dtype} of shape "
                f"{tuple(raw.shape)} ({reprlib.repr(given)})."
            )
        bad = ~torch.isfinite(betas) | (betas < 0) | (betas > 1)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise InvalidArgumentError(
                f"betas must lie in [0, 1] (beta = 1 - alpha-bar_t / alpha-bar_(t-1)), but betas[{i}] = {betas[i].item()!r}."
            )
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
            if not bool(torch.isfinite(betas).all()):
                raise InvalidArgumentError(
                    "rescale_betas_zero_snr=True gives NaN betas here: the rescale divides by sqrt(alpha-bar_0) - "
                    "sqrt(alpha-bar_T), which is 0 when no beta is positive or alpha-bar underflows before the last "
                    "timestep (diffusers gives NaN too). Use betas whose alpha-bar stays positive, or no rescale."
                )
        ac = torch.cumprod(1.0 - betas, dim=0)
        return cls(ac, float(ac[0]) if final_alpha_cumprod is None else final_alpha_cumprod)

    @classmethod
    def linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
        *, final_alpha_cumprod: Optional[float] = 1.0, rescale_betas_zero_snr: bool = False,
    ) -> "VPSchedule":
        """DDPM's linear betas."""
        num_train_timesteps = as_count(num_train_timesteps, "num_train_timesteps", 2)
        _check_betas_range(beta_start, beta_end)
        return cls.from_betas(
            torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64), final_alpha_cumprod=final_alpha_cumprod, rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    @classmethod
    def scaled_linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
        *, final_alpha_cumprod: Optional[float] = 1.0, rescale_betas_zero_snr: bool = False,
    ) -> "VPSchedule":
        """Stable Diffusion's betas: linear in sqrt(beta)."""
        num_train_timesteps = as_count(num_train_timesteps, "num_train_timesteps", 2)
        _check_betas_range(beta_start, beta_end)
        b = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls.from_betas(
            b, final_alpha_cumprod=final_alpha_cumprod, rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    @classmethod
    def squaredcos_cap_v2(
        cls, num_train_timesteps: int = 1000, max_beta: float = 0.999,
        *, final_alpha_cumprod: Optional[float] = 1.0, rescale_betas_zero_snr: bool = False,
    ) -> "VPSchedule":
        """The cosine schedule of Nichol & Dhariwal (2021), betas capped at ``max_beta``."""
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        n = as_count(num_train_timesteps, "num_train_timesteps", 2)
        if not is_real(max_beta) or not 0 < float(max_beta) <= 1:
            raise InvalidArgumentError(f"max_beta must be a number in (0, 1] (diffusers' default 0.999), got {max_beta!r}.")
        max_beta = float(max_beta)
        b = [min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)]
        return cls.from_betas(
            torch.tensor(b, dtype=torch.float64), final_alpha_cumprod=final_alpha_cumprod, rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    def rescaled_zero_terminal_snr(self) -> "VPSchedule":
        """This schedule rescaled to zero terminal SNR (use with v_prediction).

        A clean end at ``alphas_cumprod[0]`` (``final_alpha_cumprod=None``, diffusers' set_alpha_to_one=False)
        stays at the rescaled table's ``alphas_cumprod[0]``, which the rescale's round trip may move by an ulp."""
        ac = self.alphas_cumprod
        betas = 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])
        final = None if self.final_alpha_cumprod == float(ac[0]) else self.final_alpha_cumprod
        return VPSchedule.from_betas(betas, final, rescale_betas_zero_snr=True)

    # ----------------------------------------------------------------- levels
    @property
    def num_train_timesteps(self) -> int:
        """N, the length of the alpha-bar table (levels are its indices 0 .. N - 1)."""
        return int(self.alphas_cumprod.shape[0])

    def level_range(self) -> Tuple[float, float]:
        return -1.0, float(self.num_train_timesteps - 1)

    def alpha_bar(self, t: TimeLike) -> torch.Tensor:
        r""":math:`\bar\alpha_t` (float64) at level(s) t; exact table values at integer t, log-SNR interpolation
        between (linear in alpha-bar next to a zero-terminal-SNR end); levels below 0 are the clean end."""
        t = _levels(t)
        ac = self.alphas_cumprod
        n = ac.shape[0]
        refuse_levels_outside(t, -math.inf, n - 1, self)
        tc = t.clamp(0, n - 1)
        lo = tc.floor().long()
        hi = tc.ceil().long()
        out = ac[lo]
        frac = tc - lo.to(torch.float64)
        if (frac > 0).any():
            lam = torch.log(ac) - torch.log1p(-ac)
            lam_t = lam[lo] + frac * (lam[hi] - lam[lo])
            # sigmoid of each distinct level in Python floats: torch's vectorised and scalar exp differ
            # in the last bit, so a batched torch.sigmoid gives a level different bits alone and in a
            # batch of rows (and per-row drafts would stop matching the serial step bit for bit)
            uniq, inverse = torch.unique(lam_t, return_inverse=True)
            interp = torch.tensor([_sigmoid(v) for v in uniq.tolist()], dtype=torch.float64)[inverse]
            # next to a zero-terminal-SNR end (log-SNR -inf) interpolate alpha-bar linearly instead,
            # or the whole last interval would collapse onto alpha-bar = 0
            interp = torch.where(torch.isfinite(lam_t), interp, (1 - frac) * ac[lo] + frac * ac[hi])
            # rounding may put sigmoid(logit(a)) an ulp outside the table: keep alpha-bar monotone
            interp = torch.minimum(torch.maximum(interp, ac[hi]), ac[lo])
            out = torch.where(frac > 0, interp, out)
        return torch.where(t < 0, torch.full_like(out, self.final_alpha_cumprod), out)

    def alpha_sigma(self, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        return C.vp_alpha_sigma(self.alpha_bar(t))

    def validate(self, grid: TimeGrid) -> None:
        """:meth:`Schedule.validate`, and refuse VP levels that look like sigmas or times in [0, 1] (fractions,
        all at most 1) or steps that start below level 0 (the clean end)."""
        super().validate(grid)
        t = grid.t_from
        if len(grid) >= 2 and self.num_train_timesteps > 2 and bool((t <= 1).all()) and not torch.equal(t, t.round()):
            raise InvalidTimestepsError(
                f"Every level of this grid lies in [0, 1] ({t[0].item():g}, {t[1].item():g}, ...) and some are "
                f"fractions: they look like sigmas or times in [0, 1], but VPSchedule levels are training "
                f"timesteps 0..{self.num_train_timesteps - 1} (alpha-bar's table index). Pass timesteps (e.g. "
                f"schedule.timesteps(num_steps)), or levels * {self.num_train_timesteps - 1}."
            )
        bad = grid.t_from < 0
        if bad.any():
            i = int(torch.nonzero(bad)[0])
            raise InvalidTimestepsError(
                f"Step {i} starts at level {grid.t_from[i].item():g}, but every VP level below 0 is the clean "
                f"end (alpha-bar = final_alpha_cumprod); steps start at levels in "
                f"[0, {self.num_train_timesteps - 1}]. End the grid with a step *to* -1."
            )

    def level_of_model_time(self, t: torch.Tensor) -> torch.Tensor:
        return _levels(t)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if torch.equal(t, t.round()):
            return t.round().long()
        return t.to(torch.float32)

    # ----------------------------------------------------------------- grids
    def timesteps(
        self,
        num_steps: int,
        spacing: str = "leading",
        steps_offset: int = 0,
        step_to: str = "next",
    ) -> TimeGrid:
        """The time grid diffusers' DDIM/DDPM schedulers use for ``num_steps`` inference steps.

        Arguments:
            num_steps: number of model calls T.
            spacing: ``"leading"``, ``"trailing"`` or ``"linspace"`` (diffusers' ``timestep_spacing``).
            steps_offset: added to every timestep with leading spacing (diffusers' ``steps_offset``).
            step_to: ``"next"`` steps to the next listed timestep (DDPM); ``"stride"`` steps to
                ``t - N // num_steps`` as diffusers' DDIM does, which is not always the next listed one.
        """
        n = self.num_train_timesteps
        num_steps = as_count(num_steps, "num_steps", 1, n, InvalidTimestepsError)
        try:
            steps_offset = as_count(steps_offset, "steps_offset", 0)
        except InvalidArgumentError:
            raise InvalidArgumentError(
                f"steps_offset must be an int >= 0 (diffusers' steps_offset config: 0, or 1 for Stable Diffusion), "
                f"added to every timestep with leading spacing; got {steps_offset!r}."
            ) from None
        if spacing == "linspace":
            ts = np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = n // num_steps
            ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
            if ts[0] > n - 1:
                raise InvalidArgumentError(
                    f"steps_offset={steps_offset} puts the first of {num_steps} leading timesteps at {ts[0]}, past the "
                    f"last training timestep {n - 1}: with {num_steps} steps steps_offset may be at most "
                    f"{n - 1 - (ts[0] - steps_offset)}."
                )
        elif spacing == "trailing":
            ratio = n / num_steps
            # the first num_steps entries: for some T (1000 training steps: 61, 103, ...) np.arange rounds up
            # to one more, ending at -1 (diffusers then runs T + 1 steps; from_diffusers refuses those T)
            ts = (np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1)[:num_steps]
        else:
            raise InvalidArgumentError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}.")
        t_from = torch.tensor(ts, dtype=torch.float64)
        if step_to == "next":
            t_to = torch.cat([t_from[1:], torch.tensor([-1.0], dtype=torch.float64)])
        elif step_to == "stride":
            t_to = (t_from - (n // num_steps)).clamp(min=-1.0)
        else:
            raise InvalidArgumentError(f"step_to must be 'next' or 'stride', got {step_to!r}.")
        grid = TimeGrid(t_from, t_to, self.model_time(t_from), self.kind)
        self.validate(grid)
        return grid

    def __repr__(self) -> str:
        zsnr = ", zero terminal SNR" if float(self.alphas_cumprod[-1]) == 0.0 else ""
        ends = f"alpha_bar {float(self.alphas_cumprod[0]):.6g} .. {float(self.alphas_cumprod[-1]):.4g}"
        return (f"VPSchedule(N={self.num_train_timesteps}, {ends}, final_alpha_cumprod={self.final_alpha_cumprod:g}"
                f"{zsnr})")


class FlowSchedule(Schedule):
    r"""Flow-matching (rectified flow) interpolant :math:`x_\sigma = (1-\sigma)x_0 + \sigma\epsilon` with time shift.

    Arguments:
        shift: the static shift :math:`\sigma \mapsto s\sigma / (1 + (s-1)\sigma)` (SD3 uses 3.0).
        num_train_timesteps: the model is called with :math:`\sigma N`.
        use_dynamic_shifting: shift with :math:`\sigma \mapsto e^\mu / (e^\mu + (1/\sigma - 1))`
            and a per-call ``mu`` (Flux), instead of the static shift.
    """

    terminal_level = 0.0
    predictions = ("velocity", "epsilon", "sample")  # v = eps - x0 needs alpha + sigma = 1

    @property
    def kind(self) -> str:
        """``"flow/N"``: levels are sigmas; the model is called with sigma * N."""
        return f"flow/{self.num_train_timesteps}"

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000, use_dynamic_shifting: bool = False):
        if not is_real(shift) or not 0 < float(shift) < math.inf:
            raise InvalidArgumentError(f"shift must be a positive finite number (SD3 uses 3.0), got {shift!r}.")
        try:
            num_train_timesteps = as_count(num_train_timesteps, "num_train_timesteps", 2)
        except InvalidArgumentError:
            raise InvalidArgumentError(
                f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}. The model is called with "
                f"sigma * num_train_timesteps, as diffusers does; for a model that takes sigma in [0, 1] keep the "
                f"default and wrap it: predictor = lambda x, t, **c: model(x, t / 1000, **c)."
            ) from None
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps
        self.use_dynamic_shifting = as_flag(use_dynamic_shifting, "use_dynamic_shifting")

    def level_range(self) -> Tuple[float, float]:
        # sigma = 1 comes out of the float32 shift (applied twice, as diffusers does) a little above 1:
        # 2 float32 ulps at shift 0.55, 1.5e-4 at shift 0.01 (diffusers' own sigmas do the same). The
        # bound still catches model times (sigma * N) passed as levels.
        return 0.0, 1.0 + 1e-3

    def alpha_sigma(self, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        t = _levels(t)
        refuse_levels_outside(t, *self.level_range(), self)
        alpha, sigma = C.flow_alpha_sigma(t)
        # a first sigma a few ulps above 1 (the float32 shift, see level_range) would give alpha < 0, and
        # log(alpha) = NaN in the multistep solvers' half-log-SNR; alpha is 0 there, as at sigma = 1 exactly
        return alpha.clamp(min=0), sigma

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(t, dtype=torch.float64) * self.num_train_timesteps).to(torch.float32)

    def _range_hint(self, level: float) -> str:
        if 2.0 <= level <= self.num_train_timesteps:
            return (
                f" Flow levels are sigmas in [0, 1]; {level:g} looks like a model time sigma * N (N = "
                f"num_train_timesteps = {self.num_train_timesteps}): divide by N, or make the grid with "
                f"schedule.timesteps(num_steps)."
            )
        return ""

    def level_of_model_time(self, t: torch.Tensor) -> torch.Tensor:
        return _levels(t) / self.num_train_timesteps

    def _checked_shift(self) -> float:
        if not is_real(self.shift) or not 0 < float(self.shift) < math.inf:
            raise InvalidArgumentError(f"shift must be a positive finite number (SD3 uses 3.0), got {self.shift!r}.")
        return float(self.shift)

    def shift_sigmas(self, sigmas: np.ndarray, mu: Optional[float] = None) -> np.ndarray:
        """The shifted sigmas: the static shift, or with ``use_dynamic_shifting`` the exponential time
        shift by ``mu`` (a finite real; Flux's pipelines compute it from the image sequence length)."""
        if mu is not None and (not is_real(mu) or not math.isfinite(float(mu))):
            raise InvalidArgumentError(
                f"mu must be a finite real number (Flux's calculate_shift gives about 0.5 to 1.15 from the image "
                f"sequence length), got {type(mu).__name__} {mu!r}."
            )
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.use_dynamic_shifting:
                if mu is None:
                    raise InvalidArgumentError("use_dynamic_shifting=True needs mu (e.g. from the image sequence length).")
                mu = float(mu)
                try:
                    e = math.exp(mu)
                except OverflowError:
                    raise InvalidArgumentError(
                        f"mu={mu:g} is too large: exp(mu) overflows (mu must stay below 709.78), and beyond about "
                        f"|mu| = 10..20 every shifted sigma already rounds to the same float32 value. Use a mu near "
                        f"0 (Flux's calculate_shift gives about 0.5 to 1.15)."
                    ) from None
                return e / (e + (1 / sigmas - 1))
            shift = self._checked_shift()
            return shift * sigmas / (1 + (shift - 1) * sigmas)

    def timesteps(self, num_steps: int, mu: Optional[float] = None) -> TimeGrid:
        """diffusers' FlowMatchEulerDiscreteScheduler grid: shifted sigmas, then 0.

        ``mu``: the time shift with ``use_dynamic_shifting`` (a finite real; ignored otherwise, as diffusers
        does). A shift or mu so extreme that two steps round to the same float32 sigma is refused."""
        num_steps = as_count(num_steps, "num_steps", 1, None, InvalidTimestepsError)
        n = self.num_train_timesteps
        train = np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / n
        if not self.use_dynamic_shifting:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                shift = self._checked_shift()
                train = shift * train / (1 + (shift - 1) * train)
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        with np.errstate(invalid="ignore", over="ignore"):
            sig = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
        sig = self.shift_sigmas(sig, mu).astype(np.float32)
        self._check_shifted(sig, num_steps, mu)
        t_from = torch.tensor(sig, dtype=torch.float64)
        grid = TimeGrid.from_levels(t_from, 0.0, torch.from_numpy(sig) * n).with_kind(self.kind)
        self.validate(grid)
        return grid

    def _check_shifted(self, sig: np.ndarray, num_steps: int, mu: Optional[float]) -> None:
        """Refuse shifted sigmas that are NaN / inf, do not strictly decrease, or reach 0 (the clean end),
        naming the shift or mu that did it."""
        top = self.level_range()[1]
        if float(sig[0]) > top:  # a static shift only: the dynamic one maps sigma = 1 to exactly 1
            raise InvalidArgumentError(
                f"FlowSchedule(shift={self.shift:g}).timesteps({num_steps}) puts the first sigma at "
                f"{float(sig[0]):.6g}, above 1 (levels lie in [0, {top:g}]): the float32 shift of sigma = 1, "
                f"computed as diffusers computes it, rounds that far from 1 at a shift this small. Use a larger "
                f"shift (SD3 uses 3.0; 1.0 is no shift)."
            )
        bad = ~np.isfinite(sig)
        bad[:-1] |= ~(sig[1:] < sig[:-1])
        bad[-1] |= not sig[-1] > 0
        if not bad.any():
            return
        i = int(np.nonzero(bad)[0][0])
        v = float(sig[i])
        where = f"step {i} at sigma {v:g}" if not math.isfinite(v) or i + 1 == len(sig) else \
            f"steps {i} and {i + 1} at the same float32 sigma {v:g}"
        high = math.isfinite(v) and v > 0.5  # every sigma pushed towards 1: shift / mu too large
        if self.use_dynamic_shifting:
            raise InvalidArgumentError(
                f"FlowSchedule.timesteps({num_steps}, mu={float(mu):g}) puts {where}: a mu this "
                f"{'large pushes every sigma towards 1' if high else 'negative pushes every sigma towards 0'}, and "
                f"the grid would not strictly decrease to the clean end. Use a mu nearer 0 (Flux's calculate_shift "
                f"gives about 0.5 to 1.15){' or fewer steps' if num_steps > 1 else ''}."
            )
        raise InvalidArgumentError(
            f"FlowSchedule(shift={self.shift:g}).timesteps({num_steps}) puts {where}: a shift this "
            f"{'large pushes every sigma towards 1' if high else 'small pushes every sigma towards 0'}, and the "
            f"grid would not strictly decrease to the clean end. Use a {'smaller' if high else 'larger'} shift "
            f"(SD3 uses 3.0; 1.0 is no shift){' or fewer steps' if num_steps > 1 else ''}."
        )

    def __repr__(self) -> str:
        return f"FlowSchedule(shift={self.shift:g}, N={self.num_train_timesteps})"

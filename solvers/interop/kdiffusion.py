r"""DRiffusion with k-diffusion's sampler conventions: ``sample_driffusion`` (Euler),
``sample_driffusion_ancestral`` (Euler ancestral) and ``sample_driffusion_dpmpp_2m`` (DPM-Solver++ 2M),
called as ``(model, x, sigmas, ...)``.

Key (Karras et al. 2022; k-diffusion ``sampling.py``): ``model(x, sigma, **extra_args)`` is a
denoiser D returning x0_hat, called with one sigma per row; ``sigmas`` decrease and usually end
in 0; ``x`` starts at ``sigmas[0]`` (x = x0 + sigma eps, already scaled: ``noise * sigmas[0]``).
k-diffusion's ``sample_euler`` (s_churn = 0) steps

    d_i = (x_i - D(x_i, sigma_i)) / sigma_i,       x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i,

which is :class:`solvers.ve.VEEulerSkip` on :class:`solvers.ve.VESchedule` (levels = sigmas). A draft
freezes d (equivalently x0_hat), so the big step x_a + (sigma_{a+j} - sigma_a) d_a is exact Euler on
the frozen slope; width 1 is ``sample_euler`` itself (to float rounding: sigma_to - sigma_from is
taken in float64).

k-diffusion's ``sample_dpmpp_2m`` ("DPM++ 2M", with Karras sigmas the common Stable Diffusion
setting) steps in t = -log sigma (lambda = log(alpha / sigma) with alpha = 1), h = t_{i+1} - t_i,
r = (t_i - t_{i-1}) / h:

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (e^{-h} - 1) ((1 + 1/(2r)) D_i - D_{i-1} / (2r)),

first order (D_{i-1} dropped) at the first step and at a step to sigma = 0. That is
:class:`solvers.DPMSolverSkip` (2M midpoint, ``lower_order_final=False``) on the VE schedule (proved:
``kdiffusion.sample_dpmpp_2m_step``). Its drafts are the first-order chain from the window's 2M step
with the anchor's x0_hat frozen (see :mod:`solvers.dpm`).

k-diffusion's ``sample_euler_ancestral`` ("Euler a") steps to sigma_down and adds sigma_up noise
(``get_ancestral_step``): x_{i+1} = x_i + (sigma_down - sigma_i) d_i + sigma_up z_i, which is
:class:`solvers.ve.VEAncestralSkip`, DDIM(eta) in VE variables (proved: ``kdiffusion.sample_euler_ancestral_step``).
Its drafts are the one-level chain with x0_hat frozen and the steps' own noise, as DDPM's are.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Optional, Union, overload

import torch

from driffusion_core.errors import InvalidArgumentError, InvalidTimestepsError, as_flag, check_predictor, is_real
from driffusion_core.executor import Executor, check_executor
from driffusion_core.grid import TimeGrid, refuse_bool_or_complex
from driffusion_core.modules import warn_random_layers
from driffusion_core.noise import NOISE_HINT as _NOISE_HINT, NoiseSource
from driffusion_core.scheduler import (
    DraftRefineScheduler, SampleOutput, check_finite_sample, check_inputs, evaluate_round,
)
from driffusion_core.transition import SkipTransition
from solvers.dpm import DPMSolverSkip
from solvers.ve import VEAncestralSkip, VEEulerSkip, VESchedule

__all__ = ["sample_driffusion", "sample_driffusion_ancestral", "sample_driffusion_dpmpp_2m", "sigmas_grid"]


def sigmas_grid(sigmas: torch.Tensor, dtype: torch.dtype = torch.float32) -> TimeGrid:
    """The grid of k-diffusion's ``sigmas``: step i goes from sigmas[i] to sigmas[i+1], model time sigmas[i].

    The model times keep the values of ``sigmas`` (cast to ``dtype``, the state's), as k-diffusion
    passes ``sigmas[i] * x.new_ones([B])``.
    """
    refuse_bool_or_complex(sigmas, "sigmas", "noise levels", " Pass e.g. k-diffusion's get_sigmas_karras(n, sigma_min, sigma_max).")
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)  # Python floats keep their digits
    if sigmas.dim() != 1 or sigmas.shape[0] < 2:
        raise InvalidTimestepsError(
            f"sigmas must be a 1-D tensor of at least 2 noise levels (the last usually 0), got shape {tuple(sigmas.shape)}."
        )
    sig = sigmas.detach().to("cpu")
    levels = sig.to(torch.float64)
    if (levels < 0).any() or not torch.isfinite(levels).all():
        raise InvalidTimestepsError("sigmas must be finite and non-negative.")
    if (levels[1:] >= levels[:-1]).any():
        i = int(torch.nonzero(levels[1:] >= levels[:-1])[0])
        raise InvalidTimestepsError(
            f"sigmas must strictly decrease (noisy to clean), but sigmas[{i}] = {levels[i]:g} and "
            f"sigmas[{i + 1}] = {levels[i + 1]:g}; k-diffusion's get_sigmas_* return them in sampling order."
        )
    # kind "ve": a VP / flow transition handed these sigmas is refused (they are not its levels)
    return TimeGrid(levels[:-1].clone(), levels[1:].clone(), sig[:-1].to(dtype).clone(), kind=VESchedule.kind)


@overload
def sample_driffusion(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    return_output: Literal[False] = False,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor: ...


@overload
def sample_driffusion(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    *,
    return_output: Literal[True],
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> SampleOutput: ...


@overload
def sample_driffusion(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    return_output: bool = False,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Union[torch.Tensor, SampleOutput]: ...


@torch.no_grad()
def sample_driffusion(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    return_output: bool = False,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Union[torch.Tensor, SampleOutput]:
    """DRiffusion's draft-and-refine Euler sampler for a k-diffusion denoiser.

    Arguments:
        model: ``D(x, sigma, **extra_args) -> x0_hat``, sigma a ``Tensor[B]`` (a k-diffusion wrapped model).
        x: the starting state at ``sigmas[0]`` (``torch.randn_like(x) * sigmas[0]``), ``Tensor[B, ...]``.
        sigmas: decreasing noise levels, usually ending in 0 (``k_diffusion.sampling.get_sigmas_karras``).
        extra_args: keyword arguments for the model; tensors need leading dimension B.
        callback: called once per step i, in order, with k-diffusion's dict
            ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` (x the refined state at sigma_i, denoised the
            x0_hat that step used).
        disable: disable the progress bar (tqdm's meaning: None hides it off a terminal).
        width: drafts per round (1 is ``sample_euler``, to float rounding).
        mode: ``"aggressive"`` or ``"conservative"``.
        executor: how a round runs (default ``backends.BatchedExecutor()``: a round's drafts in one call of
            width x B rows, as ``DRiffusionPipeline`` does; ``backends.SerialExecutor()`` makes one call per
            draft, with no speed-up, at the serial sampler's peak memory).
        return_output: return the :class:`~driffusion_core.SampleOutput` (with rounds and evals), not just x.
        s_churn, s_tmin, s_tmax, s_noise: ``sample_euler``'s churn settings, taken by keyword so that a
            call written for it works unchanged. Only ``s_churn = 0`` (no churn, k-diffusion's default) is
            supported; then, as in ``sample_euler``, the other three have no effect.

    Returns:
        The sample at ``sigmas[-1]`` (as k-diffusion's samplers), or the SampleOutput.

    Runs under ``torch.no_grad()``, as k-diffusion's samplers do (a model that needs gradients inside,
    e.g. for guidance, turns them on itself with ``torch.enable_grad()``).
    """
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
        if not is_real(value) or value != value:
            raise InvalidArgumentError(f"sample_driffusion: {name} must be a real number, got {value!r}.")
    if s_churn != 0:
        raise InvalidArgumentError(
            f"sample_driffusion: s_churn = {s_churn!r} is not supported; only s_churn = 0 (k-diffusion's default, "
            f"no churn) is. Churn raises sigma by gamma before each Euler step with fresh noise, a different "
            f"sampler whose steps DRiffusion does not draft. Pass s_churn=0, or use sample_driffusion_ancestral "
            f"for a stochastic sampler."
        )
    transition = VEEulerSkip(VESchedule(), prediction="sample")
    return _sample_k(transition, "sample_driffusion", "DRiffusion", model, x, sigmas, extra_args, callback, disable,
                     width, mode, executor, return_output)


@overload
def sample_driffusion_dpmpp_2m(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    return_output: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def sample_driffusion_dpmpp_2m(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    *,
    return_output: Literal[True],
) -> SampleOutput: ...


@overload
def sample_driffusion_dpmpp_2m(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    return_output: bool = False,
) -> Union[torch.Tensor, SampleOutput]: ...


@torch.no_grad()
def sample_driffusion_dpmpp_2m(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    return_output: bool = False,
) -> Union[torch.Tensor, SampleOutput]:
    r"""DRiffusion's draft-and-refine DPM-Solver++ 2M sampler for a k-diffusion denoiser (k-diffusion's
    ``sample_dpmpp_2m``; "DPM++ 2M Karras" with ``get_sigmas_karras``).

    Step i, with :math:`t = -\log\sigma`, :math:`h = t_{i+1} - t_i`, :math:`r = (t_i - t_{i-1})/h` and
    :math:`D_i = D(x_i, \sigma_i)`:

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i} x_i - (e^{-h} - 1)\Big(\big(1 + \tfrac{1}{2r}\big) D_i
              - \tfrac{1}{2r} D_{i-1}\Big),

    first order (:math:`D_{i-1}` dropped) at the first step and at a step to sigma = 0, as k-diffusion's.
    It is :class:`~solvers.DPMSolverSkip` (2M midpoint, ``lower_order_final=False``) on
    :class:`~solvers.VESchedule` (``proofs``: ``kdiffusion.sample_dpmpp_2m_step``). A window's first draft
    is the serial 2M step from the anchor (its previous step is the refined chain's), the later drafts the
    first-order steps from it with the anchor's x0_hat frozen (2M's correction vanishes on a frozen x0_hat).

    Arguments, return value and ``callback`` dicts are those of :func:`sample_driffusion` (width 1 is
    ``sample_dpmpp_2m``, to float rounding: the coefficients are computed in float64). 2M gains less from
    DRiffusion than Euler does (a refined step extrapolates from the previous step's x0_hat, which in a
    window is a drafted one): prefer ``mode="aggressive"`` and width <= T / 10.
    """
    transition = DPMSolverSkip(VESchedule(), prediction="sample", order=2, solver_type="midpoint",
                               lower_order_final=False, euler_at_final=False)
    return _sample_k(transition, "sample_driffusion_dpmpp_2m", "DRiffusion DPM++ 2M", model, x, sigmas, extra_args,
                     callback, disable, width, mode, executor, return_output)


@overload
def sample_driffusion_ancestral(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    return_output: Literal[False] = False,
    noise: Optional[NoiseSource] = None,
) -> torch.Tensor: ...


@overload
def sample_driffusion_ancestral(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    *,
    return_output: Literal[True],
    noise: Optional[NoiseSource] = None,
) -> SampleOutput: ...


@overload
def sample_driffusion_ancestral(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    return_output: bool = False,
    noise: Optional[NoiseSource] = None,
) -> Union[torch.Tensor, SampleOutput]: ...


@torch.no_grad()
def sample_driffusion_ancestral(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    disable: Optional[bool] = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    width: int = 2,
    mode: str = "aggressive",
    executor: Optional[Executor] = None,
    return_output: bool = False,
    noise: Optional[NoiseSource] = None,
) -> Union[torch.Tensor, SampleOutput]:
    r"""DRiffusion's draft-and-refine Euler ancestral sampler ("Euler a") for a k-diffusion denoiser
    (k-diffusion's ``sample_euler_ancestral``).

    Step i, with :math:`d_i = (x_i - D(x_i, \sigma_i))/\sigma_i`, :math:`\sigma_{up} = \eta\,\sigma_{i+1}
    \sqrt{\sigma_i^2 - \sigma_{i+1}^2}/\sigma_i` and :math:`\sigma_{down} = \sqrt{\sigma_{i+1}^2 - \sigma_{up}^2}`:

    .. math:: x_{i+1} = x_i + (\sigma_{down} - \sigma_i)\,d_i + s_{noise}\,\sigma_{up}\,z_i

    (:class:`~solvers.ve.VEAncestralSkip`; no noise on the step to sigma = 0). A window's drafts are the
    chain of these steps with the anchor's x0_hat frozen, each with its own step's noise z_i, so a refined
    step and its draft share their noise.

    Arguments:
        model, x, sigmas, extra_args, callback, disable, width, mode, executor, return_output: as for
            :func:`sample_driffusion`.
        eta: in [0, 1] (k-diffusion's default 1; 0 is ``sample_euler``).
        s_noise: the scale of the added noise (k-diffusion's ``s_noise``).
        noise_sampler: k-diffusion's ``noise_sampler(sigma, sigma_next) -> Tensor`` shaped like x. It is
            called once per step with ``sigma_next > 0``, in step order, *before* sampling (a draft needs its
            step's noise before the step is refined); default ``torch.randn_like(x)`` from torch's global
            generator, k-diffusion's own default. So with the same seed and a model that draws no random
            numbers, width 1 is ``sample_euler_ancestral`` (to float rounding), and the generator ends where
            k-diffusion leaves it (at eta = 0 too: k-diffusion draws and multiplies by sigma_up = 0, so the
            draws are made and dropped). The noises are held (T tensors shaped like x).
        noise: a :class:`~driffusion_core.NoiseSource` instead (noise drawn per step from its seed, nothing
            held); not together with ``noise_sampler``.

    Returns:
        The sample at ``sigmas[-1]``, or the :class:`~driffusion_core.SampleOutput`.
    """
    if not is_real(s_noise) or not 0 <= float(s_noise) < float("inf"):
        raise InvalidArgumentError(f"s_noise must be a finite number >= 0 (k-diffusion's default 1), got {s_noise!r}.")
    if noise is not None and noise_sampler is not None:
        raise InvalidArgumentError("Give noise (a NoiseSource) or noise_sampler (k-diffusion's), not both.")
    if noise is not None and not isinstance(noise, NoiseSource):
        raise InvalidArgumentError(f"noise must be a NoiseSource or None, got {type(noise).__name__}{_NOISE_HINT}.")
    if noise_sampler is not None and not callable(noise_sampler):
        raise InvalidArgumentError(
            f"noise_sampler must be a function noise_sampler(sigma, sigma_next) -> Tensor shaped like x, got "
            f"{type(noise_sampler).__name__}."
        )
    transition = VEAncestralSkip(VESchedule(), eta=eta, prediction="sample")

    def make_noise() -> Optional[NoiseSource]:  # after every other check: drawing consumes the caller's RNG
        made = noise
        if made is None:  # at eta = 0 too, k-diffusion draws (and multiplies by sigma_up = 0): the same RNG state
            sig = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas, dtype=torch.float64)
            made = _PredrawnNoise(sig, x, noise_sampler, keep=transition.stochastic)
        if not transition.stochastic:
            return None
        if float(s_noise) != 1.0:
            made = _ScaledNoise(made, float(s_noise))
        return made

    return _sample_k(transition, "sample_driffusion_ancestral", "DRiffusion Euler a", model, x, sigmas, extra_args,
                     callback, disable, width, mode, executor, return_output, make_noise)


class _PredrawnNoise(NoiseSource):
    """k-diffusion's per-step noise, drawn once per step (``sigma_next > 0``) in step order before sampling:
    ``noise_sampler(sigmas[i], sigmas[i + 1])``, default ``torch.randn_like(x)``. Step i's noise is z_i."""

    def __init__(self, sigmas: torch.Tensor, x: torch.Tensor, noise_sampler=None, keep: bool = True):
        super().__init__(0)
        draw = noise_sampler if noise_sampler is not None else (lambda sigma, sigma_next: torch.randn_like(x))
        self.zs = []
        for i in range(len(sigmas) - 1):
            if float(sigmas[i + 1]) <= 0:
                self.zs.append(None)  # k-diffusion adds no noise on the step to sigma = 0 (sigma_up = 0)
                continue
            z = draw(sigmas[i], sigmas[i + 1])
            if (not isinstance(z, torch.Tensor) or z.shape != x.shape or not z.is_floating_point()
                    or z.device.type == "meta" or not bool(torch.isfinite(z).all())):
                got = f"a {z.dtype} tensor of shape {tuple(z.shape)} on {z.device}" if isinstance(z, torch.Tensor) else type(z).__name__
                raise InvalidArgumentError(
                    f"noise_sampler(sigmas[{i}], sigmas[{i + 1}]) must return a finite real tensor shaped like x "
                    f"{tuple(x.shape)}, got {got}."
                )
            # a sampler may refill one buffer: keep each step's draw (keep=False: drawn for the RNG state only)
            self.zs.append(z.detach().clone() if keep else None)

    def __call__(self, step, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        z = self.zs[step]
        if z is None:
            return torch.zeros(tuple(shape), dtype=dtype, device=device)
        if tuple(z.shape) != tuple(shape):
            raise InvalidArgumentError(f"The pre-drawn noise of step {step} has shape {tuple(z.shape)}, not {tuple(shape)}.")
        return z.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"k-diffusion noise ({sum(z is not None for z in self.zs)} steps, pre-drawn)"


class _ScaledNoise(NoiseSource):
    """Another noise source's noise times ``s_noise`` (k-diffusion's scale of the ancestral noise)."""

    def __init__(self, inner: NoiseSource, scale: float):
        super().__init__(0)
        self.inner, self.scale = inner, scale

    def __call__(self, step, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        return self.inner(step, shape, dtype, device) * self.scale

    def __repr__(self) -> str:
        return f"{self.inner!r} x {self.scale:g}"


def _sample_k(transition: SkipTransition, name: str, label: str, model, x, sigmas, extra_args, callback, disable,
              width, mode, executor, return_output,
              noise: Optional[Callable[[], Optional[NoiseSource]]] = None) -> Union[torch.Tensor, SampleOutput]:
    """The draft-and-refine loop of the k-diffusion-style samplers, with ``transition`` on the sigmas' grid."""
    check_predictor(model, "model must be a denoiser D(x, sigma) -> x0")
    return_output = as_flag(return_output, "return_output")
    if callback is not None and not callable(callback):
        raise InvalidArgumentError(
            f"callback must be None or a function of k-diffusion's dict (x, i, sigma, sigma_hat, denoised), got "
            f"{type(callback).__name__}."
        )
    cond = check_inputs(x, extra_args, "extra_args")
    grid = sigmas_grid(sigmas, x.dtype)
    sched = DraftRefineScheduler(transition, grid, width, mode)
    if executor is None:
        from backends import BatchedExecutor  # solvers may use backends; the core never does

        executor = BatchedExecutor()
    check_executor(executor)
    state = sched.start(x, noise() if noise is not None else None, keep_trajectory=callback is not None)
    bar = None
    if disable is not True:
        from tqdm.auto import trange

        bar = trange(len(grid), disable=disable, desc=f"{label} n={width}")
    used = {}  # step index -> the x0_hat it used (kept only for the callback)
    with warn_random_layers(model, label):
        while (rnd := state.plan()) is not None:
            preds = evaluate_round(executor, model, rnd, grid, cond, x)
            if callback is not None:
                used.update({i: preds[k] for k, i in enumerate(rnd.steps)})
            before = state.a
            state.absorb(rnd, preds)
            for i in range(before, state.a):
                if callback is not None:
                    sigma = sigmas[i]
                    callback({"x": state.trajectory[i], "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": used.pop(i)})
                    state.trajectory[i] = None  # the callback has seen it
            if bar is not None:
                bar.update(state.a - before)
    if bar is not None:
        bar.close()
    executor.finish(state.x)  # once per sample, on every rank (an executor spanning processes checks it)
    x_final = check_finite_sample(state.x, name)
    out = SampleOutput(x_final, state.rounds, state.evals, info={"drafts_per_round": state.drafts_per_round})
    return out if return_output else out.x

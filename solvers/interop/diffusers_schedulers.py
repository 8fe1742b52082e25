r"""From a diffusers scheduler (or its config) to a skip transition and a time grid.

``from_diffusers(scheduler, T)`` reads the scheduler's *configuration and tables* and builds the
matching operator; it never calls the scheduler's stateful ``step`` (its step index moves on every
call, so drafts cannot go through it). Width 1 of :class:`~driffusion_core.DraftRefineScheduler`
with the result reproduces the scheduler's own loop ``set_timesteps(T); for t: step(model(x, t), t, x)``.

Key (diffusers' names -> ours):

* ``alphas_cumprod`` -> :class:`~driffusion_core.VPSchedule` table :math:`\bar\alpha_t` (taken from the
  scheduler itself, so every ``beta_schedule``, ``trained_betas`` and ``rescale_betas_zero_snr`` is exact;
  DDIM / DDPM refuse a table whose length is not ``num_train_timesteps``, over which diffusers spaces the steps);
* DDIM ``final_alpha_cumprod`` (``set_alpha_to_one``) -> ``VPSchedule(final_alpha_cumprod=...)``; DDPM uses 1;
* ``timestep_spacing``, ``steps_offset`` -> :meth:`VPSchedule.timesteps`; DDIM steps to
  ``t - num_train_timesteps // T`` (``step_to="stride"``), DDPM to the next listed timestep;
* ``thresholding`` -> :class:`~driffusion_core.DynamicThreshold`, else ``clip_sample`` ->
  :class:`~driffusion_core.ClipSample` (diffusers' precedence);
* DDPM ``variance_type`` fixed_small / fixed_small_log / fixed_large (None: fixed_small, as diffusers) -> :class:`~solvers.DDPMSkip`;
* custom steps, as ``set_timesteps(timesteps=..., sigmas=...)`` takes them: DDPM ``timesteps`` (each step to the
  next listed one, the last to -1), flow ``sigmas`` / ``timesteps`` (through the scheduler's own ``set_timesteps``),
  UniPC ``sigmas`` with ``use_flow_sigmas=True``;
  a scheduler already holding custom ones that differ from the grid built here is refused unless they are passed;
* flow sigmas (``shift`` or a later ``set_shift()``, ``use_dynamic_shifting`` with ``mu``, ``shift_terminal``,
  Karras / exponential / beta sigmas, linear time shift) -> read from the scheduler's own ``set_timesteps``
  on a private copy, so the grid is diffusers' own (the step is the same Euler step);
* ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``) -> :class:`~solvers.DPMSolverSkip`
  (``solver_order`` 1 or 2, ``solver_type``, ``lower_order_final``, ``euler_at_final``); its timesteps
  (``timestep_spacing``, ``steps_offset``, ``lambda_min_clipped``) are read from its own ``set_timesteps``
  on a private copy, and the last step goes to level -1 (sigma = 0, ``final_sigmas_type="zero"``) or to
  level 0 (``alphas_cumprod[0]``, ``final_sigmas_type="sigma_min"``). With Karras / exponential / beta
  sigmas or Lu lambdas the levels are the grid's own sigmas (a VPSchedule of alpha-bar = 1 / (1 + sigma^2),
  level j the j-th sigma from the clean end), the model times diffusers' nearest timesteps. Refused: the
  noise-prediction and SDE variants, third order, learned variances, and ``flow_prediction`` without flow sigmas;
  with ``use_flow_sigmas=True`` (and ``flow_prediction``) the levels are its own flow sigmas on a
  :class:`~driffusion_core.FlowSchedule` (``flow_shift``, ``use_dynamic_shifting`` with ``mu``), the model times
  its integer timesteps (Wan's UniPC, below, too);
* ``UniPCMultistepScheduler`` -> :class:`~solvers.UniPCSkip` (``solver_order`` 1 or 2, ``solver_type`` bh1 /
  bh2, ``lower_order_final``, thresholding), its steps placed as for DPM-Solver (the two schedulers'
  ``set_timesteps`` agree), flow sigmas as for DPM-Solver. Refused: third order, ``predict_x0=False``,
  ``solver_p``, ``disable_corrector``, ``flow_prediction`` without flow sigmas, and ``lower_order_final=False``
  into sigma = 0 (diffusers' NaN);
* ``EulerDiscreteScheduler`` -> :class:`~solvers.DDIMSkip` (eta = 0) on the *scaled* state. Its step is
  the Euler step of the probability-flow ODE in sigma, :math:`x_{\sigma'} = x_\sigma + (\sigma' - \sigma)\hat\epsilon`
  on the latents :math:`x_\sigma = x_0 + \sigma\epsilon`, and the model sees
  :math:`x_\sigma / \sqrt{\sigma^2 + 1}` (``scale_model_input``). On that scaled state, with
  :math:`\bar\alpha = 1 / (1 + \sigma^2)`, the step is DDIM's exactly (``python -m proofs``: diffusers.euler_discrete_step), so the
  drafts are DDIM's skips. The sigmas and model timesteps are read from the scheduler's own
  ``set_timesteps`` on a private copy (every ``timestep_spacing``, ``interpolation_type``, Karras /
  exponential / beta sigmas, ``final_sigmas_type``, ``timestep_type``); the VPSchedule's table holds
  the grid's own :math:`\bar\alpha` (level j = the j-th sigma from the clean end). See
  :func:`from_diffusers` for the state's scaling. Not reproduced: ``s_churn > 0`` (a ``step`` argument,
  not config; the transition is the deterministic step) and custom timesteps / sigmas.
* ``EulerAncestralDiscreteScheduler`` -> :class:`~solvers.DDIMSkip` with eta = 1 on the same scaled state: its
  step goes down to :math:`\sigma_{down}` and adds :math:`\sigma_{up} z`, with
  :math:`\sigma_{up}^2 = \sigma'^2(\sigma^2 - \sigma'^2)/\sigma^2`, which on the scaled state is DDIM's eta = 1
  step (the DDPM posterior) with the same z (``python -m proofs``: diffusers.euler_ancestral_step). Its per-step
  noise z_i is a :class:`~driffusion_core.NoiseSource`'s. prediction_type epsilon and v_prediction (diffusers'
  step refuses "sample").

A config (a mapping) is instantiated with diffusers; its class is its ``_class_name``, or, for the
``config`` of a scheduler built in code (no ``_class_name``), the supported class whose options are
exactly the config's keys; any other config is refused.
"""
from __future__ import annotations

import copy
import inspect
import math
import reprlib
import warnings
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from driffusion_core import coefficients as C
from driffusion_core.errors import InvalidArgumentError, InvalidTimestepsError, as_count, is_real
from driffusion_core.grid import TimeGrid
from driffusion_core.parameterization import ClipSample, DynamicThreshold
from driffusion_core.schedules import FlowSchedule, VPSchedule
from driffusion_core.transition import SkipTransition
from solvers.ddim import DDIMSkip
from solvers.ddpm import DDPMSkip
from solvers.dpm import DPMSolverSkip
from solvers.flow import FlowEulerSkip
from solvers.unipc import UniPCSkip

__all__ = ["from_diffusers", "euler_state_scales", "EulerDiscreteAsDDIM", "EulerAncestralAsDDIM", "SigmaGridSchedule",
           "FlowGridSchedule", "SUPPORTED_SCHEDULERS"]

SUPPORTED_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler",
)

# None: diffusers' _get_variance matches no branch and keeps the posterior variance, i.e. fixed_small
_DDPM_VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                  None: "fixed_small"}
# why the other variance types are refused, each its own reason
_DDPM_REFUSED_VARIANCE = {
    "learned": "the model predicts the log variance itself (2C output channels), which every draft would need; "
               "DDPMSkip has fixed variances only",
    "learned_range": "the model predicts where the variance lies between the fixed_small and fixed_large ones "
                     "(2C output channels), which every draft would need; DDPMSkip has fixed variances only",
    "fixed_large_log": "diffusers' own step takes the square root of a log variance there (its noise scale is "
                       "exp(0.5 * sqrt(log beta_t)), not a variance DDPMSkip can express)",
}


def _config_keys(diffusers, name: str) -> frozenset:
    """The options of a diffusers scheduler class: its ``__init__`` parameters (what its ``config`` holds)."""
    params = inspect.signature(getattr(diffusers, name).__init__).parameters.values()
    return frozenset(p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _class_of_config(diffusers, cfg: Mapping[str, Any]) -> Tuple[Optional[str], str]:
    """The scheduler class a config belongs to, and why not when it is ``None``.

    A saved config names it (``_class_name``). The ``config`` of a scheduler built in code has no
    ``_class_name``: it is taken for a supported class only when its options (keys not starting with
    ``_``) are exactly that class's. One shared option is not enough: PNDM, LCM, TCD and DDIMInverse
    configs have DDIM's ``set_alpha_to_one``, DPM-Solver single-step's and UnCLIP's have DDPM's ``variance_type``,
    FlowMatchHeun's has ``shift``, DPMSolverMultistepInverse's and DEIS's are DPMSolverMultistep's less a few.
    (DDIMParallel and DDPMParallel have exactly DDIM's and DDPM's options and step as they do, so their
    configs read as those.)
    """
    if "_class_name" in cfg:
        return cfg["_class_name"], ""
    keys = frozenset(k for k in cfg if not str(k).startswith("_"))
    known = {name: _config_keys(diffusers, name) for name in SUPPORTED_SCHEDULERS if hasattr(diffusers, name)}
    matches = [name for name, k in known.items() if k == keys]
    if len(matches) == 1:
        return matches[0], ""
    if not known:  # pragma: no cover - a diffusers without any of them
        return None, ""
    why = " Its options are not exactly those of any of them: it may belong to another scheduler that shares some."
    closest = min(known, key=lambda name: len(known[name] ^ keys))
    extra, missing = sorted(keys - known[closest]), sorted(known[closest] - keys)
    if len(extra) + len(missing) <= 4:  # a near miss (e.g. a config of another diffusers version): say where
        why += f" Against {closest}: extra {extra}, missing {missing}."
    return None, why


def _as_scheduler(scheduler_or_config: Any):
    """The scheduler object and its class name; a config is instantiated with diffusers."""
    if isinstance(scheduler_or_config, Mapping):
        cfg = dict(scheduler_or_config)
        try:
            import diffusers
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError("from_diffusers(config) needs diffusers: pip install 'driffusion[diffusers]'.") from e
        name, why = _class_of_config(diffusers, cfg)
        if name not in SUPPORTED_SCHEDULERS or not hasattr(diffusers, name):
            told = (f"its '_class_name' is {name!r}" if "_class_name" in cfg
                    else "it has no '_class_name', as the config of a scheduler built in code")
            raise InvalidArgumentError(
                f"This config is not one of {SUPPORTED_SCHEDULERS}: {told}.{why} Pass the scheduler object, or a "
                f"config whose '_class_name' names its class (as saved configs have); to sample with DDIM "
                f"instead, pass DDIMScheduler.from_config(config)."
            )
        return getattr(diffusers, name).from_config(cfg), name
    name = type(scheduler_or_config).__name__
    if name not in SUPPORTED_SCHEDULERS or not hasattr(scheduler_or_config, "config"):
        raise InvalidArgumentError(
            f"from_diffusers supports {', '.join(SUPPORTED_SCHEDULERS)}, got {name}. Swap the pipeline's scheduler, "
            f"e.g. pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config) (or DDIMScheduler)."
        )
    return scheduler_or_config, name


def _x0_transform(cfg: Mapping[str, Any]):
    """diffusers' order: thresholding wins over clip_sample."""
    if cfg.get("thresholding", False):
        return DynamicThreshold(cfg.get("dynamic_thresholding_ratio", 0.995), cfg.get("sample_max_value", 1.0))
    if cfg.get("clip_sample", False):
        return ClipSample(cfg.get("clip_sample_range", 1.0))
    return None


def _check_table_length(name: str, table: torch.Tensor, cfg: Mapping[str, Any], longer_ok: bool = False) -> None:
    """diffusers spaces the timesteps over ``config.num_train_timesteps`` but looks them up in the scheduler's
    alphas_cumprod table: a table of another length (a ``trained_betas`` of another length) is refused, since a
    VPSchedule of the table would space them over its length instead, a silently different grid (DPM-Solver
    reads a longer table as diffusers does: ``longer_ok``)."""
    n_train = int(cfg.get("num_train_timesteps", 1000))
    if len(table) == n_train or (longer_ok and len(table) > n_train):
        return
    raise InvalidArgumentError(
        f"{name} has {len(table)} alphas_cumprod entries (its trained_betas has {len(table)}) but "
        f"num_train_timesteps={n_train}: diffusers spaces its timesteps over num_train_timesteps and looks them up "
        f"in that table, a mismatch DRiffusion does not reproduce. Build the scheduler with "
        f"num_train_timesteps=len(trained_betas), e.g. {name}(trained_betas=betas, num_train_timesteps={len(table)}), "
        f"or pass {n_train} trained_betas."
    )


def _vp_schedule(scheduler, cfg: Mapping[str, Any], final_alpha_cumprod: float, name: str) -> VPSchedule:
    table = scheduler.alphas_cumprod.detach().cpu()
    _check_table_length(name, table, cfg)
    return VPSchedule(table, final_alpha_cumprod=final_alpha_cumprod)


def _trailing_off_by_one(name: str, num_train: int, num_inference_steps: int, last: Optional[int] = None) -> None:
    """Refuse the T where diffusers' trailing spacing lists T + 1 timesteps.

    diffusers lists ``round(np.arange(last, 0, -num_train / T)) - 1`` (``last`` = num_train but for
    DPM-Solver's lambda_min_clipped, where the list is shorter than T). For some T (1000 training steps: 61,
    103, 121, ...) the float arange ends on an entry just above 0, which rounds to timestep -1: diffusers
    then makes a model call at timestep -1 (alphas_cumprod[-1]), T + 1 calls without clipping.
    That loop cannot be reproduced by a grid to the clean end, so say so instead.
    """
    last = num_train if last is None else last

    def listed(m: int) -> np.ndarray:
        return np.arange(last, 0, -num_train / m).round().astype(np.int64) - 1

    def ends_at_minus_one(m: int) -> bool:
        ts = listed(m)
        return len(ts) > 0 and int(ts[-1]) < 0

    if not ends_at_minus_one(num_inference_steps):
        return
    near = [m for d in range(1, 50) for m in (num_inference_steps - d, num_inference_steps + d)
            if 1 <= m <= last and not ends_at_minus_one(m)][:2]
    n = len(listed(num_inference_steps))
    raise InvalidArgumentError(
        f"{name} with timestep_spacing='trailing' and num_inference_steps={num_inference_steps}: diffusers lists "
        f"{n} timesteps, the last -1 (np.arange rounds up to an extra entry), so its loop "
        f"makes {n} model calls, one at timestep -1. DRiffusion does not reproduce that; use num_inference_steps={' or '.join(map(str, sorted(near)))}, or another timestep_spacing "
        f"(VPSchedule.timesteps({num_inference_steps}, 'trailing') gives the intended {num_inference_steps} steps)."
    )


def _vp_grid(schedule: VPSchedule, cfg: Mapping[str, Any], num_inference_steps: int, step_to: str, name: str) -> TimeGrid:
    if cfg.get("timestep_spacing", "leading") == "trailing":
        _trailing_off_by_one(name, schedule.num_train_timesteps, num_inference_steps)
    return schedule.timesteps(
        num_inference_steps,
        spacing=cfg.get("timestep_spacing", "leading"),
        steps_offset=int(cfg.get("steps_offset", 0)),
        step_to=step_to,
    )


def _ddim(scheduler, cfg, num_inference_steps: int, eta: float, use_clipped_model_output: bool):
    schedule = _vp_schedule(scheduler, cfg, float(scheduler.final_alpha_cumprod), "DDIMScheduler")
    transition = DDIMSkip(
        schedule,
        prediction=cfg.get("prediction_type", "epsilon"),
        eta=eta,
        x0_transform=_x0_transform(cfg),
        recompute_eps=use_clipped_model_output,
    )
    return transition, _vp_grid(schedule, cfg, num_inference_steps, "stride", "DDIMScheduler")


def _custom_ddpm_timesteps(timesteps: Any, n_train: int) -> torch.Tensor:
    """DDPMScheduler's ``set_timesteps(timesteps=...)`` list, checked: integers, strictly decreasing, in [0, N)."""
    try:
        values = torch.as_tensor(np.asarray(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps,
                                            dtype=np.float64))
    except (TypeError, ValueError):
        values = None
    if values is None or values.dim() != 1 or len(values) == 0 or not bool(torch.isfinite(values).all()):
        raise InvalidArgumentError(
            f"timesteps must be a non-empty 1-D list of integer training timesteps, e.g. [999, 700, 400, 100], "
            f"got {timesteps!r}."
        )
    if not torch.equal(values, values.round()):
        raise InvalidArgumentError(
            f"DDPMScheduler's custom timesteps are integer training timesteps (diffusers casts them to int64), got "
            f"{values.tolist()}; round them, e.g. [round(t) for t in timesteps]."
        )
    if bool((values[1:] >= values[:-1]).any()):
        raise InvalidArgumentError(f"Custom timesteps must be strictly decreasing (as diffusers requires), got {values.tolist()}.")
    if values[0] >= n_train or values[-1] < 0:
        raise InvalidArgumentError(
            f"Custom timesteps must lie in [0, {n_train - 1}] (num_train_timesteps={n_train}), got {values.tolist()}."
        )
    return values


def _ddpm(scheduler, cfg, num_inference_steps: Optional[int], timesteps: Any = None, check_held: bool = True):
    variance_type = cfg.get("variance_type", "fixed_small")
    if variance_type not in _DDPM_VARIANCE:
        why = _DDPM_REFUSED_VARIANCE.get(variance_type, "it is not one of diffusers' variance types")
        raise InvalidArgumentError(
            f"DDPMScheduler variance_type={variance_type!r} is not supported: {why}. DRiffusion takes "
            f"{', '.join(map(repr, _DDPM_VARIANCE))} (None is fixed_small, as in diffusers), e.g. "
            f"DDPMScheduler.from_config(config, variance_type='fixed_small')."
        )
    schedule = _vp_schedule(scheduler, cfg, 1.0, "DDPMScheduler")
    transition = DDPMSkip(
        schedule,
        prediction=cfg.get("prediction_type", "epsilon"),
        variance_type=_DDPM_VARIANCE[variance_type],
        x0_transform=_x0_transform(cfg),
    )
    if timesteps is not None:  # diffusers steps from each listed timestep to the next, the last to -1
        t_from = _custom_ddpm_timesteps(timesteps, schedule.num_train_timesteps)
        t_to = torch.cat([t_from[1:], t_from.new_tensor([-1.0])])
        grid = TimeGrid(t_from, t_to, t_from.long(), schedule.kind)
        schedule.validate(grid)
        return transition, grid
    grid = _vp_grid(schedule, cfg, num_inference_steps, "next", "DDPMScheduler")
    if check_held and getattr(scheduler, "custom_timesteps", False):  # set_timesteps(timesteps=...) on it
        held = scheduler.timesteps.detach().cpu()
        if not torch.equal(held.to(grid.model_times.dtype), grid.model_times):
            _refuse_held("DDPMScheduler", f"custom timesteps {held.tolist()} (set_timesteps(timesteps=...))",
                         num_inference_steps, "timesteps=scheduler.timesteps.tolist()")
    return transition, grid


def _length(values: Any) -> Optional[int]:
    try:
        return len(values)
    except TypeError:
        return None


def _refuse_held(name: str, what: str, num_inference_steps: Optional[int], pass_them: str):
    built = (f"the {num_inference_steps} steps from_diffusers(scheduler, {num_inference_steps}) builds from its config"
             if num_inference_steps is not None else "no grid: num_inference_steps is missing")
    raise InvalidArgumentError(
        f"This {name} holds {what}, which differ from {built}; from_diffusers reads the config, not the "
        f"scheduler's state, so that loop would not be reproduced. To reproduce it, pass them: "
        f"from_diffusers(scheduler, {pass_them}); to sample with the config's own timesteps instead, call "
        f"scheduler.set_timesteps(num_inference_steps) first (or pass scheduler.config)."
    )


def _flow(scheduler, cfg, num_inference_steps: Optional[int], mu: Optional[float], sigmas: Any = None,
          timesteps: Any = None, check_held: bool = True):
    for option in ("invert_sigmas", "stochastic_sampling"):
        if cfg.get(option, False):
            raise InvalidArgumentError(
                f"FlowMatchEulerDiscreteScheduler({option}=True) is not supported: DRiffusion drafts need the "
                f"deterministic Euler step from noise (sigma=1) to data (sigma=0)."
            )
    dynamic = bool(cfg.get("use_dynamic_shifting", False))
    if dynamic and mu is None:
        raise InvalidArgumentError(
            "This scheduler has use_dynamic_shifting=True: pass mu (diffusers' pipelines compute it from the image "
            "sequence length, e.g. solvers.interop.pipelines.calculate_shift(seq_len, scheduler.config))."
        )
    _check_linear_mu(cfg, mu, "FlowMatchEulerDiscreteScheduler")
    n_train = int(cfg.get("num_train_timesteps", 1000))
    # the scheduler's current shift: set_shift() changes it, not its config
    schedule = FlowSchedule(float(getattr(scheduler, "shift", cfg.get("shift", 1.0))), n_train, dynamic)
    transition = FlowEulerSkip(schedule, prediction="velocity")
    # The sigmas are the scheduler's own set_timesteps, on a copy so the user's is untouched: it spans
    # sigma_max..sigma_min as computed at construction (set_shift() does not move them) and applies
    # shift_terminal, Karras / exponential / beta sigmas and the linear time shift.
    mu_kw = {"mu": mu} if mu is not None else {}
    if sigmas is not None or timesteps is not None:  # custom: through the scheduler's own set_timesteps
        custom = _custom_lists(sigmas=sigmas, timesteps=timesteps)
        if "sigmas" in custom and "timesteps" in custom and len(custom["sigmas"]) != len(custom["timesteps"]):
            raise InvalidArgumentError(
                f"sigmas and timesteps must have the same length (one model timestep per sigma, as diffusers "
                f"requires), got {len(custom['sigmas'])} and {len(custom['timesteps'])}."
            )
        sig, ts = _probe(scheduler, num_inference_steps, **mu_kw, **custom)
        if bool((ts[1:] == ts[0]).any()):
            # diffusers' index_for_timestep starts at the second occurrence of the first timestep
            raise InvalidArgumentError(
                f"The custom timesteps list their first value {ts[0].item():g} twice: diffusers' step would start "
                f"at its second occurrence and skip steps. Give distinct timesteps."
            )
    else:
        sig, ts = _probe(scheduler, num_inference_steps, **mu_kw)
        held_n = getattr(scheduler, "num_inference_steps", None)
        if check_held and held_n is not None and not _holds_grid(scheduler, sig, ts):
            # set_timesteps was called on it: its grid is either set_timesteps(held_n) (any step count, fine)
            # or custom sigmas / timesteps (or another mu / shift), which from_diffusers would drop
            if not _held_flow_is_standard(scheduler, held_n, mu, dynamic):
                _refuse_held("FlowMatchEulerDiscreteScheduler",
                             f"sigmas / timesteps from an earlier set_timesteps that are not set_timesteps({held_n}"
                             f"{', mu=...' if dynamic else ''}) with its current shift (custom sigmas= or "
                             f"timesteps=, or a shift changed since)",
                             num_inference_steps,
                             "sigmas=..., timesteps=... as given to set_timesteps")
    given = "sigmas" if sigmas is not None else "timesteps" if timesteps is not None else None
    _refuse_flow_sigmas(_call_text(num_inference_steps, **(custom if given else {})), sig, given, n_train)
    if timesteps is not None:  # the model is called at the given timesteps, not sigma * N: levels through the grid
        schedule = FlowGridSchedule(sig[:-1], ts, schedule.shift, n_train, dynamic)
        transition = FlowEulerSkip(schedule, prediction="velocity")
    grid = TimeGrid(sig[:-1].to(torch.float64), sig[1:].to(torch.float64), ts, schedule.kind)
    schedule.validate(grid)
    return transition, grid


def _usable_sigmas(levels: torch.Tensor, top: Optional[float] = None) -> bool:
    """Whether sigmas (the steps' levels, then the last one) decrease strictly from a positive value (at most
    ``top``) to one >= 0: every step a real step down in noise."""
    return (bool((levels[:-1] > 0).all()) and bool((levels[1:] < levels[:-1]).all()) and float(levels[-1]) >= 0
            and (top is None or float(levels[0]) <= top))


def _refuse_flow_sigmas(call: str, sig: torch.Tensor, given: Optional[str], n_train: int) -> None:
    """Refuse FlowMatchEulerDiscreteScheduler sigmas (``sig``: the steps' sigmas, then diffusers' final 0) that
    do not decrease strictly within [0, 1], saying which option or list made them (the grid's own message would
    name levels the caller never gave). ``given``: the custom list passed ("sigmas" / "timesteps"), or None."""
    steps = sig.to(torch.float64)
    if _usable_sigmas(steps, top=1.0):
        return
    head = f"FlowMatchEulerDiscreteScheduler.{call} gives sigmas {_short(steps)}"
    if given and len(steps) >= 2 and float(steps[-2]) == 0:
        raise InvalidArgumentError(
            f"{head}: the custom {given} end at 0 and diffusers appends its own final sigma 0, so the last step "
            f"goes from 0 to 0 (a model call that changes nothing, which a time grid here cannot hold). Drop the "
            f"trailing 0 from {given}= (the result is the same)."
        )
    if float(steps.min()) < 0 or float(steps.max()) > 1.0:
        fix = (f"give timesteps in (0, {n_train}] (num_train_timesteps; sigma = timestep / {n_train})"
               if given == "timesteps" else "give sigmas in [0, 1] (1 is pure noise, 0 the data)")
        raise InvalidArgumentError(f"{head}, outside [0, 1], where flow sigmas lie: {fix}.")
    raise InvalidArgumentError(
        f"{head}, which do not decrease strictly from noise to data: "
        + (f"give the custom {given} distinct and in sampling order (largest first)." if given else
           "more steps than distinct noise levels here (e.g. a high shift or shift_terminal): use fewer steps.")
    )


def _custom_lists(**given: Any) -> dict:
    """Custom ``sigmas`` / ``timesteps`` (those not None) as the plain lists diffusers' set_timesteps takes,
    each checked to be a non-empty 1-D list."""
    custom = {k: (v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else v)
              for k, v in given.items() if v is not None}
    for key, v in custom.items():
        arr = np.asarray(v, dtype=object)
        if arr.ndim != 1 or len(arr) == 0:
            raise InvalidArgumentError(f"{key} must be a non-empty 1-D list of numbers, got {v!r}.")
    return custom


def _call_text(num_inference_steps: Optional[int], **custom: Any) -> str:
    """How a set_timesteps call reads in a message: ``set_timesteps(6)``, or with custom lists
    ``set_timesteps(sigmas=[1, 0.8, ..., 0.1])``."""
    if not custom:
        return f"set_timesteps({num_inference_steps})"

    def shown(v: Any) -> str:
        try:
            return _short(torch.as_tensor(v, dtype=torch.float64))
        except Exception:  # noqa: BLE001 - not numbers: as given
            return reprlib.repr(v)

    return "set_timesteps(" + ", ".join(f"{k}={shown(v)}" for k, v in custom.items()) + ")"


def _probe(scheduler, num_inference_steps: Optional[int], **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sigmas (flow: with the final 0) and timesteps of the scheduler's own set_timesteps, run on a copy
    so the user's scheduler is untouched."""
    custom = {k: v for k, v in kwargs.items() if k in ("sigmas", "timesteps")}
    call = _call_text(num_inference_steps, **custom)
    probe = copy.deepcopy(scheduler)
    try:
        with warnings.catch_warnings():  # DPM-Solver's own numpy-2 DeprecationWarning (np.array of a tensor)
            warnings.simplefilter("ignore", DeprecationWarning)
            probe.set_timesteps(num_inference_steps, device="cpu", **kwargs)
    except ValueError as e:  # diffusers' own checks (e.g. of custom sigmas' / timesteps' lengths)
        raise InvalidArgumentError(f"{type(scheduler).__name__}.set_timesteps refused these arguments: {e}") from None
    except AssertionError as e:  # an assert without a message inside diffusers (a combination it does not run)
        where = _first_frame_text(e)
        raise InvalidArgumentError(
            f"{type(scheduler).__name__}.{call} fails an assertion inside diffusers"
            f"{': ' + where if where else ''}: this configuration does not run in diffusers either (e.g. "
            f"use_dynamic_shifting with time_shift_type='linear' on flow sigmas). Change the option it names."
        ) from None
    sigmas = probe.sigmas.detach().cpu().clone()
    if not bool(torch.isfinite(sigmas).all()):
        raise InvalidArgumentError(
            f"{type(scheduler).__name__}.{call} itself gives sigmas "
            f"{_short(sigmas)}, with NaN or inf (diffusers' own grid; e.g. shift_terminal "
            f"with a single step divides by zero): its loop would sample NaN. Use more inference steps, or drop the "
            f"option that stretches the sigmas."
        )
    timesteps = probe.timesteps.detach().cpu().clone()
    if timesteps.is_floating_point() and not bool(torch.isfinite(timesteps).all()):
        raise InvalidArgumentError(
            f"{type(scheduler).__name__}.{call} itself gives timesteps {_short(timesteps)}, with NaN or inf "
            f"(diffusers' own grid; its loop cannot look those up either): change the option that maps the "
            f"sigmas to timesteps (e.g. use_exponential_sigmas or use_karras_sigmas with "
            f"rescale_betas_zero_snr), or use more inference steps."
        )
    return sigmas, timesteps


def _short(values: torch.Tensor, edge: int = 4) -> str:
    """A sigma list for a message: every value to 6 digits, or the first and last ``edge`` of a long one."""
    v = [float(f"{x:.6g}") for x in values.tolist()]
    return str(v) if len(v) <= 2 * edge + 1 else f"[{', '.join(map(str, v[:edge]))}, ... ({len(v) - 2 * edge} more), " \
        f"{', '.join(map(str, v[-edge:]))}]"


def _first_frame_text(error: BaseException) -> str:
    """The source line of the innermost frame of ``error``'s traceback (what a bare ``assert`` checked)."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    return (str(error) or (frames[-1].line or "")).strip() if frames else str(error)


def _check_linear_mu(cfg: Mapping[str, Any], mu: Optional[float], name: str) -> None:
    """Refuse mu <= 0 with dynamic shifting of time_shift_type='linear' (diffusers runs it, off [0, 1])."""
    if cfg.get("use_dynamic_shifting", False) and cfg.get("time_shift_type", "exponential") == "linear" \
            and mu is not None and float(mu) <= 0:
        raise InvalidArgumentError(
            f"{name}(use_dynamic_shifting=True, time_shift_type='linear') with mu={mu!r}: the linear time shift "
            f"maps sigma to mu / (mu + (1 / sigma - 1)), which leaves [0, 1] (or divides by zero) unless mu > 0. "
            f"Pass mu > 0, or use time_shift_type='exponential' (exp(mu) takes any mu)."
        )


def _dynamic_kwargs(cfg: Mapping[str, Any], mu: Optional[float], name: str) -> dict:
    """``set_timesteps``' keyword arguments for a multistep scheduler: ``mu`` with ``use_dynamic_shifting``
    (diffusers requires it there, also where its sigmas do not use it), refused by name when missing."""
    if not cfg.get("use_dynamic_shifting", False):
        return {}
    if mu is None:
        raise InvalidArgumentError(
            f"{name}(use_dynamic_shifting=True) needs mu, as its set_timesteps does: from_diffusers(scheduler, "
            f"num_inference_steps, mu=...) (the pipelines compute it from the image size, e.g. calculate_shift).")
    return {"mu": mu}


def _held_flow_is_standard(scheduler, held_n: int, mu: Optional[float], dynamic: bool) -> bool:
    """Whether the scheduler's sigmas are its own ``set_timesteps(held_n)`` (no custom sigmas / timesteps).

    With dynamic shifting the mu of that call is not kept: it is solved for (bisection on the second sigma,
    which grows with mu) and the held sigmas and timesteps compared to float32 rounding.
    """
    if _holds_grid(scheduler, *_probe(scheduler, held_n, **({"mu": mu} if mu is not None else {}))):
        return True
    held = scheduler.sigmas.detach().cpu().to(torch.float64)
    if not dynamic or held_n < 2 or len(held) != held_n + 1:
        return False
    linear = scheduler.config.get("time_shift_type", "exponential") == "linear"  # mu > 0 there: search log mu
    probe = copy.deepcopy(scheduler)

    def sigmas_at(u: float) -> torch.Tensor:
        probe.set_timesteps(held_n, device="cpu", mu=float(np.exp(u)) if linear else u)
        return probe.sigmas.detach().cpu().to(torch.float64)

    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(sigmas_at(mid)[1]) < float(held[1]) else (lo, mid)
    found = sigmas_at(0.5 * (lo + hi))
    held_t = scheduler.timesteps.detach().cpu().to(torch.float64)
    return (torch.allclose(found, held, rtol=1e-5, atol=1e-6)
            and torch.allclose(probe.timesteps.detach().cpu().to(torch.float64), held_t, rtol=1e-5, atol=1e-3))


def _holds_grid(scheduler, sigmas: torch.Tensor, timesteps: torch.Tensor) -> bool:
    """Whether the scheduler holds exactly these sigmas and timesteps."""
    held_s, held_t = scheduler.sigmas.detach().cpu(), scheduler.timesteps.detach().cpu()
    return (held_s.shape == sigmas.shape and held_t.shape == timesteps.shape
            and torch.equal(held_s.to(sigmas.dtype), sigmas) and torch.equal(held_t.to(timesteps.dtype), timesteps))


def _refuse_held_custom(scheduler, name: str, num_inference_steps: int, mu: Optional[float] = None) -> None:
    """Refuse a scheduler holding custom timesteps or sigmas: ``set_timesteps(timesteps=... / sigmas=...)`` leaves
    no flag, so held ones that no ``set_timesteps(n)`` gives are custom, and from_diffusers (which builds the
    config's ``set_timesteps(num_inference_steps)``) would not reproduce that loop. With dynamic shifting the
    held grid may be any mu's (:func:`_held_flow_is_standard` solves for it)."""
    held = getattr(scheduler, "timesteps", None)
    if getattr(scheduler, "num_inference_steps", None) and isinstance(held, torch.Tensor):
        dynamic = bool(scheduler.config.get("use_dynamic_shifting", False))
        if dynamic:
            standard = _held_flow_is_standard(scheduler, len(held), mu, True)
        else:
            standard = _holds_grid(scheduler, *_probe(scheduler, len(held)))
        if not standard:
            raise InvalidArgumentError(
                f"This {name} holds custom timesteps or sigmas (set_timesteps(timesteps=... / sigmas=...)), which "
                f"from_diffusers does not reproduce here (it builds the config's set_timesteps("
                f"{num_inference_steps})). Call scheduler.set_timesteps({num_inference_steps}) first (or pass "
                f"scheduler.config) to sample with the config's timesteps."
            )


# DPMSolverMultistepScheduler's sigma options: each puts the levels between training timesteps (the first four
# are taken, on a VPSchedule of the grid's own sigmas; flow sigmas are another interpolant)
_DPM_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def _refuse_dpm(option: str, value: Any, why: str, instead: str):
    raise InvalidArgumentError(f"DPMSolverMultistepScheduler({option}={value!r}) is not supported: {why}. {instead}")


def _dpm(scheduler, cfg, num_inference_steps: int, check_held: bool = True, mu: Optional[float] = None):
    algorithm = cfg.get("algorithm_type", "dpmsolver++")
    if algorithm != "dpmsolver++":
        _refuse_dpm("algorithm_type", algorithm,
                    "only DPM-Solver++ (data prediction, deterministic) is implemented; the noise-prediction "
                    "('dpmsolver') and stochastic ('sde-dpmsolver', 'sde-dpmsolver++') variants are not",
                    "Use algorithm_type='dpmsolver++' (diffusers' default), e.g. "
                    "DPMSolverMultistepScheduler.from_config(config, algorithm_type='dpmsolver++').")
    order = cfg.get("solver_order", 2)
    if order not in (1, 2):
        _refuse_dpm("solver_order", order, "DPMSolverSkip has first order and the second-order multistep 2M only",
                    "Use solver_order=2 (diffusers' default, recommended for guided sampling) or 1.")
    if cfg.get("variance_type") is not None:
        _refuse_dpm("variance_type", cfg["variance_type"],
                    "a model that also predicts its variance returns extra channels, which diffusers' step "
                    "drops (it keeps the first three)",
                    "Use variance_type=None and wrap the model to return only its epsilon channels.")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample", "v_prediction") and not cfg.get("use_flow_sigmas", False):
        _refuse_dpm("prediction_type", prediction,
                    "flow_prediction goes with use_flow_sigmas (a flow interpolant), and this scheduler has VP sigmas",
                    "Set use_flow_sigmas=True for a flow-matching model (or use FlowMatchEulerDiscreteScheduler).")
    final = cfg.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min"):  # pragma: no cover - diffusers refuses it in set_timesteps
        _refuse_dpm("final_sigmas_type", final, "it is neither 'zero' nor 'sigma_min'", "Use 'zero' or 'sigma_min'.")

    options = dict(
        prediction=prediction,
        order=int(order),
        solver_type=cfg.get("solver_type", "midpoint"),
        lower_order_final=bool(cfg.get("lower_order_final", True)),
        euler_at_final=bool(cfg.get("euler_at_final", False)),
        x0_transform=_x0_transform(cfg),
    )
    if cfg.get("use_flow_sigmas", False):
        transition, grid = _multistep_flow(scheduler, cfg, num_inference_steps, mu, check_held,
                                           "DPMSolverMultistepScheduler",
                                           lambda schedule, p: DPMSolverSkip(schedule, **{**options, "prediction": p}))
    else:
        transition, grid = _multistep_grid(scheduler, cfg, num_inference_steps, check_held,
                                           "DPMSolverMultistepScheduler", lambda schedule: DPMSolverSkip(schedule, **options),
                                           mu)
    # diffusers' lower_order_final counts len(timesteps), the whole grid, also when a pipeline samples a slice
    # of it (img2img's strength: grid.sub(t_start, T))
    transition.num_inference_steps = len(grid)
    return transition, grid


# a flow-sigma scheduler's prediction_type -> the FlowSchedule's prediction (flow_prediction: x0 = x - sigma v)
_FLOW_PREDICTIONS = {"flow_prediction": "velocity", "epsilon": "epsilon", "sample": "sample"}


def _multistep_flow(scheduler, cfg, num_inference_steps: Optional[int], mu: Optional[float], check_held: bool,
                    name: str, make, sigmas: Any = None):
    """(transition, grid) of a multistep scheduler with ``use_flow_sigmas=True`` (Wan's UniPC, flow DPM-Solver):
    the levels are its own ``set_timesteps`` sigmas (on a copy; ``flow_shift``, ``use_dynamic_shifting`` with
    ``mu``, ``shift_terminal``; UniPC's custom ``sigmas``, which it shifts the same way) on a
    :class:`~driffusion_core.FlowSchedule` (alpha = 1 - sigma, as diffusers' ``_sigma_to_alpha_sigma_t`` there),
    the model times its integer timesteps; ``make(schedule, prediction)``."""
    sigma_option = next((o for o in _DPM_SIGMAS if cfg.get(o, False)), None)
    if sigma_option is not None:
        raise InvalidArgumentError(
            f"{name}(use_flow_sigmas=True, {sigma_option}=True) is not supported: those sigmas are spaced for a VP "
            f"schedule and mapped onto flow sigmas by a formula of their own. Use the flow sigmas alone (flow_shift).")
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in _FLOW_PREDICTIONS:
        raise InvalidArgumentError(
            f"{name}(use_flow_sigmas=True, prediction_type={kind!r}) is not supported: a flow interpolant takes "
            f"{sorted(_FLOW_PREDICTIONS)} (flow_prediction: the velocity eps - x0).")
    # as an array: UniPC's set_timesteps multiplies the sigmas by the shift (a list fails there)
    custom = _custom_lists(sigmas=sigmas)
    try:
        custom = {k: np.asarray(v, dtype=np.float64) for k, v in custom.items()}
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"sigmas must be a non-empty 1-D list of numbers, got {sigmas!r}.") from None
    if name.startswith("UniPC"):  # UniPC shifts flow sigmas by time_shift_type; DPM-Solver asserts 'exponential'
        _check_linear_mu(cfg, mu, name)
    sig, ts = _probe(scheduler, None if custom else num_inference_steps, **_dynamic_kwargs(cfg, mu, name), **custom)
    if check_held and not custom:
        _refuse_held_custom(scheduler, name, num_inference_steps, mu)
    n = len(ts)
    levels = sig[: n + 1].to(torch.float64)
    _refuse_unusable_sigmas(name, "use_flow_sigmas", cfg, _call_text(num_inference_steps, **custom), levels, top=1.0)
    # diffusers calls the model at integer timesteps, not sigma * N: the levels are found through the grid
    schedule = FlowGridSchedule(levels[:-1], ts, num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))
    transition = make(schedule, _FLOW_PREDICTIONS[kind])
    grid = transition.make_grid(TimeGrid(levels[:-1], levels[1:], ts, schedule.kind))
    return transition, grid


def _sigma_min_last_step(levels: torch.Tensor, cfg: Mapping[str, Any]) -> str:
    """Where only the last step fails to go down in noise, and that is final_sigmas_type='sigma_min' appending a
    sigma_min that is not below the last sigma of the grid: a message that says so (else "")."""
    if cfg.get("final_sigmas_type", "zero") != "sigma_min" or len(levels) < 2:
        return ""
    head = levels[:-1]
    if not (bool((head > 0).all()) and bool((head[1:] < head[:-1]).all()) and float(levels[-1]) >= float(levels[-2])):
        return ""
    last, before = float(levels[-1]), float(levels[-2])
    same = last - before <= 1e-6 * before  # the grid already ends at sigma_min, up to float32 rounding
    return (f": the last one, sigma_min = {last:.9g} (final_sigmas_type='sigma_min'), is not below the one before it "
            f"({before:.9g}), so the last step would "
            + ("have length zero (up to float32 rounding). Use final_sigmas_type='zero'." if same else
               "go up in noise. Use final_sigmas_type='zero', or fewer inference steps."))


def _refuse_unusable_sigmas(name: str, option: str, cfg: Mapping[str, Any], call: str,
                            levels: torch.Tensor, top: Optional[float] = None) -> None:
    """Refuse a multistep scheduler's own sigmas (``levels``: the steps' sigmas, then the last one) unless they
    decrease strictly from a positive value (at most ``top``). ``call``: the set_timesteps call as the message
    shows it (:func:`_call_text`)."""
    if _usable_sigmas(levels, top):
        return
    zero_length = float(levels[-1]) == float(levels[-2]) > 0
    last_up = "" if zero_length else _sigma_min_last_step(levels, cfg)
    raise InvalidArgumentError(
        f"{name}({option}=True, final_sigmas_type={cfg.get('final_sigmas_type', 'zero')!r})"
        f".{call} gives sigmas {_short(levels)}, which do not "
        f"decrease strictly from {'a value in (0, ' + format(top, 'g') + ']' if top is not None else 'a positive value'}"
        + (": the last step goes from sigma_min to sigma_min, a step of log-SNR length h = 0. diffusers takes it as "
           "a no-op (UniPC: its corrector alone); the multistep coefficients here divide by h, so it is not "
           "reproduced. Use final_sigmas_type='zero'." if zero_length else
           last_up or " (more steps than distinct noise levels). Use fewer inference steps.")
    )


def _multistep_grid(scheduler, cfg, num_inference_steps: int, check_held: bool, name: str, make,
                    mu: Optional[float] = None):
    """(transition, grid) of a DPM-Solver-style multistep scheduler (``DPMSolverMultistepScheduler``,
    ``UniPCMultistepScheduler``): its ``set_timesteps`` (on a copy) places the steps, ``make(schedule)`` builds
    the transition on the schedule of those levels."""
    final = cfg.get("final_sigmas_type", "zero")
    sigma_option = next((o for o in _DPM_SIGMAS if cfg.get(o, False)), None)
    if sigma_option is not None:
        return _dpm_on_sigmas(scheduler, cfg, num_inference_steps, check_held, sigma_option, make, name, mu)
    # alphas_cumprod as the scheduler holds it: every beta_schedule and trained_betas, and with
    # rescale_betas_zero_snr diffusers' alphas_cumprod[-1] = 2**-24 (not 0, so sigma stays finite).
    # That can sit above the entries just before it (linear betas: timesteps 996..998 are below 2**-24),
    # which a VPSchedule (alpha-bar never increasing) cannot hold. The schedule is built once the visited
    # timesteps are known (below): equal to the table at every visited one, monotone in between; a grid
    # whose visited alpha-bars themselves increase is refused (diffusers would step *up* in noise there).
    table = scheduler.alphas_cumprod.detach().cpu().to(torch.float64)
    _check_table_length(name, table, cfg, longer_ok=True)
    num_train = table.numel()
    # The timesteps are the scheduler's own set_timesteps (on a copy): DPM-Solver's leading spacing
    # divides by T + 1, lambda_min_clipped shortens the range. The levels are those training timesteps
    # (diffusers' sigmas are the table's there), then -1 (sigma = 0) or 0 (the sigma of alphas_cumprod[0]).
    if cfg.get("timestep_spacing", "linspace") == "trailing":
        clipped = int(torch.searchsorted(torch.flip(scheduler.lambda_t, [0]), cfg.get("lambda_min_clipped", -float("inf"))))
        # diffusers steps by config.num_train_timesteps / T from config.num_train_timesteps - clipped, also when
        # trained_betas hold a longer table
        n_cfg = int(cfg.get("num_train_timesteps", num_train))
        _trailing_off_by_one(name, n_cfg, num_inference_steps, last=n_cfg - clipped)
    timesteps = _probe(scheduler, num_inference_steps, **_dynamic_kwargs(cfg, mu, name))[1]
    held = getattr(scheduler, "timesteps", None)
    if check_held and getattr(scheduler, "num_inference_steps", None) and isinstance(held, torch.Tensor):
        # set_timesteps(timesteps=[...]) leaves no flag: held timesteps that no set_timesteps(n) gives are custom
        held = held.detach().cpu()
        try:
            plain = torch.equal(held, _probe(scheduler, len(held), **_dynamic_kwargs(cfg, mu, name))[1].to(held.dtype))
        except Exception:  # noqa: BLE001 - a count its own set_timesteps refuses: not a plain call either
            plain = False
        if not plain:
            raise InvalidArgumentError(
                f"This {name} holds custom timesteps {held.tolist()} (set_timesteps(timesteps="
                f"...)), which from_diffusers does not reproduce for it (it builds the config's "
                f"set_timesteps({num_inference_steps})). Call scheduler.set_timesteps({num_inference_steps}) first "
                f"(or pass scheduler.config) to sample with the config's timesteps, or drive "
                f"{type(make(VPSchedule(_non_increasing(table)))).__name__}(VPSchedule(scheduler.alphas_cumprod)) "
                f"with your own TimeGrid of those levels."
            )
    t_from = timesteps.to(torch.float64)
    if float(t_from.max()) > num_train - 1:
        raise InvalidArgumentError(
            f"{name}.set_timesteps({num_inference_steps}) lists timestep {int(t_from.max())}, past the last training "
            f"timestep {num_train - 1} (timestep_spacing={cfg.get('timestep_spacing', 'linspace')!r}, "
            f"steps_offset={cfg.get('steps_offset', 0)}): diffusers clamps its sigma and calls the model at a time "
            f"it was not trained for. Use fewer inference steps, steps_offset=0, or timestep_spacing='trailing'."
        )
    if float(t_from.min()) < 0:  # a listing the checks above did not foresee: never index the table at -1
        raise InvalidArgumentError(
            f"{name}.set_timesteps({num_inference_steps}) lists timestep {int(t_from.min())}, below the first "
            f"training timestep 0 (timestep_spacing={cfg.get('timestep_spacing', 'linspace')!r}): diffusers would "
            f"call the model at alphas_cumprod[-1], the end of the table. Use another number of inference steps."
        )
    if bool((t_from[1:] >= t_from[:-1]).any()):
        raise InvalidArgumentError(
            f"{name}.set_timesteps({num_inference_steps}) lists a timestep twice ("
            f"{_repeated(t_from)}): timestep_spacing={cfg.get('timestep_spacing', 'linspace')!r} rounds two of its "
            f"steps onto the same training timestep"
            + (f" (lambda_min_clipped={cfg['lambda_min_clipped']} may shorten the range)"
               if math.isfinite(float(cfg.get("lambda_min_clipped", -math.inf))) else "")
            + ", a step of length zero that a DRiffusion grid does not hold (diffusers spends a model call on it). "
            + _distinct_counts(scheduler, cfg, num_inference_steps, mu, name)
        )
    if final == "sigma_min" and float(t_from[-1]) <= 0.0:
        raise InvalidArgumentError(
            f"{name}(final_sigmas_type='sigma_min') with {num_inference_steps} steps: the last "
            f"timestep is already 0, whose sigma is sigma_min, so the last step would have log-SNR length h = 0 "
            f"(diffusers spends a model call on a no-op step there, or returns NaN with solver_type='heun'; the "
            f"multistep coefficients here divide by h). Use final_sigmas_type='zero', fewer steps, or another timestep_spacing."
        )
    visited = [int(t) for t in timesteps.tolist()] + ([0] if final != "zero" else [])
    monotone = _monotone_through(table, visited)
    if monotone is None:
        up = [(a, b) for a, b in zip(sorted(set(visited)), sorted(set(visited))[1:]) if table[b] > table[a]]
        raise InvalidArgumentError(
            f"{name}.set_timesteps({num_inference_steps}) visits timesteps {up[0][1]} and {up[0][0]}, and "
            f"alphas_cumprod is larger at {up[0][1]} (rescale_betas_zero_snr puts 2**-24 at the last timestep, above "
            f"the entries just before it): alpha-bar would increase with the noise level there, and diffusers would "
            f"step up in noise. Use fewer inference steps, or timestep_spacing='trailing'."
        )
    schedule = VPSchedule(monotone, final_alpha_cumprod=1.0)
    transition = make(schedule)
    last = t_from.new_tensor([-1.0 if final == "zero" else 0.0])
    grid = transition.make_grid(TimeGrid(t_from, torch.cat([t_from[1:], last]), timesteps, schedule.kind))
    return transition, grid


def _repeated(timesteps: torch.Tensor) -> str:
    """Where a listing first fails to decrease, as ``'timestep 999 after 999'``."""
    i = int(torch.nonzero(timesteps[1:] >= timesteps[:-1])[0])
    return f"timestep {timesteps[i + 1].item():g} after {timesteps[i].item():g}"


def _distinct_counts(scheduler, cfg, num_inference_steps: int, mu: Optional[float], name: str) -> str:
    """The advice for a step count whose timesteps repeat: the nearest smaller count whose timesteps do not
    (found by running set_timesteps on a copy, at most 64 counts down), or "fewer steps"."""
    for n in range(num_inference_steps - 1, max(num_inference_steps - 65, 0), -1):
        try:
            ts = _probe(scheduler, n, **_dynamic_kwargs(cfg, mu, name))[1].to(torch.float64)
        except InvalidArgumentError:
            continue
        if bool((ts[1:] < ts[:-1]).all()) and float(ts.min()) >= 0:
            return f"Use num_inference_steps={n} (the nearest smaller count with distinct timesteps) or fewer."
    return "Use fewer inference steps."


def _refuse_unipc(option: str, value: Any, why: str, instead: str):
    raise InvalidArgumentError(f"UniPCMultistepScheduler({option}={value!r}) is not supported: {why}. {instead}")


def _unipc(scheduler, cfg, num_inference_steps: Optional[int], check_held: bool = True, mu: Optional[float] = None,
           sigmas: Any = None):
    """UniPCMultistepScheduler: :class:`~solvers.UniPCSkip` on the levels of its own ``set_timesteps``, as for
    DPM-Solver (the two schedulers place their steps the same way); with ``use_flow_sigmas`` also custom
    ``sigmas`` (their count is the step count)."""
    if sigmas is not None:
        num_inference_steps = len(_custom_lists(sigmas=sigmas)["sigmas"])
    flow = bool(cfg.get("use_flow_sigmas", False))
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample", "v_prediction") and not flow:
        _refuse_unipc("prediction_type", prediction,
                      "flow_prediction goes with use_flow_sigmas (a flow interpolant), and this scheduler has VP sigmas",
                      "Set use_flow_sigmas=True for a flow-matching model (as Wan's scheduler config does).")
    order = cfg.get("solver_order", 2)
    if order not in (1, 2):
        _refuse_unipc("solver_order", order, "UniPCSkip has the predictor of order 1 and 2 only",
                      "Use solver_order=2 (diffusers' default, recommended for guided sampling) or 1.")
    if not cfg.get("predict_x0", True):
        _refuse_unipc("predict_x0", cfg["predict_x0"], "only the data-prediction form (UniPC's B(h) update on "
                      "x0_hat, diffusers' default) is implemented", "Use predict_x0=True.")
    if getattr(scheduler, "solver_p", None) is not None:
        _refuse_unipc("solver_p", type(scheduler.solver_p).__name__, "a separate predictor scheduler steps "
                      "statefully", "Leave solver_p unset (UniPC's own predictor, UniP).")
    if list(cfg.get("disable_corrector", []) or []):
        _refuse_unipc("disable_corrector", list(cfg["disable_corrector"]),
                      "UniPCSkip applies the corrector at every step after the first", "Use disable_corrector=[].")
    solver_type = cfg.get("solver_type", "bh2")
    lower_final = bool(cfg.get("lower_order_final", True))
    # (one step: its only step is first order, as in diffusers, and taken)
    if order == 2 and not lower_final and cfg.get("final_sigmas_type", "zero") == "zero" and num_inference_steps > 1:
        _refuse_unipc("lower_order_final", False,
                      "with final_sigmas_type='zero' the last step is second order into sigma = 0, where "
                      "diffusers' UniP divides by r = 0 and returns NaN or inf",
                      "Use lower_order_final=True (diffusers' default) or final_sigmas_type='sigma_min'.")
    options = dict(prediction=prediction, order=int(order), solver_type=solver_type,
                   lower_order_final=lower_final, x0_transform=_x0_transform(cfg))
    if flow:
        transition, grid = _multistep_flow(scheduler, cfg, num_inference_steps, mu, check_held, "UniPCMultistepScheduler",
                                           lambda schedule, p: UniPCSkip(schedule, **{**options, "prediction": p}),
                                           sigmas)
    else:
        transition, grid = _multistep_grid(scheduler, cfg, num_inference_steps, check_held, "UniPCMultistepScheduler",
                                           lambda schedule: UniPCSkip(schedule, **options), mu)
    transition.final_level = float(grid.t_to[-1])
    return transition, grid


def _monotone_through(table: torch.Tensor, visited: Sequence[int]) -> Optional[torch.Tensor]:
    """A non-increasing alpha-bar table equal to ``table`` at the ``visited`` timesteps (the only levels a grid's
    steps read), or None where the table increases from one visited timestep to the next. In between, each entry
    is clamped between its visited neighbours' values, then raised to the largest entry after it."""
    v = torch.tensor(sorted(set(visited)), dtype=torch.long)
    vals = table[v]
    if bool((vals[1:] > vals[:-1]).any()):
        return None
    t = torch.arange(table.numel())
    below = torch.searchsorted(v, t, right=True) - 1  # the largest visited timestep <= t, or -1
    hi = torch.where(below >= 0, vals[below.clamp(min=0)], torch.full_like(table, math.inf))
    above = below + 1  # the smallest visited timestep > t, or len(v)
    lo = torch.where(above < len(v), vals[above.clamp(max=len(v) - 1)], torch.zeros_like(table))
    # (at a visited timestep lo <= vals <= hi, so the clamp keeps its value)
    return _non_increasing(torch.minimum(torch.maximum(table, lo), hi))


def _non_increasing(table: torch.Tensor) -> torch.Tensor:
    """Each entry raised to the largest entry after it: the smallest non-increasing table above ``table``."""
    return torch.flip(torch.cummax(torch.flip(table, [0]), 0).values, [0])


def _dpm_on_sigmas(scheduler, cfg, num_inference_steps: int, check_held: bool, option: str, make, name: str,
                   mu: Optional[float] = None):
    """DPMSolverMultistepScheduler with Karras / exponential / beta sigmas or Lu lambdas: its levels are the
    grid's own sigmas, between the training timesteps (the model is called with the nearest ones, its
    ``timesteps``). DPM-Solver++ reads alpha_t = 1 / sqrt(1 + sigma^2) and sigma_t = sigma alpha_t there, so
    the transition runs on a VPSchedule whose table is the grid's alpha-bar = 1 / (1 + sigma^2), level j the
    j-th sigma counted from the clean end (as for Euler); the state is the usual VP state (not scaled)."""
    sig, ts = _probe(scheduler, num_inference_steps, **_dynamic_kwargs(cfg, mu, name))
    if check_held:
        _refuse_held_custom(scheduler, name, num_inference_steps, mu)
    n = len(ts)
    levels = sig[: n + 1].to(torch.float64)  # sigmas[i] -> sigmas[i + 1]; the last: 0 or sigma_min
    _refuse_unusable_sigmas(name, option, cfg, _call_text(num_inference_steps), levels)
    table = torch.flip(C.vp_abar_of_sigma(levels), [0])  # alpha-bar, from the clean end (level 0) up
    schedule = SigmaGridSchedule(table, ts)
    transition = make(schedule)
    steps = torch.arange(n, 0, -1, dtype=torch.float64)
    grid = transition.make_grid(TimeGrid(steps, steps - 1.0, ts, schedule.kind))
    return transition, grid


def _model_time_index(schedule: Any, model_times: torch.Tensor, t: Any) -> torch.Tensor:
    """For each model time in ``t``, its index in ``model_times`` (a grid's own table, noisiest first), or
    InvalidTimestepsError where it is not one of them or stands for several."""
    t = torch.as_tensor(t).detach().cpu().to(torch.float64)
    times = model_times.to(torch.float64)
    hits = t.reshape(-1, 1) == times.reshape(1, -1)
    count = hits.sum(1)
    if not bool((count == 1).all()):
        i = int(torch.nonzero(count != 1)[0])
        why = ("is not one of this grid's" if int(count[i]) == 0 else
               "stands for several of this grid's sigmas (diffusers rounded two sigmas to one timestep)")
        raise InvalidTimestepsError(
            f"{type(schedule).__name__}: model time {t.reshape(-1)[i].item()!r} {why} model times "
            f"{reprlib.repr(model_times.tolist())}, so its level (sigma) is unknown. Levels of a sigma grid "
            f"are found from the model times the sampler calls the model with; use fewer steps if two coincide."
        )
    return hits.to(torch.int64).argmax(1)


class FlowGridSchedule(FlowSchedule):
    r"""The :class:`~driffusion_core.FlowSchedule` of one diffusers flow grid whose model times are not
    :math:`\sigma N`: DPM-Solver / UniPC with ``use_flow_sigmas`` (diffusers' integer timesteps) and
    ``FlowMatchEulerDiscreteScheduler`` with custom ``timesteps=``. The levels are the grid's sigmas, the
    interpolant the flow's; :meth:`model_time` and :meth:`level_of_model_time` map between sigmas and model
    times through the grid's own table (so :func:`~driffusion_core.reparameterize` or an oracle converts at
    the right sigma), and a level or model time that is not the grid's is refused.

    Arguments:
        sigmas: the grid's sigmas, noisiest first, one per model time (the steps' starting levels).
        model_times: diffusers' timesteps, noisiest first.
        shift, num_train_timesteps, use_dynamic_shifting: as for :class:`~driffusion_core.FlowSchedule`.
    """

    def __init__(self, sigmas: torch.Tensor, model_times: torch.Tensor, shift: float = 1.0,
                 num_train_timesteps: int = 1000, use_dynamic_shifting: bool = False):
        super().__init__(shift, num_train_timesteps, use_dynamic_shifting)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten().clone()
        self.model_times = torch.as_tensor(model_times).detach().cpu().flatten().clone()
        if self.sigmas.numel() != self.model_times.numel() or self.sigmas.numel() == 0:
            raise InvalidArgumentError(
                f"FlowGridSchedule: {self.sigmas.numel()} sigmas for {self.model_times.numel()} model times; give one "
                f"model time per step's starting sigma, noisiest first."
            )

    @property
    def kind(self) -> str:
        """``"flowgrid/N"``: levels are this grid's sigmas, the model called at its own timesteps."""
        return f"flowgrid/{self.num_train_timesteps}"

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        hits = t.reshape(-1, 1) == self.sigmas.reshape(1, -1)
        if not bool((hits.sum(1) >= 1).all()):
            bad = t.reshape(-1)[hits.sum(1) == 0][0].item()
            raise InvalidTimestepsError(
                f"{type(self).__name__}: level {bad!r} is not one of this grid's sigmas "
                f"{reprlib.repr(self.sigmas.tolist())}, so it has no model time; the model is called at the grid's "
                f"own sigmas only."
            )
        return self.model_times[hits.to(torch.int64).argmax(1)].reshape(t.shape)

    def level_of_model_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[_model_time_index(self, self.model_times, t)].reshape(torch.as_tensor(t).shape)

    def __repr__(self) -> str:
        return f"FlowGridSchedule(steps={self.sigmas.numel()}, shift={self.shift:g})"


class SigmaGridSchedule(VPSchedule):
    r"""The :class:`~driffusion_core.VPSchedule` of one diffusers sigma grid (Euler, Karras / exponential / beta
    sigmas): :math:`\bar\alpha = 1 / (1 + \sigma^2)` at level j, the j-th sigma counted from the clean end
    (level 0: the last sigma), and the model called at diffusers' timesteps. Its levels are not model times:
    :meth:`model_time` and :meth:`level_of_model_time` map between them through the grid's own table (so a
    wrapper such as :func:`~driffusion_core.reparameterize` or an oracle finds the right level), and a model time
    that is not one of the grid's is refused.

    Arguments:
        alphas_cumprod: alpha-bar of the sigmas, from the clean end (level 0) up (level n, the noisiest).
        model_times: diffusers' timesteps, noisiest first: ``model_times[i]`` is the model time of level n - i.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, model_times: torch.Tensor):
        super().__init__(alphas_cumprod, final_alpha_cumprod=1.0)
        times = torch.as_tensor(model_times).detach().cpu()
        if times.numel() != self.num_train_timesteps - 1:
            raise InvalidArgumentError(
                f"SigmaGridSchedule: {times.numel()} model times for {self.num_train_timesteps - 1} levels above the "
                f"clean end; give one per step, noisiest first."
            )
        self.model_times = times

    @property
    def kind(self) -> str:
        """``"sigmagrid/N"``: levels index this grid's N sigmas (not training timesteps of an N-step table)."""
        return f"sigmagrid/{self.num_train_timesteps}"

    def timesteps(self, num_steps: int, spacing: str = "trailing", steps_offset: int = 0, step_to: str = "next") -> TimeGrid:
        """A sub-grid of ``num_steps`` of this grid's levels (:meth:`VPSchedule.timesteps`), called at diffusers'
        timesteps of those levels. The default spacing is trailing: leading and linspace spacing start a step at
        level 0, the grid's last sigma, where the model is never called."""
        if spacing != "trailing" and steps_offset < 1:
            raise InvalidTimestepsError(
                f"{type(self).__name__}.timesteps(spacing={spacing!r}) would start a step at level 0, this grid's last "
                f"sigma, which has no model time; use spacing='trailing' (the default here) or steps_offset >= 1."
            )
        return super().timesteps(num_steps, spacing, steps_offset, step_to)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        n = self.num_train_timesteps - 1
        ok = (t == t.round()) & (t >= 1) & (t <= n)
        if not bool(ok.all()):
            raise InvalidTimestepsError(
                f"{type(self).__name__}: level {t[~ok].flatten()[0].item()!r} has no model time; the model is called "
                f"at this grid's levels 1..{n} only (level j: the j-th sigma from the clean end)."
            )
        return self.model_times[(n - t.round().long()).flatten()].reshape(t.shape)

    def level_of_model_time(self, t: torch.Tensor) -> torch.Tensor:
        n = self.num_train_timesteps - 1
        return (n - _model_time_index(self, self.model_times, t)).to(torch.float64).reshape(torch.as_tensor(t).shape)

    def __repr__(self) -> str:
        return f"SigmaGridSchedule(steps={self.num_train_timesteps - 1})"


class EulerDiscreteAsDDIM(DDIMSkip):
    r"""The transition ``from_diffusers(EulerDiscreteScheduler)`` returns: :class:`~solvers.DDIMSkip` (eta = 0) on
    the scaled state :math:`x = x_\sigma / \sqrt{\sigma^2 + 1}` with :math:`\bar\alpha = 1 / (1 + \sigma^2)`, which
    is diffusers' Euler step :math:`x_{\sigma'} = x_\sigma + (\sigma' - \sigma)\hat\epsilon` exactly. Its only
    difference from DDIMSkip: it marks the state as scaled, for :func:`euler_state_scales`."""


class EulerAncestralAsDDIM(EulerDiscreteAsDDIM):
    r"""The transition ``from_diffusers(EulerAncestralDiscreteScheduler)`` returns: :class:`~solvers.DDIMSkip` with
    eta = 1 on the scaled state :math:`x = x_\sigma / \sqrt{\sigma^2 + 1}`, which is diffusers' ancestral step
    :math:`x_{\sigma'} = x_\sigma + (\sigma_{down} - \sigma)\hat\epsilon + \sigma_{up} z` exactly, with the same z
    (:math:`\sigma_{up} = \sigma'\sqrt{\sigma^2 - \sigma'^2}/\sigma`, :math:`\sigma_{down} = \sigma'^2/\sigma`)."""

    def __init__(self, schedule: VPSchedule, prediction: str = "epsilon") -> None:
        super().__init__(schedule, eta=1.0, prediction=prediction)


_EULER_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample",
                      "original_sample": "sample"}  # diffusers keeps "original_sample" as an alias of "sample"
_ANCESTRAL_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v_prediction"}  # its step refuses "sample"


def _euler(scheduler, cfg, num_inference_steps: int, check_held: bool = True, name: str = "EulerDiscreteScheduler"):
    """EulerDiscreteScheduler: DDIM (eta = 0) on the scaled state x / sqrt(sigma^2 + 1), over a VPSchedule whose
    table is the grid's own alpha-bar = 1 / (1 + sigma^2) (level j: the j-th sigma counted from the clean end);
    EulerAncestralDiscreteScheduler: the same with eta = 1."""
    ancestral = name == "EulerAncestralDiscreteScheduler"
    predictions = _ANCESTRAL_PREDICTIONS if ancestral else _EULER_PREDICTIONS
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in predictions:
        raise InvalidArgumentError(
            f"{name}(prediction_type={prediction!r}) is not supported: it takes {sorted(predictions)} "
            f"(diffusers' own step refuses the others)."
            + (" For an x0-predicting model use EulerDiscreteScheduler(prediction_type='sample')." if ancestral else "")
        )
    if cfg.get("timestep_spacing", "linspace") == "trailing":
        _trailing_off_by_one(name, int(cfg.get("num_train_timesteps", 1000)), num_inference_steps)
    sig, ts = _probe(scheduler, num_inference_steps)
    if check_held:
        _refuse_held_custom(scheduler, name, num_inference_steps)
    n = len(ts)
    levels = sig[: n + 1].to(torch.float64)  # diffusers' loop steps sigmas[i] -> sigmas[i + 1], i < len(timesteps)
    # sigmas read off the timestep spacing (not Karras / exponential / beta sigmas, whose last step is named below)
    spaced = not any(cfg.get(k) for k in _DPM_SIGMAS)
    if (spaced and n >= 1 and float(levels[-1]) == float(levels[-2]) > 0
            and bool((levels[1:-1] < levels[:-2]).all())):
        raise InvalidArgumentError(
            f"{name}(final_sigmas_type={cfg.get('final_sigmas_type')!r}) with {num_inference_steps} steps: the last "
            f"timestep is already 0 (timestep_spacing={cfg.get('timestep_spacing', 'linspace')!r}), whose sigma is "
            f"the final sigma {float(levels[-1]):.6g}, so the last step has length zero: a model call that changes "
            f"nothing, which a DRiffusion grid does not hold. Use final_sigmas_type='zero', or "
            f"timestep_spacing='leading' with steps_offset=1 (its last timestep is 1)."
        )
    if not bool((levels[:-1] > 0).all()) or not bool((levels[1:] < levels[:-1]).all()):
        last_train = int(cfg.get("num_train_timesteps", 1000)) - 1
        if n and float(ts.max()) > last_train:  # steps_offset past the table: diffusers clamps those sigmas
            raise InvalidArgumentError(
                f"{name}.set_timesteps({num_inference_steps}) lists timestep {float(ts.max()):g}, past the last "
                f"training timestep {last_train} (timestep_spacing={cfg.get('timestep_spacing', 'linspace')!r}, "
                f"steps_offset={cfg.get('steps_offset', 0)}): diffusers clamps their sigmas to equal values and calls "
                f"the model at times it was not trained for. Use fewer inference steps, steps_offset=0, or "
                f"timestep_spacing='trailing'."
            )
        raise InvalidArgumentError(
            f"{name}.set_timesteps({num_inference_steps}) gives sigmas {_short(levels)}, which do not decrease "
            f"strictly from a positive value" + (_sigma_min_last_step(levels, cfg) or
            (f" ({name} has {len(scheduler.alphas_cumprod)} alphas_cumprod entries, its trained_betas, but "
             f"num_train_timesteps={last_train + 1}: diffusers spaces the timesteps over num_train_timesteps and "
             f"clamps those past the table to its last sigma. Build the scheduler with "
             f"num_train_timesteps=len(trained_betas).)" if len(scheduler.alphas_cumprod) < last_train + 1 else
             " (more steps than distinct noise levels, or a zero-terminal-SNR table whose last entries cross). Use "
             "fewer inference steps or another timestep_spacing."))
        )
    # alpha-bar of each sigma, from the clean end (level 0 = the last sigma) to the noisiest (level n)
    table = torch.flip(C.vp_abar_of_sigma(levels), [0])
    schedule = SigmaGridSchedule(table, ts)
    transition = (EulerAncestralAsDDIM if ancestral else EulerDiscreteAsDDIM)(schedule, prediction=predictions[prediction])
    steps = torch.arange(n, 0, -1, dtype=torch.float64)
    grid = transition.make_grid(TimeGrid(steps, steps - 1.0, ts, schedule.kind))
    return transition, grid


def euler_state_scales(transition: SkipTransition, grid: TimeGrid) -> Tuple[float, float]:
    r"""For ``from_diffusers(EulerDiscreteScheduler)`` (and ``EulerAncestralDiscreteScheduler``): ``(into, out_of)`` such that the sampler's state is
    ``latents * into`` at the start and the scheduler's latents are ``x * out_of`` at the end.

    The state is the model's input :math:`x_\sigma / \sqrt{\sigma^2 + 1}` (``scale_model_input``), so
    ``into`` :math:`= 1 / \sqrt{\sigma_0^2 + 1}` and ``out_of`` :math:`= \sqrt{\sigma_{end}^2 + 1}` (1 when the
    last sigma is 0, ``final_sigmas_type="zero"``). For any other transition both are 1.
    """
    if isinstance(transition, EulerDiscreteAsDDIM):
        alpha_in, _ = transition.schedule.alpha_sigma(grid.t_from[:1])
        alpha_out, _ = transition.schedule.alpha_sigma(grid.t_to[-1:])
        return float(alpha_in[0]), 1.0 / float(alpha_out[0])
    return 1.0, 1.0


def from_diffusers(
    scheduler: Any,
    num_inference_steps: Optional[int] = None,
    mu: Optional[float] = None,
    *,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    timesteps: Any = None,
    sigmas: Any = None,
) -> Tuple[SkipTransition, TimeGrid]:
    """The skip transition and time grid that reproduce a diffusers scheduler's sampling loop.

    Arguments:
        scheduler: a ``DDIMScheduler``, ``DDPMScheduler``, ``FlowMatchEulerDiscreteScheduler``,
            ``DPMSolverMultistepScheduler`` (DPM-Solver++ of order 1 or 2), ``EulerDiscreteScheduler`` (its
            deterministic step, ``s_churn = 0``), ``EulerAncestralDiscreteScheduler`` or ``UniPCMultistepScheduler``
            (UniPC with its corrector, order 1 or 2), or its ``config`` (a mapping;
            its class is its ``_class_name``, or the supported class whose options are exactly the
            config's keys; instantiating it needs diffusers).
        num_inference_steps: T, the number of model calls (as ``scheduler.set_timesteps(T)``); may be left
            out when ``timesteps`` or ``sigmas`` are given (else it must equal their length).
        mu: the dynamic shift of a flow scheduler with ``use_dynamic_shifting=True`` (as
            ``set_timesteps(T, mu=mu)``); ignored otherwise, as diffusers does.
        eta: DDIM's eta (``scheduler.step(..., eta=eta)``); the transition is stochastic for eta > 0,
            and the per-step noise z_i of a :class:`~driffusion_core.NoiseSource` plays diffusers'
            ``variance_noise``.
        use_clipped_model_output: DDIM's ``use_clipped_model_output`` (re-derive eps_hat from the
            clipped x0_hat).
        timesteps: custom timesteps, as ``set_timesteps(timesteps=...)``: ``DDPMScheduler`` (integers,
            decreasing; each step goes to the next listed one, the last to the clean end) and
            ``FlowMatchEulerDiscreteScheduler`` (the model times; with ``sigmas`` or alone, as diffusers).
        sigmas: custom sigmas of a ``FlowMatchEulerDiscreteScheduler`` (or of a ``UniPCMultistepScheduler``
            with ``use_flow_sigmas=True``), as ``set_timesteps(sigmas=...)`` (shifted as the scheduler shifts
            them; the final sigma is appended).

    Returns:
        ``(transition, grid)``: a :class:`~driffusion_core.SkipTransition` (``DDIMSkip``, ``DDPMSkip``,
        ``FlowEulerSkip``, ``DPMSolverSkip``, ``UniPCSkip`` or, for Euler, :class:`EulerDiscreteAsDDIM` /
        :class:`EulerAncestralAsDDIM`) and the
        :class:`~driffusion_core.TimeGrid` whose ``model_times`` are the timesteps diffusers passes to the model.

    EulerDiscreteScheduler and EulerAncestralDiscreteScheduler: the sampler's state is what its loop passes to the model,
    ``latents / sqrt(sigma**2 + 1)`` (``scale_model_input``), not the latents themselves. With
    ``into, out_of = euler_state_scales(transition, grid)``, sample from ``latents * into`` (the loop's initial
    ``latents = randn * scheduler.init_noise_sigma``) and the loop's result is ``out.x * out_of`` (``out_of`` is 1
    when the last sigma is 0). Call the model on the state as it is; no ``scale_model_input``. The ancestral
    step's noise is a NoiseSource's per-step z_i (diffusers' ``randn_tensor`` in its ``step``).

    The scheduler is only read (a flow or DPM-Solver scheduler's grid comes from ``set_timesteps`` on a
    copy). A DDPM or flow scheduler that already holds custom timesteps / sigmas (an earlier
    ``set_timesteps(timesteps=..., sigmas=...)``) other than the grid built here is refused: pass them; a
    DPM-Solver scheduler holding custom timesteps is refused (it takes no custom ones here).
    Options it cannot reproduce raise :class:`~driffusion_core.errors.InvalidArgumentError` naming them.
    """
    return _from_diffusers(scheduler, num_inference_steps, mu, eta, use_clipped_model_output,
                           timesteps, sigmas, check_held=True)


_MU_MAX = 100.0  # exp(mu) is the dynamic shift; far beyond any image size, well below float overflow


def _from_diffusers(scheduler_or_config, num_inference_steps, mu, eta, use_clipped_model_output, timesteps, sigmas,
                    check_held: bool):
    """:func:`from_diffusers`; ``check_held=False`` for diffusers' pipelines, whose ``__call__`` runs
    ``set_timesteps(num_inference_steps)`` itself and so drops custom timesteps the scheduler held."""
    scheduler, name = _as_scheduler(scheduler_or_config)
    cfg = dict(scheduler.config)
    if mu is not None and (not is_real(mu) or not abs(float(mu)) <= _MU_MAX):
        raise InvalidArgumentError(
            f"mu must be a finite number with |mu| <= {_MU_MAX:g} (dynamic shifting multiplies the noise odds by "
            f"exp(mu); diffusers' pipelines give about 0.5 to 1.2: solvers.interop.pipelines.calculate_shift), got {mu!r}."
        )
    if name != "DDIMScheduler" and (eta != 0.0 or use_clipped_model_output):
        raise InvalidArgumentError(f"eta and use_clipped_model_output are DDIMScheduler options; {name} has neither.")
    custom = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
    flow_unipc = name == "UniPCMultistepScheduler" and cfg.get("use_flow_sigmas", False)
    takes = {"DDPMScheduler": ("timesteps",), "FlowMatchEulerDiscreteScheduler": ("timesteps", "sigmas"),
             "UniPCMultistepScheduler": ("sigmas",) if flow_unipc else ()}.get(name, ())
    for key in custom:
        if key not in takes:
            has = f"takes only {' and '.join(takes)}" if takes else "takes neither custom timesteps nor sigmas"
            if name == "UniPCMultistepScheduler" and key == "sigmas":
                has += " (custom sigmas only with use_flow_sigmas=True, as its set_timesteps)"
            raise InvalidArgumentError(
                f"from_diffusers({key}=...) is not supported for {name}: here {name} {has}. Pass "
                f"num_inference_steps (its timestep_spacing places the steps), or build your own TimeGrid."
            )
    if custom:
        lengths = [_length(v) for v in custom.values()]
        if num_inference_steps is not None and set(lengths) != {num_inference_steps}:
            raise InvalidArgumentError(
                f"num_inference_steps={num_inference_steps!r} but {' and '.join(custom)} list "
                f"{' and '.join(map(str, lengths))} values: "
                f"leave num_inference_steps out with custom {' / '.join(custom)} (their length is the step count)."
            )
    else:
        if num_inference_steps is None:
            raise InvalidArgumentError(
                "from_diffusers needs num_inference_steps (as scheduler.set_timesteps(num_inference_steps)), or "
                "custom timesteps= / sigmas= where the scheduler takes them."
            )
        num_inference_steps = as_count(num_inference_steps, "num_inference_steps", 1)
        n_train = int(cfg.get("num_train_timesteps", 1000))
        if name in ("DDIMScheduler", "DDPMScheduler") and num_inference_steps > n_train:  # as diffusers refuses it
            raise InvalidArgumentError(
                f"num_inference_steps={num_inference_steps} is more than the {name}'s num_train_timesteps={n_train}: "
                f"its steps are distinct training timesteps, so it takes at most {n_train} (diffusers' "
                f"set_timesteps refuses it too)."
            )
    if name == "DDIMScheduler":
        return _ddim(scheduler, cfg, num_inference_steps, float(eta), bool(use_clipped_model_output))
    if name == "DDPMScheduler":
        return _ddpm(scheduler, cfg, None if custom else num_inference_steps, timesteps,
                     check_held and scheduler is scheduler_or_config)
    if name == "UniPCMultistepScheduler":
        return _unipc(scheduler, cfg, None if custom else num_inference_steps,
                      check_held and scheduler is scheduler_or_config, mu, sigmas)
    if name == "DPMSolverMultistepScheduler":
        return _dpm(scheduler, cfg, num_inference_steps, check_held and scheduler is scheduler_or_config, mu)
    if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        return _euler(scheduler, cfg, num_inference_steps, check_held and scheduler is scheduler_or_config, name)
    return _flow(scheduler, cfg, None if custom else num_inference_steps, mu, sigmas, timesteps,
                 check_held and scheduler is scheduler_or_config)

r"""From a diffusers scheduler (or its config) to a skip transition and a time grid.

``from_diffusers(scheduler, T)`` reads the scheduler's *configuration and tables* and builds the
matching operator; it never calls the scheduler's stateful ``step`` (its step index moves on every
call, so drafts cannot go through it). Width 1 of :class:`~driffusion_core.DraftRefineScheduler`
with the result reproduces the scheduler's own loop ``set_timesteps(T); for t: step(model(x, t), t, x)``.

Key (diffusers' names -> ours):

* ``alphas_cumprod`` -> :class:`~driffusion_core.VPSchedule` table :math:`\bar\alpha_t` (taken from the
  scheduler itself, so every ``beta_schedule``, ``trained_betas`` and ``rescale_betas_zero_snr`` is exact);
* DDIM ``final_alpha_cumprod`` (``set_alpha_to_one``) -> ``VPSchedule(final_alpha_cumprod=...)``; DDPM uses 1;
* ``timestep_spacing``, ``steps_offset`` -> :meth:`VPSchedule.timesteps`; DDIM steps to
  ``t - num_train_timesteps // T`` (``step_to="stride"``), DDPM to the next listed timestep;
* ``thresholding`` -> :class:`~driffusion_core.DynamicThreshold`, else ``clip_sample`` ->
  :class:`~driffusion_core.ClipSample` (diffusers' precedence);
* DDPM ``variance_type`` fixed_small / fixed_small_log / fixed_large (None: fixed_small, as diffusers) -> :class:`~solvers.DDPMSkip`;
* flow sigmas (``shift`` or a later ``set_shift()``, ``use_dynamic_shifting`` with ``mu``, ``shift_terminal``,
  Karras / exponential / beta sigmas, linear time shift) -> read from the scheduler's own ``set_timesteps``
  on a private copy, so the grid is diffusers' own (the step is the same Euler step);
* ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``) -> :class:`~solvers.DPMSolverSkip`
  (``solver_order`` 1 or 2, ``solver_type``, ``lower_order_final``, ``euler_at_final``); its timesteps
  (``timestep_spacing``, ``steps_offset``, ``lambda_min_clipped``) are read from its own ``set_timesteps``
  on a private copy, and the last step goes to level -1 (sigma = 0, ``final_sigmas_type="zero"``) or to
  level 0 (``alphas_cumprod[0]``, ``final_sigmas_type="sigma_min"``). Refused: the noise-prediction and
  SDE variants, third order, Karras / exponential / beta / Lu-lambda / flow sigmas (their levels are not
  training timesteps), learned variances and ``flow_prediction``.

A config (a mapping) is instantiated with diffusers; its class is its ``_class_name``, or, for the
``config`` of a scheduler built in code (no ``_class_name``), the supported class whose options are
exactly the config's keys; any other config is refused.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch

from driffusion_core.errors import InvalidArgumentError, as_count
from driffusion_core.grid import TimeGrid
from driffusion_core.parameterization import ClipSample, DynamicThreshold
from driffusion_core.schedules import FlowSchedule, VPSchedule
from driffusion_core.transition import SkipTransition
from solvers.ddim import DDIMSkip
from solvers.ddpm import DDPMSkip
from solvers.dpm import DPMSolverSkip
from solvers.flow import FlowEulerSkip

__all__ = ["from_diffusers", "SUPPORTED_SCHEDULERS"]

SUPPORTED_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler",
)

# None: diffusers' _get_variance matches no branch and keeps the posterior variance, i.e. fixed_small
_DDPM_VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                  None: "fixed_small"}


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


def _vp_schedule(scheduler, final_alpha_cumprod: float) -> VPSchedule:
    return VPSchedule(scheduler.alphas_cumprod.detach().cpu(), final_alpha_cumprod=final_alpha_cumprod)


def _trailing_off_by_one(name: str, num_train: int, num_inference_steps: int, last: Optional[int] = None) -> None:
    """Refuse the T where diffusers' trailing spacing lists T + 1 timesteps.

    ``np.arange(last, 0, -num_train / T)`` (``last`` = num_train but for DPM-Solver's lambda_min_clipped)
    rounds up to T + 1 entries for some T (1000 training steps: 61, 103, 121, ...); diffusers then runs
    T + 1 steps, the last model call at timestep -1 (alphas_cumprod[-1]).
    That loop cannot be reproduced by a grid of T steps to the clean end, so say so instead.
    """
    last = num_train if last is None else last

    def count(m: int) -> int:
        return len(np.arange(last, 0, -num_train / m))

    if count(num_inference_steps) == num_inference_steps:
        return
    near = [m for d in range(1, 50) for m in (num_inference_steps - d, num_inference_steps + d)
            if 1 <= m <= last and count(m) == m][:2]
    raise InvalidArgumentError(
        f"{name} with timestep_spacing='trailing' and num_inference_steps={num_inference_steps}: diffusers lists "
        f"{num_inference_steps + 1} timesteps, the last -1 (np.arange rounds up to an extra entry), so its loop "
        f"makes {num_inference_steps + 1} model calls, one at timestep -1. DRiffusion does not reproduce that; use num_inference_steps={' or '.join(map(str, sorted(near)))}, or another timestep_spacing "
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
    schedule = _vp_schedule(scheduler, float(scheduler.final_alpha_cumprod))
    transition = DDIMSkip(
        schedule,
        prediction=cfg.get("prediction_type", "epsilon"),
        eta=eta,
        x0_transform=_x0_transform(cfg),
        recompute_eps=use_clipped_model_output,
    )
    return transition, _vp_grid(schedule, cfg, num_inference_steps, "stride", "DDIMScheduler")


def _ddpm(scheduler, cfg, num_inference_steps: int):
    variance_type = cfg.get("variance_type", "fixed_small")
    if variance_type not in _DDPM_VARIANCE:
        raise InvalidArgumentError(
            f"DDPMScheduler variance_type={variance_type!r} is not supported: DRiffusion takes "
            f"{', '.join(map(str, _DDPM_VARIANCE))} (learned variances need the model's variance output at every draft, "
            f"and diffusers' own step takes the square root of a log for 'fixed_large_log')."
        )
    schedule = _vp_schedule(scheduler, 1.0)
    transition = DDPMSkip(
        schedule,
        prediction=cfg.get("prediction_type", "epsilon"),
        variance_type=_DDPM_VARIANCE[variance_type],
        x0_transform=_x0_transform(cfg),
    )
    return transition, _vp_grid(schedule, cfg, num_inference_steps, "next", "DDPMScheduler")


def _flow(scheduler, cfg, num_inference_steps: int, mu: Optional[float]):
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
    n_train = int(cfg.get("num_train_timesteps", 1000))
    # the scheduler's current shift: set_shift() changes it, not its config
    schedule = FlowSchedule(float(getattr(scheduler, "shift", cfg.get("shift", 1.0))), n_train, dynamic)
    transition = FlowEulerSkip(schedule, prediction="velocity")
    # The sigmas are the scheduler's own set_timesteps, on a copy so the user's is untouched: it spans
    # sigma_max..sigma_min as computed at construction (set_shift() does not move them) and applies
    # shift_terminal, Karras / exponential / beta sigmas and the linear time shift.
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(num_inference_steps, device="cpu", **({"mu": mu} if mu is not None else {}))
    sigmas = probe.sigmas.detach().cpu()
    grid = TimeGrid(sigmas[:-1].to(torch.float64), sigmas[1:].to(torch.float64), probe.timesteps.detach().cpu().clone(),
                    schedule.kind)
    schedule.validate(grid)
    return transition, grid


# DPMSolverMultistepScheduler's sigma options: each puts the levels between training timesteps
_DPM_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")


def _refuse_dpm(option: str, value: Any, why: str, instead: str):
    raise InvalidArgumentError(f"DPMSolverMultistepScheduler({option}={value!r}) is not supported: {why}. {instead}")


def _dpm(scheduler, cfg, num_inference_steps: int):
    algorithm = cfg.get("algorithm_type", "dpmsolver++")
    if algorithm != "dpmsolver++":
        _refuse_dpm("algorithm_type", algorithm,
                    "only DPM-Solver++ (data prediction, deterministic) is implemented; the noise-prediction "
                    "('dpmsolver') and stochastic ('sde-dpmsolver', 'sde-dpmsolver++') variants are not",
                    "Use algorithm_type='dpmsolver++' (diffusers' default), e.g. "
                    "DPMSolverMultistepScheduler.from_config(config, algorithm_type='dpmsolver++').")
    for option in _DPM_SIGMAS:
        if cfg.get(option, False):
            _refuse_dpm(option, cfg[option],
                        "its levels are sigmas between the training timesteps (fractional timesteps, or a flow "
                        "interpolant), not the training timesteps DRiffusion's VP grid reproduces; not implemented",
                        f"Leave {option}=False (timestep_spacing chooses the timesteps), or drive DPMSolverSkip "
                        f"with your own TimeGrid.")
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
    if prediction not in ("epsilon", "sample", "v_prediction"):
        _refuse_dpm("prediction_type", prediction,
                    "flow_prediction goes with use_flow_sigmas (a flow interpolant), which is not implemented",
                    "For a flow-matching model use FlowMatchEulerDiscreteScheduler, or "
                    "DPMSolverSkip(FlowSchedule(...), prediction='velocity') with your own grid.")
    final = cfg.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min"):  # pragma: no cover - diffusers refuses it in set_timesteps
        _refuse_dpm("final_sigmas_type", final, "it is neither 'zero' nor 'sigma_min'", "Use 'zero' or 'sigma_min'.")

    # alphas_cumprod as the scheduler holds it: every beta_schedule and trained_betas, and with
    # rescale_betas_zero_snr diffusers' alphas_cumprod[-1] = 2**-24 (not 0, so sigma stays finite).
    # That can sit above the entries just before it (linear betas: timesteps 996..998 are below 2**-24),
    # which a VPSchedule (alpha-bar never increasing) cannot hold: those entries are raised to 2**-24,
    # and a grid that visits one of them is refused below (diffusers would step *up* in noise there).
    table = scheduler.alphas_cumprod.detach().cpu().to(torch.float64)
    monotone = torch.flip(torch.cummax(torch.flip(table, [0]), 0).values, [0])
    raised = monotone != table
    schedule = VPSchedule(monotone, final_alpha_cumprod=1.0)
    transition = DPMSolverSkip(
        schedule,
        prediction=prediction,
        order=int(order),
        solver_type=cfg.get("solver_type", "midpoint"),
        lower_order_final=bool(cfg.get("lower_order_final", True)),
        euler_at_final=bool(cfg.get("euler_at_final", False)),
        x0_transform=_x0_transform(cfg),
    )
    # The timesteps are the scheduler's own set_timesteps (on a copy): DPM-Solver's leading spacing
    # divides by T + 1, lambda_min_clipped shortens the range. The levels are those training timesteps
    # (diffusers' sigmas are the table's there), then -1 (sigma = 0) or 0 (the sigma of alphas_cumprod[0]).
    if cfg.get("timestep_spacing", "linspace") == "trailing":
        clipped = int(torch.searchsorted(torch.flip(scheduler.lambda_t, [0]), cfg.get("lambda_min_clipped", -float("inf"))))
        _trailing_off_by_one("DPMSolverMultistepScheduler", schedule.num_train_timesteps, num_inference_steps,
                             last=schedule.num_train_timesteps - clipped)
    probe = copy.deepcopy(scheduler)
    with warnings.catch_warnings():  # diffusers' own numpy-2 DeprecationWarning (np.array of a tensor)
        warnings.simplefilter("ignore", DeprecationWarning)
        probe.set_timesteps(num_inference_steps, device="cpu")
    timesteps = probe.timesteps.detach().cpu().clone()
    t_from = timesteps.to(torch.float64)
    if bool((t_from[1:] >= t_from[:-1]).any()):
        raise InvalidArgumentError(
            f"DPMSolverMultistepScheduler.set_timesteps({num_inference_steps}) lists a timestep twice: more steps "
            f"than timestep_spacing={cfg.get('timestep_spacing')!r} has distinct training timesteps "
            f"(lambda_min_clipped={cfg.get('lambda_min_clipped')} may shorten the range). Use fewer inference steps."
        )
    if final == "sigma_min" and float(t_from[-1]) <= 0.0:
        raise InvalidArgumentError(
            f"DPMSolverMultistepScheduler(final_sigmas_type='sigma_min') with {num_inference_steps} steps: the last "
            f"timestep is already 0, whose sigma is sigma_min, so the last step would have length zero (diffusers "
            f"divides by h = 0 there). Use final_sigmas_type='zero', fewer steps, or another timestep_spacing."
        )
    if bool(raised[timesteps.long()].any()):
        bad = [int(t) for t in timesteps.tolist() if bool(raised[int(t)])]
        raise InvalidArgumentError(
            f"DPMSolverMultistepScheduler.set_timesteps({num_inference_steps}) visits timesteps {bad}, whose "
            f"alphas_cumprod lie below the 2**-24 diffusers puts at the last timestep for rescale_betas_zero_snr: "
            f"alpha-bar would increase with the noise level there. Use fewer inference steps."
        )
    last = t_from.new_tensor([-1.0 if final == "zero" else 0.0])
    grid = transition.make_grid(TimeGrid(t_from, torch.cat([t_from[1:], last]), timesteps, schedule.kind))
    return transition, grid


def from_diffusers(
    scheduler_or_config: Any,
    num_inference_steps: int,
    mu: Optional[float] = None,
    *,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
) -> Tuple[SkipTransition, TimeGrid]:
    """The skip transition and time grid that reproduce a diffusers scheduler's sampling loop.

    Arguments:
        scheduler_or_config: a ``DDIMScheduler``, ``DDPMScheduler``, ``FlowMatchEulerDiscreteScheduler`` or
            ``DPMSolverMultistepScheduler`` (DPM-Solver++ of order 1 or 2), or its ``config`` (a mapping;
            its class is its ``_class_name``, or the supported class whose options are exactly the
            config's keys; instantiating it needs diffusers).
        num_inference_steps: T, the number of model calls (as ``scheduler.set_timesteps(T)``).
        mu: the dynamic shift of a flow scheduler with ``use_dynamic_shifting=True`` (as
            ``set_timesteps(T, mu=mu)``); ignored otherwise, as diffusers does.
        eta: DDIM's eta (``scheduler.step(..., eta=eta)``); the transition is stochastic for eta > 0,
            and the per-step noise z_i of a :class:`~driffusion_core.NoiseSource` plays diffusers'
            ``variance_noise``.
        use_clipped_model_output: DDIM's ``use_clipped_model_output`` (re-derive eps_hat from the
            clipped x0_hat).

    Returns:
        ``(transition, grid)``: a :class:`~driffusion_core.SkipTransition` (``DDIMSkip``, ``DDPMSkip``,
        ``FlowEulerSkip`` or ``DPMSolverSkip``) and the :class:`~driffusion_core.TimeGrid` whose
        ``model_times`` are the timesteps diffusers passes to the model.

    The scheduler is only read (a flow or DPM-Solver scheduler's grid comes from ``set_timesteps`` on a
    copy). Options it cannot reproduce raise :class:`~driffusion_core.errors.InvalidArgumentError` naming them.
    """
    scheduler, name = _as_scheduler(scheduler_or_config)
    cfg = dict(scheduler.config)
    num_inference_steps = as_count(num_inference_steps, "num_inference_steps", 1)
    if name != "DDIMScheduler" and (eta != 0.0 or use_clipped_model_output):
        raise InvalidArgumentError(f"eta and use_clipped_model_output are DDIMScheduler options; {name} has neither.")
    if name == "DDIMScheduler":
        return _ddim(scheduler, cfg, num_inference_steps, float(eta), bool(use_clipped_model_output))
    if name == "DDPMScheduler":
        return _ddpm(scheduler, cfg, num_inference_steps)
    if name == "DPMSolverMultistepScheduler":
        return _dpm(scheduler, cfg, num_inference_steps)
    return _flow(scheduler, cfg, num_inference_steps, mu)

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
* DDPM ``variance_type`` fixed_small / fixed_small_log / fixed_large -> :class:`~solvers.DDPMSkip`;
* flow ``shift`` / ``use_dynamic_shifting`` with ``mu`` -> :meth:`FlowSchedule.timesteps`; the other sigma
  options (``shift_terminal``, Karras / exponential / beta sigmas, linear time shift) are read from the
  scheduler's own ``set_timesteps`` on a private copy (the step is the same Euler step).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional, Tuple

import torch

from driffusion_core.errors import InvalidArgumentError
from driffusion_core.grid import TimeGrid
from driffusion_core.parameterization import ClipSample, DynamicThreshold
from driffusion_core.schedules import FlowSchedule, VPSchedule
from driffusion_core.transition import SkipTransition
from solvers.ddim import DDIMSkip
from solvers.ddpm import DDPMSkip
from solvers.flow import FlowEulerSkip

__all__ = ["from_diffusers", "SUPPORTED_SCHEDULERS"]

SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler")

_DDPM_VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}


def _class_of_config(cfg: Mapping[str, Any]) -> Optional[str]:
    """The scheduler class a config belongs to: its ``_class_name`` (saved configs carry it), else the
    option only that class has (``scheduler.config`` of a scheduler built in code has no ``_class_name``)."""
    if "_class_name" in cfg:
        return cfg["_class_name"]
    if "set_alpha_to_one" in cfg:
        return "DDIMScheduler"
    if "variance_type" in cfg:
        return "DDPMScheduler"
    if "shift" in cfg and "beta_start" not in cfg:
        return "FlowMatchEulerDiscreteScheduler"
    return None


def _as_scheduler(scheduler_or_config: Any):
    """The scheduler object and its class name; a config is instantiated with diffusers."""
    if isinstance(scheduler_or_config, Mapping):
        cfg = dict(scheduler_or_config)
        name = _class_of_config(cfg)
        if name not in SUPPORTED_SCHEDULERS:
            raise InvalidArgumentError(
                f"This config is not one of {SUPPORTED_SCHEDULERS} (its '_class_name' is {cfg.get('_class_name')!r}). "
                f"Pass the scheduler object, or the config of one of these schedulers."
            )
        try:
            import diffusers
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError("from_diffusers(config) needs diffusers: pip install 'driffusion[diffusers]'.") from e
        return getattr(diffusers, name).from_config(cfg), name
    name = type(scheduler_or_config).__name__
    if name not in SUPPORTED_SCHEDULERS or not hasattr(scheduler_or_config, "config"):
        raise InvalidArgumentError(
            f"from_diffusers supports {', '.join(SUPPORTED_SCHEDULERS)}, got {name}. Swap the pipeline's scheduler, "
            f"e.g. pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)."
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


def _vp_grid(schedule: VPSchedule, cfg: Mapping[str, Any], num_inference_steps: int, step_to: str) -> TimeGrid:
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
    return transition, _vp_grid(schedule, cfg, num_inference_steps, "stride")


def _ddpm(scheduler, cfg, num_inference_steps: int):
    variance_type = cfg.get("variance_type", "fixed_small")
    if variance_type not in _DDPM_VARIANCE:
        raise InvalidArgumentError(
            f"DDPMScheduler variance_type={variance_type!r} is not supported: DRiffusion takes "
            f"{', '.join(_DDPM_VARIANCE)} (learned variances need the model's variance output at every draft, "
            f"and diffusers' own step takes the square root of a log for 'fixed_large_log')."
        )
    schedule = _vp_schedule(scheduler, 1.0)
    transition = DDPMSkip(
        schedule,
        prediction=cfg.get("prediction_type", "epsilon"),
        variance_type=_DDPM_VARIANCE[variance_type],
        x0_transform=_x0_transform(cfg),
    )
    return transition, _vp_grid(schedule, cfg, num_inference_steps, "next")


_FLOW_FROM_SCHEDULER = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


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
    schedule = FlowSchedule(float(getattr(scheduler, "shift", cfg.get("shift", 1.0))), n_train, dynamic)
    transition = FlowEulerSkip(schedule, prediction="velocity")
    exotic = any(cfg.get(k) for k in _FLOW_FROM_SCHEDULER) or (dynamic and cfg.get("time_shift_type", "exponential") != "exponential")
    if not exotic:
        return transition, schedule.timesteps(num_inference_steps, mu=mu)
    # The sigmas come from the scheduler's own set_timesteps, on a copy so the user's is untouched.
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(num_inference_steps, device="cpu", **({"mu": mu} if mu is not None else {}))
    sigmas = probe.sigmas.detach().cpu()
    grid = TimeGrid(sigmas[:-1].to(torch.float64), sigmas[1:].to(torch.float64), probe.timesteps.detach().cpu().clone())
    schedule.validate(grid)
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
        scheduler_or_config: a ``DDIMScheduler``, ``DDPMScheduler`` or ``FlowMatchEulerDiscreteScheduler``,
            or its ``config`` (a mapping; its class is its ``_class_name``, or told by the options only
            that class has; instantiating it needs diffusers).
        num_inference_steps: T, the number of model calls (as ``scheduler.set_timesteps(T)``).
        mu: the dynamic shift of a flow scheduler with ``use_dynamic_shifting=True`` (as
            ``set_timesteps(T, mu=mu)``); ignored otherwise, as diffusers does.
        eta: DDIM's eta (``scheduler.step(..., eta=eta)``); the transition is stochastic for eta > 0,
            and the per-step noise z_i of a :class:`~driffusion_core.NoiseSource` plays diffusers'
            ``variance_noise``.
        use_clipped_model_output: DDIM's ``use_clipped_model_output`` (re-derive eps_hat from the
            clipped x0_hat).

    Returns:
        ``(transition, grid)``: a :class:`~driffusion_core.SkipTransition` (``DDIMSkip``, ``DDPMSkip`` or
        ``FlowEulerSkip``) and the :class:`~driffusion_core.TimeGrid` whose ``model_times`` are the
        timesteps diffusers passes to the model.

    The scheduler is only read (a copy is stepped through ``set_timesteps`` for exotic flow sigmas).
    """
    scheduler, name = _as_scheduler(scheduler_or_config)
    cfg = dict(scheduler.config)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise InvalidArgumentError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}.")
    if name != "DDIMScheduler" and (eta != 0.0 or use_clipped_model_output):
        raise InvalidArgumentError(f"eta and use_clipped_model_output are DDIMScheduler options; {name} has neither.")
    if name == "DDIMScheduler":
        return _ddim(scheduler, cfg, num_inference_steps, float(eta), bool(use_clipped_model_output))
    if name == "DDPMScheduler":
        return _ddpm(scheduler, cfg, num_inference_steps)
    return _flow(scheduler, cfg, num_inference_steps, mu)

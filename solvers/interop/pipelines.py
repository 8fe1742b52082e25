r"""A drop-in that runs a diffusers pipeline's denoising loop with DRiffusion.

``DRiffusionPipeline(pipe, width=4)(**the pipeline's own arguments)`` keeps everything of the
pipeline but its loop: the pipeline's own ``check_inputs``, ``encode_prompt`` (so ``prompt_embeds`` /
``negative_prompt_embeds`` work without a tokenizer; given embeddings are repeated per image for
``num_images_per_prompt``, as StableDiffusionPipeline does, SD3 and Flux included), ``prepare_latents`` (the same initial noise for
the same ``generator``), VAE decode, safety checker and ``image_processor.postprocess``. The loop
``for t: x = scheduler.step(model(x, t), t, x)`` becomes

    transition, grid = from_diffusers(pipe.scheduler, T)
    DraftRefineScheduler(transition, grid, width, mode).sample(DiffusersPredictor(model, w), latents, executor)

with classifier-free guidance in one batched call per draft batch. Width 1 reproduces the pipeline
(for DDIM with eta = 0, DPM-Solver++, UniPC, Euler and flow matching: the same images for the same generator;
for stochastic steps, given the same step noise).

Supported: ``DDPMPipeline`` / ``DDIMPipeline`` (unconditional), ``StableDiffusionPipeline``,
``StableDiffusionXLPipeline`` (its pooled embeddings and size / crop micro-conditioning as the UNet's
``added_cond_kwargs``), ``StableDiffusion3Pipeline`` and ``FluxPipeline`` (packed latents, its sigmas
``linspace(1, 1/T, T)`` shifted by mu from the sequence length, the distilled guidance embedding, and true
classifier-free guidance with ``true_cfg_scale`` and a negative prompt, both halves in one batched call) (and
their subclasses), with any scheduler :func:`from_diffusers` takes:
``DDIMScheduler``, ``DDPMScheduler``, ``FlowMatchEulerDiscreteScheduler``, ``DPMSolverMultistepScheduler`` or
``UniPCMultistepScheduler``
(diffusers' ``DDIMPipeline`` turns the scheduler it is given into DDIM; ``DDPMPipeline`` keeps it), and
``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` in ``StableDiffusionPipeline`` and
``StableDiffusionXLPipeline`` (the pipelines here that scale their noise and model input for it: the state is then ``latents / sqrt(sigma^2 + 1)``, see
:func:`~solvers.interop.diffusers_schedulers.euler_state_scales`).
Note the two widths: ``DRiffusionPipeline(width=...)`` is the number of drafts per round, the call's
``width=`` the image width, as in diffusers.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import numpy as np
import torch

from driffusion_core.errors import InvalidArgumentError, InvalidWidthError, UnexpectedArgumentError, as_count, as_flag
from driffusion_core.executor import Executor, check_executor
from driffusion_core.noise import NoiseSource
from driffusion_core.scheduler import DraftRefineScheduler, SampleOutput, check_mode
from solvers.interop.diffusers_models import DiffusersPredictor, by_class_name
from solvers.interop.diffusers_schedulers import _from_diffusers, euler_state_scales

__all__ = ["DRiffusionPipeline", "calculate_shift", "pipeline_family"]

FAMILIES = {
    "DDPMPipeline": "unconditional",
    "DDIMPipeline": "unconditional",
    "StableDiffusionPipeline": "stable_diffusion",
    "StableDiffusionXLPipeline": "stable_diffusion_xl",
    "StableDiffusion3Pipeline": "stable_diffusion_3",
    "FluxPipeline": "flux",
}


def pipeline_family(pipe: Any) -> str:
    """``"unconditional"``, ``"stable_diffusion"``, ``"stable_diffusion_xl"``, ``"stable_diffusion_3"`` or ``"flux"``,
    from the pipeline's class (or a base)."""
    family = by_class_name(pipe, FAMILIES)
    if family is not None:
        return family
    raise InvalidArgumentError(
        f"DRiffusionPipeline supports {', '.join(FAMILIES)} (and subclasses), got {type(pipe).__name__}. "
        f"For another pipeline, drive DraftRefineScheduler with from_diffusers() and DiffusersPredictor."
    )


def calculate_shift(image_seq_len: int, config: Mapping[str, Any]) -> float:
    r"""The dynamic shift :math:`\mu`, linear in the image sequence length (as diffusers' SD3 / Flux pipelines).

    :math:`\mu = b_0 + (L - L_0)(b_1 - b_0)/(L_1 - L_0)` with ``base_image_seq_len`` L_0, ``max_image_seq_len`` L_1,
    ``base_shift`` b_0, ``max_shift`` b_1 from the scheduler config.
    """
    l0, l1 = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    b0, b1 = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    m = (b1 - b0) / (l1 - l0)
    return image_seq_len * m + (b0 - m * l0)


def _seed_from(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())


class _PerImageNoise(NoiseSource):
    """Per-step noise whose row b comes from its own :class:`NoiseSource` (seeded from generator b): with a
    list of generators, image b's noise depends on its generator alone, not on the other images'."""

    def __init__(self, seeds):
        super().__init__(seeds[0])
        self.sources = [NoiseSource(seed) for seed in seeds]

    def __call__(self, step, shape, dtype=torch.float32, device=None):
        shape = tuple(shape)
        if not shape or shape[0] != len(self.sources):
            raise InvalidArgumentError(
                f"This noise has one stream per generator ({len(self.sources)}) but was asked for shape {shape}: "
                f"the batch dimension must be the number of generators."
            )
        return torch.stack([source(step, shape[1:], dtype, device) for source in self.sources])

    def __repr__(self) -> str:
        return f"NoiseSource per image (seeds {[source.seed for source in self.sources]})"


def _check_generators(generator, batch: int) -> None:
    """A list of generators has one per image (as diffusers' prepare_latents requires)."""
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise InvalidArgumentError(
            f"You passed a list of {len(generator)} generators but the batch has {batch} images: pass one generator "
            f"per image (a list of {batch}), or a single torch.Generator for the whole batch."
        )


def _is_default(value: Any, param: inspect.Parameter) -> bool:
    """Whether ``value`` is ``param``'s default: the same object, or an equal plain value (a bool, a number or a
    string of the default's type, or a list / tuple of such, e.g. ``callback_on_step_end_tensor_inputs``)."""
    default = param.default
    if default is param.empty:
        return False
    if value is default:
        return True
    plain = (bool, int, float, str, type(None))
    if isinstance(default, (list, tuple)) and type(value) is type(default) and len(value) == len(default):
        return all(isinstance(d, plain) and type(v) is type(d) and v == d for v, d in zip(value, default))
    return isinstance(default, plain[:-1]) and type(value) is type(default) and value == default


def _check_latents(latents: Any, images: int) -> None:
    """Given latents hold one row per image (diffusers' prepare_latents takes them as they are; a wrong
    count would surface later as a conditioning tensor that does not match x)."""
    if isinstance(latents, torch.Tensor) and (latents.dim() < 1 or latents.shape[0] != images):
        raise InvalidArgumentError(
            f"latents has shape {tuple(latents.shape)}, but this call makes {images} image(s) (the prompts times "
            f"num_images_per_prompt, or batch_size): give latents one row per image."
        )


def _noise_for(transition: Any, generator, noise: Optional[NoiseSource], batch: int) -> Optional[NoiseSource]:
    """The per-step noise of a stochastic transition (None for a deterministic one): the given NoiseSource,
    else one seeded from the pipeline's generator; with a list of generators, each image's rows from a stream
    seeded from its own generator."""
    if not transition.stochastic:
        return None
    if noise is not None or generator is None:
        return noise
    if isinstance(generator, (list, tuple)):
        _check_generators(generator, batch)
        return _PerImageNoise([_seed_from(g) for g in generator])
    return NoiseSource(_seed_from(generator))


def _scheduler_grid(scheduler: Any, num_inference_steps: int, mu: Optional[float] = None, eta: float = 0.0,
                    use_clipped_model_output: bool = False):
    """from_diffusers for a pipeline's scheduler: the pipelines call ``set_timesteps(num_inference_steps)``
    themselves, which drops custom timesteps the scheduler held, so those are not refused here."""
    return _from_diffusers(scheduler, num_inference_steps, mu, eta, use_clipped_model_output, None, None, check_held=False)


def _unet_start(pipe: Any, batch: int, height: int, width: int, dtype: torch.dtype, device: Any, generator: Any,
                latents: Optional[torch.Tensor], num_inference_steps: Any, eta: float):
    """SD / SDXL: ``(latents, transition, grid)``: the pipeline's initial latents and the sampler for its
    scheduler. ``scheduler.set_timesteps(num_inference_steps)`` comes first, as in the pipeline: an Euler
    scheduler's ``init_noise_sigma`` (the initial noise's scale in ``prepare_latents``) is that of the step
    count set last (our grid itself comes from the config, :func:`from_diffusers`)."""
    unet = pipe.unet
    if unet.config.time_cond_proj_dim is not None:
        raise InvalidArgumentError("UNets with time_cond_proj_dim (guidance embedding, LCM) are not supported.")
    num_inference_steps = as_count(num_inference_steps, "num_inference_steps", 1)  # as from_diffusers checks it
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    if isinstance(latents, torch.Tensor) and latents.dtype != dtype:
        raise InvalidArgumentError(
            f"latents are {latents.dtype} but the pipeline runs in {dtype} (its prompt embeddings' dtype, which its VAE "
            f"decodes): pass latents.to({dtype})."
        )
    _check_latents(latents, batch)
    latents = pipe.prepare_latents(batch, unet.config.in_channels, height, width, dtype, device, generator, latents)
    transition, grid = _scheduler_grid(pipe.scheduler, num_inference_steps, **_ddim_only(pipe.scheduler, {"eta": eta}))
    return latents, transition, grid


def _refuse_euler(pipe: Any) -> None:
    """EulerDiscreteScheduler (and EulerAncestralDiscreteScheduler) needs the pipeline to scale the initial noise by ``init_noise_sigma`` and the model
    input by ``scale_model_input``: Stable Diffusion's pipeline does, the unconditional and SD3 ones do not
    (their own loop with that scheduler samples the wrong thing), so there is nothing to reproduce."""
    name = type(pipe.scheduler).__name__
    if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        raise InvalidArgumentError(
            f"{type(pipe).__name__} with {name}: this pipeline neither scales its initial noise by "
            f"init_noise_sigma nor calls scale_model_input, which that scheduler needs (diffusers' own loop samples "
            f"the wrong distribution with it). Use DDIMScheduler or DPMSolverMultistepScheduler here "
            f"(e.g. DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)), or a StableDiffusionPipeline."
        )


def _ddim_only(scheduler: Any, options: Mapping[str, Any]) -> Mapping[str, Any]:
    """DDIM's step options (eta, use_clipped_model_output) for a DDIMScheduler; for any other scheduler
    nothing, as diffusers' pipelines pass them only where ``scheduler.step`` takes them."""
    return options if type(scheduler).__name__ == "DDIMScheduler" else {}


def _per_image(embeds: Optional[torch.Tensor], batch: int, num_images_per_prompt: int, name: str) -> Optional[torch.Tensor]:
    """Embeddings with one row per image: rows given per prompt are repeated ``num_images_per_prompt`` times
    in a row, as diffusers' ``encode_prompt`` repeats the ones it encodes (and StableDiffusionPipeline's
    the ones it is given)."""
    if embeds is None or embeds.shape[0] == batch * num_images_per_prompt:
        return embeds
    if embeds.shape[0] == batch:
        return embeds.repeat_interleave(num_images_per_prompt, dim=0)
    need = (f"{batch} (one per prompt)" if num_images_per_prompt == 1 else
            f"{batch} (one per prompt) or {batch * num_images_per_prompt} (one per image)")
    raise InvalidArgumentError(
        f"{name} has {embeds.shape[0]} rows; with {batch} prompt(s) and num_images_per_prompt={num_images_per_prompt} "
        f"it needs {need}."
    )


class DRiffusionPipeline:
    """Run a diffusers pipeline with DRiffusion's draft-and-refine loop.

    Arguments:
        pipe: a ``DDPMPipeline``, ``DDIMPipeline``, ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
            ``StableDiffusion3Pipeline`` or ``FluxPipeline``. The options of the pipeline's loop that DRiffusion does not replace
            (custom ``timesteps`` / ``sigmas``, ``denoising_end``, IP-adapters, step callbacks) are refused by name.
        width: drafts per round, n >= 1 (1 reproduces the pipeline's serial loop).
        mode: ``"aggressive"`` (1 + ceil((T-1)/n) rounds) or ``"conservative"``.
        executor: how a round runs (default ``backends.BatchedExecutor()``: the drafts and both CFG
            halves in one model call).
        progress: show a progress bar; None (the default) follows the pipeline's own
            ``pipe.set_progress_bar_config(disable=...)``, shown unless disabled there, as diffusers does.
        tolerance: with a number, the loop is :class:`~solvers.PicardScheduler` (``init="skip"``) instead of
            draft-and-refine: the tolerance dial from DRiffusion's latency (``float('inf')``) to the serial
            loop's exact result (0), at up to ``width`` model calls per round. ``mode`` does not apply then
            (a ``mode`` other than ``"aggressive"`` is refused).
        max_rounds: with ``tolerance``, PicardScheduler's latency budget (it finishes with draft-and-refine
            rounds in time).

    Calling it takes the pipeline's own arguments (``prompt_embeds``, ``num_inference_steps``,
    ``guidance_scale``, ``generator``, ``output_type``, ``height``/``width`` of the image, ...; positional
    ones in the order of the pipeline's ``__call__``, and only those it takes) plus ``noise``: a
    :class:`~driffusion_core.NoiseSource` for stochastic schedulers (default: seeded from ``generator``;
    with a list of generators, one per image, each image's rows from its own generator). It returns what
    the pipeline returns; the sampler's counts are in ``last_output``
    (:class:`~driffusion_core.SampleOutput`: ``.rounds``, ``.evals``).
    """

    def __init__(self, pipe: Any, width: int = 2, mode: str = "aggressive", executor: Optional[Executor] = None,
                 progress: Optional[bool] = None, tolerance: Optional[float] = None, max_rounds: Optional[int] = None):
        self.family = pipeline_family(pipe)
        try:
            width = as_count(width, "width", 1, None, InvalidWidthError)  # Python, numpy or 0-d tensor ints
        except InvalidWidthError:
            raise InvalidWidthError(f"width (drafts per round) must be an int >= 1, got {width!r}; 1 is the serial loop.") from None
        check_mode(mode)
        progress = None if progress is None else as_flag(progress, "progress")
        if executor is None:
            from backends import BatchedExecutor

            executor = BatchedExecutor()
        check_executor(executor)
        if tolerance is None and max_rounds is not None:
            raise InvalidArgumentError(
                "max_rounds is PicardScheduler's budget: give a tolerance too (e.g. tolerance=0.1, max_rounds=20); "
                "draft-and-refine's rounds are fixed by the width (1 + ceil((T - 1) / width) aggressive)."
            )
        if tolerance is not None:
            from solvers.picard import _check_tolerance

            if mode != "aggressive":
                raise InvalidArgumentError(
                    f"mode={mode!r} applies to draft-and-refine; with a tolerance the loop is PicardScheduler, which "
                    f"has no mode (its budget fallback is aggressive). Drop mode, or the tolerance."
                )
            tolerance = _check_tolerance(tolerance)
            if max_rounds is not None:
                max_rounds = as_count(max_rounds, "max_rounds", 1)
        self.pipe, self.width, self.mode, self.executor, self.progress = pipe, width, mode, executor, progress
        self.tolerance, self.max_rounds = tolerance, max_rounds
        self.last_output: Optional[SampleOutput] = None

    # ----------------------------------------------------------------- the loop
    def _sample(self, model, guidance_scale, transition, grid, latents, cond, noise, model_kwargs=None, guidance_rescale=0.0):
        predictor = DiffusersPredictor(model, guidance_scale, guidance_rescale, model_kwargs=model_kwargs)
        cond = {k: v for k, v in cond.items() if v is not None}
        if self.tolerance is None:
            sched = DraftRefineScheduler(transition, grid, self.width, self.mode)
        else:
            from solvers.picard import PicardScheduler

            sched = PicardScheduler(transition, grid, self.width, self.tolerance, max_rounds=self.max_rounds)
        progress = self.progress
        if progress is None:  # as the pipeline's own loop: shown unless set_progress_bar_config(disable=True)
            progress = not bool(getattr(self.pipe, "_progress_bar_config", {}).get("disable", False))
        out = sched.sample(predictor, latents, executor=self.executor, noise=noise, cond=cond, progress=progress)
        self.last_output = out
        return out.x

    def _sample_latents(self, unet, guidance_scale, transition, grid, latents, cond, generator, noise, model_kwargs,
                        guidance_rescale):
        """The SD / SDXL loop on the pipeline's latents: with EulerDiscreteScheduler the sampler's state is the
        model's input latents / sqrt(sigma^2 + 1) (scales 1, 1 otherwise); the step noise from ``noise`` or
        seeded from ``generator`` for a stochastic scheduler."""
        into, out_of = euler_state_scales(transition, grid)
        latents = self._sample(unet, guidance_scale, transition, grid, latents * into if into != 1.0 else latents, cond,
                               _noise_for(transition, generator, noise, latents.shape[0]),
                               model_kwargs, guidance_rescale)
        return latents * out_of if out_of != 1.0 else latents

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The pipeline's call (same arguments, same output type), its denoising loop run with DRiffusion."""
        run = {"unconditional": self._unconditional, "stable_diffusion": self._stable_diffusion,
               "stable_diffusion_xl": self._stable_diffusion_xl, "stable_diffusion_3": self._stable_diffusion_3,
               "flux": self._flux}[self.family]
        ours = inspect.signature(run).parameters
        name = type(self.pipe).__name__
        # the arguments as the wrapped pipeline's own __call__ takes them: its names (positional arguments
        # in its order) and only those it accepts, so DDPMPipeline refuses eta as diffusers does
        theirs = inspect.signature(self.pipe.__call__).parameters
        open_ended = any(p.kind is p.VAR_KEYWORD for p in theirs.values())
        accepted = [p for p in ours if p == "noise" or p in theirs or open_ended]
        takes = (f"It takes {', '.join(accepted)} (the {'unconditional' if self.family == 'unconditional' else 'pipeline'}'s "
                 f"own arguments{', no prompt' if self.family == 'unconditional' else ''}, plus noise).")
        noise = kwargs.pop("noise", None)
        try:
            bound = inspect.Signature([p for p in theirs.values() if p.kind is not p.VAR_POSITIONAL]).bind(*args, **kwargs)
        except TypeError as e:
            raise UnexpectedArgumentError(f"{name} with DRiffusion: {e}. {takes}") from None
        given = {}
        for key, value in bound.arguments.items():
            given.update(value if theirs[key].kind is theirs[key].VAR_KEYWORD else {key: value})
        # an argument the drop-in does not take, passed at the pipeline's own default, changes nothing: dropped
        # (a caller forwarding a full set of keyword arguments); any other value of it is refused
        given = {key: value for key, value in given.items()
                 if key in ours or key not in theirs or not _is_default(value, theirs[key])}
        unsupported = [key for key in given if key not in ours]
        if unsupported:
            raise UnexpectedArgumentError(
                f"{name} with DRiffusion: {', '.join(map(repr, unsupported))} {'is' if len(unsupported) == 1 else 'are'} "
                f"not supported (DRiffusion replaces the denoising loop). {takes}"
            )
        if noise is not None:
            if not isinstance(noise, NoiseSource):
                raise InvalidArgumentError(
                    f"noise must be a driffusion_core.NoiseSource (the per-step noise of stochastic schedulers; by "
                    f"default seeded from the pipeline's generator), got {type(noise).__name__}."
                )
            given["noise"] = noise
        with torch.no_grad():
            return run(**given)

    # ----------------------------------------------------------------- DDPM / DDIM pipelines
    def _unconditional(
        self,
        batch_size: int = 1,
        generator=None,
        num_inference_steps: Optional[int] = None,
        eta: float = 0.0,
        use_clipped_model_output: Optional[bool] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
        noise: Optional[NoiseSource] = None,
    ):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        pipe, unet = self.pipe, self.pipe.unet
        _refuse_euler(pipe)
        if num_inference_steps is None:
            # DDPMPipeline (and its subclasses) default to 1000 steps, DDIMPipeline to 50, as in diffusers
            ddpm = any(c.__name__ == "DDPMPipeline" for c in type(pipe).__mro__)
            num_inference_steps = 1000 if ddpm else 50
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, unet.config.in_channels, *size)
        _check_generators(generator, batch_size)  # as DDIMPipeline (DDPMPipeline's randn_tensor fails on too few)
        _check_latents(latents, batch_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=unet.dtype)
        extra = {"eta": eta, "use_clipped_model_output": bool(use_clipped_model_output)} if eta or use_clipped_model_output else {}
        transition, grid = _scheduler_grid(pipe.scheduler, num_inference_steps, **_ddim_only(pipe.scheduler, extra))
        image = self._sample(unet, 1.0, transition, grid, latents, {},
                             _noise_for(transition, generator, noise, latents.shape[0]))
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        pipe.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)

    # ----------------------------------------------------------------- Stable Diffusion (UNet2DCondition + VAE)
    def _stable_diffusion(
        self,
        prompt=None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[dict] = None,
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        noise: Optional[NoiseSource] = None,
    ):
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        pipe, unet = self.pipe, self.pipe.unet
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if not height or not width:  # as StableDiffusionPipeline: both sides fall back to the UNet's size together
            height, width = size[0] * pipe.vae_scale_factor, size[1] * pipe.vae_scale_factor
        pipe.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        do_cfg = guidance_scale > 1
        device = pipe._execution_device
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt, device, num_images_per_prompt, do_cfg, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )
        batch = prompt_embeds.shape[0]
        latents, transition, grid = _unet_start(pipe, batch, height, width, prompt_embeds.dtype, device, generator,
                                                latents, num_inference_steps, eta)
        cond = {"encoder_hidden_states": prompt_embeds, "negative_encoder_hidden_states": negative_prompt_embeds if do_cfg else None}
        model_kwargs = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else None
        latents = self._sample_latents(unet, guidance_scale, transition, grid, latents, cond, generator, noise,
                                       model_kwargs, guidance_rescale)
        if output_type == "latent":
            image, nsfw = latents, None
        else:
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, nsfw = pipe.run_safety_checker(image, device, prompt_embeds.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        pipe.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw) if return_dict else (image, nsfw)

    # ----------------------------------------------------------------- Stable Diffusion XL (UNet2DCondition + VAE)
    def _stable_diffusion_xl(
        self,
        prompt=None,
        prompt_2=None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt=None,
        negative_prompt_2=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[dict] = None,
        guidance_rescale: float = 0.0,
        original_size: Optional[tuple] = None,
        crops_coords_top_left: tuple = (0, 0),
        target_size: Optional[tuple] = None,
        negative_original_size: Optional[tuple] = None,
        negative_crops_coords_top_left: tuple = (0, 0),
        negative_target_size: Optional[tuple] = None,
        clip_skip: Optional[int] = None,
        noise: Optional[NoiseSource] = None,
    ):
        from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

        pipe, unet = self.pipe, self.pipe.unet
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        pipe.check_inputs(
            prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
        )
        do_cfg = guidance_scale > 1
        device = pipe._execution_device
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip,
        )
        batch = pe.shape[0]
        latents, transition, grid = _unet_start(pipe, batch, height, width, pe.dtype, device, generator, latents,
                                                num_inference_steps, eta)
        # the micro-conditioning: (original size, crop corner, target size) per image, the negative's own when
        # both negative sizes are given (else the prompt's), as the pipeline builds them
        projection_dim = (int(ppe.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim)
        time_ids = pipe._get_add_time_ids(original_size, crops_coords_top_left, target_size, dtype=pe.dtype,
                                          text_encoder_projection_dim=projection_dim).to(device)
        negative_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = pipe._get_add_time_ids(
                negative_original_size, negative_crops_coords_top_left, negative_target_size, dtype=pe.dtype,
                text_encoder_projection_dim=projection_dim).to(device)
        cond = {"encoder_hidden_states": pe,
                "added_cond_kwargs": {"text_embeds": ppe.to(device), "time_ids": time_ids.repeat(batch, 1)}}
        if do_cfg:
            cond["negative_encoder_hidden_states"] = npe
            cond["negative_added_cond_kwargs"] = {"text_embeds": nppe.to(device),
                                                  "time_ids": negative_time_ids.repeat(batch, 1)}
        model_kwargs = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else None
        latents = self._sample_latents(unet, guidance_scale, transition, grid, latents, cond, generator, noise,
                                       model_kwargs, guidance_rescale)
        if output_type == "latent":
            image = latents
        else:
            vae = pipe.vae
            upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # as the pipeline: decode in float32
            if upcast:
                vae.to(dtype=torch.float32)
                latents = latents.to(torch.float32)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                shape = (1, len(mean), 1, 1)
                latents = (latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor
                           + torch.tensor(mean).view(shape).to(latents))
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
            if upcast:
                vae.to(dtype=torch.float16)
            if getattr(pipe, "watermark", None) is not None:
                image = pipe.watermark.apply_watermark(image)
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=image) if return_dict else (image,)

    # ----------------------------------------------------------------- Stable Diffusion 3 (flow matching)
    def _stable_diffusion_3(
        self,
        prompt=None,
        prompt_2=None,
        prompt_3=None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 28,
        sigmas=None,
        guidance_scale: float = 7.0,
        negative_prompt=None,
        negative_prompt_2=None,
        negative_prompt_3=None,
        num_images_per_prompt: int = 1,
        generator=None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: Optional[dict] = None,
        clip_skip: Optional[int] = None,
        max_sequence_length: int = 256,
        mu: Optional[float] = None,
        noise: Optional[NoiseSource] = None,
    ):
        from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput

        pipe, model = self.pipe, self.pipe.transformer
        _refuse_euler(pipe)
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            prompt, prompt_2, prompt_3, height, width,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        do_cfg = guidance_scale > 1
        device = pipe._execution_device
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=do_cfg, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device, clip_skip=clip_skip, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, lora_scale=(joint_attention_kwargs or {}).get("scale"),
        )
        # encode_prompt repeats what it encodes per image, but passes given embeddings through as they are
        # (diffusers' SD3 pipeline then fails on num_images_per_prompt > 1): repeat those as SD's does.
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        pe, npe, ppe, nppe = (_per_image(v, batch, num_images_per_prompt, name) for v, name in (
            (pe, "prompt_embeds"), (npe, "negative_prompt_embeds"),
            (ppe, "pooled_prompt_embeds"), (nppe, "negative_pooled_prompt_embeds")))
        _check_latents(latents, pe.shape[0])
        latents = pipe.prepare_latents(pe.shape[0], model.config.in_channels, height, width, pe.dtype, device, generator, latents)
        if pipe.scheduler.config.get("use_dynamic_shifting", False) and mu is None:
            patch = model.config.patch_size
            mu = calculate_shift((latents.shape[2] // patch) * (latents.shape[3] // patch), pipe.scheduler.config)
        if sigmas is None:
            transition, grid = _scheduler_grid(pipe.scheduler, num_inference_steps, mu=mu)
        else:  # the pipeline's custom sigmas (shifted as the scheduler shifts them); their count is the step count
            transition, grid = _from_diffusers(pipe.scheduler, None, mu, 0.0, False, None, sigmas, check_held=False)
        cond = {"encoder_hidden_states": pe, "pooled_projections": ppe}
        if do_cfg:
            cond.update(negative_encoder_hidden_states=npe, negative_pooled_projections=nppe)
        model_kwargs = {"joint_attention_kwargs": joint_attention_kwargs} if joint_attention_kwargs else None
        latents = self._sample(model, guidance_scale, transition, grid, latents, cond,
                               _noise_for(transition, generator, noise, latents.shape[0]),
                               model_kwargs)
        if output_type == "latent":
            image = latents
        else:
            vae_cfg = pipe.vae.config
            latents = latents / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
            image = pipe.vae.decode(latents, return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        return StableDiffusion3PipelineOutput(images=image) if return_dict else (image,)

    # ----------------------------------------------------------------- Flux (flow matching, packed latents)
    def _flux(
        self,
        prompt=None,
        prompt_2=None,
        negative_prompt=None,
        negative_prompt_2=None,
        true_cfg_scale: float = 1.0,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 28,
        sigmas=None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator=None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: Optional[dict] = None,
        max_sequence_length: int = 512,
        noise: Optional[NoiseSource] = None,
    ):
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

        pipe, model = self.pipe, self.pipe.transformer
        if type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise InvalidArgumentError(
                f"{type(pipe).__name__} with {type(pipe.scheduler).__name__}: Flux is a flow-matching model and its "
                f"pipeline passes sigmas and a shift mu to the scheduler; DRiffusionPipeline runs it with "
                f"FlowMatchEulerDiscreteScheduler (FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config))."
            )
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            prompt, prompt_2, height, width, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = pipe._execution_device
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        has_negative = negative_prompt is not None or (negative_prompt_embeds is not None
                                                       and negative_pooled_prompt_embeds is not None)
        true_cfg = true_cfg_scale > 1 and has_negative  # as FluxPipeline: true guidance only with a negative prompt

        def encode(p, p2, pe, ppe, name):
            pe, ppe, text_ids = pipe.encode_prompt(
                prompt=p, prompt_2=p2, prompt_embeds=pe, pooled_prompt_embeds=ppe, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
            # encode_prompt repeats what it encodes per image but passes given embeddings through (FluxPipeline's
            # transformer then broadcasts them over the images): repeat those, one row per image
            return (_per_image(pe, batch, num_images_per_prompt, f"{name}prompt_embeds"),
                    _per_image(ppe, batch, num_images_per_prompt, f"{name}pooled_prompt_embeds"), text_ids)

        pe, ppe, text_ids = encode(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, "")
        _check_latents(latents, pe.shape[0])
        latents, image_ids = pipe.prepare_latents(pe.shape[0], model.config.in_channels // 4, height, width, pe.dtype,
                                                  device, generator, latents)
        # FluxPipeline's grid: sigmas linspace(1, 1 / T, T), shifted by mu from the packed sequence length
        if sigmas is None and not pipe.scheduler.config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(latents.shape[1], {"max_shift": 1.15, **pipe.scheduler.config})
        transition, grid = _from_diffusers(pipe.scheduler, None if sigmas is not None else num_inference_steps, mu,
                                           0.0, False, None, sigmas, check_held=False)
        cond = {"encoder_hidden_states": pe, "pooled_projections": ppe}
        if model.config.guidance_embeds:  # the distilled guidance, one value per image, in both halves
            cond["guidance"] = torch.full([pe.shape[0]], float(guidance_scale), device=device, dtype=torch.float32)
        if true_cfg:
            npe, nppe, negative_text_ids = encode(negative_prompt, negative_prompt_2, negative_prompt_embeds,
                                                  negative_pooled_prompt_embeds, "negative_")
            if negative_text_ids.shape != text_ids.shape:
                raise InvalidArgumentError(
                    f"true_cfg_scale > 1 runs the prompt and the negative prompt in one batch, so their embeddings "
                    f"need the same sequence length; got {text_ids.shape[0]} and {negative_text_ids.shape[0]} "
                    f"(pad both to max_sequence_length)."
                )
            cond.update(negative_encoder_hidden_states=npe, negative_pooled_projections=nppe)
        # position ids have no batch dimension: fixed keywords of every call, never repeated per draft
        model_kwargs = {"txt_ids": text_ids, "img_ids": image_ids, "joint_attention_kwargs": joint_attention_kwargs or {}}
        latents = self._sample(model, true_cfg_scale if true_cfg else 1.0, transition, grid, latents, cond,
                               _noise_for(transition, generator, noise, latents.shape[0]),
                               model_kwargs)
        if output_type == "latent":
            image = latents
        else:
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(latents, return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        return FluxPipelineOutput(images=image) if return_dict else (image,)

    def __repr__(self) -> str:
        how = f"mode={self.mode!r}" if self.tolerance is None else f"tolerance={self.tolerance:g}" + (
            f", max_rounds={self.max_rounds}" if self.max_rounds is not None else "")
        return f"DRiffusionPipeline({type(self.pipe).__name__}, width={self.width}, {how})"

r"""A predictor ``f(x, t, **cond)`` for diffusers denoisers, with classifier-free guidance in one call.

Key (Ho & Salimans 2022; diffusers' pipelines): with guidance scale w > 1, conditional and
unconditional (negative) outputs c and u of the same state are combined as

    p = u + w (c - u),
    p <- phi * p * std(c) / std(p) + (1 - phi) * p      (guidance_rescale phi, Lin et al. 2024; std per row).

Both halves come from **one** model call on a doubled batch ``[x; x]`` with conditioning
``[negative; positive]`` (diffusers' row order: unconditional first). This composes with
:class:`backends.BatchedExecutor`: the executor hands the wrapper K*B rows (drafts concatenated,
conditioning repeated K times, draft-major), the wrapper doubles them to 2*K*B rows, and the split
``chunk(2)`` gives back the K*B unconditional and K*B conditional rows in the same order.

Calling styles (``style``), taken from the model's class name by default:

* ``"unet2d"``: ``UNet2DModel(sample, timestep, class_labels=None)``; cond: ``class_labels``.
* ``"unet2d_condition"``: ``UNet2DConditionModel(sample, timestep, encoder_hidden_states)``;
  cond: ``encoder_hidden_states`` (``[B, L, D]``), plus ``encoder_attention_mask``, ``class_labels``, ``timestep_cond``
  and ``added_cond_kwargs`` (a dict of per-sample tensors: SDXL's ``{"text_embeds": [B, D], "time_ids": [B, 6]}``;
  its negative is a dict with the same keys).
* ``"sd3"``: ``SD3Transformer2DModel(hidden_states=, timestep=, encoder_hidden_states=, pooled_projections=)``;
  cond: ``encoder_hidden_states``, ``pooled_projections``.
* ``"flux"``: ``FluxTransformer2DModel(hidden_states=, timestep=t / 1000, encoder_hidden_states=, pooled_projections=,
  guidance=)`` on packed latents ``[B, L, C]``; cond: ``encoder_hidden_states``, ``pooled_projections`` and
  ``guidance`` (the distilled guidance, ``[B]``; shared by both halves of true classifier-free guidance, so it
  needs no negative). The position ids ``txt_ids`` / ``img_ids`` (``[L, 3]``, no batch dimension) go in
  ``model_kwargs``. The model time is divided by 1000 as FluxPipeline does (the scheduler's timesteps are
  sigma * 1000).

For guidance pass, for every conditioning tensor (or dict of tensors) ``name``, its negative as ``negative_<name>``.
Outputs may be a tensor, an object with ``.sample``, or a tuple (first element); a model that also
predicts a variance (2C output channels for C input channels) gives its first C channels.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch

from driffusion_core.errors import InvalidArgumentError, PredictorOutputError, as_flag, check_predictor, is_real

__all__ = ["DiffusersPredictor", "STYLES", "model_style", "rescale_guidance"]

#: class name -> calling style
STYLES: Dict[str, str] = {
    "UNet2DModel": "unet2d",
    "UNet2DConditionModel": "unet2d_condition",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}


def by_class_name(obj: Any, table: Mapping[str, str]) -> Optional[str]:
    """``table``'s entry for the class of ``obj`` or its nearest base named there (a user's subclass of a
    diffusers class counts as that class); None when no class in its MRO is named."""
    for cls in type(obj).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    return None


def model_style(model: Any) -> Optional[str]:
    """The calling style of a diffusers denoiser: :func:`by_class_name` in :data:`STYLES`, looking through
    ``torch.compile``'s wrapper (``_orig_mod``); None for another model."""
    return by_class_name(getattr(model, "_orig_mod", model), STYLES)


#: conditioning names each style accepts (their negatives are ``negative_<name>``)
COND_NAMES: Dict[str, tuple] = {
    "unet2d": ("class_labels",),
    "unet2d_condition": ("encoder_hidden_states", "encoder_attention_mask", "class_labels", "timestep_cond",
                         "added_cond_kwargs"),
    "sd3": ("encoder_hidden_states", "pooled_projections"),
    "flux": ("encoder_hidden_states", "pooled_projections", "guidance"),
}
_REQUIRED = {"unet2d": (), "unet2d_condition": ("encoder_hidden_states",), "sd3": ("encoder_hidden_states", "pooled_projections"),
             "flux": ("encoder_hidden_states", "pooled_projections")}
#: conditioning both guidance halves share (its negative defaults to it)
_SHARED = {"flux": ("guidance",)}


def rescale_guidance(guided: torch.Tensor, cond_out: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    r"""Guidance rescale (Lin et al. 2024, sec. 3.4): :math:`\phi\, p\, \mathrm{std}(c)/\mathrm{std}(p) + (1-\phi) p`, per row."""
    dims = list(range(1, guided.dim()))
    rescaled = guided * (cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def _unwrap(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise PredictorOutputError(
        f"The model returned {type(out).__name__}; expected a tensor, an output with .sample, or a tuple."
    )


def _negative_first(name: str, value: Any, other: Any) -> Any:
    """The guidance batch's conditioning ``[negative; positive]`` for one keyword: tensors with a batch dimension
    are concatenated (the negative of the same shape), a dict of them key by key (the negative with the same
    keys, e.g. SDXL's ``added_cond_kwargs``), a list of them item by item (the negative a list of the same
    length, e.g. IP-adapter ``image_embeds``); anything else (a 0-d tensor, None) is passed as it is."""
    if isinstance(value, Mapping):
        if not isinstance(other, Mapping) or set(other) != set(value):
            got = sorted(other) if isinstance(other, Mapping) else type(other).__name__
            raise InvalidArgumentError(
                f"negative_{name} must be a dict with the keys of {name} ({sorted(value)}), got {got}: guidance runs "
                f"both in one batch, key by key (SDXL: the negative pooled embeddings as text_embeds, the negative "
                f"size / crop ids as time_ids)."
            )
        return {key: _negative_first(f"{name}[{key!r}]", v, other[key]) for key, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in value):
        if not isinstance(other, (list, tuple)) or len(other) != len(value):
            got = f"{type(other).__name__} of {len(other)}" if isinstance(other, (list, tuple)) else type(other).__name__
            raise InvalidArgumentError(
                f"negative_{name} must be a list of {len(value)} like {name} (a list of per-sample tensors), got "
                f"{got}: guidance runs both in one batch, item by item."
            )
        return type(value)(_negative_first(f"{name}[{i}]", v, o) for i, (v, o) in enumerate(zip(value, other)))
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        if not isinstance(other, torch.Tensor) or other.shape != value.shape:
            got = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise InvalidArgumentError(
                f"negative_{name} is {got} but {name} has shape {tuple(value.shape)}: guidance runs both "
                f"in one batch, so they must have the same shape (encode the negative prompt padded to "
                f"the prompt's length, as the pipelines' encode_prompt does)."
            )
        return torch.cat([other, value])
    return value


def _row_times(t: Any, x: torch.Tensor) -> torch.Tensor:
    """``t`` as one model time per row of x: ``[N]`` as it is, a number / 0-d / one-element tensor repeated."""
    if not isinstance(t, torch.Tensor):
        if not is_real(t):
            raise InvalidArgumentError(f"DiffusersPredictor: t must be a tensor [N] or a number, got {type(t).__name__}.")
        t = torch.as_tensor(t, device=x.device)
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
        return t.reshape(()).expand(x.shape[0])
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise InvalidArgumentError(
            f"DiffusersPredictor: t must hold one model time per row of x ([{x.shape[0]}]) or one for all, got "
            f"shape {tuple(t.shape)}."
        )
    return t


class DiffusersPredictor:
    """Wrap a diffusers denoiser as ``predictor(x, t, **cond) -> Tensor`` shaped like x.

    Arguments:
        model: a ``UNet2DModel``, ``UNet2DConditionModel``, ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``
            (or any module with one of their calling styles; then give ``style``).
        guidance_scale: w; classifier-free guidance runs when w > 1 (as in diffusers' pipelines) and
            then every conditioning tensor needs its ``negative_<name>``.
        guidance_rescale: phi in [0, 1] (diffusers' ``guidance_rescale``); 0 disables it.
        style: ``"unet2d"``, ``"unet2d_condition"``, ``"sd3"`` or ``"flux"``; default from the class or a base
            (:func:`model_style`, through ``torch.compile``'s wrapper).
        model_kwargs: fixed keyword arguments for every call (e.g. ``cross_attention_kwargs``,
            ``joint_attention_kwargs``); never batched.
        enable_grad: let the model record autograd when it is on where the call is made (guidance by gradients);
            default False: the model runs under ``torch.no_grad()`` whatever the caller's mode.

    The model runs in its own dtype (x is cast to its parameters' dtype) and its output comes back in
    x's: a float64 sampler around a float32 or float16 model keeps its state in float64, and guidance is
    combined in that dtype.

    Example::

        f = DiffusersPredictor(pipe.unet, guidance_scale=7.5)
        eps = f(x, t, encoder_hidden_states=emb, negative_encoder_hidden_states=neg_emb)
    """

    def __init__(
        self,
        model: Any,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        style: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        enable_grad: bool = False,
    ):
        check_predictor(model, "model must be callable (a torch module)")
        if style is None:
            style = model_style(model)
            if style is None:
                raise InvalidArgumentError(
                    f"Unknown model class {type(model).__name__}: pass style='unet2d', 'unet2d_condition', 'sd3' or "
                    f"'flux' (the calling style of UNet2DModel, UNet2DConditionModel, SD3Transformer2DModel or "
                    f"FluxTransformer2DModel, or a subclass; a torch.compile'd one is looked through)."
                )
        if style not in COND_NAMES:
            raise InvalidArgumentError(f"style must be one of {tuple(COND_NAMES)}, got {style!r}.")
        if not is_real(guidance_scale) or not math.isfinite(float(guidance_scale)):
            raise InvalidArgumentError(
                f"guidance_scale must be a finite real number (classifier-free guidance runs above 1, as in "
                f"diffusers' pipelines; 1 or less: the conditional model alone), got {guidance_scale!r}."
            )
        if not is_real(guidance_rescale) or not 0.0 <= float(guidance_rescale) <= 1.0:
            raise InvalidArgumentError(f"guidance_rescale must be a real number in [0, 1], got {guidance_rescale!r}.")
        self.model = model
        self.style = style
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.model_kwargs = dict(model_kwargs or {})
        self.enable_grad = as_flag(enable_grad, "enable_grad")

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether a call evaluates both halves (guidance scale > 1, diffusers' rule)."""
        return self.guidance_scale > 1.0

    def _split_cond(self, cond: Mapping[str, Any]):
        allowed = COND_NAMES[self.style]
        pos, neg = {}, {}
        for key, value in cond.items():
            base = key[len("negative_"):] if key.startswith("negative_") else key
            if base not in allowed:
                accepted = ", ".join(allowed + tuple("negative_" + a for a in allowed))
                raise InvalidArgumentError(f"Unknown conditioning {key!r} for style {self.style!r}; accepted: {accepted}.")
            (neg if key.startswith("negative_") else pos)[base] = value
        for name in _REQUIRED[self.style]:
            if pos.get(name) is None:
                raise InvalidArgumentError(f"Style {self.style!r} needs cond {name!r} (a tensor with leading dim B).")
        if self.do_classifier_free_guidance:
            shared = _SHARED.get(self.style, ())
            missing = [n for n, v in pos.items() if v is not None and neg.get(n) is None and n not in shared]
            if missing:
                raise InvalidArgumentError(
                    f"guidance_scale={self.guidance_scale:g} > 1 needs the negative conditioning "
                    f"{', '.join('negative_' + m for m in missing)} (e.g. the empty prompt's embeddings)."
                )
        return pos, neg

    def _call(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        kw = {k: v for k, v in cond.items() if v is not None}
        state_dtype = x.dtype
        x = x.to(self._model_dtype(x.dtype))  # the model runs in its own dtype; the state keeps the sampler's
        if self.style == "sd3":
            out = self.model(hidden_states=x, timestep=t, return_dict=False, **kw, **self.model_kwargs)
        elif self.style == "flux":
            out = self.model(hidden_states=x, timestep=t.to(x.dtype) / 1000, return_dict=False, **kw, **self.model_kwargs)
        else:
            out = self.model(x, t, return_dict=False, **kw, **self.model_kwargs)
        out = _unwrap(out)
        if out.shape != x.shape and out.dim() == x.dim() and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # a learned-variance head: keep the mean prediction
        return out.to(state_dtype) if isinstance(out, torch.Tensor) else out

    def _model_dtype(self, default: torch.dtype) -> torch.dtype:
        """The floating dtype of the model's parameters (``default`` for a model without any)."""
        dtype = getattr(self.model, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
        if isinstance(self.model, torch.nn.Module):
            for p in self.model.parameters():
                if p.is_floating_point():
                    return p.dtype
        return default

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The (guided) model output at states x (``[N, ...]``) and model times t (``[N]``; a number, a 0-d or a
        one-element tensor is every row's time)."""
        pos, neg = self._split_cond(cond)
        t = _row_times(t, x)
        with torch.set_grad_enabled(self.enable_grad and torch.is_grad_enabled()):
            if not self.do_classifier_free_guidance:
                return self._call(x, t, pos).to(x.dtype)
            shared = _SHARED.get(self.style, ())
            both = {name: _negative_first(name, value, neg.get(name, value if name in shared else None))
                    for name, value in pos.items()}
            out = self._call(torch.cat([x, x]), torch.cat([t, t]), both)
            uncond, cond_out = out.chunk(2)
            guided = uncond + self.guidance_scale * (cond_out - uncond)
            if self.guidance_rescale > 0:
                guided = rescale_guidance(guided, cond_out, self.guidance_rescale)
            return guided.to(x.dtype)

    def __repr__(self) -> str:
        return f"DiffusersPredictor({type(self.model).__name__}, style={self.style!r}, guidance_scale={self.guidance_scale:g})"

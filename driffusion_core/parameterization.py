r"""Model parameterizations and the x0 transforms diffusers applies (clipping, dynamic thresholding).

A model output ``p`` at a state ``x`` on the interpolant :math:`x = \alpha x_0 + \sigma\epsilon`
is turned into the pair (x0_hat, eps_hat) with :func:`driffusion_core.coefficients.x0_eps_coefficients`.
A skip converts at its *source* level and then jumps with the pair frozen; a frozen v is not a
frozen pair at another level, since v's meaning depends on the level.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Callable, Optional, Tuple, Union

import torch

from driffusion_core import coefficients as C
from driffusion_core.errors import (
    DeviceMismatchError, InvalidArgumentError, PredictorOutputError, check_predictor, is_real, not_a_tensor_hint,
)

__all__ = [
    "Prediction", "ClipSample", "DynamicThreshold", "X0Transform", "broadcast_coef", "lincomb", "check_prediction",
    "reparameterize", "compute_dtype", "upcast",
]

#: state dtypes whose arithmetic is done in float32 (their few mantissa bits would round every coefficient)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an operator computes in for a state of ``dtype``: float32 for float16 and bfloat16, else
    ``dtype`` itself.

    A float16 coefficient is off by up to 2.4e-4 relative (bfloat16: 2e-3), the same way at every element
    and every step, so low-precision arithmetic drifts further than one rounding of the state per step.
    The operators compute in float32 and cast the result once, as diffusers' flow-matching and DPM-Solver
    steps do (``sample.to(torch.float32)`` ... ``prev_sample.to(model_output.dtype)``).
    """
    return torch.float32 if dtype in LOW_PRECISION else dtype


def upcast(*tensors: Optional[torch.Tensor]) -> tuple:
    """Each tensor in :func:`compute_dtype` of its dtype (``None`` passes): the operands of a float16 /
    bfloat16 step in float32, the others as they are (no copy)."""
    return tuple(v if v is None or compute_dtype(v.dtype) == v.dtype else v.to(compute_dtype(v.dtype))
                 for v in tensors)


class Prediction(str, enum.Enum):
    """What a predictor returns."""

    EPSILON = "epsilon"
    SAMPLE = "sample"
    V_PREDICTION = "v_prediction"
    VELOCITY = "velocity"

    @classmethod
    def parse(cls, value: Union[str, "Prediction"]) -> "Prediction":
        """``value`` as a Prediction: a member, or its string (``"epsilon"``, ``"sample"``, ``"v_prediction"``,
        ``"velocity"``: diffusers' ``prediction_type`` names); anything else is refused, listing the names."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(p.value) for p in cls)
            hint = ""
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                hint = (" A number here is likely another argument (eta, order, ...) given by position in the "
                        "prediction's place: pass it by keyword.")
            raise InvalidArgumentError(f"Unknown prediction type {value!r}; use one of {names}.{hint}") from None


def _remembered(owner: torch.Tensor, key: Any, make: Callable[[], Any], *deps: torch.Tensor) -> Any:
    """``make()``, a value computed from ``owner`` (and ``deps``), kept on ``owner`` itself under ``key``.

    The transitions cache their float64 coefficients per step and per window, so a sampler derives the same
    values from the same tensors in every round and every sample. A kept value lives as long as ``owner``
    does; it is remade if ``owner`` or a dep is written in place or a dep is another tensor, and made
    outside ``torch.inference_mode`` (normal tensors, which a later sample that tracks gradients may use).
    Inference tensors have no version counter to watch: for them ``make()`` runs every time."""
    tensors = (owner, *deps)
    # list comprehensions, not generators: this runs for every coefficient of every step
    if True in [t.is_inference() for t in tensors]:
        return make()
    versions = tuple([t._version for t in tensors])
    memo = owner.__dict__.setdefault("_driffusion_memo", {})
    hit = memo.get(key)
    if hit is not None and hit[1] == versions and (not deps or all([a is b for a, b in zip(hit[0], deps)])):
        return hit[2]
    with torch.inference_mode(False):
        value = make()
    memo[key] = (deps, versions, value)
    return value


def cast_coef(c: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``c.to(device, dtype)``, remembered on ``c``: on a GPU each cast of a cached per-row coefficient would
    otherwise be a blocking host-to-device copy (a stream synchronisation) per round."""
    if c.device == device and c.dtype == dtype:
        return c
    return _remembered(c, ("cast", device, dtype), lambda: c.to(device=device, dtype=dtype))


def broadcast_coef(c, x: torch.Tensor):
    """A float64 coefficient (scalar or one per row) cast to x's dtype/device, shaped to broadcast over x.
    A scalar for a CUDA state stays a CPU scalar tensor (in x's dtype): CUDA kernels take it as an argument,
    without a blocking host-to-device copy per coefficient."""
    if not isinstance(c, torch.Tensor):
        return c
    if c.dim() == 0 and c.device.type == "cpu" and x.device.type == "cuda":
        return cast_coef(c, c.device, x.dtype)
    c = cast_coef(c, x.device, x.dtype)
    if c.dim() == 0:
        return c
    if c.shape[0] != x.shape[0]:
        raise InvalidArgumentError(
            f"Per-row levels have {c.shape[0]} entries but the state has batch size {x.shape[0]}."
        )
    return c.reshape(c.shape[0], *([1] * (x.dim() - 1)))


def lincomb(x: torch.Tensor, cx, p: torch.Tensor, cp) -> torch.Tensor:
    """``cx * x + cp * p`` where the coefficients may be Python 0/1 (skipped exactly) or tensors."""
    terms = []
    for v, c in ((x, cx), (p, cp)):
        if isinstance(c, int) and c == 0:
            continue
        terms.append(v if (isinstance(c, int) and c == 1) else broadcast_coef(c, v) * v)
    if not terms:
        return torch.zeros_like(x)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _any_nonpositive(c) -> bool:
    if not isinstance(c, torch.Tensor):
        return c <= 0
    return c.item() <= 0 if c.dim() == 0 else bool((c <= 0).any())


def _conversion(prediction: Prediction, alpha, sigma):
    """``x0_eps_coefficients(prediction, alpha, sigma)``, remembered on ``alpha`` for the same ``sigma``: the
    transitions pass their cached (alpha, sigma) of a step, so the float64 divisions are done once per step,
    not per call (the same values: bit for bit the result without the memo)."""
    if not (isinstance(alpha, torch.Tensor) and isinstance(sigma, torch.Tensor)):
        return C.x0_eps_coefficients(prediction.value, alpha, sigma)
    return _remembered(alpha, ("x0_eps", prediction), lambda: C.x0_eps_coefficients(prediction.value, alpha, sigma),
                       sigma)


def to_x0_eps(
    prediction: Prediction,
    x: torch.Tensor,
    pred: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    x0_transform: Optional["X0Transform"] = None,
    recompute_eps: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""(x0_hat, eps_hat) from a model output at the level with interpolant (alpha, sigma).

    ``x0_transform`` (clipping / thresholding) is applied to x0_hat; like diffusers, eps_hat is
    re-derived from the transformed x0_hat only if ``recompute_eps`` (``use_clipped_model_output``).
    """
    if prediction is Prediction.EPSILON and _any_nonpositive(alpha):
        raise InvalidArgumentError(
            "An epsilon prediction cannot give x0_hat where alpha = 0 (zero terminal SNR, or sigma = 1 in flow "
            "matching): x0_hat = (x - sigma * eps) / 0. Use a v_prediction, sample or velocity model there."
        )
    (a_x, a_p), (b_x, b_p) = _conversion(prediction, alpha, sigma)
    x0_hat = lincomb(x, a_x, pred, a_p)
    eps_hat = lincomb(x, b_x, pred, b_p)
    if x0_transform is not None:
        x0_hat = check_x0_transform_output(x0_transform(x0_hat), x0_hat, x0_transform)
        if recompute_eps:
            (_, _), (b_x, b_p) = C.x0_eps_coefficients("sample", alpha, sigma)
            eps_hat = lincomb(x, b_x, x0_hat, b_p)
    return x0_hat, eps_hat


X0Transform = Callable[[torch.Tensor], torch.Tensor]


def check_x0_transform(transform: Any) -> None:
    """Refuse an ``x0_transform`` that is neither None nor callable (checked when it is set, not at the first step)."""
    if transform is not None and not callable(transform):
        raise InvalidArgumentError(
            f"x0_transform must be a callable x0_hat -> x0_hat of the same shape (e.g. ClipSample(1.0) or "
            f"DynamicThreshold()), or None for no transform, got {type(transform).__name__} {transform!r}."
        )


def _name(transform: Any) -> str:
    """A function by its qualified name (its repr holds an address), anything else by its repr."""
    name = getattr(transform, "__qualname__", None)
    return name if isinstance(name, str) else repr(transform)


def check_x0_transform_output(out: Any, x0_hat: torch.Tensor, transform: Any) -> torch.Tensor:
    """``out``, what ``transform(x0_hat)`` returned, if it is a tensor of x0_hat's shape on its device (its
    dtype may follow torch's promotion), else an error naming x0_transform and what it returned."""
    if not isinstance(out, torch.Tensor) or out.shape != x0_hat.shape:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidArgumentError(
            f"x0_transform {_name(transform)} returned {got} for x0_hat of shape {tuple(x0_hat.shape)}; it must "
            f"return a tensor shaped like its input (x0_hat transformed element- or row-wise; a smaller result would "
            f"be broadcast over the batch)."
        )
    if out.device != x0_hat.device:
        raise DeviceMismatchError(
            f"x0_transform {_name(transform)} returned a tensor on {out.device} for x0_hat on {x0_hat.device}; it "
            f"must return its result on its input's device."
        )
    return out


def _positive(value: Any, what: str) -> float:
    """``value`` as a finite float > 0, else an error naming ``what``."""
    if not is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise InvalidArgumentError(f"{what} must be a finite number > 0, got {value!r}.")
    return float(value)


class ClipSample:
    """Clamp x0_hat to ``[-clip_range, clip_range]`` (diffusers' ``clip_sample``)."""

    def __init__(self, clip_range: float = 1.0):
        self.clip_range = _positive(clip_range, "ClipSample: clip_range (x0_hat is clamped to [-clip_range, clip_range])")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        r""":math:`\mathrm{clamp}(\hat x_0, -c, c)` elementwise, c = ``clip_range``."""
        c = min(self.clip_range, torch.finfo(x0.dtype).max)  # the same clamp; a larger c does not fit the dtype
        return x0.clamp(-c, c)

    def __repr__(self) -> str:
        return f"ClipSample({self.clip_range:g})"


# torch.quantile refuses rows of more than 2**24 elements ("quantile() input tensor is too large"): its
# rank ratio * (n - 1) is computed in the input's float32 and would be off by whole positions beyond that.
QUANTILE_MAX = 2 ** 24


def row_quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile of each row of ``flat`` ``[B, N]`` with linear interpolation, as ``torch.quantile(flat,
    q, dim=1)``: that call itself for rows of at most :data:`QUANTILE_MAX` elements (so diffusers' thresholds
    are reproduced bit for bit), two ``kthvalue`` selections beyond (the rank ``q (N - 1)`` taken in
    float64, so exact where torch.quantile gives up)."""
    n = flat.shape[1]
    if n <= QUANTILE_MAX:
        return torch.quantile(flat, q, dim=1)
    rank = q * (n - 1)
    below = math.floor(rank)
    lo = torch.kthvalue(flat, below + 1, dim=1).values
    if rank == below:
        return lo
    hi = torch.kthvalue(flat, below + 2, dim=1).values
    return torch.lerp(lo, hi, rank - below)


class DynamicThreshold:
    """Dynamic thresholding (Imagen; diffusers' ``thresholding``), per sample.

    s = clamp(quantile(|x0|, ratio), 1, max_value); x0 <- clamp(x0, -s, s) / s, per row. (Rows of
    more than 2**24 elements, where ``torch.quantile`` and so diffusers refuse, are thresholded too: see
    :func:`row_quantile`.)
    """

    def __init__(self, ratio: float = 0.995, max_value: float = 1.0):
        if not is_real(ratio) or not 0 < float(ratio) <= 1:
            raise InvalidArgumentError(f"dynamic thresholding ratio must be a number in (0, 1], got {ratio!r}.")
        self.ratio = float(ratio)
        self.max_value = _positive(max_value, "DynamicThreshold: max_value (the largest threshold s; x0_hat is divided by s)")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        r"""Per row b: :math:`s_b = \mathrm{clamp}(\mathrm{quantile}(|\hat x_0^{(b)}|, \text{ratio}), 1,
        \text{max\_value})` and :math:`\hat x_0^{(b)} \leftarrow \mathrm{clamp}(\hat x_0^{(b)}, -s_b, s_b) / s_b`
        (Imagen; diffusers' ``_threshold_sample``), computed in float32 or wider."""
        dtype = x0.dtype
        flat = x0.reshape(x0.shape[0], -1)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        top = min(self.max_value, torch.finfo(flat.dtype).max)  # the same clamp; a larger one does not fit the dtype
        s = row_quantile(flat.abs(), self.ratio).clamp(min=1, max=top).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)

    def __repr__(self) -> str:
        return f"DynamicThreshold(ratio={self.ratio:g}, max_value={self.max_value:g})"


def check_prediction(schedule: Any, prediction: Prediction, who: str) -> None:
    """Refuse a parameterization the schedule does not define (``schedule.predictions``; None: any)."""
    allowed = getattr(schedule, "predictions", None)
    if allowed is None or prediction.value in allowed:
        return
    why = {
        "v_prediction": "v_prediction (p = alpha eps - sigma x0) is a VP parameterization; for a flow model "
                        "predicting eps - x0 use 'velocity'",
        "velocity": "velocity (p = eps - x0) is a flow-matching parameterization; for a VP model predicting "
                    "alpha eps - sigma x0 use 'v_prediction'",
    }.get(prediction.value, f"{prediction.value!r} is not defined for this interpolant")
    raise InvalidArgumentError(
        f"{who}: a {type(schedule).__name__} takes predictions {', '.join(allowed)}, got {prediction.value!r}: {why}."
    )


def reparameterize(predictor: Callable[..., torch.Tensor], schedule: Any, source: Union[str, Prediction],
                   target: Union[str, Prediction]) -> Callable[..., torch.Tensor]:
    r"""The same model, returning its output in another parameterization.

    ``reparameterize(model, schedule, "sample", "epsilon")(x, t, **cond)`` converts ``model(x, t, **cond)``
    at the level of model time t (:math:`\alpha, \sigma` of ``schedule``) to :math:`(\hat x_0, \hat\epsilon)`
    at the state x it was evaluated on, then to ``target``. The sampler then applies what the wrapper
    returns: a serial sampler gives the same sample either way (to rounding), but a draft's prediction is
    applied at the refined state, not at the draft it was evaluated on, and which quantity it carries over
    matters. On the exact oracles an x0 ("sample") model's drafts are carried over worse than its
    :math:`\hat\epsilon`'s (ring oracle, DDIM on trailing and leading grids and flow, T = 50, width 4:
    0.38-1.51x step skipping's error as "sample", 0.18-0.64x wrapped as "epsilon" / "velocity";
    ``python -m benchmarks.x0_models``), so wrap an x0 model as epsilon (VP) or velocity (flow) for DRiffusion.

    The level is recovered from the model time the wrapper is called with: exact for VP's integer
    timesteps, but a flow grid's float32 model time :math:`\sigma N` gives :math:`\sigma` to float32
    rounding (about 1e-7 relative), so a float64 flow run through the wrapper matches the unwrapped one
    to that rounding, not to float64's. The wrapper reads the schedule's table at those times on the host, so
    it cannot run under ``BatchedExecutor(vmap=True)`` (torch refuses data-dependent control flow in vmap):
    use the default concatenated batch.

    Arguments:
        predictor: ``f(x, t, **cond)``, t the model times a grid of ``schedule`` calls it with.
        schedule: the schedule the sampler uses (its ``level_of_model_time`` and ``alpha_sigma``).
        source, target: parameterizations, as for the transitions (``"epsilon"``, ``"sample"``,
            ``"v_prediction"``, ``"velocity"``), both defined for the schedule.
    """
    from driffusion_core.schedules import Schedule

    check_predictor(predictor, "reparameterize: predictor must be a callable f(x, t, **cond) returning a tensor")
    if not isinstance(schedule, Schedule):
        hint = (" (that looks like a transition: pass its .schedule)"
                if isinstance(getattr(schedule, "schedule", None), Schedule) else "")
        raise InvalidArgumentError(
            f"reparameterize: schedule must be a Schedule (a VPSchedule, FlowSchedule or VESchedule: the one the "
            f"sampler's transition uses, e.g. transition.schedule), got {type(schedule).__name__}{hint}."
        )
    src, dst = Prediction.parse(source), Prediction.parse(target)
    for p in (src, dst):
        check_prediction(schedule, p, "reparameterize")
    if src is dst:
        return predictor
    seen_large = [False]  # a model time above 1 seen: later small ones are the clean end of a real grid

    def wrapped(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        p = predictor(x, t, **cond)
        if not isinstance(p, torch.Tensor) or not isinstance(x, torch.Tensor) or p.shape != x.shape:
            _refuse_output(p, x, wrapped.__name__)
        times = torch.as_tensor(t).detach().cpu().reshape(-1)
        if not seen_large[0]:
            seen_large[0] = bool((times > 1).any())
            if not seen_large[0]:
                _refuse_unit_times(schedule, times, wrapped.__name__)
        level = schedule.level_of_model_time(times)
        alpha, sigma = schedule.alpha_sigma(level)
        if level.numel() == 1 and x.dim() >= 1 and x.shape[0] != 1:
            alpha, sigma = alpha.reshape(()), sigma.reshape(())
        x0_hat, eps_hat = to_x0_eps(src, *upcast(x, p), alpha, sigma)  # float16 / bfloat16 in float32
        c_x0, c_eps = C.prediction_coefficients(dst.value, alpha, sigma)
        return lincomb(x0_hat, c_x0, eps_hat, c_eps).to(p.dtype)

    wrapped.__name__ = f"{getattr(predictor, '__name__', 'predictor')}_as_{dst.value}"
    return wrapped


def _refuse_unit_times(schedule: Any, times: torch.Tensor, name: str) -> None:
    """Refuse model times in [0, 1] where the schedule's model times start far above 1 (VP: training timesteps
    0..N-1, flow: sigma N): the wrapper was put inside a rescaling ``lambda x, t: f(x, t / N)``, so it would read a
    time in [0, 1] as a level near the clean end. The caller checks only until a time above 1 has been seen
    (a sampler's first call is at its noisiest level), and a schedule whose own noisiest model time is at most
    1 is never refused."""
    from driffusion_core.schedules import FlowSchedule, VPSchedule

    n = int(getattr(schedule, "num_train_timesteps", 0) or 0)
    if n <= 2 or not isinstance(schedule, (VPSchedule, FlowSchedule)) or not bool((times >= 0).all()):
        return
    try:  # a schedule whose own model times lie in [0, 1] (a grid of custom times, a continuous-time subclass)
        top = torch.as_tensor(schedule.model_time(torch.tensor([schedule.level_range()[1]], dtype=torch.float64)))
        if not float(top.max()) > 1:
            return
    except Exception:  # noqa: BLE001 - a schedule that cannot say: no check
        return
    fractional = not torch.equal(times, times.round())
    if isinstance(schedule, FlowSchedule) or fractional:
        scale = "training timesteps 0..N-1" if isinstance(schedule, VPSchedule) else "sigma * N"
        raise InvalidArgumentError(
            f"reparameterize ({name}): called with model time(s) {[round(v, 6) for v in times[:4].tolist()]} in "
            f"[0, 1], but this {type(schedule).__name__}'s model times are {scale} (N = {n}), and a sampler's first call is at its "
            f"noisiest level: a wrapper that rescales t for a model taking times in [0, 1] was put outside. Put it "
            f"inside: reparameterize(lambda x, t, **c: model(x, t / {n}, **c), schedule, source, target)."
        )


def _refuse_output(p: Any, x: Any, name: str) -> None:
    """The error for a wrapped model's output that is not a tensor shaped like the state x."""
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentError(f"reparameterize ({name}): x must be a tensor, got {type(x).__name__}.")
    if not isinstance(p, torch.Tensor):
        raise PredictorOutputError(
            f"reparameterize ({name}): the wrapped model returned {type(p).__name__} for state shape "
            f"{tuple(x.shape)}; it must return a tensor.{not_a_tensor_hint(p)}"
        )
    raise PredictorOutputError(
        f"reparameterize ({name}): the wrapped model returned shape {tuple(p.shape)} for state shape "
        f"{tuple(x.shape)}; it must return one prediction per element of x, shaped like x (a smaller output would "
        f"be broadcast, or mistaken for per-row levels)."
    )

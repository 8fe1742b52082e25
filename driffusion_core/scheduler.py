r"""The draft-and-refine scheduler (DRiffusion, arXiv 2603.25872, Algorithm 1).

Key: levels t_0 > ... > t_T; x_i the state at level i; f the predictor; S the skip
transition; n the width; a the anchor.

**Aggressive mode.** From the anchor (x_a, p_a) draft x~_{a+j} = S(x_a, p_a, t_a -> t_{a+j}, z~_j)
for j = 1..m (m = min(n, T-1-a)); evaluate p~_{a+j} = f(x~_{a+j}, t_{a+j}) for all j in one
parallel round; refine serially x_{a+1} = S(x_a, p_a), x_{a+j+1} = S(x_{a+j}, p~_{a+j});
the new anchor is (x_{a+m}, p~_{a+m}). The first anchor costs one exact call.
Rounds = 1 + ceil((T-1)/n).

**Conservative mode.** Each iteration first evaluates the exact p_a = f(x_a) (one round),
then drafts and refines as above through x_{a+m+1}, advancing n+1 levels in two rounds.
Rounds = 2 ceil(T/(n+1)) - [T mod (n+1) = 1].

Both modes make exactly T model calls. Width 1 reproduces the serial sampler bit for bit.

The scheduler is a pure state machine (:class:`DraftRefineState`: ``plan`` the next round,
``absorb`` its predictions) plus the small :meth:`DraftRefineScheduler.sample` loop.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from driffusion_core.errors import (
    DeviceMismatchError,
    ExecutorError,
    InvalidArgumentError,
    InvalidWidthError,
    PredictorOutputError,
    SamplingError,
    WideWindowWarning,
    as_count,
    as_flag,
    check_predictor,
    not_a_tensor_hint,
    safe_str,
)
from driffusion_core.executor import (
    Executor, Predictor, SerialExecutor, DENSE_FIX, check_executor, batched_tensors, changed_tensor, named_tensors,
    not_dense, stamps_changed,
    tensor_versions,
    version_stamp,
)
from driffusion_core.grid import TimeGrid
from driffusion_core.modules import warn_random_layers
from driffusion_core.noise import NOISE_HINT as _NOISE_HINT, NoiseSource
from driffusion_core.transition import SkipTransition, check_transition

__all__ = [
    "DraftRefineScheduler",
    "DraftRefineState",
    "Round",
    "SampleOutput",
    "expected_rounds",
    "check_inputs",
    "check_planned",
    "check_predictions",
    "check_input_untouched",
    "evaluate_round",
    "input_version",
    "check_finite_sample",
    "note_where",
    "default_noise",
    "progress_bar",
    "run_rounds",
]

MODES = ("aggressive", "conservative")


@dataclass(eq=False)  # its tensors have no single truth value: == is identity
class SampleOutput:
    """What a sampler returns.

    Attributes:
        x: the final sample at the clean end.
        rounds: sequential rounds of model calls (the latency, in model calls).
        evals: model calls made in total (rows of a batch count once).
        trajectory: the refined states x_0 .. x_T, when asked for.
        info: anything else the sampler reports. DRiffusion: ``drafts_per_round``, the drafts of each
            draft round in order (the exact anchor calls, one per conservative iteration and the
            first, are the rounds not listed), and ``executor``, how rounds ran.
    """

    x: torch.Tensor
    rounds: int
    evals: int
    trajectory: Optional[List[torch.Tensor]] = None
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"SampleOutput(x={tuple(self.x.shape)}, rounds={self.rounds}, evals={self.evals})"


def check_mode(mode: Any) -> None:
    """``mode`` one of :data:`MODES`, else an error naming it."""
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be 'aggressive' or 'conservative', got {mode!r}.")


def expected_rounds(num_steps: int, width: int, mode: str = "aggressive") -> int:
    r"""The closed-form round count the scheduler must achieve (used by tests and proofs):
    :math:`1 + \lceil (T-1)/n \rceil` aggressive, :math:`2\lceil T/(n+1) \rceil - [T \bmod (n+1) = 1]` conservative."""
    n = _check_width(width)
    T = as_count(num_steps, "num_steps", 1)
    check_mode(mode)
    if mode == "aggressive":
        return 1 + math.ceil((T - 1) / n)
    return 2 * math.ceil(T / (n + 1)) - (1 if T % (n + 1) == 1 else 0)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or inf: ``(t * 0).sum()`` is 0 unless some entry is not
    finite (inf * 0 and NaN * 0 are NaN), and it is about 6x faster than ``isfinite(t).all()`` on the CPU."""
    return not bool(torch.isnan((t * 0).sum()))


def _check_width(width: Any, meaning: str = "the number of drafts per round") -> int:
    """``width`` as an int >= 1 (int, numpy and 0-d tensor integers; not bools); the error says what
    the width means to the caller."""
    try:
        return as_count(width, "width", 1, None, InvalidWidthError)
    except InvalidWidthError:
        raise InvalidWidthError(
            f"width must be an int >= 1 ({meaning}), got {width!r}. Width 1 is the serial sampler."
        ) from None


def _rows_held_by_objects(cond: Any, b: int, prefix: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor with ``b`` rows that an object of ``cond`` holds as an attribute (an
    object the executors do not look into: not a mapping, list, tuple or dataclass; not callable, not a
    module), looked for through the containers the executors do look into and one level of the object's
    attributes (and containers in them)."""
    if isinstance(cond, (torch.Tensor, str, bytes, type)) or callable(cond):
        return
    if isinstance(cond, Mapping):
        for k, v in cond.items():
            yield from _rows_held_by_objects(v, b, f"{prefix}[{k!r}]")
    elif isinstance(cond, (list, tuple)):
        for i, v in enumerate(cond):
            yield from _rows_held_by_objects(v, b, f"{prefix}[{i}]")
    elif dataclasses.is_dataclass(cond):
        for f in dataclasses.fields(cond):
            yield from _rows_held_by_objects(getattr(cond, f.name, None), b, f"{prefix}.{f.name}")
    elif isinstance(getattr(cond, "__dict__", None), dict):
        for attr, v in vars(cond).items():
            for name, t in named_tensors(v, f"{prefix}.{attr}"):
                if t.dim() > 0 and t.shape[0] == b:
                    yield name, t


def _top_key(name: str, what: str) -> str:
    """The keyword of a top-level conditioning entry named ``what['key']``, else ``"name"`` (for a message)."""
    m = re.fullmatch(re.escape(what) + r"\['(\w+)'\]", name)
    return m.group(1) if m else "name"


#: the dtypes a state may have (float8 types are floating point, but torch has no arithmetic on them)
_STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_inputs(x: Any, cond: Optional[Mapping[str, Any]], what: str = "cond") -> dict:
    """Validate the starting state and the conditioning; returns cond as a dict.

    ``what``: the conditioning argument's name in the caller's API, for the messages (``"extra_args"`` for
    the k-diffusion-style function)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _STATE_DTYPES:
        got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            got += " (torch has no arithmetic on float8: sample in one of these and cast the result)"
        raise InvalidArgumentError(
            f"x must be a floating-point tensor [B, ...] (float32, float64, float16 or bfloat16), got {got}."
        )
    if x.is_nested:
        raise InvalidArgumentError(
            "x is a nested tensor; a state needs one shape for all samples: pad it "
            "(torch.nested.to_padded_tensor(x, 0.0)) or sample each shape as its own batch."
        )
    if x.layout != torch.strided:
        raise InvalidArgumentError(
            f"x must be a dense tensor, got layout {x.layout}; the steps and the executors' stacking need dense "
            f"storage: pass x.to_dense()."
        )
    if x.dim() < 1:
        raise InvalidArgumentError("x must have a batch dimension [B, ...], got a 0-d tensor (shape ()).")
    if x.shape[0] < 1:
        raise InvalidArgumentError(f"x holds no samples (batch size 0, shape {tuple(x.shape)}); give at least one.")
    if x[0].numel() == 0:
        raise InvalidArgumentError(
            f"x holds no values per sample (shape {tuple(x.shape)}: a dimension after the batch is 0); a sample "
            f"needs at least one value."
        )
    if x.device.type == "meta":
        raise DeviceMismatchError(
            "x is a meta tensor (a shape without data); sampling needs values: create x on 'cpu' or 'cuda'."
        )
    if not all_finite(x):
        raise InvalidArgumentError("The starting state x holds NaN or inf.")
    if cond is None:
        return {}
    if not isinstance(cond, Mapping):
        raise InvalidArgumentError(
            f"{what} must be a dict of keyword arguments for the predictor (e.g. {what}={{'labels': y}} calls "
            f"predictor(x, t, labels=y)), got {type(cond).__name__}."
        )
    bad_keys = [k for k in cond if not isinstance(k, str)]
    if bad_keys:
        raise InvalidArgumentError(f"{what}'s keys are keyword-argument names and must be strings, got {bad_keys!r}.")
    cond = dict(cond)
    for name, v in named_tensors(cond, what):
        if v.is_nested and v.layout == torch.strided:  # torch's first nested layout has no shape to check rows by
            raise InvalidArgumentError(
                f"{name} is a nested tensor of torch's strided nested layout, which has no shape (its rows cannot "
                f"be counted against x's): pad it to a dense tensor (torch.nested.to_padded_tensor(v, 0.0)) and pass "
                f"a mask, or build it with layout=torch.jagged (SerialExecutor passes that as it is)."
            )
    for name, v in batched_tensors(cond, what):
        if v.device != x.device:
            raise DeviceMismatchError(f"{name} is on {v.device} but x is on {x.device}; move them to one device.")
        if v.shape[0] != x.shape[0]:
            raise InvalidArgumentError(
                f"{name} has leading dimension {v.shape[0]}, but x has batch size {x.shape[0]}; "
                f"conditioning tensors need one row per sample (0-d tensors and other values are passed as they are). "
                f"A tensor all samples share (a weight, a null embedding): close over it, "
                f"functools.partial(model, {_top_key(name, what)}=tensor), or pass a 0-d tensor / Python number for a "
                f"scalar."
            )
    if x.shape[0] > 1:
        for name, v in _rows_held_by_objects(cond, x.shape[0], what):
            owner = name.rsplit(".", 1)[0]
            raise InvalidArgumentError(
                f"{name} is a tensor of shape {tuple(v.shape)}, one row per sample it seems, held by an object "
                f"({owner}) the executors pass as it is: they repeat and slice the tensors of dicts, lists, tuples "
                f"and dataclasses only, so a batched round on K drafts would give the model {x.shape[0]} rows of it "
                f"for K * {x.shape[0]} rows of x. Pass the tensor as its own {what} entry, or make the object a "
                f"dataclass (or a dict / namedtuple); a tensor all samples share: close over it "
                f"(functools.partial(model, ...)) instead of passing it in {what}."
            )
    return cond


def where_steps(grid: TimeGrid, steps: List[int]) -> str:
    """'step 3 (level 700, model time 700)' or 'steps 3..6 (levels 700..400)', for error messages."""
    first, last = steps[0], steps[-1]
    if len(steps) == 1:
        return f"step {first} (level {grid.t_from[first].item():g}, model time {grid.model_times[first].item():g})"
    return f"steps {first}..{last} (levels {grid.t_from[first].item():g}..{grid.t_from[last].item():g})"


_SIGNATURE_ERROR = re.compile(r"missing \d+ required (positional|keyword-only) argument|unexpected keyword argument|"
                              r"takes \d+ positional arguments? but \d+ (were|was) given")
_CLASH = re.compile(r"got multiple values for (?:keyword )?argument '(\w+)'")


# torch's messages for a dtype or device clash ("expected ... same dtype", "Expected all tensors to be on the same
# device", "Input type (double) and bias type (float) should be the same", "found at least two devices", ...)
_DTYPE_OR_DEVICE = re.compile(r"dtype|same device|two devices|device type|[Ii]nput type|scalar type")
# torch's messages for an index tensor that is not an integer one (an embedding looked up with a float t)
_NOT_AN_INDEX = re.compile(r"'indices'|used as indices|Long, Int|expected scalar type Long|must be (?:of )?(?:type )?long", re.I)


def _call_hint(error: BaseException, cond: Optional[Mapping[str, Any]], t_dtype: Optional[torch.dtype] = None) -> str:
    """What to check for an exception from the predictor: its calling convention for a TypeError about its
    arguments, the state's dtype and device for an error that reads like a dtype or device clash, else
    nothing (a hint about dtypes on a KeyError from the model would send its author the wrong way)."""
    clash = _CLASH.search(safe_str(error)) if isinstance(error, TypeError) else None
    if clash and cond and clash.group(1) in cond:
        return (
            f"cond has the key {clash.group(1)!r}, which is also the name of the predictor's x or t argument: the "
            f"predictor is called as f(x, t, **cond), so rename that key (and the model's keyword argument it feeds)"
        )
    if isinstance(error, TypeError) and _SIGNATURE_ERROR.search(safe_str(error)):
        keys = ", ".join(repr(k) for k in cond) if cond else None
        given = f"with the keyword arguments {keys} from cond" if keys else "with no keyword arguments (cond is empty)"
        return (
            f"the predictor is called as f(x, t, **cond), {given}: a model that takes more arguments needs them "
            f"in cond (e.g. cond={{'labels': y}} calls f(x, t, labels=y)); one that takes fewer, a wrapper such as "
            f"lambda x, t, **c: model(x, t)"
        )
    if t_dtype is not None and t_dtype.is_floating_point and _NOT_AN_INDEX.search(safe_str(error)):
        return (
            f"the model got t as {t_dtype} (this grid's model times are not integers: flow sigma * N, or levels "
            f"between training timesteps); a model that indexes a table with t needs integers, e.g. "
            f"lambda x, t, **c: model(x, t.round().long(), **c)"
        )
    if _DTYPE_OR_DEVICE.search(safe_str(error)):
        return "a model with parameters of another dtype or device needs x there too"
    return ""


def note_where(error: BaseException, grid: TimeGrid, steps: List[int], x: torch.Tensor,
               cond: Optional[Mapping[str, Any]] = None) -> None:
    """Add to an exception from the predictor or executor where sampling was (Python >= 3.11 notes):
    the draft's step where the executor marked it (:func:`~driffusion_core.executor.mark_draft`), else the
    round's steps, and what to check (the calling convention, for a TypeError about the predictor's
    arguments). The exception keeps its type, so callers catching the model's own errors still do."""
    k = getattr(error, "_driffusion_draft", None)
    if isinstance(k, int) and 0 <= k < len(steps):
        steps = [steps[k]]
    if hasattr(error, "add_note"):
        t_dtype = grid.model_times.dtype
        hint = "" if isinstance(error, PredictorOutputError) else _call_hint(error, cond, t_dtype)
        hint = f" ({hint})" if hint else ""
        error.add_note(
            f"driffusion: raised while evaluating {where_steps(grid, steps)}; the state is "
            f"{x.dtype} {tuple(x.shape)} on {x.device}, t is {t_dtype} [{x.shape[0]}]{_cond_listing(cond)}{hint}."
        )


def _cond_listing(cond: Optional[Mapping[str, Any]], most: int = 6) -> str:
    """``", and the conditioning's tensors are cond['mask'] torch.bool (4, 16), ..."`` (at most ``most`` of them,
    for an error note), or "" when it holds none."""
    found = list(named_tensors(cond or {}))
    if not found:
        return ""
    shown = ", ".join(f"{name} {t.dtype} {tuple(t.shape)}" for name, t in found[:most])
    more = f" and {len(found) - most} more" if len(found) > most else ""
    return f", and the conditioning's tensors are {shown}{more}"


def _overflow_hint(dtype: torch.dtype) -> str:
    degenerate = ("the transition's coefficients are degenerate on this grid (check the schedule's alpha-bar at "
                  "the grid's levels: a step between two levels with alpha-bar 0 divides 0 by 0)")
    if dtype in (torch.float16, torch.bfloat16):
        return (f"the state overflowed its dtype ({dtype}; sample in float32, or check predictions of very large "
                f"magnitude), or {degenerate}.")
    return (f"{degenerate}, or the state overflowed its dtype ({dtype}; check predictions of very large "
            f"magnitude).")


def check_finite_sample(x: torch.Tensor, sampler: str) -> torch.Tensor:
    """The final sample, or a SamplingError when it holds NaN or inf (every model output was finite)."""
    if not all_finite(x):
        raise SamplingError(
            f"{sampler}: the sample holds NaN or inf although every model output was finite: " + _overflow_hint(x.dtype)
        )
    return x


def input_version(x: torch.Tensor, cond: Optional[Mapping[str, Any]] = None) -> Tuple[Any, list]:
    """What shows in-place writes into a model call's inputs (:func:`~driffusion_core.executor.version_stamp`:
    torch's version counter, or a fingerprint of an inference tensor's values): the state's, and each
    conditioning tensor's as ``(name, tensor, stamp)``."""
    return version_stamp(x), tensor_versions(cond)


def check_input_untouched(x: torch.Tensor, versions: Tuple[Optional[int], list], grid: TimeGrid,
                          steps: List[int]) -> None:
    """Refuse a predictor that wrote into its input (``versions``: :func:`input_version` before the call): the
    sampler still needs that state, and a serial and a parallel sampler would silently part ways (one steps
    from the altered state, one not). Likewise a write into a conditioning tensor: the next call would see
    other conditioning, and executors that pass copies (repeated or moved) would not."""
    version, conds = versions
    # one host read for the state's and the conditioning's fingerprints (inference tensors), not one per tensor
    x_changed, *cond_changed = stamps_changed([(x, version)] + [(t, v) for _, t, v in conds])
    if x_changed:
        raise PredictorOutputError(
            f"The predictor modified its input x in place at {where_steps(grid, steps)}; the sampler still needs "
            f"that state. Work on a copy inside the model (e.g. x = x.clone() before an in-place op)."
        )
    name = changed_tensor(conds, cond_changed)
    if name is not None:
        raise PredictorOutputError(
            f"The predictor modified the conditioning tensor {name} in place at {where_steps(grid, steps)}; "
            f"every later call would see the changed value (and executors that pass copies would not). Work "
            f"on a copy inside the model (clone the tensor before an in-place op)."
        )


def check_predictions(
    preds: Any, xs: torch.Tensor, steps: List[int], grid: TimeGrid
) -> torch.Tensor:
    """Check a round's predictions: a tensor like ``xs``, same device and dtype, all finite.

    An executor that called the predictor per draft may hand back the list of its outputs when they are
    unlike each other; each is then checked against its own draft, so the error names that draft's step."""
    where = lambda k: where_steps(grid, [steps[k]])

    def check_one(p: Any, want: torch.Tensor, k: int, lead: int) -> None:
        # one draft's prediction names its step; a round's stacked tensor (one batched call) names the round's
        loc = where_steps(grid, steps) if lead else where(k)
        if not isinstance(p, torch.Tensor):
            raise PredictorOutputError(
                f"The predictor returned {type(p).__name__} at {loc}; it must return a tensor.{not_a_tensor_hint(p)}"
            )
        if not_dense(p):
            raise PredictorOutputError(f"The predictor returned {not_dense(p)} at {loc}; {DENSE_FIX}.")
        if lead and p.dim() == want.dim() and p.shape[0] != want.shape[0] and p.shape[1:] == want.shape[1:]:
            raise ExecutorError(
                f"The executor returned predictions for {p.shape[0]} draft(s) at {where_steps(grid, steps)}, but "
                f"the round has {want.shape[0]}: evaluate(predictor, xs, ts, cond) must return one prediction per "
                f"draft, shaped like xs [K, B, ...] = {list(want.shape)}."
            )
        if lead and p.dim() != want.dim() and (p.dim() == 0 or p.shape[0] != want.shape[0]):
            # not K predictions: an executor that did not stack by draft (or the predictor's own shape)
            raise PredictorOutputError(
                f"The round's predictions have shape {tuple(p.shape)} at {where_steps(grid, steps)}, but its states "
                f"have shape {tuple(want.shape)} ([K drafts, B, ...]): the predictor must return one prediction per "
                f"input, shaped like x {tuple(want.shape[1:])}; a custom executor's evaluate must return them "
                f"stacked by draft, Tensor[K, B, ...] (reshape a [K * B, ...] call's output back)."
            )
        if p.shape != want.shape:
            raise PredictorOutputError(
                f"The predictor returned shape {tuple(p.shape[lead:])} at {loc}, but the state has shape "
                f"{tuple(want.shape[lead:])}; it must return one prediction per input, shaped like x."
            )
        if p.device != want.device or p.dtype != want.dtype:
            lower = p.device == want.device and p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16)
            autocast = (" A model run under torch.autocast returns its lower-precision dtype: wrap it as "
                        "lambda x, t, **c: model(x, t, **c).to(x.dtype)." if lower else "")
            raise DeviceMismatchError(
                f"The predictor returned {p.dtype} on {p.device} at {loc}, but the state is "
                f"{want.dtype} on {want.device}; cast the model output (or run the sampler in the model's dtype)."
                + autocast
            )

    # the built-in executors hand back a tensor, or a list of the K drafts' outputs: anything else is an executor's
    contract = lambda: (f"evaluate(predictor, xs, ts, cond) must return the predictions stacked by draft, a "  # noqa: E731
                        f"tensor shaped like xs [K, B, ...] = {list(xs.shape)} (or a list of the K drafts' predictions)")
    if not isinstance(preds, (torch.Tensor, list, tuple)):
        raise ExecutorError(
            f"The executor returned {type(preds).__name__} for the round at {where_steps(grid, steps)}; {contract()}."
        )
    if isinstance(preds, (list, tuple)) and len(preds) != xs.shape[0]:
        raise ExecutorError(
            f"The executor returned a {type(preds).__name__} of {len(preds)} predictions for the round at "
            f"{where_steps(grid, steps)}, which has {xs.shape[0]} draft(s); {contract()}."
        )
    if isinstance(preds, (list, tuple)):
        for k, p in enumerate(preds):
            check_one(p, xs[k], k, 0)
        preds = preds[0].unsqueeze(0) if len(preds) == 1 else torch.stack(list(preds))  # all checked: alike
    check_one(preds, xs, 0, 1)
    if not all_finite(preds):  # find the draft only on failure
        finite = torch.isfinite(preds).reshape(preds.shape[0], -1).all(dim=1)
        k = int(torch.nonzero(~finite)[0])
        kind = "NaN" if torch.isnan(preds[k]).any() else "inf"
        if not all_finite(xs[k]):  # the model was handed a broken state: the sampler's fault, not the model's
            raise SamplingError(
                f"The state reaching {where(k)} already holds NaN or inf (and the predictor returned {kind} "
                f"on it): in an earlier step " + _overflow_hint(xs.dtype)
            )
        raise PredictorOutputError(
            f"The predictor returned {kind} at {where(k)} on a finite input state. Check the model at this "
            f"noise level."
        )
    return preds


def evaluate_round(
    executor: Executor, predictor: Predictor, rnd: "Round", grid: TimeGrid, cond: Mapping[str, Any], x: torch.Tensor
) -> Any:
    """The round's model calls, ``executor.evaluate(predictor, rnd.xs, model times, cond)``, with the
    sampler's guards: an exception gets a note saying where sampling was, and a predictor that wrote
    into its input is refused. The predictions are checked by the state's ``absorb``."""
    # its own memory (not a broadcast view), made on the CPU and sent to a GPU without a stream synchronisation
    # (non_blocking from pageable memory: staged before the call returns, so the source may go; CUDA only)
    ts = grid.model_times[rnd.steps].unsqueeze(1).repeat(1, x.shape[0])
    ts = ts.to(x.device, non_blocking=x.device.type == "cuda")
    version = input_version(rnd.xs, cond)
    try:
        preds = executor.evaluate(predictor, rnd.xs, ts, cond)
    except Exception as e:
        note_where(e, grid, rnd.steps, x, cond)
        raise
    check_input_untouched(rnd.xs, version, grid, rnd.steps)
    return preds


def run_rounds(
    make_state: Callable[[], Any],
    grid: TimeGrid,
    predictor: Predictor,
    x: torch.Tensor,
    executor: Optional[Executor],
    cond: Optional[Mapping[str, Any]],
    progress: bool,
    desc: str,
) -> Tuple[Any, Executor]:
    """Drive a round state machine (``plan()`` / ``absorb()``, e.g. :class:`DraftRefineState`) to the end.

    Checks the predictor, the inputs and the executor, then makes the state with ``make_state()``;
    each round's states go to ``executor.evaluate`` with their model times. Returns the finished
    state and the executor used (the serial one by default).
    """
    check_predictor(predictor)
    cond = check_inputs(x, cond)
    executor = executor if executor is not None else SerialExecutor()
    check_executor(executor)
    state = make_state()
    bar = progress_bar(progress, len(grid), desc)
    with warn_random_layers(predictor, desc):
        while True:
            rnd = state.plan()
            if rnd is None:
                break
            before = state.a
            state.absorb(rnd, evaluate_round(executor, predictor, rnd, grid, cond, x))
            if bar is not None:
                bar.update(state.a - before)
    if bar is not None:
        bar.close()
    executor.finish(state.x)  # once per sample, on every rank (an executor spanning processes checks it)
    return state, executor


def default_noise(transition: SkipTransition, noise: Optional[NoiseSource]) -> Optional[NoiseSource]:
    """The noise source to use: the given one, or a fresh seed from torch's global RNG if stochastic."""
    if noise is not None:
        if not isinstance(noise, NoiseSource):
            raise InvalidArgumentError(f"noise must be a NoiseSource or None, got {type(noise).__name__}{_NOISE_HINT}.")
        return noise
    if transition.stochastic:
        return NoiseSource(int(torch.randint(0, 2**62, ())))
    return None


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar over the grid's steps, left on screen when done (as diffusers' and k-diffusion's are)."""
    if not as_flag(enabled, "progress"):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but the core does not need it
        return None
    return tqdm(total=total, desc=desc, unit="step")


def check_planned(state: Any, rnd: "Round") -> None:
    """Refuse a round a state machine's ``absorb`` did not plan last (``state._planned``): one absorbed twice,
    before any ``plan()``, or a stale one would refine against the wrong states."""
    if rnd is None or rnd is not state._planned:  # None is not a round even when none is planned
        raise InvalidArgumentError(
            f"{type(state).__name__}.absorb takes the round the last plan() returned (once): "
            + ("no round is planned now (absorb was called before plan(), or twice for one round, or after the "
               "last: plan() returned None, sampling is done)." if state._planned is None else
               "got None, not a Round: pass the round plan() returned." if rnd is None else
               "this one is another (a stale round, or one planned elsewhere).")
        )


@dataclass(eq=False)  # as SampleOutput: == is identity
class Round:
    """One parallel round: evaluate the predictor at steps ``steps`` on states ``xs`` (``Tensor[K, B, ...]``)."""

    steps: List[int]
    xs: torch.Tensor
    anchor_call: bool

    def __repr__(self) -> str:  # the states by shape, not by value
        return f"Round(steps={self.steps}, xs={tuple(self.xs.shape)}, anchor_call={self.anchor_call})"


class DraftRefineState:
    """The draft-and-refine state machine: ``plan()`` a round, ``absorb()`` its predictions.

    Holds the anchor index a, the anchor state x_a and, when known, its prediction p_a. It may start
    at step ``start`` of the grid with x = x_start (a caller that finished steps 0..start-1 another
    way); a multistep transition then needs the ``history`` of the steps before, ``(x_i, p_i, t_from[i])``.
    """

    def __init__(
        self,
        transition: SkipTransition,
        grid: TimeGrid,
        width: int,
        mode: str,
        x: torch.Tensor,
        noise: Optional[NoiseSource],
        keep_trajectory: bool = False,
        start: int = 0,
        history: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (),
    ):
        check_transition(transition, "DraftRefineState(transition, grid, width, mode, x, ...)")
        grid = transition.make_grid(grid)  # the transition's own kind of levels, in its range, decreasing
        width = _check_width(width)
        check_mode(mode)
        check_inputs(x, None)
        if noise is not None and not isinstance(noise, NoiseSource):
            raise InvalidArgumentError(f"noise must be a NoiseSource or None, got {type(noise).__name__}{_NOISE_HINT}.")
        if noise is None and transition.stochastic:
            raise InvalidArgumentError(
                f"{type(transition).__name__} is stochastic here: its steps draw noise, so pass noise=NoiseSource(seed) "
                f"(DraftRefineScheduler.start and .sample draw a seed for you when given None)."
            )
        keep_trajectory = as_flag(keep_trajectory, "return_trajectory / keep_trajectory")
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise InvalidArgumentError(
                f"history must be a sequence of (x_i, p_i, t_from[i]) triples, oldest first, got {type(history).__name__}."
            )
        for j, h in enumerate(history):
            ok = (isinstance(h, (tuple, list)) and len(h) == 3 and all(isinstance(v, torch.Tensor) for v in h[:2])
                  and h[0].shape == x.shape and h[1].shape == x.shape)
            if not ok:
                raise InvalidArgumentError(
                    f"history[{j}] must be a triple (x_i, p_i, t_from[i]) with x_i and p_i tensors shaped like x "
                    f"{tuple(x.shape)}, got {reprlib.repr(h)}."
                )
            if not (all_finite(h[0]) and all_finite(h[1])):
                raise InvalidArgumentError(f"history[{j}] holds NaN or inf in its state or prediction.")
        self.transition, self.grid, self.width, self.mode = transition, grid, width, mode
        self.noise = noise
        self.T = len(grid)
        start = as_count(start, "start (a step of the grid)", 0, self.T - 1)
        self.a = start
        self.x = x.clone()  # the first anchor call's input: the caller's x stays intact if the model writes into it
        self.pred: Optional[torch.Tensor] = None
        self.rounds = 0
        self.evals = 0
        self.drafts_per_round: List[int] = []
        self.trajectory: Optional[List[torch.Tensor]] = [self.x] if keep_trajectory else None  # the copy, as serial
        # from plan() to absorb(): the window's per-step noise, and its first draft, which is the
        # refine's first step S(x_a, p_a, z_a) bit for bit (``SkipTransition.drafts``), so neither
        # is computed twice (copied: a predictor may write into its inputs)
        self._noise_cache: Dict[int, torch.Tensor] = {}
        self._first_step: Optional[torch.Tensor] = None
        self._planned: Optional[Round] = None  # the round plan() returned and absorb() has not taken yet
        # a multistep transition's memory: the last (x_i, p_i, t_i) of the refined chain, oldest first
        self._history: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = list(history)
        need = transition.history_at(grid, start) if transition.history else 0
        got = [float(h[2]) for h in self._history[len(self._history) - need:]] if need else []
        want = grid.t_from[start - need : start].tolist()
        if need and (len(self._history) < need or got != want):
            raise InvalidArgumentError(
                f"{type(transition).__name__} is multistep: starting at step {start} it combines the {need} step(s) "
                f"before, so pass history=[(x_i, p_i, t_from[i]) for i in {list(range(start - need, start))}] "
                f"(levels {want}), got levels {[float(h[2]) for h in self._history]}."
            )

    @property
    def done(self) -> bool:
        """Whether every step of the grid has been taken (``x`` is then the sample)."""
        return self.a >= self.T

    def _z(self, i: int) -> Optional[torch.Tensor]:
        if self.noise is None or not self.transition.stochastic:
            return None
        z = self._noise_cache.pop(i, None)
        return z if z is not None else self.noise(i, self.x.shape, self.x.dtype, self.x.device)

    def step(self, x: torch.Tensor, pred: torch.Tensor, i: int) -> torch.Tensor:
        """The serial update x_{i+1} = S(x_i, p_i, t_from[i] -> t_to[i], z_i) (a multistep transition also
        combines the earlier refined steps)."""
        out = self.transition.grid_step(x, pred, self.grid, i, self._history, self._z(i))
        self._remember(x, pred, i)
        return out

    def _remember(self, x: torch.Tensor, pred: torch.Tensor, i: int) -> None:
        """Keep (x_i, p_i, t_i) of the refined chain for a multistep transition's next steps."""
        if self.transition.history:
            self._history = self.transition.remember(self._history, x, pred, self.grid.t_from[i])

    def _advance(self, x: torch.Tensor) -> None:
        self.a += 1
        self.x = x
        if self.trajectory is not None:
            self.trajectory.append(x)

    def plan(self) -> Optional[Round]:
        """The next round, or None when sampling is done."""
        if self.done:
            return None
        if self.pred is None:
            self._planned = Round([self.a], self.x.unsqueeze(0), anchor_call=True)
            return self._planned
        if self._finish_if_last():  # a caller handed in the last level's prediction
            return None
        a, g = self.a, self.grid
        m = min(self.width, self.T - 1 - a)
        noises = None
        if self.transition.stochastic and self.noise is not None:
            noises = torch.stack([self._z(i) for i in range(a, a + m)])
            self._noise_cache = {a + j: noises[j] for j in range(m)}
        tr = self.transition
        h = tr.history_at(g, a) if tr.history else 0
        extra = {"history": self._history[len(self._history) - h :]} if h else {}
        xs = tr.drafts(self.x, self.pred, g.t_from[a : a + m], g.t_to[a : a + m], noises, **extra)
        self._first_step = xs[0].clone()
        self._planned = Round(list(range(a + 1, a + m + 1)), xs, anchor_call=False)
        return self._planned

    def absorb(self, rnd: Round, preds: torch.Tensor) -> None:
        """Take the predictions of the round the last :meth:`plan` returned, and refine."""
        check_planned(self, rnd)
        self._planned = None
        preds = check_predictions(preds, rnd.xs, rnd.steps, self.grid)
        self.rounds += 1
        self.evals += len(rnd.steps)
        if rnd.anchor_call:
            self.pred = preds[0]
        else:
            self.drafts_per_round.append(len(rnd.steps))
            # refine: x_{a+1} = S(x_a, p_a); x_{a+j+1} = S(x_{a+j}, p~_{a+j})
            if self._first_step is not None:
                x = self._first_step
                self._remember(self.x, self.pred, self.a)
            else:
                x = self.step(self.x, self.pred, self.a)
            self._first_step = None
            self._noise_cache.pop(self.a, None)
            last = len(rnd.steps) if self.mode == "conservative" else len(rnd.steps) - 1
            for j in range(last):
                self._advance(x)
                x = self.step(x, preds[j], self.a)
            self._advance(x)
            self.pred = preds[-1] if self.mode == "aggressive" else None
        self._finish_if_last()

    def _finish_if_last(self) -> bool:
        """When the last level's prediction is known, take the last step without a model call."""
        if self.pred is None or self.a != self.T - 1:
            return False
        self._advance(self.step(self.x, self.pred, self.a))
        self.pred = None
        return True


WIDE_WINDOW = Fraction(1, 5)
"""From this width / T on (the width capped at T - 1, and more than one level), :class:`DraftRefineScheduler`
warns (:class:`~driffusion_core.errors.WideWindowWarning`)."""


def warn_wide_window(width: int, num_steps: int, stacklevel: int = 2) -> None:
    """Warn when a window of ``width`` drafts reaches :data:`WIDE_WINDOW` or more of a grid of ``num_steps``.

    A draft x~_{a+j} freezes the anchor's prediction for j levels; at j / T from about 0.2 on it is far from
    the state the serial chain reaches there, the model is evaluated off its path, and on the benchmarks' grid
    study DRiffusion was then farther from the serial sample than step skipping in half the settings (on short
    grids, and for DDPM, it can diverge). A window drafts at most T - 1 levels ahead, so that is the reach
    compared (width 4 on 2 steps drafts one level: the serial step itself, no warning). Width 1 never warns.
    """
    reach = min(width, num_steps - 1)
    if reach > 1 and Fraction(reach, num_steps) >= WIDE_WINDOW:
        capped = f" (width {width} is capped at T - 1 = {reach})" if reach < width else ""
        warnings.warn(
            f"width {width} on a grid of {num_steps} steps: each window drafts up to {reach} levels, "
            f"{reach / num_steps:.2f} of the grid, ahead of its anchor{capped}. From about {float(WIDE_WINDOW):g} on, the far drafts are "
            f"far from the serial path and DRiffusion is often farther from the serial sample than step skipping at "
            f"the same rounds, or diverges on short grids. Keep width <= T / 10 (width 4 for 50 steps) with "
            f"trailing spacing, or use solvers.PicardScheduler with a tolerance. Silence this with "
            f"warnings.simplefilter('ignore', driffusion_core.WideWindowWarning).",
            WideWindowWarning,
            stacklevel=stacklevel + 1,
        )


class DraftRefineScheduler:
    r"""DRiffusion's draft-and-refine sampler (arXiv 2603.25872, Algorithm 1).

    Levels :math:`t_0 > \dots > t_T`, states :math:`x_i`, predictor f, skip transition S, width n, anchor a.

    **Aggressive.** From the anchor :math:`(x_a, p_a)` draft
    :math:`\tilde x_{a+j} = S(x_a, p_a, t_a \to t_{a+j}, \tilde z_j)` for j = 1..m, m = min(n, T-1-a);
    evaluate :math:`\tilde p_{a+j} = f(\tilde x_{a+j}, t_{a+j})` for all j in one parallel round; refine
    serially :math:`x_{a+1} = S(x_a, p_a)`, :math:`x_{a+j+1} = S(x_{a+j}, \tilde p_{a+j})`; the new anchor is
    :math:`(x_{a+m}, \tilde p_{a+m})`. Rounds = 1 + ceil((T-1)/n).

    **Conservative.** Each iteration first evaluates the exact :math:`p_a = f(x_a, t_a)` (a round of its own),
    then drafts and refines as above through :math:`x_{a+m+1}`: n+1 levels in two rounds.
    Rounds = 2 ceil(T/(n+1)) - [T mod (n+1) = 1].

    Both modes make exactly T model calls (``SampleOutput.evals``; ``rounds`` counts the parallel rounds).
    Width 1 is the serial sampler, bit for bit, given the same ``noise``. The drafts of a deterministic
    transition are the serial chain with :math:`p_a` frozen (skips compose); a stochastic one couples the
    drafts' noise to the serial steps' :math:`z_a, \dots, z_{a+j-1}` (see the transition's ``drafts``).

    Arguments:
        transition: the skip transition (``solvers.DDIMSkip``, ``DDPMSkip``, ``FlowEulerSkip``...).
        timesteps: a :class:`TimeGrid` (e.g. ``schedule.timesteps(50)``) or decreasing levels.
        width: drafts per round, n >= 1 (n devices, or one batched call of n). A window never reaches past
            the grid, so any n >= T - 1 is width T - 1 (two rounds, aggressive); a wider window drafts
            further from its anchor, so wide windows on short grids trade accuracy for rounds; from
            width / T = 0.2 on (:data:`WIDE_WINDOW`) the scheduler warns with a
            :class:`~driffusion_core.errors.WideWindowWarning`.
        mode: ``"aggressive"`` (about T/n rounds) or ``"conservative"`` (about 2T/(n+1) rounds: every
            window's anchor is evaluated exactly, one round of its own). Conservative is not uniformly
            closer to the serial output. In the 18 quality tables of the committed benchmark
            (``benchmarks/results/report.md``, trailing grids, T = 50) it was closer at width 2 in 17 (not
            the 16-D mixture's UniPC table) and for DDPM and flow at width 4 in all 6; for DDIM,
            DPM-Solver++ 2M and UniPC at width 4, aggressive was closer in fewer rounds in 7 of 12 tables,
            conservative in 5 (the 16-D mixture's DDIM, 2M and UniPC tables, and the ring's 2M and UniPC
            tables by 2 % and 0.3 %).

    Example::

        schedule = VPSchedule.linear()
        sched = DraftRefineScheduler(DDIMSkip(schedule), schedule.timesteps(50, "trailing"), width=4)
        out = sched.sample(model, NoiseSource(0).initial((8, 2)), executor=BatchedExecutor())
        out.x, out.rounds, out.evals
    """

    def __init__(
        self,
        transition: SkipTransition,
        timesteps: Union[TimeGrid, torch.Tensor, list, tuple],
        width: int = 2,
        mode: str = "aggressive",
    ):
        check_transition(transition, "DraftRefineScheduler(transition, timesteps, width)")
        check_mode(mode)
        self.transition = transition
        self.grid = transition.make_grid(timesteps)
        self.width = _check_width(width)
        self.mode = mode
        warn_wide_window(self.width, self.num_steps, stacklevel=2)

    @property
    def num_steps(self) -> int:
        """T, the number of steps (model calls) of the grid."""
        return len(self.grid)

    def expected_rounds(self) -> int:
        """The rounds :meth:`sample` takes on this grid, width and mode (:func:`expected_rounds`)."""
        return expected_rounds(self.num_steps, self.width, self.mode)

    def start(self, x: torch.Tensor, noise: Optional[NoiseSource] = None, keep_trajectory: bool = False) -> DraftRefineState:
        """A fresh state machine at x (for callers that drive rounds themselves)."""
        return DraftRefineState(
            self.transition, self.grid, self.width, self.mode, x, default_noise(self.transition, noise), keep_trajectory
        )

    def sample(
        self,
        predictor: Predictor,
        x: torch.Tensor,
        executor: Optional[Executor] = None,
        noise: Optional[NoiseSource] = None,
        cond: Optional[Mapping[str, Any]] = None,
        progress: bool = False,
        return_trajectory: bool = False,
    ) -> SampleOutput:
        """Sample from x (the state at ``t_0``, e.g. ``NoiseSource(seed).initial(shape)``).

        Arguments:
            predictor: ``f(x: Tensor[B, ...], t: Tensor[B], **cond) -> Tensor[B, ...]``.
            x: the starting state ``Tensor[B, ...]``.
            executor: how a round runs (default: :class:`SerialExecutor`; pass
                ``backends.BatchedExecutor()`` for one batched call per round).
            noise: per-step noise for stochastic transitions (default: a random seed).
            cond: keyword arguments for the predictor; tensors need a leading batch dim B.
            progress: show a tqdm progress bar.
            return_trajectory: keep the refined states x_0 .. x_T.

        Returns:
            :class:`SampleOutput` with the sample, the rounds and the model calls made.

        Autograd is left as the caller set it (the rounds are differentiable, like the serial loop);
        for inference with an ``nn.Module`` wrap the call in ``torch.no_grad()``, as diffusers' pipelines
        do, or the graph of all T calls is kept.
        """
        state, executor = run_rounds(
            lambda: self.start(x, noise, return_trajectory), self.grid, predictor, x, executor, cond, progress, f"DRiffusion {self.mode} n={self.width}"
        )
        return SampleOutput(
            check_finite_sample(state.x, "DraftRefineScheduler"),
            state.rounds,
            state.evals,
            state.trajectory,
            {"drafts_per_round": state.drafts_per_round, "executor": executor.describe(), "width": self.width,
             "mode": self.mode},
        )

    def __repr__(self) -> str:
        return f"DraftRefineScheduler({self.transition!r}, T={self.num_steps}, width={self.width}, mode={self.mode!r})"

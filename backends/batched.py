"""One device, one call: the K drafts of a round as a single batched model call."""
from __future__ import annotations

import contextlib
import re
import threading
from typing import Any, Callable, List, Mapping, Optional, Tuple

import numpy as np
import torch

from driffusion_core.errors import (
    DeviceMismatchError,
    InvalidArgumentError,
    PredictorOutputError,
    as_count,
    not_a_tensor_hint,
    safe_str,
)
from driffusion_core.modules import layers_in, pre_hooks
from driffusion_core.executor import (
    DENSE_FIX,
    Executor,
    Predictor,
    batched_tensors,
    check_describe_width,
    check_round_args,
    changed_tensor,
    iter_tensors,
    named_tensors,
    map_tensors,
    not_dense,
    tensor_versions,
)


def _refuse_non_dense_cond(cond: Optional[Mapping[str, Any]]) -> None:
    """Refuse a sparse or nested conditioning tensor: repeating its rows K times (or slicing them, or vmap over
    them) fails inside torch. SerialExecutor passes such tensors as they are."""
    for name, v in named_tensors(cond or {}):
        if v.is_nested or v.layout != torch.strided:
            kind = "nested" if v.is_nested else str(v.layout).replace("torch.", "")
            fix = "pad it (torch.nested.to_padded_tensor(v, 0.0)) and pass a mask" if v.is_nested else \
                f"pass {name}.to_dense()"
            raise InvalidArgumentError(
                f"BatchedExecutor: {name} is a {kind} tensor; the batched call repeats (or slices) the conditioning's "
                f"rows for the K drafts, which torch cannot do on that layout: {fix}, or sample with "
                f"SerialExecutor (the default), which passes it as it is."
            )


def repeat_cond(cond: Mapping[str, Any], k: int) -> dict:
    """Repeat every tensor of ``cond`` K times along dim 0 (draft-major order), nested ones too.

    Row ``k * B + b`` of the result is row ``b`` of the input, matching
    ``xs.reshape(K * B, ...)``. 0-d tensors and non-tensor values pass through unchanged.
    """
    return map_tensors(lambda v: v.repeat(k, *([1] * (v.dim() - 1))) if v.dim() > 0 else v, cond)


def _chunk_rows(cond: Mapping[str, Any], b: int, start: int, stop: int) -> dict:
    """Rows ``start .. stop`` of ``repeat_cond(cond, K)`` without building it (row r is row r % B of the
    input): a view when the chunk lies within one draft's rows, else a copy of the chunk's rows only, so
    ``max_batch`` bounds the conditioning's memory too."""
    lo, hi = start % b, start % b + (stop - start)
    if hi <= b:
        return map_tensors(lambda v: v[lo:hi] if v.dim() > 0 else v, cond)
    index = torch.arange(start, stop) % b
    return map_tensors(lambda v: v.index_select(0, index.to(v.device)) if v.dim() > 0 else v, cond)


def per_sample(f: Callable[..., torch.Tensor]) -> Predictor:
    """A batch predictor made from ``f`` written for a single sample, with ``torch.func.vmap``.

    ``f(x: Tensor[...], t: Tensor[], **cond_row) -> Tensor[...]`` sees one row: the state, its 0-d
    model time and that row of every conditioning tensor (0-d tensors and other values whole).
    The result is ``F(x: Tensor[B, ...], t: Tensor[B], **cond) -> Tensor[B, ...]``, usable with every
    sampler and executor; with :class:`BatchedExecutor` the K drafts of a round are K * B rows of one
    vmapped call. ``f`` must be vmap-compatible (no data-dependent Python control flow).
    """
    if not callable(f):
        raise InvalidArgumentError(f"per_sample needs a callable, got {type(f).__name__}.")
    name = f"per_sample({getattr(f, '__name__', type(f).__name__)})"

    def batched(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        # vmap maps over the batched tensors (dim > 0) as one flat list, and each call rebuilds the conditioning
        # around its rows (map_tensors, in iter_tensors' order): mappings of any type, dataclasses and
        # namedtuples reach f as they came, which vmap's own pytrees would pass whole (a FrozenDict, a dataclass)
        rows = [v for v in iter_tensors(cond) if v.dim() > 0]

        def one(xx: torch.Tensor, tt: torch.Tensor, rr: List[torch.Tensor]) -> torch.Tensor:
            it = iter(rr)
            return f(xx, tt, **map_tensors(lambda v: next(it) if v.dim() > 0 else v, cond))

        try:
            return torch.func.vmap(one)(x, t, rows)
        except Exception as e:
            if _looks_like_vmap(e):
                _note_vmap(e, name)
            else:
                _note_sliced(e, cond, f"{name} passes f one row of each conditioning tensor with a batch dimension")
            raise

    batched.__name__ = name
    batched.__wrapped__ = f
    return batched


def _batch_statistics_layers(predictor: Any, running_only: bool = False) -> List[Tuple[str, torch.nn.Module]]:
    """The BatchNorm layers a predictor may run that normalise with the batch's own statistics (training
    mode, or ``track_running_stats=False``; ``running_only``: training mode with running statistics only),
    named by their path in the module found."""
    return layers_in(predictor, lambda m: isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
        (m.training and m.running_mean is not None) if running_only else (m.training or m.running_mean is None)))


def _no_batch_statistics(predictor: Any, running_only: bool = False):
    """Refuse, when it runs in this thread during the batched call, a BatchNorm layer the predictor reaches
    that normalises with batch statistics: they would mix the round's drafts (or split one draft's rows, with
    ``max_batch`` below the batch size), so the batched call would not give the serial executor's result. A
    layer that does not run (an unused module beside the model) is not refused. A context manager."""
    me = threading.get_ident()

    def refuse(path: str, layer: torch.nn.Module):
        def hook(module, args):
            if threading.get_ident() == me:
                why = "is in training mode" if layer.training else "has track_running_stats=False"
                raise InvalidArgumentError(
                    f"BatchedExecutor: the model's BatchNorm layer {path!r} {why}, so it normalises with the "
                    f"statistics of the whole batch, which would mix the drafts of a round (or split the batch, "
                    f"with max_batch below the batch size) and the result would differ from SerialExecutor's; "
                    f"call model.eval() before sampling (with running statistics)."
                )
        return hook

    return pre_hooks(_batch_statistics_layers(predictor, running_only), refuse)


class BatchedExecutor(Executor):
    """Evaluates all K drafts of a round in one predictor call.

    Two ways to batch:

    * ``vmap=False`` (default): concatenate the drafts along the batch
      dimension, ``[K, B, ...] -> [K * B, ...]``, repeat the conditioning K
      times, call the predictor once and split the result back.
    * ``vmap=True``: ``torch.func.vmap`` over the draft dimension, for a
      predictor written for one batch whose internals cannot take a larger
      batch (it must be vmap-compatible: no data-dependent Python control flow).

    A predictor written for a *single sample* (no batch dimension): wrap it yourself with
    :func:`per_sample` (``BatchedExecutor().evaluate(per_sample(f), ...)``, or pass ``per_sample(f)`` to the
    sampler); the concatenated rounds are then one vmapped call.

    Arguments:
        vmap: use ``torch.func.vmap`` instead of concatenation.
        max_batch: if given, split the ``K * B`` rows into chunks of at most
            this many rows (bounds peak memory; chunks run one after another).
            Concatenation only. The chunks must return rows of one shape, dtype and device (what
            ``torch.cat`` needs); the result is checked against ``x`` as without chunks.
    """

    def __init__(self, vmap: bool = False, max_batch: Optional[int] = None):
        if not isinstance(vmap, (bool, np.bool_)):
            raise InvalidArgumentError(
                f"BatchedExecutor: vmap must be True or False (run the round under torch.func.vmap or as one "
                f"concatenated batch), got {vmap!r}."
            )
        vmap = bool(vmap)
        if max_batch is not None:  # Python, numpy or 0-d tensor ints
            max_batch = as_count(max_batch, "max_batch (rows per call, or None for one call per round)", 1)
        if vmap and max_batch is not None:
            raise InvalidArgumentError(
                "BatchedExecutor: max_batch splits the concatenated rows and does not apply with vmap=True "
                "(vmap maps the whole round at once); drop one of them."
            )
        self.vmap = vmap
        self.max_batch = max_batch

    def describe(self, width: Optional[int] = None) -> str:
        """How a round runs; with ``width``, how a round of that many drafts does."""
        check_describe_width(width)
        how = "vmap" if self.vmap else "concatenated batch"
        text = f"BatchedExecutor({how}, max_batch={self.max_batch}"
        if width is not None:
            chunks = "" if self.max_batch is None else f" (in chunks of at most {self.max_batch} rows)"
            text += f"; width {width}: the {width} draft(s) of a round in one call{chunks}"
        return text + ")"

    def evaluate(
        self,
        predictor: Predictor,
        xs: torch.Tensor,
        ts: torch.Tensor,
        cond: Optional[Mapping[str, Any]] = None,
    ) -> torch.Tensor:
        """:meth:`Executor.evaluate` as one call on the K * B rows ``xs.reshape(K * B, ...)`` with the
        conditioning's tensors repeated K times along the batch (or chunks of ``max_batch`` rows), or as
        ``torch.func.vmap`` of the predictor over the draft axis."""
        check_round_args(type(self).__name__, xs, ts, cond)
        _refuse_non_dense_cond(cond)
        # a call that sees exactly one draft's B rows (one draft not split by max_batch, or chunks of exactly B
        # rows) mixes nothing and splits nothing; under vmap each draft is normalised over its own rows, but a
        # training-mode layer's running statistics cannot update
        k, b = xs.shape[0], xs.shape[1]
        one_draft = self.max_batch == b or (k == 1 and (self.max_batch is None or self.max_batch >= b))
        with contextlib.nullcontext() if one_draft else _no_batch_statistics(predictor, running_only=self.vmap):
            return self._evaluate(predictor, xs, ts, cond)

    def _evaluate(self, predictor: Predictor, xs: torch.Tensor, ts: torch.Tensor, cond: Optional[Mapping[str, Any]]):
        cond = dict(cond or {})
        k, b = xs.shape[0], xs.shape[1]
        if self.vmap:  # each draft sees the whole batch and the whole conditioning
            def one_draft(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                out = predictor(x, t, **cond)
                if not isinstance(out, torch.Tensor):  # vmap itself would only complain about its out_dims
                    raise PredictorOutputError(
                        f"BatchedExecutor(vmap=True): the predictor returned {type(out).__name__} for a draft; it "
                        f"must return one tensor shaped like its input x.{not_a_tensor_hint(out)}"
                    )
                return out

            try:
                # a copy, as the concatenated path hands back: vmap returns an identity predictor's xs itself, or
                # an expanded view of a conditioning tensor it returns, and the caller may write into the result
                return torch.func.vmap(one_draft)(xs, ts).clone()
            except Exception as e:
                if not isinstance(e, PredictorOutputError):
                    _note_vmap(e, "BatchedExecutor(vmap=True)", "Use BatchedExecutor() instead (the drafts stacked "
                               "along the batch dimension, one call).")
                raise
        try:
            return self._concatenated(predictor, xs, ts, cond)
        except Exception as e:
            _note_unrepeated(e, cond, k, b)
            if self.max_batch is not None and k * b > self.max_batch and not isinstance(e, PredictorOutputError):
                _note_sliced(e, cond, f"BatchedExecutor(max_batch={self.max_batch}) split the round's {k * b} rows "
                                      f"into chunks and sliced the conditioning's batched tensors alike")
            raise

    def _concatenated(self, predictor: Predictor, xs: torch.Tensor, ts: torch.Tensor, cond: dict) -> torch.Tensor:
        """The round as one call on the drafts stacked along the batch (or chunks of max_batch rows)."""
        k, b = xs.shape[0], xs.shape[1]
        flat_x = xs.reshape(k * b, *xs.shape[2:])
        flat_t = ts.reshape(k * b)
        one_call = self.max_batch is None or k * b <= self.max_batch
        # the conditioning is repeated (or, for chunks, each chunk's rows taken): the predictor gets copies of its
        # batched tensors (or views), so a write into one would not reach the caller's tensor, where
        # SerialExecutor (which passes the tensors themselves) lets the sampler refuse it; watch the version
        # counters of what the predictor gets instead
        if one_call:
            full_cond = repeat_cond(cond, k)
            versions = [v for v in tensor_versions(full_cond) if v[1].dim() > 0]
            out = predictor(flat_x, flat_t, **full_cond)
            _check_cond_untouched(versions)
        else:
            # chunks of at most max_batch rows
            # (each chunk copied into the result before the next call: the model may reuse its output buffer)
            out = None
            for start in range(0, k * b, self.max_batch):
                stop = min(k * b, start + self.max_batch)
                rows = _chunk_rows(cond, b, start, stop)
                versions = [v for v in tensor_versions(rows) if v[1].dim() > 0]
                chunk = predictor(flat_x[start:stop], flat_t[start:stop], **rows)
                _check_cond_untouched(versions)
                chunk = _checked(chunk, stop - start, flat_t[start:stop], like=out)
                if out is None:
                    out = torch.empty((k * b, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)
                out[start:stop] = chunk
        out = _checked(out, k * b, flat_t)
        if one_call:  # the caller keeps the predictions past the next call: never hand back the model's buffer
            out = out.clone()
        return out.reshape(k, b, *out.shape[1:])


def _check_cond_untouched(versions: list) -> None:
    """Refuse a predictor that wrote into a (repeated) conditioning tensor in place, as the sampler refuses
    it under SerialExecutor (``versions``: ``(name, tensor, version)`` before the call)."""
    name = changed_tensor(versions)
    if name is not None:
        raise PredictorOutputError(
            f"The predictor modified the conditioning tensor {name} in place; every later call would see the "
            f"changed value under SerialExecutor (BatchedExecutor passes a repeated copy, so the executors would "
            f"part ways). Work on a copy inside the model (clone the tensor before an in-place op)."
        )


def _unrepeated(cond: Any, b: int, prefix: str = "cond"):
    """(name, kind) for every value of ``cond`` (through mappings) that looks per-sample but is not a tensor:
    a list or tuple of ``b`` items holding no tensors, or a numpy array with ``b`` rows."""
    if isinstance(cond, Mapping):
        for key, v in cond.items():
            yield from _unrepeated(v, b, f"{prefix}[{key!r}]")
    elif isinstance(cond, np.ndarray):
        if cond.ndim >= 1 and cond.shape[0] == b:
            yield prefix, f"a numpy array of shape {cond.shape}"
    elif isinstance(cond, (list, tuple)) and not isinstance(cond, torch.Size) and len(cond) == b:
        if next(iter_tensors(cond), None) is None:
            yield prefix, f"a {type(cond).__name__} of {b} items"


def _note_sliced(error: BaseException, cond: Mapping[str, Any], what: str) -> None:
    """To a predictor's exception from a call that got slices of the conditioning's batched tensors, add a note
    naming them (``what``: who sliced them how): a tensor every sample shares that happens to have B rows is
    sliced too, and the model then indexes past its end."""
    sliced = [f"{name} {tuple(t.shape)}" for name, t in batched_tensors(cond)][:6]
    if sliced and hasattr(error, "add_note"):
        error.add_note(
            f"{what} ({', '.join(sliced)}). A tensor all samples share (a table, a weight) that has one row per "
            f"sample by chance is sliced too: close over it instead (functools.partial(model, name=tensor))."
        )


def _note_unrepeated(error: BaseException, cond: Mapping[str, Any], k: int, b: int) -> None:
    """To an exception from a concatenated round, add a note naming conditioning that looks per-sample but is
    not a tensor (BatchedExecutor repeats only tensors along the batch, so the call on K * B rows got it as is)."""
    found = list(_unrepeated(cond, b))
    if not found or not hasattr(error, "add_note"):
        return
    what = "; ".join(f"{name} is {kind}" for name, kind in found)
    error.add_note(
        f"BatchedExecutor: {what}, one per sample it seems, but BatchedExecutor repeats only tensors along the "
        f"batch: its call stacks the {k} draft(s) of the round into {k * b} rows and passes other values as they "
        f"are, so the predictor got {b} values for {k * b} rows. Pass per-sample conditioning as a tensor with "
        f"one row per sample (e.g. torch.as_tensor(...)), or use SerialExecutor."
    )


# What torch raises when a function cannot run under torch.func.vmap (data-dependent control flow, .item(),
# .tolist(), dynamic shapes, in-place writes into an unbatched tensor, missing batching rules).
_VMAP_FAILURE = re.compile(r"vmap|functorch|batching rule|batched ?tensor|data-dependent|doesn't have storage", re.I)


def _looks_like_vmap(error: BaseException) -> bool:
    """Whether ``error`` is torch refusing to run something under vmap (not the predictor's own error)."""
    return isinstance(error, RuntimeError) and bool(_VMAP_FAILURE.search(safe_str(error)))


def _note_vmap(error: BaseException, who: str, instead: str = "") -> None:
    """To torch refusing to run the predictor under vmap, add a note saying why it may have and what to do
    instead (``who``: the wrapper running it; ``instead``: the alternative it offers)."""
    if not _looks_like_vmap(error) or not hasattr(error, "add_note"):
        return
    if re.search(r"requires_grad|autograd|\.grad\b|backward", safe_str(error), re.I):
        why = ("the predictor uses autograd inside (requires_grad_ / torch.autograd.grad, e.g. for classifier or "
               "reconstruction guidance), which cannot run inside a vmap transform (the concatenated batch runs "
               "it)")
    elif re.search(r"random", safe_str(error), re.I):
        why = ("the predictor draws random numbers (dropout left on? call model.eval() before sampling; a "
               "stochastic model: draw its noise outside and pass it in), and vmap refuses random operations")
    else:
        why = ("vmap refuses data-dependent Python control flow (if tensor...: / .any() / .item() / .tolist()) "
               "and some in-place ops; the built-in oracles are such predictors")
    error.add_note(f"{who} runs the predictor under torch.func.vmap: {why}. {instead}".rstrip())


def _checked(out: Any, rows: int, ts: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out`` if it holds ``rows`` rows (and, for a chunk that is concatenated with the chunks before it,
    rows shaped, typed and placed like ``like``'s, the first chunk: torch.cat would otherwise fail with its
    own message or promote the dtype). What the rows must be like ``x`` in is for the sampler to check, as
    without chunks."""
    if not_dense(out):
        raise PredictorOutputError(f"BatchedExecutor: the predictor returned {not_dense(out)}; {DENSE_FIX}.")
    ok = isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == rows
    if ok and like is not None and (out.shape[1:] != like.shape[1:] or out.dtype != like.dtype or out.device != like.device):
        times = ", ".join(f"{t:g}" for t in sorted(set(ts.reshape(-1).tolist()), reverse=True)[:6])
        other_device = out.shape[1:] == like.shape[1:] and out.dtype == like.dtype
        raise (DeviceMismatchError if other_device else PredictorOutputError)(
            f"BatchedExecutor: the predictor returned {out.dtype} rows of shape {tuple(out.shape[1:])} on {out.device} "
            f"for a chunk of {rows} rows (max_batch, model times {times}), but {like.dtype} rows of shape "
            f"{tuple(like.shape[1:])} on {like.device} for the first chunk of the round; every chunk must return "
            f"rows of one shape, dtype and device (one prediction per row, shaped like x)."
        )
    if ok:
        return out
    got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
    times = sorted(set(ts.reshape(-1).tolist()), reverse=True)
    shown = ", ".join(f"{t:g}" for t in times[:6]) + (", ..." if len(times) > 6 else "")
    raise PredictorOutputError(
        f"BatchedExecutor: the predictor returned {got} for a batch of {rows} rows (the drafts of a round "
        f"stacked along the batch dimension, model times {shown}); it must return one prediction per "
        f"input row, shaped like its input x.{'' if isinstance(out, torch.Tensor) else not_a_tensor_hint(out)}"
    )

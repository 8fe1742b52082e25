"""The executor protocol: how one parallel round of model calls is carried out.

Executors know nothing about diffusion. Given a predictor ``f`` and K
(state, time) pairs they return the K predictions, in order::

    evaluate(f, xs, ts, cond)[k] == f(xs[k], ts[k], **cond)

``xs`` is ``Tensor[K, B, ...]`` (K drafts of a batch of B samples), ``ts`` is
``Tensor[K, B]`` (the model time of every row) and ``cond`` a dict of keyword
arguments for the predictor whose tensors have a leading batch dimension B
(0-d tensors and non-tensor values are passed through unchanged; tensors may
nest in mappings, lists, tuples and dataclass instances: :func:`map_tensors`). Every executor must return
what :class:`SerialExecutor` (here; also exported by ``backends``) returns for the same inputs (to float
tolerance when kernels batch differently).

The returned predictions belong to the caller: they are never the predictor's own buffer, which a
model may reuse on its next call (a CUDA graph's static output, a preallocated result). The sampler
keeps a round's predictions past the next round's calls (the anchor's prediction, a multistep
transition's history), so an executor that returned that buffer would let the next call overwrite them.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
from typing import Any, Callable, Iterator, List, Mapping, Optional, Tuple

import torch

from driffusion_core.errors import InvalidArgumentError

Predictor = Callable[..., torch.Tensor]


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _is_sequence(obj: Any) -> bool:
    """Whether :func:`map_tensors` looks inside ``obj``: lists, plain tuples and namedtuples. Other tuple
    subclasses (``torch.Size``, ...) are values: their constructors take other arguments."""
    return isinstance(obj, list) or type(obj) is tuple or _is_namedtuple(obj)


def _is_dataclass_obj(obj: Any) -> bool:
    """Whether ``obj`` is a dataclass instance (not a dataclass type): :func:`map_tensors` looks into its fields."""
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _field_names(obj: Any) -> List[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _like(obj: Any, items: Any, fallback: type) -> Any:
    """``items`` rebuilt as ``type(obj)`` when its constructor takes them back unchanged, else ``fallback(items)``."""
    kind = type(obj)
    if kind is fallback:
        return fallback(items)
    try:
        new = kind(items)
    except Exception:
        return fallback(items)
    if isinstance(obj, Mapping):
        ok = isinstance(new, Mapping) and len(new) == len(items) and all(k in new and new[k] is v for k, v in items.items())
    else:
        ok = len(new) == len(items) and all(a is b for a, b in zip(new, items))
    return new if ok else fallback(items)


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it, through mappings, lists, tuples and dataclasses.

    Conditioning may nest (diffusers' ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``, a
    dataclass of embeddings); executors repeat, slice and move its tensors with this. Other values are kept
    as they are, tuple subclasses other than namedtuples (``torch.Size``) included.
    A mapping or list keeps its type where its constructor takes the new items back (an ``OrderedDict``,
    diffusers' ``FrozenDict``), so a predictor sees what :class:`SerialExecutor` would pass it; else it
    becomes a ``dict`` / ``list``. A dataclass instance holding tensors becomes a shallow copy (its
    ``__init__`` / ``__post_init__`` not run again, frozen ones too) with every field mapped; one holding
    none is kept itself.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return _like(obj, {k: map_tensors(fn, v) for k, v in obj.items()}, dict)
    if _is_namedtuple(obj):
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if _is_sequence(obj):
        items = [map_tensors(fn, v) for v in obj]
        return tuple(items) if type(obj) is tuple else _like(obj, items, list)
    if _is_dataclass_obj(obj):
        if next(iter_tensors(obj), None) is None:
            return obj
        new = copy.copy(obj)
        for name in _field_names(obj):
            if hasattr(obj, name):  # a field(init=False) never set has no value to map
                object.__setattr__(new, name, map_tensors(fn, getattr(obj, name)))
        return new
    return obj


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``, in order, looked for where :func:`map_tensors` looks."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_tensors(v)
    elif _is_sequence(obj):
        for v in obj:
            yield from iter_tensors(v)
    elif _is_dataclass_obj(obj):
        for name in _field_names(obj):
            yield from iter_tensors(getattr(obj, name, None))


def named_tensors(cond: Any, prefix: str = "cond") -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of ``cond``, nested ones named like
    ``cond['added_cond_kwargs']['time_ids']`` (a dataclass's field: ``cond['text'].embeds``)."""
    if isinstance(cond, torch.Tensor):
        yield prefix, cond
    elif isinstance(cond, Mapping):
        for k, v in cond.items():
            yield from named_tensors(v, f"{prefix}[{k!r}]")
    elif _is_sequence(cond):
        for i, v in enumerate(cond):
            yield from named_tensors(v, f"{prefix}[{i}]")
    elif _is_dataclass_obj(cond):
        for name in _field_names(cond):
            yield from named_tensors(getattr(cond, name, None), f"{prefix}.{name}")


def batched_tensors(cond: Any, prefix: str = "cond") -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of ``cond`` with a batch dimension (``dim() > 0``), nested ones
    named like ``cond['added_cond_kwargs']['time_ids']``."""
    return ((name, t) for name, t in named_tensors(cond, prefix) if t.dim() > 0)


def even_shares(k: int, n: int) -> List[int]:
    """Split ``k`` items into ``n`` contiguous shares, as even as possible, larger shares first.

    ``even_shares(5, 2) == [3, 2]``, ``even_shares(1, 3) == [1, 0, 0]``.
    """
    if n < 1:
        raise InvalidArgumentError(f"cannot split over {n} workers; need at least one.")
    if k < 0:
        raise InvalidArgumentError(f"cannot split {k} items.")
    base, extra = divmod(k, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def check_executor(executor: Any) -> None:
    """Refuse anything but an :class:`Executor` instance, naming what came instead (a class: instantiate it)."""
    if isinstance(executor, Executor):
        return
    if isinstance(executor, type) and issubclass(executor, Executor):
        raise InvalidArgumentError(
            f"executor must be an Executor instance, got the class {executor.__name__}: pass {executor.__name__}()."
        )
    raise InvalidArgumentError(
        f"executor must be an Executor (e.g. backends.BatchedExecutor() or backends.SerialExecutor()), got "
        f"{type(executor).__name__}."
    )


class Executor(abc.ABC):
    """Maps a predictor over K (state, time) pairs: one parallel round."""

    @abc.abstractmethod
    def evaluate(
        self,
        predictor: Predictor,
        xs: torch.Tensor,
        ts: torch.Tensor,
        cond: Optional[Mapping[str, Any]] = None,
    ) -> torch.Tensor:
        """Evaluate ``predictor`` on every (state, time) pair of a round.

        Arguments:
            predictor: ``f(x: Tensor[B, ...], t: Tensor[B], **cond) -> Tensor[B, ...]``.
            xs: ``Tensor[K, B, ...]``, the K states of the round.
            ts: ``Tensor[K, B]``, the model time of each row of each state.
            cond: keyword arguments for the predictor; tensors have leading dim B.

        Returns:
            ``Tensor[K, B, ...]``, the predictions in the order of ``xs``, in memory of their own (not
            the predictor's output buffer, which its next call may overwrite).
        """

    def describe(self, width: Optional[int] = None) -> str:
        """One line saying how this executor runs a round (for reports); with ``width``, also how it runs
        a round of that many drafts."""
        check_describe_width(width)
        return type(self).__name__

    def __repr__(self) -> str:
        try:
            return self.describe()
        except Exception:  # noqa: BLE001 - a half-built executor (its constructor raised) still prints
            return f"<{type(self).__name__}>"

    def finish(self, x: torch.Tensor) -> None:
        """Called by the samplers once with the final sample; an executor spanning processes checks there
        that every process ended with the same sample. Default: nothing."""

    def close(self) -> None:  # pragma: no cover - default has nothing to free
        """Release resources (streams, process groups). Safe to call twice."""


def mark_draft(error: BaseException, k: int) -> None:
    """Record on an exception raised by the predictor that it came from draft ``k`` of the round, so the
    sampler's note names that draft's step (an executor that calls per draft can tell)."""
    try:
        error._driffusion_draft = k
    except Exception:  # pragma: no cover - an exception type without attributes
        pass


#: what to do about a model output that :func:`not_dense` describes
DENSE_FIX = "a prediction must be a dense (strided) tensor shaped like x: return out.to_dense()"


def not_dense(out: Any) -> str:
    """``"a sparse_coo tensor"`` (or CSR, ...) for a model output whose layout cannot be a prediction, or ""
    for a dense tensor or a non-tensor (which the callers name otherwise)."""
    if not isinstance(out, torch.Tensor) or out.layout == torch.strided:
        return ""
    return f"a {str(out.layout).replace('torch.', '')} tensor"


def stack_calls(call: Callable[[int], Any], k: int) -> Any:
    """``torch.stack([call(0), ..., call(k - 1)])``, each output copied into the result as soon as it is
    returned, so a predictor that hands back one reused buffer on every call (a CUDA graph's static output)
    still gives every draft its own prediction; no more copying than ``torch.stack`` does.

    Outputs that are not dense tensors alike in shape, dtype and device (to the first) come back as the list of
    the outputs, for the caller to name the offending draft; the earlier alike ones are then the copies.
    """
    first = call(0)
    if not isinstance(first, torch.Tensor) or not_dense(first):
        return [first] + [call(j) for j in range(1, k)]
    out = torch.empty((k, *first.shape), dtype=first.dtype, device=first.device)
    out[0] = first
    for j in range(1, k):
        o = call(j)
        if not (isinstance(o, torch.Tensor) and o.shape == first.shape and o.dtype == first.dtype
                and o.device == first.device and not not_dense(o)):
            return list(out[:j]) + [o] + [call(i) for i in range(j + 1, k)]
        out[j] = o
    return out


def float64_values(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as float64 (complex as pairs of reals), detached, on its device (the CPU for MPS, which
    has no float64): what checksums and fingerprints are taken of."""
    w = t.detach()
    if w.is_complex():
        w = torch.view_as_real(w.resolve_conj())
    return w.to("cpu" if w.device.type == "mps" else w.device, torch.float64)


def version_stamp(t: torch.Tensor) -> Any:
    """What shows an in-place write into ``t`` after a model call: torch's version counter, or for an inference
    tensor (``torch.inference_mode``: it has none) a fingerprint of its values (float64 sum, sum of squares
    and position-weighted sum, on its device; MPS: on the CPU); None where neither can be read (a non-strided
    tensor)."""
    if not t.is_inference():
        return t._version
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    w = float64_values(t).reshape(-1)
    positions = torch.arange(1, w.numel() + 1, dtype=torch.float64, device=w.device)
    return torch.stack([w.sum(), (w * w).sum(), (w * positions).sum()])


def stamp_changed(t: torch.Tensor, stamp: Any) -> bool:
    """Whether ``t`` was written in place since its :func:`version_stamp` ``stamp`` was taken."""
    if stamp is None:
        return False
    if isinstance(stamp, int):
        return t._version != stamp
    return bool(_fingerprint_differs(t, stamp))


def _fingerprint_differs(t: torch.Tensor, stamp: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: ``t``'s fingerprint (:func:`version_stamp`, an inference tensor's) differs from ``stamp``
    (NaN where NaN was counts as unchanged); on ``t``'s device, not read back yet."""
    now = version_stamp(t)
    return ~((now == stamp) | (torch.isnan(now) & torch.isnan(stamp))).all()


def tensor_versions(cond: Any) -> List[Tuple[str, torch.Tensor, Any]]:
    """``(name, tensor, stamp)`` (:func:`version_stamp`) for every tensor of ``cond``: taken before a model call,
    :func:`changed_tensor` after it finds a write."""
    return [(name, t, version_stamp(t)) for name, t in named_tensors(cond or {})]


def stamps_changed(pairs: List[Tuple[torch.Tensor, Any]]) -> List[bool]:
    """``[stamp_changed(t, stamp) for t, stamp in pairs]``, with one host read for all the fingerprints (inference
    tensors) on one device instead of one per tensor: on a GPU each read waits for the stream."""
    flags: List[Any] = []
    by_device: dict = {}  # device -> [(position, 0-d bool tensor: the fingerprint differs)]
    for t, stamp in pairs:
        if stamp is None or isinstance(stamp, int):  # no stamp, or a version counter: no device read
            flags.append(stamp_changed(t, stamp))
            continue
        differs = _fingerprint_differs(t, stamp)
        by_device.setdefault(differs.device, []).append((len(flags), differs))
        flags.append(None)
    for group in by_device.values():
        for (i, _), v in zip(group, torch.stack([d for _, d in group]).tolist()):
            flags[i] = v
    return flags


def changed_tensor(versions: List[Tuple[str, torch.Tensor, Any]], flags: Optional[List[bool]] = None) -> Optional[str]:
    """The name of the first tensor of ``versions`` (:func:`tensor_versions`) written in place since, or None
    (:func:`stamps_changed`: one host read for all the fingerprints; ``flags``: its result, when the caller
    read them together with others)."""
    if not versions:
        return None
    if flags is None:
        flags = stamps_changed([(t, v) for _, t, v in versions])
    return next((name for (name, _, _), changed in zip(versions, flags) if changed), None)


def check_round_args(who: str, xs: Any, ts: Any, cond: Any) -> None:
    """The arguments of ``evaluate`` as the protocol defines them, else an InvalidArgumentError naming the
    shapes expected: ``xs`` a tensor ``[K, B, ...]`` with K >= 1, ``ts`` a tensor ``[K, B]`` (the model time
    of every row of every draft, not one time per draft), ``cond`` a mapping of keyword arguments or None.
    ``who``: the executor's name, for the message."""
    if not isinstance(xs, torch.Tensor) or xs.dim() < 2:
        got = f"shape {list(xs.shape)}" if isinstance(xs, torch.Tensor) else type(xs).__name__
        raise InvalidArgumentError(
            f"{who}.evaluate: xs must be a tensor [K, B, ...] (K drafts of a batch of B states), got {got}."
        )
    if xs.shape[0] < 1:
        raise InvalidArgumentError(f"{who}.evaluate: xs holds no drafts (shape {list(xs.shape)}); a round needs K >= 1.")
    want = list(xs.shape[:2])
    if not isinstance(ts, torch.Tensor) or list(ts.shape) != want:
        got = f"shape {list(ts.shape)}" if isinstance(ts, torch.Tensor) else type(ts).__name__
        raise InvalidArgumentError(
            f"{who}.evaluate: ts must be a tensor [K, B] = {want} (the model time of every row of every draft; xs "
            f"is [K, B, ...] = {list(xs.shape)}), got {got}. For one time per draft, repeat it along the batch: "
            f"ts[:, None].repeat(1, {want[1]})."
        )
    if cond is not None and not isinstance(cond, Mapping):
        raise InvalidArgumentError(
            f"{who}.evaluate: cond must be a mapping of keyword arguments for the predictor, or None, got "
            f"{type(cond).__name__}."
        )


def check_describe_width(width: Optional[int]) -> None:
    """``describe(width)``'s argument: None or a positive int."""
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise InvalidArgumentError(f"width must be a positive int or None, got {width!r}.")


class SerialExecutor(Executor):
    """The reference executor: one predictor call per draft, in order.

    ``out[k] = predictor(xs[k], ts[k], **cond)``. Every other executor must reproduce it.
    (Lives in the core so the scheduler has a default without importing ``backends``;
    ``backends.SerialExecutor`` is the same class.)
    """

    def describe(self, width: Optional[int] = None) -> str:
        """How a round runs; with ``width``, how a round of that many drafts does."""
        check_describe_width(width)
        if width is None:
            return "SerialExecutor(one call per draft)"
        return f"SerialExecutor(one call per draft; width {width}: {width} call(s) one after another per round)"

    def evaluate(
        self,
        predictor: Predictor,
        xs: torch.Tensor,
        ts: torch.Tensor,
        cond: Optional[Mapping[str, Any]] = None,
    ) -> torch.Tensor:
        """:meth:`Executor.evaluate` as K calls ``predictor(xs[k], ts[k], **cond)``, one after another."""
        check_round_args(type(self).__name__, xs, ts, cond)
        cond = dict(cond or {})

        def call(k: int) -> Any:
            try:
                return predictor(xs[k], ts[k], **cond)
            except Exception as e:
                mark_draft(e, k)
                raise

        # a tensor, or the list of unlike outputs: the scheduler checks them one by one and names the draft's step
        return stack_calls(call, xs.shape[0])

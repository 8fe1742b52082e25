"""The executor protocol: how one parallel round of model calls is carried out.

Executors know nothing about diffusion. Given a predictor ``f`` and K
(state, time) pairs they return the K predictions, in order::

    evaluate(f, xs, ts, cond)[k] == f(xs[k], ts[k], **cond)

``xs`` is ``Tensor[K, B, ...]`` (K drafts of a batch of B samples), ``ts`` is
``Tensor[K, B]`` (the model time of every row) and ``cond`` a dict of keyword
arguments for the predictor whose tensors have a leading batch dimension B
(0-d tensors and non-tensor values are passed through unchanged; tensors may
nest in dicts, lists and tuples: :func:`map_tensors`). Every executor must return
what :class:`backends.SerialExecutor` returns for the same inputs (to float
tolerance when kernels batch differently).
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Iterator, Mapping, Optional, Tuple

import torch

Predictor = Callable[..., torch.Tensor]


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any, leaf: Callable[[Any], Any] = lambda v: v) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it, through dicts, lists and tuples.

    Conditioning may nest (diffusers' ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``);
    executors repeat, slice and move its tensors with this. Other values become ``leaf(value)``
    (themselves by default).
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(fn, v, leaf) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(map_tensors(fn, v, leaf) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, v, leaf) for v in obj)
    return leaf(obj)


def batched_tensors(cond: Any, prefix: str = "cond") -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of ``cond`` with a batch dimension (``dim() > 0``), nested ones
    named like ``cond['added_cond_kwargs']['time_ids']``."""
    if isinstance(cond, torch.Tensor):
        if cond.dim() > 0:
            yield prefix, cond
    elif isinstance(cond, Mapping):
        for k, v in cond.items():
            yield from batched_tensors(v, f"{prefix}[{k!r}]")
    elif isinstance(cond, (list, tuple)):
        for i, v in enumerate(cond):
            yield from batched_tensors(v, f"{prefix}[{i}]")


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
            ``Tensor[K, B, ...]``, the predictions in the order of ``xs``.
        """

    def describe(self) -> str:
        """One line saying how this executor runs a round (for reports)."""
        return type(self).__name__

    def close(self) -> None:  # pragma: no cover - default has nothing to free
        """Release resources (streams, process groups). Safe to call twice."""


def mark_draft(error: BaseException, k: int) -> None:
    """Record on an exception raised by the predictor that it came from draft ``k`` of the round, so the
    sampler's note names that draft's step (an executor that calls per draft can tell)."""
    try:
        error._driffusion_draft = k
    except Exception:  # pragma: no cover - an exception type without attributes
        pass


class SerialExecutor(Executor):
    """The reference executor: one predictor call per draft, in order.

    ``out[k] = predictor(xs[k], ts[k], **cond)``. Every other executor must reproduce it.
    (Lives in the core so the scheduler has a default without importing ``backends``;
    ``backends.SerialExecutor`` is the same class.)
    """

    def evaluate(
        self,
        predictor: Predictor,
        xs: torch.Tensor,
        ts: torch.Tensor,
        cond: Optional[Mapping[str, Any]] = None,
    ) -> torch.Tensor:
        cond = dict(cond or {})
        outs = []
        for k in range(xs.shape[0]):
            try:
                outs.append(predictor(xs[k], ts[k], **cond))
            except Exception as e:
                mark_draft(e, k)
                raise
        first = outs[0]
        if not all(
            isinstance(o, torch.Tensor) and o.shape == first.shape and o.dtype == first.dtype and o.device == first.device
            for o in outs
        ):
            return outs  # unlike outputs: the scheduler checks them one by one and names the draft's step
        return torch.stack(outs)

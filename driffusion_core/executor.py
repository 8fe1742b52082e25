"""The executor protocol: how one parallel round of model calls is carried out.

Executors know nothing about diffusion. Given a predictor ``f`` and K
(state, time) pairs they return the K predictions, in order::

    evaluate(f, xs, ts, cond)[k] == f(xs[k], ts[k], **cond)

``xs`` is ``Tensor[K, B, ...]`` (K drafts of a batch of B samples), ``ts`` is
``Tensor[K, B]`` (the model time of every row) and ``cond`` a dict of keyword
arguments for the predictor whose tensors have a leading batch dimension B
(non-tensor values are passed through unchanged). Every executor must return
what :class:`backends.SerialExecutor` returns for the same inputs (to float
tolerance when kernels batch differently).
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Mapping, Optional

import torch

Predictor = Callable[..., torch.Tensor]


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
        outs = [predictor(xs[k], ts[k], **cond) for k in range(xs.shape[0])]
        for o in outs:
            if not isinstance(o, torch.Tensor):
                return outs[0] if len(outs) == 1 else outs  # the scheduler reports the bad type
        if len({tuple(o.shape) for o in outs}) > 1:
            return outs[0]  # the scheduler reports the wrong shape
        return torch.stack(outs)

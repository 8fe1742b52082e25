"""One device, one call: the K drafts of a round as a single batched model call."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from driffusion_core.errors import InvalidArgumentError
from driffusion_core.executor import Executor, Predictor


def repeat_cond(cond: Mapping[str, Any], k: int) -> dict:
    """Repeat every tensor of ``cond`` K times along dim 0 (draft-major order).

    Row ``k * B + b`` of the result is row ``b`` of the input, matching
    ``xs.reshape(K * B, ...)``. Non-tensor values pass through unchanged.
    """
    out = {}
    for name, value in cond.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[name] = value.repeat(k, *([1] * (value.dim() - 1)))
        else:
            out[name] = value
    return out


class BatchedExecutor(Executor):
    """Evaluates all K drafts of a round in one predictor call.

    Two ways to batch:

    * ``vmap=False`` (default): concatenate the drafts along the batch
      dimension, ``[K, B, ...] -> [K * B, ...]``, repeat the conditioning K
      times, call the predictor once and split the result back.
    * ``vmap=True``: ``torch.func.vmap`` over the draft dimension, for a
      predictor written for one batch whose internals cannot take a larger
      batch (it must be vmap-compatible: no data-dependent Python control flow).

    Arguments:
        vmap: use ``torch.func.vmap`` instead of concatenation.
        max_batch: if given, split the ``K * B`` rows into chunks of at most
            this many rows (bounds peak memory; chunks run one after another).
    """

    def __init__(self, vmap: bool = False, max_batch: Optional[int] = None):
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise InvalidArgumentError(f"max_batch must be a positive int or None, got {max_batch!r}.")
        self.vmap = vmap
        self.max_batch = max_batch

    def describe(self) -> str:
        how = "vmap" if self.vmap else "concatenated batch"
        return f"BatchedExecutor({how}, max_batch={self.max_batch})"

    def evaluate(
        self,
        predictor: Predictor,
        xs: torch.Tensor,
        ts: torch.Tensor,
        cond: Optional[Mapping[str, Any]] = None,
    ) -> torch.Tensor:
        cond = dict(cond or {})
        k, b = xs.shape[0], xs.shape[1]
        if self.vmap:
            tensor_names = [n for n, v in cond.items() if isinstance(v, torch.Tensor)]
            static = {n: v for n, v in cond.items() if n not in tensor_names}

            def single(x, t, *cond_tensors):
                return predictor(x, t, **dict(zip(tensor_names, cond_tensors)), **static)

            in_dims = (0, 0) + (None,) * len(tensor_names)
            return torch.func.vmap(single, in_dims=in_dims)(xs, ts, *[cond[n] for n in tensor_names])
        flat_x = xs.reshape(k * b, *xs.shape[2:])
        flat_t = ts.reshape(k * b)
        if self.max_batch is None or k * b <= self.max_batch:
            out = predictor(flat_x, flat_t, **repeat_cond(cond, k))
        else:
            # chunks of at most max_batch rows; the conditioning is repeated once and sliced alike
            full_cond = repeat_cond(cond, k)
            chunks = []
            for start in range(0, k * b, self.max_batch):
                stop = min(k * b, start + self.max_batch)
                part = {
                    n: (v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                    for n, v in full_cond.items()
                }
                chunks.append(predictor(flat_x[start:stop], flat_t[start:stop], **part))
            out = torch.cat(chunks)
        if not isinstance(out, torch.Tensor) or out.shape[0] != k * b:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidArgumentError(
                f"BatchedExecutor: the predictor returned {got} for a batch of {k * b} rows; "
                f"it must return one prediction per input row."
            )
        return out.reshape(k, b, *out.shape[1:])

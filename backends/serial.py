"""The reference executor: one predictor call per draft, in order."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from driffusion_core.executor import Executor, Predictor


class SerialExecutor(Executor):
    """Evaluates the K drafts of a round one after another.

    The reference every other executor must reproduce:
    ``out[k] = predictor(xs[k], ts[k], **cond)``.
    """

    def evaluate(
        self,
        predictor: Predictor,
        xs: torch.Tensor,
        ts: torch.Tensor,
        cond: Optional[Mapping[str, Any]] = None,
    ) -> torch.Tensor:
        cond = dict(cond or {})
        return torch.stack([predictor(xs[k], ts[k], **cond) for k in range(xs.shape[0])])

r"""Flow-matching Euler skip: x_s = x_t + (s - t) v.

Key: x_t = (1 - t) x0 + t eps (rectified flow), v = eps - x0 the velocity, t a sigma in [0, 1].
With a frozen v the big step composes exactly: (s - t) + (u - s) = u - t. It is exact on the
conditional path: a state built from (x0, eps) with the true v lands on (1 - s) x0 + s eps.
Other parameterizations are converted to (x0_hat, eps_hat) at t and v = eps_hat - x0_hat.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from driffusion_core.errors import InvalidArgumentError
from driffusion_core.parameterization import Prediction, X0Transform, broadcast_coef, upcast
from driffusion_core.schedules import FlowSchedule
from driffusion_core.transition import Levels, SkipTransition, zero_length_identity

__all__ = ["FlowEulerSkip"]


class FlowEulerSkip(SkipTransition):
    r"""The Euler step of a flow-matching model across any pair of sigmas t -> s:

    .. math:: x_s = x_t + (s - t)\,\hat v,\qquad \hat v = \hat\epsilon - \hat x_0

    (``flow_euler_coefficient``; on the path :math:`x_t = (1-t)\,x_0 + t\,\epsilon`).

    Arguments:
        schedule: a :class:`~driffusion_core.FlowSchedule`.
        prediction: ``"velocity"`` (default), ``"epsilon"`` or ``"sample"``.
        x0_transform: optional clipping or thresholding T of x0_hat. It forces the conversion to
            (x0_hat, eps_hat), and eps_hat is re-derived from T(x0_hat) at level t,
            :math:`\hat\epsilon = (x_t - (1-t)\,T(\hat x_0)) / t`, so that the Euler step is the closed-form
            jump :math:`(1-s)\,T(\hat x_0) + s\,\hat\epsilon` and the step to sigma 0 lands on T(x0_hat), as
            DDIM's does. (Keeping the model's eps_hat would make the Euler step land on
            (1 - t) x0_hat + t T(x0_hat): the transform would barely act.)
    """

    stochastic = False
    composes_exactly = True

    def __init__(
        self,
        schedule: FlowSchedule,
        prediction: Union[str, Prediction] = "velocity",
        x0_transform: Optional[X0Transform] = None,
    ):
        if not isinstance(schedule, FlowSchedule):
            raise InvalidArgumentError(f"FlowEulerSkip needs a FlowSchedule, got {type(schedule).__name__}.")
        # recompute_eps: the velocity comes from the transformed x0_hat (it only acts with an x0_transform)
        super().__init__(schedule, prediction, x0_transform, recompute_eps=True)

    def velocity(self, x: torch.Tensor, pred: torch.Tensor, t_from: Levels) -> torch.Tensor:
        """The velocity v = eps_hat - x0_hat at level t_from (the model output itself for velocity models)."""
        if self.prediction is Prediction.VELOCITY and self.x0_transform is None:
            return pred
        x0_hat, eps_hat = self.to_x0_eps(x, pred, t_from)
        return eps_hat - x0_hat

    def __call__(self, x: torch.Tensor, pred: torch.Tensor, t_from: Levels, t_to: Levels,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""The flow-matching Euler skip from level t to level s (``t_from`` -> ``t_to``; sigma = t):

        .. math:: x_s = x_t + (s - t)\,\hat v, \quad \hat v = \hat\epsilon - \hat x_0,

        with the velocity converted from ``pred`` at level t (the output itself for a velocity model without
        an x0 transform). Exact along the straight path x_t = (1 - t) x0 + t eps, so skips compose.
        Deterministic: ``noise`` is ignored. A zero-length skip returns x."""
        t_from, t_to = self.operands(x, pred, t_from, t_to, noise)
        dtype, (x, pred) = x.dtype, upcast(x, pred)  # float16 / bfloat16: in float32, cast once
        out = x + broadcast_coef(self.cached(t_from, t_to, self._euler), x) * self.velocity(x, pred, t_from)
        return zero_length_identity(out, x, t_from, t_to).to(dtype)

"""Errors raised by driffusion.

Every error says what was wrong and how to fix it. They all derive from
:class:`DriffusionError`, and each also derives from the built-in exception a
caller would expect (``ValueError`` for bad arguments, ``RuntimeError`` for
failures while sampling), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

import numbers
import operator
from collections.abc import Mapping

import numpy as np
import torch


class DriffusionError(Exception):
    """Base class of every error raised by driffusion."""


class InvalidTimestepsError(DriffusionError, ValueError):
    """The time grid does not decrease, or leaves the schedule's range."""


class InvalidWidthError(DriffusionError, ValueError):
    """The draft width is not an integer >= 1."""


class InvalidArgumentError(DriffusionError, ValueError):
    """An argument has the wrong value, shape or type."""


class UnexpectedArgumentError(InvalidArgumentError, TypeError):
    """A call with an argument the callee does not take (a ``TypeError`` too, as Python raises for one)."""


class DeviceMismatchError(DriffusionError, ValueError):
    """Tensors that must share a device or dtype do not."""


class PredictorOutputError(DriffusionError, RuntimeError):
    """The predictor returned the wrong shape, or NaN or inf."""


class ExecutorError(DriffusionError, RuntimeError):
    """An executor failed to evaluate a round (a rank died, a device failed, ...)."""


class SamplingError(DriffusionError, RuntimeError):
    """Sampling produced an unusable state (NaN or inf) although every model output was finite."""


class MeanStepWarning(UserWarning):
    """A stochastic transition (DDPM, DDIM with eta > 0) called without ``noise`` (or its ``drafts`` without
    ``noises``): the step returns its mean, not a sample, and samples made that way lose their spread. Warned
    once per transition; pass zeros (``noise=torch.zeros_like(x)``) to take the mean on purpose."""


class TrainingModeWarning(UserWarning):
    """A layer of the model ran in training mode while sampling: dropout (every prediction is a random draw,
    so the sample is not reproducible and not the serial sampler's) or BatchNorm with running statistics (it
    normalises with the call's batch, so a row's prediction depends on its batch mates, and it overwrites the
    running statistics). Call ``model.eval()`` before sampling."""


class WideWindowWarning(UserWarning):
    """A draft window that reaches far along a short grid (its reach min(width, T - 1), when more than one
    level, is 0.2 of T or more): the far drafts are far from their anchor, and DRiffusion is then often farther
    from the serial sample than step skipping at the same rounds, or diverges. Silence it with
    ``warnings.simplefilter("ignore", WideWindowWarning)``."""



def is_bool(value) -> bool:
    """A Python, numpy or torch boolean (``operator.index`` would take any of them as 0 / 1)."""
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def is_real(value) -> bool:
    """A real number: a Python or numpy int or float, or a 0-d real tensor; not a bool."""
    if is_bool(value):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex()
    return isinstance(value, numbers.Real)


def as_flag(value, what: str) -> bool:
    """``value`` as a bool: True or False (Python, numpy or a 0-d torch bool); anything else, a string such as
    "no" included (which ``bool()`` would take as True), is an InvalidArgumentError naming ``what``."""
    if is_bool(value) and (not isinstance(value, torch.Tensor) or value.dim() == 0):
        return bool(value)
    raise InvalidArgumentError(f"{what} must be True or False, got {value!r}.")


def as_count(value, what: str, low: int = 1, high=None, error: type = InvalidArgumentError) -> int:
    """``value`` as an int in ``[low, high]`` (Python, numpy and 0-d tensor integers; not bools or floats),
    else ``error`` naming ``what`` and the range."""
    try:
        n = None if is_bool(value) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < low or (high is not None and n > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise error(f"{what} must be an int {span}, got {value!r}.")
    return n


def safe_str(e: BaseException) -> str:
    """``str(e)``, or a fallback when the exception's ``__str__`` itself raises (an error report must not fail)."""
    try:
        return str(e)
    except Exception as err:
        try:
            return f"{BaseException.__repr__(e)} (its str() raised {type(err).__name__})"
        except Exception:
            return "<the exception could not be printed>"


def exception_text(e: BaseException) -> str:
    """``"TypeName: message"`` for an error report, safe against a raising ``__str__``."""
    return f"{type(e).__name__}: {safe_str(e)}"


#: what the samplers call a predictor, for :func:`check_predictor`'s message
PREDICTOR_CONTRACT = "predictor must be a callable f(x, t, **cond) returning a tensor shaped like x"


def check_predictor(predictor, message: str = PREDICTOR_CONTRACT) -> None:
    """Refuse a predictor that is not callable (``message``: the caller's words for what it must be), and a
    class given for one: calling a class builds an instance (an ``nn.Module`` subclass, a wrapper class), so
    the first model call would fail far from the mistake, or return an object instead of a prediction."""
    if isinstance(predictor, type):
        raise InvalidArgumentError(
            f"{message.split(' must')[0]} must be an instance, got the class {predictor.__name__} itself: build "
            f"one (e.g. {predictor.__name__}(...) with its weights loaded, then .eval()) and pass that."
        )
    if not callable(predictor):
        raise InvalidArgumentError(f"{message}, got {type(predictor).__name__}.")


def not_a_tensor_hint(out) -> str:
    """For an error about a predictor output that is not a tensor: how to get the tensor out of what a
    diffusers model returns (an output object with ``.sample``, or a tuple with ``return_dict=False``) or a
    dict holding tensors; empty for anything else."""
    wrap = "or use solvers.interop.DiffusersPredictor(model), which does this (and classifier-free guidance)."
    try:
        if isinstance(getattr(out, "sample", None), torch.Tensor):
            return (
                f" {type(out).__name__} looks like a diffusers model's output, whose prediction is its .sample: "
                f"pass lambda x, t, **c: model(x, t, **c).sample as the predictor, " + wrap
            )
    except Exception:  # an object whose attribute lookup raises: no hint
        return ""
    if isinstance(out, (tuple, list)) and len(out) >= 1 and isinstance(out[0], torch.Tensor):
        return (
            f" A {type(out).__name__} of tensors is what a diffusers model returns with return_dict=False: pass "
            f"lambda x, t, **c: model(x, t, return_dict=False, **c)[0] as the predictor, " + wrap
        )
    if isinstance(out, Mapping):
        keys = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        if keys:
            key = "sample" if "sample" in keys else keys[0]
            return (
                f" A {type(out).__name__} with the tensor(s) {', '.join(map(repr, keys))}: pass a predictor that "
                f"returns the prediction itself, e.g. lambda x, t, **c: model(x, t, **c)[{key!r}]."
            )
    return ""

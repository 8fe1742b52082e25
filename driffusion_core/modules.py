"""The ``nn.Module`` s a predictor reaches, and the training-mode layers (dropout, BatchNorm) that make its
predictions random or batch-dependent.

A predictor is any callable (a module, a bound method, a lambda closing over a model, a
``functools.partial``); :func:`modules_in` finds the modules behind it, for checks that must look at the
layers a model call will run (BatchNorm with batch statistics, dropout in training mode).
"""
from __future__ import annotations

import contextlib
import dis
import functools
import threading
import types
import warnings
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

from driffusion_core.errors import TrainingModeWarning

__all__ = ["modules_in", "layers_in", "pre_hooks", "warn_random_layers"]


def modules_in(obj: Any, depth: int = 0, seen: Optional[set] = None) -> Iterator[torch.nn.Module]:
    """The ``nn.Module`` s a predictor may reach: itself, or through a bound method's ``__self__``, a wrapper's
    ``__wrapped__`` / ``.model``, a ``functools.partial``'s function and arguments, a function's closure
    cells, default arguments and the globals it loads, and a callable object's attributes (at most 3 steps
    deep, small containers looked into). Candidates only: the checks act on a module's layers
    when they actually run."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 3:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        yield obj
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        items: list = list(obj)[:32]
    elif isinstance(obj, dict):
        items = list(obj.values())[:32]
    elif callable(obj) and not isinstance(obj, type):
        items = [_attr(obj, name) for name in ("__self__", "__wrapped__", "model", "func", "args", "keywords")]
        if isinstance(obj, types.FunctionType):  # closure cells, defaults, the globals it loads (`lambda x, t: net(x)`)
            items += [c.cell_contents for c in (obj.__closure__ or ()) if _has_contents(c)]
            items += list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
            items += [obj.__globals__.get(n) for n in _loaded_globals(obj.__code__)]
        else:
            held = _attr(obj, "__dict__")
            items += list(held.values())[:32] if isinstance(held, dict) else []
    else:
        return
    for item in items:
        if item is not None:
            yield from modules_in(item, depth + 1, seen)


@functools.lru_cache(maxsize=256)
def _loaded_globals(code: types.CodeType) -> Tuple[str, ...]:
    """The global names ``code`` (and the functions defined in it) loads: not attribute names, which
    ``co_names`` also holds (``holder.model`` must not reach a global ``model``). Remembered per code object
    (a sampler passes the same predictor every round)."""
    names: List[str] = []
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(ins.argval, str):
            names.append(ins.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _loaded_globals(const)
    return tuple(dict.fromkeys(names))[:32]  # each name once: `torch` loaded often must not crowd out `net`


def _attr(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)``, also None where a custom ``__getattr__`` raises something else."""
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - a proxy's __getattr__ (KeyError, RuntimeError ...): nothing to find there
        return None


def _has_contents(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell (a name assigned later)
        return False
    return True


def layers_in(predictor: Any, keep: Callable[[torch.nn.Module], bool]) -> List[Tuple[str, torch.nn.Module]]:
    """The layers (submodules, each once) of the modules the predictor reaches for which ``keep`` is true,
    named by their path in the module found (``"UNet.down.0.norm"``)."""
    found, seen = [], set()
    for module in modules_in(predictor):
        owner = type(module).__name__
        for name, m in module.named_modules():
            if id(m) not in seen and keep(m):
                seen.add(id(m))
                found.append((f"{owner}.{name}" if name else owner, m))
    return found


@contextlib.contextmanager
def pre_hooks(layers: List[Tuple[str, torch.nn.Module]], make_hook: Callable[[str, torch.nn.Module], Callable]):
    """A forward pre-hook ``make_hook(path, layer)`` on each of ``layers`` (:func:`layers_in`) while the
    context runs; removed on the way out, also when it raises."""
    handles = [layer.register_forward_pre_hook(make_hook(path, layer)) for path, layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _trains(m: torch.nn.Module) -> bool:
    """A layer that behaves as in training while in training mode: dropout with p > 0 (random predictions),
    BatchNorm with running statistics (normalises with the call's batch and overwrites the statistics)."""
    if not m.training:
        return False
    if isinstance(m, torch.nn.modules.dropout._DropoutNd):
        return m.p > 0
    return isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None


def _training_effect(path: str, layer: torch.nn.Module) -> str:
    if isinstance(layer, torch.nn.modules.dropout._DropoutNd):
        return (f"dropout layer {path!r} (p={layer.p:g}) is in training mode, so every prediction is a random "
                f"draw: the sample is not reproducible and not the serial sampler's")
    return (f"BatchNorm layer {path!r} is in training mode, so it normalises with each call's batch instead of "
            f"its running statistics (a row's prediction depends on the rows batched with it, and no executor "
            f"matches another) and every call overwrites those running statistics")


def warn_random_layers(predictor: Any, who: str = "sampling"):
    """Warn (:class:`~driffusion_core.errors.TrainingModeWarning`, once per context) when a layer in training
    mode that the predictor reaches runs during the context: a dropout layer (p > 0) makes every prediction
    a random draw; a BatchNorm layer with running statistics normalises with the call's batch (a row's
    prediction then depends on its batch mates) and overwrites the running statistics it should use. Either
    way the sample is not the trained model's serial sample, and no executor can match another.
    A layer that does not run is not reported; functional dropout (``F.dropout(..., training=True)``) cannot
    be seen. A context manager."""
    warned = threading.Event()

    def hook(path: str, layer: torch.nn.Module):
        def pre(module, args):
            if _trains(layer) and not warned.is_set():
                warned.set()
                warnings.warn(
                    f"{who}: the model's {_training_effect(path, layer)}. Call model.eval() before sampling.",
                    TrainingModeWarning,
                    stacklevel=2,
                )
        return pre

    return pre_hooks(layers_in(predictor, _trains), hook)

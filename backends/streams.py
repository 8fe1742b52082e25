"""Several GPUs in one process: one model replica and one CUDA stream per device.

A round's K drafts are split over the streams in contiguous, as-even-as-possible shares. Each share is
launched on its own CUDA stream, its drafts called one after another there as ``SerialExecutor`` calls
them (inputs copied to that device without blocking the host, the replica run under
``torch.cuda.stream``), so the devices work at the same time while the Python thread only queues
kernels; the predictions are then gathered back, in draft order, onto the device of the inputs.

Several streams may share one GPU (``devices=["cuda:0", "cuda:0"]``), but measured on an H200 that gains
nothing for models bound by kernel launches (0.86 to 1.11x for a 6.5 M-parameter UNet at batch size 1,
``benchmarks/results/gpu``): one Python thread launches every stream's kernels in turn. On one GPU use
``BatchedExecutor``; streams pay off across several GPUs, with models that keep each one busy.

Synchronisation: every side stream first waits for the work queued on the inputs' stream (so it reads
finished inputs); the inputs' stream waits for every side stream before the gathered result is used
(events via ``wait_stream``; cross-device copies synchronise both devices' streams); tensors made on one
stream and used on another are marked with ``record_stream`` so the caching allocator does not hand
their memory out too early.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from driffusion_core.errors import (
    DeviceMismatchError, ExecutorError, InvalidArgumentError, PredictorOutputError, exception_text,
)
from driffusion_core.executor import (
    Executor, Predictor, check_describe_width, check_round_args, even_shares, map_tensors, DENSE_FIX, not_dense,
    stack_calls,
)
from driffusion_core.modules import modules_in as _modules_in  # the modules a predictor reaches (closures, partials)

__all__ = ["StreamExecutor"]


def _module_device(obj: Any) -> Optional[torch.device]:
    """The device of the first module with parameters or buffers that the predictor reaches: itself, or held
    by a bound method, a ``functools.partial``, a closure or a wrapper (``lambda x, t: net(x, t).sample``),
    as :class:`~backends.BatchedExecutor` finds them; None when it reaches none."""
    for module in _modules_in(obj):
        for p in module.parameters():
            return p.device
        for b in module.buffers():
            return b.device
    return None


def _share_slices(sizes: Sequence[int]) -> List[Tuple[int, int, int]]:
    """Where each stream's share of a round lies: ``sizes[i]`` drafts for stream i (:meth:`StreamExecutor.shares`,
    contiguous shares in draft order) give ``(i, start, stop)`` for every stream with work, in stream order;
    stream i runs drafts ``start .. stop - 1``. A stream whose share is empty (a round of fewer drafts than
    streams) is left out, and the next share starts where the last non-empty one stopped."""
    out, start = [], 0
    for i, size in enumerate(sizes):
        if size:
            out.append((i, start, start + size))
            start += size
    return out


def _cuda_device(d: Any, count: int) -> torch.device:
    try:
        dev = torch.device(d)
    except Exception as e:
        raise InvalidArgumentError(f"StreamExecutor: {d!r} is not a device.") from e
    if dev.type != "cuda":
        raise InvalidArgumentError(
            f"StreamExecutor: devices must be CUDA devices ('cuda:0', 'cuda:1', ...), got {d!r}. "
            f"For the CPU use backends.BatchedExecutor."
        )
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if not 0 <= dev.index < count:
        raise InvalidArgumentError(f"StreamExecutor: {dev} does not exist; this machine shows {count} GPU(s).")
    return dev


class StreamExecutor(Executor):
    """Spreads a round's drafts over CUDA devices, one stream (and one model replica) per entry.

    Arguments:
        replicas: one predictor per entry of ``devices`` (e.g. copies of the model, each on its GPU).
        devices: the CUDA devices, one stream each; repeat a device for several streams on it. Default:
            the replicas' devices (for ``torch.nn.Module`` replicas), else every visible GPU.
        factory: ``factory(device) -> predictor``, called once per distinct device, instead of ``replicas``.

    With neither ``replicas`` nor ``factory``, :meth:`evaluate` runs the ``predictor`` it is given on every
    device; that suits predictors that work on any device (closed-form oracles, functions of their
    inputs). A ``torch.nn.Module`` lives on one device: give it per device with
    :meth:`from_module` (deep copies), ``replicas`` or ``factory``. When replicas are set, the
    ``predictor`` argument of :meth:`evaluate` is not called.

    Raises:
        ExecutorError: CUDA is not available (use :class:`~backends.BatchedExecutor` instead).
    """

    def __init__(
        self,
        replicas: Optional[Sequence[Predictor]] = None,
        devices: Optional[Sequence[Any]] = None,
        factory: Optional[Callable[[torch.device], Predictor]] = None,
    ):
        if not torch.cuda.is_available():
            raise ExecutorError(
                "StreamExecutor needs CUDA, but torch.cuda.is_available() is False (no GPU visible, or a "
                "CPU-only torch build). On the CPU or a single device use backends.BatchedExecutor (all drafts "
                "of a round in one batched call), or backends.DistributedExecutor across processes."
            )
        if replicas is not None and factory is not None:
            raise InvalidArgumentError("StreamExecutor: give replicas or factory, not both.")
        count = torch.cuda.device_count()
        if replicas is not None:
            replicas = list(replicas)
            if not replicas:
                raise InvalidArgumentError("StreamExecutor: replicas is empty; give one predictor per device.")
            bad = [i for i, r in enumerate(replicas) if not callable(r)]
            if bad:
                raise InvalidArgumentError(f"StreamExecutor: replicas {bad} are not callable.")
        if devices is None:
            if replicas is not None:
                homes = [_module_device(r) for r in replicas]
                devices = [h if h is not None else torch.device("cuda", i % count) for i, h in enumerate(homes)]
            else:
                devices = [torch.device("cuda", i) for i in range(count)]
        devices = [_cuda_device(d, count) for d in devices]
        if not devices:
            raise InvalidArgumentError("StreamExecutor: devices is empty; give at least one CUDA device.")
        if replicas is not None and len(replicas) != len(devices):
            raise InvalidArgumentError(
                f"StreamExecutor: {len(replicas)} replicas for {len(devices)} devices; give one per device."
            )
        if factory is not None:
            if not callable(factory):
                raise InvalidArgumentError("StreamExecutor: factory must be callable: factory(device) -> predictor.")
            made = {}
            for d in devices:
                if d not in made:
                    made[d] = factory(d)
            replicas = [made[d] for d in devices]
        if replicas is not None:
            for r, d in zip(replicas, devices):
                md = _module_device(r)
                if md is not None and md != d:
                    raise InvalidArgumentError(
                        f"StreamExecutor: a replica's parameters are on {md} but it is assigned to {d}; "
                        f"move it there (e.g. StreamExecutor.from_module(model, devices))."
                    )
        self.devices: List[torch.device] = devices
        self.replicas: Optional[List[Predictor]] = replicas
        self.streams = [torch.cuda.Stream(device=d) for d in devices]

    @classmethod
    def from_module(cls, module: torch.nn.Module, devices: Optional[Sequence[Any]] = None) -> "StreamExecutor":
        """One deep copy of ``module`` per distinct device (the module itself where it already lives)."""
        if not isinstance(module, torch.nn.Module):
            raise InvalidArgumentError("StreamExecutor.from_module needs a torch.nn.Module.")
        home = _module_device(module)

        def factory(d):
            return module if home == d else copy.deepcopy(module).to(d)

        return cls(devices=devices, factory=factory)

    def shares(self, k: int) -> List[int]:
        """Drafts per stream for a round of ``k`` drafts (stream order = draft order)."""
        return even_shares(k, len(self.streams))

    def describe(self, width: Optional[int] = None) -> str:
        """Streams, devices and what runs; with ``width``, the drafts per stream in a round of that many."""
        check_describe_width(width)
        devs = ", ".join(str(d) for d in self.devices)
        who = "replicas" if self.replicas is not None else "the given predictor"
        text = f"StreamExecutor({len(self.devices)} streams on {devs}; runs {who}"
        if width is not None:
            text += f"; drafts per stream at width {width}: {even_shares(width, len(self.devices))}"
        return text + ")"

    def close(self) -> None:
        """Wait for every stream's work and drop the streams and replicas; later rounds are refused."""
        for s in self.streams:
            s.synchronize()
        self.streams = []
        self.replicas = None

    def evaluate(
        self,
        predictor: Predictor,
        xs: torch.Tensor,
        ts: torch.Tensor,
        cond: Optional[Mapping[str, Any]] = None,
    ) -> torch.Tensor:
        """:meth:`Executor.evaluate` with the K drafts shared out over the devices' streams (each share's drafts
        called one by one on its own CUDA stream, as :class:`~driffusion_core.SerialExecutor` calls them, so a replica sees the
        batch shape it was written for), gathered in draft order on the inputs' device."""
        if not self.streams:
            raise ExecutorError("StreamExecutor: the executor was closed.")
        check_round_args(type(self).__name__, xs, ts, cond)
        k = xs.shape[0]
        cond = dict(cond or {})
        anchor = xs.device
        anchor_stream = torch.cuda.current_stream(anchor) if anchor.type == "cuda" else None

        # 1. launch every share on its stream (the host only queues work)
        launched = []
        busy = []  # streams with queued work: on an error the inputs' stream still waits for them
        try:
            for i, start, stop in _share_slices(self.shares(k)):
                size = stop - start
                dev, s = self.devices[i], self.streams[i]
                f = self.replicas[i] if self.replicas is not None else predictor
                if self.replicas is None:
                    md = _module_device(f)
                    if md is not None and md != dev:
                        raise InvalidArgumentError(
                            f"StreamExecutor: the predictor holds a module on {md} but would run on {dev}; give one "
                            f"replica per device: StreamExecutor.from_module(model, devices=...), replicas=[...] "
                            f"or factory=lambda d: ..."
                        )
                # the stream starts after the inputs are ready (queued on the inputs' stream / its device's stream)
                if anchor_stream is not None:
                    s.wait_stream(anchor_stream)
                if anchor_stream is None or dev != anchor:
                    s.wait_stream(torch.cuda.current_stream(dev))
                busy.append(s)
                with torch.cuda.device(dev), torch.cuda.stream(s):
                    x_part = self._to(xs[start : start + size], dev, s)
                    t_part = self._to(ts[start : start + size], dev, s)
                    c = map_tensors(lambda v: self._to(v, dev, s), cond)
                    try:  # each output copied as it comes: a replica may reuse one output buffer
                        got = stack_calls(lambda j: f(x_part[j], t_part[j], **c), size)
                    except Exception as e:
                        raise ExecutorError(
                            f"StreamExecutor: the predictor raised on {dev} (stream {i}, drafts {start}..{start + size - 1}): "
                            f"{exception_text(e)}"
                        ) from e
                    for j, o in enumerate(got if isinstance(got, list) else got[:1]):
                        if not_dense(o):
                            raise PredictorOutputError(
                                f"StreamExecutor: the predictor returned {not_dense(o)} for draft {start + j} on {dev}; {DENSE_FIX}."
                            )
                        if isinstance(o, torch.Tensor) and o.device != dev:
                            raise DeviceMismatchError(
                                f"StreamExecutor: the predictor returned a tensor on {o.device} for draft {start + j}, "
                                f"which ran on {dev} (stream {i}); it must return its prediction on the device of "
                                f"its input x (a replica must live on the device it is given)."
                            )
                    try:
                        out = torch.stack(got) if isinstance(got, list) else got
                    except Exception as e:  # not tensors, or unlike shapes / dtypes
                        raise PredictorOutputError(
                            f"StreamExecutor: the predictions of drafts {start}..{start + size - 1} (stream {i}, {dev}) "
                            f"cannot be stacked: {exception_text(e)}; the predictor must return one tensor "
                            f"shaped like its input x."
                        ) from e
                launched.append((dev, s, out))
            kinds = {(tuple(o.shape[1:]), o.dtype) for _, _, o in launched}
            if len(kinds) > 1:  # torch.cat would promote unlike dtypes silently, or fail on shapes with its own message
                listing = "; ".join(f"stream {i} ({dev}): {tuple(o.shape[1:])} {o.dtype}" for i, (dev, _, o) in enumerate(launched))
                raise PredictorOutputError(
                    f"StreamExecutor: the replicas returned predictions of different shapes or dtypes ({listing}); "
                    f"each must return one prediction shaped like its input x, in x's dtype (a replica left in "
                    f"another precision, e.g. model.half() on one device only?)."
                )
        except BaseException:
            if anchor_stream is not None:  # the caller's next work on the inputs' stream waits for what was queued
                for s in busy:
                    anchor_stream.wait_stream(s)
            raise

        # 2. gather in draft order onto the inputs' device
        results = []
        for dev, s, out in launched:
            if anchor_stream is not None and dev == anchor:
                anchor_stream.wait_stream(s)
                out.record_stream(anchor_stream)  # made on s, read on the anchor's stream
                results.append(out)
            elif anchor_stream is not None:
                # cross-device copy queued on s (the source's current stream); the anchor's stream waits for it
                with torch.cuda.device(dev), torch.cuda.stream(s):
                    results.append(out.to(anchor, non_blocking=True))
            else:
                # CPU inputs: a blocking copy on s waits for that stream's work only
                with torch.cuda.device(dev), torch.cuda.stream(s):
                    results.append(out.to(anchor))
        return results[0] if len(results) == 1 else torch.cat(results)

    @staticmethod
    def _to(t: torch.Tensor, dev: torch.device, s: "torch.cuda.Stream") -> torch.Tensor:
        """``t`` on ``dev`` for use on stream ``s`` (called inside ``torch.cuda.stream(s)``)."""
        if t.device == dev:
            if t.dim() > 0 and t.numel() > 0:
                t.record_stream(s)  # made on another stream, read on s
            return t
        return t.to(dev, non_blocking=True)

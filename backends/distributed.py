r"""Several processes, one or more machines: a round's drafts spread over the ranks of torch.distributed.

SPMD: every rank runs the same scheduler on the same inputs (same starting state, same seed) and calls
:meth:`DistributedExecutor.evaluate` with the same ``(xs, ts, cond)``. Rank ``r`` evaluates its
contiguous share of the K drafts, the ranks all-gather the predictions, and every rank returns the full
``Tensor[K, B, ...]`` in draft order, so every rank refines the same way and holds the same sample.

Launch with torchrun (see ``backends/README.md``)::

    torchrun --standalone --nproc_per_node=2 examples/distributed_sample.py   # one node, gloo on CPU
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \
             --master_addr=10.0.0.1 --master_port=29500 script.py        # several nodes, nccl

and in the script::

    from backends import DistributedExecutor, init_from_env
    env = init_from_env()                     # gloo on CPU, nccl (device cuda:LOCAL_RANK) on GPU
    executor = DistributedExecutor(timeout=60)
    out = DraftRefineScheduler(transition, grid, width=env.world_size).sample(model, x, executor=executor,
                                                                              noise=NoiseSource(seed))

A round of K drafts:

1. each rank calls the predictor on its share (``shares(K)``), one call per draft, as
   :class:`~backends.SerialExecutor` does (so the predictions are bit for bit the serial ones). A round
   of one draft (the first anchor, conservative mode's exact anchor calls) is made by **every** rank
   itself with ``anchor="local"`` (the default): no prediction travels, only the status header, which
   carries a CRC-32 of each rank's prediction, so a model that is not bitwise reproducible across ranks
   (cudnn autotuning, nondeterministic kernels, different CPUs) makes every rank raise in that round
   instead of letting the ranks drift apart. With ``anchor="shared"`` it is rank 0's and its prediction is
   gathered like any other, so the ranks go on from the same bits whatever the model;
2. the ranks exchange a small status header (ok / the predictor raised / bad output / the inputs could
   not be moved, plus a descriptor of the inputs, the conditioning and the outputs, and value checksums
   of the states and of the conditioning's tensors, so ranks that were given different shapes, dtypes,
   K, device types or conditioning are caught instead of exchanging garbage). With gloo the header and
   the predictions travel in **one** all-gather per round; with nccl the header goes over a small gloo side group on the CPU and
   the predictions over nccl;
3. if some rank failed (a KeyboardInterrupt or SystemExit too: that rank re-raises it after the
   exchange, and every rank's executor then refuses further rounds), every rank raises
   :class:`~driffusion_core.errors.ExecutorError` naming the failing ranks, the exception type and
   message; if the ranks' inputs differ (shapes, dtypes, the conditioning's or the model times' values),
   every rank raises one listing them; otherwise the padded shares are assembled in draft order (K
   need not be a multiple of the world size: shares are padded to the largest for the all-gather and
   the padding dropped).

Sizes. Every all-gather has a size all ranks agree on from earlier collective information only, never
from a rank's own inputs (the backend aborts the process on a size mismatch). The gloo exchange sends
``header + cap * row`` bytes, where the row (one prediction's shape and dtype) and ``cap`` (drafts per
rank) are agreed from the gathered headers of the last round in which all ranks agreed; before any
agreement it is the header alone. A rank whose share does not fit the agreed size says so in its
header and sends no payload; after the checks the predictions then go in a second all-gather sized
from the headers, and the agreed size grows (``cap`` = the largest share seen). So only a round that
brings a new prediction shape or dtype, or a larger share than before, costs two all-gathers; every
other round (in a sampling run: all but at most the first multi-draft one) costs one.

After the last round the samplers call :meth:`DistributedExecutor.finish` with the final sample: one more
all-gather per sample compares the final states' sums (the last refinement step is no round's input, so
ranks whose grids differ only in their last step are caught there).

Faults. Every wait on another rank in a round is bounded by ``timeout`` seconds: a rank that dies,
hangs or falls out of step makes the others raise ``ExecutorError`` instead of hanging. After such a
communication failure a short check (at most ``diagnose_timeout`` seconds, like ``monitored_barrier``)
names the ranks that did not answer (rank 0 waits for the others' hellos at most half of it, then sends
them its verdict, which they wait for the whole of it; when a rank did not answer, rank 0 returns at the
end of it, once its last wait for a hello has ended: no thread is left waiting in gloo, where one woken
at interpreter exit would abort the process), so the error surfaces within about
``timeout + diagnose_timeout``
seconds (sooner when a dead rank's connection closes). The process group is then unusable (the
executor refuses further rounds) and the job should exit. ``timeout`` must exceed the longest a healthy
rank can keep the others waiting, i.e. one share of model calls. Not bounded by ``timeout``: the
one-time setup exchange in the constructor (ranks may load models at different speeds) and, with nccl,
the prediction transfer itself (it waits on the GPU stream); both are bounded by the process group's
own timeout (``init_from_env(timeout=...)``, NCCL's watchdog). The process group's timeout also ends
any wait first where it is the shorter (the effective bound of a round is the smaller of the two). When
it ends a wait, gloo drops every connection of that process, so no check of who still answers is
made: the error says that the process group's timeout fired (naming its value where torch shows it)
instead of naming ranks that only look dead; the slow or stopped rank is the one whose own error says
that its share took longer than that bound.

Several machines. Every process needs ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
(torchrun sets them, and ``LOCAL_RANK``). Launched by hand without torchrun, ``LOCAL_RANK`` defaults to 0:
with nccl :func:`init_from_env` then selects ``cuda:0`` in every process of a node (and the executor
computes on the current CUDA device), so set ``LOCAL_RANK`` per process (or pass ``device=``). With gloo
across machines, set ``GLOO_SOCKET_IFNAME`` to the network interface the hosts reach each other on (e.g.
``eth0``; see ``ip addr``) on every node: gloo otherwise binds to the interface of the host name's
address, which can be a loopback or a container-internal one the other machines cannot reach (the first
exchange then fails or waits out the process group's timeout).
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import datetime
import math
import os
import re
import socket
import threading
import time
import warnings
import zlib
from typing import Any, Deque, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from driffusion_core.errors import (
    DriffusionError,
    ExecutorError,
    InvalidArgumentError,
    PredictorOutputError,
    as_count,
    exception_text,
    is_real,
    not_a_tensor_hint,
    safe_str,
)
from driffusion_core.executor import (
    Executor, Predictor, changed_tensor, check_round_args, even_shares, float64_values, iter_tensors, map_tensors,
    DENSE_FIX, not_dense, stack_calls, stamp_changed,
)
from driffusion_core.scheduler import input_version

try:  # torch may be built without distributed support
    import torch.distributed as dist

    _DIST_AVAILABLE = dist.is_available()
except Exception:  # pragma: no cover - depends on the torch build
    dist = None  # type: ignore[assignment]
    _DIST_AVAILABLE = False

__all__ = ["DistributedExecutor", "init_from_env", "DistEnv", "even_shares"]


# --------------------------------------------------------------------------------------------- helpers

# A gloo work that ends after Python dropped its tensors frees them from its own worker thread, which
# must take the GIL; at interpreter shutdown that thread is killed mid-destructor and the process aborts
# ("terminate called without an active exception"). It happens to successful exchanges too: the worker
# thread lets go of a finished work a moment *after* waking the waiter, so when the job ends right after
# its last round (save, destroy_process_group, exit), a descheduled worker can hold the last reference
# into interpreter shutdown (5 aborts in about 150 two-process runs of a short job on a 2-core machine
# before this, 0 in 200 after). So Python keeps every work it waits on referenced:
# - _ABANDONED: exchanges that failed while the backend may still be working on them, for the life of
#   the process (once per broken executor);
# - _RECENT: the last few successful exchanges (a work and its tensors, the oldest dropped by the main
#   thread while Python runs).
# Both containers are leaked (one extra reference), so shutdown does not free them either, and the
# backend's release is a plain refcount decrement.
_ABANDONED: List[Any] = []
_RECENT: Deque[Any] = collections.deque(maxlen=4)
for _kept in (_ABANDONED, _RECENT):
    try:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(_kept))
    except Exception:  # pragma: no cover - not CPython
        pass


def _abandon(*objects: Any) -> None:
    """Keep ``objects`` (a failed work and its tensors) alive until the process exits."""
    _ABANDONED.append(objects)


def _retain(*objects: Any) -> None:
    """Keep ``objects`` (a finished work and its tensors) alive for the next few exchanges, and past
    interpreter shutdown for the last ones."""
    _RECENT.append(objects)


def _offsets(sizes: Sequence[int]) -> List[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


class DistEnv(NamedTuple):
    """Where this process sits in the job (returned by :func:`init_from_env`)."""

    rank: int
    local_rank: int
    world_size: int
    backend: str


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _require_dist() -> None:
    if not _DIST_AVAILABLE:
        raise ExecutorError(
            "torch.distributed is not available in this torch build; DistributedExecutor needs it. "
            "On one machine use backends.BatchedExecutor (one device) or backends.StreamExecutor (several GPUs)."
        )


#: the longest wait a timeout may ask for, in seconds (11.6 days): the backends keep timeouts as 32-bit
#: milliseconds or similar, and larger values fail inside the first collective as if a rank had timed out
MAX_TIMEOUT = 1e6


def _seconds(value: Any, what: str, zero_ok: bool = False) -> float:
    """A timeout in seconds: a finite number > 0 (>= 0 with ``zero_ok``) and at most :data:`MAX_TIMEOUT`."""
    ok = is_real(value) and (0 <= float(value) if zero_ok else 0 < float(value))
    if not ok or not float(value) <= MAX_TIMEOUT:
        need = ">= 0" if zero_ok else "> 0"
        raise InvalidArgumentError(
            f"{what} must be a number of seconds {need} and at most {MAX_TIMEOUT:g} (a finite bound: a rank that "
            f"stops must make the others fail, not wait forever), got {value!r}."
        )
    return float(value)


def init_from_env(backend: Optional[str] = None, timeout: float = 120.0) -> DistEnv:
    """Initialise the default process group from torchrun's environment, if not done yet.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by
    ``torchrun``; ``LOCAL_RANK`` defaults to 0 when unset, e.g. launched by hand). With ``backend=None`` it
    picks ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise; for nccl it also selects
    ``cuda:LOCAL_RANK`` as this process's device.

    Arguments:
        backend: ``"gloo"`` (CPU, any machine), ``"nccl"`` (NVIDIA GPUs) or None to choose.
        timeout: the process group's timeout in seconds (how long a collective may wait before the
            backend gives up; :class:`DistributedExecutor` bounds its own waits separately).

    Returns:
        :class:`DistEnv` ``(rank, local_rank, world_size, backend)``.
    """
    _require_dist()
    timeout = _seconds(timeout, "timeout")
    known = set(getattr(dist.Backend, "backend_list", ["gloo", "nccl", "mpi", "ucc"])) - {"undefined", "fake"}
    if backend is not None and (
        not isinstance(backend, str) or not {part.split(":")[-1] for part in backend.lower().split(",")} <= known
    ):
        raise InvalidArgumentError(
            f"init_from_env: backend must be 'gloo' (CPU), 'nccl' (GPU), another torch.distributed backend "
            f"({', '.join(sorted(known))}) or None (nccl where CUDA is available, else gloo), got {backend!r}."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), str(dist.get_backend()))
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ExecutorError(
            f"init_from_env: the environment variables {', '.join(missing)} are not set, so this process "
            f"was not started by torchrun. Launch it with e.g. `torchrun --nproc_per_node=2 your_script.py` "
            f"(see backends/README.md), or call torch.distributed.init_process_group yourself."
        )
    if backend is None:
        backend = "nccl" if (torch.cuda.is_available() and dist.is_nccl_available()) else "gloo"
    backend = backend.lower()
    unbuilt = sorted({part.split(":")[-1] for part in backend.split(",")} - {"fake"})
    unbuilt = [b for b in unbuilt if hasattr(dist, "is_backend_available") and not dist.is_backend_available(b)]
    if unbuilt:
        raise ExecutorError(
            f"init_from_env: this torch build has no {', '.join(unbuilt)} backend (torch.distributed."
            f"is_backend_available is False); use backend='gloo' (CPU) or 'nccl' (NVIDIA GPUs, a CUDA build)."
        )
    if "nccl" in backend:
        if not torch.cuda.is_available():
            raise ExecutorError(
                "init_from_env: backend 'nccl' needs CUDA, but torch.cuda.is_available() is False; "
                "use backend='gloo' on CPU."
            )
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ExecutorError(
                f"init_from_env: LOCAL_RANK={local_rank} but this node has only {n} GPU(s); start at most "
                f"{n} processes per node (torchrun --nproc_per_node={n})."
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout))
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), backend)


# The per-round status header: int64 fields, then the dims of xs and of the stacked output. The value
# checksums (float64 bits) are adjacent: sum(xs), sum(|xs|), then the conditioning's (below), then a
# position-weighted sum of xs (element j of the flattened xs weighted (j + 1) / numel, so the same values in
# another order show; |it| <= sum(|xs|)), then over the model times ts: sum(ts), sum(|ts|) and a sum with
# fixed pseudo-random weights in [0.5, 1). The conditioning's are per tensor c_i, each divided by the
# tensor's own A_i = sum(|c_i|) (so one huge tensor, an attention bias of finfo.min, hides no difference in
# another) and combined with pseudo-random weights r_i in [0.5, 1): sum_i r_i sum(c_i) / A_i (_F_CSUM),
# sum_i r_i (_F_CABS: the comparison's scale), the row-weighted sums (row j of c_i weighted (j + 1) / rows,
# so rows swapped between ranks show; _F_CROWS), the element-weighted sums (c_i flattened, pseudo-random
# weights, so values moved within a row, one-hot labels at other positions show; _F_CMIX), and
# sum_i r_i log A_i (_F_CLOG, in the otherwise unused field 23: a tensor scaled on one rank shows).
_MAXD = 24
(_F_CODE, _F_ROUND, _F_K, _F_XNDIM, _F_XDTYPE, _F_XDEV, _F_TDTYPE, _F_COND,
 _F_HASOUT, _F_ONDIM, _F_ODTYPE, _F_FITS, _F_XSUM, _F_XABS, _F_CSUM, _F_CABS, _F_CROWS, _F_XPOS,
 _F_CMIX, _F_TSUM, _F_TABS, _F_TMIX, _F_OCRC) = range(23)  # _F_OCRC: CRC-32 of a local anchor's prediction
_F_CLOG = 23  # (field 23: the header stays a multiple of 16 bytes)
_F_OSUM, _F_OABS = 24, 25  # float64 bits of sum and sum(|.|) of a local anchor's prediction (beside its CRC)
_F_GRAD = 26  # 1: this rank's predictions required grad (every rank then warns in the same round); 27 unused
_F_XDIMS = 28
_F_ODIMS = _F_XDIMS + _MAXD
_HEADER_LEN = _F_ODIMS + _MAXD  # 76 int64 = 608 bytes, a multiple of 16: any dtype can follow it
# Local anchors whose sums differ by more than this fraction of sum(|.|) are not a last-bit difference
# (nondeterministic kernels move a float32 sum by about 1e-6 of it): the ranks run different models.
_MODELS_DIFFER_RTOL = 1e-3
# The ranks' states and conditioning must agree in value, not only in shape: sum(xs) may differ in the
# last bits between ranks (reduction order follows the thread count), so it is compared to this fraction
# of sum(|xs|); likewise the conditioning's per-tensor normalised sums to sum_i r_i (each term is at most
# r_i in size, its rounding about 1e-16 of that).
_VALUE_RTOL = 1e-9
_HEADER_BYTES = _HEADER_LEN * 8

# _INTERRUPTED: the predictor raised a BaseException that is not an Exception (KeyboardInterrupt,
# SystemExit); reported like _RAISED, then re-raised on that rank, and every rank's executor is broken.
# _FINISH: the header of :meth:`DistributedExecutor.finish` (the final sample), not of a round.
# _NEEDS_GRAD: the round's inputs require gradients, which the exchange (bytes) cannot carry.
_OK, _RAISED, _BAD_OUTPUT, _MOVE_FAILED, _INTERRUPTED, _FINISH, _NEEDS_GRAD = 0, 1, 2, 3, 4, 5, 6
_MSG_BYTES = 2048
_PROBE_TAG = 0x5D1F

_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
]
_DEVICE_TYPES = ["cpu", "cuda", "mps", "xpu", "meta"]


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else 99


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else "other dtype"


def _device_code(device: torch.device) -> int:
    return _DEVICE_TYPES.index(device.type) if device.type in _DEVICE_TYPES else 99


def _device_name(code: int) -> str:
    return _DEVICE_TYPES[code] if 0 <= code < len(_DEVICE_TYPES) else "other device"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


#: what a NaN and an infinity of a conditioning tensor count as in its checksums (finite, unlikely values)
_NAN_AS, _POSINF_AS = 0.7853981633974483e3, 0.5772156649015329e4


def _group_timeout(group: Any) -> Optional[float]:
    """The gloo process group's own timeout in seconds (``init_process_group(timeout=...)``), which bounds
    every exchange whatever the executor waits, or None where torch does not expose it."""
    try:
        g = group if group is not None else dist.group.WORLD
        return float(g._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    except Exception:  # noqa: BLE001 - a private torch API; without it the message cannot name the bound
        return None


#: gloo's error when the process group's own timeout ends a wait (the context's timeout, in milliseconds)
_GLOO_TIMEOUT = re.compile(r"[Tt]imed out waiting (\d+) ?ms")


def _safe_repr(v: Any) -> str:
    """``repr(v)`` without memory addresses (they differ between processes), or its type if repr fails. The
    whole text (it is signed by a checksum, so a difference past any length counts)."""
    try:
        text = repr(v)
    except Exception:
        return f"<{type(v).__name__}>"
    return _ADDRESS.sub("", text)


def _cond_signature(cond: Mapping[str, Any]) -> int:
    """A checksum of the conditioning: names, nesting, each tensor's shape and dtype, and the repr of every
    other value (a guidance scale, a flag); the tensors' values travel as sums (:func:`_value_sums`).

    A dataclass is signed field by field (its compared fields, by these rules: a set in it sorted, a tensor
    by shape and dtype, at most 4 dataclasses deep), not by its repr, which shows a set in the per-process
    hash order and a tensor's device (cuda:<local rank>). A ``torch.device`` is signed by its type only
    (each rank has its own GPU). Another value that holds tensors without being a container (an object
    whose repr is object's default) is signed by its repr and the shapes and dtypes of the tensors it
    holds (:func:`_held_tensors`), whose values join the conditioning's sums: object's default repr shows
    no fields at all."""
    def sig(v: Any, depth: int = 0) -> str:
        if isinstance(v, torch.Tensor):
            return f"{tuple(v.shape)}:{v.dtype}"
        if isinstance(v, torch.device):
            return f"device:{v.type}"
        if isinstance(v, Mapping):
            return "{" + ",".join(f"{k}={sig(v[k], depth)}" for k in sorted(v, key=str)) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(sig(e, depth) for e in v) + "]"
        if isinstance(v, (set, frozenset)):  # iteration order follows string hashing, which differs per process
            return "set{" + ",".join(sorted(sig(e, depth) for e in v)) + "}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type) and depth < 4:
            fields = ",".join(f"{f.name}={sig(getattr(v, f.name, None), depth + 1)}"
                              for f in dataclasses.fields(v) if f.compare)
            return f"{type(v).__qualname__}({fields})"
        held = "".join(f"<{tuple(t.shape)}:{t.dtype}>" for t in _held_tensors(v))
        return f"{type(v).__name__}={_safe_repr(v)}{held}"

    return zlib.crc32(sig(dict(cond)).encode())


def _held_tensors(v: Any, depth: int = 0, seen: Optional[set] = None) -> List[torch.Tensor]:
    """The tensors a conditioning value holds without being a container the executors look into (mappings,
    sequences, dataclasses: :func:`iter_tensors` finds theirs): the attributes of a non-callable object whose
    repr is object's default, and in containers and such objects within them (at most 4 objects deep, each
    object once);
    and numeric numpy arrays anywhere in it, as tensors (their repr abbreviates a large array with "...")."""
    if isinstance(v, torch.Tensor):
        return [v] if depth else []  # a tensor of the conditioning itself is summed as it is (iter_tensors)
    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biufc":
            return []
        try:  # native byte order, a dtype torch has (big-endian arrays, longdouble): float64 / complex128 values
            return [torch.as_tensor(np.asarray(v, dtype=np.complex128 if v.dtype.kind == "c" else np.float64))]
        except Exception:  # noqa: BLE001 - then the repr alone signs it, as for any other value
            return []
    seen = set() if seen is None else seen
    if isinstance(v, Mapping):
        return [t for k in sorted(v, key=str) for t in _held_tensors(v[k], depth, seen)]
    if isinstance(v, (list, tuple)):
        return [t for e in v for t in _held_tensors(e, depth, seen)]
    if depth >= 4 or id(v) in seen:
        return []
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # a container at the same depth, as for iter_tensors
        seen.add(id(v))
        return [t for f in dataclasses.fields(v) for t in _held_tensors(getattr(v, f.name, None), depth, seen)]
    if type(v).__repr__ is object.__repr__ and isinstance(getattr(v, "__dict__", None), dict) and not callable(v):
        items = [e for _, e in sorted(vars(v).items(), key=lambda kv: str(kv[0]))]
    else:
        return []
    seen.add(id(v))
    return [t for e in items for t in _held_tensors(e, depth + 1, seen)]


def _cond_tensors(cond: Mapping[str, Any]) -> List[torch.Tensor]:
    """Every tensor whose values the header sums: the conditioning's own (:func:`iter_tensors`), then those
    its other values hold (:func:`_held_tensors`), in the conditioning's order."""
    return list(iter_tensors(cond)) + _held_tensors(dict(cond))


def _mix_weights(n: int, device: Any, start: int = 0) -> torch.Tensor:
    """The fixed pseudo-random weights of positions ``start .. start + n`` in [0.5, 1) (float64), the same
    on every process up to the last bits of ``sin`` (far below the comparison's tolerance): a nonlinear
    hash of the position, so no regular pattern of positions (a swap, a shift, one-hot labels moved)
    keeps a weighted sum."""
    j = torch.arange(start + 1, start + n + 1, dtype=torch.float64, device=device)
    return 0.5 + 0.5 * torch.frac(torch.sin(j * 12.9898 + 78.233).abs() * 43758.5453)


def _value_sums(xs: torch.Tensor, cond: Mapping[str, Any], ts: Optional[torch.Tensor] = None) -> Tuple[List[int], int]:
    """The header's value checksums (fields _F_XSUM .. _F_TMIX, and _F_CLOG) as int64 bit patterns, one host
    sync: sum(xs), sum(|xs|); the conditioning's per-tensor normalised sums (:func:`_value_sums_xc`);
    sum_j v_j * xs_j over the flattened xs with v_j = (j + 1) / numel (so |it| <= sum(|xs|)); sum(ts),
    sum(|ts|), sum_j m_j * ts_j over the flattened model times (zeros without ``ts``), m_j =
    :func:`_mix_weights`; and sum_i r_i log sum(|c_i|) over the conditioning's tensors."""
    head, c_log = _value_sums_xc(xs, cond)
    if ts is None or ts.numel() == 0:
        return head + [0, 0, 0], c_log
    try:
        w = float64_values(ts).reshape(-1)
        t_sums = torch.stack([w.sum(), w.abs().sum(), (w * _mix_weights(w.numel(), w.device)).sum()])
    except Exception:  # model times whose values cannot be read (meta): no value check for them
        t_sums = torch.full((3,), math.nan, dtype=torch.float64)
    return head + t_sums.cpu().view(torch.int64).tolist(), c_log


def _value_sums_xc(xs: torch.Tensor, cond: Mapping[str, Any]) -> Tuple[List[int], int]:
    """Fields _F_XSUM .. _F_CMIX of :func:`_value_sums`, and _F_CLOG.

    The conditioning's tensors c_i, each with A_i = sum(|c_i|) (NaN and inf as fixed finite values), s_i =
    sum(c_i) / A_i, row-weighted rw_i = sum_j (j + 1) / rows * sum(row j of c_i) / A_i, element-weighted
    m_i = sum_k w_k c_ik / A_i (w = :func:`_mix_weights`), l_i = log A_i (-2000 for A_i = 0), combined
    with per-tensor weights r_i = :func:`_mix_weights`: _F_CSUM = sum r_i s_i, _F_CABS = sum r_i (the
    comparison's scale), _F_CROWS = sum r_i rw_i, _F_CMIX = sum r_i m_i, _F_CLOG = sum r_i l_i."""
    wide = float64_values(xs)
    to = wide.device
    flat = wide.reshape(-1)
    positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=to) / max(flat.numel(), 1)
    x_pos = (flat * positions).sum().reshape(1)
    x_sums = torch.stack([wide.sum(), wide.abs().sum()])
    tensors = _cond_tensors(cond)
    if not tensors:
        return x_sums.cpu().view(torch.int64).tolist() + [0, 0, 0] + x_pos.cpu().view(torch.int64).tolist() + [0], 0
    try:
        per = []
        for v in tensors:
            # NaN / inf (an attention mask's -inf, NaN-padded observations) as fixed finite values: one would
            # make every sum non-finite, and nothing would be compared
            w = torch.nan_to_num(float64_values(v), nan=_NAN_AS, posinf=_POSINF_AS, neginf=-_POSINF_AS)
            a = w.abs().sum()
            scale = torch.where(a > 0, a, torch.ones_like(a))
            rows = w.reshape(w.shape[0] if w.dim() else 1, -1).sum(1)
            row_w = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device) / max(rows.numel(), 1)
            flat_c = w.reshape(-1)
            mixed = (flat_c * _mix_weights(flat_c.numel(), flat_c.device)).sum()
            log_a = torch.where(a > 0, scale.log(), torch.full_like(a, -2000.0))
            per.append(torch.stack([rows.sum() / scale, (rows * row_w).sum() / scale, mixed / scale, log_a]).to(to))
        per = torch.stack(per)
        r = _mix_weights(len(tensors), to)
        s, rw, m, lg = (per * r[:, None]).sum(0).unbind()
        c_sums = torch.stack([s, r.sum(), rw])
        c_mix, c_log = m.reshape(1), lg.reshape(1)
    except Exception:  # a tensor whose values cannot be read (meta): no value check for the conditioning
        c_sums = torch.full((3,), math.nan, dtype=torch.float64, device=to)
        c_mix = torch.full((1,), math.nan, dtype=torch.float64, device=to)
        c_log = torch.full((1,), math.nan, dtype=torch.float64, device=to)
    out = torch.cat([x_sums, c_sums, x_pos, c_mix, c_log]).cpu().view(torch.int64).tolist()
    return out[:-1], out[-1]


def _sums_differ(sums: Sequence[float], ref: Sequence[float], ref_abs: float) -> bool:
    """Whether checksums differ from rank 0's by more than rounding: ``_VALUE_RTOL`` of rank 0's sum of
    absolute values (reduction order, which follows the thread count, moves the last bits)."""
    return any(not abs(a - b) <= _VALUE_RTOL * max(ref_abs, 1e-300) for a, b in zip(sums, ref))


def _state_sums(headers, lists) -> Tuple[List[List[float]], List[int], str]:
    """The states' checksums in each rank's header (float64: sum, sum of |x|, the conditioning's three, the
    position-weighted sum, ...), the ranks whose state differs from rank 0's by more than rounding (none
    when some state is not finite: the sampler reports that), and a listing of them for the error."""
    sums = [[float(v) for v in h[_F_XSUM : _F_TMIX + 1].clone().view(torch.float64)] for h in headers]
    ref, ref_sums = lists[0], sums[0]
    finite = all(math.isfinite(v[1]) for v in sums)
    differ = [
        r for r, (h, v) in enumerate(zip(lists, sums))
        if finite and (h[_F_XSUM], h[_F_XPOS]) != (ref[_F_XSUM], ref[_F_XPOS])
        and _sums_differ([v[0], v[5]], [ref_sums[0], ref_sums[5]], ref_sums[1])
    ]
    listing = "; ".join(
        f"rank {r}: sum {v[0]:.9g}, sum of |x| {v[1]:.9g}, position-weighted sum {v[5]:.9g}" for r, v in enumerate(sums)
    )
    return sums, differ, listing


def _device_problem(device: torch.device) -> str:
    """Why this process cannot compute on ``device`` ('' when it can)."""
    if device.type == "meta":
        return f"{device}: meta tensors hold no values"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{device}: CUDA is not available in this process (torch.cuda.is_available() is False)"
        n = torch.cuda.device_count()
        if device.index is not None and not 0 <= device.index < n:
            return f"{device}: this process sees {n} GPU(s) (cuda:0 .. cuda:{n - 1})"
        return ""
    if device.type == "mps":
        ok = getattr(getattr(torch.backends, "mps", None), "is_available", lambda: False)()
        return "" if ok else f"{device}: MPS is not available in this process"
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "is_available"):
        try:
            if not mod.is_available():
                return f"{device}: torch.{device.type}.is_available() is False in this process"
        except Exception:  # pragma: no cover - an accelerator module without a working check
            return ""
    return ""


def _assemble(chunks: List[torch.Tensor], offset: int, sizes: List[int], shape: Tuple[int, ...],
              dtype: torch.dtype) -> torch.Tensor:
    """The predictions in draft order: rank r's ``sizes[r]`` rows of ``shape``/``dtype`` from byte ``offset``
    of its gathered chunk (the padding after them dropped)."""
    row_bytes = _numel(shape) * _item_size(dtype)
    return torch.cat([
        _from_bytes(c[offset : offset + n * row_bytes], dtype, (n,) + tuple(shape)) for c, n in zip(chunks, sizes) if n
    ])


def _dims(h: Sequence[int], start: int, ndim: int) -> Tuple[int, ...]:
    """Dims ``start .. start + ndim`` of a header (a list, or an int64 tensor)."""
    return tuple(int(d) for d in h[start : start + ndim])


def _to_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of ``t``'s elements (bit exact for every dtype)."""
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8)


def _from_bytes(b: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    if dtype == torch.bool:
        return b.reshape(shape).to(torch.bool)
    return b.view(dtype).reshape(shape)


def _item_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _first_line(text: str, limit: int = 300) -> str:
    """The gist of a backend's error: first line, no source location, no boilerplate advice."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    line = line.split(" This is typically caused")[0].rstrip(" .!")
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------- executor


class DistributedExecutor(Executor):
    """Spreads a round's K drafts over the ranks of a torch.distributed process group (SPMD).

    Arguments:
        group: the process group (default: the world). Every rank of it runs the same sampler.
        timeout: seconds any rank waits for the others in one exchange before raising
            :class:`~driffusion_core.errors.ExecutorError` (must exceed one share's model calls). A
            failure surfaces within about ``timeout + diagnose_timeout``; the constructor's setup
            exchange and the nccl prediction transfer are bounded by the process group's timeout.
        device: where this rank evaluates its share. Default: ``cuda:LOCAL_RANK`` with nccl, and
            wherever the inputs already are with gloo. Inputs are moved there; the gathered
            predictions are returned on the inputs' device.
        control_group: a gloo group with the same ranks for the status exchange. Made automatically
            (``new_group(backend="gloo")``) when ``group`` is not gloo; pass one when ``group`` is a
            non-gloo subgroup, since making a group is a collective of the whole world.
        diagnose_timeout: seconds spent, after a failed exchange, finding out which ranks still answer
            (like ``monitored_barrier``), so the error names the missing ones (default ``min(5, timeout)``).
        anchor: who evaluates a round of one draft (the first anchor; conservative mode's exact anchor
            calls). ``"local"`` (default): every rank makes that call itself and no prediction is
            exchanged, only the status header; the ranks compare a CRC-32 of their predictions and all
            raise :class:`~driffusion_core.errors.ExecutorError` if they differ in any bit. ``"shared"``:
            rank 0 makes it and the prediction is gathered like any other, for models that are not
            bitwise reproducible across ranks (cudnn autotuning, nondeterministic kernels, mixed
            hardware). Every rank must pass the same value.

    Several machines (see the module's docstring): set ``GLOO_SOCKET_IFNAME`` to the interface the hosts
    reach each other on (gloo, and the status exchange of nccl runs). Launched by hand without torchrun,
    ``LOCAL_RANK`` defaults to 0 (with nccl every process of a node on ``cuda:0``): set it per process.

    A wait ended by the process group's own timeout (where it is shorter than ``timeout``, and always for
    the setup exchange) is reported as such: gloo then drops the process's connections, so no rank is named
    as dead.

    Raises:
        ExecutorError: torch.distributed is unavailable, or the process group is not initialised
            (call :func:`init_from_env` under torchrun first).
    """

    def __init__(
        self,
        group: Any = None,
        timeout: float = 60.0,
        device: Any = None,
        control_group: Any = None,
        diagnose_timeout: Optional[float] = None,
        anchor: str = "local",
    ):
        _require_dist()
        if anchor not in ("local", "shared"):
            raise InvalidArgumentError(
                f"DistributedExecutor: anchor must be 'local' (every rank makes a one-draft round's call itself) "
                f"or 'shared' (rank 0 makes it and shares the prediction), got {anchor!r}."
            )
        self.anchor = anchor
        if not dist.is_initialized():
            raise ExecutorError(
                "DistributedExecutor: the torch.distributed process group is not initialised. Launch the "
                "script with torchrun (e.g. `torchrun --nproc_per_node=2 script.py`) and call "
                "backends.init_from_env() before making the executor, or call "
                "torch.distributed.init_process_group yourself."
            )
        timeout = _seconds(timeout, "timeout")
        if diagnose_timeout is None:
            diagnose_timeout = min(5.0, timeout)
        diagnose_timeout = _seconds(diagnose_timeout, "diagnose_timeout", zero_ok=True)
        for name, g in (("group", group), ("control_group", control_group)):
            if g is not None and g is getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
                raise InvalidArgumentError(
                    f"DistributedExecutor: this process (global rank {dist.get_rank()}) is not a member of the "
                    f"given {name}: torch.distributed.new_group returns a placeholder to the ranks it leaves out. "
                    f"Make the executor only on the group's ranks (e.g. `if dist.get_rank() in ranks:`)."
                )
            if isinstance(g, DistEnv):
                raise InvalidArgumentError(
                    f"DistributedExecutor: {name} got the DistEnv that init_from_env() returns ({g!r}); "
                    f"init_from_env() sets up the default process group, which DistributedExecutor() uses: call "
                    f"DistributedExecutor() with no group after it (or pass a group from torch.distributed.new_group)."
                )
            if g is not None and not isinstance(g, dist.ProcessGroup):
                raise InvalidArgumentError(
                    f"DistributedExecutor: {name} must be a torch.distributed process group (from "
                    f"torch.distributed.new_group) or None (the default group), got {type(g).__name__} {g!r}."
                )
        self.group = group
        self.timeout = float(timeout)
        self.diagnose_timeout = float(diagnose_timeout)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise InvalidArgumentError("DistributedExecutor: this process is not a member of the given group.")
        self.world_size = dist.get_world_size(group)
        # On a subgroup the messages' rank numbers are the group's; each error then says which global ranks
        # (torchrun's RANK, the logs' numbering) they are.
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.world_size))
        self.global_ranks: List[int] = [int(g) for g in ranks]
        self._rank_legend = ""
        if self.global_ranks != list(range(self.world_size)):
            pairs = [f"rank {i} is global rank {g}" for i, g in enumerate(self.global_ranks[:8])]
            more = ", ..." if self.world_size > 8 else ""
            self._rank_legend = (f" (Ranks here are numbered within the executor's process group: "
                                 f"{', '.join(pairs)}{more}.)")
        self.backend = str(dist.get_backend(group)).lower()
        # "nccl", or a multi-device group such as "cpu:gloo,cuda:nccl": predictions travel on the GPU
        self._nccl = "nccl" in self.backend
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

        # A device this rank cannot use is reported in the setup exchange below, so that every rank raises
        # (a rank raising alone here would leave the others waiting in their first exchange).
        problem = ""
        if device is None and self._nccl:
            if "LOCAL_RANK" in os.environ:
                device = torch.device("cuda", self.local_rank)
            elif torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
            else:
                problem = "the nccl backend needs CUDA, but torch.cuda.is_available() is False in this process"
        try:
            self.device: Optional[torch.device] = torch.device(device) if device is not None else None
        except Exception:
            self.device, problem = None, f"{device!r} is not a device"
        if not problem and self._nccl and (self.device is None or self.device.type != "cuda"):
            problem = (
                f"the nccl backend communicates CUDA tensors, but device={self.device}; use "
                f"device='cuda:<local_rank>' or the gloo backend on CPU"
            )
        if not problem and self.device is not None:
            problem = _device_problem(self.device)
        # Where predictions travel: nccl needs them on this rank's GPU; gloo gets them on the CPU.
        self._comm_device = self.device if (self._nccl and not problem) else torch.device("cpu")

        if control_group is not None:
            self._control = control_group
            self._own_control = False
        elif self.backend == "gloo":
            self._control = group
            self._own_control = False
        else:
            ranks = dist.get_process_group_ranks(group) if group is not None else None
            self._control = dist.new_group(
                ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=max(self.timeout, 300.0))
            )
            self._own_control = True
        if str(dist.get_backend(self._control)).lower() != "gloo":
            raise InvalidArgumentError("DistributedExecutor: control_group must be a gloo process group.")
        self._group_timeout = _group_timeout(self._control)
        if self._group_timeout is not None and self._group_timeout < self.timeout:
            warnings.warn(
                f"DistributedExecutor(timeout={self.timeout:g}): the process group's own timeout is "
                f"{self._group_timeout:g}s (init_process_group / init_from_env(timeout=...)), which ends every "
                f"exchange first, so a round slower than {self._group_timeout:g}s fails. Give the group a timeout "
                f"of at least {self.timeout:g}s, or the executor a timeout <= {self._group_timeout:g}s.",
                stacklevel=2,
            )
        # One all-gather per round when the predictions can ride on the gloo status exchange.
        self._fused = self.backend == "gloo" and self._control is group
        self._round = 0
        self._share_seconds = 0.0  # how long this rank's share of the latest round took
        self._broken: Optional[str] = None
        self._warned_grad = False
        # The agreed size of the fused exchange: the row (shape, dtype) of one prediction and the capacity
        # in drafts per rank. Set only from gathered headers after a round in which all ranks agreed, so it
        # is the same on every rank; before any agreement the exchange is header-only.
        self._agreed_row: Optional[Tuple[Tuple[int, ...], torch.dtype]] = None
        self._cap = 0
        self._max_k = 0
        self._closed = False

        # Who is where (for describe()), exchanged once; also checks that every rank made the executor and
        # can use its device.
        me = f"{socket.gethostname()}|{self.device if self.device is not None else 'inputs'}|{anchor}|{problem}"
        # (bounded by the process group's timeout, not ``timeout``: ranks may load models at different speeds)
        replies = [r.split("|", 3) + ["?", "?", ""] for r in self._gather_text(
            me, what="setup", bounded=False,
            where="exchange in the DistributedExecutor constructor (not a round; bounded by the process group's "
                  "timeout, init_from_env(timeout=...))",
            late="to reach this exchange (to make its executor, e.g. after loading its model)",
        )]
        self._hosts = [r[0] for r in replies]
        self._devices = [r[1] for r in replies]
        unusable = [(rank, r[3]) for rank, r in enumerate(replies) if r[3]]
        if unusable:
            self._broken = "its construction failed"
            self.close()
            listing = "; ".join(f"rank {rank}: {why}" for rank, why in unusable)
            raise InvalidArgumentError(
                f"DistributedExecutor: the device given on rank{'s' if len(unusable) > 1 else ''} "
                f"{', '.join(str(rank) for rank, _ in unusable)} (of {self.world_size}) cannot be used ({listing}). "
                f"Give every rank a device it has (e.g. device=f'cuda:{{LOCAL_RANK}}'), or device=None to compute "
                f"where the inputs are (gloo).{self._rank_legend}"
            )
        anchors = [r[2] for r in replies]
        if len(set(anchors)) > 1:
            self._broken = "its construction failed"
            self.close()
            listing = ", ".join(f"rank {rank}: {a!r}" for rank, a in enumerate(anchors))
            raise InvalidArgumentError(
                f"DistributedExecutor: the ranks were given different anchor settings ({listing}); every rank "
                f"must pass the same anchor= ('local' or 'shared'), or one-draft rounds would be evaluated and "
                f"exchanged differently on different ranks.{self._rank_legend}"
            )

    # ----------------------------------------------------------------------------------------- info

    def shares(self, k: int) -> List[int]:
        """The planned number of drafts per rank for a round of ``k`` drafts (rank order = draft order).

        A single draft is rank 0's share: ``[1, 0, ...]``; with ``anchor="local"`` the other ranks make
        that call too, each for itself (nothing is exchanged but the status).
        """
        return even_shares(k, self.world_size)

    def plan(self, width: int) -> List[int]:
        """Drafts per rank in a full round of ``width`` drafts (rank order = draft order).

        The rounds near the end of the grid may hold fewer drafts (``shares(K)`` for those); a round of
        one draft (the first anchor, conservative mode's anchor calls) is made by every rank
        (``anchor="local"``) or by rank 0 (``anchor="shared"``).
        """
        return self.shares(as_count(width, "width (drafts per round)", 1))

    def describe(self, width: Optional[int] = None) -> str:
        """One line: world size, backend, nodes, the device of each rank and the planned drafts per round
        per rank for ``width`` drafts per round (default: the largest round evaluated so far, if any)."""
        nodes = len(set(self._hosts))
        devs = sorted(set(self._devices))
        shown = ["the inputs' device" if d == "inputs" else d for d in self._devices]
        per_rank = shown[0] if len(devs) == 1 else ", ".join(f"rank {r}: {d}" for r, d in enumerate(shown))
        text = (
            f"DistributedExecutor(world_size={self.world_size}, backend={self.backend}, nodes={nodes}, "
            f"device per rank: {per_rank}, timeout={self.timeout:g}s, anchor={self.anchor}"
        )
        if getattr(self, "_rank_legend", ""):
            text += f", global ranks {self.global_ranks}"
        one = "every rank makes the call itself" if self.anchor == "local" else "rank 0 makes the call"
        if width is None and self._max_k > 1:
            width = self._max_k
        if width is not None:
            sizes = self.plan(width)
            if width == 1:
                return text + f", drafts per round at width 1: {one})"
            runs, r = [], 0
            while r < len(sizes):  # consecutive ranks with the same share, e.g. "ranks 0-2: 2"
                e = r
                while e + 1 < len(sizes) and sizes[e + 1] == sizes[r]:
                    e += 1
                who = f"rank {r}" if e == r else f"ranks {r}-{e}"
                runs.append(f"{who}: {sizes[r]}")
                r = e + 1
            text += f", drafts per round at width {width}: {', '.join(runs)} (rounds of one draft, such as the first anchor call: {one})"
        return text + ")"

    def close(self) -> None:
        """Destroy the gloo side group this executor made (never the user's group). Safe to call twice."""
        if self._own_control and not self._closed:
            try:
                dist.destroy_process_group(self._control)
            except Exception:  # pragma: no cover - best effort on teardown
                pass
        self._closed = True
        self._broken = self._broken or "the executor was closed"

    # ------------------------------------------------------------------------------------- evaluate

    def evaluate(
        self,
        predictor: Predictor,
        xs: torch.Tensor,
        ts: torch.Tensor,
        cond: Optional[Mapping[str, Any]] = None,
    ) -> torch.Tensor:
        """:meth:`Executor.evaluate` with the K drafts shared out over the ranks (each rank calls the predictor
        once per draft of its share, on its device), gathered on every rank; a rank that fails or dies is named
        on every rank."""
        try:
            return self._evaluate(predictor, xs, ts, cond)
        except BaseException as e:
            self._interrupted(e)
            raise

    def _interrupted(self, e: BaseException) -> None:
        """A KeyboardInterrupt or SystemExit (not an Exception) leaving evaluate or finish: this rank may have
        left an exchange half done, so the executor refuses further use with a clear error. On a subgroup,
        this executor's errors say which global ranks the group's rank numbers are."""
        if (self._rank_legend and isinstance(e, DriffusionError) and e.args and isinstance(e.args[0], str)
                and self._rank_legend not in e.args[0]):
            e.args = (e.args[0] + self._rank_legend,) + e.args[1:]
        if not isinstance(e, Exception) and self._broken is None:
            self._broken = f"{type(e).__name__} interrupted round {self._round} on rank {self.rank}"

    def _refuse_if_unusable(self) -> None:
        if not dist.is_initialized():
            raise ExecutorError(
                f"DistributedExecutor (rank {self.rank}): the torch.distributed process group was destroyed "
                f"(destroy_process_group); make the group and a new DistributedExecutor to evaluate more rounds."
            )
        if self._closed:
            raise ExecutorError(
                f"DistributedExecutor (rank {self.rank}): the executor was closed (by close()); make a new "
                f"DistributedExecutor to evaluate more rounds."
            )
        if self._broken is not None:
            raise ExecutorError(
                f"DistributedExecutor (rank {self.rank}): an earlier round failed ({self._broken}); the process "
                f"group cannot be trusted any more. End the job and relaunch it."
            )

    def _evaluate(self, predictor, xs, ts, cond) -> torch.Tensor:
        self._refuse_if_unusable()
        check_round_args(type(self).__name__, xs, ts, cond)
        k = xs.shape[0]
        cond = dict(cond or {})
        self._round += 1
        self._max_k = max(self._max_k, k)

        sizes = self.shares(k)
        offsets = _offsets(sizes)
        most = max(sizes)
        # Each rank evaluates its share. A one-draft round (the first anchor, conservative mode's anchor
        # calls) is made by every rank itself with anchor="local" (only the status travels, with a CRC of
        # the prediction that every rank checks), and is rank 0's with anchor="shared" (its prediction is
        # gathered like any other, so every rank continues from the same bits even when the model is not bit
        # for bit reproducible across ranks: cudnn autotuning, nondeterministic kernels).
        local = k == 1 and self.anchor == "local"
        start, mine = (0, 1) if local else (offsets[self.rank], sizes[self.rank])

        # 1. this rank's drafts, one call per draft (as the serial executor does)
        began = time.monotonic()
        out, code, message, cause = self._compute(predictor, xs, ts, cond, start, mine)
        self._share_seconds = time.monotonic() - began

        # 2. the status header (and, with gloo, the predictions in the same all-gather). Every all-gather
        #    has a size all ranks agree on from earlier collective information only (the agreed row and
        #    capacity), never from this rank's own inputs, so diverging ranks still exchange equal buffers
        #    and get the clear error of step 3 instead of a backend abort.
        agreed_row, cap = self._agreed_row, self._cap
        if local:
            fits = True  # nothing to send: every rank has the prediction
        elif out is None:
            fits = code == _OK  # nothing to send (or it failed: the status says so)
        else:
            fits = (
                agreed_row is not None and mine <= cap
                and (tuple(out.shape[1:]), out.dtype) == agreed_row
            )
        header = self._header(code, k, xs, ts, cond, out, fits)
        if local and out is not None:
            header[_F_OCRC] = zlib.crc32(_to_bytes(out.detach().cpu()).numpy())
            w = float64_values(out)
            sums = torch.stack([w.sum(), w.abs().sum()]).cpu()
            header[_F_OSUM : _F_OABS + 1] = sums.view(torch.int64)
        if self._fused:
            buf = self._fused_buffer(header)
            if out is not None and fits and not local:
                payload = _to_bytes(out.detach().to("cpu"))
                buf[_HEADER_BYTES : _HEADER_BYTES + payload.numel()] = payload
            what = "status and predictions" if cap else "status"
            chunks = self._all_gather(buf, self._control, what=what, fault=cause)
            headers = [c[:_HEADER_BYTES].view(torch.int64) for c in chunks]
        else:
            chunks = None
            headers = self._all_gather(header, self._control, what="status", fault=cause)

        # 3. errors, then consistency (so from here on every rank has the same k, shapes and dtypes),
        #    then the predictions in draft order
        self._check_phase(headers, finishing=False)
        self._check_status(headers, cause, code, message)
        out_shape, out_dtype = self._check_consistency(headers, sizes)
        self._agree(out_shape, out_dtype, most)
        # every rank warns in the same round, after the exchange: a warning turned into an error (-W error)
        # then fails all ranks together instead of stranding the others at the next exchange
        if self._warned_grad is not True and any(int(h[_F_GRAD]) == 1 for h in headers):
            self._warned_grad = True
            warnings.warn(
                f"DistributedExecutor (rank {self.rank}): the predictions require grad (the model's parameters do, "
                f"and sampling is not under torch.no_grad()), but they travel between the processes as bytes: the "
                f"sample carries no gradient to the parameters, and each call builds an autograd graph that is "
                f"never used. Sample under torch.no_grad() (or torch.inference_mode()); take gradients with "
                f"SerialExecutor or BatchedExecutor. (Warned once per executor.)",
                stacklevel=3,
            )
        if local:
            self._check_same_anchor(headers)
            return out.to(xs.device)
        if chunks is not None and all(int(h[_F_FITS]) for h in headers):
            return _assemble(chunks, _HEADER_BYTES, sizes, *agreed_row).to(xs.device)

        # the first round of a new kind of output (gloo), or the nccl data path; sized from the headers
        row_bytes = _numel(out_shape) * _item_size(out_dtype)
        buf = torch.zeros(most * row_bytes, dtype=torch.uint8, device=self._comm_device)
        if out is not None:
            payload = _to_bytes(out.detach().to(self._comm_device))
            buf[: payload.numel()] = payload
        group = self.group
        chunks = self._all_gather(buf, group, what="predictions", fault=None, bounded=not self._nccl)
        return _assemble(chunks, 0, sizes, tuple(out_shape), out_dtype).to(xs.device)

    def _fused_buffer(self, header: torch.Tensor) -> torch.Tensor:
        """A fused exchange's buffer: the header, then room for the agreed capacity of prediction rows (the
        size every rank agreed, from gathered headers only, so all ranks' buffers are equal)."""
        agreed_row = self._agreed_row
        row_bytes = _numel(agreed_row[0]) * _item_size(agreed_row[1]) if agreed_row is not None else 0
        buf = torch.zeros(_HEADER_BYTES + self._cap * row_bytes, dtype=torch.uint8)
        buf[:_HEADER_BYTES] = header.view(torch.uint8)
        return buf

    def finish(self, x: torch.Tensor) -> None:
        """Check that every rank ended sampling with the same sample (called by the samplers once, with the
        final sample; every rank must call it, as it calls evaluate).

        The last refinement step is no round's input, so ranks whose grids or schedules differ only in it
        (the last step's ``t_to``, ``final_alpha_cumprod``) would otherwise return different samples without
        an error. One all-gather of the final state's value sums (sum(x), sum(|x|), the position-weighted
        sum), sized as the next round's exchange would be and compared by the rule for a round's states.
        A rank that is not finishing (it evaluates another round) makes every rank raise "out of step";
        a failed exchange is bounded and diagnosed as in a round.

        Raises:
            ExecutorError: the final samples differ (naming the ranks), the ranks are out of step, the
                exchange failed, or the executor is closed or broken.
        """
        try:
            self._finish(x)
        except BaseException as e:
            self._interrupted(e)
            raise

    def _finish(self, x: torch.Tensor) -> None:
        self._refuse_if_unusable()
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(f"DistributedExecutor.finish: x must be a tensor, got {type(x).__name__}.")
        self._round += 1
        self._share_seconds = 0.0
        header = self._header(_FINISH, 0, x.detach().unsqueeze(0), None, {}, None, True)
        where = f"exchange after round {self._round - 1} (the final check; waiting at most {self.timeout:g}s)"
        if self._fused:  # the size every rank agreed for its next fused exchange (a peer may be in a round)
            chunks = self._all_gather(self._fused_buffer(header), self._control, what="final sample", where=where)
            headers = [c[:_HEADER_BYTES].view(torch.int64) for c in chunks]
        else:
            headers = self._all_gather(header, self._control, what="final sample", where=where)
        self._check_phase(headers, finishing=True)
        lists = [h.tolist() for h in headers]
        ref = lists[0]
        if any(h[_F_ROUND] != ref[_F_ROUND] for h in lists):
            self._broken = "the ranks were out of step"
            listing = "; ".join(f"rank {r}: after round {h[_F_ROUND] - 1}" for r, h in enumerate(lists))
            raise ExecutorError(
                f"DistributedExecutor: the ranks finished sampling out of step ({listing}). Every rank must run "
                "the same sampler on the same inputs and call finish once per sample."
            )
        def desc(h):
            return f"{_dims(h, _F_XDIMS + 1, min(int(h[_F_XNDIM]), _MAXD) - 1)} {_dtype_name(int(h[_F_XDTYPE]))}"
        if any(h[_F_XNDIM] != ref[_F_XNDIM] or h[_F_XDTYPE] != ref[_F_XDTYPE]
               or h[_F_XDIMS:_F_ODIMS] != ref[_F_XDIMS:_F_ODIMS] for h in lists):
            self._broken = "the ranks' final samples differed"
            listing = "; ".join(f"rank {r}: {desc(h)}" for r, h in enumerate(lists))
            raise ExecutorError(
                f"DistributedExecutor: the ranks' final samples differ in shape or dtype after round "
                f"{ref[_F_ROUND] - 1} ({listing}). Every rank must run the same sampler on the same inputs."
            )
        _, differ, listing = _state_sums(headers, lists)
        if differ:
            self._broken = "the ranks' final samples differed"
            raise ExecutorError(
                f"DistributedExecutor: the final sample of rank{'s' if len(differ) > 1 else ''} "
                f"{', '.join(map(str, differ))} differs from rank 0's after round {ref[_F_ROUND] - 1} ({listing}), "
                "although every round's inputs agreed. The likely cause: a time grid or schedule that differs "
                "only in its last step (the last t_to, e.g. the grid's step_to; final_alpha_cumprod or "
                "set_alpha_to_one), which no round's inputs show. Every rank must build the same scheduler."
            )

    def _check_phase(self, headers, finishing: bool) -> None:
        """Every rank in a round, or every rank finishing: otherwise every rank raises "out of step"
        (before any further exchange, so no rank is left waiting)."""
        done = [r for r, h in enumerate(headers) if int(h[_F_CODE]) == _FINISH]
        if not done or len(done) == len(headers):
            return
        self._broken = "the ranks were out of step"
        busy = [r for r in range(len(headers)) if r not in done]
        raise ExecutorError(
            f"DistributedExecutor: the ranks are out of step ({'finishing' if finishing else 'in round'} "
            f"{self._round if not finishing else f'after round {self._round - 1}'} on rank {self.rank}): "
            f"rank{'s' if len(done) > 1 else ''} {', '.join(map(str, done))} finished sampling (called finish "
            f"with the final sample) while rank{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} "
            "evaluated another round. Every rank must run the same sampler on the same time grid (the same "
            "number of steps, width and mode) and the same inputs."
        )

    # -------------------------------------------------------------------------------------- plumbing

    def _compute(self, predictor, xs, ts, cond, start, mine):
        """This rank's drafts ``start .. start + mine``: (stacked output on the exchange's device or None, code,
        message, cause). Nothing here raises: every failure is reported in the status header, so all ranks
        learn about it in this round."""
        if torch.is_grad_enabled() and any(v.requires_grad for v in (xs, *iter_tensors(cond))):
            return None, _NEEDS_GRAD, (
                "x (or a conditioning tensor) requires grad, but the predictions travel between the processes as "
                "bytes, which carry no gradient: the sample's gradient would leave out every model call. Sample "
                "under torch.no_grad() (or detach x), or take gradients with SerialExecutor or BatchedExecutor, "
                "which keep the graph"
            ), None
        if not mine:
            return None, _OK, "", None
        dev = self.device
        x_part = xs[start : start + mine]
        t_part = ts[start : start + mine].clone()  # its own: a model may rescale t in place (not the header's ts)
        c = cond
        if dev is not None:
            try:
                x_part, t_part = x_part.to(dev), t_part.to(dev)
                c = map_tensors(lambda v: v.to(dev), cond)
            except Exception as e:  # reported to every rank
                return None, _MOVE_FAILED, f"could not move the round's inputs to {dev}: {exception_text(e)}", e
        # in-place writes into the inputs, seen here so that every rank learns of them in this round (the
        # sampler's own check would raise on this rank only, after the exchange)
        x_version, c_versions = input_version(x_part, c)
        try:  # each output copied as it comes (the model may reuse one output buffer); unlike ones: a list
            got = stack_calls(lambda j: predictor(x_part[j], t_part[j], **c), mine)
        except PredictorOutputError as e:  # a wrapper's check of the model's output (reparameterize: its shape)
            return None, _BAD_OUTPUT, exception_text(e), e
        except Exception as e:  # reported to every rank
            return None, _RAISED, exception_text(e), e
        except BaseException as e:  # KeyboardInterrupt, SystemExit: reported to every rank, then re-raised here
            return None, _INTERRUPTED, exception_text(e), e
        if stamp_changed(x_part, x_version):
            return None, _BAD_OUTPUT, (
                "the predictor modified its input x in place; the sampler still needs that state. Work on a copy "
                "inside the model (e.g. x = x.clone() before an in-place op)"
            ), None
        touched = changed_tensor(c_versions)
        if touched is not None:
            return None, _BAD_OUTPUT, (
                f"the predictor modified the conditioning tensor {touched} in place; every later call would see "
                f"the changed value. Work on a copy inside the model (clone the tensor before an in-place op)"
            ), None
        outs = got if isinstance(got, list) else [got[0]]
        bad = [o for o in outs if not isinstance(o, torch.Tensor)]
        if bad:
            hint = not_a_tensor_hint(bad[0])
            text = f"the predictor returned {type(bad[0]).__name__}, not a Tensor" + ("." + hint if hint else "")
            return None, _BAD_OUTPUT, text, None
        # the model's parameters require grad and the sampler runs with grad on (an output that requires grad
        # only because the predictor enabled grad inside itself, for guidance, is its own business)
        if outs[0].requires_grad and torch.is_grad_enabled() and self._warned_grad is False:
            self._warned_grad = None  # pending: the header says so, and every rank warns after the exchange
        sparse = next((not_dense(o) for o in outs if not_dense(o)), "")
        if sparse:
            return None, _BAD_OUTPUT, f"the predictor returned {sparse}; {DENSE_FIX}", None
        if len({(tuple(o.shape), o.dtype, o.device) for o in outs}) > 1:
            message = "the predictor returned predictions of different shapes, dtypes or devices: " + ", ".join(
                f"{tuple(o.shape)} {o.dtype} on {o.device}" for o in outs
            )
            return None, _BAD_OUTPUT, message, None
        if outs[0].device != x_part.device:  # moved for the exchange, it would come back hiding the model's bug
            return None, _BAD_OUTPUT, (
                f"the predictor returned predictions on {outs[0].device}, but its input x is on {x_part.device}; "
                f"return the prediction on the input's device (the serial executor refuses it too)"
            ), None
        if outs[0].dim() + 1 > _MAXD:
            return None, _BAD_OUTPUT, f"predictions with {outs[0].dim()} dimensions are not supported", None
        if outs[0].dtype not in _DTYPES:
            return None, _BAD_OUTPUT, f"predictions of dtype {outs[0].dtype} are not supported", None
        try:
            out = (torch.stack(outs) if isinstance(got, list) else got).detach().to(self._comm_device)
        except Exception as e:  # e.g. predictions on the meta device, or a copy that runs out of memory
            return None, _BAD_OUTPUT, (
                f"the predictions ({outs[0].dtype} on {outs[0].device}) could not be stacked and copied to "
                f"{self._comm_device} for the exchange: {exception_text(e)}"
            ), e
        return out, _OK, "", None

    def _check_same_anchor(self, headers) -> None:
        """After a one-draft round that every rank evaluated itself (anchor="local"): every rank raises if
        the predictions differ in any bit (the ranks would go on from different states)."""
        crcs = [int(h[_F_OCRC]) for h in headers]
        differ = [r for r, c in enumerate(crcs) if c != crcs[0]]
        if differ:
            sums = [h[_F_OSUM : _F_OABS + 1].view(torch.float64).tolist() for h in headers]
            scale = max(max(abs(a) for _, a in sums), 1e-300)
            spread = max(abs(s - sums[0][0]) for s, _ in sums) / scale
            finite = all(math.isfinite(s) and math.isfinite(a) for s, a in sums)
            if finite and spread > _MODELS_DIFFER_RTOL:
                raise ExecutorError(
                    f"DistributedExecutor: in round {self._round}, a one-draft round that every rank evaluated "
                    f"itself (anchor='local'), the predictions of the ranks differ far beyond rounding (the sums "
                    f"{', '.join(f'rank {r}: {s:.9g}' for r, (s, _) in enumerate(sums))} differ by {spread:.2g} of "
                    f"the sum of |prediction|): the ranks run different models. Load the same weights on every "
                    f"rank (seed before building the model, or load one checkpoint; put it in eval mode), and give "
                    f"every rank the same conditioning and model options."
                )
            raise ExecutorError(
                f"DistributedExecutor: in round {self._round}, a one-draft round that every rank evaluated itself "
                f"(anchor='local'), the prediction of rank{'s' if len(differ) > 1 else ''} "
                f"{', '.join(map(str, differ))} differs from rank 0's in its bits (CRC-32 "
                f"{', '.join(f'rank {r}: {c:08x}' for r, c in enumerate(crcs))}): the model is not bit for bit "
                "reproducible across the ranks (cudnn autotuning, nondeterministic kernels, different hardware or "
                "thread counts), so the ranks would drift apart. Use DistributedExecutor(anchor='shared'), which "
                "computes one-draft rounds on rank 0 and shares the prediction, or make the model deterministic "
                "(torch.use_deterministic_algorithms(True), torch.backends.cudnn.benchmark = False)."
            )

    def _agree(self, out_shape, out_dtype, most: int) -> None:
        """Update the agreed row and capacity from a round whose headers all agreed (so every rank
        computes the same values: they come from the gathered headers, not from local inputs)."""
        row = (tuple(int(d) for d in out_shape), out_dtype)
        if row != self._agreed_row:
            self._agreed_row, self._cap = row, most
        else:
            self._cap = max(self._cap, most)

    def _header(self, code, k, xs, ts, cond, out, fits) -> torch.Tensor:
        h = [-1] * _HEADER_LEN  # built as a list, made a tensor once (element writes cost microseconds each)
        h[_F_CODE] = code
        h[_F_ROUND] = self._round
        h[_F_K] = k
        xd = min(xs.dim(), _MAXD)
        h[_F_XNDIM] = xs.dim()
        h[_F_XDTYPE] = _dtype_code(xs.dtype)
        h[_F_XDEV] = _device_code(xs.device)
        h[_F_TDTYPE] = _dtype_code(ts.dtype) if ts is not None else -1
        h[_F_COND] = _cond_signature(cond)
        h[_F_XSUM : _F_TMIX + 1], h[_F_CLOG] = _value_sums(xs, cond, ts)
        h[_F_XDIMS : _F_XDIMS + xd] = list(xs.shape[:xd])
        h[_F_HASOUT] = 0 if out is None else 1
        h[_F_FITS] = 1 if fits else 0
        h[_F_GRAD] = 1 if self._warned_grad is None else 0
        if out is not None:
            h[_F_ONDIM] = out.dim()
            h[_F_ODTYPE] = _dtype_code(out.dtype)
            h[_F_ODIMS : _F_ODIMS + out.dim()] = list(out.shape)
        return torch.tensor(h, dtype=torch.int64)

    def _check_status(self, headers, cause, code, message) -> None:
        failed = [r for r, h in enumerate(headers) if int(h[_F_CODE]) != _OK]
        if not failed:
            return
        # Everyone learns what went wrong where (a second small all-gather, only on failure).
        texts = self._gather_text(message if code != _OK else "", what="error messages")
        detail = "; ".join(f"rank {r}: {texts[r] or 'failed'}" for r in failed)
        codes = {int(headers[r][_F_CODE]) for r in failed}
        interrupted = [r for r in failed if int(headers[r][_F_CODE]) == _INTERRUPTED]
        if interrupted:  # that rank is going down (or its caller handles the interrupt): no rank goes on
            self._broken = (
                f"the predictor was interrupted on rank{'s' if len(interrupted) > 1 else ''} "
                f"{', '.join(map(str, interrupted))} in round {self._round}"
            )
        what = {
            _RAISED: "the predictor raised",
            _INTERRUPTED: "the predictor was interrupted (a BaseException, not an Exception)",
            _BAD_OUTPUT: "the predictor returned unusable output",
            _MOVE_FAILED: "the round's inputs could not be moved to the rank's device",
            _NEEDS_GRAD: "the round's inputs require gradients",
        }.get(next(iter(codes)), "the round failed") if len(codes) == 1 else "the round failed"
        who = ", ".join(str(r) for r in failed)
        text = (
            f"DistributedExecutor: {what} on rank{'s' if len(failed) > 1 else ''} {who} "
            f"(of {self.world_size}) in round {self._round}: {detail}"
        )
        err_type = PredictorOutputError if codes == {_BAD_OUTPUT} else ExecutorError
        if cause is not None and not isinstance(cause, Exception):
            raise cause  # this rank's KeyboardInterrupt / SystemExit goes on as itself, now that all ranks know
        if cause is not None:
            raise err_type(text) from cause
        raise err_type(text)

    def _check_consistency(self, headers, sizes) -> Tuple[Tuple[int, ...], torch.dtype]:
        def xs_desc(h):
            return (
                f"xs {_dims(h, _F_XDIMS, min(int(h[_F_XNDIM]), _MAXD))} {_dtype_name(int(h[_F_XDTYPE]))} "
                f"on {_device_name(int(h[_F_XDEV]))}, ts {_dtype_name(int(h[_F_TDTYPE]))}"
            )

        fields = [_F_ROUND, _F_K, _F_XNDIM, _F_XDTYPE, _F_XDEV, _F_TDTYPE, _F_COND]
        lists = [h.tolist() for h in headers]  # one conversion, not one per field
        ref = lists[0]
        bad = [r for r, h in enumerate(lists) if any(h[f] != ref[f] for f in fields)
               or h[_F_XDIMS:_F_ODIMS] != ref[_F_XDIMS:_F_ODIMS]]
        if bad and all(h[f] == ref[f] for h in lists for f in fields if f != _F_COND) and all(
            h[_F_XDIMS:_F_ODIMS] == ref[_F_XDIMS:_F_ODIMS] for h in lists
        ):
            self._broken = "the ranks' conditioning differed"
            listing = "; ".join(f"rank {r}: signature {int(h[_F_COND])}" for r, h in enumerate(headers))
            raise ExecutorError(
                f"DistributedExecutor: the ranks' conditioning (cond) differs in round {int(ref[_F_ROUND])} "
                f"({listing}): its names or nesting, its tensors' shapes or dtypes, or its other values (a "
                "guidance scale, a flag, a string). Every rank must pass the same conditioning, or the ranks "
                "would mix predictions made for different inputs."
            )
        if bad:
            self._broken = "the ranks were out of step"
            listing = "; ".join(
                f"rank {r}: round {int(h[_F_ROUND])}, {xs_desc(h)}, cond signature {int(h[_F_COND])}"
                for r, h in enumerate(headers)
            )
            raise ExecutorError(
                "DistributedExecutor: the ranks called evaluate with different inputs "
                f"(different shapes, dtypes, device types, conditioning or round numbers): {listing}. Every "
                "rank must run the same sampler on the same inputs (same starting state, seed, dtype and "
                "device type)."
            )
        sums, differ, listing = _state_sums(headers, lists)
        # the model times (SPMD ranks have bitwise-equal ones; the tolerance only absorbs reduction order)
        ref_t = sums[0][7:10]
        ref_t_finite = math.isfinite(ref_t[1])
        tdiffer = [
            r for r, (h, v) in enumerate(zip(lists, sums))
            if math.isfinite(v[8]) != ref_t_finite or (
                ref_t_finite and h[_F_TSUM : _F_TMIX + 1] != ref[_F_TSUM : _F_TMIX + 1]
                and _sums_differ([v[7], v[9]], [ref_t[0], ref_t[2]], ref_t[1])
            )
        ]
        if tdiffer:
            self._broken = "the ranks' model times differed"
            listing = "; ".join(
                f"rank {r}: sum {v[7]:.9g}, sum of |t| {v[8]:.9g}, weighted sum {v[9]:.9g}" for r, v in enumerate(sums)
            )
            raise ExecutorError(
                f"DistributedExecutor: the ranks' model times (ts) differ in value in round {int(ref[_F_ROUND])} "
                f"({listing}), so the gathered predictions would mix predictions made at different noise levels. "
                "Every rank must sample on the same time grid (the same schedule, number of steps, spacing and "
                "model-time mapping)" + ("; their states differ too, as drafts on other grids do." if differ else ".")
            )
        if differ:
            self._broken = "the ranks' states differed"
            raise ExecutorError(
                f"DistributedExecutor: the ranks' states differ in value in round {int(ref[_F_ROUND])} ({listing}), so "
                "their samples would differ and the gathered predictions would mix them. Every rank must start "
                "from the same x (e.g. NoiseSource(seed).initial(shape), not torch.randn on each rank) and use the "
                "same NoiseSource seed for the per-step noise."
            )
        # the conditioning's tensors, each normalised by its own sum(|c|), to _VALUE_RTOL of sum_i r_i (and a
        # rank whose sums are not finite while rank 0's are, or the other way round, differs too)
        c_vals = [[v[2], v[4], v[6], float(h[_F_CLOG : _F_CLOG + 1].clone().view(torch.float64))]
                  for h, v in zip(headers, sums)]
        ref_finite = all(math.isfinite(c) for c in c_vals[0])
        cdiffer = [
            r for r, (h, c) in enumerate(zip(lists, c_vals))
            if all(math.isfinite(e) for e in c) != ref_finite or (
                ref_finite and (h[_F_CSUM : _F_CROWS + 1], h[_F_CMIX], h[_F_CLOG])
                != (ref[_F_CSUM : _F_CROWS + 1], ref[_F_CMIX], ref[_F_CLOG])
                and _sums_differ(c, c_vals[0], sums[0][3])
            )
        ]
        if cdiffer:
            self._broken = "the ranks' conditioning differed"
            listing = "; ".join(
                f"rank {r}: sum {c[0]:.9g}, log sum of |c| {c[3]:.9g}, row-weighted sum {c[1]:.9g}, "
                f"element-weighted sum {c[2]:.9g}" for r, c in enumerate(c_vals)
            )
            raise ExecutorError(
                f"DistributedExecutor: the ranks' conditioning (cond) tensors differ in value in round "
                f"{int(ref[_F_ROUND])} ({listing}; each tensor's sums divided by its own sum of |c|, combined "
                f"over the tensors with fixed weights), so the gathered predictions would mix predictions made for "
                "different conditioning. Every rank must pass the same cond (e.g. labels from a seeded "
                "torch.Generator, not torch.randint on each rank; the same prompt embeddings)."
            )
        with_out = [(r, h) for r, h in enumerate(lists) if h[_F_HASOUT]]
        descs = {
            (_dims(h, _F_ODIMS + 1, int(h[_F_ONDIM]) - 1), int(h[_F_ODTYPE])) for _, h in with_out
        }
        if len(descs) > 1:
            listing = "; ".join(
                f"rank {r}: {_dims(h, _F_ODIMS + 1, int(h[_F_ONDIM]) - 1)} {_dtype_name(int(h[_F_ODTYPE]))}"
                for r, h in with_out
            )
            raise PredictorOutputError(
                f"DistributedExecutor: the ranks' predictions differ in shape or dtype in round {self._round} "
                f"({listing}); the predictor must return one prediction shaped like its input on every rank."
            )
        shape, dcode = next(iter(descs))
        if not 0 <= dcode < len(_DTYPES):
            raise PredictorOutputError(
                "DistributedExecutor: the predictor returned a tensor of an unsupported dtype."
            )
        return shape, _DTYPES[dcode]

    def _all_gather(self, t: torch.Tensor, group, what: str, fault=None, bounded: bool = True,
                    where: Optional[str] = None, late: str = "for its share") -> List[torch.Tensor]:
        outs = [torch.empty_like(t) for _ in range(self.world_size)]
        work = None
        began = time.monotonic()
        try:
            work = dist.all_gather(outs, t, group=group, async_op=True)
            if bounded:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
            else:
                # nccl: the stream waits, no host sync; the process group's timeout (watchdog) bounds it
                work.wait()
        except Exception as e:
            _abandon(work, t, outs)
            self._comm_failed(what, e, fault, where if where is not None else self._where(bounded),
                              waited=time.monotonic() - began, group=group, bounded=bounded, late=late)
        _retain(work, t, outs)  # the worker thread may not have let go of it yet (see _RECENT)
        return outs

    def _gather_text(self, text: str, what: str, bounded: bool = True, where: Optional[str] = None,
                     late: str = "for its share") -> List[str]:
        raw = text.encode("utf-8", errors="replace")[: _MSG_BYTES - 4]
        buf = torch.zeros(_MSG_BYTES, dtype=torch.uint8)
        buf[:4] = torch.tensor(list(len(raw).to_bytes(4, "little")), dtype=torch.uint8)
        if raw:
            buf[4 : 4 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        chunks = self._all_gather(buf, self._control, what=what, bounded=bounded, where=where, late=late)
        texts = []
        for c in chunks:
            n = int.from_bytes(bytes(c[:4].tolist()), "little")
            texts.append(bytes(c[4 : 4 + min(n, _MSG_BYTES - 4)].tolist()).decode("utf-8", errors="replace"))
        return texts

    def _where(self, bounded: bool = True) -> str:
        """The phrase after "could not complete the <what> " for an exchange of the current round."""
        bound = f"waiting at most {self.timeout:g}s" if bounded else "bounded by the process group's timeout"
        return f"exchange of round {self._round} ({bound})"

    def _comm_failed(self, what: str, error: BaseException, fault, where: Optional[str] = None,
                     waited: float = 0.0, group: Any = None, bounded: bool = True,
                     late: str = "for its share") -> None:
        """Raise the ExecutorError of a failed exchange of ``group`` (after ``waited`` seconds), naming the bound
        that ended the wait and, where the connections are still there, the ranks that did not answer."""
        self._broken = f"the {what} exchange failed"
        where = where if where is not None else self._where()
        pg = self._group_timeout if group is self._control else _group_timeout(group)
        # Did the process group's own timeout end the wait? gloo says so in its error ("Timed out waiting
        # <ms>ms for recv operation to complete"), and then drops every connection of this process, so the
        # check of who still answers (_diagnose) would find every peer missing. A peer whose own timeout fired
        # first drops its connections too: this rank then sees them close after about that long.
        text = safe_str(error)
        m = _GLOO_TIMEOUT.search(text)
        fired = int(m.group(1)) / 1000.0 if m else None
        if (fired is not None and bounded and abs(fired - self.timeout) < 1e-3
                and (pg is None or abs(fired - pg) >= 1e-3)):
            fired = None  # this executor's own bound, not the process group's
        own = bounded and waited >= 0.999 * self.timeout
        pg_here = fired is not None
        pg_peer = (not pg_here and not own and pg is not None and (not bounded or pg < self.timeout)
                   and waited >= 0.8 * pg)
        pg_value = pg if pg is not None else fired
        share_bound = min(pg, self.timeout) if pg is not None else self.timeout
        slow_rank = self._share_seconds > share_bound
        shorter = f", shorter than this executor's timeout = {self.timeout:g}s" if bounded and pg_value is not None \
            and pg_value < self.timeout else ""
        if pg_here or pg_peer:
            if pg_here:
                first = (f"The process group's own timeout ({pg_value:g}s{shorter}) ended this wait, and gloo then "
                         f"drops every connection of this process")
            else:
                first = (f"This rank's connections closed after {waited:.3g}s of waiting, about the process group's "
                         f"own timeout ({pg:g}s{shorter}): it probably ended another rank's wait, and gloo then "
                         f"drops every connection of that process")
            diagnosis = (first + ", so no check of which ranks still answer was made (a rank whose connections were "
                         "dropped looks dead, healthy or not).")
        else:
            # the setup exchange (the only one before round 1) measures no share: a peer may have given up on us
            diagnosis = self._diagnosis_text(self._diagnose(), slow_rank, setup=self._round == 0, pg=pg)
        local = ""
        if fault is not None:
            local = f" (this rank had itself failed in this round: {exception_text(fault)})"
        slow = ""
        if slow_rank:
            if pg is not None and pg < self.timeout:
                than = f"the process group's own timeout ({pg:g}s, below this executor's timeout = {self.timeout:g}s)"
                fix = ("Give the process group and the executor timeouts above one share's model calls "
                       "(init_from_env(timeout=...), DistributedExecutor(timeout=...)).")
            else:
                than = f"timeout = {self.timeout:g}s"
                fix = "Give a timeout above one share's model calls."
            slow = (f" This rank's own share of the round took {self._share_seconds:.3g}s, more than {than}: the "
                    f"other ranks probably stopped waiting for it. {fix}")
        if pg_here or pg_peer or slow_rank:  # named just before
            bound = "that timeout"
        elif pg_value is not None and (not bounded or pg_value < self.timeout):
            first_ = ", so it ends every wait first" if shorter else ""
            bound = f"the process group's own timeout ({pg_value:g}s{shorter}{first_})"
        elif not bounded:
            bound = "the process group's own timeout"
        else:
            bound = f"timeout = {self.timeout:g}s"
        raise ExecutorError(
            f"DistributedExecutor: rank {self.rank} (of {self.world_size}) could not complete the {what} "
            f"{where}: {type(error).__name__}: "
            f"{_first_line(text)}. {diagnosis}{local}{slow} A rank probably died, hung, fell out of step "
            f"or took longer than {bound} {late}; check the other ranks' logs, then relaunch the job."
        ) from error

    def _diagnosis_text(self, result: Optional[Tuple[bool, List[int]]], slow: bool, setup: bool = False,
                        pg: Optional[float] = None) -> str:
        """The sentence on :meth:`_diagnose`'s ``result``. ``slow``: this rank's own share outlasted the bound, so
        the others had probably stopped waiting for it, and their silence says nothing about them; ``setup``: the
        constructor's exchange (``pg``: the process group's timeout, which bounds it), where this rank may have
        come too late just the same."""
        if result is None:
            return ""
        rank0_answered, missing = result
        if not rank0_answered:
            if slow:
                return ("Rank 0, which checks who is alive, did not answer either (it had probably stopped waiting "
                        "for this rank already).")
            if setup:
                within = f", {pg:g}s" if pg is not None else ""
                return ("Rank 0, which checks who is alive, did not answer: it died or hangs, or it had already "
                        f"stopped waiting for this rank (this exchange waits at most the process group's own "
                        f"timeout{within}).")
            return "Rank 0, which checks who is alive, did not answer: rank 0 probably died or hangs."
        if not missing:
            return "Every rank answered a check afterwards, so a rank fell out of step rather than died."
        seen = "" if self.rank == 0 else " (seen by rank 0)"
        after = " (they had probably stopped waiting for this rank already)" if slow else ""
        return f"Ranks that did not answer{seen}: {', '.join(map(str, missing))}{after}."

    def _diagnose(self) -> Optional[Tuple[bool, List[int]]]:
        """Find out which ranks still answer (best effort, at most ``diagnose_timeout`` seconds and a little).

        Returns ``(True, missing)``: the ranks that did not answer rank 0's check (as rank 0 saw it);
        ``(False, [])`` on a rank other than 0 when rank 0 did not answer; None when there is no check
        (``diagnose_timeout=0``, a closed executor).

        Like ``monitored_barrier(wait_all_ranks=True)``, but a peer whose connection is already gone
        counts as missing instead of aborting the check: rank 0 waits for a hello from every rank and
        sends each one that answered the list of the missing. Rank 0 waits for hellos at most half of
        ``diagnose_timeout``, then sends its verdict within the rest; the other ranks wait for it the full
        ``diagnose_timeout``. (Were rank 0 to wait the full budget for a hung rank's hello, the healthy
        ranks would give up on its verdict at the same moment and wrongly blame rank 0.)

        A gloo receive that times out drops all of the process's connections, so the verdict could no
        longer reach the ranks that did answer: rank 0 awaits each hello in a helper thread whose wait ends
        at the check's deadline, after the verdict went out, and joins the threads before returning. So
        no thread is left blocked in gloo (one woken there during interpreter shutdown aborts the process:
        "terminate called without an active exception"); when a rank did not answer, rank 0's check takes
        the whole ``diagnose_timeout``, and its timed-out receive then drops this process's connections
        (the group is broken anyway): the abandoned exchange fails at once on every rank instead of
        completing later with a rank that arrives late.
        """
        if self.diagnose_timeout <= 0 or self._closed:
            return None
        now = time.monotonic()
        deadline = now + self.diagnose_timeout
        hello_deadline = now + self.diagnose_timeout / 2
        group = self._control

        def left(until: Optional[float] = None) -> datetime.timedelta:
            return datetime.timedelta(seconds=max(0.01, (deadline if until is None else until) - time.monotonic()))

        def peer(r: int) -> int:
            return r if group is None else dist.get_global_rank(group, r)

        verdict = torch.full((self.world_size + 1,), -1, dtype=torch.int64)
        if self.rank == 0:
            hellos = {r: torch.zeros(1, dtype=torch.int64) for r in range(1, self.world_size)}
            works, missing = {}, []
            for r, buf in hellos.items():
                try:
                    works[r] = dist.irecv(buf, src=peer(r), group=group, tag=_PROBE_TAG)
                except Exception:
                    missing.append(r)
            answered: dict = {}

            def await_hello(r: int, w: Any) -> None:
                try:
                    w.wait(timeout=left())  # ends by the deadline, when the verdict is out
                    answered[r] = True
                except Exception:
                    answered[r] = False

            helpers = []
            for r, w in works.items():
                _abandon(w, hellos[r])  # kept alive: the receive stays posted in gloo
                helper = threading.Thread(target=await_hello, args=(r, w), daemon=True,
                                          name=f"driffusion-diagnose-{r}")
                helper.start()
                helpers.append(helper)
            while time.monotonic() < hello_deadline and len(answered) < len(works):
                time.sleep(0.005)
            seen = dict(answered)  # a hello after hello_deadline does not count
            missing.extend(r for r in works if not seen.get(r, False))
            missing.sort()
            verdict[0] = len(missing)
            verdict[1 : 1 + len(missing)] = torch.tensor(missing, dtype=torch.int64)
            for r in hellos:
                if r not in missing:
                    w = None
                    try:
                        w = dist.isend(verdict, dst=peer(r), group=group, tag=_PROBE_TAG + 1)
                        w.wait(timeout=left())
                        _retain(w, verdict)
                    except Exception:
                        _abandon(w, verdict)
            for helper in helpers:  # each wait ends by the deadline; the margin only guards against a stuck backend
                helper.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
            return True, missing
        hello, w = torch.tensor([self.rank], dtype=torch.int64), None
        try:
            w = dist.isend(hello, dst=peer(0), group=group, tag=_PROBE_TAG)
            w.wait(timeout=left())
            _retain(w, hello)
            w = dist.irecv(verdict, src=peer(0), group=group, tag=_PROBE_TAG + 1)
            w.wait(timeout=left())
            _retain(w, verdict)
        except Exception:
            _abandon(w, hello, verdict)
            return False, []
        return True, [int(r) for r in verdict[1 : 1 + int(verdict[0])].tolist()]

"""StreamExecutor: several CUDA streams / GPUs reproduce the serial executor; without CUDA it says so."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backends import SerialExecutor, StreamExecutor  # noqa: E402
from driffusion_core.errors import DeviceMismatchError, ExecutorError, InvalidArgumentError  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False")


def _predictor(x, t, scale=None):
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    y = torch.sin(1.3 * x + 0.01 * tt) + 0.1 * x * x
    if scale is not None:
        y = y * scale.reshape(-1, *([1] * (x.dim() - 1)))
    return y


def test_without_cuda_construction_explains(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExecutorError, match="CUDA") as info:
        StreamExecutor()
    assert "BatchedExecutor" in str(info.value)


def _device_lists():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lists = [["cuda:0"], ["cuda:0", "cuda:0"], ["cuda:0", "cuda:0", "cuda:0"]]
    if n >= 2:
        lists += [[f"cuda:{i}" for i in range(n)], ["cuda:1", "cuda:0", "cuda:1"]]
    return lists


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("devices", _device_lists(), ids=lambda d: "+".join(d))
@pytest.mark.parametrize("anchor", ["cuda:0", "cpu"])
def test_streams_equal_serial(devices, anchor):
    ex = StreamExecutor(devices=devices)
    serial = SerialExecutor()
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 3, 5, 8):
        xs = torch.randn(k, 4, 3, 8, generator=g).to(anchor)
        ts = torch.randint(0, 1000, (k, 4), generator=g).float().to(anchor)
        cond = {"scale": torch.rand(4, generator=g).to(anchor)}
        got = ex.evaluate(_predictor, xs, ts, cond)
        ref = serial.evaluate(_predictor, xs, ts, cond)
        assert got.device == xs.device and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert ex.shares(5) == [len(r) for r in _split(5, len(devices))]
    assert f"drafts per stream at width 5: {ex.shares(5)}" in ex.describe(5)


def _split(k, n):
    base, extra = divmod(k, n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


@pytest.mark.gpu
@needs_cuda
def test_module_replicas_equal_serial():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.SiLU(), torch.nn.Linear(256, 16)).cuda()

    class Model(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x) * (t[:, None] / 1000)

    model = Model(net)
    n = torch.cuda.device_count()
    devices = [f"cuda:{i}" for i in range(n)] + ["cuda:0"]
    ex = StreamExecutor.from_module(model, devices=devices)
    xs = torch.randn(7, 5, 16, device="cuda:0")
    ts = torch.rand(7, 5, device="cuda:0") * 1000
    with torch.no_grad():
        got = ex.evaluate(model, xs, ts)
        ref = SerialExecutor().evaluate(model, xs, ts)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    if n >= 2:  # one module cannot serve two GPUs: the error says how to give replicas
        with pytest.raises(InvalidArgumentError, match="replica"):
            StreamExecutor(devices=["cuda:0", "cuda:1"]).evaluate(model, xs, ts)


@pytest.mark.gpu
@needs_cuda
def test_predictor_error_is_wrapped():
    ex = StreamExecutor(devices=["cuda:0", "cuda:0"])

    def bad(x, t):
        raise ValueError("boom")

    with pytest.raises(ExecutorError, match="ValueError: boom"):
        ex.evaluate(bad, torch.zeros(2, 3, 4, device="cuda:0"), torch.zeros(2, 3, device="cuda:0"))


@pytest.mark.gpu
@needs_cuda
def test_sampling_end_to_end_equals_serial():
    core = pytest.importorskip("driffusion_core")
    solvers = pytest.importorskip("solvers")
    schedule = core.VPSchedule.linear()
    predictor = solvers.ring_mixture(4).predictor(schedule, "epsilon")
    for transition in (solvers.DDIMSkip(schedule), solvers.DDPMSkip(schedule)):
        sched = core.DraftRefineScheduler(transition, schedule.timesteps(12), width=3, mode="aggressive")
        x = core.NoiseSource(1).initial((6, 2)).cuda()
        got = sched.sample(predictor, x, executor=StreamExecutor(devices=["cuda:0"] * 3), noise=core.NoiseSource(2))
        ref = sched.sample(predictor, x, executor=SerialExecutor(), noise=core.NoiseSource(2))
        torch.testing.assert_close(got.x, ref.x, rtol=1e-5, atol=1e-6)
        assert got.rounds == ref.rounds


@pytest.mark.gpu
@needs_cuda
def test_a_prediction_on_another_device_is_named():
    ex = StreamExecutor(devices=["cuda:0"])
    xs, ts = torch.zeros(2, 3, 4, device="cuda:0"), torch.zeros(2, 3, device="cuda:0")
    with pytest.raises(DeviceMismatchError, match=r"returned a tensor on cpu for draft 0, which ran on cuda:0"):
        ex.evaluate(lambda x, t: x.cpu(), xs, ts)


@pytest.mark.gpu
@needs_cuda
def test_after_an_error_the_inputs_stream_waits_for_the_streams_already_launched():
    """Stream 0 is still busy (a long GPU sleep) when the predictor raises on stream 1: work queued next on the
    inputs' stream must wait for stream 0 (which still reads the inputs)."""
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not available")
    ex = StreamExecutor(devices=["cuda:0", "cuda:0"])
    xs, ts = torch.zeros(2, 3, 4, device="cuda:0"), torch.zeros(2, 3, device="cuda:0")
    torch.cuda.synchronize()

    def busy_then_raise(x, t):
        if torch.cuda.current_stream() == ex.streams[0]:
            torch.cuda._sleep(int(2e9))  # queued on stream 0
            return x
        raise ValueError("boom on stream 1")

    with pytest.raises(ExecutorError, match="stream 1"):
        ex.evaluate(busy_then_raise, xs, ts)
    after = torch.cuda.Event()
    after.record(torch.cuda.current_stream())
    assert not after.query(), "the inputs' stream did not wait for stream 0"
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_cuda
def test_a_reused_output_buffer_gives_each_draft_its_own_prediction():
    """A replica that returns one buffer on every call (a CUDA graph's static output): every stream's drafts
    are copied as they come, so the round equals the fresh outputs'."""
    bufs = {}

    def static(x, t):  # one buffer per stream (two streams on one GPU must not share one: their writes would race)
        buf = bufs.setdefault(torch.cuda.current_stream(x.device).stream_id, torch.empty_like(x))
        return buf.copy_(_predictor(x, t))

    ex = StreamExecutor(devices=["cuda:0", "cuda:0"])
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(5, 4, 3, generator=g).cuda()
    ts = torch.randint(0, 1000, (5, 4), generator=g).float().cuda()
    torch.testing.assert_close(ex.evaluate(static, xs, ts), SerialExecutor().evaluate(_predictor, xs, ts), rtol=1e-5, atol=1e-6)


def test_the_device_check_finds_a_module_behind_a_wrapper():
    """The check that a predictor's module lives on the stream's device (runs on the CPU): the module is
    found bare, behind a lambda's closure, a bound method and a functools.partial, not only as itself."""
    import functools

    from backends.streams import _module_device

    net = torch.nn.Linear(2, 2, device="meta")
    buffers_only = torch.nn.BatchNorm1d(2, affine=False, device="meta")
    assert _module_device(net) == torch.device("meta")
    assert _module_device(lambda x, t: net(x)) == torch.device("meta")
    assert _module_device(net.forward) == torch.device("meta")
    assert _module_device(functools.partial(lambda m, x, t: m(x), net)) == torch.device("meta")
    assert _module_device(lambda x, t: buffers_only(x)) == torch.device("meta")
    assert _module_device(_predictor) is None
    assert _module_device(lambda x, t: torch.nn.Identity()(x)) is None  # no parameters or buffers: no device


# --------------------------------------------------------------------------- how a round is shared out (CPU)


def _cpu_executor(n_streams):
    """A StreamExecutor shell with ``n_streams`` streams, made without CUDA: ``shares`` only counts the streams."""
    ex = StreamExecutor.__new__(StreamExecutor)
    ex.streams = [object()] * n_streams
    return ex


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_share_slices_cover_every_draft_once_in_order(n):
    """The slices evaluate launches (``_share_slices(self.shares(k))``), for rounds of 0..13 drafts on n streams:
    checked against a plain draft-by-draft assignment, not against even_shares' own formula. Every draft
    runs exactly once, the slices are contiguous and in draft order on streams in stream order, the share
    sizes differ by at most one with the larger shares first, and streams left without work get no slice."""
    from backends.streams import _share_slices

    for k in range(14):
        slices = _share_slices(_cpu_executor(n).shares(k))
        owner = [i for i, start, stop in slices for _ in range(start, stop)]
        assert len(owner) == k
        drafts = [d for _, start, stop in slices for d in range(start, stop)]
        assert drafts == list(range(k)), (k, n, slices)  # each draft once, contiguous, in draft order
        assert owner == sorted(owner)  # streams take the drafts in stream order
        assert all(stop > start for _, start, stop in slices)  # no empty slice is launched
        sizes = [stop - start for _, start, stop in slices]
        assert [i for i, _, _ in slices] == list(range(min(k, n)))  # the first min(k, n) streams work
        if sizes:
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            # as even as possible: ceil(k / n) drafts on the busiest stream, and no stream idle while another has two
            assert max(sizes) == -(-k // n)


def test_share_slices_skip_empty_shares_anywhere():
    """A share of 0 drafts (the last streams of a short round, or any stream) gets no slice and moves no later
    share: the next stream starts where the last one with work stopped."""
    from backends.streams import _share_slices

    assert _share_slices([]) == []
    assert _share_slices([0, 0]) == []
    assert _share_slices([1, 0, 0]) == [(0, 0, 1)]
    assert _share_slices([3, 2]) == [(0, 0, 3), (1, 3, 5)]
    assert _share_slices([2, 0, 3, 0, 1]) == [(0, 0, 2), (2, 2, 5), (4, 5, 6)]
    assert _share_slices([0, 4]) == [(1, 0, 4)]


def test_share_slices_reassemble_a_round():
    """Slicing a round's states by the shares and concatenating the slices in stream order gives the round back
    (what evaluate's gather relies on), also for more streams than drafts."""
    from backends.streams import _share_slices

    for n in (1, 2, 3, 5):
        for k in (1, 2, 4, 6):
            xs = torch.arange(k * 3, dtype=torch.float32).reshape(k, 3)
            parts = [xs[start:stop] for _, start, stop in _share_slices(_cpu_executor(n).shares(k))]
            assert torch.equal(torch.cat(parts), xs)

"""The draft-and-refine scheduler against the serial sampler, its round counts, and the executors.

* Width 1 reproduces ``sample_serial`` exactly (``torch.equal``, same dtype, CPU) in both modes, for
  DDIM (eta = 0 and eta > 0), DDPM and flow, in float32, float64, float16 and bfloat16, on contiguous and
  non-contiguous (diffusers DDIM ``step_to="stride"``) grids, with any executor.
* ``rounds == 1 + ceil((T-1)/n)`` (aggressive) and ``2 ceil(T/(n+1)) - [T mod (n+1) == 1]``
  (conservative), ``evals == T``, counted by a predictor that records its own calls; every level
  is evaluated exactly once and none past t_{T-1}.
* Every executor gives the SerialExecutor's result, with conditioning.
* The trajectory has T+1 states; ``progress=True`` works.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import BatchedExecutor, SerialExecutor, per_sample
from driffusion_core import DraftRefineScheduler, FlowSchedule, NoiseSource, VPSchedule
from solvers import DDIMSkip, DDPMSkip, FlowEulerSkip, coarse_indices, ring_mixture, sample_serial

from _metrics import one_torch_thread  # noqa: F401  (autouse fixture)

MODES = ["aggressive", "conservative"]


def aggressive_rounds(T: int, n: int) -> int:
    return 1 + math.ceil((T - 1) / n)


def conservative_rounds(T: int, n: int) -> int:
    return 2 * math.ceil(T / (n + 1)) - (1 if T % (n + 1) == 1 else 0)


ROUNDS = {"aggressive": aggressive_rounds, "conservative": conservative_rounds}


# --------------------------------------------------------------------------- the sampler set-ups

VP = VPSchedule.linear()
FLOW = FlowSchedule(shift=3.0)

# (id, transition, grid, prediction, noise): each family on contiguous and non-contiguous grids
SETUPS = [
    ("ddim_eta0-leading-next", DDIMSkip(VP), VP.timesteps(8, "leading"), "epsilon", None),
    ("ddim_eta0-trailing-stride", DDIMSkip(VP), VP.timesteps(7, "trailing", step_to="stride"), "epsilon", None),
    ("ddim_eta0.5-linspace-stride", DDIMSkip(VP, eta=0.5), VP.timesteps(7, "linspace", step_to="stride"), "epsilon", NoiseSource(11)),
    ("ddim_eta1-v-trailing-next", DDIMSkip(VP, "v_prediction", eta=1.0), VP.timesteps(9, "trailing"), "v_prediction", NoiseSource(12)),
    ("ddpm_small-leading-next", DDPMSkip(VP), VP.timesteps(9, "leading"), "epsilon", NoiseSource(13)),
    ("ddpm_large-sample-trailing-stride", DDPMSkip(VP, "sample", "fixed_large"), VP.timesteps(7, "trailing", step_to="stride"), "sample", NoiseSource(14, per_sample=True)),
    ("flow_euler", FlowEulerSkip(FLOW), FLOW.timesteps(8), "velocity", None),
]
SETUP_PARAMS = [pytest.param(*s[1:], id=s[0]) for s in SETUPS]


def test_setups_cover_non_contiguous_grids():
    """The 'stride' grids above really are non-contiguous (t_to[i] != t_from[i+1] somewhere)."""
    assert not VP.timesteps(7, "trailing", step_to="stride").is_contiguous
    assert not VP.timesteps(7, "linspace", step_to="stride").is_contiguous
    assert VP.timesteps(8, "leading").is_contiguous


@pytest.mark.parametrize("transition,grid,prediction,noise", SETUP_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_width_one_reproduces_sample_serial_exactly(transition, grid, prediction, noise, dtype, mode):
    f = ring_mixture().predictor(transition.schedule, prediction)
    x = NoiseSource(0).initial((5, 2), dtype)
    ser = sample_serial(f, x, transition, grid, noise=noise, return_trajectory=True)
    for executor in (None, SerialExecutor(), BatchedExecutor()):
        out = DraftRefineScheduler(transition, grid, width=1, mode=mode).sample(
            f, x, executor=executor, noise=noise, return_trajectory=True
        )
        assert out.x.dtype == dtype
        assert torch.equal(out.x, ser.x), f"width 1 ({mode}, {executor}) differs from sample_serial"
        assert len(out.trajectory) == len(grid) + 1
        assert all(torch.equal(a, b) for a, b in zip(out.trajectory, ser.trajectory))
        assert out.evals == len(grid)


def test_stochastic_samplers_depend_on_the_noise_source():
    """Sanity for the test above: a different NoiseSource changes a DDPM sample, so equal noise matters."""
    tr, grid = DDPMSkip(VP), VP.timesteps(6)
    f = ring_mixture().predictor(VP)
    x = NoiseSource(0).initial((5, 2))
    a = DraftRefineScheduler(tr, grid, width=1).sample(f, x, noise=NoiseSource(1)).x
    b = DraftRefineScheduler(tr, grid, width=1).sample(f, x, noise=NoiseSource(2)).x
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("per_sample", [False, True])
def test_noise_is_the_same_in_every_floating_dtype(per_sample):
    """NoiseSource draws in float32 and casts: float64 noise is the float32 noise exactly (torch draws
    float64 normals along another path), half and bfloat16 are its rounding; so a float64 DDPM run is the
    float32 run in higher precision, not another sample."""
    src = NoiseSource(4, per_sample=per_sample)
    for shape in [(3,), (40, 2), (5, 3, 8)]:
        ref = src(7, shape)
        assert torch.equal(src(7, shape, torch.float64), ref.double())
        for low in (torch.float16, torch.bfloat16):
            assert torch.equal(src(7, shape, low), ref.to(low))
    tr, grid, f = DDPMSkip(VP), VP.timesteps(20), ring_mixture().predictor(VP)
    x = src.initial((64, 2))
    lo = sample_serial(f, x, tr, grid, noise=NoiseSource(9)).x
    hi = sample_serial(f, x.double(), tr, grid, noise=NoiseSource(9)).x
    other = sample_serial(f, x, tr, grid, noise=NoiseSource(10)).x
    assert (hi.float() - lo).pow(2).mean().sqrt() < 1e-3 * (other - lo).pow(2).mean().sqrt()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: NoiseSource(1.5), r"NoiseSource\(seed\) takes an int .*got float 1\.5"),
        (lambda: NoiseSource(None), r"takes an int .*got NoneType"),
        (lambda: NoiseSource(True), r"got the bool True; for per-sample noise write NoiseSource\(seed, per_sample=True\)"),
        (lambda: NoiseSource(0).initial((2, 3), torch.long), r"dtype must be a floating dtype .*torch\.int64"),
        (lambda: NoiseSource(0).initial("ab"), r"shape must be a sequence of ints"),
        (lambda: NoiseSource(0)(3, (2, -1)), r"shape \(2, -1\) has a negative dimension"),
        (lambda: NoiseSource(0, per_sample=True)(3, ()), r"per_sample=True\) needs a batch dimension"),
    ],
)
def test_noise_source_refuses_bad_arguments(make, match):
    from driffusion_core.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=match):
        make()


def test_noise_source_takes_torch_style_shapes_and_seeds():
    import numpy as np

    assert torch.equal(NoiseSource(0).initial(5), NoiseSource(0).initial((5,)))
    assert torch.equal(NoiseSource(np.int64(3))(1, torch.Size([4, 2])), NoiseSource(3)(1, [4, 2]))
    assert NoiseSource(2, per_sample=True)(0, (0, 3)).shape == (0, 3)


# --------------------------------------------------------------------------- rounds and evals


class RecordingPredictor:
    """A predictor that records every call: its rows and the model times it was called with."""

    def __init__(self):
        self.calls: List[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        assert x.shape[0] == t.shape[0]
        self.calls.append(t.clone())
        return 0.1 * x + 0.01 * t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    @property
    def rows(self) -> int:
        return sum(int(t.shape[0]) for t in self.calls)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), n=st.integers(1, 48), mode=st.sampled_from(MODES))
def test_rounds_and_evals_counted_by_the_predictor(T, n, mode):
    """One batched call per round: calls == rounds == the closed form; rows == T * B; one call per
    level with the serial executor; every level exactly once, none past t_{T-1}."""
    B = 2
    grid = VP.timesteps(T, "trailing")
    tr = DDIMSkip(VP)
    x = torch.randn(B, 3, generator=torch.Generator().manual_seed(T * 100 + n))
    expected = ROUNDS[mode](T, n)

    batched = RecordingPredictor()
    out = DraftRefineScheduler(tr, grid, width=n, mode=mode).sample(batched, x, executor=BatchedExecutor())
    assert out.rounds == expected == len(batched.calls), f"T={T}, n={n}, {mode}"
    assert out.evals == T and batched.rows == T * B

    serial = RecordingPredictor()
    out_s = DraftRefineScheduler(tr, grid, width=n, mode=mode).sample(serial, x, executor=SerialExecutor())
    assert out_s.rounds == expected and out_s.evals == T
    assert len(serial.calls) == T and all(t.shape[0] == B and bool((t == t[0]).all()) for t in serial.calls)
    levels = sorted(float(t[0]) for t in serial.calls)
    assert levels == sorted(grid.model_times.tolist()), "each level must be evaluated exactly once"
    assert min(levels) >= float(grid.model_times[-1]), "evaluated past t_{T-1}"
    # the batched rows are the same multiset of levels, B rows each
    batched_levels = sorted(torch.cat(batched.calls).tolist())
    assert batched_levels == sorted(grid.model_times.repeat_interleave(B).tolist())
    assert torch.allclose(out.x, out_s.x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "T,n,mode,rounds",
    [
        (1, 1, "aggressive", 1),
        (1, 4, "conservative", 1),
        (5, 4, "conservative", 2),  # one iteration: anchor call, then 4 drafts
        (6, 4, "conservative", 3),  # 6 = 5 + 1: the last iteration is only the anchor's exact call
        (51, 4, "conservative", 21),
        (10, 20, "aggressive", 2),
        (50, 4, "aggressive", 14),
        (50, 4, "conservative", 20),
    ],
)
def test_round_counts_at_the_edges(T, n, mode, rounds):
    """Hand-checked cases (n > T, T = 1, the anchor-only last conservative iteration)."""
    assert ROUNDS[mode](T, n) == rounds
    sched = DraftRefineScheduler(DDIMSkip(VP), VP.timesteps(T), width=n, mode=mode)
    rec = RecordingPredictor()
    out = sched.sample(rec, torch.ones(1, 2), executor=BatchedExecutor())
    assert out.rounds == len(rec.calls) == rounds == sched.expected_rounds()
    assert out.evals == rec.rows == T


# --------------------------------------------------------------------------- executors


def conditioned_predictor(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A vmap-compatible nonlinear predictor that uses a per-row conditioning tensor ``c``."""
    return torch.tanh(1.3 * x + c) * (0.5 + t.to(x.dtype)[:, None] / 1000) * scale


EXECUTORS = [
    pytest.param(BatchedExecutor(), id="concat"),
    pytest.param(BatchedExecutor(vmap=True), id="vmap"),
    pytest.param(BatchedExecutor(max_batch=3), id="max_batch=B"),
    pytest.param(BatchedExecutor(max_batch=7), id="max_batch=2B+1"),
    pytest.param(BatchedExecutor(max_batch=2), id="max_batch<B"),
]


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "transition,noise",
    [
        pytest.param(DDIMSkip(VP), None, id="ddim"),
        pytest.param(DDPMSkip(VP), NoiseSource(4), id="ddpm"),
    ],
)
def test_every_executor_gives_the_serial_executors_result(executor, mode, transition, noise):
    B, T = 3, 12
    grid = VP.timesteps(T, "trailing")
    x = NoiseSource(1).initial((B, 2))
    c = torch.randn(B, 2, generator=torch.Generator().manual_seed(5))
    cond = {"c": c, "scale": 0.7}
    sched = DraftRefineScheduler(transition, grid, width=4, mode=mode)
    ref = sched.sample(conditioned_predictor, x, executor=SerialExecutor(), noise=noise, cond=cond)
    out = sched.sample(conditioned_predictor, x, executor=executor, noise=noise, cond=cond)
    assert out.x.dtype == ref.x.dtype and (out.rounds, out.evals) == (ref.rounds, ref.evals)
    torch.testing.assert_close(out.x, ref.x, rtol=1e-5, atol=1e-6)
    # the conditioning reaches the predictor row by row: other rows' cond changes the result
    other = sched.sample(conditioned_predictor, x, executor=executor, noise=noise, cond={"c": c.flip(0), "scale": 0.7})
    assert not torch.allclose(other.x, out.x)


def nested_predictor(x, t, extra, scale=1.0):
    """Conditioning nested as diffusers' added_cond_kwargs: a dict of per-row tensors, and a list."""
    return torch.tanh(x * extra["w"] + extra["pair"][1]) * (0.5 + t.to(x.dtype)[:, None] / 1000) * scale


@pytest.mark.parametrize("executor", EXECUTORS)
def test_nested_conditioning_reaches_every_executor_row_by_row(executor):
    B, T = 3, 9
    gen = torch.Generator().manual_seed(2)
    x = NoiseSource(1).initial((B, 2))
    cond = {"extra": {"w": torch.rand(B, 2, generator=gen) + 0.5, "pair": [torch.tensor(1.0), torch.randn(B, 2, generator=gen)]},
            "scale": 0.8}
    sched = DraftRefineScheduler(DDIMSkip(VP), VP.timesteps(T, "trailing"), width=3)
    ref = sched.sample(nested_predictor, x, executor=SerialExecutor(), cond=cond)
    out = sched.sample(nested_predictor, x, executor=executor, cond=cond)
    torch.testing.assert_close(out.x, ref.x, rtol=1e-5, atol=1e-6)
    flipped = {"extra": {"w": cond["extra"]["w"], "pair": [torch.tensor(1.0), cond["extra"]["pair"][1].flip(0)]}, "scale": 0.8}
    assert not torch.allclose(sched.sample(nested_predictor, x, executor=executor, cond=flipped).x, out.x)


def single_sample_predictor(x, t, c, scale=1.0, offset=0):
    """Written for ONE sample: x is [D], t is 0-d, c is [D] (a batch would break the dot product)."""
    return torch.tanh(x * torch.dot(x, c) + c + offset) * (0.5 + t.to(x.dtype) / 1000) * scale


@pytest.mark.parametrize("executor", [SerialExecutor(), BatchedExecutor(), BatchedExecutor(vmap=True), BatchedExecutor(max_batch=2)])
def test_per_sample_turns_a_single_sample_predictor_into_a_batch_one(executor):
    B = 3
    x = NoiseSource(3).initial((B, 4))
    c = torch.randn(B, 4, generator=torch.Generator().manual_seed(7))
    f = per_sample(single_sample_predictor)
    t = torch.tensor([900, 500, 100])
    loop = torch.stack([single_sample_predictor(x[b], t[b], c[b], scale=0.5) for b in range(B)])
    torch.testing.assert_close(f(x, t, c=c, scale=0.5), loop)
    torch.testing.assert_close(f(x, t, c=c, scale=0.5, offset=0), loop)  # a plain 0 is not a batch dimension
    torch.testing.assert_close(f(x, t, c=c, scale=torch.tensor(0.5)), loop)  # nor is a 0-d tensor: passed whole
    # conditioning nested in a Mapping that is not a dict (diffusers' FrozenDict is an OrderedDict)
    from collections import OrderedDict

    class Frozen(OrderedDict):
        pass

    nested = per_sample(lambda x, t, extra: single_sample_predictor(x, t, extra["c"], scale=0.5))
    torch.testing.assert_close(nested(x, t, extra=Frozen(c=c)), loop)
    sched = DraftRefineScheduler(DDIMSkip(VP), VP.timesteps(10, "trailing"), width=4)
    ref = sample_serial(f, x, DDIMSkip(VP), VP.timesteps(10, "trailing"), cond={"c": c, "scale": 0.5})
    wide = sched.sample(f, x, executor=executor, cond={"c": c, "scale": 0.5})
    one = DraftRefineScheduler(DDIMSkip(VP), VP.timesteps(10, "trailing"), width=1).sample(f, x, executor=executor, cond={"c": c, "scale": 0.5})
    torch.testing.assert_close(one.x, ref.x, rtol=1e-5, atol=1e-6)
    assert wide.rounds == sched.expected_rounds() and torch.isfinite(wide.x).all()
    torch.testing.assert_close(wide.x, sched.sample(f, x, executor=SerialExecutor(), cond={"c": c, "scale": 0.5}).x, rtol=1e-5, atol=1e-6)


ALL_EXECUTORS = [pytest.param(SerialExecutor(), id="serial")] + EXECUTORS


@pytest.mark.parametrize("executor", ALL_EXECUTORS)
def test_per_sample_takes_a_torch_size_in_the_conditioning(executor):
    """A tuple subclass that is not a namedtuple (torch.Size) is a value, passed whole to every row."""
    xs, ts = torch.randn(2, 3, 4), torch.rand(2, 3) * 1000

    def g(x, t, size, flag):
        return x * size[0] + t.to(x.dtype) / 1000

    cond = {"size": torch.Size([2, 3]), "flag": True}
    ref = SerialExecutor().evaluate(lambda x, t, size, flag: torch.stack([g(x[b], t[b], size, flag) for b in range(3)]),
                                    xs, ts, cond)
    torch.testing.assert_close(executor.evaluate(per_sample(g), xs, ts, cond), ref)


class AttributeDict(dict):
    """A mapping read by attribute, like diffusers' FrozenDict / BaseOutput: ``extra.w``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            object.__setattr__(self, key, value)


def attribute_predictor(x, t, extra, scale=1.0):
    return torch.tanh(x * extra.w + extra.pair[1]) * (0.5 + t.to(x.dtype)[:, None] / 1000) * scale


@pytest.mark.parametrize("executor", EXECUTORS)
def test_nested_mappings_keep_their_type_in_every_executor(executor):
    """A predictor reading its nested conditioning by attribute works under every executor as under the
    serial one (the executors rebuild a nested mapping as its own type, not as a plain dict)."""
    from collections import OrderedDict

    gen = torch.Generator().manual_seed(3)
    x = NoiseSource(1).initial((3, 2))
    extra = AttributeDict(w=torch.rand(3, 2, generator=gen) + 0.5, pair=[torch.tensor(1.0), torch.randn(3, 2, generator=gen)])
    sched = DraftRefineScheduler(DDIMSkip(VP), VP.timesteps(9, "trailing"), width=3)
    ref = sched.sample(attribute_predictor, x, executor=SerialExecutor(), cond={"extra": extra, "scale": 0.8})
    out = sched.sample(attribute_predictor, x, executor=executor, cond={"extra": extra, "scale": 0.8})
    torch.testing.assert_close(out.x, ref.x, rtol=1e-5, atol=1e-6)
    ordered = OrderedDict(a=torch.ones(3, 1), b=2.0)
    kinds = []
    executor.evaluate(lambda x, t, od: kinds.append(type(od)) or x, torch.zeros(2, 3, 1), torch.zeros(2, 3), {"od": ordered})
    assert kinds and set(kinds) == {OrderedDict}


@dataclasses.dataclass(frozen=True)
class TextCond:
    """Conditioning as a (frozen) dataclass: per-row tensors, a shared number, and a field its
    ``__post_init__`` derives (the executors copy the instance without running it again)."""

    emb: torch.Tensor
    pair: tuple
    scale: float = 1.0
    doubled: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "doubled", 2 * self.emb)


def dataclass_predictor(x, t, text):
    return torch.tanh(x * text.emb + text.pair[1] - 0.5 * text.doubled) * (0.5 + t.to(x.dtype)[:, None] / 1000) * text.scale


@pytest.mark.parametrize("executor", EXECUTORS)
def test_dataclass_conditioning_reaches_every_executor_row_by_row(executor):
    """A dataclass in the conditioning is a container like a dict: its tensors are repeated and sliced with the
    rows (a field set in __post_init__ too), so every executor gives what the serial one gives; rows swapped
    inside it change the result (each row reaches its own sample)."""
    B = 3
    gen = torch.Generator().manual_seed(5)
    x = NoiseSource(1).initial((B, 2))
    text = TextCond(torch.rand(B, 2, generator=gen) + 0.5, (torch.tensor(1.0), torch.randn(B, 2, generator=gen)), 0.8)
    sched = DraftRefineScheduler(DDIMSkip(VP), VP.timesteps(9, "trailing"), width=3)
    ref = sched.sample(dataclass_predictor, x, executor=SerialExecutor(), cond={"text": text})
    out = sched.sample(dataclass_predictor, x, executor=executor, cond={"text": text})
    torch.testing.assert_close(out.x, ref.x, rtol=1e-5, atol=1e-6)
    swapped = TextCond(text.emb, (text.pair[0], text.pair[1].flip(0)), 0.8)
    assert not torch.allclose(sched.sample(dataclass_predictor, x, executor=executor, cond={"text": swapped}).x, out.x)
    seen = []
    executor.evaluate(lambda x, t, text: seen.append(text) or x, torch.zeros(2, B, 2), torch.zeros(2, B), {"text": text})
    assert seen and all(type(c) is TextCond and c.scale == 0.8 for c in seen)
    assert text.emb.shape == (B, 2) and torch.equal(text.doubled, 2 * text.emb)  # the caller's instance untouched


def single_sample_dataclass(x, t, text):
    assert x.dim() == 1 and text.emb.dim() == 1 and text.pair[1].dim() == 1, "per_sample must pass one row"
    return single_sample_predictor(x, t, text.emb + text.pair[1] - 0.5 * text.doubled, scale=text.scale)


def test_per_sample_hands_each_row_its_row_of_a_dataclass():
    """per_sample looks into a dataclass as into a dict: f sees the instance, each tensor field one row (a
    dataclass is not a torch.func pytree, so vmap by itself would pass it whole)."""
    B = 3
    gen = torch.Generator().manual_seed(6)
    x = NoiseSource(2).initial((B, 4))
    text = TextCond(torch.randn(B, 4, generator=gen), (0.0, torch.randn(B, 4, generator=gen)), 0.5)
    t = torch.tensor([900, 500, 100])
    loop = torch.stack([single_sample_predictor(x[b], t[b], text.emb[b] + text.pair[1][b] - text.emb[b], scale=0.5)
                        for b in range(B)])
    torch.testing.assert_close(per_sample(single_sample_dataclass)(x, t, text=text), loop)
    sched = DraftRefineScheduler(DDIMSkip(VP), VP.timesteps(8, "trailing"), width=3)
    f = per_sample(single_sample_dataclass)
    ref = sched.sample(f, x, executor=SerialExecutor(), cond={"text": text})
    for executor in (BatchedExecutor(), BatchedExecutor(vmap=True), BatchedExecutor(max_batch=2)):
        torch.testing.assert_close(sched.sample(f, x, executor=executor, cond={"text": text}).x, ref.x,
                                   rtol=1e-5, atol=1e-6)


class Holder:
    """An object that is no container the executors look into."""

    def __init__(self, emb):
        self.emb = emb


def test_a_per_sample_tensor_held_by_a_plain_object_is_refused():
    """A plain object holding a tensor with one row per sample cannot be repeated or sliced by the executors
    (BatchedExecutor's call would get B rows of it for K * B rows of x): refused up front with the ways out,
    naming the tensor. A dataclass field with the wrong number of rows is named like a dict entry; a shared
    tensor held by an object (rows != B), or B = 1, is passed as it is, as before."""
    from driffusion_core.errors import InvalidArgumentError

    x = NoiseSource(1).initial((3, 2))
    sched = DraftRefineScheduler(DDIMSkip(VP), VP.timesteps(6, "trailing"), width=2)
    f = lambda x, t, h: x * 0.1 + h.emb[: x.shape[0]]  # noqa: E731
    with pytest.raises(InvalidArgumentError, match=r"cond\['h'\]\.emb is a tensor of shape \(3, 2\).*dataclass.*functools\.partial"):
        sched.sample(f, x, cond={"h": Holder(torch.ones(3, 2))})
    with pytest.raises(InvalidArgumentError, match=r"cond\['h'\]\[0\]\.emb is a tensor"):
        sample_serial(f, x, DDIMSkip(VP), VP.timesteps(6), cond={"h": [Holder(torch.ones(3, 2))]})
    with pytest.raises(InvalidArgumentError, match=r"cond\['text'\]\.emb has leading dimension 2, but x has batch size 3"):
        sched.sample(dataclass_predictor, x, cond={"text": TextCond(torch.ones(2, 2), (0.0, torch.zeros(3, 2)))})
    shared = Holder(torch.ones(5, 2))
    g = lambda x, t, h: x * 0.1 + h.emb[:1]  # noqa: E731
    torch.testing.assert_close(sched.sample(g, x, cond={"h": shared}).x,
                               sched.sample(g, x, executor=SerialExecutor(), cond={"h": shared}).x)
    one = x[:1]
    torch.testing.assert_close(sched.sample(f, one, cond={"h": Holder(torch.ones(1, 2))}).x,
                               sched.sample(f, one, executor=SerialExecutor(), cond={"h": Holder(torch.ones(1, 2))}).x)


@pytest.mark.parametrize("wrap", ["executor", "per_sample"])
def test_random_ops_under_vmap_are_explained(wrap):
    """A predictor that draws random numbers (dropout left in training mode) cannot run under vmap; the error
    says so and how to fix it, not that the control flow is to blame."""
    def noisy(x, t):
        return torch.nn.functional.dropout(x, 0.5, training=True)

    xs, ts = torch.randn(2, 3, 2), torch.zeros(2, 3)
    with pytest.raises(RuntimeError) as info:
        if wrap == "executor":
            BatchedExecutor(vmap=True).evaluate(noisy, xs, ts)
        else:
            SerialExecutor().evaluate(per_sample(noisy), xs, ts)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "random" in notes and "model.eval()" in notes and "control flow" not in notes, notes


def test_executor_receives_the_rounds_states_and_times():
    """SerialExecutor.evaluate is f mapped over K (state, time) pairs, in order."""
    xs = torch.randn(4, 3, 2)
    ts = torch.arange(4).repeat_interleave(3).reshape(4, 3) * 100
    c = torch.randn(3, 2)
    out = SerialExecutor().evaluate(conditioned_predictor, xs, ts, {"c": c})
    for k in range(4):
        assert torch.equal(out[k], conditioned_predictor(xs[k], ts[k], c))
    torch.testing.assert_close(BatchedExecutor().evaluate(conditioned_predictor, xs, ts, {"c": c}), out)


# --------------------------------------------------------------------------- trajectory and progress


@pytest.mark.parametrize("mode", MODES)
def test_trajectory_has_T_plus_one_states_and_progress_works(mode, capsys):
    T = 11
    tr, grid = DDPMSkip(VP), VP.timesteps(T)
    f = ring_mixture().predictor(VP)
    x = NoiseSource(0).initial((4, 2))
    sched = DraftRefineScheduler(tr, grid, width=3, mode=mode)
    out = sched.sample(f, x, noise=NoiseSource(2), return_trajectory=True, progress=True)
    shown = [seg for seg in capsys.readouterr().err.split("\r") if seg.strip()]
    assert shown and f"{T}/{T}" in shown[-1], shown[-1:]  # the finished bar stays on screen
    assert len(out.trajectory) == T + 1
    assert torch.equal(out.trajectory[0], x) and torch.equal(out.trajectory[-1], out.x)
    quiet = sched.sample(f, x, noise=NoiseSource(2))
    assert torch.equal(quiet.x, out.x) and quiet.trajectory is None
    ser = sample_serial(f, x, tr, grid, noise=NoiseSource(2), progress=True, return_trajectory=True)
    assert len(ser.trajectory) == T + 1 and torch.equal(ser.trajectory[-1], ser.x)


@pytest.mark.parametrize("steps_left", [1, 3])
def test_state_handed_a_prediction_finishes_without_an_extra_call(steps_left):
    """A DraftRefineState given its anchor's prediction (as PicardScheduler's fallback does) makes no
    call for it; with one step left it finishes in plan() with the serial step."""
    from driffusion_core import DraftRefineState

    schedule = VPSchedule.linear()
    tr, f = DDPMSkip(schedule), ring_mixture().predictor(schedule, "epsilon")
    grid = schedule.timesteps(10).sub(10 - steps_left, 10)
    x = NoiseSource(0).initial((8, 2), torch.float64)
    ref = sample_serial(f, x, tr, grid, noise=NoiseSource(4))
    st = DraftRefineState(tr, grid, 1, "aggressive", x, NoiseSource(4))  # width 1: the serial chain
    st.pred = f(x, grid.model_times[0].expand(8))
    calls = 0
    while (rnd := st.plan()) is not None:
        preds = torch.stack([f(xk, grid.model_times[s].expand(8)) for xk, s in zip(rnd.xs, rnd.steps)])
        calls += len(rnd.steps)
        st.absorb(rnd, preds)
    assert calls == steps_left - 1
    assert torch.equal(st.x, ref.x)


def test_initial_noise_is_its_own_key_not_a_steps_noise():
    """initial() is the noise of key -1: independent of every step's z_i (x_T equal to z_0 would correlate the
    starting state with the first step's noise)."""
    for src in (NoiseSource(6), NoiseSource(6, per_sample=True)):
        x = src.initial((4, 3))
        assert torch.equal(x, src(-1, (4, 3)))
        assert not any(torch.allclose(x, src(i, (4, 3))) for i in range(10))


@pytest.mark.parametrize("T,n", [(1, 3), (7, 1), (10, 3), (12, 4), (9, 20)])
@pytest.mark.parametrize("mode", MODES)
def test_drafts_per_round_are_the_draft_rounds_calls(T, n, mode):
    """info['drafts_per_round'] lists the drafts of each draft round, in order: the batched draft calls' row
    counts / B (the anchor calls, the first and, conservative, every other one, are not listed)."""
    B = 2
    rec = RecordingPredictor()
    out = DraftRefineScheduler(DDIMSkip(VP), VP.timesteps(T), width=n, mode=mode).sample(
        rec, torch.ones(B, 2), executor=BatchedExecutor()
    )
    draft_calls = rec.calls[1:] if mode == "aggressive" else rec.calls[1::2]
    assert out.info["drafts_per_round"] == [int(t.shape[0]) // B for t in draft_calls]
    assert sum(out.info["drafts_per_round"]) + out.rounds - len(draft_calls) == T


def test_default_noise_is_a_fresh_seed_from_torchs_global_rng():
    """noise=None: a stochastic sampler draws its NoiseSource seed from torch's global RNG, so two calls give
    two samples and torch.manual_seed makes a call reproducible."""
    tr, grid, f = DDPMSkip(VP), VP.timesteps(6), ring_mixture().predictor(VP)
    x = NoiseSource(0).initial((5, 2))
    sched = DraftRefineScheduler(tr, grid, width=2)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        a, b = sched.sample(f, x).x, sched.sample(f, x).x
        torch.manual_seed(3)
        c = sched.sample(f, x).x
    assert torch.equal(a, c) and not torch.allclose(a, b)


def test_per_sample_noise_rows_are_distinct_and_keyed_by_row():
    """per_sample=True: row b of step i is drawn from its own key (seed, i, b): the rows of a batch are
    distinct draws, and a row is the same whatever the batch size around it."""
    src = NoiseSource(6, per_sample=True)
    for i in (-1, 0, 5):
        z = src(i, (5, 4))
        assert all(not torch.allclose(z[a], z[b]) for a in range(5) for b in range(a + 1, 5))
        assert torch.equal(z[:3], src(i, (3, 4)))


# ---------------------------------------------------------------- the wide-window warning


@pytest.mark.parametrize("steps, width, warns", [
    (50, 4, False), (50, 9, False), (50, 10, True), (10, 1, False), (10, 2, True), (20, 3, False), (20, 4, True),
    (13, 4, True), (1, 1, False), (3, 1, False), (15, 3, True), (4, 9, True), (2, 4, False), (1, 3, False),
])
def test_a_window_reaching_far_along_a_short_grid_warns(steps, width, warns):
    """The reach min(width, T - 1) (a window drafts at most T - 1 levels ahead) over T of 0.2 or more warns
    (WideWindowWarning, naming width, T, the reach and how to silence it); a reach of one level (the serial
    step itself: width 1, or T <= 2) never does."""
    import warnings

    from driffusion_core import WideWindowWarning

    schedule = VPSchedule.linear(1000)
    grid = schedule.timesteps(steps, "trailing")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sched = DraftRefineScheduler(DDIMSkip(schedule), grid, width=width)
    wide = [w for w in seen if issubclass(w.category, WideWindowWarning)]
    assert len(wide) == (1 if warns else 0), [str(w.message) for w in seen]
    if warns:
        text = str(wide[0].message)
        assert f"width {width} on a grid of {steps} steps" in text and "PicardScheduler" in text
        reach = min(width, steps - 1)  # a window drafts at most T - 1 levels ahead
        assert f"up to {reach} levels, {reach / steps:.2f} of the grid" in text, text
        assert (f"capped at T - 1 = {reach}" in text) == (reach < width), text
        assert "simplefilter('ignore', driffusion_core.WideWindowWarning)" in text
        assert wide[0].filename == __file__  # points at the caller's line, not the library's
    assert sched.width == width  # a warning, not a refusal: the scheduler is made


def test_the_wide_window_warning_reaches_k_diffusion_users():
    from driffusion_core import WideWindowWarning
    from solvers import sample_driffusion

    sigmas = torch.linspace(10.0, 0.0, 9)
    with pytest.warns(WideWindowWarning, match="width 4 on a grid of 8 steps"):
        sample_driffusion(lambda x, s: 0.5 * x, torch.randn(2, 3), sigmas, width=4)


@pytest.mark.parametrize("executor, returns", [
    pytest.param(ex.values[0], returns, id=f"{ex.id}-{returns}")
    for ex in [pytest.param(SerialExecutor(), id="serial")] + EXECUTORS for returns in ("x", "cond", "buffer")
    if not (ex.id == "vmap" and returns == "buffer")  # vmap cannot write a batched value into an unbatched buffer
])
def test_every_executor_hands_back_predictions_in_memory_of_their_own(executor, returns):
    """The Executor contract: the predictions share no memory with the inputs, the conditioning or the
    predictor's own output buffer (which its next call may overwrite), so a caller may write into them.
    Predictors returning x itself (an identity model), a conditioning tensor, or one buffer they keep."""
    buffer = {}

    def predictor(x, t, c):
        if returns == "x":
            return x
        if returns == "cond":
            return c
        out = buffer.setdefault(tuple(x.shape), torch.empty_like(x))
        return out.copy_(x * 2)

    xs = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    ts = torch.zeros(3, 4)
    c = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    want = {"x": xs, "cond": c.expand(3, 4, 2), "buffer": xs * 2}[returns].clone()
    out = executor.evaluate(predictor, xs, ts, {"c": c})
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    mine = [xs, c] + list(buffer.values())
    assert not any(out.untyped_storage().data_ptr() == m.untyped_storage().data_ptr() for m in mine)


def test_round_times_are_the_grids_own_and_fresh_memory_every_round():
    """The model times a round hands the executor are the grid's (also after the grid's times are edited in
    place), in memory of their own: a predictor that writes into t changes neither a later round nor a later
    sample."""
    schedule = VPSchedule.linear()
    grid = schedule.timesteps(10, "trailing")
    seen: List[List[float]] = []

    def f(x, t):
        seen.append(t.tolist())
        t.add_(1000)  # written in place: the sampler must not see it again
        return torch.tanh(x) * 0.1

    x = NoiseSource(0).initial((3, 2))
    sched = DraftRefineScheduler(DDIMSkip(schedule), grid, width=3)
    for _ in range(2):
        seen.clear()
        sched.sample(f, x, executor=BatchedExecutor())
        want = [[float(v)] * 3 for v in grid.model_times.tolist()]
        assert [row[i * 3 : i * 3 + 3] for row in seen for i in range(len(row) // 3)] == want
    grid.model_times.sub_(1)  # the grid's own times, edited in place, are what the next rounds pass
    seen.clear()
    sched.sample(f, x, executor=BatchedExecutor())
    assert seen[0] == [float(grid.model_times[0])] * 3


def test_stamps_changed_is_stamp_changed_for_every_kind_of_stamp():
    """One host read for all fingerprints, the same answers as checking them one by one: version counters,
    fingerprints of inference tensors (NaN in them too), tensors without a stamp."""
    from driffusion_core.executor import changed_tensor, stamp_changed, stamps_changed, version_stamp

    plain = torch.ones(3)
    with torch.inference_mode():
        a, b, c = torch.ones(4), torch.tensor([1.0, float("nan")]), torch.zeros(2, 2)
    pairs = [(plain, version_stamp(plain)), (a, version_stamp(a)), (b, version_stamp(b)), (c, version_stamp(c)),
             (plain, None)]
    assert stamps_changed(pairs) == [False] * 5
    plain.add_(1)
    with torch.inference_mode():
        c.add_(1)
    assert stamps_changed(pairs) == [stamp_changed(t, s) for t, s in pairs] == [True, False, False, True, False]
    versions = [(name, t, s) for name, (t, s) in zip("pabcn", pairs)]
    assert changed_tensor(versions) == "p" and changed_tensor(versions[1:]) == "c" and changed_tensor([]) is None


def test_a_noise_source_subclass_confines_the_noise_to_a_subspace():
    """States in a subspace (point clouds centred per sample, padded atoms) need noise in it too: a
    NoiseSource subclass that projects its draws in ``__call__`` is what every sampler uses for the start
    and every z_i (always asked for in x's shape), so stochastic samples stay in the subspace, and width 1
    is still the serial sample. The plain source leaves it (the check can fail)."""
    from solvers import PicardScheduler

    class Centred(NoiseSource):
        def __call__(self, step, shape, dtype=torch.float32, device=None):
            z = super().__call__(step, shape, dtype, device)
            return z - z.mean(dim=1, keepdim=True)  # [B, atoms, 3]: zero centre of mass per sample

    def model(x, t):  # an eps-model that keeps the subspace (a centred output)
        y = torch.tanh(0.7 * x) + 0.01 * (t.to(x.dtype) / 1000)[:, None, None]
        return y - y.mean(dim=1, keepdim=True)

    schedule = VPSchedule.linear()
    grid, transition = schedule.timesteps(20, "trailing"), DDPMSkip(schedule)
    x = Centred(0).initial((4, 6, 3), torch.float64)
    centre = lambda out: out.x.mean(dim=1).abs().max().item()  # noqa: E731
    serial = sample_serial(model, x, transition, grid, noise=Centred(1))
    outs = [serial,
            DraftRefineScheduler(transition, grid, width=4).sample(model, x, executor=BatchedExecutor(), noise=Centred(1)),
            DraftRefineScheduler(transition, grid, width=3, mode="conservative").sample(model, x, noise=Centred(1)),
            PicardScheduler(transition, grid, width=4, tolerance=0.1).sample(model, x, noise=Centred(1))]
    assert max(centre(o) for o in outs) < 1e-12
    assert torch.equal(DraftRefineScheduler(transition, grid, width=1).sample(model, x, noise=Centred(1)).x, serial.x)
    assert centre(sample_serial(model, x, transition, grid, noise=NoiseSource(1))) > 1e-2


def test_reprs_tell_settings_apart_and_show_states_by_shape():
    """Schedules built by different constructors print differently (the alpha-bar end points), executors print
    their describe() (not <object at 0x...>), a Round shows its states' shape, not their values, and a sample's
    info says the width and mode it ran with."""
    reprs = {repr(s) for s in (VPSchedule.linear(), VPSchedule.scaled_linear(), VPSchedule.squaredcos_cap_v2())}
    assert len(reprs) == 3
    for ex in (SerialExecutor(), BatchedExecutor(max_batch=8)):
        assert repr(ex) == ex.describe() and "object at" not in repr(ex)
    schedule = VPSchedule.linear()
    sched = DraftRefineScheduler(DDIMSkip(schedule), schedule.timesteps(20, "trailing"), width=2, mode="conservative")
    x = NoiseSource(0).initial((3, 5))
    rnd = sched.start(x).plan()
    assert repr(rnd) == "Round(steps=[0], xs=(1, 3, 5), anchor_call=True)"
    info = sched.sample(lambda z, t: 0.1 * z, x).info
    assert info["width"] == 2 and info["mode"] == "conservative"


def test_chunked_conditioning_rows_are_the_repeated_rows_without_the_repeat():
    """max_batch chunks take their conditioning rows straight from the caller's tensors (row r of the K * B
    stacked rows is row r % B): the same values as slicing the K-fold repeat, which is never built, so the
    chunk size bounds the conditioning's memory; within one draft's rows a chunk gets a view."""
    from backends.batched import _chunk_rows, repeat_cond

    b, k = 5, 3
    cond = {"emb": torch.randn(b, 4, generator=torch.Generator().manual_seed(0)), "scale": torch.tensor(2.0),
            "nested": {"mask": torch.arange(b) % 2 == 0}, "name": "x"}
    full = repeat_cond(cond, k)
    for start in range(k * b):
        for stop in range(start + 1, k * b + 1):
            got = _chunk_rows(cond, b, start, stop)
            assert torch.equal(got["emb"], full["emb"][start:stop])
            assert torch.equal(got["nested"]["mask"], full["nested"]["mask"][start:stop])
            assert got["scale"] is cond["scale"] and got["name"] == "x"
            if start % b + (stop - start) <= b:
                assert got["emb"]._base is cond["emb"]


@pytest.mark.parametrize("multistep", [False, True])
def test_step_skipping_trajectory_holds_the_coarse_levels_and_progress_works(multistep, capsys):
    """sample_step_skipping's trajectory is the R + 1 states at the coarse levels; at R == T it is the
    serial trajectory."""
    from solvers import DPMSolverSkip, sample_step_skipping

    T, R = 12, 5
    tr = DPMSolverSkip(VP) if multistep else DDPMSkip(VP)
    grid = VP.timesteps(T)
    f = ring_mixture().predictor(VP)
    x = NoiseSource(0).initial((4, 2), torch.float64)
    noise = None if multistep else NoiseSource(3)
    out = sample_step_skipping(f, x, tr, grid, R, noise=noise, return_trajectory=True, progress=True)
    shown = [seg for seg in capsys.readouterr().err.split("\r") if seg.strip()]
    assert shown and f"{R}/{R}" in shown[-1], shown[-1:]
    assert len(out.trajectory) == R + 1 and out.rounds == R
    assert torch.equal(out.trajectory[0], x) and torch.equal(out.trajectory[-1], out.x)
    assert torch.equal(sample_step_skipping(f, x, tr, grid, R, noise=noise).x, out.x)
    # a prefix of the coarse steps is the run stopped there: state k is the one after k coarse steps
    # (not for 2M, whose last step on a short grid is first order)
    idx = coarse_indices(T, R)
    for k in (() if multistep else (1, 3)):
        assert coarse_indices(idx[k], k) == idx[: k + 1]  # the same coarse levels on the shorter grid
        part = sample_step_skipping(f, x, tr, grid.sub(0, idx[k]), k, noise=noise)
        torch.testing.assert_close(part.x, out.trajectory[k], rtol=1e-12, atol=1e-12)
    full = sample_step_skipping(f, x, tr, grid, T, noise=noise, return_trajectory=True)
    ser = sample_serial(f, x, tr, grid, noise=noise, return_trajectory=True)
    assert len(full.trajectory) == T + 1
    for a, b in zip(full.trajectory, ser.trajectory):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_trajectory_keeps_its_own_copy_of_the_start_in_every_sampler():
    """trajectory[0] is the starting state as it was, for every sampler: a copy, not the caller's tensor
    (which the caller may reuse and overwrite)."""
    from solvers import PicardScheduler, sample_step_skipping

    tr, grid, f = DDIMSkip(VP), VP.timesteps(8), ring_mixture().predictor(VP)
    runs = {
        "serial": lambda x: sample_serial(f, x, tr, grid, return_trajectory=True),
        "step skipping": lambda x: sample_step_skipping(f, x, tr, grid, 3, return_trajectory=True),
        "DRiffusion": lambda x: DraftRefineScheduler(tr, grid, 3).sample(f, x, return_trajectory=True),
        "Picard": lambda x: PicardScheduler(tr, grid, 3, 1e-3).sample(f, x, return_trajectory=True),
    }
    for name, run in runs.items():
        x = NoiseSource(0).initial((4, 2))
        start = x.clone()
        out = run(x)
        x.zero_()
        assert torch.equal(out.trajectory[0], start), name

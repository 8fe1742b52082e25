"""Each bad input gets a clear error (a driffusion_core.errors class) naming what was wrong."""
from __future__ import annotations

import re
import sys
import warnings

import numpy as np
import pytest
import torch

from backends import BatchedExecutor, SerialExecutor
from driffusion_core import (
    ClipSample,
    DeviceMismatchError,
    DraftRefineScheduler,
    DriffusionError,
    DynamicThreshold,
    FlowSchedule,
    InvalidArgumentError,
    InvalidTimestepsError,
    InvalidWidthError,
    NoiseSource,
    PredictorOutputError,
    TimeGrid,
    VPSchedule,
    expected_rounds,
)
from solvers import (
    DDIMSkip, DDPMSkip, DPMSolverSkip, FlowEulerSkip, VEAncestralSkip, VEEulerSkip, VESchedule, ring_mixture, sample_serial,
    PicardScheduler,
    sample_step_skipping,
)

from _metrics import one_torch_thread  # noqa: F401  (autouse fixture)

HAS_NOTES = sys.version_info >= (3, 11)  # exception notes (add_note): the library adds where an error happened


def notes(error: BaseException) -> list:
    """The notes on ``error`` (empty when none were added: an ``any(...)`` over them then fails)."""
    return list(getattr(error, "__notes__", []))


VP = VPSchedule.linear()
FLOW = FlowSchedule()
GRID = VP.timesteps(10)


def eps_model(x, t, **cond):
    return 0.1 * x


def scheduler(width=2, mode="aggressive", transition=None, grid=GRID):
    return DraftRefineScheduler(transition or DDIMSkip(VP), grid, width=width, mode=mode)


def x0(b=3):
    return torch.randn(b, 2, generator=torch.Generator().manual_seed(0))


def test_errors_are_driffusion_errors_and_builtin_ones():
    assert issubclass(InvalidTimestepsError, (DriffusionError, ValueError))
    assert issubclass(PredictorOutputError, (DriffusionError, RuntimeError))


# --------------------------------------------------------------------------- time grids


@pytest.mark.parametrize(
    "levels,match",
    [
        ([500, 600, 100], r"strictly decrease.*step 0 is at level 500 and step 1 at 600"),
        ([500, 500, 100], r"strictly decrease"),
        ([1500, 10], r"Level 1500\.0 \(t_from\[0\]\) is out of range for VPSchedule.*\[-1\.0, 999\.0\]"),
        ([500, -0.5], r"Step 1 starts at level -0\.5.*clean end"),
        ([500, -1], r"last level -1\.0 is the clean end.*drop the trailing -1\.0"),
        ([500, -2], r"last level -2\.0 is out of range: below the clean end \(-1\); levels lie in \[-1, 999\]"),
        ([], r"time grid is empty"),
        ([500, float("nan")], r"NaN or inf"),
        ((t for t in (500, 100)), r"1-D sequence of numbers .* got generator"),
        (["500", "100"], r"1-D sequence of numbers .* got list \['500', '100'\]"),
        ([[500, 400], [100]], r"1-D sequence of numbers .* got list"),
    ],
)
def test_bad_vp_timesteps(levels, match):
    if not isinstance(levels, list):  # a generator: one attempt uses it up
        with pytest.raises(InvalidTimestepsError, match=match):
            scheduler(grid=levels)
        return
    with pytest.raises(InvalidTimestepsError, match=match):
        scheduler(grid=levels)
    with pytest.raises(InvalidTimestepsError, match=match):
        sample_serial(eps_model, x0(), DDIMSkip(VP), levels)


@pytest.mark.parametrize(
    "levels,match",
    [
        ([1.5, 0.5], r"Level 1\.5 \(t_from\[0\]\) is out of range for FlowSchedule"),
        ([0.5, 0.7], r"strictly decrease.*noisiest first .*\[1\.0, 0\.95, \.\.\.\] on a flow schedule's sigmas"),
        ([0.5, 0.0], r"last level 0\.0 is the clean end.*drop the trailing 0\.0"),
        ([0.0], r"last level 0\.0 is the clean end"),
        ([0.5, -0.25], r"last level -0\.25 is out of range: below the clean end \(0\); levels lie in \[0, 1\.001\]"),
    ],
)
def test_bad_flow_timesteps(levels, match):
    with pytest.raises(InvalidTimestepsError, match=match):
        scheduler(transition=FlowEulerSkip(FLOW), grid=levels)


@pytest.mark.parametrize("shift", [0.01, 0.05, 0.548, 1.0, 3.0, 20.0])
def test_flow_grids_from_any_shift_are_valid(shift):
    """The float32 shift puts sigma = 1 a little above 1 (1.5e-4 at shift 0.01, as in diffusers);
    such grids must still validate, and a model time passed as a level must not."""
    for n in (1, 2, 28):
        grid = FlowSchedule(shift=shift).timesteps(n)
        assert abs(float(grid.t_from[0]) - 1.0) < 1e-3 and float(grid.t_to[-1]) == 0.0
        scheduler(transition=FlowEulerSkip(FlowSchedule(shift=shift)), grid=grid)
    with pytest.raises(InvalidTimestepsError, match="out of range for FlowSchedule"):
        scheduler(transition=FlowEulerSkip(FLOW), grid=[1.002, 0.5])


def test_grid_step_that_does_not_go_to_a_cleaner_level():
    t = torch.tensor([500.0, 300.0], dtype=torch.float64)
    with pytest.raises(InvalidTimestepsError, match=r"Step 1 goes from level 300 to 400"):
        TimeGrid(t, torch.tensor([300.0, 400.0], dtype=torch.float64), t.long())


def test_grid_step_that_lands_below_the_next_steps_level_is_refused():
    """t_to[0] = 100 < t_from[1] = 500: the sampler would treat a state at level 100 as one at 500 (a silent
    wrong answer); refused by name, through TimeGrid and the schedules' grid(). Landing above the next level
    (diffusers' DDIM stride) stays allowed."""
    t = torch.tensor([999.0, 500.0], dtype=torch.float64)
    with pytest.raises(InvalidTimestepsError, match=r"Step 0 goes to level 100, below level 500 where step 1 starts"):
        TimeGrid(t, torch.tensor([100.0, 50.0], dtype=torch.float64), t.long())
    with pytest.raises(InvalidTimestepsError, match=r"below level 500 where step 1 starts"):
        VPSchedule.linear().grid(TimeGrid(t, torch.tensor([100.0, 50.0], dtype=torch.float64), t.long()))
    above = TimeGrid(t, torch.tensor([520.0, -1.0], dtype=torch.float64), t.long())
    assert not above.is_contiguous and VPSchedule.linear().grid(above).t_to[0] == 520


def test_grid_levels_of_any_real_dtype_are_float64():
    """Unsigned levels are compared as numbers, not wrapped around (200 > 100 in uint8 is still decreasing), and
    every grid's levels are float64, as documented; a grid that increases is still refused in any dtype."""
    grid = TimeGrid(torch.tensor([200, 100], dtype=torch.uint8), torch.tensor([100, 0], dtype=torch.uint8),
                    torch.tensor([200, 100]))
    assert grid.t_from.dtype == grid.t_to.dtype == torch.float64 and grid.t_from.tolist() == [200.0, 100.0]
    with pytest.raises(InvalidTimestepsError, match="strictly decrease"):
        TimeGrid(torch.tensor([100, 200], dtype=torch.uint8), torch.tensor([0, 100], dtype=torch.uint8),
                 torch.tensor([100, 200]))


@pytest.mark.parametrize("num_steps", [0, 1001, 2.5])
def test_bad_num_steps(num_steps):
    with pytest.raises(InvalidTimestepsError, match=r"num_steps must be an int in \[1, 1000\]"):
        VP.timesteps(num_steps)


def test_bad_spacing_names_the_options():
    with pytest.raises(InvalidArgumentError, match=r"spacing must be 'leading', 'trailing' or 'linspace', got 'trailling'"):
        VP.timesteps(10, "trailling")


# --------------------------------------------------------------------------- width and mode


@pytest.mark.parametrize("width", [0, -1, 1.5, True, "4", None])
def test_bad_width(width):
    with pytest.raises(InvalidWidthError, match=r"width must be an int >= 1 .*got " + repr(width).replace(".", r"\.")):
        scheduler(width=width)


def test_mode_typo():
    with pytest.raises(InvalidArgumentError, match=r"mode must be 'aggressive' or 'conservative', got 'agressive'"):
        scheduler(mode="agressive")


def test_transition_of_the_wrong_type():
    with pytest.raises(InvalidArgumentError, match=r"transition must be a SkipTransition .*got VPSchedule"):
        DraftRefineScheduler(VP, GRID)


# --------------------------------------------------------------------------- the predictor's output


def run_both(predictor, x=None, width=2, **kw):
    """Raise from the scheduler and from sample_serial alike (yields the two callables)."""
    x = x0() if x is None else x
    return [
        lambda: scheduler(width=width).sample(predictor, x, **kw),
        lambda: scheduler(width=width).sample(predictor, x, executor=BatchedExecutor(), **kw),
        lambda: sample_serial(predictor, x, DDIMSkip(VP), GRID, **kw),
    ]


def test_predictor_returns_the_wrong_shape():
    bad = lambda x, t: torch.zeros(x.shape[0], 5)
    for call in run_both(bad):
        with pytest.raises(PredictorOutputError, match=r"returned shape \(3, 5\) at step 0 \(level 900.*state has shape \(3, 2\)"):
            call()


@pytest.mark.parametrize("layout", ["to_sparse", "to_sparse_csr"])
def test_predictor_returning_a_sparse_tensor_is_named(layout):
    """A sparse (non-strided) output is refused by every sampler and executor with one message, not a raw torch
    error from a copy or reshape (nor accepted by one sampler and not the others)."""
    from solvers import PicardScheduler

    sparse = lambda x, t: getattr(0.5 * torch.tanh(x), layout)()
    name = {"to_sparse": "sparse_coo", "to_sparse_csr": "sparse_csr"}[layout]
    calls = run_both(sparse) + [lambda: PicardScheduler(DDIMSkip(VP), GRID, 2, tolerance=0.0).sample(sparse, x0())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: sparse CSR support is in beta
        for call in calls:
            with pytest.raises(PredictorOutputError, match=rf"returned a {name} tensor( at step 0 \(level 900[^;]*)?; .*dense.*to_dense\(\)"):
                call()


def test_predictor_returns_a_non_tensor():
    for call in run_both(lambda x, t: x.tolist()):
        with pytest.raises((PredictorOutputError, InvalidArgumentError), match=r"returned list.*must return"):
            call()


class _Output:
    """What a diffusers model returns by default (e.g. ``UNet2DOutput``): the prediction is its ``.sample``."""

    def __init__(self, sample):
        self.sample = sample


@pytest.mark.parametrize(
    "wrap,parts",
    [
        (lambda p: _Output(p), ["returned _Output", "diffusers model's output", ".sample", "DiffusersPredictor"]),
        (lambda p: (p,), ["returned tuple", "return_dict=False", "[0]", "DiffusersPredictor"]),
    ],
)
def test_predictor_returning_a_diffusers_output_says_how_to_get_the_tensor(wrap, parts):
    """A diffusers model passed as the predictor returns an output object (or a tuple with return_dict=False):
    every sampler and executor says how to take the tensor out, not only that it is not one."""
    for call in run_both(lambda x, t: wrap(0.1 * x)):
        with pytest.raises(PredictorOutputError) as info:
            call()
        assert all(p in str(info.value) for p in parts), str(info.value)
    # anything else that is not a tensor gets no diffusers hint
    for call in run_both(lambda x, t: x.tolist()):
        with pytest.raises(PredictorOutputError) as info:
            call()
        assert "diffusers" not in str(info.value), str(info.value)


@pytest.mark.skipif(not HAS_NOTES, reason="exception notes need Python >= 3.11")
def test_predictor_called_with_other_arguments_says_how_it_is_called():
    """A TypeError about the predictor's own arguments gets a note with the calling convention f(x, t, **cond)
    and the keyword arguments this call passed; another exception keeps the dtype / device hint."""
    def needs_labels(x, t, labels):
        return 0.1 * x

    def takes_two(x, t):
        return 0.1 * x

    labels = torch.zeros(3, dtype=torch.long)
    cases = [
        (needs_labels, {}, ["f(x, t, **cond)", "cond is empty", "cond={'labels': y}"]),
        (takes_two, {"labels": labels}, ["f(x, t, **cond)", "keyword arguments 'labels' from cond",
                                         "lambda x, t, **c: model(x, t)"]),
        (takes_two, {"t": labels}, ["cond has the key 't'", "x or t argument", "rename that key"]),
    ]
    for predictor, cond, parts in cases:
        for call in run_both(predictor, cond=cond):
            with pytest.raises(TypeError) as info:
                call()
            note = " ".join(notes(info.value))
            assert "driffusion: raised while evaluating step 0" in note and all(p in note for p in parts), note

    def wrong_dtype(x, t):
        return torch.nn.functional.linear(x, torch.zeros(2, 2, dtype=torch.float64))

    for call in run_both(wrong_dtype):
        with pytest.raises(RuntimeError) as info:
            call()
        note = " ".join(notes(info.value))
        assert "another dtype or device" in note and "**cond" not in note, note


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "inf")])
def test_predictor_returns_nan_or_inf_names_the_step_and_level(value, kind):
    """The bad value appears at model time 300 (step 6 of the 10-step leading grid 900, 800, ..., 0)."""

    def bad(x, t):
        out = 0.1 * x
        return torch.where((t == 300)[:, None], torch.full_like(out, value), out)

    for call in run_both(bad, width=3):
        with pytest.raises(PredictorOutputError, match=rf"returned {kind} at step 6 \(level 300, model time 300\)"):
            call()


def test_predictor_returns_another_dtype():
    for call in run_both(lambda x, t: (0.1 * x).double()):
        with pytest.raises(DeviceMismatchError, match=r"returned torch\.float64 on cpu at step 0.*state is torch\.float32"):
            call()


def test_predictor_returns_another_device():
    for call in run_both(lambda x, t: torch.empty(x.shape, device="meta")):
        with pytest.raises(DeviceMismatchError, match=r"on meta at step 0.*state is torch\.float32 on cpu"):
            call()


def test_batched_executor_wrong_row_count():
    with pytest.raises(PredictorOutputError, match=r"returned shape \(1, 2\) for a batch of 3 rows.*model times 900") as info:
        scheduler().sample(lambda x, t: x[:1], x0(), executor=BatchedExecutor())
    if HAS_NOTES:  # Python >= 3.11: the sampler adds where it was
        assert any("step 0 (level 900" in n for n in notes(info.value))
    # a draft round: the drafts' model times
    with pytest.raises(PredictorOutputError, match=r"for a batch of 6 rows.*model times 800, 700"):
        scheduler().sample(lambda x, t: x if x.shape[0] == 3 else x[:1], x0(), executor=BatchedExecutor())
    with pytest.raises(PredictorOutputError, match=r"for a batch of 2 rows"):
        scheduler().sample(lambda x, t: x[:1], x0(), executor=BatchedExecutor(max_batch=2))


def test_batched_executor_vmap_with_max_batch_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"max_batch .* does not apply with vmap=True"):
        BatchedExecutor(vmap=True, max_batch=4)


def test_predictor_exception_keeps_its_type_and_says_where():
    def broken(x, t):
        if int(t[0]) < 500:
            raise KeyError("my model's own error")
        return 0.1 * x

    for run in (
        lambda: scheduler(width=3).sample(broken, x0(), executor=BatchedExecutor()),
        lambda: sample_serial(broken, x0(), DDIMSkip(VP), GRID),
    ):
        with pytest.raises(KeyError, match="my model's own error") as info:
            run()
        if HAS_NOTES:
            assert any("driffusion: raised while evaluating step" in n and "level" in n for n in notes(info.value))


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (lambda x: None, PredictorOutputError, r"returned NoneType at step 5 \(level 400"),
        (lambda x: torch.zeros(3, 5), PredictorOutputError, r"returned shape \(3, 5\) at step 5 \(level 400"),
        (lambda x: (0.1 * x).double(), DeviceMismatchError, r"returned torch\.float64 on cpu at step 5 \(level 400"),
    ],
)
def test_bad_output_of_a_later_draft_names_its_own_step(bad, error, match):
    """Step 5 is the second draft of its round (steps 4..6 at width 3): the serial executor hands back
    the unlike outputs one by one, so the error names step 5, not the round's first step."""

    def predictor(x, t):
        return bad(x) if int(t[0]) == 400 else 0.1 * x

    for run in (
        lambda: scheduler(width=3).sample(predictor, x0()),
        lambda: scheduler(width=3, mode="conservative").sample(predictor, x0()),
        lambda: sample_serial(predictor, x0(), DDIMSkip(VP), GRID),
    ):
        with pytest.raises(error, match=match):
            run()


def test_exception_in_a_later_draft_names_its_own_step():
    def broken(x, t):
        if bool((t == 400).any()):
            raise KeyError("my model's own error")
        return 0.1 * x

    for executor, where in ((None, "step 5 (level 400"), (BatchedExecutor(), "steps 4..6 (levels 500..300)")):
        with pytest.raises(KeyError) as info:
            scheduler(width=3).sample(broken, x0(), executor=executor)
        if HAS_NOTES:  # Python >= 3.11
            assert any(f"driffusion: raised while evaluating {where}" in n for n in notes(info.value)), notes(info.value)


# --------------------------------------------------------------------------- inputs


def test_cond_on_another_device():
    cond = {"c": torch.empty(3, 2, device="meta")}
    with pytest.raises(DeviceMismatchError, match=r"cond\['c'\] is on meta but x is on cpu"):
        scheduler().sample(eps_model, x0(), cond=cond)
    with pytest.raises(DeviceMismatchError, match=r"cond\['c'\] is on meta"):
        sample_serial(eps_model, x0(), DDIMSkip(VP), GRID, cond=cond)


def test_cond_with_the_wrong_batch_size():
    with pytest.raises(InvalidArgumentError, match=r"cond\['c'\] has leading dimension 4, but x has batch size 3"):
        scheduler().sample(eps_model, x0(), cond={"c": torch.zeros(4, 2)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_x_with_nan_or_inf(bad):
    x = x0()
    x[1, 0] = bad
    for call in run_both(eps_model, x=x):
        with pytest.raises(InvalidArgumentError, match=r"starting state x holds NaN or inf"):
            call()


@pytest.mark.parametrize("x", [[[0.0, 1.0]], torch.zeros(3, 2, dtype=torch.long)])
def test_x_not_a_float_tensor(x):
    with pytest.raises(InvalidArgumentError, match=r"x must be a floating-point tensor"):
        scheduler().sample(eps_model, x)


def test_x_nested_is_refused_by_both_samplers():
    """A nested x (samples of different shapes) reports layout strided, and failed inside torch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    for call in run_both(eps_model, x=x):
        with pytest.raises(InvalidArgumentError, match=r"x is a nested tensor; .*to_padded_tensor"):
            call()


def test_x_sparse_is_refused_by_both_samplers():
    for call in run_both(eps_model, x=x0().to_sparse()):
        with pytest.raises(InvalidArgumentError, match=r"x must be a dense tensor, got layout torch.sparse_coo.*to_dense"):
            call()


FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


@pytest.mark.skipif(not FLOAT8, reason="this torch has no float8 dtypes")
@pytest.mark.parametrize("dtype", FLOAT8)
def test_x_of_a_float8_dtype_is_refused_with_the_supported_ones(dtype):
    """float8 is floating point, but torch has no arithmetic on it: refused up front, not deep in a step."""
    x = x0().to(dtype)
    for call in run_both(eps_model, x=x) + [lambda: PicardScheduler(DDIMSkip(VP), GRID, 2).sample(eps_model, x)]:
        with pytest.raises(InvalidArgumentError, match=rf"float32, float64, float16 or bfloat16\), got a {dtype}"):
            call()


def _layouts(rows: torch.Tensor) -> dict:
    with warnings.catch_warnings():  # torch's "beta" / "prototype" notices for these layouts
        warnings.simplefilter("ignore")
        out = {"sparse_coo": rows.to_sparse(), "sparse_csr": rows.to_sparse_csr()}
        out["nested"] = torch.nested.nested_tensor([r[: 1 + i] for i, r in enumerate(rows)])
        if hasattr(torch, "jagged"):  # torch >= 2.4
            out["nested jagged"] = torch.nested.nested_tensor([r[: 1 + i] for i, r in enumerate(rows)], layout=torch.jagged)
    return out


@pytest.mark.parametrize("kind", list(_layouts(torch.ones(3, 4))))
def test_a_conditioning_tensor_that_is_not_dense(kind):
    """Sparse and jagged conditioning tensors reach the model as they are through every sampler with
    SerialExecutor (the sample equals the one with the dense tensor); BatchedExecutor, whose repeat and slicing
    of rows failed inside torch, refuses them by name with the fix. torch's strided nested layout has no shape
    to count rows by: refused by every sampler."""
    adj = _layouts(torch.ones(3, 4) * torch.arange(1.0, 4.0).reshape(3, 1))[kind]
    dense = torch.ones(3, 4) * torch.arange(1.0, 4.0).reshape(3, 1)

    def model(x, t, adj):  # uses the rows of adj: a wrong or shuffled conditioning would show
        rows = torch.stack([r.sum() for r in adj.unbind()]) if adj.is_nested else adj.to_dense().sum(dim=1)
        return 0.1 * x + 0.01 * rows.reshape(-1, 1)

    runs = {
        "DRiffusion": lambda c: scheduler(width=2).sample(model, x0(), cond=c).x,
        "serial": lambda c: sample_serial(model, x0(), DDIMSkip(VP), GRID, cond=c).x,
        "Picard": lambda c: PicardScheduler(DDIMSkip(VP), GRID, 2, 1e-3).sample(model, x0(), cond=c).x,
        "step skipping": lambda c: sample_step_skipping(model, x0(), DDIMSkip(VP), GRID, 3, cond=c).x,
    }
    if kind == "nested":
        for run in runs.values():
            with pytest.raises(InvalidArgumentError, match=r"cond\['adj'\] is a nested tensor of torch's strided "
                                                           r"nested layout.*to_padded_tensor.*layout=torch\.jagged"):
                run({"adj": adj})
        return
    for name, run in runs.items():
        if kind == "nested jagged":  # its rows differ in length: compare with each row's sum
            want_rows = torch.stack([r.sum() for r in adj.unbind()])
            ref = run({"adj": torch.diag_embed(want_rows)})
        else:
            ref = run({"adj": dense})
        assert torch.equal(run({"adj": adj}), ref), name
    fix = r"to_padded_tensor" if kind.startswith("nested") else r"pass cond\['adj'\]\.to_dense\(\)"
    for executor in (BatchedExecutor(), BatchedExecutor(max_batch=4), BatchedExecutor(vmap=True)):
        with pytest.raises(InvalidArgumentError, match=rf"BatchedExecutor: cond\['adj'\] is a (nested|sparse_c..) "
                                                       rf"tensor; .*{fix}.*SerialExecutor"):
            scheduler(width=2).sample(model, x0(), executor=executor, cond={"adj": adj})


def test_a_wrong_dtype_from_one_batched_call_names_the_round():
    """The model goes wrong only when step 5 is in the call: per-draft calls name step 5, a round evaluated
    as one batched call names the round's steps (which one of them is at fault cannot be told apart)."""
    bad_time = GRID.model_times[5].item()

    def model(x, t):
        return (0.1 * x).float() if bool((t == bad_time).any()) else 0.1 * x

    x = x0().double()
    with pytest.raises(DeviceMismatchError, match=r"returned torch\.float32 on cpu at step 5 \(level"):
        scheduler(width=3).sample(model, x)
    with pytest.raises(DeviceMismatchError, match=r"returned torch\.float32 on cpu at steps (\d+)\.\.(\d+) ") as info:
        scheduler(width=3).sample(model, x, executor=BatchedExecutor())
    first, last = map(int, re.search(r"steps (\d+)\.\.(\d+)", str(info.value)).groups())
    assert first <= 5 <= last


@pytest.mark.parametrize("x,message", [(torch.zeros(()), r"x must have a batch dimension \[B, \.\.\.\], got a 0-d tensor"),
                                       (torch.zeros(0, 2), r"x holds no samples \(batch size 0, shape \(0, 2\)\)"),
                                       (torch.zeros(4, 0), r"x holds no values per sample \(shape \(4, 0\)"),
                                       (torch.zeros(2, 3, 0, 5), r"x holds no values per sample")])
def test_x_without_samples(x, message):
    for call in run_both(eps_model, x=x):
        with pytest.raises(InvalidArgumentError, match=message):
            call()


def test_oracle_given_states_of_another_dimension():
    """A ring (2-D) oracle given a state without its batch dimension, or of another dimension, says so."""
    f = ring_mixture().predictor(VP)
    for x in (torch.zeros(2), torch.zeros(4, 3)):
        with pytest.raises(InvalidArgumentError, match=r"lives in 2 dimensions: its states are \[B, 2\]"):
            f(x, torch.full((x.shape[0],), 500.0))
    with pytest.raises(InvalidArgumentError, match=r"got x of shape \(2,\)"):
        scheduler().sample(f, torch.zeros(2))


def test_kdiffusion_names_its_extra_args_in_errors():
    """sample_driffusion's conditioning is extra_args: its errors say extra_args, not the scheduler's cond."""
    from solvers.interop import sample_driffusion

    sigmas = torch.tensor([10.0, 1.0, 0.0])
    with pytest.raises(InvalidArgumentError, match=r"extra_args\['y'\] has leading dimension 3, but x has batch size 2"):
        sample_driffusion(lambda x, s, y: x, torch.zeros(2, 4), sigmas, extra_args={"y": torch.zeros(3, 7)})
    with pytest.raises(InvalidArgumentError, match=r"extra_args must be a dict of keyword arguments"):
        sample_driffusion(lambda x, s: x, torch.zeros(2, 4), sigmas, extra_args=[1])


def test_every_executor_describes_a_round_of_a_given_width():
    """describe(width) works on every executor (as DistributedExecutor's does) and says how that round runs;
    a width that is not a positive int is refused by name."""
    from driffusion_core.executor import Executor

    class Minimal(Executor):
        def evaluate(self, predictor, xs, ts, cond=None):
            return SerialExecutor().evaluate(predictor, xs, ts, cond)

    for ex, expect in ((SerialExecutor(), "width 3: 3 call(s) one after another"),
                       (BatchedExecutor(), "width 3: the 3 draft(s) of a round in one call"),
                       (BatchedExecutor(max_batch=8), "in chunks of at most 8 rows"), (Minimal(), "Minimal")):
        assert expect in ex.describe(3), ex.describe(3)
        assert ex.describe().startswith(type(ex).__name__)
        for bad in (0, -1, 2.5, True):
            with pytest.raises(InvalidArgumentError, match=r"width must be a positive int or None"):
                ex.describe(bad)


def test_a_custom_executor_breaking_the_contract_is_named_not_the_predictor():
    """A custom executor that returns nothing, the wrong number of predictions, or the K * B rows of one call
    not reshaped back to [K, B, ...] is named as the executor (with the contract), not as a predictor that
    returned a shape it never returned; the correct executor gives the serial executor's sample."""
    from driffusion_core import ExecutorError
    from driffusion_core.executor import Executor, stack_calls

    def make(body):
        return type("Custom", (Executor,), {"evaluate": lambda self, f, xs, ts, cond=None: body(f, xs, ts)})()

    good = make(lambda f, xs, ts: stack_calls(lambda k: f(xs[k], ts[k]), xs.shape[0]))
    s = DraftRefineScheduler(DDIMSkip(VPSchedule.linear()), VPSchedule.linear().timesteps(10), width=3)
    x = NoiseSource(1).initial((2, 3))
    assert torch.equal(s.sample(eps_model, x, executor=good).x, s.sample(eps_model, x).x)
    cases = [
        (lambda f, xs, ts: None, ExecutorError, r"The executor returned NoneType for the round at step 0 .*"
                                                r"tensor shaped like xs \[K, B, \.\.\.\] = \[1, 2, 3\]"),
        (lambda f, xs, ts: [f(xs[0], ts[0])] * (xs.shape[0] + 1), ExecutorError,
         r"The executor returned a list of 2 predictions for the round at step 0 .*which has 1 draft\(s\)"),
        (lambda f, xs, ts: f(xs.reshape(-1, *xs.shape[2:]), ts.reshape(-1)), PredictorOutputError,
         r"The round's predictions have shape \(2, 3\) .*its states have shape \(1, 2, 3\).*custom executor's "
         r"evaluate must return them stacked by draft"),
    ]
    for body, error, message in cases:
        with pytest.raises(error, match=message):
            s.sample(eps_model, x, executor=make(body))


def test_noise_source_of_the_wrong_type():
    for call in run_both(eps_model, noise=42):
        with pytest.raises(InvalidArgumentError, match=r"noise must be a NoiseSource or None, got int"):
            call()
    for call in run_both(eps_model, noise=torch.Generator()):  # the likely mix-up: a generator for the noise
        with pytest.raises(InvalidArgumentError, match=r"got Generator \(make one with driffusion_core\.NoiseSource\(seed\)"):
            call()


def test_predictor_not_callable():
    with pytest.raises(InvalidArgumentError, match=r"predictor must be a callable f\(x, t, \*\*cond\) returning a tensor shaped like x, got Tensor"):
        scheduler().sample(torch.zeros(3), x0())


def test_executor_of_the_wrong_type():
    with pytest.raises(InvalidArgumentError, match=r"executor must be an Executor \(e\.g\. .*\), got str"):
        scheduler().sample(eps_model, x0(), executor="batched")
    with pytest.raises(InvalidArgumentError, match=r"got the class BatchedExecutor: pass BatchedExecutor\(\)"):
        scheduler().sample(eps_model, x0(), executor=BatchedExecutor)


def test_positional_mix_ups_of_eta_and_prediction_are_named():
    """DDIMSkip(schedule, prediction, eta) and VEAncestralSkip(schedule, eta, prediction) order them differently:
    a number where the prediction goes, or a prediction name where eta goes, says which argument it is."""
    with pytest.raises(InvalidArgumentError, match=r"Unknown prediction type 0\.5.*\(eta, order, \.\.\.\) given by "
                                                    r"position in the prediction's place: pass it by keyword"):
        DDIMSkip(VP, 0.5)
    with pytest.raises(InvalidArgumentError, match=r"got the string 'sample'.*pass prediction='sample' by keyword"):
        VEAncestralSkip(VESchedule(), "sample")
    with pytest.raises(InvalidArgumentError) as info:  # a string that is no prediction name: no such advice
        VEAncestralSkip(VESchedule(), "0.5")
    assert "prediction=" not in str(info.value)


def test_step_skipping_counts_its_rounds_as_ints():
    """rounds given as a 0-d tensor (or numpy int): SampleOutput.rounds / evals are plain ints all the same."""
    out = sample_step_skipping(eps_model, x0(), DDIMSkip(VP), GRID, rounds=torch.tensor(3))
    assert type(out.rounds) is int and type(out.evals) is int and out.rounds == out.evals == 3


# --------------------------------------------------------------------------- transitions and schedules


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: DDIMSkip(FLOW), r"DDIMSkip needs a VPSchedule, got FlowSchedule"),
        (lambda: DDPMSkip(FLOW), r"DDPMSkip needs a VPSchedule, got FlowSchedule"),
        (lambda: FlowEulerSkip(VP), r"FlowEulerSkip needs a FlowSchedule, got VPSchedule"),
        (lambda: DDIMSkip(VP, "velocity"), r"DDIMSkip: a VPSchedule takes .*got 'velocity'.* use 'v_prediction'"),
        (lambda: DDPMSkip(VP, "velocity"), r"DDPMSkip: a VPSchedule takes .*got 'velocity'"),
        (lambda: DPMSolverSkip(VP, "velocity"), r"DPMSolverSkip: a VPSchedule takes .*got 'velocity'"),
        (lambda: FlowEulerSkip(FLOW, "v_prediction"), r"v_prediction .* is a VP parameterization.* use 'velocity'"),
        (lambda: DPMSolverSkip(FLOW, "v_prediction"), r"DPMSolverSkip: a FlowSchedule takes .*got 'v_prediction'"),
        (lambda: VEEulerSkip(VESchedule(), "velocity"), r"VEEulerSkip: a VESchedule takes predictions sample, epsilon"),
        (lambda: VEEulerSkip(VESchedule(), "v_prediction"), r"VEEulerSkip: a VESchedule takes .*'v_prediction'"),
        (lambda: DDIMSkip(VP, "eps"), r"Unknown prediction type 'eps'; use one of 'epsilon', 'sample'"),
        (lambda: DDIMSkip(VP, eta=-0.1), r"eta must lie in \[0, 1\].*got -0\.1: .*cannot be negative"),
        (lambda: DDIMSkip(VP, eta=1.5), r"eta must lie in \[0, 1\].*got 1\.5: above 1 the step variance"),
        (lambda: DDPMSkip(VP, variance_type="learned"), r"variance_type must be one of .*got 'learned'"),
        (lambda: FlowSchedule(shift=0), r"shift must be a positive finite number"),
        (lambda: VPSchedule([0.5, 0.9]), r"alphas_cumprod must not increase"),
    ],
)
def test_bad_transition_or_schedule(make, match):
    with pytest.raises(InvalidArgumentError, match=match):
        make()


def _operator_calls():
    x, e = x0(), x0() * 0.5
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    flow, ve = FlowEulerSkip(FLOW), VEEulerSkip(VESchedule())
    dpm = DPMSolverSkip(VP)
    return [
        # levels going back to a noisier one, per family (equal levels are the identity: allowed)
        (lambda: DDPMSkip(VP)(x, e, 100, 500, z), InvalidTimestepsError, r"DDPMSkip: t_to = 500 lies above t_from = 100"),
        (lambda: DDIMSkip(VP)(x, e, 100.0, 500.0), InvalidTimestepsError, r"DDIMSkip: t_to = 500 lies above"),
        (lambda: flow(x, e, 0.2, 0.7), InvalidTimestepsError, r"FlowEulerSkip: t_to = 0.7 lies above t_from = 0.2"),
        (lambda: ve(x, e, 1.0, 3.0), InvalidTimestepsError, r"VEEulerSkip: t_to = 3 lies above"),
        (lambda: dpm(x, e, 100.0, 500.0), InvalidTimestepsError, r"DPMSolverSkip: t_to = 500 lies above"),
        (lambda: DDIMSkip(VP)(x, e, torch.tensor([500.0, 400.0, 300.0]), torch.tensor([400.0, 450.0, 200.0])),
         InvalidTimestepsError, r"t_to = 450 lies above t_from = 400 \(row 1\)"),
        (lambda: dpm.multistep(x, e, 500.0, 400.0, [(x, e, 300.0)]), InvalidTimestepsError,
         r"t_from = 500 lies above the previous level = 300"),
        # out of the schedule's range, or not finite
        (lambda: DDPMSkip(VP)(x, e, 5000, 400, z), InvalidTimestepsError, r"t_from = 5000 is out of range for VPSchedule: levels lie in \[-1, 999\]"),
        (lambda: DDIMSkip(VP)(x, e, 500.0, -3.0), InvalidTimestepsError, r"t_to = -3 is out of range"),
        (lambda: flow(x, e, 1.5, 0.5), InvalidTimestepsError, r"t_from = 1.5 is out of range for FlowSchedule"),
        (lambda: DDIMSkip(VP)(x, e, float("nan"), 400.0), InvalidTimestepsError, r"t_from holds NaN or inf"),
        # tensors torch would promote or broadcast silently
        (lambda: DDIMSkip(VP)(x, e.double(), 500.0, 400.0), DeviceMismatchError, r"pred is torch\.float64 on cpu but x is torch\.float32"),
        (lambda: DDPMSkip(VP)(x, e, 500, 400, z[:1]), InvalidArgumentError, r"noise must have shape \(3, 2\), got shape \(1, 2\) \(shaped like x"),
        (lambda: DDPMSkip(VP)(x, e, 500, 400, z[0]), InvalidArgumentError, r"noise must have shape \(3, 2\), got shape \(2,\)"),
        (lambda: flow(x, e[:, :1], 0.5, 0.4), InvalidArgumentError, r"pred must have shape \(3, 2\), got shape \(3, 1\)"),
        (lambda: DDIMSkip(VP)(x.long(), e.long(), 500.0, 400.0), InvalidArgumentError, r"x must be a floating tensor"),
        (lambda: DDIMSkip(VP)(x, e.tolist(), 500.0, 400.0), InvalidArgumentError, r"x and pred must be tensors, got Tensor and list"),
        (lambda: dpm.multistep(x, e, 400.0, 300.0, [(x, e.double(), 500.0)]), InvalidArgumentError,
         r"previous step's state is torch\.float32 \(3, 2\) on cpu \(prediction torch\.float64"),
    ]


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: VPSchedule.linear(1000.0), InvalidArgumentError, r"num_train_timesteps must be an int >= 2, got 1000\.0"),
        (lambda: FlowSchedule(shift=float("nan")), InvalidArgumentError, r"shift must be a positive finite number.*nan"),
        (lambda: FlowSchedule(shift=float("inf")), InvalidArgumentError, r"shift must be a positive finite number.*inf"),
        (lambda: VP.timesteps(10.0), InvalidTimestepsError, r"num_steps must be an int in \[1, 1000\], got 10\.0"),
        (lambda: FLOW.timesteps(True), InvalidTimestepsError, r"num_steps must be an int >= 1, got True"),
        (lambda: sample_step_skipping(lambda x, t: 0.1 * x, x0(), DDIMSkip(VP), GRID, rounds=True), InvalidArgumentError,
         r"rounds must be an int in \[1, 10\], got True"),
        (lambda: expected_rounds(10, 0), InvalidWidthError, r"width must be an int >= 1"),
        (lambda: expected_rounds(0, 2), InvalidArgumentError, r"num_steps must be an int >= 1, got 0"),
        (lambda: expected_rounds(10, 2, "agressive"), InvalidArgumentError, r"mode must be 'aggressive' or 'conservative'"),
        (lambda: scheduler().sample(lambda x, t: x, torch.empty(3, 2, device="meta")), DeviceMismatchError,
         r"x is a meta tensor"),
    ],
)
def test_counts_schedules_and_devices_are_checked(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_integer_counts_of_any_integer_type():
    """numpy and 0-d tensor integers count as ints wherever a count is taken (as widths do)."""
    assert len(VP.timesteps(np.int64(10))) == 10 and len(FLOW.timesteps(torch.tensor(6))) == 6
    f = lambda x, t: 0.1 * x
    assert torch.equal(sample_step_skipping(f, x0(), DDIMSkip(VP), GRID, rounds=np.int64(4)).x,
                       sample_step_skipping(f, x0(), DDIMSkip(VP), GRID, rounds=4).x)
    assert expected_rounds(np.int64(50), np.int32(4)) == expected_rounds(50, 4) == 14


def test_batched_chunks_of_unlike_shape_are_named():
    """With max_batch the rows are evaluated in chunks; a chunk whose rows are shaped unlike the input is
    named (torch.cat would fail with its own message)."""

    def wider_at_400(x, t):
        out = 0.1 * x
        return torch.cat([out, out[:, :1]], 1) if bool((t == 400).any()) else out

    with pytest.raises(PredictorOutputError, match=r"rows of shape \(3,\) .*chunk of 2 rows \(max_batch, model times 500, 400\).* shape \(2,\)"):
        scheduler(width=3).sample(wider_at_400, x0(), executor=BatchedExecutor(max_batch=2))


@pytest.mark.filterwarnings("ignore::driffusion_core.errors.MeanStepWarning")  # the mean step is not the point here
def test_drafts_and_grid_step_refuse_a_bad_window_or_index():
    x, e = x0(), x0() * 0.5
    grid = VP.timesteps(6)
    zs = NoiseSource(1).steps(0, 2, x.shape)
    tr = DDPMSkip(VP)
    with pytest.raises(InvalidArgumentError, match=r"drafts: noises must have shape \(3, 3, 2\), got shape \(2, 3, 2\) \(one noise per step of the window"):
        tr.drafts(x, e, grid.t_from[:3], grid.t_to[:3], zs)
    with pytest.raises(InvalidArgumentError, match=r"t_from and t_to must be 1-D tensors .* got \(3,\) and \(2,\)"):
        tr.drafts(x, e, grid.t_from[:3], grid.t_to[:2])
    with pytest.raises(DeviceMismatchError, match=r"noises is torch\.float64 on cpu but x is torch\.float32"):
        tr.drafts(x, e, grid.t_from[:2], grid.t_to[:2], zs.double())
    for t in (DDIMSkip(VP), tr):  # a window whose steps are not consecutive steps of a grid
        with pytest.raises(InvalidTimestepsError, match=r"drafts: step 0 of the window goes to level .*, below level .* where step 1 starts"):
            t.drafts(x, e, grid.t_from[[0, 1]], grid.t_to[[2, 3]])
    for i in (6, -1, 1.0, True):
        with pytest.raises(InvalidArgumentError, match=rf"grid_step: i must be a step index 0\.\.5 of this 6-step grid, got {i!r}"):
            tr.grid_step(x, e, grid, i)


@pytest.mark.parametrize("k", range(len(_operator_calls())))
def test_operators_refuse_arguments_they_would_misread(k):
    """The operators are public (a custom sampler calls them): levels that go back up, leave the schedule or
    are not finite, and tensors torch would promote or broadcast, are refused with the reason."""
    call, error, match = _operator_calls()[k]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.filterwarnings("ignore::driffusion_core.errors.MeanStepWarning")  # the mean step is not the point here
def test_operators_accept_equal_levels_and_the_clean_end():
    x, e = x0(), x0() * 0.5
    for tr, a, b in ((DDIMSkip(VP), 400.0, 400.0), (DDPMSkip(VP), 0, -1), (FlowEulerSkip(FLOW), 0.3, 0.0),
                     (DPMSolverSkip(VP), 999.0, -1.0)):
        out = tr(x, e, a, b)
        assert out.dtype == x.dtype and out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(DDIMSkip(VP)(x, e, 400.0, 400.0), x)


def test_per_row_levels_of_the_wrong_length():
    tr = DDIMSkip(VP)
    with pytest.raises(InvalidArgumentError, match=r"one level per row \(3\), got shape \(2,\)"):
        tr(x0(), x0(), torch.tensor([500.0, 400.0]), 100.0)


def test_oracle_predictor_with_unknown_prediction():
    with pytest.raises(InvalidArgumentError, match=r"Unknown prediction type 'x0'"):
        ring_mixture().predictor(VP, "x0")


def test_noise_source_is_keyed_by_seed_and_step():
    """Not an error, but the contract the errors above protect: same (seed, step) -> same noise."""
    a, b = NoiseSource(5), NoiseSource(5)
    assert torch.equal(a(3, (2, 2)), b(3, (2, 2))) and not torch.equal(a(3, (2, 2)), a(4, (2, 2)))


def test_ddim_eta_above_one_is_rejected():
    from solvers import DDIMSkip

    with pytest.raises(InvalidArgumentError, match=r"eta must lie in \[0, 1\]"):
        DDIMSkip(VPSchedule.linear(), eta=1.5)


def test_flow_epsilon_model_at_sigma_one_is_rejected():
    from driffusion_core import DraftRefineScheduler, FlowSchedule
    from solvers import FlowEulerSkip

    schedule = FlowSchedule()
    with pytest.raises(InvalidArgumentError, match=r"epsilon-prediction model cannot give x0_hat at step 0 \(level 1\)"):
        DraftRefineScheduler(FlowEulerSkip(schedule, prediction="epsilon"), schedule.timesteps(10))
    # below sigma = 1 it is fine
    DraftRefineScheduler(FlowEulerSkip(schedule, prediction="epsilon"), [0.9, 0.5, 0.2])


@pytest.mark.filterwarnings("ignore::driffusion_core.errors.MeanStepWarning")  # the mean step is not the point here
@pytest.mark.parametrize("make", [lambda s: DDIMSkip(s), lambda s: DDIMSkip(s, eta=1.0), lambda s: DDPMSkip(s)])
def test_epsilon_model_on_a_zero_terminal_snr_schedule_is_rejected(make):
    """alpha-bar = 0 at the first level: x0_hat = (x - sigma eps) / 0. diffusers returns NaN here; we say why."""
    zsnr = VPSchedule.linear(rescale_betas_zero_snr=True)
    assert float(zsnr.alpha_bar(999)) == 0.0
    grid = zsnr.timesteps(10, "trailing")
    tr = make(zsnr)
    for build in (lambda: DraftRefineScheduler(tr, grid, width=2), lambda: sample_serial(eps_model, x0(), tr, grid)):
        with pytest.raises(InvalidArgumentError, match=r"epsilon-prediction model cannot give x0_hat at step 0 \(level 999\).*v_prediction"):
            build()
    with pytest.raises(InvalidArgumentError, match=r"alpha = 0"):  # the operator itself, called directly
        tr(x0(), x0(), 999, 899)
    # below the zero-SNR level, and with v_prediction everywhere, it samples
    out = sample_serial(eps_model, x0(), tr, [899, 499, 99])
    assert torch.isfinite(out.x).all()
    assert torch.isfinite(sample_serial(eps_model, x0(), make(zsnr).__class__(zsnr, "v_prediction"), grid, noise=NoiseSource(0)).x).all()


def test_a_state_that_overflows_is_reported():
    """Finite model outputs, but a float16 state overflows: the sample is refused, not returned as inf."""
    from driffusion_core import SamplingError

    x = x0().to(torch.float16)
    huge = lambda x, t: torch.full_like(x, 6e4)  # finite in float16; x0_hat = (x - sigma eps) / alpha is not
    tr = DDIMSkip(VP)
    with pytest.raises(SamplingError, match=r"NaN or inf although every model output was finite.*float16"):
        sample_serial(huge, x, tr, GRID)
    with pytest.raises(SamplingError, match=r"DraftRefineScheduler"):
        DraftRefineScheduler(tr, GRID, width=1).sample(huge, x)


@pytest.mark.parametrize("cond", [torch.zeros(3, 2), torch.zeros(1), [torch.zeros(3, 2)], "labels"])
def test_cond_that_is_not_a_dict(cond):
    with pytest.raises(InvalidArgumentError, match=r"cond must be a dict of keyword arguments"):
        scheduler().sample(eps_model, x0(), cond=cond)


def test_nested_cond_with_the_wrong_batch_size_is_named():
    cond = {"added": {"text_embeds": torch.zeros(3, 4), "time_ids": torch.zeros(2, 6)}}
    with pytest.raises(InvalidArgumentError, match=r"cond\['added'\]\['time_ids'\] has leading dimension 2"):
        scheduler().sample(eps_model, x0(), cond=cond)


def test_grid_from_another_kind_of_schedule_is_refused():
    with pytest.raises(InvalidTimestepsError, match=r"'flow/1000' levels .* VPSchedule with 'vp/1000' .* transition.schedule.timesteps"):
        DraftRefineScheduler(DDIMSkip(VP), FLOW.timesteps(5))
    with pytest.raises(InvalidTimestepsError, match=r"'vp/1000' levels .* FlowSchedule"):
        sample_serial(eps_model, x0(), FlowEulerSkip(FLOW), GRID)
    # the same kind, another table: timestep 475 of 500 is not timestep 475 of 1000
    with pytest.raises(InvalidTimestepsError, match=r"'vp/500' levels .* 'vp/1000' levels"):
        DraftRefineScheduler(DDIMSkip(VP), VPSchedule.linear(500).timesteps(10, "trailing"))
    with pytest.raises(InvalidTimestepsError, match=r"'flow/500' levels .* 'flow/1000' levels"):
        DraftRefineScheduler(FlowEulerSkip(FLOW), FlowSchedule(num_train_timesteps=500).timesteps(10))
    # a hand-made grid carries no kind and is only range-checked
    DraftRefineScheduler(DDIMSkip(VP), TimeGrid.from_levels([900.0, 500.0], -1.0))


def test_timesteps_of_two_dimensions_are_refused():
    with pytest.raises(InvalidTimestepsError, match=r"1-D sequence of levels, got shape \(1, 2\)"):
        DraftRefineScheduler(DDIMSkip(VP), [[900, 500]])


@pytest.mark.parametrize("steps", [50, 50.0, np.int64(50), torch.tensor(50)])
def test_a_number_of_steps_passed_as_timesteps_is_refused(steps):
    """``DraftRefineScheduler(tr, 50)`` means "50 steps" to a reader, but a 0-d value would be a one-step grid
    from level 50: refused everywhere a grid is made, pointing to schedule.timesteps(50) and to [50]."""
    match = r"got the single number 50(\.0)?\. .*transition\.schedule\.timesteps\(50\).*\[50(\.0)?\]"
    for make in (lambda: DraftRefineScheduler(DDIMSkip(VP), steps, width=4),
                 lambda: sample_serial(eps_model, x0(), DDIMSkip(VP), steps),
                 lambda: sample_step_skipping(eps_model, x0(), DDIMSkip(VP), steps, rounds=1),
                 lambda: PicardScheduler(DDIMSkip(VP), steps, width=4)):
        with pytest.raises(InvalidTimestepsError, match=match):
            make()
    with pytest.raises(InvalidTimestepsError) as info:  # a sigma: no timesteps(0.5) advice, only [0.5]
        DraftRefineScheduler(FlowEulerSkip(FLOW), 0.5)
    assert "timesteps(" not in str(info.value) and "[0.5]" in str(info.value)
    one_step = DraftRefineScheduler(DDIMSkip(VP), [50], width=4)  # a list of one level is a one-step grid
    assert len(one_step.grid) == 1 and float(one_step.grid.t_from[0]) == 50.0


def test_model_times_passed_as_flow_levels_are_named():
    """Flow levels are sigmas; sigma * N (the model time) in their place gets a hint, a level just above 1 not."""
    with pytest.raises(InvalidTimestepsError, match=r"1000 looks like a model time sigma \* N \(N = "
                                                    r"num_train_timesteps = 1000\): divide by N"):
        DraftRefineScheduler(FlowEulerSkip(FLOW), [1000.0, 500.0], width=2)
    with pytest.raises(InvalidTimestepsError) as info:
        DraftRefineScheduler(FlowEulerSkip(FLOW), [1.5, 0.5], width=2)
    assert "model time" not in str(info.value)


@pytest.mark.parametrize("shift", [0.001, 0.002])
def test_a_shift_so_small_its_first_sigma_rounds_above_one_is_named(shift):
    """diffusers' float32 shift formula puts sigma = 1 at 1.013 for shift 0.001: the schedule names the shift
    (not a level out of range the user never passed)."""
    with pytest.raises(InvalidArgumentError, match=rf"FlowSchedule\(shift={shift:g}\)\.timesteps\(10\) puts the "
                                                    r"first sigma at 1\.0\d+, above 1.*Use a larger shift"):
        FlowSchedule(shift=shift).timesteps(10)


@pytest.mark.parametrize("width", [np.int64(3), torch.tensor(3), 3])
def test_integer_widths_of_any_integer_type(width):
    sched = scheduler(width=width)
    assert sched.width == 3 and type(sched.width) is int


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    """The NaN/inf check the samplers run on every prediction, against torch.isfinite."""
    from driffusion_core.scheduler import all_finite

    big = torch.finfo(dtype).max
    base = torch.tensor([[big, -big, 0.0, -0.0], [1e-3, big, big, 3.0]], dtype=dtype)  # finite, sums would overflow
    cases = [base]
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in ((0, 0), (1, 3)):
            t = base.clone()
            t[pos] = bad
            cases.append(t)
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t


def test_vp_levels_that_look_like_sigmas_are_refused():
    """Fractions in [0, 1] handed to a 1000-step VP schedule: near-clean timesteps, surely a unit mix-up."""
    with pytest.raises(InvalidTimestepsError, match=r"look like sigmas or times in \[0, 1\].*training timesteps 0..999"):
        DraftRefineScheduler(DDIMSkip(VP), torch.linspace(1, 0, 21)[:-1])
    DraftRefineScheduler(DDIMSkip(VP), [1.0, 0.0])  # integer timesteps near the clean end are fine


@pytest.mark.parametrize("n", [1, 0, 2.5, True])
def test_flow_schedule_with_too_few_training_timesteps(n):
    with pytest.raises(InvalidArgumentError, match=r"num_train_timesteps must be an int >= 2.*t / 1000"):
        FlowSchedule(num_train_timesteps=n)


def test_x_of_an_integer_dtype_names_it():
    with pytest.raises(InvalidArgumentError, match=r"floating-point tensor .* got a torch.int64 tensor"):
        scheduler().sample(eps_model, torch.zeros(3, 2, dtype=torch.long))


def test_a_state_gone_non_finite_is_a_sampling_error_at_the_step_it_reaches():
    """Finite predictions overflow the float16 state (x0_hat = (x - sigma eps) / alpha at high noise, and the
    step's result with it); the next model call sees inf and returns NaN: reported as the sampler's state
    going bad, not as a broken model."""
    from driffusion_core import SamplingError

    huge = lambda x, t: torch.full_like(x, 6e4) + 0 * x  # noqa: E731  (finite on a finite input, NaN on inf)
    with pytest.raises(SamplingError, match=r"state reaching step \d+ .* already holds NaN or inf .*torch\.float16; sample in float32"):
        DraftRefineScheduler(DDIMSkip(VP), GRID, width=1).sample(huge, x0().half())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_intermediate_beyond_the_dtype_does_not_overflow_a_representable_step(dtype):
    """x0_hat = 6e4 from a sample model: eps_hat = (x - sqrt(abar) x0_hat) / sqrt(1 - abar) lies beyond
    float16's 65504 near the clean end, but every step's result (between x and x0_hat) does not. Computed
    in the state's dtype that intermediate made the sample inf (a spurious SamplingError); computed in
    float32 and rounded once, it is the float64 run's sample to the dtype's rounding."""
    x = x0().to(dtype)
    huge = lambda x, t: torch.full_like(x, 6e4)  # noqa: E731
    tr = DDIMSkip(VP, "sample")
    low = sample_serial(huge, x, tr, GRID).x
    wide = sample_serial(huge, x.double(), tr, GRID).x
    assert low.dtype == dtype
    assert torch.equal(DraftRefineScheduler(tr, GRID, width=3).sample(huge, x).x, low)
    torch.testing.assert_close(low.double(), wide, rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_a_predictor_that_writes_into_its_input_is_refused(mode):
    """A model that changes x in place would make the serial and the parallel sampler part ways silently; under
    torch.inference_mode too (no version counters there: the values' fingerprint shows it)."""
    schedule = VPSchedule.linear()
    grid = schedule.timesteps(8)

    def refused_everywhere(writer, x):
        """The serial sampler, step skipping, Picard and DRiffusion with both executors refuse ``writer``, and
        the caller's x is as it was (the samplers call the model on their own copy): fix the model, retry."""
        before = x.clone()
        with pytest.raises(PredictorOutputError, match="in place at step 0"):
            sample_serial(writer, x, DDIMSkip(schedule), grid)
        assert torch.equal(x, before)
        with pytest.raises(PredictorOutputError, match="in place at step 0"):
            sample_step_skipping(writer, x, DDIMSkip(schedule), grid, rounds=3)
        assert torch.equal(x, before)
        with pytest.raises(PredictorOutputError, match="in place"):
            PicardScheduler(DDIMSkip(schedule), grid, width=3).sample(writer, x)
        assert torch.equal(x, before)
        for executor in (None, BatchedExecutor()):
            with pytest.raises(PredictorOutputError, match="in place"):
                DraftRefineScheduler(DDIMSkip(schedule), grid, width=3, mode=mode).sample(writer, x, executor=executor)
            assert torch.equal(x, before)

    def in_place(x, t):
        x.mul_(1.0)  # even a no-op in-place write
        return 0.1 * x

    refused_everywhere(in_place, NoiseSource(0).initial((3, 2)))

    def halves(x, t):
        x.mul_(0.5)
        return 0.1 * x

    refused_everywhere(halves, NoiseSource(0).initial((3, 2)))  # a write that changes x: x is untouched

    # inference tensors have no version counter: a fingerprint of their values shows the write (a no-op write
    # changes nothing there, so the test halves x); a model that only reads samples as the serial sampler does
    with torch.inference_mode():
        xi = NoiseSource(0).initial((3, 2))
        refused_everywhere(halves, xi)
        with pytest.raises(PredictorOutputError, match=r"conditioning tensor cond\['scale'\] in place"):
            sample_serial(lambda x, t, scale: 0.1 * x * scale.add_(1.0)[:, None], xi, DDIMSkip(schedule), grid,
                          cond={"scale": torch.ones(3)})
        got = DraftRefineScheduler(DDIMSkip(schedule), grid, width=1, mode=mode).sample(lambda x, t: 0.1 * x, xi).x
        assert torch.equal(got, sample_serial(lambda x, t: 0.1 * x, xi, DDIMSkip(schedule), grid).x)


def test_a_predictor_that_writes_into_its_conditioning_is_refused():
    """A model that changes a conditioning tensor in place would see another conditioning on every later call
    under the serial executor (the batched one passes repeated copies): refused, naming the tensor and step."""
    schedule = VPSchedule.linear()
    grid = schedule.timesteps(8)

    def in_place(x, t, extra):
        extra["scale"].add_(1.0)
        return 0.1 * x * extra["scale"][:, None]

    def cond():
        return {"extra": {"scale": torch.ones(3)}}

    x = NoiseSource(0).initial((3, 2))
    with pytest.raises(PredictorOutputError, match=r"conditioning tensor cond\['extra'\]\['scale'\] in place at step 0"):
        sample_serial(in_place, x, DDIMSkip(schedule), grid, cond=cond())
    with pytest.raises(PredictorOutputError, match=r"cond\['extra'\]\['scale'\] in place at step 0"):
        DraftRefineScheduler(DDIMSkip(schedule), grid, width=3).sample(in_place, x, cond=cond())
    # batched: the repeat, a chunk within one draft's rows (a view) and, in a round of 3 drafts split in chunks
    # of 4 rows, chunks across drafts (copies of their rows only)
    def in_a_chunk(x, t, extra):
        return in_place(x, t, extra) if x.shape[0] == 4 else 0.1 * x * extra["scale"][:, None]

    for ex, writer in ((BatchedExecutor(), in_place), (BatchedExecutor(max_batch=2), in_place),
                       (BatchedExecutor(max_batch=4), in_a_chunk)):
        with pytest.raises(PredictorOutputError, match=r"cond\['extra'\]\['scale'\] in place"):
            DraftRefineScheduler(DDIMSkip(schedule), grid, width=3).sample(writer, x, cond=cond(), executor=ex)
    # reading it is fine, and the result is the serial sampler's
    reads = lambda x, t, extra: 0.1 * x * extra["scale"][:, None]  # noqa: E731
    got = DraftRefineScheduler(DDIMSkip(schedule), grid, width=1).sample(reads, x, cond=cond()).x
    assert torch.equal(got, sample_serial(reads, x, DDIMSkip(schedule), grid, cond=cond()).x)


def test_vmap_executor_says_why_a_predictor_fails_under_vmap():
    """The built-in oracles use data-dependent control flow, which torch.func.vmap refuses; the error keeps
    torch's type and message and says what to use instead."""
    f = ring_mixture().predictor(VP)
    with pytest.raises(Exception) as info:
        scheduler(width=3).sample(f, x0(), executor=BatchedExecutor(vmap=True))
    if HAS_NOTES:  # Python >= 3.11
        assert any("BatchedExecutor(vmap=True) runs the predictor under torch.func.vmap" in n and "BatchedExecutor()" in n
                   for n in notes(info.value)), notes(info.value)
    ref = scheduler(width=3).sample(f, x0()).x
    torch.testing.assert_close(scheduler(width=3).sample(f, x0(), executor=BatchedExecutor()).x, ref)


def test_vmap_executor_names_autograd_inside_the_predictor():
    """Guidance that takes a gradient inside the predictor cannot run under vmap: the note says so (not
    'data-dependent control flow'), and the concatenated batch runs it, equal to the serial executor."""
    lin = torch.nn.Linear(2, 2)

    def guided(x, t):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(xg.pow(2).sum(), xg)
        return (lin(x) + 0.1 * g).detach()

    with torch.no_grad():
        with pytest.raises(RuntimeError) as info:
            scheduler(width=3).sample(guided, x0(), executor=BatchedExecutor(vmap=True))
        if HAS_NOTES:
            assert any("uses autograd inside" in n and "BatchedExecutor()" in n for n in notes(info.value)), notes(info.value)
        torch.testing.assert_close(scheduler(width=3).sample(guided, x0(), executor=BatchedExecutor()).x,
                                   scheduler(width=3).sample(guided, x0()).x)


def test_vmap_note_is_only_added_to_vmap_failures():
    """An error of the predictor's own (here a KeyError) reaches the caller as under the serial executor,
    without the note about what torch.func.vmap refuses."""

    def missing_weight(x, t):
        raise KeyError("missing_weight")

    xs, ts = torch.randn(2, 3, 2), torch.zeros(2, 3)
    with pytest.raises(KeyError) as serial:
        SerialExecutor().evaluate(missing_weight, xs, ts)
    with pytest.raises(KeyError) as vmapped:
        BatchedExecutor(vmap=True).evaluate(missing_weight, xs, ts)
    assert str(vmapped.value) == str(serial.value)
    assert getattr(vmapped.value, "__notes__", []) == getattr(serial.value, "__notes__", [])


def test_chunked_batched_executor_accepts_the_outputs_unchunked_accepts():
    """With max_batch the chunks only need to agree with each other (what torch.cat needs): an output
    dtype other than x's comes back as from the serial executor and unchunked; chunks that disagree in
    dtype are a PredictorOutputError naming both."""
    xs, ts = torch.randn(3, 4, 2), torch.rand(3, 4) * 1000
    half = lambda x, t: (0.1 * x).half()  # noqa: E731
    ref = SerialExecutor().evaluate(half, xs, ts)
    for executor in (BatchedExecutor(), BatchedExecutor(max_batch=1), BatchedExecutor(max_batch=5)):
        out = executor.evaluate(half, xs, ts)
        assert out.dtype == ref.dtype and torch.equal(out, ref), executor.describe()

    def half_after_the_first_chunk(x, t):
        return 0.1 * x if bool((t == 900).any()) else (0.1 * x).half()

    xs, ts = torch.randn(2, 3, 2), torch.tensor([[900.0] * 3, [800.0] * 3])
    with pytest.raises(PredictorOutputError, match=r"returned torch\.float16 rows .*chunk of 3 rows.*torch\.float32 rows .*first chunk"):
        BatchedExecutor(max_batch=3).evaluate(half_after_the_first_chunk, xs, ts)


def test_reparameterize_refuses_a_parameterization_the_schedule_lacks():
    from driffusion_core import reparameterize

    f = ring_mixture().predictor(VP, "sample")
    with pytest.raises(InvalidArgumentError, match=r"reparameterize: a VPSchedule takes predictions .*got 'velocity'"):
        reparameterize(f, VP, "sample", "velocity")
    assert reparameterize(f, VP, "sample", "sample") is f


def test_reparameterize_inside_a_rescaling_wrapper_is_refused():
    """A model that takes times in [0, 1] is rescaled inside reparameterize; put outside, reparameterize sees
    times in [0, 1] and would read them as levels near the clean end (a VP sample 1e32 off, a flow one NaN).
    Refused at once, naming the order; the right order samples as the model's own parameterization does, and
    a real grid's small times at its clean end (after larger ones) are taken."""
    from driffusion_core import FlowSchedule, reparameterize
    from solvers import FlowEulerSkip

    x = NoiseSource(0).initial((8, 2))
    for schedule, transition, make_unit in (
        (VP, DDIMSkip, lambda f: (lambda x, u: f(x, (u * 1000 - 1).round()))),
        (FlowSchedule(shift=3.0), FlowEulerSkip, lambda f: (lambda x, s: f(x, s * 1000))),
    ):
        oracle = ring_mixture().predictor(schedule, "sample")
        unit = make_unit(oracle)  # "my model takes t in [0, 1]"
        rescale = (lambda t: (t + 1) / 1000) if schedule is VP else (lambda t: t / 1000)
        grid = schedule.timesteps(10, "trailing") if schedule is VP else schedule.timesteps(10)
        wrong_inner = reparameterize(unit, schedule, "sample", transition(schedule).prediction.value)
        with pytest.raises(InvalidArgumentError, match=r"reparameterize .*in \[0, 1\].*Put it inside: "
                                                       r"reparameterize\(lambda x, t, \*\*c: model\(x, t / 1000"):
            sample_serial(lambda x, t: wrong_inner(x, rescale(t)), x, transition(schedule), grid)
        right = reparameterize(lambda x, t: unit(x, rescale(t)), schedule, "sample", transition(schedule).prediction.value)
        ref = sample_serial(oracle, x, transition(schedule, prediction="sample"), grid).x
        torch.testing.assert_close(sample_serial(right, x, transition(schedule), grid).x, ref, rtol=1e-4, atol=1e-4)
    # after a time above 1, a fractional time in [0, 1] (a grid's clean end) is a real level
    f = reparameterize(ring_mixture().predictor(VP, "sample"), VP, "sample", "epsilon")
    f(x, torch.full((8,), 999))
    f(x, torch.full((8,), 0.5, dtype=torch.float64))

    # a schedule whose own model times lie in [0, 1] (continuous time u = (level + 1) / N) is not refused
    class UnitTimeVP(type(VP)):
        def model_time(self, t):
            return ((torch.as_tensor(t, dtype=torch.float64) + 1) / self.num_train_timesteps).float()

        def level_of_model_time(self, t):
            return torch.as_tensor(t, dtype=torch.float64) * self.num_train_timesteps - 1

    unit = UnitTimeVP(VP.alphas_cumprod)
    oracle = ring_mixture().predictor(VP, "sample")
    model_u = lambda z, u: oracle(z, (u.double() * 1000 - 1).round())  # noqa: E731
    grid = unit.timesteps(10, "trailing")
    got = sample_serial(reparameterize(model_u, unit, "sample", "epsilon"), x, DDIMSkip(unit), grid).x
    torch.testing.assert_close(got, sample_serial(model_u, x, DDIMSkip(unit, prediction="sample"), grid).x,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::driffusion_core.errors.MeanStepWarning")  # the mean step is not the point here
def test_argument_checks_at_their_edges():
    """Bool tensors are not counts; numpy and tensor integers index a grid; a chunk in another dtype is a
    DeviceMismatchError as unchunked; a stochastic window going back up is refused in every row; 0-d tensor
    reals are taken for eta and shift."""
    for bad in (torch.tensor(True), np.bool_(True)):
        with pytest.raises(InvalidWidthError):
            scheduler(width=bad)
    x, e = x0(), x0() * 0.5
    grid = VP.timesteps(6)
    tr = DDPMSkip(VP)
    for i in (np.int64(3), torch.tensor(3)):
        assert torch.equal(tr.grid_step(x, e, grid, i, noise=torch.zeros_like(x)), tr.grid_step(x, e, grid, 3, noise=torch.zeros_like(x)))
    as_double = lambda x, t: (0.1 * x).double()  # noqa: E731
    with pytest.raises(DeviceMismatchError) as unchunked:
        scheduler(width=2).sample(as_double, x0(), executor=BatchedExecutor())
    with pytest.raises(DeviceMismatchError) as chunked:
        scheduler(width=2).sample(as_double, x0(), executor=BatchedExecutor(max_batch=1))
    assert str(chunked.value) == str(unchunked.value)
    window_from, window_to = torch.tensor([900.0, 800.0, 700.0], dtype=torch.float64), torch.tensor([800.0, 950.0, 600.0], dtype=torch.float64)
    with pytest.raises(InvalidTimestepsError, match=r"t_to = 950 lies above t_from = 800"):
        tr.drafts(x, e, window_from, window_to)
    with pytest.raises(InvalidTimestepsError, match=r"NaN or inf"):
        tr.drafts(x, e, window_from, torch.tensor([800.0, float("nan"), 600.0], dtype=torch.float64))
    assert DDIMSkip(VP, eta=torch.tensor(0.5)).eta == 0.5 and FlowSchedule(torch.tensor(3.0), np.int64(1000)).shift == 3.0


def test_pipeline_argument_errors_are_type_errors_too():
    from driffusion_core import UnexpectedArgumentError

    assert issubclass(UnexpectedArgumentError, InvalidArgumentError) and issubclass(UnexpectedArgumentError, TypeError)


# --------------------------------------------------------------------------- found in review


def test_grid_model_times_that_are_not_finite_are_named():
    with pytest.raises(InvalidTimestepsError, match=r"model_times\[1\] is nan"):
        TimeGrid.from_levels([0.9, 0.5], 0.0, model_times=torch.tensor([900.0, float("nan")]))


@pytest.mark.parametrize("make,match", [
    (lambda: ClipSample(float("nan")), "clip_range"),
    (lambda: ClipSample("1"), "clip_range"),
    (lambda: ClipSample(0), "clip_range"),
    (lambda: DynamicThreshold(max_value=0), "max_value"),
    (lambda: DynamicThreshold(max_value=float("inf")), "max_value"),
    (lambda: DynamicThreshold(ratio="0.9"), "ratio"),
    (lambda: DynamicThreshold(ratio=0.0), "ratio"),
])
def test_x0_transforms_refuse_values_that_would_make_nan(make, match):
    with pytest.raises(InvalidArgumentError, match=match):
        make()


@pytest.mark.parametrize("kwargs,match", [
    (dict(weights=[1.0, -1.0]), "weights"),
    (dict(weights=[0.0, 0.0]), "weights"),
    (dict(weights=[1.0, 1.0, 1.0]), r"weights must be \[M\] = \[2\]"),
    (dict(variances=float("nan")), "variances"),
    (dict(variances=[0.1, 0.0]), "variances"),
    (dict(variances=[0.1, 0.2, 0.3]), r"variances must be"),
])
def test_gaussian_mixture_refuses_what_has_no_density(kwargs, match):
    from solvers import GaussianMixture

    with pytest.raises(InvalidArgumentError, match=match):
        GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), **kwargs)


def test_operator_levels_as_lists_or_arrays_equal_tensors_and_non_numbers_are_named():
    S, x, p = DDIMSkip(VP), x0(), 0.1 * x0()
    ref = S(x, p, torch.tensor([500.0, 400.0, 300.0]), 200)
    assert torch.equal(S(x, p, [500, 400, 300], 200), ref)
    assert torch.equal(S(x, p, np.array([500, 400, 300]), 200), ref)
    for bad in (None, "500"):
        with pytest.raises(InvalidArgumentError, match="Levels must be numbers"):
            S(x, p, bad, 200)


def test_noise_source_steps_of_an_empty_or_reversed_range():
    z = NoiseSource(0).steps(3, 3, (2, 4))
    assert z.shape == (0, 2, 4)
    torch.testing.assert_close(NoiseSource(0).steps(2, 4, (2, 4)), torch.stack([NoiseSource(0)(i, (2, 4)) for i in (2, 3)]),
                               rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="stop"):
        NoiseSource(0).steps(3, 2, (2,))


@pytest.mark.parametrize("n", [1000, 100, 37])
def test_trailing_grids_have_the_steps_asked_for(n):
    """Every T in 1..N: T strictly decreasing training timesteps from N - 1, the ones diffusers' formula lists
    (np.arange rounds up to one more entry, at -1, for some T; that entry is dropped)."""
    schedule = VPSchedule.linear(n)
    for T in range(1, n + 1):
        grid = schedule.timesteps(T, "trailing")
        listed = (np.round(np.arange(n, 0, -n / T)).astype(np.int64) - 1).tolist()
        assert len(grid) == T and grid.model_times.tolist() == listed[:T]
        assert grid.t_from[0] == n - 1 and grid.t_to[-1] == -1 and grid.t_from[-1] >= 0


def test_exception_text_survives_an_exception_whose_str_raises():
    from driffusion_core.errors import exception_text

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    assert exception_text(ValueError("bad shape")) == "ValueError: bad shape"
    text = exception_text(Unprintable("payload"))
    assert text.startswith("Unprintable: ") and "its str() raised RuntimeError" in text and "payload" in text


def test_grid_step_of_zero_length_is_refused():
    """t_to == t_from is not a step to a cleaner level: the model would be called and the state not moved."""
    t = torch.tensor([500.0, 300.0], dtype=torch.float64)
    with pytest.raises(InvalidTimestepsError, match=r"Step 1 goes from level 300 to 300"):
        TimeGrid(t, torch.tensor([300.0, 300.0], dtype=torch.float64), t.long())


def test_a_stochastic_transition_without_chain_factors_says_what_to_implement():
    """A custom stochastic transition that defines only its step runs at width 1; wider, the drafts need its
    chain factors, and the error says so (not that the transition is deterministic)."""
    from driffusion_core import SkipTransition

    class OnlyTheStep(DDPMSkip):
        chain_factors = SkipTransition.chain_factors

    tr, grid = OnlyTheStep(VP), VP.timesteps(6)
    x = x0()
    one = DraftRefineScheduler(tr, grid, width=1).sample(eps_model, x, noise=NoiseSource(1))
    assert torch.equal(one.x, sample_serial(eps_model, x, DDPMSkip(VP), grid, noise=NoiseSource(1)).x)
    with pytest.raises(NotImplementedError, match=r"OnlyTheStep is stochastic but does not define chain_factors"):
        DraftRefineScheduler(tr, grid, width=3).sample(eps_model, x, noise=NoiseSource(1))
    with pytest.raises(NotImplementedError, match=r"FlowEulerSkip is deterministic"):
        FlowEulerSkip(FLOW).chain_factors(grid.t_from[:2], grid.t_to[:2])


# ----------------------------------------------------------------- grids, schedules and noise: argument checks


def _time_recording(model, seen):
    """``model`` that also records the model times it is called with."""
    def f(x, t, **cond):
        seen.append(t.clone())
        return model(x, t, **cond)
    return f


def _flow_model(x, t, **cond):
    return 0.1 * x + 1e-3 * t.to(x.dtype)[:, None]  # depends on t: a wrong model time changes the sample


def _vp_model(x, t, **cond):
    return 0.1 * x + 1e-4 * t.to(x.dtype)[:, None]


@pytest.mark.parametrize("kind", ["vp", "flow", "ve"])
def test_grid_from_levels_without_model_times_samples_as_the_list_of_levels(kind):
    """TimeGrid.from_levels(levels, final) without model_times calls the model as the plain list does (VP: the
    training timestep, flow: sigma * 1000, VE: sigma), not with the levels themselves."""
    schedule, transition, model = {
        "vp": (VP, DDIMSkip(VP), _vp_model),
        "flow": (FlowSchedule(3.0), FlowEulerSkip(FlowSchedule(3.0)), _flow_model),
        "ve": (VESchedule(), VEEulerSkip(VESchedule()), _flow_model),
    }[kind]
    levels = [80.0, 20.0, 5.0, 1.0] if kind == "ve" else schedule.timesteps(6).t_from
    x = NoiseSource(0).initial((8, 2))
    grid = TimeGrid.from_levels(levels, schedule.terminal_level)
    seen_list, seen_grid = [], []
    ref = sample_serial(_time_recording(model, seen_list), x, transition, levels)
    out = sample_serial(_time_recording(model, seen_grid), x, transition, grid)
    assert [t.tolist() for t in seen_grid] == [t.tolist() for t in seen_list]
    assert all(a.dtype == b.dtype for a, b in zip(seen_grid, seen_list))
    assert torch.equal(out.x, ref.x)
    if kind == "flow":  # the model is called with sigma * 1000, not sigma
        assert float(seen_grid[0][0]) == pytest.approx(1000.0 * float(levels[0]))
    wide = DraftRefineScheduler(transition, grid, width=3)
    assert torch.equal(wide.sample(model, x).x, DraftRefineScheduler(transition, levels, width=3).sample(model, x).x)
    assert grid.model_times_from_schedule and wide.grid.kind == schedule.kind
    assert not wide.grid.model_times_from_schedule and wide.grid.model_times.dtype == seen_list[0].dtype


def test_grid_from_levels_with_model_times_passes_them_through():
    fe = FlowEulerSkip(FlowSchedule(3.0))
    levels = FlowSchedule(3.0).timesteps(4).t_from
    given = torch.tensor([7.0, 5.0, 3.0, 1.0])
    grid = TimeGrid.from_levels(levels, 0.0, model_times=given)
    assert not grid.model_times_from_schedule
    seen = []
    sample_serial(_time_recording(_flow_model, seen), NoiseSource(0).initial((2, 2)), fe, grid)
    assert [float(t[0]) for t in seen] == given.tolist()
    assert torch.equal(fe.make_grid(grid).model_times, given)
    assert fe.make_grid(grid.sub(1, 3)).model_times.tolist() == [5.0, 3.0]


@pytest.mark.parametrize(
    "mu, match",
    [
        (1000, r"mu=1000 is too large: exp\(mu\) overflows"),
        ("1", r"mu must be a finite real number.*got str '1'"),
        (float("nan"), r"mu must be a finite real number.*got float nan"),
        (float("inf"), r"mu must be a finite real number.*got float inf"),
        (-1000, r"mu=-1000\) puts step 0 at sigma nan: a mu this negative"),
        (-200, r"mu=-200\) puts steps 1 and 2 at the same float32 sigma 0: a mu this negative"),
        (40, r"mu=40\) puts steps 0 and 1 at the same float32 sigma 1: a mu this large"),
    ],
)
def test_flow_dynamic_shift_mu_is_checked(mu, match):
    with pytest.raises(InvalidArgumentError, match=match):
        FlowSchedule(use_dynamic_shifting=True).timesteps(5, mu=mu)


def test_flow_dynamic_shift_with_a_usual_mu_is_unchanged():
    """The checks leave diffusers' formula alone: exp(mu) / (exp(mu) + 1 / sigma - 1) in float32."""
    import math

    grid = FlowSchedule(use_dynamic_shifting=True).timesteps(5, mu=0.8)
    sigma_min = float(np.float32(1) / np.float32(1000))  # the float32 training sigma at t = 1, as diffusers
    sig = np.linspace(1000.0, sigma_min * 1000, 5) / 1000
    ref = (math.exp(0.8) / (math.exp(0.8) + (1 / sig - 1))).astype(np.float32)
    assert grid.t_from.tolist() == torch.from_numpy(ref).double().tolist()


@pytest.mark.parametrize(
    "shift, match",
    [
        (1e30, r"shift=1e\+30\)\.timesteps\(5\) puts steps 0 and 1 at the same float32 sigma 1.*Use a smaller shift"),
        (1e-30, r"shift=1e-30\)\.timesteps\(5\) puts step 0 at sigma nan.*Use a larger shift"),
    ],
)
def test_flow_shift_that_collapses_the_grid_is_named(shift, match):
    with pytest.raises(InvalidArgumentError, match=match):
        FlowSchedule(shift=shift).timesteps(5)


@pytest.mark.parametrize("shift", ["3", float("nan"), float("inf"), 0.0, -1.0, True])
def test_flow_shift_of_the_wrong_value_is_refused(shift):
    with pytest.raises(InvalidArgumentError, match=r"shift must be a positive finite number"):
        FlowSchedule(shift=shift)
    schedule = FlowSchedule()
    schedule.shift = shift  # set later: timesteps() checks it too
    with pytest.raises(InvalidArgumentError, match=r"shift must be a positive finite number"):
        schedule.timesteps(5)


@pytest.mark.parametrize("offset", [1.5, -1, "1", True, None])
def test_vp_steps_offset_must_be_a_non_negative_int(offset):
    with pytest.raises(InvalidArgumentError, match=r"steps_offset must be an int >= 0.*got"):
        VP.timesteps(10, steps_offset=offset)


def test_vp_steps_offset_past_the_last_timestep_is_named():
    assert VP.timesteps(10, steps_offset=99).t_from[0] == 999
    assert VP.timesteps(10, steps_offset=1).t_from.tolist() == [901.0 - 100 * k for k in range(10)]
    with pytest.raises(InvalidArgumentError, match=r"steps_offset=100 puts the first of 10 leading timesteps at "
                                                   r"1000.*at most 99"):
        VP.timesteps(10, steps_offset=100)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: TimeGrid.from_levels(torch.tensor([0.9, 0.5], dtype=torch.complex64), 0.0),
         r"from_levels: levels must be real numbers.*complex64"),
        (lambda: TimeGrid.from_levels([0.9 + 1j, 0.5], 0.0), r"from_levels: levels must be real numbers.*complex"),
        (lambda: TimeGrid.from_levels([True, False], -1.0), r"from_levels: levels must be real numbers.*bool"),
        (lambda: TimeGrid.from_levels(np.array([0.9, 0.5], dtype=np.complex128), 0.0),
         r"levels must be real numbers.*complex128"),
        (lambda: TimeGrid.from_levels([0.9, 0.5], 0.0, model_times=torch.tensor([True, False])),
         r"from_levels: model_times must be real numbers.*torch\.bool"),
        (lambda: TimeGrid.from_levels([0.9, 0.5], 0.0, model_times=[900j, 500]),
         r"from_levels: model_times must be real numbers.*complex"),
        (lambda: TimeGrid(torch.tensor([1 + 0j, 0j]), torch.tensor([0j, -1 + 0j]), torch.tensor([1, 0])),
         r"TimeGrid\.t_from must be real numbers.*complex64"),
        (lambda: TimeGrid(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([True, False])),
         r"TimeGrid\.model_times must be real numbers.*torch\.bool"),
        (lambda: TimeGrid.from_levels(["a", "b"], 0.0), r"from_levels takes a 1-D sequence of numbers"),
    ],
)
def test_grid_levels_and_model_times_must_be_real(build, match):
    with pytest.raises(InvalidTimestepsError, match=match):
        build()


@pytest.mark.parametrize("levels", [[900 + 0j, 500], [True, False], np.array([0.9, 0.5], dtype=np.complex64)])
def test_a_list_of_bool_or_complex_levels_is_refused(levels):
    with pytest.raises(InvalidTimestepsError, match=r"Timesteps must be real numbers"):
        sample_serial(eps_model, x0(), DDIMSkip(VP), levels)


@pytest.mark.parametrize("step", [1.5, "1", None, True, -2, torch.tensor(1.0)])
def test_noise_step_index_must_be_an_int(step):
    with pytest.raises(InvalidArgumentError, match=r"NoiseSource: the step index must be an int >= 0"):
        NoiseSource(0)(step, (2, 2))


@pytest.mark.parametrize("sigma_max", ["80", True, torch.tensor([80.0, 90.0]), float("nan"), 0])
def test_ve_schedule_sigma_max_must_be_a_positive_number(sigma_max):
    from solvers.ve import VESchedule

    with pytest.raises(InvalidArgumentError, match="sigma_max must be a positive number"):
        VESchedule(sigma_max)


_BN_MODEL = None
model_in_training = None


def test_batched_executor_refuses_a_model_with_batchnorm_in_training_mode():
    """BatchNorm in training mode normalises over the whole batch: one batched call of a round's drafts would
    differ from the serial executor's calls. Refused naming the layer, with the fix, also behind a lambda, a
    closure, a default argument, a partial, a bound method or a callable holder, when the layer runs (a
    model in training mode that the predictor reaches but does not call is no reason); in eval mode it runs,
    as the serial executor does."""
    from backends import BatchedExecutor

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(2)

        def forward(self, x, t):
            return self.norm(x) * 0.1

    model = Model()
    xs, ts = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(3, 4)
    for ex in (BatchedExecutor(), BatchedExecutor(vmap=True), BatchedExecutor(max_batch=2)):
        with pytest.raises(InvalidArgumentError, match=r"BatchNorm layer 'Model.norm' is in training mode.*model.eval\(\)"):
            ex.evaluate(model, xs, ts)
    # behind the wrappers a script writes: a lambda over a global or a closure, a default argument, a partial,
    # a bound method, a callable object holding the model
    import functools

    global _BN_MODEL
    _BN_MODEL = model

    def closure(m):
        return lambda x, t: m(x, t)

    class Holder:
        def __init__(self, m):
            self.net = m

        def __call__(self, x, t):
            return self.net(x, t)

    wrapped = [lambda x, t: _BN_MODEL(x, t), closure(model), lambda x, t, m=model: m(x, t),
               functools.partial(lambda x, t, m: m(x, t), m=model), model.forward, Holder(model)]
    for predictor in wrapped:
        with pytest.raises(InvalidArgumentError, match=r"BatchNorm layer 'Model.norm' is in training mode"):
            BatchedExecutor().evaluate(predictor, xs, ts)
    BatchedExecutor().evaluate(wrapped[0], xs[:1], ts[:1])  # one draft: nothing to mix, no refusal
    # a layer that normalises with batch statistics but does not run is not refused: a global of that name
    # beside an attribute access, a container whose other member is used
    global model_in_training
    model_in_training = model

    class Holder2:
        model_in_training = torch.nn.Identity()

    holder = Holder2()
    assert torch.equal(BatchedExecutor().evaluate(lambda x, t: holder.model_in_training(x), xs, ts), xs)

    class Container(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.denoiser, self.classifier = torch.nn.Identity(), model

        def eps(self, x, t):
            return self.denoiser(x)

    assert torch.equal(BatchedExecutor().evaluate(Container().eps, xs, ts), xs)

    class Proxy:  # a callable whose __getattr__ raises KeyError (a registry / config proxy)
        def __call__(self, x, t):
            return x

        def __getattr__(self, name):
            raise KeyError(name)

    assert torch.equal(BatchedExecutor().evaluate(Proxy(), xs, ts), xs)
    # running statistics switched off: batch statistics in eval mode too
    no_stats = Model()
    no_stats.norm = torch.nn.BatchNorm1d(2, track_running_stats=False)
    no_stats.eval()
    with pytest.raises(InvalidArgumentError, match=r"'Model.norm' has track_running_stats=False"):
        BatchedExecutor().evaluate(no_stats, xs, ts)
    # ... unless each call sees one draft's rows only: under vmap, or in chunks of exactly B rows
    for ex in (BatchedExecutor(vmap=True), BatchedExecutor(max_batch=xs.shape[1])):
        torch.testing.assert_close(ex.evaluate(no_stats, xs, ts), SerialExecutor().evaluate(no_stats, xs, ts))
    # ... and a single draft split into chunks smaller than B would normalise each chunk by itself
    for m in (model, no_stats):
        for rows in (2, 3):
            with pytest.raises(InvalidArgumentError, match=r"or split the batch, with max_batch below the batch size"):
                BatchedExecutor(max_batch=rows).evaluate(m, xs[:1], ts[:1])
        BatchedExecutor(max_batch=xs.shape[1] + 1).evaluate(m, xs[:1], ts[:1])
    # a model named after many other global loads is still found (each global name counted once)
    def crowded(x, t):
        y = torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x)
        y = y + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x)
        y = y + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x)
        y = y + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x)
        y = y + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x)
        y = y + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x)
        y = y + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x)
        y = y + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x) + torch.zeros_like(x)
        return y + _BN_MODEL(x, t)

    model.train()
    with pytest.raises(InvalidArgumentError, match=r"BatchNorm layer 'Model.norm' is in training mode"):
        BatchedExecutor().evaluate(crowded, xs, ts)
    model.eval()
    torch.testing.assert_close(BatchedExecutor().evaluate(model, xs, ts), SerialExecutor().evaluate(model, xs, ts))
    for predictor in wrapped:
        torch.testing.assert_close(BatchedExecutor().evaluate(predictor, xs, ts), SerialExecutor().evaluate(model, xs, ts))


@pytest.mark.parametrize("shape", [(True, 3), True, [2, False]])
def test_noise_shape_of_bools_is_refused(shape):
    with pytest.raises(InvalidArgumentError, match=r"a bool is not a dimension"):
        NoiseSource(0)(0, shape)


def test_schedule_levels_given_as_bools_are_refused():
    """alpha_bar(True) is not level 1: a bool level is refused, as a grid's bool levels are."""
    with pytest.raises(InvalidTimestepsError, match="levels must be real numbers"):
        VPSchedule.linear().alpha_bar(True)
    with pytest.raises(InvalidTimestepsError, match="levels must be real numbers"):
        FlowSchedule().alpha_sigma(torch.tensor([True]))


def test_noise_step_index_takes_ints_of_any_kind():
    ns = NoiseSource(3)
    ref = ns(4, (2, 2))
    for step in (np.int64(4), torch.tensor(4)):
        assert torch.equal(ns(step, (2, 2)), ref)
    assert torch.equal(ns(-1, (2, 2)), ns.initial((2, 2)))


def test_per_sample_noise_keeps_the_leading_rows_when_the_batch_grows():
    """As documented: row b depends on b, the seed and the step only. A batch's leading rows keep their noise
    when it grows; a slice that does not start at row 0 is not the same rows drawn as a batch of their own."""
    ns = NoiseSource(5, per_sample=True)
    for step in (-1, 0, 7):
        big = ns(step, (8, 3))
        for b in range(1, 8):
            assert torch.equal(ns(step, (b, 3)), big[:b])
        assert not torch.equal(big[3:], ns(step, (5, 3)))
        assert torch.equal(big[3], ns(step, (4, 3))[3])
    assert not torch.equal(ns(0, (4, 3)), NoiseSource(6, per_sample=True)(0, (4, 3)))
    assert not torch.equal(ns(0, (4, 3)), ns(1, (4, 3)))


@pytest.mark.parametrize("executor", [BatchedExecutor(), BatchedExecutor(max_batch=2)], ids=["one-call", "chunked"])
def test_batched_executor_refuses_a_write_into_its_repeated_conditioning(executor):
    """BatchedExecutor hands the predictor repeated copies of the conditioning, so the sampler's own check (on
    the caller's tensors) cannot see a write; the executor watches its copies and refuses it as SerialExecutor's
    run does. A predictor that only reads gives SerialExecutor's result."""
    schedule = VPSchedule.linear()
    grid = schedule.timesteps(8)

    def in_place(x, t, extra):
        extra["scale"].mul_(1.0)  # even a no-op write
        return 0.1 * x * extra["scale"][:, None]

    def cond():
        return {"extra": {"scale": torch.ones(3)}}

    x = NoiseSource(0).initial((3, 2))
    with pytest.raises(PredictorOutputError, match=r"cond\['extra'\]\['scale'\] in place"):
        DraftRefineScheduler(DDIMSkip(schedule), grid, width=3).sample(in_place, x, cond=cond(), executor=executor)
    reads = lambda x, t, extra: 0.1 * x * extra["scale"][:, None]  # noqa: E731
    ref = DraftRefineScheduler(DDIMSkip(schedule), grid, width=3).sample(reads, x, cond=cond()).x
    got = DraftRefineScheduler(DDIMSkip(schedule), grid, width=3).sample(reads, x, cond=cond(), executor=executor).x
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("executor", [SerialExecutor(), BatchedExecutor()], ids=["serial", "batched"])
def test_executor_evaluate_checks_its_arguments(executor):
    """evaluate(predictor, xs [K, B, ...], ts [K, B], cond): a ts of one time per draft, a state without the
    draft axis, or a cond that is not a mapping is named with the shape expected."""
    f = lambda x, t: 0.1 * x  # noqa: E731
    xs, ts = torch.zeros(3, 2, 4), torch.full((3, 2), 500.0)
    with pytest.raises(InvalidArgumentError, match=r"ts must be a tensor \[K, B\] = \[3, 2\].*got shape \[3\]"):
        executor.evaluate(f, xs, ts[:, 0])
    with pytest.raises(InvalidArgumentError, match=r"xs must be a tensor \[K, B, \.\.\.\].*got shape \[4\]"):
        executor.evaluate(f, torch.zeros(4), ts)
    with pytest.raises(InvalidArgumentError, match="xs holds no drafts"):
        executor.evaluate(f, torch.zeros(0, 2, 4), torch.zeros(0, 2))
    with pytest.raises(InvalidArgumentError, match="cond must be a mapping.*got list"):
        executor.evaluate(f, xs, ts, [1, 2])
    # the arguments as defined: K calls' worth of predictions, one per draft
    torch.testing.assert_close(executor.evaluate(f, xs + 1, ts), 0.1 * (xs + 1))


@pytest.mark.parametrize("vmap", ["yes", 1, None])
def test_batched_executor_vmap_must_be_a_bool(vmap):
    with pytest.raises(InvalidArgumentError, match="vmap must be True or False"):
        BatchedExecutor(vmap=vmap)
    assert BatchedExecutor(vmap=np.bool_(False)).vmap is False


@pytest.mark.skipif(not HAS_NOTES, reason="exception notes (add_note) need Python >= 3.11")
@pytest.mark.parametrize("labels", [[0, 1, 2], np.arange(3)], ids=["list", "numpy"])
def test_batched_executor_names_per_sample_conditioning_that_is_not_a_tensor(labels):
    """BatchedExecutor repeats only tensors along the batch; a model that checks its per-sample labels (a list or
    numpy array, one per row) fails on K * B rows, and the error gets a note saying what to pass instead.
    SerialExecutor, one draft per call, runs it."""

    def f(x, t, labels):
        if len(labels) != x.shape[0]:
            raise ValueError(f"{len(labels)} labels for {x.shape[0]} rows")
        return 0.1 * x

    x = NoiseSource(0).initial((3, 2))
    with pytest.raises(ValueError) as info:
        scheduler(width=3).sample(f, x, cond={"labels": labels}, executor=BatchedExecutor())
    assert any("cond['labels'] is a" in n and "repeats only tensors" in n and "torch.as_tensor" in n
               for n in notes(info.value)), notes(info.value)
    scheduler(width=3).sample(f, x, cond={"labels": labels})  # the serial executor runs it


def test_an_executor_that_returns_too_few_drafts_is_named():
    """A custom executor that drops a draft is the executor's fault, not the predictor's: ExecutorError with
    the counts (the predictions of each draft are still shaped like the state)."""
    from driffusion_core import ExecutorError

    class DropsOne(SerialExecutor):
        def evaluate(self, predictor, xs, ts, cond=None):
            out = super().evaluate(predictor, xs, ts, cond)
            return out[:-1] if out.shape[0] > 1 else out

    f = lambda x, t: 0.1 * x  # noqa: E731
    with pytest.raises(ExecutorError, match=r"predictions for 2 draft\(s\) at steps .*, but the round has 3"):
        scheduler(width=3).sample(f, x0(), executor=DropsOne())


def test_draft_refine_state_checks_width_mode_and_rounds():
    """The state machine a custom driver runs (plan / absorb) refuses a bad width or mode, and a round that is
    not the one it planned (stale, absorbed twice, or before any plan), instead of refining from wrong steps."""
    from driffusion_core.scheduler import DraftRefineState

    tr, grid = DDIMSkip(VP), VP.timesteps(10)
    x = x0()
    with pytest.raises(InvalidWidthError, match="width must be an int >= 1"):
        DraftRefineState(tr, grid, 0, "aggressive", x, None)
    with pytest.raises(InvalidArgumentError, match="mode must be 'aggressive' or 'conservative'"):
        DraftRefineState(tr, grid, 2, "greedy", x, None)
    f = lambda x, t: 0.1 * x  # noqa: E731
    st = DraftRefineState(tr, grid, 3, "aggressive", x, None)
    first = st.plan()
    with pytest.raises(InvalidArgumentError, match="no round is planned now"):
        DraftRefineState(tr, grid, 3, "aggressive", x, None).absorb(first, f(first.xs, None))
    st.absorb(first, f(first.xs, None))
    with pytest.raises(InvalidArgumentError, match="no round is planned now"):
        st.absorb(first, f(first.xs, None))  # twice
    second = st.plan()
    with pytest.raises(InvalidArgumentError, match="a stale round"):
        st.absorb(first, f(first.xs, None))
    st.absorb(second, f(second.xs, None))
    while (rnd := st.plan()) is not None:  # driven to the end by hand: the scheduler's sample
        with pytest.raises(InvalidArgumentError, match=r"got None, not a Round: pass the round plan\(\) returned"):
            st.absorb(None, f(rnd.xs, None))
        st.absorb(rnd, f(rnd.xs, None))
    with pytest.raises(InvalidArgumentError, match=r"no round is planned now .*sampling is done"):
        st.absorb(None, torch.zeros(1, *x.shape))  # after the last round: refused, not an AttributeError
    ref = DraftRefineScheduler(tr, grid, width=3).sample(f, x)
    assert torch.equal(st.x, ref.x) and st.rounds == ref.rounds


def test_levels_outside_a_schedule_are_refused_not_clamped():
    """alpha-bar / alpha, sigma at a level past the schedule's range (model times or another schedule's levels
    passed as levels) are refused, where clamping or extrapolating would give a wrong value silently."""
    assert torch.equal(VP.alpha_bar(torch.tensor([999.0, -1.0, 0.5]))[:2], torch.tensor([VP.alphas_cumprod[-1], 1.0]))
    for call in (lambda: VP.alpha_bar(5000), lambda: VP.alpha_bar(float("nan")), lambda: FLOW.alpha_sigma(2.0),
                 lambda: FLOW.alpha_sigma(-0.5), lambda: VESchedule(sigma_max=10).alpha_sigma(20.0)):
        with pytest.raises(InvalidTimestepsError, match="outside .*Schedule's levels"):
            call()
    small = VPSchedule.linear(500)
    f = ring_mixture().predictor(small)  # an oracle of a 500-step table, called at a 1000-step grid's time
    with pytest.raises(InvalidTimestepsError, match="level_of_model_time"):
        f(x0(), torch.full((3,), 999.0))


def test_draft_refine_state_checks_its_inputs():
    """The low-level state machine checks what DraftRefineScheduler.sample checks: the grid (its kind, made a
    TimeGrid from a list), x, the noise a stochastic transition needs, and start."""
    from driffusion_core.scheduler import DraftRefineState

    x = x0()
    with pytest.raises(InvalidTimestepsError, match="levels"):
        DraftRefineState(DDIMSkip(VP), FLOW.timesteps(5), 2, "aggressive", x, None)
    with pytest.raises(InvalidArgumentError, match="NaN or inf"):
        DraftRefineState(DDIMSkip(VP), GRID, 2, "aggressive", torch.full((2, 2), float("nan")), None)
    with pytest.raises(InvalidArgumentError, match="stochastic.*NoiseSource"):
        DraftRefineState(DDPMSkip(VP), GRID, 2, "aggressive", x, None)
    with pytest.raises(InvalidArgumentError, match="noise must be a NoiseSource"):
        DraftRefineState(DDPMSkip(VP), GRID, 2, "aggressive", x, 3)
    for start in (1.5, True, 10, -1):
        with pytest.raises(InvalidArgumentError, match="start"):
            DraftRefineState(DDIMSkip(VP), GRID, 2, "aggressive", x, None, start=start)
    level = GRID.t_from[0]
    for history, message in ((5, "history must be a sequence"), ([(x,)], r"history\[0\] must be a triple"),
                             ([(x, x[:1], level)], r"history\[0\] must be a triple"),
                             ([(x, torch.full_like(x, float("nan")), level)], r"history\[0\] holds NaN")):
        with pytest.raises(InvalidArgumentError, match=message):
            DraftRefineState(DPMSolverSkip(VP), GRID, 2, "aggressive", x, None, start=1, history=history)
    with pytest.raises(InvalidArgumentError, match="keep_trajectory must be True or False"):
        DraftRefineState(DDIMSkip(VP), GRID, 2, "aggressive", x, None, keep_trajectory="yes")
    st = DraftRefineState(DDIMSkip(VP), GRID.t_from.tolist(), 1, "aggressive", x, None)  # levels: made a grid
    while (rnd := st.plan()) is not None:
        st.absorb(rnd, eps_model(rnd.xs, None))
    assert torch.equal(st.x, sample_serial(eps_model, x, DDIMSkip(VP), GRID).x)


def test_a_step_from_sigma_zero_and_a_flat_log_snr_step_are_refused_up_front():
    """A grid step starting where sigma = 0 (a table whose first beta is 0, leading spacing) and, for the
    log-SNR solvers, a step between two levels of equal alpha-bar are refused when the grid is made, not
    found as NaN after every model call."""
    clean_start = VPSchedule.linear(1000, 0.0, 0.02)
    for tr in (DDPMSkip(clean_start), DDIMSkip(clean_start, "sample"), DDIMSkip(clean_start, eta=0.5),
               DPMSolverSkip(clean_start)):
        with pytest.raises(InvalidTimestepsError, match="step 9 starts at level 0, where sigma = 0"):
            DraftRefineScheduler(tr, clean_start.timesteps(10), 1)
    # deterministic DDIM with an epsilon model takes that step (x0_hat = x there), as diffusers' DDIM does
    out = sample_serial(eps_model, x0(), DDIMSkip(clean_start), clean_start.timesteps(10), return_trajectory=True)
    assert torch.isfinite(out.x).all() and torch.equal(out.x, out.trajectory[-2])
    flat = VPSchedule([0.9, 0.9, 0.9, 0.5, 0.1])
    middle = VPSchedule([0.95, 0.9, 0.9, 0.9, 0.1])
    from solvers import UniPCSkip

    for tr in (DPMSolverSkip(middle), UniPCSkip(middle)):
        with pytest.raises(InvalidArgumentError, match="step 1 goes from level 3 to 2, which have the same alpha-bar"):
            DraftRefineScheduler(tr, [4, 3, 2, 1], 1)
    with pytest.raises(InvalidArgumentError, match="step 2 goes from level 2 to 1"):  # UniPC's corrector uses it
        DraftRefineScheduler(UniPCSkip(flat), [4, 3, 2, 1], 1)
    # a flat step is the identity at first order (DDIM, order 1), as the last step, and before a first-order step
    # (2M into sigma = 0)
    for tr, levels in ((DDIMSkip(flat), [4, 3, 2, 1]), (DPMSolverSkip(middle, order=1), [4, 3, 2, 1]),
                       (UniPCSkip(middle, order=1), [4, 3, 2, 1]), (DPMSolverSkip(flat), [4, 3, 2, 1]),
                       (UniPCSkip(VPSchedule(flat.alphas_cumprod, final_alpha_cumprod=0.9)), [4, 3, 1])):
        out = sample_serial(eps_model, x0(), tr, levels, return_trajectory=True)
        assert torch.isfinite(out.x).all()


def test_vmap_predictor_returning_no_tensor_is_named():
    """Under BatchedExecutor(vmap=True) a predictor returning a non-tensor gets the same error as elsewhere,
    not torch's out_dims message or the vmap / dtype hints."""
    for f, what in ((lambda x, t: None, "NoneType"), (lambda x, t: (x,), "tuple.*return_dict=False")):
        with pytest.raises(PredictorOutputError, match=f"returned {what}") as info:
            scheduler().sample(f, x0(), executor=BatchedExecutor(vmap=True))
        assert not any("data-dependent" in n or "another dtype" in n for n in notes(info.value))


@pytest.mark.parametrize("make", [
    lambda: NoiseSource(0, per_sample="no"),
    lambda: DDIMSkip(VP, recompute_eps="no"),
    lambda: DPMSolverSkip(VP, lower_order_final="yes"),
    lambda: DPMSolverSkip(VP, euler_at_final=1),
    lambda: FlowSchedule(use_dynamic_shifting="False"),
    lambda: scheduler().sample(eps_model, x0(), progress="no"),
], ids=["per_sample", "recompute_eps", "lower_order_final", "euler_at_final", "use_dynamic_shifting", "progress"])
def test_flags_take_true_or_false_only(make):
    """A flag given as a string or an int is refused (bool("no") would be True)."""
    with pytest.raises(InvalidArgumentError, match="must be True or False"):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: VPSchedule.from_betas("abc"), "betas must be a sequence or tensor of numbers"),
    (lambda: VPSchedule.from_betas([0.1, 1.5]), r"betas\[1\] = 1.5"),
    (lambda: VPSchedule.from_betas([0.1, float("nan")]), r"betas\[1\] = nan"),
    (lambda: VPSchedule.scaled_linear(10, -0.1, 0.2), "beta_start must be a number in"),
    (lambda: VPSchedule.from_betas([0.1, 0.2], final_alpha_cumprod="1"), "final_alpha_cumprod must be a number"),
    (lambda: VPSchedule.from_betas([0.1, 0.2], final_alpha_cumprod=0.5), r"final_alpha_cumprod = 0.5 is below alphas_cumprod\[0\] = 0.9"),
    (lambda: VPSchedule.from_betas([True, False]), "betas must be a 1-D sequence or tensor of real numbers.*torch.bool"),
    (lambda: VPSchedule.from_betas(torch.tensor([0.1, 0.2]) * 1j), "real numbers.*complex"),
    (lambda: VPSchedule.from_betas([[0.1, 0.2], [0.3, 0.4]]), r"1-D .* of shape \(2, 2\)"),
    (lambda: VPSchedule.from_betas([0.1, 0.2], rescale_betas_zero_snr="no"), "rescale_betas_zero_snr must be True or False"),
    (lambda: VPSchedule.linear(10, "a"), "beta_start must be a number in"),
    (lambda: VPSchedule.squaredcos_cap_v2(10, max_beta=float("nan")), "max_beta must be a number in"),
    (lambda: VPSchedule.from_betas([0.0] * 10, rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True gives NaN"),
], ids=["not-numbers", "above-one", "nan", "negative-start", "string-final", "final-below-level-0", "bool-betas",
        "complex-betas", "2d-betas", "string-flag", "string-beta-start", "nan-max-beta", "rescale-nan"])
def test_schedule_constructors_name_the_bad_argument(make, message):
    with pytest.raises(InvalidArgumentError, match=message):
        make()


def test_k_diffusion_function_checks_callback_and_sigmas_before_any_model_call():
    from solvers import sample_driffusion

    calls = []

    def model(x, sigma):
        calls.append(1)
        return 0 * x

    with pytest.raises(InvalidArgumentError, match="callback must be None or a function"):
        sample_driffusion(model, x0(), torch.tensor([2.0, 1.0, 0.0]), callback=3)
    with pytest.raises(InvalidTimestepsError, match="sigmas must be real numbers"):
        sample_driffusion(model, x0(), torch.tensor([True, False]))
    assert calls == []


def test_distributed_timeouts_must_be_finite():
    pytest.importorskip("torch.distributed")
    from backends.distributed import init_from_env

    for bad in (float("inf"), 1e10, 0, -1.0, True):
        with pytest.raises(InvalidArgumentError, match="timeout must be a number of seconds"):
            init_from_env(timeout=bad)


def test_an_operator_step_from_a_clean_level_is_refused():
    """A table whose first beta is 0 has sigma = 0 at level 0: a step leaving it divides by sigma. make_grid refused
    such a grid; a direct operator call now refuses it too (it returned NaN), except deterministic DDIM with an
    epsilon model (x0_hat = x there), and a zero-length step (the identity)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    betas[0] = 0.0
    vp = VPSchedule.from_betas(betas)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    for op in (DDIMSkip(vp, "sample"), DDIMSkip(vp, eta=1.0), DDPMSkip(vp)):
        with pytest.raises(InvalidTimestepsError, match="t_from = 0 has sigma = 0"):
            op(x, x, 0.0, -1.0, torch.zeros_like(x) if op.stochastic else None)
        assert torch.equal(op(x, x, 0.0, 0.0, torch.zeros_like(x) if op.stochastic else None), x)
    assert torch.isfinite(DDIMSkip(vp)(x, x, 0.0, -1.0)).all()


def test_a_step_between_two_pure_noise_levels_is_refused_where_it_is_0_over_0():
    """alpha-bar = 0 at two levels (betas of 1, or a table underflowing to 0 in float64): DDPM's posterior and
    DDIM with eta > 0 take alpha-bar_t / alpha-bar_s = 0 / 0 there and returned NaN (the sampler noticed only
    after the next model call). make_grid and a direct operator call refuse it; deterministic DDIM takes it,
    and a grid starting at the cleanest pure-noise level samples finite values."""
    vp = VPSchedule.from_betas([0.01, 0.2, 0.5, 1.0, 1.0, 0.3])  # alpha-bar = [.99, .79, .40, 0, 0, 0]
    assert (vp.alphas_cumprod[3:] == 0).all() and (vp.alphas_cumprod[:3] > 0).all()
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    refused = (DDPMSkip(vp, "v_prediction"), DDPMSkip(vp, "v_prediction", variance_type="fixed_large"),
               DDIMSkip(vp, "v_prediction", eta=0.5))
    for op in refused:
        with pytest.raises(InvalidTimestepsError, match=r"step 0, from level 5 to 4, stays at pure noise .*0 / 0"):
            op.make_grid([5, 4, 3, 2, 1, 0])
        with pytest.raises(InvalidTimestepsError, match=r"from t_from = 4 to t_to = 3 stays at pure noise"):
            op(x, x, 4.0, 3.0, torch.zeros_like(x))
        with pytest.raises(InvalidTimestepsError, match=r"stays at pure noise"):
            op.drafts(x, x, torch.tensor([5.0, 4.0, 3.0]), torch.tensor([4.0, 3.0, 2.0]), torch.zeros(3, *x.shape, dtype=x.dtype))
        assert torch.equal(op(x, x, 4.0, 4.0, torch.zeros_like(x)), x)  # zero length: the identity
        f = ring_mixture().predictor(vp, "v_prediction")
        out = sample_serial(f, x, op, [3, 2, 1, 0], noise=NoiseSource(1))  # from the cleanest pure-noise level
        assert torch.isfinite(out.x).all()
    ddim = DDIMSkip(vp, "v_prediction")
    assert torch.isfinite(ddim(x, x, 5.0, 4.0)).all()
    assert len(ddim.make_grid([5, 4, 3, 2, 1, 0])) == 6
    # float64 underflow: linear betas up to 0.9999 leave alpha-bar = 0 from some level on
    lin = VPSchedule.linear(1000, beta_end=0.9999)
    assert int((lin.alphas_cumprod == 0).sum()) > 10
    with pytest.raises(InvalidTimestepsError, match=r"DDPMSkip: step 0, from level 999 to 979, stays at pure noise"):
        DraftRefineScheduler(DDPMSkip(lin, "sample"), lin.timesteps(50, spacing="trailing"), width=2)


def test_autocast_outputs_are_named_and_the_drafts_keep_their_precision():
    """Under torch.autocast (common around a diffusers model) a Linear returns bfloat16 for a float32 state:
    refused, the message naming autocast and the cast; the library's own matmuls (coupled noise, the drafts'
    noise) stay in the state's dtype, so a float32 model sampled inside autocast gives the sample outside."""
    schedule = VPSchedule.linear()
    grid = schedule.timesteps(8)
    net = torch.nn.Linear(2, 2)
    x = NoiseSource(0).initial((3, 2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(DeviceMismatchError, match=r"torch.bfloat16 .* torch.autocast .*\.to\(x.dtype\)"):
            sample_serial(lambda x, t: net(x), x, DDPMSkip(schedule), grid, noise=NoiseSource(1))
    tr = DDPMSkip(schedule)
    noises = NoiseSource(2).steps(0, 4, x.shape)
    outside = tr.drafts(x, 0.1 * x, grid.t_from[:4], grid.t_to[:4], noises)
    coupled = tr.coupled_noise(grid.t_from[:4], grid.t_to[:4], noises)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tr.drafts(x, 0.1 * x, grid.t_from[:4], grid.t_to[:4], noises), outside)
        assert torch.equal(tr.coupled_noise(grid.t_from[:4], grid.t_to[:4], noises), coupled)


@pytest.mark.parametrize("call", ["sample_serial", "sample_step_skipping", "scheduler", "picard"])
@pytest.mark.parametrize("swapped", ["grid", "schedule"])
def test_a_grid_or_schedule_in_the_transitions_place_names_the_argument_order(call, swapped):
    """sample_serial(predictor, x, transition, timesteps) and DraftRefineScheduler(transition, timesteps, width)
    take their arguments in different orders; a grid or a schedule where the transition goes is refused with
    the call's argument order, not an AttributeError from deep inside."""
    from solvers import PicardScheduler

    wrong = GRID if swapped == "grid" else VP
    other = DDIMSkip(VP) if swapped == "grid" else GRID
    make = {
        "sample_serial": lambda: sample_serial(eps_model, x0(), wrong, other),
        "sample_step_skipping": lambda: sample_step_skipping(eps_model, x0(), wrong, other, 3),
        "scheduler": lambda: DraftRefineScheduler(wrong, other, 2),
        "picard": lambda: PicardScheduler(wrong, other, 2, 0.1),
    }[call]
    name = {"sample_serial": "sample_serial(predictor, x, transition, timesteps)",
            "sample_step_skipping": "sample_step_skipping(predictor, x, transition, timesteps, rounds)",
            "scheduler": "DraftRefineScheduler(transition, timesteps, width)",
            "picard": "PicardScheduler(transition, timesteps, width, tolerance)"}[call]
    with pytest.raises(InvalidArgumentError, match=r"transition must be a SkipTransition") as info:
        make()
    assert f"got {type(wrong).__name__}" in str(info.value) and f"check the argument order, {name}" in str(info.value)


@pytest.mark.skipif(not HAS_NOTES, reason="exception notes (add_note) need Python >= 3.11")
def test_the_dtype_hint_is_added_only_to_errors_that_read_like_a_dtype_or_device_clash():
    """An exception from the model gets a note saying where sampling was; the hint about parameters of another
    dtype or device only when the message reads like such a clash (a real float64-state / float32-model
    mismatch), not on a KeyError or an arbitrary RuntimeError from the model."""
    linear = torch.nn.Linear(2, 2)  # float32 parameters

    def clash(x, t):
        return linear(x)

    def key_error(x, t):
        raise KeyError("missing entry")

    def runtime(x, t):
        raise RuntimeError("boom in my model")

    hint = "parameters of another dtype or device"
    for f, wants in ((clash, True), (key_error, False), (runtime, False)):
        with pytest.raises((RuntimeError, KeyError)) as info:
            scheduler().sample(f, x0().double())
        where = [n for n in notes(info.value) if "driffusion: raised while evaluating step 0" in n]
        assert len(where) == 1, notes(info.value)
        assert (hint in where[0]) == wants, (f.__name__, where[0])


class _TinyNet(torch.nn.Module):
    def forward(self, x, t):
        return 0.1 * x


def test_a_class_given_for_the_predictor_is_refused_up_front():
    """A class passed where its instance belongs (an nn.Module subclass) would be called as a constructor on
    the first model call; every entry point refuses it before sampling, saying to build the instance."""
    from driffusion_core import reparameterize
    from solvers import sample_step_skipping
    from solvers.interop.kdiffusion import sample_driffusion

    schedule = VPSchedule.linear()
    x = NoiseSource(0).initial((2, 3))
    grid = schedule.timesteps(6)
    calls = {
        "scheduler": lambda f: DraftRefineScheduler(DDIMSkip(schedule), grid, width=2).sample(f, x),
        "serial": lambda f: sample_serial(f, x, DDIMSkip(schedule), grid),
        "step_skipping": lambda f: sample_step_skipping(f, x, DDIMSkip(schedule), grid, 3),
        "reparameterize": lambda f: reparameterize(f, schedule, "epsilon", "sample"),
        "kdiffusion": lambda f: sample_driffusion(f, x, torch.tensor([10.0, 5.0, 1.0, 0.0]), disable=True),
    }
    for name, call in calls.items():
        with pytest.raises(InvalidArgumentError, match=r"the class _TinyNet itself.*_TinyNet\(\.\.\.\)"):
            call(_TinyNet)
        call(_TinyNet())  # the instance is fine
    pytest.importorskip("diffusers")
    from solvers.interop import DiffusersPredictor
    with pytest.raises(InvalidArgumentError, match=r"model must be an instance, got the class _TinyNet"):
        DiffusersPredictor(_TinyNet, style="unet2d")


def test_a_dict_returned_by_the_predictor_says_how_to_take_the_tensor():
    """A predictor returning {"sample": tensor} gets an error that shows the wrapper picking the tensor out."""
    x = NoiseSource(0).initial((2, 3))
    grid = VPSchedule.linear().timesteps(4)
    with pytest.raises(PredictorOutputError, match=r"model\(x, t, \*\*c\)\['sample'\]"):
        sample_serial(lambda x, t: {"sample": x, "aux": 1.0}, x, DDIMSkip(VPSchedule.linear()), grid)
    with pytest.raises(PredictorOutputError, match=r"model\(x, t, \*\*c\)\['out'\]"):
        DraftRefineScheduler(DDIMSkip(VPSchedule.linear()), grid, width=2).sample(lambda x, t: {"out": x}, x)


def test_sample_outputs_compare_by_identity():
    """SampleOutput and Round hold tensors: == is identity (a generated field-wise == would raise on tensors)."""
    from driffusion_core.scheduler import Round

    x = NoiseSource(0).initial((2, 3))
    sched = DraftRefineScheduler(DDIMSkip(VPSchedule.linear()), VPSchedule.linear().timesteps(4), width=2)
    a = sched.sample(lambda x, t: 0.1 * x, x)
    b = sched.sample(lambda x, t: 0.1 * x, x)
    assert a == a and a != b and torch.equal(a.x, b.x)
    r = Round([0], x[None], True)
    assert r == r and r != Round([0], x[None], True)


def test_a_shared_conditioning_tensor_is_told_how_to_pass():
    """A tensor that is not one row per sample (a weight every sample shares) is refused with the ways to pass it."""
    x = NoiseSource(0).initial((2, 3))
    with pytest.raises(InvalidArgumentError, match=r"cond\['w'\] has leading dimension 3.*functools\.partial\(model, w=tensor\)"):
        sample_serial(lambda x, t, w: x, x, DDIMSkip(VPSchedule.linear()), VPSchedule.linear().timesteps(4),
                      cond={"w": torch.ones(3, 3)})


def _dropout_net(p):
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(p))


def _sample_with(entry: str, net: torch.nn.Module, rows: int = 2):
    """Sample a 6-step DDIM grid with ``net`` (reached through a closure, as users write it) at one of the
    entry points that run a model."""
    from solvers.interop.kdiffusion import sample_driffusion

    schedule = VPSchedule.linear()
    grid = schedule.timesteps(6)
    x = NoiseSource(0).initial((rows, 3))
    f = lambda x, t: net(x)  # noqa: E731
    if entry == "serial":
        return sample_serial(f, x, DDIMSkip(schedule), grid)
    if entry == "step_skipping":
        return sample_step_skipping(f, x, DDIMSkip(schedule), grid, 3)
    if entry == "picard":
        return PicardScheduler(DDIMSkip(schedule), grid, width=3).sample(f, x)
    if entry == "kdiffusion":
        return sample_driffusion(lambda x, sigma: net(x), x, torch.tensor([10.0, 5.0, 1.0, 0.0]), disable=True,
                                 executor=SerialExecutor())
    width, executor = {"scheduler_serial": (2, SerialExecutor()), "scheduler_batched": (2, BatchedExecutor()),
                       "batched_width1": (1, BatchedExecutor())}[entry]
    return DraftRefineScheduler(DDIMSkip(schedule), grid, width=width).sample(f, x, executor=executor)


@pytest.mark.parametrize("entry", ["serial", "step_skipping", "scheduler_serial", "scheduler_batched", "picard", "kdiffusion"])
def test_dropout_in_training_mode_is_warned_once_per_sample(entry):
    """A dropout layer left in training mode makes every prediction random (no executor then matches
    another): each entry point warns once per call, naming the layer and model.eval(); a model in eval mode,
    or with p = 0 (diffusers' default dropout), samples without a word."""
    from driffusion_core import TrainingModeWarning

    def run(net):
        return _sample_with(entry, net)

    with pytest.warns(TrainingModeWarning, match=r"dropout layer 'Sequential\.1' \(p=0\.3\) is in training mode.*model\.eval\(\)") as got:
        run(_dropout_net(0.3))
    assert len([w for w in got if issubclass(w.category, TrainingModeWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingModeWarning)
        run(_dropout_net(0.3).eval())
        run(_dropout_net(0.0))
    net = _dropout_net(0.3)
    run(net.eval())
    assert not net[1]._forward_pre_hooks, "the sampler must not leave hooks on the model"


@pytest.mark.parametrize("entry", ["serial", "step_skipping", "scheduler_serial", "batched_width1", "picard", "kdiffusion"])
def test_batchnorm_in_training_mode_is_warned_and_its_statistics_named(entry):
    """A BatchNorm layer left in training mode normalises with each call's batch (a row's prediction depends
    on its batch mates) and overwrites its running statistics: every entry point that does not refuse it
    (BatchedExecutor refuses it at width > 1) warns once, naming the layer and model.eval(). In eval mode, or
    without running statistics (an architectural choice, the same in training), nothing is said."""
    from driffusion_core import TrainingModeWarning

    def net_with(**kw):
        return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3, **kw))

    def run(net):
        return _sample_with(entry, net, rows=4)

    net = net_with()
    before = net[1].running_mean.clone()
    with pytest.warns(TrainingModeWarning, match=r"BatchNorm layer 'Sequential\.1' is in training mode.*running statistics.*model\.eval\(\)") as got:
        run(net)
    assert len([w for w in got if issubclass(w.category, TrainingModeWarning)]) == 1
    assert not torch.equal(net[1].running_mean, before)  # what the warning says happened
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingModeWarning)
        run(net_with().eval())
        run(net_with(track_running_stats=False))
    assert not net[1]._forward_pre_hooks, "the sampler must not leave hooks on the model"


def test_an_error_note_lists_t_and_the_conditioning_and_explains_a_float_t_used_as_an_index():
    """The note on a model's exception gives t's dtype and the conditioning tensors' dtypes and shapes (a float
    mask where the model wants bool shows there); a model that looks t up in an embedding on a flow grid (t is
    float sigma * N there) is told to round it, not that its parameters' dtype is wrong."""
    emb = torch.nn.Embedding(1001, 3)
    x = NoiseSource(0).initial((2, 4, 3))
    flow = FlowSchedule()
    mask = torch.ones(2, 4)

    def f(x, t, mask):
        return x * 0 + emb(t)[:, None] * mask[..., None]

    with pytest.raises(RuntimeError) as info:
        DraftRefineScheduler(FlowEulerSkip(flow), flow.timesteps(10), width=2).sample(f, x, cond={"mask": mask})
    note = "\n".join(info.value.__notes__)
    assert "t is torch.float32 [2]" in note and "cond['mask'] torch.float32 (2, 4)" in note, note
    assert "t.round().long()" in note and "another dtype or device" not in note, note
    vp = VPSchedule.linear()  # integer model times: the same model runs
    DraftRefineScheduler(DDIMSkip(vp), vp.timesteps(10), width=2).sample(f, x, cond={"mask": mask})


def test_sliced_conditioning_is_named_when_the_model_fails_on_it():
    """A table every sample shares that has B rows by chance is sliced by max_batch chunks and by per_sample; when
    the model then fails, the note names the sliced tensors and says to close over a shared one."""
    B = 5
    x = NoiseSource(0).initial((B, 4))
    cond = {"labels": torch.arange(B), "table": torch.randn(B, 4)}
    sched = DraftRefineScheduler(DDIMSkip(VPSchedule.linear()), VPSchedule.linear().timesteps(8), width=2)
    with pytest.raises(IndexError) as info:
        sched.sample(lambda x, t, labels, table: x * 0.1 + table[labels], x, executor=BatchedExecutor(max_batch=2), cond=cond)
    note = "\n".join(info.value.__notes__)
    assert "max_batch=2" in note and "cond['table'] (5, 4)" in note and "functools.partial" in note, note
    from backends import per_sample

    with pytest.raises(IndexError) as info:
        sched.sample(per_sample(lambda x, t, labels, table: x * 0.1 + table[labels, :]), x, cond=cond)
    note = "\n".join(info.value.__notes__)
    assert "per_sample(<lambda>) passes f one row" in note and "cond['table'] (5, 4)" in note, note
    sched.sample(lambda x, t, labels, table: x * 0.1 + table[labels], x, executor=BatchedExecutor(), cond=cond)


def test_flags_are_refused_unless_bool_on_every_entry_point():
    """A string for a yes/no option ("no" is truthy) is refused by the name the caller used, on every
    sampler, instead of silently returning a trajectory or a SampleOutput."""
    from solvers.interop import sample_driffusion

    x = x0()
    calls = {
        "return_trajectory": lambda: sample_serial(eps_model, x, DDIMSkip(VP), VP.timesteps(5), return_trajectory="no"),
        "return_output": lambda: sample_driffusion(lambda z, s: z, x, torch.tensor([3.0, 1.0, 0.0]), disable=True,
                                                   return_output="no"),
        "return_trajectory / keep_trajectory": lambda: scheduler().sample(eps_model, x, return_trajectory="no"),
    }
    for name, call in calls.items():
        with pytest.raises(InvalidArgumentError, match=rf"^{re.escape(name)} must be True or False, got 'no'"):
            call()

"""Smoke test of the benchmark suite: a tiny configuration of every table, checked against references.

One run of the runner (oracle, digits, time series, latency) into a temporary folder; then the
report and plots must exist and the numbers must agree with what the library computes directly:
rounds equal ``expected_rounds``, width 1 is the serial sample exactly, a DRiffusion row's RMSE is
the RMSE of a fresh DRiffusion run against a fresh serial run, every ratio is the quotient of its
two rows. The metrics are checked against independent references (scikit-learn's RBF kernel, an
MMD double loop, closed-form and numpy 1-D Wasserstein distances); the Picard rows and the Picard
study against direct runs of ``PicardScheduler``; the latency medians under a scripted clock; the
report's tables column by column on synthetic results.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from benchmarks.__main__ import parse_args
from benchmarks.cases import family, oracle_cases
from benchmarks.config import QUICK
from benchmarks.metrics import median_bandwidth, mmd2_rbf, rmse, sliced_wasserstein
from benchmarks.quality import MODES, row_label
from benchmarks.runner import run
from driffusion_core import DraftRefineScheduler, NoiseSource, expected_rounds
from backends import BatchedExecutor
from solvers import coarse_indices, ring_mixture, sample_serial, sample_step_skipping

TINY = QUICK.with_(
    name="tiny", num_steps=7, widths=(1, 2, 3), oracle_batch=64, oracle_data=128, digits_batch=24,
    timeseries_batch=24, latency_steps=5, latency_widths=(1, 2), latency_repeats=1, latency_digits_batch=4,
    mlp_batch=8, mlp_hidden=64, mlp_depth=2, memory_steps=3, memory_families=("ddim",), overhead_steps=5, overhead_repeats=1, threads=1,
)
SECTIONS = ["oracle", "digits", "timeseries", "latency"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = run(TINY, SECTIONS, out, progress=False, echo=lambda _: None)
    return out, results


def quality_tables(results):
    return [t for s in ("oracle", "digits", "timeseries") for t in results[s].get("tables", [])]


def test_outputs_written(bench):
    out, results = bench
    for name in ("report.md", "results.json", "speedup.png", "error_vs_rounds.png"):
        assert (out / name).stat().st_size > 0, f"{name} was not written"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["config"]["num_steps"] == TINY.num_steps
    report = (out / "report.md").read_text()
    for title in ("## Summary", "## Quality: Exact Gaussian-mixture oracles", "## Latency", "### Extra memory",
                  "### Scheduler overhead per step"):
        assert title in report
    if "tables" in results["digits"]:
        assert (out / "digits_samples.png").stat().st_size > 0


def test_trained_models_ran(bench):
    """The built-in models' weights are committed: their tables must be there, one per family."""
    out, results = bench
    for sec in ("digits", "timeseries"):
        assert "skipped" not in results[sec], results[sec]
        assert [t["family"] for t in results[sec]["tables"]] == list(TINY.learned_families)
    assert (out / "digits_samples.png").stat().st_size > 0


def test_studies_wired_in(tmp_path, monkeypatch):
    """``grids``, ``picard`` and ``distributed`` call their modules' ``run(quick)`` (and the Picard plot) and report them."""
    import types

    calls = []
    study = types.ModuleType("benchmarks.picard_study")
    study.run = lambda quick: calls.append(("picard", quick)) or {"batch": 8, "at_driffusion_rounds": [{"width": 2, "error": 0.5}]}
    study.plot_error_vs_rounds = lambda res, path: calls.append(("plot", res["batch"])) or path.write_bytes(b"png")
    dist = types.ModuleType("benchmarks.distributed_speedup")
    dist.run = lambda quick: calls.append(("distributed", quick)) or {"speedup": 1.5, "ideal_speedup": 1.9,
                                                                       "serial_s": 3.0, "distributed_s": 2.0}
    grids = types.ModuleType("benchmarks.grid_study")
    grids.run = lambda quick: calls.append(("grids", quick)) or {"settings": 4, "worse_count": 1}
    grids.markdown = lambda res: f"GRID TABLE {res['settings']}"
    monkeypatch.setitem(sys.modules, "benchmarks.picard_study", study)
    monkeypatch.setitem(sys.modules, "benchmarks.distributed_speedup", dist)
    monkeypatch.setitem(sys.modules, "benchmarks.grid_study", grids)
    results = run(TINY.with_(name="quick"), ["grids", "picard", "distributed"], tmp_path, progress=False, echo=lambda _: None)
    assert calls == [("grids", True), ("picard", True), ("plot", 8), ("distributed", True)]
    assert results["picard"]["result"]["at_driffusion_rounds"][0]["error"] == 0.5
    report = (tmp_path / "report.md").read_text()
    assert "## Picard study" in report and "picard_error_vs_rounds.png" in report
    assert "## Distributed executor (2 gloo processes)" in report and "| speedup | 1.5 |" in report
    assert "## Grid study" in report and "GRID TABLE 4" in report
    assert set(results["section_dates"]) == {"grids", "picard", "distributed"} and "Sections by the run" not in report
    # a later --only run of one section keeps the others with the date of the run that made them, and says so
    import benchmarks.runner as runner_mod

    made = runner_mod._environment
    monkeypatch.setattr(runner_mod, "_environment", lambda cfg: {**made(cfg), "date": "2099-01-01 00:00 UTC"})
    again = run(TINY.with_(name="quick"), ["grids"], tmp_path, progress=False, echo=lambda _: None)
    first = results["section_dates"]["picard"]
    assert again["section_dates"] == {"grids": "2099-01-01 00:00 UTC", "picard": first, "distributed": first}
    assert (f"Sections by the run that made them (`--only` reruns some sections and keeps the others; the time above "
            f"is the sum of the sections' own times): grids: 2099-01-01 00:00 UTC; picard, distributed: {first}."
            in (tmp_path / "report.md").read_text())


def test_rounds_calls_and_width_one(bench):
    _, results = bench
    tables = quality_tables(results)
    assert len(tables) >= 2 * len(TINY.oracle_families)
    for t in tables:
        T = t["num_steps"]
        rows = {r["label"]: r for r in t["rows"] if r.get("label")}
        for width in TINY.widths:
            for mode in MODES:
                r = rows[row_label(mode, width)]
                assert r["rounds"] == expected_rounds(T, width, mode)
                assert r["evals"] == T
                if width == 1:
                    assert r["rmse"] == 0.0, f"{t['model']}/{t['family']}: width 1 must equal the serial sample"
        for r in t["rows"]:
            if r.get("matched"):
                d = rows[r["matched"]]
                if r["method"] == "step skipping":
                    assert r["rounds"] == d["rounds"] and r["evals"] == d["rounds"]
                want = d["rmse"] / r["rmse"] if r["rmse"] > 0 else None
                assert r["ratio"] == pytest.approx(want)
        assert all(c["ok"] for c in t["checks"]), [c for c in t["checks"] if not c["ok"]]
        # Picard rows at every width above 1 on the oracles, only at learned_picard_widths on the trained models
        wide = [w for w in TINY.widths if w > 1]
        want = wide if t["model"] in ("ring", f"mixture{TINY.mixture_dim}") else [w for w in wide if w in TINY.learned_picard_widths]
        assert sorted({r["width"] for r in t["rows"] if r["method"].startswith("Picard")}) == want, t["model"]


def test_table_matches_direct_computation(bench):
    """The ring/DDPM table's numbers equal a direct run of the library from the same noise."""
    _, results = bench
    table = next(t for t in results["oracle"]["tables"] if t["model"] == "ring" and t["family"] == "ddpm")
    case = next(c for c in oracle_cases(TINY) if c.model == "ring" and c.family == "ddpm")
    x = NoiseSource(TINY.seed_x).initial(case.shape, case.dtype)
    noise = NoiseSource(TINY.seed_noise)
    serial = sample_serial(case.predictor, x, case.transition, case.grid, noise=noise).x
    out = DraftRefineScheduler(case.transition, case.grid, width=3, mode="aggressive").sample(
        case.predictor, x, executor=BatchedExecutor(), noise=noise)
    skip = sample_step_skipping(case.predictor, x, case.transition, case.grid, out.rounds, noise=noise).x
    rows = table["rows"]
    a3 = next(r for r in rows if r.get("label") == "a3")
    skip_row = next(r for r in rows if r.get("matched") == "a3" and r["method"] == "step skipping")
    assert a3["rmse"] == pytest.approx(rmse(out.x, serial), rel=1e-12)
    assert skip_row["rmse"] == pytest.approx(rmse(skip, serial), rel=1e-12)
    assert a3["sliced W2"] == pytest.approx(case.score(out.x)["sliced W2"], rel=1e-12)
    serial_row = next(r for r in rows if r["method"] == "serial")
    assert serial_row["MMD²"] == pytest.approx(case.score(serial)["MMD²"], rel=1e-9)
    # the distances by the metric functions themselves, against the ring's exact samples (seed_data)
    data = ring_mixture().sample(TINY.oracle_data, torch.Generator().manual_seed(TINY.seed_data))
    assert a3["sliced W2"] == pytest.approx(sliced_wasserstein(out.x, data), rel=1e-12)
    assert a3["MMD²"] == pytest.approx(mmd2_rbf(out.x, data, bandwidth=median_bandwidth(data)), rel=1e-9)
    # the data floor: a fresh set of batch-size exact samples scored the same way
    other = ring_mixture().sample(TINY.oracle_batch, torch.Generator().manual_seed(TINY.seed_data + 1))
    floor = next(r for r in rows if r["method"] == "data floor")
    assert floor["sliced W2"] == pytest.approx(sliced_wasserstein(other, data), rel=1e-12)
    assert floor["MMD²"] == pytest.approx(mmd2_rbf(other, data, bandwidth=median_bandwidth(data)), rel=1e-9)
    # its spread: the standard deviation over FLOOR_DRAWS fresh sets (seeds seed_data + 1, + 2, ...), the first the row's
    from benchmarks.cases import FLOOR_DRAWS

    draws = [ring_mixture().sample(TINY.oracle_batch, torch.Generator().manual_seed(TINY.seed_data + 1 + k))
             for k in range(FLOOR_DRAWS)]
    assert FLOOR_DRAWS >= 2 and floor["sd"]["sliced W2"] > 0
    assert floor["sd"]["sliced W2"] == pytest.approx(float(torch.tensor(
        [sliced_wasserstein(d, data) for d in draws], dtype=torch.float64).std()), rel=1e-9)
    assert floor["sd"]["MMD²"] == pytest.approx(float(torch.tensor(
        [mmd2_rbf(d, data, bandwidth=median_bandwidth(data)) for d in draws], dtype=torch.float64).std()), rel=1e-6)
    # the Picard rows (per-step noise shared with the serial run) against direct runs of PicardScheduler
    _check_picard_rows(table, case, TINY, x, serial)


def test_learned_tables_score_with_the_models_metrics(bench):
    """The digits and time-series tables' distances, recomputed with benchmarks.models' own metrics: the Fréchet
    distance in the digits classifier's features against the test digits (floor: batch-size training digits), and
    its sliced Wasserstein (a separate implementation) against fresh series (floor: another fresh set)."""
    from benchmarks.cases import digits_cases, timeseries_cases
    from benchmarks.models import (digits_data, frechet_distance, load_digits_classifier, sliced_wasserstein as sw_models,
                                   timeseries_data)

    _, results = bench
    x_of = lambda case: NoiseSource(TINY.seed_x).initial(case.shape, case.dtype)
    serial_of = lambda case: sample_serial(case.predictor, x_of(case), case.transition, case.grid,
                                           noise=NoiseSource(TINY.seed_noise)).x
    row = lambda t, m: next(r for r in t["rows"] if r["method"] == m)

    clf = load_digits_classifier()
    case = digits_cases(TINY)[0]
    t = next(t for t in results["digits"]["tables"] if t["family"] == case.family)
    with torch.no_grad():
        test_feats = clf.features(digits_data("test"))
        got = frechet_distance(clf.features(serial_of(case)), test_feats)
        train = digits_data("train")
        pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(TINY.seed_data))[: TINY.digits_batch]
        floor = frechet_distance(clf.features(train[pick]), test_feats)
    assert row(t, "serial")["Fréchet"] == pytest.approx(got, rel=1e-6)
    assert row(t, "data floor")["Fréchet"] == pytest.approx(floor, rel=1e-6)
    from benchmarks.cases import FLOOR_DRAWS

    with torch.no_grad():
        draws = [frechet_distance(clf.features(train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(
            TINY.seed_data + k))[: TINY.digits_batch]]), test_feats) for k in range(FLOOR_DRAWS)]
    assert row(t, "data floor")["sd"]["Fréchet"] == pytest.approx(float(torch.tensor(draws, dtype=torch.float64).std()),
                                                                  rel=1e-5)

    case = timeseries_cases(TINY)[0]
    t = next(t for t in results["timeseries"]["tables"] if t["family"] == case.family)
    n = TINY.timeseries_batch
    ref = timeseries_data(n, seed=TINY.seed_data)
    assert row(t, "serial")["sliced W2"] == pytest.approx(sw_models(serial_of(case), ref), rel=1e-9)
    assert row(t, "data floor")["sliced W2"] == pytest.approx(sw_models(timeseries_data(n, seed=TINY.seed_data + 1), ref), rel=1e-9)
    spread = torch.tensor([sw_models(timeseries_data(n, seed=TINY.seed_data + 1 + k), ref) for k in range(FLOOR_DRAWS)],
                          dtype=torch.float64).std()
    assert row(t, "data floor")["sd"]["sliced W2"] == pytest.approx(float(spread), rel=1e-9)


def _direct_picard(case, x, width, init, tol, seed_noise):
    """solvers.PicardScheduler run directly: pure Picard iteration (no round budget), window ``width``."""
    import solvers

    sched = solvers.PicardScheduler(case.transition, case.grid, width, tol, max_rounds=None, init=init)
    return sched.sample(case.predictor, x, executor=BatchedExecutor(), noise=NoiseSource(seed_noise))


def _check_picard_rows(table, case, cfg, x, serial):
    """Every Picard row of ``table`` against direct runs: at equal rounds, the smallest-RMSE run of the sweep among
    those within the matched DRiffusion row's rounds (the loosest of the fewest-rounds runs when none is); converged,
    the run at cfg.picard_tolerance, matched with the aggressive row of its width. Returns what the sweeps exercised."""
    from benchmarks.quality import PICARD_INITS, picard_widths

    rows = table["rows"]
    labels = {r["label"]: r for r in rows if r.get("label")}
    widths = picard_widths(case, cfg)
    seen = {"fallback": 0, "choice": 0}
    for width in widths:
        for init in PICARD_INITS:
            runs = [(tol, _direct_picard(case, x, width, init, tol, cfg.seed_noise)) for tol in case.picard_sweep]
            errs = [rmse(o.x, serial) for _, o in runs]
            for mode in MODES:
                d = labels[row_label(mode, width)]
                R = expected_rounds(len(case.grid), width, mode)
                assert d["rounds"] == R
                fits = [i for i, (_, o) in enumerate(runs) if o.rounds <= R]
                if fits:
                    best = min(fits, key=lambda i: (errs[i], i))
                    seen["choice"] += len({errs[i] for i in fits}) > 1 and best != min(fits, key=lambda i: (runs[i][1].rounds, i))
                else:
                    best = min(range(len(runs)), key=lambda i: (runs[i][1].rounds, i))
                    seen["fallback"] += 1
                got = [r for r in rows if r["method"] == f"Picard ({init})" and r.get("matched") == d["label"]]
                assert len(got) == 1, (init, d["label"], got)
                r, (tol, o) = got[0], runs[best]
                assert r["width"] == width and r["within_rounds"] is bool(fits)
                assert r["tolerance"] == ("∞" if tol == float("inf") else f"{tol:g}")
                assert (r["rounds"], r["evals"]) == (o.rounds, o.evals)
                assert r["rmse"] == pytest.approx(errs[best], rel=1e-12, abs=1e-15)
                assert r["ratio"] == pytest.approx(d["rmse"] / errs[best])
                for metric, value in case.score(o.x).items():  # its own distances to the data, not another run's
                    assert r[metric] == pytest.approx(value, rel=1e-9), (init, d["label"], metric)
            conv = [r for r in rows if r["method"] == f"Picard ({init}) converged" and r["width"] == width]
            o = _direct_picard(case, x, width, init, cfg.picard_tolerance, cfg.seed_noise)
            assert len(conv) == 1 and conv[0]["matched"] == row_label("aggressive", width)
            assert conv[0]["tolerance"] == f"{cfg.picard_tolerance:g}" and conv[0]["rounds"] == o.rounds
            assert conv[0]["rmse"] == pytest.approx(rmse(o.x, serial), rel=1e-12, abs=1e-15)
            for metric, value in case.score(o.x).items():  # scores were cached by id(): a freed run's id is reused
                assert conv[0][metric] == pytest.approx(value, rel=1e-9), (init, width, metric)
    picard = {(r["method"], r["width"]) for r in rows if r["method"].startswith("Picard")}
    assert picard == {(f"Picard ({i}){c}", w) for i in PICARD_INITS for c in ("", " converged") for w in widths}
    return seen


def test_picard_rows_are_the_best_sweep_run_within_the_rounds():
    """A ring/DDIM table at T = 12, width 3, with a tolerance sweep where several runs fit the conservative row's
    rounds (the best is not the fewest-rounds one) and none fits the aggressive row's (the fallback row)."""
    from benchmarks.quality import run_case

    cfg = TINY.with_(num_steps=12, widths=(1, 3), oracle_batch=32, oracle_data=64, picard_sweep=(0.3, 0.1, 0.03, 0.01))
    case = next(c for c in oracle_cases(cfg) if c.model == "ring" and c.family == "ddim")
    table, _ = run_case(case, cfg)
    x = NoiseSource(cfg.seed_x).initial(case.shape, case.dtype)
    serial = sample_serial(case.predictor, x, case.transition, case.grid).x
    seen = _check_picard_rows(table, case, cfg, x, serial)
    assert seen["fallback"] >= 1 and seen["choice"] >= 1, seen  # the sweep exercised both branches


def test_quality_self_checks_compare_with_the_closed_form(monkeypatch):
    """A table's rounds checks fail when the rounds differ from expected_rounds (here: a closed form made wrong)."""
    from benchmarks import quality

    cfg = TINY.with_(num_steps=5, widths=(1, 2), oracle_batch=8, oracle_data=16, picard_sweep=())
    case = next(c for c in oracle_cases(cfg) if c.model == "ring" and c.family == "ddim")
    monkeypatch.setattr(quality, "expected_rounds", lambda T, n, mode: expected_rounds(T, n, mode) + 1)
    table, _ = quality.run_case(case, cfg)
    rounds_checks = [c for c in table["checks"] if "expected_rounds" in c["check"]]
    assert len(rounds_checks) == 4
    assert all(not c["ok"] and c["want"] == c["got"] + 1 for c in rounds_checks), rounds_checks
    assert all(c["ok"] for c in table["checks"] if c not in rounds_checks)


def test_latency_tables(bench):
    _, results = bench
    lat = results["latency"]
    T = TINY.latency_steps
    for r in lat["executors"]["rows"]:
        mode = r["method"].split()[-1]
        if r["method"].startswith("DRiffusion"):
            assert r["rounds"] == expected_rounds(T, r["width"], mode)
            assert r["rounds_speedup"] == pytest.approx(T / r["rounds"])
        assert r["seconds"] > 0
    mem = lat["memory"]["rows"]
    assert all(r["peak_bytes"] is None or r["peak_bytes"] > 0 for r in mem)
    for r in mem:
        if r["executor"] == "SerialExecutor":  # holds the drafts and their predictions at least
            assert r["extra_bytes"] >= r["state_bytes"]
    ov = lat["overhead"]
    assert all(r["us_per_step"] > 0 for r in ov["rows"] if r["us_per_step"] is not None)
    assert all(c["ok"] for c in ov["checks"]), ov["checks"]


def test_latency_rows_are_medians_over_the_repeats(monkeypatch):
    """run_latency under a scripted clock: each row's seconds is the median of its repeats (the repeats interleaved:
    every configuration once, then again), the speedup the serial sampler's median over the row's, and T / rounds
    the closed form's; the rows are the serial sampler, then each width's modes (width 1: aggressive only) per executor."""
    import statistics
    import types

    from benchmarks import latency

    cfg = TINY.with_(latency_steps=5, latency_widths=(1, 2), latency_repeats=3)
    configs = [("serial sampler", "-", 1)] + [(f"DRiffusion {m}", e, w) for w, modes in ((1, ("aggressive",)), (2, MODES))
                                              for m in modes for e in ("SerialExecutor", "BatchedExecutor")]
    # model j, configuration k, repeat i: three unequal durations, in an order that changes with k
    dur = lambda j, k, i: j + 0.1 * (k + 1) + (0.0, 0.05, 2.0)[(i + k) % 3]
    script = [dur(j, k, i) for j in range(2) for i in range(3) for k in range(len(configs))]
    clock = {"t": 0.0, "start": True, "left": list(script)}

    def perf_counter():
        if not clock["start"]:
            clock["t"] += clock["left"].pop(0)
        clock["start"] = not clock["start"]
        return clock["t"]

    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=perf_counter))
    res = latency.run_latency(cfg)
    assert clock["left"] == [] and clock["start"]
    assert res["num_steps"] == 5 and res["repeats"] == 3
    rows = res["rows"]
    assert len(rows) == 2 * len(configs)
    for j, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = [r for r in rows if r["model"] == model]
        assert [(r["method"], r["executor"], r["width"]) for r in mine] == configs
        serial = statistics.median(dur(j, 0, i) for i in range(3))
        for k, r in enumerate(mine):
            sec = statistics.median(dur(j, k, i) for i in range(3))
            mode = r["method"].split()[-1]
            want_rounds = 5 if k == 0 else expected_rounds(5, r["width"], mode)
            assert r["seconds"] == pytest.approx(sec) and r["speedup"] == pytest.approx(serial / sec)
            assert r["rounds"] == want_rounds and r["rounds_speedup"] == pytest.approx(5 / want_rounds)


def test_peak_tensor_bytes_replays_allocations_and_frees():
    """Two float64 tensors of 1000 and 2000 elements alive together peak at 24000 bytes; the first freed before the
    second is allocated, at 16000."""
    from benchmarks.memory import peak_cpu_tensor_bytes

    def together():
        a = torch.ones(1000, dtype=torch.float64)
        b = torch.ones(2000, dtype=torch.float64)
        return a, b

    def one_after_the_other():
        a = torch.ones(1000, dtype=torch.float64)
        del a
        return torch.ones(2000, dtype=torch.float64)

    peak = peak_cpu_tensor_bytes(together)
    if peak is None:
        pytest.skip("torch.profiler's memory timeline is unavailable in this torch build")
    assert peak == 24000
    assert peak_cpu_tensor_bytes(one_after_the_other) == 16000


def test_peak_tensor_bytes_counts_a_recreated_allocation_once(monkeypatch):
    """A tensor key created again without a free in between (a free the profiler did not see) counts once."""
    import types

    import torch.profiler
    from torch.profiler._memory_profiler import Action

    from benchmarks.memory import peak_cpu_tensor_bytes

    timeline = [(0, Action.CREATE, (1, 0), 100), (1, Action.CREATE, (1, 0), 100), (2, Action.CREATE, (2, 0), 50),
                (3, Action.DESTROY, (1, 0), 100), (4, Action.CREATE, (3, 0), 80), (5, Action.DESTROY, (2, 0), 50)]

    class FakeProfile:
        def __init__(self, **_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def _memory_profile(self):
            return types.SimpleNamespace(timeline=timeline)

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    assert peak_cpu_tensor_bytes(lambda: None) == 150


def test_memory_rows_subtract_the_serial_peak(bench):
    """Extra bytes = the row's peak minus the serial sampler's (same family, model, device); analytic extra =
    (2, or 3 for a stochastic sampler) x n x the state's bytes; DRiffusion measured at the largest timed width."""
    import math

    from benchmarks.memory import memory_widths

    _, results = bench
    rows = results["latency"]["memory"]["rows"]
    shapes = {"digits": (TINY.latency_digits_batch, 1, 8, 8), "MLP": (TINY.mlp_batch, TINY.mlp_dim)}
    assert {r["family"] for r in rows} == set(TINY.memory_families)
    for r in rows:
        key = (r["family"], r["model"], r["device"])
        serial = next(s for s in rows if (s["family"], s["model"], s["device"]) == key and s["method"] == "serial sampler")
        shape = next(v for k, v in shapes.items() if r["model"].startswith(k))
        assert r["state_bytes"] == 4 * math.prod(shape)  # float32 states
        if r is serial:
            assert r["extra_bytes"] == 0 and r["analytic_extra_bytes"] == 0
            continue
        assert r["width"] == max(TINY.latency_widths)
        if r["peak_bytes"] is not None:
            assert r["extra_bytes"] == r["peak_bytes"] - serial["peak_bytes"]
        per_draft = 3 if family(r["family"], 3)[0].stochastic else 2
        assert r["analytic_extra_bytes"] == per_draft * r["width"] * r["state_bytes"]
    assert {r["executor"] for r in rows if r["method"] != "serial sampler"} == {"SerialExecutor", "BatchedExecutor"}
    assert memory_widths(TINY.with_(latency_widths=(1, 2, 4))) == [4] and memory_widths(TINY.with_(latency_widths=(1,))) == []


# ----------------------------------------------------------------------------------------- metrics


def test_rmse_and_sliced_wasserstein_references():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 1, generator=g, dtype=torch.float64)
    assert rmse(a, a) == 0.0
    assert rmse(a, a + 0.5) == pytest.approx(0.5)
    # in 1-D every direction is +-1: SW2 is the 1-D W2; a shift by c moves every quantile by c
    assert sliced_wasserstein(a, a + 0.7, n_projections=8) == pytest.approx(0.7)
    # W2(a, s a) for a centred a = |s - 1| sqrt(mean(a^2)) (quantiles scale)
    ac = a - a.mean()
    assert sliced_wasserstein(ac, 3 * ac, n_projections=4) == pytest.approx(2 * float(ac.pow(2).mean().sqrt()))
    # a shift v in D dims: mean over directions of (u.v)^2, with the same directions
    b = torch.randn(200, 3, generator=g, dtype=torch.float64)
    v = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    u = torch.randn(3, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u = u / u.norm(dim=0, keepdim=True)
    want = float((v @ u).pow(2).mean().sqrt())
    assert sliced_wasserstein(b, b + v, n_projections=64, seed=5) == pytest.approx(want)
    with pytest.raises(ValueError):
        rmse(a, b)


def test_mmd_against_sklearn_kernel():
    from sklearn.metrics.pairwise import euclidean_distances, rbf_kernel

    g = torch.Generator().manual_seed(1)
    a = torch.randn(60, 4, generator=g, dtype=torch.float64)
    b = torch.randn(50, 4, generator=g, dtype=torch.float64) + 0.4
    pooled = torch.cat([a, b]).numpy()
    d = euclidean_distances(pooled)
    h = float(torch.tensor(d[~torch.eye(110, dtype=torch.bool).numpy()]).median())
    gamma = 1 / (2 * h * h)
    kaa, kbb, kab = rbf_kernel(a.numpy(), gamma=gamma), rbf_kernel(b.numpy(), gamma=gamma), rbf_kernel(a.numpy(), b.numpy(), gamma=gamma)
    want = (kaa.sum() - 60) / (60 * 59) + (kbb.sum() - 50) / (50 * 49) - 2 * kab.mean()
    assert median_bandwidth(a, b) == pytest.approx(h, rel=1e-9)
    assert mmd2_rbf(a, b) == pytest.approx(want, rel=1e-9)
    assert mmd2_rbf(a, b, bandwidth=0.8) != pytest.approx(want)
    assert mmd2_rbf(a, b) > mmd2_rbf(a, torch.randn(50, 4, generator=g, dtype=torch.float64)) - 1e-12


def test_rmse_is_the_root_mean_square():
    """Against numpy on differences of unequal size (the mean absolute difference would differ)."""
    import numpy as np

    g = torch.Generator().manual_seed(2)
    a = torch.randn(40, 3, 2, generator=g, dtype=torch.float64)
    b = a + torch.randn(40, 3, 2, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2.0, 2, dtype=torch.float64)
    d = (a - b).numpy()
    assert rmse(a, b) == pytest.approx(float(np.sqrt(np.mean(d**2))), rel=1e-12)
    assert rmse(a, b) != pytest.approx(float(np.mean(np.abs(d))), rel=1e-3)


def _w2_1d_reference(a, b):
    """The module key's 1-D W2 of two sets of unequal sizes, by numpy: the larger set's sorted values against the
    smaller's (linearly interpolated) quantiles at (i + 1/2) / K, K the larger size."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    k = max(len(a), len(b))
    q = (np.arange(k) + 0.5) / k
    qa = np.sort(a) if len(a) == k else np.quantile(a, q)
    qb = np.sort(b) if len(b) == k else np.quantile(b, q)
    return float(np.sqrt(np.mean((qa - qb) ** 2)))


def test_sliced_wasserstein_sets_of_unequal_sizes():
    """In 1-D every unit direction is +-1, so SW2 is the 1-D W2 whatever the directions: checked against numpy
    for sets of different sizes (either one the larger), for the function and for SlicedWassersteinTo; in 16-D
    SlicedWassersteinTo(data)(x) equals sliced_wasserstein(x, data) (its documented identity) with the default
    projections, for x smaller and larger than the data."""
    from benchmarks.metrics import SlicedWassersteinTo

    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 1, generator=g, dtype=torch.float64)
    b = 0.5 + 2.0 * torch.rand(100, 1, generator=g, dtype=torch.float64)
    want = _w2_1d_reference(a, b)
    assert want > 0.3
    assert sliced_wasserstein(a, b, n_projections=8) == pytest.approx(want, rel=1e-12)
    assert sliced_wasserstein(b, a, n_projections=8) == pytest.approx(want, rel=1e-12)
    assert SlicedWassersteinTo(b, n_projections=8)(a) == pytest.approx(want, rel=1e-12)
    assert SlicedWassersteinTo(a, n_projections=8)(b) == pytest.approx(want, rel=1e-12)
    data = torch.randn(120, 16, generator=g, dtype=torch.float64)
    for n in (50, 120, 200):
        x = 0.8 * torch.randn(n, 16, generator=g, dtype=torch.float64) + 0.3
        assert SlicedWassersteinTo(data)(x) == pytest.approx(sliced_wasserstein(x, data), rel=1e-12)
        assert SlicedWassersteinTo(data, seed=4)(x) == pytest.approx(sliced_wasserstein(x, data, seed=4), rel=1e-12)


def _mmd2_double_loop(a, b, h):
    """Unbiased MMD^2 with k(x, y) = exp(-|x - y|^2 / (2 h^2)), one pair at a time."""
    import math

    a, b = a.tolist(), b.tolist()
    k = lambda x, y: math.exp(-sum((p - q) ** 2 for p, q in zip(x, y)) / (2 * h * h))
    n, m = len(a), len(b)
    saa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sbb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return saa + sbb - 2 * sab


def test_mmd_to_matches_a_double_loop():
    """MMDTo (what the tables use) against the estimator computed pair by pair; its default bandwidth is the
    (lower) median of the reference set's own pairwise distances, by scipy's pdist."""
    import numpy as np
    from scipy.spatial.distance import pdist

    from benchmarks.metrics import MMDTo

    g = torch.Generator().manual_seed(4)
    data = torch.randn(15, 3, generator=g, dtype=torch.float64)
    x = 1.3 * torch.randn(11, 3, generator=g, dtype=torch.float64) + 0.5
    dists = np.sort(pdist(data.numpy()))
    h = float(dists[(len(dists) - 1) // 2])  # 105 pairs: the median
    mmd = MMDTo(data)
    assert mmd.h == pytest.approx(h, rel=1e-12)
    want = _mmd2_double_loop(x, data, h)
    assert mmd(x) == pytest.approx(want, rel=1e-10)
    assert mmd2_rbf(x, data, bandwidth=h) == pytest.approx(want, rel=1e-10)
    assert MMDTo(data, bandwidth=0.7)(x) == pytest.approx(_mmd2_double_loop(x, data, 0.7), rel=1e-10)
    # unbiased: an independent set from the same law scores near zero, either sign
    same = torch.randn(15, 3, generator=g, dtype=torch.float64)
    assert mmd(same) == pytest.approx(_mmd2_double_loop(same, data, h), rel=1e-9, abs=1e-12)


def test_median_bandwidth_subsamples_max_points_rows():
    """Above max_points rows, the bandwidth is the median pairwise distance of a subset of exactly max_points of
    them (checked against every such subset, by brute force)."""
    import itertools

    import numpy as np
    from scipy.spatial.distance import pdist

    g = torch.Generator().manual_seed(5)
    a = torch.randn(8, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0], dtype=torch.float64)
    lower_median = lambda d: float(np.sort(d)[(len(d) - 1) // 2])
    assert median_bandwidth(a, max_points=8) == pytest.approx(lower_median(pdist(a.numpy())), rel=1e-12)
    medians = [lower_median(pdist(a.numpy()[list(s)])) for s in itertools.combinations(range(8), 6)]
    for seed in range(3):
        h = median_bandwidth(a, max_points=6, seed=seed)
        assert min(abs(h - m) for m in medians) < 1e-12 * h



def test_median_bandwidth_subsample_draws_from_both_sets():
    """The subset is drawn from the pooled rows, not the first max_points (which would all be a's): a tight
    cluster a and a spread set b give about the median heuristic of the whole pool, not a's own tiny one."""
    import numpy as np
    from scipy.spatial.distance import pdist

    g = torch.Generator().manual_seed(6)
    a = 1e-3 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    b = torch.randn(40, 3, generator=g, dtype=torch.float64)
    full = float(np.median(pdist(torch.cat([a, b]).numpy())))  # ~1.3; a's own ~3e-3
    for seed in range(3):
        assert 0.5 * full < median_bandwidth(a, b, max_points=40, seed=seed) < 2.0 * full

# ------------------------------------------------------------------------------------------- report


def _md_tables(text):
    """Every Markdown table of ``text`` as a list of {header: cell} rows."""
    tables, cur = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cur is None:
                cur = {"header": cells, "rows": []}
            elif not set("".join(cells)) <= {"-"}:
                cur["rows"].append(dict(zip(cur["header"], cells)))
        elif cur is not None:
            tables.append(cur["rows"])
            cur = None
    if cur is not None:
        tables.append(cur["rows"])
    return tables


def _synthetic_table():
    """A quality table whose every figure is distinct, so a number in the wrong column shows."""
    rows = [{"method": "serial", "width": 1, "rounds": 10, "evals": 10, "rmse": 0.0, "sliced W2": 0.5, "MMD²": 1.25e-4},
            {"method": "data floor", "sliced W2": 0.25, "MMD²": -3.5e-5, "sd": {"sliced W2": 0.0625, "MMD²": 4.5e-4}}]
    for w, (ra, rc) in ((2, (6, 7)), (4, (4, 5))):
        for mode, rounds in (("aggressive", ra), ("conservative", rc)):
            label = f"{mode[0]}{w}"
            rows.append({"method": f"DRiffusion {mode}", "width": w, "label": label, "rounds": rounds, "evals": 10,
                         "rmse": 0.001 * w * rounds, "sliced W2": 0.5 + 0.01 * w + 0.001 * rounds, "MMD²": 2.5e-4 * w})
            for i, m in enumerate(("step skipping", "Picard (frozen)", "Picard (skip)")):
                rows.append({"method": m, "width": 1 if i == 0 else w, "matched": label, "rounds": rounds,
                             "evals": rounds if i == 0 else rounds + 3, "rmse": 0.002, "sliced W2": 0.7,
                             "MMD²": 7.5e-4, "ratio": 0.3 * (i + 1) + 0.05 * w + 0.02 * rounds,
                             **({"tolerance": "0.1", "within_rounds": i != 2} if i else {})})
        for init in ("frozen", "skip"):
            rows.append({"method": f"Picard ({init}) converged", "width": w, "matched": f"a{w}", "tolerance": "0.001",
                         "rounds": 9, "evals": 30, "rmse": 1.5e-6, "sliced W2": 0.5, "MMD²": 1.3e-4, "ratio": 123.0 + w})
    return {"model": "ring", "family": "ddim", "transition": "DDIMSkip(...)", "num_steps": 10, "batch": 8,
            "metrics": ["sliced W2", "MMD²"], "rows": rows, "picard_sweep": [],
            "checks": [{"check": "a2: rounds", "ok": True, "got": 6, "want": 6},
                       {"check": "a4: rounds", "ok": False, "got": 5, "want": 4}], "notes": []}


def test_summary_rows_are_the_widest_rows_against_their_own_baselines():
    """The README's summary: per table, DRiffusion at the largest width in each mode, its rounds over the serial
    sampler's, its RMSE, each equal-rounds baseline's ratio in its own column (not the converged rows'), and the
    first distance to data of the row and of the serial sampler."""
    from benchmarks.report import SUMMARY_HEADER, summary_rows

    t = _synthetic_table()
    out = summary_rows({"oracle": {"tables": [t]}})
    by = {r["label"]: r for r in t["rows"] if r.get("label")}
    ratio = lambda label, m: next(r["ratio"] for r in t["rows"] if r.get("matched") == label and r["method"] == m)
    assert [r[1] for r in out] == ["a4", "c4"]
    for cells in out:
        row = dict(zip(SUMMARY_HEADER, cells))
        d = by[cells[1]]
        assert row["table"] == "ring / ddim"
        assert row["rounds / serial"] == f"{d['rounds']} / 10"
        assert float(row["RMSE to serial"]) == pytest.approx(d["rmse"], rel=1e-2)
        for col, m in (("÷ step skipping", "step skipping"), ("÷ Picard (frozen)", "Picard (frozen)"),
                       ("÷ Picard (skip)", "Picard (skip)")):
            assert float(row[col]) == pytest.approx(ratio(d["label"], m), abs=0.006), col
        dist, serial = row["distance to data: DRiffusion / serial"].split(" (")[0].split(" / ")
        assert float(dist) == pytest.approx(d["sliced W2"], rel=1e-3) and float(serial) == pytest.approx(0.5)


@pytest.mark.parametrize("v", [0.0, 3.7e-5, 0.0043, 0.049, 0.0996, 0.1, 0.21, 1.02, 42.0, 99.4, 123.0, 4.5e4])
def test_ratio_cells_keep_two_significant_digits(v):
    """A ratio cell never rounds a small ratio to 0.00 and never shows a nonzero ratio as zero: it holds the
    ratio to within half a unit of its last shown digit, two significant digits at least."""
    from benchmarks.report import fmt

    cell = fmt(v, "x")
    if v == 0:
        assert cell == "0"
        return
    assert float(cell) != 0 and float(cell) == pytest.approx(v, rel=0.05)
    digits = cell.split("e")[0].replace("-", "").replace(".", "").lstrip("0")
    assert len(digits) >= 2, cell
    if abs(v) < 0.1:  # exactly two there: the last digit shown is the second significant one, 10^(floor(log10 v) - 1)
        assert len(cell.split(".")[1]) == 1 - math.floor(math.log10(abs(v))), cell


def test_quality_table_columns_hold_their_figures():
    """Each column of a quality table's Markdown holds its own figure (rounds, model calls, RMSE, each distance,
    the ratio on baseline rows only), to the digits the cell shows."""
    from benchmarks.report import quality_table_md

    t = _synthetic_table()
    (md,) = _md_tables(quality_table_md(t))
    assert len(md) == len(t["rows"])
    for r, cells in zip(t["rows"], md):
        assert cells["rounds"] == ("-" if r["method"] == "data floor" else str(r["rounds"]))
        assert cells["calls"] == ("-" if r["method"] == "data floor" else str(r["evals"]))
        assert cells["n"] == ("-" if r["method"] == "data floor" else str(r["width"]))
        if "rmse" in r:
            assert float(cells["RMSE to serial"]) == pytest.approx(r["rmse"], rel=2e-3, abs=0)
        for m, rel in (("sliced W2", 1e-3), ("MMD²", 5e-3)):  # small values: 3 significant digits
            value, _, sd = cells[m].partition(" ± ")  # the floor's spread over independent draws, after ±
            assert float(value) == pytest.approx(r[m], rel=rel)
            assert (float(sd) == pytest.approx(r["sd"][m], rel=rel)) if "sd" in r else sd == ""
        if "matched" in r:
            assert float(cells["DRiffusion ÷ baseline"]) == pytest.approx(r["ratio"], abs=0.006, rel=0.05)  # 1.2e+02 above 100
            assert f"vs {r['matched']}" in cells["method"]
        else:
            assert cells["DRiffusion ÷ baseline"] == ""


def test_report_counts_failed_self_checks():
    from benchmarks.report import render_report, render_summary

    t = _synthetic_table()
    results = {"config": {"name": "tiny", "seed_x": 1, "seed_noise": 2, "seed_data": 3},
               "environment": {"date": "today", "torch": "x", "threads": 1, "machine": "m"},
               "oracle": {"tables": [t]}}
    report = render_report(results, {})
    assert "Self-checks: 1 of 2 passed" in report and "- FAILED ring/ddim a4: rounds: got 5, want 4" in report
    assert "self-checks: 1 passed, 1 failed" in render_summary(results)


def test_latency_and_memory_tables_hold_their_figures():
    """The latency table's speedup and T / rounds columns, and the memory table's KiB columns (bytes / 1024)."""
    from benchmarks.report import _latency_md, render_summary

    rows = [{"model": "MLP", "method": "serial sampler", "executor": "-", "width": 1, "rounds": 20, "seconds": 2.0,
             "speedup": 1.0, "rounds_speedup": 1.0}]
    for w, r, s in ((2, 11, 1.25), (4, 6, 0.8)):
        rows.append({"model": "MLP", "method": "DRiffusion aggressive", "executor": "BatchedExecutor", "width": w,
                     "rounds": r, "seconds": s, "speedup": 2.0 / s, "rounds_speedup": 20 / r})
    mem = [{"family": "ddim", "model": "MLP", "device": "cpu", "method": "serial sampler", "executor": "-", "width": 1,
            "peak_bytes": 40960, "extra_bytes": 0, "analytic_extra_bytes": 0, "state_bytes": 2048},
           {"family": "ddim", "model": "MLP", "device": "cpu", "method": "DRiffusion aggressive", "executor": "SerialExecutor",
            "width": 4, "peak_bytes": 61440, "extra_bytes": 20480, "analytic_extra_bytes": 16384, "state_bytes": 2048}]
    lat = {"executors": {"num_steps": 20, "repeats": 3, "threads": 2, "rows": rows,
                         "models": [{"name": "MLP", "note": "n", "call_seconds": 0.01}]},
           "memory": {"num_steps": 5, "method": "m.", "rows": mem}}
    ex_md, mem_md = _md_tables(_latency_md(lat))
    for r, cells in zip(rows, ex_md):
        assert float(cells["speedup"]) == pytest.approx(r["speedup"], abs=0.006)
        assert float(cells["T / rounds"]) == pytest.approx(r["rounds_speedup"], abs=0.006)
        assert float(cells["median s"]) == pytest.approx(r["seconds"], abs=1e-3) and cells["rounds"] == str(r["rounds"])
    for r, cells in zip(mem, mem_md):
        for col, key in (("peak KiB", "peak_bytes"), ("extra KiB", "extra_bytes"),
                         ("analytic extra KiB", "analytic_extra_bytes"), ("state KiB", "state_bytes")):
            assert float(cells[col]) == pytest.approx(r[key] / 1024, abs=0.05), col
    # the terminal summary quotes the widest rows
    lines = render_summary({"latency": lat}).splitlines()
    assert any("n=4" in l and "speedup 2.50x (rounds 3.33x)" in l for l in lines)
    assert not any("n=2" in l for l in lines)


# ----------------------------------------------------------------------------------------- Picard study


@pytest.fixture(scope="module")
def picard_quick():
    from benchmarks import picard_study

    return picard_study.run(quick=True)


def _ring_family(name, T):
    """A Picard-study family built from its docstring: the exact ring; DDIM (trailing, stride), DDPM and
    DPM-Solver++ 2M (trailing) on the linear VP schedule, epsilon; flow matching (shift 3), velocity."""
    from driffusion_core import FlowSchedule, VPSchedule
    from solvers import DDIMSkip, DDPMSkip, DPMSolverSkip, FlowEulerSkip

    vp, flow = VPSchedule.linear(), FlowSchedule(shift=3.0)
    tr, grid = {"ddim": (DDIMSkip(vp), lambda: vp.timesteps(T, "trailing", step_to="stride")),
                "ddpm": (DDPMSkip(vp), lambda: vp.timesteps(T, "trailing")),
                "flow": (FlowEulerSkip(flow), lambda: flow.timesteps(T)),
                "dpm": (DPMSolverSkip(vp), lambda: vp.timesteps(T, "trailing"))}[name]
    f = ring_mixture().predictor(flow if name == "flow" else vp, "velocity" if name == "flow" else "epsilon")
    return tr, grid(), f


@pytest.mark.parametrize("fam", ["ddpm", "flow"])
def test_picard_study_is_the_library_run_directly(picard_quick, fam):
    """The quick Picard study's rows of one family (DDPM: per-step noise shared with the serial run; flow: 28 steps)
    against direct runs: the error at DRiffusion's rounds (each init's best budgeted run), the fewest rounds to each
    error target over the fine sweep, the same-tolerance counts, the budget ratios to DRiffusion and the levels whose
    last change exceeded tau sigma. Error = ||x - x_serial||_F / ||x_serial||_F, by numpy."""
    import math

    import numpy as np

    from benchmarks import picard_study as ps
    from driffusion_core.scheduler import evaluate_round
    from solvers import PicardScheduler

    res, T = picard_quick, {"ddpm": 50, "flow": 28}[fam]
    rel = lambda a, b: float(np.linalg.norm(a.numpy() - b.numpy()) / np.linalg.norm(b.numpy()))
    tau = lambda t: "inf" if math.isinf(t) else f"{t:g}"
    tr, grid, f = _ring_family(fam, T)
    ex = BatchedExecutor()
    x = NoiseSource(ps.SEED_X).initial((res["batch"], 2), torch.float64)
    noise = NoiseSource(ps.SEED_NOISE) if tr.stochastic else None
    ref = sample_serial(f, x, tr, grid, noise=noise).x
    budget_tols = (1.0, 0.3, 0.1)  # quick
    ratios = {}
    for n in (2, 4):
        d = DraftRefineScheduler(tr, grid, width=n).sample(f, x, executor=ex, noise=noise)
        R, e_d = expected_rounds(T, n, "aggressive"), rel(d.x, ref)
        row = next(r for r in res["at_driffusion_rounds"] if r["family"] == fam and r["width"] == n)
        assert row["rounds"] == d.rounds == R and row["DRiffusion"] == pytest.approx(e_d, rel=1e-9)
        best, sweeps = {}, {}
        for init in ("frozen", "skip"):
            runs = [PicardScheduler(tr, grid, n, t, max_rounds=R, init=init).sample(f, x, executor=ex, noise=noise)
                    for t in budget_tols]
            errs = [rel(o.x, ref) for o in runs]
            assert all(o.rounds <= R for o in runs)
            i = min(range(len(runs)), key=lambda i: (errs[i], i))
            best[init] = (errs[i], tau(budget_tols[i]), runs[i].evals - T)
            if init == "skip":
                ratios.update({f"n={n} tau={tau(t)}": e / e_d for t, e in zip(budget_tols, errs)})
            sweeps[init] = [(t, o, rel(o.x, ref)) for t in ps.SWEEP_TOLERANCES
                            for o in [PicardScheduler(tr, grid, n, t, init=init).sample(f, x, executor=ex, noise=noise)]]
        for init, (err, tol, beyond) in best.items():
            key = {"frozen": ("ParaDiGMS", "ParaDiGMS_tau", "beyond_T_ParaDiGMS"),
                   "skip": ("skip_Picard", "skip_tau", "beyond_T_skip")}[init]
            assert row[key[0]] == pytest.approx(err, rel=1e-9) and (row[key[1]], row[key[2]]) == (tol, beyond), init
        assert row["DRiffusion/skip"] == pytest.approx(e_d / best["skip"][0], rel=1e-9)
        assert row["ParaDiGMS/skip"] == pytest.approx(best["frozen"][0] / best["skip"][0], rel=1e-9)
        # rounds to reach each error target, without a budget: the fewest rounds (then calls) among the runs below it
        hits = {}
        for init, pts in sweeps.items():
            row = next(r for r in res["rounds_to_tolerance"] if (r["family"], r["width"], r["init"]) == (fam, n, init))
            for target in ps.TARGETS:
                ok = [(o.rounds, o.evals, i) for i, (t, o, e) in enumerate(pts) if e <= target]
                k = f"{target:g}"
                if not ok:
                    assert row[f"rounds@{k}"] is None
                    continue
                rounds, evals, i = min(ok)
                hits[init, k] = rounds
                assert (row[f"rounds@{k}"], row[f"beyond_T@{k}"], row[f"tau@{k}"]) == (rounds, evals - T, tau(pts[i][0]))
            if init == "skip":
                for k in (f"{t:g}" for t in ps.TARGETS):
                    want = hits[("frozen", k)] - hits[("skip", k)] if ("frozen", k) in hits and ("skip", k) in hits else None
                    assert row[f"saved@{k}"] == want
        assert len(hits) >= 3  # the targets are reached: the rows above were checked
        # the same tolerance, skip against frozen
        same = next(r for r in res["same_tolerance"] if r["family"] == fam and r["width"] == n)
        for what in ("rounds", "evals"):
            dv = [getattr(s[1], what) - getattr(q[1], what) for s, q in zip(sweeps["skip"], sweeps["frozen"])]
            assert (same[f"{what}: skip fewer"], same[f"{what}: same"], same[f"{what}: skip more"]) == (
                sum(v < 0 for v in dv), sum(v == 0 for v in dv), sum(v > 0 for v in dv))
        assert same["error: skip larger"] == sum(s[2] > q[2] for s, q in zip(sweeps["skip"], sweeps["frozen"]))
    bvd = res["budget_vs_driffusion"][fam]
    assert bvd["ratios"] == pytest.approx(ratios, rel=1e-9)
    assert bvd["worse_than_DRiffusion"] == sum(v > 1 for v in ratios.values())
    assert (bvd["min"], bvd["max"]) == pytest.approx((min(ratios.values()), max(ratios.values())), rel=1e-9)
    # levels whose last measured change exceeded tau sigma (width 4, no budget), by the state machine driven directly
    for tol in ps.LAST_CHANGE_TOLERANCES:
        st = PicardScheduler(tr, grid, 4, tol).start(x, noise)
        last = {}
        while (rnd := st.plan()) is not None:
            st.absorb(rnd, evaluate_round(ex, f, rnd, grid, {}, x))
            last.update(st.moved)
        norm = [math.sqrt(v) for k, v in last.items() if float(st.sigma2[k]) > 0]  # change / sigma, per level
        row = next(r for r in res["last_change"] if r["family"] == fam and r["tolerance"] == tau(tol))
        assert row["levels"] == len(norm) == T - 1
        assert row["above tau sigma"] == sum(c > tol for c in norm)
        over = [c / tol for c in norm if c > tol]
        assert row["largest / (tau sigma)"] == (pytest.approx(max(over)) if over else None)


def test_picard_study_short_grids(picard_quick):
    """Rounds to finish at the same tolerance on the short grid (quick: T = 8, widths 2 and 4), skip against frozen,
    per family and over DDIM, DDPM and flow together, against direct runs."""
    from benchmarks import picard_study as ps
    from solvers import PicardScheduler

    got = picard_quick["short_grids"]
    x = NoiseSource(ps.SEED_X).initial((picard_quick["batch"], 2), torch.float64)
    keys = ("fewer", "same", "more", "rounds_skip", "rounds_frozen", "largest_gap")
    together = dict.fromkeys(keys, 0)
    for fam in ("ddim", "ddpm", "flow", "dpm"):
        tr, grid, f = _ring_family(fam, 8)
        noise = NoiseSource(ps.SEED_NOISE) if tr.stochastic else None
        want = dict.fromkeys(keys, 0)
        for n in (2, 4):
            for tol in ps.SHORT_TOLERANCES:
                r = {init: PicardScheduler(tr, grid, n, tol, init=init).sample(f, x, executor=BatchedExecutor(), noise=noise).rounds
                     for init in ("skip", "frozen")}
                want["fewer" if r["skip"] < r["frozen"] else "same" if r["skip"] == r["frozen"] else "more"] += 1
                want["rounds_skip"] += r["skip"]
                want["rounds_frozen"] += r["frozen"]
                want["largest_gap"] = max(want["largest_gap"], abs(r["skip"] - r["frozen"]))
        assert {k: got["families"][fam][k] for k in keys} == want, fam
        if fam != "dpm":
            together = {k: max(together[k], want[k]) if k == "largest_gap" else together[k] + want[k] for k in keys}
    assert {k: got["ddim+ddpm+flow"][k] for k in keys} == together
    assert any(v["more"] != v["fewer"] for v in got["families"].values())  # the counts tell skip from frozen apart

# -------------------------------------------------------------------------------------------- CLI


def test_cli_options():
    args = parse_args(["--quick", "--only", "oracle,latency"])
    assert args.quick and args.sections == ["oracle", "latency"]
    assert parse_args([]).sections[0] == "oracle"
    with pytest.raises(SystemExit):
        parse_args(["--only", "oracles"])


def test_family_grids_have_T_steps():
    for name in ("ddim", "ddpm", "flow", "dpm", "unipc"):
        transition, grid, _ = family(name, 12)
        assert len(grid) == 12
    with pytest.raises(ValueError, match="ddim, ddpm, flow, dpm or unipc"):
        family("euler", 12)


def test_gpu_latency_module_runs_on_the_cpu(tmp_path):
    """benchmarks.gpu_latency (meant for a lent GPU) on the CPU: every row's rounds are the closed form,
    the executors agree with SerialExecutor, and the CLI writes its table."""
    from benchmarks import gpu_latency

    res = gpu_latency.run("cpu", steps=6, widths=(1, 2), repeats=1, include_diffusers=True)
    names = {m["name"] for m in res["models"]}
    assert any("digits UNet" in n for n in names)
    rows = res["rows"]
    assert {(r["method"], r["width"]) for r in rows} >= {("serial sampler", 1), ("DRiffusion aggressive", 1),
                                                        ("DRiffusion aggressive", 2), ("DRiffusion conservative", 2)}
    for r in rows:
        mode = "aggressive" if "aggressive" in r["method"] else "conservative"
        want = 6 if r["method"] == "serial sampler" else expected_rounds(6, r["width"], mode)
        assert r["rounds"] == want, r
        if r["width"] == 1 and r["method"] != "serial sampler":
            assert r["max_diff_vs_serial_executor"] == 0.0, r  # width 1, one draft: the same call
        elif r["max_diff_vs_serial_executor"] is not None:  # float32 batched kernels round differently
            assert r["max_diff_vs_serial_executor"] < 1e-3, r
        assert r["seconds"] > 0 and r["speedup"] == pytest.approx(
            next(s["seconds"] for s in rows if s["model"] == r["model"] and s["method"] == "serial sampler") / r["seconds"])
    assert res["tf32"] == {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    assert gpu_latency.main(["--device", "cpu", "--steps", "4", "--widths", "1,2", "--repeats", "1",
                             "--no-diffusers", "--strict-fp32", "--out", str(tmp_path)]) == 0
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == saved  # restored
    text = (tmp_path / "gpu_latency.md").read_text()
    assert "| DRiffusion aggressive | BatchedExecutor | 2 |" in text and "TF32 off for cuDNN convolutions, off" in text
    written = json.loads((tmp_path / "gpu_latency.json").read_text())
    assert written["num_steps"] == 4 and written["tf32"] == {"cudnn": False, "matmul": False}


@pytest.mark.distributed
def test_distributed_speedup_study_runs_small():
    """The 2-process study itself, on a tiny grid and MLP: its sample equals the one-process serial
    executor's, its rounds and calls follow the aggressive closed form, and its overhead split is
    made of the round it reports (timings are only checked for being positive: speed lives in the report)."""
    import math

    from benchmarks import distributed_speedup

    T = 7
    r = distributed_speedup.run(quick=True, steps=T, repeats=1, rounds=3, batch=4, dim=8, hidden=32, depth=2)
    assert r["matches_serial_executor"] is True
    assert (r["steps"], r["rounds"], r["evals"]) == (T, 1 + math.ceil((T - 1) / 2), T)
    assert r["ideal_speedup"] == T / r["rounds"]
    assert min(r["call_ms"], r["serial_s"], r["distributed_s"], r["round_ms"], r["exchange_ms"]) > 0
    # the bare loop's sample is checked equal inside run(); its speedup is the serial time over its own
    assert r["bare_s"] > 0 and r["bare_speedup"] == r["serial_s"] / r["bare_s"] and r["executor_cost_frac"] > -1
    assert r["exchange_ms"] <= r["round_ms"]
    assert "world_size=2" in r["executor"]


def test_grid_study_rows_are_the_library_run_directly():
    """The grid study's errors are DRiffusion's and step skipping's RMSE to a direct serial run, and its
    summary counts and bold cells follow the ratios."""
    from benchmarks import grid_study
    from driffusion_core import VPSchedule
    from solvers import DDIMSkip, DPMSolverSkip, ring_mixture

    res = grid_study.run(steps=(8,), widths=(2, 3), spacings=("leading",), batch=16)
    assert res["settings"] == len(res["rows"]) == 2 * 2 * 2
    schedule = VPSchedule.linear(1000, 1e-4, 0.02)
    f = ring_mixture().predictor(schedule, "epsilon")
    x = NoiseSource(grid_study.SEED_X).initial((16, 2), torch.float64)
    for r in res["rows"]:
        if r["family"] == "ddim":
            tr, grid = DDIMSkip(schedule), schedule.timesteps(8, "leading", step_to="stride")
        else:
            tr, grid = DPMSolverSkip(schedule), schedule.timesteps(8, "leading")
        serial = sample_serial(f, x, tr, grid).x
        out = DraftRefineScheduler(tr, grid, r["width"], r["mode"]).sample(f, x)
        skip = sample_step_skipping(f, x, tr, grid, out.rounds).x
        assert r["rounds"] == out.rounds == expected_rounds(8, r["width"], r["mode"])
        assert r["driffusion_rmse"] == pytest.approx(rmse(out.x, serial), rel=1e-12)
        assert r["skipping_rmse"] == pytest.approx(rmse(skip, serial), rel=1e-12)
        assert r["ratio"] == pytest.approx(r["driffusion_rmse"] / r["skipping_rmse"])
    assert res["worse_count"] == sum(r["ratio"] > 1 for r in res["rows"]) == len(res["worse_than_skipping"])
    assert sum(w["settings"] for w in res["by_window"]) == res["settings"]
    clip = {(c["ring radius"], c["clip to [-1, 1]"], c["recompute_eps"]): c for c in res["clipping"]}
    assert set(clip) == {(1.4, True, False), (1.4, True, True), (0.7, True, False), (0.7, True, True), (1.4, False, None)}
    text = grid_study.markdown(res)
    assert text.count("**") == 2 * res["worse_count"] and f"{res['worse_count']} of {res['settings']}" in text


def test_x0_models_study_is_the_library_run_directly(capsys):
    """``python -m benchmarks.x0_models`` (the README's x0-model figures): each row's errors are DRiffusion's
    and step skipping's RMSE to a direct serial run of the x0 oracle, or, wrapped, of the oracle's own epsilon /
    velocity model (which ``reparameterize`` reproduces to rounding), and the printed table holds the ratios."""
    from benchmarks import x0_models
    from driffusion_core import FlowSchedule, VPSchedule
    from solvers import DDIMSkip, FlowEulerSkip

    T, n, B = 8, 3, 16
    assert x0_models.main(["--batch", str(B), "--steps", str(T), "--width", str(n)]) == 0
    (printed,) = _md_tables(capsys.readouterr().out)
    rows = x0_models.run(batch=B, steps=T, width=n)
    assert len(rows) == len(printed) == len(x0_models.SETTINGS) * 2 * len(x0_models.MODES)
    mix = ring_mixture()
    x = NoiseSource(1).initial((B, 2), torch.float64)
    vp, flow = VPSchedule.linear(1000, 1e-4, 0.02), FlowSchedule(shift=3.0)
    direct = {"trailing DDIM": (vp, vp.timesteps(T, "trailing", step_to="stride"), DDIMSkip, "epsilon"),
              "flow (shift 3)": (flow, flow.timesteps(T), FlowEulerSkip, "velocity"),
              "leading DDIM": (vp, vp.timesteps(T, "leading", step_to="stride"), DDIMSkip, "epsilon")}
    for r, cells in zip(rows, printed):
        schedule, grid, transition, target = direct[r["setting"]]
        wrapped = r["model"] != "x0 model"
        prediction = target if wrapped else "sample"
        f, tr = mix.predictor(schedule, prediction), transition(schedule, prediction)
        serial = sample_serial(f, x, tr, grid).x
        out = DraftRefineScheduler(tr, grid, n, r["mode"]).sample(f, x)
        skip = sample_step_skipping(f, x, tr, grid, out.rounds).x
        rel = 1e-4 if wrapped else 1e-12
        assert r["rounds"] == out.rounds == expected_rounds(T, n, r["mode"])
        assert r["driffusion_rmse"] == pytest.approx(rmse(out.x, serial), rel=rel)
        assert r["skipping_rmse"] == pytest.approx(rmse(skip, serial), rel=rel)
        assert r["ratio"] == pytest.approx(r["driffusion_rmse"] / r["skipping_rmse"])
        assert (cells["setting"], cells["model"], cells["mode"]) == (r["setting"], r["model"], r["mode"])
        assert float(cells["ratio"]) == pytest.approx(r["ratio"], abs=0.006)


def test_kdiffusion_study_is_the_library_run_directly(capsys):
    """``python -m benchmarks.kdiffusion_study`` (the README's k-diffusion figures): each row's errors are
    DRiffusion's and step skipping's RMSE to the serial sampler, here k-diffusion's own loops (the test file's
    references, written from k-diffusion's code) on the same Karras sigmas, and the printed table holds the ratios."""
    from benchmarks import kdiffusion_study as study
    from solvers.interop import sigmas_grid
    from test_kdiffusion import sample_dpmpp_2m_reference, sample_euler_ancestral_reference, sample_euler_reference

    T, B = 12, 16
    assert study.main(["--batch", str(B), "--steps", str(T)]) == 0
    (printed,) = _md_tables(capsys.readouterr().out)
    rows = study.run(batch=B, steps=[T])
    assert len(rows) == len(printed) == len(study.SAMPLERS) * len(study.SETTINGS)
    mix = ring_mixture()

    def denoiser(x, sigma):
        return mix.x0_eps(x, torch.ones_like(sigma), sigma)[0]

    sigmas = study.karras_sigmas(T)
    x = NoiseSource(1).initial((B, 2), torch.float64) * sigmas[0]
    def ancestral(eta):
        def ref(model, x, sigmas):  # k-diffusion's loop, its noise_sampler giving the study's NoiseSource in step order
            step = iter(range(len(sigmas)))
            noise = NoiseSource(study.SEED_NOISE)
            return sample_euler_ancestral_reference(model, x, sigmas, eta, 1.0,
                                                    lambda s, s_next: noise(next(step), x.shape, x.dtype))
        return ref

    refs = {"Euler": sample_euler_reference, "DPM++ 2M": sample_dpmpp_2m_reference,
            "Euler a (eta 1)": ancestral(1.0), "Euler a (eta 0.5)": ancestral(0.5)}
    for r, cells in zip(rows, printed):
        serial = refs[r["sampler"]](denoiser, x, sigmas)
        sampler, transition, noise = study.SAMPLERS[r["sampler"]]
        out = sampler(denoiser, x, sigmas, width=r["width"], mode=r["mode"], disable=True, return_output=True)
        if noise is None:
            skip = refs[r["sampler"]](denoiser, x, sigmas[coarse_indices(T, out.rounds)])
        else:  # step skipping's noise is coupled to the fine grid's, which k-diffusion's loop cannot do
            skip = sample_step_skipping(denoiser, x, transition(), sigmas_grid(sigmas, x.dtype), out.rounds, noise=noise).x
        assert r["rounds"] == out.rounds == expected_rounds(T, r["width"], r["mode"])
        assert r["driffusion_rmse"] == pytest.approx(rmse(out.x, serial), rel=1e-9)
        assert r["skipping_rmse"] == pytest.approx(rmse(skip, serial), rel=1e-9)
        assert r["ratio"] == pytest.approx(r["driffusion_rmse"] / r["skipping_rmse"])
        assert (cells["sampler"], cells["mode"]) == (r["sampler"], r["mode"])
        assert float(cells["ratio"]) == pytest.approx(r["ratio"], abs=0.006)


@pytest.mark.parametrize("name", ["quick", "full"])
def test_quick_report_says_its_distributed_row_is_not_representative(name):
    """The quick run's distributed speedup (a short grid, few repeats) carries a caveat in the report and the
    terminal summary; the full run's does not."""
    from benchmarks.report import render_report, render_summary

    dist = {"steps": 20 if name == "quick" else 50, "rounds": 11, "serial_s": 0.24, "distributed_s": 0.3,
            "speedup": 0.8, "ideal_speedup": 1.82}
    results = {"config": {"name": name, "seed_x": 1, "seed_noise": 2, "seed_data": 3},
               "environment": {"date": "today", "torch": "x", "threads": 2, "machine": "m"},
               "distributed": {"result": dist}}
    report, summary = render_report(results, {}), render_summary(results)
    caveat = "this distributed row is not representative"
    section = report.split("## Distributed executor")[1].split("\n## ")[0]
    if name == "quick":
        assert caveat in section and "T = 20" in section
        lines = summary.splitlines()
        i = next(i for i, line in enumerate(lines) if "DistributedExecutor" in line)
        assert caveat in lines[i + 1]  # right under the distributed row
    else:
        assert caveat not in report and caveat not in summary


@pytest.mark.parametrize("argv", [
    ["python -m benchmarks", "--threads", "0"],
    ["python -m benchmarks", "--out", "FILE"],
    ["python -m benchmarks", "--out", "FILE/sub"],
    ["benchmarks.picard_study", "--plot", "DIR/plot.txt"],
    ["benchmarks.picard_study", "--plot", "NO_DIR/plot.png"],
    ["benchmarks.gpu_latency", "--widths", "0,2"],
    ["benchmarks.gpu_latency", "--widths", "a"],
    ["benchmarks.gpu_latency", "--repeats", "0"],
    ["benchmarks.gpu_latency", "--device", "foo"],
    ["benchmarks.gpu_latency", "--device", "meta"],
    ["benchmarks.gpu_latency", "--device", "xpu"],
    ["benchmarks.x0_models", "--batch", "0"],
    ["benchmarks.x0_models", "--width", "-2"],
    ["benchmarks.kdiffusion_study", "--steps", "20,1"],
    ["benchmarks.kdiffusion_study", "--steps", "5,,7"],
    ["benchmarks.kdiffusion_study", "--steps", "20,20"],
    ["benchmarks.picard_study", "--plot", "FILE/plot.png"],
    ["benchmarks.models.train", "--steps", "0"],
    ["benchmarks.models.train", "--threads", "-1"],
    ["proofs", "--json", "NO_DIR/p.json"],
    ["python -m benchmarks", "--out", ""],
    ["proofs", "--json", ""],
], ids=lambda argv: " ".join(argv[1:]) or "empty")
def test_command_lines_refuse_bad_numbers_and_paths_up_front(argv, tmp_path, capsys):
    """A bad count or path is an argparse error (exit status 2, the option named) before any work starts: no
    traceback after minutes of work, and `train --steps 0` never writes untrained weights over the committed ones."""
    import importlib

    prog, args = argv[0], [a.replace("FILE", str(tmp_path / "a_file")).replace("NO_DIR", str(tmp_path / "missing"))
                           .replace("DIR", str(tmp_path)) for a in argv[1:]]
    (tmp_path / "a_file").write_text("")
    if prog == "python -m benchmarks":
        main = lambda a: parse_args(a)  # noqa: E731
    elif prog == "proofs":
        main = importlib.import_module("proofs.__main__").main
    else:
        main = importlib.import_module(prog).main
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_a_refused_command_leaves_no_output_folder(tmp_path, capsys):
    """--out is checked at parse time but made by the run: a command refused for another argument (here an
    unknown --only section, or a bad --device) leaves no empty folder behind."""
    from benchmarks.gpu_latency import main as gpu_main

    for refused, out in ((lambda o: parse_args(["--only", "bogus", "--out", str(o)]), tmp_path / "a" / "b"),
                         (lambda o: gpu_main(["--device", "meta", "--out", str(o)]), tmp_path / "g")):
        with pytest.raises(SystemExit) as info:
            refused(out)
        assert info.value.code == 2 and not out.exists() and not (tmp_path / "a").exists()
    assert parse_args(["--quick", "--out", str(tmp_path / "new" / "deep")]).out == tmp_path / "new" / "deep"
    assert not (tmp_path / "new").exists()  # accepted; made when the run writes


def test_only_into_a_folder_of_another_preset_is_refused(tmp_path, capsys):
    """--only keeps the folder's other sections only from a run of the same preset: into a folder holding a quick
    run, a full --only run is refused up front (it would drop the quick run's other sections), naming both (a
    quick run into a full run's folder is refused in any case: test_a_quick_run_never_replaces_a_full_runs_results)."""
    import json

    (tmp_path / "results.json").write_text(json.dumps({"config": {"name": "quick"}, "oracle": {"tables": []}}))
    with pytest.raises(SystemExit) as info:
        parse_args(["--only", "grids", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "holds a 'quick' run, not a 'full' one" in err and "--only grids" in err
    parse_args(["--quick", "--only", "grids", "--out", str(tmp_path)])  # the same preset: kept, accepted
    parse_args(["--out", str(tmp_path)])  # every section: nothing to keep


def test_gpu_latency_refuses_cuda_where_there_is_none(capsys):
    from benchmarks import gpu_latency

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    with pytest.raises(SystemExit) as info:
        gpu_latency.main(["--device", "cuda"])
    assert info.value.code == 2 and "use --device cpu" in capsys.readouterr().err


def test_picard_study_checks_its_plot_path_before_the_run(tmp_path):
    """--plot into a folder that does not exist is refused at once (it used to fail after the whole study)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "benchmarks.picard_study", "--quick", "--plot", str(tmp_path / "no" / "p.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr[-500:]


def test_a_quick_run_never_replaces_a_full_runs_results(tmp_path, capsys):
    """`--quick --out <folder of a full run>` (e.g. benchmarks/results) is refused before any work, also with
    every section (it used to replace the committed full results silently); a full run may replace a quick
    one, and a quick one another quick one."""
    for held, preset, argv, refused in (
        ("full", "quick", ["--quick"], True),
        ("full", "quick", ["--quick", "--only", "oracle"], True),
        ("quick", "full", [], False),
        ("quick", "quick", ["--quick"], False),
        ("full", "full", ["--only", "oracle"], False),
    ):
        folder = tmp_path / f"{held}-{preset}-{len(argv)}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"config": {"name": held}}))
        if refused:
            with pytest.raises(SystemExit) as info:
                parse_args([*argv, "--out", str(folder)])
            assert info.value.code == 2 and "holds a full run; a quick run would replace" in capsys.readouterr().err
        else:
            assert parse_args([*argv, "--out", str(folder)]).out == folder


def test_error_vs_rounds_plots_are_readable(tmp_path, monkeypatch):
    """Both error-against-rounds figures, drawn from the committed results: one figure legend (>= 9 pt) under the
    panels; every converged-Picard star labelled with its width; the Picard study in two columns, its budgeted
    markers in the legend, each panel's grid length T in its title, DRiffusion's widths on the top axes."""
    import matplotlib.pyplot as plt

    from benchmarks import picard_study, plots
    from benchmarks.runner import RESULTS_DIR

    results = json.loads((RESULTS_DIR / "results.json").read_text())
    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig) or close(fig))

    tables = quality_tables(results)
    widest = max(p["width"] for t in tables for p in t.get("picard_sweep", []))
    plots.plot_error_vs_rounds(tables, tmp_path / "e.png")
    fig = figs.pop()
    (legend,) = fig.legends
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 9
    labels = [t.get_text() for t in legend.get_texts()]
    assert "Picard (frozen) converged (label: width n)" in labels and f"Picard (skip), tolerance sweep at n = {widest}" in labels
    stars = sum(1 for t in tables for r in t["rows"] if r["method"].endswith(" converged") and (r.get("rmse") or 0) > 0)
    tags = [a.get_text() for ax in fig.axes for a in ax.texts]
    assert len(tags) == stars and all(t.startswith("n=") for t in tags)
    assert (tmp_path / "e.png").stat().st_size > 0

    res = results["picard"]["result"]
    picard_study.plot_error_vs_rounds(res, tmp_path / "p.png")
    fig = figs.pop()
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == len(res["curves"]) and len({round(ax.get_position().x0, 3) for ax in panels}) == 2
    for ax, (fam, c) in zip(panels, res["curves"].items()):
        assert ax.get_title() == f"{fam}: T = {c['T']} steps"
    (legend,) = fig.legends
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 9
    labels = [t.get_text() for t in legend.get_texts()]
    assert sum("capped at DRiffusion's rounds" in lab for lab in labels) == 2
    markers = {h.get_marker() for h in legend.legend_handles}
    assert {"^", "D"} <= markers
    assert all(not ax.texts for ax in panels)  # no n= labels on the lines: the top axis carries them
    assert (tmp_path / "p.png").stat().st_size > 0

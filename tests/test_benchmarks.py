"""Smoke test of the benchmark suite: a tiny configuration of every table, checked against references.

One run of the runner (oracle, digits, time series, latency) into a temporary folder; then the
report and plots must exist and the numbers must agree with what the library computes directly:
rounds equal ``expected_rounds``, width 1 is the serial sample exactly, a DRiffusion row's RMSE is
the RMSE of a fresh DRiffusion run against a fresh serial run, every ratio is the quotient of its
two rows. The metrics are checked against independent references (scikit-learn's RBF kernel,
closed-form 1-D Wasserstein distances).
"""
from __future__ import annotations

import json
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
from solvers import sample_serial, sample_step_skipping

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


# -------------------------------------------------------------------------------------------- CLI


def test_cli_options():
    args = parse_args(["--quick", "--only", "oracle,latency"])
    assert args.quick and args.sections == ["oracle", "latency"]
    assert parse_args([]).sections[0] == "oracle"
    with pytest.raises(SystemExit):
        parse_args(["--only", "oracles"])


def test_family_grids_have_T_steps():
    for name in ("ddim", "ddpm", "flow", "dpm"):
        transition, grid, _ = family(name, 12)
        assert len(grid) == 12
    with pytest.raises(ValueError, match="ddim, ddpm, flow or dpm"):
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
    assert gpu_latency.main(["--device", "cpu", "--steps", "4", "--widths", "1,2", "--repeats", "1",
                             "--no-diffusers", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu_latency.md").read_text()
    assert "| DRiffusion aggressive | BatchedExecutor | 2 |" in text
    assert json.loads((tmp_path / "gpu_latency.json").read_text())["num_steps"] == 4


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

"""Runs the selected sections, writes ``results.json``, ``report.md`` and the plots, prints a summary.

Sections: ``oracle``, ``digits``, ``timeseries`` (quality tables), ``latency`` (executors, memory,
scheduler overhead), ``grids`` (``benchmarks.grid_study``), ``picard`` (``benchmarks.picard_study``),
``distributed`` (``benchmarks.distributed_speedup``). A section whose built-in model or module is not available is
recorded as skipped, with the reason, in the report and the summary; any other error stops the run.
Running a subset (``--only``) into a folder that already holds results of the same preset updates
those sections and keeps the others.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

from benchmarks import cases as cases_mod
from benchmarks import plots
from benchmarks.config import SECTIONS, BenchConfig
from benchmarks.latency import latency_runs, run_latency
from benchmarks.memory import memory_runs, run_memory
from benchmarks.overhead import overhead_runs, run_overhead
from benchmarks.quality import row_label, run_case, runs_per_case
from driffusion_core import WideWindowWarning
from benchmarks.report import render_report, render_summary, section_dates_text, summary_rows, SUMMARY_HEADER, md_table

__all__ = ["run", "RESULTS_DIR", "README"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STUDIES = {"grids": "grid_study", "picard": "picard_study", "distributed": "distributed_speedup"}
README = Path(__file__).resolve().parent / "README.md"
README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


class _Bar:
    """A tqdm bar for one section (or nothing when progress is off)."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"{desc:<11}", unit="run", leave=True, dynamic_ncols=True)

    def __call__(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _quality(builder: Callable[[BenchConfig], list], cfg: BenchConfig, bar_on: bool, desc: str):
    try:
        cases = builder(cfg)
    except cases_mod.ModelUnavailable as e:
        return {"skipped": str(e)}, {}
    bar = _Bar(bar_on, sum(runs_per_case(c, cfg) for c in cases), desc)
    tables, samples = [], {}
    try:
        for case in cases:
            table, s = run_case(case, cfg, bar)
            tables.append(table)
            samples[case.family] = s
    finally:
        bar.close()
    return {"tables": tables}, samples


def _digit_panels(samples: Dict[str, Dict[str, torch.Tensor]], cfg: BenchConfig) -> Optional[dict]:
    fam = "ddim" if "ddim" in samples else next(iter(samples), None)
    if fam is None:
        return None
    s, n = samples[fam], max(cfg.widths)
    panels = {f"serial ({cfg.num_steps} rounds)": s["serial"]}
    for mode in ("aggressive", "conservative"):
        label = row_label(mode, n)
        panels[f"DRiffusion {mode} n={n} ({s[label + ':rounds']} rounds)"] = s[label]
    label = row_label("aggressive", n)
    panels[f"step skipping ({s[label + ':rounds']} rounds)"] = s["skip:" + label]
    return {"family": fam, "panels": panels}


def _optional_study(module: str, quick: bool) -> dict:
    """INTEGRATION POINT for the studies other issues deliver: ``benchmarks.<module>.run(quick) -> dict``."""
    import importlib

    try:
        mod = importlib.import_module(f"benchmarks.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"benchmarks.{module}":
            raise
        return {"skipped": f"benchmarks/{module}.py is not in this checkout yet"}
    return {"result": mod.run(quick), "module": mod}


def _environment(cfg: BenchConfig) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        "load_start": _load(),
    }


def _load() -> Optional[float]:
    """The 1-minute load average (other processes make wall-clock noisy), where the OS reports it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if k != "module"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def update_readme(results: dict, readme: Path = README) -> bool:
    """Replace the block between the README's result markers with the latest summary table."""
    if not readme.exists():
        return False
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        return False
    rows = summary_rows(results)
    dates = section_dates_text(results)
    block = (f"{start}\n_{results['environment']['date']}, {results['config']['name']} run, "
             f"{results.get('total_seconds', 0):.0f} s on {results['environment']['threads']} CPU threads"
             f"{' (sections by run: ' + dates + ')' if dates else ''}._\n\n"
             f"{md_table(SUMMARY_HEADER, rows)}\n{end}")
    new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    readme.write_text(new)
    return True


def kept_run(out_dir: Path, preset_name: str, sections: List[str]) -> str:
    """Why a run of ``sections`` cannot go into ``out_dir`` ('' when it can): a subset (``--only``) keeps the
    other sections of the folder's ``results.json`` only when they are of the same preset; one of another
    preset (a full run under a quick one), or an unreadable one, would be replaced without them. A quick run
    never replaces a full one (the committed results), even of every section."""
    old = Path(out_dir) / "results.json"
    if not old.exists():
        return ""
    try:
        name = json.loads(old.read_text()).get("config", {}).get("name")
    except (json.JSONDecodeError, OSError, AttributeError):
        name = "unreadable"
    if preset_name == "quick" and name == "full":
        return (f"{old} holds a full run; a quick run would replace its results with the quick preset's. Write the "
                f"quick run to another folder (--out, or leave --out out: results/quick/).")
    if name == preset_name or set(sections) == set(SECTIONS):
        return ""
    return (f"--only {','.join(sections)}: {old} holds a {name!r} run, not a {preset_name!r} one; its other sections "
            f"would be lost. Write to another folder (--out), or run every section.")


def run(
    cfg: BenchConfig,
    sections: Iterable[str] = SECTIONS,
    out_dir: Optional[Path] = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run ``sections`` with settings ``cfg``; write the outputs under ``out_dir``; return the results."""
    sections = list(sections)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    out_dir = Path(out_dir) if out_dir is not None else (RESULTS_DIR / "quick" if cfg.name == "quick" else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()

    results: dict = {}
    old = out_dir / "results.json"
    clash = kept_run(out_dir, cfg.name, sections)
    if clash:
        raise ValueError(clash)
    if old.exists() and set(sections) != set(SECTIONS):
        try:
            prev = json.loads(old.read_text())
            if prev.get("config", {}).get("name") == cfg.name:
                results = prev
        except json.JSONDecodeError:
            pass
    results["config"] = _jsonable(cfg.as_dict())
    kept_date = results.get("environment", {}).get("date")
    results["environment"] = _environment(cfg)
    # when each section ran: a --only run updates its own sections and keeps the others' (and their dates)
    section_dates: Dict[str, str] = dict(results.get("section_dates", {}))
    for sec in SECTIONS:
        if sec in results and sec not in section_dates and kept_date:
            section_dates[sec] = kept_date
    plot_files: Dict[str, str] = dict(results.get("plots", {}))
    section_seconds: Dict[str, float] = dict(results.get("section_seconds", {}))
    section_cpu: Dict[str, float] = dict(results.get("section_cpu_seconds", {}))

    for sec in SECTIONS:
        if sec not in sections:
            continue
        s0, c0 = time.perf_counter(), time.process_time()
        if sec == "oracle":
            results[sec], _ = _quality(cases_mod.oracle_cases, cfg, progress, sec)
        elif sec == "digits":
            results[sec], samples = _quality(cases_mod.digits_cases, cfg, progress, sec)
            grid = _digit_panels(samples, cfg)
            if grid is not None:
                plots.plot_digit_grid(grid["panels"], out_dir / "digits_samples.png")
                plot_files["digits_samples"] = "digits_samples.png"
        elif sec == "timeseries":
            results[sec], _ = _quality(cases_mod.timeseries_cases, cfg, progress, sec)
        elif sec == "latency":
            bar = _Bar(progress, latency_runs(cfg) + memory_runs(cfg) + overhead_runs(cfg), sec)
            try:
                with warnings.catch_warnings():  # time and memory only: the quick run's short grids are not about accuracy
                    warnings.simplefilter("ignore", WideWindowWarning)
                    results[sec] = {"executors": run_latency(cfg, bar), "memory": run_memory(cfg, bar),
                                    "overhead": run_overhead(cfg, bar)}
            finally:
                bar.close()
        else:
            if progress:
                echo(f"{sec}: running benchmarks.{STUDIES[sec]} ...")
            study = _optional_study(STUDIES[sec], cfg.name == "quick")
            if sec == "picard" and "module" in study:
                study["module"].plot_error_vs_rounds(study["result"], out_dir / "picard_error_vs_rounds.png")
                plot_files["picard"] = "picard_error_vs_rounds.png"
            results[sec] = study
        section_seconds[sec] = time.perf_counter() - s0
        section_cpu[sec] = time.process_time() - c0
        section_dates[sec] = results["environment"]["date"]

    quality = [t for s in ("oracle", "digits", "timeseries") for t in results.get(s, {}).get("tables", [])]
    if quality:
        plots.plot_error_vs_rounds(quality, out_dir / "error_vs_rounds.png")
        plot_files["error_vs_rounds"] = "error_vs_rounds.png"
    lat = results.get("latency", {}).get("executors")
    plots.plot_speedup(cfg.num_steps, list(cfg.widths), lat, out_dir / "speedup.png",
                       results.get("distributed", {}).get("result"))
    plot_files["speedup"] = "speedup.png"

    results["environment"]["load_end"] = _load()
    results["section_seconds"] = section_seconds
    results["section_cpu_seconds"] = section_cpu
    results["section_dates"] = section_dates
    results["total_seconds"] = sum(section_seconds.values()) if section_seconds else time.perf_counter() - t0
    results["plots"] = plot_files
    results = _jsonable(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (out_dir / "report.md").write_text(render_report(results, plot_files))
    if cfg.name == "full" and out_dir.resolve() == RESULTS_DIR.resolve():
        update_readme(results)
    echo("")
    echo(render_summary(results))
    this_run, total = time.perf_counter() - t0, results["total_seconds"]
    kept = "" if abs(total - this_run) < 0.05 * this_run + 1 else f"; its sections, some kept from earlier runs: {total:.0f} s"
    echo(f"\nreport: {out_dir / 'report.md'}  (this run {this_run:.0f} s{kept})")
    return results

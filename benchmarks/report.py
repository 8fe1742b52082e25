"""The Markdown report (``report.md``) and the summary printed to the terminal, from the results dict.

The results dict (also written as ``results.json``) holds ``config``, ``environment``, and one entry
per section (``oracle``, ``digits``, ``timeseries``: quality tables; ``latency``: executors, memory,
overhead; ``picard``, ``distributed``: the studies' own dicts), or ``{"skipped": reason}``.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence

__all__ = ["render_report", "summary_rows", "render_summary", "fmt"]

QUALITY_SECTIONS = ("oracle", "digits", "timeseries")


def fmt(v, kind: str = "g") -> str:
    """A table cell: ``-`` for missing values, exact zeros as ``0``; ``kind`` "e" (scientific), "x" (a ratio),
    "kb" (bytes shown in KiB) or "g" (four significant digits)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if kind == "e":
        return "0" if v == 0 else f"{v:.2e}"
    if kind == "x":  # ratios: two decimals, but two significant digits below 0.1 (0.0043, never 0.00)
        if v == 0:
            return "0"
        if abs(v) < 0.1:
            return f"{v:.{1 - math.floor(math.log10(abs(v)))}f}"
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.1e}"
    if kind == "kb":
        return f"{v / 2**10:.1f}"
    if isinstance(v, int):
        return str(v)
    if v == 0:
        return "0"
    return f"{v:.4g}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _metric_fmt(name: str) -> str:
    return "e" if name.startswith("MMD") else "g"


def _method_cell(r: dict) -> str:
    m = r["method"]
    if r.get("tolerance") is not None:
        m += f" τ={r['tolerance']}"
    if r.get("label"):
        return f"**{m}** ({r['label']})"
    if r.get("matched"):
        over = "" if r.get("within_rounds", True) else ", over its rounds"
        return f"{m} (vs {r['matched']}{over})"
    return m


def _metric_cell(r: dict, m: str) -> str:
    """A distance to the data; on the data floor row with its spread over independent draws, "v ± sd"."""
    sd = r.get("sd", {}).get(m)
    cell = fmt(r.get(m), _metric_fmt(m))
    return cell if sd is None else f"{cell} ± {fmt(sd, _metric_fmt(m))}"


def quality_table_md(t: dict) -> str:
    metrics = t["metrics"]
    header = ["method", "n", "rounds", "calls", "RMSE to serial", *metrics, "DRiffusion ÷ baseline"]
    rows = []
    for r in t["rows"]:
        rows.append([
            _method_cell(r), fmt(r.get("width")) if r["method"] != "data floor" else "-", fmt(r.get("rounds")),
            fmt(r.get("evals")), fmt(r.get("rmse"), "e"), *[_metric_cell(r, m) for m in metrics],
            fmt(r.get("ratio"), "x") if "matched" in r else "",
        ])
    return md_table(header, rows)


def summary_rows(results: dict) -> List[List[str]]:
    """The headline rows: per quality table, DRiffusion at the largest width, each mode."""
    out = []
    for sec in QUALITY_SECTIONS:
        for t in results.get(sec, {}).get("tables", []):
            widest = max(r.get("width", 1) for r in t["rows"] if r.get("label"))
            serial = next(r for r in t["rows"] if r["method"] == "serial")
            metric = t["metrics"][0]
            for r in t["rows"]:
                if not r.get("label") or r["width"] != widest:
                    continue
                ratio = {b["method"]: b.get("ratio") for b in t["rows"] if b.get("matched") == r["label"]}
                out.append([
                    f"{t['model']} / {t['family']}", r["label"], f"{r['rounds']} / {serial['rounds']}",
                    fmt(r["rmse"], "e"), fmt(ratio.get("step skipping"), "x"), fmt(ratio.get("Picard (frozen)"), "x"),
                    fmt(ratio.get("Picard (skip)"), "x"),
                    f"{fmt(r.get(metric), _metric_fmt(metric))} / {fmt(serial.get(metric), _metric_fmt(metric))} ({metric})",
                ])
    return out


SUMMARY_HEADER = ["table", "DRiffusion", "rounds / serial", "RMSE to serial", "÷ step skipping", "÷ Picard (frozen)",
                  "÷ Picard (skip)", "distance to data: DRiffusion / serial"]


def render_summary(results: dict) -> str:
    """A plain-text summary for the terminal."""
    rows = summary_rows(results)
    lines = []
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(SUMMARY_HEADER)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(SUMMARY_HEADER, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lat = results.get("latency", {}).get("executors")
    if lat:
        lines.append("")
        lines.append(f"wall-clock (median of {lat['repeats']}, T = {lat['num_steps']}, {lat['threads']} threads):")
        for r in lat["rows"]:
            if r["method"] != "serial sampler" and r["width"] == max(x["width"] for x in lat["rows"]):
                lines.append(f"  {r['model']}: {r['method']} n={r['width']} {r['executor']}: {r['seconds']:.3f} s, "
                             f"speedup {r['speedup']:.2f}x (rounds {r['rounds_speedup']:.2f}x)")
    dist = results.get("distributed", {}).get("result")
    if dist:
        lines.append(f"  DistributedExecutor, 2 processes ({dist.get('mlp', 'MLP')}): {dist['distributed_s']:.3f} s vs serial "
                     f"{dist['serial_s']:.3f} s (1 thread), speedup {dist['speedup']:.2f}x (rounds {dist['ideal_speedup']:.2f}x)"
                     + (f"; vs serial on both cores as threads {dist['serial_2threads_s']:.3f} s, "
                        f"{dist['speedup_vs_2threads']:.2f}x" if "serial_2threads_s" in dist else ""))
        if results.get("config", {}).get("name") == "quick":
            lines.append("    " + QUICK_DISTRIBUTED_CAVEAT.format(steps=dist.get("steps", "?")))
    grids = results.get("grids", {}).get("result")
    if grids:
        lines.append(f"  grid study: DRiffusion closer to serial than step skipping in {grids['settings'] - grids['worse_count']} "
                     f"of {grids['settings']} (family, spacing, T, width, mode) settings; see the report for where not")
    for sec, val in results.items():
        if isinstance(val, dict) and "skipped" in val:
            lines.append(f"[{sec}] skipped: {val['skipped']}")
    failed = [c for c in all_checks(results) if not c["ok"]]
    lines.append(f"self-checks: {len(all_checks(results)) - len(failed)} passed, {len(failed)} failed")
    lines += [f"  FAILED {c['check']}: got {c['got']}, want {c['want']}" for c in failed]
    return "\n".join(lines)


def all_checks(results: dict) -> List[dict]:
    out = []
    for sec in QUALITY_SECTIONS:
        for t in results.get(sec, {}).get("tables", []):
            out += [dict(c, check=f"{t['model']}/{t['family']} {c['check']}") for c in t["checks"]]
    out += results.get("latency", {}).get("overhead", {}).get("checks", [])
    dist = results.get("distributed", {}).get("result") or {}
    if "matches_serial_executor" in dist:
        out.append({"check": "distributed: the 2-process sample equals the one-process SerialExecutor sample bit for bit",
                    "ok": bool(dist["matches_serial_executor"]), "got": dist["matches_serial_executor"], "want": True})
    return out


def _generic_md(obj: dict) -> str:
    """A study's own dict: its ``rows`` (list of dicts) as a table, other scalars as a list."""
    parts = []
    scalars = [(k, v) for k, v in obj.items() if isinstance(v, (int, float, str, bool)) or v is None]
    if scalars:
        parts.append("\n".join(f"- {k}: {fmt(v)}" for k, v in scalars))
    for key, val in obj.items():
        if isinstance(val, list) and val and all(isinstance(r, dict) for r in val):
            cols = list(dict.fromkeys(k for r in val for k in r if not isinstance(r[k], (list, dict))))
            parts.append(f"*{key}*\n\n" + md_table(cols, [[fmt(r.get(c)) for c in cols] for r in val]))
        elif isinstance(val, dict):
            sub = _generic_md(val)
            if sub:
                parts.append(f"*{key}*\n\n{sub}")
    return "\n\n".join(parts)


PICARD_TABLES = ("at_driffusion_rounds", "rounds_to_tolerance")

PICARD_INTRO = """From `benchmarks/picard_study.py`, on the exact 2-D ring. Unlike the quality tables above (pure
Picard iteration, best tolerance within the rounds), its "at DRiffusion's rounds" protocol runs
`PicardScheduler(max_rounds=R)`: Picard while the budget allows, then draft-and-refine to finish within R
rounds. Errors here are relative: ||x - x_serial|| / ||x_serial||. The full sweeps (`budget_sweep`,
`curves`) are in `results.json`."""


def _picard_md(res: dict) -> str:
    """The Picard study's scalars and its two summary tables (the long sweeps stay in results.json)."""
    parts = ["\n".join(f"- {k}: {fmt(v)}" for k, v in res.items() if isinstance(v, (int, float, str)))]
    for key in PICARD_TABLES:
        rows = res.get(key)
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            cell = lambda v: fmt(v, "e") if isinstance(v, float) and abs(v) < 1e-2 else fmt(v)
            parts.append(f"*{key}*\n\n" + md_table(cols, [[cell(r.get(c)) for c in cols] for r in rows]))
    return "\n\n".join(parts)


def _latency_md(lat: dict) -> str:
    parts = []
    ex = lat.get("executors")
    if ex:
        parts.append(f"### Rounds and wall-clock per executor\n\nDDIM, T = {ex['num_steps']}, median of {ex['repeats']} "
                     f"repeats, {ex['threads']} CPU threads. Speedup = the serial sampler's median wall-clock / the row's; "
                     "T / rounds is the speedup n devices give when a round costs one model call.\n")
        parts.append("\n".join(f"- {m['name']}: {m['note']}; one call {1e3 * m['call_seconds']:.2f} ms" for m in ex["models"]))
        parts.append(md_table(
            ["model", "method", "executor", "n", "rounds", "median s", "speedup", "T / rounds"],
            [[r["model"], r["method"], r["executor"], fmt(r["width"]), fmt(r["rounds"]), f"{r['seconds']:.3f}",
              fmt(r["speedup"], "x"), fmt(r["rounds_speedup"], "x")] for r in ex["rows"]]))
    mem = lat.get("memory")
    if mem:
        parts.append(f"### Extra memory\n\nT = {mem['num_steps']}. Method: {mem['method']} "
                     "Extra = the row's peak minus the serial sampler's peak (same model, family, device); "
                     "analytic = (2 or 3) x n x state bytes: the drafts, their predictions and, for DDPM, their noises. "
                     "With BatchedExecutor the model's activations for n x B rows are part of the peak; "
                     "with SerialExecutor (what one of n devices holds) they are not.\n")
        parts.append(md_table(
            ["family", "model", "device", "method", "executor", "n", "peak KiB", "extra KiB", "analytic extra KiB", "state KiB"],
            [[r["family"], r["model"], r["device"], r["method"], r["executor"], fmt(r["width"]), fmt(r["peak_bytes"], "kb"),
              fmt(r["extra_bytes"], "kb"), fmt(r["analytic_extra_bytes"], "kb"), fmt(r["state_bytes"], "kb")]
             for r in mem["rows"]]))
    ov = lat.get("overhead")
    if ov:
        parts.append(f"### Scheduler overhead per step\n\nA zero-cost predictor (it returns a cached zero tensor), DDIM "
                     f"and DPM-Solver++ 2M, T = {ov['num_steps']}, median of {ov['repeats']}: the time is all outside "
                     "the model. diffusers' DDIMScheduler.step and DPMSolverMultistepScheduler.step are timed on the same "
                     "tensors in the same run.\n")
        parts.append(md_table(
            ["family", "state shape", "method", "executor", "n", "µs per step"],
            [[r.get("family", "ddim"), r["shape"], r["method"], r["executor"], fmt(r["width"]), fmt(r["us_per_step"])]
             for r in ov["rows"]]))
    return "\n\n".join(parts)


GRIDS_INTRO = """From `benchmarks/grid_study.py`, on the exact 2-D ring (epsilon model, batch 512, float64): DDIM
and DPM-Solver++ 2M on diffusers' three timestep spacings, T from 10 to 50, widths 2, 4 and 8. The quality
tables above use T = 50 on trailing grids; this shows how far that carries. The full rows are in
`results.json`."""


DISTRIBUTED_INTRO = """From `benchmarks/distributed_speedup.py`: the serial sampler in one process of one thread (one
"device") against DRiffusion (aggressive, width 2) with `DistributedExecutor` over 2 gloo processes, one thread
each, on its own compute-bound MLP; medians over repeats. `speedup_vs_2threads` compares with the same serial
sampler given both cores as intra-op threads instead (`serial_2threads_s`): the whole machine on one call at a
time. `ideal_speedup` = T / rounds; `comm_overhead_frac` = an
executor round of 2 drafts minus one model call, over one call, with two of its parts: `exchange_frac` (the
round after the slower process's call ended: the all-gather and the executor's checks) and `imbalance_frac`
(how much longer the slower of the two calls took than a median call); each is a median of its own, and
medians do not add, so the parts need not sum to `comm_overhead_frac`; `round_overhead_frac` = the sampler's
time per round minus one call, over one call; `bare_speedup`: the same sampler with a bare SPMD loop
(model call on each share, one `all_gather`, no checks or timeout), this machine's ceiling; `executor_cost_frac`:
DistributedExecutor's time over the bare loop's, paired per repeat, median, minus 1; `matches_serial_executor`:
the 2-process sample equals the one-process `SerialExecutor` sample bit for bit."""


QUICK_DISTRIBUTED_CAVEAT = ("Quick run: this distributed row is not representative (a short grid, T = {steps}, and fewer "
                            "repeats per timing); the speedup to quote is the full run's (`make bench`).")


QUALITY_INTRO = """Every row starts from the same noise x_T and (for DDPM) the same per-step noise. Columns:
rounds = sequential rounds of model calls (the latency on n devices); calls = model calls in total;
RMSE to serial = root-mean-square distance to the serial sampler's output from the same noise (0 means
identical); the distances to the data are measured against true data (lower is better; the
*data floor* row scores one independent set of true data of the same size, itself a noisy draw: it
shows the scale of the values, not a bound; after ± the standard deviation over 8 such sets, how far a
value moves from one draw of the same law to the next; rows share x_T, so differences between rows are
paired and far less noisy than the values themselves);
DRiffusion ÷ baseline = the matched DRiffusion row's RMSE divided by the baseline row's (below 1:
DRiffusion is closer to the serial output at the same rounds and width). Picard at equal rounds is the
best run of a tolerance sweep (τ) that finishes within the DRiffusion row's rounds, window n; the
converged rows run to a fixed tolerance (τ = 1e-3 by default, shown in the row), whatever rounds that takes:
Picard's own stopping test, which bounds each level's last change, not the distance to the serial output (a
sample near the border between two modes can still end in the other one, and one such row dominates an RMSE)."""


def section_dates_text(results: dict) -> str:
    """'' when every section comes from one run, else which sections ran when (newest first), e.g.
    ``"oracle: 2026-12-03 20:18 UTC; digits, latency: 2026-12-03 12:19 UTC"`` (after a ``--only`` run)."""
    dates = results.get("section_dates", {})
    if len(set(dates.values())) < 2:
        return ""
    by_date: Dict[str, List[str]] = {}
    for sec, date in dates.items():
        by_date.setdefault(date, []).append(sec)
    return "; ".join(f"{', '.join(secs)}: {date}" for date, secs in sorted(by_date.items(), reverse=True))


def render_report(results: dict, plots: Dict[str, str]) -> str:
    """The whole Markdown report."""
    cfg, env = results["config"], results["environment"]
    out = [f"# DRiffusion benchmark report ({cfg['name']} run)", ""]
    out.append(f"Generated by `python -m benchmarks{' --quick' if cfg['name'] == 'quick' else ''}` on {env['date']} "
               f"in {results.get('total_seconds', 0):.0f} s; torch {env['torch']}, {env['threads']} CPU threads, "
               f"{env['machine']} ({env.get('cpus')} CPUs visible, 1-minute load average {env.get('load_start')} at the "
               f"start and {env.get('load_end')} at the end: other processes make wall-clock numbers noisy). "
               f"Seeds: x_T {cfg['seed_x']}, per-step noise {cfg['seed_noise']}, data {cfg['seed_data']}.")
    dates = section_dates_text(results)
    if dates:
        out += ["", "Sections by the run that made them (`--only` reruns some sections and keeps the others; the "
                    f"time above is the sum of the sections' own times): {dates}."]
    out.append("")
    rows = summary_rows(results)
    if rows:
        out += ["## Summary", "", "DRiffusion at the largest width against the baselines at the same rounds and width "
                "(÷ columns: DRiffusion's RMSE to the serial output as a fraction of the baseline's).", "",
                md_table(SUMMARY_HEADER, rows), ""]
    checks = all_checks(results)
    if checks:
        failed = [c for c in checks if not c["ok"]]
        out += [f"Self-checks: {len(checks) - len(failed)} of {len(checks)} passed (quality tables: rounds equal the "
                "closed form `expected_rounds`, T model calls counted at the predictor, width 1 equals the serial "
                "sample bit for bit; scheduler overhead: our serial sampler equals diffusers' scheduler loop on the "
                "same tensors; distributed: the 2-process sample equals the one-process SerialExecutor's bit for "
                "bit).", ""]
        out += [f"- FAILED {c['check']}: got {c['got']}, want {c['want']}" for c in failed]
    for name in ("speedup", "error_vs_rounds", "digits_samples", "picard"):
        if name in plots:
            out += [f"![{name}]({plots[name]})", ""]
    for sec, title in (("oracle", "Exact Gaussian-mixture oracles"), ("digits", "Digits UNet (8x8)"),
                       ("timeseries", "Time-series model")):
        val = results.get(sec)
        if val is None:
            continue
        out += [f"## Quality: {title}", ""]
        if "skipped" in val:
            out += [f"Skipped: {val['skipped']}", ""]
            continue
        out += [QUALITY_INTRO, ""]
        for t in val["tables"]:
            out += [f"### {t['model']} / {t['family']}: T = {t['num_steps']}, batch {t['batch']}", "",
                    f"`{t['transition']}`", "", quality_table_md(t), ""]
            out += [f"- {n}" for n in t["notes"]] + ([""] if t["notes"] else [])
    lat = results.get("latency")
    if lat is not None:
        out += ["## Latency", ""]
        out += [f"Skipped: {lat['skipped']}", ""] if "skipped" in lat else [_latency_md(lat), ""]
    for sec, title in (("grids", "Grid study: where the gain over step skipping holds"),
                       ("distributed", "Distributed executor (2 gloo processes)"), ("picard", "Picard study")):
        val = results.get(sec)
        if val is None:
            continue
        out += [f"## {title}", ""]
        if "skipped" in val:
            out += [f"Skipped: {val['skipped']}", ""]
        elif sec == "grids":
            from benchmarks.grid_study import markdown

            out += [GRIDS_INTRO, "", markdown(val["result"]), ""]
        elif sec == "distributed":
            out += [DISTRIBUTED_INTRO, "", md_table(["quantity", "value"], [[k, fmt(v)] for k, v in val["result"].items()]), ""]
            if cfg.get("name") == "quick":
                out += [QUICK_DISTRIBUTED_CAVEAT.format(steps=val["result"].get("steps", "?")), ""]
        else:
            out += [PICARD_INTRO, "", _picard_md(val["result"]), ""]
    out += ["## Configuration", "", "```", *(f"{k} = {v}" for k, v in cfg.items() if k != "extra"), "```", ""]
    return "\n".join(out)

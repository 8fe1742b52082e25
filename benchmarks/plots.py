"""PNG figures of the report (matplotlib, Agg backend; nothing is shown on screen).

* ``speedup.png``: speedup against width, in rounds (T / rounds, what n devices give when a round
  costs one model call) and in wall-clock per executor (from the latency table);
* ``error_vs_rounds.png``: RMSE to the serial output against rounds, one panel per quality table,
  one line per method (DRiffusion over widths, step skipping at DRiffusion's rounds, Picard over its
  tolerance sweep at the widest window, converged Picard as stars labelled with their width);
* ``digits_samples.png``: digit samples from the same noise: serial, DRiffusion and step skipping
  at DRiffusion's rounds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from driffusion_core import expected_rounds  # noqa: E402

__all__ = ["plot_speedup", "plot_error_vs_rounds", "plot_digit_grid"]

STYLE = {
    "DRiffusion aggressive": dict(color="C0", marker="o"),
    "DRiffusion conservative": dict(color="C1", marker="s"),
    "step skipping": dict(color="C3", marker="v", linestyle="--"),
    "Picard (frozen) sweep": dict(color="C2", marker="^", linestyle=":"),
    "Picard (skip) sweep": dict(color="C4", marker="D", linestyle=":"),
    "Picard (frozen) converged": dict(color="C2", marker="*", linestyle="none", markersize=11),
    "Picard (skip) converged": dict(color="C4", marker="*", linestyle="none", markersize=11),
}


def plot_speedup(num_steps: int, widths: List[int], latency: Optional[dict], path: Path,
                 distributed: Optional[dict] = None) -> Path:
    """Speedup against width: rounds (closed form = the scheduler's counts) and measured wall-clock.

    ``distributed`` (``benchmarks.distributed_speedup.run``'s dict) adds its 2-process points: over the 1-thread
    serial sampler, and over the 2-thread one where the dict has it (older results do not).
    """
    ncols = 2 if latency else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    ax = axes[0, 0]
    ws = list(range(1, max(widths) + 1))
    for mode, style in (("aggressive", STYLE["DRiffusion aggressive"]), ("conservative", STYLE["DRiffusion conservative"])):
        ax.plot(ws, [num_steps / expected_rounds(num_steps, w, mode) for w in ws], label=f"DRiffusion {mode}", **style)
    ax.plot(ws, ws, color="grey", linestyle="--", label="ideal n")
    ax.set(xlabel="width n (drafts per round)", ylabel="T / rounds", title=f"Speedup in rounds (T = {num_steps})")
    ax.set_xticks(ws)
    ax.legend()
    if latency:
        ax = axes[0, 1]
        for i, model in enumerate(dict.fromkeys(r["model"] for r in latency["rows"])):
            for ex, ls in (("BatchedExecutor", "-"), ("SerialExecutor", ":")):
                rows = [r for r in latency["rows"] if r["model"] == model and r["executor"] == ex
                        and r["method"] == "DRiffusion aggressive"]
                if rows:
                    ax.plot([r["width"] for r in rows], [r["speedup"] for r in rows], linestyle=ls, marker="o",
                            color=f"C{i}", label=f"{model}, {ex}")
        if distributed:
            ax.plot([2], [distributed["speedup"]], marker="*", markersize=13, color="k", linestyle="none",
                    label=f"DistributedExecutor, 2 processes, vs 1-thread serial (T/rounds {distributed['ideal_speedup']:.2f})")
            if "speedup_vs_2threads" in distributed:
                ax.plot([2], [distributed["speedup_vs_2threads"]], marker="*", markersize=13, color="0.6",
                        linestyle="none", label="DistributedExecutor, 2 processes, vs 2-thread serial")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(xlabel="width n", ylabel="serial wall-clock / wall-clock",
               title=f"Wall-clock speedup, aggressive ({latency['threads']} CPU threads)")
        ax.set_xticks(sorted({r["width"] for r in latency["rows"]}))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_vs_rounds(tables: List[dict], path: Path) -> Path:
    """RMSE to the serial sample against rounds: one panel per table, one line per method.

    Every converged-Picard star is labelled with its width n (in the star's colour, at a free spot next
    to it); the tolerance-sweep lines name the window they were run at. One legend under the panels.
    """
    n = len(tables)
    ncols = min(3, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    tags: Dict[int, list] = {}  # panel -> the converged stars' width labels, placed once the layout is final
    for k, table in enumerate(tables):
        ax = axes[k // ncols, k % ncols]
        sweep = table.get("picard_sweep", [])
        widest = max((p["width"] for p in sweep), default=None)
        for method, style in STYLE.items():
            if method.endswith(" sweep"):  # Picard's tolerance sweep at the widest window: its error-rounds frontier
                init = method.split("(")[1].split(")")[0]
                pts = sorted({(p["rounds"], p["rmse"]) for p in sweep if p["init"] == init and p["width"] == widest
                              and p["rmse"] > 0})
                label = f"Picard ({init}), tolerance sweep at n = {widest}"
            else:
                rows = [r for r in table["rows"] if r["method"] == method and (r.get("rmse") or 0) > 0]
                pts = sorted({(r["rounds"], r["rmse"]) for r in rows})
                label = method
                if method.endswith(" converged"):
                    label = f"{method} (label: width n)"
                    up = "frozen" in method  # first choice: frozen's labels above its stars, skip's below
                    tags.setdefault(k, []).extend((r["rounds"], r["rmse"], f"n={r['width']}", style["color"], up)
                                                  for r in rows)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        ax.set_yscale("log")
        ax.margins(y=0.15)  # room for the star labels inside the axes
        ax.set(title=f"{table['model']} / {table['family']} (T = {table['num_steps']})", xlabel="rounds",
               ylabel="RMSE to serial")
        ax.grid(alpha=0.3)
    for k in range(n, nrows * ncols):
        axes[k // ncols, k % ncols].axis("off")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.tight_layout()
    for k, items in tags.items():
        _place_tags(fig, axes[k // ncols, k % ncols], items)
    fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(3, len(handles)) if ncols > 1 else 1, fontsize=10, frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend sits just under the panels, no blank band
    plt.close(fig)
    return path


def _place_tags(fig, ax, items: list, fontsize: float = 7) -> None:
    """Write short labels next to points, each at the nearby spot that covers the fewest markers, lines and
    labels already written (a greedy search over a few offsets, in points; call after the layout is final).

    ``items``: ``(x, y, text, color, up)``, ``up`` whether to try above the point before below it."""
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits before reading transData
    to_pt = 72.0 / fig.dpi
    obstacles = []  # (x, y, radius) in points, display frame
    for line in ax.get_lines():
        xy = ax.transData.transform(line.get_xydata()) * to_pt
        r = (line.get_markersize() / 2 if line.get_marker() not in (None, "None", "", " ") else 0) + 1
        obstacles += [(x, y, r) for x, y in xy]
        if line.get_linestyle() not in ("None", "none", "", " "):
            for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
                obstacles += [(x0 + (x1 - x0) * t / 12, y0 + (y1 - y0) * t / 12, 1.5) for t in range(1, 12)]
    box = ax.get_window_extent()
    left, bottom, right, top = box.x0 * to_pt, box.y0 * to_pt, box.x1 * to_pt, box.y1 * to_pt
    placed = []  # (x0, y0, x1, y1) of the labels written
    h = fontsize * 1.1
    for x, y, text, color, up in items:
        px, py = ax.transData.transform((x, y)) * to_pt
        w = 0.62 * fontsize * len(text)
        v = (1 if up else -1) * (h / 2 + 6.5)
        offsets = [(0, v), (0, -v), (w / 2 + 7, 0), (-w / 2 - 7, 0), (w / 2 + 4, v), (-w / 2 - 4, v),
                   (w / 2 + 4, -v), (-w / 2 - 4, -v), (0, 2 * v), (0, -2 * v)]
        best = None
        for rank, (dx, dy) in enumerate(offsets):
            x0, x1, y0, y1 = px + dx - w / 2, px + dx + w / 2, py + dy - h / 2, py + dy + h / 2
            hits = sum(1 for ox, oy, r in obstacles if x0 - r < ox < x1 + r and y0 - r < oy < y1 + r)
            hits += 3 * sum(1 for a in placed if a[0] < x1 and x0 < a[2] and a[1] < y1 and y0 < a[3])
            hits += 5 * (x0 < left or x1 > right or y0 < bottom or y1 > top)
            cost = (hits, rank)
            if best is None or cost < best[0]:
                best = (cost, dx, dy, (x0, y0, x1, y1))
        _, dx, dy, rect = best
        placed.append(rect)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha="center", va="center",
                    fontsize=fontsize, color=color, fontweight="bold")


def _tile(images: torch.Tensor, cols: int) -> torch.Tensor:
    """``[N, 1, h, w]`` -> one ``[rows*(h+1), cols*(w+1)]`` image with 1-pixel gutters."""
    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    out = torch.full((rows * (h + 1) - 1, cols * (w + 1) - 1), float("nan"))
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = images[i, 0]
    return out


def plot_digit_grid(panels: Dict[str, torch.Tensor], path: Path, count: int = 64, cols: int = 8) -> Path:
    """Panels of digit samples side by side (same noise in every panel), data scale [-1, 1]."""
    rows = (min(count, min(len(x) for x in panels.values())) + cols - 1) // cols
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2 * rows / cols + 0.5))
    axes = [axes] if len(panels) == 1 else list(axes)
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="white")
    for ax, (title, x) in zip(axes, panels.items()):
        ax.imshow(_tile(x[:count].float().clamp(-1, 1).cpu(), cols).numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Latency on one accelerator: DRiffusion's executors against the serial sampler on the same device.

    python -m benchmarks.gpu_latency [--device cuda] [--steps 50] [--repeats 7] [--out DIR]

What a lent GPU is for (the CPU suite cannot show it): a small model at batch size 1 leaves most of
a GPU idle, so K drafts in one batched call cost about one call, and the rounds speedup T / rounds
turns into wall-clock. For each model it times, with interleaved repeats (medians):

* the serial sampler (T calls, one after another);
* DRiffusion, aggressive and conservative, widths 1 to 4, with ``BatchedExecutor`` (one call per
  round) and, on CUDA for widths > 1, ``StreamExecutor`` with ``width`` streams on the one device;

and reports the wall-clock speedup over the serial sampler next to the rounds speedup T / rounds
(the ceiling), the peak extra device memory (CUDA: ``torch.cuda.max_memory_allocated``), and the
largest difference of each executor's sample from ``SerialExecutor``'s for the same scheduler
(the executor invariant; batched kernels may round differently, so it is reported, not asserted).

TF32: torch lets cuDNN convolutions use TF32 by default (``torch.backends.cudnn.allow_tf32``), and cuDNN
picks its kernels by batch size, so on a GPU a batched call can differ from one-sample calls by TF32's
1e-3 relative rounding, which 50 steps carry into the sample. ``--strict-fp32`` turns TF32 off (cuDNN and
matmul) for the run, to see the executor invariant at float32 rounding; the settings used are recorded.

Models: the trained digits eps-UNet (8x8, 0.29 M parameters) and, when diffusers is installed, a
``UNet2DModel`` at 32x32 built from a config with random weights (timing does not depend on the
weights). Nothing is downloaded. On a CPU the module runs too (``--device cpu``), which is how the
test suite checks it; the numbers only mean something on an accelerator.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from backends import BatchedExecutor, SerialExecutor, StreamExecutor
from benchmarks.cases import family
from benchmarks.cli import count, count_list, out_dir
from benchmarks.latency import configs as latency_configs
from driffusion_core import NoiseSource
from solvers import sample_serial

__all__ = ["gpu_models", "run", "to_markdown", "main"]

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_models(device: torch.device, batch: int = 1, include_diffusers: bool = True) -> List[dict]:
    """The timed models on ``device``: name, predictor, state shape, parameter count."""
    from benchmarks.models import load_digits_unet

    out = []
    unet = load_digits_unet(device)
    out.append({"name": f"digits UNet 8x8, batch {batch}", "predictor": unet, "shape": (batch, 1, 8, 8),
                "params": sum(p.numel() for p in unet.parameters())})
    if include_diffusers:
        try:
            from diffusers import UNet2DModel
        except Exception:  # the optional extra is missing
            UNet2DModel = None
        if UNet2DModel is not None:
            torch.manual_seed(0)
            net = UNet2DModel(
                sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                block_out_channels=(64, 128, 128),
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            ).to(device).eval().requires_grad_(False)

            def f(x: torch.Tensor, t: torch.Tensor, net=net) -> torch.Tensor:
                return net(x, t).sample

            out.append({"name": f"diffusers UNet2DModel 32x32, batch {batch}", "predictor": f,
                        "shape": (batch, 3, 32, 32), "params": sum(p.numel() for p in net.parameters())})
    return out


def _executors(device: torch.device) -> Callable[[int], List[Tuple[str, object]]]:
    """BatchedExecutor at every width; on CUDA, also one stream per draft on the one device."""

    def executors(width: int) -> List[Tuple[str, object]]:
        out: List[Tuple[str, object]] = [("BatchedExecutor", BatchedExecutor())]
        if device.type == "cuda" and width > 1:
            out.append((f"StreamExecutor ({width} streams)", StreamExecutor(devices=[device] * width)))
        return out

    return executors


def run(
    device: str = "cuda",
    steps: int = 50,
    widths: Sequence[int] = (1, 2, 3, 4),
    repeats: int = 7,
    batch: int = 1,
    include_diffusers: bool = True,
    tick: Callable[[str], None] = lambda _: None,
    strict_fp32: bool = False,
) -> dict:
    """Time every configuration on ``device``; returns the rows and the machine's description.

    ``strict_fp32``: TF32 off for cuDNN convolutions and matmuls during the run (restored after)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("benchmarks.gpu_latency: CUDA is not available here; pass --device cpu to try it on the CPU.")
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if strict_fp32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        result = _run(dev, steps, widths, repeats, batch, include_diffusers, tick)
        result["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return result


def _run(dev: torch.device, steps: int, widths: Sequence[int], repeats: int, batch: int, include_diffusers: bool,
         tick: Callable[[str], None]) -> dict:
    transition, grid, _ = family("ddim", steps)
    T = len(grid)
    models = gpu_models(dev, batch, include_diffusers)
    rows: List[dict] = []
    for m in models:
        f = m["predictor"]
        x = NoiseSource(0).initial(m["shape"]).to(dev)
        configs = latency_configs(transition, grid, widths, _executors(dev))
        outputs: Dict[int, torch.Tensor] = {}
        rounds: Dict[int, int] = {}

        def call(k: int):
            _, _, _, sched, ex = configs[k]
            out = sample_serial(f, x, transition, grid) if sched is None else sched.sample(f, x, executor=ex)
            _sync(dev)
            return out

        times: List[List[float]] = [[] for _ in configs]
        peaks: List[Optional[int]] = [None] * len(configs)
        with torch.no_grad():
            for k in range(len(configs)):  # warm-up and results
                out = call(k)
                outputs[k], rounds[k] = out.x, out.rounds
            # memory once every configuration has run: a first call's one-time allocations (cuBLAS's workspace
            # for each stream it first runs on, kept for the process) would land on whichever row came first
            for k in range(len(configs) if dev.type == "cuda" else 0):
                _sync(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                call(k)
                peaks[k] = torch.cuda.max_memory_allocated(dev) - base
            # the executor invariant: the SerialExecutor result of the same scheduler
            reference: Dict[int, torch.Tensor] = {}
            for k, (_, _, _, sched, _) in enumerate(configs):
                if sched is not None and id(sched) not in reference:
                    reference[id(sched)] = sched.sample(f, x, executor=SerialExecutor()).x
            for _ in range(max(1, repeats)):
                for k in range(len(configs)):
                    t0 = time.perf_counter()
                    call(k)
                    times[k].append(time.perf_counter() - t0)
                    tick(m["name"])
        serial = statistics.median(times[0])
        serial_peak = peaks[0]
        for k, (method, exname, width, sched, _) in enumerate(configs):
            sec = statistics.median(times[k])
            diff = None if sched is None else float((outputs[k] - reference[id(sched)]).abs().max())
            rows.append({
                "model": m["name"], "method": method, "executor": exname, "width": width, "rounds": rounds[k],
                "seconds": sec, "speedup": serial / sec, "rounds_speedup": T / rounds[k],
                "extra_memory_bytes": None if peaks[k] is None or serial_peak is None else peaks[k] - serial_peak,
                "max_diff_vs_serial_executor": diff,
            })
        m["serial_seconds_per_step"] = serial / T
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "device_type": dev.type,
        "torch": torch.__version__,
        "num_steps": T,
        "repeats": repeats,
        "models": [{"name": m["name"], "params": m["params"], "serial_seconds_per_step": m["serial_seconds_per_step"]}
                   for m in models],
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    """The table, one section per model."""
    lines = [f"# Latency on {result['device']} ({result['device_type']}, torch {result['torch']})", "",
             f"T = {result['num_steps']} DDIM steps, medians of {result['repeats']} interleaved repeats; TF32 "
             f"{'on' if result['tf32']['cudnn'] else 'off'} for cuDNN convolutions, "
             f"{'on' if result['tf32']['matmul'] else 'off'} for matmuls. "
             "Speedup: the serial sampler's wall-clock over the row's; rounds speedup T / rounds is the ceiling. "
             "Max diff: largest |x - x_SerialExecutor| for the same scheduler (executor invariant).", ""]
    for m in result["models"]:
        lines += [f"## {m['name']} ({m['params'] / 1e6:.2f} M parameters; serial: "
                  f"{m['serial_seconds_per_step'] * 1e3:.2f} ms per step)", "",
                  "| method | executor | width | rounds | seconds | speedup | rounds speedup | extra memory | max diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["model"] == m["name"]):
            mem = "-" if r["extra_memory_bytes"] is None else f"{r['extra_memory_bytes'] / 2**20:.2f} MiB"
            diff = "-" if r["max_diff_vs_serial_executor"] is None else f"{r['max_diff_vs_serial_executor']:.1e}"
            lines.append(f"| {r['method']} | {r['executor']} | {r['width']} | {r['rounds']} | {r['seconds']:.4f} | "
                         f"{r['speedup']:.2f} | {r['rounds_speedup']:.2f} | {mem} | {diff} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="a torch device: cuda (default), cuda:1, cpu")
    p.add_argument("--steps", type=count(), default=50)
    p.add_argument("--repeats", type=count(), default=7)
    p.add_argument("--batch", type=count(), default=1)
    p.add_argument("--widths", type=count_list(), default=[1, 2, 3, 4], help="comma-separated widths")
    p.add_argument("--no-diffusers", action="store_true", help="time the digits UNet only")
    p.add_argument("--strict-fp32", action="store_true",
                   help="TF32 off for cuDNN convolutions and matmuls (torch allows it for convolutions by default)")
    p.add_argument("--out", type=out_dir, default=None, help="folder for gpu_latency.md and gpu_latency.json")
    a = p.parse_args(argv)
    try:
        device = torch.device(a.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu to "
                "check that the script runs")
    if device.type == "meta":
        p.error("--device meta: a meta tensor holds no values, so nothing can be timed; use cuda or cpu")
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and callable(getattr(backend, "is_available", None))
                                     and backend.is_available()):
        p.error(f"--device {a.device}: torch has no usable {device.type} device here; use cuda or cpu")
    if device.index is not None and device.type != "cpu" and device.index >= backend.device_count():
        p.error(f"--device {a.device}: there are {backend.device_count()} {device.type} device(s) here "
                f"(indices from 0)")
    result = run(a.device, a.steps, a.widths, a.repeats, a.batch, not a.no_diffusers, strict_fp32=a.strict_fp32)
    text = to_markdown(result)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_latency.md").write_text(text + "\n")
        (out / "gpu_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

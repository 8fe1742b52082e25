"""DRiffusion across processes: launch with torchrun, one process per device.

One node, 2 processes, gloo on the CPU::

    torchrun --standalone --nproc_per_node=2 examples/distributed_sample.py --backend gloo

Every process runs this same script (SPMD): same model weights, same starting noise, same seed. The
width defaults to the world size, so each round evaluates one draft per process; every process ends
with the same sample, and rank 0 prints it. See backends/README.md for GPUs and several nodes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import torch.distributed as dist

from backends import DistributedExecutor, init_from_env
from driffusion_core import DraftRefineScheduler, NoiseSource, VPSchedule
from solvers import DDIMSkip, ring_mixture, sample_serial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl with CUDA, else gloo")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps T (default 50)")
    ap.add_argument("--width", type=int, default=None, help="drafts per round (default: the world size)")
    ap.add_argument("--mode", default="aggressive", choices=["aggressive", "conservative"], help="default: aggressive")
    ap.add_argument("--batch", type=int, default=8, help="samples (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0; the per-step noise uses seed + 1; the same on every rank)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds a rank waits for the others in a round before every rank fails (default 60)")
    ap.add_argument("--anchor", default="local", choices=["local", "shared"],
                    help="one-draft rounds: every rank makes the call (local) or rank 0 shares it (shared: for "
                         "models that are not bit for bit reproducible across ranks)")
    ap.add_argument("--save", default=None, help="rank 0 saves the sample here (torch.save)")
    args = ap.parse_args()
    for name in ("steps", "width", "batch"):  # refused here, on every rank, before any process group exists
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name} must be an int >= 1, got {value}")
    if not 0 < args.timeout <= 1e6:
        ap.error(f"--timeout must be a number of seconds in (0, 1e6], got {args.timeout}")
    if args.save is not None:  # checked before sampling, not when rank 0 saves
        folder = os.path.dirname(os.path.abspath(args.save))
        if not args.save.strip() or os.path.isdir(args.save) or not os.path.isdir(folder):
            ap.error(f"--save {args.save!r}: give a file path in an existing folder")

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    env = init_from_env(backend=args.backend, timeout=max(120.0, args.timeout))  # bounds every exchange too
    device = torch.device("cuda", env.local_rank) if env.backend == "nccl" else torch.device("cpu")

    # The model: here the exact eps-predictor of a 2-D Gaussian-mixture ring (any f(x, t) works;
    # a torch module would be built with the same seed, or loaded, and moved to `device`).
    schedule = VPSchedule.linear()
    predictor = ring_mixture(8).predictor(schedule, "epsilon")
    transition = DDIMSkip(schedule)
    grid = schedule.timesteps(args.steps, "trailing")  # trailing spacing: the safer one for wide windows

    executor = DistributedExecutor(timeout=args.timeout, anchor=args.anchor)
    width = args.width if args.width is not None else env.world_size
    sched = DraftRefineScheduler(transition, grid, width=width, mode=args.mode)
    x = NoiseSource(args.seed).initial((args.batch, 2), device=device)  # the same on every rank
    out = sched.sample(predictor, x, executor=executor, noise=NoiseSource(args.seed + 1))

    if env.rank == 0:
        ref = sample_serial(predictor, x, transition, grid, noise=NoiseSource(args.seed + 1))
        print(executor.describe(width))  # world size, backend, nodes, device and drafts per round per rank
        print(f"{sched}: {out.rounds} rounds for {out.evals} model calls (serial: {ref.rounds} rounds)")
        print(f"max |DRiffusion - serial| = {(out.x - ref.x).abs().max().item():.3e}")
        print(out.x[:4])
        if args.save:
            torch.save({"x": out.x, "rounds": out.rounds, "evals": out.evals}, args.save)
    executor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

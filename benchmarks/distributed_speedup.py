"""Wall-clock speedup of DistributedExecutor (2 gloo processes) over the serial sampler (1 process).

The model is a compute-bound MLP (one call takes about 10-30 ms on one CPU thread), so the rounds,
not the bookkeeping, dominate. Every process runs with one thread:

* baseline: ``solvers.sample_serial`` in one process (T sequential model calls); it runs in rank 0
  while rank 1 waits at a barrier, alternating with the distributed runs, so both see the same load.
  One process of one thread is one "device" (the paper's n devices against one). The same serial
  sampler with both cores as intra-op threads (``serial_2threads_s``, ``speedup_vs_2threads``) is timed
  beside it: the whole machine spent on one call at a time instead of on two drafts;
* DRiffusion: ``DraftRefineScheduler(DDIMSkip, width=2, mode="aggressive")`` with a
  ``DistributedExecutor`` over 2 processes (gloo on the CPU), 1 + ceil((T - 1) / 2) rounds.

The ideal speedup is T / rounds (-> 2 for long grids). Besides the speedup it reports the per-round
overhead as a fraction of one model call:

* ``comm_overhead_frac``: an executor-level round of 2 drafts (one per process, plus the all-gather)
  minus one model call, over one model call (the calls timed inside those rounds, both processes
  computing). Each round times both processes' own calls, which gives two of its parts (each a median
  of its own; medians do not add, so the parts need not sum to ``comm_overhead_frac``):
  ``exchange_frac``, the round after the slower call ended (the gloo all-gather and the executor's
  status and consistency checks), and ``imbalance_frac``, how much longer the slower of the two calls
  took than a median call (the faster process waits for it: call-time jitter on shared cores, not a
  cost of the executor);
* ``round_overhead_frac``: the sampler's time per round minus one model call (timed inside the same
  sampling runs), over one model call: communication, waiting for the slower process, drafting,
  refining and scheduling; ``sched_overhead_frac`` is the part the scheduler's own bookkeeping takes
  (timed with a free predictor);
* ``contention_frac``: how much slower one call gets inside the distributed runs, both processes
  computing, than alone (shared cores, caches, memory bandwidth) -- a cost of the machine, not of
  the executor;
* ``bare_speedup``: the same sampler with a bare SPMD executor (each process calls the model on its
  share and ``dist.all_gather`` returns the predictions; no status exchange, no consistency or fault
  checks, no timeout), timed in the same repeats: the ceiling this machine and gloo allow, so
  ``executor_cost_frac``, the median over repeats of DistributedExecutor's time over the bare loop's
  (run back to back, in alternating order), minus 1, is what the executor's checks and bounded waits cost.

On a machine with other work running the numbers are noisy (each process needs a core of its own).

Run ``python -m benchmarks.distributed_speedup [--quick]`` or call :func:`run`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["run", "format_table"]

_SETTINGS = {
    # T, repeats of each timed sampling run, MLP size, executor-level rounds timed
    False: dict(steps=50, repeats=9, batch=64, dim=64, hidden=2048, depth=4, rounds=40),
    True: dict(steps=20, repeats=2, batch=64, dim=64, hidden=2048, depth=4, rounds=15),
}


# ------------------------------------------------------------------------------------------- shared


def _model(dim: int, hidden: int, depth: int):
    """A deterministic MLP eps-predictor f(x, t) (same weights in every process)."""
    import torch

    torch.manual_seed(0)
    layers: List = [torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(hidden, hidden), torch.nn.SiLU()]
    layers.append(torch.nn.Linear(hidden, dim))
    net = torch.nn.Sequential(*layers).eval()
    for p in net.parameters():
        p.requires_grad_(False)

    def predictor(x, t):
        with torch.no_grad():
            return 0.1 * net(torch.cat([x, (t / 1000.0)[:, None].to(x.dtype)], 1))

    return predictor


def _median_call(predictor, x, t, n: int = 15) -> float:
    predictor(x, t)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        predictor(x, t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _problem(s: dict):
    import driffusion_core as core
    import solvers

    schedule = core.VPSchedule.linear()
    transition = solvers.DDIMSkip(schedule)
    grid = schedule.timesteps(s["steps"])
    x = core.NoiseSource(1).initial((s["batch"], s["dim"]))
    return core, solvers, transition, grid, x


# ------------------------------------------------------------------------------------------ workers


def _bare_executor(rank: int, world: int):
    """The least an SPMD executor can do: this process's share of the drafts (``even_shares``, as
    DistributedExecutor splits them), one ``all_gather`` of the predictions padded to the largest share.
    No status, checks or timeout: a baseline, not for use."""
    import torch
    import torch.distributed as dist

    from driffusion_core import Executor
    from driffusion_core.executor import even_shares

    class BareSPMD(Executor):
        def evaluate(self, predictor, xs, ts, cond=None):
            sizes = even_shares(xs.shape[0], world)
            start = sum(sizes[:rank])
            mine = [predictor(xs[j], ts[j], **(cond or {})) for j in range(start, start + sizes[rank])]
            # (the predictions have the state's shape and dtype: this study's eps-predictor)
            buf = torch.zeros((max(sizes), *xs.shape[1:]), dtype=xs.dtype)
            if mine:
                buf[: len(mine)] = torch.stack(mine)
            outs = [torch.empty_like(buf) for _ in range(world)]
            dist.all_gather(outs, buf)
            return torch.cat([o[:n] for o, n in zip(outs, sizes)])

    return BareSPMD()


def _worker(s: dict, rank: int) -> dict:
    """One of the 2 processes. Rank 0 also times the serial sampler while rank 1 waits at a barrier,
    alternating with the distributed runs, so both see the same machine load."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{s['port']}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=600),
    )
    from backends import DistributedExecutor

    core, solvers, transition, grid, x = _problem(s)
    predictor = _model(s["dim"], s["hidden"], s["depth"])
    ex = DistributedExecutor(timeout=120)
    t_row = torch.full((s["batch"],), 500.0)

    # one model call alone (the serial sampler's condition); with both busy it is timed inside the runs
    call_alone = None
    for r in range(2):
        dist.barrier()
        if r == rank:
            call_alone = _median_call(predictor, x, t_row)
    dist.barrier()

    # executor level: one round of 2 drafts = one call per process + the exchange
    xs = torch.stack([x, x + 0.1])
    ts = torch.full((2, s["batch"]), 500.0)
    calls: List[float] = []

    def timed(xx, tt):  # this rank's own model call inside the round
        t0 = time.perf_counter()
        y = predictor(xx, tt)
        calls.append(time.perf_counter() - t0)
        return y

    ex.evaluate(predictor, xs, ts)
    rounds = []
    for _ in range(s["rounds"]):
        dist.barrier()
        t0 = time.perf_counter()
        ex.evaluate(timed, xs, ts)
        rounds.append(time.perf_counter() - t0)
    round_calls, calls[:] = list(calls), []

    sched = core.DraftRefineScheduler(transition, grid, width=2, mode="aggressive")
    out = sched.sample(predictor, x, executor=ex)  # warm-up
    bare = _bare_executor(rank, 2)
    bare_out = sched.sample(predictor, x, executor=bare)
    serial_times, serial2_times, dist_times, bare_times = [], [], [], []
    for i in range(s["repeats"]):
        dist.barrier()
        if rank == 0:
            t0 = time.perf_counter()
            ref = solvers.sample_serial(predictor, x, transition, grid)
            serial_times.append(time.perf_counter() - t0)
            # the serial sampler with the whole machine (both cores as intra-op threads), while rank 1 waits
            torch.set_num_threads(2)
            t0 = time.perf_counter()
            solvers.sample_serial(predictor, x, transition, grid)
            serial2_times.append(time.perf_counter() - t0)
            torch.set_num_threads(1)
        # DistributedExecutor and the bare loop back to back, in alternating order (a pair sees one machine load)
        for which in ((ex, bare) if i % 2 == 0 else (bare, ex)):
            dist.barrier()
            t0 = time.perf_counter()
            if which is ex:
                out = sched.sample(timed, x, executor=ex)
                dist_times.append(time.perf_counter() - t0)
            else:
                bare_out = sched.sample(predictor, x, executor=bare)
                bare_times.append(time.perf_counter() - t0)
    result = {
        "call_alone_s": call_alone,
        "round_list": rounds,
        "call_list": round_calls,
        "sampling_calls": calls,
        "dist_s": statistics.median(dist_times),
        "bare_s": statistics.median(bare_times),
        "pair_ratios": [a / b for a, b in zip(dist_times, bare_times)],
        "bare_matches": bool(torch.equal(bare_out.x, out.x)),
        "rounds": out.rounds,
        "evals": out.evals,
        "describe": ex.describe(),
    }
    if rank == 0:
        # the scheduler's own work per round (drafting, refining, checks) with a free predictor
        def free(xx, tt):
            return xx * 0.01

        sched.sample(free, x)
        t0 = time.perf_counter()
        for _ in range(3):
            free_out = sched.sample(free, x)
        result["sched_s"] = (time.perf_counter() - t0) / (3 * free_out.rounds)
        same = sched.sample(predictor, x, executor=core.SerialExecutor()).x
        result.update(
            serial_s=statistics.median(serial_times),
            serial_2threads_s=statistics.median(serial2_times),
            serial_rounds=ref.rounds,
            matches_serial_executor=bool(torch.equal(same, out.x)),
        )
    dist.barrier()
    dist.destroy_process_group()
    return result


# ------------------------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(role: str, settings: dict, ranks: List[int], deadline: float) -> List[dict]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    procs = []
    for rank in ranks:
        out = f"{settings['out']}.{role}{rank}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--rank", str(rank),
               "--settings", json.dumps(settings), "--result", out]
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out))
    start, results = time.monotonic(), []
    for p, out in procs:
        try:
            log, _ = p.communicate(timeout=max(1.0, deadline - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise RuntimeError(f"distributed_speedup: the {role} worker ran past {deadline:.0f}s")
        if p.returncode != 0:
            raise RuntimeError(f"distributed_speedup: the {role} worker failed:\n{log.decode(errors='replace')}")
        with open(out) as f:
            results.append(json.load(f))
    return results


def run(quick: bool = False, **overrides) -> Dict[str, float]:
    """Time the serial sampler and 2-process DRiffusion (aggressive, width 2); returns the numbers.

    Arguments:
        quick: a shorter grid and fewer repeats.
        overrides: any of ``steps``, ``repeats``, ``batch``, ``dim``, ``hidden``, ``depth``, ``rounds``.

    Returns:
        A dict with ``steps``, ``rounds``, ``call_ms`` (one model call alone), ``call_both_busy_ms`` (one
        call inside the distributed sampling runs, both processes computing), ``serial_s``, ``distributed_s``
        (medians), ``speedup``, ``ideal_speedup`` (T / rounds), ``efficiency`` (speedup / ideal),
        ``round_ms`` (an executor-level round of 2 drafts), ``exchange_ms`` (its part after the slower
        call), ``comm_overhead_frac`` (with its parts ``exchange_frac`` and ``imbalance_frac``, separate medians),
        ``round_overhead_frac``, ``sched_overhead_frac``, ``contention_frac``, ``bare_s``, ``bare_speedup``,
        ``executor_cost_frac``, ``serial_2threads_s`` (the serial sampler in one process with 2 intra-op
        threads: the whole machine, where ``serial_s`` is one process of 1 thread, a "device") and
        ``speedup_vs_2threads``, ``matches_serial_executor``, ``executor`` and ``mlp``.
    """
    s = dict(_SETTINGS[bool(quick)])
    unknown = set(overrides) - set(s)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(s)}")
    s.update(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        s["out"] = str(Path(tmp) / "bench")
        s["port"] = _free_port()
        d0, d1 = _spawn("dist", s, [0, 1], deadline=180.0 + 6.0 * s["repeats"] * s["steps"])
    call = d0["call_alone_s"]
    dist_s = max(d0["dist_s"], d1["dist_s"])
    bare_s = max(d0["bare_s"], d1["bare_s"])
    if not (d0["bare_matches"] and d1["bare_matches"]):
        raise RuntimeError("the bare SPMD baseline's sample differs from DistributedExecutor's: its timing would not be "
                           "of the same computation")
    # per executor round: the round takes as long as the slower process's call plus the exchange
    per_round = [(max(a, b), max(c, d)) for a, b, c, d in
                 zip(d0["round_list"], d1["round_list"], d0["call_list"], d1["call_list"])]
    round_s = statistics.median(r for r, _ in per_round)
    round_call = statistics.median(d0["call_list"] + d1["call_list"])  # a call inside those rounds
    call_both = statistics.median(d0["sampling_calls"] + d1["sampling_calls"])  # one inside the sampling runs
    exchange_s = statistics.median(r - c for r, c in per_round)
    slower_call_s = statistics.median(c for _, c in per_round)
    rounds = d0["rounds"]
    speedup = d0["serial_s"] / dist_s
    ideal = s["steps"] / rounds
    return {
        "steps": s["steps"],
        "rounds": rounds,
        "evals": d0["evals"],
        "call_ms": 1e3 * call,
        "call_both_busy_ms": 1e3 * call_both,
        "serial_s": d0["serial_s"],
        "distributed_s": dist_s,
        "speedup": speedup,
        "ideal_speedup": ideal,
        "efficiency": speedup / ideal,
        "round_ms": 1e3 * round_s,
        "exchange_ms": 1e3 * exchange_s,
        "comm_overhead_frac": (round_s - round_call) / round_call,
        "exchange_frac": exchange_s / round_call,
        "imbalance_frac": (slower_call_s - round_call) / round_call,
        "round_overhead_frac": (dist_s / rounds - call_both) / call_both,
        "sched_overhead_frac": d0["sched_s"] / call_both,
        "contention_frac": (call_both - call) / call,
        "bare_s": bare_s,
        "bare_speedup": d0["serial_s"] / bare_s,
        # the same serial sampler given both cores as intra-op threads (one process, 2 threads)
        "serial_2threads_s": d0["serial_2threads_s"],
        "speedup_vs_2threads": d0["serial_2threads_s"] / dist_s,
        # paired: each repeat's DistributedExecutor time over its bare-loop time (the slower rank's), median
        "executor_cost_frac": statistics.median(max(a, b) for a, b in zip(d0["pair_ratios"], d1["pair_ratios"])) - 1.0,
        "matches_serial_executor": d0["matches_serial_executor"],
        "executor": d0["describe"],
        "mlp": f"batch {s['batch']}, dim {s['dim']}, hidden {s['hidden']}, depth {s['depth']}, 1 thread/process",
    }


def format_table(r: Dict[str, float]) -> str:
    rows = [
        ("grid steps T / DRiffusion rounds", f"{r['steps']} / {r['rounds']}"),
        ("one model call (alone / both processes busy)", f"{r['call_ms']:.1f} / {r['call_both_busy_ms']:.1f} ms"),
        ("serial sampler (1 process, 1 thread)", f"{r['serial_s']:.3f} s"),
        ("DRiffusion n=2 (2 processes)", f"{r['distributed_s']:.3f} s"),
        ("speedup (ideal T/rounds)", f"{r['speedup']:.2f}x ({r['ideal_speedup']:.2f}x, {100 * r['efficiency']:.0f}%)"),
        ("executor round of 2 drafts", f"{r['round_ms']:.1f} ms"),
        ("communication overhead / call", f"{100 * r['comm_overhead_frac']:.1f}%"),
        ("  exchange after the slower call", f"{100 * r['exchange_frac']:.1f}% ({r['exchange_ms']:.2f} ms)"),
        ("  the slower of the two calls, beyond a median call", f"{100 * r['imbalance_frac']:.1f}%"),
        ("per-round overhead / call", f"{100 * r['round_overhead_frac']:.1f}%"),
        ("  of which scheduler bookkeeping", f"{100 * r['sched_overhead_frac']:.1f}%"),
        ("call slowdown with both processes busy", f"{100 * r['contention_frac']:.1f}%"),
        ("bare SPMD loop, no checks (this machine's ceiling)", f"{r['bare_s']:.3f} s, {r['bare_speedup']:.2f}x"),
        ("serial sampler with both cores as threads / speedup over it",
         f"{r['serial_2threads_s']:.3f} s / {r['speedup_vs_2threads']:.2f}x"),
        ("DistributedExecutor's cost over the bare loop", f"{100 * r['executor_cost_frac']:.1f}%"),
        ("result equals the serial executor's", str(r["matches_serial_executor"])),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.distributed_speedup", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=["dist"], help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        s = json.loads(args.settings)
        res = _worker(s, args.rank)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return
    r = run(quick=args.quick)
    print(format_table(r))


if __name__ == "__main__":
    main()

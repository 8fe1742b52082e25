"""DistributedExecutor: 2 gloo processes on the CPU reproduce the serial executor; faults never hang.

Each test launches two child processes (this file run as a script, one thread each, gloo over
tcp://127.0.0.1:<free port>); the children write their results to a file and the test compares them.
Every launch is bounded: children still running after the deadline are killed and the test fails.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.distributed

TIMEOUT = 5.0  # executor timeout in the fault tests (seconds; room for a loaded 2-core machine)
DIAGNOSE = 2.0  # monitored-barrier time after a failed exchange
STALL_TIMEOUT, STALL_DIAGNOSE = 2.0, 1.0  # the prediction-exchange stall (rank 1 sleeps 1 s past both)
HANG3_TIMEOUT, HANG3_DIAGNOSE = 2.0, 2.0  # world 3, rank 2 hangs
PG_SHORT, PG_SLOW = 2.0, 3.5  # the process group's own timeout in the pg_timeout scenarios; the slow rank's delay
PG_TIMEOUTS = {"pg_timeout_round": PG_SHORT, "pg_timeout_setup": PG_SHORT}  # scenarios whose group times out sooner


# ------------------------------------------------------------------------------------- parent side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, world: int = 2, deadline: float = 60.0, use_env: bool = False):
    """Run ``scenario`` on ``world`` child processes; returns (results by rank, exit codes, seconds)."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        start = time.monotonic()
        for rank in range(world):
            env = dict(os.environ)
            env.update(
                PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1",
                PYTHONHASHSEED=str(rank + 1),  # string hashing (set order) differs per process, deterministically
            )
            if use_env:  # what torchrun would set
                env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                           LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            cmd = [sys.executable, __file__, scenario, str(rank), str(world), str(port), tmp, str(int(use_env))]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        codes, logs = [], []
        for p in procs:
            left = max(0.1, deadline - (time.monotonic() - start))
            try:
                out, _ = p.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            codes.append(p.returncode)
            logs.append(out.decode(errors="replace"))
        elapsed = time.monotonic() - start
        results = {}
        for rank in range(world):
            f = Path(tmp) / f"rank{rank}.pt"
            if f.exists():
                results[rank] = torch.load(f, weights_only=False)
    if elapsed >= deadline:
        pytest.fail(f"scenario {scenario!r} ran past its {deadline}s deadline (a hang); logs:\n" + "\n".join(logs))
    return results, codes, elapsed, logs


def _need(results, ranks, logs):
    missing = [r for r in ranks if r not in results]
    assert not missing, f"ranks {missing} wrote no result; logs:\n" + "\n----\n".join(logs)


def _launch_clean(scenario: str, world: int = 2, **kw):
    """:func:`_launch` for a scenario in which every rank ends normally (raising ranks catch their errors):
    every rank wrote its result and exited with status 0. Returns the results by rank."""
    results, codes, _, logs = _launch(scenario, world, **kw)
    _need(results, list(range(world)), logs)
    assert codes == [0] * world, logs
    return results


# --------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("args", [["--save", "MISSING/x.pt"], ["--timeout", "inf"], ["--backend", "bogus"]])
def test_the_example_refuses_bad_arguments_before_any_process_group(args, tmp_path):
    """A bad option of examples/distributed_sample.py is an argparse error (exit 2) on every rank before any
    work: no traceback, and no sample computed only to fail when rank 0 saves it."""
    args = [a.replace("MISSING", str(tmp_path / "missing")).replace("TMP", str(tmp_path)) for a in args]
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "distributed_sample.py"), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_readmes_torchrun_example_runs_and_equals_the_serial_executor(tmp_path):
    """The launch command of the README (torchrun, 2 processes, gloo) runs examples/distributed_sample.py to the
    end; rank 0's sample is the same scheduler's with the serial executor, in the rounds the formula gives."""
    from backends import SerialExecutor
    from driffusion_core import DraftRefineScheduler, NoiseSource, VPSchedule, expected_rounds
    from solvers import DDIMSkip, ring_mixture

    out_file = tmp_path / "sample.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "distributed_sample.py"), "--backend", "gloo", "--steps", "10", "--batch", "4",
           "--width", "3", "--save", str(out_file)]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "DistributedExecutor(world_size=2, backend=gloo" in run.stdout, run.stdout
    got = torch.load(out_file, weights_only=False)
    schedule = VPSchedule.linear()
    sched = DraftRefineScheduler(DDIMSkip(schedule), schedule.timesteps(10, "trailing"), width=3)  # as the example
    ref = sched.sample(ring_mixture(8).predictor(schedule, "epsilon"), NoiseSource(0).initial((4, 2)),
                       executor=SerialExecutor(), noise=NoiseSource(1))
    assert torch.equal(got["x"], ref.x)
    assert got["rounds"] == ref.rounds == expected_rounds(10, 3) and got["evals"] == 10


def test_equals_serial_for_uneven_shares():
    results, codes, elapsed, logs = _launch("basic", use_env=True)
    _need(results, [0, 1], logs)
    assert codes == [0, 0], logs
    r0, r1 = results[0], results[1]
    assert r0["shares"] == {1: [1, 0], 2: [1, 1], 3: [2, 1], 5: [3, 2]}
    assert "world_size=2" in r0["describe"] and "gloo" in r0["describe"]
    assert r0["plan"] == [2, 1]
    assert r0["retained"] and r1["retained"], "the last exchange's work is not kept referenced"
    assert "drafts per round at width 3: rank 0: 2, rank 1: 1" in r0["describe3"], r0["describe3"]
    assert "width 5: rank 0: 3, rank 1: 2" in r0["describe"], r0["describe"]  # the largest round so far
    # both ranks run on this machine, computing where the inputs are; equal shares are listed as one run
    assert "nodes=1," in r0["describe"] and "device per rank: the inputs' device," in r0["describe"], r0["describe"]
    assert "drafts per round at width 4: ranks 0-1: 2 (" in r0["describe4"], r0["describe4"]  # shares [2, 2]
    for rank in (0, 1):
        # bad configuration and bad rounds are refused by name, before any exchange
        refused = results[rank]["refused"]
        assert refused == {name: "InvalidArgumentError" for name in refused}, refused
        assert set(refused) == {"timeout=0", "timeout=True", "timeout=-1", "diagnose_timeout=-1", "plan(0)",
                                "ts of 3 drafts for xs of 2", "K=0", "anchor='rank0'"}
        assert results[rank]["diagnose_default"] == 2.0  # min(5, timeout)
    # one all-gather per round, two when a round brings a new prediction row (shape, dtype) or a larger share
    # than the agreed capacity; every round equals the serial executor (also complex128 after the header)
    assert r0["exchanges"] == r1["exchanges"] == _expected_exchanges(COUNTED_ROUNDS, 2), r0["exchanges"]
    for key, (got, ref) in r0["pairs"].items():
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        assert torch.equal(got, ref), f"{key}: distributed != serial"
    for key in r0["pairs"]:
        assert torch.equal(r0["pairs"][key][0], r1["pairs"][key][0]), f"{key}: ranks disagree"



def test_three_ranks_with_two_smaller_shares_equal_serial():
    """World 3: rounds whose shares are uneven with more than one smaller share ([2, 1, 1], [3, 2, 2]), where
    rank r's drafts start at the sum of the earlier shares, not at r times the largest; every round (fused and
    two-phase exchange) and a width-4 sample equal the serial executor, on every rank."""
    results, codes, elapsed, logs = _launch("three", world=3)
    _need(results, [0, 1, 2], logs)
    assert codes == [0, 0, 0], logs
    assert results[0]["shares"] == {k: _closed_form_shares(k, 3) for k in (1, 2, 4, 5, 7)}
    for rank in range(3):
        for key, (got, ref) in results[rank]["pairs"].items():
            assert torch.equal(got, ref), f"rank {rank}, {key}: distributed != serial"

# (K, dtype) of the rounds whose all-gathers the basic scenario counts. The cap never shrinks between rows
# here (a new row is followed by rounds no wider than its first), so the rule below does not depend on
# whether the capacity restarts with a new row.
COUNTED_ROUNDS = [(2, "float32"), (2, "float32"), (3, "float32"), (2, "float32"), (3, "float32"), (1, "float32"),
                  (5, "float32"), (3, "float32"), (3, "complex128"), (3, "complex128"), (2, "complex128"),
                  (2, "float32"), (2, "float32"), (5, "float32"), (4, "float32")]


def _closed_form_shares(k, n):
    """The closed-form split: contiguous shares, as even as possible, larger first."""
    return [k // n + (1 if i < k % n else 0) for i in range(n)]


def _expected_exchanges(rounds, world):
    """All-gathers per round as backends/README.md states them: one (header and predictions together), two
    when the round's prediction row differs from the last round's or its largest share exceeds the
    largest seen since the row last changed."""
    out, row, cap = [], None, 0
    for k, dtype in rounds:
        most = max(_closed_form_shares(k, world))
        out.append(1 if dtype == row and most <= cap else 2)
        cap = max(cap, most) if dtype == row else most
        row = dtype
    return out


def test_nan_and_unexpected_shape_are_kept():
    results, codes, _, logs = _launch("odd_outputs")
    _need(results, [0, 1], logs)
    for rank in (0, 1):
        for key, (got, ref) in results[rank]["pairs"].items():
            assert got.shape == ref.shape, key
            assert torch.equal(torch.nan_to_num(got, 7.0), torch.nan_to_num(ref, 7.0)), key
            assert torch.equal(got.isnan(), ref.isnan()), key
    assert torch.isnan(results[0]["pairs"]["nan"][0]).any()
    assert torch.isinf(results[0]["pairs"]["inf"][0]).any()


def test_predictor_raising_on_one_rank_fails_every_rank():
    results, codes, elapsed, logs = _launch("raise")
    _need(results, [0, 1], logs)
    for rank in (0, 1):
        res = results[rank]
        assert res["error_type"] == "ExecutorError", res
        assert "rank 1" in res["message"] and "ValueError" in res["message"] and "boom on purpose" in res["message"]
        assert "the predictor raised on rank 1 (of 2) in round 2:" in res["message"], res["message"]
        # the prompt path (the failing rank reported its error), not the timeout path
        assert "did not answer" not in res["message"] and res["seconds"] < TIMEOUT, res
        # the process group stays consistent: the next round works on both ranks
        assert res["after"] is True
        # after close() the executor says so (not that a round failed)
        closed = res["closed"]
        assert closed["error_type"] == "ExecutorError" and "was closed (by close())" in closed["message"], closed
        assert "failed" not in closed["message"], closed
    assert codes == [0, 0]


@pytest.mark.parametrize("dying", [1, 0])
def test_dead_rank_makes_the_survivor_fail_within_the_timeout(dying):
    results, codes, elapsed, logs = _launch(f"die{dying}", deadline=40.0)
    survivor = 1 - dying
    _need(results, [survivor], logs)
    assert codes[dying] == 17, logs  # died on purpose
    res = results[survivor]
    assert res["error_type"] == "ExecutorError", res
    assert res["seconds"] < TIMEOUT + DIAGNOSE + 2.0, res
    assert f"rank {survivor} (of 2)" in res["message"]
    if survivor == 0:
        assert "did not answer: 1" in res["message"], res["message"]
    else:
        assert "Rank 0" in res["message"] and "did not answer" in res["message"], res["message"]
    assert res["refused_after"], "a broken executor must refuse further rounds"
    assert codes[survivor] == 0, logs  # and the survivor exits normally (no hang at exit)


@pytest.mark.parametrize("dying", [2, 0])
def test_three_ranks_one_dies_every_survivor_names_it(dying):
    """World 3 (shares 2, 1, 1 of four drafts): the survivors fail within the timeout, and each names the
    dead rank (rank 0 from its own check; the others from rank 0's verdict, or, when rank 0 is the one
    that died, by saying that rank 0 did not answer)."""
    results, codes, elapsed, logs = _launch(f"die{dying}", world=3, deadline=40.0)
    survivors = [r for r in range(3) if r != dying]
    _need(results, survivors, logs)
    assert codes[dying] == 17, logs
    for rank in survivors:
        res = results[rank]
        assert res["error_type"] == "ExecutorError", res
        assert f"rank {rank} (of 3)" in res["message"] and res["seconds"] < TIMEOUT + DIAGNOSE + 2.0, res
        if dying == 0:
            assert "Rank 0, which checks who is alive, did not answer" in res["message"], res["message"]
        else:
            assert f"did not answer{'' if rank == 0 else ' (seen by rank 0)'}: {dying}." in res["message"], res["message"]
        assert res["refused_after"], "a broken executor must refuse further rounds"
        assert codes[rank] == 0, logs


def test_hung_rank_makes_the_other_fail_within_the_timeout():
    """Rank 1's share outlasts the timeout: rank 0 names it as not answering; rank 1, arriving late, is told
    that its own share took longer than the timeout (and that rank 0's silence is expected, not that rank 0
    died). Both ranks then destroy the process group and exit normally: rank 0's check left no thread waiting
    in gloo for rank 1's hello (one woken at interpreter exit aborted the process: "terminate called without
    an active exception")."""
    results, codes, elapsed, logs = _launch("hang", deadline=40.0)
    _need(results, [0, 1], logs)
    res = results[0]
    assert res["error_type"] == "ExecutorError", res
    assert TIMEOUT - 0.5 <= res["seconds"] < TIMEOUT + DIAGNOSE + 2.0, res
    assert "did not answer: 1" in res["message"], res["message"]
    assert res["diagnose_threads"] == [], res["diagnose_threads"]
    late = results[1]
    assert late["error_type"] == "ExecutorError", late
    assert "own share of the round took" in late["message"] and f"timeout = {TIMEOUT:g}s" in late["message"], late
    assert "rank 0 probably died" not in late["message"] and "stopped waiting for this rank" in late["message"], late
    assert codes == [0, 0] and not any("terminate called" in log for log in logs), logs
    assert elapsed < 35.0


def test_the_process_groups_own_timeout_is_named_and_no_rank_is_blamed():
    """World 3, the process group's own timeout (2 s) below the executor's (5 s), rank 2 slow (3.5 s) in round 2:
    ranks 0 and 1 say that the process group's timeout ended the wait, at once (about 2 s), and name no rank as
    dead (gloo dropped their connections, so every peer would look missing); rank 2 is told that its share
    took longer than the process group's timeout, the effective bound (not compared with the executor's
    5 s), and that rank 0's silence is expected. Every rank exits normally."""
    results, codes, elapsed, logs = _launch("pg_timeout_round", world=3, deadline=40.0)
    _need(results, [0, 1, 2], logs)
    for rank in (0, 1):
        res = results[rank]
        msg = res["message"]
        assert res["error_type"] == "ExecutorError", res
        assert f"process group's own timeout ({PG_SHORT:g}s, shorter than this executor's timeout = {TIMEOUT:g}s)" \
            in msg, msg
        assert "did not answer" not in msg and "no check of which ranks still answer" in msg, msg
        assert res["seconds"] < PG_SHORT + 2.0, res  # well before the executor's own 5 s
    slow = results[2]
    assert slow["error_type"] == "ExecutorError", slow
    assert re.search(r"own share of the round took [0-9.]+s, more than the process group's own timeout "
                     rf"\({PG_SHORT:g}s, below this executor's timeout = {TIMEOUT:g}s\)",
                     slow["message"]), slow["message"]
    assert "rank 0 probably died" not in slow["message"], slow["message"]
    assert codes == [0, 0, 0] and not any("terminate called" in log for log in logs), logs


def test_the_setup_exchange_names_the_process_groups_timeout():
    """Rank 1 reaches the constructor's setup exchange 3.5 s late, past the process group's own timeout (2 s;
    the executor's is 1 s and does not bound the setup): rank 0's error says that the process group's timeout
    ended the wait (not the executor's 1 s) and names no rank as dead; rank 1, finding rank 0 gone, says that
    rank 0 may have stopped waiting for it, not that rank 0 probably died."""
    results, codes, elapsed, logs = _launch("pg_timeout_setup", deadline=40.0)
    _need(results, [0, 1], logs)
    first = results[0]
    assert first["error_type"] == "ExecutorError", first
    msg = first["message"]
    assert "setup exchange" in msg and f"process group's own timeout ({PG_SHORT:g}s) ended this wait" in msg, msg
    assert "timeout = 1s" not in msg and "did not answer" not in msg, msg
    assert first["seconds"] < PG_SHORT + 2.0, first
    late = results[1]
    assert late["error_type"] == "ExecutorError", late
    assert "stopped waiting for this rank" in late["message"] and "rank 0 probably died" not in late["message"], late
    assert f"process group's own timeout ({PG_SHORT:g}s)" in late["message"], late["message"]
    assert codes == [0, 0] and not any("terminate called" in log for log in logs), logs


def test_rank_stalling_before_the_prediction_exchange_fails_within_the_timeout():
    """The first round's predictions travel in a second all-gather (their size is not agreed yet); rank 1
    stalls just before it: rank 0 raises within the timeout, naming that exchange and rank 1."""
    results, codes, elapsed, logs = _launch("stall_predictions", deadline=40.0)
    _need(results, [0], logs)
    res = results[0]
    assert res["error_type"] == "ExecutorError", res
    assert "could not complete the predictions exchange of round 1" in res["message"], res["message"]
    assert "did not answer: 1" in res["message"], res["message"]
    assert STALL_TIMEOUT - 0.5 <= res["seconds"] < STALL_TIMEOUT + STALL_DIAGNOSE + 2.0, res
    assert elapsed < 35.0


def test_mismatched_inputs_are_explained():
    """Every rank raises 'different inputs' when rank 1's xs is float64, when rank 1's ts is float64, and when
    the inputs are the same but rank 1 calls another executor that has run one round fewer (out of step)."""
    results, codes, _, logs = _launch("mismatch")
    _need(results, [0, 1], logs)
    for rank in (0, 1):
        res = results[rank]
        assert res["error_type"] == "ExecutorError", res
        assert "different inputs" in res["message"] and "float64" in res["message"], res["message"]
        got = res["ts_dtype"]
        assert got["error_type"] == "ExecutorError" and "different inputs" in got["message"], got
        assert "rank 1: round 1, xs (2, 3, 4) float32 on cpu, ts float64" in got["message"], got["message"]
        got = res["round"]
        assert got["error_type"] == "ExecutorError" and "different inputs" in got["message"], got
        assert "rank 0: round 3," in got["message"] and "rank 1: round 2," in got["message"], got["message"]


def test_predictions_differing_between_ranks_are_explained():
    """A model whose output shape or dtype depends on the rank: every rank names both ranks' outputs."""
    results, codes, _, logs = _launch("rank_shapes")
    _need(results, [0, 1], logs)
    for rank in (0, 1):
        res = results[rank]
        assert res["error_type"] == "PredictorOutputError", res
        msg = res["message"]
        assert "predictions differ in shape or dtype" in msg, msg
        assert "rank 0: (3, 4) float32" in msg and "rank 1: (3, 2) float64" in msg, msg


def test_not_initialised_is_explained(monkeypatch):
    import torch.distributed as dist

    from backends.distributed import DistributedExecutor, init_from_env
    from driffusion_core.errors import ExecutorError

    if dist.is_initialized():  # pragma: no cover - another test left a group behind
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ExecutorError, match="init_from_env"):
        DistributedExecutor()
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ExecutorError, match="torchrun"):
        init_from_env()


def test_local_rank_defaults_to_0_and_multi_host_setup_is_documented(monkeypatch):
    """Launched by hand (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, no LOCAL_RANK), init_from_env and the
    executor take LOCAL_RANK = 0, as the docs say; the executor's docstrings and the README's distributed
    section say so and name GLOO_SOCKET_IFNAME for runs over several machines."""
    import torch.distributed as dist

    import backends.distributed as D

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Several devices, processes or machines"):]
    section = section[: section.index("\n## ", 1)]
    for text in (D.__doc__, D.DistributedExecutor.__doc__, section):
        assert "GLOO_SOCKET_IFNAME" in text and "LOCAL_RANK" in text, text
        assert re.search(r"LOCAL_RANK``? defaults to 0", text), text
    if dist.is_initialized():  # pragma: no cover - another test left a group behind
        pytest.skip("a process group is already initialised in this process")
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(_free_port()))):
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    env = D.init_from_env(backend="gloo", timeout=30)
    try:
        assert env == D.DistEnv(0, 0, 1, "gloo"), env
        assert D.DistributedExecutor(timeout=5).local_rank == 0
    finally:
        dist.destroy_process_group()


def test_bad_arguments_are_named_in_one_process():
    """In a one-process gloo group: a group or control_group that is not a process group, a backend name
    torch does not know, a timeout given as a numpy int (accepted), and an executor used after the process
    group was destroyed, each get an error naming what is wrong (not torch's own deep errors); a timeout
    above the process group's own is warned about; numpy arrays of any byte order and dtype in the
    conditioning are taken."""
    import warnings

    import torch.distributed as dist

    from backends.distributed import DistributedExecutor, init_from_env
    from driffusion_core.errors import ExecutorError, InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="backend must be 'gloo'"):
        init_from_env(backend="foo")
    if dist.is_initialized():  # pragma: no cover - another test left a group behind
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        for kw in (dict(group="abc"), dict(control_group=5)):
            with pytest.raises(InvalidArgumentError, match=f"{next(iter(kw))} must be a torch.distributed process group"):
                DistributedExecutor(**kw)
        from backends.distributed import DistEnv  # what init_from_env() returns, passed as the group by mistake

        with pytest.raises(InvalidArgumentError, match=r"group got the DistEnv that init_from_env\(\) returns .*"
                                                       r"call DistributedExecutor\(\) with no group after it"):
            DistributedExecutor(DistEnv(0, 0, 1, "gloo"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 20 s within the group's 30 s: no warning
            ex = DistributedExecutor(timeout=np.int64(20))
        assert ex.plan(np.int64(3)) == [3]
        # the group's own timeout (30 s) ends every exchange first: said when the executor is made
        with pytest.warns(UserWarning, match=r"process group's own timeout is 30s .* timeout <= 30s"):
            DistributedExecutor(timeout=45)
        # numpy arrays in the conditioning join its checksums as float64 values, whatever their byte order or
        # dtype (a big-endian array and longdouble could not become tensors as they are)
        odd = {"big_endian": np.arange(3, dtype=">f4"), "long": np.ones(2, dtype=np.longdouble), "tag": np.array(["a"])}
        got = ex.evaluate(lambda x, t, **c: 0.5 * x, torch.ones(2, 3, 2), torch.zeros(2, 3), odd)
        assert torch.equal(got, torch.full((2, 3, 2), 0.5))
    finally:
        dist.destroy_process_group()
    xs, ts = torch.zeros(1, 2, 3), torch.zeros(1, 2)
    with pytest.raises(ExecutorError, match="process group was destroyed"):
        ex.evaluate(lambda x, t: x, xs, ts)


def test_even_shares():
    from backends.distributed import even_shares

    assert even_shares(5, 2) == [3, 2]
    assert even_shares(1, 3) == [1, 0, 0]
    assert even_shares(6, 3) == [2, 2, 2]
    for k in range(0, 12):
        for n in range(1, 6):
            s = even_shares(k, n)
            assert sum(s) == k and max(s) - min(s) <= 1 and s == sorted(s, reverse=True)
            assert s == _closed_form_shares(k, n)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.int64, torch.bool]
)
def test_byte_transport_is_bit_exact(dtype):
    from backends.distributed import _from_bytes, _to_bytes

    x = (torch.randn(3, 4, 5) * 100).to(dtype)
    if dtype.is_floating_point:
        x[0, 0, 0], x[1, 1, 1], x[2, 2, 2] = float("nan"), float("inf"), -0.0
    b = _to_bytes(x[:, ::2])  # a non-contiguous view
    assert b.dtype == torch.uint8
    y = _from_bytes(b, dtype, (3, 2, 5))
    assert y.dtype == dtype and torch.equal(_to_bytes(y), _to_bytes(x[:, ::2].contiguous()))


@pytest.mark.parametrize("family", ["ddpm", "ddim", "flow", "dpm"])
def test_sampling_end_to_end_equals_serial(family):
    results = _launch_clean(f"e2e_{family}", deadline=90.0)
    r0, r1 = results[0], results[1]
    assert len(r0["runs"]) == 8  # anchor local / shared x 2 modes x widths 2 and 3
    assert "anchor=local" in r0["describe"] and "every rank makes the call itself" in r0["describe"], r0["describe"]
    for key, run in r0["runs"].items():
        assert torch.equal(run["x"], run["x_serial"]), f"{family} {key}: distributed != serial executor"
        assert run["rounds"] == run["rounds_serial"] and run["evals"] == run["evals_serial"], key
        assert torch.equal(run["x"], r1["runs"][key]["x"]), f"{family} {key}: ranks disagree"
        assert torch.isfinite(run["x"]).all()
        # who made the calls: anchor="local" has every rank make each one-draft round's call itself (the
        # issue's "every rank makes the single anchor call, so no broadcast is needed"); "shared": rank 0 alone
        ones = run["one_draft_rounds"]
        assert ones >= 1 and ones == r1["runs"][key]["one_draft_rounds"], key
        both = run["calls"] + r1["runs"][key]["calls"]
        assert both == run["evals"] + (ones if key.startswith("local") else 0), (key, both, run["evals"], ones)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.distributed.is_nccl_available()),
                    reason="needs CUDA and a torch build with nccl")
def test_nccl_sampling_equals_serial_on_every_gpu():
    """nccl, launched as torchrun would (one process per GPU, at least one): every family and mode equals the
    SerialExecutor on the same GPU, and the ranks agree bit for bit. (nccl refuses two ranks on one GPU, so a
    one-GPU machine runs one rank: the nccl data path and the gloo side group, without a second process.)"""
    world = max(1, torch.cuda.device_count())
    results, codes, _, logs = _launch("nccl_e2e", world=world, deadline=240.0, use_env=True)
    _need(results, list(range(world)), logs)
    assert codes == [0] * world, logs
    runs = results[0]["runs"]
    assert "nccl" in results[0]["describe"] and results[0]["device"] == "cuda:0", results[0]["describe"]
    assert len(runs) == 24  # 3 families x anchor local / shared x 2 modes x 2 widths
    for key, run in runs.items():
        assert run["device"] == "cuda:0", key
        torch.testing.assert_close(run["x"], run["x_serial"], rtol=1e-5, atol=1e-6, msg=f"{key}: nccl != serial")
        assert run["rounds"] == run["rounds_serial"] and run["evals"] == run["evals_serial"], key
        assert torch.isfinite(run["x"]).all(), key
        for r in range(1, world):
            assert torch.equal(run["x"], results[r]["runs"][key]["x"]), f"{key}: rank {r} differs from rank 0"


@pytest.mark.parametrize("what", ["dtype", "k", "shape", "one_draft"])
def test_one_rank_diverging_after_the_first_round_is_explained(what):
    """After a round that fixed the fused exchange's size, rank 1 alone changes its dtype, K, batch or
    goes to a one-draft round: the buffers stay the same size on every rank (no gloo abort) and every
    rank raises the 'different inputs' error at once."""
    results, codes, _, logs = _launch(f"diverge_{what}")
    _need(results, [0, 1], logs)
    assert codes == [0, 0], logs  # no SIGABRT from a size mismatch in the backend
    for rank in (0, 1):
        res = results[rank]
        assert res["error_type"] == "ExecutorError", res
        assert "different inputs" in res["message"] and "round 2" in res["message"], res["message"]
        assert res["seconds"] < TIMEOUT, res
        assert res["refused_after"], "ranks out of step must refuse further rounds"
    if what == "dtype":
        assert "float64" in results[0]["message"]


@pytest.mark.parametrize("what,round_", [("start", 1), ("noise", 2)])
def test_ranks_with_different_values_are_explained(what, round_):
    """Shapes agree but values do not: each rank drew its own starting state (round 1 already differs),
    or its own noise seed (the states part after the first stochastic step, at the first draft round).
    Every rank raises, naming the cause, instead of returning samples that differ between ranks."""
    results = _launch_clean(f"values_{what}")
    for rank in (0, 1):
        res = results[rank]
        assert res["error_type"] == "ExecutorError", res
        assert "states differ in value" in res["message"] and f"round {round_}" in res["message"], res["message"]
        assert "NoiseSource" in res["message"]
        assert res["seconds"] < TIMEOUT, res


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_model_not_bitwise_reproducible_across_ranks_agrees_with_a_shared_anchor(mode):
    """Predictions that differ in the last bit between ranks (cudnn autotuning, nondeterministic kernels)
    with anchor="shared": one-draft rounds are rank 0's and every prediction is shared, so the ranks never
    drift apart: no false 'states differ' error, and the same sample on every rank."""
    results = _launch_clean(f"ulp_{mode}_shared")
    assert results[0]["error_type"] is None and results[1]["error_type"] is None, (results[0], results[1])
    assert torch.equal(results[0]["x"], results[1]["x"])


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_model_not_bitwise_reproducible_across_ranks_is_caught_with_a_local_anchor(mode):
    """The same model with the default anchor="local": every rank makes round 1's one-draft call itself, the
    CRCs of the predictions differ, and every rank raises in round 1, naming rank 1 and the fix
    (anchor='shared'), instead of drifting apart by an ulp that no state checksum would see."""
    results = _launch_clean(f"ulp_{mode}_local")
    for rank in (0, 1):
        res = results[rank]
        assert res["error_type"] == "ExecutorError", res
        msg = res["message"]
        assert "in round 1," in msg and "rank 1 differs from rank 0's in its bits" in msg, msg
        assert "anchor='shared'" in msg, msg
        assert res["seconds"] < TIMEOUT, res


def test_ranks_given_different_anchor_settings_are_refused():
    """anchor='local' on rank 0 and 'shared' on rank 1 (one-draft rounds would be exchanged differently):
    every rank's constructor raises, naming both settings."""
    results = _launch_clean("anchor_mismatch")
    for rank in (0, 1):
        res = results[rank]
        assert res["error_type"] == "InvalidArgumentError", res
        assert "rank 0: 'local', rank 1: 'shared'" in res["message"], res["message"]


@pytest.mark.parametrize("anchor", ["local", "shared"])
@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_predictor_raising_in_a_one_draft_round_fails_every_rank_at_once(mode, anchor):
    """The predictor raises in a one-draft round (aggressive: the first anchor; conservative: the anchor
    call of the second iteration) on a rank that makes that call: rank 1 with anchor="local" (every rank
    makes it), rank 0 with "shared". Every rank raises, in that round, an error naming that rank and the
    exception, long before the timeout; the group stays usable."""
    results = _launch_clean(f"raise_anchor_{mode}_{anchor}")
    round_ = 1 if mode == "aggressive" else 3
    bad = 1 if anchor == "local" else 0
    for rank in (0, 1):
        res = results[rank]
        assert res["error_type"] == "ExecutorError", res
        msg = res["message"]
        assert f"rank {bad}" in msg and "ValueError" in msg and "anchor boom on purpose" in msg, msg
        assert f"the predictor raised on rank {bad} (of 2)" in msg, msg
        assert f"in round {round_}:" in msg and "did not answer" not in msg, msg
        assert res["k_at_failure"] == 1, res
        assert res["seconds"] < TIMEOUT, res
        assert res["after"] is True, "the next sample must work and equal the serial executor's"


def test_errors_on_a_subgroup_say_which_global_ranks_they_name():
    """World 3, the executor on the subgroup of global ranks 1 and 2: the group's rank 1 (global rank 2)
    raises; both members raise an ExecutorError naming group rank 1 and saying it is global rank 2 (the
    numbering of torchrun and its logs); describe() lists the global ranks. A healthy round first equals the
    serial executor's."""
    results = _launch_clean("subgroup_raise", world=3)
    outside = results[0]["non_member"]
    assert outside["error_type"] == "InvalidArgumentError", outside
    assert "global rank 0) is not a member of the given group" in outside["message"], outside
    for rank in (1, 2):
        res = results[rank]
        assert res["same"] is True, res
        assert "global ranks [1, 2]" in res["describe"], res["describe"]
        assert res["error_type"] == "ExecutorError", res
        msg = res["message"]
        assert "the predictor raised on rank 1 (of 2)" in msg and "boom in the subgroup" in msg, msg
        assert "rank 0 is global rank 1, rank 1 is global rank 2" in msg, msg
        assert res["seconds"] < TIMEOUT, res


def test_gradients_and_models_differing_between_ranks_are_named():
    """The predictions cross processes as bytes, which carry no gradient: an x that requires grad is refused
    on every rank (the sample's gradient would silently leave out every model call); a model whose
    parameters require grad, sampled outside torch.no_grad(), warns once per executor and still gives the
    serial sample. Ranks that built their models from different seeds fail the local anchor's check as
    'different models', without the advice (anchor='shared') meant for last-bit differences."""
    results = _launch_clean("grad_models")
    for rank in (0, 1):
        res = results[rank]
        refused = res["x_grad"]
        assert refused["error_type"] == "ExecutorError", refused
        assert "the round's inputs require gradients on ranks 0, 1" in refused["message"], refused
        assert "torch.no_grad()" in refused["message"], refused
        assert len(res["grad_warnings"]) == 1 and "no gradient to the parameters" in res["grad_warnings"][0], res
        assert res["same"] is True and res["out_requires_grad"] is False, res
        assert res["error_type"] == "ExecutorError", res
        assert "the ranks run different models" in res["message"] and "anchor='shared'" not in res["message"], res
        assert res["as_error"] is not None and "require grad" in res["as_error"], res
        assert res["as_error_seconds"] < TIMEOUT / 2, res


def test_conditioning_differing_in_value_between_ranks_is_explained():
    """Same structure and shapes, different values: a cond tensor (e.g. labels drawn on each rank), also beside
    a tensor holding -inf, the same rows in another order, a float guidance value, a nested flag, a large numpy
    array or a long string differing far from their start; states that differ in one element or hold
    the same values in another order. Every rank raises an ExecutorError
    naming the conditioning in that round; equal conditioning (also holding an object whose repr shows its
    address, which differs between processes) evaluates as the serial executor does."""
    results = _launch_clean("cond_values")
    for rank in (0, 1):
        res = results[rank]
        assert res["same"] is True and res["same_object"] is True and res["same_nonfinite_numpy"] is True, res
        for case in ("tensor", "swapped_rows", "float", "nested", "sample", "scale_beside_inf_bias", "numpy_array",
                     "long_string", "scale_beside_finfo_min_mask", "scale_beside_1e9_mask", "scale_doubled"):
            got = res[case]
            assert got["error_type"] == "ExecutorError", (case, got)
            assert "conditioning (cond)" in got["message"] and "round 1" in got["message"], (case, got["message"])
            assert got["seconds"] < TIMEOUT, (case, got)
        for case in ("tensor", "scale_beside_inf_bias", "numpy_array", "scale_beside_finfo_min_mask", "scale_doubled"):
            assert "differ in value" in res[case]["message"] and "log sum of |c|" in res[case]["message"], res[case]
        assert res["same_dataclass_set"] is True, "a dataclass holding a set or a device must sign alike on every rank"
        assert "guidance scale" in res["float"]["message"]
        assert res["same_set"] is True, "a set in the conditioning must not differ between processes"
        assert res["same_sparse"] == {"coo": True, "csr": True}, res["same_sparse"]
        got = res["nan_on_rank0"]
        assert got["error_type"] == "ExecutorError" and "conditioning (cond) tensors differ in value" in got["message"], got
        # one element, far above the rounding of a sum; the same values in another order
        for case in ("state_1e-6", "state_sign", "state_rows_swapped", "state_drafts_swapped", "state_elements_swapped"):
            got = res[case]
            assert got["error_type"] == "ExecutorError", (case, got)
            assert "states differ in value" in got["message"] and "round 1" in got["message"], (case, got["message"])
        assert "position-weighted sum" in res["state_rows_swapped"]["message"], res["state_rows_swapped"]
        # a difference far below the tolerance (1e-9 of sum(|x|), for the last bits that the reduction order of
        # a sum moves) in a state whose values sum to 0: tolerated (relative to sum(|x|), not to sum(x))
        assert res["state_1e-12"]["error_type"] is None, res["state_1e-12"]


def test_a_device_one_rank_cannot_use_fails_every_rank_in_the_constructor():
    """One rank is given a device it does not have: every rank raises InvalidArgumentError from the
    constructor, naming that rank and device (no rank is left waiting for the other)."""
    results = _launch_clean("device_setup")
    for rank in (0, 1):
        res = results[rank]
        assert res["error_type"] == "InvalidArgumentError", res
        assert "rank 1 (of 2)" in res["message"] and "cuda:99" in res["message"], res["message"]
        assert res["seconds"] < TIMEOUT, res
        meta = res["meta"]  # then rank 0 is given the meta device (holds no values)
        assert meta["error_type"] == "InvalidArgumentError", meta
        assert "rank 0 (of 2)" in meta["message"] and "meta" in meta["message"], meta["message"]


def test_failures_outside_the_predictor_call_fail_every_rank_at_once():
    """Moving the inputs to the rank's device fails, the predictions cannot be stacked or copied for the
    exchange, an exception's str() itself raises: every rank raises in that round, promptly, naming the
    rank and the cause (not a timeout), and the next round works."""
    results = _launch_clean("local_failures")
    expected = {
        "move": ("ExecutorError", ["could not be moved", "rank 1", "cuda:99"]),
        "mixed_devices": ("PredictorOutputError", ["rank 0", "different shapes, dtypes or devices", "meta"]),
        # predictions on another device than the input: refused, as the serial executor refuses them (moved to
        # the CPU for a gloo exchange they would come back on the input's device, hiding the model's bug)
        "all_meta": ("PredictorOutputError", ["rank 1", "predictions on meta, but its input x is on cpu"]),
        "bad_str": ("ExecutorError", ["rank 1", "UnprintableError", "its str() raised RuntimeError"]),
        # a message longer than the exchange's text buffer arrives cut, not as a failed exchange
        "long_message": ("ExecutorError", ["the predictor raised on rank 1", "ValueError: " + "long " * 20]),
        "uint16": ("PredictorOutputError", ["rank 1", "predictions of dtype torch.uint16 are not supported"]),
        # a diffusers-style output object: the message says how to get the tensor out of it
        "output_object": ("PredictorOutputError", ["rank 1", "returned Output, not a Tensor", ".sample",
                                                   "DiffusersPredictor"]),
        "sparse": ("PredictorOutputError", ["rank 1", "returned a sparse_coo tensor", "to_dense()"]),
        # a wrapper that checks the model's output (reparameterize) refuses rank 1's narrower prediction: the
        # shape mismatch, as the serial executor reports it (PredictorOutputError naming the shapes), not
        # "the predictor raised"
        "wrapped_shape": ("PredictorOutputError", ["the predictor returned unusable output on rank 1", "(3, 1)",
                                                   "(3, 4)"]),
    }
    for rank in (0, 1):
        for case, (error_type, parts) in expected.items():
            got = results[rank][case]
            assert got["error_type"] == error_type, (rank, case, got)
            assert all(p in got["message"] for p in parts), (rank, case, got["message"])
            assert "did not answer" not in got["message"] and got["seconds"] < TIMEOUT, (rank, case, got)
            assert "predictor raised" not in got["message"] or case in ("bad_str", "long_message"), (case, got)
            assert got["after"] is True, (rank, case)


def test_conditioning_and_model_times_differing_within_rows_are_explained():
    """Conditioning whose sums, sums of |c| and row sums agree but whose values sit elsewhere within a row
    (one-hot labels drawn per rank, a batch-1 embedding with the same total, columns swapped), and model
    times that differ between ranks (drafts' times swapped, or shifted): every rank raises ExecutorError in
    round 1 naming the conditioning or the model times. A whole sample whose grid has other model times on
    rank 1 (same levels) fails the same way; equal inputs still evaluate as the serial executor does."""
    results = _launch_clean("hidden_values")
    for rank in (0, 1):
        res = results[rank]
        assert res["same"] is True, res
        for case in ("one_hot", "batch1_same_total", "columns_swapped"):
            got = res[case]
            assert got["error_type"] == "ExecutorError", (case, got)
            assert "conditioning (cond) tensors differ in value in round 1" in got["message"], (case, got["message"])
            assert got["seconds"] < TIMEOUT, (case, got)
        for case in ("ts_drafts_swapped", "ts_shifted", "sample_model_times"):
            got = res[case]
            assert got["error_type"] == "ExecutorError", (case, got)
            assert "model times (ts) differ in value in round 1" in got["message"], (case, got["message"])
            assert "rank 1: sum" in got["message"] and got["seconds"] < TIMEOUT, (case, got)
        # another grid (8 against 9 trailing steps): the first draft round's states and model times both
        # differ; the model times are named, not the starting state or seed
        got = res["sample_other_grid"]
        assert got["error_type"] == "ExecutorError", got
        assert "model times (ts) differ" in got["message"] and "states differ too" in got["message"], got["message"]
        # a tensor inside a dataclass (a container the executors look into, as a dict) that differs in one of 2000
        # elements: its values join the conditioning's sums; an object holding no tensor but a value of its own
        # per rank (a device, a pid) is signed by its default repr, the same on every rank
        got = res["dataclass_tensor"]
        assert got["error_type"] == "ExecutorError", got
        assert "conditioning (cond) tensors differ in value in round 1" in got["message"], got["message"]
        assert res["dataclass_same"] is True and res["per_rank_object_same"] is True, res
        # the predictor writes into its input x on rank 1 only: both ranks raise, naming rank 1 and the write
        for case, what in (("inplace_x", "input x in place"), ("inplace_cond", "conditioning tensor cond['c']")):
            got = res[case]
            assert got["error_type"] == "PredictorOutputError", (case, got)
            assert "on rank 1 (of 2) in round 1" in got["message"] and what in got["message"], (case, got["message"])


def test_final_samples_differing_only_in_the_last_step_are_explained():
    """Grids or schedules that differ only in their last step (rank 1's last t_to; rank 1's
    final_alpha_cumprod) leave every round's inputs equal: the samplers' finish() then makes every rank
    raise ExecutorError naming rank 1 and the likely cause. Equal runs equal the serial executor, with one
    extra all-gather per sample (for Picard and sample_driffusion too); a rank that finishes while the other
    evaluates another round makes both raise 'out of step'."""
    results = _launch_clean("last_step")
    for rank in (0, 1):
        res = results[rank]
        for key in ("drafts", "picard", "kdiffusion"):
            got, ref = res[key]
            assert torch.equal(got, ref), (rank, key)
        assert res["finish_gathers"] == 1, res["finish_gathers"]
        for case in ("t_to", "final_alpha_cumprod"):
            got = res[case]
            assert got["error_type"] == "ExecutorError", (case, got)
            msg = got["message"]
            assert "final sample of rank 1 differs from rank 0's" in msg and "last step" in msg, (case, msg)
            assert "final_alpha_cumprod" in msg and got["seconds"] < TIMEOUT, (case, got)
            assert res[case + "_after"] is True, "a broken executor must refuse further use"
        got = res["out_of_step"]
        assert got["error_type"] == "ExecutorError" and "out of step" in got["message"], got
        assert "rank 0 finished sampling" in got["message"] and got["seconds"] < TIMEOUT, got


@pytest.mark.parametrize("kind", ["KeyboardInterrupt", "SystemExit"])
def test_a_predictor_interrupted_on_one_rank_fails_every_rank_at_once(kind):
    """KeyboardInterrupt / SystemExit in rank 1's predictor: rank 1 finishes the round's exchange and
    re-raises it; rank 0 raises ExecutorError naming rank 1 and the exception at once (not a closed
    connection or a timeout). Both executors then refuse further rounds with a clear error, at once."""
    results = _launch_clean(f"interrupt_{kind}")
    assert results[1]["caught"] == kind, results[1]
    res = results[0]
    assert res["error_type"] == "ExecutorError", res
    msg = res["message"]
    assert "interrupted (a BaseException, not an Exception) on rank 1 (of 2) in round 2" in msg and kind in msg, msg
    assert "did not answer" not in res["message"] and res["seconds"] < TIMEOUT, res
    for rank in (0, 1):
        again = results[rank]["again"]
        assert again["error_type"] == "ExecutorError" and "earlier round failed" in again["message"], again
        assert "interrupted" in again["message"] and again["seconds"] < DIAGNOSE / 2, again


def test_three_ranks_one_hung_every_healthy_rank_names_it():
    """World 3, rank 2 hangs: rank 0 waits for hellos at most half of diagnose_timeout before sending its
    verdict, so rank 1 hears it and names rank 2 too (not rank 0)."""
    results, codes, elapsed, logs = _launch("hang3", world=3, deadline=40.0)
    _need(results, [0, 1], logs)
    for rank in (0, 1):
        res = results[rank]
        assert res["error_type"] == "ExecutorError", res
        assert "did not answer" in res["message"] and res["message"].rstrip().count("Rank 0, which checks") == 0, res
        assert ": 2." in res["message"], res["message"]
        assert res["seconds"] < HANG3_TIMEOUT + HANG3_DIAGNOSE + 2.0, res


def test_setup_exchange_failure_says_it_is_the_setup_not_a_round():
    """A peer dies before making its executor: the constructor's error names the setup exchange and the
    process group's timeout, not a 'round 0'."""
    results, codes, _, logs = _launch("setup_dies", deadline=40.0)
    _need(results, [0], logs)
    msg = results[0]["message"]
    assert results[0]["error_type"] == "ExecutorError", results[0]
    assert "setup exchange in the DistributedExecutor constructor" in msg and "round 0" not in msg, msg
    assert "process group's timeout" in msg, msg


# -------------------------------------------------------------------------------------- child side


def _predictor(x, t, scale=None, tag="plain"):
    """Deterministic, row-independent, depends on x, t and the conditioning."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    y = torch.sin(1.3 * x + 0.01 * tt) + 0.1 * x * x
    if scale is not None:
        y = y * scale.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return y


def _init(rank, world, port, use_env, backend="gloo", timeout=30.0):
    import torch.distributed as dist

    from backends import init_from_env

    torch.set_num_threads(1)
    if use_env:
        env = init_from_env(backend=backend, timeout=timeout)
        assert env.rank == rank and env.world_size == world
    else:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )


def _scenario_basic(rank, world):
    from backends import DistributedExecutor, SerialExecutor

    ex = DistributedExecutor(timeout=20)
    serial = SerialExecutor()
    g = torch.Generator().manual_seed(0)
    pairs = {}
    for k in (1, 2, 3, 5):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            xs = torch.randn(k, 4, 3, 2, generator=g).to(dtype)
            ts = torch.randint(0, 1000, (k, 1), generator=g).expand(k, 4).to(torch.float32)
            cond = {"scale": torch.rand(4, generator=g), "tag": "x"}
            pairs[(k, str(dtype))] = (ex.evaluate(_predictor, xs, ts, cond), serial.evaluate(_predictor, xs, ts, cond))
    # conditioning nested as diffusers' added_cond_kwargs (a dict holding a list of tensors)
    nested = lambda x, t, extra: _predictor(x, t, extra["scales"][0]) + extra["scales"][1].reshape(-1, 1, 1)  # noqa: E731
    for k in (1, 3):
        xs = torch.randn(k, 4, 3, 2, generator=g)
        ts = torch.full((k, 4), 700.0)
        cond = {"extra": {"scales": [torch.rand(4, generator=g), torch.rand(4, generator=g)]}}
        pairs[("nested", k)] = (ex.evaluate(nested, xs, ts, cond), serial.evaluate(nested, xs, ts, cond))
    # a torch module predictor (same seed, same weights on every rank), no conditioning
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.SiLU(), torch.nn.Linear(32, 6))
    model = lambda x, t: net(x) * t[:, None] / 1000  # noqa: E731
    with torch.no_grad():
        xs = torch.randn(3, 5, 6, generator=g)
        ts = torch.full((3, 5), 500.0)
        pairs[("mlp", 3)] = (ex.evaluate(model, xs, ts), serial.evaluate(model, xs, ts))
    # the two-phase path nccl uses (status over a gloo side group, predictions over the main group)
    import torch.distributed as dist

    ex2 = DistributedExecutor(timeout=20, control_group=dist.new_group(backend="gloo"))
    assert not ex2._fused
    for k in (1, 2, 3, 5):
        xs = torch.randn(k, 4, 3, generator=g)
        ts = torch.full((k, 4), 10.0 * k)
        cond = {"scale": torch.rand(4, generator=g)}
        pairs[("two-phase", k)] = (ex2.evaluate(_predictor, xs, ts, cond), serial.evaluate(_predictor, xs, ts, cond))
    # the last exchanges stay referenced from Python (finished), so no gloo worker thread frees their tensors
    # during interpreter shutdown (an intermittent SIGABRT at exit otherwise)
    from backends import distributed as D

    last = ex2._all_gather(torch.arange(3, dtype=torch.uint8), None, what="check")
    kept = list(D._RECENT)
    retained = bool(kept) and kept[-1][2] is last and all(w.is_completed() for w, *_ in kept)
    # the all-gathers of each round (the fused exchange and its agreed size)
    ex3 = DistributedExecutor(timeout=20)
    counted, all_gather = [0], dist.all_gather

    def counting_all_gather(*args, **kwargs):
        counted[0] += 1
        return all_gather(*args, **kwargs)

    exchanges = []
    dist.all_gather = counting_all_gather
    try:
        for i, (k, dtype) in enumerate(COUNTED_ROUNDS):
            xs = torch.randn(k, 4, 3, generator=g).to(getattr(torch, dtype))
            ts = torch.full((k, 4), 100.0 * k)
            counted[0] = 0
            got = ex3.evaluate(_predictor, xs, ts)
            exchanges.append(counted[0])
            pairs[("counted", i, k, dtype)] = (got, serial.evaluate(_predictor, xs, ts))
    finally:
        dist.all_gather = all_gather
    # configuration and rounds refused locally (before any exchange, so every rank may raise on its own)
    from driffusion_core.errors import InvalidArgumentError

    xs, ts = torch.randn(2, 4, 3, generator=g), torch.zeros(3, 4)
    attempts = {
        "timeout=0": lambda: DistributedExecutor(timeout=0), "timeout=True": lambda: DistributedExecutor(timeout=True),
        "timeout=-1": lambda: DistributedExecutor(timeout=-1),
        "diagnose_timeout=-1": lambda: DistributedExecutor(timeout=20, diagnose_timeout=-1),
        "plan(0)": lambda: ex.plan(0), "ts of 3 drafts for xs of 2": lambda: ex.evaluate(_predictor, xs, ts),
        "K=0": lambda: ex.evaluate(_predictor, xs[:0], ts[:0]),
        "anchor='rank0'": lambda: DistributedExecutor(timeout=20, anchor="rank0"),
    }
    refused = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            refused[name] = None
        except InvalidArgumentError as e:
            refused[name] = type(e).__name__
        except Exception as e:  # noqa: BLE001 - reported by type
            refused[name] = f"{type(e).__name__}: {e}"
    diagnose_default = DistributedExecutor(timeout=2).diagnose_timeout
    return {"pairs": pairs, "shares": {k: ex.shares(k) for k in (1, 2, 3, 5)}, "describe": ex.describe(),
            "describe3": ex.describe(3), "describe4": ex.describe(4), "plan": ex.plan(3), "retained": retained,
            "exchanges": exchanges, "refused": refused, "diagnose_default": diagnose_default}


def _scenario_three(rank, world):
    import torch.distributed as dist

    from backends import DistributedExecutor, SerialExecutor
    from driffusion_core import DraftRefineScheduler, NoiseSource, VPSchedule
    from solvers import DDPMSkip, ring_mixture

    ex, serial = DistributedExecutor(timeout=20), SerialExecutor()
    two_phase = DistributedExecutor(timeout=20, control_group=dist.new_group(backend="gloo"))
    g = torch.Generator().manual_seed(0)
    pairs = {}
    for name, executor in (("fused", ex), ("two-phase", two_phase)):
        for k in (1, 2, 4, 5, 7):
            xs = torch.randn(k, 4, 3, generator=g)
            ts = torch.randint(0, 1000, (k, 1), generator=g).expand(k, 4).to(torch.float32)
            cond = {"scale": torch.rand(4, generator=g)}
            pairs[(name, k)] = (executor.evaluate(_predictor, xs, ts, cond), serial.evaluate(_predictor, xs, ts, cond))
    schedule = VPSchedule.linear()
    sched = DraftRefineScheduler(DDPMSkip(schedule), schedule.timesteps(25), width=4)
    f, x = ring_mixture(8).predictor(schedule, "epsilon"), NoiseSource(0).initial((4, 2))
    pairs["sample"] = (sched.sample(f, x, executor=ex, noise=NoiseSource(1)).x,
                       sched.sample(f, x, executor=serial, noise=NoiseSource(1)).x)
    return {"pairs": pairs, "shares": {k: ex.shares(k) for k in (1, 2, 4, 5, 7)}}


def _scenario_odd_outputs(rank, world):
    from backends import DistributedExecutor, SerialExecutor

    ex = DistributedExecutor(timeout=20)
    serial = SerialExecutor()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(3, 4, 5, generator=g)
    ts = torch.zeros(3, 4)

    def nan_pred(x, t):
        y = x.clone()
        y[0, 0] = float("nan")
        return y

    def inf_pred(x, t):
        return x / 0.0

    def wide(x, t):  # the wrong shape, but the same on every rank: kept as is
        return torch.cat([x, x[..., :1]], -1).double()

    pairs = {}
    for name, f in (("nan", nan_pred), ("inf", inf_pred), ("wide", wide)):
        for k in (2, 3):
            pairs[name if k == 3 else f"{name}{k}"] = (ex.evaluate(f, xs[:k], ts[:k]), serial.evaluate(f, xs[:k], ts[:k]))
    # a model that returns one reused output buffer (a CUDA graph's static output): each draft keeps its own
    buf = torch.empty(4, 5)
    static = lambda x, t: buf.copy_(torch.sin(x) + t[:, None])  # noqa: E731
    for k in (3, 5):  # rank 0 computes 2 or 3 drafts with the one buffer
        t_k = torch.arange(k * 4, dtype=torch.float32).reshape(k, 4)
        xs_k = torch.randn(k, 4, 5, generator=g)
        pairs[f"static{k}"] = (ex.evaluate(static, xs_k, t_k), torch.sin(xs_k) + t_k[..., None])
    return {"pairs": pairs}


def _fault_result(fn):
    from driffusion_core.errors import DriffusionError

    t0 = time.monotonic()
    try:
        fn()
    except DriffusionError as e:
        return {"error_type": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0}
    return {"error_type": None, "message": "", "seconds": time.monotonic() - t0}


def _scenario_raise(rank, world):
    from backends import DistributedExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    xs, ts = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3)), torch.zeros(2, 3)
    ex.evaluate(_predictor, xs, ts)  # a healthy round first

    def bad(x, t):
        if rank == 1:
            raise ValueError("boom on purpose")
        return x

    res = _fault_result(lambda: ex.evaluate(bad, xs, ts))
    res["after"] = bool(torch.equal(ex.evaluate(_predictor, xs, ts), torch.stack([_predictor(xs[i], ts[i]) for i in range(2)])))
    ex.close()
    res["closed"] = _fault_result(lambda: ex.evaluate(_predictor, xs, ts))
    return res


def _scenario_subgroup_raise(rank, world):
    """World 3, the executor on the subgroup of global ranks 1 and 2; global rank 2 (group rank 1) raises."""
    import torch.distributed as dist

    from backends import DistributedExecutor, SerialExecutor

    group = dist.new_group([1, 2], backend="gloo")  # every process takes part in making it
    res = {}
    if rank == 0:  # not a member: new_group gave it a placeholder
        res["non_member"] = _fault_result(lambda: DistributedExecutor(group=group, timeout=TIMEOUT))
    if rank > 0:
        ex = DistributedExecutor(group=group, timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
        xs, ts = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3)), torch.zeros(2, 3)
        res["same"] = bool(torch.equal(ex.evaluate(_predictor, xs, ts), SerialExecutor().evaluate(_predictor, xs, ts)))
        res["describe"] = ex.describe()

        def bad(x, t):
            if rank == 2:
                raise ValueError("boom in the subgroup")
            return x

        res.update(_fault_result(lambda: ex.evaluate(bad, xs, ts)))
    dist.barrier()
    return res


def _scenario_die(rank, world, dying=1):
    from backends import DistributedExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    xs, ts = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(3)), torch.zeros(4, 3)
    ex.evaluate(_predictor, xs, ts)

    def die(x, t):
        if rank == dying:
            os._exit(17)
        return x

    res = _fault_result(lambda: ex.evaluate(die, xs, ts))
    again = _fault_result(lambda: ex.evaluate(_predictor, xs, ts))
    res["refused_after"] = again["error_type"] == "ExecutorError" and again["seconds"] < DIAGNOSE / 2  # refused at once, not after a wait
    return res


def _scenario_hang(rank, world, hung=1, timeout=TIMEOUT, diagnose=DIAGNOSE):
    """Rank ``hung`` sleeps past the timeout in the second round (one draft per rank). With three or more
    ranks it then exits; rank 0 exits as soon as its result is saved (its verdict must reach the other
    healthy ranks all the same)."""
    from backends import DistributedExecutor

    ex = DistributedExecutor(timeout=timeout, diagnose_timeout=diagnose)
    xs, ts = torch.randn(world, 3, 4, generator=torch.Generator().manual_seed(3)), torch.zeros(world, 3)
    ex.evaluate(_predictor, xs, ts)

    def slow(x, t):
        if rank == hung:
            time.sleep(timeout + diagnose + 1)
            if world > 2:
                os._exit(0)
        return x

    import threading

    res = _fault_result(lambda: ex.evaluate(slow, xs, ts))
    # the helper threads of rank 0's check (it awaits each hello in one): none may outlive the check
    res["diagnose_threads"] = [t.name for t in threading.enumerate() if t.name.startswith("driffusion-diagnose")]
    return res


def _scenario_pg_timeout_round(rank, world):
    """The process group's own timeout (PG_SHORT) below the executor's (TIMEOUT); rank 2 takes PG_SLOW seconds
    over its share in the second round."""
    import warnings

    from backends import DistributedExecutor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that the group's timeout is the shorter: meant here
        ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    xs, ts = torch.randn(world, 3, 4, generator=torch.Generator().manual_seed(3)), torch.zeros(world, 3)
    ex.evaluate(_predictor, xs, ts)

    def slow(x, t):
        if rank == 2:
            time.sleep(PG_SLOW)
        return x

    return _fault_result(lambda: ex.evaluate(slow, xs, ts))


def _scenario_pg_timeout_setup(rank, world):
    """Rank 1 makes its executor PG_SLOW seconds late, past the process group's own timeout (PG_SHORT); the
    executor's timeout (1 s) does not bound the setup exchange."""
    from backends import DistributedExecutor

    if rank == 1:
        time.sleep(PG_SLOW)
    return _fault_result(lambda: DistributedExecutor(timeout=1.0, diagnose_timeout=DIAGNOSE))


def _scenario_stall_predictions(rank, world):
    from backends import DistributedExecutor

    ex = DistributedExecutor(timeout=STALL_TIMEOUT, diagnose_timeout=STALL_DIAGNOSE)
    xs, ts = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3)), torch.zeros(2, 3)
    if rank == 1:  # stalls after the status exchange, before the predictions'
        all_gather = ex._all_gather

        def stalling(t, group, what, *args, **kwargs):
            if what == "predictions":
                time.sleep(STALL_TIMEOUT + STALL_DIAGNOSE + 1.0)
            return all_gather(t, group, what, *args, **kwargs)

        ex._all_gather = stalling
    return _fault_result(lambda: ex.evaluate(_predictor, xs, ts))


def _scenario_mismatch(rank, world):
    from backends import DistributedExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    dtype = torch.float64 if rank == 1 else torch.float32
    xs, ts = torch.randn(2, 3, 4, dtype=dtype), torch.zeros(2, 3)
    res = _fault_result(lambda: ex.evaluate(_predictor, xs, ts))
    xs = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    fresh = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    ts = torch.zeros(2, 3, dtype=torch.float64 if rank == 1 else torch.float32)
    res["ts_dtype"] = _fault_result(lambda: fresh.evaluate(_predictor, xs, ts))
    # two executors on one group, rounds a, b, a on both ranks; then rank 0 calls a (its round 3) while rank 1
    # calls b (its round 2): same inputs and exchange sizes, but out of step
    a = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    b = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    ts = torch.zeros(2, 3)
    for e in (a, b, a):
        e.evaluate(_predictor, xs, ts)
    res["round"] = _fault_result(lambda: (a if rank == 0 else b).evaluate(_predictor, xs, ts))
    return res


def _scenario_rank_shapes(rank, world):
    from backends import DistributedExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    xs, ts = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3)), torch.zeros(2, 3)

    def narrow_on_one(x, t):  # rank 1's model returns a different shape and dtype
        return x[..., :2].double() if rank == 1 else x

    return _fault_result(lambda: ex.evaluate(narrow_on_one, xs, ts))


def _scenario_diverge(rank, world, what):
    from backends import DistributedExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    g = torch.Generator().manual_seed(5)
    xs, ts = torch.randn(2, 3, 4, generator=g), torch.zeros(2, 3)
    ex.evaluate(_predictor, xs, ts)  # round 1: all agree, the fused exchange now carries a draft per rank
    if rank == 1:
        if what == "dtype":
            xs = xs.double()
        elif what == "k":  # shares [2, 1]: rank 1's share still fits, rank 0's round is K=2
            xs, ts = torch.randn(3, 3, 4, generator=g), torch.zeros(3, 3)
        elif what == "shape":  # a larger batch: rows that no longer fit
            xs, ts = torch.randn(2, 5, 4, generator=g), torch.zeros(2, 5)
        elif what == "one_draft":  # a one-draft round against rank 0's two-draft round
            xs, ts = xs[:1], ts[:1]
    res = _fault_result(lambda: ex.evaluate(_predictor, xs, ts))
    again = _fault_result(lambda: ex.evaluate(_predictor, xs, ts))
    res["refused_after"] = again["error_type"] == "ExecutorError" and "earlier round failed" in again["message"]
    return res


def _scenario_values(rank, world, what):
    """Same shapes on every rank, different values: a per-rank starting state, or per-rank noise seeds."""
    import driffusion_core as core
    import solvers
    from backends import DistributedExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    schedule = core.VPSchedule.linear()
    predictor = solvers.ring_mixture(4).predictor(schedule, "epsilon")
    sched = core.DraftRefineScheduler(solvers.DDPMSkip(schedule), schedule.timesteps(10), width=2)
    if what == "start":
        x, noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(rank)), core.NoiseSource(7)
    else:
        x, noise = core.NoiseSource(123).initial((6, 2)), core.NoiseSource(7 + rank)
    return _fault_result(lambda: sched.sample(predictor, x, executor=ex, noise=noise))


def _scenario_ulp(rank, world, mode, anchor):
    """A model that is not bit for bit reproducible across ranks (here: a last-bit difference on rank 1)."""
    import driffusion_core as core
    import solvers
    from backends import DistributedExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE, anchor=anchor)
    schedule = core.VPSchedule.linear()
    oracle = solvers.ring_mixture(4).predictor(schedule, "epsilon")
    predictor = lambda x, t: oracle(x, t) * (1 + rank * torch.finfo(x.dtype).eps)  # noqa: E731
    sched = core.DraftRefineScheduler(solvers.DDPMSkip(schedule), schedule.timesteps(20), width=2, mode=mode)
    x = core.NoiseSource(123).initial((6, 2))
    res = _fault_result(lambda: sched.sample(predictor, x, executor=ex, noise=core.NoiseSource(7)))
    res["x"] = sched.sample(predictor, x, executor=ex, noise=core.NoiseSource(7)).x if res["error_type"] is None else None
    return res


def _scenario_grad_models(rank, world):
    import warnings

    import driffusion_core as core
    import solvers
    from backends import DistributedExecutor, SerialExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    schedule = core.VPSchedule.linear()
    sched = core.DraftRefineScheduler(solvers.DDIMSkip(schedule), schedule.timesteps(8), width=2)
    x = core.NoiseSource(1).initial((3, 4))
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    res = {"x_grad": _fault_result(lambda: sched.sample(lambda x, t: net(x), x.clone().requires_grad_(), executor=ex))}
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = sched.sample(lambda x, t: net(x), x, executor=ex)
        sched.sample(lambda x, t: net(x), x, executor=ex)
    res["grad_warnings"] = [str(w.message) for w in got if "require grad" in str(w.message)]
    with torch.no_grad():
        res["same"] = bool(torch.equal(out.x, sched.sample(lambda x, t: net(x), x, executor=SerialExecutor()).x))
    res["out_requires_grad"] = out.x.requires_grad
    torch.manual_seed(rank)  # a different model on each rank
    other = torch.nn.Linear(4, 4)
    with torch.no_grad():
        res.update(_fault_result(lambda: sched.sample(lambda x, t: other(x), x, executor=ex)))
    # the grad warning turned into an error: with anchor="shared" only rank 0 computes round 1, yet every rank
    # raises it in that round (the header carries it), none is left waiting at the next exchange
    shared = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE, anchor="shared")
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", core.WideWindowWarning)
        try:
            sched.sample(lambda x, t: net(x), x, executor=shared)
            res["as_error"] = None
        except UserWarning as e:
            res["as_error"] = str(e)
    res["as_error_seconds"] = time.monotonic() - t0
    return res


def _scenario_anchor_mismatch(rank, world):
    from backends import DistributedExecutor

    return _fault_result(lambda: DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE,
                                                     anchor="local" if rank == 0 else "shared"))


def _scenario_raise_anchor(rank, world, mode, anchor):
    import driffusion_core as core
    import solvers
    from backends import DistributedExecutor, SerialExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE, anchor=anchor)
    schedule = core.VPSchedule.linear()
    predictor = solvers.ring_mixture(4).predictor(schedule, "epsilon")
    sched = core.DraftRefineScheduler(solvers.DDIMSkip(schedule), schedule.timesteps(10), width=2, mode=mode)
    # the calls of the rank that raises (it makes the one-draft rounds: rank 1 with anchor="local", where
    # every rank does, rank 0 with "shared"): aggressive: 1 = the first anchor; conservative: 1 = anchor,
    # 2 = its share of the two drafts, 3 = the next anchor call.
    bad_call = 1 if mode == "aggressive" else 3
    bad_rank = 1 if anchor == "local" else 0
    calls, ks = [0], []
    evaluate = ex.evaluate

    def counting_evaluate(pred, xs, ts, cond=None):
        ks.append(xs.shape[0])
        return evaluate(pred, xs, ts, cond)

    ex.evaluate = counting_evaluate

    def flaky(x, t, **c):
        calls[0] += 1
        if rank == bad_rank and calls[0] == bad_call:
            raise ValueError("anchor boom on purpose")
        return predictor(x, t, **c)

    x = core.NoiseSource(123).initial((6, 2))
    res = _fault_result(lambda: sched.sample(flaky, x, executor=ex, noise=core.NoiseSource(7)))
    res["k_at_failure"] = ks[-1] if ks else None
    got = sched.sample(predictor, x, executor=ex, noise=core.NoiseSource(7)).x
    ref = sched.sample(predictor, x, executor=SerialExecutor(), noise=core.NoiseSource(7)).x
    res["after"] = bool(torch.equal(got, ref))
    return res


class _Opaque:
    """A value whose default repr holds its memory address (different in every process)."""


@dataclasses.dataclass
class _Options:
    """Options a user might pass in cond: a set of strings (its repr follows the per-process string hash
    order) and the rank's own device (cuda:<local rank> under nccl)."""
    tags: frozenset
    device: torch.device


def _sparse_cond(x, t, adj):
    return _predictor(x, t, None) + 0.01 * adj.to_dense().sum(dim=1).reshape(-1, 1)


def _guided(x, t, scale=None, tag="plain", guidance=1.0, extra=None, opaque=None, bias=None, obs=None, note="",
            mask=None, options=None):
    y = _predictor(x, t, scale) * guidance
    if obs is not None:
        y = y + float(obs.sum())
    if note.endswith("b"):
        y = y + 1
    return y if extra is None or not extra["flag"] else -y


def _scenario_cond_values(rank, world):
    import driffusion_core as core
    import solvers
    from backends import DistributedExecutor, SerialExecutor

    g = torch.Generator().manual_seed(4)
    xs, ts = torch.randn(3, 4, 2, generator=g), torch.full((3, 4), 500.0)
    scale = torch.rand(4, generator=g) + 0.5
    base = {"scale": scale, "tag": "a", "guidance": 7.5, "extra": {"flag": False}}
    res = {}
    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    res["same"] = bool(torch.equal(ex.evaluate(_guided, xs, ts, base), SerialExecutor().evaluate(_guided, xs, ts, base)))
    with_object = dict(base, opaque=_Opaque())
    res["same_object"] = bool(torch.equal(ex.evaluate(_guided, xs, ts, with_object),
                                          SerialExecutor().evaluate(_guided, xs, ts, with_object)))
    cases = {
        "tensor": dict(base, scale=scale + rank),
        "swapped_rows": dict(base, scale=scale.flip(0) if rank == 1 else scale),
        "float": dict(base, guidance=7.5 + rank),
        "nested": dict(base, extra={"flag": rank == 1}),
    }
    with_set = dict(base, extra={"flag": False, "names": frozenset({"cfg", "neg", "style", "seed", "lora", "vae"})})
    res["same_set"] = bool(torch.equal(ex.evaluate(_guided, xs, ts, with_set),
                                       SerialExecutor().evaluate(_guided, xs, ts, with_set)))
    # a per-sample sparse conditioning tensor (COO, CSR) reaches the model as it is, as with SerialExecutor
    adj = torch.rand(4, 3, generator=g) * (torch.rand(4, 3, generator=g) > 0.5)
    res["same_sparse"] = {layout: bool(torch.equal(ex.evaluate(_sparse_cond, xs, ts, {"adj": a}),
                                                   SerialExecutor().evaluate(_sparse_cond, xs, ts, {"adj": adj})))
                          for layout, a in (("coo", adj.to_sparse()), ("csr", adj.to_sparse_csr()))}
    cases["nan_on_rank0"] = dict(base, scale=torch.where(torch.arange(4) == 1, float("nan"), scale) if rank == 0 else scale)
    # an attention bias holding -inf on every rank must not switch the value check off for the other tensors; a
    # large numpy array (its repr abbreviates) and a long string that differ far from their start
    bias = torch.zeros(4, 3).index_fill_(1, torch.tensor([2]), float("-inf"))
    obs = np.zeros(2000)
    obs[1000] = 5.0 * rank
    cases["scale_beside_inf_bias"] = dict(base, scale=scale + rank, bias=bias)
    # one very large tensor (a Hugging Face attention bias of finfo.min, or -1e9) hides no difference in another;
    # a tensor scaled on one rank (its normalised sums unchanged) shows too
    huge = torch.full((4, 77), torch.finfo(torch.float32).min).index_fill_(1, torch.arange(5), 0.0)
    cases["scale_beside_finfo_min_mask"] = dict(base, scale=scale + rank, mask=huge)
    cases["scale_beside_1e9_mask"] = dict(base, scale=scale + 1e-3 * rank, mask=huge.clamp(min=-1e9))
    cases["scale_doubled"] = dict(base, scale=scale * (1 + rank))
    # a dataclass holding a set of strings and the rank's own device: the same conditioning on every rank
    options = _Options(frozenset({"cfg", "neg", "style", "seed", "lora", "vae"}), torch.device("cuda", rank))
    res["same_dataclass_set"] = bool(torch.equal(ex.evaluate(_guided, xs, ts, dict(base, options=options)),
                                                 SerialExecutor().evaluate(_guided, xs, ts, dict(base, options=options))))
    cases["numpy_array"] = dict(base, obs=obs)
    cases["long_string"] = dict(base, note="a" * 3000 + ("b" if rank else "c"))
    alike = dict(base, bias=bias, obs=np.zeros(2000), note="a" * 3000)
    res["same_nonfinite_numpy"] = bool(torch.equal(ex.evaluate(_guided, xs, ts, alike),
                                                   SerialExecutor().evaluate(_guided, xs, ts, alike)))
    for name, cond in cases.items():
        fresh = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
        res[name] = _fault_result(lambda: fresh.evaluate(_guided, xs, ts, cond))
    # states (not the conditioning) that differ on rank 1 in one element: by 1e-6 of it, by its sign, by 1e-12 of
    # sum(|x|) in a state whose values sum to 0
    v = torch.randn(2, 4, 1, dtype=torch.float64, generator=g)
    zero_sum = torch.cat([v, -v], -1)
    for name, x0, change in (
        ("state_1e-6", xs, lambda x: x[0, 0, 0] * (1 + 1e-6)),
        ("state_sign", xs, lambda x: -x[0, 0, 0]),
        ("state_1e-12", zero_sum, lambda x: x[0, 0, 0] + 1e-12 * x.abs().sum()),
    ):
        x = x0.clone()
        if rank == 1:
            x[0, 0, 0] = change(x)
        fresh = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
        res[name] = _fault_result(lambda: fresh.evaluate(_guided, x, ts[: len(x)], base))
    # the same values in another order on rank 1 (sum and sum(|x|) unchanged): batch rows, drafts, elements
    for name, order in (
        ("state_rows_swapped", lambda x: x[:, [1, 0, 2, 3]]),
        ("state_drafts_swapped", lambda x: x[[2, 1, 0]]),
        ("state_elements_swapped", lambda x: x.flip(-1)),
    ):
        x = order(xs) if rank == 1 else xs
        fresh = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
        res[name] = _fault_result(lambda: fresh.evaluate(_guided, x, ts, base))
    # the reviewer's case: a whole sample with class labels made on each rank
    schedule = core.VPSchedule.linear()
    sched = core.DraftRefineScheduler(solvers.DDIMSkip(schedule), schedule.timesteps(10), width=2)
    labels = torch.tensor([rank, rank, rank])
    predictor = lambda x, t, labels: _predictor(x, t) + labels.to(x.dtype)[:, None]  # noqa: E731
    fresh = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    x = core.NoiseSource(1).initial((3, 2))
    res["sample"] = _fault_result(lambda: sched.sample(predictor, x, executor=fresh, noise=core.NoiseSource(2),
                                                       cond={"labels": labels}))
    return res


def _scenario_device_setup(rank, world):
    from backends import DistributedExecutor

    res = _fault_result(lambda: DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE,
                                                    device="cuda:99" if rank == 1 else None))
    res["meta"] = _fault_result(lambda: DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE,
                                                            device="meta" if rank == 0 else None))
    return res


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("no str")


def _scenario_local_failures(rank, world):
    from backends import DistributedExecutor, SerialExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    g = torch.Generator().manual_seed(6)
    xs, ts = torch.randn(3, 3, 4, generator=g), torch.zeros(3, 3)
    calls = [0]

    def mixed_devices(x, t):  # rank 0's second prediction is on another device
        calls[0] += 1
        return x.to("meta") if rank == 0 and calls[0] == 2 else x

    def all_meta(x, t):
        return x.to("meta") if rank == 1 else x

    def bad_str(x, t):
        if rank == 1:
            raise UnprintableError()
        return x

    def long_message(x, t):
        if rank == 1:
            raise ValueError("long " * 2000)
        return x

    def uint16(x, t):  # a dtype the exchange does not carry
        return x.to(torch.uint16) if rank == 1 else x

    class Output:  # what a diffusers model returns: the prediction in .sample
        def __init__(self, sample):
            self.sample = sample

    def output_object(x, t):
        return Output(x) if rank == 1 else x

    def sparse(x, t):
        return x.to_sparse() if rank == 1 else x

    from driffusion_core import VPSchedule, reparameterize

    wrapped_shape = reparameterize(lambda x, t: x[..., :1] if rank == 1 else x, VPSchedule.linear(), "epsilon",
                                   "sample")

    def after():
        return bool(torch.equal(ex.evaluate(_predictor, xs, ts), SerialExecutor().evaluate(_predictor, xs, ts)))

    res = {}
    if rank == 1:  # a device that stopped working after construction: the move fails on this rank only
        ex.device = torch.device("cuda:99")
    res["move"] = _fault_result(lambda: ex.evaluate(_predictor, xs, ts))
    ex.device = None
    res["move"]["after"] = after()
    for name, f in (("mixed_devices", mixed_devices), ("all_meta", all_meta), ("bad_str", bad_str),
                    ("long_message", long_message), ("uint16", uint16), ("output_object", output_object),
                    ("sparse", sparse), ("wrapped_shape", wrapped_shape)):
        res[name] = _fault_result(lambda: ex.evaluate(f, xs, ts))
        res[name]["after"] = after()
    return res


def _scenario_hidden_values(rank, world):
    import driffusion_core as core
    import solvers
    from backends import DistributedExecutor, SerialExecutor

    def fresh():
        return DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)

    def labelled(x, t, c):
        return _predictor(x, t) + c.to(x.dtype).sum(-1, keepdim=True) * c.to(x.dtype)[:, :1]

    g = torch.Generator().manual_seed(9)
    xs, ts = torch.randn(2, 2, 3, generator=g), torch.full((2, 2), 400.0)
    res = {}
    same = {"c": torch.eye(3)[[0, 2]]}
    res["same"] = bool(torch.equal(fresh().evaluate(labelled, xs, ts, same), SerialExecutor().evaluate(labelled, xs, ts, same)))
    cases = {
        "one_hot": torch.eye(3)[[0, 1]] if rank == 0 else torch.eye(3)[[2, 2]],
        "batch1_same_total": torch.tensor([[1.0, 2.0, 3.0]]) if rank == 0 else torch.tensor([[2.0, 2.0, 2.0]]),
        "columns_swapped": torch.tensor([[1.0, 2.0], [3.0, 4.0]]) if rank == 0 else torch.tensor([[2.0, 1.0], [4.0, 3.0]]),
    }
    for name, c in cases.items():
        x = xs[:, : c.shape[0]].contiguous()
        res[name] = _fault_result(lambda: fresh().evaluate(labelled, x, ts[:, : c.shape[0]], {"c": c}))
    t2 = torch.tensor([[400.0, 400.0], [300.0, 300.0]])
    for name, t in (("ts_drafts_swapped", t2.flip(0) if rank == 1 else t2), ("ts_shifted", t2 + rank)):
        res[name] = _fault_result(lambda: fresh().evaluate(_predictor, xs, t, {}))
    schedule = core.VPSchedule.linear()
    grid = schedule.timesteps(6)
    if rank == 1:  # the same levels, other model times
        grid = core.TimeGrid(grid.t_from, grid.t_to, grid.model_times + 1, grid.kind)
    predictor = solvers.ring_mixture(4).predictor(schedule, "epsilon")
    sched = core.DraftRefineScheduler(solvers.DDIMSkip(schedule), grid, width=2)
    res["sample_model_times"] = _fault_result(
        lambda: sched.sample(predictor, core.NoiseSource(1).initial((3, 2)), executor=fresh()))
    other = core.DraftRefineScheduler(solvers.DDIMSkip(schedule), schedule.timesteps(8 + rank, "trailing"), width=2)
    res["sample_other_grid"] = _fault_result(
        lambda: other.sample(predictor, core.NoiseSource(1).initial((3, 2)), executor=fresh()))
    weights = torch.linspace(0, 1, 2000)
    changed = weights.clone()
    changed[1000] += 1.0
    res["dataclass_same"] = bool(torch.equal(fresh().evaluate(_configured, xs, ts, {"cfg": _Config(weights.clone())}),
                                             SerialExecutor().evaluate(_configured, xs, ts, {"cfg": _Config(weights)})))
    hidden = {"cfg": _Config(changed if rank == 1 else weights)}
    res["dataclass_tensor"] = _fault_result(lambda: fresh().evaluate(_configured, xs, ts, hidden))
    per_rank = {"opaque": _Opaque()}
    per_rank["opaque"].device = f"cuda:{rank}"
    res["per_rank_object_same"] = bool(torch.equal(fresh().evaluate(_guided, xs, ts, per_rank),
                                                   SerialExecutor().evaluate(_guided, xs, ts, per_rank)))

    def writes_x(x, t):
        if rank == 1:
            x.mul_(1.0)
        return _predictor(x, t)

    def writes_cond(x, t, c):
        if rank == 1:
            c.add_(0.0)
        return _predictor(x, t)

    res["inplace_x"] = _fault_result(lambda: fresh().evaluate(writes_x, xs.clone(), ts, {}))
    res["inplace_cond"] = _fault_result(lambda: fresh().evaluate(writes_cond, xs, ts, {"c": torch.zeros(2, 1)}))
    return res


@dataclasses.dataclass
class _Config:
    """A conditioning value holding a tensor in a dataclass (a model config; not a batch dimension, for evaluate)."""

    weights: torch.Tensor
    scale: float = 1.0


def _configured(x, t, cfg):
    return _predictor(x, t) * cfg.scale


def _scenario_last_step(rank, world):
    import torch.distributed as dist

    import driffusion_core as core
    import solvers
    from backends import DistributedExecutor, SerialExecutor
    from solvers.interop.kdiffusion import sample_driffusion

    def fresh():
        return DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)

    schedule = core.VPSchedule.linear()
    predictor = solvers.ring_mixture(4).predictor(schedule, "epsilon")
    grid = schedule.timesteps(8, spacing="trailing")  # the last step goes from 124 to -1
    x = core.NoiseSource(1).initial((3, 2))
    res = {}
    ex = fresh()
    for key, sched in (("drafts", core.DraftRefineScheduler(solvers.DDIMSkip(schedule), grid, width=3)),
                       ("picard", solvers.PicardScheduler(solvers.DDIMSkip(schedule), grid, width=3, tolerance=1e-3))):
        res[key] = (sched.sample(predictor, x, executor=ex).x, sched.sample(predictor, x, executor=SerialExecutor()).x)
    denoiser = lambda x, sigma: x / (1 + sigma[:, None] ** 2)  # noqa: E731
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.0])
    res["kdiffusion"] = (sample_driffusion(denoiser, x * 10, sigmas, width=2, executor=ex, disable=True),
                         sample_driffusion(denoiser, x * 10, sigmas, width=2, disable=True))
    counted, all_gather = [0], dist.all_gather

    def counting_all_gather(*args, **kwargs):
        counted[0] += 1
        return all_gather(*args, **kwargs)

    dist.all_gather = counting_all_gather
    try:
        ex.finish(x)
    finally:
        dist.all_gather = all_gather
    res["finish_gathers"] = counted[0]
    # rank 1's grid differs in its last t_to only; then rank 1's schedule in its final_alpha_cumprod only
    t_to = grid.t_to.clone()
    if rank == 1:
        t_to[-1] = 0.0
    cases = {
        "t_to": (solvers.DDIMSkip(schedule), core.TimeGrid(grid.t_from, t_to, grid.model_times, grid.kind)),
        # rank 1 as diffusers' set_alpha_to_one=False (alphas_cumprod[0]), rank 0 with set_alpha_to_one=True (1)
        "final_alpha_cumprod": (solvers.DDIMSkip(core.VPSchedule(
            schedule.alphas_cumprod, float(schedule.alphas_cumprod[0]) if rank == 1 else 1.0)), grid),
    }
    for name, (tr, g) in cases.items():
        e = fresh()
        sched = core.DraftRefineScheduler(tr, g, width=2)
        res[name] = _fault_result(lambda: sched.sample(predictor, x, executor=e))
        again = _fault_result(lambda: sched.sample(predictor, x, executor=e))
        res[name + "_after"] = again["error_type"] == "ExecutorError" and "earlier round failed" in again["message"]
    # rank 0 finishes while rank 1 evaluates another round
    e = fresh()
    if rank == 0:
        res["out_of_step"] = _fault_result(lambda: e.finish(x))
    else:
        res["out_of_step"] = _fault_result(lambda: e.evaluate(_predictor, x[None], torch.zeros(1, 3)))
    return res


def _scenario_interrupt(rank, world, kind):
    from backends import DistributedExecutor

    ex = DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE)
    xs, ts = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3)), torch.zeros(2, 3)
    ex.evaluate(_predictor, xs, ts)

    def interrupted(x, t):
        if rank == 1:
            raise KeyboardInterrupt() if kind == "KeyboardInterrupt" else SystemExit(3)
        return x

    res = {"caught": None}
    try:
        res.update(_fault_result(lambda: ex.evaluate(interrupted, xs, ts)))
    except (KeyboardInterrupt, SystemExit) as e:
        res["caught"] = type(e).__name__
    res["again"] = _fault_result(lambda: ex.evaluate(_predictor, xs, ts))
    return res


def _scenario_setup_dies(rank, world):
    from backends import DistributedExecutor

    if rank == 1:
        os._exit(17)
    return _fault_result(lambda: DistributedExecutor(timeout=TIMEOUT, diagnose_timeout=DIAGNOSE))


def _e2e_nccl(rank, world):
    """DDPM, DDIM (eta = 0.5) and flow through DistributedExecutor over nccl: states on this rank's GPU
    (cuda:LOCAL_RANK), the predictions exchanged over nccl and the status over the automatic gloo side group."""
    import torch.distributed as dist

    assert dist.get_backend() == "nccl"
    runs = {}
    for family in ("ddpm", "ddim", "flow"):
        out = _e2e(family, torch.device("cuda", rank))
        runs.update({f"{family}-{key}": run for key, run in out["runs"].items()})
    torch.cuda.synchronize(rank)
    return {"runs": runs, "describe": out["describe"], "device": out["device"]}


def _e2e(family, device=None):
    """Both modes, widths 2 and 3, through DistributedExecutor and SerialExecutor on ``device`` (the inputs'
    device by default: the CPU); samples come back on the CPU, with the device they were made on."""
    import driffusion_core as core
    import solvers
    from backends import DistributedExecutor, SerialExecutor

    mixture = solvers.ring_mixture(4)
    if family == "flow":
        schedule = core.FlowSchedule()
        transition = solvers.FlowEulerSkip(schedule)
        predictor = mixture.predictor(schedule, "velocity")
    else:
        schedule = core.VPSchedule.linear()
        transition = {"ddpm": solvers.DDPMSkip(schedule), "ddim": solvers.DDIMSkip(schedule, eta=0.5),
                      "dpm": solvers.DPMSolverSkip(schedule)}[family]  # dpm: the multistep 2M
        predictor = mixture.predictor(schedule, "epsilon")
    grid = schedule.timesteps(10)
    calls, ks = [0], []

    def counted(x, t):
        calls[0] += 1
        return predictor(x, t)

    runs = {}
    for anchor in ("local", "shared"):
        ex = DistributedExecutor(timeout=20, anchor=anchor)
        evaluate = ex.evaluate

        def counting_evaluate(pred, xs, ts, cond=None, evaluate=evaluate):  # the drafts of each round
            ks.append(xs.shape[0])
            return evaluate(pred, xs, ts, cond)

        ex.evaluate = counting_evaluate
        for mode in ("aggressive", "conservative"):
            for width in (2, 3):
                sched = core.DraftRefineScheduler(transition, grid, width=width, mode=mode)
                x = core.NoiseSource(123).initial((6, 2), device=device)
                calls[0], ks[:] = 0, []
                got = sched.sample(counted, x, executor=ex, noise=core.NoiseSource(7))
                mine, one_draft_rounds = calls[0], ks.count(1)
                ref = sched.sample(predictor, x, executor=SerialExecutor(), noise=core.NoiseSource(7))
                runs[f"{anchor}-{mode}-n{width}"] = {
                    "x": got.x.cpu(), "x_serial": ref.x.cpu(), "device": str(got.x.device), "rounds": got.rounds,
                    "rounds_serial": ref.rounds, "evals": got.evals, "evals_serial": ref.evals, "calls": mine,
                    "one_draft_rounds": one_draft_rounds,
                }
        if anchor == "local":
            described = ex.describe(3)
        rank_device = str(ex.device)
        ex.close()  # with nccl, the gloo side group it made
    return {"runs": runs, "describe": described, "device": rank_device}


SCENARIOS = {
    "basic": _scenario_basic,
    "subgroup_raise": _scenario_subgroup_raise,
    "three": _scenario_three,
    "odd_outputs": _scenario_odd_outputs,
    "raise": _scenario_raise,
    "die0": lambda rank, world: _scenario_die(rank, world, dying=0),
    "die1": lambda rank, world: _scenario_die(rank, world, dying=1),
    "die2": lambda rank, world: _scenario_die(rank, world, dying=2),
    "hang": _scenario_hang,
    "stall_predictions": _scenario_stall_predictions,
    "mismatch": _scenario_mismatch,
    "rank_shapes": _scenario_rank_shapes,
    **{f"diverge_{w}": (lambda w: lambda rank, world: _scenario_diverge(rank, world, w))(w)
       for w in ("dtype", "k", "shape", "one_draft")},
    "values_start": lambda rank, world: _scenario_values(rank, world, "start"),
    "values_noise": lambda rank, world: _scenario_values(rank, world, "noise"),
    **{f"ulp_{m}_{a}": (lambda m, a: lambda rank, world: _scenario_ulp(rank, world, m, a))(m, a)
       for m in ("aggressive", "conservative") for a in ("local", "shared")},
    "anchor_mismatch": _scenario_anchor_mismatch,
    **{f"raise_anchor_{m}_{a}": (lambda m, a: lambda rank, world: _scenario_raise_anchor(rank, world, m, a))(m, a)
       for m in ("aggressive", "conservative") for a in ("local", "shared")},
    "cond_values": _scenario_cond_values,
    "device_setup": _scenario_device_setup,
    "local_failures": _scenario_local_failures,
    "hidden_values": _scenario_hidden_values,
    "last_step": _scenario_last_step,
    "interrupt_KeyboardInterrupt": lambda rank, world: _scenario_interrupt(rank, world, "KeyboardInterrupt"),
    "interrupt_SystemExit": lambda rank, world: _scenario_interrupt(rank, world, "SystemExit"),
    "hang3": lambda rank, world: _scenario_hang(rank, world, hung=2, timeout=HANG3_TIMEOUT, diagnose=HANG3_DIAGNOSE),
    "setup_dies": _scenario_setup_dies,
    "pg_timeout_round": _scenario_pg_timeout_round,
    "pg_timeout_setup": _scenario_pg_timeout_setup,
    "nccl_e2e": _e2e_nccl,
    "grad_models": _scenario_grad_models,
    "e2e_ddpm": lambda rank, world: _e2e("ddpm"),
    "e2e_ddim": lambda rank, world: _e2e("ddim"),
    "e2e_flow": lambda rank, world: _e2e("flow"),
    "e2e_dpm": lambda rank, world: _e2e("dpm"),
}


def _child_main(argv):
    scenario, rank, world, port, outdir, use_env = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4], argv[5] == "1"
    _init(rank, world, port, use_env, backend="nccl" if scenario.startswith("nccl") else "gloo",
          timeout=PG_TIMEOUTS.get(scenario, 30.0))
    result = SCENARIOS[scenario](rank, world)
    torch.save(result, Path(outdir) / f"rank{rank}.pt")
    sys.stdout.flush()
    if scenario in ("stall_predictions", "hang3", "setup_dies") and rank in (0, 1):
        os._exit(0)  # a rank is still asleep (in its predictor, or before its exchange) or dead; nothing to tear down
    # "hang" and the pg_timeout scenarios tear down and exit normally after a fault (no abort at exit)
    if scenario not in ("die0", "die1", "die2", "stall_predictions"):
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    _child_main(sys.argv[1:])


@pytest.mark.parametrize("devices, shown", [
    (["inputs", "inputs"], "device per rank: the inputs' device,"),
    (["cuda:0", "cuda:0", "cuda:0"], "device per rank: cuda:0,"),
    (["cuda:0", "inputs", "cuda:1"], "device per rank: rank 0: cuda:0, rank 1: the inputs' device, rank 2: cuda:1,"),
])
def test_describe_names_each_ranks_device(devices, shown):
    """One device for all ranks is named once; mixed settings are listed per rank, in words ("the inputs'
    device" for ranks that compute where the inputs are), never as bare "1:inputs"."""
    from backends.distributed import DistributedExecutor

    ex = object.__new__(DistributedExecutor)  # describe() reads only what the handshake gathered
    ex.world_size, ex.backend, ex.timeout, ex._max_k, ex.anchor = len(devices), "gloo", 30.0, 0, "local"
    ex._hosts, ex._devices = ["h"] * len(devices), devices
    text = ex.describe()
    assert shown in text, text
    assert ":inputs" not in text and f"world_size={len(devices)}" in text


@pytest.mark.parametrize("bad", [["--width", "0"], ["--timeout", "0"]])
def test_the_distributed_example_refuses_bad_numbers_before_any_process_group(bad):
    """examples/distributed_sample.py names a bad count at once (argparse, exit status 2), before it joins a
    process group (width 0 used to be taken as the world size)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "distributed_sample.py"
    proc = subprocess.run([sys.executable, str(example), *bad], capture_output=True, text=True, timeout=60,
                          cwd=example.parents[1])
    assert proc.returncode == 2 and bad[0] in proc.stderr, proc.stderr[-500:]

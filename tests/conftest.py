"""Shared pytest configuration (the markers are declared in pyproject.toml).

Hypothesis runs derandomized by default, so `make test` (and CI) is reproducible: the same examples
on every run. `HYPOTHESIS_PROFILE=explore make test` draws fresh examples each run, to hunt for
new counterexamples.

`python -m proofs` (a minute of sympy, one process) is started in the background as soon as collection
has selected a test of tests/test_proofs.py, at low priority, so it runs on the core the single-threaded
tests leave idle; test_proofs' fixture then waits for it (:func:`proofs_run`).
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import settings

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_sessionstart(session):
    # Small tensors: one thread is faster and immune to a loaded machine (2 cores in CI).
    import torch

    torch.set_num_threads(1)


ROOT = Path(__file__).resolve().parents[1]
_PROOFS = {}  # the background `python -m proofs`: process, JSON path, output files


def pytest_collection_finish(session):
    if _PROOFS or not any(Path(str(item.fspath)).name == "test_proofs.py" for item in session.items):
        return
    folder = Path(tempfile.mkdtemp(prefix="driffusion-proofs-"))
    out, err = open(folder / "stdout.txt", "w"), open(folder / "stderr.txt", "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    nice = (lambda: os.nice(10)) if hasattr(os, "nice") else None
    proc = subprocess.Popen([sys.executable, "-m", "proofs", "--json", str(folder / "results.json")], cwd=ROOT,
                            env=env, stdout=out, stderr=err, text=True, preexec_fn=nice)
    _PROOFS.update(proc=proc, folder=folder, files=(out, err))


def proofs_run(timeout: float = 600.0):
    """``(returncode, stdout, stderr, results.json path)`` of `python -m proofs`: the background run when one was
    started, else a run made now."""
    proc = _PROOFS.get("proc")
    if proc is None:  # collection did not start it (e.g. the module imported some other way): run it now
        folder = Path(tempfile.mkdtemp(prefix="driffusion-proofs-"))
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run([sys.executable, "-m", "proofs", "--json", str(folder / "results.json")], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout, done.stderr, folder / "results.json"
    proc.wait(timeout=timeout)
    for f in _PROOFS["files"]:
        f.close()
    folder = _PROOFS["folder"]
    return (proc.returncode, (folder / "stdout.txt").read_text(), (folder / "stderr.txt").read_text(),
            folder / "results.json")


def pytest_sessionfinish(session, exitstatus):
    proc = _PROOFS.get("proc")
    if proc is not None and proc.poll() is None:  # the proofs tests were deselected or the run stopped early
        proc.kill()
        proc.wait()

#!/usr/bin/env bash
# The prepared run for a lent GPU machine (one call of the `device` tool, at most 8 minutes):
#   the GPU tests (tests marked gpu: StreamExecutor in tests/test_streams.py; the samplers, executors,
#   Picard, CUDA timesteps, inference mode and autocast on CUDA in tests/test_cuda.py; DistributedExecutor
#   over nccl in tests/test_distributed.py), the CPU suites of the scheduler and executors on the same
#   machine, then the GPU latency table. It uses the machine's own CUDA build of torch (no venv: `make setup`
#   would install the CPU build; that image already has pytest, hypothesis, sympy and tqdm, but not
#   diffusers, so the diffusers UNet row is left out unless diffusers is carried as wheels in .whl/, which
#   this script installs), and writes everything under ${OUT:-benchmarks/results/gpu}.
#
#   here:       python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata
#   device run: bash benchmarks/gpu_check.sh   with carry [".whl"]   (timeout_s 480 leaves time for one rerun)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee "$out/nvidia_smi.txt"
# the GPU tests, the latency table, then the rest of the suite on this machine's torch (pytest-xdist)
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$out/pytest_gpu.txt"
timeout 180 python3 -m benchmarks.gpu_latency --device cuda --repeats 7 --out "$out" 2>&1 | tail -60
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 -m "not gpu" tests/ > "$out/pytest_rest.txt" 2>&1
tail -25 "$out/pytest_rest.txt"

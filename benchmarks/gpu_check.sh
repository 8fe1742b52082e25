#!/usr/bin/env bash
# The prepared run for a lent GPU machine (one call of the `device` tool, at most 8 minutes):
#   the GPU tests (tests marked gpu: StreamExecutor in tests/test_streams.py; the samplers, executors,
#   Picard, CUDA timesteps, inference mode and autocast on CUDA in tests/test_cuda.py; DistributedExecutor
#   over nccl in tests/test_distributed.py), the GPU latency table, then the rest of the suite on the same
#   machine (pytest-xdist, 14 workers). It uses the machine's own CUDA build of torch (no venv: `make setup`
#   would install the CPU build; that image already has pytest, hypothesis, sympy and tqdm, but not
#   diffusers, so the diffusers UNet row is left out unless diffusers is carried as wheels in .whl/, which
#   this script installs), and writes everything under ${OUT:-benchmarks/results/gpu}.
#
#   here:       python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata
#   device run: bash benchmarks/gpu_check.sh   with carry [".whl"]   (timeout_s 540: its parts stop by 480 s)
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
# (the H200 took 20 s, about 100 s and 130 s; the rest of the suite names each test as it ends (-v), so a run
# cut at its timeout still shows what passed and failed)
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$out/pytest_gpu.txt"
timeout 150 python3 -m benchmarks.gpu_latency --device cuda --repeats 7 --out "$out" 2>&1 | tail -60
timeout 240 python3 -m pytest -v -p no:cacheprovider -n 14 -m "not gpu" --tb=short tests/ > "$out/pytest_rest.txt" 2>&1
grep -E "FAILED|ERROR" "$out/pytest_rest.txt" | head -20; tail -3 "$out/pytest_rest.txt"

#!/usr/bin/env bash
# The prepared run for a lent GPU machine (one call of the `device` tool, about 5 minutes):
#   the GPU tests (tests marked gpu: StreamExecutor in tests/test_streams.py; the samplers, executors,
#   Picard, CUDA timesteps, inference mode and autocast on CUDA in tests/test_cuda.py), the CPU suites of
#   the scheduler and executors on the same machine, then the GPU latency table. It uses the machine's own CUDA build of torch (no venv: `make setup` would install the
#   CPU build; that image already has pytest, hypothesis, sympy and tqdm, but not diffusers, so the
#   diffusers UNet row is left out unless diffusers is carried as a wheel), and writes everything
#   under ${OUT:-benchmarks/results/gpu}.
#
#   device run: bash benchmarks/gpu_check.sh          (timeout_s 480 leaves time for one rerun)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee "$out/nvidia_smi.txt"
# the GPU tests, then the executor and scheduler tests on the same machine
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$out/pytest_gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_scheduler.py tests/test_errors.py 2>&1 | tail -3 | tee -a "$out/pytest_gpu.txt"
timeout 240 python3 -m benchmarks.gpu_latency --device cuda --repeats 7 --out "$out" 2>&1 | tail -60

#!/usr/bin/env bash
# The GPU check in one command (docs/kernels.md), for a machine with a CUDA GPU, from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. pip install -r requirements.txt
# 2. the GPU tests: every tier against the reference loop on CUDA, autocast, the experiments' sizes
#    without falling back (tests/kernels/test_gpu_tiers.py)
# 3. python -m lem.tools.bench kernels --devices cuda: every configuration; the reference loop, each GPU tier
#    and nn.LSTM (cuDNN); fwd+bwd and fwd; peak memory
# 4. three epochs of fitzhugh_nagumo/train.py on CUDA
# Everything it prints goes to $OUT/gpu_check.log ($OUT if set, else gpu_check_out/), the bench
# table also to $OUT/bench_cuda.md, the training run to $OUT/fhn/. Exits non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

step() { echo; echo "== $* ($(date -u +%H:%M:%S) UTC)"; }

step "pip install -r requirements.txt"
python -m pip install -q -r requirements.txt
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
git log -1 --format='commit %h %s' || true

step "GPU tests"
python -m pytest -q -p no:cacheprovider tests/kernels/test_gpu_tiers.py

step "python -m lem.tools.bench kernels --devices cuda"
python -m lem.tools.bench kernels --devices cuda --repeats 3 --budget 20 | tee "$OUT/bench_cuda.md"

step "fitzhugh_nagumo/train.py --epochs 3 --device cuda"
python fitzhugh_nagumo/train.py --epochs 3 --device cuda --out-dir "$OUT/fhn" --data-dir "$OUT/fhn_data"

step "done"

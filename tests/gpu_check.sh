#!/usr/bin/env bash
# The prepared GPU check: run once on a CUDA machine, it prints every GPU figure the README quotes.
#   bash tests/gpu_check.sh [out_dir]      (about 8 minutes on one H100)
# 1. the CUDA-only tests (CUDA-graph decoding == eager decoding, token for token)
# 2. the sampler benchmark, eager / static / CUDA graph / naive / HF generate, default model size
# 3. the same at the --preset=gpu model size, and training throughput at both sizes
# 4. the full reproduction with --preset=gpu
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-out-gpu}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python -m pytest -q -x tests/test_sample.py -k cuda -p no:cacheprovider
python tests/bench.py --what=sample --rounds=5
python tests/bench.py --what=train --rounds=5
python tests/bench.py --what=sample --rounds=5 --n_layer=6 --n_embd=256 --n_head=8
python tests/bench.py --what=train --rounds=5 --n_layer=6 --n_embd=256 --n_head=8
/usr/bin/time -f "full reproduction wall %e s" python train.py --preset=gpu --out_dir="$out"
cat "$out/report.md"

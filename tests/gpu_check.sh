#!/usr/bin/env bash
# The prepared GPU check: run once on a CUDA machine, it prints every GPU figure the README quotes.
#   bash tests/gpu_check.sh [out_dir] [seconds]     (default: out-gpu, 540)
# Each part gets a time limit, and no part starts past the deadline, so a short lease still brings
# back the figures measured so far. Every part has been measured on an H100 (README, CUDA); in order:
# 1. the CUDA-only test (CUDA-graph decoding == static decoding, token for token)
# 2. real (variable-length) --preset=gpu pretraining steps: the preset's 2 micro-batches a step
#    (--pt_max_pad=100), then the CPU rule's 13 (--pt_max_pad=1.2): the GPU pays per kernel launch
# 3. the full reproduction with --preset=gpu and three RL seeds, leaving 150 s for what follows;
#    a few greedy answers of its checkpoints (the length-penalty control, packed and alone)
# 4. a short torchrun run on one GPU (the NCCL path)
# 5. an evaluation batch decoded eagerly (rows dropped / kept) and by the CUDA graph; at the default
#    size, then at the --preset=gpu size: the sampler benchmark, training throughput; one BCR step;
#    compiled pretraining (a cold compile cache takes minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-out-gpu}
budget=${2:-540}
py=${PYTHON:-$(command -v python3 || command -v python)}  # on the GPU image, python3 holds torch
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20  # fewer progress-bar lines in the log

part() {  # part LIMIT_S CMD...: run CMD for at most LIMIT_S seconds, and never past the deadline
    local limit=$1 left=$((budget - SECONDS))
    shift
    ((limit > left)) && limit=$left
    if ((limit < 20)); then echo "== skipped, out of time: $*"; return; fi
    echo "== $* (limit ${limit} s, at ${SECONDS} s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "== exit $? after $((SECONDS - t0)) s"
}

gpu="--preset=gpu --n_layer=6 --n_embd=256 --n_head=8"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, transformers; print('torch', torch.__version__, torch.cuda.get_device_name(), 'transformers', transformers.__version__)"
part 60 $py -m pytest -q -s -x tests/test_sample.py -k cuda -p no:cacheprovider
part 45 $py tests/bench.py --what=pretrain --rounds=10 $gpu
part 45 $py tests/bench.py --what=pretrain --rounds=10 $gpu --pt_max_pad=1.2
part $((budget - SECONDS - 150)) $py train.py --preset=gpu --out_dir="$out" --seeds=3
for ckpt in lenpen-s1 lenpen-s2 bcr-s1; do  # on an H100, two of three length-penalty seeds collapsed
    for probs in "47+85" "47+85, 52-17"; do
        part 30 $py sample.py --ckpt="$out/$ckpt" --problems="$probs" --temperature=0
    done
done
part 60 $py -m torch.distributed.run --standalone --nproc_per_node=1 train.py --out_dir="$out-torchrun" \
    --pt_steps=60 --rl_steps=4 --eval_problems=64 --eval_Ns=1,2
part 60 $py tests/bench.py --what=eval --rounds=3 --ckpt="$out/base" --preset=gpu
part 60 $py tests/bench.py --what=sample --rounds=5
part 45 $py tests/bench.py --what=train --rounds=5
part 60 $py tests/bench.py --what=sample --rounds=5 $gpu
part 45 $py tests/bench.py --what=train --rounds=5 $gpu
part 45 $py tests/bench.py --what=rl --rounds=5
part 150 $py tests/bench.py --what=pretrain --rounds=10 $gpu --compile
cat "$out/report.md" 2>/dev/null
echo "gpu_check done at ${SECONDS} s"

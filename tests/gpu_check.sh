#!/usr/bin/env bash
# The prepared GPU check: run once on a CUDA machine, it prints every GPU figure the README quotes.
#   bash tests/gpu_check.sh [out_dir] [seconds]     (default: out-gpu, 540)
# Each part gets a time limit, and no part starts past the deadline, so a short lease still brings
# back the figures measured so far. In order:
# 1. the CUDA-only test (CUDA-graph decoding == static decoding, token for token)
# 2. the sampler benchmark (eager / static / CUDA graph / naive / HF generate), training throughput
#    and one BCR step at the default size; sampler and training at the --preset=gpu size
# 3. real (variable-length) --preset=gpu pretraining steps, which the fixed-shape bench cannot see:
#    the pretrain bench with a profile, then 60 steps eager and 60 with torch.compile
# 4. the full reproduction with --preset=gpu (one seed)
# 5. two more seeds of the reproduction, if time is left
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

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, transformers; print('torch', torch.__version__, torch.cuda.get_device_name(), 'transformers', transformers.__version__)"
part 90 $py -m pytest -q -s -x tests/test_sample.py -k cuda -p no:cacheprovider
part 90 $py tests/bench.py --what=sample --rounds=5
part 60 $py tests/bench.py --what=train --rounds=5
part 60 $py tests/bench.py --what=rl --rounds=5
part 90 $py tests/bench.py --what=sample --rounds=5 --n_layer=6 --n_embd=256 --n_head=8
part 60 $py tests/bench.py --what=train --rounds=5 --n_layer=6 --n_embd=256 --n_head=8
part 90 $py tests/bench.py --what=pretrain --rounds=10 --preset=gpu --n_layer=6 --n_embd=256 --n_head=8 --profile
part 120 $py train.py --preset=gpu --stage=pretrain --pt_steps=60 --out_dir=/tmp/eager
part 180 $py train.py --preset=gpu --stage=pretrain --pt_steps=60 --out_dir=/tmp/compiled --compile=1
for f in /tmp/eager/base.jsonl /tmp/compiled/base.jsonl; do  # median tokens/s over steps 20..59
    [ -f $f ] && $py -c "import json, statistics, sys; r = [json.loads(x) for x in open(sys.argv[1])][20:]
m = lambda k: statistics.median(x[k] for x in r)
print(sys.argv[1], 'median pretraining tokens/s %.0f, step %.3f s, data %.3f s, %.0f micro-batches'
      % (m('tokens_per_s'), m('t_step'), m('t_data'), m('micro_batches')))" $f
done
part 9999 $py train.py --preset=gpu --out_dir="$out"
cat "$out/report.md" 2>/dev/null && cp "$out/report.md" "$out/report-1seed.md"
part 9999 $py train.py --preset=gpu --out_dir="$out" --seeds=3
[ -f "$out/report.md" ] && grep -A6 "^## Findings" "$out/report.md"
echo "gpu_check done at ${SECONDS} s"

#!/usr/bin/env bash
# The prepared GPU check: run once on a CUDA machine, it brings back the ablation table.
#   bash tests/gpu_check.sh [out_dir] [seconds]     (default: out/gpu, 540)
# The out dir may hold a CPU-made base (out/gpu/base): the ablations then train every variant on
# that same base, three seeds each; then, with what time is left, the main report's three seeds.
# Each part gets a time limit and no part starts past the deadline, so a short lease still brings
# back what was measured; with $OUT set, the tables and every run's evaluation are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
budget=${2:-540}
py=${PYTHON:-$(command -v python3 || command -v python)}  # on the GPU image, python3 holds torch
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30  # fewer progress-bar lines in the log

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

nvidia-smi -L
"$py" -c "import torch, tokenizers, safetensors, tqdm; print('torch', torch.__version__, torch.cuda.get_device_name())"
part 400 "$py" train.py --stage=ablations --seeds=3 --out_dir="$out"
part 300 "$py" train.py --seeds=3 --out_dir="$out"
if [ -n "${OUT:-}" ]; then
    cp "$out"/ablations.* "$out"/report.* "$OUT"/ 2>/dev/null
    tar czf "$OUT/runs.tgz" "$out"/*/eval.json "$out"/*.jsonl 2>/dev/null
fi
echo "== done at ${SECONDS} s"

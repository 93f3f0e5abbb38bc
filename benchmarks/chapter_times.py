"""Time every chapter's solution notebook, top to bottom, in quick and/or full mode.

Prints one JSON line per run: chapter, mode, seconds, device, and whether it succeeded.
Usage:  python benchmarks/chapter_times.py [--chapter ch01] [--mode quick|full|both] [--save DIR]
--save keeps each executed notebook (outputs included) as DIR/<chapter>-<mode>.ipynb, to read the
figures a chapter's prose quotes.
The numbers go into each chapter's first cell and README's chapter table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import nbformat
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grader.course import list_chapters  # noqa: E402
from grader.kernel_client import notebook_client  # noqa: E402 - polls in short slices


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def run(chapter: str, quick: bool, timeout: int, save: Path | None = None) -> dict:
    path = REPO / "solutions" / chapter / f"{chapter}.ipynb"
    nb = nbformat.read(path, as_version=4)
    os.environ["COURSE_QUICK"] = "1" if quick else "0"
    os.environ.setdefault("MPLBACKEND", "Agg")
    client = notebook_client(nb, timeout=timeout, kernel_name="python3",
                             resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    error = ""
    try:
        client.execute()
    except CellExecutionError as exc:
        error = str(exc).strip().splitlines()[-1][:300]
    seconds = time.perf_counter() - start
    if save is not None:  # kept even when a cell failed: the outputs show where and why
        save.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(save / f"{chapter}-{'quick' if quick else 'full'}.ipynb"))
    return {"chapter": chapter, "mode": "quick" if quick else "full", "seconds": round(seconds, 1),
            "ok": not error, "error": error, "device": device_name(),
            "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chapter", action="append", help="e.g. ch01 (default: all)")
    parser.add_argument("--mode", choices=["quick", "full", "both"], default="both")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--save", type=Path, help="folder for the executed notebooks")
    args = parser.parse_args()
    chapters = list_chapters(REPO)
    if args.chapter:
        chapters = [c for c in chapters if any(c.startswith(k) for k in args.chapter)]
    modes = {"quick": [True], "full": [False], "both": [True, False]}[args.mode]
    failed = False
    for chapter in chapters:
        for quick in modes:
            record = run(chapter, quick, args.timeout, args.save)
            failed |= not record["ok"]
            print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""nbgrader preprocessors the course adds to autograding."""

from __future__ import annotations

import os
from pathlib import Path

from nbformat.notebooknode import NotebookNode
from nbformat.v4 import new_code_cell
from nbgrader.preprocessors import NbGraderPreprocessor


class StderrIsNotAFailure(NbGraderPreprocessor):
    """Keep text a cell wrote to stderr, but as stdout, so it cannot cost points.

    nbgrader scores a test cell 0 when it printed *anything* on stderr, so a harmless PyTorch
    ``UserWarning`` or a tqdm progress bar would fail an honest student. Exceptions are
    ``error`` outputs, not stderr, and still fail the cell. Runs right after execution.
    """

    def preprocess_cell(self, cell: NotebookNode, resources: dict, index: int):
        if cell.cell_type == "code":
            for output in cell.get("outputs", []):
                if output.get("output_type") == "stream" and output.get("name") == "stderr":
                    output["name"] = "stdout"
                    output["text"] = "".join(
                        f"[stderr] {line}" for line in output.get("text", "").splitlines(True)
                    )
        return cell, resources


class AppendTrustedChecks(NbGraderPreprocessor):
    """Append the grader's trusted-check cell (grader/probes.py) before the notebook runs.

    The cell's source comes from the file named by ``N2L_TRUSTED_CELL``, written by the grader
    for this submission only (it holds that submission's secret inputs). Without the variable
    (e.g. ``nbgrader autograde`` run by hand) nothing is added.
    """

    def preprocess(self, nb: NotebookNode, resources: dict):
        path = os.environ.get("N2L_TRUSTED_CELL")
        if path:
            nb.cells.append(new_code_cell(Path(path).read_text()))
        return nb, resources

"""nbgrader preprocessors the course adds to autograding."""

from __future__ import annotations

from nbformat.notebooknode import NotebookNode
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

"""The instructor's side of Neurons to LLMs: build the release, take in submissions, grade, report.

Built on nbgrader. Commands (``python -m grader --help``):

- ``release``   regenerate ``chapters/`` from ``solutions/``; ``--check`` fails when they drift.
- ``autograde`` grade a folder or .zip of submitted notebooks in a workspace outside the repo.
- ``report``    grades CSV, feedback HTML per student (hidden tests removed), pass-rate summary.
"""


class GraderError(Exception):
    """A problem the user can fix; the CLI prints the message (no traceback) and exits non-zero."""

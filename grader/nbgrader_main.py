"""nbgrader, started faster: ``python -m grader.nbgrader_main ARGS`` is ``nbgrader ARGS``, and
:func:`run_forked` is the same run in a process forked from one that already imported nbgrader.

The grader runs nbgrader once per submission. Three start-up costs buy nothing there (measured on
2 cores):

- importing nbgrader, nbconvert, nbclient and jupyter_client (about 1 s): the autograder forks
  every run from a server process that imported them once per batch (``multiprocessing``'s
  forkserver, :data:`PRELOAD`), so each run is still a fresh process of its own;
- jsonschema optionally imports ``rfc3987_syntax``, which compiles a grammar (~3 s) only to check
  "iri" string formats that no notebook schema uses: we mark it absent, and jsonschema skips it;
- a new gradebook asks the ``alembic`` command for the schema version in a subprocess that
  imports nbgrader all over again (~5 s): we read the same head revision from nbgrader's
  migration scripts in this process.
"""

from __future__ import annotations

import os
import sys
import tempfile

# Before anything imports jsonschema (this module comes first in PRELOAD).
sys.modules.setdefault("rfc3987_syntax", None)

# What the forkserver imports once: nbgrader's app and everything an autograde run loads.
# (nbgraderapp brings nbconvert, nbclient, jupyter_client and the gradebook API with it.)
PRELOAD = ["grader.nbgrader_main", "nbgrader.apps.nbgraderapp", "grader.preprocessors",
           "grader.kernel_client", "alembic.script"]


def speed_up_nbgrader() -> None:
    """Skip the grammar (this module's import already did, when it came first) and the alembic
    subprocess (any time before the gradebook opens)."""
    sys.modules.setdefault("rfc3987_syntax", None)
    import nbgrader.api
    from alembic.script import ScriptDirectory
    from nbgrader.dbutil import ALEMBIC_DIR

    def alembic_head() -> str:
        return ScriptDirectory(ALEMBIC_DIR).get_current_head()

    nbgrader.api.get_alembic_version = alembic_head


def run_forked(argv: list[str], cwd: str, env: dict[str, str], log_path: str) -> None:
    """``nbgrader ARGV`` in this (freshly forked) process: in ``cwd``, with exactly ``env``, its
    output appended to ``log_path``, in a session of its own. Exits with nbgrader's exit code."""
    os.setsid()  # like start_new_session: the grader kills the group at the notebook time limit
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR differs per submission (the sandbox's runtime folder)
    speed_up_nbgrader()
    sys.argv = ["nbgrader", *argv]
    from nbgrader.apps.nbgraderapp import main

    try:
        main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    speed_up_nbgrader()
    from nbgrader.apps.nbgraderapp import main

    main()

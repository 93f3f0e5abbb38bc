"""Run nbgrader's command line (``python -m grader.nbgrader_main ARGS`` = ``nbgrader ARGS``).

One difference: jsonschema optionally imports ``rfc3987_syntax``, which compiles a grammar for
about 3 seconds at import time only to validate "iri" string formats — a format no notebook
schema uses. The grader starts nbgrader once per submission, so we mark that optional module as
absent (jsonschema then skips that one format check) and save those seconds every time.
"""

import sys

sys.modules.setdefault("rfc3987_syntax", None)

from nbgrader.apps.nbgraderapp import main  # noqa: E402

if __name__ == "__main__":
    main()

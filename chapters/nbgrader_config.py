"""nbgrader settings for students: JupyterLab's Validate button reads this file (the server's
working directory is this folder when started with `make lab`)."""

c = get_config()  # noqa: F821

# Validate runs the whole notebook. nbgrader's default is 30 s per cell, but a full-mode training
# cell on a laptop CPU can take minutes; the instructor's grader sets its own limits.
c.Execute.timeout = 600

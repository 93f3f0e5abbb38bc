"""nbgrader settings for students: JupyterLab's Validate button reads this file (the server's
working directory is this folder when started with `make lab`)."""

c = get_config()  # noqa: F821

# Validate runs the whole notebook in a fresh kernel. nbgrader's default of 30 s per cell is too
# short for a full-mode training cell on a slow laptop; 5 minutes is ample for every chapter so far
# (the slowest whole notebook takes about a minute on 2 cores), and a cell that never ends still
# gets a clear timeout in the dialog. The instructor's grader sets its own limits.
c.Execute.timeout = 300

# nbclient can sleep through a kernel reply until that limit ends, with JupyterLab frozen meanwhile
# (after cells with many widgets); polling in short slices prevents it. See grader/kernel_client.py.
# (nbgrader's server extension merges this file into JupyterLab's own settings, so the notebooks'
# kernels get the same client: a subclass that only changes how long each poll lasts.)
c.AsyncKernelManager.client_class = "grader.kernel_client.SlicedPollKernelClient"

"""An instructor's Jupyter server on the class hub: every nbgrader extension (the formgrader, the
course list, create assignment, the assignment list and Validate). Found through
JUPYTER_CONFIG_PATH (scripts/classroom/jupyterhub_config.py)."""

c = get_config()  # noqa: F821
c.ServerApp.jpserver_extensions.update({
    "nbgrader.server_extensions.formgrader": True,
    "nbgrader.server_extensions.course_list": True,
    "nbgrader.server_extensions.assignment_list": True,
    "nbgrader.server_extensions.validate_assignment": True,
})
# No news prompt, no update check (nothing downloads while the course runs).
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"

"""A student's Jupyter server (the class hub's students, and `make lab`): nbgrader's assignment
list (Fetch, Submit, feedback) and Validate, none of its instructor tools. Found through
JUPYTER_CONFIG_PATH; this file's settings win over the venv's etc/jupyter, which enables every
nbgrader extension. Hiding is for clarity, not security: what students may read is decided by
file permissions (docs/classroom.md)."""

c = get_config()  # noqa: F821
c.ServerApp.jpserver_extensions.update({
    "nbgrader.server_extensions.formgrader": False,
    "nbgrader.server_extensions.course_list": False,
    "nbgrader.server_extensions.assignment_list": True,
    "nbgrader.server_extensions.validate_assignment": True,
})
# No news prompt, no update check (nothing downloads while the course runs).
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"

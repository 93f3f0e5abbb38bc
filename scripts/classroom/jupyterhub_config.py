"""JupyterHub for a class of the course on one server (docs/classroom.md).

Run as root in the hub's state folder, which holds ``classroom.json`` (written by
``python -m grader.classroom configure``, see scripts/classroom/setup.sh) and where the hub keeps
its database and cookie secret:

    cd /srv/n2l-classroom && COURSE/.venv/bin/jupyterhub -f COURSE/scripts/classroom/jupyterhub_config.py

(COURSE: the course's checkout; ``make classroom`` does this).

- Local Unix users, logging in with their passwords (PAM); each one's Jupyter server runs as that
  user (LocalProcessSpawner), from the course's venv (its Python is the notebooks' kernel), in
  their home folder.
- The hub's groups decide what each server shows: ``instructors`` get every nbgrader tool
  (formgrader, course list, create assignment), ``students`` the assignment list (Fetch, Submit,
  feedback) and Validate only. A user in neither group cannot start a server.
- The hub and configurable-http-proxy (npm, installed by scripts/install_system_deps.sh into
  build/node) listen where classroom.json says (127.0.0.1 by default; put TLS in front for a
  real class, e.g. a reverse proxy or ``c.JupyterHub.ssl_cert``).
"""

import json
import os
from pathlib import Path

c = get_config()  # noqa: F821

state = Path(os.getcwd())
settings = json.loads((state / "classroom.json").read_text())
repo, venv = Path(settings["repo"]), Path(settings["venv"])
instructors, students = list(settings["instructors"]), list(settings["students"])

c.JupyterHub.ip = settings.get("ip", "127.0.0.1")
c.JupyterHub.port = int(settings["port"])
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(settings["hub_port"])
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{int(settings['proxy_api_port'])}"
c.ConfigurableHTTPProxy.command = [settings["proxy_command"]]
c.ConfigurableHTTPProxy.pid_file = str(state / "jupyterhub-proxy.pid")
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.JupyterHub.cleanup_servers = True  # stopping the hub stops every user's server

# Users: local accounts (scripts/classroom/setup.sh makes them), the class list only.
c.JupyterHub.authenticator_class = "jupyterhub.auth.PAMAuthenticator"
c.PAMAuthenticator.open_sessions = False  # no login sessions: servers are plain processes
c.Authenticator.allowed_users = set(instructors + students)
c.Authenticator.admin_users = set(settings.get("admins", []))
c.JupyterHub.load_groups = {"instructors": {"users": instructors}, "students": {"users": students}}

# Each user's server: the course venv's single-user server, run as that user, in their home.
c.JupyterHub.spawner_class = "jupyterhub.spawner.LocalProcessSpawner"
c.Spawner.cmd = [str(venv / "bin" / "jupyterhub-singleuser")]
c.Spawner.notebook_dir = "~"
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 120  # a busy 2-core server needs a while to import JupyterLab
c.Spawner.http_timeout = 120
c.Spawner.environment = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
                         **settings.get("environment", {})}


def role_config(spawner):
    """Point the server at its role's Jupyter and nbgrader settings, by the user's hub group."""
    groups = {group.name for group in spawner.user.groups}
    role = "instructor" if "instructors" in groups else "student" if "students" in groups else None
    if role is None:
        raise RuntimeError(f"{spawner.user.name} is in neither the instructors nor the students group")
    spawner.environment["JUPYTER_CONFIG_PATH"] = os.pathsep.join(
        [str(state / "jupyter" / role), str(repo / "scripts" / "classroom" / "jupyter" / role)])


c.Spawner.pre_spawn_hook = role_config

# An API token for automation (the loopback test): a service that may manage users, their
# servers and tokens. Absent from a normal class's settings.
if settings.get("api_token"):
    c.JupyterHub.services = [{"name": "classroom-admin", "api_token": settings["api_token"]}]
    c.JupyterHub.load_roles = [{
        "name": "classroom-admin", "services": ["classroom-admin"],
        "scopes": ["admin:users", "admin:servers", "tokens", "list:users", "read:users",
                   "access:servers", "read:groups"],
    }]

"""A JupyterLab server and a headless Chromium for the end-to-end tests.

The server runs on a free loopback port with its own Jupyter, IPython and matplotlib config dirs,
so a test never reads or writes the settings of the person running it, and in quick mode
(``COURSE_QUICK=1``). Only the extensions installed in the venv (ipywidgets, nbgrader) are found,
because Jupyter always looks in ``sys.prefix`` whatever the config dirs say.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Debian's chromium works with Playwright as it is; these flags keep it from phoning home or
# needing a sandbox (CI runs as root) and a large /dev/shm.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]

# JupyterLab user settings: no news or update pop-ups over the page, and every cell attached to
# the DOM (the default windowing leaves off-screen cells unrendered, so their outputs are absent).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def find_chromium() -> str | None:
    """The Chromium to drive: ``$CHROMIUM`` if set, else the first browser found on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LabServer:
    """``jupyter lab`` serving ``root`` until :meth:`stop`; talk to it with :meth:`api`."""

    def __init__(self, root: Path, home: Path, log_path: Path):
        self.root, self.home, self.log_path = root, home, log_path
        self.token = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self.url = ""

    def environment(self) -> dict[str, str]:
        dirs = {name: self.home / name.lower() for name in
                ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
                 "MPLCONFIGDIR")}
        for folder in dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        settings = dirs["JUPYTER_CONFIG_DIR"] / "lab" / "user-settings"
        for name, values in LAB_SETTINGS.items():
            (settings / name).parent.mkdir(parents=True, exist_ok=True)
            (settings / name).write_text(json.dumps(values))
        env = {**os.environ, **{k: str(v) for k, v in dirs.items()}, "COURSE_QUICK": "1"}
        # The test session may run with MPLBACKEND=Agg (tests/conftest.py sets it); a kernel with
        # Agg shows "<Figure ...>" instead of plots. Students' kernels use the inline backend.
        env.pop("MPLBACKEND", None)
        env.pop("JUPYTER_PATH", None)
        return env

    def start(self, timeout: float = 120) -> None:
        env = self.environment()
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
               f"--port={free_port()}", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--LabApp.expose_app_in_browser=True",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class="
               "jupyterlab.handlers.announcements.NeverCheckForUpdate"]
        if os.getuid() == 0:
            cmd.append("--allow-root")
        self._log = open(self.log_path, "w")  # closed in stop(), after the server exits
        self.process = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        # The server writes its real address (it moves on if the port was taken meanwhile) to
        # jpserver-<pid>.json in the runtime dir once it listens.
        info_file = Path(env["JUPYTER_RUNTIME_DIR"]) / f"jpserver-{self.process.pid}.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n"
                                   + self.log_path.read_text()[-3000:])
            if info_file.exists():
                try:
                    self.url = json.loads(info_file.read_text())["url"].rstrip("/")
                    self.api("GET", "api/status")
                    return
                except (ValueError, KeyError, OSError):
                    pass  # the file is being written or the server is not answering yet
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"jupyter lab did not start in {timeout:.0f} s:\n"
                           + self.log_path.read_text()[-3000:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # the server shuts its kernels down on SIGTERM
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def api(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}/{path}", data=data, method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def shutdown_kernels(self) -> None:
        """Delete every session (and so its kernel): the next notebook starts a fresh kernel."""
        for session in self.api("GET", "api/sessions"):
            try:
                self.api("DELETE", f"api/sessions/{session['id']}")
            except urllib.error.HTTPError:
                pass  # already gone
        for kernel in self.api("GET", "api/kernels"):
            try:
                self.api("DELETE", f"api/kernels/{kernel['id']}")
            except urllib.error.HTTPError:
                pass

    def lab_url(self, notebook: str, workspace: str) -> str:
        # A workspace of its own per test: the lab does not reopen the previous test's notebooks.
        return f"{self.url}/lab/workspaces/{workspace}/tree/{notebook}?token={self.token}"

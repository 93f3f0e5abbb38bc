"""Fixtures of the end-to-end tests: one JupyterLab server and one Chromium per session, a fresh
browser page (and kernel) per test, and a screenshot of the page when a test fails.

Run them on their own and serially (``make e2e``): one server serves the whole session, and
parallel workers would each start one and fight over the two cores.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.lab import CHROMIUM_ARGS, REPO, LabServer, find_chromium

# Under build/ (git-ignored): kept after the session for whoever debugs the failure.
ARTIFACTS = REPO / "build" / "e2e-screenshots"
# Generous: CI machines are small and shared; a normal wait is a few seconds.
PAGE_TIMEOUT_MS = 120_000


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, for the page fixture to see a failure."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None or not Path(path).exists():
        # Never a skip: a CI run without a browser must not look green.
        pytest.fail("Chromium was not found, so the end-to-end tests cannot run. `make e2e` "
                    "installs Debian's chromium with apt-get; elsewhere install Chromium and/or "
                    "set CHROMIUM=/path/to/chromium.", pytrace=False)
    return path


@pytest.fixture(scope="session")
def lab_root(tmp_path_factory) -> Path:
    """The folder the server serves: copies of the notebooks, never the repository's files
    (JupyterLab saves outputs and checkpoints next to what it opens)."""
    root = tmp_path_factory.mktemp("lab-root")
    shutil.copytree(REPO / "solutions", root / "solutions",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    # The nbgrader settings students get (a longer per-cell limit for Validate): the Validate
    # handler reads nbgrader_config.py from the server's working directory.
    shutil.copy(REPO / "chapters" / "nbgrader_config.py", root / "nbgrader_config.py")
    return root


@pytest.fixture(scope="session")
def lab_server(lab_root, tmp_path_factory):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("lab-home")
    server = LabServer(lab_root, home, home / "jupyter-server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path, headless=True,
                                              args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(request, browser, lab_server):
    """A new browser page (own cookies and storage) with no kernel running on the server."""
    lab_server.shutdown_kernels()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    new_page = context.new_page()
    console: list[str] = []
    new_page.on("console", lambda msg: console.append(f"[{msg.type}] {msg.text}"))
    new_page.on("pageerror", lambda error: console.append(f"[pageerror] {error}"))
    yield new_page
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        stem = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
        try:
            new_page.screenshot(path=f"{stem}.png")
        except Exception as error:  # the page may have crashed: keep the logs anyway
            console.append(f"[screenshot failed] {error}")
        Path(f"{stem}.console.log").write_text("\n".join(console))
        shutil.copy(lab_server.log_path, f"{stem}.server.log")
    context.close()
    lab_server.shutdown_kernels()

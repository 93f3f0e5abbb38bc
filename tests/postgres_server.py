"""A throwaway PostgreSQL server for the gradebook tests, from Debian's binaries.

``postgres_server`` (session-scoped) starts one cluster per pytest process (so one per xdist
worker: each needs ~2 s and ~30 MB, far less than coordinating one shared server) in a fresh
folder under the system temp dir, listening on a free port of 127.0.0.1 only, with password
authentication. ``postgres_url`` gives each test a new, empty database on it.

PostgreSQL refuses to run as root: when the tests run as root (CI does), the server runs as the
``postgres`` user that Debian's package creates (``nobody`` otherwise) through ``setpriv``.
Missing binaries fail the tests with what to install; they are never skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

INSTALL_HINT = ("run `scripts/install_system_deps.sh` (it installs Debian's `postgresql` package) "
                "or set COURSE_PG_BIN to the folder that holds initdb and pg_ctl")
SUPERUSER = "grader"


def find_bin_dir() -> Path:
    """The folder with PostgreSQL's server programs (highest installed version)."""
    override = os.environ.get("COURSE_PG_BIN")
    candidates = [override] if override else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
        if Path(p).parent.name.isdigit() else 0)
    for folder in reversed(candidates):
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    pytest.fail(f"PostgreSQL's server programs (initdb, pg_ctl) were not found "
                f"({override or '/usr/lib/postgresql/<version>/bin'}): {INSTALL_HINT}.", pytrace=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as() -> list[str]:
    """Command prefix that drops root to an unprivileged user (nothing when not root)."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    pytest.fail("running as root and neither a `postgres` nor a `nobody` user exists to run "
                "PostgreSQL as", pytrace=False)


@dataclass
class PostgresServer:
    bin_dir: Path
    folder: Path
    port: int
    password: str
    host: str = "127.0.0.1"
    user: str = SUPERUSER
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres", user: str | None = None,
            password: str | None = None, driver: str = "postgresql") -> str:
        password = self.password if password is None else password
        return (f"{driver}://{quote(user or self.user, safe='')}:{quote(password, safe='')}"
                f"@{self.host}:{self.port}/{database}")

    def sql(self, statement: str, database: str = "postgres") -> None:
        """Run one statement as the superuser (autocommit: CREATE DATABASE needs it)."""
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                password=self.password, dbname=database, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def create_database(self, name: str | None = None, owner: str | None = None) -> str:
        name = name or f"gradebook_{len(self.databases)}_{secrets.token_hex(3)}"
        self.sql(f'CREATE DATABASE "{name}"' + (f' OWNER "{owner}"' if owner else ""))
        self.databases.append(name)
        return name

    def stop(self) -> None:
        subprocess.run([*_run_as(), str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data),
                        "-m", "immediate", "-w", "-t", "30"], capture_output=True, text=True)


PREFIX = "n2l-postgres-"


def _owner_alive(folder: Path) -> bool:
    try:
        pid = int((folder / "owner.pid").read_text())
    except (OSError, ValueError):  # not written yet by a server that is starting right now
        try:
            return time.time() - folder.stat().st_mtime < 600
        except OSError:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_servers(bin_dir: Path, base: Path | None = None) -> None:
    """Stop and delete clusters left by test processes that were killed before their teardown."""
    for folder in Path(base or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        if folder.is_dir() and not _owner_alive(folder):
            if (folder / "data" / "postmaster.pid").exists():
                subprocess.run([*_run_as(), str(bin_dir / "pg_ctl"), "stop", "-D", str(folder / "data"),
                                "-m", "immediate", "-w", "-t", "30"], capture_output=True)
            shutil.rmtree(folder, ignore_errors=True)


def start_server(base: Path | None = None) -> PostgresServer:
    """initdb + pg_ctl start in a new folder; the caller stops it (``server.stop()``)."""
    bin_dir = find_bin_dir()
    remove_stale_servers(bin_dir, base)
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.fail("the PostgreSQL driver is missing from this Python: pip install psycopg2-binary "
                    "(it is in pyproject's dependencies; `make test` installs it)", pytrace=False)
    # Not under pytest's basetemp: its parents are private to root, and the server runs as another user.
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
    (folder / "owner.pid").write_text(str(os.getpid()))  # see remove_stale_servers
    password = secrets.token_urlsafe(12)
    (folder / "pwfile").write_text(password + "\n")
    prefix = _run_as()
    if prefix:
        uid, gid = int(prefix[1].split("=")[1]), int(prefix[2].split("=")[1])
        for path in (folder, folder / "pwfile"):
            os.chown(path, uid, gid)
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}
    init = subprocess.run(
        [*prefix, str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", SUPERUSER,
         "--pwfile", str(folder / "pwfile"), "--auth", "scram-sha-256", "--no-locale",
         "-E", "UTF8", "--no-sync"],
        capture_output=True, text=True, env=env, timeout=120)
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}", pytrace=False)
    last = ""
    for _attempt in range(3):  # a free port can be taken between the check and the start
        port = _free_port()
        options = (f"-c listen_addresses=127.0.0.1 -c port={port} "
                   f"-c unix_socket_directories='{folder}' -c fsync=off -c full_page_writes=off "
                   "-c synchronous_commit=off -c max_connections=50 -c shared_buffers=16MB")
        start = subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "start", "-D", str(folder / "data"), "-w", "-t", "60",
             "-l", str(folder / "server.log"), "-o", options],
            capture_output=True, text=True, env=env, timeout=120)
        if start.returncode == 0:
            return PostgresServer(bin_dir, folder, port, password)
        log = folder / "server.log"
        last = start.stdout + start.stderr + (log.read_text(errors="replace") if log.exists() else "")
        time.sleep(0.5)
    shutil.rmtree(folder, ignore_errors=True)
    pytest.fail(f"PostgreSQL did not start:\n{last[-3000:]}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_server()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database (owned by the superuser) for one test."""
    return postgres_server.url(postgres_server.create_database())

"""The gradebook's database: SQLite in the workspace by default, PostgreSQL through a URL.

nbgrader keeps its gradebook wherever ``CourseDirectory.db_url`` (an SQLAlchemy URL) points. The
grader accepts two kinds:

- ``sqlite:///PATH`` (the default: ``<workspace>/gradebook.db``); a relative PATH is taken from
  the current folder and made absolute.
- ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE`` (or ``postgresql+psycopg2://...``; a unix
  socket with ``postgresql://USER@/DATABASE?host=/run/postgresql``). The database must exist and
  be empty or hold this workspace's gradebook; nbgrader creates its tables on first use. The
  password may also come from ``PGPASSWORD`` or ``~/.pgpass`` (libpq reads both), which keeps it
  off the command line. The driver is psycopg2 (``pip install psycopg2-binary``); ``postgresql://``
  is pinned to it because SQLAlchemy 2.1 changed that scheme's default driver to psycopg 3.

Every message shows URLs with the password masked (:func:`mask_url`).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sqlite3
import sys
from pathlib import Path

from grader import GraderError

CONNECT_TIMEOUT = 10  # seconds; also put into PostgreSQL URLs so nbgrader's connections give up too
POSTGRES_DRIVER = "postgresql+psycopg2"
DRIVER_MODULE, DRIVER_PACKAGE = "psycopg2", "psycopg2-binary"
CLI_HELP = ("gradebook database: sqlite:///PATH or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE "
            "(password also from PGPASSWORD or ~/.pgpass); default: the database this workspace "
            "used before, else <workspace>/gradebook.db")
RECORD_NAME = "gradebook_url.json"  # in the workspace: which database its grades are in
FORMS = ("sqlite:////absolute/path/gradebook.db, postgresql://USER:PASSWORD@HOST:PORT/DATABASE "
         "or postgresql+psycopg2://...")


def default_url(workspace: Path) -> str:
    """The SQLite gradebook inside a workspace."""
    return f"sqlite:///{Path(workspace).expanduser().resolve() / 'gradebook.db'}"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (also for text that does not parse as a URL)."""
    return re.sub(r"(://[^:/@?#\s]*:)[^@/\s]*@", r"\1***@", str(url))


def _scrub(text: str, url: str) -> str:
    """``text`` (e.g. a driver's error message) with the URL's password masked wherever it occurs."""
    from sqlalchemy.engine import make_url

    text = mask_url(text)
    try:
        password = make_url(url).password
    except Exception:
        password = None
    if password:
        for secret in {str(password), str(password).replace("%", "%25")}:
            text = text.replace(secret, "***")
    return text


def _parse(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        raise GraderError(f"{mask_url(url)!r} is not a database URL; use one of: {FORMS}.") from None


def validate_url(url: str, base: Path | None = None) -> str:
    """Check a user-given gradebook URL and return it in the form the grader writes to nbgrader.

    SQLite paths become absolute (relative to ``base``, default the current folder); PostgreSQL
    URLs get the psycopg2 driver and a ``connect_timeout``. Raises GraderError for anything else,
    or when the PostgreSQL driver is not installed. Does not connect (see :func:`check_database`).
    """
    url = (url or "").strip()
    if not url:
        raise GraderError(f"The gradebook URL is empty; use one of: {FORMS}.")
    if url.startswith(("postgres://", "postgres+")):
        raise GraderError(f"{mask_url(url)!r}: write postgresql:// instead of postgres:// "
                          "(SQLAlchemy does not accept the short form).")
    parsed = _parse(url)
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if parsed.username or parsed.password or parsed.host or parsed.port:
            raise GraderError(f"{mask_url(url)!r}: an SQLite URL names a file: sqlite:///PATH "
                              "(four slashes before an absolute path).")
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise GraderError(f"{mask_url(url)!r} is an in-memory or URI-style SQLite database; the "
                              "gradebook must be a file: sqlite:////absolute/path/gradebook.db.")
        path = Path(database).expanduser()
        path = (Path(base) if base else Path.cwd()) / path if not path.is_absolute() else path
        return f"sqlite:///{path.resolve()}"
    if parsed.drivername in ("postgresql", POSTGRES_DRIVER):
        if not parsed.database:
            raise GraderError(f"{mask_url(url)!r} names no database: add /DATABASE after the host "
                              "(create it first, e.g. `createdb -O USER gradebook`).")
        if importlib.util.find_spec(DRIVER_MODULE) is None:
            raise GraderError(
                f"The PostgreSQL driver ({DRIVER_MODULE}) is not installed in this Python "
                f"({sys.executable}): install it with `{sys.executable} -m pip install "
                f"{DRIVER_PACKAGE}`.")
        parsed = parsed.set(drivername=POSTGRES_DRIVER)
        if "connect_timeout" not in parsed.query:
            parsed = parsed.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT)})
        return parsed.render_as_string(hide_password=False)
    raise GraderError(f"Unsupported gradebook URL {mask_url(url)!r} (driver {parsed.drivername!r}); "
                      f"use one of: {FORMS}.")


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgresql+"))


def _identity(url: str) -> tuple:
    """What makes two URLs the same gradebook: everything but the password and the query."""
    parsed = _parse(url)
    if parsed.drivername.startswith("sqlite"):
        return ("sqlite", parsed.database)
    return ("postgresql", parsed.username or "", (parsed.host or "").lower(), parsed.port or 5432,
            parsed.database, parsed.query.get("host"))


def without_password(url: str) -> str:
    parsed = _parse(url)
    return parsed._replace(password=None).render_as_string(hide_password=False)  # set() keeps None


def resolve_url(workspace: Path, given: str | None) -> str:
    """The gradebook URL for a workspace, from ``--db-url`` (``given``) and what it used before.

    The first command that uses a workspace records its database (without the password) in
    ``<workspace>/gradebook_url.json``; later commands use the same one when ``given`` is None,
    and a different one is refused: one workspace's grades must not be split over two gradebooks.
    A workspace graded before this record existed has the SQLite default. The caller creates no
    file; call :func:`record_url` once the workspace folder exists.
    """
    workspace = Path(workspace).expanduser().resolve()
    record = workspace / RECORD_NAME
    recorded = None
    if record.exists():
        try:
            recorded = json.loads(record.read_text())["url"]
        except (ValueError, KeyError, TypeError):
            raise GraderError(f"{record} is damaged; write {{\"url\": \"...\"}} with the workspace's "
                              "gradebook URL (without the password) or delete it.") from None
    elif (workspace / "gradebook.db").exists():
        recorded = default_url(workspace)
    if given is None:
        return recorded or default_url(workspace)
    url = validate_url(given)
    if recorded is not None and _identity(url) != _identity(recorded):
        raise GraderError(
            f"The workspace {workspace} keeps its grades in {mask_url(recorded)}, not in "
            f"{mask_url(url)}. One workspace's grades must not be split over two gradebooks: use a "
            "new --workspace for the other database (or leave out --db-url).")
    return url


def record_url(workspace: Path, url: str) -> None:
    """Remember the workspace's gradebook (password left out) for :func:`resolve_url`."""
    record = Path(workspace).expanduser().resolve() / RECORD_NAME
    text = json.dumps({"url": without_password(url)}) + "\n"
    if not record.exists() or record.read_text() != text:
        record.write_text(text)


def config_url(url: str) -> str:
    """The URL to write into nbgrader_config.py: no password (that goes in the environment)."""
    return without_password(url) if is_postgres(url) else url


def nbgrader_env(url: str) -> dict[str, str]:
    """Environment for nbgrader subprocesses: ``PGPASSWORD`` when the URL carries a password.

    With :func:`config_url` in the config file, the password is never written to disk.
    """
    if not is_postgres(url):
        return {}
    password = _parse(url).password
    return {"PGPASSWORD": str(password)} if password else {}


def _explain_postgres(error: Exception, url: str) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    shown = mask_url(without_password(url))
    parsed = _parse(url)
    where = f"{parsed.host or 'the local socket'}" + (f":{parsed.port}" if parsed.port else "")
    first = text.splitlines()[0] if text else type(error).__name__
    detail = " ".join(_scrub(first.split(" failed: ", 1)[-1], url).split())
    if "password authentication failed" in text or "no password supplied" in text or (
            "role" in text and "does not exist" in text):
        return (f"PostgreSQL at {where} refused user {parsed.username!r}: wrong user name or password "
                f"({detail}). Check the URL {shown}, or PGPASSWORD / ~/.pgpass.")
    if "database" in text and "does not exist" in text:
        return (f"The database {parsed.database!r} does not exist on the PostgreSQL server at {where}: "
                f"create it first (e.g. `createdb -h {parsed.host or 'localhost'} -O "
                f"{parsed.username or 'USER'} {parsed.database}`), then grade again.")
    unreachable = ("Connection refused", "could not translate host name", "timeout expired",
                   "No such file or directory", "Network is unreachable", "No route to host",
                   "could not connect", "Connection timed out", "server closed the connection")
    if any(s in text for s in unreachable):
        return (f"Cannot reach the PostgreSQL server at {where} ({detail}). Is it running and "
                f"accepting connections there? URL: {shown}")
    return f"Cannot use the PostgreSQL gradebook {shown}: {detail}"


def check_database(url: str, timeout: float = CONNECT_TIMEOUT) -> set[str]:
    """Make sure the gradebook can be used, quickly, before a batch starts; raises GraderError.

    Connects (at most ``timeout`` seconds), and checks that the database is either empty and
    the user may create tables in it, or an nbgrader gradebook. Returns the names of the
    assignments (chapters) already in it (empty for a new gradebook).
    """
    url = validate_url(url)
    if is_postgres(url):
        return _check_postgres(url, timeout)
    return _check_sqlite(Path(url[len("sqlite:///"):]))


def _check_sqlite(path: Path) -> set[str]:
    if not path.exists():
        if not path.parent.is_dir():
            raise GraderError(f"The folder of the SQLite gradebook {path} does not exist.")
        return set()
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            _refuse_foreign(tables, f"sqlite:///{path}")
            return ({r[0] for r in conn.execute("SELECT name FROM assignment")}
                    if "assignment" in tables else set())
        finally:
            conn.close()
    except sqlite3.DatabaseError as error:
        raise GraderError(f"{path} is not a usable SQLite gradebook ({error}).") from None


def _refuse_foreign(tables: set[str], shown: str) -> None:
    if tables and "alembic_version" not in tables:
        raise GraderError(
            f"The database {shown} already holds tables that are not an nbgrader gradebook "
            f"(e.g. {sorted(tables)[0]!r}). Use an empty database for the gradebook.")


def _check_postgres(url: str, timeout: float) -> set[str]:
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    shown = mask_url(without_password(url))
    engine = create_engine(url, poolclass=NullPool,
                           connect_args={"connect_timeout": max(1, int(timeout))})
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            _refuse_foreign(tables, shown)
            if not tables:
                schema, user, may_create = conn.execute(text(
                    "SELECT current_schema(), current_user, "
                    "COALESCE(has_schema_privilege(current_schema(), 'CREATE'), false)")).one()
                if not may_create:
                    raise GraderError(
                        f"The PostgreSQL user {user!r} may not create tables in schema "
                        f"{schema or '(none: empty search_path)'!r} of the database in {shown}, "
                        "which nbgrader needs for a new gradebook. As the database's owner or a "
                        f"superuser: `GRANT CREATE ON SCHEMA {schema or 'public'} TO \"{user}\"` "
                        f"(or create the database with `createdb -O {user} ...`).")
                return set()
            if "assignment" not in tables:
                return set()
            return {row[0] for row in conn.execute(text("SELECT name FROM assignment"))}
    except SQLAlchemyError as error:
        raise GraderError(_explain_postgres(error, url)) from None
    finally:
        engine.dispose()


def describe(url: str) -> str:
    """How to show the gradebook in output: the masked URL, or the SQLite file's path."""
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else mask_url(without_password(url))


def password_free(text: str, url: str) -> str:
    """Any text (a log, nbgrader's stderr) with the URL's password masked, for messages."""
    return _scrub(text, url) if is_postgres(url) else text


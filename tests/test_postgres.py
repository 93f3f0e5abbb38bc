"""The gradebook in PostgreSQL: a real batch graded through ``--db-url``, and every way a URL fails.

The server is a throwaway cluster from Debian's binaries (tests/postgres_server.py); missing
binaries fail these tests with what to install, they are never skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grader import GraderError, database
from tests import postgres_server as pg
from tests import test_grader
from tests.grading_helpers import REPO, read_grades, run_grader
from tests.mini_course import CHAPTER

pytestmark = pytest.mark.grader  # the real grader: make test runs these, make check does not

# Fixtures used here: the PostgreSQL server, and the mini course and SQLite batch of test_grader.py.
postgres_server, postgres_url = pg.postgres_server, pg.postgres_url
course, release_nb, graded = test_grader.course, test_grader.release_nb, test_grader.graded
PostgresServer = pg.PostgresServer


def _rows(workspace: Path) -> dict[str, dict[str, str]]:
    """The grades CSV without the message column (it names paths of the workspace)."""
    return {student: {k: v for k, v in row.items() if k != "message"}
            for student, row in read_grades(workspace, CHAPTER).items()}


def _assert_no_password(server: PostgresServer, *texts: str) -> None:
    for text in texts:
        assert server.password not in text, "a password was shown"


def test_postgres_batch_grades_like_sqlite(graded, course, postgres_server, tmp_path):
    """The SQLite batch of test_grader.py, graded again into PostgreSQL: the same grades."""
    url = postgres_server.url(postgres_server.create_database())
    workspace = tmp_path / "grading"
    start = time.monotonic()
    result = run_grader("autograde", graded["subs"], "--chapter", CHAPTER, "--workspace", workspace,
                        "--db-url", url, "--jobs", "2", root=course)
    seconds = time.monotonic() - start
    assert result.returncode == graded["autograde"]["returncode"], result.stderr
    report = run_grader("report", "--chapter", CHAPTER, "--workspace", workspace, "--db-url", url,
                        root=course)
    assert report.returncode == 0, report.stderr
    print(f"PostgreSQL batch graded in {seconds:.1f} s")

    assert _rows(workspace) == _rows(graded["workspace"])
    assert read_grades(workspace, CHAPTER)["alice"]["status"] == "graded"
    assert not (workspace / "gradebook.db").exists(), "the grades went to SQLite, not PostgreSQL"
    assert (workspace / "reports" / CHAPTER / "feedback" / "alice.html").exists()
    _assert_no_password(postgres_server, result.stdout, result.stderr, report.stdout, report.stderr,
                        *(p.read_text(errors="replace") for p in workspace.rglob("*")
                          if p.is_file() and p.suffix in {".py", ".json", ".log", ".csv", ".md"}))

    # The grades are in the server.
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT s.student_id FROM submitted_assignment s JOIN assignment a "
                        "ON s.assignment_id = a.id WHERE a.name = %s", (CHAPTER,))
            students = {row[0] for row in cur.fetchall()}
    finally:
        conn.close()
    assert {"alice", "bob", "carol", "gina"} <= students

    # Later commands find the workspace's database without --db-url (password from PGPASSWORD) ...
    env_report = subprocess.run(
        [sys.executable, "-m", "grader", "--root", str(course), "report", "--chapter", CHAPTER,
         "--workspace", str(workspace), "--no-feedback"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "MPLBACKEND": "Agg", "PGPASSWORD": postgres_server.password}, timeout=600)
    assert env_report.returncode == 0, env_report.stderr
    # ... and refuse to split its grades over a second one.
    other = postgres_server.url(postgres_server.create_database())
    split = run_grader("autograde", graded["subs"], "--chapter", CHAPTER, "--workspace", workspace,
                       "--db-url", other, root=course)
    assert split.returncode == 2 and "must not be split" in split.stderr, split.stderr
    _assert_no_password(postgres_server, split.stderr, split.stdout)


def test_schema_created_by_fast_nbgrader_start(postgres_url):
    """nbgrader_main reads alembic's head in-process; a new PostgreSQL gradebook gets that version."""
    code = ("import sys\nfrom grader.nbgrader_main import speed_up_nbgrader\nspeed_up_nbgrader()\n"
            "from alembic.script import ScriptDirectory\nfrom nbgrader.api import Gradebook\n"
            "from nbgrader.dbutil import ALEMBIC_DIR\nfrom sqlalchemy import text\n"
            "with Gradebook(sys.argv[1], course_id='c') as gb:\n"
            "    version = gb.db.execute(text('SELECT version_num FROM alembic_version')).scalar()\n"
            "    assert version == ScriptDirectory(ALEMBIC_DIR).get_current_head(), version\n"
            "    gb.add_assignment('ch99_mini')\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code, database.validate_url(postgres_url)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    assert database.check_database(postgres_url) == {"ch99_mini"}


def test_cli_wrong_password_fails_fast_before_grading(graded, course, postgres_server, tmp_path):
    url = postgres_server.url(postgres_server.create_database(), password="not-the-password")
    start = time.monotonic()
    result = run_grader("autograde", graded["subs"], "--chapter", CHAPTER, "--workspace",
                        tmp_path / "ws", "--db-url", url, root=course)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "wrong user name or password" in result.stderr and "Traceback" not in result.stderr
    assert "not-the-password" not in result.stderr + result.stdout
    assert not (tmp_path / "ws" / "submitted").exists(), "nothing is graded without a gradebook"
    assert time.monotonic() - start < 120


def test_cli_bad_url_is_a_usage_error(course, tmp_path):
    result = run_grader("report", "--chapter", CHAPTER, "--workspace", tmp_path / "ws",
                        "--db-url", "mysql://root:hunter2@localhost/grades", root=course)
    assert result.returncode == 2 and "Unsupported gradebook URL" in result.stderr, result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


# -- validate_url / check_database messages -----------------------------------------------------

@pytest.mark.parametrize("url, words", [
    ("", "empty"),
    ("gradebook.db", "not a database URL"),
    ("mysql://root:hunter2@localhost/grades", "Unsupported gradebook URL"),
    ("postgresql+asyncpg://u:hunter2@localhost/db", "Unsupported gradebook URL"),
    ("postgres://u:hunter2@localhost/db", "write postgresql://"),
    ("postgresql://u:hunter2@localhost", "names no database"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("sqlite://u:hunter2@host/x.db", "names a file"),
])
def test_bad_urls(url, words):
    with pytest.raises(GraderError, match=words) as info:
        database.validate_url(url)
    assert "hunter2" not in str(info.value)


def test_urls_are_normalised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert database.validate_url("sqlite:///gb.db") == f"sqlite:///{tmp_path / 'gb.db'}"
    url = database.validate_url("postgresql://u:p%40ss@db.example:6543/grades")
    assert url == "postgresql+psycopg2://u:p%40ss@db.example:6543/grades?connect_timeout=10"
    assert database.mask_url(url) == "postgresql+psycopg2://u:***@db.example:6543/grades?connect_timeout=10"
    assert database.config_url(url) == "postgresql+psycopg2://u@db.example:6543/grades?connect_timeout=10"
    assert database.nbgrader_env(url) == {"PGPASSWORD": "p@ss"}
    assert database.nbgrader_env(database.default_url(tmp_path)) == {}


def test_missing_driver_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psycopg2" else real(name, *a))
    with pytest.raises(GraderError, match="pip install psycopg2-binary") as info:
        database.validate_url("postgresql://u:hunter2@localhost/db")
    assert "hunter2" not in str(info.value)


def test_unreachable_server_fails_quickly(postgres_server):
    with __import__("socket").socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(GraderError, match="Cannot reach the PostgreSQL server") as info:
        database.check_database(f"postgresql://grader:hunter2@127.0.0.1:{port}/gradebook", timeout=3)
    assert time.monotonic() - start < 10
    assert "hunter2" not in str(info.value)
    with pytest.raises(GraderError, match="Cannot reach"):
        database.check_database("postgresql://grader@/gradebook?host=/nonexistent-socket-dir")


def test_wrong_credentials(postgres_server):
    database_name = postgres_server.create_database()
    for url in (postgres_server.url(database_name, password="hunter2-wrong"),
                postgres_server.url(database_name, user="mallory", password="hunter2-wrong")):
        with pytest.raises(GraderError, match="wrong user name or password") as info:
            database.check_database(url)
        assert "hunter2" not in str(info.value)


def test_missing_database(postgres_server):
    with pytest.raises(GraderError, match="does not exist.*createdb") as info:
        database.check_database(postgres_server.url("no_such_gradebook"))
    assert postgres_server.password not in str(info.value)


def test_user_without_create_privilege(postgres_server):
    """PostgreSQL 15 no longer lets every user create tables in schema public."""
    name = postgres_server.create_database()
    postgres_server.sql("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ta') "
                        "THEN CREATE ROLE ta LOGIN PASSWORD 'ta-secret'; END IF; END $$")
    url = postgres_server.url(name, user="ta", password="ta-secret")
    with pytest.raises(GraderError, match='GRANT CREATE ON SCHEMA public TO "ta"') as info:
        database.check_database(url)
    assert "ta-secret" not in str(info.value)
    postgres_server.sql('GRANT CREATE ON SCHEMA public TO "ta"', database=name)
    assert database.check_database(url) == set()


def test_database_used_by_something_else_is_refused(postgres_server, tmp_path):
    name = postgres_server.create_database()
    postgres_server.sql("CREATE TABLE invoices (id int)", database=name)
    with pytest.raises(GraderError, match="not an nbgrader gradebook"):
        database.check_database(postgres_server.url(name))
    (tmp_path / "other.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(GraderError, match="not a usable SQLite gradebook"):
        database.check_database(f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(GraderError, match="does not exist"):
        database.check_database(f"sqlite:///{tmp_path / 'missing' / 'gradebook.db'}")


def test_workspace_remembers_its_database(tmp_path):
    ws = tmp_path / "ws"
    assert database.resolve_url(ws, None) == database.default_url(ws)
    ws.mkdir()
    url = database.resolve_url(ws, "postgresql://u:hunter2@db.example/grades")
    database.record_url(ws, url)
    assert "hunter2" not in (ws / database.RECORD_NAME).read_text()
    assert database.resolve_url(ws, None) == database.without_password(url)
    assert database.resolve_url(ws, "postgresql+psycopg2://u:new@db.example:5432/grades").endswith(
        "/grades?connect_timeout=10")
    with pytest.raises(GraderError, match="must not be split"):
        database.resolve_url(ws, "postgresql://u:hunter2@db.example/other")
    old = tmp_path / "old"  # graded into SQLite before the record existed
    old.mkdir()
    (old / "gradebook.db").write_bytes(b"")
    with pytest.raises(GraderError, match="must not be split"):
        database.resolve_url(old, "postgresql://u@db.example/grades")

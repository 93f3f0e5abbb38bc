"""Taking in submissions: a folder or a .zip as a learning-management system exports it.

Accepted layouts (mixable):

- one folder per student: ``<student>/<any name>.ipynb`` (files at any depth below it);
- flat files: ``<student>.ipynb`` or ``<student>_<anything>.ipynb`` (Canvas style), where the
  student id is what ``--id-pattern`` captures from the file name (default: text before the first
  ``_``).

Originals are only read, never changed. Every problem is reported per entry and the batch goes on.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nbformat

from grader import GraderError

DEFAULT_ID_PATTERN = r"^(?P<student>[^_]+)"
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.@-]{0,63}$")
MAX_NOTEBOOK_BYTES = 50 * 1024 * 1024
MAX_ARCHIVE_BYTES = 2 * 1024 * 1024 * 1024
SKIP_PARTS = {"__MACOSX", ".ipynb_checkpoints"}


@dataclass
class Candidate:
    """One notebook found in the submissions."""

    student: str | None  # None when no id could be read from its path
    path: Path  # readable file (inside the folder, or extracted from the archive)
    shown: str  # how to name it in reports (path relative to the folder/archive)
    problem: str = ""


@dataclass
class Submission:
    student: str
    source: str
    notebook: nbformat.NotebookNode | None
    sha256: str
    problem: str = ""


def _student_id(rel: PurePosixPath, pattern: re.Pattern) -> tuple[str | None, str]:
    if len(rel.parts) >= 2:
        raw = rel.parts[0]
    else:
        match = pattern.search(rel.stem)
        if not match or not match.groupdict().get("student"):
            return None, f"cannot read a student id from the file name {rel.name!r} " \
                         f"(pattern {pattern.pattern!r})"
        raw = match.group("student")
    raw = raw.strip()
    if not SAFE_ID.match(raw):
        return None, (f"student id {raw!r} has characters other than letters, digits, '.', '@', '-' "
                      "(rename the file or folder, or pass --id-pattern)")
    return raw, ""


@contextmanager
def opened(source: Path) -> Iterator[Path]:
    """Yield a folder holding the submissions: ``source`` itself, or a safe extraction of a zip."""
    source = Path(source).expanduser()
    if not source.exists():
        raise GraderError(f"Submissions not found: {source} does not exist.")
    if source.is_dir():
        yield source
        return
    if not zipfile.is_zipfile(source):
        raise GraderError(f"{source} is neither a folder nor a .zip archive (or the archive is "
                          "corrupt). Pass the folder of submissions or the LMS's zip export.")
    with tempfile.TemporaryDirectory(prefix="n2l-zip-") as tmp:
        _extract(source, Path(tmp))
        yield Path(tmp)


def _extract(archive: Path, dest: Path) -> None:
    """Unpack the notebooks of ``archive`` into ``dest``; the entries refused (and why) go to
    ``dest/.n2l-rejected.json`` for :func:`find`."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            if total > MAX_ARCHIVE_BYTES:
                raise GraderError(f"{archive} would unpack to {total / 1e9:.1f} GB "
                                  f"(limit {MAX_ARCHIVE_BYTES / 1e9:.0f} GB): refusing a possible zip bomb.")
            rejected = []
            for info in infos:
                if info.is_dir():
                    continue
                name = info.filename
                parts = PurePosixPath(name.replace("\\", "/")).parts
                unsafe = _unsafe_entry(info, parts)
                if unsafe:
                    rejected.append(f"{name}: {unsafe}, skipped")
                    continue
                if not name.endswith(".ipynb") or SKIP_PARTS & set(parts):
                    continue
                if info.file_size > MAX_NOTEBOOK_BYTES:
                    rejected.append(f"{name}: {info.file_size / 1e6:.0f} MB notebook, over the "
                                    f"{MAX_NOTEBOOK_BYTES // 2**20} MB limit, skipped")
                    continue
                _copy_notebook(zf, info, dest.joinpath(*parts), archive)
            (dest / ".n2l-rejected.json").write_text(json.dumps(rejected))
    except zipfile.BadZipFile as error:
        raise GraderError(f"{archive} is a corrupt zip archive ({error}). Download it again.") from None


def _unsafe_entry(info: zipfile.ZipInfo, parts: tuple[str, ...]) -> str:
    """Why an archive entry must not be written at all ("" when it may)."""
    name = info.filename
    if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
        return "unsafe path (absolute or with '..')"
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        return "symbolic link"
    return ""


def _copy_notebook(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path) -> None:
    """Extract one entry, stopping past MAX_NOTEBOOK_BYTES whatever its header claims."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as out:
        remaining = MAX_NOTEBOOK_BYTES + 1
        while chunk := src.read(1 << 20):
            remaining -= len(chunk)
            if remaining < 0:  # the header lied about the size
                raise GraderError(f"{info.filename} in {archive} is larger than it claims; "
                                  "refusing a possible zip bomb.")
            out.write(chunk)


def find(folder: Path, id_pattern: str = DEFAULT_ID_PATTERN) -> tuple[list[Candidate], list[str]]:
    """Every notebook under ``folder`` with its student id; plus entries rejected while unpacking."""
    try:
        pattern = re.compile(id_pattern)
    except re.error as error:
        raise GraderError(f"--id-pattern {id_pattern!r} is not a valid regular expression: {error}") from None
    if "student" not in pattern.groupindex:
        raise GraderError("--id-pattern must have a named group (?P<student>...)")
    rejected_file = folder / ".n2l-rejected.json"
    rejected = json.loads(rejected_file.read_text()) if rejected_file.exists() else []
    found = []
    for path in sorted(folder.rglob("*.ipynb")):
        rel = PurePosixPath(path.relative_to(folder).as_posix())
        if SKIP_PARTS & set(rel.parts) or any(p.startswith(".") for p in rel.parts):
            continue
        if path.is_symlink():
            rejected.append(f"{rel}: symbolic link, skipped")
            continue
        student, problem = _student_id(rel, pattern)
        found.append(Candidate(student, path, str(rel), problem))
    return found, rejected


def read_notebook(path: Path) -> tuple[nbformat.NotebookNode | None, str, str]:
    """``(notebook as nbformat v4, sha256, problem)``; notebook is None when unreadable."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, "", f"cannot read the file ({error.strerror})"
    digest = hashlib.sha256(data).hexdigest()
    if len(data) > MAX_NOTEBOOK_BYTES:
        return None, digest, f"the file is {len(data) / 1e6:.0f} MB, over the limit"
    if not data.strip():
        return None, digest, "the file is empty: ask the student to save and submit again"
    try:
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
    except UnicodeDecodeError:
        return None, digest, "the file is not UTF-8 text, so not a notebook"
    except Exception as error:  # nbformat raises several kinds (NotJSONError, ValueError, ...)
        return None, digest, f"not a readable Jupyter notebook ({type(error).__name__}: " \
                             f"{str(error).splitlines()[0][:200] if str(error) else ''})"
    if not isinstance(nb.get("cells"), list):
        return None, digest, "not a readable Jupyter notebook (no cells)"
    return nb, digest, ""


def collect(folder: Path, chapter: str, id_pattern: str = DEFAULT_ID_PATTERN
            ) -> tuple[list[Submission], list[str]]:
    """One :class:`Submission` per student (with a problem when unusable), plus rejected entries."""
    candidates, rejected = find(folder, id_pattern)
    by_student: dict[str, list[Candidate]] = {}
    for cand in candidates:
        if cand.student is None:
            rejected.append(f"{cand.shown}: {cand.problem}")
        else:
            by_student.setdefault(cand.student, []).append(cand)
    submissions = []
    for student, cands in sorted(by_student.items()):
        if len(cands) > 1:
            named = [c for c in cands if Path(c.shown).stem.endswith(chapter)]
            if len(named) != 1:
                shown = ", ".join(c.shown for c in cands)
                submissions.append(Submission(student, shown, None, "", f"{len(cands)} notebooks "
                                              f"found ({shown}); expected one for {chapter}"))
                continue
            cands = named
        cand = cands[0]
        nb, digest, problem = read_notebook(cand.path)
        submissions.append(Submission(student, cand.shown, nb, digest, problem))
    return submissions, rejected

"""Code-similarity flags (grader/similarity.py) on chapter 3's real notebooks: copies, pasted
course_lib functions, honest answers, the starter code, escaping, thresholds and the report.

No grading: the submissions are the release notebook with answer cells filled in."""

from __future__ import annotations

import csv
import html
import re

import nbformat
import pytest

from grader import report, similarity
from grader.similarity import Thresholds
from grader.workspace import Workspace
from tests.grading_helpers import REPO, cells_by_role, write_submissions

CHAPTER = "ch03_losses"
SOURCE = nbformat.read(REPO / "solutions" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
RELEASE = nbformat.read(REPO / "chapters" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
STARTER = similarity.answer_cells(RELEASE)
SOLUTION = {k: "\n".join(line for line in v.splitlines() if "### " not in line)
            for k, v in similarity.answer_cells(SOURCE).items()}
REFERENCES = similarity.course_lib_references(REPO / "course_lib")
EVIL = '<img src=x onerror=alert(1)>|*x*_[a](b)'  # HTML and markdown in a student id


def rename(code: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        code = re.sub(rf"(?<![.\w]){old}\b", new, code)
    return code


def disguised_solution() -> dict[str, str]:
    """The solution with every local variable renamed and the comments changed."""
    names = {"residual": "diff", "size": "mag", "per_element": "elementwise", "weight": "w",
             "softplus_neg": "sp", "top": "biggest", "shifted": "centred", "log_probs": "lp",
             "keep": "valid", "safe_targets": "tgt", "per_example": "losses", "counts": "hist"}
    return {k: rename(v, names).replace("### ", "# my notes: ") + "\n# checked against torch\n"
            for k, v in SOLUTION.items()}


# Answers written independently of the solution (correct, in other styles), and a one-line answer
# written the one natural way.
HONEST_ANN = {
    "ex1_huber": '''def huber_loss(pred, target, delta=1.0):
    r = pred - target
    quad = 0.5 * r * r
    lin = delta * (torch.abs(r) - delta / 2)
    return torch.mean(torch.where(torch.abs(r) > delta, lin, quad))
''',
    "ex2_bce": '''def bce_with_logits(logits, targets, pos_weight=None):
    y = targets.float()
    w = torch.tensor(1.0) if pos_weight is None else torch.as_tensor(pos_weight, dtype=logits.dtype)
    log_sig = -torch.nn.functional.softplus(-logits)
    log_one_minus = -torch.nn.functional.softplus(logits)
    loss = -(w * y * log_sig + (1 - y) * log_one_minus)
    return loss.mean()
''',
    "ex3_log_softmax": '''def log_softmax(logits, dim=-1):
    m = torch.max(logits, dim=dim, keepdim=True).values.detach()
    lse = m + torch.log(torch.sum(torch.exp(logits - m), dim=dim, keepdim=True))
    return logits - lse
''',
    "ex4_cross_entropy": '''def cross_entropy(logits, targets, label_smoothing=0.0, ignore_index=-100):
    n, c = logits.shape
    lp = log_softmax(logits)
    mask = (targets != ignore_index)
    if mask.sum() == 0:
        return torch.tensor(float("nan"))
    lp = lp[mask]
    t = targets[mask]
    onehot = torch.zeros_like(lp)
    onehot[torch.arange(len(t)), t] = 1.0
    q = (1 - label_smoothing) * onehot + label_smoothing / c
    return -(q * lp).sum(dim=1).mean()
''',
    "ex5_fit_categorical": '''def fit_categorical(samples, num_classes, alpha=0.0):
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for s in samples.flatten().tolist():
        counts[s] += 1
    return (counts + alpha) / (counts.sum() + num_classes * alpha)
'''}
HONEST_BO = {
    "ex1_huber": '''def huber_loss(pred, target, delta=1.0):
    diff = (pred - target).abs()
    small = diff <= delta
    loss = torch.empty_like(diff)
    loss[small] = 0.5 * diff[small] ** 2
    loss[~small] = delta * (diff[~small] - 0.5 * delta)
    return loss.mean()
''',
    "ex3_log_softmax": '''def log_softmax(logits, dim=-1):
    shifted = logits - logits.max(dim=dim, keepdim=True)[0]
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()
''',
    "ex5_fit_categorical": '''def fit_categorical(samples, num_classes, alpha=0.0):
    counts = torch.bincount(samples.flatten(), minlength=num_classes).double()
    return (counts + alpha) / (samples.numel() + num_classes * alpha)
'''}
# Two short answers written the natural way: tokenised, the same code as the solution's.
HONEST_CY = {
    "ex1_huber": '''def huber_loss(pred, target, delta=1.0):
    a = (pred - target).abs()
    return torch.where(a <= delta, 0.5 * a ** 2, delta * (a - 0.5 * delta)).mean()
''',
    "ex5_fit_categorical": '''def fit_categorical(samples, num_classes, alpha=0.0):
    c = torch.bincount(samples.view(-1), minlength=num_classes).to(torch.float64)
    return (c + alpha) / (c.sum() + num_classes * alpha)
'''}
TRIVIAL_DEE = {"ex5_fit_categorical": rename(HONEST_CY["ex5_fit_categorical"], {"c": "n"})}
PASTED_HUBER = rename(REFERENCES["course_lib.losses.huber_loss"],
                      {"residual": "r", "size": "mag", "per_element": "out"})
PASTED_CE = ("# </pre><script>alert('pasted')</script>\n"
             + rename(REFERENCES["course_lib.losses.cross_entropy"],
                      {"keep": "mask", "log_probs": "lp", "per_position": "loss"}))

COHORT = {
    "solution": SOLUTION,
    "copy_of_solution": disguised_solution(),
    "honest_ann": HONEST_ANN, "honest_bo": HONEST_BO, "honest_cy": HONEST_CY,
    "trivial_dee": TRIVIAL_DEE,
    "blank_1": {}, "blank_2": {},
    "paster_eve": {"ex1_huber": PASTED_HUBER},
    EVIL: {"ex4_cross_entropy": PASTED_CE},
    "copy_of_evil": {"ex4_cross_entropy": rename(PASTED_CE, {"mask": "ok", "lp": "logp"})},
}
HONEST = ["honest_ann", "honest_bo", "honest_cy", "trivial_dee", "blank_1", "blank_2"]


def answers(students: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Each student's answer cells: the starter code where the student wrote nothing."""
    return {s: {**STARTER, **COHORT[s]} for s in (students or COHORT)}


@pytest.fixture(scope="module")
def result() -> similarity.Result:
    return similarity.compare(answers(), STARTER, REFERENCES)


def test_answer_cells_follow_the_test_suites_rule():
    solutions, _ = cells_by_role(SOURCE)
    assert list(similarity.answer_cells(SOURCE)) == list(solutions) == list(STARTER)
    assert "raise NotImplementedError()" in STARTER["ex1_huber"]


def test_course_lib_is_split_per_function():
    assert REFERENCES["course_lib.losses.huber_loss"].startswith("def huber_loss(")
    assert "class SGD" in REFERENCES["course_lib.optimizers.SGD"]
    assert all(name.count(".") == 2 for name in REFERENCES)


def test_pasted_course_lib_function_is_named(result):
    assert "matches course_lib.losses.huber_loss (100%)" in result.flags["paster_eve"]
    assert "matches course_lib.losses.cross_entropy (100%)" in result.flags[EVIL]
    match = next(m for m in result.matches if m.student == "paster_eve")
    assert match.kind == "course_lib" and match.cell == "ex1_huber"


def test_copies_are_flagged_both_ways(result):
    for a, b in [("solution", "copy_of_solution"), (EVIL, "copy_of_evil")]:
        for student, other in [(a, b), (b, a)]:
            flag = next(f for f in result.flags[student] if f.startswith(f"similar to {other} ("))
            assert int(flag.rsplit("(", 1)[1].rstrip("%)")) >= 90, flag


def test_honest_answers_and_starter_code_are_not_flagged(result):
    for student in HONEST:
        assert result.flags[student] == [], student
    named = " ".join(flag for flags in result.flags.values() for flag in flags)
    assert not any(student in named for student in HONEST), named
    # The solution's short answers are course_lib's own code, but too short to flag.
    assert result.flags["solution"] == [f for f in result.flags["solution"]
                                        if f.startswith("similar to copy_of_solution")]


def test_thresholds_change_the_outcome():
    cohort = answers(["solution", "honest_cy", "trivial_dee", "copy_of_solution"])
    losses = {k: v for k, v in REFERENCES.items() if k.startswith("course_lib.losses.")}
    loose = similarity.compare(cohort, STARTER, losses,
                               Thresholds(students=0.5, course_lib=0.5, min_overlap=40))
    assert any(f.startswith("similar to solution") for f in loose.flags["honest_cy"])
    assert any(f.startswith("similar to honest_cy") for f in loose.flags["trivial_dee"])
    assert "matches course_lib.losses.huber_loss" in " ".join(loose.flags["solution"])
    strict = similarity.compare(cohort, STARTER, losses, Thresholds(min_overlap=10_000))
    assert all(flags == [] for flags in strict.flags.values()), strict.flags
    default = similarity.compare(cohort, STARTER, losses)
    assert default.flags["honest_cy"] == default.flags["trivial_dee"] == []
    assert default.flags["solution"] != []


def test_many_similar_students_are_summarised():
    cohort = {f"copy{i}": {**STARTER, **SOLUTION} for i in range(4)}
    found = similarity.compare(cohort, STARTER, {}, Thresholds(most_per_student=2))
    assert found.pairs_above == 6
    for flags in found.flags.values():
        assert len(flags) == 3 and flags[2] == "similar to 1 more student (see similarity.html)", flags


def test_page_escapes_ids_and_code(result, tmp_path):
    page = tmp_path / "similarity.html"
    similarity.write_html(result, page, CHAPTER, Thresholds())
    text = page.read_text()
    assert "<img" not in text and "<script" not in text
    assert html.escape(EVIL) in text
    assert "&lt;/pre&gt;&lt;script&gt;" in text  # the pasted code's comment, shown as text
    assert "<mark>" in text and "course_lib.losses.huber_loss" in text
    assert "honest_ann" not in text


def _workspace(tmp_path, submissions: dict[str, dict[str, str]]) -> Workspace:
    ws = Workspace(tmp_path / "ws", REPO)
    ws.release_notebook(CHAPTER).parent.mkdir(parents=True)
    nbformat.write(RELEASE, ws.release_notebook(CHAPTER))
    write_submissions(ws, CHAPTER, RELEASE, submissions)
    return ws


def _fake_rows(students: list[str]):
    """``collect_rows`` without a gradebook: every student graded, full points."""
    def rows(_ws, _chapter):
        return [report.Row(s, "graded", "", {"ex1_huber_tests": 1.0},
                           ["note: X failed in the kernel"] if s == "honest_ann" else [])
                for s in students], [("ex1_huber_tests", 1.0)]
    return rows


def test_report_shows_the_flags(tmp_path, monkeypatch):
    ws = _workspace(tmp_path, answers(["solution", "copy_of_solution", "honest_ann", EVIL]))
    broken = ws.submitted("broken", CHAPTER)
    broken.parent.mkdir(parents=True)
    broken.write_text('{"cells": [')  # unreadable: left out, no crash
    monkeypatch.setattr(report, "collect_rows",
                        _fake_rows(["solution", "copy_of_solution", "honest_ann", EVIL, "broken"]))
    out = report.write_report(ws, CHAPTER, feedback=False)
    with open(out / "grades.csv", newline="") as fh:
        flags = {row["student"]: row["flags"] for row in csv.DictReader(fh)}
    assert re.fullmatch(r"similar to copy_of_solution \(\d+%\)", flags["solution"]), flags
    assert "matches course_lib.losses.cross_entropy (100%)" in flags[EVIL]
    assert flags["honest_ann"] == "note: X failed in the kernel" and flags["broken"] == ""
    summary = (out / "summary.md").read_text()
    assert "  - similar to solution (" in summary
    assert html.escape(EVIL) in (out / "similarity.html").read_text()

    out = report.write_report(ws, CHAPTER, feedback=False, similarity=None)
    assert "similar to" not in (out / "grades.csv").read_text()
    assert not (out / "similarity.html").exists()


def test_cli_report_options(tmp_path, monkeypatch, capsys):
    from grader.cli import main

    ws = _workspace(tmp_path, answers(["solution", "honest_cy"]))
    monkeypatch.setattr(report, "collect_rows", _fake_rows(["solution", "honest_cy"]))
    base = ["--root", str(REPO), "report", "--chapter", "ch03", "--workspace", str(ws.path),
            "--no-feedback"]
    assert main(base) == 0
    assert "similar to" not in capsys.readouterr().out  # 68% and 84 characters: honest
    assert main(base + ["--similarity-threshold", "50", "--similarity-min-overlap", "40"]) == 0
    out = capsys.readouterr().out
    assert "  - similar to honest_cy (" in out and "similarity.html" in out
    assert main(base + ["--no-similarity"]) == 0
    assert "similar to" not in capsys.readouterr().out
    assert not (ws.reports(CHAPTER) / "similarity.html").exists()
    assert main(base + ["--course-lib-threshold", "0"]) == 2
    assert "percentages in (0, 100]" in capsys.readouterr().err


def test_cli_thresholds():
    from grader.cli import _parser

    args = _parser().parse_args(["report", "--chapter", "ch03", "--workspace", "w"])
    assert (args.similarity_threshold / 100, args.course_lib_threshold / 100,
            args.similarity_min_overlap) == (Thresholds().students, Thresholds().course_lib,
                                             Thresholds().min_overlap)
    args = _parser().parse_args(["report", "--chapter", "ch03", "--workspace", "w", "--no-similarity",
                                 "--similarity-threshold", "55", "--similarity-min-overlap", "30"])
    assert args.no_similarity and args.similarity_threshold == 55 and args.similarity_min_overlap == 30
    with pytest.raises(ValueError):
        Thresholds(students=0)

"""The mutation-testing tool's own pieces (tests/mutants.py): the operators, the ids, the sample,
the equivalents file and the report. Fast: no chapter is graded here (the full runs are
``python -m tests.mutants --chapter chNN``, see docs/mutation-testing.md)."""

from __future__ import annotations

import ast

import pytest

from tests import mutants as M

CELL = '''def f(x, n):
    """Docstring: 1 + 2 < 3."""
    helper = 7
    ### BEGIN SOLUTION
{body}
    ### END SOLUTION
'''


def _mutants(body: str) -> list[M.Mutant]:
    return M.mutants_of("ex1_f", CELL.format(body=body))


def _changes(body: str, operator: str | None = None) -> set[str]:
    """The mutated solution lines (stripped) the operator(s) produce."""
    return {m.snippet for m in _mutants(body) if operator in (None, m.operator)}


def test_only_the_solution_is_mutated_and_every_mutant_parses():
    mutants = _mutants("    return x + 1")
    assert mutants
    for mutant in mutants:
        ast.parse(mutant.source)
        assert "helper = 7" in mutant.source and "1 + 2 < 3" in mutant.source
        assert mutant.exercise == "ex1" and mutant.cell == "ex1_f"
    assert len({m.source for m in mutants}) == len(mutants)  # no duplicates


@pytest.mark.parametrize(("body", "operator", "want"), [
    ("    return x + n", "arithmetic", {"return (x - n)"}),
    ("    return (x + 1) * n", "arithmetic", {"return ((x + 1) / n)", "return ((x - 1)) * n"}),
    ("    return x ** n", "arithmetic", {"return (x * n)"}),
    ("    return x / n", "arithmetic", {"return (x * n)", "return (x // n)"}),
    ("    return x @ n", "arithmetic", {"return (x * n)"}),
    ("    x += n\n    return x", "arithmetic", {"x -= n"}),
    ("    return x < n", "boundary", {"return x <= n"}),
    ("    return x >= n", "boundary", {"return x > n"}),
    ("    return x < n", "comparison", {"return x > n"}),
    ("    return x == n", "comparison", {"return x != n"}),
    ("    return x is None", "comparison", {"return x is not None"}),
    ("    return x + 2", "constant", {"return x + 3", "return x + 1"}),
    ("    return x * 0.5", "constant", {"return x * 1.5", "return x * (-0.5)"}),
    ("    return f(x, flag=True)", "constant", {"return f(x, flag=False)"}),
    ("    return -x", "unary", {"return (x)"}),
    ("    return x.sum(dim=-1)", "dim", {"return x.sum(dim=(-2))"}),
    ("    return x.softmax(1)", "dim", {"return x.softmax((0))"}),
    ("    return x.amax(dim=(-2, -1))", "dim",
     {"return x.amax(dim=((-1), -1))", "return x.amax(dim=(-2, (-2)))"}),
    ("    return torch.cat([x, n], 0)", "dim", {"return torch.cat([x, n], (1))"}),
    ("    return x.sum(dim=0)", "keepdim", {"return x.sum(dim=0, keepdim=True)"}),
    ("    return x.amax(dim=0, keepdim=True)", "keepdim", {"return x.amax(dim=0, keepdim=False)"}),
    ("    return x.sum() / x.argmax()", "reduction", {"return x.mean() / x.argmax()",
                                                     "return x.sum() / x.argmin()"}),
    ("    return max(x, n)", "reduction", {"return min(x, n)"}),
    ("    return x.to(torch.float64)", "dtype", {"return x.to(torch.float32)"}),
    ("    return x.long()", "dtype", {"return x.int()"}),
    ("    return x.add_(n)", "in-place", {"return x.add(n)"}),
    ("    return x.mul(n)", "in-place", {"return x.mul_(n)"}),
    ("    x += n\n    return x", "in-place", {"x = x + (n)"}),
    ("    x = x * n\n    return x", "in-place", {"x *= (n)"}),
    ("    return x.clone()", "in-place", {"return (x)"}),
    ("    return torch.exp(x) + torch.exp(-x) + (x + 1).exp()", "in-place",
     {"return torch.exp_(x) + torch.exp(-x) + (x + 1).exp()"}),  # in place on a temporary: equivalent
    ("    y = x[:n]\n    return y", "slice", {"y = x[:(n + 1)]", "y = x[:(n - 1)]"}),
])
def test_each_operator(body, operator, want):
    assert _changes(body, operator) == want


def test_dropped_statements_keep_the_code_valid():
    body = "    if n > 0:\n        x = x + n\n    total = x\n    return total"
    dropped = _changes(body, "drop")
    assert dropped == {"pass"}
    drops = [m for m in _mutants(body) if m.operator == "drop"]
    assert len(drops) == 4  # the if, its body, the assignment, the return; docstrings never
    assert all("pass" in m.diff for m in drops)


def test_ids_are_stable_and_independent_of_order():
    body = "    return x.sum(dim=0) + n * 2"
    first, again = _mutants(body), _mutants(body)
    assert [m.id for m in first] == [m.id for m in again]
    assert len({m.id for m in first}) == len(first)
    mutant = next(m for m in first if m.operator == "dim")
    assert mutant.id == "ex1_f:5:21:dim:(1)"  # cell : line : column : operator : replacement
    assert M.sample(first, 3) == M.sample(list(reversed(first)), 3)
    assert M.sample(first, 100) == first


def test_mutants_outside_the_markers_and_in_f_strings_are_not_made():
    source = "def g(x):\n    return x + 1\n"  # no markers: the whole cell is the solution
    arithmetic = {m.snippet for m in M.mutants_of("ex2_g", source) if m.operator == "arithmetic"}
    assert arithmetic == {"return (x - 1)"}
    assert not [m for m in _mutants("    return f'{x + 1}'") if m.operator != "drop"]


def test_every_solution_part_of_a_cell_is_mutated():
    source = ("class C:\n    def f(self, x):\n        ### BEGIN SOLUTION\n        return x + 1\n"
              "        ### END SOLUTION\n\n    def g(self, x):\n        y = x * 2\n"
              "        ### BEGIN SOLUTION\n        return y - 3\n        ### END SOLUTION\n")
    assert M.solution_lines(source) == [(4, 4), (10, 10)]
    arithmetic = {m.snippet for m in M.mutants_of("ex5_c", source) if m.operator == "arithmetic"}
    assert arithmetic == {"return (x - 1)", "return (y + 3)"}  # not y = x * 2, outside the markers


def test_the_equivalents_file(tmp_path):
    (tmp_path / "ch99_demo.toml").write_text(
        '[[equivalent]]\nexercise = "ex1"\nid = "ex1_f:5:12:boundary:<="\nreason = "ties never happen"\n'
        '[[equivalent]]\nexercise = "ex1"\nsnippet = "return x > n"\nreason = "symmetric"\n')
    equivalents = M.load_equivalents("ch99_demo", tmp_path)
    mutants = {m.snippet: m for m in _mutants("    return x < n")}
    assert [e.matches(mutants["return x <= n"]) for e in equivalents] == [True, False]
    assert [e.matches(mutants["return x > n"]) for e in equivalents] == [False, True]
    assert M.load_equivalents("ch98_none", tmp_path) == []
    (tmp_path / "ch97_bad.toml").write_text('[[equivalent]]\nexercise = "ex1"\nid = "x"\n')
    with pytest.raises(ValueError, match="reason"):
        M.load_equivalents("ch97_bad", tmp_path)


def test_the_report():
    mutants = _mutants("    return x + n if n < 3 else x")
    report = M.ExerciseReport("ex1", "ex1_f")
    statuses = ["test", "check", "timeout", "equivalent", "survived", "survived"]
    report.outcomes = [M.Outcome(m, s, check_failed=s in ("check", "test")) for m, s in
                       zip(mutants, statuses, strict=False)]
    summary = report.summary()
    assert summary | {"score": None} == {
        "exercise": "ex1", "cell": "ex1_f", "baseline": "passed", "mutants": 6, "killed": 3,
        "killed_by_test": 1, "killed_by_check_only": 1, "timeout": 1, "crash": 0, "equivalent": 1,
        "survivors": 2, "score": None, "caught_by_check": 2}
    assert summary["score"] == 0.6  # killed / (mutants - equivalent)
    text = M.format_text("ch99_demo", [report])
    assert "ex1_f" in text and "60%" in text
    assert text.count("survivor ex1_f:") == 2 and "+++ ex1_f (mutant)" in text
    as_json = M.to_json("ch99_demo", [report])
    assert as_json["exercises"][0]["survivors"] == 2
    assert {g["status"] for g in as_json["exercises"][0]["mutants_graded"]} == set(statuses)


def test_a_killed_mutant_is_classified_by_what_killed_it():
    assert M._classify(None, True) == ("timeout", "timed out")
    assert M._classify(None, False)[0] == "crash"
    assert M._classify({"tests": {"ex1_f_tests": "AssertionError"}, "checks": {"x": "y"}}, False)[0] == "test"
    assert M._classify({"tests": {}, "checks": {"ex1_f_tests": "wrong"}}, False)[0] == "check"
    assert M._classify({"tests": {}, "checks": {}}, False) == ("survived", "")

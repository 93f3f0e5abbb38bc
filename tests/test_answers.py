"""Every chapter's answers graded in-process, with the grader's own test code (tests/answer_harness.py).

Per chapter, in one process: the solution passes every test cell and every trusted check; the blank
release fails every test cell and every trusted check; each correct alternative (``CORRECT_ANSWERS``)
passes them all; each wrong answer in
``tests/fixtures/wrong_answers/<chapter>.py`` fails exactly the test cells it lists (in-kernel
tests and trusted checks combined, as the grader scores them) and passes all the others; so does
the combination of several wrong answers that the round trip also grades for real
(tests/test_roundtrip.py).
"""

from __future__ import annotations

import json

import pytest

from grader.course import list_chapters
from tests.answer_harness import demo_names_read_by_tests, grade_cases
from tests.grading_helpers import REPO, cells_by_role, combined_wrong_answer, correct_answers, wrong_answers

CHAPTERS = list_chapters(REPO)


def _notebook(folder: str, chapter: str) -> dict:
    return json.loads((REPO / folder / chapter / f"{chapter}.ipynb").read_text())


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_fixtures_are_well_formed(chapter):
    solutions, tests = cells_by_role(_notebook("solutions", chapter))
    fixtures = wrong_answers(chapter)
    assert len(fixtures) >= 3, f"{chapter} needs >= 3 wrong-answer fixtures"
    for case in fixtures:
        unknown = (set(case["answers"]) - set(solutions)) | (set(case["fails"]) - set(tests))
        assert not unknown, f"{chapter} fixture {case['name']!r} names unknown cells {unknown}"
        assert case["fails"], f"{chapter} fixture {case['name']!r} fails no test cell"
    combined = combined_wrong_answer(chapter)
    assert len(combined["parts"]) >= 2, \
        f"{chapter}: no two wrong answers replace different answer cells and fail different test cells"
    alternatives = dict.fromkeys(solutions, 0)
    for case in correct_answers(chapter):
        unknown = set(case["answers"]) - set(solutions)
        assert not unknown, f"{chapter} correct alternative {case['name']!r} names unknown cells {unknown}"
        assert not case.get("fails"), f"{chapter} correct alternative {case['name']!r} lists failures"
        for cell in case["answers"]:
            alternatives[cell] += 1
    # Issue 19: a test that rejects a correct answer is as wrong as one that accepts a wrong one.
    short = {cell: n for cell, n in alternatives.items() if n < 2}
    assert not short, f"{chapter}: answer cells with fewer than 2 correct alternatives: {short}"
    # The harness skips demo cells: a test cell that read a demo's variable would be run wrongly.
    assert demo_names_read_by_tests(chapter) == {}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_answers_graded_in_process(chapter):
    solutions, tests = cells_by_role(_notebook("solutions", chapter))
    blank, _ = cells_by_role(_notebook("chapters", chapter))
    fixtures = wrong_answers(chapter)
    alternatives = [{**case, "fails": []} for case in correct_answers(chapter)]
    cases = [{"name": "solution", "answers": {}, "fails": []},
             {"name": "blank release", "answers": blank, "fails": sorted(tests)},
             combined_wrong_answer(chapter), *fixtures, *alternatives]
    results = grade_cases(chapter, cases)
    problems, output = [], ""
    for case, result in zip(cases, results, strict=True):
        want = set(case["fails"])
        if result.fails != want and not output:
            output = f"--- what {case['name']!r} printed ---\n{result.output}"
        for cell in sorted(result.fails ^ want):
            verb = "failed" if cell in result.fails else "passed"
            problems.append(f"{case['name']!r}: {cell} {verb}, expected the opposite "
                            f"({result.describe(cell)[:300]})")
    solution, blank_result = results[0], results[1]
    problems += [f"solution: trusted check of {c}: {why}" for c, why in solution.checks.items()
                 if why != "passed"]
    problems += [f"blank release: trusted check of {c} passed" for c, why in blank_result.checks.items()
                 if why == "passed"]
    # Most wrong answers must also be caught outside the kernel (the rest by the hidden tests).
    caught = sum(any(r.checks.get(c) != "passed" for c in case["fails"])
                 for case, r in zip(fixtures, results[3:3 + len(fixtures)], strict=True))
    if caught < len(fixtures) // 2:
        problems.append(f"the trusted checks caught only {caught} of {len(fixtures)} wrong answers")
    assert not problems, "\n".join(problems) + "\n" + output


# -- the harness itself, on the grader tests' mini chapter -----------------------------------------


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    from tests.mini_course import make_course

    return make_course(tmp_path_factory.mktemp("mini") / "course")


def test_harness_scores_like_the_grader(mini_root):
    from tests.mini_course import CHAPTER

    cases = [
        {"name": "solution", "answers": {}},
        {"name": "n - 1", "answers": {"ex3_mean": "def mean(xs):\n    return sum(xs) / (len(xs) - 1)\n"}},
        # An object equal to everything passes check_close-free tests in the kernel; the trusted
        # check, decided outside, still fails it.
        {"name": "faked", "answers": {"ex2_square": (
            "class Anything(float):\n    def __eq__(self, other):\n        return True\n"
            "def square(x):\n    return Anything(0)\n")}},
        {"name": "answer cell raises", "answers": {"ex1_add": "raise ValueError('no idea')\n"}},
        {"name": "hangs", "answers": {"ex1_add": "import time\nwhile True:\n    time.sleep(1)\n"}},
        {"name": "exits", "answers": {"ex1_add": "import os\nos._exit(3)\n"}},
    ]
    solution, n_minus_1, faked, raises, hangs, exits = grade_cases(CHAPTER, cases, root=mini_root, timeout=20)
    assert solution.fails == set() and set(solution.checks.values()) == {"passed"}
    assert n_minus_1.fails == {"ex3_mean_tests"}
    assert "ex3_mean_tests" in n_minus_1.kernel_errors and n_minus_1.checks["ex3_mean_tests"] != "passed"
    assert faked.fails == {"ex2_square_tests"}
    assert faked.checks["ex2_square_tests"] != "passed"
    assert raises.fails == {"ex1_add_tests"} and "NameError" in raises.kernel_errors["ex1_add_tests"]
    everything = {"ex1_add_tests", "ex2_square_tests", "ex3_mean_tests"}
    assert hangs.fails == everything and "timed out" in hangs.describe("ex1_add_tests")
    assert exits.fails == everything and "died" in exits.describe("ex1_add_tests")


def test_a_test_cell_reading_a_demo_variable_is_found(tmp_path):
    import nbformat

    from tests.mini_course import CHAPTER, make_course, source_notebook

    root = make_course(tmp_path / "course")
    nb = source_notebook()
    nb.cells.insert(2, nbformat.v4.new_code_cell("import math\ndata = [1, 2, 3]\n"))  # a demo
    nb.cells[-1].source += "check_close(mean(data), 2.0, name='mean(data)')\n"
    nbformat.write(nb, str(root / "solutions" / CHAPTER / f"{CHAPTER}.ipynb"))
    assert demo_names_read_by_tests(CHAPTER, root) == {"ex3_mean_tests": ["data"]}

"""Trust: "implement it yourself" holds however the forbidden function is reached.

Each submission below reaches a function chapter 3's exercise forbids by a route that the hidden
tests' ``forbidden()`` (which swaps names inside the student's own kernel) does not patch, most of
them obfuscated so that no name-matching flag fires. They are graded as the grader does it
(tests/answer_harness.py): the in-kernel tests, and the trusted checks in a fresh process per
exercise with the forbidden functions blocked (grader/trusted_runner.py). Each must score 0 on
exactly its exercise, with the forbidden call named; honest answers that use allowed torch
functions must keep every point. The same routes through the real grader and its sandbox, with
the forged trusted checks of class 2, are in test_trust_grader.py.
"""

from __future__ import annotations

import pytest

from grader import flags as F
from grader import trusted
from grader.course import list_chapters
from tests.answer_harness import grade_cases
from tests.grading_helpers import REPO

CHAPTER = "ch03_losses"
CE_SIGNATURE = "def cross_entropy(logits, targets, label_smoothing=0.0, ignore_index=-100"
CE_CALL = "logits, targets, label_smoothing=label_smoothing, ignore_index=ignore_index"

# name -> (answer cell, its replacement, the exercise that must fail ("+ex4": and exercise 4,
# whose solution calls the student's log_softmax), a word the forbidden call's name contains)
ROUTES = {
    "default_argument": ("ex4_cross_entropy", f"""\
import torch.nn.functional as _fn
{CE_SIGNATURE}, _f=getattr(_fn, "cross_" + "entropy")):
    return _f({CE_CALL})
""", "ex4_cross_entropy_tests", "cross_entropy"),
    "closure": ("ex3_log_softmax", """\
def _make():
    f = getattr(torch, "log_" + "softmax")
    def inner(logits, dim=-1):
        return f(logits, dim=dim)
    return inner
log_softmax = _make()
""", "ex3_log_softmax_tests+ex4", "softmax"),
    "container": ("ex3_log_softmax", """\
_table = {"ls": getattr(torch.Tensor, "log_" + "softmax")}
def log_softmax(logits, dim=-1):
    return _table["ls"](logits, dim)
""", "ex3_log_softmax_tests+ex4", "softmax"),
    "class_attribute": ("ex3_log_softmax", """\
import torch.nn.functional as _fn
class _Helper:
    go = staticmethod(vars(_fn)["log_" + "softmax"])
def log_softmax(logits, dim=-1):
    return _Helper.go(logits, dim=dim)
""", "ex3_log_softmax_tests+ex4", "softmax"),
    "partial": ("ex1_huber", """\
import functools
import torch.nn.functional as _fn
_h = functools.partial(getattr(_fn, "huber" + "_loss"), reduction="mean")
def huber_loss(pred, target, delta=1.0):
    return _h(pred, target, delta=delta)
""", "ex1_huber_tests", "huber"),
    "function_copy": ("ex1_huber", """\
import types
import torch.nn.functional as _fn
_orig = getattr(_fn, "huber" + "_loss")
_copy = types.FunctionType(getattr(_orig, "__co" + "de__"), getattr(_orig, "__glo" + "bals__"))
def huber_loss(pred, target, delta=1.0):
    return _copy(pred, target, "mean", delta, None)
""", "ex1_huber_tests", "huber"),
    "private_c_entry_point": ("ex3_log_softmax", """\
_ops = getattr(torch, "ops")
def log_softmax(logits, dim=-1):
    return getattr(_ops.aten, "_log" + "_softmax")(logits, dim, False)
""", "ex3_log_softmax_tests+ex4", "aten::_log_softmax"),
    "c_binding": ("ex4_cross_entropy", f"""\
_nn = getattr(torch._C, "_n" + "n")
{CE_SIGNATURE}):
    return getattr(_nn, "cross_entropy" + "_loss")(logits, targets, None, 1, ignore_index, label_smoothing)
""", "ex4_cross_entropy_tests", "cross_entropy"),
    "reload_module": ("ex1_huber", """\
import importlib as _il
_fresh = _il.reload(_il.import_module("torch.nn." + "functional"))
def huber_loss(pred, target, delta=1.0):
    return _fresh.huber_loss(pred, target, delta=delta)
""", "ex1_huber_tests", "functional.py"),
    "rerun_reference_file": ("ex5_fit_categorical", """\
import importlib as _il
_path = _il.import_module("course_lib.lo" + "sses").__file__
with open(_path) as _fh:
    _code = _fh.read()
_ns = {}
getattr(_il.import_module("built" + "ins"), "ex" + "ec")(_code, _ns)
fit_categorical = _ns["fit_categorical"]
""", "ex5_fit_categorical_tests", "losses.py"),
    "reference_alias": ("ex5_fit_categorical", """\
import sys as _s
_mod = _s.modules["course_lib." + "losses"]
_fit = getattr(_mod, "fit_" + "categorical")
def fit_categorical(samples, num_classes, alpha=0.0):
    return _fit(samples, num_classes, alpha)
""", "ex5_fit_categorical_tests", "fit_categorical"),
    "rebound_forbidden": ("ex3_log_softmax", """\
import contextlib as _cl
globals()["forb" + "idden"] = lambda *a, **k: _cl.nullcontext()
def log_softmax(logits, dim=-1):
    return torch.log_softmax(logits, dim=dim)
""", "ex3_log_softmax_tests+ex4", "softmax"),
    "garbage_collector_walk": ("ex3_log_softmax", """\
import sys as _s
_g = _s.modules["g" + "c"]
_found = [o for o in getattr(_g, "get_" + "objects")() if getattr(o, "__name__", "") == "log_softmax"
          and callable(o)]
def log_softmax(logits, dim=-1):
    return _found[0](logits, dim=dim)
""", "ex3_log_softmax_tests+ex4", "gc.get_objects"),
}

HONEST = {
    # Allowed torch functions (logsumexp is not forbidden in exercise 4; bincount in 5) and
    # a different but correct formulation of each answer.
    "ex1_huber": """\
def huber_loss(pred, target, delta=1.0):
    r = (pred - target).abs()
    quadratic = torch.clamp(r, max=delta)
    return (0.5 * quadratic**2 + delta * (r - quadratic)).mean()
""",
    "ex3_log_softmax": """\
def log_softmax(logits, dim=-1):
    m = torch.max(logits, dim=dim, keepdim=True).values.detach()
    return logits - m - (logits - m).exp().sum(dim, keepdim=True).log()
""",
    "ex5_fit_categorical": """\
def fit_categorical(samples, num_classes, alpha=0.0):
    counts = torch.zeros(num_classes, dtype=torch.float64)
    counts.index_add_(0, samples.reshape(-1), torch.ones(samples.numel(), dtype=torch.float64))
    return (counts + alpha) / (samples.numel() + num_classes * alpha)
""",
}


@pytest.fixture(scope="module")
def graded():
    cases = [{"name": name, "answers": {cell: source}} for name, (cell, source, _, _) in ROUTES.items()]
    cases.append({"name": "honest", "answers": HONEST})
    return {r.name: r for r in grade_cases(CHAPTER, cases)}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_forbidden_route_scores_zero_and_names_the_call(graded, route):
    _, _, exercise, word = ROUTES[route]
    result = graded[route]
    # Exercise 4's solution calls the student's log_softmax: a forbidden one costs both.
    expected = {exercise, "ex4_cross_entropy_tests"} if exercise.endswith("+ex4") else {exercise}
    exercise = exercise.removesuffix("+ex4")
    expected = {e.removesuffix("+ex4") for e in expected}
    assert result.fails == expected, f"{route}: {result.fails}: {result.describe(exercise)}"
    assert "which this exercise forbids" in result.checks[exercise], result.describe(exercise)
    assert word in result.checks[exercise], result.describe(exercise)


def test_honest_answers_with_allowed_torch_functions_keep_every_point(graded):
    assert graded["honest"].fails == set(), {c: graded["honest"].describe(c) for c in graded["honest"].fails}


def test_forbidden_targets_are_read_from_the_hidden_tests():
    source = ('t_forbidden = ("torch.softmax", "course_lib.losses.cross_entropy")\n'
              'with forbidden(*t_forbidden, namespace=globals()):\n    pass\n'
              'with forbidden("torch.log_softmax"):\n    pass\n')
    assert trusted.forbidden_targets(source) == ["torch.softmax", "course_lib.losses.cross_entropy",
                                                 "torch.log_softmax"]
    assert trusted.forbidden_targets("x = 1\n") == []


@pytest.mark.parametrize("chapter", list_chapters(REPO))
def test_every_chapter_names_what_it_forbids(chapter):
    """Each chapter's hidden tests forbid something the trusted checks can block (a typo in a
    target would silently block nothing)."""
    import nbformat

    from grader import trusted_runner

    path = REPO / "solutions" / chapter / f"{chapter}.ipynb"
    forbidden = trusted.chapter_forbidden(nbformat.read(path, as_version=4))
    targets = [t for ts in forbidden.values() for t in ts]
    assert targets, f"{chapter} forbids nothing"
    for target in targets:
        if target.startswith("course_lib."):
            assert trusted.reference_modules([target]), f"{target} is not in course_lib"
        else:
            assert trusted_runner._resolve(target) is not None, f"{target} does not exist in torch"


def test_withheld_course_lib_keeps_everything_else(tmp_path):
    package = trusted.withheld_course_lib(tmp_path, ["course_lib.losses.cross_entropy",
                                                     "course_lib.regularization.EarlyStopping.step"])
    losses = (package / "losses.py").read_text()
    assert "course_lib.losses.cross_entropy is withheld while grading" in losses
    assert "withheld while grading" not in losses.split("def log_softmax")[1][:300]
    regularization = (package / "regularization.py").read_text()
    assert "course_lib.regularization.EarlyStopping.step is withheld" in regularization


def test_static_flags_for_rebinding_test_helpers_and_importing_references():
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    release = new_notebook(cells=[new_code_cell("from course_lib.checks import check_close, forbidden\n"
                                                "import course_lib.losses as ref\n")])
    submitted = new_notebook(cells=[
        release.cells[0],
        new_code_cell("import course_lib.losses as mine\ndef forbidden(*a):\n    pass\n"),
        new_code_cell('globals()["check_close"] = print\n'),
        new_code_cell("from course_lib import losses\nx = torch.softmax(y, 0)\n"),
    ])
    found = F.trust_flags(nbformat.from_dict(submitted), release, {"course_lib.losses"})
    text = "\n".join(found)
    assert "rebinds forbidden" in text and "rebinds check_close" in text
    assert text.count("imports course_lib.losses") == 2
    honest = new_notebook(cells=[release.cells[0], new_code_cell("def log_softmax(x):\n    return x\n")])
    assert F.trust_flags(honest, release, {"course_lib.losses"}) == []
    # An edited setup cell: only what the edit added (its own imports are the release's).
    edited = new_notebook(cells=[new_code_cell(release.cells[0].source + "import numpy as np\n"
                                               "forbidden = None\n")])
    assert F.trust_flags(edited, release, {"course_lib.losses"}) == [
        "suspicious: rebinds forbidden, a helper the tests use in cell 1, line 4"]


def test_messages_read_out_of_order_are_attributed_to_their_probe():
    """The runner's control and data pipes are read in turn: a child's "loaded" can be read before
    the "probe" that preceded it, and a "done" before the child's last message. Neither may be lost."""
    import io
    import os
    import types

    import torch

    from grader.trusted import _Session
    from grader.trusted_runner import as_tensors, encode

    read_fd, write_fd = os.pipe()
    sent = io.BytesIO()
    proc = types.SimpleNamespace(stdout=os.fdopen(read_fd, "rb"), stdin=sent)
    job = {"probes": [{"test_cell": "a_tests"}, {"test_cell": "b_tests"}], "owners": {}}
    inputs = {"0": {"x": torch.ones(1)}, "1": {"x": torch.zeros(1)}}
    session = _Session(proc, -1, job, inputs)

    def out(i):
        return {"index": i, "outputs": encode({"0": as_tensors(torch.full((1,), float(i)))})}

    session.on_data({"index": 0, "loaded": 0})  # before its "probe": waits
    session.on_control({"probe": 0})
    assert 0 in session.sent
    for message in (out(0), {"index": 1, "loaded": 1}):  # in the pipe when "done 0" is read
        body = __import__("json").dumps(message).encode()
        os.write(write_fd, len(body).to_bytes(8, "big") + body)
    session.on_control({"done": 0, "status": 0})
    session.on_control({"probe": 1})
    session.on_data(out(1))
    session.on_control({"done": 1, "status": 0})
    assert sorted(session.outputs) == ["0", "1"] and session.errors == {}
    assert float(session.outputs["1"]["out"]) == 1.0
    os.close(write_fd)
    proc.stdout.close()

"""The trusted checks of every chapter (solutions/<chapter>/probes.py) and the comparison they use.

Every graded test cell must have exactly one probe. Whether the probes pass the solution, fail the
blank release and catch the wrong answers is checked with the in-kernel tests, in
tests/test_answers.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from grader import probes as P
from grader.course import list_chapters
from tests.grading_helpers import REPO, cells_by_role

CHAPTERS = list_chapters(REPO)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_test_cell_has_one_probe(chapter):
    _, tests = cells_by_role(json.loads((REPO / "solutions" / chapter / f"{chapter}.ipynb").read_text()))
    probes = P.load_probes(REPO / "solutions" / chapter / "probes.py")
    assert sorted(p.test_cell for p in probes) == sorted(tests)


# -- the shared comparison the grader and the chapters' checks use -------------------------------


def _t(*values, dtype=None):
    return torch.tensor(values, dtype=dtype or torch.float64)


def test_compare_outputs_accepts_agreement_within_tolerance():
    want = {"out": _t(1.0, -2.0, float("nan"), float("inf")), "aux": _t(1e3)}
    got = {"out": _t(1.0 + 1e-10, -2.0, float("nan"), float("inf")), "aux": _t(1e3 + 1e-4)}
    assert P.compare_outputs(want, got, {"aux": (1e-6, 0)}, (1e-9, 1e-12)) is None


@pytest.mark.parametrize("got, reason", [
    ({"out": _t(1.0, 2.0)}, "returned"),  # a missing key
    ({"out": _t(1.0, 2.0), "aux": _t(1.0, 2.0, 3.0)}, "shape"),
    ({"out": _t(1.0, 2.0, dtype=torch.float32), "aux": _t(0.0, 0.0)}, "dtype"),
    ({"out": _t(1.0, float("nan")), "aux": _t(0.0, 0.0)}, "NaN"),
    ({"out": _t(1.0, 2.0), "aux": _t(float("inf"), 0.0)}, "not finite"),
    ({"out": _t(1.0, 2.001), "aux": _t(0.0, 0.0)}, "max abs difference 0.001"),
])
def test_compare_outputs_names_what_differs(got, reason):
    want = {"out": _t(1.0, 2.0), "aux": _t(0.0, 0.0)}
    found = P.compare_outputs(want, got, default=(1e-6, 1e-9))
    assert found is not None and reason in found, found


def test_compare_outputs_infinities_and_normwise():
    assert "infinite" in P.compare_outputs({"x": _t(float("inf"))}, {"x": _t(-float("inf"))})
    want, got = {"x": _t(1000.0, 1e-6)}, {"x": _t(1000.0, 2e-6)}
    assert P.compare_outputs(want, got, default=(1e-6, 0)) is not None  # elementwise: too far
    assert P.compare_outputs(want, got, default=(1e-6, 0), normwise=True) is None  # 1e-6 * 1000


# -- the helpers chapters build their probes from ----------------------------------------------------


def test_seeded_draws_are_reproducible_and_within_bounds():
    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return ([P.randint(g, 2, 4) for _ in range(200)], P.uniform(g, -1.0, 3.0, (500,)),
                P.powers_of_ten(g, -3, 2, 50), P.log_uniform(g, 0.1, 100.0), P.random_shape(g, 3, 1, 2))

    ints, floats, powers, scale, shape = draws(7)
    assert set(ints) == {2, 3, 4}  # both ends included
    assert floats.dtype == P.F64 and -1.0 <= floats.min() and floats.max() < 3.0
    assert 1e-3 <= powers.min() and powers.max() < 1e2 and 0.1 <= scale <= 100.0
    assert len(shape) == 3 and set(shape) <= {1, 2} and all(type(s) is int for s in shape)
    again = draws(7)
    assert again[0] == ints and torch.equal(again[1], floats) and again[3] == scale


def _square(x):
    return x * x


def _square_calls(square, x):
    out = square(x["x"])
    return {"out": out, "twice": square(out.clone())}


def _square_probe(**options):
    return P.same_as("ex_square_tests", _square, lambda g: {"x": torch.randn(5, generator=g, dtype=P.F64)},
                     _square_calls, rtol=1e-12, atol=0, **options)


def _verdict(probe, namespace):
    """The verdict of ``probe`` against the functions in ``namespace``, through the trusted runner."""
    from grader import trusted_runner

    inputs = P.make_inputs([probe], 3)
    run = trusted_runner.in_process(namespace, [{"run": probe.run, "forbid": []}], [], inputs)
    return P.decide([probe], inputs, run["payload"])["ex_square_tests"]


def _square_and_clobber(x):
    y = x * x
    x.zero_()
    return y


@pytest.mark.parametrize("function, options, passed, reason", [
    (_square, {}, True, ""),
    (lambda x: x * x + 1e-9, {}, False, "differs"),
    # A result's dtype is checked only where the task states it (same_dtype names those keys):
    (lambda x: (x * x).float().double(), {}, False, "differs"),  # float32 rounding still shows...
    (lambda x: x * x, {"same_dtype": "out"}, True, ""),
    (lambda x: (x * x).to(torch.float32), {"same_dtype": "out"}, False, "out: dtype"),
    (_square_and_clobber, {}, True, ""),  # squares right, but changes x...
    (_square_and_clobber, {"check_inputs_unchanged": True}, False, "changed its input x"),  # ...caught
    (_square, {"check_inputs_unchanged": True}, True, ""),
])
def test_same_as_compares_the_students_calls_with_the_references(function, options, passed, reason):
    verdict = _verdict(_square_probe(**options), {"_square": function})
    assert verdict.passed == passed and reason in verdict.reason, verdict


def test_same_as_leaves_the_dtype_alone_unless_asked():
    """A float32 result within tolerance of the float64 reference passes by default."""
    probe = P.same_as("ex_square_tests", _square, lambda g: {"x": torch.randn(5, generator=g, dtype=P.F64)},
                      args=("x",), rtol=1e-5, atol=1e-6)
    assert _verdict(probe, {"_square": lambda x: (x * x).float()}).passed


def test_same_as_with_args_and_with_a_name():
    probe = P.same_as("ex_square_tests", _square, lambda g: {"x": torch.randn(4, generator=g)}, args=("x",),
                      name="square", rtol=0, atol=0)
    assert _verdict(probe, {"square": lambda x: x**2}).passed
    assert "raised KeyError" in _verdict(probe, {"_square": _square}).reason


def test_probe_runs_travel_without_the_grader_package(tmp_path):
    """The sandbox has torch and course_lib but no ``grader``: a run made by same_as, wrapped by
    check_inputs_unchanged, or calling this module's draws must unpickle and run there."""
    import subprocess
    import sys

    import cloudpickle

    from grader.probes import randint  # as chapters import it: the module itself cannot travel

    probe = _square_probe(check_inputs_unchanged=True)
    draws = P.Probe("ex_draws_tests", inputs=lambda g: {}, check=lambda x, out: None,
                    run=lambda ns, x: torch.tensor([randint(torch.Generator().manual_seed(1), 0, 9)]))
    this_module = sys.modules[__name__]  # importable here, not there: like a chapter's probes.py
    cloudpickle.register_pickle_by_value(this_module)
    try:
        (tmp_path / "runs.pkl").write_bytes(cloudpickle.dumps([probe.run, draws.run]))
    finally:
        cloudpickle.unregister_pickle_by_value(this_module)
    script = ("import pickle, sys, torch\n"
              "sys.modules['grader'] = None  # as in the sandbox: importing it fails\n"
              "square, draws = pickle.load(open(sys.argv[1], 'rb'))\n"
              "out = square({'_square': lambda x: x * x}, {'x': torch.tensor([3.0])})\n"
              "print(sorted(out), float(out['twice']), int(draws({}, {})[0]) in range(10))\n")
    found = subprocess.run([sys.executable, "-c", script, str(tmp_path / "runs.pkl")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == f"{[P.INPUT_AFTER + 'x', 'out', 'twice']} 81.0 True"

"""Trusted checks: every autograded exercise is confirmed outside the student's process.

Tests that run in the student's kernel can be made to pass by the student's own code (an
``__eq__`` that is always true, a patched ``torch.allclose``, an IPython hook that rewrites the
test cell). So each test cell also has a *probe*, written by the chapter author in
``solutions/<chapter>/probes.py``::

    PROBES = [
        Probe("ex1_sigmoid_tests",
              inputs=lambda g: {"x": 50 * torch.randn(1000, generator=g)},
              run=lambda ns, x: ns["sigmoid"](x["x"]),        # runs with the student's answers
              expected=lambda x: torch.sigmoid(x["x"]),        # runs in the grader
              rtol=1e-5, atol=1e-7),
    ]

At grading time the grader draws a secret seed and makes each probe's inputs. After the notebook
has run, a fresh sandboxed process loads only the student's answer cells (grader/trusted.py and
grader/trusted_runner.py: what the exercise forbids is blocked there), then receives the inputs,
calls ``run`` on them and sends back the outputs as plain tensors (safetensors). Only ``run`` is
sent there; ``inputs``, ``expected`` and ``check`` stay in the grader, which decodes the outputs
in its own process, where no student code ever ran, and compares them with ``expected`` (or lets
``check`` decide). A test cell keeps its points only when its in-kernel tests passed *and* its
probe agrees; a pass the probe contradicts scores 0 and is flagged.

Most probes call the student's function and course_lib's reference the same way and compare the
results: :func:`same_as` builds that probe from one function that makes the calls. The seeded
draws that recur (:func:`randint`, :func:`uniform`, :func:`log_uniform`, :func:`powers_of_ten`,
:func:`random_shape`) and the dtypes ``F32``, ``F64``, ``I64`` live here too. A worked example::

    from course_lib import losses as ref
    from grader.probes import F64, random_shape, same_as, uniform

    def _huber_inputs(g):
        shape = random_shape(g, 3, 1, 6)
        return {"pred": torch.randn(shape, generator=g, dtype=F64),
                "target": torch.randn(shape, generator=g, dtype=F64),
                "delta": uniform(g, 0.1, 3.0)}

    def _huber_calls(huber_loss, x):      # the student's function, then the reference
        return {"loss": huber_loss(x["pred"], x["target"], delta=float(x["delta"])),
                "loss_default": huber_loss(x["pred"], x["target"])}

    PROBES = [
        same_as("ex1_huber_tests", ref.huber_loss, _huber_inputs, _huber_calls,
                rtol=1e-5, atol=1e-6, check_inputs_unchanged=True),
    ]

Everything ``run`` reaches is sent to the sandbox with cloudpickle, where the ``grader`` package
does not exist: this module's functions are pickled by value (see the end of the imports), so
``run`` may call the helpers imported by name (``from grader.probes import randint``), but not
through the module object (``probes.randint``: a module is pickled by reference), and not
grader.trusted_runner's functions (``as_tensors``).
"""

from __future__ import annotations

import importlib.util
import math
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import torch

from grader.trusted_runner import as_tensors, decode, encode  # noqa: F401 - part of this module's API

# A probe's ``run`` (and whatever it calls) is sent to the sandbox with cloudpickle, which pickles
# the functions of an importable module by reference: there, ``import grader`` would fail. This
# module's functions and closures (same_as's calls, the seeded draws) travel by value instead.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

Tensors = dict[str, torch.Tensor]
Tolerances = dict[str, tuple[float, float]]

F32, F64, I64 = torch.float32, torch.float64, torch.int64

# Where the inputs as they are after ``run`` travel back among its outputs (check_inputs_unchanged).
INPUT_AFTER = "input after the call:"


@dataclass(frozen=True)
class Probe:
    """How to confirm one test cell: inputs from a seeded generator, the call in the student's
    kernel, and either the expected outputs (compared with ``rtol``/``atol``) or a ``check``
    that returns why the outputs are wrong (or None when they are right).

    ``check_inputs_unchanged``: the answer must leave the input tensors ``run`` hands it as they
    were. ``run`` is then wrapped so that it also returns every input as it is after the call, and
    the grader compares those with its own untouched copy (exactly: values, dtype, shape) before
    ``expected``/``check`` see the outputs. It covers the tensors of the inputs dict that ``run``
    passes on as they are; a clone ``run`` makes (e.g. a leaf for autograd) is not covered.
    """

    test_cell: str
    inputs: Callable[[torch.Generator], Tensors]
    run: Callable[[dict[str, Any], Tensors], Any]
    expected: Callable[[Tensors], Any] | None = None
    check: Callable[[Tensors, Tensors], str | None] | None = None
    rtol: float = 1e-5
    atol: float = 1e-8
    check_inputs_unchanged: bool = False

    def __post_init__(self):
        if (self.expected is None) == (self.check is None):
            raise ValueError(f"probe {self.test_cell}: give exactly one of expected= or check=")
        if self.check_inputs_unchanged:
            object.__setattr__(self, "run", _returning_inputs(self.run))


Run = Callable[[dict[str, Any], Tensors], Any]


def _returning_inputs(run: Run) -> Run:
    """``run`` that also returns the inputs as they are after the call, under keys starting with
    INPUT_AFTER. Runs in the sandbox: it keys the outputs as as_tensors would, without calling it
    (grader.trusted_runner cannot be imported there)."""
    def run_and_return_inputs(ns: dict[str, Any], x: Tensors) -> dict[str, Any]:
        outputs = run(ns, x)
        if isinstance(outputs, dict):
            named = dict(outputs)
        elif isinstance(outputs, (tuple, list)):
            named = {str(i): v for i, v in enumerate(outputs)}
        else:
            named = {"out": outputs}
        named.update({INPUT_AFTER + key: value for key, value in x.items()})
        return named

    return run_and_return_inputs


def _changed_input(inputs: Tensors, outputs: Tensors) -> str | None:
    """Which input the call changed (outputs holds them under INPUT_AFTER), or None."""
    after = {key[len(INPUT_AFTER):]: value for key, value in outputs.items() if key.startswith(INPUT_AFTER)}
    for key, before in inputs.items():
        if key not in after:
            return f"input {key} did not come back from the call"
        reason = compare_outputs({key: before}, {key: after[key]}, default=(0.0, 0.0), same_dtype="")
        if reason is not None:
            return f"the call changed its input {key} ({reason})"
    return None


@dataclass
class Verdict:
    passed: bool
    reason: str = ""


def load_probes(path: Path) -> list[Probe]:
    """``PROBES`` from a chapter's probes.py (raises with the file's name when it is malformed)."""
    spec = importlib.util.spec_from_file_location(f"n2l_probes_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    probes = getattr(module, "PROBES", None)
    if not isinstance(probes, list) or not all(isinstance(p, Probe) for p in probes):
        raise ValueError(f"{path} must define PROBES, a list of grader.probes.Probe")
    return probes


# -- seeded draws for ``inputs`` (they also work in ``run``: this module travels by value) -------


def randint(g: torch.Generator, low: int, high: int) -> int:
    """One integer in [low, high], both included."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def uniform(g: torch.Generator, low: float, high: float, size: int | tuple[int, ...] = (),
            dtype: torch.dtype = F64) -> torch.Tensor:
    """Uniform values in [low, high) of shape ``size`` (a 0-d tensor by default)."""
    return low + (high - low) * torch.rand(size, generator=g, dtype=dtype)


def powers_of_ten(g: torch.Generator, low_exp: float, high_exp: float,
                  size: int | tuple[int, ...] = ()) -> torch.Tensor:
    """10 ** e for e uniform in [low_exp, high_exp) (float64): magnitudes spread over decades."""
    return 10 ** uniform(g, low_exp, high_exp, size)


def log_uniform(g: torch.Generator, low: float, high: float) -> float:
    """One log-uniform number in [low, high] (a scale for a tensor of ordinary values)."""
    return math.exp(math.log(low) + (math.log(high) - math.log(low)) * float(torch.rand(1, generator=g)))


def random_shape(g: torch.Generator, ndim: int, low: int, high: int) -> tuple[int, ...]:
    """A shape of ``ndim`` sizes, each in [low, high], both included."""
    return tuple(torch.randint(low, high + 1, (ndim,), generator=g).tolist())


# -- the usual probe: the student's function against the reference, called the same way ----------


def same_as(test_cell: str, reference: Callable | tuple[Callable, ...],
            inputs: Callable[[torch.Generator], Tensors], calls: Callable[..., Any] | None = None, *,
            args: tuple[str, ...] = (), name: str | tuple[str, ...] | None = None,
            rtol: float, atol: float, tolerances: Tolerances | None = None, normwise: bool = False,
            same_dtype: str | None = None, check_inputs_unchanged: bool = False) -> Probe:
    """A probe that calls the student's function where the test cell's exercise defines it, and
    ``reference`` in the grader, in the same way, and compares what the two return.

    - ``calls(function, inputs)`` makes the calls and returns the outputs to compare (a tensor,
      number, or a dict/tuple of them); it is called once with the student's function (in the
      sandbox) and once with ``reference`` (in the grader). Several calls, options and edge cases
      go in it. Without ``calls``, the function is called once on ``inputs[a] for a in args``.
    - The student's function is ``ns[name]``; ``name`` defaults to ``reference.__name__``
      (course_lib's references have the exercise's names).
    - Exercises with several functions: ``reference`` and ``name`` are tuples, and ``calls``
      receives the functions in that order: ``calls(encode, decode, inputs)``.
    - Compared with :func:`compare_outputs`: ``rtol``/``atol`` for every key, but those in
      ``tolerances``; ``normwise``, and the dtype kept for keys starting with ``same_dtype`` (off
      by default: a result's dtype is checked only where the task text states it, e.g. "out").
    - ``check_inputs_unchanged``: see :class:`Probe` (``calls`` must pass the inputs' tensors
      themselves to the student's function for this to cover them).
    """
    references = reference if isinstance(reference, tuple) else (reference,)
    names = name if isinstance(name, tuple) else (name,) if name is not None else \
        tuple(r.__name__ for r in references)
    if len(names) != len(references):
        raise ValueError(f"probe {test_cell}: {len(names)} names for {len(references)} references")
    if calls is None:
        if len(references) != 1:
            raise ValueError(f"probe {test_cell}: several functions need calls=")

        def calls(function: Callable, x: Tensors) -> Any:
            return function(*(x[a] for a in args))

    def run(ns: dict[str, Any], x: Tensors) -> Any:
        return calls(*(ns[n] for n in names), x)

    def check(x: Tensors, got: Tensors) -> str | None:
        want = as_tensors(calls(*references, x))
        return compare_outputs(want, got, tolerances, (rtol, atol), normwise=normwise, same_dtype=same_dtype)

    return Probe(test_cell, inputs=inputs, run=run, check=check,
                 check_inputs_unchanged=check_inputs_unchanged)


# -- plain tensors in and out (one home: grader/trusted_runner.py, which runs in the sandbox) ------


def make_inputs(probes: list[Probe], seed: int) -> dict[str, Tensors]:
    named = {}
    for i, probe in enumerate(probes):
        generator = torch.Generator().manual_seed((seed + 7919 * i) % 2**63)
        named[str(i)] = as_tensors(probe.inputs(generator))
    return named


def new_seed() -> int:
    return secrets.randbits(62)


# -- in the grader ------------------------------------------------------------------------------


def compare_outputs(want: Tensors, got: Tensors, tolerances: dict[str, tuple[float, float]] | None = None,
                    default: tuple[float, float] = (1e-9, 1e-12), *, normwise: bool = False,
                    same_dtype: str | None = "out") -> str | None:
    """Why ``got`` differs from the reference outputs ``want``, or None when it agrees.

    Per key, compared in float64: the same keys and shapes; the same dtype for keys starting with
    ``same_dtype``; NaN and infinities exactly where the reference has them; finite values within
    ``tolerances[key]`` (else ``default``), an (rtol, atol) pair: elementwise
    ``|got - want| <= atol + rtol * |want|``, or with ``normwise`` against the largest |want|
    (for sums of many terms whose small entries carry the rounding of the large ones).
    """
    tolerances = tolerances or {}
    if set(got) != set(want):
        return f"returned {sorted(got)}, expected {sorted(want)}"
    for key, w in want.items():
        g = got[key]
        if tuple(g.shape) != tuple(w.shape):
            return f"{key}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        if same_dtype is not None and key.startswith(same_dtype) and g.dtype != w.dtype:
            return f"{key}: dtype {g.dtype}, expected {w.dtype}"
        g64, w64 = g.to(torch.float64), w.to(torch.float64)
        if not torch.equal(torch.isnan(g64), torch.isnan(w64)):
            return f"{key}: NaN where the reference has none (or the reverse)"
        infinite = torch.isinf(w64)
        if not torch.equal(g64[infinite], w64[infinite]):
            return f"{key}: infinite values differ from the reference"
        finite = torch.isfinite(w64)
        if not finite.any():
            continue
        g_fin, w_fin = g64[finite], w64[finite]
        if not torch.isfinite(g_fin).all():
            return f"{key}: values that are not finite where the reference's are"
        rtol, atol = tolerances.get(key, default)
        error = (g_fin - w_fin).abs()
        scale = w_fin.abs().max() if normwise else w_fin.abs()
        if (error > atol + rtol * scale).any():
            return f"{key}: differs from the reference (max abs difference {error.max().item():.3g})"
    return None


def checker(reference: Callable[[Tensors], Tensors], tolerances: Tolerances | None = None,
            default: tuple[float, float] = (1e-9, 1e-12),
            **options: Any) -> Callable[[Tensors, Tensors], str | None]:
    """A ``Probe(check=...)`` that compares the outputs with ``reference(inputs)`` (see compare_outputs)."""
    return lambda inputs, outputs: compare_outputs(as_tensors(reference(inputs)), outputs, tolerances,
                                                   default, **options)


def decide(probes: list[Probe], inputs: dict[str, Tensors], payload: dict | None) -> dict[str, Verdict]:
    """The trusted verdict for each probed test cell, from the outputs the kernel sent back."""
    verdicts = {}
    if payload is None:
        return {p.test_cell: Verdict(False, "the trusted checks produced no outputs") for p in probes}
    try:
        outputs = decode(payload.get("outputs", ""))
        errors = payload.get("errors", {})
        if not isinstance(errors, dict):
            raise ValueError("errors is not a mapping")
    except Exception as error:  # noqa: BLE001 - a forged or damaged payload fails every check
        return {p.test_cell: Verdict(False, f"unreadable trusted-check outputs ({error})") for p in probes}
    for i, probe in enumerate(probes):
        key = str(i)
        if key in errors:
            verdicts[probe.test_cell] = Verdict(False, f"raised {str(errors[key])[:300]}")
            continue
        if key not in outputs:
            verdicts[probe.test_cell] = Verdict(False, "no output")
            continue
        try:
            reason = _changed_input(inputs[key], outputs[key]) if probe.check_inputs_unchanged else None
            got = {k: v for k, v in outputs[key].items() if not k.startswith(INPUT_AFTER)}
            if reason is None and probe.check is not None:
                reason = probe.check(inputs[key], got)
            elif reason is None:
                reason = compare_outputs(as_tensors(probe.expected(inputs[key])), got,
                                         default=(probe.rtol, probe.atol), same_dtype=None)
        except Exception as error:  # noqa: BLE001 - e.g. outputs of the wrong dtype
            reason = f"could not be checked ({type(error).__name__}: {error})"
        verdicts[probe.test_cell] = Verdict(reason is None, reason or "")
    return verdicts

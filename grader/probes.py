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
"""

from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grader.trusted_runner import as_tensors, decode, encode  # noqa: F401 - part of this module's API

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Probe:
    """How to confirm one test cell: inputs from a seeded generator, the call in the student's
    kernel, and either the expected outputs (compared with ``rtol``/``atol``) or a ``check``
    that returns why the outputs are wrong (or None when they are right)."""

    test_cell: str
    inputs: Callable[[torch.Generator], Tensors]
    run: Callable[[dict[str, Any], Tensors], Any]
    expected: Callable[[Tensors], Any] | None = None
    check: Callable[[Tensors, Tensors], str | None] | None = None
    rtol: float = 1e-5
    atol: float = 1e-8

    def __post_init__(self):
        if (self.expected is None) == (self.check is None):
            raise ValueError(f"probe {self.test_cell}: give exactly one of expected= or check=")


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


Tolerances = dict[str, tuple[float, float]]


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
            if probe.check is not None:
                reason = probe.check(inputs[key], outputs[key])
            else:
                reason = compare_outputs(as_tensors(probe.expected(inputs[key])), outputs[key],
                                         default=(probe.rtol, probe.atol), same_dtype=None)
        except Exception as error:  # noqa: BLE001 - e.g. outputs of the wrong dtype
            reason = f"could not be checked ({type(error).__name__}: {error})"
        verdicts[probe.test_cell] = Verdict(reason is None, reason or "")
    return verdicts

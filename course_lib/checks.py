"""Checks for the visible tests students run, and :func:`forbidden` for the hidden ones.

On failure every check raises :class:`CheckFailed` (an ``AssertionError``, so nbgrader scores the
cell 0) whose message says *what* was checked, what was expected and what came back — the
shape, the dtype, or the worst value outside the stated tolerance — and, where we can guess it,
the usual mistake behind it.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


class CheckFailed(AssertionError):
    """A visible or hidden test found a wrong answer; the message explains what differed."""


class ForbiddenCall(RuntimeError):
    """Raised when an exercise calls the built-in or reference it is asked to implement."""


def _fail(name: str, message: str, hint: str | None = None) -> None:
    text = f"{name}: {message}"
    if hint:
        text += f"\nHint: {hint}"
    raise CheckFailed(text)


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray | np.generic | int | float | bool | list | tuple):
        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as error:
            _fail(name, f"could not read the value as numbers ({error})")
    _fail(name, f"expected a tensor or numbers, got {type(value).__name__}"
          + (" — did you forget a `return`?" if value is None else ""))
    raise AssertionError  # unreachable, for type checkers


def check_type(actual: Any, expected_type: type | tuple[type, ...], name: str = "result") -> None:
    """Fail unless ``actual`` is an instance of ``expected_type``."""
    if not isinstance(actual, expected_type):
        want = (expected_type.__name__ if isinstance(expected_type, type)
                else " or ".join(t.__name__ for t in expected_type))
        article = "an" if want[:1].lower() in "aeiou" else "a"
        hint = "did you forget a `return`?" if actual is None else None
        _fail(name, f"expected {article} {want}, got {type(actual).__name__}", hint)


def check_shape(actual: Any, expected_shape: Sequence[int], name: str = "result") -> None:
    """Fail unless ``actual`` (a tensor or array) has exactly ``expected_shape``."""
    shape = tuple(_as_tensor(actual, name).shape)
    expected = tuple(int(s) for s in expected_shape)
    if shape != expected:
        hint = None
        if sorted(shape) == sorted(expected):
            hint = "the sizes are right but in the wrong order — a missing transpose?"
        elif len(shape) != len(expected):
            hint = "a different number of dimensions — check keepdim / squeeze / reshape."
        _fail(name, f"expected shape {expected}, got {shape}", hint)


def check_dtype(actual: torch.Tensor, expected_dtype: torch.dtype, name: str = "result") -> None:
    """Fail unless the tensor ``actual`` has ``expected_dtype``."""
    check_type(actual, torch.Tensor, name)
    if actual.dtype != expected_dtype:
        _fail(name, f"expected dtype {expected_dtype}, got {actual.dtype}")


def check_finite(actual: Any, name: str = "result") -> None:
    """Fail if ``actual`` contains NaN or infinity."""
    t = _as_tensor(actual, name)
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        _fail(name, f"contains {t[tuple(bad)].item()} at index {tuple(bad)}",
              "overflow or 0/0: subtract the maximum before exp, or clamp before log.")


def check_close(actual: Any, expected: Any, *, atol: float = 1e-6, rtol: float = 1e-5,
                name: str = "result", check_dtype_too: bool = False) -> None:
    """Fail unless ``actual`` matches ``expected`` elementwise: ``|a - e| <= atol + rtol * |e|``.

    Works for tensors, NumPy arrays and Python numbers. Checks the type (a tensor where a tensor is
    expected), the shape, the dtype when ``check_dtype_too``, finiteness, then the values; the
    message names the worst element.
    """
    if isinstance(expected, torch.Tensor):
        check_type(actual, torch.Tensor, name)
    a = _as_tensor(actual, name)
    e = _as_tensor(expected, "expected")
    if tuple(a.shape) != tuple(e.shape):
        # A 0-d tensor and a Python number are the same answer.
        if not (a.numel() == 1 and e.numel() == 1 and (a.ndim == 0 or e.ndim == 0)):
            check_shape(a, e.shape, name)
    if check_dtype_too and isinstance(expected, torch.Tensor):
        check_dtype(actual, expected.dtype, name)
    if a.dtype == torch.bool or e.dtype == torch.bool:
        a, e = a.to(torch.int64), e.to(torch.int64)
    a64 = a.to(torch.float64).cpu().reshape(e.shape)
    e64 = e.to(torch.float64).cpu()
    if e.numel() == 0:
        return
    expected_finite = torch.isfinite(e64)
    if not torch.equal(torch.isfinite(a64), expected_finite):
        check_finite(a64, name)
    diff = torch.where(expected_finite, (a64 - e64).abs(), torch.zeros_like(e64))
    limit = atol + rtol * e64.abs()
    over = diff > torch.where(expected_finite, limit, torch.full_like(limit, math.inf))
    # inf must match inf of the same sign, and NaN matches NaN (NaN != NaN, hence the second term).
    nonfinite_mismatch = ~expected_finite & (a64 != e64) & ~(a64.isnan() & e64.isnan())
    bad = over | nonfinite_mismatch
    if bad.any():
        _fail_values(a64, e64, bad, diff - limit, nonfinite_mismatch, atol, rtol, name)


def _fail_values(a64: torch.Tensor, e64: torch.Tensor, bad: torch.Tensor, excess: torch.Tensor,
                 nonfinite_mismatch: torch.Tensor, atol: float, rtol: float, name: str) -> None:
    """:func:`check_close`'s failure: how many elements are off, the worst one (a non-finite
    mismatch first, else the largest excess over the tolerance), and a hint when the whole answer
    is the negated or transposed expectation."""
    excess = torch.where(bad, excess, torch.full_like(excess, -math.inf))
    flat = int(torch.argmax(torch.where(nonfinite_mismatch, torch.full_like(excess, math.inf), excess)))
    index = tuple(int(i) for i in np.unravel_index(flat, tuple(e64.shape))) if e64.ndim else ()
    where = f" at index {index}" if index else ""
    got, want = a64.reshape(-1)[flat].item(), e64.reshape(-1)[flat].item()
    count = int(bad.sum())
    message = (f"values differ beyond the tolerance (atol={atol:g}, rtol={rtol:g}) in {count} of "
               f"{e64.numel()} element(s); worst{where}: expected {want:.6g}, got {got:.6g}")
    hint = None
    if e64.numel() > 1 and torch.allclose(a64, -e64, atol=atol, rtol=rtol):
        hint = "every value has the wrong sign."
    elif e64.numel() > 1 and e64.ndim == 2 and e64.shape[0] == e64.shape[1] and torch.allclose(
            a64.T, e64, atol=atol, rtol=rtol):
        hint = "the result is the transpose of what was expected."
    _fail(name, message, hint)


def check_equal(actual: Any, expected: Any, name: str = "result") -> None:
    """Fail unless ``actual == expected`` exactly (for integers, strings, tuples of them)."""
    if isinstance(expected, bool) or not isinstance(expected, int | float):
        if type(actual) is not type(expected) and not (
                isinstance(expected, str) and isinstance(actual, str)):
            check_type(actual, type(expected), name)
    if isinstance(actual, torch.Tensor | np.ndarray | np.generic):
        actual = actual.item() if getattr(actual, "size", 2) == 1 or getattr(
            actual, "numel", lambda: 2)() == 1 else actual
    if isinstance(actual, torch.Tensor | np.ndarray) and isinstance(expected, int | float):
        _fail(name, f"expected the single number {expected!r}, got an array of shape "
              f"{tuple(actual.shape)}", "reduce it to one value (e.g. .sum() or .item()).")
    if isinstance(expected, int) and not isinstance(expected, bool):
        if isinstance(actual, float) and actual.is_integer():
            actual = int(actual)
        check_type(actual, int, name)
    if actual != expected:
        hint = None
        if isinstance(expected, int) and isinstance(actual, int) and expected and actual:
            ratio = actual / expected
            if abs(ratio - round(ratio)) < 1e-9 and round(ratio) > 1:
                hint = f"yours is exactly {round(ratio)}x too large."
        _fail(name, f"expected {expected!r}, got {actual!r}", hint)


def check_true(condition: bool, message: str, hint: str | None = None, name: str = "check") -> None:
    """Fail with ``message`` unless ``condition`` holds."""
    if not bool(condition):
        _fail(name, message, hint)


def check_trajectory(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                     name: str) -> None:
    """Fail at the first step after which the parameters of ``actual`` and ``expected`` differ
    beyond ``|a - e| <= atol + rtol * |e|``: two optimizers' paths, ``(steps + 1, n_params)``
    with row 0 the start, as :func:`course_lib.optimizers.optimizer_trajectory` records them."""
    check_type(actual, torch.Tensor, name)
    check_shape(actual, expected.shape, f"{name} (steps + 1, parameters)")
    for step in range(len(expected)):
        check_close(actual[step], expected[step], atol=atol, rtol=rtol,
                    name=f"{name}: the parameters after step {step}" if step
                    else f"{name}: the starting parameters (the optimizer's constructor changed them)")


# ---------------------------------------------------------------------------------------------
# Forbidding the answer key while a student's function runs
# ---------------------------------------------------------------------------------------------


_ABSENT = object()


def resolve(target: str) -> tuple[Any, str]:
    """Split ``'torch.nn.functional.cross_entropy'`` into (owner object, attribute name)."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:-1]:
            owner = getattr(owner, attr)
        if not hasattr(owner, parts[-1]):
            raise AttributeError(f"{target!r} does not exist, so it cannot be forbidden")
        return owner, parts[-1]
    raise ImportError(f"cannot resolve {target!r}")


@contextlib.contextmanager
def forbidden(*targets: str, namespace: dict[str, Any] | None = None,
              reason: str = "this exercise asks you to implement it yourself") -> Iterator[None]:
    """Make ``targets`` (dotted names) raise :class:`ForbiddenCall` inside the ``with`` block.

    Hidden tests wrap the call of the student's function in it, so that calling the torch
    built-in or course_lib's reference the exercise is about cannot earn the points. Names the
    notebook already bound to those objects (pass ``namespace=globals()``) are blocked as well.
    Everything is restored on exit, even after an exception.
    """
    # (owner, attribute, what to put back); _ABSENT: the attribute was inherited (e.g. a method
    # of torch.Tensor defined on its C base class) or computed, so it is deleted again on exit.
    # For classes the raw class-dict entry is what is restored, so that a staticmethod or
    # classmethod comes back as itself rather than as the plain function getattr returns.
    patched: list[tuple[Any, str, Any]] = []
    originals = []
    try:
        for target in targets:
            owner, attr = resolve(target)
            original = getattr(owner, attr)
            originals.append(original)
            own = getattr(owner, "__dict__", None)
            saved = own.get(attr, _ABSENT) if own is not None else original

            def blocked(*args: Any, _name: str = target, **kwargs: Any) -> Any:
                raise ForbiddenCall(f"{_name} may not be used here: {reason}.")

            setattr(owner, attr, blocked)
            patched.append((owner, attr, saved))
        if namespace is not None:
            for key, value in list(namespace.items()):
                if any(value is original for original in originals):
                    name = next(t for t, o in zip(targets, originals, strict=True) if o is value)

                    def blocked_alias(*args: Any, _name: str = name, **kwargs: Any) -> Any:
                        raise ForbiddenCall(f"{_name} may not be used here: {reason}.")

                    namespace[key] = blocked_alias
                    patched.append((namespace, key, value))
        yield
    finally:
        for owner, attr, original in reversed(patched):
            if isinstance(owner, dict):
                owner[attr] = original
            elif original is _ABSENT:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)

"""The quick-mode switch.

Chapters train real models. Students get the full-size runs by default; CI (and anyone in a hurry)
sets the environment variable ``COURSE_QUICK=1`` to shrink every training run so that a whole
chapter executes in under two minutes on two CPU cores. Chapters never test ``os.environ``
themselves: they call :func:`pick`, so the rule lives in one place.
"""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")

QUICK_ENV = "COURSE_QUICK"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def is_quick() -> bool:
    """True when ``COURSE_QUICK`` is set to 1/true/yes/on (case-insensitive).

    Raises:
        ValueError: for any other value, so that a typo never silently runs the slow mode in CI.
    """
    value = os.environ.get(QUICK_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{QUICK_ENV}={os.environ[QUICK_ENV]!r} is not understood: use {QUICK_ENV}=1 for quick mode "
        f"or unset it (or {QUICK_ENV}=0) for the full chapter."
    )


def pick(full: T, quick: T) -> T:
    """Return ``quick`` in quick mode and ``full`` otherwise, e.g. ``epochs = pick(full=30, quick=2)``."""
    return quick if is_quick() else full

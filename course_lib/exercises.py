"""Let a chapter's demos run on the student's own answers, and on the reference until they exist.

A chapter asks the student to write, say, ``sigmoid``, then plots and trains with it. Until the
exercise is done its body is ``raise NotImplementedError()``; the demos should still run (a
student must be able to Run All from the start), so they fall back to ``course_lib``'s reference
implementation and say so once::

    import course_lib.activations as ref
    from course_lib.exercises import YoursOrReference

    call_yours = YoursOrReference(globals(), ref)
    call_yours("sigmoid", x)             # the notebook's sigmoid(x), or ref.sigmoid(x)
    sigmoid_fn = call_yours.get("sigmoid")  # a function that does the same on every call

The namespace is the notebook's live ``globals()``, so answers written after this cell are found.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any


class YoursOrReference:
    """The notebook's function or class ``name`` if written, else the reference one (said once)."""

    def __init__(self, namespace: dict[str, Any], reference: ModuleType) -> None:
        self.namespace = namespace
        self.reference = reference
        self.announced: set[str] = set()

    def _reference(self, name: str) -> Any:
        if not hasattr(self.reference, name):
            raise AttributeError(f"{self.reference.__name__} has no reference for {name!r}")
        if name not in self.announced:
            print(f"({name} is not written yet: this demo uses course_lib's reference instead)")
            self.announced.add(name)
        return getattr(self.reference, name)

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the notebook's ``name``; the reference's if it is missing or not written yet."""
        mine = self.namespace.get(name)
        if mine is not None:
            try:
                return mine(*args, **kwargs)
            except NotImplementedError:
                pass
        return self._reference(name)(*args, **kwargs)

    def get(self, name: str, probe: Callable[[Any], Any] | None = None) -> Any:
        """The object to use for ``name``.

        With ``probe`` (one cheap use of the object, e.g. building an optimizer and taking a step),
        the notebook's own object is returned if the probe does not raise NotImplementedError,
        else the reference: right for classes, which fail only when used. Without a probe, a
        function that calls :meth:`__call__` each time, so it picks up an answer written later.
        """
        if probe is None:
            def call(*args: Any, **kwargs: Any) -> Any:
                return self(name, *args, **kwargs)

            call.__name__ = name
            return call
        mine = self.namespace.get(name)
        if mine is not None:
            try:
                probe(mine)
                return mine
            except NotImplementedError:
                pass
        return self._reference(name)

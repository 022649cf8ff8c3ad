"""What gradwatch raises and warns with, in one place (the package's top level re-exports both)."""

from __future__ import annotations

from typing import Any


class GradWatchWarning(UserWarning):
    """Every warning gradwatch emits, so that users can filter all of them at once."""


class NonFiniteError(FloatingPointError):
    """Raised by ``nan_strategy="raise"`` when a step's gradients or signal are not finite.

    Attributes:
        report: the step's :class:`~gradwatch.Report`, with the ``nonfinite`` findings (typed
            ``Any`` here: this module sits below the report, which re-exports it).
    """

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report

"""What gradwatch raises and warns with, in one place (the package's top level re-exports both)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Report


class GradWatchWarning(UserWarning):
    """Every warning gradwatch emits, so that users can filter all of them at once."""


class NonFiniteError(FloatingPointError):
    """Raised by ``nan_strategy="raise"`` when a step's gradients or signal are not finite.

    Attributes:
        report: the step's :class:`Report`, with the ``nonfinite`` findings.
    """

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report

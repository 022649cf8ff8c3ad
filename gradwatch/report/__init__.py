"""The words every stage shares: the records of one logging step (:mod:`.records`), the remedy
catalogue the findings cite (:mod:`.remedies`), and how a report reads as text (:mod:`.text`,
with :mod:`.words`). Below every other stage: the probes, the step readout, the diagnosis and
the output all speak it, and it imports none of them.
"""

from __future__ import annotations

from .records import (
    FINDING_KINDS,
    SCHEMA_VERSION,
    SEVERITIES,
    Curvature,
    Finding,
    LayerStats,
    Remedy,
    ReportData,
)
from .text import format_report, layer_table, report_html

__all__ = [
    "FINDING_KINDS",
    "SCHEMA_VERSION",
    "SEVERITIES",
    "Curvature",
    "Finding",
    "LayerStats",
    "Remedy",
    "Report",
]


class Report(ReportData):
    __doc__ = ReportData.__doc__

    def __str__(self) -> str:
        return format_report(self)

    def _repr_html_(self) -> str:  # Jupyter shows this for `gw.report`
        return report_html(self)

    def table(self) -> str:
        """Every layer's numbers as a fixed-width table (``str(report)`` shows a few)."""
        return "\n".join(layer_table(self, list(self.layers.values())))


def __getattr__(name: str):
    if name == "NonFiniteError":  # defined here once: still importable from here
        from ..exceptions import NonFiniteError

        return NonFiniteError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Output sinks: they receive plain :class:`Report` records and never see the model.

Every tag gradwatch writes:

========================================  =====================================================
tag                                       value
========================================  =====================================================
``gradwatch/grad_norm/<layer>``           L2 norm of the layer's own parameters' ``.grad``
``gradwatch/weight_norm/<layer>``         L2 norm of those parameters
``gradwatch/signal/<layer>``              RMS of dL/d(output), the backward signal
``gradwatch/saturation/<layer>``          fraction of activation outputs in the flat region
``gradwatch/dead_units/<layer>``          fraction of units off for the whole batch
``gradwatch/global/grad_norm``            L2 norm over every parameter's ``.grad``
``gradwatch/global/input_rms``            RMS of the model's floating-point inputs
``gradwatch/global/skipped``              1 on a step a GradScaler skips, else 0
``gradwatch/global/findings_<kind>``      number of findings of each kind
``gradwatch/findings`` (text)             markdown table of the findings, written when they change
``gradwatch/findings_json`` (text)        the same as JSON (schema version in it)
========================================  =====================================================

``<layer>`` is the module name (``(root)`` for the model itself). The step is the optimizer step.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

from .remedies import action
from .report import FINDING_KINDS, SCHEMA_VERSION, Finding, Report

log = logging.getLogger("gradwatch")

LAYER_METRICS = ("grad_norm", "weight_norm", "signal", "saturation", "dead_units")


class GradWatchWarning(UserWarning):
    """Every warning gradwatch emits, so that users can filter all of them at once."""


def tag_name(layer: str) -> str:
    return layer or "(root)"


def scalars(report: Report) -> dict[str, float]:
    """The scalar values of one report, keyed by TensorBoard tag."""
    out: dict[str, float] = {}
    for s in report.layers.values():
        for metric in LAYER_METRICS:
            v = getattr(s, metric)
            if v is not None:
                out[f"gradwatch/{metric}/{tag_name(s.name)}"] = float(v)
    if report.global_grad_norm is not None:
        out["gradwatch/global/grad_norm"] = report.global_grad_norm
    if report.input_rms is not None:
        out["gradwatch/global/input_rms"] = report.input_rms
    out["gradwatch/global/skipped"] = float(report.skipped)
    for kind in FINDING_KINDS:
        out[f"gradwatch/global/findings_{kind}"] = float(
            sum(1 for f in report.findings if f.kind == kind)
        )
    return out


def findings_markdown(report: Report) -> str:
    if not report.findings:
        return f"Step {report.step}: no findings."
    rows = [
        f"Step {report.step}: {len(report.findings)} findings.",
        "",
        "| layer | kind | severity | value | threshold | remedies |",
        "|---|---|---|---|---|---|",
    ]
    for f in report.findings:
        rem = "<br>".join(f"**{r.id}**: {r.text}" for r in f.remedies).replace("|", "\\|")
        rows.append(
            f"| `{tag_name(f.layer)}` | {f.kind} | {f.severity} | {_g(f.value)} | "
            f"{_g(f.threshold)} | {rem} |"
        )
    return "\n".join(rows)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


class TensorBoardSink:
    """Writes reports to a ``SummaryWriter``: scalars, and findings as text when they change.

    Args:
        writer: the writer; it is closed by :meth:`close` only when ``owns_writer`` is True.
    """

    def __init__(self, writer: Any, owns_writer: bool) -> None:
        self.writer = writer
        self.owns_writer = owns_writer
        self._last_findings: tuple | None = None

    def write(self, report: Report) -> None:
        self._write_scalars(scalars(report), report.step)
        key = tuple((f.layer, f.kind, f.severity) for f in report.findings)
        if key != self._last_findings:
            self.writer.add_text("gradwatch/findings", findings_markdown(report), report.step)
            payload = {
                "schema_version": SCHEMA_VERSION,
                "step": report.step,
                "findings": [f.to_dict() for f in report.findings],
            }
            self.writer.add_text("gradwatch/findings_json", json.dumps(payload), report.step)
            if self._last_findings is not None or report.findings:
                self.writer.flush()  # a finding is on disk before anything else can go wrong
            self._last_findings = key

    def _write_scalars(self, values: dict[str, float], step: int) -> None:
        # One event for the whole step: an add_scalar call per value costs ~80 us each.
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if file_writer is not None:
            try:
                from tensorboard.compat.proto.summary_pb2 import Summary

                summary = Summary(
                    value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
                )
                file_writer().add_summary(summary, step)
                return
            except (ImportError, AttributeError, TypeError) as e:  # private API moved: fall back
                log.debug("batched scalar write unavailable (%s); using add_scalar", e)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def reopened(self, purge_step: int) -> TensorBoardSink:
        """The same log directory in a new writer that drops events at or after ``purge_step``."""
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.writer.log_dir
        self.writer.close()
        return TensorBoardSink(SummaryWriter(log_dir=log_dir, purge_step=purge_step), True)

    def close(self) -> None:
        if self.owns_writer:
            self.writer.close()
        else:
            self.writer.flush()


class LoggerSink:
    """Any Lightning logger (CSV, W&B, MLflow, ...): the same scalar keys through ``log_metrics``."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def write(self, report: Report) -> None:
        self.logger.log_metrics(scalars(report), step=report.step)


class WarningSink:
    """Warns once per (layer, kind), grouping the new findings of one step by kind."""

    def __init__(self, guard: bool = False) -> None:
        self.warned: set[tuple[str, str]] = set()
        self.guard = guard  # inside optimizer.step(): never let an escalated warning raise there

    def write(self, report: Report) -> None:
        new: dict[str, list[Finding]] = {}
        for f in report.findings:
            if (f.layer, f.kind) not in self.warned:
                self.warned.add((f.layer, f.kind))
                new.setdefault(f.kind, []).append(f)
        for kind, found in new.items():
            text = found[0].message
            if found[0].remedies:
                text += (
                    " Try: "
                    + "; ".join(f"{action(r.id)} ({r.id})" for r in found[0].remedies)
                    + "."
                )
            if len(found) > 1:
                more = ", ".join(f"`{f.layer}`" for f in found[1:6])
                extra = f" and {len(found) - 6} more" if len(found) > 6 else ""
                text += f" ({len(found) - 1} more layers with {kind}: {more}{extra})"
            emit(f"gradwatch step {report.step}: {text}", self.guard)


def emit(message: str, guard: bool = False) -> None:
    """Warn with :class:`GradWatchWarning`; when guarded, an escalated warning is logged instead."""
    try:
        warnings.warn(message, GradWatchWarning, stacklevel=3)
    except Exception:
        if not guard:
            raise
        log.warning(message)  # -W error inside optimizer.step(): never raise into the user's step

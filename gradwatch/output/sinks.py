"""Output sinks: they receive plain :class:`Report` records and never see the model. The tags
they write are listed in :mod:`gradwatch.output.tags`."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

import torch

from ..exceptions import GradWatchWarning
from ..report import FINDING_KINDS, SCHEMA_VERSION, Finding, Report
from ..report import text as render
from . import dashboard, tags
from .heatmaps import Heatmaps
from .tags import layer_tag

log = logging.getLogger("gradwatch")


class Sink(Protocol):
    """Where the engine hands each logging step's :class:`Report` (``GradWatch.add_sink``).

    A sink keeps its own state. ``write`` is required; ``resume`` and ``close`` are called when a
    sink has them. ``write`` runs on gradwatch's background worker when it has one (see the
    ``background`` option), one report at a time and in step order; a sink with a true
    ``on_training_thread`` attribute is written on the training thread instead, at gradwatch's
    next call there.
    """

    def write(self, report: Report) -> None:
        """One logging step's report."""

    def resume(self, step: int, first_seen: Mapping[tuple[str, str], int]) -> None:
        """The run continues from a checkpoint taken before ``step``; ``first_seen`` says when
        each (layer, kind) of finding first appeared, so that none is announced again."""

    def close(self) -> None:
        """Write what is held back and release what the sink opened."""


def use_fast_crc32c() -> bool:
    """Make TensorBoard's event-file checksums use ``google-crc32c``'s C code, when it has it.

    Without TensorFlow, TensorBoard checksums every record with a pure-Python CRC32C: about 4 ms
    for the 20 KB of one step's scalars, on the writer thread but holding the GIL, so training
    waits for it. The C function gives the same checksum (tested against TensorBoard's), for every
    writer in the process, and for reading files back. Returns whether it is in use.
    """
    try:
        import google_crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    except ImportError:
        return False
    if getattr(google_crc32c, "implementation", None) != "c":
        return False  # its own fallback is pure Python too
    pywrap_tensorflow.crc32c = google_crc32c.value  # masked_crc32c looks it up at each call
    return True


def scalars(
    report: Report,
    layers: Collection[str] | None = None,
    values: dashboard.LayerValues | None = None,
) -> dict[str, float]:
    """The scalar values of one report, keyed by TensorBoard tag; per-layer tags only for
    ``layers`` (all when None), plus min/median/max over all layers when some are left out."""
    values = values or dashboard.layer_values(report)
    out: dict[str, float] = {}
    series = list(values.items())
    # Layer by layer, in forward order: a reader learns the model's order from the tags' order.
    for name in report.layers if layers is None else (n for n in report.layers if n in layers):
        for metric, by_layer in series:
            v = by_layer.get(name)
            if v is not None:
                out[layer_tag(metric, name)] = v
    if layers is not None and len(layers) < len(report.layers):
        out.update(dashboard.aggregates(report, values))
    if report.global_grad_norm is not None:
        out[tags.GLOBAL_GRAD_NORM] = report.global_grad_norm
    if report.input_rms is not None:
        out[tags.GLOBAL_INPUT_RMS] = report.input_rms
    if dashboard.under_scaler(report):  # else always 0
        out[tags.GLOBAL_SKIPPED] = float(report.skipped)
    if report.loss is not None:
        out[tags.GLOBAL_LOSS] = report.loss
    c = report.curvature
    if c is not None and c.top_eigenvalue is not None:
        out[tags.GLOBAL_CURVATURE] = c.top_eigenvalue
        if c.stability_ratio is not None:
            out[tags.GLOBAL_STABILITY] = c.stability_ratio
            if not c.adaptive and c.stability_ratio > 0:  # where the ratio is 1: 2/lr for GD
                out[tags.GLOBAL_CURVATURE_LIMIT] = c.top_eigenvalue / c.stability_ratio
    # the first screen: how many layers are in trouble, and how far the signal fell at worst
    errors = {f.layer for f in report.findings if f.severity == "error"}
    warned = {f.layer for f in report.findings if f.severity == "warning"} - errors
    out[tags.GLOBAL_LAYERS_ERROR], out[tags.GLOBAL_LAYERS_WARNING] = len(errors), len(warned)
    ratios = values.get("log10_signal_ratio")
    if ratios:
        out[tags.GLOBAL_WORST_SIGNAL] = min(ratios.values())
    for kind in FINDING_KINDS:
        out[tags.findings_count_tag(kind)] = float(
            sum(1 for f in report.findings if f.kind == kind)
        )
    return out


def _findings_key(report: Report) -> str:
    # one string, not a tuple per finding: it lives a step, and the GC pays for long-lived tuples
    return "\n".join(f"{f.layer}\t{f.kind}\t{f.severity}" for f in report.findings)


class TensorBoardSink:
    """Writes reports to a ``SummaryWriter``: scalars every logging step (within a tag budget),
    the custom-scalars layout when the set of charted layers changes, the gradient-flow heatmap,
    and the findings as text when they change (a new kind at once, other changes rate-limited).

    Args:
        writer: the writer; it is closed by :meth:`close` only when ``owns_writer`` is True.
        max_layers: models with more layers get per-layer tags only for the flagged layers, both
            ends and the worst of each metric (this many in all), plus min/median/max aggregates.
        history: logging steps shown in the heatmap.
        image_every: draw the heatmap every this many logging steps (and on the first, when the
            findings text is written, and at close): drawing it costs more than the scalars.
        text_every: the findings text is rewritten at most every this many logging steps when
            only the layers change (a new kind of finding, or its first error, is written at
            once).
        image_seconds: with matplotlib (labelled figures, 0.2-0.5 s each to draw), at least
            this many seconds between two drawings, but for the first and the one at close.
    """

    def __init__(
        self,
        writer: Any,
        owns_writer: bool,
        max_layers: int = 200,
        history: int = 200,
        image_every: int = 10,
        text_every: int = 10,
        image_seconds: float = 30.0,
    ) -> None:
        self.writer = writer
        self.owns_writer = owns_writer
        use_fast_crc32c()
        self.max_layers = max_layers
        self._maps = Heatmaps(history)
        self.image_seconds = image_seconds
        self._drawn_at = -math.inf
        self.image_every = image_every
        self.text_every = text_every
        self._log = FindingsLog(writer)
        self._new_file()

    def _new_file(self) -> None:
        """What was written to the current event file (all of it again into a new one)."""
        self._kept: dict[str, None] = {}  # an ordered set
        self._layout_for: tuple[frozenset[str], bool, bool] | None = None
        self._curvature = False  # a report had the curvature probe's numbers
        self._amp = False  # ... a GradScaler's (then the skipped steps are charted)
        self._since_image = 0
        self._last_step: int | None = None
        self._last_findings: str | None = None  # as last written
        self._written_kinds: set[tuple[str, str]] = set()  # (kind, severity) last written
        self._last_report: Report | None = None
        self._since_text = 0
        self._text_step: int | None = None

    def write(self, report: Report) -> None:
        values = dashboard.layer_values(report)  # once for the budget, scalars, layout and image
        self._kept = dashboard.budget_layers(report, self.max_layers, self._kept, values)
        charted = frozenset(n for n in report.layers if n in self._kept)
        # the curvature charts from the first step that measured it on
        self._curvature = self._curvature or report.curvature is not None
        self._amp = self._amp or dashboard.under_scaler(report)
        add_layout = getattr(self.writer, "add_custom_scalars", None)  # not on every writer
        key = (charted, self._curvature, self._amp)
        if key != self._layout_for and add_layout is not None:
            add_layout(dashboard.layout(report, set(charted), values, self._curvature, self._amp))
            self._layout_for = key
        key = _findings_key(report)
        # A new kind of problem (or a first error of a kind) is written and flushed at once. More
        # layers with a kind already shown, and findings that come and go around a threshold,
        # are rewritten at most every text_every logging steps, and at close: a deep net whose
        # vanishing spreads layer by layer rewrote a megabyte of text every step.
        self._since_text += 1
        urgent = any((f.kind, f.severity) not in self._written_kinds for f in report.findings)
        text_due = key != self._last_findings and (
            urgent or self._since_text >= self.text_every or self._last_findings is None
        )
        images = self._heatmaps(report, values, text_due)
        self._write_summary(scalars(report, self._kept, values), images, report.step)
        self._last_step = report.step
        self._last_report = report
        if text_due:
            self._write_findings(report, key)

    def _write_findings(self, report: Report, key: str) -> None:
        types = {name: st.module_type for name, st in report.layers.items()}
        text = render.findings_markdown(report.findings, report.step, types)
        self.writer.add_text(tags.FINDINGS_TEXT, text, report.step)
        self._log.write(report, types)
        if self._last_findings is not None or report.findings:
            self.writer.flush()  # a finding is on disk before anything else can go wrong
        self._last_findings = key
        self._text_step = report.step
        self._written_kinds = {(f.kind, f.severity) for f in report.findings}
        self._since_text = 0

    def _heatmaps(
        self, report: Report, values: dashboard.LayerValues, findings_changed: bool
    ) -> list[Any]:
        """Each heatmap's new column is taken once; the images themselves are drawn on the first
        logging step, every ``image_every``-th one after, when the findings change and at close."""
        self._maps.add(report, values, self._kept)
        self._since_image += 1
        first = len(self._maps.steps) == 1
        due = first or findings_changed or self._since_image >= self.image_every
        if due and self._maps.labelled and not first:
            # a labelled figure costs 0.2-0.5 s to draw: at most one per image_seconds
            due = time.monotonic() - self._drawn_at >= self.image_seconds
        return self._draw_images() if due else []

    def _draw_images(self) -> list[Any]:
        self._since_image = 0
        self._drawn_at = time.monotonic()
        return self._maps.draw()

    def _write_summary(self, values: dict[str, float], images: list[Any], step: int) -> None:
        # One event for the whole step, built in place: an add_scalar call per value costs ~80 us
        # each. The file writer is private in torch.utils.tensorboard: if it moves, write value
        # by value (without the heatmap: add_image needs PIL and raw pixels).
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if file_writer is not None:
            try:
                from tensorboard.compat.proto.event_pb2 import Event

                event = Event()
                add = event.summary.value.add
                for tag, v in values.items():
                    add(tag=tag, simple_value=v)
                event.summary.value.extend(images)
                file_writer().add_event(event, step)
                return
            except (AttributeError, TypeError) as e:
                log.debug("batched summary write unavailable (%s); writing one by one", e)
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def resume(self, step: int, first_seen: Mapping[tuple[str, str], int]) -> None:
        """A writer of its own reopens its log directory with ``purge_step=step``, so TensorBoard
        drops what a crashed run wrote after its last checkpoint; the findings log says so too."""
        self._log.resume(step)
        if self.owns_writer:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self.writer.log_dir
            self.writer.close()
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=step)
            self._new_file()

    def close(self) -> None:
        try:  # what was held back is written now; closing must still close
            if self._since_image and self._last_step is not None:  # columns not drawn yet
                self._write_summary({}, self._draw_images(), self._last_step)
            last = self._last_report
            # the last set, labelled with the last step (it may not have changed for long)
            if last is not None and (last.findings or _findings_key(last) != self._last_findings):
                if self._text_step != last.step:
                    self._write_findings(last, _findings_key(last))
        except Exception as e:
            log.debug("final heatmap or findings not written: %s", e)
        if self.owns_writer:
            self.writer.close()
        else:
            self.writer.flush()


class FindingsLog:
    """The findings as JSON lines in ``gradwatch_findings.jsonl`` beside the event files: what
    ``gradwatch report`` reads, kept out of TensorBoard's Text tab. A record per write of the
    findings (with the layer types when they change) and one per resume (later steps are void)."""

    def __init__(self, writer: Any) -> None:
        log_dir = getattr(writer, "log_dir", None) or getattr(writer, "get_logdir", lambda: None)()
        self.path = os.path.join(log_dir, tags.FINDINGS_LOG) if log_dir else None
        self._types: dict[str, str] | None = None

    def _append(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"schema_version": SCHEMA_VERSION, **record}) + "\n")

    def write(self, report: Report, types: dict[str, str]) -> None:
        record: dict[str, Any] = {
            "step": report.step,
            "findings": [f.to_dict() for f in report.findings],
        }
        if types != self._types:
            record["layer_types"] = self._types = types
        self._append(record)

    def resume(self, step: int) -> None:
        self._append({"resume": step})
        self._types = None


class LoggerSink:
    """Any Lightning logger (CSV, W&B, MLflow, ...): the same scalar keys through ``log_metrics``.
    Written on the training thread (at gradwatch's next call there): the user logs to the same
    logger from it, and loggers are not documented as thread-safe."""

    on_training_thread = True

    def __init__(self, logger: Any, max_layers: int = 200) -> None:
        self.logger = logger
        self.max_layers = max_layers
        self._kept: dict[str, None] = {}  # an ordered set

    def write(self, report: Report) -> None:
        values = dashboard.layer_values(report)
        self._kept = dashboard.budget_layers(report, self.max_layers, self._kept, values)
        self.logger.log_metrics(scalars(report, self._kept, values), step=report.step)

    def resume(self, step: int, first_seen: Mapping[tuple[str, str], int]) -> None:
        pass  # the logger resumes itself

    def close(self) -> None:
        pass  # the Trainer owns the logger


class WarningSink:
    """Warns once per (layer, kind), grouping the new findings of one step by kind. Notes
    (severity ``info``: the edge of stability, a catapult, a plateau) are not problems: they go
    to ``logging`` at INFO, once each, and a later warning of the same kind is still announced."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.warned: set[tuple[str, ...]] = set()  # what this sink has announced
        # how a warning is given: the watcher passes its own, which warns on the training
        # thread (the sink may run on the background worker)
        self.say = say or emit

    def resume(self, step: int, first_seen: Mapping[tuple[str, str], int]) -> None:
        self.warned |= set(first_seen)  # announced before the checkpoint

    def close(self) -> None:
        pass

    def write(self, report: Report) -> None:
        new: dict[str, list[Finding]] = {}
        for f in report.findings:
            if f.severity == "info":
                if (f.layer, f.kind, "info") not in self.warned:
                    self.warned.add((f.layer, f.kind, "info"))
                    log.info("gradwatch step %d: %s", report.step, f.message)
                continue
            if (f.layer, f.kind) not in self.warned:
                self.warned.add((f.layer, f.kind))
                new.setdefault(f.kind, []).append(f)
        for kind, found in new.items():
            self.say(_warning_text(report.step, kind, found))


def _warning_text(step: int, kind: str, found: list[Finding]) -> str:
    """A new kind of finding as a warning a terminal shows whole: a first line that says what and
    where, the lead finding's message, then its remedies, in lines of at most 100 characters."""
    lead = found[0]
    head = f"gradwatch step {step}: {kind} {lead.severity} at `{lead.layer or '(root)'}`"
    if len(found) > 1:
        more = ", ".join(f"`{f.layer}`" for f in found[1:6])
        extra = f" and {len(found) - 6} more" if len(found) > 6 else ""
        head += f", and {len(found) - 1} more layer{'s' * (len(found) > 2)}: {more}{extra}"
    lines = textwrap.wrap(head, render.WIDTH, subsequent_indent="    ")
    return "\n".join(lines + render.lead_lines(lead.message, lead.remedies, changes=False))


# Frames in these packages are not the user's: a warning points past them, at the user's line
# (``gw.step()``, ``optimizer.step()``, ``trainer.fit(...)``).
_INTERNAL = tuple(
    os.path.dirname(m.__file__) + os.sep
    for m in (sys.modules[__package__.split(".")[0]], torch)
    if getattr(m, "__file__", None)
)
_FRAMEWORKS = ("lightning", "pytorch_lightning")


def _caller_stacklevel() -> int:
    """The ``stacklevel`` at which ``warnings.warn`` in :func:`emit` names the user's code."""
    internal = _INTERNAL + tuple(
        os.path.dirname(m.__file__) + os.sep
        for name in _FRAMEWORKS
        if (m := sys.modules.get(name)) is not None and getattr(m, "__file__", None)
    )
    frame, level = sys._getframe(1), 1  # emit's own frame is level 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def emit(message: str, guard: bool = False) -> None:
    """Warn with :class:`GradWatchWarning`, attributed to the user's line; when guarded, an
    escalated warning is logged instead."""
    try:
        warnings.warn(message, GradWatchWarning, stacklevel=_caller_stacklevel())
    except Exception:
        if not guard:
            raise
        log.warning(message)  # -W error inside optimizer.step(): never raise into the user's step

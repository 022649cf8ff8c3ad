"""Reading gradwatch's runs back from TensorBoard event files, for ``gradwatch report``.

Records are read with TensorBoard's own reader. It stops silently at a truncated or corrupt
record, so the bytes it consumed are counted and compared with the file size: what could not be
read is said, not hidden. A run still being written ends in an incomplete record; that is told
apart from corruption by the record's declared length.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tags

EVENT_GLOB = "events.out.tfevents.*"
_RECORD_OVERHEAD = 16  # u64 length, u32 length crc, data, u32 data crc


@dataclass
class Run:
    """What one run directory holds: scalars by tag and step, the latest findings, and problems."""

    name: str
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    findings_step: int | None = None
    problems: list[str] = field(default_factory=list)
    layer_order: dict[str, None] = field(default_factory=dict)
    layer_types: dict[str, str] = field(default_factory=dict)

    @property
    def has_data(self) -> bool:
        return any(tag.startswith(tags.PREFIX) for tag in self.scalars)

    @property
    def steps(self) -> list[int]:
        """The logged steps: each writes the findings' counts (and, under a GradScaler, and in
        every step of runs written before the skipped flag became conditional, that flag)."""
        counted = tags.findings_count_tag("")
        logged: set[int] = set()
        for tag, values in self.scalars.items():
            if tag.startswith(counted) or tag == tags.GLOBAL_SKIPPED:
                logged.update(values)
        return sorted(logged)


def find_runs(logdir: Path) -> list[Path]:
    """Every directory under ``logdir`` (itself included) that holds event files."""
    dirs = {p.parent for p in logdir.rglob(EVENT_GLOB) if p.is_file()}
    return sorted(dirs)


def read_run(path: Path, name: str) -> Run:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    run = Run(name)
    findings_by_step: dict[int, list] = {}
    for file in sorted(path.glob(EVENT_GLOB)):
        size = file.stat().st_size
        consumed = 0
        for record in RawEventFileLoader(str(file)).Load():
            consumed += len(record) + _RECORD_OVERHEAD
            try:
                event = Event.FromString(record)
            except Exception:  # a record whose checksum passed but does not parse
                run.problems.append(f"{file.name}: an unreadable event was skipped")
                continue
            _take(event, run, findings_by_step)
        if consumed < size:
            run.problems.append(_why_stopped(file, consumed, size))
    log = path / tags.FINDINGS_LOG
    if log.is_file():  # the findings log; runs written before it keep them in a text event
        findings_by_step = _read_log(log, run)
    if findings_by_step:
        run.findings_step = max(findings_by_step)
        run.findings = findings_by_step[run.findings_step]
    return run


def _read_log(path: Path, run: Run) -> dict[int, list]:
    """Step -> findings from the findings log, a resume voiding what was written after it; and
    the latest layer types into ``run``."""
    by_step: dict[int, list] = {}
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "resume" in record:
                by_step = {s: f for s, f in by_step.items() if s < record["resume"]}
                continue
            by_step[int(record["step"])] = record["findings"]
            run.layer_types.update(record.get("layer_types") or {})
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash, say
            run.problems.append(f"{path.name}: line {k} is unreadable and was skipped")
    return by_step


def _why_stopped(file: Path, consumed: int, size: int) -> str:
    with file.open("rb") as f:
        f.seek(consumed)
        header = f.read(8)
    left = size - consumed
    if len(header) == 8:
        (length,) = struct.unpack("<Q", header)
        if consumed + length + _RECORD_OVERHEAD > size and length < 1 << 32:
            return (
                f"{file.name}: the last {left} bytes are an incomplete record "
                "(a run still being written, or a crash mid-write); read everything before it"
            )
    return (
        f"{file.name}: corrupt record at byte {consumed}; the remaining {left} bytes were skipped"
    )


def _take(event: Any, run: Run, findings_by_step: dict[int, list]) -> None:
    if event.HasField("session_log") and event.session_log.status == 1:  # START: purge_step
        for series in run.scalars.values():
            for step in [s for s in series if s >= event.step]:
                del series[step]
        for step in [s for s in findings_by_step if s >= event.step]:
            del findings_by_step[step]
        return
    if not event.HasField("summary"):
        return
    for value in event.summary.value:
        tag = value.tag
        if tag == tags.text_summary_tag(tags.FINDINGS_JSON):
            text = value.tensor.string_val[0].decode() if value.tensor.string_val else ""
            try:
                findings_by_step[event.step] = json.loads(text)["findings"]
            except (ValueError, KeyError, TypeError):
                run.problems.append(f"step {event.step}: unreadable findings JSON skipped")
            continue
        if not tag.startswith(tags.PREFIX) and tags.parse_layer_tag(tag) is None:
            continue
        if value.HasField("simple_value"):
            v = value.simple_value
        elif value.HasField("tensor") and value.tensor.float_val:
            v = value.tensor.float_val[0]
        else:
            continue
        parsed = tags.parse_layer_tag(tag)
        if parsed is not None:  # under this version's name, whichever version wrote it
            metric, layer = parsed
            tag = tags.layer_tag(metric, layer)
            run.layer_order.setdefault(layer, None)
        run.scalars.setdefault(tag, {})[event.step] = float(v)


def summarize(run: Run) -> dict[str, Any]:
    """Latest value and first logged value of each per-layer metric, and the latest findings."""
    steps = run.steps
    layers = []
    for layer in run.layer_order:  # forward order: the sink writes the tags layer by layer
        row: dict[str, Any] = {"layer": layer, "type": run.layer_types.get(layer)}
        for metric in ("grad_norm", "signal", "log10_signal_ratio", "saturation", "dead_units"):
            series = run.scalars.get(tags.layer_tag(metric, layer), {})
            if series:
                first, last = min(series), max(series)
                row[metric] = _finite(series[last])
                row[f"{metric}_first"] = _finite(series[first])
        layers.append(row)
    glob_norm = run.scalars.get(tags.GLOBAL_GRAD_NORM, {})
    return {
        "run": run.name,
        "first_step": steps[0] if steps else None,
        "latest_step": steps[-1] if steps else None,
        "logged_steps": len(steps),
        "global_grad_norm": _finite(glob_norm[max(glob_norm)]) if glob_norm else None,
        "layers": layers,
        "findings_step": run.findings_step,
        "findings": run.findings,
        "problems": run.problems,
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None

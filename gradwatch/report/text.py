"""Findings as text for people, one renderer for every place they are read: ``print(report)``,
the TensorBoard Text tab (markdown) and ``gradwatch report``.

Findings that share a kind and remedies share a cause: they are one group, errors first, with
the layers listed once and each remedy once, with its code change. The message shown is the
group's most severe finding's, which names the cause and its numbers.
"""

from __future__ import annotations

import html
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from .records import Curvature, Finding, LayerStats, Remedy, ReportData
from .remedies import CATALOGUE
from .words import (
    MARK,
    MARK_LEGEND,
    close_single_gaps,
    dead,
    layer_list,
    more_layers,
    number,
    percent,
    severity_counts,
    with_gaps,
)

WIDTH = 100


@dataclass
class Group:
    kind: str
    findings: list[Finding]  # in model order

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for f in self.findings)

    @property
    def lead(self) -> Finding:
        """The finding whose message speaks for the group: its first error, else its first."""
        return next((f for f in self.findings if f.severity == "error"), self.findings[0])

    @property
    def remedies(self) -> tuple[Remedy, ...]:
        return self.lead.remedies

    @property
    def since(self) -> int | None:
        seen = [f.since for f in self.findings if f.since is not None]
        return min(seen) if seen else None


def group_findings(findings: list[Finding]) -> list[Group]:
    """Findings grouped by kind and remedy ids, in order of first appearance, errors first."""
    groups: dict[tuple, Group] = {}
    for f in findings:
        key = (f.kind, tuple(r.id for r in f.remedies))
        groups.setdefault(key, Group(f.kind, [])).findings.append(f)
    return sorted(groups.values(), key=lambda g: g.errors == 0)  # stable: model order


def _group_layers(group: Group, types: dict[str, str]) -> str:
    names = [f.layer for f in group.findings]
    kinds = {types.get(n) for n in names}
    return layer_list(names, kinds.pop() if len(kinds) == 1 else None)


def _remedy_parts(r: Remedy) -> tuple[str, str, str]:
    """(what to do, why, the change), from the catalogue; a remedy it no longer has (a run
    written by another version) keeps its own text."""
    if r.id in CATALOGUE:
        return CATALOGUE[r.id]
    return r.text, "", ""


def _header(group: Group, types: dict[str, str], step: int | None) -> str:
    if group.errors:
        severity = "error"
    else:
        severity = "warning" if any(f.severity == "warning" for f in group.findings) else "note"
    since = group.since
    when = ""
    if since is not None and step is not None and since != step:
        when = f" (first seen at step {since}, still at step {step})"
    elif since is not None:
        when = f" (since step {since})"
    return f"{severity.upper()} {group.kind}: {_group_layers(group, types)}{when}"


def findings_text(
    findings: list[Finding], step: int | None = None, types: dict[str, str] | None = None
) -> list[str]:
    """The grouped findings as terminal lines (``types``: layer name -> module type)."""
    types = types or {}
    if not findings:
        return ["no findings"]
    groups = group_findings(findings)
    lines = [
        f"{len(findings)} finding{'s' * (len(findings) != 1)} in {len(groups)} "
        f"group{'s' * (len(groups) != 1)} ({severity_counts([f.severity for f in findings])}):"
    ]
    for g in groups:
        lines.append("")
        lines += textwrap.wrap(_header(g, types, step), WIDTH, subsequent_indent="    ")
        lines += lead_lines(g.lead.message, g.remedies)
    return lines


def lead_lines(message: str, remedies: Sequence[Remedy], changes: bool = True) -> list[str]:
    """A finding's message and its numbered remedies (``changes``: each with the change it
    makes), indented and wrapped for a terminal."""
    lines = textwrap.wrap(message, WIDTH, initial_indent="  ", subsequent_indent="  ")
    for k, r in enumerate(remedies, 1):
        what, _, change = _remedy_parts(r)
        lines += textwrap.wrap(
            f"{k}. {what} ({r.id})", WIDTH, initial_indent="  ", subsequent_indent="     "
        )
        if change and changes:
            lines.append(f"     change: {change}")
    return lines


def findings_markdown(
    findings: list[Finding], step: int, types: dict[str, str] | None = None
) -> str:
    """The grouped findings as markdown, with each remedy's reason (the TensorBoard Text tab)."""
    types = types or {}
    if not findings:
        return f"Step {step}: no findings."
    groups = group_findings(findings)
    out = [
        f"**Step {step}**: {len(findings)} finding{'s' * (len(findings) != 1)} in "
        f"{len(groups)} group{'s' * (len(groups) != 1)}."
    ]
    for g in groups:
        out += ["", f"#### {_header(g, types, step)}", "", g.lead.message, ""]
        for k, r in enumerate(g.remedies, 1):
            what, why, change = _remedy_parts(r)
            reason = f": {why}" if why else ""
            code = f" Change: `{change}`" if change else ""
            out.append(f"{k}. **{what}** (`{r.id}`){reason}.{code}")
    return "\n".join(out)


def _fmt(x: float | None, pct: bool = False) -> str:
    return percent(x) if pct else number(x)


# The layer table's columns, in every in-process view (print(report), table(), the notebook).
COLUMNS = ("layer", "type", "grad_norm", "signal", "saturation", "dead")


def layer_table(report: ReportData, rows: list[LayerStats]) -> list[str]:
    """Fixed-width rows of ``rows`` (in model order); a line marks where layers are left out, and
    a last line says what the mark means when a row has it."""
    flagged = {f.layer for f in report.findings}
    width = max([len("layer")] + [len(s.name or "(root)") for s in rows])
    kind = max([len("type")] + [len(s.module_type) for s in rows])
    lines = [
        f"{'layer':<{width}}  {'type':<{kind}} {'grad_norm':>9} {'signal':>9} "
        f"{'saturation':>10} {'dead':>5}"
    ]
    order = {name: k for k, name in enumerate(report.layers)}
    by_position = {order[s.name]: s for s in rows}
    for k, hidden in with_gaps(list(by_position), len(report.layers)):
        if hidden:
            lines.append(f"{'':<{width}}  … {more_layers(hidden)}")
        if k is None:
            break
        s = by_position[k]
        mark = f" {MARK}" if s.name in flagged else ""
        lines.append(
            f"{s.name or '(root)':<{width}}  {s.module_type:<{kind}} {_fmt(s.grad_norm):>9} "
            f"{_fmt(s.signal):>9} {_fmt(s.saturation, True):>10} "
            f"{dead(s.dead_units, s.activation):>5}{mark}"
        )
    if flagged & {s.name for s in rows}:
        lines.append(MARK_LEGEND)
    return lines


def _few_layers(report: ReportData, max_rows: int) -> list[int]:
    """Positions of the layers a short display shows: all of them up to ``max_rows``, else both
    ends of the network and the layer each group of findings speaks for."""
    names = list(report.layers)
    if len(names) <= max_rows:
        return list(range(len(names)))
    keep = set(names[:4] + names[-3:]) | {g.lead.layer for g in group_findings(report.findings)}
    return [k for k, n in enumerate(names) if n in keep]


def curvature_line(c: Curvature) -> str:
    """The curvature probe's numbers in one line."""
    ratio = "" if c.stability_ratio is None else f", stability ratio {c.stability_ratio:.3g}"
    rule = f" ({c.rule})" if c.rule and c.stability_ratio is not None else ""
    bound = "" if c.converged else " (not converged: a lower bound)"
    return (
        f"curvature: top Hessian eigenvalue {_fmt(c.top_eigenvalue)}{bound}{ratio}{rule}, "
        f"from {c.iterations} Hessian-vector products"
    )


def format_report(report: ReportData, max_rows: int = 10) -> str:
    """``print(report)``: the step, the grouped findings, then a few layers (both ends of the
    network and the layer each group's message is about; ``report.table()`` has them all)."""
    tag = ", skipped (inf/NaN gradients, the scaler skips this step)" if report.skipped else ""
    types = {name: s.module_type for name, s in report.layers.items()}
    lines = [
        f"gradwatch step {report.step}: {len(report.layers)} layers measured, global grad norm "
        f"{_fmt(report.global_grad_norm)}{tag}",
        "",
    ]
    if report.curvature is not None:
        lines += [curvature_line(report.curvature), ""]
    lines += findings_text(report.findings, report.step, types)
    names = list(report.layers)
    shown = close_single_gaps(_few_layers(report, max_rows))
    rows = [report.layers[names[k]] for k in shown]
    some = len(rows) < len(names)
    lines += ["", "a few layers (report.table() shows every one):" if some else "layers:"]
    lines += layer_table(report, rows)
    for name, why in report.unmeasured.items():
        lines.append(f"not measured: {name or '(root)'} ({why})")
    return "\n".join(lines)


def _html(text: str) -> str:
    """Plain text with `code` spans (as the findings write them) as HTML."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def report_html(report: ReportData, max_rows: int = 10) -> str:
    """A report for notebooks: the grouped findings, then a few layers, as HTML."""
    types = {name: st.module_type for name, st in report.layers.items()}
    out = [
        f"<div><b>gradwatch step {report.step}</b>: {len(report.layers)} layers, global grad "
        f"norm {_fmt(report.global_grad_norm)}{' (skipped)' if report.skipped else ''}"
    ]
    if not report.findings:
        out.append("<p>no findings</p>")
    for g in group_findings(report.findings):
        warns = any(f.severity == "warning" for f in g.findings)
        colour = "#c0392b" if g.errors else "#b9770e" if warns else "#2e6da4"
        out.append(
            f"<p style='margin-bottom:0'><b style='color:{colour}'>"
            f"{_html(_header(g, types, report.step))}</b></p>"
            f"<p style='margin:0.2em 1em'>{_html(g.lead.message)}</p><ol>"
        )
        for r in g.remedies:
            what, why, change = _remedy_parts(r)
            code = f"<br><code>{html.escape(change)}</code>" if change else ""
            out.append(f"<li><b>{_html(what)}</b> (<code>{r.id}</code>): {_html(why)}{code}</li>")
        out.append("</ol>")
    names = list(report.layers)
    rows = [report.layers[names[k]] for k in _few_layers(report, max_rows)]
    head = "".join(f"<th>{h}</th>" for h in COLUMNS)
    out.append(f"<table><tr>{head}</tr>")
    flagged = {f.layer for f in report.findings}
    for st in rows:
        cells = (
            html.escape(st.name or "(root)") + (f" {MARK}" if st.name in flagged else ""),
            html.escape(st.module_type),
            _fmt(st.grad_norm),
            _fmt(st.signal),
            _fmt(st.saturation, True),
            dead(st.dead_units, st.activation),
        )
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    if flagged & {st.name for st in rows}:
        out.append(f"<p>{MARK_LEGEND}.</p>")
    if len(rows) < len(names):
        out.append(f"<p>{len(names) - len(rows)} more layers: <code>report.table()</code></p>")
    out.append("</div>")
    return "\n".join(out)

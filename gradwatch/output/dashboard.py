"""What the TensorBoard dashboard shows, as pure functions of reports: the derived log10 series, the
layer budget for very large models, the custom-scalars layout and the gradient-flow heatmap.

No plotting library: the heatmap is encoded as PNG here (zlib and struct are enough).
"""

from __future__ import annotations

import math
import re
import statistics
import struct
import zlib

from ..report import Report
from . import tags
from .tags import LAYER_METRICS

# Per-layer metrics on the dashboard, with their chart titles. The log10 series exist because the
# custom-scalars layout has no log-scale switch.
CHARTS = (  # the order of the Scalars tab's sections: the signal first
    ("log10_signal_ratio", "backward signal relative to the output side, log10"),
    ("log10_grad_norm", "gradient norm, log10"),
    ("saturation", "saturation (fraction of flat activations)"),
    ("dead_units", "dead units (fraction)"),
)
MAX_LAYERS_PER_CHART = 16
FLOOR = -12.0  # log10 of a vanishing ratio is clipped here (0 would be -inf)
# log10 of a time step's gradient that underflowed to 0, relative to the last step's (fp32's
# smallest positive number is 1.4e-45)
ZERO_TIME_RATIO = -45.0


def log10_signal_ratios(report: Report) -> dict[str, float]:
    """log10(signal norm of each layer / that of the output-side layer): the number the vanishing
    and exploding rules look at, 0 at the output, negative toward a vanishing input side."""
    rows = [s for s in report.layers.values() if s.signal_norm is not None]
    ref = next(
        (
            s.signal_norm
            for s in reversed(rows)
            if s.signal_norm > 0 and math.isfinite(s.signal_norm)
        ),
        None,
    )
    out: dict[str, float] = {}
    if ref is None:
        return out
    for s in rows:
        if math.isfinite(s.signal_norm):
            ratio = s.signal_norm / ref
            out[s.name] = math.log10(ratio) if ratio > 0 else FLOOR
    return out


LayerValues = dict[str, dict[str, float]]  # metric -> layer -> value


def layer_values(report: Report) -> LayerValues:
    """metric -> layer -> value, for the raw metrics and the derived log10 series. The functions
    below take it as ``values=`` so that a sink computes it once per logging step."""
    values: dict[str, dict[str, float]] = {m: {} for m in LAYER_METRICS}
    values["log10_grad_norm"] = {}
    # weight norms carried from an earlier step are not written again at this one
    metrics = [m for m in LAYER_METRICS if m != "weight_norm" or report.weight_step == report.step]
    for s in report.layers.values():
        for m in metrics:
            v = getattr(s, m)
            if v is not None:
                values[m][s.name] = float(v)
        if s.grad_norm is not None and math.isfinite(s.grad_norm):
            values["log10_grad_norm"][s.name] = (
                math.log10(s.grad_norm) if s.grad_norm > 0 else FLOOR
            )
    values["log10_signal_ratio"] = log10_signal_ratios(report)
    values["grad_share"] = report.grad_shares()
    for percent in tags.TIME_POINTS:
        values[tags.time_ratio_metric(percent)] = {}
    for s in report.layers.values():
        if s.time_signal:
            ratios = log10_time_ratios(s.time_signal)
            for percent in tags.TIME_POINTS:
                value = ratios[round(percent / 100 * (len(ratios) - 1))]
                if value is not None:
                    values[tags.time_ratio_metric(percent)][s.name] = value
    return values


def log10_time_ratios(profile: list[float | None]) -> list[float | None]:
    """log10 of a sequence module's backward signal at each time step relative to the last step
    (where the loss enters): 0 at the end, negative toward the start when it vanishes through
    time; None where a step got nothing or the last step is zero. A step whose gradient
    underflowed to exactly 0 reads ZERO_TIME_RATIO."""
    last = profile[-1]
    if not last or not math.isfinite(last):
        return [None] * len(profile)
    return [
        None if v is None else (math.log10(v / last) if v > 0 else ZERO_TIME_RATIO) for v in profile
    ]


def budget_layers(
    report: Report, budget: int, kept: dict[str, None], values: LayerValues | None = None
) -> dict[str, None]:
    """Which layers get their own tags when a model has more than ``budget`` of them, at most
    ``budget``: both ends of the network, the flagged layers (errors first), those chosen on
    earlier steps (``kept``, so a chart's lines do not come and go), and the worst of each metric.
    The result is an ordered set (a dict), in that order of priority."""
    names = list(report.layers)
    if len(names) <= budget:
        return dict.fromkeys(names)
    values = values or layer_values(report)
    worst = [
        sorted(values["log10_signal_ratio"], key=values["log10_signal_ratio"].get),
        sorted(values["saturation"], key=values["saturation"].get, reverse=True),
        sorted(values["dead_units"], key=values["dead_units"].get, reverse=True),
        sorted(values["log10_grad_norm"], key=values["log10_grad_norm"].get, reverse=True),
    ]
    flagged = dict.fromkeys(f.layer for f in report.findings if f.severity == "error")
    flagged |= dict.fromkeys(f.layer for f in report.findings)
    candidates = names[:4] + names[-4:] + list(flagged) + list(kept)
    candidates += [
        order[rank] for rank in range(len(names)) for order in worst if rank < len(order)
    ]
    chosen: dict[str, None] = {}
    for name in candidates:
        if len(chosen) >= budget:
            break
        if name in report.layers:
            chosen[name] = None
    return chosen


def aggregates(report: Report, values: LayerValues | None = None) -> dict[str, float]:
    """min / median / max of each metric over all layers: what a budgeted model keeps of the rest."""
    out = {}
    for metric, by_layer in (values or layer_values(report)).items():
        finite = [v for v in by_layer.values() if math.isfinite(v)]
        if finite:
            out[tags.aggregate_tag("min", metric)] = min(finite)
            out[tags.aggregate_tag("median", metric)] = statistics.median(finite)
            out[tags.aggregate_tag("max", metric)] = max(finite)
    return out


def group_layers(names: list[str]) -> list[tuple[str, list[str]]]:
    """Charts of at most MAX_LAYERS_PER_CHART layers that follow the model's structure: layers are
    grouped by their top-level module, consecutive small groups share a chart and a large group is
    split into parts."""
    n = MAX_LAYERS_PER_CHART
    if len(names) <= n:
        return [("all layers", list(names))]
    blocks: list[tuple[str, list[str]]] = []
    for name in names:
        top = re.split(r"[.:]", name, maxsplit=1)[0] or "(root)"
        if blocks and blocks[-1][0] == top:
            blocks[-1][1].append(name)
        else:
            blocks.append((top, [name]))
    charts: list[tuple[list[str], list[str]]] = []  # (block names, layers)
    for top, layers in blocks:
        if len(layers) > n:
            parts = [layers[i : i + n] for i in range(0, len(layers), n)]
            for k, part in enumerate(parts):
                charts.append(([f"{top} ({k + 1}/{len(parts)})"], part))
        elif charts and len(charts[-1][1]) + len(layers) <= n and "/" not in charts[-1][0][-1]:
            charts[-1][0].append(top)
            charts[-1][1].extend(layers)
        else:
            charts.append(([top], list(layers)))
    return [
        (tops[0] if len(tops) == 1 else f"{tops[0]} … {tops[-1]}", layers)
        for tops, layers in charts
    ]


def under_scaler(report: Report) -> bool:
    """A GradScaler is at work in this report (its skipped steps are worth a chart)."""
    return report.loss_scale is not None or report.skipped


def _exact(tag: str) -> str:
    # The custom-scalars plugin matches with re.match (anchored at the start only): anchor the end.
    return re.escape(tag) + "$"


def layout(
    report: Report,
    layers: set[str],
    values: LayerValues | None = None,
    curvature: bool | None = None,
    amp: bool | None = None,
) -> dict:
    """The custom-scalars layout: an overview category, then one category per metric with one
    multi-line chart per group of layers (for ``SummaryWriter.add_custom_scalars``);
    ``curvature``: chart the curvature probe's numbers (default: when this report has them);
    ``amp``: chart the steps a GradScaler skipped (default: when this report has a scaler)."""
    overview = {  # first what is wrong and how badly, then the rest
        "layers in trouble (with an error; with warnings only)": [
            "Multiline",
            [_exact(tags.GLOBAL_LAYERS_ERROR), _exact(tags.GLOBAL_LAYERS_WARNING)],
        ],
        "worst backward signal, log10 of its ratio to the output side's (0: as strong)": [
            "Multiline",
            [_exact(tags.GLOBAL_WORST_SIGNAL)],
        ],
        "global gradient norm": ["Multiline", [_exact(tags.GLOBAL_GRAD_NORM)]],
        "findings by kind": ["Multiline", [re.escape(tags.findings_count_tag("")) + r"\w+$"]],
        "input RMS": ["Multiline", [_exact(tags.GLOBAL_INPUT_RMS)]],
    }
    if amp if amp is not None else under_scaler(report):
        overview["steps skipped by the AMP scaler"] = ["Multiline", [_exact(tags.GLOBAL_SKIPPED)]]
    if curvature is None:
        curvature = report.curvature is not None
    if curvature:  # the opt-in probe's charts
        overview["top Hessian eigenvalue, and the limit (2/lr for plain SGD)"] = [
            "Multiline",
            [_exact(tags.GLOBAL_CURVATURE), _exact(tags.GLOBAL_CURVATURE_LIMIT)],
        ]
        overview["stability ratio (above 1: unstable)"] = [
            "Multiline",
            [_exact(tags.GLOBAL_STABILITY)],
        ]
    out = {"gradwatch: overview": overview}
    values = values or layer_values(report)
    through_time = {
        f"{tags.layer_name(n)}: gradient at q% of the sequence / at its end, log10": [
            "Multiline",
            [_exact(tags.layer_tag(tags.time_ratio_metric(q), n)) for q in tags.TIME_POINTS],
        ]
        for n in report.layers
        if n in layers and n in values[tags.time_ratio_metric(0)]
    }
    if through_time:
        out["gradwatch: through time"] = through_time
    for metric, title in CHARTS:
        names = [n for n in report.layers if n in values[metric] and n in layers]
        if not names:
            continue
        out[f"gradwatch: {title}"] = {
            f"{title}: {group}": [
                "Multiline",
                [_exact(tags.layer_tag(metric, n)) for n in group_names],
            ]
            for group, group_names in group_layers(names)
        }
    return out


# -- the gradient-flow heatmap -------------------------------------------------------------------

# Anchors of a perceptually ordered colour map (dark purple = vanished, yellow = at output level).
_ANCHORS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
_MISSING = (200, 200, 200)
_NONFINITE = (230, 30, 30)
HEAT_LOW, HEAT_HIGH = -8.0, 2.0


_LEVELS = 1000  # colours are looked up at 0.01 decades: finer than the eye or the palette


def _interpolate(t: float) -> tuple[int, int, int]:
    x = t * (len(_ANCHORS) - 1)
    i = min(int(x), len(_ANCHORS) - 2)
    f = x - i
    a, b = _ANCHORS[i], _ANCHORS[i + 1]
    return tuple(round(a[k] + f * (b[k] - a[k])) for k in range(3))


# The levels, then the colours of a missing and of a non-finite value.
_PALETTE = [_interpolate(i / _LEVELS) for i in range(_LEVELS + 1)] + [_MISSING, _NONFINITE]
_PALETTE_BYTES = [bytes(c) for c in _PALETTE]


def _slot(value: float | None) -> int:
    if value is None:
        return _LEVELS + 1
    if not math.isfinite(value):
        return _LEVELS + 2
    t = (min(max(value, HEAT_LOW), HEAT_HIGH) - HEAT_LOW) / (HEAT_HIGH - HEAT_LOW)
    return round(t * _LEVELS)


def colour(value: float | None) -> tuple[int, int, int]:
    """The heatmap colour of a log10 ratio: viridis-like from HEAT_LOW to HEAT_HIGH."""
    return _PALETTE[_slot(value)]


def time_row(ratios: list[float | None]) -> list[bytes]:
    """One row of a through-time heatmap: each time step's colour, from its
    :func:`log10_time_ratios`."""
    return [_PALETTE_BYTES[_slot(v)] for v in ratios]


def colour_bytes(values: dict[str, float], names: list[str]) -> dict[str, bytes]:
    """One heatmap column: each layer's colour as 3 RGB bytes (computed once per logging step)."""
    return {n: _PALETTE_BYTES[_slot(values.get(n))] for n in names}


def heatmap(rows: list[list[bytes]], max_px: int = 512) -> tuple[list[bytes], int, int]:
    """Pixel rows of an RGB image of ``rows`` (layers, input side at the top) x columns (logging
    steps, latest at the right) of 3-byte cell colours; and (height, width)."""
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=0)
    if not n_rows or not n_cols:
        return [bytes(_MISSING)], 1, 1
    cell_h = max(1, min(12, max_px // n_rows))
    cell_w = max(1, min(24, max_px // n_cols))
    missing = bytes(_MISSING)
    lines = []
    for row in rows:
        cells = list(row) + [missing] * (n_cols - len(row))
        line = b"".join(c * cell_w for c in cells)
        lines += [line] * cell_h
    return lines, n_rows * cell_h, n_cols * cell_w


def png(lines: list[bytes], width: int, height: int) -> bytes:
    """8-bit RGB PNG from rows of packed pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + line for line in lines)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 1))  # flat colour blocks: level 1 is small enough
        + chunk(b"IEND", b"")
    )

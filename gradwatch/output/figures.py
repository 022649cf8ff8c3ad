"""The heatmaps as labelled figures, drawn with matplotlib when it is installed (the ``plots``
extra): layer names and types on one axis, steps on the other, and a colour scale. Without it the
TensorBoard sink writes the plain images of :mod:`gradwatch.output.dashboard`.

matplotlib's object API only (``Figure`` and the Agg canvas): no pyplot, no global state, no
window, safe in any thread.
"""

from __future__ import annotations

import importlib.util
import io
import math

MAX_LABELS = 40  # tick labels per axis: more would overlap
COLOURMAP = "viridis"  # perceptually ordered: dark = vanished, yellow = at the reference


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _ticks(n: int) -> list[int]:
    step = max(1, math.ceil(n / MAX_LABELS))
    return list(range(0, n, step))


def _grid(rows: list[list[float | None]]):
    """A masked array: None (no value) masked, grey; non-finite kept apart, red."""
    import numpy as np

    width = max((len(r) for r in rows), default=0)
    data = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v is not None:
                data[i, j] = v if math.isfinite(v) else np.inf
    return data


def _heatmap(ax, data, low: float, high: float, label: str):
    import numpy as np
    from matplotlib import colormaps

    if not data.size:  # nothing measured yet: say so rather than draw an empty axis
        ax.text(0.5, 0.5, "nothing measured yet", ha="center", va="center")
        ax.set_axis_off()
        return None

    cmap = colormaps[COLOURMAP].with_extremes(bad="#c8c8c8", over="#e61e1e")
    # values are clipped to the scale (its ends stand for "and beyond"); non-finite ones go
    # above it, where the colour map is red
    shown = np.where(np.isinf(data), high + 1, np.clip(data, low, high))
    image = ax.imshow(
        np.ma.masked_invalid(shown), aspect="auto", cmap=cmap, vmin=low, vmax=high,
        interpolation="nearest",
    )  # fmt: skip
    bar = ax.figure.colorbar(image, ax=ax, label=label, extend="max")
    bar.ax.text(
        0.5, 1.06, "NaN/Inf", ha="center", va="bottom", fontsize=7, transform=bar.ax.transAxes
    )
    return image


def flow_figure(
    values: list[list[float | None]], layers: list[str], types: list[str], steps: list[int]
):
    """The gradient-flow heatmap: one row per layer (input side at the top), one column per
    logging step, coloured by log10(signal norm / the output side's)."""
    from .dashboard import HEAT_HIGH, HEAT_LOW

    height = min(12.0, 1.5 + 0.18 * len(layers))
    fig = _figure(min(12.0, 4.0 + 0.12 * len(steps)), height)
    ax = fig.add_subplot()
    _heatmap(ax, _grid(values), HEAT_LOW, HEAT_HIGH, "backward signal / output side's (log10)")
    rows = _ticks(len(layers))
    ax.set_yticks(rows, [f"{layers[i] or '(root)'} ({types[i]})" for i in rows], fontsize=7)
    cols = _ticks(len(steps))
    ax.set_xticks(cols, [str(steps[j]) for j in cols], fontsize=7, rotation=90)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (input side at the top)")
    ax.set_title("gradient flow")
    return fig


def time_figure(values: list[list[float | None]], steps: list[int], layer: str, kind: str):
    """A sequence module's signal through time: one row per logging step (latest at the bottom),
    one column per time step, coloured by log10(signal at t / at the last time step)."""
    from .dashboard import HEAT_HIGH, HEAT_LOW

    fig = _figure(8.0, min(8.0, 2.0 + 0.12 * len(steps)))
    ax = fig.add_subplot()
    _heatmap(ax, _grid(values), HEAT_LOW, HEAT_HIGH, "gradient at t / at the last step (log10)")
    rows = _ticks(len(steps))
    ax.set_yticks(rows, [str(steps[i]) for i in rows], fontsize=7)
    ax.set_xlabel("time step of the input (the loss enters at the right)")
    ax.set_ylabel("optimizer step")
    ax.set_title(f"{layer or '(root)'} ({kind}) through time")
    return fig


def png(fig) -> tuple[bytes, int, int]:
    """The figure as PNG bytes, and its height and width in pixels."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    # the saved size can differ from the canvas's by a pixel: read it from the PNG header
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return data, height, width

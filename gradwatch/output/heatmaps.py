"""The heatmaps the TensorBoard sink writes, and their history: the gradient flow (layers x
logging steps) and, per sequence layer, its signal through time (logging steps x time steps).

With matplotlib installed they are labelled figures (:mod:`gradwatch.output.figures`); without it,
plain images encoded here from colours computed once per logging step (:mod:`gradwatch.output.dashboard`).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ..report import Report
from . import dashboard, figures, tags

MAX_ROWS = 512  # layers drawn: evenly spaced beyond that, an image rather than a wall


class Heatmaps:
    def __init__(self, history: int, labelled: bool | None = None) -> None:
        self.labelled = figures.available() if labelled is None else labelled
        self.steps: deque[int] = deque(maxlen=history)
        self.flow: deque[dict[str, Any]] = deque(maxlen=history)  # per step: layer -> cell
        self.names: list[str] = []
        self.types: dict[str, str] = {}
        # sequence layer -> (its steps, its rows), a row per logging step
        self.time: dict[str, tuple[deque[int], deque[list]]] = {}
        self.history = history

    def add(self, report: Report, values: dashboard.LayerValues, kept: Any) -> None:
        """One logging step's column (and rows through time): values for a labelled figure,
        colours for a plain image."""
        names = [n for n in report.layers if n in kept and report.layers[n].signal_norm]
        ratios = values["log10_signal_ratio"]
        if self.labelled:
            self.flow.append({n: ratios.get(n) for n in names})
        else:
            self.flow.append(dashboard.colour_bytes(ratios, names))
        self.steps.append(report.step)
        self.names = names
        self.types = {n: report.layers[n].module_type for n in names}
        for s in report.layers.values():
            if s.time_signal and s.name in kept:
                steps, rows = self.time.setdefault(
                    s.name, (deque(maxlen=self.history), deque(maxlen=self.history))
                )
                steps.append(report.step)
                row = dashboard.log10_time_ratios(s.time_signal)
                rows.append(row if self.labelled else dashboard.time_row(row))
                self.types[s.name] = s.module_type

    def draw(self) -> list[Any]:
        """TensorBoard image values of every heatmap, as of the last step added. (No
        ``warnings.catch_warnings`` here: it changes the whole process's filters, and on the
        background worker it would swallow the training thread's warnings meanwhile.)"""
        names = self.names
        if len(names) > MAX_ROWS:
            names = [names[round(i * (len(names) - 1) / (MAX_ROWS - 1))] for i in range(MAX_ROWS)]
        steps = list(self.steps)
        if self.labelled:
            grid = [[column.get(n) for column in self.flow] for n in names]
            types = [self.types.get(n, "?") for n in names]
            out = [
                _figure_value(tags.GRADIENT_FLOW, figures.flow_figure(grid, names, types, steps))
            ]
            for layer, (time_steps, rows) in self.time.items():
                fig = figures.time_figure(list(rows), list(time_steps), layer, self.types[layer])
                out.append(_figure_value(tags.through_time_tag(layer), fig))
            return out
        missing = bytes(dashboard.colour(None))
        grid = [[column.get(n, missing) for column in self.flow] for n in names]
        out = [_image_value(tags.GRADIENT_FLOW, *dashboard.heatmap(grid))]
        for layer, (_, rows) in self.time.items():
            out.append(_image_value(tags.through_time_tag(layer), *dashboard.heatmap(list(rows))))
        return out


def _image_value(tag: str, lines: list[bytes], height: int, width: int) -> Any:
    return _value(tag, dashboard.png(lines, width, height), height, width)


def _figure_value(tag: str, fig: Any) -> Any:
    data, height, width = figures.png(fig)
    return _value(tag, data, height, width)


def _value(tag: str, data: bytes, height: int, width: int) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)
    return Summary.Value(tag=tag, image=image)

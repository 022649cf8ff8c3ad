"""Every TensorBoard tag gradwatch writes, in one place: the sinks write them, the dashboard charts
them and ``gradwatch report`` reads them back.

========================================  =====================================================
tag                                       value
========================================  =====================================================
``gradwatch/grad_norm/<layer>``           L2 norm of the layer's own parameters' ``.grad``
``gradwatch/weight_norm/<layer>``         L2 norm of those parameters, when measured (see Report)
``gradwatch/signal/<layer>``              RMS of dL/d(output), the backward signal (parameterised)
``gradwatch/saturation/<layer>``          fraction of activation outputs in the flat region
``gradwatch/dead_units/<layer>``          fraction of units off for the whole batch
``gradwatch/log10_grad_norm/<layer>``     log10 of grad_norm (the layout has no log scale)
``gradwatch/log10_signal_ratio/<layer>``  log10(signal norm / that of the output-side layer)
``gradwatch/log10_time_ratio_t<q>/<layer>`` sequence modules: log10(RMS of dL/d(input) at q% of
                                          the sequence / at its last step), q = 0, 25, 50, 75
``gradwatch/layers_{min,median,max}/<m>`` over all layers, when the tag budget leaves some out
``gradwatch/global/grad_norm``            L2 norm over every parameter's ``.grad``
``gradwatch/global/input_rms``            RMS of the model's floating-point inputs
``gradwatch/global/skipped``              1 on a step a GradScaler skips, else 0
``gradwatch/global/findings_<kind>``      number of findings of each kind
``gradwatch/findings`` (text)             the findings in markdown, grouped by cause, written when
                                          they change
``gradwatch_findings.jsonl`` (a file)     the same as JSON lines beside the event files, for
                                          ``gradwatch report`` (runs written before it have a
                                          ``gradwatch/findings_json`` text instead)
``gradwatch/gradient_flow`` (image)       heatmap of log10_signal_ratio, layers x logging steps
``gradwatch/through_time/<layer>`` (image) heatmap of the same ratio at every time step, logging
                                          steps x time steps
custom-scalars layout                     one chart per metric and group of layers, overview
========================================  =====================================================

``<layer>`` is the module name (``(root)`` for the model itself). The step is the optimizer step.
"""

from __future__ import annotations

import functools

PREFIX = "gradwatch/"
# Per-layer metrics, each a LayerStats field of the same name.
LAYER_METRICS = ("grad_norm", "weight_norm", "signal", "saturation", "dead_units")
GLOBAL_GRAD_NORM = "gradwatch/global/grad_norm"
GLOBAL_INPUT_RMS = "gradwatch/global/input_rms"
GLOBAL_SKIPPED = "gradwatch/global/skipped"
FINDINGS_TEXT = "gradwatch/findings"
FINDINGS_JSON = "gradwatch/findings_json"  # where runs written before FINDINGS_LOG have them
FINDINGS_LOG = "gradwatch_findings.jsonl"
GRADIENT_FLOW = "gradwatch/gradient_flow"
AGGREGATES = ("min", "median", "max")
TIME_POINTS = (0, 25, 50, 75)  # percent of a sequence, for the through-time scalars


def time_ratio_metric(percent: int) -> str:
    return f"log10_time_ratio_t{percent}"


def through_time_tag(layer: str) -> str:
    return f"{PREFIX}through_time/{layer_name(layer)}"


def layer_name(layer: str) -> str:
    """A layer's name in its tags: the module name, ``(root)`` for the model itself."""
    return layer or "(root)"


@functools.lru_cache(maxsize=1 << 16)  # the same few hundred tags every logging step
def layer_tag(metric: str, layer: str) -> str:
    return f"{PREFIX}{metric}/{layer_name(layer)}"


def aggregate_tag(stat: str, metric: str) -> str:
    """min, median or max of ``metric`` over all layers."""
    return f"{PREFIX}layers_{stat}/{metric}"


def findings_count_tag(kind: str) -> str:
    return f"{PREFIX}global/findings_{kind}"


def text_summary_tag(tag: str) -> str:
    """The tag TensorBoard's event files hold for a text written under ``tag``."""
    return f"{tag}/text_summary"

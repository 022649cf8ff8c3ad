"""Every TensorBoard tag gradwatch writes, in one place: the sinks write them, the dashboard charts
them and ``gradwatch report`` reads them back.

TensorBoard's Scalars and Time Series tabs make one section of each tag's first path component
and sort the sections by name: so each per-layer metric has a section of its own, numbered in the
order a reader needs them, the backward signal first; ``gradwatch`` (the overview) sorts before
them all.

==================================================  ===========================================
tag                                                 value
==================================================  ===========================================
``gradwatch/global/layers_with_errors``             layers named in an error finding
``gradwatch/global/layers_with_warnings``           layers named in warnings (and no error)
``gradwatch/global/worst_signal_ratio_log10``       the lowest ``signal_ratio_log10`` of any layer
``gradwatch/global/grad_norm``                      L2 norm over every parameter's ``.grad``
``gradwatch/global/input_rms``                      RMS of the model's floating-point inputs
``gradwatch/global/skipped``                        1 on a step a GradScaler skips, else 0 (under one)
``gradwatch/global/loss``                           the step's loss, when given
``gradwatch/global/findings_<kind>``                number of findings of each kind
``gradwatch/global/curvature``                      the curvature probe (opt-in): the loss's top
                                                    Hessian eigenvalue on the step's batch
``gradwatch/global/stability_ratio``                ... and the optimizer's step against it
``gradwatch/global/curvature_limit``                ... the curvature where that ratio is 1
                                                    (2/lr for plain gradient descent)
``gradwatch/layers_{min,median,max}/<metric>``      over all layers, when the tag budget leaves
                                                    some out
``gradwatch_1_signal_ratio_log10/<layer>``          log10(signal norm / that of the output-side
                                                    layer): 0 at the output, negative vanishing
``gradwatch_2_signal/<layer>``                      RMS of dL/d(output), the backward signal
``gradwatch_3_grad_norm_log10/<layer>``             log10 of grad_norm (the layout has no log
                                                    scale)
``gradwatch_4_grad_norm/<layer>``                   L2 norm of the layer's own parameters' grads
``gradwatch_5_saturation/<layer>``                  fraction of activation outputs that are flat
``gradwatch_6_dead_units/<layer>``                  fraction of units off for the whole batch
``gradwatch_7_weight_norm/<layer>``                 L2 norm of its parameters, when measured
``gradwatch_8_through_time/<layer>/t<q>``           sequence modules: log10(RMS of dL/d(input) at
                                                    q% of the sequence / at its last step)
``gradwatch_9_gain_factor/<layer>``                 chi of a Linear/conv layer (see LayerStats),
                                                    on steps that read the weights
``gradwatch_t1_attention_max_logit/<layer>``        attention calls: largest pre-softmax logit
``gradwatch_t2_attention_entropy/<layer>``          ... their queries' mean entropy (nats)
``gradwatch_t3_log_z/<layer>``                      the output head: mean log Z of its logits
``gradwatch_t4_grad_share/<layer>``                 (grad_norm / global grad norm)^2
``gradwatch_t5_update_ratio/<layer>``               Adam family: next update norm / weight norm
``gradwatch_t6_adam_step_rms/<layer>``              ... RMS of m_hat/(sqrt(v_hat)+eps)
``gradwatch_t7_adam_epsilon_share/<layer>``         ... share of weights eps dominates
``gradwatch/findings`` (text)                       the findings in markdown, grouped by cause
``gradwatch_findings.jsonl`` (a file)               the same as JSON lines beside the event
                                                    files, for ``gradwatch report``
``gradwatch/gradient_flow`` (image)                 heatmap of the signal ratio, layers x steps
``gradwatch/through_time/<layer>`` (image)          the same ratio at every time step
custom-scalars layout                               one chart per metric and group of layers
==================================================  ===========================================

``<layer>`` is the module name (``(root)`` for the model itself). The step is the optimizer step.
Runs written before the sections had ``gradwatch/<metric>/<layer>`` (``log10_time_ratio_t<q>``
for through time) and a ``gradwatch/findings_json`` text: :func:`parse_layer_tag` reads both.
"""

from __future__ import annotations

import functools

PREFIX = "gradwatch/"
# Per-layer metrics, each a LayerStats field of the same name.
LAYER_METRICS = (
    "grad_norm",
    "weight_norm",
    "signal",
    "saturation",
    "dead_units",
    "gain_factor",
    "attention_max_logit",
    "attention_entropy",
    "log_z_mean",
    "update_ratio",
    "adam_step_rms",
    "adam_epsilon_share",
)
GLOBAL_LAYERS_ERROR = "gradwatch/global/layers_with_errors"
GLOBAL_LAYERS_WARNING = "gradwatch/global/layers_with_warnings"
GLOBAL_WORST_SIGNAL = "gradwatch/global/worst_signal_ratio_log10"
GLOBAL_GRAD_NORM = "gradwatch/global/grad_norm"
GLOBAL_INPUT_RMS = "gradwatch/global/input_rms"
GLOBAL_SKIPPED = "gradwatch/global/skipped"
GLOBAL_LOSS = "gradwatch/global/loss"
GLOBAL_CURVATURE = "gradwatch/global/curvature"
GLOBAL_STABILITY = "gradwatch/global/stability_ratio"
GLOBAL_CURVATURE_LIMIT = "gradwatch/global/curvature_limit"
FINDINGS_TEXT = "gradwatch/findings"
FINDINGS_JSON = "gradwatch/findings_json"  # where runs written before FINDINGS_LOG have them
FINDINGS_LOG = "gradwatch_findings.jsonl"
GRADIENT_FLOW = "gradwatch/gradient_flow"
TIME_POINTS = (0, 25, 50, 75)  # percent of a sequence, for the through-time scalars


TIME_RATIO = "log10_time_ratio_t"  # + the percent: a LayerValues metric, not a LayerStats field
# Per-layer metric -> its section (the first component of its tags), in the order to read them.
SECTIONS = {
    "log10_signal_ratio": "gradwatch_1_signal_ratio_log10",
    "signal": "gradwatch_2_signal",
    "log10_grad_norm": "gradwatch_3_grad_norm_log10",
    "grad_norm": "gradwatch_4_grad_norm",
    "saturation": "gradwatch_5_saturation",
    "dead_units": "gradwatch_6_dead_units",
    "weight_norm": "gradwatch_7_weight_norm",
    "gain_factor": "gradwatch_9_gain_factor",
    "attention_max_logit": "gradwatch_t1_attention_max_logit",
    "attention_entropy": "gradwatch_t2_attention_entropy",
    "log_z_mean": "gradwatch_t3_log_z",
    "grad_share": "gradwatch_t4_grad_share",
    "update_ratio": "gradwatch_t5_update_ratio",
    "adam_step_rms": "gradwatch_t6_adam_step_rms",
    "adam_epsilon_share": "gradwatch_t7_adam_epsilon_share",
}
THROUGH_TIME = "gradwatch_8_through_time"
_METRIC_OF = {section: metric for metric, section in SECTIONS.items()}


def time_ratio_metric(percent: int) -> str:
    return f"{TIME_RATIO}{percent}"


def through_time_tag(layer: str) -> str:
    return f"{PREFIX}through_time/{layer_name(layer)}"


def layer_name(layer: str) -> str:
    """A layer's name in its tags: the module name, ``(root)`` for the model itself."""
    return layer or "(root)"


@functools.lru_cache(maxsize=1 << 16)  # the same few hundred tags every logging step
def layer_tag(metric: str, layer: str) -> str:
    if metric.startswith(TIME_RATIO):
        return f"{THROUGH_TIME}/{layer_name(layer)}/t{metric[len(TIME_RATIO) :]}"
    return f"{SECTIONS[metric]}/{layer_name(layer)}"


def parse_layer_tag(tag: str) -> tuple[str, str] | None:
    """``(metric, layer name in tags)`` of a per-layer scalar tag, as this version writes it or as
    earlier ones did (``gradwatch/<metric>/<layer>``); None for any other tag."""
    section, _, rest = tag.partition("/")
    if not rest:
        return None
    if section in _METRIC_OF:
        return _METRIC_OF[section], rest
    if section == THROUGH_TIME:
        layer, _, point = rest.rpartition("/")
        return (f"{TIME_RATIO}{point[1:]}", layer) if layer and point[:1] == "t" else None
    if section == PREFIX.rstrip("/"):
        metric, _, layer = rest.partition("/")
        if layer and (metric in SECTIONS or metric.startswith(TIME_RATIO)):
            return metric, layer
    return None


def aggregate_tag(stat: str, metric: str) -> str:
    """min, median or max of ``metric`` over all layers."""
    return f"{PREFIX}layers_{stat}/{metric}"


def findings_count_tag(kind: str) -> str:
    return f"{PREFIX}global/findings_{kind}"


def text_summary_tag(tag: str) -> str:
    """The tag TensorBoard's event files hold for a text written under ``tag``."""
    return f"{tag}/text_summary"

"""The dashboard: layout, derived series, tag budget and the gradient-flow image."""

import math
import re
import struct
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

import gradwatch
from gradwatch.output import dashboard
from gradwatch.output.sinks import scalars
from gradwatch.output.tags import parse_layer_tag
from gradwatch.report import Finding, LayerStats, Report

from .helpers import zoo


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, pixel rows) of an 8-bit RGB PNG without filters: a reference decoder."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        if kind == b"IHDR":
            width, height, depth, colour_type = struct.unpack(">IIBB", body[:10])
            assert (depth, colour_type) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    rows = [raw[i * stride : (i + 1) * stride] for i in range(height)]
    assert all(r[0] == 0 for r in rows)
    return width, height, [r[1:] for r in rows]


def train_logged(model, logdir, steps=3, x=None, y=None, **kwargs):
    x = torch.randn(32, 32) if x is None else x
    y = torch.randint(0, 10, (32,)) if y is None else y
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, log_dir=logdir, every_n_steps=1, **kwargs) as gw:
            for _ in range(steps):
                F.cross_entropy(model(x), y).backward()
                reports.append(gw.step())
                model.zero_grad()
    return reports


def read(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def test_group_layers_follow_structure_and_cover_every_layer_once():
    small = [f"{i}" for i in range(10)]
    assert dashboard.group_layers(small) == [("all layers", small)]

    flat = [str(i) for i in range(41)]  # a Sequential: every top-level name is a number
    charts = dashboard.group_layers(flat)
    assert [n for _, names in charts for n in names] == flat
    assert all(len(names) <= dashboard.MAX_LAYERS_PER_CHART for _, names in charts)
    assert charts[0][0] == "0 … 15"

    named = (
        ["embed"]
        + [f"encoder.layer.{i}.{p}" for i in range(6) for p in ("q", "k", "v")]
        + ["head.0", "head.1"]
    )
    charts = dashboard.group_layers(named)
    assert [n for _, names in charts for n in names] == named
    titles = [t for t, _ in charts]
    assert titles == ["embed", "encoder (1/2)", "encoder (2/2)", "head"]


def test_layout_regexes_match_exactly_their_own_tag():
    layers = {f"layer{i}": LayerStats(f"layer{i}", "Linear") for i in (1, 10)}
    for s in layers.values():
        s.grad_norm, s.signal_norm = 1.0, 1.0
    report = Report(0, layers, global_grad_norm=1.0, input_rms=1.0)
    layout = dashboard.layout(report, set(layers))
    tags = set(scalars(report))
    for category in layout.values():
        for kind, patterns in category.values():
            assert kind == "Multiline"
            for pattern in patterns:
                matched = {t for t in tags if re.match(pattern, t)}
                assert matched, pattern
                if "layer" in pattern:
                    assert len(matched) == 1, (pattern, matched)


def test_log10_signal_ratio_is_what_the_vanishing_rule_reports(tmp_path):
    model = zoo.mlp(nn.Sigmoid, depth=12, width=32)
    (report,) = train_logged(model, tmp_path, steps=1)
    ratios = dashboard.log10_signal_ratios(report)
    last = list(report.layers)[-1]
    assert ratios[last] == 0.0
    vanishing = [f for f in report.findings if f.kind == "vanishing"]
    assert vanishing
    for f in vanishing:  # the finding's value is the same ratio, against its chain's output end
        assert ratios[f.layer] <= math.log10(f.value) + 1  # the head is at most 10x the chain end
        assert ratios[f.layer] < -3


@pytest.fixture
def plain_images(monkeypatch):
    """As without matplotlib: the heatmaps are the plain images gradwatch encodes itself."""
    import gradwatch.output.figures

    monkeypatch.setattr(gradwatch.output.figures, "available", lambda: False)


def test_tensorboard_run_has_layout_log_series_and_a_flow_image(tmp_path, plain_images):
    model = zoo.mlp(nn.Sigmoid, depth=10, width=32)
    reports = train_logged(model, tmp_path, steps=4)
    acc = read(tmp_path)
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    config = layout_pb2.Layout()
    config.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    titles = [c.title for c in config.category]
    assert titles[0] == "gradwatch: overview"
    assert "gradwatch: backward signal relative to the output side, log10" in titles
    grad = acc.Scalars("gradwatch_3_grad_norm_log10/0")
    assert [e.value for e in grad] == pytest.approx(
        [math.log10(r.layers["0"].grad_norm) for r in reports], rel=1e-6
    )
    images = acc.Images("gradwatch/gradient_flow")
    assert [i.step for i in images] == [0, 3]  # the first logging step, then at close
    width, height, rows = decode_png(images[-1].encoded_image_string)
    assert (width, height) == (images[-1].width, images[-1].height)
    # input side at the top is dark (vanished), the output side at the bottom bright
    top, bottom = rows[0][-3:], rows[-1][-3:]
    assert sum(top) < sum(bottom)
    assert tuple(top) == dashboard.colour(dashboard.log10_signal_ratios(reports[-1])["0"])


def test_a_thousand_layer_model_stays_within_the_tag_budget(tmp_path):
    depth = 500  # 500 x (Linear, ReLU) + head: 1001 layers
    model = zoo.mlp(nn.ReLU, depth=depth, width=8, init=zoo.he)
    reports = train_logged(
        model, tmp_path, steps=2, x=torch.randn(16, 8), y=torch.randint(0, 10, (16,))
    )
    assert len(reports[-1].layers) == 2 * depth + 1
    acc = read(tmp_path)
    tags = acc.Tags()["scalars"]
    parsed = [parse_layer_tag(t) for t in tags]
    per_layer = {p[1] for p in parsed if p is not None and p[0] in dashboard.LAYER_METRICS}
    assert len(per_layer) <= 200
    assert len(tags) < 1500  # not 5000+
    flagged = {f.layer for f in reports[-1].findings}
    assert len(flagged & per_layer) >= min(len(flagged), 200 - 8)  # 8 slots for the two ends
    assert {"0", str(2 * depth)} <= per_layer  # both ends
    assert "gradwatch/layers_median/log10_signal_ratio" in tags


def test_budget_is_sticky_across_steps():
    def report(worst):
        layers = {str(i): LayerStats(str(i), "Linear", signal_norm=1.0) for i in range(300)}
        layers[str(worst)].signal_norm = 1e-9
        return Report(0, layers, [Finding(str(worst), "vanishing", "error", 1e-9, 1e-3, "")])

    kept = dashboard.budget_layers(report(100), 50, {})
    assert "100" in kept and len(kept) == 50
    kept2 = dashboard.budget_layers(report(200), 50, kept)
    assert "200" in kept2 and "100" in kept2 and len(kept2) == 50
    assert len(kept.keys() & kept2.keys()) == 49  # one line gives way to the newly flagged layer


def test_the_heatmap_is_drawn_every_image_every_steps_and_when_findings_change(
    tmp_path, plain_images
):
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch.output.sinks import TensorBoardSink

    sink = TensorBoardSink(SummaryWriter(tmp_path), owns_writer=True, image_every=3)
    layers = {"a": LayerStats("a", "Linear", signal_norm=1.0)}
    for step in range(8):
        findings = [Finding("a", "vanishing", "error", 1e-9, 1e-3, "")] if step >= 5 else []
        sink.write(Report(step, layers, findings))
    sink.close()
    images = read(tmp_path).Images("gradwatch/gradient_flow")
    # step 0 (first), 3 (every 3rd), 5 (findings changed), 7 (at close: undrawn columns)
    assert [i.step for i in images] == [0, 3, 5, 7]
    width, height, rows = decode_png(images[-1].encoded_image_string)
    assert width == 8 * min(24, 512 // 8)  # all 8 columns of history


def test_colours_run_from_the_first_anchor_to_the_last_and_columns_match():
    lo, hi = dashboard.HEAT_LOW, dashboard.HEAT_HIGH
    assert dashboard.colour(lo - 5) == dashboard.colour(lo) == (68, 1, 84)
    assert dashboard.colour(hi + 5) == dashboard.colour(hi) == (253, 231, 37)
    mid = dashboard.colour((lo + hi) / 2)  # the middle anchor of five
    assert mid == (33, 145, 140)
    values = {f"l{i}": lo + (hi - lo) * i / 37 for i in range(38)}
    values.update({"nan": math.nan, "inf": math.inf})
    names = [*values, "absent"]
    column = dashboard.colour_bytes(values, names)
    assert column == {n: bytes(dashboard.colour(values.get(n))) for n in names}
    assert column["nan"] == column["inf"] == bytes((230, 30, 30))
    assert column["absent"] == bytes((200, 200, 200))
    greens = [dashboard.colour(values[f"l{i}"])[1] for i in range(38)]
    assert greens == sorted(greens)  # brighter toward the output side's level


def test_with_matplotlib_the_heatmaps_have_labelled_axes_and_a_colour_scale(tmp_path):
    """The `plots` extra: layer names with their types, the optimizer steps, a colour bar with
    its meaning; written to TensorBoard as PNG (decoded here by matplotlib itself)."""
    pytest.importorskip("matplotlib")
    import io

    from matplotlib import image as mpimg

    from gradwatch.output import figures

    model = zoo.mlp(nn.Sigmoid, depth=4, width=16)
    x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    reports = train_logged(model, tmp_path, steps=3, x=x, y=y)
    names = [n for n, s in reports[-1].layers.items() if s.signal_norm]
    types = [reports[-1].layers[n].module_type for n in names]
    grid = [[dashboard.log10_signal_ratios(r).get(n) for r in reports] for n in names]
    fig = figures.flow_figure(grid, names, types, [r.step for r in reports])
    heat, bar = fig.axes
    assert [t.get_text() for t in heat.get_yticklabels()] == [f"{n} (Linear)" for n in names]
    assert [t.get_text() for t in heat.get_xticklabels()] == ["0", "1", "2"]
    assert heat.get_xlabel() == "optimizer step" and "log10" in bar.get_ylabel()
    image = read(tmp_path).Images("gradwatch/gradient_flow")[-1]
    pixels = mpimg.imread(io.BytesIO(image.encoded_image_string), format="png")
    assert pixels.shape[:2] == (image.height, image.width) and image.width >= 400

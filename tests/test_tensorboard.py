"""TensorBoard output, read back with TensorBoard's own event reader."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch.output.sinks import scalars

from .conftest import ce, diagnose_model
from .helpers import zoo


def read(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def text_values(acc, tag):
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]


def test_scalars_equal_the_reports_at_the_optimizer_step(tmp_path):
    model = zoo.mlp(nn.Sigmoid, depth=6, width=32)
    x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, log_dir=tmp_path, every_n_steps=2) as gw:
            for _ in range(5):
                F.cross_entropy(model(x), y).backward()
                if (r := gw.step()) is not None:
                    reports.append(r)
                model.zero_grad()
    acc = read(tmp_path)
    tags = set(acc.Tags()["scalars"])
    for r in reports:
        expected = scalars(r)
        assert set(expected) <= tags
        for tag, value in expected.items():
            events = {e.step: e.value for e in acc.Scalars(tag)}
            assert events[r.step] == pytest.approx(value, rel=1e-6), tag
    assert [e.step for e in acc.Scalars("gradwatch_4_grad_norm/0")] == [0, 2, 4]
    for section in ("gradwatch_4_grad_norm", "gradwatch_2_signal", "gradwatch_7_weight_norm"):
        assert f"{section}/0" in tags
    assert "gradwatch_5_saturation/1" in tags and "gradwatch_6_dead_units/1" in tags
    # one TensorBoard section per metric (the first path component), the overview, then the
    # signal relative to the output side, then the signal itself
    sections = sorted({t.split("/")[0] for t in tags})
    assert sections[:3] == ["gradwatch", "gradwatch_1_signal_ratio_log10", "gradwatch_2_signal"]
    assert "gradwatch/global/grad_norm" in tags and "gradwatch/global/findings_vanishing" in tags
    # no GradScaler: no chart of the steps it skipped, always 0 (tests/test_amp.py has one)
    assert "gradwatch/global/skipped" not in tags
    from gradwatch.output import dashboard

    assert "steps skipped by the AMP scaler" not in json.dumps(dashboard.layout(reports[0], set()))


def test_findings_text_is_written_when_they_change(tmp_path):
    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    x = 1e5 + 3e4 * torch.randn(64, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, log_dir=tmp_path, every_n_steps=1) as gw:
            for _ in range(3):
                model(x).sum().backward()
                gw.step()
            assert gw.report.findings
    acc = read(tmp_path)
    markdown = text_values(acc, "gradwatch/findings")
    # the same findings on every step: written when they appear, and at close labelled with
    # the last step, when they were still there
    steps = [e.step for e in acc.Tensors("gradwatch/findings/text_summary")]
    assert steps == [0, 2] and len(markdown) == 2
    assert "saturation" in markdown[0] and "standardize-inputs" in markdown[0]
    assert "(since step 0)" in markdown[0] and "layer `1` (Sigmoid)" in markdown[0]
    assert "(first seen at step 0, still at step 2)" in markdown[1]
    # the Text tab holds no JSON: the machine-readable findings are a file beside the events
    assert "{" not in markdown[0]
    assert "gradwatch/findings_json/text_summary" not in acc.Tags()["tensors"]
    payload, last = findings_log(tmp_path)
    assert payload["schema_version"] == 1 and (payload["step"], last["step"]) == (0, 2)
    assert payload["findings"][0]["kind"] == "saturation"
    assert payload["layer_types"] == {"0": "Linear", "1": "Sigmoid"}
    assert "layer_types" not in last  # written again only when they change


def findings_log(logdir):
    return [json.loads(line) for line in (logdir / "gradwatch_findings.jsonl").open()]


def test_root_layer_tag_and_nan_values(tmp_path):
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x * self.w).sum()

    model = Root()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, log_dir=tmp_path, every_n_steps=1) as gw:
            (model(torch.ones(3)) * float("nan")).backward()
            gw.step()
    acc = read(tmp_path)
    (event,) = acc.Scalars("gradwatch_4_grad_norm/(root)")
    assert math.isnan(event.value)


def test_a_given_writer_is_flushed_not_closed(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with gradwatch.GradWatch(model, writer=writer, every_n_steps=1) as gw:
        model(torch.randn(4, 3)).sum().backward()
        gw.step()
    writer.add_scalar("user/after_close", 1.0, 0)  # still usable: gradwatch did not close it
    writer.close()
    tags = read(tmp_path).Tags()["scalars"]
    assert "user/after_close" in tags and "gradwatch_4_grad_norm/0" in tags


def test_batched_write_falls_back_to_add_scalar_without_the_private_writer(tmp_path):
    calls = []

    class PublicOnly:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def add_text(self, *a, **k):
            pass

        def flush(self):
            pass

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with gradwatch.GradWatch(model, writer=PublicOnly(), every_n_steps=1) as gw:
        model(torch.randn(4, 3)).sum().backward()
        r = gw.step()
    assert {c[0] for c in calls} == set(scalars(r)) and all(c[2] == 0 for c in calls)


def test_fast_checksum_equals_tensorboards_own(tmp_path):
    """The C CRC32C swapped into TensorBoard gives its pure-Python checksum on every length, and
    the files it writes read back with TensorBoard's reader (which drops records whose checksum
    fails)."""
    import random

    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub

    from gradwatch.output.sinks import use_fast_crc32c

    rng = random.Random(0)
    blobs = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (0, 1, 3, 8, 255, 4096, 20001)]
    slow = [stub.crc_finalize(stub.crc_update(stub.CRC_INIT, b)) for b in blobs]  # by hand
    assert use_fast_crc32c(), "google-crc32c's C extension is a dependency and should load"
    assert stub.crc32c.__module__.startswith("google_crc32c")
    assert [stub.crc32c(b) for b in blobs] == slow
    assert [stub.masked_crc32c(b) for b in blobs] == [
        (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF for c in slow
    ]

    writer = SummaryWriter(tmp_path)
    for step in range(3):
        writer.add_scalar("x", step * 0.5, step)
    writer.close()
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    (path,) = tmp_path.glob("events.out.tfevents.*")
    values = [
        (e.step, float(make_ndarray(v.tensor)))
        for e in EventFileLoader(str(path)).Load()
        for v in e.summary.value
    ]
    assert values == [(0, 0.0), (1, 0.5), (2, 1.0)]


def _report(step, findings):
    from gradwatch.report import Finding, LayerStats, Report

    layers = {n: LayerStats(n, "Linear", grad_norm=1.0, weight_norm=1.0) for n in "abcdefgh"}
    return Report(
        step,
        layers,
        [Finding(n, k, sev, 1.0, 2.0, f"{n} {k}", ()) for n, k, sev in findings],
        1.0,
    )


def test_flapping_findings_are_rewritten_at_most_every_text_every_steps(tmp_path):
    """A finding that comes and goes around its threshold, or one more layer with a kind already
    shown, must not rewrite (and flush) the findings text every step; a new kind is written at
    once, and close() writes the last set."""
    from gradwatch.output.sinks import TensorBoardSink

    base = [("a", "vanishing", "warning")]
    flap = [*base, ("b", "vanishing", "warning")]
    sink = TensorBoardSink(SummaryWriter(tmp_path), owns_writer=True, text_every=5)
    sets = [base, flap] * 6 + [[*flap, ("c", "dead_units", "error")], base, flap]
    for step, findings in enumerate(sets):
        sink.write(_report(step, findings))
    sink.close()
    acc = read(tmp_path)
    steps = [e.step for e in acc.Tensors("gradwatch/findings/text_summary")]
    # 0: first; 1: "b" is one more vanishing layer, it waits; 5, 10: rate-limited rewrites;
    # 12: dead units (and an error) are new; 14: close, the last set
    assert steps == [0, 5, 10, 12, 14]
    log = findings_log(tmp_path)
    assert [r["step"] for r in log] == steps
    assert [f["layer"] for f in log[-1]["findings"]] == ["a", "b"]


def test_findings_markdown_groups_by_cause_errors_first():
    """One group per kind and remedies, errors first, each remedy once with its code change."""
    from gradwatch.report import Finding
    from gradwatch.report.remedies import remedies
    from gradwatch.report.text import findings_markdown

    fix = remedies(["relu-family", "residual"], "ctx")
    findings = [Finding(n, "vanishing", "warning", 1e-4, 1e-3, f"{n} vanishes", fix) for n in "abc"]
    findings.append(Finding("h", "nonfinite", "error", None, None, "h is NaN", ()))
    text = findings_markdown(findings, 3, {n: "Linear" for n in "abch"})
    assert text.index("ERROR nonfinite") < text.index("WARNING vanishing")
    assert "the 3 Linear layers `a`, `b`, `c`" in text
    assert text.count("relu-family") == 1 and text.count("`nn.Sigmoid() -> nn.ReLU()") == 1
    assert text.count("vanishes") == 1  # the lead's message speaks for the group


def test_the_overview_says_how_many_layers_are_in_trouble_and_how_badly(tmp_path):
    model = zoo.mlp(nn.Sigmoid, depth=12, width=32)
    x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))
    report = diagnose_model(model, ce(x, y), log_dir=tmp_path)
    acc = read(tmp_path)
    value = {t: acc.Scalars(t)[0].value for t in acc.Tags()["scalars"]}
    errors = {f.layer for f in report.findings if f.severity == "error"}
    assert errors and value["gradwatch/global/layers_with_errors"] == len(errors)
    worst = min(s.signal_norm for s in report.layers.values() if s.signal_norm is not None)
    last = [s.signal_norm for s in report.layers.values() if s.signal_norm][-1]
    assert value["gradwatch/global/worst_signal_ratio_log10"] == pytest.approx(
        math.log10(worst / last), rel=1e-5
    )
    # they open the overview: two series (errors 11, warnings 0) survive outlier scaling
    from gradwatch.output import dashboard

    first = list(dashboard.layout(report, set())["gradwatch: overview"])[:2]
    assert first[0].startswith("layers in trouble") and first[1].startswith("worst backward")

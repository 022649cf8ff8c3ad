"""`gradwatch report LOGDIR`, run through its console entry point."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

from .conftest import ce, diagnose_model
from .helpers import zoo

SCRIPT = Path(sys.executable).parent / "gradwatch"


def gradwatch_cli(*args) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gradwatch.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=120)


def write_run(logdir: Path, act=nn.Sigmoid, steps=3, close=True):
    torch.manual_seed(0)
    model = zoo.mlp(act, depth=10, width=32, init=zoo.he if act is nn.ReLU else None)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        gw = gradwatch.GradWatch(model, log_dir=logdir, every_n_steps=2)
        for _ in range(steps):
            F.cross_entropy(model(x), y).backward()
            if (r := gw.step()) is not None:
                reports.append(r)
            model.zero_grad()
        if close:
            gw.close()
    return reports, gw


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    broken, _ = write_run(root / "broken", nn.Sigmoid, steps=5)
    healthy, _ = write_run(root / "healthy", nn.ReLU, steps=5)
    return root, broken, healthy


def test_report_prints_layers_trend_and_findings(runs):
    root, broken, _ = runs
    out = gradwatch_cli("report", str(root))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "== run broken: steps 0..4 (3 logged)" in text
    assert "== run healthy" in text and "no findings" in text
    assert "vanishing:" in text and "(relu-family)" in text
    assert "x first" in text and "signal/out" in text


def test_report_json_equals_what_was_measured(runs):
    root, broken, _ = runs
    out = gradwatch_cli("report", str(root), "--json")
    assert out.returncode == 0, out.stderr
    data = {r["run"]: r for r in json.loads(out.stdout)["runs"]}
    run = data["broken"]
    first, last = broken[0], broken[-1]
    assert (run["first_step"], run["latest_step"], run["logged_steps"]) == (0, 4, 3)
    rows = {r["layer"]: r for r in run["layers"]}
    assert list(rows) == list(last.layers)  # every layer, in forward order
    for name, s in last.layers.items():
        if s.grad_norm is not None:
            assert rows[name]["grad_norm"] == pytest.approx(s.grad_norm, rel=1e-6)
            assert rows[name]["grad_norm_first"] == pytest.approx(
                first.layers[name].grad_norm, rel=1e-6
            )
        if s.saturation is not None:
            assert rows[name]["saturation"] == pytest.approx(s.saturation, rel=1e-6)
    assert run["findings"] == [f.to_dict() for f in last.findings]
    assert run["problems"] == []


def test_fail_on_sets_the_exit_status(runs):
    root, _, _ = runs
    assert gradwatch_cli("report", str(root), "--fail-on", "error").returncode == 1
    assert gradwatch_cli("report", str(root / "healthy"), "--fail-on", "warning").returncode == 0
    assert gradwatch_cli("report", str(root / "broken"), "--fail-on", "warning").returncode == 1


def only_event_file(run_dir: Path) -> Path:
    (file,) = run_dir.glob("events.out.tfevents.*")
    return file


def test_truncated_and_corrupt_files_report_what_was_read_and_what_was_not(runs, tmp_path):
    root, broken, _ = runs
    for name, damage in (("truncated", "tail"), ("corrupt", "middle")):
        shutil.copytree(root / "broken", tmp_path / name)
        file = only_event_file(tmp_path / name)
        data = bytearray(file.read_bytes())
        if damage == "tail":
            data = data[:-40]
        else:
            data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    out = gradwatch_cli("report", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    data = {r["run"]: r for r in json.loads(out.stdout)["runs"]}
    (note,) = data["truncated"]["problems"]
    assert "incomplete record" in note
    assert data["truncated"]["first_step"] == 0
    (note,) = data["corrupt"]["problems"]
    assert "corrupt record at byte" in note and "skipped" in note
    assert data["corrupt"]["first_step"] == 0
    text = gradwatch_cli("report", str(tmp_path / "corrupt")).stdout
    assert "note: " in text and "corrupt record" in text


def test_a_run_still_being_written_is_read(tmp_path):
    reports, gw = write_run(tmp_path / "live", nn.Sigmoid, steps=3, close=False)
    try:
        gw.flush()  # what a long run has on disk after a flush
        out = gradwatch_cli("report", str(tmp_path), "--json")
        assert out.returncode == 0, out.stderr
        (run,) = json.loads(out.stdout)["runs"]
        assert run["latest_step"] == reports[-1].step
    finally:
        gw.close()


def test_empty_missing_and_foreign_directories_fail_clearly(tmp_path):
    out = gradwatch_cli("report", str(tmp_path / "nope"))
    assert out.returncode == 2 and "is not a directory" in out.stderr
    out = gradwatch_cli("report", str(tmp_path))
    assert out.returncode == 2 and "no TensorBoard event files" in out.stderr
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "other") as w:
        w.add_scalar("loss", 1.0, 0)
    out = gradwatch_cli("report", str(tmp_path))
    assert out.returncode == 2
    assert "without gradwatch data" in out.stderr and "no gradwatch data" in out.stderr


def test_bad_options_exit_2():
    out = gradwatch_cli("report", ".", "--fail-on", "panic")
    assert out.returncode == 2 and "--fail-on" in out.stderr


def test_fail_on_names_the_run_kind_and_layer_that_tripped_it(runs):
    root, _, _ = runs
    out = gradwatch_cli("report", str(root), "--fail-on", "warning")
    assert out.returncode == 1
    (line,) = [x for x in out.stderr.splitlines() if "--fail-on" in x]
    assert "run broken: vanishing" in line and "at `0`" in line and "healthy" not in line


def test_a_closed_pipe_ends_quietly(runs):
    root, _, _ = runs
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gradwatch.cli"]
    child = subprocess.Popen(
        command + ["report", str(root), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child.stdout.close()  # like `| head`: the reader is gone before a byte is written
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_layer_types_and_left_out_rows_are_shown_where_they_are(runs):
    root, _, _ = runs
    text = gradwatch_cli("report", str(root / "healthy"), "--max-rows", "6").stdout
    lines = text.splitlines()
    assert any(line.split()[:2] == ["0", "Linear"] for line in lines[2:])
    assert any(line.split()[:2] == ["1", "ReLU"] for line in lines[2:])
    gaps = [k for k, line in enumerate(lines) if "more layers (--max-rows)" in line]
    table_end = max(k for k, line in enumerate(lines) if line.split()[:1] == ["20"])
    assert gaps and gaps[0] < table_end  # marked in the middle, where the rows are missing


def test_runs_written_before_the_findings_log_are_still_read(tmp_path):
    """Earlier versions kept the findings as JSON in a `gradwatch/findings_json` text event."""
    from torch.utils.tensorboard import SummaryWriter

    reports, _ = write_run(tmp_path / "old", nn.Sigmoid, steps=3)
    (tmp_path / "old" / "gradwatch_findings.jsonl").unlink()
    payload = {
        "schema_version": 1,
        "step": 2,
        "findings": [f.to_dict() for f in reports[-1].findings],
    }
    with SummaryWriter(tmp_path / "old") as writer:
        writer.add_text("gradwatch/findings_json", json.dumps(payload), 2)
    data = json.loads(gradwatch_cli("report", str(tmp_path), "--json").stdout)
    (run,) = data["runs"]
    assert run["findings"] == payload["findings"] and run["findings_step"] == 2


def test_runs_written_with_the_earlier_tag_names_are_read(tmp_path):
    """Before the per-metric sections, per-layer tags were gradwatch/<metric>/<layer>."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "old") as writer:
        for step, value in ((0, 2.0), (5, 0.5)):
            writer.add_scalar("gradwatch/global/skipped", 0.0, step)
            writer.add_scalar("gradwatch/grad_norm/0", value, step)
            writer.add_scalar("gradwatch/log10_signal_ratio/0", -3.0, step)
            writer.add_scalar("gradwatch/saturation/1", 0.25, step)
    (run,) = json.loads(gradwatch_cli("report", str(tmp_path), "--json").stdout)["runs"]
    rows = {r["layer"]: r for r in run["layers"]}
    assert rows["0"]["grad_norm"] == 0.5 and rows["0"]["grad_norm_first"] == 2.0
    assert rows["0"]["log10_signal_ratio"] == -3.0 and rows["1"]["saturation"] == 0.25


class Cut(nn.Module):
    """Multiplies by zero: the layer before it gets an exactly zero gradient."""

    def forward(self, x):
        return x * 0.0


def test_one_number_format_in_every_output_and_zero_is_0(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Cut(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    report = diagnose_model(model, ce(x, y), log_dir=tmp_path)
    assert report.layers["0"].signal == 0.0 and report.layers["0"].grad_norm == 0.0
    row = next(line for line in report.table().splitlines() if line.startswith("0 "))
    assert row.split()[2:4] == ["0", "0"]  # grad_norm and signal, exactly zero
    cli = gradwatch_cli("report", str(tmp_path)).stdout
    cli_row = next(line for line in cli.splitlines() if line.startswith("0 "))
    assert cli_row.split()[2] == "0" and cli_row.split()[4] == "0"  # not 1.0e-12
    for text in (str(report), report.table(), report._repr_html_(), cli):
        assert "0.00e+00" not in text and "-0.0" not in text and " x0 " not in text
    assert "signal/out:" in cli and "saturation" in report.table()


def test_a_saturated_bounded_activation_reads_as_saturated_not_dead(tmp_path):
    """Issue 37: a Tanh row showed "dead 100%" while its finding said saturation. Units flat for
    every sample of a bounded activation are saturated: its dead column is "-" in every view,
    and a ReLU row keeps its dead units."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU())
    model[2].bias.data.fill_(-100.0)  # every ReLU unit off: dead
    x = torch.randn(32, 8) * 1000  # most tanh units at +-1 for every sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = diagnose_model(model, lambda m: m(x).sum(), log_dir=tmp_path)
    tanh, relu = report.layers["1"], report.layers["3"]
    assert tanh.dead_units > 0.5 and tanh.saturation > 0.9  # the statistic itself is kept
    assert relu.dead_units == 1.0
    assert {f.kind for f in report.findings if f.layer == "1"} == {"saturation"}

    def dead_column(text: str, layer: str) -> str:
        line = next(line for line in text.splitlines() if line.split()[:1] == [layer])
        cells = line.split()
        return cells[-2] if cells[-1] == "!" else cells[-1]

    cli = gradwatch_cli("report", str(tmp_path)).stdout
    for text in (report.table(), cli):
        assert dead_column(text, "1") == "-" and dead_column(text, "3") == "100%"
    rows = report._repr_html_().split("<tr>")
    tanh_row = next(r for r in rows if r.startswith("<td>1 ") or r.startswith("<td>1<"))
    assert tanh_row.endswith("<td>-</td></tr>") or "<td>-</td></tr>" in tanh_row

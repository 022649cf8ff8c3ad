"""Reports: strict JSON out and back, and the table print() shows."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import GradWatch

from .helpers.nets import small_net


def test_report_to_dict_is_strict_json_and_str_is_a_table():
    model = small_net()
    x = torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with GradWatch(model, every_n_steps=1) as gw:
            (model(x).sum() * float("nan")).backward()
            r = gw.step()
    text = json.dumps(r.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert back["layers"][0]["grad_norm"] is None  # NaN became null
    assert any(f["kind"] == "nonfinite" for f in back["findings"])
    text = str(r)
    assert "global grad norm" in text and "ERROR nonfinite" in text and "check-nonfinite" in text
    assert "4      Linear" in text  # the layer table, with the type beside each name


def test_the_demos_report_fits_a_screen_and_names_every_flagged_layer():
    """The demo's broken net after 300 steps: 16 findings, one cause, three remedies. Printed
    once each, grouped; the steps it was first seen and last confirmed; a compact layer table
    that marks where layers are left out; the same in HTML for notebooks."""
    from gradwatch.cli import demo

    torch.manual_seed(0)
    x, y = demo.synthetic_data(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        run = demo.train("broken", demo.broken_mlp(20, 128), x, y, 300, None, progress=False)
    report = run.last_report
    text = str(report)
    lines = text.splitlines()
    assert len(lines) <= 40 and len(report.findings) >= 12
    for f in report.findings:
        assert f"`{f.layer}`" in text
    assert text.count("Change") + text.count("change:") == 3  # each remedy once
    assert "first seen at step 0, still at step 290" in text
    assert "chain" not in text and "`#`" not in text
    assert any(line.strip().startswith("… ") and "more layers" in line for line in lines)
    table = report.table().splitlines()  # a header, every layer, what the mark means
    assert len(table) == len(report.layers) + 2 and table[-1] == "! the layer is named in a finding"
    page = report._repr_html_()
    assert page.count("<li>") == 3 and page.count("<tr>") >= 8 and "<table>" in page
    for f in report.findings:
        assert f"<code>{f.layer}</code>" in page
    assert "`" not in page  # a notebook shows code as code, not backticks
    assert "! the layer is named in a finding" in page  # the same mark and words as table()


def test_report_from_dict_inverts_to_dict():
    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    x = 1e5 + 3e4 * torch.randn(64, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with GradWatch(model, every_n_steps=1) as gw:
            model(x).sum().backward()
            r = gw.step()
    assert r.findings
    back = gradwatch.Report.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r
    with pytest.raises(ValueError, match="schema_version"):
        gradwatch.Report.from_dict({**r.to_dict(), "schema_version": 99})


def test_a_finding_says_since_when_and_reports_written_before_that_still_load():
    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    x = 1e5 + 3e4 * torch.randn(64, 1)  # the sigmoid saturates from the first step on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with GradWatch(model, every_n_steps=1) as gw:
            for _ in range(3):
                model(x).sum().backward()
                report = gw.step()
                model.zero_grad()
    (finding,) = report.findings
    assert (report.step, finding.kind, finding.since) == (2, "saturation", 0)
    d = report.to_dict()
    assert d["findings"][0]["since"] == 0
    del d["findings"][0]["since"]  # as written before findings carried it
    assert gradwatch.Report.from_dict(d).findings[0].since is None


def test_the_demos_progress_is_one_line_per_run_when_stderr_is_not_a_terminal(capsys):
    from gradwatch.cli import demo

    x, y = demo.synthetic_data(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        demo.train("broken", demo.broken_mlp(3, 16), x, y, 45, None)
    err = capsys.readouterr().err
    assert "\r" not in err  # no redrawn frames in a log file
    assert err.splitlines() == ["   broken 45/45 steps, loss " + err.split("loss ")[1].strip()]


def test_the_lightning_example_without_lightning_names_the_extra_to_install():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "lightning_trainer.py"
    hide = (
        "import sys, runpy\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        f"runpy.run_path({str(example)!r}, run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert 'pip install -e ".[lightning]"' in out.stderr


def test_a_findings_warning_reads_whole_in_a_terminal():
    torch.manual_seed(0)
    layers = []
    for _ in range(20):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 3))
    x, y = torch.randn(64, 32), torch.randint(0, 3, (64,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, every_n_steps=1) as gw:
            F.cross_entropy(model(x), y).backward()
            gw.step()
    (text,) = [str(w.message) for w in caught if w.category is gradwatch.GradWatchWarning]
    lines = text.splitlines()
    assert lines[0].startswith("gradwatch step 0: vanishing error at `0`, and 16 more layers")
    assert max(map(len, lines)) <= 100  # it was one line of 886 characters
    assert any(line.strip().startswith("1. ") and "(relu-family)" in line for line in lines)

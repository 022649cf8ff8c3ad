"""Reports: strict JSON out and back, and the table print() shows."""

import json
import warnings

import pytest
import torch
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
    table = str(r)
    assert "global grad norm" in table and "[error]" in table and "check-nonfinite" in table


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

"""The examples and the command line, run as a user runs them, with small sizes."""

import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import gradwatch
from gradwatch.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_plain_loop_example_diagnoses_the_broken_net_and_not_the_remedied(monkeypatch, capsys):
    module = runpy.run_path(str(ROOT / "examples" / "plain_loop.py"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        reports = module["main"](["--steps", "11", "--depth", "8", "--width", "32"])
    assert {f.kind for f in reports["broken"].findings} == {"vanishing"}
    assert reports["remedied"].findings == []
    out = capsys.readouterr().out
    assert "vanishing" in out and "relu-family" in out and "no findings" in out


def test_lightning_example_names_the_saturated_layer_and_the_fix_works(tmp_path):
    pytest.importorskip("lightning")
    module = runpy.run_path(str(ROOT / "examples" / "lightning_trainer.py"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw, raw_loss = module["main"](["--steps", "60", "--logdir", str(tmp_path)])
        fixed, fixed_loss = module["main"](["--steps", "60", "--logdir", "none", "--standardize"])
    found = {(f.layer, f.kind): [r.id for r in f.remedies] for f in raw.findings}
    assert found[("net.1", "saturation")][0] == "standardize-inputs"
    assert fixed.findings == [] and fixed_loss < raw_loss - 0.3
    assert list((tmp_path / "raw").glob("version_0/events.out.tfevents.*"))


def test_hf_trainer_example_names_the_attention_logits_and_a_lower_rate_is_quiet(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    module = runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        high = module["main"](["--steps", "60", "--out", str(tmp_path)])
        low = module["main"](["--steps", "60", "--out", "none", "--lr", "3e-3"])
    found = {f.kind: [r.id for r in f.remedies] for f in high.findings}
    assert found["attention_logits"][:2] == ["qk-layernorm", "qk-clip"]
    assert low.findings == []
    assert list((tmp_path / "runs" / "gradwatch").glob("events.out.tfevents.*"))


def test_demo_entry_point_runs_and_writes_both_runs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradwatch.cli",
            "demo",
            "--steps",
            "30",
            "--depth",
            "8",
            "--width",
            "32",
            "--logdir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = proc.stdout
    assert "vanishing" in out and "(relu-family)" in out
    assert "Before / after" in out and f"tensorboard --logdir {tmp_path / 'runs'}" in out
    for run in ("broken", "remedied"):
        assert list((tmp_path / "runs" / run).glob("events.out.tfevents.*"))


def test_demo_remedy_improves_training():
    from gradwatch.cli.demo import run_demo

    broken, remedied = run_demo(steps=120, depth=10, width=64, logdir=None)
    assert remedied.last_loss < broken.last_loss - 0.3
    assert broken.first_report.findings and not remedied.last_report.findings


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--depth", "x"], ["nope"]])
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err

"""The README documents what the code does: every remedy id and every TensorBoard tag family."""

from pathlib import Path

import gradwatch
from gradwatch.sinks import LAYER_METRICS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_opens_with_the_demo_and_test_commands():
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert lines[0].endswith("gradwatch demo")
    assert lines[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci
    assert ci.strip().splitlines()[-1] == "python -m pytest"


def test_every_remedy_and_metric_is_documented():
    for rid in gradwatch.CATALOGUE:
        assert f"`{rid}`" in README, rid
    for metric in LAYER_METRICS:
        assert f"gradwatch/{metric}/<layer>" in README, metric

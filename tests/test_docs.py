"""The docs document what the code does: the README's commands, every remedy and every
TensorBoard tag family in the reference pages, and links that lead somewhere."""

import doctest
import re
from pathlib import Path

import gradwatch
from gradwatch import options, watch
from gradwatch.diagnosis import thresholds
from gradwatch.output.tags import LAYER_METRICS, layer_tag
from gradwatch.report.remedies import catalogue_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [
    ROOT / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]


def test_readme_opens_with_the_demo_and_test_commands():
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert lines[0].endswith("gradwatch demo")
    assert lines[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci
    assert ci.strip().splitlines()[-1] == "python -m pytest"


def test_the_readme_stays_an_overview():
    assert len(README.splitlines()) <= 220


def test_the_remedy_catalogue_page_is_generated_from_the_catalogue():
    rules = (ROOT / "docs" / "rules.md").read_text()
    assert (
        catalogue_markdown() in rules
    )  # regenerate with gradwatch.report.remedies.catalogue_markdown()
    for rid in gradwatch.CATALOGUE:
        assert f"`{rid}`" in rules, rid


def test_every_tag_family_is_documented():
    tags = (ROOT / "docs" / "tensorboard.md").read_text()
    for metric in (*LAYER_METRICS, "log10_grad_norm", "log10_signal_ratio"):
        assert f"`{layer_tag(metric, '<layer>')}`" in tags, metric
    assert "`gradwatch_8_through_time/<layer>/t<q>`" in tags


def test_every_relative_link_leads_to_a_file():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), (page.name, target)


def test_the_docstring_examples_run():
    for module in (watch, options, thresholds):  # GradWatch, Options, Thresholds
        result = doctest.testmod(module)
        assert result.attempted >= 2 and result.failed == 0, module.__name__

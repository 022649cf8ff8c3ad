"""The remedy catalogue: every entry complete, every id the rules name is in it, and the text a
finding carries names the layer, the measured value and the change."""

import ast
from pathlib import Path

import gradwatch
from gradwatch.report.remedies import CATALOGUE, action, remedies, remedy

# every module that makes findings
RULES = [
    Path(gradwatch.__file__).parent / "diagnosis" / name
    for name in ("rules.py", "activation_rules.py", "divergence.py")
]


def test_every_entry_has_an_action_a_reason_and_a_change():
    for rid, (what, why, code) in CATALOGUE.items():
        assert rid == rid.lower() and " " not in rid, rid
        assert what and why and code, rid
        assert not why.endswith("."), rid  # the remedy text adds its own punctuation


def test_every_remedy_the_rules_name_is_in_the_catalogue():
    # remedy ids are the rules' only lowercase hyphenated word constants
    words = {
        node.value
        for path in RULES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.replace("-", "").isalpha()
        and node.value.islower()
        and "-" in node.value
    }
    assert words <= set(CATALOGUE), words - set(CATALOGUE)
    assert len(words) >= 8  # the rules really name remedies


def test_a_remedy_names_its_context_and_the_change():
    r = remedy("he-init", "`layers.3`: vanishing signal")
    what, why, code = CATALOGUE["he-init"]
    assert r.id == "he-init"
    assert r.text == f"{what} (`layers.3`: vanishing signal): {why}. Change: `{code}`"
    assert action("he-init") == what


def test_the_same_remedies_come_back_as_the_same_objects():
    # a deep net's findings are thousands of objects a step: they are cached, not rebuilt
    first = remedies(["leaky-relu", "lower-lr"], "`relu`: dead units")
    assert remedies(["leaky-relu", "lower-lr"], "`relu`: dead units") is first
    assert [r.id for r in first] == ["leaky-relu", "lower-lr"]

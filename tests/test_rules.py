"""The rules alone, on hand-built reports: no model, no tensors."""

import math

from gradwatch import LayerStats, Report, Thresholds, diagnose
from gradwatch.diagnosis.rules import chains, role


def report_from(signals, module_type="Linear", names=None, acts=None, **kw):
    """A report with one chain; ``acts`` interleaves activation rows of that kind."""
    layers = {}
    names = names or [f"blocks.{i}.fc" for i in range(len(signals))]
    for name, sig in zip(names, signals):
        layers[name] = LayerStats(
            name, module_type, grad_norm=1.0, weight_norm=1.0, signal=sig, signal_norm=sig
        )
        if acts:
            a = f"{name}:act"
            layers[a] = LayerStats(
                a,
                acts,
                activation=acts,
                saturation=0.0,
                dead_units=0.0,
                signal=sig,
                signal_norm=sig,
                samples_per_unit=128,
            )
    return Report(step=0, layers=layers, **kw)


def test_role_replaces_every_index():
    assert role("layers.3.fc12") == "layers.#.fc#"
    assert role("encoder.layer.10.attention.self.query") == "encoder.layer.#.attention.self.query"
    assert role("") == ""


def test_steady_exponential_decay_is_vanishing_on_the_input_side_only():
    sig = [0.25 ** (10 - i) for i in range(11)]  # x4 per layer toward the output
    r = report_from(sig)
    found = diagnose(r)
    assert found and {f.kind for f in found} == {"vanishing"}
    flagged = [f.layer for f in found]
    assert flagged == [f"blocks.{i}.fc" for i in range(6)]  # ratio <= 4^-5 ~ 1e-3
    assert found[0].severity == "error" and found[-1].severity == "warning"
    assert math.isclose(found[0].value, 0.25**10)


def test_a_finding_seen_again_reuses_its_remedies():
    # A deep net finds thousands of layers a step: new remedy objects at every step made the
    # garbage collector's full passes a tenth of a 1,000-layer MLP's logging step.
    decay = [0.25 ** (10 - i) for i in range(11)]
    first = diagnose(report_from(decay))
    again = diagnose(report_from([0.24 ** (10 - i) for i in range(11)]))  # other values
    assert [f.layer for f in first] == [f.layer for f in again]
    assert [f.value for f in first] != [f.value for f in again]
    for a, b in zip(first, again):
        assert a.remedies and a.remedies is b.remedies
        assert f"`{a.layer}`" in a.remedies[0].text  # still says which layer it answers


def test_one_off_drop_is_a_shape_change_not_vanishing():
    sig = [1e-5] * 5 + [1.0] * 5  # e.g. a pooling step inside the chain
    assert diagnose(report_from(sig)) == []


def test_short_chains_are_not_judged():
    assert diagnose(report_from([1e-9, 1e-6, 1e-3])) == []
    assert diagnose(report_from([1e-9, 1e-6, 1e-3]), Thresholds(min_chain_length=3))


def test_side_branches_are_compared_like_with_like():
    # Every block's query projection gets 1e-3 of its neighbours' signal; no trend along blocks.
    layers = {}
    for i in range(8):
        for part, sig in (("query", 1e-3), ("key", 1e-3), ("out", 1.0), ("ffn", 1.0)):
            n = f"layer.{i}.{part}"
            layers[n] = LayerStats(
                n, "Linear", grad_norm=1, weight_norm=1, signal=sig, signal_norm=sig
            )
    r = Report(step=0, layers=layers)
    assert len(chains(r, 4)) == 4
    assert diagnose(r) == []


def test_exploding_growth_toward_the_input():
    r = report_from([3.0 ** (10 - i) for i in range(11)], acts="tanh")
    found = diagnose(r)
    assert {f.kind for f in found} == {"exploding"}
    assert found[0].layer == "blocks.0.fc"
    assert [x.id for x in found[0].remedies] == ["gradient-clipping", "xavier-init", "lower-lr"]


def test_vanishing_remedy_follows_the_activation_along_the_chain():
    sig = [0.25 ** (10 - i) for i in range(11)]
    bounded = diagnose(report_from(sig, acts="tanh"))
    assert bounded[0].remedies[0].id == "relu-family"
    r = report_from(sig, acts="relu")
    for s in r.layers.values():
        if s.activation is None:
            s.weight_gain = 0.58
    assert diagnose(r)[0].remedies[0].id == "he-init"
    for s in r.layers.values():
        if s.activation is None:
            s.weight_gain = 1.41
    assert diagnose(r)[0].remedies[0].id == "normalization"


def test_nonfinite_layers_are_not_judged_for_trends_and_skipped_steps_have_no_findings():
    sig = [0.25 ** (10 - i) for i in range(11)]
    r = report_from(sig)
    r.layers["blocks.10.fc"].grad_norm = float("nan")
    assert {f.kind for f in diagnose(r)} == {"nonfinite"}
    r.skipped = True
    assert diagnose(r) == []


def test_warmup_suppresses_findings():
    r = report_from([0.25 ** (10 - i) for i in range(11)])
    assert diagnose(r, Thresholds(warmup_steps=1)) == []
    r.step = 1
    assert diagnose(r, Thresholds(warmup_steps=1))


def test_saturation_and_dead_unit_thresholds():
    layers = {
        "a": LayerStats("a", "Sigmoid", activation="sigmoid", saturation=0.49),
        "b": LayerStats("b", "Tanh", activation="tanh", saturation=0.6),
        "c": LayerStats(
            "c", "ReLU", activation="relu", saturation=0.7, dead_units=0.6, samples_per_unit=128
        ),
        "d": LayerStats(
            "d", "ReLU", activation="relu", saturation=0.9, dead_units=0.95, samples_per_unit=4
        ),  # too few samples to call a unit dead
        "e": LayerStats(
            "e", "ReLU", activation="relu", saturation=0.5, dead_units=0.1, samples_per_unit=128
        ),  # a healthy ReLU: half off is normal
    }
    found = diagnose(Report(step=0, layers=layers, input_rms=1.0))
    assert [(f.layer, f.kind, f.severity) for f in found] == [
        ("b", "saturation", "warning"),
        ("c", "dead_units", "warning"),
    ]
    assert found[0].remedies[0].id == "normalization"  # inputs are scaled: not standardize


def _staged(junction):
    """Three stages of four like layers, toward the output: level within each stage and 1e2
    across them; ``junction(k)`` gives the rows between stage k and k + 1."""
    sizes = [4096] * 4 + [1024] * 4 + [256] * 4
    signals = [30.0] * 4 + [3.0] * 4 + [0.3] * 4
    layers = {}
    for i, (size, sig) in enumerate(zip(sizes, signals)):
        if i and i % 4 == 0:
            layers.update({s.name: s for s in junction(i // 4)})
        name = f"stages.{i // 4}.blocks.{i % 4}.fc"
        layers[name] = LayerStats(
            name,
            "Linear",
            grad_norm=1.0,
            weight_norm=1.0,
            signal=sig,
            signal_norm=sig,
            output_elements=size,
        )
    return Report(step=0, layers=layers)


def test_a_chain_is_cut_where_the_output_size_changes_across_other_layers():
    """A role repeated over stages joined by layers of their own (a vision transformer's patch
    merging, a normalisation) is compared within each stage only: those layers reset the scale."""
    r = _staged(lambda k: [LayerStats(f"merge{k}", "LayerNorm", grad_norm=1.0, weight_norm=1.0)])
    assert [len(c.members) for c in chains(r, 4)] == [4, 4, 4]
    assert diagnose(r, Thresholds(exploding_ratio=10)) == []
    for s in r.layers.values():  # the same numbers as one stage: growth toward the input
        s.output_elements = 256
    assert {f.kind for f in diagnose(r, Thresholds(exploding_ratio=10))} == {"exploding"}


def test_a_chain_spans_a_size_change_joined_only_by_activations():
    """Between stages of a plain stack (VGG: conv, ReLU, max-pooling, conv) nothing but an
    activation has an entry: the signal crosses the junction unchanged in norm, so the stages are
    one chain and a collapse across them is found."""
    act = lambda k: [LayerStats(f"act{k}", "ReLU", activation="relu", saturation=0.5)]
    r = _staged(act)
    assert [len(c.members) for c in chains(r, 4)] == [12]
    found = diagnose(r, Thresholds(exploding_ratio=10))
    assert {f.kind for f in found} == {"exploding"}
    assert found[0].layer == "stages.0.blocks.0.fc"


def test_dead_relu_units_must_outnumber_what_chance_signs_give():
    """Among the units that never switched, dead ones against always-on ones: 5 of 8 is a fair
    coin, 8 of 8 with none on is not (p = 1/256)."""

    def relu(dead, active, units=8):
        s = LayerStats("act", "ReLU", activation="relu", dead_units=dead / units)
        s.active_units, s.units, s.samples_per_unit = active / units, units, 64
        return Report(step=0, layers={"act": s})

    assert [f.kind for f in diagnose(relu(8, 0))] == ["dead_units"]
    assert diagnose(relu(5, 3)) == []
    assert diagnose(relu(6, 1)) == []  # p = 8/128
    assert [f.kind for f in diagnose(relu(40, 2, units=64))] == ["dead_units"]
    gelu = relu(5, 3)
    gelu.layers["act"].activation = "gelu"  # not flat below 0 only: no coin to toss
    assert [f.kind for f in diagnose(gelu)] == ["dead_units"]


def test_a_saturated_gate_over_pooled_values_is_not_saturation():
    """A squeeze-and-excitation gate holds one value per sample and channel; saturated, it sets
    channels fully on or off, which is its job. The same saturation over a feature map is not."""
    for pooled, expected in ((True, []), (False, ["saturation"]), (None, ["saturation"])):
        layers = {
            "fc": LayerStats("fc", "Conv2d", grad_norm=1.0, weight_norm=1.0, weight_gain=1.0),
            "gate": LayerStats(
                "gate", "Hardsigmoid", activation="hardsigmoid", saturation=0.8, pooled=pooled
            ),
        }
        found = diagnose(Report(step=0, layers=layers, input_rms=1.0))
        assert [f.kind for f in found] == expected, pooled

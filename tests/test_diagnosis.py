"""The public model zoo, diagnosed end to end through the engine."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import GradWatch, Report

from .conftest import ce, diagnose_model
from .helpers import runs, zoo


def kinds(report):
    return {f.kind for f in report.findings}


def remedy_ids(report, kind):
    return [[r.id for r in f.remedies] for f in report.findings if f.kind == kind]


def batch():
    return zoo.classification_batch()


def test_deep_sigmoid_vanishes_on_the_first_layers_not_the_head():
    r = diagnose_model(zoo.mlp(nn.Sigmoid), ce(*batch()))
    assert kinds(r) == {"vanishing"}
    flagged = {f.layer for f in r.findings}
    assert {"0", "2", "4"} <= flagged
    assert "40" not in flagged and "38" not in flagged  # head and the layer before it
    first = next(f for f in r.findings if f.layer == "0")
    assert first.severity == "error" and first.value < 1e-10
    assert [r.id for r in first.remedies][:3] == ["relu-family", "normalization", "residual"]
    assert "sigmoid" in first.message and "1/4" in first.message


def test_deep_relu_default_init_vanishes_with_he_init_remedy():
    r = diagnose_model(zoo.mlp(nn.ReLU), ce(*batch()))
    assert kinds(r) == {"vanishing", "init"}  # the init audit of the first step names it too
    assert all(ids[0] == "he-init" for ids in remedy_ids(r, "vanishing"))
    assert remedy_ids(r, "init") == [["he-init"]]
    assert "0" in {f.layer for f in r.findings}


def test_deep_relu_he_init_is_healthy():
    assert (
        diagnose_model(zoo.mlp(nn.ReLU, init=zoo.he), ce(*batch()), steps=3, lr=0.01).findings == []
    )


def test_deep_tanh_xavier_is_healthy():
    assert (
        diagnose_model(zoo.mlp(nn.Tanh, init=zoo.xavier), ce(*batch()), steps=3, lr=0.01).findings
        == []
    )


def test_relu_with_too_large_weights_explodes():
    r = diagnose_model(zoo.mlp(nn.ReLU, init=zoo.too_large), ce(*batch()))
    assert kinds(r) == {"exploding", "init"}
    assert remedy_ids(r, "init") == [["he-init"]]
    assert "0" in {f.layer for f in r.findings}
    for ids in remedy_ids(r, "exploding"):
        assert ids[:2] == ["gradient-clipping", "he-init"]


def test_residual_sigmoid_blocks_do_not_vanish():
    r = diagnose_model(zoo.ResidualSigmoid(), ce(*batch()), steps=3, lr=0.01)
    assert "vanishing" not in kinds(r) and "exploding" not in kinds(r)


def test_logistic_regression_on_raw_salary_saturates_and_says_standardize():
    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    x, y = zoo.salary_batch()
    r = diagnose_model(model, lambda m: F.binary_cross_entropy(m(x).clamp(1e-6, 1 - 1e-6), y))
    (f,) = r.findings
    assert f.kind == "saturation" and f.layer == "1" and f.severity == "error"
    assert f.value > 0.99
    assert f.remedies[0].id == "standardize-inputs"
    assert r.input_rms > 1e4
    # the same model on standardised inputs is healthy
    xs = (x - x.mean()) / x.std()
    r = diagnose_model(model, lambda m: F.binary_cross_entropy(m(xs), y))
    assert r.findings == []


def test_relu_with_large_negative_bias_has_dead_units_with_leaky_relu():
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    r = diagnose_model(zoo.DeadReLU(), ce(x, y))
    (f,) = [f for f in r.findings if f.kind == "dead_units"]
    assert f.layer == "act" and f.value == 1.0 and f.severity == "error"
    assert [r.id for r in f.remedies][:2] == ["leaky-relu", "lower-lr"]


def test_nan_loss_is_nonfinite_naming_the_first_layer_in_backward_order():
    model = zoo.mlp(nn.ReLU, depth=4, width=32, init=zoo.he)
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    r = diagnose_model(model, lambda m: F.cross_entropy(m(x), y) * float("nan"))
    nonfinite = [f for f in r.findings if f.kind == "nonfinite"]
    assert {f.layer for f in nonfinite} == {"0", "2", "4", "6", "8"}
    assert all(f.severity == "error" for f in nonfinite)
    origin = next(f for f in nonfinite if f.layer == "8")
    assert "4 other layers" in origin.message
    assert all("`8`" in f.message for f in nonfinite)
    assert all(f.remedies[0].id == "check-nonfinite" for f in nonfinite)
    assert kinds(r) == {"nonfinite"}


def test_nan_input_is_named_as_the_source():
    model = zoo.mlp(nn.ReLU, depth=2, width=8, init=zoo.he)
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    r = diagnose_model(model, lambda m: m(x).sum())
    assert all("inputs contain NaN/Inf" in f.message for f in r.findings)


def tanh_net_with_unit_normal_weights(seed, depth=10, width=64):
    """A tanh MLP whose weights are N(0, 1): a gain of sqrt(fan_in) = 8, not Xavier's 1."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight, 0.0, 1.0)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 5))


@pytest.mark.parametrize("seed, depth, width", [(0, 10, 64), (3, 6, 128)])  # 2nd held out
def test_tanh_saturated_by_oversized_weights_names_the_gain_and_offers_xavier_first(
    seed, depth, width
):
    torch.manual_seed(100 + seed)
    x, y = torch.randn(128, width), torch.randint(0, 5, (128,))
    r = diagnose_model(tanh_net_with_unit_normal_weights(seed, depth, width), ce(x, y))
    saturated = [f for f in r.findings if f.kind == "saturation"]
    assert saturated
    for f in saturated:
        assert f.remedies[0].id == "xavier-init"
        assert "above Xavier init" in f.message and "/sqrt(fan_in)" in f.message
    gain = r.layers["0"].weight_gain
    assert f"{gain:.2f}/sqrt(fan_in)" in saturated[0].message


def test_a_cause_quotes_the_weights_of_the_step_it_describes():
    """weight_norm_every=10 measures the weights at step 0 only; when an exploding chain appears
    at step 1 (the weights tripled), its cause must quote step 1's gain, not step 0's He gain."""
    torch.manual_seed(0)
    model = zoo.mlp(nn.ReLU, depth=20, init=zoo.he)
    x, y = batch()
    with gradwatch.GradWatch(model, every_n_steps=1, warn=False, weight_norm_every=10) as gw:
        F.cross_entropy(model(x), y).backward()
        first = gw.step()
        model.zero_grad()
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear) and m.out_features == m.in_features:
                    m.weight.mul_(3.0)
        F.cross_entropy(model(x), y).backward()
        second = gw.step()
    assert first.findings == [] and first.weight_step == 0
    exploding = [f for f in second.findings if f.kind == "exploding"]
    assert exploding and second.weight_step == 1
    gain = second.layers["0"].weight_gain
    assert gain == pytest.approx(3 * first.layers["0"].weight_gain, rel=1e-4)
    assert "far above He init" in exploding[0].message
    assert "weights as of step" not in exploding[0].message


@pytest.mark.parametrize(
    "batch_size, bias, width", [(8, -50.0, 32), (4, -20.0, 48)]
)  # 2nd held out
def test_units_dead_at_a_small_batch_are_found_once_they_stay_dead_over_logging_steps(
    batch_size, bias, width
):
    """One step of 8 inputs is too little to call a unit dead; the same units off over several
    logging steps are (a unit with no gradient keeps its weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
    )
    with torch.no_grad():
        model[2].bias.fill_(bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    found = {}
    with gradwatch.GradWatch(model, every_n_steps=1, warn=False) as gw:
        for step in range(20):
            x, y = torch.randn(batch_size, 16), torch.randint(0, 3, (batch_size,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            found[step] = [f for f in gw.step().findings if f.kind == "dead_units"]
            opt.step()
    need = -(-16 // batch_size)  # logging steps until 16 inputs per unit
    assert all(not found[s] for s in range(need - 1))
    for s in range(need - 1, 20):
        assert [f.layer for f in found[s]] == ["3"]
    assert f"over the last {need} logging steps" in found[need - 1][0].message


# -- gradwatch.diagnose: the same findings from the reports alone ----------------------------------


def _replayed(reports):
    """For each logging step, ``gradwatch.diagnose`` of the reports up to it against what
    ``GradWatch`` found there; through JSON too (as a sink writes them) while every value is
    finite (strict JSON turns NaN and inf into null)."""
    finite = [r for r in reports.values() if not any(f.kind == "nonfinite" for f in r.findings)]
    rows = [Report.from_dict(json.loads(json.dumps(r.to_dict()))) for r in finite]
    for k, report in enumerate(finite):
        again = gradwatch.diagnose(rows[: k + 1])
        assert [f.to_dict() for f in again] == [f.to_dict() for f in report.findings], k
    rows = [copy.deepcopy(r) for r in reports.values()]
    for k, (step, report) in enumerate(reports.items()):
        again = gradwatch.diagnose(rows[: k + 1])
        assert [f.to_dict() for f in again] == [f.to_dict() for f in report.findings], step
    return [f.kind for r in reports.values() for f in r.findings]


def test_diagnose_replays_a_divergence_and_its_cause():
    """Optimizer mode at lr 10: diverging (from the history), exploding with the weights' growth
    since step 0, dead units pointing to the divergence, non-finite at the end."""
    torch.manual_seed(1)
    x, y = torch.randn(64, 10), torch.randn(64, 1)
    hidden = [m for _ in range(3) for m in (nn.Linear(32, 32), nn.ReLU())]
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), *hidden, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    reports = runs.train(model, opt, lambda m, s: F.mse_loss(m(x), y), 6, watch_optimizer=True)
    kinds = _replayed(reports)
    assert {"diverging", "exploding", "nonfinite"} <= set(kinds)


def test_diagnose_replays_the_init_audit_and_the_curvature_rules():
    reports = runs.full_batch_tanh(lr=0.4, steps=400, every=20, seed=1)
    assert "sharp_curvature" in _replayed(reports)
    model, opt, loss_of = runs.small_init_relu()
    reports = runs.train(model, opt, loss_of, 30, every=10)
    assert {"init", "vanishing"} <= set(_replayed(reports))


def test_diagnose_of_one_report_is_gradwatch_on_its_first_logging_step():
    torch.manual_seed(0)
    model = zoo.mlp(nn.Sigmoid, depth=12, width=32)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    with GradWatch(model, every_n_steps=1, warn=False) as gw:
        F.cross_entropy(model(x), y).backward()
        report = gw.step()
    assert report.findings and gradwatch.diagnose(report) == report.findings

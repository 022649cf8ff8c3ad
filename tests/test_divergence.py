"""Divergence before it is NaN: whole runs that diverge must be caught while finite, healthy runs
of a few hundred steps must stay silent, and the detector's statistics are checked directly."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.diagnosis.divergence import RunHistory
from gradwatch.diagnosis.rules import Thresholds
from gradwatch.measure.stats import learning_rate
from gradwatch.report import Finding, LayerStats, Report

from .helpers import runs, zoo

T = Thresholds()


def first(reports, kind):
    return min(
        (s for s, r in reports.items() if any(f.kind == kind for f in r.findings)), default=None
    )


def finding(report, kind):
    return next(f for f in report.findings if f.kind == kind)


# -- whole runs ------------------------------------------------------------------------------------


def test_relu_mlp_at_lr_10_is_diverging_while_its_gradient_is_still_finite():
    reports = runs.relu_regression_sgd()
    warned, broken = first(reports, "diverging"), first(reports, "nonfinite")
    assert warned is not None and broken is not None and warned < broken
    f = finding(reports[warned], "diverging")
    assert math.isfinite(reports[warned].global_grad_norm)
    assert [r.id for r in f.remedies][:2] == ["lower-lr", "gradient-clipping"]
    assert f.layer in reports[warned].layers and f"`{f.layer}`" in f.message
    assert reports[warned].findings[0] is f  # the cause leads


@pytest.mark.parametrize(
    "factor, seed, features",
    [(2.3, 1, 20), (2.1, 5, 12), (2.6, 7, 40)],  # the quoted case, then two held out
)
def test_gradient_descent_past_its_stability_limit_is_caught_long_before_overflow(
    factor, seed, features
):
    """lr = factor / lambda_max with factor > 2: the gradient grows by about (factor - 1) per step,
    steadily; it must be flagged while it is still far from overflowing."""
    reports, overflow = runs.linear_regression_past_stability(factor, seed=seed, features=features)
    warned = first(reports, "diverging")
    assert warned is not None
    assert overflow is None or overflow - warned >= 50
    f = finding(reports[warned], "diverging")
    assert "grew" in f.message and f.severity == "warning"
    assert reports[warned].global_grad_norm < 1e6 * reports[0].global_grad_norm


def test_stable_gradient_descent_just_below_the_limit_raises_nothing():
    reports, overflow = runs.linear_regression_past_stability(1.9, steps=300)
    assert overflow is None and runs.kinds(reports) == {}


@pytest.mark.parametrize("name", sorted(runs.HEALTHY_RUNS))
def test_healthy_runs_of_300_steps_raise_nothing_at_any_step(name):
    """Measured at every step (the noisiest history): an MLP, a batch-norm CNN under a one-cycle
    schedule, a pre-norm transformer LM with warm-up and an LSTM; in optimizer mode, so the size
    of every update is judged too."""
    reports = runs.HEALTHY_RUNS[name](watch_optimizer=True)
    assert len(reports) == 300
    assert runs.kinds(reports) == {}, {
        s: [f.message for f in r.findings] for s, r in reports.items() if r.findings
    }


def test_a_learning_rate_jumping_100x_is_named_and_the_dead_units_point_to_it():
    """The schedule bug: AdamW's learning rate multiplied by 100 at step 150 of a byte-level LM.
    The divergence leads, quotes the learning rate, and the GELU units that die with it say so
    instead of offering leaky-relu first."""

    def schedule_bug(step, optimizer):
        if step == 150:
            for group in optimizer.param_groups:
                group["lr"] *= 100

    reports = runs.byte_lm(
        steps=171, every=10, warmup=None, on_step=schedule_bug, watch_optimizer=True
    )
    assert runs.kinds(reports, "diverging") and first(reports, "diverging") in (150, 160)
    step = first(reports, "diverging")
    report = reports[step]
    lead = report.findings[0]
    assert lead.kind == "diverging"
    assert "learning rate rose from 0.003" in lead.message
    assert all(not r.findings for s, r in reports.items() if s < 150)
    consequences = [
        f for r in reports.values() for f in r.findings if f.kind in ("dead_units", "saturation")
    ]
    for f in consequences:
        assert f"divergence at step {step}" in f.message
        assert f.remedies[0].id == "lower-lr"


# -- the detector's statistics ---------------------------------------------------------------------


def report(step, norm, layers=None):
    layers = layers or {"a": norm}
    stats = {n: LayerStats(n, "Linear", grad_norm=v) for n, v in layers.items()}
    return Report(step, stats, global_grad_norm=norm)


def feed(norms, jump=T.jump_ratio, growth=T.growth_ratio):
    """Judge then remember each norm in turn; the steps that were found diverging."""
    history, found = RunHistory(), []
    for step, norm in enumerate(norms):
        r = report(step, norm)
        if history.judge(r, jump, growth):
            found.append(step)
        history.add(r)
    return found


def test_a_rise_of_6x_in_the_first_steps_and_a_one_cycle_swing_stay_silent():
    assert feed([1, 2, 4, 6, 6, 5, 4]) == []
    swing = [1 + 4 * math.sin(math.pi * s / 60) ** 2 for s in range(120)]  # 1x..5x and back
    assert feed(swing) == []


def test_a_jump_must_clear_the_runs_own_spread():
    rng = random.Random(0)
    noisy = [10 ** rng.gauss(0, 0.4) for _ in range(30)]  # a noisy run: 2.5x a standard deviation
    quiet = [10 ** rng.gauss(0, 0.02) for _ in range(30)]
    assert feed(noisy) == [] and feed(quiet) == []
    assert feed(quiet + [20]) == [30]  # 20x a quiet run's median
    assert feed(noisy + [20]) == []  # within 6 of the noisy run's standard deviations...
    assert feed(noisy + [1e4]) == [30]  # ...but not this


def test_a_jump_back_to_a_level_the_run_has_been_at_is_no_divergence():
    """Late in a one-cycle run (seed 1 of the batch-norm CNN, on one thread) the gradient norm
    sits near 0.006 and one hard batch lifts it 57x for one step; the run was at 2.0 when it
    started. Above every earlier level, the same jump is one."""
    rng = random.Random(1)
    late = [0.006 * 10 ** rng.gauss(0, 0.15) for _ in range(30)]
    assert feed([2.0] + late + [0.367]) == []
    assert feed([0.3] + late + [0.367 * 10]) == [31]


def test_with_little_history_a_jump_must_be_the_square_of_jump_ratio():
    assert feed([1, 50]) == [] and feed([1, 500]) == [1]
    assert feed([1] * 6 + [50]) == [6]  # enough history: jump_ratio itself


def test_steady_growth_needs_its_factor_over_several_steps_and_nearly_every_step_rising():
    assert feed([1.3**s for s in range(40)])[0] == 13  # 1.3^13 = 30
    assert feed([1.3**s for s in range(5)]) == []  # too few steps to call it a trend
    zigzag = [1.3**s * (0.5 if s % 2 else 1) for s in range(40)]  # rises on half the steps only
    assert 13 not in feed(zigzag, jump=1e9)


def test_growth_must_clear_the_runs_own_step_to_step_noise():
    """A batch-norm CNN under one-cycle SGD (seed 3, steps 133-158): its gradient norm swings up
    to 20x from one step to the next, and six steps from a dip to a spike rise 97x end to end and
    on five of them. Along the window's line, and against that noise, it is no trend; the same
    rise as a steady exponential is."""
    measured = [1.01, 0.0855, 0.16, 0.0515, 0.785, 0.0623, 0.0612, 0.3, 0.552, 0.0695, 0.289]
    measured += [1.27, 0.175, 0.0745, 0.22, 0.326, 0.223, 0.286, 0.63, 0.47, 0.312, 0.593]
    measured += [0.157, 0.00838, 0.0199, 0.0727, 0.0685, 0.0698, 0.813]
    assert feed(measured) == []
    steady = [0.3] * 20 + [0.3 * 2.5**k for k in range(1, 7)]  # 2.5x a step, from a quiet run
    assert feed(steady, jump=1e9) != []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_held_out_seeds_of_the_noisiest_healthy_run_raise_nothing(seed):
    reports = runs.bn_cnn_one_cycle(seed=seed, watch_optimizer=True)
    assert runs.kinds(reports) == {}


def test_an_update_larger_than_the_weights_is_diverging_before_the_step():
    """The issue's 24-layer transformer without layer norm at learning rate 1.0 (AdamW): the
    gradient norm at step 0 is unremarkable and step 1 is NaN; Adam's first update is lr per
    weight, a gain of lr * sqrt(fan_in) = 16 for the 256-wide projections."""
    reports = runs.no_norm_transformer(lr=1.0, steps=3)
    warned, broken = first(reports, "diverging"), first(reports, "nonfinite")
    assert warned == 0 and broken == 1
    f = finding(reports[0], "diverging")
    assert f.layer.endswith("fc2") and f.value == pytest.approx(16, rel=1e-3)
    assert "too large for the weights" in f.message and "more layers" in f.message
    assert "learning rate is 1" in f.message
    assert [r.id for r in f.remedies] == ["lower-lr"]
    assert reports[0].findings[0] is f
    # at a sane rate the same model's updates are small, and the check says nothing
    calm = runs.no_norm_transformer(lr=3e-3, steps=2)
    gains = [s.update_gain for s in calm[0].layers.values() if s.update_gain is not None]
    assert gains and max(gains) == pytest.approx(3e-3 * 16, rel=1e-3)
    # (without layer norm this model blows up even at 3e-3 within a few dozen steps, its last
    # block's attention logits past 1e3: on some texts the attention rule names it at step 1)
    assert {k for kinds in runs.kinds(calm).values() for k in kinds} <= {"attention_logits"}


def test_update_gain_follows_adams_rule_and_only_adams():
    """Adam, over several steps: lr * m_hat / (sqrt(v_hat) + eps) from its state and the new
    gradient, checked against the update torch.optim.Adam then makes. SGD (its step is lr times
    the gradient, which the divergence rules judge) and no optimizer: not measured."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    for opt, measured in (
        (torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9)), True),
        (torch.optim.SGD(model.parameters(), lr=0.5), False),
    ):
        with gradwatch.GradWatch(
            model, optimizer=opt, every_n_steps=1, weight_norm_every=1, warn=False
        ) as gw:
            for _ in range(4):
                model(torch.randn(8, 6)).pow(2).mean().backward()
                before = model[2].weight.detach().clone()
                opt.step()
                opt.zero_grad()
                moved = (model[2].weight.detach() - before).norm().item()
                got = gw.report.layers["2"].update_gain
                if measured:
                    assert got == pytest.approx(moved * math.sqrt(5 / 10), rel=1e-4)
                else:
                    assert got is None
    with gradwatch.GradWatch(model, every_n_steps=1, warn=False) as gw:
        model(torch.randn(8, 6)).pow(2).mean().backward()
        assert gw.step().layers["2"].update_gain is None


def test_skipped_and_nonfinite_steps_are_not_history():
    history = RunHistory()
    history.add(report(0, 1.0))
    history.add(Report(1, {}, global_grad_norm=math.inf))
    skipped = report(2, 1e6)
    skipped.skipped = True
    history.add(skipped)
    assert [p.step for p in history.points] == [0]
    assert history.judge(skipped, 10, 30) == []


def test_the_layer_named_is_the_one_that_grew_most():
    history = RunHistory()
    for step in range(8):
        history.add(report(step, 1.0, {"a": 1.0, "b": 0.1}))
    found = history.judge(report(8, 50.0, {"a": 2.0, "b": 49.0}), 10, 30)
    assert found and found[0].layer == "b" and "`b` (490x" in found[0].message


def test_only_consequences_that_appeared_with_or_after_the_divergence_point_to_it():
    history = RunHistory()
    for step in range(8):
        history.add(report(step, 1.0))
    assert history.judge(report(8, 100.0), 10, 30)
    remedies = gradwatch.report.remedies.remedies(["leaky-relu", "lower-lr"], "x")
    old = Finding("r", "dead_units", "warning", 0.6, 0.5, "dead.", remedies, since=3)
    new = Finding("s", "dead_units", "warning", 0.6, 0.5, "dead.", remedies, since=8)
    other = Finding("t", "vanishing", "warning", 1e-4, 1e-3, "small.", (), since=8)
    out = history.explain([old, new, other])
    assert out[0] is old and out[2] is other
    assert "divergence at step 8" in out[1].message
    assert [r.id for r in out[1].remedies] == ["lower-lr", "gradient-clipping", "leaky-relu"]
    restored = RunHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.explain([new])[0].message == out[1].message


def test_warmup_steps_hold_the_divergence_back_too():
    reports = runs.relu_regression_sgd()
    assert first(reports, "diverging") == 1
    t = Thresholds(warmup_steps=2)
    d = gradwatch.diagnosis.Diagnosis()
    found = [d.findings(reports[s], t) for s in sorted(reports) if s < 2]
    assert not any(f.kind == "diverging" for fs in found for f in fs)


@pytest.mark.parametrize("name, value", [("jump_ratio", 1.0), ("growth_ratio", 0.5)])
def test_divergence_thresholds_are_checked(name, value):
    with pytest.raises(ValueError, match=name):
        Thresholds(**{name: value})


def test_learning_rate_reads_the_largest_group_rate_and_nothing_else():
    import torch

    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [], "lr": 0.5}])
    assert learning_rate(opt) == 0.5
    opt.param_groups[1]["lr"] = torch.tensor(0.7)
    assert learning_rate(opt) == pytest.approx(0.7)
    assert learning_rate(None) is None and learning_rate(object()) is None


# -- after a divergence: the step size, not the init ---------------------------------------------

INIT_IDS = {"he-init", "xavier-init", "lecun-init", "orthogonal-init"}


def _mlp_at(lr, act, seed, steps, loss):
    torch.manual_seed(seed)
    x = torch.randn(64, 16)
    y = torch.randn(64, 1) if loss == "mse" else torch.randint(0, 4, (64,))
    hidden = [m for _ in range(3) for m in (nn.Linear(32, 32), act())]
    model = nn.Sequential(
        nn.Linear(16, 32), act(), *hidden, nn.Linear(32, 1 if loss == "mse" else 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    lossf = F.mse_loss if loss == "mse" else F.cross_entropy
    return runs.train(model, opt, lambda m, s: lossf(m(x), y), steps)


def test_weights_grown_by_training_are_named_and_the_step_size_leads():
    """The issue's case: a 5-layer ReLU MLP at SGD lr 10, over six seeds. Its exploding finding
    quoted the grown weights as a bad init; it must name the growth since step 0 and lead with
    lower-lr, never an init."""
    exploding = [
        f
        for seed in range(6)
        for r in _mlp_at(10.0, nn.ReLU, seed, 8, "mse").values()
        for f in r.findings
        if f.kind == "exploding"
    ]
    assert len(exploding) >= 3
    for f in exploding:
        ids = [r.id for r in f.remedies]
        assert ids[0] == "lower-lr" and not INIT_IDS & set(ids), ids
        assert "grew" in f.message and "since step 0" in f.message, f.message
        assert "from 0.5" in f.message  # PyTorch's default init, 0.58/sqrt(fan_in), first measured


def test_held_out_saturation_from_grown_weights_leads_with_the_step_size():
    reports = _mlp_at(10.0, nn.Tanh, 0, 12, "ce")
    grown = [
        f
        for r in reports.values()
        for f in r.findings
        if f.kind == "saturation" and "grew" in f.message
    ]
    assert grown
    for f in grown:
        ids = [r.id for r in f.remedies]
        assert ids[0] == "lower-lr" and "xavier-init" not in ids


def test_a_scale_the_model_was_built_with_keeps_its_init_remedy():
    """Too-large weights from the start stay an init problem over a run that barely moves them."""
    torch.manual_seed(0)
    model = zoo.mlp(nn.ReLU, depth=12, width=64, init=zoo.too_large)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    reports = runs.train(model, opt, lambda m, s: F.cross_entropy(m(x), y), 12, every=4)
    for r in reports.values():
        exploding = [f for f in r.findings if f.kind == "exploding"]
        assert exploding and all("he-init" in [x.id for x in f.remedies] for f in exploding)
        assert not any("grew" in f.message for f in exploding)

"""The edge of stability and the catapult are how gradient descent trains, not divergence.

Cohen et al. 2021 ("Gradient descent on neural networks typically occurs at the edge of
stability"): under full-batch gradient descent the sharpness (the Hessian's top eigenvalue) rises
until it reaches 2/lr and then hovers there while the loss keeps falling, rising and falling over a
few steps. Lewkowycz et al. 2020 ("The large learning rate phase of deep learning: the catapult
mechanism"): started between 2 and about 4 over its initial sharpness, a wide network has one loss
spike during which its sharpness drops below 2/lr, then converges. Neither is a problem; both
must leave real divergence (tests/test_divergence.py) caught as before.
"""

import pytest

from .helpers import runs


def _severities(reports):
    return {(f.kind, f.severity) for r in reports.values() for f in r.findings}


@pytest.mark.parametrize("every", [10, 1])
def test_the_edge_of_stability_figure_and_nothing_raised(every):
    """The figure at CPU size: the sharpness measured by gradwatch reaches 2/lr = 8 and hovers
    there for the second half of the run, while the loss falls by more than 10x; no warning or
    error on any logging step, and the note says where the run is."""
    reports = runs.full_batch_tanh(lr=0.25, steps=1500, every=every)
    sharpness = {s: r.curvature.top_eigenvalue for s, r in reports.items()}
    loss = {s: r.curvature.loss for s, r in reports.items()}
    assert sharpness[0] < 0.4 * 8  # it starts far below the limit ...
    reached = min(s for s, v in sharpness.items() if v >= 0.97 * 8)
    assert reached < 750  # ... sharpens up to it (progressive sharpening) ...
    late = [v for s, v in sharpness.items() if s >= 750]
    assert all(0.9 * 8 <= v <= 1.1 * 8 for v in late)  # ... and hovers at 2/lr
    assert loss[max(loss)] < loss[reached] / 10  # while the loss keeps falling
    assert _severities(reports) <= {("sharp_curvature", "info")}, _severities(reports)
    notes = [f for r in reports.values() for f in r.findings]
    assert notes and "edge of stability" in notes[-1].message
    assert not notes[-1].remedies  # nothing to change


@pytest.mark.parametrize(
    "settings",
    [  # held out: other rates, widths, depths and seeds, with momentum
        {"lr": 0.4, "seed": 1, "every": 5},
        {"lr": 0.25, "width": 128, "depth": 3, "steps": 1000},
        {"lr": 0.02, "momentum": 0.9, "steps": 1000, "seed": 3},
    ],
)
def test_held_out_runs_at_the_edge_of_stability_raise_nothing(settings):
    reports = runs.full_batch_tanh(**settings)
    assert _severities(reports) <= {("sharp_curvature", "info")}, _severities(reports)
    first, last = reports[min(reports)], reports[max(reports)]
    assert last.curvature.loss < first.curvature.loss / 10


@pytest.mark.parametrize("factor", [2.5, 3.0, 3.5])
def test_a_catapult_is_not_an_error(factor):
    """Between 2 and 4 over the initial sharpness: the first measurement says what to expect
    (a note); the loss spikes past where it started and comes down below it; the sharpness ends
    below 2/lr; no error on the way (while the spike climbs it cannot be told from a divergence,
    so a warning is allowed)."""
    reports, sharpness = runs.wide_relu_catapult(factor)
    (note,) = [f for f in reports[0].findings if f.kind == "sharp_curvature"]
    assert note.severity == "info" and "catapult" in note.message
    losses = [r.curvature.loss for r in reports.values()]
    assert max(losses) > 10 * losses[0]  # the spike ...
    assert losses[-1] < losses[0] / 10  # ... and the convergence after it
    lr = reports[0].curvature.stability_ratio * 2 / sharpness
    assert reports[max(reports)].curvature.top_eigenvalue < 2 / lr  # it flattened itself
    assert "error" not in {sev for _, sev in _severities(reports)}, _severities(reports)


def test_divergence_with_the_probe_on_is_still_caught_before_it_is_non_finite():
    """The probe's hold on jumps and growth at the edge ends once the loss passes its peak: a
    linear regression past its limit (a fixed curvature cannot flatten) is still flagged as
    diverging, and sharp_curvature warns, long before anything overflows."""
    reports, _ = runs.linear_regression_past_stability(2.3, steps=400, curvature=True)
    overflow = max(reports)  # the run stops at its first non-finite loss
    assert overflow < 399
    first = {}
    for step, r in sorted(reports.items()):
        for f in r.findings:
            if f.severity != "info":
                first.setdefault(f.kind, step)
    assert overflow - first["diverging"] >= 2, first
    assert overflow - first["sharp_curvature"] >= 2, first


def test_adam_settles_at_its_preconditioned_limit_and_nothing_is_raised():
    """Cohen et al. 2022: full-batch Adam's preconditioned sharpness rises to its limit, 38/lr at
    beta1 = 0.9 (a stability ratio of 1), and stays there while the loss falls. gradwatch
    measures the ratio settle at 1 and, adaptive ratios being reported and not judged, raises
    nothing."""
    reports = runs.full_batch_tanh(lr=0.01, steps=600, every=5, adam=True)
    ratios = [r.curvature.stability_ratio for s, r in reports.items() if s >= 150]
    assert reports[0].curvature.adaptive and reports[0].curvature.stability_ratio > 2
    assert all(0.9 < x < 1.15 for x in ratios), ratios
    assert reports[max(reports)].curvature.loss < reports[0].curvature.loss / 100
    assert _severities(reports) == set()

"""Published results reproduced at CPU size, with what gradwatch measures on them.

docs/validation.md shows each one with its plot (docs/validation/figures.py); the edge of stability
(Cohen et al. 2021) is in tests/test_edge_of_stability.py, vanishing through time (Pascanu et
al. 2013) in tests/test_through_time.py.
"""

import math

import pytest

from .helpers import papers


def _ratio(rows):
    return rows[0].signal_norm / rows[-1].signal_norm


def _predicted(rows):
    """sqrt of the product of the measured chi across the stack: the theory's ratio."""
    return math.sqrt(math.prod(s.gain_factor for s in rows[:-1]))


def test_he_2015_thirty_relu_layers_vanish_under_xavier_and_not_under_he():
    """He et al. 2015, section 2.2: with Var[W] = 1/n each ReLU layer halves the signal's
    variance, so 30 layers leave 2^-14.5 = 4e-5 of it in norm; 2/n keeps it level."""
    xavier, he = papers.he_2015("xavier"), papers.he_2015("he")
    rx, rh = papers.trunk(xavier), papers.trunk(he)
    assert 1e-5 < _ratio(rx) < 2e-4 and _ratio(rx) == pytest.approx(_predicted(rx), rel=0.3)
    assert 0.5 < _ratio(rh) < 2 and _ratio(rh) == pytest.approx(_predicted(rh), rel=0.3)
    vanishing = [f for f in xavier.findings if f.kind == "vanishing"]
    assert vanishing and vanishing[0].layer == rx[0].name
    assert vanishing[0].remedies[0].id == "he-init"
    assert he.findings == []


def test_glorot_2010_standard_init_shrinks_the_backpropagated_gradient_normalized_keeps_it():
    """Glorot & Bengio 2010, section 4.2 and figure 7: with U[-1/sqrt(n), 1/sqrt(n)] the
    back-propagated gradient of a tanh network shrinks toward the input; their normalized init
    keeps it nearly level. The measured ratio is the theory's from the measured chi."""
    standard = papers.trunk(papers.glorot_2010_gradients("standard"))
    normalized = papers.trunk(papers.glorot_2010_gradients("normalized"))
    assert _ratio(standard) < 0.15 and _ratio(normalized) > 0.3
    for rows in (standard, normalized):
        assert _ratio(rows) == pytest.approx(_predicted(rows), rel=0.3)
        steps = [a.signal_norm / b.signal_norm for a, b in zip(rows, rows[1:])]
        assert all(s < 1 for s in steps)  # down toward the input, layer after layer


def test_glorot_2010_the_top_sigmoid_layer_is_driven_flat_early_in_training():
    """Glorot & Bengio 2010, section 3.1 and figure 2: with sigmoid and the standard init, the
    last hidden layer's activations are pushed towards 0, where sigmoid is flat, while the lower
    layers stay near 0.5. gradwatch measures it as that layer's E[sigma'^2] falling far below
    its starting 1/16-ish while the others keep theirs."""
    reports = papers.glorot_2010_saturation()
    first, last = reports[min(reports)], reports[max(reports)]
    dphi2 = lambda r: [s.dphi2 for s in r.layers.values() if s.activation]  # noqa: E731
    start, end = dphi2(first), dphi2(last)
    assert all(0.055 < d < 0.0626 for d in start)  # sigma' ~ 1/4 at 0.5: E ~ 1/16
    assert end[-1] < start[-1] / 4  # the top layer went flat ...
    assert all(e > 0.8 * s for e, s in zip(end[:2], start[:2]))  # ... the lowest two did not
    tops = [dphi2(r)[-1] for r in reports.values()]
    assert all(b <= a * 1.05 for a, b in zip(tops, tops[1:]))  # steadily, from the first steps


@pytest.mark.parametrize("sigma_w2, phase", [(0.5, "ordered"), (1.0, "critical"), (2.0, "chaotic")])
def test_schoenholz_2017_the_signal_slope_is_half_the_mean_log_chi(sigma_w2, phase):
    """Schoenholz et al. 2017: the backward signal's variance is multiplied by chi at each
    layer, so log10 of its norm changes by half of log10 chi per layer. Measured over a 30-layer
    tanh network in each phase; the ordered one vanishes, the critical one is silent."""
    report = papers.tanh_mean_field(sigma_w2)
    rows = papers.trunk(report)
    slope = papers.log_slope([s.signal_norm for s in rows])  # toward the output
    half = -0.5 * sum(math.log10(s.gain_factor) for s in rows[:-1]) / (len(rows) - 1)
    assert slope == pytest.approx(half, abs=0.01)
    kinds = {f.kind for f in report.findings}
    assert ("vanishing" in kinds) == (phase == "ordered")
    if phase != "ordered":
        assert report.findings == []

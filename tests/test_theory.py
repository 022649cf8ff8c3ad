"""The theory beside the measurement: E[phi'(z)^2] of every activation against autograd, and the
per-layer gain factor chi = n_out x Var[W] x E[phi'^2] against what mean-field theory says it is
on models where it is known exactly or nearly."""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch


def measure(model, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, every_n_steps=1, **kwargs) as gw:
            model(x).pow(2).mean().backward()
            return gw.step()


ACTIVATIONS = [
    nn.Sigmoid(),
    nn.Tanh(),
    nn.ReLU(),
    nn.ReLU6(),
    nn.LeakyReLU(0.2),
    nn.ELU(0.7),
    nn.CELU(1.3),
    nn.SELU(),
    nn.GELU(),
    nn.SiLU(),
    nn.Softplus(beta=2.0),
    nn.Hardtanh(-0.5, 0.8),
    nn.Softsign(),
    nn.Hardsigmoid(),
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: type(a).__name__)
def test_dphi2_equals_the_mean_square_of_autograds_derivative(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), act, nn.Linear(32, 1))
    x = 3 * torch.randn(64, 8)
    report = measure(model, x)
    z = model[0](x).detach().requires_grad_()
    (slope,) = torch.autograd.grad(act(z).sum(), z)
    assert report.layers["1"].dphi2 == pytest.approx(slope.pow(2).mean().item(), rel=1e-4, abs=1e-7)


def test_he_initialised_relu_layers_keep_chi_near_1():
    """Var[W] = 2/fan_in and a ReLU on half the time: chi = 2 x 1/2 = 1 (within 15% at 512
    samples of 256 units)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        lin = nn.Linear(256, 256)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    report = measure(nn.Sequential(*layers, nn.Linear(256, 1)), torch.randn(512, 256))
    for i in range(0, 16, 2):
        assert report.layers[str(i)].gain_factor == pytest.approx(1.0, abs=0.15)
        assert report.layers[str(i + 1)].dphi2 == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize("gain", [0.7, 1.0, 1.3])
def test_an_orthogonal_linear_net_has_chi_equal_to_its_gain_squared(gain):
    torch.manual_seed(0)
    layers = [nn.Linear(48, 48, bias=False) for _ in range(5)]
    for lin in layers:
        nn.init.orthogonal_(lin.weight, gain=gain)
    report = measure(nn.Sequential(*layers), torch.randn(16, 48))
    for i in range(4):  # the last layer feeds nothing: no factor
        assert report.layers[str(i)].gain_factor == pytest.approx(gain**2, rel=1e-5)
    assert report.layers["4"].gain_factor is None


def test_sigmoid_derivatives_are_at_most_a_sixteenth_and_predict_the_vanishing():
    """sigma' <= 1/4, so E[sigma'^2] <= 1/16; the measured decay along the chain matches the
    product of the chis within half a decade over more than ten decades."""
    torch.manual_seed(0)
    layers = []
    for _ in range(16):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    report = measure(nn.Sequential(*layers, nn.Linear(64, 4)), torch.randn(256, 64))
    for i in range(1, 32, 2):
        assert 0 < report.layers[str(i)].dphi2 <= 1 / 16
    f = next(f for f in report.findings if f.kind == "vanishing" and f.layer == "0")
    predicted = float(re.search(r"the theory predicts ([0-9.e+-]+)", f.message).group(1))
    assert f.value < 1e-10
    assert abs(math.log10(predicted) - math.log10(f.value)) < 0.5


def test_chi_is_measured_on_the_steps_that_read_the_weights_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    reports = []
    with gradwatch.GradWatch(model, every_n_steps=1, weight_norm_every=2, warn=False) as gw:
        for _ in range(4):
            F.mse_loss(model(torch.randn(16, 8)), torch.zeros(16, 1)).backward()
            reports.append(gw.step())
            model.zero_grad()
    assert [r.layers["0"].gain_factor is not None for r in reports] == [True, False, True, False]
    assert [r.layers["1"].dphi2 is not None for r in reports] == [True, False, True, False]


def test_the_gain_factor_is_written_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    report = measure(model, torch.randn(16, 8), log_dir=tmp_path)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    (event,) = acc.Scalars("gradwatch_9_gain_factor/0")
    assert event.value == pytest.approx(report.layers["0"].gain_factor, rel=1e-6)


# -- the init audit --------------------------------------------------------------------------


def stack(act, depth, init=None, width=64):
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        if init is not None:
            init(lin.weight)
        layers += [lin, act()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def audit(model, x, steps=2):
    reports = []
    with gradwatch.GradWatch(model, every_n_steps=1, warn=False) as gw:
        for _ in range(steps):
            model(x).pow(2).mean().backward()
            reports.append(gw.step())
            model.zero_grad()
    return [[f for f in r.findings if f.kind == "init"] for r in reports]


@pytest.mark.parametrize(
    "act, depth, init, remedy",
    [
        (nn.ReLU, 20, None, "he-init"),  # PyTorch's default: gain 0.58, chi about 0.17
        (nn.SELU, 30, None, "lecun-init"),  # SELU needs Var[W] = 1/fan_in
        (nn.ReLU, 12, lambda w: nn.init.normal_(w, std=0.5), "he-init"),  # far too large
    ],
)
def test_the_init_audit_names_the_init_that_keeps_chi_near_1(act, depth, init, remedy):
    torch.manual_seed(0)
    first, second = audit(stack(act, depth, init), torch.randn(64, 64))
    (f,) = first
    assert f.layer == "0" and f.severity == "warning"
    assert not (1e-3 <= f.value <= 1e3) and [r.id for r in f.remedies] == [remedy]
    assert "before any update" in f.message and "weight gain" in f.message
    assert second == []  # the first logging step only


@pytest.mark.parametrize(
    "model",
    [
        stack(nn.ReLU, 20, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")),
        stack(nn.Tanh, 20, nn.init.xavier_normal_),
        stack(nn.Sigmoid, 20),  # no init fixes sigmoid's 1/16: the vanishing rule's remedies
        nn.Sequential(  # batch norm between the layers resets the scale: not a plain stack
            *[m for _ in range(20) for m in (nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU())]
        ),
    ],
    ids=["he relu", "xavier tanh", "sigmoid", "batch-norm relu"],
)
def test_the_init_audit_is_silent_where_the_init_fits_or_cannot_decide(model):
    torch.manual_seed(0)
    first, _ = audit(model, torch.randn(64, 64))
    assert first == []


def test_held_out_plain_conv_stack_at_default_init_is_audited():
    """Never tuned on: 12 convolutions with ReLU, PyTorch's default init."""
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 8 * 8, 1))
    first, _ = audit(model, torch.randn(16, 8, 8, 8))
    (f,) = first
    assert f.layer == "0" and f.value < 1e-3 and f.remedies[0].id == "he-init"

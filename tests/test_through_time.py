"""Through time: the per-time-step backward signal of sequence modules against brute force, and
the diagnosis of vanishing and exploding through time over whole runs."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradwatch import GradWatch, Options, Thresholds
from gradwatch.diagnosis.time_rules import time_ratio
from gradwatch.measure import stats
from gradwatch.output.dashboard import log10_time_ratios
from tests.helpers import runs


class LastStep(nn.Module):
    """A recurrent module whose loss reads its last output only."""

    def __init__(self, cell, batch_first, **kw):
        super().__init__()
        self.rnn = cell(6, 12, batch_first=batch_first, **kw)
        self.batch_first = batch_first
        self.head = nn.Linear(12 * (2 if kw.get("bidirectional") else 1), 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.batch_first else out[-1])


def reference_profile(model, x, time_axis):
    """RMS over everything but time of dL/dx, by autograd on an input that needs a gradient."""
    xr = x.clone().requires_grad_()
    model.zero_grad()
    model(xr).pow(2).mean().backward()
    g = xr.grad.movedim(time_axis, 0)
    return g.reshape(g.shape[0], -1).double().pow(2).mean(1).sqrt().tolist()


def measured(model, x):
    with GradWatch(model, every_n_steps=1, warn=False) as gw:
        model(x).pow(2).mean().backward()
        report = gw.step()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return report, grads


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
def test_time_profile_matches_autograd_and_leaves_the_step_alone(cell, batch_first):
    torch.manual_seed(0)
    model = LastStep(cell, batch_first, num_layers=2)
    x = torch.randn(5, 40, 6) if batch_first else torch.randn(40, 5, 6)
    plain = x.clone()
    model(plain).pow(2).mean().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    report, grads = measured(model, x)
    profile = report.layers["rnn"].time_signal
    ref = reference_profile(model, x, 1 if batch_first else 0)
    assert len(profile) == 40
    for got, want in zip(profile, ref):
        assert got == pytest.approx(want, rel=1e-5, abs=0)
    # the input was raw data: gradwatch made a copy need a gradient, and nothing else changed
    assert not x.requires_grad
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unbatched_bidirectional_and_embedded_inputs():
    torch.manual_seed(1)
    model = LastStep(nn.GRU, False, bidirectional=True)
    x = torch.randn(25, 6)  # unbatched: (time, features)
    report, _ = measured(model, x)
    ref = reference_profile(model, x, 0)
    assert report.layers["rnn"].time_signal == pytest.approx(ref, rel=1e-5)

    class Embedded(nn.Module):  # the usual language model: the input already needs a gradient
        def __init__(self):
            super().__init__()
            self.embed, self.lstm = nn.Embedding(50, 6), nn.LSTM(6, 8, batch_first=True)

        def forward(self, tokens):
            self.emb = self.embed(tokens)
            self.emb.retain_grad()
            return self.lstm(self.emb)[0].sum()

    model = Embedded()
    with GradWatch(model, every_n_steps=1, warn=False) as gw:
        model(torch.randint(0, 50, (3, 17))).backward()
        report = gw.step()
    ref = model.emb.grad.movedim(1, 0).reshape(17, -1).pow(2).mean(1).sqrt().tolist()
    assert report.layers["lstm"].time_signal == pytest.approx(ref, rel=1e-5)


def test_packed_sequences_average_over_the_sequences_that_reach_each_step():
    torch.manual_seed(2)
    rnn, head = nn.LSTM(6, 12, batch_first=True), nn.Linear(12, 1)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    x = torch.randn(4, 30, 6)
    lengths = torch.tensor([30, 22, 9, 3])

    def loss(inp):
        _, (h, _) = rnn(pack_padded_sequence(inp, lengths, batch_first=True))
        return head(h[-1]).pow(2).sum()

    with GradWatch(model, every_n_steps=1, warn=False, include=["rnn"]) as gw:
        gw.begin_forward(model, (x,))
        loss(x).backward()
        gw.end_forward()
        report = gw.step()
    xr = x.clone().requires_grad_()
    loss(xr).backward()
    ref = []
    for t in range(30):
        live = [i for i in range(4) if lengths[i] > t]
        ref.append(xr.grad[live, t].pow(2).mean().sqrt().item())
    assert report.layers["rnn"].time_signal == pytest.approx(ref, rel=1e-5)


def test_a_module_the_user_names_is_measured_through_time():
    class Loop(nn.Module):  # a recurrence written by hand: no nn.RNN for gradwatch to see
        def __init__(self):
            super().__init__()
            self.cell = nn.RNNCell(6, 12)

        def forward(self, x):
            h = x.new_zeros(x.shape[0], 12)
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
            return h

    torch.manual_seed(3)
    model = nn.Sequential(Loop(), nn.Linear(12, 1))
    x = torch.randn(4, 20, 6)
    with GradWatch(model, every_n_steps=1, warn=False, through_time={"0": 1}) as gw:
        model(x).pow(2).mean().backward()
        report = gw.step()
    assert report.layers["0"].time_signal == pytest.approx(reference_profile(model, x, 1), rel=1e-5)
    assert report.layers["0.cell"].time_signal is None


def test_time_profile_keeps_gradients_far_below_fp32_squares():
    grad = torch.full((3, 5, 4), 1e-30)  # squares of 1e-30 are 0 in fp32
    grad[:, 4] = 1.0
    sums = stats.time_sumsq(grad, axis=1)
    assert sums.dtype == torch.float64
    assert sums[0].item() == pytest.approx(12 * 1e-60, rel=1e-6)
    assert sums[4].item() == pytest.approx(12.0)


def test_through_time_option_is_checked_before_the_model_is_touched():
    model = nn.LSTM(3, 4)
    for bad in (["rnn"], {"rnn": 1.5}, {1: 0}, {"rnn": True}):
        with pytest.raises(TypeError, match="through_time must be a dict"):
            GradWatch(model, through_time=bad)
    assert not model._forward_pre_hooks
    assert Options(through_time={"enc.*": 1}).through_time == {"enc.*": 1}


# -- diagnosis over runs -------------------------------------------------------------------------


def found(reports, layer="rnn"):
    """(step, kind, severity, message, remedy ids) of every finding on ``layer``."""
    return [
        (step, f.kind, f.severity, f.message, [r.id for r in f.remedies])
        for step, r in sorted(reports.items())
        for f in r.findings
        if f.layer == layer
    ]


def test_vanilla_rnn_over_200_steps_vanishes_through_time_with_gated_rnn_first():
    """The issue's case: a tanh nn.RNN of 64 units over 200 steps, the loss on the last output."""
    reports = runs.sequence_classifier(nn.RNN, length=200, steps=160, every=10, hidden=64)
    first = reports[0].layers["rnn"]
    assert time_ratio(first.time_signal) < 1e-12  # it starts far gone ...
    assert first.recurrent_gain is not None and first.state_derivative is not None
    hits = found(reports)
    assert hits and all(kind == "vanishing" for _, kind, *_ in hits)
    step, _, severity, message, ids = hits[0]
    # ... and is reported once it has lasted Thresholds.time_patience steps, not before
    assert step == Thresholds().time_patience
    assert severity == "error" and ids[0] == "gated-rnn" and "orthogonal-init" in ids
    assert "vanishes through time" in message and "weight_hh" in message
    assert "since step 0" in message


def test_long_lstm_names_its_forget_gate():
    reports = runs.sequence_classifier(nn.LSTM, length=200, steps=130, every=10)
    hits = found(reports)
    assert hits, "an LSTM that still forgets over 200 steps after 100 updates"
    _, kind, _, message, ids = hits[0]
    assert kind == "vanishing" and ids == ["forget-gate-bias"]
    assert "forget gate's bias" in message


def test_held_out_long_gru_names_its_update_gate():
    """Never tuned on: a GRU over 250 steps, two layers."""
    reports = runs.sequence_classifier(nn.GRU, length=250, steps=130, every=13, num_layers=2)
    hits = found(reports)
    assert hits and hits[0][1] == "vanishing" and hits[0][4] == ["forget-gate-bias"]
    assert "update gate" in hits[0][3]


def test_lstm_that_learns_to_remember_is_not_flagged():
    """At step 0 the LSTM over 30 steps passes 1e-6 of the gradient to its first steps; within a
    few dozen updates its gates open: a decay that training removes by itself is no finding."""
    reports = runs.sequence_classifier(nn.LSTM, length=30, steps=200, every=5)
    assert time_ratio(reports[0].layers["rnn"].time_signal) < 1e-3
    assert time_ratio(reports[195].layers["rnn"].time_signal) > 1e-3
    assert not found(reports)


def test_held_out_bidirectional_lstm_is_not_flagged():
    reports = runs.sequence_classifier(nn.LSTM, length=40, steps=150, every=10, bidirectional=True)
    assert not found(reports)


def exploding_relu_rnn(gain, length=60, steps=3):
    """An identity-initialised ReLU RNN (IRNN) scaled past 1: states stay positive, so the signal
    grows by ``gain`` at every step back."""
    torch.manual_seed(0)
    model = runs.SeqClassifier(nn.RNN, nonlinearity="relu")
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(gain * torch.eye(32))
    x, y = torch.randn(64, length, 8), torch.randint(0, 4, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    return runs.train(model, opt, runs.minibatches(x, y, 0), steps, 1)


def test_growth_through_time_is_flagged_at_once_with_clipping():
    reports = exploding_relu_rnn(1.2)
    step, kind, severity, message, ids = found(reports)[0]
    assert (step, kind, severity) == (0, "exploding", "warning")
    assert ids == ["gradient-clipping", "orthogonal-init"]
    assert "above 1" in message
    assert not math.isfinite(reports[max(reports)].global_grad_norm)  # the NaN it announced


def test_through_time_tensorboard_scalars_and_picture(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = LastStep(nn.RNN, True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with GradWatch(model, log_dir=tmp_path, every_n_steps=1, warn=False) as gw:
        for _ in range(3):
            model(torch.randn(4, 50, 6)).pow(2).mean().backward()
            report = gw.step()
            opt.step()
            opt.zero_grad()
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    ratios = log10_time_ratios(report.layers["rnn"].time_signal)
    for q, index in ((0, 0), (50, 24), (75, 37)):
        (*_, last) = ea.Scalars(f"gradwatch_8_through_time/rnn/t{q}")
        assert last.step == 2 and last.value == pytest.approx(ratios[index], abs=1e-5)
    assert ratios[-1] == 0 and ratios[0] < ratios[-1]
    image = ea.Images("gradwatch/through_time/rnn")[-1]
    assert image.encoded_image_string.startswith(b"\x89PNG")
    assert image.width >= 50 and image.height >= 3  # a column per time step, a row per step

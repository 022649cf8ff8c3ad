"""Small activation outputs counted together at the end of the forward, and small output
gradients reduced together: the numbers must be the ones counted one at a time."""

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.probes import batched, buffers


class Mixed(nn.Module):
    """Every way an activation is met: channels first after a conv, the last dim after a
    Linear, one ReLU module at two widths and called twice, functional calls, every kind that
    waits (GELU and SiLU by their input)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        with torch.no_grad():
            self.conv.bias[0] = -100.0  # one dead channel: the units must be the channels
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(80, 32)
        self.sig = nn.Sigmoid()
        self.fc2 = nn.Linear(32, 16)
        self.tanh = nn.Tanh()
        self.fc3 = nn.Linear(16, 16)
        self.gelu = nn.GELU()
        self.fc4 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.relu(self.conv(x))  # (N, 5, 4, 4): channels are the units
        h = h.flatten(1)
        h = self.sig(self.fc1(h))
        h = self.relu(self.fc2(h))  # the same ReLU at another width
        h = self.tanh(h) + F.relu(self.fc3(h)) + torch.sigmoid(h)
        g = self.fc4(h)
        h = self.gelu(g * 5 - 2) + F.silu(g * 8 - 4)
        return self.head(self.relu(h))


FIELDS = ("saturation", "dead_units", "active_units", "units", "samples_per_unit", "calls")


def run(monkeypatch, small: int, micro_batches: int = 1, steps: int = 3):
    monkeypatch.setattr(batched, "SMALL", small)
    monkeypatch.setattr(buffers, "SMALL", small)
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, every_n_steps=1, weight_norm_every=2) as gw:
            for _ in range(steps):
                for _ in range(micro_batches):
                    x = torch.randn(6, 3, 4, 4, generator=g) * 3
                    y = torch.randint(0, 3, (6,), generator=g)
                    F.cross_entropy(model(x), y).backward()
                reports.append(gw.step())
                opt.step()
                opt.zero_grad()
    return reports


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_counted_together_equals_counted_one_at_a_time(monkeypatch, micro_batches):
    alone = run(monkeypatch, small=0, micro_batches=micro_batches)
    together = run(monkeypatch, small=4096, micro_batches=micro_batches)
    for a, b in zip(alone, together):
        assert list(a.layers) == list(b.layers)
        assert b.layers["relu"].dead_units and b.layers["relu"].units == 5 + 16
        assert b.layers["gelu"].saturation > 0.2 and b.layers[":silu#0"].saturation > 0.2
        for name, s in a.layers.items():
            t = b.layers[name]
            for field in FIELDS:
                assert getattr(t, field) == getattr(s, field), (name, field)
            for field in ("signal", "signal_norm", "dphi2", "gain_factor"):
                x, y = getattr(s, field), getattr(t, field)
                assert (x is None) == (y is None), (name, field)
                if x is not None:
                    assert y == pytest.approx(x, rel=1e-6), (name, field)
        assert dataclasses.asdict(a)["findings"] == dataclasses.asdict(b)["findings"]


def test_nothing_waits_past_the_step(monkeypatch):
    """Counted at each forward's end and reduced at the boundary: nothing is held after it."""
    torch.manual_seed(0)
    model = Mixed()
    with gradwatch.GradWatch(model, every_n_steps=1, warn=False) as gw:
        F.cross_entropy(model(torch.randn(6, 3, 4, 4)), torch.zeros(6, dtype=torch.long)).backward()
        probes = gw._probes
        assert not probes.deferred.items  # the forward ended: counted
        assert probes.signals._pending  # the small output gradients wait for the boundary
        gw.step()
        assert not probes.signals._pending and not probes.signals.entries


class ChangedInPlace(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), act

    def forward(self, x):
        z = self.fc(x)
        h = self.act(z)
        # after the activation's hook, the tensor it is judged by (GELU: its input): its
        # backward can no longer run
        if self.training:
            (z if isinstance(self.act, nn.GELU) else h).mul_(2)
        return h.sum()


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU()], ids=["relu", "gelu"])
def test_an_output_changed_in_place_is_left_out_not_miscounted(act):
    """A ReLU output (a GELU input) changed in place before the forward ends would be counted
    with other values: the layer is left out of the step instead. A step that trains cannot do
    this (autograd refuses the backward), so this is the only way to meet it."""
    model = ChangedInPlace(act)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.GradWatch(model, every_n_steps=1) as gw:
            model.eval()  # step 0 reads the weights: smooth kinds are measured at once then
            model(torch.randn(8, 4))
            gw.step()
            model.train()
            out = model(torch.randn(8, 4))
            with pytest.raises(RuntimeError, match="inplace"):
                out.backward()
            report = gw.step()
    assert "act" in report.unmeasured and "changed in place" in report.unmeasured["act"]
    assert report.layers["act"].dead_units is None and report.layers["fc"].grad_norm is None
    assert any("act" in str(w.message) for w in caught)

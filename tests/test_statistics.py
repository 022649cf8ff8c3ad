"""The declared statistics: each declaration is what the hooks, the message and the readout use,
and a step's message is plain data that reads out the same anywhere."""

import dataclasses
import pickle
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import closing
from gradwatch.measure import statistics
from gradwatch.measure.statistics import LAYER, STATISTICS, Context
from gradwatch.report import LayerStats
from gradwatch.step.readout import READ_OUT, layer_stats

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def test_every_readout_fills_documented_layerstats_fields_and_only_those():
    fields = {f.name for f in dataclasses.fields(LayerStats)}
    metrics = DOCS.read_text()
    for s in READ_OUT:
        assert s.per == LAYER and s.read is not None and set(s.fills) <= fields, s.name
        for name in s.fills:
            assert f"`{name}`" in metrics, name
    assert {s.name for s in READ_OUT} <= set(STATISTICS)


@pytest.mark.parametrize("name", sorted(STATISTICS))
def test_a_row_packs_and_unpacks_by_part(name):
    s = STATISTICS[name]
    values = {p: float(k + 2) for k, p in enumerate(s.parts)}
    row = s.pack(**values)
    assert row.dtype == torch.float64 and row.shape == (len(s.parts),)
    expected = {p: [v] for p, v in values.items()} if s.steps else values  # one time step
    assert s.unpack(row.tolist())._asdict() == expected


def test_a_row_over_time_steps_grows_to_the_longest_and_reads_out_per_step():
    s = statistics.TIME_SIGNAL
    short = s.pack(sumsq=torch.tensor([4.0, 9.0]), count=torch.tensor([1.0, 1.0]))
    long = s.pack(sumsq=torch.tensor([0.0, 7.0, 16.0]), count=torch.tensor([1.0, 3.0, 4.0]))
    total = s.add(s.add(None, short), long)
    assert total.tolist() == [[4.0, 16.0, 16.0], [2.0, 4.0, 4.0]]
    row = s.unpack(total.reshape(-1).tolist())
    read = s.read(row, Context(scale=2.0))["time_signal"]
    assert read == pytest.approx([(4.0 / 2) ** 0.5 / 2, 1.0, 1.0])


def test_the_flat_and_dead_readout_divides_by_the_layers_elements_and_units():
    s = statistics.FLAT_AND_DEAD
    row = s.unpack([30.0, 2.0, 1.0])
    got = s.read(row, Context(elements=120, units=4))
    assert got == {
        "saturation": 0.25,
        "dead_units": 0.5,
        "active_units": 0.25,
        "units": 4,
        "samples_per_unit": 30.0,
    }
    assert s.read(row, Context()) == {}  # nothing seen: no fraction


class _RecurrentNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 8, batch_first=True)
        self.act = nn.Sigmoid()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        heads = out.view(4, 6, 2, 4).transpose(1, 2)  # two heads of self-attention over time
        mixed = F.scaled_dot_product_attention(heads, heads, heads, is_causal=True)
        out = out + mixed.transpose(1, 2).reshape(4, 6, 8)
        return self.head(self.act(out[:, -1]))


def test_a_steps_message_is_plain_data_that_reads_out_the_same_in_another_thread(monkeypatch):
    messages = []

    def keep(*args, **kwargs):
        messages.append(gather(*args, **kwargs))
        return messages[-1]

    gather = closing.gather
    monkeypatch.setattr(closing, "gather", keep)
    torch.manual_seed(0)
    model = _RecurrentNet()
    with gradwatch.GradWatch(model, every_n_steps=1, weight_norm_every=1, warn=False) as gw:
        model(torch.randn(4, 6, 3)).pow(2).mean().backward()
        report = gw.step()
    message = messages[-1]
    for s in statistics.LAYER_STATISTICS:  # a hook filled every declared per-layer statistic
        assert s in message, s.name
    sent = pickle.dumps(message.to_host())  # no tensor, module or hook in it
    out = {}
    worker = threading.Thread(target=lambda: out.update(layer_stats(pickle.loads(sent), {}, 1.0)))
    worker.start()
    worker.join()
    assert list(out) == list(report.layers)
    for name, row in out.items():
        assert row == report.layers[name], name
    assert report.layers["rnn"].time_signal and report.layers["rnn"].state_derivative
    assert report.layers["act"].dphi2 is not None and report.layers["head"].signal > 0

"""Plots of what gradwatch measures on the published set-ups of docs/validation.md.

Run from the repository root: ``python docs/validation/figures.py`` (needs matplotlib, the
``[plots]`` extra; a few minutes on a CPU). It writes the PNGs beside this file. The same set-ups
are asserted by the tests the page names; this script only draws them.
"""

from __future__ import annotations

import math
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from tests.helpers import papers, runs  # noqa: E402


def _save(fig, ax, name: str, title: str, xlabel: str, ylabel: str, legend: bool = True):
    """Label ``ax``, give it a legend, and write ``fig`` beside this file as ``name``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / name, dpi=110)
    plt.close(fig)
    print("wrote", HERE / name)


def _theory(rows) -> list[float]:
    """The theory's signal at each layer, relative to the last: cumulative sqrt(chi) from the
    output side."""
    out, acc = [1.0], 1.0
    for s in reversed(rows[:-1]):
        acc *= math.sqrt(s.gain_factor)
        out.append(acc)
    return out[::-1]


def stack_figure(name, title, cases) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, report in cases:
        rows = papers.trunk(report)
        measured = [s.signal_norm / rows[-1].signal_norm for s in rows]
        (line,) = ax.semilogy(measured, "o-", ms=3, label=f"{label}: measured")
        ax.semilogy(_theory(rows), "--", color=line.get_color(), label=f"{label}: theory (chi)")
    _save(fig, ax, name, title, "layer (input side left)", "backward signal / last layer's")


def he_2015() -> None:
    cases = [("Xavier", papers.he_2015("xavier")), ("He", papers.he_2015("he"))]
    stack_figure("he2015.png", "He et al. 2015: 30 ReLU layers", cases)


def glorot_gradients() -> None:
    cases = [(i, papers.glorot_2010_gradients(i)) for i in ("standard", "normalized")]
    stack_figure("glorot2010_gradients.png", "Glorot & Bengio 2010: 5 tanh layers", cases)


def glorot_saturation() -> None:
    reports = papers.glorot_2010_saturation()
    steps = sorted(reports)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    names = [n for n, s in reports[steps[0]].layers.items() if s.activation]
    for k, name in enumerate(names):
        ax.plot(
            steps, [reports[s].layers[name].dphi2 for s in steps], label=f"hidden layer {k + 1}"
        )
    title = "Glorot & Bengio 2010: the top sigmoid layer goes flat"
    ylabel = "E[sigmoid'(z)^2]  (1/16 at z = 0)"
    _save(fig, ax, "glorot2010_saturation.png", title, "SGD step (minibatches of 10)", ylabel)


def schoenholz() -> None:
    cases = [(f"sigma_w^2 = {w}", papers.tanh_mean_field(w)) for w in (0.5, 1.0, 2.0)]
    stack_figure("schoenholz2017.png", "Schoenholz et al. 2017: 30 tanh layers", cases)


def pascanu() -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for cell in (nn.RNN, nn.LSTM):
        reports = runs.sequence_classifier(cell, length=200, steps=1, hidden=64)
        profile = reports[0].layers["rnn"].time_signal
        values = [v if v else float("nan") for v in profile]
        ax.semilogy(range(1, len(values) + 1), values, label=cell.__name__)
    title = "Pascanu et al. 2013: vanishing through time, at init"
    xlabel, ylabel = "time step (the loss reads the last)", "gradient RMS w.r.t. the input"
    _save(fig, ax, "pascanu2013.png", title, xlabel, ylabel)


def cohen() -> None:
    lr = 0.25
    reports = runs.full_batch_tanh(lr=lr, steps=1500, every=10)
    steps = sorted(reports)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(steps, [reports[s].curvature.top_eigenvalue for s in steps], label="sharpness")
    ax.axhline(2 / lr, color="k", ls="--", lw=1, label="2 / lr")
    right = ax.twinx()
    right.semilogy(steps, [reports[s].curvature.loss for s in steps], color="C1", label="loss")
    right.set_ylabel("loss")
    severities = {f.severity for r in reports.values() for f in r.findings}
    ax.legend(loc="center right", fontsize=8)
    right.legend(loc="lower right", fontsize=8)
    title = f"Cohen et al. 2021: edge of stability (gradwatch: {sorted(severities)})"
    xlabel = "gradient descent step (full batch)"
    _save(fig, ax, "cohen2021.png", title, xlabel, "top Hessian eigenvalue", legend=False)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for make in (he_2015, glorot_gradients, glorot_saturation, schoenholz, pascanu, cohen):
        make()

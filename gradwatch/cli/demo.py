"""The demo: the classic broken network and its remedied version, side by side, on built-in data.

The broken net is a deep sigmoid MLP with PyTorch's default init; the remedied one is the same
depth with ReLU and He init, the first remedy gradwatch proposes for it.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import GradWatchWarning
from ..report import Report
from ..report.text import findings_text
from ..report.words import number
from ..watch import GradWatch


def synthetic_data(n: int = 2048, dim: int = 32, classes: int = 4, seed: int = 0):
    """Inputs N(0, 1) labelled by a random two-layer teacher: learnable, no download."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 64, generator=g) / math.sqrt(dim)
    w2 = torch.randn(64, classes, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return x, y


def broken_mlp(depth: int, width: int, dim: int = 32, classes: int = 4) -> nn.Sequential:
    """depth x (Linear, Sigmoid) with PyTorch's default init: gradients vanish toward the input."""
    layers: list[nn.Module] = [nn.Linear(dim, width), nn.Sigmoid()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def remedied_mlp(depth: int, width: int, dim: int = 32, classes: int = 4) -> nn.Sequential:
    """The same depth with ReLU and He init (remedies `relu-family` and `he-init`)."""
    model = broken_mlp(depth, width, dim, classes)
    for i, m in enumerate(model):
        if isinstance(m, nn.Sigmoid):
            model[i] = nn.ReLU()
        elif isinstance(m, nn.Linear) and i < len(model) - 1:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


@dataclass
class RunResult:
    name: str
    first_loss: float
    last_loss: float
    first_report: Report
    last_report: Report


def train(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    logdir: str | None,
    every_n_steps: int = 10,
    lr: float = 0.05,
    batch: int = 128,
    progress: bool = True,
    options: dict | None = None,
) -> RunResult:
    """A plain PyTorch loop with gradwatch: the whole integration is the three marked lines."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    losses: list[float] = []
    reports: list[Report] = []
    log_dir = os.path.join(logdir, name) if logdir else None
    # weights (and the theory's numbers) read on every logging step: the demo shows them all
    watch = {"every_n_steps": every_n_steps, "weight_norm_every": 1, "warn": False}
    watch.update(options or {})  # the command line's
    with GradWatch(model, log_dir=log_dir, **watch) as gw:  # 1
        for step in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            report = gw.step()  # 2: after backward, before zero_grad
            if report is not None:
                reports.append(report)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if progress and (step % 20 == 0 or step == steps - 1):
                _progress(name, step + 1, steps, loss.item())
    return RunResult(name, losses[0], _tail_mean(losses), reports[0], reports[-1])


def _tail_mean(xs: list[float], n: int = 20) -> float:
    tail = xs[-n:]
    return sum(tail) / len(tail)


def _progress(name: str, done: int, total: int, loss: float) -> None:
    """A bar redrawn in place on a terminal; elsewhere (a file, a CI log) one line at the end."""
    line = f"{name:>9} {done}/{total} steps, loss {loss:.3f}"
    if not sys.stderr.isatty():
        if done == total:
            print(line, file=sys.stderr, flush=True)
        return
    width = 30
    filled = int(width * done / total)
    bar = "#" * filled + "-" * (width - filled)
    end = "\n" if done == total else ""
    print(
        f"\r{name:>9} [{bar}] {done}/{total} loss {loss:.3f}", end=end, file=sys.stderr, flush=True
    )


def first_layer_signal(report: Report) -> float | None:
    """Backward signal of the first layer relative to the last: 1 means no loss on the way."""
    layers = [s for s in report.layers.values() if s.activation is None and s.signal_norm]
    if len(layers) < 2:
        return None
    return layers[0].signal_norm / layers[-1].signal_norm


def run_demo(
    steps: int = 300,
    depth: int = 20,
    width: int = 128,
    logdir: str | None = "runs",
    seed: int = 0,
    options: dict | None = None,
) -> tuple[RunResult, RunResult]:
    """Train both networks, print the diagnosis and the before/after, return both results;
    ``options``: GradWatch options over the demo's own (every 10 steps, weights every time)."""
    torch.manual_seed(seed)
    x, y = synthetic_data(seed=seed)
    print(
        f"gradwatch demo: {depth} hidden layers of width {width}, {steps} SGD steps, "
        f"{len(x)} synthetic samples, 4 classes\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)  # the diagnosis is printed below
        broken = train("broken", broken_mlp(depth, width), x, y, steps, logdir, options=options)
        remedied = train(
            "remedied", remedied_mlp(depth, width), x, y, steps, logdir, options=options
        )

    report = broken.last_report
    print(
        f"\nDiagnosis of the broken network (sigmoid + default init) at its last logged step, "
        f"{report.step}:"
    )
    types = {name: st.module_type for name, st in report.layers.items()}
    print(
        "\n".join(
            "  " + line if line else ""
            for line in findings_text(report.findings, report.step, types)
        )
    )
    print("\nBefore / after:")
    print(f"  {'':10}{'loss at step 0':>16}{'loss at the end':>17}{'first-layer signal':>20}")
    for r in (broken, remedied):
        sig = first_layer_signal(r.first_report)
        sig_text = number(sig)
        print(f"  {r.name:10}{r.first_loss:>16.3f}{r.last_loss:>17.3f}{sig_text:>20}")
    print("  (first-layer signal: backward signal of the first layer / the output layer's)")
    n = len(remedied.last_report.findings)
    print(
        f"\nRemedied network: {n} finding{'s' if n != 1 else ''} at step "
        f"{remedied.last_report.step}."
    )
    if logdir:
        print(
            f"\nTensorBoard runs written to {os.path.abspath(logdir)}. Look at them with:\n"
            f"  tensorboard --logdir {logdir}"
        )
    return broken, remedied

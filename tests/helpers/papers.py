"""The set-ups of published results, at CPU size, shared by tests/test_papers.py (which asserts
what gradwatch measures on them) and docs/validation/figures.py (which plots it)."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch, Report

from . import runs


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Report:
    """One measured step (weights, derivatives and chi read), no update."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(model, every_n_steps=1, warn=False) as gw:
            F.cross_entropy(model(x), y).backward()
            return gw.step()


def trunk(report: Report, module_type: str = "Linear") -> list:
    """The rows of the hidden layers of a plain stack: its ``module_type`` layers, head left out."""
    return [s for s in report.layers.values() if s.module_type == module_type][:-1]


def relu_30(init: str, depth: int = 30, width: int = 128, seed: int = 0) -> nn.Sequential:
    """He et al. 2015, section 2.2 and figure 3: a plain 30-layer ReLU network initialised with
    Xavier's Var[W] = 1/n (``init="xavier"``) or He's 2/n (``init="he"``)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        std = math.sqrt((2.0 if init == "he" else 1.0) / width)
        nn.init.normal_(lin.weight, 0, std)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def he_2015(init: str) -> Report:
    torch.manual_seed(1)
    return one_step(relu_30(init), torch.randn(256, 128), torch.randint(0, 10, (256,)))


def glorot_net(init: str, act=nn.Tanh, depth: int = 5, width: int = 256, d_in: int = 256):
    """Glorot & Bengio 2010: the "standard" init U[-1/sqrt(n), 1/sqrt(n)] (Var[W] = 1/(3n)) or
    their "normalized" init U[+-sqrt(6/(n_in + n_out))] (Xavier), zero biases."""
    layers: list[nn.Module] = []
    c = d_in
    for _ in range(depth):
        lin = nn.Linear(c, width)
        if init == "standard":
            nn.init.uniform_(lin.weight, -1 / math.sqrt(c), 1 / math.sqrt(c))
        else:
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, act()]
        c = width
    return nn.Sequential(*layers, nn.Linear(c, 10))


def glorot_2010_gradients(init: str) -> Report:
    """Section 4.2: the back-propagated gradients of a 5-layer tanh network shrink toward the
    input under the standard init and stay level under the normalized one."""
    torch.manual_seed(0)
    model = glorot_net(init)
    return one_step(model, torch.randn(256, 256), torch.randint(0, 10, (256,)))


def glorot_2010_saturation(steps: int = 1500, every: int = 100, seed: int = 0) -> dict:
    """Section 3.1 and figure 2: a 4-hidden-layer sigmoid network (standard init) trained with
    SGD on minibatches of 10. The top hidden layer is driven towards 0, where sigmoid is flat,
    while the lower layers stay near 0.5. Returns step -> report."""
    torch.manual_seed(seed)
    x = torch.rand(4096, 32)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    with torch.no_grad():
        y = teacher(4 * x - 2).argmax(1)
    model = glorot_net("standard", nn.Sigmoid, depth=4, width=256, d_in=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = runs.minibatches(x, y, seed, size=10)
    return runs.train(model, opt, batches, steps, every, weight_norm_every=1)


def tanh_mean_field(sigma_w2: float, depth: int = 30, width: int = 256, seed: int = 0):
    """Schoenholz et al. 2017: a deep tanh network with W ~ N(0, sigma_w2 / n), zero biases;
    sigma_w2 < 1 is the ordered phase (chi < 1: the signal vanishes), 1 the critical line."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight, 0, math.sqrt(sigma_w2 / width))
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    return one_step(model, torch.randn(128, width), torch.randint(0, 10, (128,)))


def log_slope(values: list[float]) -> float:
    """The least-squares slope of log10(values) per position: decades per layer."""
    logs = [math.log10(v) for v in values]
    n = len(logs)
    mx, my = (n - 1) / 2, sum(logs) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(logs)) / sum(
        (i - mx) ** 2 for i in range(n)
    )

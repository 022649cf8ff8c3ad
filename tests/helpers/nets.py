"""Small nets and the brute-force backward-signal reference most engine tests use."""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch


def small_net(inplace=False):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(inplace=inplace), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )


def reference_signals(model, x, y):
    """dL/d(output) of every leaf module by retain_grad, on a copy of the model without gradwatch."""
    ref = copy.deepcopy(model)
    outs = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            outs[name] = out

        return hook

    for name, m in ref.named_modules():
        if name:
            m.register_forward_hook(keep(name))
    F.cross_entropy(ref(x), y).backward()
    return {n: math.sqrt(o.grad.pow(2).mean().item()) for n, o in outs.items()}, ref


# float64 too: gradwatch's fp32 norms must not refuse (vector_norm will not narrow) a double model.
DTYPES = [torch.float32, torch.float64]


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.Sigmoid()

    def forward(self, x):
        for _ in range(3):
            x = torch.sigmoid(self.fc(x))
        x = F.gelu(x) + x.tanh() + F.leaky_relu(x, 0.2) + self.act(x)
        return F.relu(x, inplace=True)


def hooked(model):
    """Modules of ``model`` carrying a forward hook or pre-hook, by name."""
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def measure_steps(model, x, y, every, steps):
    """Run ``steps`` steps (no optimizer: the same weights each step); the reports, and which
    modules were hooked during each step's forward."""
    reports, hooked_by_step = {}, []
    with GradWatch(model, every_n_steps=every) as gw:
        for step in range(steps):
            hooked_by_step.append(hooked(model))
            F.cross_entropy(model(x), y).backward()
            report = gw.step()
            model.zero_grad()
            if report is not None:
                reports[step] = report
    return reports, hooked_by_step

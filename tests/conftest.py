import warnings

import pytest
import torch
import torch.nn.functional as F

import gradwatch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def diagnose_model(model, loss_fn, steps=1, lr=0.0, **kwargs):
    """Train ``steps`` steps with gradwatch measuring every step; the last report, warnings muted."""
    opt = torch.optim.SGD(model.parameters(), lr=lr) if lr else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, every_n_steps=1, **kwargs) as gw:
            for _ in range(steps):
                loss_fn(model).backward()
                report = gw.step()
                if opt is not None:
                    opt.step()
                model.zero_grad()
    return report


def ce(x, y):
    return lambda m: F.cross_entropy(m(x), y)

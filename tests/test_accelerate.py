"""Accelerate's prepared optimizer (and any wrapper that exposes the optimizer it wraps) in
optimizer mode and in ``gw.step(optimizer)``: measured on the steps that update, as a plain loop
with the same accumulation measures them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

accelerate = pytest.importorskip("accelerate")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    return list(zip(x.chunk(4), y.chunk(4)))


def plain_reports() -> list[dict]:
    """Two micro-batches a step, losses halved, in a plain loop: what Accelerate must match."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reports = []
    with gradwatch.GradWatch(model, optimizer=opt, every_n_steps=1) as gw:
        for i, (x, y) in enumerate(batches()):
            (F.cross_entropy(model(x), y) / 2).backward()
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
                reports.append(gw.report.to_dict())
    return reports


def test_optimizer_mode_takes_accelerates_prepared_optimizer_with_accumulation():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_model()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    reports, steps = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, optimizer=opt, every_n_steps=1) as gw:
            for x, y in batches():
                with accelerator.accumulate(model):
                    accelerator.backward(F.cross_entropy(model(x), y))
                    opt.step()  # Accelerate skips it on the first micro-batch of each step
                    opt.zero_grad()
                steps.append(gw.current_step)
                if accelerator.sync_gradients:
                    reports.append(gw.report.to_dict())
    assert steps == [0, 1, 1, 2]  # a step counted only where the update happened
    for got, want in zip(reports, plain_reports(), strict=True):
        assert got["global_grad_norm"] == pytest.approx(want["global_grad_norm"], rel=1e-6)
        for a, b in zip(got["layers"], want["layers"]):
            assert a["name"] == b["name"]
            for figure in ("grad_norm", "signal", "saturation"):
                assert (a[figure] is None) == (b[figure] is None)
                if b[figure] is not None:
                    assert a[figure] == pytest.approx(b[figure], rel=1e-6, abs=1e-12)


class Wrapper:
    """A framework's optimizer wrapper that is no torch optimizer itself."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer


def test_a_wrapper_that_exposes_its_optimizer_is_unwrapped():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradwatch.GradWatch(model, every_n_steps=1) as gw:
        x, y = batches()[0]
        F.cross_entropy(model(x), y).backward()
        report = gw.step(Wrapper(opt))
    assert report.learning_rate == pytest.approx(1e-3)  # read from the optimizer inside
    assert report.layers["0"].update_ratio is not None  # Adam's next update, measured


def test_anything_else_is_still_refused_by_name():
    with gradwatch.GradWatch(make_model(), every_n_steps=1) as gw:
        with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
            gw.step(object())

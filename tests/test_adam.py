"""The one Adam-step computation, against the step torch.optim.Adam and AdamW then take: every
variant the update size and the curvature probe's preconditioner depend on."""

import pytest
import torch
from torch import nn

from gradwatch.measure.adam import is_adam, next_step
from gradwatch.measure.updates import update_norms

VARIANTS = {
    "adam": (torch.optim.Adam, {}),
    "adam, coupled weight decay": (torch.optim.Adam, {"weight_decay": 0.1}),
    "adamw, decoupled weight decay": (torch.optim.AdamW, {"weight_decay": 0.1}),
    "adam, decoupled_weight_decay=True": (
        torch.optim.Adam,
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
    ),
    "amsgrad": (torch.optim.Adam, {"amsgrad": True}),
    "maximize": (torch.optim.AdamW, {"maximize": True, "weight_decay": 0.05}),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_next_step_is_the_step_torch_takes(name):
    make, kwargs = VARIANTS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = make(model.parameters(), lr=0.01, betas=(0.8, 0.9), **kwargs)
    for _ in range(4):  # the first step (no state yet) and later ones
        model(torch.randn(8, 6)).pow(2).mean().backward()
        params = list(model.parameters())
        assert all(is_adam(opt.param_groups[0], opt.state.get(p, {})) for p in params)
        steps = [next_step(p, opt, opt.param_groups[0]) for p in params]
        norms, health = update_norms(opt, params)
        grads = [p.grad.detach().clone() for p in params]
        before = [p.detach().clone() for p in params]
        opt.step()
        opt.zero_grad()
        for p, b, s, n, h, g in zip(params, before, steps, norms, health, grads):
            moved = p.detach() - b
            torch.testing.assert_close(-0.01 * s.update(), moved, rtol=1e-4, atol=1e-9)
            assert n.item() == pytest.approx(moved.norm().item(), rel=1e-4)
            state, b2 = opt.state[p], opt.param_groups[0]["betas"][1]
            v = state["max_exp_avg_sq"] if kwargs.get("amsgrad") else state["exp_avg_sq"]
            t = float(state["step"])
            eps = opt.param_groups[0]["eps"]
            want = 1 / ((v / (1 - b2**t)).sqrt() + eps)
            torch.testing.assert_close(s.inverse_scale, want, rtol=1e-5, atol=0)
            # the health row, brute force from the step torch took
            step = moved / -0.01
            root_v = (v / (1 - b2**t)).sqrt()
            torch.testing.assert_close(s.root_v, root_v, rtol=1e-5, atol=0)
            live = g != 0  # no model RMS given: every gradient counts
            bound = live & (root_v < eps)
            assert h[0].item() == bound.sum().item() and h[1].item() == live.sum().item()
            assert h[2].item() == pytest.approx((step * g).sum().item(), rel=1e-3)
            assert h[3].item() == pytest.approx(step.square().sum().item(), rel=1e-3)


def test_other_optimizers_are_not_adam():
    p = nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    assert not is_adam(sgd.param_groups[0], {})
    p.grad = torch.ones(3)
    assert update_norms(sgd, [p]) == (None, None)


def test_rounding_residue_is_no_gradient_for_the_epsilon_share():
    """A gradient a millionth of the model's RMS gradient or less (EfficientNet blocks at init:
    1e-18 against 1e-3) is rounding residue, and a parameter whose RMS gradient is a thousandth
    of the model's is not reached by the gradient: both left out. Where every gradient is
    small (eps's own case), all count."""
    p = nn.Parameter(torch.ones(3, 2))
    opt = torch.optim.Adam([p], lr=1e-3)
    p.grad = torch.tensor([[1e-18, 1e-18], [5e-9, 5e-9], [1e-3, 1e-3]])
    _, health = update_norms(opt, [p], grad_rms=1e-3)  # the parameter's RMS: 5.8e-4
    assert (health[0][0].item(), health[0][1].item()) == (2, 4)  # 5e-9: eps-bound; 1e-18: out
    p.grad = torch.full((3, 2), 1e-11)  # a model whose gradients are all this small
    _, health = update_norms(opt, [p], grad_rms=1e-11)
    assert (health[0][0].item(), health[0][1].item()) == (6, 6)
    # a parameter the gradient does not reach (its RMS a millionth of the model's): nothing
    # counts; its problem is vanishing, not eps
    p.grad = torch.full((3, 2), 2e-9)
    _, health = update_norms(opt, [p], grad_rms=1e-3)
    assert (health[0][0].item(), health[0][1].item()) == (0, 0)

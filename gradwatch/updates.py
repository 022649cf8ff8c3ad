"""The size of the update an optimizer is about to make, per parameter, from its own rule.

An adaptive optimizer's step is about ``lr`` per weight whatever the gradient's size, so the
gradient norm cannot show a learning rate too large for the weights before the step is taken;
with plain SGD the step is ``lr`` times the gradient, whose size the divergence rules judge.
So the **Adam family** is measured (``betas`` and ``eps`` in the group, ``exp_avg`` and
``exp_avg_sq`` in the state, or no state yet): the next update ``lr * m_hat / (sqrt(v_hat) + eps)``
from the current gradient and the moments, as ``torch.optim.Adam`` computes it (weight decay left
out); on the first step, ``lr`` times the gradient's sign, element by element. Other optimizers
are not measured. Everything stays on the device, in the step's one copy.
"""

from __future__ import annotations

import torch

from .stats import norm

ADAM_STATE = ("exp_avg", "exp_avg_sq")


def update_norms(optimizer, params: list[torch.Tensor]) -> torch.Tensor | None:
    """Per parameter of ``params`` (in order), the L2 norm of the update an Adam-family
    optimizer's next step makes from the current ``.grad``, as an fp32 device tensor; 0 where it
    makes none. None for other optimizers, or when a parameter is sharded as a DTensor."""
    group_of = {id(p): g for g in getattr(optimizer, "param_groups", ()) for p in g["params"]}
    out = []
    for p in params:
        group = group_of.get(id(p))
        grad = p.grad
        if type(p).__name__ == "DTensor":
            return None
        if group is None or grad is None or grad.is_sparse:
            out.append(torch.zeros((), device=p.device))
            continue
        lr = group.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
            return None
        state = optimizer.state.get(p, {})
        if "betas" in group and "eps" in group and all(k in state for k in ADAM_STATE):
            value = _adam_update(grad, state, group)
        elif "betas" in group and "eps" in group and not state:  # the first step: lr * sign
            value = norm(torch.sign(grad.detach()))
        else:
            return None
        out.append(value * lr)
    if not out:
        return None
    device = out[0].device
    return torch.stack([v.to(device, torch.float32) for v in out])


def _adam_update(grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
    """``||m_hat / (sqrt(v_hat) + eps)||`` of the next Adam step, without touching the state."""
    beta1, beta2 = group["betas"]
    g = grad.detach().float()
    step = torch.as_tensor(state.get("step", 0), dtype=torch.float32, device=g.device) + 1
    m = state["exp_avg"].float() * beta1 + g * (1 - beta1)
    v = state["exp_avg_sq"].float() * beta2 + g.square() * (1 - beta2)
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    return norm(m_hat / (v_hat.sqrt() + group["eps"]))

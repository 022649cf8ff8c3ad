"""The size of the update an optimizer is about to make, per parameter, from its own rule.

An adaptive optimizer's step is about ``lr`` per weight whatever the gradient's size, so the
gradient norm cannot show a learning rate too large for the weights before the step is taken;
with plain SGD the step is ``lr`` times the gradient, whose size the divergence rules judge.
So the **Adam family** is measured (``betas`` and ``eps`` in the group, Adam's moments in the
state, or no state yet): the next update ``lr * m_hat / (sqrt(v_hat) + eps)`` from the current
gradient and the moments, with weight decay, ``amsgrad`` and ``maximize`` as
``torch.optim.Adam``/``AdamW`` apply them (:mod:`gradwatch.measure.adam`). Other optimizers are not
measured. Everything stays on the device, in the step's one copy.
"""

from __future__ import annotations

import torch

from .adam import is_adam, next_step
from .stats import norm


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
        if not is_adam(group, state):
            return None
        out.append(norm(next_step(p, optimizer, group).update()) * lr)
    if not out:
        return None
    device = out[0].device
    return torch.stack([v.to(device, torch.float32) for v in out])

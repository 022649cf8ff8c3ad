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
from .statistics import ADAM_HEALTH
from .stats import norm

# A gradient this far below the model's RMS gradient is rounding residue of the sums it came
# from (fp32 resolves 1.2e-7 of a value), not a signal eps could shrink: a layer whose gradient
# does not reach it (EfficientNet blocks at init: 1e-18 to 1e-39 against 1e-3) has a problem
# eps did not cause. Where the whole model's gradients are small, eps's case, all count.
NOISE = 1e-6
# A parameter whose RMS gradient is below this fraction of the model's is one the gradient does
# not reach (the vanishing rules' ratio): eps is not what holds it back, and a smaller eps would
# only scale its residue up to full steps.
UNREACHED = 1e-3


def update_norms(
    optimizer, params: list[torch.Tensor], grad_rms: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per parameter of ``params`` (in order): the L2 norm of the update an Adam-family
    optimizer's next step makes from the current ``.grad`` (fp32, 0 where it makes none), and
    that step's health as ``ADAM_HEALTH`` rows (fp64): the weights with a gradient whose
    ``sqrt(v_hat)`` is below epsilon, the weights with a gradient (above ``NOISE`` times
    ``grad_rms``, the model's RMS gradient, in a parameter whose RMS gradient is above
    ``UNREACHED`` times it), ``<step, grad>`` and
    ``|step|^2`` (the step before the learning rate). (None, None) for other optimizers, or when
    a parameter is sharded as a DTensor."""
    group_of = {id(p): g for g in getattr(optimizer, "param_groups", ()) for p in g["params"]}
    out, health = [], []
    for p in params:
        group = group_of.get(id(p))
        grad = p.grad
        if type(p).__name__ == "DTensor":
            return None, None
        if group is None or grad is None or grad.is_sparse:
            out.append(torch.zeros((), device=p.device))
            health.append(torch.zeros(len(ADAM_HEALTH.parts), dtype=torch.float64, device=p.device))
            continue
        lr = group.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
            return None, None
        state = optimizer.state.get(p, {})
        if not is_adam(group, state):
            return None, None
        step = next_step(p, optimizer, group)
        update = step.update()
        out.append(norm(update) * lr)
        g = grad.detach().float()
        # weights with a gradient above rounding residue, in a parameter the gradient reaches,
        # and of those the ones whose sqrt(v_hat) is below eps
        reached = g.square().mean().sqrt() > UNREACHED * grad_rms
        live = (g != 0) & (step.root_v > NOISE * grad_rms) & reached
        bound = live & (step.root_v < float(group["eps"]))
        health.append(
            ADAM_HEALTH.pack(
                eps_bound=bound.sum(),
                active=live.sum(),
                dot=(update * g).sum(),
                step_sumsq=update.square().sum(),
            )
        )
    if not out:
        return None, None
    device = out[0].device
    norms = torch.stack([v.to(device, torch.float32) for v in out])
    return norms, torch.stack([h.to(device) for h in health])

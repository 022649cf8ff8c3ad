"""The next step of an Adam-family optimizer (``torch.optim.Adam``, ``AdamW``, and look-alikes
with ``betas``/``eps`` in their groups), computed once for its two users: the size of the update
(:mod:`gradwatch.measure.updates`) and the preconditioner the curvature probe scales the Hessian by
(:mod:`gradwatch.step.curvature`).

It follows ``torch.optim.Adam``'s own step without touching the state: ``maximize`` negates the
gradient; coupled weight decay (Adam's) adds ``weight_decay * p`` to it before the moments;
``amsgrad`` divides by the running maximum of the second moment; decoupled weight decay (AdamW's,
or ``decoupled_weight_decay=True``) shrinks the weights by ``lr * weight_decay`` apart from the
moments. Before the first step the moments are zero, so the step is the gradient over its own size
(about its sign).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AdamStep:
    """One parameter's next Adam step, in fp32, before the learning rate."""

    direction: torch.Tensor  # m_hat / (sqrt(v_hat) + eps): the update is -lr times this ...
    decay: torch.Tensor | None  # ... minus lr times this (decoupled weight decay), when any
    inverse_scale: torch.Tensor  # 1 / (sqrt(v_hat) + eps): the per-weight preconditioner
    root_v: torch.Tensor  # sqrt(v_hat): the gradient's scale as the second moment has it

    def update(self) -> torch.Tensor:
        """The step's change to the weights over ``-lr``."""
        return self.direction if self.decay is None else self.direction + self.decay


def is_adam(group: dict, state: dict) -> bool:
    """An Adam-family group whose state (if any yet) has Adam's moments."""
    return "betas" in group and "eps" in group and (not state or "exp_avg_sq" in state)


def next_step(p: torch.Tensor, optimizer, group: dict) -> AdamStep:
    """``optimizer``'s next Adam step for ``p`` (in ``group``) from its current ``.grad`` and
    state. Weight decay is decoupled where the group says so, or for ``AdamW``."""
    state = optimizer.state.get(p, {})
    b1, b2 = (float(b) for b in group["betas"])
    eps, wd = float(group["eps"]), float(group.get("weight_decay", 0.0))
    adamw = isinstance(optimizer, torch.optim.AdamW)
    decoupled = bool(group.get("decoupled_weight_decay", adamw))
    weights = p.detach().float()
    g = p.grad.detach().float()
    if group.get("maximize"):
        g = -g
    if wd and not decoupled:
        g = g + wd * weights
    step = state.get("step", 0)  # a tensor (on the device when capturable): not read here
    t = step.float() + 1 if isinstance(step, torch.Tensor) else float(step) + 1
    m = state["exp_avg"].float() * b1 + g * (1 - b1) if "exp_avg" in state else g * (1 - b1)
    v = state["exp_avg_sq"].float() * b2 + g.square() * (1 - b2) if state else g.square() * (1 - b2)
    if group.get("amsgrad") and "max_exp_avg_sq" in state:
        v = torch.maximum(v, state["max_exp_avg_sq"].float())
    root_v = (v / (1 - b2**t)).sqrt()
    inverse = 1 / (root_v + eps)
    decay = wd * weights if wd and decoupled else None
    return AdamStep(m / (1 - b1**t) * inverse, decay, inverse, root_v)

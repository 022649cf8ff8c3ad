"""The init audit: on the first logging step, before training has changed the weights, what the
theory predicts for each plain stack of like layers from their initialisation alone.

A plain stack is a chain of like layers (see :func:`gradwatch.diagnosis.rules.chains`) joined only by
activations: no normalisation or residual branch between them, which would reset or bypass the
product. Across each layer the backward signal's variance is multiplied by its gain factor chi =
n_out x Var[W] x E[phi'(z)^2] (``LayerStats.gain_factor``), so the stack multiplies the signal's
norm by sqrt(prod chi). Outside [vanishing_ratio, exploding_ratio] the initialisation alone decides
the outcome; the init that keeps chi near 1 is named with its exact call: He for the ReLU family
(E[phi'^2] about 1/2 needs Var[W] = 2/fan_in), Xavier for tanh and linear stacks (1/fan_in), LeCun
for SELU (1/fan_in, the scale SELU's self-normalisation assumes). Stacks of bounded activations
that no init can fix (sigmoid: E[phi'^2] <= 1/16) are left to the vanishing rule's remedies.
"""

from __future__ import annotations

import math
from collections import Counter

from ..report import Finding, Report
from ..report.remedies import remedies
from ..report.words import layer_list

# activation kind -> (the init that keeps chi near 1, its weight gain RMS(W) x sqrt(fan_in))
TARGET = {
    "relu": ("he-init", math.sqrt(2)),
    "leaky_relu": ("he-init", math.sqrt(2)),
    "relu6": ("he-init", math.sqrt(2)),
    "gelu": ("he-init", math.sqrt(2)),
    "silu": ("he-init", math.sqrt(2)),
    "tanh": ("xavier-init", 1.0),
    None: ("xavier-init", 1.0),  # a linear stack
    "selu": ("lecun-init", 1.0),
}


def init_findings(report: Report, stacks: list) -> list[Finding]:
    """``init`` warnings for the plain stacks among ``stacks`` (chains) whose predicted signal
    ratio from input side to output side leaves [1e-3, 1e3]."""
    names = list(report.layers)
    position = {n: k for k, n in enumerate(names)}
    out = []
    for chain in stacks:
        members = chain.members
        kinds = Counter()
        plain = True
        for a, b in zip(members, members[1:]):
            between = names[position[a.name] + 1 : position[b.name]]
            if any(report.layers[n].activation is None for n in between):
                plain = False
                break
            kinds.update(report.layers[n].activation for n in between)
        chis = [m.gain_factor for m in members[:-1]]
        if not plain or any(c is None or c <= 0 or not math.isfinite(c) for c in chis):
            continue
        act = kinds.most_common(1)[0][0] if kinds else None
        if act not in TARGET:
            continue
        ratio = math.sqrt(math.prod(chis))
        if 1e-3 <= ratio <= 1e3:
            continue
        out.append(_finding(chain, act, chis, ratio))
    return out


def _finding(chain, act: str | None, chis: list[float], ratio: float) -> Finding:
    remedy, target = TARGET[act]
    members = chain.members
    gains = [m.weight_gain for m in members if m.weight_gain is not None]
    gain = sum(gains) / len(gains) if gains else float("nan")
    mean_chi = math.prod(chis) ** (1 / len(chis))
    what = "vanishes" if ratio < 1 else "explodes"
    stack = layer_list([m.name for m in members], chain.module_type, limit=6)
    between = f"{act} activations" if act else "no activation"
    msg = (
        f"initialisation: across {stack} (with {between} between them) the backward signal "
        f"{what} by {ratio:.1e} before any update, as the theory predicts from the weights "
        f"alone: each layer's chi = n_out x Var[W] x E[phi'^2] averages {mean_chi:.2g} (1 keeps "
        f"it level). Their weight gain is {gain:.2g}; {remedy.replace('-init', '')} init gives "
        f"{target:.2g}, which keeps chi near 1 for this activation."
    )
    ctx = f"`{members[0].name}`: weight gain {gain:.2g}, target {target:.2g}"
    threshold = 1e-3 if ratio < 1 else 1e3
    return Finding(
        members[0].name, "init", "warning", ratio, threshold, msg, remedies([remedy], ctx)
    )

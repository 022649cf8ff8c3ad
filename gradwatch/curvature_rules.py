"""Findings from the curvature probe: a ravine (``sharp_curvature``) or a plateau (``plateau``).

Both are about the whole model, so their layer is ``""`` (shown as ``(root)``).

The stability ratio comes from the loss's local quadratic model, exact for a quadratic loss: from
1 on, gradient descent diverges. A network answers an overshoot by changing its curvature: at the
edge of stability the ratio hovers around 1 while the loss keeps falling (measured on a 6-layer
ReLU MLP, plain SGD at lr 0.1: 2-4 minibatch measurements in a row above 1, then below, and the
loss went to 0.002; at lr 0.3 it stayed above 1 for 11 measurements and ended in NaN). So a ravine
is judged at once on the first measurement (before training has shaped the curvature: the early
instability that a warm-up prevents), and later only when it persists. Adaptive optimizers are not
judged (see ``Curvature.adaptive``). A plateau note needs two flat measurements in a row, with a
learning rate that did not rise in between: a warm-up starts with tiny steps on purpose.
"""

from __future__ import annotations

from .remedies import remedies
from .report import Curvature, Finding
from .thresholds import Thresholds


def sharp_curvature(
    c: Curvature, t: Thresholds, lr: float | None, streak: int, first: bool
) -> list[Finding]:
    """``sharp_curvature`` for plain or momentum SGD whose stability ratio reached
    ``max_stability_ratio`` on the first measurement, or on the last ``streak`` measurements
    (this one included) when that is ``curvature_patience`` or more."""
    ratio = c.stability_ratio
    if c.adaptive or ratio is None or c.top_eigenvalue is None:
        return []
    if ratio < t.max_stability_ratio or not (first or streak >= t.curvature_patience):
        return []
    persistent = streak >= t.curvature_patience
    severity = "error" if persistent and ratio >= 2 * t.max_stability_ratio else "warning"
    at = f" at learning rate {lr:.3g}" if lr is not None else ""
    if persistent:
        when = (
            f"on {streak} measurements in a row the sharpest direction has stayed past the limit, "
            "where a network at the edge of stability flattens itself back below it"
        )
    else:
        when = (
            "from the first measurement: a network often gets through this by flattening its "
            "sharpest direction during a spike of the loss, which a warm-up avoids; a quadratic "
            "loss diverges"
        )
    msg = (
        f"the loss is too sharp for the step size{at}: its sharpest direction on this batch has "
        f"curvature {c.top_eigenvalue:.3g} (the Hessian's top eigenvalue), and the stability "
        f"ratio along it is {ratio:.3g} ({c.rule}). From 1 on, each step lands further from the "
        f"bottom of that direction than it started, so the weights oscillate across a ravine; "
        f"{when}. A small gradient here is a ravine, not a vanishing gradient: the step must "
        "shrink"
    )
    if lr is not None:
        msg += f", to below {lr * t.max_stability_ratio / ratio:.3g} for this batch"
    ctx = f"stability ratio {ratio:.3g}"
    return [
        Finding(
            "",
            "sharp_curvature",
            severity,
            ratio,
            t.max_stability_ratio,
            msg + ".",
            remedies(["lower-lr", "lr-warmup"], ctx),
        )
    ]


def is_flat(c: Curvature, t: Thresholds) -> bool:
    """Both the slope and the curvature are small for the optimizer's step."""
    return (
        c.stability_ratio is not None
        and c.progress is not None
        and c.stability_ratio < t.plateau_ratio
        and c.progress < t.plateau_progress
    )


def plateau(c: Curvature, t: Thresholds) -> Finding:
    """The ``plateau`` note for a second flat measurement in a row."""
    msg = (
        f"a plateau: the next step would lower the loss ({c.loss:.3g}) by about "
        f"{100 * c.progress:.2g}% to first order, and the sharpest direction is far from "
        f"limiting the step (stability ratio {c.stability_ratio:.2g}, curvature "
        f"{c.top_eigenvalue:.3g}). Slope and curvature are both small, so this is flat ground, "
        "not a ravine: a larger step stays stable. If the loss is still high, raise the learning "
        "rate; if it is as low as it gets, this is the minimum and nothing needs to change."
    )
    ctx = f"stability ratio {c.stability_ratio:.2g}"
    return Finding(
        "", "plateau", "info", c.progress, t.plateau_progress, msg, remedies(["raise-lr"], ctx)
    )

"""Findings from the curvature probe: a ravine (``sharp_curvature``) or a plateau (``plateau``).

Both are about the whole model, so their layer is ``""`` (shown as ``(root)``).

The stability ratio comes from the loss's local quadratic model, exact for a quadratic loss: from
1 on, gradient descent diverges. A network answers an overshoot by changing its curvature:

* **The edge of stability** (Cohen et al. 2021): full-batch gradient descent sharpens until the
  top eigenvalue reaches 2/lr, then hovers there (ratio 1.00-1.05) for thousands of steps while
  the loss keeps falling over long stretches and rises and falls over short ones: each time the
  sharpest direction overshoots, the oscillation itself flattens it back. A ratio that has lasted
  at the limit is judged by the loss: below the highest it had been when the streak began, the
  overshoots are being absorbed (an ``info`` note); past it, they are not: a warning (an error
  from twice the limit). A divergence climbs past every earlier loss on its way to NaN; a spike
  at the edge of stability returns to a level the run had some hundreds of steps before.
* **The catapult** (Lewkowycz et al. 2020): a network started at a learning rate between 2 and
  about 4 over its initial sharpness has one loss spike during which the sharpness drops below
  2/lr, then it trains. So the first measurement is judged at once only from twice the limit;
  between 1 and 2 it is a note that names what to expect (a quadratic loss cannot catapult: its
  curvature is fixed, and the lasting-ratio rule then finds it, its loss rising).

Measured on a 6-layer ReLU MLP, plain SGD at lr 0.1: 2-4 minibatch measurements in a row above 1,
then below, and the loss went to 0.002; at lr 0.3 it stayed above 1 for 11 measurements and ended
in NaN. Adaptive optimizers are not judged (see ``Curvature.adaptive``). A plateau note needs two
flat measurements in a row, with a learning rate that did not rise in between: a warm-up starts
with tiny steps on purpose.
"""

from __future__ import annotations

from ..report import Curvature, Finding
from ..report.remedies import remedies
from .thresholds import Thresholds


def sharp_curvature(
    c: Curvature,
    t: Thresholds,
    lr: float | None,
    streak: int,
    first: bool,
    loss_before: float | None = None,
    high_streak: int = 0,
) -> list[Finding]:
    """``sharp_curvature`` for plain or momentum SGD whose stability ratio reached
    ``max_stability_ratio`` on the first measurement, or on the last ``streak`` measurements
    (this one included) when that is ``curvature_patience`` or more. ``loss_before``: the
    highest curvature loss of the run when the streak began; a lasting streak whose loss is
    still below it is the edge of stability, an ``info`` note. ``high_streak``: how many of the
    latest measurements in a row were at twice the limit or more: an error once that lasts too
    (a catapult passes twice the limit for a measurement or two at the top of its spike)."""
    ratio = c.stability_ratio
    if c.adaptive or ratio is None or c.top_eigenvalue is None:
        return []
    if ratio < t.max_stability_ratio or not (first or streak >= t.curvature_patience):
        return []
    persistent = streak >= t.curvature_patience
    limit = f"{c.top_eigenvalue / ratio:.3g}" if ratio > 0 else None  # where the ratio is 1
    if persistent and _below(loss_before, c.loss):
        return [_edge_of_stability(c, streak, loss_before, limit)]
    if not persistent and ratio < 2 * t.max_stability_ratio:
        return [_catapult(c, limit)]
    severity = "error" if persistent and high_streak >= t.curvature_patience else "warning"
    at = f" at learning rate {lr:.3g}" if lr is not None else ""
    if persistent:
        when = (
            f"on {streak} measurements in a row the sharpest direction has stayed past the limit, "
            "where a network at the edge of stability flattens itself back below it"
        )
        if loss_before is not None and c.loss is not None:
            when += (
                f", and the loss ({c.loss:.3g}) has climbed past the highest it had been before "
                f"({loss_before:.3g})"
            )
    else:
        when = (
            "from the first measurement, at twice the limit or more: beyond the range where a "
            "network flattens its sharpest direction during one spike of the loss (a catapult); "
            "a warm-up avoids it"
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


def _below(before: float | None, now: float | None) -> bool:
    return before is not None and now is not None and now < before


def _edge_of_stability(c: Curvature, streak: int, loss_before: float, limit: str | None) -> Finding:
    """The ``info`` note for a ratio that lasts at the limit while the loss keeps falling."""
    at = f" (the limit is {limit} here)" if limit else ""
    msg = (
        f"at the edge of stability: the sharpest direction's curvature {c.top_eigenvalue:.3g} has "
        f"sat at the optimizer's stability limit{at} for {streak} measurements (stability ratio "
        f"{c.stability_ratio:.3g}, {c.rule}) while the loss ({c.loss:.3g}) stays below the "
        f"highest it had been ({loss_before:.3g}). Gradient descent typically trains here (Cohen "
        "et al. 2021): each overshoot along that direction flattens it back, so the loss falls "
        "over many steps while it rises and falls over a few, and the gradient norm rises and "
        "falls with the oscillation. Nothing needs changing while the loss keeps falling."
    )
    return Finding("", "sharp_curvature", "info", c.stability_ratio, 1.0, msg)


def _catapult(c: Curvature, limit: str | None) -> Finding:
    """The ``info`` note for a first measurement between 1 and 2 times the limit."""
    at = f" (the limit is {limit} here)" if limit else ""
    msg = (
        f"past the stability limit from the first measurement: the sharpest direction has "
        f"curvature {c.top_eigenvalue:.3g}{at}, stability ratio {c.stability_ratio:.3g} "
        f"({c.rule}). Below twice the limit a network usually catapults (Lewkowycz et al. "
        "2020): the loss spikes once while the sharpness drops below the limit, then training "
        "goes on. A loss that keeps rising instead, or a fixed curvature (a quadratic loss), "
        "diverges: then lower the learning rate or warm it up."
    )
    ctx = f"stability ratio {c.stability_ratio:.3g}"
    return Finding(
        "",
        "sharp_curvature",
        "info",
        c.stability_ratio,
        1.0,
        msg,
        remedies(["lr-warmup", "lower-lr"], ctx),
    )


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

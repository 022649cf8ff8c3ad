"""The declared per-layer statistics an activation call adds besides its per-unit flat counts,
computed here for eager and traced code alike: a new one is added in this one place."""

from __future__ import annotations

import torch

from ..measure import stats
from ..measure.statistics import DPHI2, Statistic


def wanted(kind: str, weighed: bool) -> tuple[Statistic, ...]:
    """The statistics an activation of ``kind`` adds on this step (``weighed``: a step that reads
    the weights, where the theory's E[phi'(z)^2] is needed; a piecewise-linear kind's follows
    from its flat fraction)."""
    return (DPHI2,) if weighed and kind not in stats.PIECEWISE_DPHI2 else ()


def activation_rows(
    kind: str,
    y: torch.Tensor,
    inp: torch.Tensor | None,
    params: dict[str, float],
    statistics: tuple[Statistic, ...],
) -> dict[str, torch.Tensor]:
    """Statistic name -> the row one call adds, for each of ``statistics`` it can be measured on
    (traced code calls it too: plain loops and dicts only)."""
    rows = {}
    if DPHI2 in statistics:
        d = stats.derivative(kind, y, inp, **params)
        if d is not None and d.numel():
            rows[DPHI2.name] = DPHI2.pack(sum=stats.square_sum(d), count=d.numel())
    return rows

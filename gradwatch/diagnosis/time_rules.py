"""Diagnosis through time: pure rules from a sequence module's per-time-step backward signal.

Backpropagating through a recurrence multiplies the signal, at each step back in time, by the
step's Jacobian: for a vanilla RNN ``W_hh^T diag(phi'(a_t))``, whose norm is at most the largest
singular value of ``W_hh`` times the largest derivative. A factor below 1 shrinks the gradient that
reaches early time steps exponentially with the gap, a factor above 1 grows it. Gated cells (LSTM,
GRU) add a path through time scaled by the gate that keeps the state, which they learn to open
when the task needs memory; so a decay is reported only once it has lasted
``Thresholds.time_patience`` optimizer steps, while a growth is reported at once.
"""

from __future__ import annotations

import math
import statistics

from ..report import Finding, LayerStats, Report
from ..report.remedies import remedies

MIN_TIME_STEPS = 8  # a shorter sequence has no trend to speak of
STREAK_LOGGING_STEPS = 3  # and a decay must be seen on this many logging steps in a row


def time_ratio(profile: list[float | None]) -> float | None:
    """The signal at the start of the sequence relative to its last step, where the loss enters:
    the median over the first tenth of the steps (one step at least), divided by the last step's.
    None when the profile is too short or the last step received nothing."""
    values = [v for v in profile if v is not None]
    if len(values) < MIN_TIME_STEPS or not values[-1] or not math.isfinite(values[-1]):
        return None
    head = values[: max(1, len(values) // 10)]
    return statistics.median(head) / values[-1]


def factor_per_step(ratio: float, steps: int) -> float:
    """The average factor by which each step back in time multiplies the signal."""
    return max(ratio, 1e-300) ** (1 / max(steps - 1, 1))


def through_time_findings(
    report: Report,
    thresholds,
    decaying_since: dict[str, tuple[int, int]],
) -> list[Finding]:
    """Vanishing and exploding through time. ``decaying_since``: sequence layer -> (the step
    since which, and the logging steps on which, its ratio has been below the vanishing
    threshold without a break, this step included)."""
    t = thresholds
    out = []
    for s in report.layers.values():
        if s.time_signal is None:
            continue
        ratio = time_ratio(s.time_signal)
        if ratio is None or not math.isfinite(ratio):
            continue
        steps = len(s.time_signal)
        if ratio > t.exploding_ratio:
            error = ratio > t.exploding_ratio**2
            out.append(_finding(s, "exploding", error, ratio, t.exploding_ratio, steps, None))
        elif ratio < t.vanishing_ratio:
            since, seen = decaying_since.get(s.name, (report.step, 1))
            if seen >= STREAK_LOGGING_STEPS and report.step - since >= t.time_patience:
                error = ratio < t.vanishing_ratio**2
                out.append(_finding(s, "vanishing", error, ratio, t.vanishing_ratio, steps, since))
    return out


def _finding(
    s: LayerStats,
    kind: str,
    error: bool,
    ratio: float,
    threshold: float,
    steps: int,
    since: int | None,
) -> Finding:
    factor = factor_per_step(ratio, steps)
    what = f"`{s.name}` ({s.module_type})"
    measured = (
        f"the gradient reaching its input at the first time steps is {ratio:.2g} of that at "
        f"step {steps - 1} (the last)"
    )
    if kind == "vanishing":
        reach = math.log(threshold) / math.log(factor) if factor < 1 else steps
        lead = (
            f"{what} vanishes through time: {measured}, below {threshold:g} on every logging "
            f"step since step {since}. Each step back multiplies it by {factor:.3g} on average, "
            f"so inputs more than about {reach:.0f} steps before the loss barely train the model"
        )
    else:
        lead = (
            f"{what} explodes through time: {measured}. Each step back multiplies it by "
            f"{factor:.3g} on average"
        )
    cause, ids = _cause(s, kind)
    message = f"{lead}{cause}."
    context = f"{s.name}: {factor:.3g} per time step"
    return Finding(
        s.name,
        kind,
        "error" if error else "warning",
        ratio,
        threshold,
        message,
        remedies(ids, context),
    )


def _cause(s: LayerStats, kind: str) -> tuple[str, list[str]]:
    """The cause the weights show, and the remedies that fit the cell."""
    sigma, deriv, gate = s.recurrent_gain, s.state_derivative, s.gate_bias
    if kind == "exploding":
        ids = ["gradient-clipping"] + (["orthogonal-init"] if sigma is not None else [])
        if sigma is not None and sigma > 1:
            return (
                f"; the largest singular value of its weight_hh is {sigma:.3g}, above 1, "
                "which lets the signal grow at every step",
                ids,
            )
        return "", ids
    if gate is not None:  # LSTM / GRU
        keep = 1 / (1 + math.exp(-gate))
        gate_name = "update" if s.module_type == "GRU" else "forget"
        return (
            f"; its {gate_name} gate's bias averages {gate:.2g} (sigmoid {keep:.2f}): the cell "
            f"keeps about {keep:.0%} of its state at each step",
            ["forget-gate-bias"],
        )
    if sigma is not None:  # vanilla RNN
        if sigma < 1:
            why = (
                f"; the largest singular value of its weight_hh is {sigma:.3g}, below 1, so every "
                "step shrinks the signal whatever the inputs"
            )
        elif deriv is not None and deriv < 0.5:
            why = (
                f"; its tanh units are saturated (tanh' averages {deriv:.2g} over its outputs), "
                f"which outweighs weight_hh's largest singular value of {sigma:.3g}"
            )
        else:
            why = (
                f"; weight_hh's largest singular value is {sigma:.3g}"
                + (f" and tanh' averages {deriv:.2g}" if deriv is not None else "")
                + ", but a typical direction is shrunk far more than the largest one"
            )
        return why, ["gated-rnn", "orthogonal-init"]
    return "", ["gated-rnn"]

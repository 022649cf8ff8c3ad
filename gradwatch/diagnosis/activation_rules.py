"""Diagnosis of the activations: saturation of bounded ones, dead units of ReLU-like ones, and
the weight-gain causes that the rules quote (against Xavier init). Pure, as :mod:`gradwatch.diagnosis.rules`,
whose :func:`~gradwatch.diagnosis.rules.diagnose` calls :func:`activation_findings`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..measure.stats import BOUNDED_KINDS, RELU_LIKE_KINDS
from ..report import Finding, LayerStats, Report
from ..report.remedies import remedies

if TYPE_CHECKING:
    from .thresholds import Thresholds

ZERO_BELOW_KINDS = frozenset({"relu", "relu6"})  # flat exactly where the input is below 0
CHANCE = 0.01  # dead units explained by chance signs with at most this probability are dead


def batch_too_alike(s: LayerStats) -> bool:
    """Whether a ReLU layer's dead units are no more than its always-on units would be by chance.

    When a unit's pre-activation barely varies over the batch (a squeeze-and-excitation block sees
    one globally pooled vector per sample, much alike at initialisation), its sign is that of its
    mean, as likely negative as positive: about as many units are off for every input as on for
    every input, and "off for every input" says no more about death than "on" does. A unit killed
    by a large update or a bias is off while nothing pushes any unit the other way. Test: among
    the units that never switched, the dead ones are too many for a fair coin."""
    if s.activation not in ZERO_BELOW_KINDS or None in (s.active_units, s.dead_units, s.units):
        return False
    dead = round(s.dead_units * s.units)
    steady = dead + round(s.active_units * s.units)
    if steady == 0:
        return False
    tail = sum(math.comb(steady, i) for i in range(dead, steady + 1)) / 2**steady
    return tail > CHANCE


XAVIER_GAIN = 1.0  # RMS(W) x sqrt(fan_in) under Xavier init for a square layer
OFF_XAVIER = 2.5  # a gain this many times above or below it is named as the cause


def off_xavier(gain: float | None) -> str | None:
    """How a weight gain misses Xavier init (for bounded activations), when it misses by far."""
    if gain is None or not math.isfinite(gain):
        return None
    if gain > OFF_XAVIER * XAVIER_GAIN:
        where = f"{gain / XAVIER_GAIN:.1f}x above"
    elif gain < XAVIER_GAIN / OFF_XAVIER:
        where = f"{XAVIER_GAIN / gain:.1f}x below"
    else:
        return None
    return f"at {gain:.2f}/sqrt(fan_in), {where} Xavier init's {XAVIER_GAIN:.1f}/sqrt(fan_in)"


TRAINED = 3.0  # weights this many times above or below their first measured scale: training


@dataclass(frozen=True)
class Drift:
    """How far training has moved some layers' weight gain from where it was first measured."""

    factor: float  # now / first (mean weight gains)
    since: int  # the step the first measurement was taken
    first: float  # the mean weight gain then

    def words(self) -> str:
        """The drift as a sentence part: "the weights grew 6,900x since step 0 (from 0.58...)"."""
        moved = "grew" if self.factor > 1 else "shrank"
        times = self.factor if self.factor > 1 else 1 / self.factor
        return (
            f"the weights {moved} {times:,.0f}x since step {self.since} (from "
            f"{self.first:.2g}/sqrt(fan_in) when first measured)"
        )


def drift(members: list[LayerStats], first_gains: dict[str, tuple[int, float]]) -> Drift | None:
    """The drift of ``members``' weight gain since it was first measured, when it is ``TRAINED``
    or more either way: then their scale is what training made of it, and an init remedy would
    answer a scale the model was never built with."""
    pairs = [
        (m.weight_gain, first_gains[m.name])
        for m in members
        if m.weight_gain is not None and math.isfinite(m.weight_gain) and m.name in first_gains
    ]
    if not pairs:
        return None
    now = sum(g for g, _ in pairs) / len(pairs)
    first = sum(g0 for _, (_, g0) in pairs) / len(pairs)
    if first <= 0 or TRAINED * first > now > first / TRAINED:
        return None
    return Drift(now / first, min(step for _, (step, _) in pairs), first)


def weights_as_of(report: Report) -> str:
    """Said after a figure quoted from the weights when they were measured on an earlier step."""
    w = report.weight_step
    return "" if w is None or w == report.step else f" (weights as of step {w})"


def activation_findings(
    report: Report,
    t: Thresholds,
    explained: set[str],
    dead_samples: dict[str, tuple[int, float]],
    first_gains: dict[str, tuple[int, float]] | None = None,
) -> list[Finding]:
    out: list[Finding] = []
    first_activation = next((s for s in report.layers.values() if s.activation), None)
    feeding, last = {}, None  # activation -> the layer with a weight matrix just before it
    for s in report.layers.values():
        if s.activation is None and s.weight_gain is not None:
            last = s
        elif s.activation is not None and last is not None:
            feeding[s.name] = last
    unscaled = report.input_rms is not None and report.input_rms > t.input_rms
    for s in report.layers.values():
        # (logging steps, inputs per unit) of the evidence that its units are dead
        steps, seen = dead_samples.get(s.name, (1, s.samples_per_unit or 0))
        if (
            s.activation in BOUNDED_KINDS
            and s.saturation is not None
            and s.saturation >= t.saturation
            and not s.pooled  # a gate: saturated, it sets whole channels on or off by design
        ):
            severity = "error" if s.saturation >= t.saturation_error else "warning"
            msg = (
                f"layer `{s.name}`: {100 * s.saturation:.0f}% of its {s.activation} outputs are "
                f"saturated (threshold {100 * t.saturation:.0f}%): their local derivative is "
                f"below {t.saturation_eps:g} of its peak, so almost no gradient passes"
            )
            before = feeding.get(s.name)
            inputs_cause = s is first_activation and unscaled  # then the inputs, not the gain
            off = moved = None
            if before is not None and not inputs_cause:
                moved = drift([before], first_gains or {})
                off = off_xavier(before.weight_gain)
            if inputs_cause:
                msg += (
                    f". The model's inputs have RMS {report.input_rms:.3g} (above "
                    f"{t.input_rms:g}): the raw feature scale drives the first layer into "
                    f"saturation."
                )
                ids = ["standardize-inputs", "normalization"]
            else:
                msg += "."
                ids = ["normalization", "relu-family", "lower-lr"]
            if off and moved is not None:  # the scale is training's, not the init's
                msg += (
                    f" Cause: the layer feeding it, `{before.name}`, has weights {off}, and "
                    f"{moved.words()}: its outputs have become too large for {s.activation}"
                    f"{weights_as_of(report)}."
                )
                ids = ["lower-lr", "gradient-clipping"] + [i for i in ids if i != "lower-lr"]
            elif off:
                msg += (
                    f" Cause: the layer feeding it, `{before.name}`, has weights {off}: its "
                    f"outputs are too large for {s.activation}, whose flat tails start near |z| = 2"
                    f"{weights_as_of(report)}."
                )
                ids = ["xavier-init"] + [i for i in ids if i != "xavier-init"]
            ctx = f"`{s.name}`: {100 * s.saturation:.0f}% saturated"
            out.append(
                Finding(
                    s.name,
                    "saturation",
                    severity,
                    s.saturation,
                    t.saturation,
                    msg,
                    remedies(ids, ctx),
                )
            )
        elif (
            s.activation in RELU_LIKE_KINDS
            and s.dead_units is not None
            and s.dead_units >= t.dead_units
            and seen >= t.min_samples_per_unit
            and s.name not in explained
            and not batch_too_alike(s)
        ):
            severity = "error" if s.dead_units >= t.dead_units_error else "warning"
            over = f" over the last {steps} logging steps" if steps > 1 else ""
            msg = (
                f"layer `{s.name}`: {100 * s.dead_units:.0f}% of its {s.activation} units are "
                f"off for every one of {seen:.0f} inputs{over} (threshold "
                f"{100 * t.dead_units:.0f}%): dead units pass no gradient and never recover."
            )
            ids = ["leaky-relu", "lower-lr"]
            if s is first_activation and unscaled:
                ids.insert(0, "standardize-inputs")
            ctx = f"`{s.name}`: {100 * s.dead_units:.0f}% dead units"
            out.append(
                Finding(
                    s.name,
                    "dead_units",
                    severity,
                    s.dead_units,
                    t.dead_units,
                    msg,
                    remedies(ids, ctx),
                )
            )
    return out

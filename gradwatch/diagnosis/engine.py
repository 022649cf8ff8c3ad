"""A run's findings, step after step: the rules on each report, the report against the run's
recent history (divergence), and since when each finding has been found."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from ..report import Finding, Report
from . import curvature_rules, rules
from .divergence import RunHistory
from .init_audit import init_findings
from .instability import Instability
from .thresholds import Thresholds
from .time_rules import time_ratio


def diagnose(
    reports: Report | Iterable[Report],
    thresholds: Thresholds | None = None,
    learning_rate: float | None = None,
) -> list[Finding]:
    """The findings ``GradWatch`` gives for the last of ``reports``, from its measurements alone.

    ``reports``: one :class:`Report`, or a run's reports in step order (``gw.report`` of each
    logging step, or ``Report.from_dict`` of what a sink wrote). Every rule runs, as in
    ``GradWatch``: the rules of one step, the init audit (on the first report with gain
    factors), the curvature rules, divergence and the rules that need a streak. Those that
    judge a report against earlier ones see only the reports given: from a single report there
    is no divergence (it needs earlier gradient norms), a dead-unit or through-time streak is
    one step long, a curvature measurement is the first, and ``Finding.since`` is its step.
    ``learning_rate``: for reports without their own (``Report.learning_rate``). A report read
    back from strict JSON has lost its NaN and inf (they are null there), so a non-finite step is
    diagnosed from the in-memory report only.

    Example::

        reports.append(gw.step())  # after each logging step of a run
        assert gradwatch.diagnose(reports) == reports[-1].findings
    """
    diagnosis, t, found = Diagnosis(), thresholds or Thresholds(), []
    for report in [reports] if isinstance(reports, Report) else reports:
        lr = report.learning_rate if report.learning_rate is not None else learning_rate
        found = diagnosis.findings(report, t, lr)
    return found


EDGE_BAND = (0.9, 2.0)  # stability ratios where gradient descent oscillates without diverging
_CURVATURE_FLOATS = ("streak_loss", "last_ratio", "last_loss", "loss_peak")


class Diagnosis:
    """What the engine keeps between logging steps to diagnose them; plain data only."""

    def __init__(self) -> None:
        self.first_seen: dict[str, int] = {}  # "layer|kind" -> step it was first found
        self.history = RunHistory()
        # activation -> (logging steps, inputs per unit) it has been dead over, without a break
        self.dead_streaks: dict[str, tuple[int, float]] = {}
        # sequence module -> (step since which, logging steps on which) it vanished through time
        self.decaying_since: dict[str, tuple[int, int]] = {}
        self.audited = False  # the init audit ran (on the first step with gain factors)
        self.flat_lr: float | None = None  # the last curvature measurement was flat, at this lr
        self.curvatures = 0  # curvature measurements so far
        self.sharp_streak = 0  # ... of which the latest ones in a row at the stability limit
        self.high_streak = 0  # ... and at twice the limit or more
        self.streak_loss: float | None = None  # the highest curvature loss when it began
        self.last_ratio: float | None = None  # the latest non-adaptive stability ratio
        self.last_loss: float | None = None  # ... and its curvature loss
        self.loss_peak: float | None = None  # the highest curvature loss of the run
        # layer -> (step, weight gain) when its weights were first measured: the scale it was
        # built (or loaded) with, against which training's drift is told apart from the init
        self.first_gains: dict[str, tuple[int, float]] = {}
        self._gains_read: int | None = None  # the weight step first_gains last looked at
        self.instability = Instability()  # the transformer rules' early values and history

    def findings(
        self,
        report: Report,
        thresholds: Thresholds,
        learning_rate: float | None = None,
        weigh: Callable[[], None] | None = None,
    ) -> list[Finding]:
        """This step's findings, a divergence first: the consequences point to it.

        ``weigh``: reads this step's weights into the report, for a report whose weights are
        from an earlier step; called when a new finding would quote them (a finding seen before
        keeps quoting the older weights, saying from which step, until they are read again)."""
        t = thresholds
        self._note_first_gains(report)
        self._extend_dead_streaks(report, t)
        self._extend_decay(report, t)
        state = (self.dead_streaks, self.decaying_since, self.first_gains)
        found = rules.diagnose(report, t, *state)
        if weigh is not None and any(
            f.kind in rules.QUOTE_WEIGHTS and f"{f.layer}|{f.kind}" not in self.first_seen
            for f in found
        ):
            weigh()
            self._note_first_gains(report)
            found = rules.diagnose(report, t, *state)
        if not self.audited and any(s.gain_factor is not None for s in report.layers.values()):
            self.audited = True  # the first step with the weights and derivatives: once
            found += init_findings(report, rules.chains(report, t.min_chain_length))
        if report.step >= t.warmup_steps:
            sharp = self._curvature(report, t, learning_rate)
            ahead = self.history.judge(
                report, t.jump_ratio, t.growth_ratio, learning_rate, self._at_edge()
            )
            if (
                not ahead and not report.skipped
            ):  # no divergence yet: is the step about to be taken too large?
                ahead = self.history.oversized(report, t.max_update_gain, learning_rate)
            found = ahead + sharp + found
        found += self.instability.findings(report, t, report.step >= t.warmup_steps)
        for f in found:  # each says since when: the one record of when they appeared
            # made just now: set in place (replace() copied each, ~5 us a finding, ~1,350 a
            # step on the benchmark's 1,000-layer net)
            object.__setattr__(
                f, "since", self.first_seen.setdefault(f"{f.layer}|{f.kind}", report.step)
            )
        self.history.add(report, learning_rate)
        return self.history.explain(found)

    def _curvature(self, report: Report, t: Thresholds, lr: float | None) -> list[Finding]:
        """A ravine on the first measurement or a lasting one; a plateau on the second flat
        measurement in a row, unless the learning rate rose in between (a warm-up)."""
        c = report.curvature
        if c is None or report.skipped:
            return []
        self.curvatures += 1
        past = c.stability_ratio is not None and c.stability_ratio >= t.max_stability_ratio
        self.sharp_streak = self.sharp_streak + 1 if past else 0
        high = past and c.stability_ratio >= 2 * t.max_stability_ratio
        self.high_streak = self.high_streak + 1 if high else 0
        if self.sharp_streak == 1:  # the highest the loss had been when the streak began
            levels = [x for x in (self.loss_peak, c.loss) if x is not None and math.isfinite(x)]
            self.streak_loss = max(levels) if levels else None
        first = self.curvatures == 1
        found = curvature_rules.sharp_curvature(
            c, t, lr, self.sharp_streak, first, self.streak_loss, self.high_streak
        )
        if not c.adaptive and c.stability_ratio is not None:
            self.last_ratio, self.last_loss = c.stability_ratio, c.loss
        if c.loss is not None and math.isfinite(c.loss):
            self.loss_peak = c.loss if self.loss_peak is None else max(self.loss_peak, c.loss)
        flat, before = curvature_rules.is_flat(c, t), self.flat_lr
        if flat and before is not None and (lr is None or lr <= before * (1 + 1e-9)):
            found.append(curvature_rules.plateau(c, t))
        self.flat_lr = (lr if lr is not None else 0.0) if flat else None
        return found

    def _note_first_gains(self, report: Report) -> None:
        if report.weight_step is None or report.weight_step == self._gains_read:
            return  # weights not read again since: nothing new (a 2,000-row loop saved)
        self._gains_read = report.weight_step
        for name, s in report.layers.items():
            g = s.weight_gain
            if g is not None and math.isfinite(g) and g > 0 and name not in self.first_gains:
                self.first_gains[name] = (report.weight_step, g)

    def _at_edge(self) -> bool:
        """The latest curvature measurement puts plain or momentum SGD at its stability limit
        (a ratio from 0.9 to 2, where a network's own dynamics flatten an overshoot) with a loss
        no higher than the run has had: a gradient norm that grows there is the oscillation
        along the sharpest direction, which the curvature rule judges, not a divergence."""
        ratio, loss = self.last_ratio, self.last_loss
        if ratio is None or loss is None or self.loss_peak is None:
            return False
        return EDGE_BAND[0] <= ratio < EDGE_BAND[1] and loss < self.loss_peak

    def _extend_dead_streaks(self, report: Report, t: Thresholds) -> None:
        """A layer's dead fraction above the threshold on consecutive logging steps adds up the
        inputs each unit was seen off for (a unit with no gradient keeps its weights, so the
        same units stay off: different batches are more evidence). A step below ends it."""
        if report.skipped:
            return
        streaks = {}
        for name, s in report.layers.items():
            if s.dead_units is not None and s.dead_units >= t.dead_units and s.samples_per_unit:
                steps, seen = self.dead_streaks.get(name, (0, 0.0))
                streaks[name] = (steps + 1, seen + s.samples_per_unit)
        self.dead_streaks = streaks

    def _extend_decay(self, report: Report, t: Thresholds) -> None:
        """A sequence module whose first time steps get below ``vanishing_ratio`` of its last
        one's gradient on consecutive logging steps: since when, and on how many."""
        if report.skipped:
            return
        decaying = {}
        for name, s in report.layers.items():
            ratio = time_ratio(s.time_signal) if s.time_signal is not None else None
            if ratio is not None and ratio < t.vanishing_ratio:
                since, seen = self.decaying_since.get(name, (report.step, 0))
                decaying[name] = (since, seen + 1)
        self.decaying_since = decaying

    def state_dict(self) -> dict[str, Any]:
        """Everything above as plain data (lists for tuples, so JSON keeps it as it is)."""
        return {
            "first_seen": dict(self.first_seen),
            "history": self.history.state_dict(),
            "dead_streaks": {k: list(v) for k, v in self.dead_streaks.items()},
            "decaying_since": {k: list(v) for k, v in self.decaying_since.items()},
            "audited": self.audited,
            "flat_lr": self.flat_lr,
            "curvatures": self.curvatures,
            "sharp_streak": self.sharp_streak,
            "high_streak": self.high_streak,
            **{key: getattr(self, key) for key in _CURVATURE_FLOATS},
            "first_gains": {k: list(v) for k, v in self.first_gains.items()},
            "instability": self.instability.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of :meth:`state_dict`; what an older state lacks starts afresh, except
        the init audit, which a state with history has already passed."""
        self.first_seen = {str(k): int(v) for k, v in state["first_seen"].items()}
        self.history.load_state_dict(state.get("history"))
        pairs = lambda key, a, b: {  # noqa: E731
            str(k): (a(v[0]), b(v[1])) for k, v in (state.get(key) or {}).items()
        }
        self.dead_streaks = pairs("dead_streaks", int, float)
        self.decaying_since = pairs("decaying_since", int, int)
        self.first_gains = pairs("first_gains", int, float)
        self.audited = state.get("audited", self.history.peak is not None or bool(self.first_seen))
        flat = state.get("flat_lr")
        self.flat_lr = float(flat) if flat is not None else None
        self.curvatures = int(state.get("curvatures", 0))
        self.sharp_streak = int(state.get("sharp_streak", 0))
        self.high_streak = int(state.get("high_streak", 0))
        for key in _CURVATURE_FLOATS:
            value = state.get(key)
            setattr(self, key, None if value is None else float(value))
        self.instability.load_state_dict(state.get("instability"))

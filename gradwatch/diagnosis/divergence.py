"""Divergence before it is NaN: each logging step judged against the run's own recent history.

Pure: floats in, findings out; no tensors, modules or I/O. The engine feeds it one report per
logging step (:meth:`RunHistory.judge`, then :meth:`RunHistory.add`).

Two patterns, each needing several logging steps of evidence:

* **A jump**: the global gradient norm far above its recent median, and above the highest it has
  been in the whole run (late in training, when the norm is small, one hard batch can lift it
  50x for a step, back to a level the run was at while it trained well). "Far" is measured against the
  run's own spread (a robust one, the median absolute deviation of the log norms), so a noisy run
  needs a bigger jump than a quiet one, and never less than ``Thresholds.jump_ratio``. With fewer
  than :data:`MIN_SPREAD_STEPS` earlier steps there is no spread to trust: the jump must then be
  the square of ``jump_ratio``.
* **Steady exponential growth**: over the last :data:`MIN_GROWTH_STEPS` to
  :data:`GROWTH_WINDOW` logging steps, the norm rose on nearly every step and by
  ``growth_ratio`` in all, and is now above the highest it has been in the whole run (at the
  edge of stability a steady rise back to an earlier level is an oscillation that falls back).
  The rise is read off the window's least-squares line, which must clear the run's own noise
  (the spread of its step-to-step changes, which a steady exponential does not have) several
  times over: a noisy run whose window starts at a dip and ends at a spike rises end to end, not
  along its line. Gradient descent past its stability limit (a learning rate above
  2/lambda_max) grows the gradient by a constant factor per step: this is its signature.

Before both, and needing no history: **a step too large for the weights**. When the optimizer is
known, its next update is measured per layer (``LayerStats.update_gain``, on the scale of the
weight gain); a layer that one step moves by a whole initialisation's worth and by more than its
own weights is replaced rather than refined, and the gradient norm shows it only after the step.

A healthy run's gradient norm can rise several-fold in its first steps or swing with a one-cycle
schedule; neither is a jump against its own spread, nor steady growth by ``growth_ratio``.

The layer named is the one whose gradient rose most against its own recent median: where the
growth is largest. When the optimizer is known, the learning rate is quoted, and a change of it
within the window is named as the likely cause.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, replace

from ..report import Finding, Report
from ..report.remedies import remedies

WINDOW = 20  # logging steps a jump is judged against
GROWTH_WINDOW = 64  # logging steps a steady growth may span
MIN_SPREAD_STEPS = 5  # earlier steps needed before the run's own spread is trusted
MIN_GROWTH_STEPS = 6  # logging steps a steady growth must span
SPREADS = 6.0  # a jump must also be this many robust standard deviations above the median
RISING_SHARE = 0.8  # share of a growth window's steps on which the norm must rise
CONSEQUENCES = ("dead_units", "saturation")  # what too large a step leaves behind


@dataclass(frozen=True)
class Point:
    step: int
    log_norm: float  # log10 of the global gradient norm
    layers: dict[str, float]  # log10 of each layer's gradient norm
    lr: float | None


@dataclass(frozen=True)
class Divergence:
    """The latest divergence found: findings that first appear from its step on follow from it."""

    step: int
    layer: str
    what: str  # "gradient norm 35x its recent median", "gradient norm grew 40x in 14 logging steps"


class RunHistory:
    """The recent logging steps of one run and the latest divergence found in them."""

    def __init__(self) -> None:
        self.points: deque[Point] = deque(maxlen=GROWTH_WINDOW)
        self.divergence: Divergence | None = None
        self.ongoing = False  # the last step judged was diverging: the same episode goes on
        self.update_ongoing = False  # the same, for a too large update
        self.last_found: int | None = None  # the last step found diverging, either way
        self.peak: float | None = None  # the highest log10 norm of any step remembered

    def add(self, report: Report, lr: float | None = None) -> None:
        """Remember a logging step (not one that was skipped or non-finite: it says nothing about
        the trend, and would poison the baseline)."""
        point = _point(report, lr)
        if point is not None:
            self.points.append(point)
            self.peak = point.log_norm if self.peak is None else max(self.peak, point.log_norm)

    def judge(
        self, report: Report, jump_ratio: float, growth_ratio: float, lr=None, at_edge=False
    ) -> list[Finding]:
        """A ``diverging`` finding when this step's gradient norm jumps or grows out of the run's
        recent history; nothing otherwise. Call before :meth:`add` for the same report.

        ``at_edge``: the curvature probe puts the run at its stability limit with a loss below
        its peak (the edge of stability): the gradient norm jumps or grows there with the
        oscillation along the sharpest direction and falls back as the oscillation flattens it,
        so neither is judged; a divergence shows as a loss past its peak, which ends the hold."""
        now = _point(report, lr)
        if now is None or not self.points or at_edge:
            self.ongoing = False
            return []
        earlier = list(self.points)
        # a rise back to a level the run has been at before is a hard batch or the oscillation
        # of gradient descent at its stability limit, not a divergence
        if now.log_norm <= self.peak:
            self.ongoing = False
            return []
        found = _jump(now, earlier[-WINDOW:], jump_ratio) or _growth(now, earlier, growth_ratio)
        if found is None:
            self.ongoing = False
            return []
        what, short, since, severity, value, threshold = found
        layer, layer_rise = _leading_layer(now, [p for p in earlier if p.step >= since])
        # an episode is dated from its first step: it goes on while every logging step is
        # found diverging, by the norm or by the update
        if not ((self.ongoing or self._found_last_step()) and self.divergence):
            self.divergence = Divergence(now.step, layer or "", short)
        self.ongoing, self.last_found = True, now.step
        msg = (
            f"the gradient norm is diverging: {what}, while it is still finite. "
            f"{_where(layer, layer_rise, len(now.layers))}{_learning_rate(now, earlier)}"
            "Left alone, a few more steps usually end in NaN/Inf or a loss that never comes back."
        )
        ctx = f"gradient norm {10**now.log_norm:.3g} at step {now.step}"
        return [
            Finding(
                layer or "",
                "diverging",
                severity,
                value,
                threshold,
                msg,
                remedies(["lower-lr", "gradient-clipping"], ctx),
            )
        ]

    def oversized(self, report: Report, limit: float, lr: float | None) -> list[Finding]:
        """A ``diverging`` finding when the next update moves a Linear/conv layer by at least
        ``limit`` times the larger of 1 and its weight gain; named at the layer moved most, the
        others counted. Call after :meth:`judge` found nothing, before :meth:`add`."""
        moved = [
            (s.update_gain / max(1.0, s.weight_gain or 0.0), s)
            for s in report.layers.values()
            if s.update_gain is not None and math.isfinite(s.update_gain)
        ]
        over = sorted((m for m in moved if m[0] >= limit), key=lambda m: -m[0])
        if not over:
            self.update_ongoing = False
            return []
        ratio, worst = over[0]
        if not ((self.update_ongoing or self._found_last_step()) and self.divergence):
            short = f"an update of gain {worst.update_gain:.2g} at `{worst.name}`"
            self.divergence = Divergence(report.step, worst.name, short)
        self.update_ongoing, self.last_found = True, report.step
        others = (
            f" (and {len(over) - 1} more layers by {limit:g}x or more)" if len(over) > 1 else ""
        )
        gain = f"{worst.weight_gain:.2g}" if worst.weight_gain is not None else "unknown"
        now = Point(report.step, 0.0, {}, lr)
        msg = (
            f"the next update is too large for the weights: it moves `{worst.name}` "
            f"({worst.module_type}) by a gain of {worst.update_gain:.3g} (RMS of the update x "
            f"sqrt(fan_in); its weights' gain is {gain}, a He/Xavier init's is about 1){others}. "
            f"{_learning_rate(now, list(self.points))}A step that size replaces the layer "
            "instead of refining it; the gradient norm shows it only after the step, usually "
            "as a jump or NaN/Inf."
        )
        ctx = f"`{worst.name}`: update gain {worst.update_gain:.3g}"
        return [
            Finding(
                worst.name, "diverging", "warning", ratio, limit, msg, remedies(["lower-lr"], ctx)
            )
        ]

    def _found_last_step(self) -> bool:
        """The previous logging step was found diverging, by the norm or by the update: the
        episode goes on (it is dated from its first step)."""
        return bool(self.points) and self.last_found == self.points[-1].step

    def explain(self, findings: list[Finding]) -> list[Finding]:
        """Dead or saturated units that first appeared with or after the latest divergence follow
        from it: their message says so and the remedies lead with the step size."""
        d = self.divergence
        if d is None:
            return findings
        out = []
        for f in findings:
            if f.kind in CONSEQUENCES and f.since is not None and f.since >= d.step:
                ids = ["lower-lr", "gradient-clipping"] + [
                    r.id for r in f.remedies if r.id not in ("lower-lr", "gradient-clipping")
                ]
                f = replace(
                    f,
                    message=(
                        f"{f.message} Likely cause: these units appeared with the divergence at "
                        f"step {d.step} ({d.what}): updates that large push pre-activations to "
                        "where the activation is flat for every input."
                    ),
                    remedies=remedies(ids, f"`{f.layer}`: after the divergence at step {d.step}"),
                )
            out.append(f)
        return out

    def state_dict(self) -> dict:
        d = self.divergence
        return {
            "divergence": None if d is None else [d.step, d.layer, d.what],
            "ongoing": self.ongoing,
            "update_ongoing": self.update_ongoing,
            "last_found": self.last_found,
            "peak": self.peak,
            "points": [[p.step, p.log_norm, dict(p.layers), p.lr] for p in self.points],
        }

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}  # absent in the oldest states
        d = state.get("divergence")
        self.divergence = Divergence(int(d[0]), str(d[1]), str(d[2])) if d else None
        self.ongoing = bool(state.get("ongoing"))
        self.update_ongoing = bool(state.get("update_ongoing"))
        last = state.get("last_found")
        self.last_found = int(last) if last is not None else None
        peak = state.get("peak")
        self.peak = float(peak) if peak is not None else None
        self.points.clear()
        for step, log_norm, layers, lr in state.get("points", ()):
            layers = {str(k): float(v) for k, v in layers.items()}
            self.points.append(Point(int(step), float(log_norm), layers, lr))


def _point(report: Report, lr: float | None) -> Point | None:
    g = report.global_grad_norm
    if report.skipped or g is None or not math.isfinite(g) or g <= 0:
        return None
    layers = {
        name: math.log10(s.grad_norm)
        for name, s in report.layers.items()
        if s.grad_norm is not None and math.isfinite(s.grad_norm) and s.grad_norm > 0
    }
    return Point(report.step, math.log10(g), layers, lr)


# what happened, the same in short, the first step of the evidence, severity, the measured ratio
# and its threshold
_Found = tuple[str, str, int, str, float, float]


def _jump(now: Point, earlier: list[Point], ratio: float) -> _Found | None:
    logs = [p.log_norm for p in earlier]
    base = statistics.median(logs)
    rise = now.log_norm - base
    if len(logs) >= MIN_SPREAD_STEPS:
        # a robust standard deviation: 1.4826 x the median absolute deviation
        spread = 1.4826 * statistics.median([abs(x - base) for x in logs])
        needed = max(math.log10(ratio), SPREADS * spread)
    else:
        needed = 2 * math.log10(ratio)  # no spread yet: demand the square
    if rise < needed:
        return None
    what = (
        f"{10**now.log_norm:.3g} at step {now.step}, {10**rise:.0f}x its median of "
        f"{10**base:.3g} over the {len(logs)} logging steps before"
    )
    severity = "error" if rise >= 2 * needed else "warning"
    short = f"gradient norm {10**rise:.0f}x its recent median"
    return what, short, earlier[0].step, severity, 10**rise, 10**needed


def _growth(now: Point, earlier: list[Point], ratio: float) -> _Found | None:
    series = earlier + [now]
    noise = _step_noise([p.log_norm for p in series])
    for n in range(len(series), MIN_GROWTH_STEPS - 1, -1):  # the longest window that qualifies
        tail = series[-n:]
        logs = [p.log_norm for p in tail]
        rises = sum(b > a for a, b in zip(logs, logs[1:]))
        total = logs[-1] - logs[0]
        if logs[-1] < max(logs) or rises < RISING_SHARE * (n - 1) or total < math.log10(ratio):
            continue
        # the least-squares rise, which noise of the run's own size moves by about
        # noise * (n - 1) / sqrt(sxx): it must clear that SPREADS times over
        sxx = n * (n * n - 1) / 12
        needed = max(math.log10(ratio), SPREADS * noise * (n - 1) / math.sqrt(sxx))
        if _fitted_rise(logs) >= needed:
            per_step = 10 ** (total / (n - 1))
            what = (
                f"it grew {10**total:.0f}x over the last {n} logging steps (steps "
                f"{tail[0].step}-{now.step}, about {per_step:.2f}x per logging step)"
            )
            short = f"gradient norm grew {10**total:.0f}x in {n - 1} logging steps"
            return what, short, tail[0].step, "warning", 10**total, ratio
    return None


def _step_noise(logs: list[float]) -> float:
    """The run's own noise in log10 norm, free of any trend: a robust standard deviation of the
    changes from one logging step to the next (a steady exponential has none), per step."""
    diffs = [b - a for a, b in zip(logs, logs[1:])]
    if len(diffs) < MIN_SPREAD_STEPS:
        return 0.0
    mid = statistics.median(diffs)
    return 1.4826 * statistics.median([abs(d - mid) for d in diffs]) / math.sqrt(2)


def _fitted_rise(logs: list[float]) -> float:
    """The rise over ``logs`` of their least-squares line: unlike the difference of the two
    ends, a low outlier at the start or a spike at the end of a noisy run cannot make it."""
    n = len(logs)
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(logs)
    sxy = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(logs))
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    return sxy / sxx * (n - 1)


def _leading_layer(now: Point, earlier: list[Point]) -> tuple[str | None, float]:
    best, best_rise = None, -math.inf
    for name, value in now.layers.items():
        past = [p.layers[name] for p in earlier if name in p.layers]
        if past:
            rise = value - statistics.median(past)
            if rise > best_rise:
                best, best_rise = name, rise
    return best, best_rise


def _where(layer: str | None, rise: float, layers: int) -> str:
    if layer is None or layers < 2:  # one layer: the model is where it grew
        return ""
    return (
        f"It grew most at `{layer or '(root)'}` ({10**rise:.0f}x its own median over those steps). "
    )


def _learning_rate(now: Point, earlier: list[Point]) -> str:
    if now.lr is None:
        return ""
    lower = [p for p in earlier if p.lr is not None and p.lr <= now.lr / 2]
    if lower:  # the latest step whose rate was at most half of today's
        before = lower[-1]
        return (
            f"The learning rate rose from {before.lr:.3g} (step {before.step}) to "
            f"{now.lr:.3g}: the likely cause. "
        )
    return f"The learning rate is {now.lr:.3g}. "

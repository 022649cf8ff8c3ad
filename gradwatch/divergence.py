"""Divergence before it is NaN: each logging step judged against the run's own recent history.

Pure: floats in, findings out; no tensors, modules or I/O. The engine feeds it one report per
logging step (:meth:`RunHistory.judge`, then :meth:`RunHistory.add`).

Two patterns, each needing several logging steps of evidence:

* **A jump**: the global gradient norm far above its recent median. "Far" is measured against the
  run's own spread (a robust one, the median absolute deviation of the log norms), so a noisy run
  needs a bigger jump than a quiet one, and never less than ``Thresholds.jump_ratio``. With fewer
  than :data:`MIN_SPREAD_STEPS` earlier steps there is no spread to trust: the jump must then be
  the square of ``jump_ratio``.
* **Steady exponential growth**: over the last :data:`MIN_GROWTH_STEPS` to
  :data:`GROWTH_WINDOW` logging steps, the norm rose on nearly every step and by
  ``growth_ratio`` in all, and is now at its highest. Gradient descent past its stability limit (a learning rate above
  2/lambda_max) grows the gradient by a constant factor per step: this is its signature.

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

from .remedies import remedies
from .report import Finding, Report

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

    def add(self, report: Report, lr: float | None = None) -> None:
        """Remember a logging step (not one that was skipped or non-finite: it says nothing about
        the trend, and would poison the baseline)."""
        point = _point(report, lr)
        if point is not None:
            self.points.append(point)

    def judge(
        self, report: Report, jump_ratio: float, growth_ratio: float, lr=None
    ) -> list[Finding]:
        """A ``diverging`` finding when this step's gradient norm jumps or grows out of the run's
        recent history; nothing otherwise. Call before :meth:`add` for the same report."""
        now = _point(report, lr)
        if now is None or not self.points:
            self.ongoing = False
            return []
        earlier = list(self.points)
        found = _jump(now, earlier[-WINDOW:], jump_ratio) or _growth(now, earlier, growth_ratio)
        if found is None:
            self.ongoing = False
            return []
        what, short, since, severity, value, threshold = found
        layer, layer_rise = _leading_layer(now, [p for p in earlier if p.step >= since])
        if not (self.ongoing and self.divergence):  # an episode is dated from its first step
            self.divergence = Divergence(now.step, layer or "", short)
        self.ongoing = True
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
        }

    def load_state_dict(self, state: dict) -> None:
        d = (state or {}).get("divergence")
        self.divergence = Divergence(int(d[0]), str(d[1]), str(d[2])) if d else None
        self.ongoing = bool((state or {}).get("ongoing"))


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
    for n in range(len(series), MIN_GROWTH_STEPS - 1, -1):  # the longest window that qualifies
        tail = series[-n:]
        logs = [p.log_norm for p in tail]
        rises = sum(b > a for a, b in zip(logs, logs[1:]))
        total = logs[-1] - logs[0]
        if logs[-1] >= max(logs) and rises >= RISING_SHARE * (n - 1) and total >= math.log10(ratio):
            per_step = 10 ** (total / (n - 1))
            what = (
                f"it grew {10**total:.0f}x over the last {n} logging steps (steps "
                f"{tail[0].step}-{now.step}, about {per_step:.2f}x per logging step)"
            )
            short = f"gradient norm grew {10**total:.0f}x in {n - 1} logging steps"
            return what, short, tail[0].step, "warning", 10**total, ratio
    return None


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

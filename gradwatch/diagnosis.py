"""A run's findings, step after step: the rules on each report, the report against the run's
recent history (divergence), and since when each finding has been found."""

from __future__ import annotations

from typing import Any

from . import rules
from .divergence import RunHistory
from .report import Finding, Report
from .rules import Thresholds


class Diagnosis:
    """What the engine keeps between logging steps to diagnose them; plain data only."""

    def __init__(self) -> None:
        self.first_seen: dict[str, int] = {}  # "layer|kind" -> step it was first found
        self.history = RunHistory()

    def findings(
        self, report: Report, thresholds: Thresholds, learning_rate: float | None = None
    ) -> list[Finding]:
        """This step's findings, a divergence first: the consequences point to it."""
        t = thresholds
        found = rules.diagnose(report, t)
        if report.step >= t.warmup_steps:
            found = self.history.judge(report, t.jump_ratio, t.growth_ratio, learning_rate) + found
        for f in found:  # each says since when: the one record of when they appeared
            # made just now: set in place (replace() copied each, ~5 us a finding, ~1,350 a
            # step on the benchmark's 1,000-layer net)
            object.__setattr__(
                f, "since", self.first_seen.setdefault(f"{f.layer}|{f.kind}", report.step)
            )
        self.history.add(report, learning_rate)
        return self.history.explain(found)

    def state_dict(self) -> dict[str, Any]:
        return {"first_seen": dict(self.first_seen), "history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_seen = {str(k): int(v) for k, v in state["first_seen"].items()}
        self.history.load_state_dict(state.get("history"))  # absent in older states

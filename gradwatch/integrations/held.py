"""What a Trainer callback keeps of its :class:`~gradwatch.GradWatch` engine: the engine while
a training run goes on, its state (the history and the latest report) between runs, in
checkpoints and in pickles. Both callbacks share it."""

from __future__ import annotations

from typing import Any

from ..report import Report
from ..watch import GradWatch


class HeldEngine:
    """A mixin: ``_engine`` while training, ``_state`` otherwise."""

    _engine: GradWatch | None
    _state: dict[str, Any] | None

    @property
    def report(self) -> Report | None:
        """The latest :class:`~gradwatch.Report` (kept after training ends)."""
        if self._engine is not None:
            return self._engine.report
        if self._state and self._state.get("report"):
            return Report.from_dict(self._state["report"])
        return None

    def _release(self) -> None:
        """Keep the engine's state and close it: its hooks and writer come off the model."""
        if self._engine is not None:
            engine, self._engine = self._engine, None
            try:
                self._state = engine.state_dict()
            finally:
                engine.close(guard=True)  # inside the Trainer: never raise a warning into it

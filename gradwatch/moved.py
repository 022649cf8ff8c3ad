"""The modules that moved when the package was laid out by stage (0.2): their old names still
import, with a ``DeprecationWarning`` naming the new one, for one release."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

# old module -> new module
MOVED = {
    "gradwatch.render": "gradwatch.report.text",
    "gradwatch.remedies": "gradwatch.report.remedies",
    "gradwatch.words": "gradwatch.report.words",
    "gradwatch.stats": "gradwatch.measure.stats",
    "gradwatch.adam": "gradwatch.measure.adam",
    "gradwatch.updates": "gradwatch.measure.updates",
    "gradwatch.gather": "gradwatch.step.gather",
    "gradwatch.stepdata": "gradwatch.step.message",
    "gradwatch.distributed": "gradwatch.step.distributed",
    "gradwatch.readout": "gradwatch.step.readout",
    "gradwatch.curvature": "gradwatch.step.curvature",
    "gradwatch.rules": "gradwatch.diagnosis.rules",
    "gradwatch.activation_rules": "gradwatch.diagnosis.activation_rules",
    "gradwatch.time_rules": "gradwatch.diagnosis.time_rules",
    "gradwatch.curvature_rules": "gradwatch.diagnosis.curvature_rules",
    "gradwatch.divergence": "gradwatch.diagnosis.divergence",
    "gradwatch.init_audit": "gradwatch.diagnosis.init_audit",
    "gradwatch.thresholds": "gradwatch.diagnosis.thresholds",
    "gradwatch.notices": "gradwatch.diagnosis.notices",
    "gradwatch.sinks": "gradwatch.output.sinks",
    "gradwatch.tags": "gradwatch.output.tags",
    "gradwatch.dashboard": "gradwatch.output.dashboard",
    "gradwatch.heatmaps": "gradwatch.output.heatmaps",
    "gradwatch.figures": "gradwatch.output.figures",
    "gradwatch.logreader": "gradwatch.output.logreader",
    "gradwatch.lightning": "gradwatch.integrations.lightning",
    "gradwatch.demo": "gradwatch.cli.demo",
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old name as the module that now holds it (the same module object)."""

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}  # new name -> its own spec, while an old name loads

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        warn(spec.name, stacklevel=3)
        module = importlib.import_module(MOVED[spec.name])
        self._specs[module.__name__] = module.__spec__  # the import system sets the old one
        return module

    def exec_module(self, module):
        # the new module has run already; it keeps its own spec (reload works on it)
        module.__spec__ = self._specs.pop(module.__name__, module.__spec__)


def warn(old: str, stacklevel: int) -> None:
    warnings.warn(
        f"{old} moved to {MOVED[old]}; the old name goes in the next release",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def install() -> None:
    if not any(isinstance(f, _OldNames) for f in sys.meta_path):
        sys.meta_path.append(_OldNames())

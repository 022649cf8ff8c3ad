"""The modules that moved when the package was laid out by stage (0.2): their old names still
import, with a ``DeprecationWarning`` naming the new one, for one release."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

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

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the new module has run already


def install() -> None:
    if not any(isinstance(f, _OldNames) for f in sys.meta_path):
        sys.meta_path.append(_OldNames())

"""gradwatch: which layers of a PyTorch model have stopped learning, and why.

Hooks on any ``nn.Module`` measure per-layer gradient norms, the backward signal (the gradient
reaching each layer's output) and activation saturation / dead units; the diagnosis flags vanishing,
exploding, saturated, dead and non-finite layers with remedies, and writes it all to TensorBoard.
"""

from . import moved
from .diagnosis import diagnose
from .diagnosis.thresholds import Thresholds
from .exceptions import GradWatchWarning, NonFiniteError
from .options import Options
from .output.sinks import Sink
from .report import Finding, LayerStats, Remedy, Report
from .report.remedies import CATALOGUE
from .watch import GradWatch

moved.install()

__version__ = "0.1.0"

__all__ = [
    "CATALOGUE",
    "Finding",
    "GradWatch",
    "GradWatchCallback",
    "GradWatchTrainerCallback",
    "GradWatchWarning",
    "LayerStats",
    "NonFiniteError",
    "Options",
    "Remedy",
    "Report",
    "Sink",
    "Thresholds",
    "diagnose",
]


def __getattr__(name: str):
    # Lightning is imported only when the callback is asked for: `import gradwatch` stays light.
    if name == "GradWatchCallback":
        from .integrations.lightning import GradWatchCallback

        return GradWatchCallback
    if name == "GradWatchTrainerCallback":  # Hugging Face transformers, likewise
        from .integrations.hf import GradWatchTrainerCallback

        return GradWatchTrainerCallback
    old = f"gradwatch.{name}"
    if old in moved.MOVED:  # gradwatch.sinks, ...: the moved module, with a warning at the caller
        import importlib

        moved.warn(old, stacklevel=3)
        return importlib.import_module(moved.MOVED[old])
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")

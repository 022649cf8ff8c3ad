"""gradwatch: which layers of a PyTorch model have stopped learning, and why.

Hooks on any ``nn.Module`` measure per-layer gradient norms, the backward signal (the gradient
reaching each layer's output) and activation saturation / dead units; the diagnosis flags vanishing,
exploding, saturated, dead and non-finite layers with remedies, and writes it all to TensorBoard.
"""

from .diagnosis import diagnose
from .exceptions import GradWatchWarning, NonFiniteError
from .options import Options
from .remedies import CATALOGUE
from .report import Finding, LayerStats, Remedy, Report
from .sinks import Sink
from .thresholds import Thresholds
from .watch import GradWatch

__version__ = "0.1.0"

__all__ = [
    "CATALOGUE",
    "Finding",
    "GradWatch",
    "GradWatchCallback",
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
        from .lightning import GradWatchCallback

        return GradWatchCallback
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
